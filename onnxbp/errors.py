"""Typed exceptions.  Every message is one line that names what is wrong
(node, op, attribute, tensor or file) and what is supported instead.

The CLI prints ``str(exc)`` of any :class:`OnnxbpError` as a single line and
exits non-zero; tests assert on that text.
"""

from __future__ import annotations


class OnnxbpError(Exception):
    """Base class of every error onnxbp raises on purpose."""

    def __init__(self, message: str):
        # Keep messages to one line: the CLI prints them verbatim.
        super().__init__(" ".join(str(message).split()))


class ModelLoadError(OnnxbpError):
    """The file is missing, not ONNX, truncated, or the model fails the checker."""


class OutputPathError(OnnxbpError):
    """The output path is unusable (e.g. equal to the input path)."""


class WrtError(OnnxbpError):
    """A requested ``wrt`` name is not in the graph or is not floating-point."""


class UnsupportedOpError(OnnxbpError):
    """A requested gradient needs an op that has no registered rule."""


class NotDifferentiableError(OnnxbpError):
    """A requested gradient must pass through an op or tensor that has no gradient."""


class UnsupportedAttributeError(OnnxbpError):
    """A rule exists for the op, but not for this attribute value or input combination."""


class ShapeError(OnnxbpError):
    """A rule needs a shape (or rank) that stays unknown after shape inference."""


class RuleRegistrationError(OnnxbpError):
    """A gradient rule was registered twice (without ``override=True``) or malformed."""


class NameCollisionError(OnnxbpError):
    """A public name the contract fixes (``<Y>_grad``, ``<p>_grad``) already exists in the model."""


class InternalError(OnnxbpError):
    """onnxbp produced a graph that fails the ONNX checker: a bug, please report it."""


class MemoryLimitError(OnnxbpError):
    """The job would need more memory than the machine has available; nothing was written."""


class OptionError(OnnxbpError):
    """An unknown option, or a value outside its choices."""
