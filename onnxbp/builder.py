"""The small vocabulary a gradient rule speaks.

A rule receives a :class:`GradContext` ``g`` for one forward node and returns
the gradients of its inputs (a list aligned with ``node.input``, ``None`` where
no gradient is produced; or a dict ``{input_index: name}``)::

    @register_gradient("Mul", smoothness="linear")
    def mul_grad(g):
        a, b = g.inputs
        dy = g.grad_output(0)
        return [g.needs_grad(0) and g.unbroadcast(g.op("Mul", dy, b), a),
                g.needs_grad(1) and g.unbroadcast(g.op("Mul", dy, a), b)]

Reading: ``g.inputs``, ``g.outputs``, ``g.input(i)``, ``g.output(i)``,
``g.grad_output(i)``, ``g.needs_grad(i)``, ``g.attr(name, default)``,
``g.shape(t)``, ``g.static_shape(t)``, ``g.rank(t)``, ``g.dtype(t)``,
``g.opset``, ``g.option(name)``.

Emitting: ``g.op(op_type, *inputs, **attrs)`` returns the new output name(s);
``g.const(value, like=t)``, ``g.ints([...])``; opset-aware helpers
``g.reduce_sum``, ``g.squeeze``, ``g.unsqueeze``, ``g.slice``, ``g.pad``;
``g.unbroadcast(grad, target)``; ``g.forward_output(i)`` to obtain (adding
if the model omitted it) an optional output of the forward node.

Rules never touch protobuf: every node goes through ``g.op``, which names it
from the one :class:`~onnxbp.naming.NameAuthority` and tags it with a
doc_string naming the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InternalError, ShapeError, UnsupportedAttributeError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import _Builder
    from .registry import RuleEntry

Dim = Union[int, str, None]

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


@dataclass(frozen=True)
class TensorInfo:
    """What shape inference knows of a tensor: element type and dims."""

    elem_type: int = 0
    shape: Optional[tuple] = None  # None: rank unknown; dims int | str (symbolic) | None

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


def _np_dtype(elem_type: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


class GradContext:
    """Everything one rule needs for one forward node."""

    def __init__(self, builder: "_Builder", node: onnx.NodeProto, entry: "RuleEntry",
                 grad_outputs: Sequence[Optional[str]], needs: Sequence[bool]):
        self._b = builder
        self.node = node
        self.entry = entry
        self._grad_outputs = list(grad_outputs)
        self._needs = list(needs)
        self.prefix = builder.node_label(node)

    # ------------------------------------------------------------------ reading
    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def opset(self) -> int:
        """The model's default-domain opset."""
        return self._b.opset

    @property
    def inputs(self) -> list:
        """Input names; ``None`` for omitted optional inputs."""
        return [n or None for n in self.node.input]

    @property
    def outputs(self) -> list:
        return [n or None for n in self.node.output]

    def input(self, i: int) -> Optional[str]:
        return self.node.input[i] or None if i < len(self.node.input) else None

    def output(self, i: int) -> Optional[str]:
        return self.node.output[i] or None if i < len(self.node.output) else None

    def grad_output(self, i: int = 0) -> Optional[str]:
        """Gradient of output ``i``, or ``None`` when nothing downstream needs it."""
        return self._grad_outputs[i] if i < len(self._grad_outputs) else None

    def needs_grad(self, i: int) -> bool:
        """Whether the gradient of input ``i`` is requested."""
        return i < len(self._needs) and self._needs[i]

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                if isinstance(value, bytes):
                    return value.decode()
                if isinstance(value, onnx.TensorProto):
                    return numpy_helper.to_array(value)
                if isinstance(value, list):
                    return [v.decode() if isinstance(v, bytes) else v for v in value]
                return value
        return default

    def has_attr(self, name: str) -> bool:
        return any(a.name == name for a in self.node.attribute)

    def option(self, name: str) -> Any:
        return self._b.option(name)

    def info(self, name: str) -> TensorInfo:
        return self._b.info(name)

    def dtype(self, name: str) -> int:
        return self._b.info(name).elem_type

    def shape(self, name: str) -> Optional[tuple]:
        """Dims as inferred (ints, symbolic names, or None); None if rank unknown."""
        return self._b.info(name).shape

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        if shape is None:
            raise ShapeError(
                f"node {self.prefix!r} ({self.op_type}): the rank of tensor {name!r} is unknown after "
                f"shape inference; give the model's inputs a shape (onnx.tools.update_model_dims) "
                f"or run onnx.shape_inference first"
            )
        return len(shape)

    def static_shape(self, name: str, axes: Optional[Sequence[int]] = None) -> tuple:
        """The shape as ints; raises :class:`ShapeError` naming the tensor if not static.

        With ``axes``, only those dims need be static (others are returned as-is).
        """
        shape = self.shape(name)
        rank = self.rank(name)
        check = range(rank) if axes is None else [a % rank for a in axes]
        for a in check:
            if not isinstance(shape[a], int):
                what = "symbolic" if isinstance(shape[a], str) else "unknown"
                raise ShapeError(
                    f"node {self.prefix!r} ({self.op_type}): dim {a} of tensor {name!r} is {what} "
                    f"({shape[a]!r}) after shape inference, but this gradient needs it static; "
                    f"fix it in the model (onnx.tools.update_model_dims)"
                )
        return tuple(shape)

    def constant_value(self, name: Optional[str]) -> Optional[np.ndarray]:
        """The value of a forward tensor fixed at build time, else ``None``.

        Known: initializers that are not also graph inputs (those can be
        overridden at run time) and outputs of forward ``Constant`` nodes with
        a ``value`` tensor.  Rules use it for axes/shape inputs.
        """
        return self._b.constant_value(name)

    def fail(self, what: str) -> None:
        """Raise a one-line :class:`UnsupportedAttributeError` about this node."""
        raise UnsupportedAttributeError(
            f"node {self.prefix!r} ({self.op_type}, opset {self.opset}): {what}"
        )

    # ----------------------------------------------------------------- emitting
    def op(self, op_type: str, *inputs: Optional[str], outputs: int = 1, domain: str = "",
           name: Optional[str] = None, **attrs: Any) -> Union[str, tuple]:
        """Emit one backward node; return its output name (or a tuple if ``outputs > 1``)."""
        attrs = {k: v for k, v in attrs.items() if v is not None}
        outs = self._b.emit(self, op_type, [i or "" for i in inputs], outputs, domain, name, attrs)
        return outs[0] if outputs == 1 else tuple(outs)

    def const(self, value: Any, *, like: Optional[str] = None, dtype: Any = None) -> str:
        """A constant tensor; dtype from tensor ``like``, an explicit numpy ``dtype``, or value's."""
        if like is not None:
            if not self.dtype(like):
                raise InternalError(f"node {self.prefix!r} ({self.op_type}): g.const(like={like!r}) but the "
                                    f"element type of {like!r} is unknown; pass like= a forward tensor")
            arr = np.asarray(value, dtype=_np_dtype(self.dtype(like)))
        elif dtype is not None:
            arr = np.asarray(value, dtype=dtype)
        else:
            arr = np.asarray(value)
        return self._b.constant(arr)

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, pads, starts, ...)."""
        return self._b.constant(np.asarray(list(values), dtype=np.int64).reshape(-1))

    def forward_output(self, i: int) -> str:
        """Name of forward output ``i``, adding it to the forward node if omitted."""
        return self._b.ensure_forward_output(self.node, i)

    # -------------------------------------------------- opset-aware helpers
    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        axes = [int(a) for a in axes]
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("ReduceSum", x, self.ints(axes), keepdims=int(keepdims))
        return self.op("ReduceSum", x, axes=axes, keepdims=int(keepdims))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("Squeeze", x, self.ints(axes))
        return self.op("Squeeze", x, axes=list(axes))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.ints(axes))
        return self.op("Unsqueeze", x, axes=list(axes))

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        if self.opset >= 10:
            args = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
            if steps is not None:
                args.append(self.ints(steps))
            return self.op("Slice", *args)
        if steps is not None and any(s != 1 for s in steps):
            self.fail("slicing with steps needs opset >= 10")
        return self.op("Slice", x, starts=list(starts), ends=list(ends), axes=list(axes))

    def pad(self, x: str, pads: Sequence[int], value: float = 0.0) -> str:
        """Constant-mode Pad; ``pads`` is ONNX's [begin..., end...] over all axes."""
        if not any(pads):
            return x
        if self.opset >= 11:
            return self.op("Pad", x, self.ints(pads), self.const(value, like=x))
        return self.op("Pad", x, pads=list(pads), value=float(value))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        if list(perm) == list(range(len(perm))):
            return x
        return self.op("Transpose", x, perm=list(perm))

    def select(self, cond: str, a: str, b: Optional[str] = None, *, like: Optional[str] = None) -> str:
        """``a`` where ``cond`` holds, else ``b`` (zero when None): a gradient's branch choice.

        Emitted as ``a * Cast(cond) [+ b * Cast(Not(cond))]`` rather than
        ``Where``: onnxruntime's CPU Where is 4-5x slower than Cast and Mul on
        large tensors (benchmarks/bench_select.py), and for the finite
        gradients rules select between the result is the same bit for bit
        (one term is an exact zero).  Not for masking infinities or NaNs:
        use ``op("Where", ...)`` there.
        """
        dtype = self.dtype(like or a)
        out = self.op("Mul", a, self.op("Cast", cond, to=dtype))
        if b is None:
            return out
        return self.op("Add", out, self.op("Mul", b, self.op("Cast", self.op("Not", cond), to=dtype)))

    def add_n(self, names: Sequence[str]) -> str:
        names = [n for n in names if n]
        if len(names) == 1:
            return names[0]
        return self.op("Sum", *names)

    def unbroadcast(self, grad: str, target: Union[str, tuple], grad_shape: Union[str, tuple, None] = None) -> str:
        """Sum ``grad`` (shaped like the broadcast result) down to ``target``'s shape.

        ``target`` and ``grad_shape`` are tensor names or shape tuples;
        ``grad_shape`` defaults to this node's output 0.  Numpy broadcasting:
        leading axes are summed away, axes where ``target`` has a static 1 are
        summed with keepdims.  Raises :class:`ShapeError` when shapes leave it
        ambiguous.
        """
        src = self.output(0) if grad_shape is None else grad_shape
        gshape = self.shape(src) if isinstance(src, str) else tuple(src)
        tshape = self.shape(target) if isinstance(target, str) else tuple(target)
        if gshape is None or tshape is None:
            unknown = src if gshape is None else target
            raise ShapeError(
                f"node {self.prefix!r} ({self.op_type}): the rank of tensor {unknown!r} is unknown "
                f"after shape inference; broadcasting gradients need ranks"
            )
        lead = len(gshape) - len(tshape)
        keep_axes, ambiguous = [], []
        for j, t in enumerate(tshape):
            y = gshape[lead + j]
            if t == 1:
                if y != 1:
                    keep_axes.append(lead + j)
            elif isinstance(t, int) or (t is not None and t == y) or y == 1:
                continue
            else:
                ambiguous.append(j)
        out = grad
        if ambiguous:
            out = self._unbroadcast_runtime(out, target, lead, ambiguous)
        out = self.reduce_sum(out, keep_axes, keepdims=True) if keep_axes else out
        if lead > 0:
            out = self.reduce_sum(out, list(range(lead)), keepdims=False)
        if ambiguous:
            # Axes where target was 1 at run time hold copies of the sum: keep one.
            rank = len(tshape)
            out = self.op("Slice", out, self.ints([0] * rank), self.op("Shape", target),
                          self.ints(list(range(rank))))
        return out

    def _unbroadcast_runtime(self, grad: str, target, lead: int, axes: Sequence[int]) -> str:
        """Axes whose broadcasting is only known at run time: sum iff the target's dim is 1."""
        if not isinstance(target, str):
            raise ShapeError(
                f"node {self.prefix!r} ({self.op_type}): cannot tell which axes of {tuple(target)} "
                f"were broadcast; make the shapes static")
        if self.opset < 10:
            raise ShapeError(
                f"node {self.prefix!r} ({self.op_type}): dims {list(axes)} of {target!r} are not static, "
                f"so broadcasting is decided at run time, which needs opset >= 10 (model has {self.opset})")
        shape = self.op("Shape", target)
        one = self.ints([1])
        out = grad
        for j in axes:
            dim = self.op("Slice", shape, self.ints([j]), self.ints([j + 1]), self.ints([0]))
            summed = self.reduce_sum(out, [lead + j], keepdims=True)
            out = self.op("Where", self.op("Equal", dim, one), summed, out)
        return out
