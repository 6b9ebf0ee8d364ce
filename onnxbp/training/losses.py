"""Losses for training steps (the gradient rule of SoftmaxCrossEntropyLoss lives in
``onnxbp/rules/loss.py``).

The composite losses below (MSE, L1) use only ops that have rules in the core
(Sub, Relu, Neg, Reshape, MatMul of vectors, Div), so they need no reduction
rules: ``sum(d*d) = MatMul(flat(d), flat(d))``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..types import value_info_dims
from ..writer import GraphWriter, value_info

from .errors import DataError, TrainingError

LOSSES = ("cross_entropy", "lm_cross_entropy", "mse", "l1", "output")

#: The label both cross-entropy losses skip (torch's and transformers' default ``ignore_index``):
#: the mean is over the other labels, as in ``torch.nn.functional.cross_entropy``.
IGNORE_INDEX = -100


def add_loss(w: GraphWriter, kind: str, output: onnx.ValueInfoProto, target_name: str, loss_name: str):
    """Write the loss nodes with ``w``; return the target input ValueInfo (or None).

    ``kind``: ``cross_entropy`` (integer labels for (N, C[, d...]) scores), ``lm_cross_entropy``
    (token scores (N, T, V), class axis last as transformers' language models write them, and
    (N, T) next-token labels, already shifted: :func:`onnxbp.training.data.causal_lm_labels`),
    ``mse``, ``l1`` (float target of the output's shape) or ``output`` (the model's output already
    is the scalar loss).  Both cross-entropies skip labels equal to ``IGNORE_INDEX`` (-100).
    """
    dims = value_info_dims(output)
    elem = output.type.tensor_type.elem_type
    y = output.name
    if kind == "cross_entropy":
        if dims is None or len(dims) < 2 or not isinstance(dims[1], int):
            raise TrainingError(
                f"loss cross_entropy needs the model output {y!r} to be (N, C[, d...]) scores with a static "
                f"class count C, but its shape is {dims}; use --loss mse/l1 or fix the model")
        w.op("SoftmaxCrossEntropyLoss", y, target_name, out=loss_name, name="cross_entropy", reduction="mean",
             ignore_index=IGNORE_INDEX)
        label_dims = [dims[0]] + list(dims[2:])
        return value_info(target_name, TensorProto.INT64, label_dims)
    if kind == "lm_cross_entropy":
        if dims is None or len(dims) != 3 or not isinstance(dims[2], int):
            raise TrainingError(
                f"loss lm_cross_entropy needs the model output {y!r} to be (N, T, V) token scores with a static "
                f"vocabulary size V, but its shape is {dims}")
        scores = w.op("Transpose", y, name="lm_cross_entropy/classes_second", perm=[0, 2, 1])  # (N, V, T)
        w.op("SoftmaxCrossEntropyLoss", scores, target_name, out=loss_name, name="lm_cross_entropy",
             reduction="mean", ignore_index=IGNORE_INDEX)
        return value_info(target_name, TensorProto.INT64, list(dims[:2]))
    if kind in ("mse", "l1"):
        if dims is None:
            raise TrainingError(f"loss {kind} needs the rank of model output {y!r}; it is unknown")
        diff = w.op("Sub", y, target_name, name=f"{kind}/diff")
        flat = w.op("Reshape", diff, w.ints([-1]), name=f"{kind}/flatten")
        if kind == "mse":
            total = w.op("MatMul", flat, flat, name="mse/sum_of_squares")
        else:
            absd = w.op("Add", w.op("Relu", flat, name="l1/pos"),
                         w.op("Relu", w.op("Neg", flat, name="l1/neg"), name="l1/negpart"), name="l1/abs")
            ones = w.fill_like(flat, 1.0)
            total = w.op("MatMul", absd, ones, name="l1/sum")
        count = w.op("Cast", w.op("Size", diff, name=f"{kind}/size"), to=elem, name=f"{kind}/count")
        w.op("Div", total, count, out=loss_name, name=f"{kind}/mean")
        return value_info(target_name, elem, dims)
    if kind == "output":
        if dims is not None and not (len(dims) == 0 or (len(dims) == 1 and dims[0] == 1)):
            raise TrainingError(
                f"loss 'output' needs the model output {y!r} to be a scalar loss, but its shape is {dims}")
        w.op("Identity", y, out=loss_name, name="loss")
        return None
    raise TrainingError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def check_targets(kind: str, targets: np.ndarray, n_classes=None, what: str = "labels") -> None:
    """Validate targets for ``kind`` before training (raises :class:`DataError`)."""
    if kind in ("cross_entropy", "lm_cross_entropy"):
        if not np.issubdtype(targets.dtype, np.integer):
            if np.issubdtype(targets.dtype, np.floating) and np.all(np.isfinite(targets)) and \
                    np.all(targets == np.round(targets)):
                return check_targets(kind, targets.astype(np.int64), n_classes, what)
            raise DataError(f"{what}: cross_entropy needs integer class labels, got dtype {targets.dtype}")
        kept = targets[targets != IGNORE_INDEX]
        if kept.size and n_classes is not None:
            lo, hi = int(kept.min()), int(kept.max())
            if lo < 0 or hi >= n_classes:
                bad = lo if lo < 0 else hi
                raise DataError(f"{what}: label {bad} is out of range for a model with {n_classes} classes "
                                f"(labels must be in 0..{n_classes - 1}, or {IGNORE_INDEX} to be ignored)")
        elif kept.size and int(kept.min()) < 0:
            raise DataError(f"{what}: label {int(kept.min())} is negative (only {IGNORE_INDEX}, ignored, may be)")
    else:
        if not np.issubdtype(targets.dtype, np.floating):
            raise DataError(f"{what}: loss {kind} needs floating-point targets, got dtype {targets.dtype}")
        if not np.all(np.isfinite(targets)):
            raise DataError(f"{what}: contains NaN or infinite values")
