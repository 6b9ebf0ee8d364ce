"""Second-order uses of :func:`onnxbp.backward`: Hessian-vector products and gradient penalties.

Both differentiate a model that already holds a backward graph, so they are
two :func:`~onnxbp.engine.backward` calls with a few nodes between them:

``hvp(model, wrt=None, loss=None)``
    Pearlmutter's trick: ``H v = d/dθ <∇θ L, v>``.  The first backward
    seeds ``loss`` with 1.0 (a non-scalar loss is summed) and gives ``∇θ L``;
    ``s = Σ_p ReduceSum(∇_p L * v_p)`` is written next, with one new input
    ``<p>_v`` per parameter; the second backward seeds ``s`` with 1.0 and
    gives ``H v``, as outputs ``<p>_hvp`` (``gradients=True``: also ``∇θ L``
    as ``<p>_grad``).  A block of ``H`` that is structurally zero (the
    gradient of ``p`` reaches no other gradient, such as the last bias of a
    linear loss) is a zero output, logged and listed in the metadata.
``gradient_penalty(model, x=None, wrt=None, loss=None)``
    ``||∂L/∂x||²`` (``center=c``: WGAN-GP's ``mean_i (||∂L/∂x_i||₂ - c)²``
    over the batch axis) as the scalar output ``gradient_penalty``; the
    first backward differentiates ``loss`` w.r.t. the graph inputs ``x``.
    With ``gradients=True`` (default) a second backward adds its gradient
    w.r.t. the parameters ``θ`` as outputs ``<p>_grad``: the training signal
    of the penalty.  ``gradients=False`` leaves the penalty an output any loss
    builder can differentiate again (a training step with ``loss="output"``).

Both record what they built in the ``onnxbp.second_order`` metadata
(:func:`onnxbp.metadata.second_order`).  :func:`check_second_order` is the
``onnxbp check --second-order`` check: for an HVP, central differences of the
first-order gradient model along ``v`` in float64 (``(∇L(θ+εv) -
∇L(θ-εv)) / 2ε``, every element); for a gradient penalty,
:func:`onnxbp.check_gradients` of the penalty model.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import numpy_helper

from . import metadata
from .checker import CheckReport, GradCheck, _Forward, random_feeds, check_gradients
from .engine import backward
from .errors import InternalError, NameCollisionError, OptionError, WrtError
from .modelio import ModelLike, check_full, cpu_session, load_model
from .naming import reads
from .types import FLOAT_TYPES, TensorInfo
from .writer import GraphWriter, value_info

log = logging.getLogger(__name__)

__all__ = ["hvp", "gradient_penalty", "check_second_order", "KINDS"]

#: ``onnxbp check --second-order`` choices
KINDS = ("hvp", "gradient-penalty")

_DOC = "onnxbp: second-order"


def _names(v: Union[None, str, Iterable[str]]) -> Optional[list]:
    return None if v is None else [v] if isinstance(v, str) else list(v)


def _loss_name(proto: onnx.ModelProto, loss: Optional[str]) -> str:
    """The tensor to differentiate: ``loss`` (checked by :func:`backward`), else the model's only
    floating-point output."""
    if loss is not None:
        return loss
    floats = [o.name for o in proto.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    if len(floats) != 1:
        raise WrtError(f"the model has {len(floats)} floating-point outputs ({', '.join(floats[:4])}); "
                       f"name the tensor to differentiate with loss=... (--loss)")
    return floats[0]


def _claim(w: GraphWriter, name: str, what: str) -> str:
    if w.names.is_used(name):
        raise NameCollisionError(f"the model already has a tensor or node named {name!r}, the name of {what}")
    return w.names.reserve(name)


def _input_like(proto: onnx.ModelProto, infos: dict, name: str, p: str) -> onnx.ValueInfoProto:
    """A graph input ``name`` typed and shaped like parameter ``p`` (an initializer or a graph input)."""
    for t in proto.graph.initializer:
        if t.name == p:
            return value_info(name, t.data_type, list(t.dims))
    for vi in proto.graph.input:
        if vi.name == p:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            out.name = name
            return out
    info = infos[p]
    return value_info(name, info.elem_type, None if info.shape is None else list(info.shape))


def _total(w: GraphWriter, terms: Sequence[str], infos: dict, like: str) -> str:
    """Sum of scalar terms (one Sum node, or the term itself)."""
    out = terms[0] if len(terms) == 1 else w.op("Sum", *terms, name="sum")
    infos[out] = TensorInfo(infos[like].elem_type, ())
    return out


def _dot(w: GraphWriter, a: str, b: str, infos: dict, like: str) -> str:
    """``<a, b>``: ReduceSum of the product over every axis (a scalar)."""
    prod = w.op("Mul", a, b)
    flat = w.op("Reshape", prod, w.ints([-1]))
    out = w.reduce_sum(flat, [0], keepdims=False)
    infos[out] = TensorInfo(infos[like].elem_type, ())
    return out


def _append(model: onnx.ModelProto, w: GraphWriter, inputs: Sequence[onnx.ValueInfoProto] = ()) -> None:
    model.graph.node.extend(w.take_nodes())
    model.graph.input.extend(inputs)


def _hvp_stage(model: ModelLike, wrt, loss: Optional[str], gradients: bool, options: dict):
    """Forward + first backward + ``s = <∇θL, v>``: ``(model, loss, params, {p: v}, {p: ∇p}, s)``."""
    proto = load_model(model)
    loss = _loss_name(proto, loss)
    bw = backward(proto, _names(wrt), seeds={loss: 1.0}, check=True, inplace=True,
                  grad_names=(lambda p: p + "_grad") if gradients else None, **options)
    m, params = bw.model, list(bw.gradients)
    w = GraphWriter.for_model(m, "onnxbp/hvp", f"{_DOC}: <grad L, v> for the Hessian-vector product",
                              infos=bw.infos)
    vecs, inputs = {}, []
    for p in params:
        vecs[p] = _claim(w, p + "_v", f"the Hessian-vector product's direction input for {p!r}")
        inputs.append(_input_like(m, bw.infos, vecs[p], p))
        bw.infos[vecs[p]] = bw.infos.get(p) or TensorInfo(inputs[-1].type.tensor_type.elem_type, None)
    terms = [_dot(w.scoped(f"onnxbp/hvp/{p}"), bw.gradients[p], vecs[p], bw.infos, p) for p in params]
    s = _total(w, terms, bw.infos, params[0])
    _append(m, w, inputs)
    return m, loss, params, vecs, dict(bw.gradients), s


def hvp(model: ModelLike, wrt: Optional[Iterable[str]] = None, loss: Optional[str] = None, *,
        gradients: bool = False, out_suffix: str = "_hvp", **options: Any) -> onnx.ModelProto:
    """A model computing the Hessian-vector product ``H v`` of ``loss`` w.r.t. ``wrt``.

    ``loss``: a tensor of ``model`` (default: its only float output; a
    non-scalar tensor is summed).  ``wrt``: initializers or float graph inputs
    (``None``: every float initializer a gradient of ``loss`` reaches).  The
    result keeps the forward outputs and adds, per parameter ``p``, an input
    ``<p>_v`` (shaped like ``p``) and an output ``<p><out_suffix>`` = ``(H
    v)_p = Σ_q ∂²L/∂p∂q v_q``; ``gradients=True`` also outputs ``∇_p L`` as
    ``<p>_grad``.  Structurally zero blocks are zero outputs (logged; listed
    in the metadata).  Options (``conv_strategy=...``) select lowerings.
    """
    m, loss, params, vecs, grads, s = _hvp_stage(model, wrt, loss, gradients, options)
    bw = backward(m, params, seeds={s: 1.0}, grad_names={p: p + out_suffix for p in params},
                  check=False, inplace=True, zero_unreachable=True, **options)
    m = bw.model
    outs = list(bw.gradients.values())
    if gradients:
        outs = [grads[p] for p in params] + outs
    known = {o.name for o in m.graph.output}
    for name, p in zip(outs, (params + params) if gradients else params):
        if name not in known:
            m.graph.output.append(_input_like(m, bw.infos, name, p))
    metadata.set_second_order(m, {"kind": "hvp", "loss": loss, "params": params, "vectors": vecs,
                                  "outputs": dict(bw.gradients), "zeros": bw.zeros,
                                  "gradients": {p: grads[p] for p in params} if gradients else {}})
    check_full(m, InternalError, "the Hessian-vector product model fails the ONNX checker")
    log.info("hvp model: %d parameters, %d nodes%s", len(params), len(m.graph.node),
             f", structurally zero blocks: {', '.join(bw.zeros)}" if bw.zeros else "")
    return m


def _penalty_model(model: ModelLike, x, loss: Optional[str], center: Optional[float], output: str,
                   keep_outputs: bool, options: dict):
    proto = load_model(model)
    loss = _loss_name(proto, loss)
    inits = {t.name for t in proto.graph.initializer}
    xs = _names(x)
    if xs is None:
        xs = [i.name for i in proto.graph.input
              if i.name not in inits and i.type.tensor_type.elem_type in FLOAT_TYPES]
        if not xs:
            raise WrtError("the model has no floating-point graph input to penalise; name it with x=... (--x)")
    for name in xs:
        if name in inits or name not in {i.name for i in proto.graph.input}:
            raise WrtError(f"x name {name!r} is not a graph input (the gradient penalty differentiates w.r.t. "
                           f"the data inputs)")
    bw = backward(proto, xs, seeds={loss: 1.0}, check=True, inplace=True, **options)
    m = bw.model
    w = GraphWriter.for_model(m, "onnxbp/penalty", f"{_DOC}: the gradient penalty ||dL/dx||^2",
                              infos=bw.infos)
    name = _claim(w, output, "the gradient penalty output")
    if center is None:
        terms = [_dot(w.scoped(f"onnxbp/penalty/{p}"), bw.gradients[p], bw.gradients[p], bw.infos, p)
                 for p in xs]
        pen = _total(w, terms, bw.infos, xs[0])
    else:
        # per sample i (axis 0): ||dL/dx_i||_2 over every x and every other axis, then mean_i (norm - c)^2
        sq = []
        for p in xs:
            ws = w.scoped(f"onnxbp/penalty/{p}")
            g = bw.gradients[p]
            flat = ws.op("Reshape", ws.op("Mul", g, g), ws.ints([0, -1]))
            sq.append(ws.reduce_sum(flat, [1], keepdims=False))
        total = sq[0] if len(sq) == 1 else w.op("Sum", *sq)
        dev = w.op("Sub", w.op("Sqrt", total), w.const(float(center), like=xs[0]))
        pen = w.reduce_mean(w.op("Mul", dev, dev), [0], keepdims=False)
    w.op("Identity", pen, out=name, name=f"{output}/identity")
    bw.infos[name] = TensorInfo(bw.infos[xs[0]].elem_type, ())
    _append(m, w)
    if not keep_outputs:
        del m.graph.output[:]
    m.graph.output.append(value_info(name, bw.infos[xs[0]].elem_type, []))
    return m, loss, xs, name, bw.infos


def gradient_penalty(model: ModelLike, x: Union[None, str, Iterable[str]] = None,
                     wrt: Optional[Iterable[str]] = None, *, loss: Optional[str] = None,
                     center: Optional[float] = None, output: str = "gradient_penalty",
                     gradients: bool = True, keep_outputs: bool = True, grad_suffix: str = "_grad",
                     **options: Any) -> onnx.ModelProto:
    """A model with the gradient penalty of ``loss`` w.r.t. the data inputs ``x`` as an output.

    ``output`` (default ``gradient_penalty``) is ``Σ_x ||∂L/∂x||²`` (the sum
    of squares over every element; ``center=c``: ``mean_i (||∂L/∂x_i||₂ -
    c)²`` over the batch axis, WGAN-GP with ``c=1``).  ``loss``: a tensor of
    ``model`` (default: its only float output; a non-scalar tensor is summed,
    so a per-sample critic gives per-sample input gradients).  ``x``: graph
    inputs (default: every float graph input that is not an initializer).
    ``gradients=True``: also the gradient of the penalty w.r.t. ``wrt``
    (default: every float initializer it depends on) as outputs
    ``<p><grad_suffix>``; structurally zero ones are zero outputs, listed in the
    metadata.  ``keep_outputs=False`` drops the forward outputs.
    """
    m, loss, xs, name, infos = _penalty_model(model, x, loss, center, output, keep_outputs, options)
    grads, zeros = {}, []
    if gradients:
        wrt = _names(wrt)
        bw = backward(m, wrt, seeds={name: 1.0}, grad_names=lambda p: p + grad_suffix, check=False,
                      inplace=True, zero_unreachable=wrt is not None, frozen=(), **options)
        m, grads, zeros = bw.model, dict(bw.gradients), bw.zeros
        for p, t in grads.items():
            m.graph.output.append(_input_like(m, bw.infos, t, p))
    metadata.set_second_order(m, {"kind": "gradient_penalty", "loss": loss, "x": xs, "output": name,
                                  "center": center, "gradients": grads, "zeros": zeros})
    check_full(m, InternalError, "the gradient-penalty model fails the ONNX checker")
    log.info("gradient-penalty model: x = %s, %d parameter gradients, %d nodes", ", ".join(xs), len(grads),
             len(m.graph.node))
    return m


# ---------------------------------------------------------------------------- the check
def check_second_order(model: ModelLike, kind: str = "hvp", wrt: Optional[Iterable[str]] = None, *,
                       loss: Optional[str] = None, x: Union[None, str, Iterable[str]] = None,
                       seed: int = 0, batch_size: int = 2, rtol: float = 1e-3, atol: float = 1e-6,
                       precision: str = "auto", **options: Any) -> CheckReport:
    """Check a second-order model against finite differences (``onnxbp check --second-order``).

    ``kind="hvp"``: the :func:`hvp` model, run by onnxruntime with a random
    ``v``, against central differences of the first-order gradient model
    along ``v`` (float64 forward where possible), every element:
    ``max_abs_err`` over the elements, ``max_rel_err`` divided by the largest
    reference magnitude.  ``kind="gradient-penalty"``:
    :func:`onnxbp.check_gradients` of the penalty model (penalty output only).
    """
    if kind not in KINDS:
        raise OptionError(f"second-order check {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if kind == "gradient-penalty":
        pm, *_ = _penalty_model(model, x, loss, None, "gradient_penalty", False, options)
        wrt = _names(wrt)
        return check_gradients(pm, wrt, seed=seed, batch_size=batch_size, rtol=rtol, atol=atol,
                               precision=precision, zero_unreachable=wrt is not None, **options)
    if precision not in ("auto", "float64", "float32"):
        raise OptionError(f"precision={precision!r} (choose auto, float64 or float32)")
    h = hvp(model, wrt, loss, gradients=True, **options)
    spec = metadata.second_order(h)
    params, vecs, outs, grads = spec["params"], spec["vectors"], spec["outputs"], spec["gradients"]
    rng = np.random.default_rng(seed)
    fwd = load_model(model)
    feeds = random_feeds(fwd, rng, batch_size)
    inits = {t.name: numpy_helper.to_array(t) for t in fwd.graph.initializer}
    theta = {p: np.asarray(feeds[p] if p in feeds else inits[p]) for p in params}
    v = {p: rng.standard_normal(theta[p].shape).astype(theta[p].dtype) for p in params}
    hv = cpu_session(h).run([outs[p] for p in params], {**feeds, **{vecs[p]: v[p] for p in params}})
    # the first-order gradient model of the same build: the HVP model without its second backward
    g1 = _first_order(h, params, grads)
    base = {k: val for k, val in feeds.items() if k not in theta}
    want = "float64" if precision in ("auto", "float64") else "float32"
    try:
        f = _Forward(g1, base, {}, params, want, theta)
    except Exception:  # noqa: BLE001 - no float64 kernel: float32, as check_gradients does
        if precision == "float64":
            raise
        f = _Forward(g1, base, {}, params, "float32")
    report = CheckReport(precision=f.precision)
    scale_theta = max(1.0, max(float(np.sqrt(np.mean(theta[p].astype(np.float64) ** 2))) for p in params))
    eps = (1e-6 if f.precision == "float64" else 1e-2) * scale_theta
    def at(sign: float) -> list:
        vals = {p: theta[p].astype(np.float64) + sign * eps * v[p] for p in params}
        if f.precision != "float64":
            vals = {p: val.astype(theta[p].dtype) for p, val in vals.items()}
        return f.outputs(vals, [grads[p] for p in params])

    plus, minus = at(1.0), at(-1.0)
    for p, ours, gp, gm in zip(params, hv, plus, minus):
        num = (np.asarray(gp, np.float64) - np.asarray(gm, np.float64)) / (2 * eps)
        ours = np.asarray(ours, np.float64)
        scale = max(float(np.max(np.abs(num), initial=0.0)), float(np.max(np.abs(ours), initial=0.0)), 1e-12)
        err = float(np.max(np.abs(ours - num), initial=0.0))
        passed = ours.shape == num.shape and err <= atol + rtol * scale
        note = "structurally zero" if p in spec["zeros"] else ""
        report.results.append(GradCheck(p, outs[p], theta[p].shape, f"{f.precision} FD of grad along v",
                                        int(num.size), err, err / scale, passed, note))
    return report


def _first_order(h: onnx.ModelProto, params: Sequence[str], grads: dict) -> onnx.ModelProto:
    """``h`` with the gradients as its only outputs and the nodes they do not need dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(h)
    g = m.graph
    keep_outs = [grads[p] for p in params]
    needed, kept = set(keep_outs), []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(reads(node))
    del g.node[:]
    g.node.extend(reversed(kept))
    outs = [o for o in g.output if o.name in keep_outs]
    del g.output[:]
    g.output.extend(outs)
    ins = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(ins)
    return m
