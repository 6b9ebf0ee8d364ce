"""Training graphs that train with plain onnxruntime.

>>> from onnxbp.training import Trainer, AdamW
>>> trainer = Trainer("models/mlp.onnx", loss="cross_entropy", optimizer=AdamW())  # doctest: +SKIP
>>> loss = trainer.train_step(x_batch, y_batch, lr=1e-3)                            # doctest: +SKIP
>>> trainer.export("trained.onnx")                                                   # doctest: +SKIP

:func:`build_step_model` writes forward + loss + backward + optimizer update
as ONE graph of standard ops; :class:`Trainer` runs it step after step with
the parameters kept in OrtValues (IOBinding).
"""

from __future__ import annotations

from . import losses  # noqa: F401  (registers the SoftmaxCrossEntropyLoss gradient rule)
from .errors import DataError, TrainingError
from .optimizers import SGD, Adam, AdamW, make_optimizer
from .step import StepModel, StepSpec, build_step_model
from .trainer import Trainer, export_model

__all__ = ["Trainer", "build_step_model", "StepModel", "StepSpec", "SGD", "Adam", "AdamW",
           "make_optimizer", "TrainingError", "DataError", "export_model"]
