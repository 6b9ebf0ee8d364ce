"""Ops that move, select or replicate elements.

Every op here is linear in its data input(s) ``X``: ``Y = A X`` for a 0/1
selection-or-replication matrix ``A`` fixed by the attributes and the
index/shape inputs.  The gradient is the adjoint ``X' = A^T Y'``, the same
reasoning the seeds apply to the linear layer (seed 000/001 section 1.1,
``X' = Y' . W^T``) and to flatten (seed 002: a reshape is undone by the
inverse reshape):

- selection (Slice, Gather, GatherElements, Split, crop-Pad): ``A^T`` scatters
  ``Y'`` back to the selected positions, zeros elsewhere (Pad / ScatterElements
  with ``reduction="add"`` where indices may repeat);
- concatenation (Concat, padding Pad): ``A^T`` cuts ``Y'`` into the pieces;
- replication (Expand, Tile): ``A^T`` sums the copies (seed 002 section 2.2:
  the bias gradient sums the output gradient over the axes it was broadcast);
- permutation (Transpose) / relabelling (Squeeze, Unsqueeze): the inverse.

Where(C, X, Y) routes ``Y'`` to X where C holds and to Y elsewhere.  CumSum is ``Y = L X`` with a
triangular ones matrix (``X'`` the cumulative sum the other way), Trilu a fixed triangle mask;
GatherND / ScatterND select and scatter whole slices (ScatterND with ``reduction="add"`` undoes a
GatherND whose indices repeat).

(ConvTranspose, also linear, lives with the conv family: rules/conv_transpose.py.)
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..registry import LINEAR, register_gradient

_INT64_MIN = -(2 ** 63)


# ---------------------------------------------------------------- helpers
def _dim(g, x, axis):
    """Runtime size of ``x`` along ``axis`` as a 1-element int64 tensor."""
    return g.op("Gather", g.op("Shape", x), g.ints([axis]))


def _norm_axis(g, axis, rank):
    if not -rank <= axis < max(rank, 1):
        g.fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


# ---------------------------------------------------------------- Concat / Split
@register_gradient("Concat", smoothness=LINEAR,
                   lowering="X_i'=Slice(Y', offset_i, offset_i+dim_i, axis) (runtime offsets if dims symbolic)")
def concat_grad(g):
    dy = g.grad_output(0)
    xs = g.inputs
    rank = g.rank(g.output(0))
    axis = _norm_axis(g, g.attr("axis", 1), rank)
    dims = [(g.shape(x) or (None,) * rank)[axis] for x in xs]
    out = [None] * len(xs)
    if all(isinstance(d, int) for d in dims):
        off = 0
        for i, d in enumerate(dims):
            if g.needs_grad(i):
                out[i] = g.slice(dy, [off], [off + d], [axis])
            off += d
        return out
    if g.opset < 10:
        g.fail(f"the sizes along axis {axis} of the inputs are not all static ({dims}); slicing at "
               f"runtime offsets needs opset >= 10")
    start = g.ints([0])
    axes = g.ints([axis])
    for i, (x, d) in enumerate(zip(xs, dims)):
        size = g.ints([d]) if isinstance(d, int) else _dim(g, x, axis)
        end = g.op("Add", start, size)
        if g.needs_grad(i):
            out[i] = g.op("Slice", dy, start, end, axes)
        start = end
    return out


@register_gradient("Split", smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Concat(Y_k' or zeros shaped like Y_k, axis)")
def split_grad(g):
    # Opsets differ only in how the sizes are given (attribute split <13,
    # input >=13, num_outputs >=18); the outputs themselves carry the sizes.
    parts = []
    for k, y in enumerate(g.outputs):
        d = g.grad_output(k)
        parts.append(d if d is not None else g.zeros_like(y))
    return [g.op("Concat", *parts, axis=g.attr("axis", 0)), None]


# ---------------------------------------------------------------- Slice
def _slice_params(g, rank):
    """(starts, ends, axes, steps) as python lists, or None where not constant."""
    if g.opset < 10:
        starts, ends = g.attr("starts"), g.attr("ends")
        axes = g.attr("axes", list(range(len(starts))))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    vals = [g.known_value(g.input(i)) for i in range(1, 5)]
    starts, ends, axes, steps = [None if v is None else [int(e) for e in np.asarray(v).reshape(-1)]
                                 for v in vals]
    n = len(starts) if starts is not None else (len(ends) if ends is not None else None)
    if n is None:  # both computed at run time: their static length still fixes the default axes
        sshape = g.shape(g.input(1))
        n = sshape[0] if sshape and isinstance(sshape[0], int) else None
    if g.input(3) is None and n is not None:
        axes = list(range(n))
    if g.input(4) is None and n is not None:
        steps = [1] * n
    return starts, ends, axes, steps


def _onnx_slice_indices(dim, start, end, step):
    """The indices ONNX Slice selects along one axis (clamping as in the spec)."""
    if step == 0:
        raise ValueError("step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


@register_gradient("Slice", smoothness=LINEAR, non_differentiable_inputs=(1, 2, 3, 4),
                   lowering="X'=Pad(Y') for step 1; steps: zero-interleave via Unsqueeze/Pad/Reshape, "
                            "negative steps reversed first; runtime params: ScatterElements per axis")
def slice_grad(g):
    x = g.input(0)
    dy = g.grad_output(0)
    rank = g.rank(x)
    starts, ends, axes, steps = _slice_params(g, rank)
    if axes is not None:
        axes = [_norm_axis(g, a, rank) for a in axes]
    shape = g.shape(x)
    static = (None not in (starts, ends, axes, steps)
              and all(isinstance(shape[a], int) for a in axes))
    if static:
        if any(s == 0 for s in steps):
            g.fail("Slice with step 0 is invalid")
        return [_slice_grad_static(g, x, dy, rank, starts, ends, axes, steps)]
    if g.opset < 11:
        g.fail("Slice parameters or the sliced dims are not known at build time; the runtime "
               "gradient (Range + ScatterElements) needs opset >= 11")
    if axes is None:
        g.fail("Slice with runtime axes is not supported (axes must be a constant or omitted)")
    return [_slice_grad_runtime(g, x, dy, rank, axes)]


def _slice_grad_static(g, x, dy, rank, starts, ends, axes, steps):
    shape = g.shape(x)
    pads = [0] * (2 * rank)
    t = dy
    for start, end, a, step in zip(starts, ends, axes, steps):
        dim = shape[a]
        idx = _onnx_slice_indices(dim, start, end, step)
        if not idx:
            return g.zeros_like(x)
        n = len(idx)
        if step < 0:  # reverse Y' along a: its element j came from idx[j], now ascending
            t = g.slice(t, [-1], [_INT64_MIN], [a], [-1])
            idx = idx[::-1]
        s = abs(step)
        first = idx[0]
        if s > 1 and n > 1:
            # Interleave s-1 zeros after every element: (.., n, ..) -> (.., n, s, ..) -> (.., n*s, ..)
            mult = [1] * rank
            mult[a] = s
            target = g.op("Mul", g.op("Shape", t), g.ints(mult))
            u = g.unsqueeze(t, [a + 1])
            upad = [0] * (2 * (rank + 1))
            upad[rank + 1 + a + 1] = s - 1
            t = g.op("Reshape", g.pad(u, upad, like=x), target)
            span = n * s
        else:
            span = n
        pads[a] = first
        pads[rank + a] = dim - first - span  # negative: crop the trailing interleaved zeros
    return g.pad(t, pads, like=x)


def _slice_grad_runtime(g, x, dy, rank, axes):
    def param(i, k, default):
        name = g.input(i)
        if name is None:
            return g.ints([default])
        v = g.op("Slice", name, g.ints([k]), g.ints([k + 1]), g.ints([0]))
        return g.op("Cast", v, to=TensorProto.INT64)

    t = dy
    zero_s, one_s = g.const(0, dtype=np.int64), g.const(1, dtype=np.int64)
    for k, a in enumerate(axes):
        dim = _dim(g, x, a)
        every = g.op("Range", zero_s, g.squeeze(dim, [0]), one_s)  # 0 .. dim-1: positions along a
        sel = g.op("Slice", every, param(1, k, 0), param(2, k, 0), g.ints([0]), param(4, k, 1))
        idx_shape = [1] * rank
        idx_shape[a] = -1
        idx = g.op("Expand", g.op("Reshape", sel, g.ints(idx_shape)), g.op("Shape", t))
        # Scatter the selected positions into zeros shaped like t with X's length along a.
        mask = np.zeros(rank, dtype=bool)
        mask[a] = True
        new_shape = g.op("Where", g.const(mask), g.op("Expand", dim, g.ints([rank])), g.op("Shape", t))
        zeros = g.zeros(new_shape, g.dtype(x))
        t = g.op("ScatterElements", zeros, idx, t, axis=a)
    return t


# ---------------------------------------------------------------- permutations, relabelling
@register_gradient("Transpose", smoothness=LINEAR, lowering="X'=Transpose(Y', inverse perm)")
def transpose_grad(g):
    rank = g.rank(g.input(0))
    perm = g.attr("perm", list(range(rank))[::-1])
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return [g.transpose(g.grad_output(0), inv)]


@register_gradient("Squeeze", smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Reshape(Y', Shape(X))")
def squeeze_grad(g):
    return [g.op("Reshape", g.grad_output(0), g.op("Shape", g.input(0))), None]


@register_gradient("Unsqueeze", smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Reshape(Y', Shape(X))")
def unsqueeze_grad(g):
    return [g.op("Reshape", g.grad_output(0), g.op("Shape", g.input(0))), None]


# ---------------------------------------------------------------- replication
@register_gradient("Expand", since=8, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Y' summed over the broadcast axes (ReduceSum)")
def expand_grad(g):
    return [g.unbroadcast(g.grad_output(0), g.input(0)), None]


@register_gradient("Tile", since=6, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=ReduceSum(Reshape(Y', [r0,d0,r1,d1,...]), axes=[0,2,...])")
def tile_grad(g):
    x, reps = g.input(0), g.input(1)
    rank = g.rank(x)
    if rank == 0:
        return [g.grad_output(0), None]
    reps64 = g.op("Cast", reps, to=TensorProto.INT64)
    # Y[i_0*d0 + j_0, ...] = X[j_0, ...]: Y' viewed as (r0, d0, r1, d1, ...) sums over the r's.
    pairs = g.op("Concat", g.unsqueeze(reps64, [1]), g.unsqueeze(g.op("Shape", x), [1]), axis=1)
    target = g.op("Reshape", pairs, g.ints([-1]))
    t = g.op("Reshape", g.grad_output(0), target)
    return [g.reduce_sum(t, list(range(0, 2 * rank, 2)), keepdims=False), None]


# ---------------------------------------------------------------- gathers
def _nonneg_indices(g, idx, x, axis):
    idx = g.op("Cast", idx, to=TensorProto.INT64)
    dim = _dim(g, x, axis)
    neg = g.op("Less", idx, g.const(0, dtype=np.int64))
    return g.op("Where", neg, g.op("Add", idx, dim), idx)


def _gather_as_slice_grad(g, x, idx, dy, axis, rank):
    """A Gather whose indices are a build-time constant scalar or a constant run ``a, a+1, ..., b-1``
    selects a slice (attention's ``q, k, v = qkv[0], qkv[1], qkv[2]``): its adjoint is a Pad of
    Y' (unsqueezed for a scalar index) with zeros before and after the slice along ``axis``, instead
    of a ScatterElements (3.1 ms per ViT-tiny q/k/v gradient, a few element-wise passes as a Pad).
    None where the indices are not such a constant or the axis length is not static."""
    value = g.constant_value(idx)
    n = (g.shape(x) or [None] * rank)[axis]
    if value is None or not isinstance(n, int) or value.ndim > 1 or value.size == 0:
        return None
    v = np.where(value < 0, value + n, value).reshape(-1).astype(np.int64)
    if np.any(v < 0) or np.any(v >= n) or np.any(np.diff(v) != 1):
        return None
    t = g.unsqueeze(dy, [axis]) if value.ndim == 0 else dy
    before, after = int(v[0]), n - 1 - int(v[-1])
    if not before and not after:
        return t
    return g.pad(t, [before if i == axis else 0 for i in range(rank)] + [after if i == axis else 0 for i in range(rank)],
                 like=x)


@register_gradient("Gather", smoothness=LINEAR, non_differentiable_inputs=(1,), min_opset=16,
                   lowering="data'=ScatterElements(zeros, indices, Y' reshaped, axis, reduction=add)")
def gather_grad(g):
    x, idx = g.input(0), g.input(1)
    dy = g.grad_output(0)
    rank = g.rank(x)
    axis = _norm_axis(g, g.attr("axis", 0), rank)
    fast = _gather_as_slice_grad(g, x, idx, dy, axis, rank)
    if fast is not None:
        return [fast, None]
    flat = g.op("Reshape", _nonneg_indices(g, idx, x, axis), g.ints([-1]))
    # Y' has shape d[:axis] + idx.shape + d[axis+1:]; fold the index dims into one.
    parts = []
    if axis > 0:
        parts.append(g.op("Shape", x, end=axis))
    parts.append(g.ints([-1]))
    if axis + 1 < rank:
        parts.append(g.op("Shape", x, start=axis + 1))
    upd_shape = parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis=0)
    upd = g.op("Reshape", dy, upd_shape)
    idx_shape = [1] * rank
    idx_shape[axis] = -1
    idx_full = g.op("Expand", g.op("Reshape", flat, g.ints(idx_shape)), g.op("Shape", upd))
    dx = g.op("ScatterElements", g.zeros_like(x), idx_full, upd, axis=axis, reduction="add")
    return [dx, None]


@register_gradient("GatherElements", smoothness=LINEAR, non_differentiable_inputs=(1,), min_opset=16,
                   lowering="data'=ScatterElements(zeros, indices, Y', axis, reduction=add)")
def gather_elements_grad(g):
    x, idx = g.input(0), g.input(1)
    rank = g.rank(x)
    axis = _norm_axis(g, g.attr("axis", 0), rank)
    idx = _nonneg_indices(g, idx, x, axis)
    dx = g.op("ScatterElements", g.zeros_like(x), idx, g.grad_output(0), axis=axis, reduction="add")
    return [dx, None]


@register_gradient("ScatterElements", since=11, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="data'=Y' (add) or ScatterElements(Y', indices, zeros) (none); "
                            "updates'=GatherElements(Y', indices)")
def scatter_elements_grad(g):
    """``Y = data`` with ``updates`` written (``none``) or added (``add``) at ``indices`` along ``axis``.

    Linear in (data, updates): with ``add``, ``Y = data + A updates`` (A scatters), so ``data' = Y'``
    and ``updates' = A^T Y'``, a gather of ``Y'`` at the indices.  With ``none`` the written positions
    of ``data`` are replaced, so ``data'`` is ``Y'`` with those positions zeroed (a ScatterElements of
    zeros), and ``updates'`` is the same gather; the spec leaves repeated indices undefined for
    ``none``, and so is their gradient.  ``mul``/``min``/``max`` are not linear: refused.  This is the
    op the MaxPool, Gather and runtime-Slice backwards emit, so their gradients can be differentiated
    again.
    """
    idx, upd = g.input(1), g.input(2)
    reduction = g.attr("reduction", "none")
    if reduction not in ("none", "add"):
        g.fail(f"reduction={reduction!r} is not linear; supported: none, add")
    axis = g.attr("axis", 0)
    dy = g.grad_output(0)
    out = [None, None, None]
    if g.needs_grad(0):
        out[0] = dy if reduction == "add" else g.op("ScatterElements", dy, idx, g.zeros_like(upd, like=dy), axis=axis)
    if g.needs_grad(2):
        out[2] = g.op("GatherElements", dy, idx, axis=axis)
    return out


# ---------------------------------------------------------------- Pad
@register_gradient("Pad", since=2, smoothness=LINEAR, non_differentiable_inputs=(1, 3),
                   lowering="constant mode: X'=Pad(Y', -pads) (crops the padding, re-pads cropped "
                            "regions with 0), value'=sum(Y')-sum(X'); reflect/edge/wrap: centre plus the "
                            "border regions folded back (Slice, reversed Slice / ReduceSum, Pad, Sum)")
def pad_grad(g):
    x = g.input(0)
    dy = g.grad_output(0)
    mode = g.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        g.fail(f"Pad mode {mode!r} is unknown; supported: constant, reflect, edge, wrap")
    if mode != "constant":
        return _pad_grad_border(g, x, dy, mode)
    if g.opset < 11:
        pads = g.attr("pads")
        return [g.pad(dy, [-int(p) for p in pads], like=x)]
    pads_value = g.known_value(g.input(1))
    neg = (g.ints([-int(p) for p in np.asarray(pads_value).reshape(-1)]) if pads_value is not None
           else g.op("Neg", g.input(1)))
    args = [dy, neg, g.const(0.0, like=x)]
    if g.input(3) is not None:
        args.append(g.input(3))
    dx = g.op("Pad", *args)
    out = [dx if g.needs_grad(0) else None, None, None, None]
    if g.needs_grad(2):
        cv = g.input(2)
        rank = g.rank(x)
        total = g.reduce_sum(dy, list(range(rank)), keepdims=False)
        inner = g.reduce_sum(dx, list(range(rank)), keepdims=False)
        out[2] = g.op("Reshape", g.op("Sub", total, inner), g.op("Shape", cv))
    return out


def _pad_grad_border(g, x, dy, mode):
    """reflect / edge / wrap: the centre of Y' plus each border region folded back onto the
    input positions it copied (reversed for reflect, summed into the edge row for edge, shifted
    for wrap).  Axis by axis; needs constant pads and static dims on the padded axes."""
    rank = g.rank(x)
    if g.opset < 11:
        pads = list(g.attr("pads"))
    else:
        pv = g.known_value(g.input(1))
        if pv is None:
            g.fail(f"Pad mode {mode!r} needs constant pads for its gradient (pads is computed at run time)")
        pads = [int(p) for p in np.asarray(pv).reshape(-1)]
    axes = list(range(rank))
    if g.input(3) is not None:
        av = g.known_value(g.input(3))
        if av is None:
            g.fail(f"Pad mode {mode!r} needs constant axes for its gradient")
        axes = [_norm_axis(g, int(a), rank) for a in np.asarray(av).reshape(-1)]
    n = len(axes)
    if any(p < 0 for p in pads):
        g.fail(f"Pad mode {mode!r} with negative pads is not supported; only constant mode crops")
    t = dy
    for k, a in enumerate(axes):
        b, e = pads[k], pads[n + k]
        if not b and not e:
            continue
        dim = g.static_shape(x, axes=[a])[a]
        parts = [g.slice(t, [b], [b + dim], [a])]
        if mode == "reflect" and (b > dim - 1 or e > dim - 1):
            g.fail(f"Pad mode 'reflect' with pads ({b}, {e}) on an axis of size {dim}: pads must be < {dim}")
        if mode == "wrap" and (b > dim or e > dim):
            g.fail(f"Pad mode 'wrap' with pads ({b}, {e}) larger than the axis size {dim} is not supported")
        for begin, size in ((True, b), (False, e)):
            if not size:
                continue
            lo = 0 if begin else b + dim
            region = g.slice(t, [lo], [lo + size], [a])
            pad = [0] * (2 * rank)
            if mode == "edge":  # every border element copied X's first / last row
                region = g.reduce_sum(region, [a], keepdims=True)
                pad[rank + a if begin else a] = dim - 1
            elif mode == "reflect":  # Y[b-1-j] = X[1+j] before, Y[b+dim+j] = X[dim-2-j] after
                region = g.slice(region, [-1], [_INT64_MIN], [a], [-1])
                pad[a], pad[rank + a] = (1, dim - 1 - size) if begin else (dim - 1 - size, 1)
            else:  # wrap: Y[j] = X[dim-b+j] before, Y[b+dim+j] = X[j] after
                pad[a], pad[rank + a] = (dim - size, 0) if begin else (0, dim - size)
            parts.append(g.pad(region, pad, like=x))
        t = g.add_n(parts)
    return [t, None, None, None][: max(1, len(g.inputs))]


# ---------------------------------------------------------------- Where
@register_gradient("Where", smoothness=LINEAR, non_differentiable_inputs=(0,),
                   lowering="X'=Where(C, Y', 0), Y'=Where(C, 0, Y'), each summed over broadcast axes")
def where_grad(g):
    c, a, b = g.inputs
    dy = g.grad_output(0)
    zero = g.const(0.0, like=g.output(0))
    da = db = None
    if g.needs_grad(1):
        da = g.unbroadcast(g.op("Where", c, dy, zero), a)
    if g.needs_grad(2):
        db = g.unbroadcast(g.op("Where", c, zero, dy), b)
    return [None, da, db]


# ---------------------------------------------------------------- CumSum, Trilu
@register_gradient("CumSum", since=11, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=CumSum(Y', axis, exclusive, reverse=1-reverse)")
def cumsum_grad(g):
    """``Y = L X`` along ``axis``, ``L`` the (strictly, if exclusive) lower-triangular ones matrix
    (upper with ``reverse``); ``X' = L^T Y'`` is the cumulative sum of ``Y'`` in the other direction,
    with the same ``exclusive``."""
    dx = g.op("CumSum", g.grad_output(0), g.input(1), exclusive=int(g.attr("exclusive", 0)),
              reverse=1 - int(g.attr("reverse", 0)))
    return [dx, None]


@register_gradient("Trilu", since=14, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Trilu(Y', k, upper): the same triangle mask")
def trilu_grad(g):
    """``Y = M * X`` for the fixed 0/1 mask ``M`` of the kept triangle (diagonal offset ``k``), so
    ``X' = M * Y'``: Trilu of ``Y'`` with the same ``k`` and ``upper``."""
    k = g.input(1)
    args = [g.grad_output(0)] + ([k] if k is not None else [])
    return [g.op("Trilu", *args, upper=int(g.attr("upper", 1))), None]


# ---------------------------------------------------------------- GatherND, ScatterND
def _nd_indices(g, data, idx, batch_dims):
    """GatherND/ScatterND indices as int64, negative entries wrapped by the indexed dims' sizes."""
    depth = (g.shape(idx) or [None])[-1]
    idx = g.op("Cast", idx, to=TensorProto.INT64)
    if not isinstance(depth, int):
        g.fail(f"the last dim of indices {g.input(1)!r} is not static; the gradient needs the index depth")
    dims = g.op("Slice", g.op("Shape", data), g.ints([batch_dims]), g.ints([batch_dims + depth]), g.ints([0]))
    neg = g.op("Less", idx, g.const(0, dtype=np.int64))
    return g.op("Where", neg, g.op("Add", idx, dims), idx)


@register_gradient("GatherND", since=11, smoothness=LINEAR, non_differentiable_inputs=(1,), min_opset=16,
                   lowering="data'=ScatterND(zeros, indices, Y', reduction=add) (batch_dims=0)")
def gathernd_grad(g):
    """``Y[j] = data[indices[j]]`` selects slices: ``data' = A^T Y'`` adds each ``Y'[j]`` back at
    ``indices[j]`` (ScatterND with ``reduction="add"``: indices may repeat).  ``batch_dims > 0`` is
    refused."""
    data, idx = g.input(0), g.input(1)
    batch_dims = int(g.attr("batch_dims", 0))
    if batch_dims:
        g.fail(f"batch_dims={batch_dims} is not supported (ScatterND has no batch_dims); supported: batch_dims=0")
    dx = g.op("ScatterND", g.zeros_like(data), _nd_indices(g, data, idx, 0), g.grad_output(0), reduction="add")
    return [dx, None]


@register_gradient("ScatterND", since=11, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="data'=Y' (add) or ScatterND(Y', indices, zeros) (none); updates'=GatherND(Y', indices)")
def scatternd_grad(g):
    """``Y = data`` with ``updates[j]`` written (``none``) or added (``add``) at ``indices[j]``.

    Linear in (data, updates): ``add``: ``data' = Y'``; ``none``: ``Y'`` with the written slices
    zeroed (ScatterND of zeros).  ``updates' = GatherND(Y', indices)`` in both (for ``none`` the
    spec leaves repeated indices undefined, and so their gradient).  mul/min/max are refused.
    """
    idx, upd = g.input(1), g.input(2)
    reduction = g.attr("reduction", "none")
    if reduction not in ("none", "add"):
        g.fail(f"reduction={reduction!r} is not linear; supported: none, add")
    dy = g.grad_output(0)
    out = [None, None, None]
    if g.needs_grad(0):
        out[0] = dy if reduction == "add" else g.op("ScatterND", dy, idx, g.zeros_like(upd, like=dy))
    if g.needs_grad(2):
        out[2] = g.op("GatherND", dy, idx)
    return out
