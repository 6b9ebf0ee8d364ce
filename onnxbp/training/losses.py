"""Losses for training steps (the gradient rule of SoftmaxCrossEntropyLoss lives in
``onnxbp/rules/loss.py``).

The composite losses below (MSE, L1) use only ops that have rules in the core
(Sub, Relu, Neg, Reshape, MatMul of vectors, Div), so they need no reduction
rules: ``sum(d*d) = MatMul(flat(d), flat(d))``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import DataError, TrainingError

LOSSES = ("cross_entropy", "mse", "l1", "output")


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
