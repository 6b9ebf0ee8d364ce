"""Types shared by every layer: what shape inference knows of a tensor, dtype helpers.

Nothing here imports another onnxbp module, so any module may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx
from onnx import helper

Dim = Union[int, str, None]

FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
})

_TYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows of a tensor: element type and dims."""

    elem_type: int = 0
    shape: Optional[tuple] = None  # None: rank unknown; dims int | str (symbolic) | None

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


def np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def type_name(elem_type: int) -> str:
    """``FLOAT``, ``INT64``, ... for messages."""
    return _TYPE_NAMES.get(elem_type, str(elem_type))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def value_info_dims(vi: onnx.ValueInfoProto) -> Optional[list]:
    """Dims of a tensor ValueInfo (int, symbolic name or None each); None if it has no shape."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
