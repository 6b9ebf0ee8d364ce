"""Losses for training steps, and the gradient rule of SoftmaxCrossEntropyLoss.

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

The composite losses below (MSE, L1) use only ops that have rules in the core
(Sub, Relu, Neg, Reshape, MatMul of vectors, Div), so they need no reduction
rules: ``sum(d*d) = MatMul(flat(d), flat(d))``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..registry import SMOOTH, register_gradient
from .errors import DataError, TrainingError

LOSSES = ("cross_entropy", "mse", "l1", "output")


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
        onehot = g.op("OneHot", safe, g.ints([c]), g.const([0.0, 1.0], like=x), axis=1)
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


def _dims(vi: onnx.ValueInfoProto):
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def add_loss(em, kind: str, output: onnx.ValueInfoProto, target_name: str, loss_name: str):
    """Append the loss nodes to emitter ``em``; return the target input ValueInfo (or None).

    ``kind``: ``cross_entropy`` (integer labels), ``mse``, ``l1`` (float target of the output's
    shape) or ``output`` (the model's output already is the scalar loss).
    """
    dims = _dims(output)
    elem = output.type.tensor_type.elem_type
    y = output.name
    if kind == "cross_entropy":
        if dims is None or len(dims) < 2 or not isinstance(dims[1], int):
            raise TrainingError(
                f"loss cross_entropy needs the model output {y!r} to be (N, C[, d...]) scores with a static "
                f"class count C, but its shape is {dims}; use --loss mse/l1 or fix the model")
        em.op("SoftmaxCrossEntropyLoss", y, target_name, out=loss_name, hint="cross_entropy", reduction="mean")
        label_dims = [dims[0]] + list(dims[2:])
        return helper.make_tensor_value_info(target_name, TensorProto.INT64, label_dims)
    if kind in ("mse", "l1"):
        if dims is None:
            raise TrainingError(f"loss {kind} needs the rank of model output {y!r}; it is unknown")
        diff = em.op("Sub", y, target_name, hint=f"{kind}/diff")
        flat = em.op("Reshape", diff, em.ints([-1]), hint=f"{kind}/flatten")
        if kind == "mse":
            total = em.op("MatMul", flat, flat, hint="mse/sum_of_squares")
        else:
            absd = em.op("Add", em.op("Relu", flat, hint="l1/pos"),
                         em.op("Relu", em.op("Neg", flat, hint="l1/neg"), hint="l1/negpart"), hint="l1/abs")
            ones = em.op("ConstantOfShape", em.op("Shape", flat, hint="l1/shape"),
                         value=onnx.numpy_helper.from_array(
                             np.ones(1, helper.tensor_dtype_to_np_dtype(elem))), hint="l1/ones")
            total = em.op("MatMul", absd, ones, hint="l1/sum")
        count = em.op("Cast", em.op("Size", diff, hint=f"{kind}/size"), to=elem, hint=f"{kind}/count")
        em.op("Div", total, count, out=loss_name, hint=f"{kind}/mean")
        return helper.make_tensor_value_info(target_name, elem, dims)
    if kind == "output":
        if dims is not None and not (len(dims) == 0 or (len(dims) == 1 and dims[0] == 1)):
            raise TrainingError(
                f"loss 'output' needs the model output {y!r} to be a scalar loss, but its shape is {dims}")
        em.op("Identity", y, out=loss_name, hint="loss")
        return None
    raise TrainingError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def check_targets(kind: str, targets: np.ndarray, n_classes=None, what: str = "labels") -> None:
    """Validate targets for ``kind`` before training (raises :class:`DataError`)."""
    if kind == "cross_entropy":
        if not np.issubdtype(targets.dtype, np.integer):
            if np.issubdtype(targets.dtype, np.floating) and np.all(np.isfinite(targets)) and \
                    np.all(targets == np.round(targets)):
                return check_targets(kind, targets.astype(np.int64), n_classes, what)
            raise DataError(f"{what}: cross_entropy needs integer class labels, got dtype {targets.dtype}")
        if targets.size and n_classes is not None:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= n_classes:
                bad = lo if lo < 0 else hi
                raise DataError(f"{what}: label {bad} is out of range for a model with {n_classes} classes "
                                f"(labels must be in 0..{n_classes - 1})")
    else:
        if not np.issubdtype(targets.dtype, np.floating):
            raise DataError(f"{what}: loss {kind} needs floating-point targets, got dtype {targets.dtype}")
        if not np.all(np.isfinite(targets)):
            raise DataError(f"{what}: contains NaN or infinite values")
