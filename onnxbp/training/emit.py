"""Graph plumbing for the training-step builder: emit plain nodes with fresh names.

The step builder post-processes the gradient model (loss, optimizer update,
running statistics).  Those nodes are not gradient rules, so they are built
here with ``onnx.helper``; every name comes from the model's
:class:`~onnxbp.naming.NameAuthority` so nothing collides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..naming import NameAuthority


class Emitter:
    """Append nodes to a list; each output gets a fresh, unique name."""

    def __init__(self, model: onnx.ModelProto, prefix: str):
        self.names = NameAuthority(model)
        self.prefix = prefix
        self.nodes: list = []
        self._consts: dict = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def op(self, op_type: str, *inputs: str, out: str = None, hint: str = None, n_out: int = 1,
           **attrs: Any):
        attrs = {k: v for k, v in attrs.items() if v is not None}
        base = f"{self.prefix}/{hint or op_type}"
        node_name = self.names.fresh(base)
        if n_out == 1:
            outs = [out if out is not None else self.names.fresh(f"{node_name}_out")]
        else:
            outs = [self.names.fresh(f"{node_name}_out{k}") for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name,
                                           doc_string=f"onnxbp.training: {self.prefix}", **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def const(self, value: Any, dtype=np.float32, hint: str = "const") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        name = self.names.fresh(f"{self.prefix}/{hint}")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                           value=numpy_helper.from_array(arr),
                                           doc_string=f"onnxbp.training: {self.prefix} constant"))
        self._consts[key] = name
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64).reshape(-1), dtype=np.int64, hint="ints")
