"""The metadata onnxbp records in the models it writes, written and read here only.

``onnxbp.gradients``: ``p1=g1,p2=g2,...``, each parameter of a gradient model
and the output holding its gradient (:func:`onnxbp.gradient`).
``onnxbp.training``: the JSON :class:`~onnxbp.training.StepSpec` of a
training-step model.

A tool that rewrites a model may drop ``metadata_props`` (an
onnx-graphsurgeon round trip does); :func:`gradient_names` then falls back
to the contract's names: an output ``<p><suffix>`` for a graph input or
initializer ``p``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import onnx

from .errors import OnnxbpError

GRADIENTS_KEY = "onnxbp.gradients"
TRAINING_KEY = "onnxbp.training"


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


def set_gradient_names(model: onnx.ModelProto, names: Mapping[str, str]) -> None:
    put(model, GRADIENTS_KEY, ",".join(f"{p}={g}" for p, g in names.items()))


def gradient_names(model: onnx.ModelProto, suffix: str = "_grad") -> dict:
    """``{param: gradient output name}`` of a gradient model.

    From the ``onnxbp.gradients`` metadata; where a rewriting tool dropped it,
    from the output names (``<p><suffix>`` for an input or initializer ``p``).
    """
    value = get(model, GRADIENTS_KEY)
    if value is not None:
        return dict(item.split("=", 1) for item in value.split(",") if item)
    g = model.graph
    sources = {i.name for i in g.input} | {t.name for t in g.initializer}
    found = {o.name[: -len(suffix)]: o.name for o in g.output
             if suffix and o.name.endswith(suffix) and o.name[: -len(suffix)] in sources}
    if found:
        return found
    raise OnnxbpError(f"the model carries no {GRADIENTS_KEY} metadata and no output named <input>{suffix}; "
                      f"build it with onnxbp.gradient")
