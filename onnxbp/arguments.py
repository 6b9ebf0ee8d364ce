"""Checks of the public API's arguments: a wrong type is a typed one-line error, not a TypeError.

Each helper returns the argument in its normal form or raises the exception class the caller names
(a :class:`~onnxbp.errors.WrtError` for what to differentiate, an :class:`~onnxbp.errors.OptionError`
for settings), saying what was given and what is accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional


def _what(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def names(value: Any, what: str, error: type) -> list:
    """A tensor name or an iterable of names -> a list of names."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise error(f"{what} must be a tensor name or a list of names, got {_what(value)}")
    out = list(value)
    bad = next((v for v in out if not isinstance(v, str)), None)
    if bad is not None or any(not v for v in out):
        raise error(f"{what} must hold tensor names (non-empty strings), got {_what(bad if bad is not None else '')}")
    return out


def mapping(value: Any, what: str, error: type, values: Optional[type] = None) -> Optional[Mapping]:
    """None or a mapping (with keys of type str and, if given, values of type ``values``)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a dict, got {_what(value)}")
    for k, v in value.items():
        if not isinstance(k, str):
            raise error(f"{what} keys must be tensor names, got {_what(k)}")
        if values is not None and not isinstance(v, values):
            raise error(f"{what}[{k!r}] must be a {values.__name__}, got {_what(v)}")
    return value


def suffix(value: Any, error: type) -> str:
    if not isinstance(value, str) or not value:
        raise error(f"grad_suffix must be a non-empty string, got {_what(value)}")
    return value


def instance(value: Any, cls, what: str, error: type, hint: str = ""):
    """``value`` if it is an instance of ``cls`` (a class or a tuple of classes)."""
    if not isinstance(value, cls):
        classes = [c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,))]
        names_ = classes[0] if len(classes) == 1 else f"{', '.join(classes[:-1])} or {classes[-1]}"
        raise error(f"{what} must be an instance of {names_}{hint}, got {_what(value)}")
    return value
