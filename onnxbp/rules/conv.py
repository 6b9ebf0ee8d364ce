"""Conv: the seeds' back-propagation of convolution, as standard ONNX ops.

Notation (seed 001 section 2, per spatial axis; N batch, C input channels,
M output channels, g groups, Cg = C/g, Mg = M/g)::

    X (N, C, n...)   W (M, Cg, k...)   Y (N, M, out...)
    Y[b, m, p] = sum_{c in group(m), r} Xpad[b, c, p*s + r*d] * W[m, c, r] + B[m]
    Xpad = X padded by pads (pb at the begin, pe at the end); ek = (k-1)*d + 1
    out  = floor((n + pb + pe - ek) / s) + 1      rem = n+pb+pe - ((out-1)*s + ek)

auto_pad is first resolved to explicit pads (conv_arith.resolve_auto_pad,
ONNX spec: total = max(0, (ceil(n/s)-1)*s + ek - n), SAME_UPPER puts the odd
extra at the end).  All padding arithmetic lives in conv_arith (pure ints).

Seed equation -> ops (option ``conv_strategy``):

BPA, seed 001 sections 2.1.2 / 2.2.2 / 2.3.2 / 2.4.2::

    dX[b, c, h] = sum_{m, r} dY[b, m, (h + pb - r*d)/s] * W[m, c, r]   (only where s divides)

  (a) "transpose": ConvTranspose(dY, W, strides=s, dilations=d, pads=pads,
      group=g, output_padding=rem).  ConvTranspose *is* this sum; its output
      length s*(out-1) + ek + output_padding - pb - pe equals n exactly for
      output_padding = rem < s (conv_arith.transpose_output_padding).  No
      output_shape attribute (with output_shape set, onnxruntime ignores pads).
  (b) "seed": literally the seed's recipe.  "Dilate the padded O' by
      inserting zeros": Unsqueeze a new axis after every strided axis, Pad it
      with s-1 zeros, Reshape (zero insertion, (out-1)*s + 1 positions, the
      s-1 trailing zeros are trimmed by the next step).  "Pad O' with
      (R-1)*d - pad": Pad by ((k-1)*d - pb, (k-1)*d - pe + rem) per axis,
      negatives as Slice crops (conv_arith.bpa_pads; the + rem makes the
      untouched tail read zeros, so its gradient is exactly 0).  "W' is W
      rotated 180 degrees": a MatMul of the (M*Cg, k...) view with the
      exchange matrix (reversing every kernel axis reverses the flattened
      kernel index; _rotate), then the K/C
      swap of section 2.4.2: Transpose(1,0) for g=1, else Reshape (g, Mg, Cg,
      k) -> Transpose -> Reshape (C, Mg, k).  Then Conv(group=g, stride 1,
      dilation d, no pads) -> (N, C, n...).

  (c) "patches" (seed 001 section 1.2, BPA of MMA ``X' = Y' . W^T``, on the
      im2col view of section 2.4.1, then its adjoint col2im): ``Xcol'(C*K,
      N*out) = W(M, C*K)^T . dY(M, N*out)``, one Gemm(transA=1) that reads W
      in its own layout; offset r's rows, zero-inserted at stride s, land at
      r*d in the padded frame (Pad), the K pieces are summed, the padding is
      cropped and (C, N, n) transposed to (N, C, n).  Group 1.  It is the
      form for weight-bound convs (small maps, many channels), where the seed
      form's per-step kernel rotation and (M, C) transpose of a weight that
      is a graph input (a training step) cost more than the conv itself.

BPW, seed 001 sections 2.1.1 / 2.2.1 / 2.3.1 / 2.4.1::

    dW[m, c, r] = sum_{b, p} dY[b, m, p] * Xpad[b, c, p*s + r*d]

  (a) "transpose" (2.4.1.1, "convolution of A and O'"): N and C swap roles:
      X -> (Cg, g*N, n) by Reshape (N, g, Cg, n) -> Transpose -> Reshape, dY ->
      (M, N, out) by Reshape (N, g, Mg, out) -> Transpose -> Reshape, then
      Conv(group=g, pads=pads, strides=d, dilations=s) (2.3.1: "a dilated
      convolution with dilate=stride and stride=d") -> (Cg, M, k), X's end
      cropped so that no position past k is computed (conv_arith.bpw_crop;
      :func:`weight_grad`), and Transpose to (M, Cg, k).
      Group g of X only meets group g of dY, so depthwise (Cg=1) and channel
      multipliers (Mg>1) need nothing special.
  (b) "seed" (2.1.1.2 / 2.4.1.2, "convolution of O' and A"): with r' = k-1-r,
      dW[m, c, k-1-r'] = sum_h Zp[b, m, h + r'*d] * X[b, c, h], where Zp is
      BPA(b)'s zero-inserted, padded dY (shared when both are needed).  So:
      Zp -> (Mg, g*N, n+(k-1)*d), X -> (C, N, n) as the kernel, Conv(group=g,
      stride d, dilation 1, no pads) -> (Mg, C, k) -> Reshape/Transpose to
      (M, Cg, k) -> rotate 180 degrees (_rotate).  The seed's padding
      (R-1-pad) is BPA(b)'s.  It runs s^dims times the multiply-adds of (a)
      on stride-s convs (half the data is inserted zeros) and its kernel is
      the whole input map, so it is the slower form; kept for fidelity and as
      an independent check.

  (c) "patches" (seed 001 section 1.2, BPW of MMA ``W' = X^T . Y'``, on the
      im2col view of section 2.4.1): ``dW(M, C*K) = dY(M, N*out) . Xcol(C*K,
      N*out)^T`` with ``Xcol[(c, r), (b, p)] = Xpad[b, c, p*s + r*d]``:
      Transpose X to (C, N, n), Pad it, one strided Slice per kernel offset r
      (each (C, N*out)), Concat them along axis 1 and Reshape to (C*K, N*out)
      (rows in W's (c, r) order), one Gemm(dY, Xcol, transB=1), Reshape to
      (M, C, k).  Only group=1 (grouped convs use (a)).  It avoids ORT's Conv
      with a whole-map kernel and a 3x3 output (a GEMM with 9 columns).

Option ``target`` (declared in registry.py): "portable" takes dW by (c) for
every conv, whatever ``conv_strategy`` says and however many kernel offsets:
the (a)/(b) forms are Convs whose kernel is dY or X, shaped at run time with a
symbolic batch, which OpenVINO CPU and tract refuse to compile
(docs/portability.md).  Grouped convs take (c)'s grouped variant
(``im2col_weight_grad``): the same slices, Reshape to (g, Cg*K, N*out), one
batched MatMul of dY (g, Mg, N*out) with their transpose.  dX keeps
``conv_strategy`` (its kernels are W, static), except that a grouped conv that
is not depthwise takes dX by (b) where it would be (a): onnx's
ReferenceEvaluator runs a grouped ConvTranspose only when it is depthwise (two
input or output channels per group raise; docs/portability.md, bug 6).

Bias (seed 002 section 3.1.2): dB = ReduceSum(dY, axes=[0, 2, ...]).

"auto" picks per node what benchmarks/bench_conv.py measured faster on ORT
CPU (onnxruntime 1.32, 2 intra-op threads, no spinning; ResNet-style 3x3
s1/s2, 1x1 s1/s2, 7x7 s2 stem, depthwise 3x3 s1/s2; batch 8/32; 28x28 and
56x56 maps; median seed/transpose time ratios, docs/conv-backward.md):

  dX: "seed" when every stride is 1 and the kernel is not 1x1: seed/transpose
      0.39-1.01 (median 0.59) over 3x3 and depthwise 3x3 stride-1 cases in
      a 21-repeat run (ORT's ConvTranspose pays a col2im pass that a plain
      Conv with the constant-folded rotated kernel avoids); "transpose"
      otherwise: 2.3-43x faster at stride 2 (the seed form computes on
      1 - 1/s^2 inserted zeros), a tie (0.77-1.72, noise) for 1x1 stride 1.
      "patches" instead of "seed" (group 1) where the conv is weight-bound,
      N * prod(padded input) <= M (N = ASSUMED_BATCH when the batch is
      symbolic): with W a graph input, dX patches/seed 0.59 on 512-channel
      2x2 maps at batch 8, 1.08 on 4x4 and 1.17 on 8x8 maps (2026-12-01,
      ``bench_conv.py --weights-as-inputs --cases wide --sizes 2 4 8``).
  dW: "patches" for group-1 convs with at least 8 input channels: whole
      backward patches/transpose 0.42-0.60 for 3x3 s1, 0.80-0.96 for 3x3 s2,
      0.28-0.56 for 1x1 (2026-12-01 run), except a kernel of several offsets
      whose im2col matrix has under MIN_PATCHES_SIZE elements (LeNet's
      second conv: the slices' per-node cost is the larger part there; dX
      too takes "transpose" there; the LeNet step 1.10 -> 0.88 ms,
      2026-12-02); "transpose" otherwise (the 7x7
      stem with 3 input channels: patches 2.2-2.8x slower; grouped convs:
      patches is group-1 only).  "seed" dW is never faster: a tie at
      stride 1, 2.4-25x slower at stride 2 and for the stem.

Shapes: spatial dims of X must be static (g.static_shape raises a ShapeError
naming X otherwise); W's dims come from W or from kernel_shape / Y / X; the
batch dim may be symbolic (Reshape uses 0 / -1 for it).  JAX's transpose
rules (jax/_src/lax/convolution.py, _conv_general_vjp_lhs_padding /
_rhs_padding) use the same pads: before = (k-1)*d - pb, after = n + (k-1)*d
- (out-1)*s - 1 - before, which is conv_arith.bpa_pads.
"""

from __future__ import annotations

import math
from typing import Optional

from ..registry import LINEAR, REGISTRY, register_gradient
from . import conv_arith as ca

STRATEGIES = ("auto", "transpose", "seed", "patches")

REGISTRY.declare_option(
    "conv_strategy", choices=STRATEGIES, default="auto",
    help="Conv backward lowering: 'transpose' = dX by ConvTranspose, dW by a channel-swapped Conv "
         "(seed 2.4.1.1); 'seed' = dX by Conv of the zero-inserted, padded dY with the 180-degree "
         "rotated kernel, dW by Conv of that dY with X (seed 2.4.1.2); 'auto' = what measured faster "
         "on onnxruntime CPU: dX by 'seed' for stride-1 convs with a kernel larger than 1 ('patches' "
         "where the conv is weight-bound), else 'transpose'; dW by 'patches' for group-1 convs with "
         "at least 8 input channels, else 'transpose'; 'patches' = dW by one Gemm on the im2col "
         "matrix of strided slices of X "
         "(seed 1.2 on im2col), dX by one Gemm with W^T and col2im (group 1; else as in 'auto')",
)


class _Conv:
    """The static facts of one Conv node, resolved once."""

    def __init__(self, g):
        self.g = g
        x, w = g.input(0), g.input(1)
        self.x, self.w = x, w
        rank = g.rank(x)
        if rank < 3:
            g.fail(f"Conv input {x!r} has rank {rank}; the gradient needs (N, C, spatial...) with rank >= 3")
        self.rank, self.nsp = rank, rank - 2
        self.sp_axes = list(range(2, rank))
        xs = g.static_shape(x, axes=self.sp_axes)
        self.n = [int(v) for v in xs[2:]]
        self.group = int(g.attr("group", 1))
        kernel = g.attr("kernel_shape")
        if kernel is None:
            kernel = g.static_shape(w, axes=self.sp_axes)[2:]
        self.k = [int(v) for v in kernel]
        self.s = [int(v) for v in (g.attr("strides") or [1] * self.nsp)]
        self.d = [int(v) for v in (g.attr("dilations") or [1] * self.nsp)]
        for name, vals in (("kernel_shape", self.k), ("strides", self.s), ("dilations", self.d)):
            if len(vals) != self.nsp or any(v < 1 for v in vals):
                g.fail(f"{name}={vals} must have {self.nsp} values >= 1 (input rank {rank})")
        auto_pad = g.attr("auto_pad", "NOTSET")
        if auto_pad not in ca.AUTO_PAD_MODES:
            g.fail(f"auto_pad={auto_pad!r} is not supported; use one of {', '.join(ca.AUTO_PAD_MODES)}")
        pads = g.attr("pads") if auto_pad == "NOTSET" else None
        if pads is not None and (len(pads) != 2 * self.nsp or any(p < 0 for p in pads)):
            g.fail(f"pads={list(pads)} must have {2 * self.nsp} values >= 0")
        self.pads = ca.resolve_auto_pad(auto_pad, self.n, self.k, self.s, self.d, pads)
        self.pb, self.pe = self.pads[:self.nsp], self.pads[self.nsp:]
        self.out = [ca.conv_out_size(*a) for a in self._axes()]
        if any(o < 1 for o in self.out):
            g.fail(f"kernel {self.k} (dilations {self.d}) is larger than the padded input {self.n}")
        # Channel counts: from W when static, else from Y / X.  The input channels per group may be
        # a runtime dim (``self.c``/``self.cg`` None): the weight-gradient Conv of the "transpose" and
        # "seed" dW forms (:func:`swapped_conv`) contracts over the batch, so its kernel's channel
        # axis is the batch (per group: a depthwise conv's dW Conv has group C and kernel (C, N, ..));
        # its own gradient (a second derivative, an HVP) must not need it static.  Every Reshape then
        # leaves that axis to -1 (or 0), "patches" is not used, and grouped dW takes "transpose".
        ws, ys, xsh = g.shape(w) or (None,) * rank, g.shape(g.output(0)) or (None,) * rank, xs
        m = ws[0] if isinstance(ws[0], int) else ys[1]
        if not isinstance(m, int):
            m = g.static_shape(w, axes=[0])[0]
        cg = ws[1] if isinstance(ws[1], int) else (xsh[1] // self.group if isinstance(xsh[1], int) else None)
        self.m, self.cg = int(m), (int(cg) if isinstance(cg, int) else None)
        if self.m % self.group:
            g.fail(f"group={self.group} does not divide the {self.m} output channels")
        self.mg, self.c = self.m // self.group, (None if self.cg is None else self.cg * self.group)

    def _axes(self):
        return zip(self.n, self.k, self.s, self.d, self.pb, self.pe)


def _zero_insert(g, t, out, strides):
    """(A, B, out...) -> (A, B, out*s...): s-1 zeros after every element of each strided spatial axis
    (Unsqueeze a new axis after it, Pad that axis with s-1 zeros, Reshape)."""
    strided = [i for i, s in enumerate(strides) if s > 1]
    if not strided:
        return t
    new_axes, pos = [], 2
    for i in range(len(out)):
        pos += 1
        if strides[i] > 1:
            new_axes.append(pos)
            pos += 1
    t = g.unsqueeze(t, new_axes)
    zpad = [0] * (2 * pos)
    for ax, i in zip(new_axes, strided):
        zpad[pos + ax] = strides[i] - 1
    t = g.op("Pad", t, g.ints(zpad))  # constant 0 (opset >= 11: min_opset)
    return g.op("Reshape", t, g.ints([0, 0] + [o * s for o, s in zip(out, strides)]))


def _dilate_and_pad(g, dy, cv: _Conv):
    """Seed BPA steps 1-2: zero-insert dY (stride-1 zeros), pad/crop by conv_arith.bpa_pads."""
    t = _zero_insert(g, dy, cv.out, cv.s)
    length = [o * s for o, s in zip(cv.out, cv.s)]
    begin, end = [], []
    for i, a in enumerate(cv._axes()):
        b, e = ca.bpa_pads(*a)
        begin.append(b)
        end.append(e - (cv.s[i] - 1))  # the reshape left s-1 trailing zeros
    cb, ce, pb, pe = ca.split_pads(begin, end)
    if any(cb) or any(ce):
        t = g.slice(t, cb, [ln - c for ln, c in zip(length, ce)], cv.sp_axes)
    if any(pb) or any(pe):
        t = g.op("Pad", t, g.ints([0, 0] + pb + [0, 0] + pe))
    return t


def _rotate(g, t, cv: _Conv):
    """Rotate the kernel axes by 180 degrees.

    Reversing every kernel axis reverses the row-major flattened kernel index,
    so this is one MatMul of the (A*B, K) view with the K x K exchange matrix
    (exact: each output is one input times 1 plus zeros).  onnxruntime runs
    that 2x faster than a Slice with steps -1 (3.5 vs 7.0 ms on a 512x512x3x3
    kernel, 2 threads), with the same bits.
    """
    k = 1
    for v in cv.k:
        k *= v
    flat = g.op("Reshape", t, g.ints([-1, k]))  # t is (M, Cg, k...): W, or dW in BPW (b)
    exchange = g.const([[1.0 if i + j == k - 1 else 0.0 for j in range(k)] for i in range(k)], like=cv.w)
    return g.op("Reshape", g.op("MatMul", flat, exchange), g.ints([cv.m, -1 if cv.cg is None else cv.cg] + cv.k))


def _bpa_transpose(g, dy, cv: _Conv):
    op = [ca.transpose_output_padding(*a) for a in cv._axes()]
    return g.op("ConvTranspose", dy, cv.w, strides=cv.s, dilations=cv.d, pads=cv.pads,
                group=cv.group, output_padding=op if any(op) else None)


def _bpa_patches(g, dy, cv: _Conv):
    """BPA (c): the adjoint of the im2col view.  One Gemm ``Xcol'(C*K, N*out) = W(M, C*K)^T .
    dY(M, N*out)`` (W read in its own layout: no rotation, no transpose), then col2im: offset r's rows,
    zero-inserted at stride s, are placed at r*d in the padded frame (Pad), the K pieces summed, the
    padding cropped, and (C, N, n...) transposed to (N, C, n...).  Group 1."""
    sp = list(range(2, cv.rank))
    nk = 1
    for k in cv.k:
        nk *= k
    dyr = g.op("Reshape", g.transpose(dy, [1, 0] + sp), g.ints([cv.m, -1]))  # (M, N*out)
    w2 = g.op("Reshape", cv.w, g.ints([cv.m, cv.c * nk]))
    cols = g.op("Gemm", w2, dyr, transA=1)  # (C*K, N*out), rows (c, r)
    cols = g.op("Reshape", cols, g.ints([cv.c * nk, -1] + cv.out))  # (C*K, N, out...)
    cols = _zero_insert(g, cols, cv.out, cv.s)  # (C*K, N, out*s...)
    cols = g.op("Reshape", cols, g.ints([cv.c, nk, -1] + [o * s for o, s in zip(cv.out, cv.s)]))
    padded = [n + b + e for n, b, e in zip(cv.n, cv.pb, cv.pe)]
    pieces = []
    for r, (_offs, starts, _ends) in enumerate(ca.kernel_offset_slices(cv.k, cv.s, cv.d, cv.out)):
        piece = g.op("Reshape", g.slice(cols, [r], [r + 1], [1]),
                     g.ints([cv.c, -1] + [o * s for o, s in zip(cv.out, cv.s)]))  # (C, N, out*s...)
        # piece[.., q] lands at padded position starts + q; the s-1 zeros after the last element
        # may reach past the frame: crop them, pad the rest with zeros
        end = [p - b - o * s for p, b, o, s in zip(padded, starts, cv.out, cv.s)]
        cb, ce, pb, pe = ca.split_pads([0] * cv.nsp, end)
        if any(ce):
            piece = g.slice(piece, [0] * cv.nsp, [o * s - c for o, s, c in zip(cv.out, cv.s, ce)], sp)
        pieces.append(g.pad(piece, [0, 0] + starts + [0, 0] + pe))
    t = pieces[0] if len(pieces) == 1 else g.op("Sum", *pieces)  # (C, N, padded...)
    if any(cv.pads):
        t = g.slice(t, list(cv.pb), [b + n for b, n in zip(cv.pb, cv.n)], sp)
    return g.transpose(t, [1, 0] + sp)


def _bpa_seed(g, zp, cv: _Conv):
    w = _rotate(g, cv.w, cv)
    sp = list(range(2, cv.rank))
    if cv.group == 1:
        wt = g.transpose(w, [1, 0] + sp)
    elif cv.mg == 1 or cv.cg == 1:  # swapping a size-1 axis is a reshape
        wt = g.op("Reshape", w, g.ints([-1, cv.mg] + cv.k))  # (C, Mg, k); C may be a runtime dim
    else:
        wt = g.op("Reshape", w, g.ints([cv.group, cv.mg, -1] + cv.k))
        wt = g.transpose(wt, [0, 2, 1] + [a + 1 for a in sp])
        wt = g.op("Reshape", wt, g.ints([-1, cv.mg] + cv.k))
    return g.op("Conv", zp, wt, group=cv.group, dilations=cv.d)


def swap_batch_channels(g, t, group: int, per_group: int, sizes, group_major: bool):
    """(N, group*per_group, sizes...) with its batch and channel axes exchanged (seed 2.4.1.1).

    ``group_major=False`` gives (per_group, group*N, sizes...), the data of a
    grouped Conv whose batch is ``per_group``; ``group_major=True`` gives
    (group*per_group, N, sizes...), its kernel.  Group 1: Transpose(1, 0).
    ``per_group`` None (a runtime dim): ``group_major=False`` only.
    """
    sp = list(range(2, 2 + len(sizes)))
    if group == 1:
        return g.transpose(t, [1, 0] + sp)
    if per_group is None and group_major:
        g.fail(f"internal: a grouped kernel swap needs the channels per group static (group={group})")
    t = g.op("Reshape", t, g.ints([0, group, -1 if per_group is None else per_group] + list(sizes)))
    t = g.transpose(t, ([1, 2, 0] if group_major else [2, 1, 0]) + [a + 1 for a in sp])
    # (per_group, group, N, ..) -> (per_group, group*N, ..): 0 copies per_group (static or not)
    return g.op("Reshape", t, g.ints([group * per_group, -1] + list(sizes)) if group_major
                else g.ints([0, -1] + list(sizes)))


def swapped_conv(g, data, kern, group: int, data_pg: int, kern_pg: int, data_sizes, kern_sizes, **attrs):
    """Conv(group) of ``data`` (N, g*a, ...) with ``kern`` (N, g*b, ...) as the kernel, batch and
    channels exchanged (seed 2.4.1.1, "convolution of A and O'"): (a, g*b, ...)."""
    return g.op("Conv", swap_batch_channels(g, data, group, data_pg, data_sizes, False),
                swap_batch_channels(g, kern, group, kern_pg, kern_sizes, True),
                group=group if group > 1 else None, **attrs)


def weight_grad(g, data, kern, group: int, data_pg: int, kern_pg: int, data_sizes, kern_sizes, kernel,
                pads, strides, dilations):
    """A weight gradient as a channel-swapped Conv: (a, g*b, k) transposed to (g*b, a, kernel...).
    Conv's BPW(a) and ConvTranspose's W' are both this.

    Where the swapped Conv would give more than ``kernel`` positions (conv_arith.bpw_crop: the
    trailing ``rem`` rows of a strided conv that no output reads), the *data* is cropped instead of
    the result: the end pad shrinks by ``extra * strides`` and, past it, a Slice trims the data's
    end, so the Conv's output is exactly ``kernel``.  A Slice of the result would make the gradient
    of this Conv's kernel (a second derivative) a Pad feeding a Conv's kernel input, which
    onnxruntime's Pad_Fusion (1.32) folds into the Conv's pads while rewiring input 0 (the data),
    a model onnxruntime then refuses to load; it also computed rows it threw away."""
    nsp = len(kernel)
    pb, pe = list(pads[:nsp]), list(pads[nsp:])
    full = [ca.conv_out_size(data_sizes[i], kern_sizes[i], strides[i], dilations[i], pb[i], pe[i])
            for i in range(nsp)]
    sizes, crop_end = list(data_sizes), []
    for i in range(nsp):
        red = (full[i] - kernel[i]) * strides[i]  # padded extent to drop: exactly full - kernel rows
        drop_pad = min(pe[i], red)
        cut = min(red - drop_pad, sizes[i] - 1)  # keep one position: an empty axis breaks Reshape's 0
        pe[i] -= drop_pad
        sizes[i] -= cut
        crop_end.append(cut)
    if any(crop_end):
        axes = [i for i in range(nsp) if crop_end[i]]
        data = g.slice(data, [0] * len(axes), [sizes[i] for i in axes], [2 + i for i in axes])
    allp = pb + pe
    r = swapped_conv(g, data, kern, group, data_pg, kern_pg, sizes, kern_sizes,
                     pads=allp if any(allp) else None, strides=list(strides), dilations=list(dilations))
    got = [ca.conv_out_size(sizes[i], kern_sizes[i], strides[i], dilations[i], pb[i], pe[i]) for i in range(nsp)]
    axes = [i for i in range(nsp) if got[i] != kernel[i]]
    if axes:  # the kernel reads the start padding alone on such an axis (data kept at 1): trim the result
        r = g.slice(r, [0] * len(axes), [kernel[i] for i in axes], [2 + i for i in axes])
    return g.transpose(r, [1, 0] + list(range(2, 2 + nsp)))


def _bpw_transpose(g, x, dy, cv: _Conv):
    # (Cg, M, >= k) from X as data and dY as kernel, stride d, dilation s (conv_arith.bpw_crop)
    return weight_grad(g, x, dy, cv.group, cv.cg, cv.mg, cv.n, cv.out, cv.k, cv.pads, cv.d, cv.s)


def _bpw_seed(g, x, zp, cv: _Conv):
    sp, gr = list(range(2, cv.rank)), cv.group
    lz = [n + (k - 1) * d for n, k, d in zip(cv.n, cv.k, cv.d)]
    # zp as data (Mg, g*N, n + (k-1)d), X as kernel (C, N, n)
    dw = swapped_conv(g, zp, x, gr, cv.mg, cv.cg, lz, cv.n, strides=cv.d)  # (Mg, C, k)
    if gr > 1:
        if cv.mg > 1:
            dw = g.op("Reshape", dw, g.ints([cv.mg, gr, cv.cg] + cv.k))
            dw = g.transpose(dw, [1, 0, 2] + [a + 1 for a in sp])  # (g, Mg, Cg, k)
        dw = g.op("Reshape", dw, g.ints([cv.m, -1 if cv.cg is None else cv.cg] + cv.k))
    return _rotate(g, dw, cv)


#: More kernel offsets than this and "patches" emits too many nodes: use "transpose".
MAX_PATCHES = 64


def _bpw_patches(g, x, dy, cv: _Conv):
    """BPW (c): one Gemm of dY with the im2col matrix of strided slices of the padded X (group 1;
    a batched MatMul per group under ``target="portable"``)."""
    return im2col_weight_grad(g, x, dy, cv.group, cv.m, cv.c, cv.n, cv.k, cv.s, cv.d, cv.pb, cv.pe, cv.out)


def im2col_weight_grad(g, data, dout, group: int, m: int, c: int, sizes, kernel, strides, dilations,
                       pb, pe, out) -> str:
    """``dW[o, j, r] = sum_{b, p} dout[b, o, p] * datapad[b, grp(o)*c/g + j, p*s + r*d]`` as (m, c/g,
    kernel...): the weight gradient of a Conv of ``data`` (N, c, sizes...) padded by (pb, pe), whose
    output gradient is ``dout`` (N, m, out...), with no runtime-shaped kernel.  Transpose ``data`` to
    (c, N, sizes...), Pad it, one strided Slice per kernel offset r (each (c, N*out)), Concat them
    along axis 1 (rows in W's (j, r) order), then group 1: one Gemm(dout (m, N*out), cols, transB=1);
    group g: a batched MatMul of dout (g, m/g, N*out) with cols (g, N*out, c/g*K).  Conv's BPW (c) and,
    with the roles of X and Y' exchanged, ConvTranspose's W' under ``target="portable"``."""
    nsp = len(kernel)
    sp = list(range(2, 2 + nsp))
    xt = g.transpose(data, [1, 0] + sp)  # (c, N, sizes...)
    if any(pb) or any(pe):
        xt = g.op("Pad", xt, g.ints([0, 0] + list(pb) + [0, 0] + list(pe)))
    dyr = g.transpose(dout, [1, 0] + sp)  # (m, N, out...)
    strided = any(s > 1 for s in strides)
    padded = [n + b + e for n, b, e in zip(sizes, pb, pe)]
    pieces = []
    for _offs, starts, ends in ca.kernel_offset_slices(kernel, strides, dilations, out):
        xr = xt
        if starts != [0] * nsp or ends != padded or strided:
            xr = g.slice(xt, starts, ends, sp, list(strides) if strided else None)  # (c, N, out...)
        pieces.append(g.op("Reshape", xr, g.ints([c, -1])))  # (c, N*out)
    # Concat the slices, not the products: (c, K*N*out) is the (c*K, N*out) im2col matrix with rows in
    # W's (j, r) order, so one Gemm gives dW in its own layout.  Measured against one Gemm per offset
    # and a Concat + Transpose of the (M, K, C) products, with W a graph input as in a training step
    # (onnxruntime 1.32, 2 threads; ResNet-18 3x3 shapes, batch 8 and 32): 0.49-0.88x the time.
    nk = len(pieces)
    if group == 1:
        cols = pieces[0] if nk == 1 else g.op("Reshape", g.op("Concat", *pieces, axis=1), g.ints([c * nk, -1]))
        dw = g.op("Gemm", g.op("Reshape", dyr, g.ints([m, -1])), cols, transB=1)  # (m, c*K)
        return g.op("Reshape", dw, g.ints([m, c] + list(kernel)))
    cg, mg = c // group, m // group
    cols = pieces[0] if nk == 1 else g.op("Concat", *pieces, axis=1)
    cols = g.transpose(g.op("Reshape", cols, g.ints([group, cg * nk, -1])), [0, 2, 1])  # (g, N*out, cg*K)
    dw = g.op("MatMul", g.op("Reshape", dyr, g.ints([group, mg, -1])), cols)  # (g, mg, cg*K)
    return g.op("Reshape", dw, g.ints([m, cg] + list(kernel)))


#: The batch size the lowering choice assumes where the batch is symbolic.
ASSUMED_BATCH = 32

#: Below this many im2col elements "auto" takes dX and dW by "transpose", the forms with the fewest
#: nodes: the K strided Slices and the Concat of "patches" dW and the kernel rotation of "seed" dX cost
#: more than they save (LeNet's 8-channel 4x4 conv at batch 32, 36,864 elements: the LeNet step
#: 1.10 -> 0.88 ms); ResNet-18's smallest, 512 channels on 2x2 maps at batch 8, has 147,456.
MIN_PATCHES_SIZE = 65536


def resolve_strategy(name: str, strides, kernel, group: int = 1, in_channels: int = 0,
                     weight_bound: bool = False, im2col_size: Optional[int] = None,
                     static_batch: bool = True) -> tuple:
    """(BPA lowering, BPW lowering) for a conv_strategy choice; "auto" per the module docstring.

    ``weight_bound``: the padded input map times the batch is no larger than the output channels
    (:func:`weight_bound`), where "auto" takes dX by "patches" instead of "seed" (group 1).
    ``im2col_size``: N * prod(out) * C * K, the elements of dW's im2col matrix; below
    MIN_PATCHES_SIZE (and a kernel of more than one offset) "auto" takes dX by "transpose", and dW
    too where the batch is static (``static_batch``): a "transpose" dW Conv's own gradient (second
    order) needs the batch static, as its output channels."""
    n_offsets = 1
    for k in kernel:
        n_offsets *= k
    patches_ok = group == 1 and n_offsets <= MAX_PATCHES
    small = n_offsets > 1 and im2col_size is not None and im2col_size < MIN_PATCHES_SIZE
    if name in ("auto", "patches"):
        seed_dx = all(s == 1 for s in strides) and any(k > 1 for k in kernel) and not (small and name == "auto")
        bpa = "seed" if seed_dx else "transpose"
        if patches_ok and (name == "patches" or (weight_bound and seed_dx)):
            bpa = "patches"
        if name == "patches":
            return bpa, ("patches" if patches_ok else "transpose")
        small_dw = small and static_batch
        return bpa, ("patches" if patches_ok and (in_channels or 0) >= 8 and not small_dw else "transpose")
    return name, name


def weight_bound(batch, padded, out_channels: int) -> bool:
    """N * prod(padded input) <= M: col2im moves no more than the K*M*C elements that the seed form's
    kernel rotation and transpose move (``batch`` None: ASSUMED_BATCH)."""
    n = batch if isinstance(batch, int) else ASSUMED_BATCH
    for p in padded:
        n *= p
    return n <= out_channels


@register_gradient("Conv", smoothness=LINEAR, min_opset=11,
                   lowering="dX=ConvTranspose(dY,W) or Conv(zero-inserted padded dY, rot180 W); "
                            "dW=Conv(X^T, dY^T) or rot180(Conv(dY', X)); dB=ReduceSum(dY)")
def conv_grad(g):
    """Seed 001 sections 2.1-2.4 (BPA, BPW) and seed 002 section 3 (bias); see module docstring."""
    x, dy = g.input(0), g.grad_output(0)
    want = [g.needs_grad(i) for i in range(3)]
    grads = [None, None, None]
    if want[0] or want[1]:
        cv = _Conv(g)
        padded = [n + b + e for n, b, e in zip(cv.n, cv.pb, cv.pe)]
        batch = (g.shape(x) or [None])[0]
        cols = None if cv.c is None else ((batch if isinstance(batch, int) else ASSUMED_BATCH) * cv.c
                                          * math.prod(cv.out) * math.prod(cv.k))
        bpa, bpw = resolve_strategy(g.option("conv_strategy"), cv.s, cv.k, cv.group, cv.c,
                                    weight_bound(batch, padded, cv.m), im2col_size=cols,
                                    static_batch=isinstance(batch, int))
        if g.option("target") == "portable":
            # no runtime-shaped kernel (docs/portability.md): dW by im2col, grouped convs included
            if cv.c is None and want[1]:
                g.fail(f"target='portable' needs the input channels of {cv.x!r} (or the shape of W "
                       f"{cv.w!r}) static for the im2col weight gradient")
            bpw = "patches"
            if bpa == "transpose" and cv.group > 1 and not (cv.c == cv.group and cv.m == cv.c):
                # onnx's ReferenceEvaluator computes a grouped ConvTranspose wrongly unless it is
                # depthwise (C/g = 1, M = C): dX by the rotated-kernel Conv (docs/portability.md, bug 6)
                bpa = "seed"
        if cv.c is None:  # runtime input channels: "patches" reshapes need them (see _Conv)
            bpa = "seed" if bpa == "patches" else bpa
            bpw = "transpose" if bpw == "patches" else bpw
            if cv.group > 1 and bpw == "seed":  # X as a grouped kernel: (C, N, n) needs C
                bpw = "transpose"
        zp = None
        if (want[0] and bpa == "seed") or (want[1] and bpw == "seed"):
            zp = _dilate_and_pad(g, dy, cv)
        if want[0]:
            if bpa == "transpose":
                grads[0] = _bpa_transpose(g, dy, cv)
            elif bpa == "patches":
                grads[0] = _bpa_patches(g, dy, cv)
            else:
                grads[0] = _bpa_seed(g, zp, cv)
        if want[1]:
            bpw_fn = {"transpose": _bpw_transpose, "patches": _bpw_patches}.get(bpw)
            grads[1] = bpw_fn(g, x, dy, cv) if bpw_fn else _bpw_seed(g, x, zp, cv)
    if want[2] and g.input(2) is not None:
        grads[2] = g.reduce_sum(dy, [0] + list(range(2, g.rank(x))), keepdims=False)
    return grads[:len(g.inputs)]
