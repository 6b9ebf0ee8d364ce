"""The metadata onnxbp records in the models it writes, written and read here only.

``onnxbp.gradients``: ``p1=g1,p2=g2,...``, each parameter of a gradient model
and the output holding its gradient (:func:`onnxbp.gradient`); for a nested
call (a gradient of a gradient model) those of the latest call.
``onnxbp.gradient_order``: the order of a gradient model of a gradient model
(``2`` for ``gradient(gradient(m))``); absent means 1.  The default suffix
of order ``k`` is ``_grad`` for ``k = 1`` and ``_grad<k>`` above
(:func:`order_suffix`): ``_grad2`` outputs sit next to the first-order
``_grad`` ones, and the seed of a first-order output ``<p>_grad`` is
``<p>_grad_grad2``.  (Repeating ``_grad`` would not do: the order-2 seed of
``<p>_grad``, ``<p>_grad_grad_grad``, is the order-3 gradient of ``p``.)
``onnxbp.zero_gradients``: ``p1,p2,...``, the parameters of the latest call
whose gradient is structurally zero (no gradient reaches them from the
seeds): their outputs are zero tensors, stated here.
``onnxbp.second_order``: the JSON description of a Hessian-vector product or
gradient-penalty model (:mod:`onnxbp.second_order`): its kind, loss, inputs,
outputs and structurally zero blocks.
``onnxbp.training``: the JSON :class:`~onnxbp.training.StepSpec` of a
training-step model.

A tool that rewrites a model may drop ``metadata_props`` (an
onnx-graphsurgeon round trip does); :func:`gradient_names` then falls back
to the contract's names: an output ``<p><suffix>`` for a graph input or
initializer ``p`` (the highest order's suffix that matches first: a
second-order model's ``<p>_grad2`` before its ``<p>_grad``).
"""

from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

import onnx

from .errors import OnnxbpError

GRADIENTS_KEY = "onnxbp.gradients"
ORDER_KEY = "onnxbp.gradient_order"
ZEROS_KEY = "onnxbp.zero_gradients"
TRAINING_KEY = "onnxbp.training"
SECOND_ORDER_KEY = "onnxbp.second_order"

_DEFAULT = "_grad"
_MAX_ORDER = 8  # the highest order the metadata-free fallbacks try


def get(model: onnx.ModelProto, key: str) -> Optional[str]:
    for prop in model.metadata_props:
        if prop.key == key:
            return prop.value
    return None


def put(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set ``key`` to ``value`` (replacing an earlier value of the key)."""
    for prop in list(model.metadata_props):
        if prop.key == key:
            model.metadata_props.remove(prop)
    prop = model.metadata_props.add()
    prop.key = key
    prop.value = value


def drop(model: onnx.ModelProto, key: str) -> None:
    for prop in list(model.metadata_props):
        if prop.key == key:
            model.metadata_props.remove(prop)


def order_suffix(order: int) -> str:
    """The default suffix of a gradient model of order ``order``: ``_grad``, ``_grad2``, ``_grad3``, ..."""
    return _DEFAULT if order <= 1 else f"{_DEFAULT}{order}"


def set_gradient_names(model: onnx.ModelProto, names: Mapping[str, str], order: int = 1,
                       zeros: Sequence[str] = ()) -> None:
    put(model, GRADIENTS_KEY, ",".join(f"{p}={g}" for p, g in names.items()))
    if order > 1:
        put(model, ORDER_KEY, str(order))
    else:
        drop(model, ORDER_KEY)
    if zeros:
        put(model, ZEROS_KEY, ",".join(zeros))
    else:
        drop(model, ZEROS_KEY)


def zero_gradients(model: onnx.ModelProto) -> list:
    """The parameters whose gradient output is a structurally zero tensor (latest call)."""
    value = get(model, ZEROS_KEY)
    return [p for p in value.split(",") if p] if value else []


def _contract_matches(model: onnx.ModelProto, suffix: str) -> dict:
    g = model.graph
    sources = {i.name for i in g.input} | {t.name for t in g.initializer}
    return {o.name[: -len(suffix)]: o.name for o in g.output
            if suffix and o.name.endswith(suffix) and o.name[: -len(suffix)] in sources}


def gradient_order(model: onnx.ModelProto) -> int:
    """0 for a forward model, ``k`` for a gradient model of order ``k``.

    From the metadata; where it was dropped, the largest ``k`` for which the
    model has both an output ``<p>`` + ``order_suffix(k)`` (``p`` an input or
    initializer) and an input ``<Y>`` + ``order_suffix(k)`` for an output
    ``Y`` (the contract's names).
    """
    value = get(model, ORDER_KEY)
    if value is not None:
        try:
            return max(1, int(value))
        except ValueError:
            raise OnnxbpError(f"metadata {ORDER_KEY}={value!r} is not a whole number") from None
    if get(model, GRADIENTS_KEY) is not None:
        return 1
    g = model.graph
    outputs = {o.name for o in g.output}
    inputs = {i.name for i in g.input}
    for k in range(_MAX_ORDER, 0, -1):
        suffix = order_suffix(k)
        if _contract_matches(model, suffix) and any(i.endswith(suffix) and i[: -len(suffix)] in outputs
                                                    for i in inputs):
            return k
    return 0


def gradient_names(model: onnx.ModelProto, suffix: Optional[str] = None) -> dict:
    """``{param: gradient output name}`` of a gradient model.

    From the ``onnxbp.gradients`` metadata; where a rewriting tool dropped it,
    from the output names (``<p><suffix>`` for an input or initializer ``p``;
    ``suffix=None``: the highest order's :func:`order_suffix` that matches).
    """
    value = get(model, GRADIENTS_KEY)
    if value is not None:
        return dict(item.split("=", 1) for item in value.split(",") if item)
    suffixes = [suffix] if suffix is not None else [order_suffix(k) for k in range(_MAX_ORDER, 0, -1)]
    for sfx in suffixes:
        found = _contract_matches(model, sfx)
        if found:
            return found
    suffix = suffix if suffix is not None else _DEFAULT
    raise OnnxbpError(f"the model carries no {GRADIENTS_KEY} metadata and no output named <input>{suffix}; "
                      f"build it with onnxbp.gradient")


def set_second_order(model: onnx.ModelProto, spec: Mapping) -> None:
    put(model, SECOND_ORDER_KEY, json.dumps(spec, sort_keys=True))


def second_order(model: onnx.ModelProto) -> dict:
    """The ``onnxbp.second_order`` description of a model built by :mod:`onnxbp.second_order`."""
    value = get(model, SECOND_ORDER_KEY)
    if value is None:
        raise OnnxbpError(f"the model carries no {SECOND_ORDER_KEY} metadata; build it with onnxbp.hvp "
                          f"or onnxbp.gradient_penalty")
    try:
        return json.loads(value)
    except ValueError:
        raise OnnxbpError(f"the {SECOND_ORDER_KEY} metadata is not JSON") from None
