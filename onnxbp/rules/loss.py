"""Loss ops: SoftmaxCrossEntropyLoss.

SoftmaxCrossEntropyLoss (opset >= 12), scores ``X`` of shape (N, C, d1..dk),
labels ``t`` of shape (N, d1..dk), optional class weights ``W`` (C)::

    log_prob = LogSoftmax(X, axis=1)
    l_i      = -w_i * log_prob[i, t_i]          w_i = W[t_i] (1 without W), 0 where t_i == ignore_index
    loss     = l                 (reduction none)
             = sum_i l_i         (sum)
             = sum_i l_i / sum_i w_i   (mean; the plain mean when neither W nor ignore_index)

so that, with ``p = softmax(X) = exp(log_prob)``,::

    dX[i, :] = s_i * w_i * (p[i, :] - onehot(t_i))

with ``s_i = dloss_i`` (none), ``dloss`` (sum) or ``dloss / sum_i w_i`` (mean).
This is the softmax + cross-entropy derivative of seed 002 (output layer:
delta = y_hat - y), weighted.  If the ``log_prob`` output is used downstream,
its gradient adds ``dlp - p * sum_c dlp`` (the LogSoftmax vector-Jacobian
product).  Labels and weights get no gradient.
"""

from __future__ import annotations

import numpy as np

from ..registry import SMOOTH, register_gradient


@register_gradient("SoftmaxCrossEntropyLoss", since=12, smoothness=SMOOTH, non_differentiable_inputs=(1, 2),
                   lowering="X'=s*w*(Exp(log_prob)-OneHot(labels)); s=dy, dy/sum(w) or per-element dy")
def softmax_cross_entropy_grad(g):
    x, labels = g.input(0), g.input(1)
    weights = g.input(2)
    reduction = g.attr("reduction", "mean")
    if reduction not in ("mean", "sum", "none"):
        g.fail(f"reduction={reduction!r}; supported: mean, sum, none")
    ignore = g.attr("ignore_index", None)
    c = g.static_shape(x, axes=[1])[1]
    rank = g.rank(x)
    dloss, dlogp = g.grad_output(0), g.grad_output(1)
    logp = g.forward_output(1)
    prob = g.op("Exp", logp)
    grads = []
    if dloss is not None:
        safe = labels
        ignored = None
        if ignore is not None:
            ignored = g.op("Equal", labels, g.const(ignore, like=labels))
            safe = g.op("Where", ignored, g.const(0, like=labels), labels)
        # depth as a scalar: the spec also allows a 1-element tensor, but not every runtime does
        onehot = g.op("OneHot", safe, g.const(c, dtype=np.int64), g.const([0.0, 1.0], like=x), axis=1)
        diff = g.op("Sub", prob, onehot)
        w = None
        if weights is not None:
            w = g.op("Gather", weights, safe, axis=0)
        if ignored is not None:
            zero = g.const(0.0, like=x)
            w = g.op("Where", ignored, zero, w if w is not None
                     else g.op("Cast", g.op("Not", ignored), to=g.dtype(x)))
        if reduction == "none":
            s = dloss if w is None else g.op("Mul", dloss, w)
            grad = g.op("Mul", diff, g.unsqueeze(s, [1]))
        else:
            if w is not None:
                diff = g.op("Mul", diff, g.unsqueeze(w, [1]))
            s = dloss
            if reduction == "mean":
                if w is not None:
                    denom = g.reduce_sum(w, list(range(rank - 1)), keepdims=False)
                else:
                    denom = g.op("Cast", g.op("Size", labels), to=g.dtype(x))
                s = g.op("Div", s, denom)
            grad = g.op("Mul", diff, s)
        grads.append(grad)
    if dlogp is not None:
        total = g.reduce_sum(dlogp, [1], keepdims=True)
        grads.append(g.op("Sub", dlogp, g.op("Mul", prob, total)))
    return [g.add_n(grads), None, None]
