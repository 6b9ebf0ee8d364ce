"""Errors of the training package (one line each, like every onnxbp error)."""

from __future__ import annotations

from ..errors import OnnxbpError


class TrainingError(OnnxbpError):
    """The training step cannot be built or run as asked (loss, optimizer, parameters, checkpoint)."""


class DataError(OnnxbpError):
    """The training data does not fit the model or the loss (shapes, labels, NaN)."""
