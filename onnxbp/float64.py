"""Rewrite a model so onnxruntime can run it in float64: the checker's reference forward.

onnxruntime's CPU provider has no float64 kernel for some ops.  Each is
rewritten with ops that have one (same numbers as onnxruntime's float32
kernel, to float32 roundoff), then every float32 tensor, constant, Cast
target and graph type becomes float64 (:func:`to_float64`):

Conv
    ``Y[b, m, p] = sum_r sum_c Xpad[b, c, p*s + r*d] W[m, c, r]``: Pad, then
    per kernel offset ``r`` one strided Slice of Xpad
    (:func:`conv_arith.kernel_offset_slices`) and one MatMul over the channels
    of each group, summed.  Pads by :func:`conv_arith.resolve_auto_pad`.
ConvTranspose
    ``Y[b, m, p*s + r*d - pb] += sum_c X[b, c, p] W[c, m, r]``: per kernel
    offset one MatMul over each group's channels, zero-inserted at stride
    ``s``, placed at ``r*d`` (Pad), summed, cropped by the pads
    (:func:`conv_arith.conv_transpose_pads`).  Gradient models have it (a
    strided Conv's dX), so a second-order check's first-order model does.
AveragePool
    X placed in the windows' frame (:func:`pool_arith.transpose_fit`: crop the
    positions no window reads, pad zeros), the sum of one strided Slice per
    kernel offset, divided by onnxruntime's divisors
    (:func:`pool_arith.avg_divisors`).
GlobalAveragePool
    ReduceMean over the spatial axes.
HardSigmoid, HardSwish, Clip
    Max / Min (Clip's bounds from its inputs, or attributes before opset 11).
LRN
    ``X / (bias + alpha/size * sum_window X^2)^beta``: a sum of channel Slices
    of the zero-padded squares.
Erf
    Abramowitz & Stegun 7.1.26 (smooth, ``|error| < 1.5e-7``).

``stash_type`` (the precision of LayerNormalization's, GroupNormalization's
and RMSNormalization's statistics, float by default) is widened with the rest.

The rewrites need concrete input shapes: initializers' dims and one
onnxruntime run on the given feeds (:func:`runtime_shapes`).  Models below
opset 13 are converted first (the rewrites write Pad, Slice and ReduceMean
with inputs).  Nodes are written by :class:`~onnxbp.writer.GraphWriter`;
float constants are float32 and become float64 with the rest of the model.
These models serve the finite-difference checker only: never part of a
gradient model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .modelio import convert_opset, cpu_session
from .rules import conv_arith as ca
from .rules import pool_arith as pa
from .types import default_opset
from .writer import GraphWriter, set_attr

_F, _D = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE


#: The float types a check computes in a wider type (float64, or float32 for float16/bfloat16).
_NARROWER = {_D: (_F, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16),
             _F: (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}


#: Ops whose ``stash_type`` (default float) sets the precision of their statistics.
_STASHED = ("LayerNormalization", "GroupNormalization", "RMSNormalization")


def to_float64(model: onnx.ModelProto, target: int = _D) -> onnx.ModelProto:
    """A copy with every narrower float graph type, initializer, tensor attribute and Cast target in
    ``target`` (float64 by default: float32, float16 and bfloat16; float32: float16 and bfloat16)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    narrow = _NARROWER[target]
    wide = np.float64 if target == _D else np.float32

    def widen(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(wide), t.name)

    def fix_graph(g: onnx.GraphProto) -> None:
        for vi in list(g.input) + list(g.output):
            if vi.type.tensor_type.elem_type in narrow:
                vi.type.tensor_type.elem_type = target
        del g.value_info[:]
        for init in g.initializer:
            if init.data_type in narrow:
                init.CopyFrom(widen(init))
        for node in g.node:
            if node.op_type in _STASHED and not any(a.name == "stash_type" for a in node.attribute):
                set_attr(node, "stash_type", _F)  # the default, widened below: statistics in ``target``
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in narrow:
                    a.t.CopyFrom(widen(a.t))
                elif a.name in ("to", "dtype", "stash_type") and a.type == onnx.AttributeProto.INT and a.i in narrow:
                    a.i = target
                elif a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(m.graph)
    return m


def reference_runner(model: onnx.ModelProto, feeds: Mapping):
    """``run(output_names, feeds)`` of ``model`` in float64 by ``onnx.reference``, where onnxruntime has
    no float64 kernel for an op (Softplus, Softsign, Elu, LeakyRelu, PRelu, Mean, GlobalMaxPool, ...).

    Trusted only where it agrees with onnxruntime on the float32 model at ``feeds`` (normwise 1e-4):
    raises ``ValueError`` otherwise.  Five kernels of onnx 1.23's reference are replaced where they
    are wrong for this use (see :func:`_reference_fixes`).  Where the reference agrees only to float32
    precision, finite differences fail loudly rather than pass: the op table exercises each op.
    """
    from onnx.reference import ReferenceEvaluator

    fixes = _reference_fixes()
    names = [o.name for o in model.graph.output]
    inputs = {i.name for i in model.graph.input}
    f32 = {k: v for k, v in feeds.items() if k in inputs}
    ours = ReferenceEvaluator(model, new_ops=fixes).run(names, f32)
    theirs = cpu_session(model).run(names, f32)
    for name, a, b in zip(names, ours, theirs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or np.max(np.abs(a - b), initial=0.0) > 1e-4 * max(np.max(np.abs(b), initial=0.0), 1e-3):
            raise ValueError(f"onnx.reference disagrees with onnxruntime on output {name!r}")
    return ReferenceEvaluator(to_float64(model), new_ops=fixes).run


def _reference_fixes() -> list:
    """Kernels replacing onnx 1.23 reference ones: BatchNormalization-9 always ran the training formula
    (momentum has its default), Mean added in place (fails when the first input broadcasts), LRN
    indexed past the channels for small C, Erf and Gelu computed in float32 precision, Softsign failed
    on 0-d tensors.  The op table (tests/optable.py) runs every rule op through this path where
    onnxruntime has no float64 kernel, so a kernel of float32 precision fails there."""
    import math

    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None):
            eps = 1e-5 if epsilon is None else epsilon
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
            return ((y + bias.reshape(shape)).astype(x.dtype),)

    class Mean(OpRun):
        op_domain = ""

        def _run(self, *xs):
            return ((sum(np.broadcast_arrays(*xs)) / len(xs)).astype(xs[0].dtype),)

    class LRN(OpRun):
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            alpha, beta, bias = (1e-4 if alpha is None else alpha), (0.75 if beta is None else beta), \
                (1.0 if bias is None else bias)
            c = x.shape[1]
            sq = np.zeros_like(x)
            for i in range(c):
                lo, hi = max(0, i - (size - 1) // 2), min(c, i + (size - 1) - (size - 1) // 2 + 1)
                sq[:, i] = np.sum(x[:, lo:hi] ** 2, axis=1)
            return ((x / (bias + alpha / size * sq) ** beta).astype(x.dtype),)

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)

    class Softsign(OpRun):
        op_domain = ""

        def _run(self, x):
            return (x / (1 + np.abs(x)),)

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x, approximate=None):
            if approximate == "tanh":
                y = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
            else:
                y = 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2)))
            return (np.asarray(y).astype(x.dtype),)

    return [BatchNormalization, Mean, LRN, Erf, Softsign, Gelu]


def float64_model(model: onnx.ModelProto, feeds: Mapping) -> onnx.ModelProto:
    """``model`` as onnxruntime runs it in float64: :func:`rewrite_ops`, then :func:`to_float64`."""
    return to_float64(rewrite_ops(model, feeds))


# ------------------------------------------------------------------ rewrites
def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _f32(w: GraphWriter, value) -> str:
    return w.const(value, dtype=np.float32)


def _optional_input(node: onnx.NodeProto, i: int):
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _conv(node, a, shapes, w: GraphWriter) -> str:
    x, wt, b = node.input[0], node.input[1], _optional_input(node, 2)
    xs, ws = shapes[x], shapes[wt]
    n_b, n = xs[0], list(xs[2:])
    m_out, cg = ws[0], ws[1]
    nsp = len(n)
    group = int(a.get("group", 1))
    k = list(a.get("kernel_shape") or ws[2:])
    st = list(a.get("strides") or [1] * nsp)
    dl = list(a.get("dilations") or [1] * nsp)
    auto_pad = a.get("auto_pad", "NOTSET")
    pads = ca.resolve_auto_pad(auto_pad, n, k, st, dl, a.get("pads") if auto_pad == "NOTSET" else None)
    out = [ca.conv_out_size(n[i], k[i], st[i], dl[i], pads[i], pads[nsp + i]) for i in range(nsp)]
    mg, p_total = m_out // group, int(np.prod(out))
    sp = list(range(2, 2 + nsp))
    xp = w.op("Pad", x, w.ints([0, 0] + pads[:nsp] + [0, 0] + pads[nsp:])) if any(pads) else x
    terms = []
    for offs, starts, ends in ca.kernel_offset_slices(k, st, dl, out):
        sl = w.slice(xp, starts, ends, sp, st)  # (N, C, out)
        sl = w.transpose(w.op("Reshape", sl, w.ints([n_b, group, cg, p_total])), [0, 1, 3, 2])  # (N, g, P, Cg)
        wr = w.slice(wt, offs, [o + 1 for o in offs], sp)
        wr = w.transpose(w.op("Reshape", wr, w.ints([group, mg, cg])), [0, 2, 1])  # (g, Cg, Mg)
        terms.append(w.op("MatMul", sl, wr))  # (N, g, P, Mg)
    acc = w.transpose(w.add_n(terms), [0, 1, 3, 2])  # (N, g, Mg, P)
    y = w.op("Reshape", acc, w.ints([n_b, m_out] + out))
    if b is not None:
        y = w.op("Add", y, w.op("Reshape", b, w.ints([1, m_out] + [1] * nsp)))
    return y


def _conv_transpose(node, a, shapes, w: GraphWriter) -> str:
    """``Y[b, m, p*s + r*d - pb] += sum_c X[b, c, p] W[c, m, r]``: per kernel offset ``r`` one MatMul
    over the channels of each group, zero-inserted at stride ``s`` (Reshape, Pad, Reshape, Slice),
    placed at ``r*d`` in the un-padded frame (Pad), summed, cropped by ``pads`` (Slice)."""
    x, wt, b = node.input[0], node.input[1], _optional_input(node, 2)
    xs, ws = shapes[x], shapes[wt]
    n_b, c_in, n = xs[0], xs[1], list(xs[2:])
    nsp = len(n)
    group = int(a.get("group", 1))
    mg, cg = ws[1], c_in // group
    m_out = mg * group
    k = list(a.get("kernel_shape") or ws[2:])
    st = list(a.get("strides") or [1] * nsp)
    dl = list(a.get("dilations") or [1] * nsp)
    op = list(a.get("output_padding") or [0] * nsp)
    pads = ca.conv_transpose_pads(a.get("auto_pad", "NOTSET"), n, k, st, dl, op, a.get("pads"),
                                  a.get("output_shape"))
    full = [ca.conv_transpose_out_size(n[i], k[i], st[i], dl[i], 0, 0, op[i]) for i in range(nsp)]
    p_total = int(np.prod(n))
    sp = list(range(2, 2 + nsp))
    xr = w.transpose(w.op("Reshape", x, w.ints([n_b, group, cg, p_total])), [0, 1, 3, 2])  # (N, g, P, Cg)
    terms = []
    for offs, _starts, _ends in ca.kernel_offset_slices(k, st, dl, n):
        wr = w.slice(wt, offs, [o + 1 for o in offs], sp)
        wr = w.op("Reshape", wr, w.ints([group, cg, mg]))  # (g, Cg, Mg)
        t = w.transpose(w.op("MatMul", xr, wr), [0, 1, 3, 2])  # (N, g, Mg, P)
        if any(s_ > 1 for s_ in st):  # zero insertion: (.., n_i, 1, ..) padded to (.., n_i, s_i, ..)
            t = w.op("Reshape", t, w.ints([n_b, m_out] + [v for ni in n for v in (ni, 1)]))
            zp = [0] * (2 * (2 + 2 * nsp))
            for i in range(nsp):
                zp[2 + 2 * nsp + 3 + 2 * i] = st[i] - 1
            t = w.op("Reshape", w.op("Pad", t, w.ints(zp)), w.ints([n_b, m_out] + [ni * si for ni, si in zip(n, st)]))
            t = w.slice(t, [0] * nsp, [si * (ni - 1) + 1 for ni, si in zip(n, st)], sp)
        else:
            t = w.op("Reshape", t, w.ints([n_b, m_out] + n))
        before = [o * d for o, d in zip(offs, dl)]
        after = [f - bb - (si * (ni - 1) + 1) for f, bb, si, ni in zip(full, before, st, n)]
        terms.append(w.op("Pad", t, w.ints([0, 0] + before + [0, 0] + after)) if any(before + after) else t)
    y = w.add_n(terms)  # (N, M, full...)
    if any(pads):
        y = w.slice(y, list(pads[:nsp]), [f - e for f, e in zip(full, pads[nsp:])], sp)
    if b is not None:
        y = w.op("Add", y, w.op("Reshape", b, w.ints([1, m_out] + [1] * nsp)))
    return y


def _avgpool(node, a, shapes, w: GraphWriter) -> str:
    x = node.input[0]
    n = list(shapes[x][2:])
    nsp = len(n)
    k = list(a["kernel_shape"])
    st = list(a.get("strides") or [1] * nsp)
    dl = list(a.get("dilations") or [1] * nsp)
    pads = list(a.get("pads") or [0] * (2 * nsp))
    pb, pe, out = pa.pool_geometry(n, k, st, dl, pads, a.get("auto_pad", "NOTSET"), int(a.get("ceil_mode", 0)))
    crop_b, crop_e, pad_b, pad_e = pa.transpose_fits(n, k, st, dl, pb, pe, out)
    sp = list(range(2, 2 + nsp))
    # the adjoint of the rule's crop / pad: X's read positions, framed by zeros
    if any(pad_b) or any(pad_e):
        x = w.slice(x, pad_b, [nn - e for nn, e in zip(n, pad_e)], sp)
    if any(crop_b) or any(crop_e):
        x = w.op("Pad", x, w.ints([0, 0] + crop_b + [0, 0] + crop_e))
    total = w.add_n([w.slice(x, starts, ends, sp, st)
                     for _offs, starts, ends in ca.kernel_offset_slices(k, st, dl, out)])
    counts = pa.avg_divisors(n, k, st, dl, pb, pe, out, int(a.get("count_include_pad", 0)))
    return w.op("Div", total, _f32(w, counts))


def _global_avgpool(node, a, shapes, w: GraphWriter) -> str:
    x = node.input[0]
    return w.reduce_mean(x, list(range(2, len(shapes[x]))), keepdims=True)


def _clamp01(w: GraphWriter, t: str) -> str:
    return w.op("Max", w.op("Min", t, _f32(w, 1.0)), _f32(w, 0.0))


def _hardsigmoid(node, a, shapes, w: GraphWriter) -> str:
    return _clamp01(w, w.op("Add", w.op("Mul", node.input[0], _f32(w, a.get("alpha", 0.2))),
                            _f32(w, a.get("beta", 0.5))))


def _hardswish(node, a, shapes, w: GraphWriter) -> str:
    x = node.input[0]
    return w.op("Mul", x, _clamp01(w, w.op("Add", w.op("Mul", x, _f32(w, 1.0 / 6.0)), _f32(w, 0.5))))


def _clip(node, a, shapes, w: GraphWriter) -> str:
    """Clip-11 has no float64 kernel: Max/Min with its bounds (attributes before opset 11)."""
    lo = _optional_input(node, 1) or (_f32(w, a["min"]) if "min" in a else None)
    hi = _optional_input(node, 2) or (_f32(w, a["max"]) if "max" in a else None)
    y = node.input[0]
    y = w.op("Max", y, lo) if lo is not None else y
    return w.op("Min", y, hi) if hi is not None else y


def _erf(node, a, shapes, w: GraphWriter) -> str:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, smooth): the forward the differences see."""
    x = node.input[0]
    ax = w.op("Abs", x)
    t = w.op("Reciprocal", w.op("Add", _f32(w, 1.0), w.op("Mul", ax, _f32(w, 0.3275911))))
    poly = _f32(w, 1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = w.op("Add", w.op("Mul", poly, t), _f32(w, c))
    tail = w.op("Mul", w.op("Mul", poly, t), w.op("Exp", w.op("Neg", w.op("Mul", ax, ax))))
    return w.op("Mul", w.op("Sign", x), w.op("Sub", _f32(w, 1.0), tail))


def _lrn(node, a, shapes, w: GraphWriter) -> str:
    x = node.input[0]
    rank, c = len(shapes[x]), shapes[x][1]
    size = int(a["size"])
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = (size - 1) // 2, size - 1 - (size - 1) // 2
    sqp = w.op("Pad", w.op("Mul", x, x), w.ints(pads))
    window = w.add_n([w.slice(sqp, [j], [j + c], [1]) for j in range(size)])
    base = w.op("Add", _f32(w, a.get("bias", 1.0)), w.op("Mul", window, _f32(w, a.get("alpha", 1e-4) / size)))
    return w.op("Div", x, w.op("Pow", base, _f32(w, a.get("beta", 0.75))))


#: Ops onnxruntime's CPU provider has no float64 kernel for: ``fn(node, attrs, shapes, writer)``
#: writes the replacement and returns the tensor that stands for the node's output.
REWRITES = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avgpool,
    "HardSigmoid": _hardsigmoid,
    "HardSwish": _hardswish,
    "Clip": _clip,
    "Erf": _erf,
    "LRN": _lrn,
}


def _targets(model: onnx.ModelProto) -> list:
    return [n for n in model.graph.node if n.op_type in REWRITES and n.domain in ("", "ai.onnx")]


def runtime_shapes(model: onnx.ModelProto, feeds: Mapping, names: Sequence[str]) -> dict:
    """Shapes of ``names`` from one onnxruntime run (concrete, whatever shape inference knew)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
            have.add(name)
    del m.graph.value_info[:]
    sess = cpu_session(m)
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(list(names), {k: v for k, v in feeds.items() if k in inputs})
    return {name: list(np.shape(v)) for name, v in zip(names, values)}


def rewrite_ops(model: onnx.ModelProto, feeds: Mapping) -> onnx.ModelProto:
    """A copy with the ops of :data:`REWRITES` rewritten; ``feeds`` give the concrete shapes."""
    targets = _targets(model)
    if not targets:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if default_opset(m) < 13:
        ops = ", ".join(sorted({n.op_type for n in targets}))
        m = convert_opset(m, 13, f"rewriting {ops} for the checker's float64 forward")
        targets = _targets(m)
    needed = sorted({i for n in targets for i in n.input if i})
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    shapes.update(runtime_shapes(m, feeds, [i for i in needed if i not in shapes]))
    w = GraphWriter.for_model(m, prefix="onnxbp/float64", doc="onnxbp: float64 rewrite for the checker")
    nodes = []
    for node in m.graph.node:
        rewrite = REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is None:
            nodes.append(node)
            continue
        w.op("Identity", rewrite(node, _attrs(node), shapes, w), out=node.output[0])
        nodes.extend(w.take_nodes())
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    return m
