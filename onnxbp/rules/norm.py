"""Normalization layers, LRN and Dropout.

Normalization over a set of axes ``A`` (BatchNormalization in training mode:
batch and spatial axes; InstanceNormalization: spatial axes;
LayerNormalization: the trailing axes from ``axis``)::

    mu = mean_A(X),  var = mean_A((X - mu)^2),  inv = 1 / sqrt(var + eps)
    x^ = (X - mu) * inv,  Y = scale * x^ + B

Backward, with ``X^' = Y' * scale`` and means over ``A`` (the chain rule
through mu and var; the same bookkeeping the seeds use for the linear layer,
seed 000/001 section 1 and seed 002 section 2.2, where a parameter broadcast
over axes gets the output gradient summed over them)::

    X'     = inv * (X^' - mean_A(X^') - x^ * mean_A(X^' * x^))
    scale' = sum over the broadcast axes of Y' * x^
    B'     = sum over the broadcast axes of Y'

BatchNormalization in inference mode uses the given mean/var instead of
batch statistics, so it is an affine map of X::

    X' = Y' * scale * inv,  mean' = -sum(Y') * scale * inv,
    var' = -1/2 * sum(Y' * (X - mean)) * scale * inv^3

In training mode the running_mean/running_var outputs are treated as
statistics, not as differentiable functions of X (as in PyTorch, where they
are buffers updated without autograd): no gradient flows from them into X,
scale or B.  Their exact dependence on input_mean/input_var,
``running = momentum * input + (1 - momentum) * batch``, gives
``input_mean' = momentum * running_mean'`` (likewise var), and exactly zero when
nothing downstream uses running_mean (Y does not depend on input_mean then).

GroupNormalization normalizes over each sample's group of channels (the
group view ``Reshape(X, (N, G, -1))``), RMSNormalization divides by the root
mean square without centring (docstrings of their rules).

LRN (``D = bias + alpha/size * window_sum_c(X^2)``, ``Y = X * D^-beta``)::

    X' = Y' * D^-beta - (2 alpha beta / size) * X * window_sum^T(Y' * X * D^(-beta-1))

where ``window_sum^T`` sums over the mirrored channel window.

Dropout in training mode is ``Y = X * mask / (1 - ratio)``, so
``X' = Where(mask, Y' / (1 - ratio), 0)`` with the mask the forward produced
(``g.forward_output(1)`` adds the output if the model omitted it).
"""

from __future__ import annotations

import numpy as np

from ..registry import LINEAR, SMOOTH, register_gradient


# ---------------------------------------------------------------- helpers
def _channel(g, p, rank):
    """A per-channel (C,) tensor reshaped to broadcast against (N, C, ...)."""
    return g.unsqueeze(p, [0] + list(range(2, rank)))


def _normalized_backward(g, dxhat, xhat, inv, axes):
    """inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over ``axes``."""
    m1 = g.reduce_mean(dxhat, axes)
    m2 = g.reduce_mean(g.op("Mul", dxhat, xhat), axes)
    inner = g.op("Sub", g.op("Sub", dxhat, m1), g.op("Mul", xhat, m2))
    return g.op("Mul", inv, inner)


def _stats(g, x, axes, eps):
    """(x - mu, inv, x^) over ``axes``, recomputed in x's dtype."""
    mu = g.reduce_mean(x, axes)
    xc = g.op("Sub", x, mu)
    var = g.reduce_mean(g.op("Mul", xc, xc), axes)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, like=x))))
    return xc, inv, g.op("Mul", xc, inv)


# ---------------------------------------------------------------- BatchNormalization
def _bn_training(g) -> bool:
    if g.opset >= 14:
        return bool(g.attr("training_mode", 0))
    if g.opset >= 7:  # training mode iff the optional outputs are present
        return any(g.output(i) for i in range(1, len(g.outputs)))
    return not g.attr("is_test", 0)


def batch_moments(w, x: str, red, shape, scale: str) -> tuple:
    """(mu with kept dims, xc = X - mu, per-channel biased variance (C,), count n) of a
    training-mode BatchNormalization input ``x`` over axes ``red``.

    The BN backward and the training step's running-statistics stage both call this, so that
    ``optimize.eliminate_common_subexpressions`` computes the moments once.  ``n`` (the number of
    reduced elements per channel) is a constant where ``shape``'s reduced dims are static, else
    ``Size(X) / Size(scale)`` at run time.  ``ReduceSumSquare`` writes no squared copy of ``xc``.
    """
    mu = w.reduce_mean(x, red)
    xc = w.op("Sub", x, mu)
    dims = [shape[a] for a in red] if shape is not None else [None]
    if all(isinstance(d, int) for d in dims):
        n = w.const(float(np.prod(dims)), like=x)
    else:
        n = w.op("Div", w.op("Cast", w.op("Size", x), to=w.dtype(x)), w.op("Cast", w.op("Size", scale), to=w.dtype(x)))
    var = w.op("Div", w.reduce_sum_square(xc, red, keepdims=False), n)
    return mu, xc, var, n


def _bn_training_backward(g, x, scale, dy, red, eps):
    """(X', scale', B') of training-mode BatchNormalization, per-channel sums shared.

    The module docstring's formula with ``X^' = Y' * scale`` and ``x^ = xc * inv``
    (``xc = X - mu``) regrouped so that only two per-channel sums of full
    tensors are needed, ``S1 = sum(Y')`` and ``S2 = sum(Y' * xc)`` (the same
    grouping as PyTorch's batch_norm_backward), and so that X' is one
    per-channel scaling of Y' minus one per-channel affine map of xc::

        B'     = S1
        scale' = S2 * inv
        X'     = Y' * a - (xc * (a * inv^2 * S2/n) + a * S1/n),   a = scale * inv

    The per-channel arithmetic runs on (C,) vectors (onnxruntime's broadcast of a
    rank-0 scalar against a (1, C, 1, 1) tensor is 4x slower than on (C,)), and
    the affine map of xc is one inference-mode BatchNormalization of X with the
    batch mean and variance (scale ``a * inv * S2/n``, bias ``a * S1/n``, the
    forward's epsilon; a Mul and an Add before opset 9 and for ``target="portable"``:
    tract 0.23 runs a BatchNormalization only with constant parameters).  Full-size tensors
    written: xc, Y' * xc, Y' * a, the affine map and X' (seven before: the
    squared xc, three partial sums and X').
    """
    rank = g.rank(x)
    want_x, want_s, want_b = (g.needs_grad(i) for i in range(3))
    mu, xc, var, n = batch_moments(g, x, red, g.shape(x), scale)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, like=x))))  # (C,)
    s1 = g.reduce_sum(dy, red, keepdims=False) if (want_x or want_b) else None
    s2 = g.reduce_sum(g.op("Mul", dy, xc), red, keepdims=False) if (want_x or want_s) else None
    dx = None
    if want_x:
        a = g.op("Mul", scale, inv)
        s2n = g.op("Div", s2, n)
        c = g.op("Mul", a, g.op("Div", s1, n))
        if g.opset >= 9 and g.option("target") != "portable":
            # (X - mu) / sqrt(var + eps) * (a * inv * S2/n) + c = xc * b + c: every input a run-time
            # tensor (a constant mean or variance could share its buffer with a training-mode BN's
            # running statistics, which onnxruntime overwrites in place); tract wants them constant
            affine = g.op("BatchNormalization", x, g.op("Mul", g.op("Mul", a, inv), s2n), c,
                          g.squeeze(mu, red), var, epsilon=eps)
        else:
            b = g.op("Mul", a, g.op("Mul", g.op("Mul", inv, inv), s2n))
            affine = g.op("Add", g.op("Mul", xc, _channel(g, b, rank)), _channel(g, c, rank))
        dx = g.op("Sub", g.op("Mul", dy, _channel(g, a, rank)), affine)
    ds = g.op("Mul", s2, inv) if want_s else None
    return dx, ds, (s1 if want_b else None)


@register_gradient("BatchNormalization", smoothness=SMOOTH, state_inputs=(3, 4),
                   lowering="inference: affine in X (X'=Y'*scale/sqrt(var+eps)); training: full backward "
                            "through the batch mean and variance; running stats not differentiated")
def batch_norm_grad(g):
    x, scale, bias, mean, var = (g.input(i) for i in range(5))
    dy = g.grad_output(0)
    rank = g.rank(x)
    if rank < 2:
        g.fail("BatchNormalization needs an input of rank >= 2 (N, C, ...)")
    if g.opset < 9 and not g.attr("spatial", 1):
        g.fail("BatchNormalization with spatial=0 is not supported; only spatial=1")
    eps = float(g.attr("epsilon", 1e-5))
    sp = list(range(2, rank))
    red = [0] + sp
    out = [None] * 5
    if _bn_training(g):
        if dy is not None:
            out[0], out[1], out[2] = _bn_training_backward(g, x, scale, dy, red, eps)
        for i, k in ((3, 1), (4, 2)):
            if g.needs_grad(i):
                # Y does not depend on input_mean/var in training mode; running = momentum * input + ...
                d = g.grad_output(k)
                out[i] = (g.op("Mul", d, g.const(float(g.attr("momentum", 0.9)), like=mean)) if d is not None
                          else g.zeros_like(g.input(i)))
        if g.needs_grad(0) and out[0] is None:
            g.fail("in training mode X reaches the outputs only through running_mean/running_var, which "
                   "are not differentiated; request gradients of Y's inputs through Y")
        for i in (1, 2):  # scale and B do not enter running_mean/running_var: exactly zero
            if g.needs_grad(i) and out[i] is None:
                out[i] = g.zeros_like(g.input(i))
        return out
    if dy is None:
        g.fail("only output Y is differentiated in inference mode")
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, like=var))))
    sinv = g.op("Mul", scale, inv)
    if g.needs_grad(0):
        out[0] = g.op("Mul", dy, _channel(g, sinv, rank))
    sdy = g.reduce_sum(dy, red, keepdims=False)
    if g.needs_grad(1) or g.needs_grad(4):
        xc = g.op("Sub", x, _channel(g, mean, rank))
        sdyxc = g.reduce_sum(g.op("Mul", dy, xc), red, keepdims=False)
        if g.needs_grad(1):
            out[1] = g.op("Mul", sdyxc, inv)
        if g.needs_grad(4):
            inv3 = g.op("Mul", inv, g.op("Mul", inv, inv))
            out[4] = g.op("Mul", g.op("Mul", sdyxc, g.op("Mul", scale, inv3)), g.const(-0.5, like=var))
    if g.needs_grad(2):
        out[2] = sdy
    if g.needs_grad(3):
        out[3] = g.op("Neg", g.op("Mul", sdy, sinv))
    return out


# ---------------------------------------------------------------- Layer / Instance
@register_gradient("LayerNormalization", since=17, smoothness=SMOOTH,
                   lowering="X'=inv*(X^'-mean(X^')-x^*mean(X^'*x^)) over the normalized axes; "
                            "Scale'/B' summed over leading axes; Mean/InvStdDev outputs differentiated too")
def layer_norm_grad(g):
    x, scale = g.input(0), g.input(1)
    b = g.input(2)
    rank = g.rank(x)
    axis = g.attr("axis", -1)
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(g.attr("epsilon", 1e-5))
    dy = g.grad_output(0)
    _, inv, xhat = _stats(g, x, axes, eps)
    out = [None, None, None]
    if g.needs_grad(0):
        parts = []
        if dy is not None:
            parts.append(_normalized_backward(g, g.op("Mul", dy, scale), xhat, inv, axes))
        d_mean, d_inv = g.grad_output(1), g.grad_output(2)
        if d_mean is not None or d_inv is not None:
            shape = g.static_shape(x, axes=axes)
            m = float(np.prod([shape[a] for a in axes]))
            if d_mean is not None:  # Mean = mean(X): X' += Mean'/M
                d_mean = _cast_like(g, d_mean, g.output(1), x)
                parts.append(g.op("Expand", g.op("Mul", d_mean, g.const(1.0 / m, like=x)), g.op("Shape", x)))
            if d_inv is not None:  # InvStdDev = (var+eps)^-1/2: X' += -InvStdDev' * inv^2 * x^ / M
                d_inv = _cast_like(g, d_inv, g.output(2), x)
                coef = g.op("Mul", g.op("Mul", d_inv, g.op("Mul", inv, inv)), g.const(-1.0 / m, like=x))
                parts.append(g.op("Mul", coef, xhat))
        out[0] = g.add_n(parts)
    if g.needs_grad(1):
        if dy is None:
            g.fail("Scale reaches the outputs only through Mean/InvStdDev, which do not depend on it")
        out[1] = g.unbroadcast(g.op("Mul", dy, xhat), scale, grad_shape=x)
    if b is not None and g.needs_grad(2):
        if dy is None:
            g.fail("B reaches the outputs only through Mean/InvStdDev, which do not depend on it")
        out[2] = g.unbroadcast(dy, b, grad_shape=x)
    return out


def _cast_like(g, t, t_src, like):
    if g.dtype(t_src) and g.dtype(t_src) != g.dtype(like):
        return g.op("Cast", t, to=g.dtype(like))
    return t


@register_gradient("InstanceNormalization", smoothness=SMOOTH,
                   lowering="X'=inv*(X^'-mean(X^')-x^*mean(X^'*x^)) over spatial axes; "
                            "scale'=sum(Y'*x^), B'=sum(Y') over N and spatial axes")
def instance_norm_grad(g):
    x, scale = g.input(0), g.input(1)
    dy = g.grad_output(0)
    rank = g.rank(x)
    if rank < 3:
        g.fail("InstanceNormalization needs an input of rank >= 3 (N, C, spatial...)")
    sp = list(range(2, rank))
    eps = float(g.attr("epsilon", 1e-5))
    _, inv, xhat = _stats(g, x, sp, eps)
    out = [None, None, None]
    if g.needs_grad(0):
        out[0] = _normalized_backward(g, g.op("Mul", dy, _channel(g, scale, rank)), xhat, inv, sp)
    if g.needs_grad(1):
        out[1] = g.reduce_sum(g.op("Mul", dy, xhat), [0] + sp, keepdims=False)
    if g.needs_grad(2):
        out[2] = g.reduce_sum(dy, [0] + sp, keepdims=False)
    return out


# ---------------------------------------------------------------- Group / RMS
@register_gradient("GroupNormalization", since=21, smoothness=SMOOTH,
                   lowering="X'=inv*(X^'-mean(X^')-x^*mean(X^'*x^)) per (n, group) on Reshape(X, (N, G, -1)); "
                            "scale'/bias' (per channel) summed over N and spatial axes")
def group_norm_grad(g):
    """``G = num_groups`` groups of ``C/G`` channels; statistics per sample and group.

    With ``Xg = Reshape(X, (N, G, -1))`` (a group's channels and spatial positions on the last
    axis), ``mu``, ``var``, ``inv`` and ``x^ = (Xg - mu) * inv`` are taken over that axis, and
    ``Y = scale * x^ + bias`` with ``scale``/``bias`` of shape ``(C,)`` broadcast over
    ``(N, C, spatial...)``.  The backward is the module docstring's normalization backward on the
    group view::

        X^' = Y' * scale,   Xg' = inv * (X^' - mean(X^') - x^ * mean(X^' * x^))
        scale' = sum_{n, spatial} Y' * x^,   bias' = sum_{n, spatial} Y'

    ``stash_type`` only selects the precision of the forward's statistics; the backward
    recomputes them in X's type.  Opsets 18-20 (scale and bias per group) are not covered: onnx
    1.23's checker refuses that version as deprecated, so such a model does not load.
    """
    x, scale = g.input(0), g.input(1)
    dy = g.grad_output(0)
    rank = g.rank(x)
    if rank < 3:
        g.fail("GroupNormalization needs an input of rank >= 3 (N, C, spatial...)")
    groups = int(g.attr("num_groups"))
    eps = float(g.attr("epsilon", 1e-5))
    channels, per = (g.shape(x) or [None, None])[1], (g.shape(scale) or [None])[0]
    if isinstance(channels, int) and isinstance(per, int) and per != channels:
        g.fail(f"scale has {per} values but opset {g.opset} takes one per channel ({channels}); opsets 18-20 "
               f"took one per group")
    view = g.ints([0, groups, -1])
    _, inv, xhat = _stats(g, g.op("Reshape", x, view), [2], eps)
    red = [0] + list(range(2, rank))
    out = [None, None, None]
    if g.needs_grad(0):
        dxhat = g.op("Reshape", g.op("Mul", dy, _channel(g, scale, rank)), view)
        out[0] = g.op("Reshape", _normalized_backward(g, dxhat, xhat, inv, [2]), g.op("Shape", x))
    if g.needs_grad(1):
        xhat_full = g.op("Reshape", xhat, g.op("Shape", x))
        out[1] = g.reduce_sum(g.op("Mul", dy, xhat_full), red, keepdims=False)
    if g.needs_grad(2):
        out[2] = g.reduce_sum(dy, red, keepdims=False)
    return out


@register_gradient("RMSNormalization", since=23, smoothness=SMOOTH,
                   lowering="X'=r*(X^'-x^*mean(X^'*x^)) over the normalized axes, r=1/sqrt(mean(X^2)+eps), "
                            "x^=X*r, X^'=Y'*scale; scale' summed over the leading axes")
def rms_norm_grad(g):
    """``Y = X * r * scale``, ``r = (mean_A(X^2) + eps)^(-1/2)`` over the axes ``A = axis..rank-1``.

    ``dr/dX_j = -r^3 X_j / M`` (``M`` elements in ``A``), so with ``x^ = X r`` and ``X^' = Y' * scale``::

        X' = r * (X^' - x^ * mean_A(X^' * x^))
        scale' = Y' * x^ summed over the axes ``scale`` was broadcast along

    (LayerNormalization's backward without the mean terms).  ``stash_type`` selects the forward's
    precision only; the backward computes in X's type.
    """
    x, scale = g.input(0), g.input(1)
    dy = g.grad_output(0)
    rank = g.rank(x)
    axis = int(g.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        g.fail(f"axis={g.attr('axis', -1)} is out of range for an input of rank {rank}")
    axes = list(range(axis, rank))
    eps = float(g.attr("epsilon", 1e-5))
    ms = g.reduce_mean(g.op("Mul", x, x), axes)
    r = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(eps, like=x))))
    xhat = g.op("Mul", x, r)
    out = [None, None]
    if g.needs_grad(0):
        dxhat = g.op("Mul", dy, scale)
        m = g.reduce_mean(g.op("Mul", dxhat, xhat), axes)
        out[0] = g.op("Mul", r, g.op("Sub", dxhat, g.op("Mul", xhat, m)))
    if g.needs_grad(1):
        out[1] = g.unbroadcast(g.op("Mul", dy, xhat), scale, grad_shape=x)
    return out


# ---------------------------------------------------------------- LRN
def _window_sum(g, t, like, channels, rank, before, after, size):
    """sum_{k=0}^{size-1} Pad(t, channel pads (before, after))[:, c + k]."""
    pads = [0] * (2 * rank)
    pads[1], pads[rank + 1] = before, after
    if g.opset >= 11:
        p = g.op("Pad", t, g.ints(pads), g.const(0.0, like=like))
    else:
        p = g.op("Pad", t, pads=pads, value=0.0)
    if size == 1:
        return p
    return g.add_n([g.slice(p, [k], [k + channels], [1]) for k in range(size)])


@register_gradient("LRN", smoothness=SMOOTH,
                   lowering="X'=Y'*D^-beta - 2*alpha*beta/size * X * window_sum^T(Y'*X*D^(-beta-1)), "
                            "D=bias+alpha/size*window_sum(X^2)")
def lrn_grad(g):
    x = g.input(0)
    dy = g.grad_output(0)
    rank = g.rank(x)
    channels = g.static_shape(x, axes=[1])[1]
    size = int(g.attr("size"))
    alpha = float(g.attr("alpha", 1e-4))
    beta = float(g.attr("beta", 0.75))
    bias = float(g.attr("bias", 1.0))
    # ONNX: square_sum[c] sums channels max(0, c - lo) .. min(C-1, c + hi).
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    s = _window_sum(g, g.op("Mul", x, x), x, channels, rank, lo, hi, size)
    d = g.op("Add", g.op("Mul", s, g.const(alpha / size, like=x)), g.const(bias, like=x))
    d_mb = g.op("Pow", d, g.const(-beta, like=x))
    t = g.op("Div", g.op("Mul", g.op("Mul", dy, x), d_mb), d)
    back = _window_sum(g, t, x, channels, rank, hi, lo, size)  # the transposed (mirrored) window
    corr = g.op("Mul", g.op("Mul", x, back), g.const(2.0 * alpha * beta / size, like=x))
    return [g.op("Sub", g.op("Mul", dy, d_mb), corr)]


# ---------------------------------------------------------------- Dropout
@register_gradient("Dropout", smoothness=LINEAR, non_differentiable_inputs=(1, 2),
                   lowering="inference: X'=Y'; training: X'=Where(mask, Y'/(1-ratio), 0) with the "
                            "forward's mask output")
def dropout_grad(g):
    x = g.input(0)
    dy = g.grad_output(0)
    if g.opset < 7:
        if g.attr("is_test", 0):
            return [dy]
        # Opsets < 7 have no Where: the mask output has X's float type, so multiply by it.
        scale = g.const(1.0 / (1.0 - float(g.attr("ratio", 0.5))), like=x)
        return [g.op("Mul", g.op("Mul", dy, g.op("Cast", g.forward_output(1), to=g.dtype(x))), scale)]
    if g.opset < 12:  # no training mode in opsets 7..11: Dropout is the identity
        return [dy]
    tm_name = g.input(2)
    if tm_name is None:
        return [dy, None, None]
    tm = g.constant_value(tm_name)
    if tm is not None and not bool(np.asarray(tm).reshape(-1)[0]):
        return [dy, None, None]
    ratio_name = g.input(1)
    ratio = 0.5 if ratio_name is None else g.constant_value(ratio_name)
    if ratio is not None:
        scale = g.const(1.0 / (1.0 - float(np.asarray(ratio).reshape(-1)[0])), like=x)
    else:
        r = g.op("Cast", ratio_name, to=g.dtype(x))
        scale = g.op("Reciprocal", g.op("Sub", g.const(1.0, like=x), r))
    if tm is None:  # decided at run time; in inference the mask is all true
        scale = g.op("Where", tm_name, scale, g.const(1.0, like=x))
    return [_masked(g, x, dy, g.forward_output(1), scale), None, None]


def _masked(g, x, dy, mask, scale):
    return g.select(mask, g.op("Mul", dy, scale), like=x)
