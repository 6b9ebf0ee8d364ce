"""onnxbp: gradients of ONNX models as plain, standard ONNX ops.

>>> import onnxbp
>>> grad_model = onnxbp.gradient("models/mlp.onnx")          # doctest: +SKIP
>>> report = onnxbp.check_gradients("models/mlp.onnx")       # doctest: +SKIP
>>> bw = onnxbp.backward(loss_model, seeds=["loss"])          # doctest: +SKIP
>>> bw.gradients                                              # doctest: +SKIP
"""

from __future__ import annotations

import logging

from . import rules  # noqa: F401  (registers the built-in rules)
from . import controlflow  # noqa: F401  (registers the If rule)
from .context import GradContext
from .checker import CheckReport, GradCheck, check_gradients
from .engine import Backward, backward, gradient
from .errors import (
    InternalError,
    MemoryLimitError,
    ModelLoadError,
    NameCollisionError,
    NotDifferentiableError,
    OnnxbpError,
    OptionError,
    OutputPathError,
    RuleRegistrationError,
    ShapeError,
    UnsupportedAttributeError,
    UnsupportedOpError,
    WrtError,
)
from .modelio import load_model, save_model_atomic
from .second_order import check_second_order, gradient_penalty, hvp
from .registry import REGISTRY, Registry, no_gradient, not_differentiable, register_gradient
from .types import TensorInfo
from .writer import GraphWriter

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "gradient", "backward", "Backward", "hvp", "gradient_penalty", "check_second_order", "GraphWriter", "check_gradients", "register_gradient", "no_gradient", "not_differentiable",
    "REGISTRY", "Registry", "GradContext", "TensorInfo", "CheckReport", "GradCheck",
    "load_model", "save_model_atomic",
    "OnnxbpError", "ModelLoadError", "OutputPathError", "WrtError", "UnsupportedOpError",
    "NotDifferentiableError", "UnsupportedAttributeError", "ShapeError", "RuleRegistrationError",
    "NameCollisionError", "InternalError", "MemoryLimitError", "OptionError",
]
