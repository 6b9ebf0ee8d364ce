"""Reductions, the softmax family, and the variadic Mean/Max/Min.

Reductions ``Y = reduce(X, axes)``: every ``X`` element feeds exactly one
``Y`` element, so ``X' = Y'`` brought back to the keepdims shape (Unsqueeze
at the reduced axes when ``keepdims=0``) and broadcast to ``X`` (Expand to the
runtime ``Shape(X)``) times the local derivative — the seeds' bias rule run
backwards (seed 002 section 2.2 sums ``Y'`` over the batch; here the sum is
undone by broadcasting)::

    ReduceSum        X' = Y'k
    ReduceMean       X' = Y'k / n          (n = elements per reduced group)
    ReduceSumSquare  X' = 2 X . Y'k
    ReduceL2         X' = X / Yk . Y'k     (0 where Yk = 0, as torch, from opset 11)
    ReduceL1         X' = sign(X) . Y'k
    ReduceLogSumExp  X' = exp(X - Yk) . Y'k
    ReduceMax/Min    X' = m . Y'k / sum(m), m = [X == Yk]

(``k``: in the keepdims shape.)  Ties in ReduceMax/Min split the gradient
evenly among the maxima, as ``torch.amax``/``amin``.  The mask ``X == Yk`` is
computed as ``not(X < Yk)`` (Max) / ``not(X > Yk)`` (Min): the same set, and
valid below opset 11 where Equal has no float kernel.

Axes come from the ``axes`` attribute (ReduceSum < 13, the others < 18) or the
optional ``axes`` input.  Absent or empty axes mean all axes, unless
``noop_with_empty_axes=1``, where the op is elementwise (onnxruntime then
still squares/abs-es for SumSquare/L2/L1; the formulas above cover that with
no reduced axes).  An ``axes`` input that is not a build-time constant is
used at run time: ``Unsqueeze(Y', axes)`` and ``n = Size(X)/Size(Y)``.

Softmax (opset >= 13, one axis)::   X' = Y . (Y' - sum_axis(Y' . Y))
LogSoftmax (opset >= 13)::          X' = Y' - exp(Y) . sum_axis(Y')

Opset < 13 coerces X to 2-D ``[prod(d_0..d_{axis-1}), prod(d_axis..)]`` and
normalises each row; a row of the 2-D view is the whole trailing block, so
the same formulas hold with the sum taken over axes ``axis..rank-1``
(ReduceSum over those axes, keepdims) — no reshape needed when the rank is
known; with unknown rank Y and Y' are Flatten-ed at ``axis``, the 2-D formula
applied, and the result Reshape-d to ``Shape(X)``.

Variadic ``Y = Mean(X_1..X_n)``: ``X_i' = Y'/n``; ``Y = Max(X_1..X_n)``:
``X_i' = Y' . m_i / sum_j m_j``, ``m_i = [X_i == Y]``, so ties split evenly
(``torch.maximum``'s 0.5/0.5 for two inputs); all summed over the axes each
input was broadcast along.
"""

from __future__ import annotations

import numpy as np

from ..registry import LINEAR, PIECEWISE, SMOOTH, register_gradient

# ------------------------------------------------------------ axes handling


class _Axes:
    """The reduced axes of one Reduce* node.

    ``static``: sorted non-negative axes, or None when unknown at build time;
    ``runtime``: the axes input name when ``static`` is None; ``all_unknown``:
    reduce-all with unknown rank.
    """

    def __init__(self, static=None, runtime=None, all_unknown=False):
        self.static, self.runtime, self.all_unknown = static, runtime, all_unknown


def _axes(g, axes_input_since):
    x = g.input(0)
    noop = bool(g.attr("noop_with_empty_axes", 0))
    if g.opset >= axes_input_since:
        name = g.input(1)
        if name is None:
            axes = []
        else:
            val = g.known_value(name)  # a constant, or axes computed from static shapes
            if val is None:
                return _Axes(runtime=name)
            axes = [int(a) for a in val.reshape(-1)]
    else:
        axes = list(g.attr("axes", []) or [])
    if not axes:
        if noop:
            return _Axes(static=[])
        shape = g.shape(x)
        if shape is None:
            return _Axes(all_unknown=True)
        return _Axes(static=list(range(len(shape))))
    rank = g.rank(x) if any(a < 0 for a in axes) else None
    return _Axes(static=sorted({a % rank if a < 0 else a for a in axes}))


def _keep(g, t, ax):
    """``t`` (shaped like Y) in the keepdims shape: unsqueeze the reduced axes if keepdims=0."""
    if g.attr("keepdims", 1):
        return t
    if ax.runtime is not None:
        return g.op("Unsqueeze", t, ax.runtime)
    if ax.all_unknown:
        return t  # a scalar broadcasts against X as it is
    return g.unsqueeze(t, ax.static)


def _sum_keep(g, t, ax):
    """ReduceSum of ``t`` (shaped like X) over the reduced axes, keepdims=1."""
    if ax.runtime is not None:
        return g.op("ReduceSum", t, ax.runtime, keepdims=1,
                    noop_with_empty_axes=int(g.attr("noop_with_empty_axes", 0)) or None)
    if ax.all_unknown:
        return g.op("ReduceSum", t, keepdims=1)
    return g.reduce_sum(t, ax.static, keepdims=True)


def _expand(g, t):
    """Broadcast ``t`` (keepdims shape) to the shape of X."""
    x = g.input(0)
    if g.opset >= 8:
        return g.op("Expand", t, g.op("Shape", x))
    shape = g.static_shape(x)  # opset 7 has no Expand: multiply by ones of X's static shape
    return g.op("Mul", t, g.const(np.ones(shape), like=x))


def _group_size(g, ax):
    """Elements per reduced group: a Python number if static, else a tensor name."""
    x = g.input(0)
    shape = g.shape(x)
    if ax.static is not None and shape is not None and all(isinstance(shape[a], int) for a in ax.static):
        n = 1
        for a in ax.static:
            n *= shape[a]
        return n
    dt = g.dtype(x)
    return g.op("Div", g.op("Cast", g.op("Size", x), to=dt), g.op("Cast", g.op("Size", g.output(0)), to=dt))


_REDUCE_KW = dict(non_differentiable_inputs=(1,))


def _register_reduce(op, axes_input_since, smoothness, lowering):
    """Register ``fn`` for both the axes-attribute and the axes-input versions of ``op``."""

    def deco(fn):
        def rule(g):
            ax = _axes(g, axes_input_since)
            return [fn(g, ax)]

        rule.__name__ = rule.__qualname__ = fn.__name__
        rule.__module__ = fn.__module__
        register_gradient(op, until=axes_input_since - 1, smoothness=smoothness,
                          lowering=lowering + " (axes attribute)")(rule)
        register_gradient(op, since=axes_input_since, smoothness=smoothness,
                          lowering=lowering + " (axes input; read at run time if not constant)",
                          **_REDUCE_KW)(rule)
        return fn

    return deco


@_register_reduce("ReduceSum", 13, LINEAR, "X'=Expand(Unsqueeze(Y'), Shape(X))")
def reduce_sum_grad(g, ax):
    return _expand(g, _keep(g, g.grad_output(0), ax))


@_register_reduce("ReduceMean", 18, LINEAR, "X'=Expand(Unsqueeze(Y')/n, Shape(X)), n=elements per group")
def reduce_mean_grad(g, ax):
    x = g.input(0)
    n = _group_size(g, ax)
    dy = g.grad_output(0)
    if isinstance(n, int):
        scaled = dy if n == 1 else g.op("Mul", dy, g.const(1.0 / n, like=x))
    else:
        scaled = g.op("Div", dy, n)
    return _expand(g, _keep(g, scaled, ax))


def _extremum_grad(g, ax, cmp):
    x = g.input(0)
    yk = _keep(g, g.output(0), ax)
    mask = g.op("Cast", g.op("Not", g.op(cmp, x, yk)), to=g.dtype(x))
    count = _sum_keep(g, mask, ax)
    return g.op("Mul", mask, g.op("Div", _keep(g, g.grad_output(0), ax), count))


@_register_reduce("ReduceMax", 18, PIECEWISE,
                  "X'=m*Unsqueeze(Y')/ReduceSum(m), m=Cast(X==Y): ties share the gradient evenly")
def reduce_max_grad(g, ax):
    return _extremum_grad(g, ax, "Less")


@_register_reduce("ReduceMin", 18, PIECEWISE,
                  "X'=m*Unsqueeze(Y')/ReduceSum(m), m=Cast(X==Y): ties share the gradient evenly")
def reduce_min_grad(g, ax):
    return _extremum_grad(g, ax, "Greater")


@_register_reduce("ReduceSumSquare", 18, SMOOTH, "X'=2*X*Unsqueeze(Y')")
def reduce_sum_square_grad(g, ax):
    x = g.input(0)
    return g.op("Mul", g.op("Mul", x, g.const(2.0, like=x)), _keep(g, g.grad_output(0), ax))


@_register_reduce("ReduceL2", 18, SMOOTH, "X'=X*Unsqueeze(Y'/Y), 0 where Y=0 (opset>=11)")
def reduce_l2_grad(g, ax):
    x, y = g.input(0), g.output(0)
    ratio = g.op("Div", g.grad_output(0), y)
    if g.opset >= 11:  # an all-zero group: 0 (torch's subgradient), not 0 * inf = NaN
        zero = g.const(0.0, like=x)
        ratio = g.op("Where", g.op("Equal", y, zero), zero, ratio)
    return g.op("Mul", x, _keep(g, ratio, ax))


@_register_reduce("ReduceL1", 18, PIECEWISE, "X'=Sign(X)*Unsqueeze(Y')")
def reduce_l1_grad(g, ax):
    x = g.input(0)
    if g.opset >= 9:
        sign = g.op("Sign", x)
    else:
        zero = g.const(0.0, like=x)
        sign = g.op("Sub", g.op("Cast", g.op("Greater", x, zero), to=g.dtype(x)),
                    g.op("Cast", g.op("Less", x, zero), to=g.dtype(x)))
    return g.op("Mul", sign, _keep(g, g.grad_output(0), ax))


@_register_reduce("ReduceLogSumExp", 18, SMOOTH, "X'=Exp(X-Unsqueeze(Y))*Unsqueeze(Y')")
def reduce_log_sum_exp_grad(g, ax):
    x = g.input(0)
    p = g.op("Exp", g.op("Sub", x, _keep(g, g.output(0), ax)))
    return g.op("Mul", p, _keep(g, g.grad_output(0), ax))


# ---------------------------------------------------------------- softmax


def _softmax_axes(g, legacy):
    """Axes the normalisation runs over, or None when the rank is unknown (legacy only)."""
    x = g.input(0)
    axis = g.attr("axis", 1 if legacy else -1)
    shape = g.shape(x)
    if shape is None:
        if legacy:
            return None, axis
        g.rank(x)  # raises a ShapeError naming the tensor
    rank = len(shape)
    axis = axis % rank if rank else 0
    return (list(range(axis, rank)) if legacy else [axis]), axis


def _softmax_core(g, y, dy, axes, log):
    red = axes if axes is not None else [1]  # None: the 2-D Flatten-ed view
    if log:  # X' = Y' - exp(Y) * sum(Y')
        s = g.reduce_sum(dy, red, keepdims=True)
        return g.op("Sub", dy, g.op("Mul", g.op("Exp", y), s))
    s = g.reduce_sum(g.op("Mul", dy, y), red, keepdims=True)
    return g.op("Mul", y, g.op("Sub", dy, s))


def _softmax_grad(g, legacy, log):
    y, dy = g.output(0), g.grad_output(0)
    axes, axis = _softmax_axes(g, legacy)
    if axes is not None:
        return [_softmax_core(g, y, dy, axes, log)]
    # Legacy with unknown rank: apply the 2-D formula to the Flatten-ed view.
    y2, dy2 = g.op("Flatten", y, axis=axis), g.op("Flatten", dy, axis=axis)
    dx2 = _softmax_core(g, y2, dy2, None, log)
    return [g.op("Reshape", dx2, g.op("Shape", g.input(0)))]


@register_gradient("Softmax", until=12, smoothness=SMOOTH,
                   lowering="X'=Y*(Y'-ReduceSum(Y'*Y, axes=axis..rank-1)) (the 2-D coerced row)")
def softmax_legacy_grad(g):
    return _softmax_grad(g, legacy=True, log=False)


@register_gradient("Softmax", since=13, smoothness=SMOOTH, lowering="X'=Y*(Y'-ReduceSum(Y'*Y, axis))")
def softmax_grad(g):
    return _softmax_grad(g, legacy=False, log=False)


@register_gradient("LogSoftmax", until=12, smoothness=SMOOTH,
                   lowering="X'=Y'-Exp(Y)*ReduceSum(Y', axes=axis..rank-1) (the 2-D coerced row)")
def log_softmax_legacy_grad(g):
    return _softmax_grad(g, legacy=True, log=True)


@register_gradient("LogSoftmax", since=13, smoothness=SMOOTH, lowering="X'=Y'-Exp(Y)*ReduceSum(Y', axis)")
def log_softmax_grad(g):
    return _softmax_grad(g, legacy=False, log=True)


# ------------------------------------------------------- variadic Mean/Max/Min


@register_gradient("Mean", smoothness=LINEAR, lowering="X_i'=Y'/n summed over broadcast axes")
def mean_grad(g):
    xs = g.inputs
    dy = g.grad_output(0)
    n = len(xs)
    scaled = dy if n == 1 else g.op("Mul", dy, g.const(1.0 / n, like=g.output(0)))
    return [g.needs_grad(i) and g.unbroadcast(scaled, x) for i, x in enumerate(xs)]


def _variadic_extremum(g, cmp):
    xs, y, dy = g.inputs, g.output(0), g.grad_output(0)
    if len(xs) == 1:
        return [dy]
    masks = [g.op("Cast", g.op("Not", g.op(cmp, x, y)), to=g.dtype(y)) for x in xs]
    count = g.op("Sum", *masks)
    share = g.op("Div", dy, count)
    return [g.needs_grad(i) and g.unbroadcast(g.op("Mul", share, m), x)
            for i, (x, m) in enumerate(zip(xs, masks))]


@register_gradient("Max", smoothness=PIECEWISE,
                   lowering="X_i'=Y'*m_i/sum(m), m_i=[X_i==Y]: ties split evenly; summed over broadcast axes")
def max_grad(g):
    return _variadic_extremum(g, "Less")


@register_gradient("Min", smoothness=PIECEWISE,
                   lowering="X_i'=Y'*m_i/sum(m), m_i=[X_i==Y]: ties split evenly; summed over broadcast axes")
def min_grad(g):
    return _variadic_extremum(g, "Greater")
