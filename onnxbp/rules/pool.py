"""Pooling: MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.

Seed 002 section 0 names max-pooling beside the linear, convolutional and
flatten modules; its back propagation is the "gradient to propagate" of
sections 2.3 / 3.1.3 for a layer whose local derivative is a selection
(MaxPool) or a constant averaging window (AveragePool)::

    Y[b, c, p] = X[b, c, sel(b, c, p)]                       MaxPool
    X'[b, c, i] = sum_{p : sel(b, c, p) = i} Y'[b, c, p]      (windows overlap: sum)

    Y[b, c, p] = (1 / cnt[p]) sum_{i in win(p)} X[b, c, i]   AveragePool
    X'[b, c, i] = sum_{p : i in win(p)} Y'[b, c, p] / cnt[p]

Geometry (one spatial axis, onnxruntime's semantics; the pure helpers in
rules/pool_arith.py, tested alone in tests/test_pool_arith.py):
input length ``n``, kernel ``k``, stride ``s``, dilation ``d``, window
``p`` reads positions ``p*s - pb + r*d`` (r < k) of X; positions outside
``[0, min(n, n + pe))`` are padding (-inf for max, 0 for the sum).  auto_pad SAME_* uses
onnxruntime's ``pad_needed = (ceil(n/s) - 1)*s + k - n`` (no dilation, may be
negative), SAME_UPPER puts the odd extra at the end; ceil_mode=1 takes
``ceil`` of ``(n + pb + pe - ek)/s`` and then drops a last window that
starts in the end padding (onnx/onnx#5741).  onnx's shape inference keeps
that window: ``onnxbp.repair`` (run by ``load_model``) follows such a pool
with a Slice to onnxruntime's size, so the output, everything downstream and
the upstream gradient input get the runtime shape; the rules differentiate
the windows onnxruntime computes.  AveragePool's divisor is the
product over axes of the window positions inside ``[0, min(n, n + pe))``
(count_include_pad=0) or inside ``[-pb, n + pe)`` (count_include_pad=1): a
ceil_mode window that runs past the padded input divides by fewer than k.
These rules were measured against onnxruntime 1.32 (tests/test_pool_grad.py
probes the exact linear map of AveragePool with basis vectors).

Lowerings (standard ops only):

MaxPool (min_opset 16): the forward node's ``Indices`` output
    (``g.forward_output(1)``: added to the forward node when the model omits
    it, no second MaxPool).  onnxruntime's Indices are flat offsets into the
    whole ``N*C*spatial`` tensor (``(b*C + c)*P + offset``, P = plane size);
    storage_order=1 makes the in-plane offset column-major (first spatial
    axis fastest), converted back to row-major with Mod/Div.  Then
    ``ScatterElements(zeros(N*C*P), Indices, Y', reduction="add")`` and a
    Reshape to the runtime ``Shape(X)``.  reduction="add" sums the gradient
    of overlapping windows that select the same element (an overwriting
    scatter, or MaxUnpool, would keep only one of them); it needs opset 16,
    so older models are converted by onnx's version converter (engine
    ``_upgrade_opset``; the forward outputs are unchanged, tested).  Ties go
    where onnxruntime's Indices point (the first maximum in the window's scan
    order), so forward and backward agree.  Windows made only of padding
    (possible with dilations) output -FLT_MAX with an Indices value that
    points at no window element; their Y' is zeroed first (constant mask).
    float16/bfloat16 gradients are accumulated in float (onnxruntime's CPU
    ScatterElements adds only float and double) and cast back.

AveragePool (min_opset 9, for int64 Constant nodes): ``Y'/cnt`` (cnt a
    build-time constant over the static output spatial dims), Reshape to ``(N*C, 1, out...)`` (batch and
    channels may be symbolic), ``ConvTranspose`` with a ones kernel
    ``(1, 1, k...)``, strides and dilations of the pool, no pads -> the
    padded coordinate system, then crop (ConvTranspose pads) / extend
    (output_padding or Pad) to ``[0, n)`` and Reshape to ``Shape(X)``.

GlobalAveragePool (min_opset 8): ``X' = Expand(Y' / P, Shape(X))``.
GlobalMaxPool: ``X' = m . Y' / sum(m)``, ``m = [X == Y]`` (as ``not(X < Y)``):
    ties share the gradient evenly, as ``torch.amax`` and onnxbp's ReduceMax
    (onnxruntime's GlobalMaxPool has no Indices to follow).
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import TensorProto

from ..registry import LINEAR, PIECEWISE, register_gradient
from .pool_arith import (AUTO_PAD_MODES, avg_divisors, onnx_out_size, outer, pool_geometry, real_windows,
                         transpose_fits)

log = logging.getLogger(__name__)


# ------------------------------------------------------------ shared parsing


class _Pool:
    """Static facts of one MaxPool / AveragePool node."""

    def __init__(self, g, need_static: bool):
        self.g = g
        x = g.input(0)
        rank = g.rank(x)
        if rank < 3:
            g.fail(f"input {x!r} has rank {rank}; pooling gradients need (N, C, spatial...) with rank >= 3")
        self.rank, self.nsp = rank, rank - 2
        self.k = [int(v) for v in g.attr("kernel_shape") or []]
        if len(self.k) != self.nsp:
            g.fail(f"kernel_shape={self.k} must have {self.nsp} values (input rank {rank})")
        self.s = [int(v) for v in (g.attr("strides") or [1] * self.nsp)]
        self.d = [int(v) for v in (g.attr("dilations") or [1] * self.nsp)]
        self.auto_pad = g.attr("auto_pad", "NOTSET") or "NOTSET"
        if self.auto_pad not in AUTO_PAD_MODES:
            g.fail(f"auto_pad={self.auto_pad!r} is not supported; use one of {', '.join(AUTO_PAD_MODES)}")
        pads = g.attr("pads") or [0] * (2 * self.nsp)
        self.ceil_mode = int(g.attr("ceil_mode", 0))
        self.pads_attr = [int(p) for p in pads]
        self.n = None
        self.pb = self.pe = self.out = None
        self.ceil_dropped = False
        shape = g.shape(x)
        static = all(isinstance(v, int) for v in shape[2:])
        if need_static or static:
            self.n = [int(v) for v in g.static_shape(x, axes=range(2, rank))[2:]]
            self.pb, self.pe, self.out = pool_geometry(self.n, self.k, self.s, self.d, self.pads_attr,
                                                       self.auto_pad, self.ceil_mode)
            self.ceil_dropped = self.out != [
                onnx_out_size(self.n[i], self.k[i], self.s[i], self.d[i], self.pads_attr[i],
                              self.pads_attr[self.nsp + i], self.auto_pad, self.ceil_mode) for i in range(self.nsp)]
            self._check_output_shape()

    def _check_output_shape(self) -> None:
        """onnx shape inference and onnxruntime disagree on some ceil_mode / auto_pad outputs."""
        g = self.g
        yshape = g.shape(g.output(0))
        if yshape is None or len(yshape) != self.rank:
            return
        for i, (declared, ours) in enumerate(zip(yshape[2:], self.out)):
            if isinstance(declared, int) and declared != ours:
                g.fail(f"output {g.output(0)!r} is declared/inferred with {declared} positions on spatial "
                       f"axis {i}, but onnxruntime computes {ours} (ceil_mode={self.ceil_mode}, "
                       f"auto_pad={self.auto_pad}: onnxruntime drops a last window that starts in the end "
                       f"padding and sizes SAME pads without dilation); the upstream gradient input would "
                       f"get the wrong shape; load the model with onnxbp.load_model (which aligns ceil_mode "
                       f"pools with onnxruntime) or change pads/ceil_mode so both agree")


# ------------------------------------------------------------ MaxPool


def _colmajor_to_rowmajor(g, idx, n):
    """ORT's storage_order=1 Indices -> row-major flat offsets (same (b, c) base)."""
    plane = int(np.prod(n))
    p = g.ints([plane])
    r = g.op("Mod", idx, p)
    base = g.op("Sub", idx, r)
    digits, t = [], r
    for size in n[:-1]:  # column-major: the first spatial axis varies fastest
        digits.append(g.op("Mod", t, g.ints([size])))
        t = g.op("Div", t, g.ints([size]))
    digits.append(t)
    row = None
    for i, dig in enumerate(digits):
        stride = int(np.prod(n[i + 1:])) if i + 1 < len(n) else 1
        term = dig if stride == 1 else g.op("Mul", dig, g.ints([stride]))
        row = term if row is None else g.op("Add", row, term)
    return g.op("Add", base, row)


# Seed 002 section 0 (max-pooling beside linear, conv and flatten) with the
# "gradient to propagate" of sections 2.3 / 3.1.3: X' collects Y' at the
# selected element.  Opset policy: ScatterElements(reduction="add") needs
# opset 16 (min_opset=16), so older MaxPool models (opset 1-15, with or
# without the Indices output; opset < 8 MaxPool has none) are converted by
# onnx.version_converter first (engine._upgrade_opset); a failed conversion
# raises UnsupportedOpError naming the opsets.
@register_gradient("MaxPool", smoothness=PIECEWISE, min_opset=16,
                   lowering="X'=Reshape(ScatterElements(zeros, Indices, Y', reduction=add), Shape(X)) "
                            "with the forward MaxPool's Indices output (ties: onnxruntime's choice)")
def maxpool_grad(g):
    x = g.input(0)
    storage_order = int(g.attr("storage_order", 0))
    if storage_order not in (0, 1):
        g.fail(f"storage_order={storage_order} is not supported; use 0 (row-major) or 1 (column-major)")
    # Windows of pure padding need dilations or a negative SAME pad (kernel < stride);
    # finding them (and storage_order=1) needs the spatial dims.
    kernel, strides = g.attr("kernel_shape") or [], g.attr("strides") or []
    negative_same = (g.attr("auto_pad", "NOTSET") or "NOTSET").startswith("SAME") and any(
        k < s for k, s in zip(kernel, strides))
    info = _Pool(g, need_static=storage_order == 1 or negative_same
                 or any(v > 1 for v in (g.attr("dilations") or [])))
    dy = g.grad_output(0)
    idx = g.forward_output(1)
    if info.out is not None:
        real = outer([real_windows(info.n[i], info.k[i], info.s[i], info.d[i], info.pb[i], info.pe[i],
                                   info.out[i])
                      for i in range(info.nsp)])
        if not real.all():
            dy = g.op("Mul", dy, g.const(real, like=x))
    if info.out is not None and info.ceil_dropped:
        # onnxruntime's Indices have the runtime size already; a runtime keeping the window it drops
        # (as onnx's shape inference does) gets the same windows
        idx = g.slice(idx, [0] * info.nsp, info.out, list(range(2, info.rank)))
    if storage_order == 1 and info.nsp > 1:
        idx = _colmajor_to_rowmajor(g, idx, info.n)
    flat = g.ints([-1])
    updates = g.op("Reshape", dy, flat)
    elem = g.dtype(x)
    # onnxruntime's CPU ScatterElements adds only float/double: accumulate float16/bfloat16 in float
    acc = elem if elem in (TensorProto.FLOAT, TensorProto.DOUBLE) else TensorProto.FLOAT
    if acc != elem:
        updates = g.op("Cast", updates, to=acc)
    size = g.op("Reshape", g.op("Size", x), g.ints([1]))
    zeros = g.zeros(size, acc)
    dx = g.op("ScatterElements", zeros, g.op("Reshape", idx, flat), updates, axis=0, reduction="add")
    if acc != elem:
        dx = g.op("Cast", dx, to=elem)
    return [g.op("Reshape", dx, g.op("Shape", x))]


# ------------------------------------------------------------ AveragePool


# Seed 002 section 0 / 3.1.3: the window sum is a convolution with a ones
# kernel, so its gradient is the transposed convolution of Y'/cnt.
@register_gradient("AveragePool", smoothness=LINEAR, min_opset=9,
                   lowering="X'=ConvTranspose(Reshape(Y'/cnt, (N*C,1,out)), ones(1,1,k), strides, dilations) "
                            "cropped/padded to X, cnt = per-position divisor (build-time constant)")
def averagepool_grad(g):
    x = g.input(0)
    info = _Pool(g, need_static=True)
    cip = int(g.attr("count_include_pad", 0))
    counts = avg_divisors(info.n, info.k, info.s, info.d, info.pb, info.pe, info.out, cip)
    dy = g.op("Div", g.grad_output(0), g.const(counts, like=x))
    dy = g.op("Reshape", dy, g.ints([-1, 1] + info.out))
    kernel = g.const(np.ones([1, 1] + info.k), like=x)
    crop_b, crop_e, pad_b, pad_e = transpose_fits(info.n, info.k, info.s, info.d, info.pb, info.pe, info.out)
    # output_padding appends zeros before the pads crop, so it only stands in for an
    # end Pad on axes that are not also cropped at the end
    use_op = not any(pad_b) and all(e < s and (e == 0 or c == 0) for e, s, c in zip(pad_e, info.s, crop_e))
    attrs = {"kernel_shape": info.k, "strides": info.s, "dilations": info.d, "pads": crop_b + crop_e}
    if use_op and any(pad_e):
        attrs["output_padding"] = pad_e
    dx = g.op("ConvTranspose", dy, kernel, **attrs)
    if not use_op:
        dx = g.pad(dx, [0, 0] + pad_b + [0, 0] + pad_e)
    return [g.op("Reshape", dx, g.op("Shape", x))]


# ------------------------------------------------------------ global pools


def _plane_size(g, x, rank):
    shape = g.shape(x)
    if shape is not None and all(isinstance(v, int) for v in shape[2:]):
        return g.const(float(np.prod(shape[2:])), like=x)
    # symbolic spatial dims: P = Size(X) / Size(Y) at run time (Y is (N, C, 1, ...))
    per = g.op("Div", g.op("Size", x), g.op("Size", g.output(0)))
    return g.op("Cast", per, to=g.dtype(x))


@register_gradient("GlobalAveragePool", smoothness=LINEAR, min_opset=8,
                   lowering="X'=Expand(Y'/P, Shape(X)), P = spatial size")
def global_averagepool_grad(g):
    x = g.input(0)
    rank = g.rank(x)
    if rank < 3:
        g.fail(f"input {x!r} has rank {rank}; GlobalAveragePool needs (N, C, spatial...)")
    dy = g.op("Div", g.grad_output(0), _plane_size(g, x, rank))
    return [g.op("Expand", dy, g.op("Shape", x))]


@register_gradient("GlobalMaxPool", smoothness=PIECEWISE, min_opset=7,
                   lowering="X'=m*Y'/ReduceSum(m), m=Cast(X==Y): ties share the gradient evenly")
def global_maxpool_grad(g):
    x, y = g.input(0), g.output(0)
    rank = g.rank(x)
    if rank < 3:
        g.fail(f"input {x!r} has rank {rank}; GlobalMaxPool needs (N, C, spatial...)")
    mask = g.op("Cast", g.op("Not", g.op("Less", x, y)), to=g.dtype(x))
    count = g.reduce_sum(mask, list(range(2, rank)), keepdims=True)
    return [g.op("Mul", mask, g.op("Div", g.grad_output(0), count))]
