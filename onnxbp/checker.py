"""Finite-difference checker for gradient models (the library's, and users' own rules).

The gradient model computes ``g_p = VJP_p(u)`` for random upstream gradients
``u``.  The checker compares it with central differences of the *forward*
model's scalar ``f(p) = sum_Y <u_Y, Y(p)>``:

float64 (preferred)
    The forward model is converted to float64 (initializers, Constant nodes,
    Cast targets, graph types); ops without a float64 kernel in onnxruntime
    are rewritten first with ops that have one: Conv as Pad, strided Slices
    and MatMuls, AveragePool as a sum of strided Slices over onnxruntime's
    counts, GlobalAveragePool as ReduceMean, Clip, HardSigmoid and HardSwish with Max/Min, LRN as a
    channel-window sum, Erf by Abramowitz & Stegun 7.1.26 (smooth, |error| <
    1.5e-7).  Where onnxruntime has float64 kernels for
    every op, each sampled element is checked: ``(f(p+eps e_i) - f(p-eps e_i))
    / 2 eps`` with ``eps = 1e-6 max(1, |p_i|)``, plus random directions.
float32 (fallback; onnxruntime's CPU Conv has no float64 kernel)
    Random-direction checks ``<v, g_p>`` against ``(f(p+eps v) -
    f(p-eps v)) / 2 eps``.  The step depends on the smoothness class of the
    ops in the model: a large step (``eps = rms(p)``) is exact for linear and
    multilinear ops; for kinks (Relu, MaxPool) and smooth ops a small step
    with Richardson extrapolation, and a consistency test between two step
    sizes that re-draws the direction when a kink was crossed.  A roundoff
    floor ``4 eps32 sum|u Y| / eps`` is added to the tolerance.

Errors per gradient: ``max_abs_err`` is the largest absolute difference over
the checks; ``max_rel_err`` divides it by the largest reference magnitude
(elementwise checks) or, for a direction ``v``, by ``max(|analytic|,
|numeric|, rms(v) ||g||)`` (the last is the typical size of ``<v, g>``, so a
directional derivative that cancels to nearly zero is not judged against
itself).  A
check passes when ``abs_err <= atol + rtol * scale (+ roundoff floor)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .builder import FLOAT_TYPES
from .engine import default_opset, gradient
from .errors import OnnxbpError
from .modelio import ModelLike, cpu_session, load_model
from .registry import LINEAR, PIECEWISE, REGISTRY, RULE, SMOOTH

log = logging.getLogger(__name__)

_EPS32 = float(np.finfo(np.float32).eps)


@dataclass
class GradCheck:
    """The outcome for one gradient."""

    name: str
    grad_name: str
    shape: tuple
    method: str
    checks: int
    max_abs_err: float
    max_rel_err: float
    passed: bool
    note: str = ""


@dataclass
class CheckReport:
    results: list = field(default_factory=list)
    precision: str = "float32"
    smoothness: str = SMOOTH

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def table(self) -> str:
        head = ("gradient", "shape", "method", "checks", "max abs err", "max rel err", "result")
        rows = [head]
        for r in self.results:
            rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", r.method, str(r.checks),
                         f"{r.max_abs_err:.3e}", f"{r.max_rel_err:.3e}",
                         ("ok" if r.passed else "FAIL") + (f" ({r.note})" if r.note else "")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def gradient_names(grad_model: onnx.ModelProto) -> dict:
    """``{param: gradient output name}`` recorded by :func:`onnxbp.gradient`."""
    for prop in grad_model.metadata_props:
        if prop.key == "onnxbp.gradients":
            return dict(item.split("=", 1) for item in prop.value.split(",") if item)
    raise OnnxbpError("the model carries no onnxbp.gradients metadata; build it with onnxbp.gradient")


def _concrete_shape(vi: onnx.ValueInfoProto, batch_size: int) -> tuple:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch_size for d in dims)


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, batch_size: int = 2,
                 feeds: Optional[Mapping] = None) -> dict:
    """Random values for the model's graph inputs that are not initializers.

    Floats are standard normal (tie-free with probability one); integers are
    zeros and booleans False unless given in ``feeds``.  Symbolic or unknown
    dims become ``batch_size``.
    """
    inits = {t.name for t in model.graph.initializer}
    out = dict(feeds or {})
    for vi in model.graph.input:
        if vi.name in inits or vi.name in out:
            continue
        elem = vi.type.tensor_type.elem_type
        shape = _concrete_shape(vi, batch_size)
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if elem in FLOAT_TYPES:
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[vi.name] = np.zeros(shape, dtype=dtype)
    return out


_session = cpu_session


def _params_as_inputs(model: onnx.ModelProto, params: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have_input = {i.name for i in m.graph.input}
    keep = []
    for init in m.graph.initializer:
        if init.name in params:
            if init.name not in have_input:
                m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    F, D = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE

    def fix_graph(g):
        for vi in list(g.input) + list(g.output):
            if vi.type.tensor_type.elem_type == F:
                vi.type.tensor_type.elem_type = D
        del g.value_info[:]
        for i, init in enumerate(g.initializer):
            if init.data_type == F:
                g.initializer[i].CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(init).astype(np.float64), init.name))
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == F:
                    a.i = D
                elif a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(m.graph)
    return m


def _conv_as_matmuls(node: onnx.NodeProto, shapes: dict, fresh) -> list:
    """A Conv as Pad, strided Slices and MatMuls (onnxruntime has float64 kernels for these).

    ``Y[b, m, p] = sum_r sum_c Xpad[b, c, p*s + r*d] W[m, c, r]``: one MatMul per
    kernel offset r over the channels of each group, summed (the checker's
    float64 forward only; never part of a gradient model).
    """
    from .rules import conv_arith as ca

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    xs, ws = shapes[x], shapes[w]
    n_b = xs[0]
    n, m_out, cg = list(xs[2:]), ws[0], ws[1]
    nsp = len(n)
    g = int(attrs.get("group", 1))
    k = list(attrs.get("kernel_shape") or ws[2:])
    st = list(attrs.get("strides") or [1] * nsp)
    dl = list(attrs.get("dilations") or [1] * nsp)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = ca.resolve_auto_pad(auto_pad, n, k, st, dl, attrs.get("pads") if auto_pad == "NOTSET" else None)
    pb, pe = pads[:nsp], pads[nsp:]
    out = [ca.conv_out_size(n[i], k[i], st[i], dl[i], pb[i], pe[i]) for i in range(nsp)]
    mg, p_total = m_out // g, int(np.prod(out))
    nodes = []

    def const(values):
        name = fresh("onnxbp/check/const")
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(values, dtype=np.int64), name)))
        return name

    def op(op_type, *inputs, **kw):
        out_name = fresh(f"onnxbp/check/{op_type}")
        nodes.append(helper.make_node(op_type, list(inputs), [out_name], **kw))
        return out_name

    sp_axes = list(range(2, 2 + nsp))
    xp = op("Pad", x, const([0, 0] + pb + [0, 0] + pe)) if any(pads) else x
    terms = []
    import itertools

    for offs in itertools.product(*[range(kk) for kk in k]):
        starts = [o * d for o, d in zip(offs, dl)]
        ends = [a + (o - 1) * s_ + 1 for a, o, s_ in zip(starts, out, st)]
        sl = op("Slice", xp, const(starts), const(ends), const(sp_axes), const(st))  # (N, C, out)
        sl = op("Reshape", sl, const([n_b, g, cg, p_total]))
        sl = op("Transpose", sl, perm=[0, 1, 3, 2])  # (N, g, P, Cg)
        wr = op("Slice", w, const(list(offs)), const([o + 1 for o in offs]), const(sp_axes))
        wr = op("Reshape", wr, const([g, mg, cg]))
        wr = op("Transpose", wr, perm=[0, 2, 1])  # (g, Cg, Mg)
        terms.append(op("MatMul", sl, wr))  # (N, g, P, Mg)
    acc = terms[0] if len(terms) == 1 else op("Sum", *terms)
    acc = op("Transpose", acc, perm=[0, 1, 3, 2])  # (N, g, Mg, P)
    y = op("Reshape", acc, const([n_b, m_out] + out))
    if b is not None:
        y = op("Add", y, op("Reshape", b, const([1, m_out] + [1] * nsp)))
    nodes.append(helper.make_node("Identity", [y], [node.output[0]]))
    return nodes


class _Emit:
    """Node emission for the checker's float64 rewrites (never part of a gradient model)."""

    def __init__(self, fresh, opset: int):
        self.fresh, self.opset, self.nodes = fresh, opset, []

    def const(self, values, dtype=np.int64):
        name = self.fresh("onnxbp/check/const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.asarray(values, dtype=dtype), name)))
        return name

    def fconst(self, values):
        return self.const(values, np.float32)  # turned into float64 with the rest of the model

    def op(self, op_type, *inputs, **kw):
        out = self.fresh(f"onnxbp/check/{op_type}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **kw))
        return out

    def finish(self, value, output):
        self.nodes.append(helper.make_node("Identity", [value], [output]))
        return self.nodes


def _attrs(node):
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _global_avgpool_f64(node, shapes, e: _Emit):
    x = node.input[0]
    axes = list(range(2, len(shapes[x])))
    if e.opset >= 18:
        y = e.op("ReduceMean", x, e.const(axes), keepdims=1)
    else:
        y = e.op("ReduceMean", x, axes=axes, keepdims=1)
    return e.finish(y, node.output[0])


def _avgpool_f64(node, shapes, e: _Emit):
    """Sum of strided slices of the zero-padded input, divided by onnxruntime's counts."""
    import itertools

    from .rules import pool as pl

    a = _attrs(node)
    x = node.input[0]
    xs = shapes[x]
    n = list(xs[2:])
    nsp = len(n)
    k = list(a["kernel_shape"])
    st = list(a.get("strides") or [1] * nsp)
    dl = list(a.get("dilations") or [1] * nsp)
    pads = list(a.get("pads") or [0] * (2 * nsp))
    geo = [pl.pool_axis(n[i], k[i], st[i], dl[i], pads[i], pads[nsp + i], a.get("auto_pad", "NOTSET"),
                        int(a.get("ceil_mode", 0))) for i in range(nsp)]
    pb, pe, out = [g[0] for g in geo], [g[1] for g in geo], [g[2] for g in geo]
    sp = list(range(2, 2 + nsp))
    # A negative end pad (SAME with kernel < stride) clips windows at n + pe: crop X there.
    n_eff = [min(nn, nn + e_) for nn, e_ in zip(n, pe)]
    if n_eff != n:
        x = e.op("Slice", x, e.const([0] * nsp), e.const(n_eff), e.const(sp))
    lo = [max(b, 0) for b in pb]
    last = [(o - 1) * s_ - b + (kk - 1) * d + 1 for o, s_, b, kk, d in zip(out, st, pb, k, dl)]
    hi = [max(0, ln - nn) for ln, nn in zip(last, n_eff)]
    xp = e.op("Pad", x, e.const([0, 0] + lo + [0, 0] + hi)) if any(lo) or any(hi) else x
    terms = []
    for offs in itertools.product(*[range(kk) for kk in k]):
        starts = [o * d - b + l_ for o, d, b, l_ in zip(offs, dl, pb, lo)]
        ends = [b_ + (o - 1) * s_ + 1 for b_, o, s_ in zip(starts, out, st)]
        terms.append(e.op("Slice", xp, e.const(starts), e.const(ends), e.const(sp), e.const(st)))
    total = terms[0] if len(terms) == 1 else e.op("Sum", *terms)
    counts = pl.outer([pl.avg_counts(n[i], k[i], st[i], dl[i], pb[i], pe[i], out[i],
                                     int(a.get("count_include_pad", 0))) for i in range(nsp)])
    counts = np.where(counts == 0, 1.0, counts)
    return e.finish(e.op("Div", total, e.fconst(counts)), node.output[0])


def _hardsigmoid_f64(node, shapes, e: _Emit):
    a = _attrs(node)
    lin = e.op("Add", e.op("Mul", node.input[0], e.fconst(a.get("alpha", 0.2))), e.fconst(a.get("beta", 0.5)))
    return e.finish(e.op("Max", e.op("Min", lin, e.fconst(1.0)), e.fconst(0.0)), node.output[0])


def _hardswish_f64(node, shapes, e: _Emit):
    x = node.input[0]
    lin = e.op("Add", e.op("Mul", x, e.fconst(1.0 / 6.0)), e.fconst(0.5))
    return e.finish(e.op("Mul", x, e.op("Max", e.op("Min", lin, e.fconst(1.0)), e.fconst(0.0))),
                    node.output[0])


def _clip_f64(node, shapes, e: _Emit):
    """Clip-11 has no float64 kernel: Max/Min with its bounds (attributes before opset 11)."""
    a = _attrs(node)
    x = node.input[0]
    lo = node.input[1] if len(node.input) > 1 and node.input[1] else (
        e.fconst(a["min"]) if "min" in a else None)
    hi = node.input[2] if len(node.input) > 2 and node.input[2] else (
        e.fconst(a["max"]) if "max" in a else None)
    y = e.op("Max", x, lo) if lo is not None else x
    y = e.op("Min", y, hi) if hi is not None else y
    return e.finish(y, node.output[0])


def _erf_f64(node, shapes, e: _Emit):
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, smooth): the forward the differences see."""
    x = node.input[0]
    ax = e.op("Abs", x)
    t = e.op("Reciprocal", e.op("Add", e.fconst(1.0), e.op("Mul", ax, e.fconst(0.3275911))))
    poly = e.fconst(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = e.op("Add", e.op("Mul", poly, t), e.fconst(c))
    poly = e.op("Mul", poly, t)
    tail = e.op("Mul", poly, e.op("Exp", e.op("Neg", e.op("Mul", ax, ax))))
    return e.finish(e.op("Mul", e.op("Sign", x), e.op("Sub", e.fconst(1.0), tail)), node.output[0])


def _lrn_f64(node, shapes, e: _Emit):
    a = _attrs(node)
    x = node.input[0]
    c = shapes[x][1]
    size = int(a["size"])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    rank = len(shapes[x])
    sq = e.op("Mul", x, x)
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    sqp = e.op("Pad", sq, e.const(pads))
    terms = [e.op("Slice", sqp, e.const([j]), e.const([j + c]), e.const([1])) for j in range(size)]
    window = terms[0] if size == 1 else e.op("Sum", *terms)
    base = e.op("Add", e.fconst(a.get("bias", 1.0)), e.op("Mul", window, e.fconst(a.get("alpha", 1e-4) / size)))
    return e.finish(e.op("Div", x, e.op("Pow", base, e.fconst(a.get("beta", 0.75)))), node.output[0])


def _conv_f64(node, shapes, e: _Emit):
    nodes = _conv_as_matmuls(node, shapes, e.fresh)
    e.nodes.extend(nodes)
    return e.nodes


#: Ops onnxruntime's CPU provider has no float64 kernel for, rewritten for the checker's
#: float64 forward with ops that have one.
_FLOAT64_REWRITES = {
    "Conv": _conv_f64,
    "AveragePool": _avgpool_f64,
    "GlobalAveragePool": _global_avgpool_f64,
    "HardSigmoid": _hardsigmoid_f64,
    "HardSwish": _hardswish_f64,
    "Clip": _clip_f64,
    "Erf": _erf_f64,
    "LRN": _lrn_f64,
}


def _runtime_shapes(model: onnx.ModelProto, feeds: Mapping, names: Sequence[str]) -> dict:
    """Shapes of ``names`` from one onnxruntime run (concrete, whatever shape inference knew)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
            have.add(name)
    del m.graph.value_info[:]
    sess = _session(m)
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(list(names), {k: v for k, v in feeds.items() if k in inputs})
    return {name: list(np.shape(v)) for name, v in zip(names, values)}


def _emulate_conv(model: onnx.ModelProto, feeds: Mapping) -> onnx.ModelProto:
    """Rewrite the ops of :data:`_FLOAT64_REWRITES`; ``feeds`` give concrete shapes."""
    targets = [n for n in model.graph.node
               if n.op_type in _FLOAT64_REWRITES and n.domain in ("", "ai.onnx")]
    if not targets:
        return model
    from .naming import NameAuthority

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if default_opset(m) < 13:  # the rewrites use Pad/Slice/ReduceMean with inputs
        m = onnx.version_converter.convert_version(m, 13)
        m.ir_version = max(m.ir_version, helper.find_min_ir_version_for(list(m.opset_import)))
        targets = [n for n in m.graph.node
                   if n.op_type in _FLOAT64_REWRITES and n.domain in ("", "ai.onnx")]
    needed = sorted({i for n in targets for i in n.input if i})
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    known = dict(inits)
    known.update(_runtime_shapes(m, feeds, [i for i in needed if i not in inits]))
    names = NameAuthority(m)
    opset = default_opset(m)
    new_nodes = []
    for node in m.graph.node:
        rewrite = _FLOAT64_REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        new_nodes.extend(rewrite(node, known, _Emit(names.fresh, opset)) if rewrite else [node])
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    del m.graph.value_info[:]
    return m


class _Forward:
    """f(params) = sum_Y <u_Y, Y> in float64, on a float32 or float64 forward model."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, upstream: dict, params: Sequence[str],
                 precision: str, param_values: Optional[Mapping] = None):
        self.precision = precision
        m = _params_as_inputs(model, params)
        if precision == "float64":
            values = dict(feeds)
            values.update(param_values or {})
            m = _to_float64(_emulate_conv(m, values))
        self.sess = _session(m)
        self.dtype = np.float64 if precision == "float64" else None
        self.feeds = {k: self._cast(v) for k, v in feeds.items()}
        self.upstream = upstream
        self.out_names = [o.name for o in self.sess.get_outputs()]

    def _cast(self, v):
        v = np.asarray(v)
        if self.dtype is not None and v.dtype == np.float32:
            return v.astype(self.dtype)
        return v

    def __call__(self, values: dict) -> tuple:
        feeds = dict(self.feeds)
        feeds.update({k: self._cast(v) for k, v in values.items()})
        outs = self.sess.run(self.out_names, feeds)
        total, mag = 0.0, 0.0
        for name, y in zip(self.out_names, outs):
            if name in self.upstream:
                u = self.upstream[name].astype(np.float64)
                y64 = np.asarray(y, dtype=np.float64)
                total += float(np.sum(u * y64))
                mag += float(np.sum(np.abs(u * y64)))
        return total, mag


def _model_smoothness(model: onnx.ModelProto) -> str:
    opset = default_opset(model)
    order = {LINEAR: 0, PIECEWISE: 1, SMOOTH: 2}
    worst = LINEAR
    for node in model.graph.node:
        e = REGISTRY.lookup(node.op_type, node.domain, opset)
        s = e.smoothness if e is not None and e.kind == RULE else (LINEAR if e is not None else SMOOTH)
        if order[s] > order[worst]:
            worst = s
    return worst


def check_gradients(model: ModelLike, wrt: Optional[Sequence[str]] = None, *,
                    feeds: Optional[Mapping] = None, seed: int = 0, batch_size: int = 2,
                    rtol: float = 1e-3, atol: float = 1e-6, directions: int = 3,
                    max_elements: int = 24, precision: str = "auto",
                    grad_model: Optional[onnx.ModelProto] = None, **options) -> CheckReport:
    """Build (or take) the gradient model, run it, and compare with finite differences.

    ``precision``: "auto" (float64 forward where onnxruntime can run it),
    "float64" or "float32".  Returns a :class:`CheckReport`; ``report.passed``
    tells pass/fail and ``report.table()`` formats it.
    """
    fwd = load_model(model)
    gm = grad_model if grad_model is not None else gradient(fwd, wrt, **options)
    names = gradient_names(gm)
    params = list(names)
    rng = np.random.default_rng(seed)

    base_feeds = random_feeds(fwd, rng, batch_size, feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in fwd.graph.initializer}
    values = {p: (base_feeds[p] if p in base_feeds else inits[p]).copy() for p in params}

    fwd_sess = _session(fwd)
    out_meta = fwd_sess.get_outputs()
    fwd_outs = fwd_sess.run([o.name for o in out_meta], base_feeds)
    upstream = {}
    gm_feeds = {k: v for k, v in base_feeds.items() if k in {i.name for i in gm.graph.input}}
    gm_inputs = {i.name for i in gm.graph.input}
    for o, y in zip(out_meta, fwd_outs):
        y = np.asarray(y)
        gname = next((n for n in gm_inputs if n == o.name + _suffix(names)), None)
        if gname is None or not np.issubdtype(y.dtype, np.floating):
            continue
        u = rng.standard_normal(y.shape).astype(y.dtype)
        upstream[o.name] = u
        gm_feeds[gname] = u
    grad_sess = _session(gm)
    grads = dict(zip(names.values(), grad_sess.run(list(names.values()), gm_feeds)))

    smooth = _model_smoothness(fwd)
    report = CheckReport(smoothness=smooth)
    f64 = None
    if precision in ("auto", "float64"):
        try:
            f64 = _Forward(fwd, base_feeds, upstream, params, "float64", values)
            f64(values)
        except Exception as exc:  # noqa: BLE001 - no float64 kernel: fall back
            if precision == "float64":
                raise OnnxbpError(f"the forward model cannot run in float64 in onnxruntime: "
                                  f"{str(exc).splitlines()[0]}") from None
            log.info("float64 forward unavailable (%s); using float32 checks", str(exc).splitlines()[0][:120])
            f64 = None
    report.precision = "float64" if f64 is not None else "float32"
    f32 = None if f64 is not None else _Forward(fwd, base_feeds, upstream, params, "float32")

    for p in params:
        g = np.asarray(grads[names[p]], dtype=np.float64)
        x = np.asarray(values[p])
        if g.shape != x.shape:
            report.results.append(GradCheck(p, names[p], x.shape, "shape", 1, float("inf"), float("inf"),
                                            False, f"gradient shape {g.shape} != {x.shape}"))
            continue
        if f64 is not None:
            report.results.append(_check_f64(p, names[p], x, g, values, f64, rng, rtol, atol,
                                             directions, max_elements))
        else:
            report.results.append(_check_f32(p, names[p], x, g, values, f32, rng, rtol, atol,
                                             directions, smooth))
    return report


def _typical(v: np.ndarray, g: np.ndarray) -> float:
    """Typical size of <v, g> for a random direction: rms(v) * ||g||.

    Directional derivatives that cancel to nearly zero are judged against
    this, not against themselves.
    """
    return max(float(np.sqrt(np.mean(v ** 2)) * np.linalg.norm(g)), 1e-12)


def _suffix(names: dict) -> str:
    p, n = next(iter(names.items()))
    return n[len(p):]


def _check_f64(p, gname, x, g, values, f, rng, rtol, atol, directions, max_elements) -> GradCheck:
    flat = x.reshape(-1).astype(np.float64)
    n = flat.size
    idx = np.arange(n) if n <= max_elements else np.sort(rng.choice(n, size=max_elements, replace=False))
    num = np.empty(len(idx))
    for k, i in enumerate(idx):
        eps = 1e-6 * max(1.0, abs(flat[i]))
        xp, xm = flat.copy(), flat.copy()
        xp[i] += eps
        xm[i] -= eps
        vals = dict(values)
        vals[p] = xp.reshape(x.shape)
        fp, _ = f(vals)
        vals[p] = xm.reshape(x.shape)
        fm, _ = f(vals)
        num[k] = (fp - fm) / (2 * eps)
    ana = g.reshape(-1)[idx]
    scale = max(float(np.max(np.abs(num))), float(np.max(np.abs(ana))), 1e-12)
    abs_err = float(np.max(np.abs(ana - num))) if len(idx) else 0.0
    passed = abs_err <= atol + rtol * scale
    max_rel = abs_err / scale
    checks = len(idx)
    for _ in range(directions):
        v = rng.standard_normal(x.shape)
        eps = 1e-6 * max(1.0, float(np.sqrt(np.mean(flat ** 2))))
        vals = dict(values)
        vals[p] = flat.reshape(x.shape) + eps * v
        fp, _ = f(vals)
        vals[p] = flat.reshape(x.shape) - eps * v
        fm, _ = f(vals)
        nd = (fp - fm) / (2 * eps)
        ad = float(np.sum(v * g))
        err = abs(ad - nd)
        sc = max(abs(ad), abs(nd), _typical(v, g))
        passed = passed and err <= atol + rtol * sc
        abs_err, max_rel = max(abs_err, err), max(max_rel, err / sc)
        checks += 1
    return GradCheck(p, gname, x.shape, "float64 elements+directions", checks, abs_err, max_rel, passed)


def _check_f32(p, gname, x, g, values, f, rng, rtol, atol, directions, smooth) -> GradCheck:
    x64 = x.astype(np.float64)
    rms = float(np.sqrt(np.mean(x64 ** 2))) if x.size else 0.0
    scale_x = rms if rms > 1e-3 else 1.0
    abs_err = max_rel = 0.0
    passed = True
    checks = 0
    note = ""

    def central(v, eps):
        vals = dict(values)
        vals[p] = (x64 + eps * v).astype(x.dtype)
        fp, mp = f(vals)
        vals[p] = (x64 - eps * v).astype(x.dtype)
        fm, mm = f(vals)
        return (fp - fm) / (2 * eps), max(mp, mm)

    for _ in range(directions):
        for attempt in range(6):
            v = rng.standard_normal(x.shape)
            v /= max(float(np.sqrt(np.mean(v ** 2))), 1e-12)
            if smooth == LINEAR:
                eps = scale_x
                nd, mag = central(v, eps)
                noise = 8 * _EPS32 * mag / eps
                consistent = True
            else:
                # Each retry (a kink was crossed) also halves the step.
                eps = (2e-2 if smooth == SMOOTH else 1e-2) * scale_x * 0.5 ** attempt
                d1, mag = central(v, eps)
                d2, _ = central(v, eps / 2)
                d4, _ = central(v, eps / 4)
                r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
                noise = 8 * _EPS32 * mag / (eps / 4)
                nd = r2
                consistent = abs(r1 - r2) <= 4 * noise + 1e-2 * max(abs(r1), abs(r2), 1e-12)
                # A kink closer to x than every step makes all central differences agree on
                # the mean of the two one-sided slopes.  One-sided differences expose it: their
                # gap shrinks with the step on a smooth function and stays at the jump at a kink.
                f0 = f(values)[0]
                vals = dict(values)
                gaps = []
                for h in (eps / 2, eps / 4):
                    vals[p] = (x64 + h * v).astype(x.dtype)
                    fp = f(vals)[0]
                    vals[p] = (x64 - h * v).astype(x.dtype)
                    fm = f(vals)[0]
                    gaps.append(abs((fp - f0) - (f0 - fm)) / h)
                consistent = consistent and gaps[1] <= 0.75 * gaps[0] + 4 * noise
            if consistent:
                break
        else:
            note = "kinks crossed in every direction tried"
        ad = float(np.sum(v * g))
        err = abs(ad - nd)
        sc = max(abs(ad), abs(nd), _typical(v, g))
        ok = err <= atol + rtol * sc + noise
        passed = passed and ok and not note
        abs_err, max_rel = max(abs_err, err), max(max_rel, err / sc)
        checks += 1
    method = "float32 directions, " + ("large step (linear)" if smooth == LINEAR else "Richardson")
    return GradCheck(p, gname, x.shape, method, checks, abs_err, max_rel, passed, note)
