"""The vocabulary a gradient rule speaks: :class:`GradContext`, a graph writer for one node.

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
``g.opset``, ``g.option(name)``, ``g.constant_value(t)``.  Control flow (the If
rule): ``g.captures``, the outer-scope tensors the node's subgraphs read (their
gradients are requested as inputs ``len(g.inputs) + k``), and
``g.differentiate(graph, wrt, seeds)``, onnxbp's own backward of a subgraph
made standalone.

Emitting is the :class:`~onnxbp.writer.GraphWriter` vocabulary (a
``GradContext`` is a writer scoped to its node): ``g.op(op_type, *inputs,
**attrs)`` returns the new output name(s); ``g.const(value, like=t)``,
``g.ints([...])``, ``g.zeros_like(t)``, ``g.cast``; opset-aware helpers
``g.reduce_sum``, ``g.reduce_mean``, ``g.squeeze``, ``g.unsqueeze``,
``g.slice``, ``g.pad``; ``g.select``, ``g.add_n``; plus
``g.unbroadcast(grad, target)`` and ``g.forward_output(i)`` to obtain (adding
if the model omitted it) an optional output of the forward node.

Rules never touch protobuf: every node goes through the writer, which names it
from the one :class:`~onnxbp.naming.NameAuthority` and tags it with a
doc_string naming the rule.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ShapeError, UnsupportedAttributeError
from .graphview import GraphView
from .registry import RuleEntry
from .writer import GraphWriter


class Build(Protocol):
    """What a GradContext needs of the build it belongs to (the engine's ``_Build``)."""

    view: GraphView
    writer: GraphWriter

    def option(self, name: str) -> Any: ...

    def ensure_forward_output(self, node: onnx.NodeProto, i: int) -> str: ...

    def sub_backward(self, graph: onnx.GraphProto, wrt: Sequence[str], seeds: Any) -> Any: ...


class GradContext(GraphWriter):
    """Everything one rule needs for one forward node: its view of the graph and a writer."""

    def __init__(self, build: Build, node: onnx.NodeProto, entry: RuleEntry,
                 grad_outputs: Sequence[Optional[str]], needs: Sequence[bool]):
        label = build.view.label(node)
        super().__init__(prefix=f"{label}/grad",
                         doc=f"onnxbp: backward of node '{label}' ({node.op_type}) by rule {entry.source}",
                         share=build.writer)
        self._build = build
        self.node = node
        self.entry = entry
        self.label = label
        self._grad_outputs = list(grad_outputs)
        self._needs = list(needs)

    # ------------------------------------------------------------------ reading
    @property
    def op_type(self) -> str:
        return self.node.op_type

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
        """Whether the gradient of input ``i`` is requested (``i >= len(inputs)``: of capture
        ``i - len(inputs)``)."""
        return i < len(self._needs) and self._needs[i]

    @property
    def captures(self) -> list:
        """The outer-scope tensors the node's subgraphs read, in first-use order (empty without
        subgraphs).  A rule returns the gradient of capture ``k`` at index ``len(node.input) + k``."""
        return self._build.view.captures(self.node)

    def differentiate(self, graph: onnx.GraphProto, wrt: Sequence[str], seeds: dict):
        """onnxbp's backward of ``graph``, a subgraph made standalone (every tensor it reads from
        outside is one of its inputs), at this model's opset and with its naming authority.

        ``seeds``: ``{output: seed input}``.  Returns a :class:`~onnxbp.engine.Backward` whose
        ``gradients`` leave out the ``wrt`` names no gradient reaches.
        """
        return self._build.sub_backward(graph, wrt, seeds)

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
        return self._build.option(name)

    def shape(self, name: str) -> Optional[tuple]:
        """Dims as inferred (ints, symbolic names, or None); None if rank unknown."""
        return self.info(name).shape

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        if shape is None:
            raise ShapeError(
                f"node {self.label!r} ({self.op_type}): the rank of tensor {name!r} is unknown after "
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
                    f"node {self.label!r} ({self.op_type}): dim {a} of tensor {name!r} is {what} "
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
        return self._build.view.constant_value(name)

    def known_value(self, name: Optional[str]) -> Optional[np.ndarray]:
        """:meth:`constant_value`, or the value of a small integer tensor the forward computes from
        constants and static dims only (an exporter's ``Reshape(Cast(Constant))`` axes, a
        ``Shape -> Gather`` of static dims); ``None`` where it depends on anything else."""
        return self._build.view.known_value(name)

    def fail(self, what: str) -> None:
        """Raise a one-line :class:`UnsupportedAttributeError` about this node."""
        raise UnsupportedAttributeError(
            f"node {self.label!r} ({self.op_type}, opset {self.opset}): {what}"
        )

    # ----------------------------------------------------------------- emitting
    def forward_output(self, i: int) -> str:
        """Name of forward output ``i``, adding it to the forward node if omitted."""
        return self._build.ensure_forward_output(self.node, i)

    # ------------------------------------------------------------ broadcasting
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
            if isinstance(target, str) and self.opset >= 13:
                # nothing is known statically: the summed axes are computed from the shapes at run time
                return self._unbroadcast_dynamic(grad, target)
            raise ShapeError(
                f"node {self.label!r} ({self.op_type}): the rank of tensor {unknown!r} is unknown "
                f"after shape inference; broadcasting gradients need ranks"
                + ("" if isinstance(target, str) else " (the target is a shape, not a tensor)")
                + (f" or opset >= 13 (model has {self.opset})" if isinstance(target, str) else "")
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

    def _unbroadcast_dynamic(self, grad: str, target: str) -> str:
        """``grad`` summed to ``target``'s shape where a rank is unknown at build time (opset >= 13).

        The target shape is padded with ones to the rank of ``grad`` (numpy broadcasting aligns the
        trailing axes); the axes where it is 1 and ``grad``'s dim is not are summed with keepdims
        (``ReduceSum`` with the axes as a computed input, ``noop_with_empty_axes`` where there are
        none), and a Reshape to ``Shape(target)`` drops the leading axes.
        """
        shape_g = self.op("Shape", grad)
        shape_t = self.op("Shape", target)
        lead = self.op("Sub", self.op("Shape", shape_g), self.op("Shape", shape_t))  # (1,): rank difference
        ones = self.fill(lead, 1, onnx.TensorProto.INT64)
        padded = self.op("Concat", ones, shape_t, axis=0)
        one = self.ints([1])
        summed = self.op("And", self.op("Equal", padded, one), self.op("Not", self.op("Equal", shape_g, one)))
        axes = self.op("Reshape", self.op("NonZero", summed), self.ints([-1]))
        out = self.op("ReduceSum", grad, axes, keepdims=1, noop_with_empty_axes=1)
        return self.op("Reshape", out, shape_t)

    def _unbroadcast_runtime(self, grad: str, target, lead: int, axes: Sequence[int]) -> str:
        """Axes whose broadcasting is only known at run time: sum iff the target's dim is 1."""
        if not isinstance(target, str):
            raise ShapeError(
                f"node {self.label!r} ({self.op_type}): cannot tell which axes of {tuple(target)} "
                f"were broadcast; make the shapes static")
        if self.opset < 10:
            raise ShapeError(
                f"node {self.label!r} ({self.op_type}): dims {list(axes)} of {target!r} are not static, "
                f"so broadcasting is decided at run time, which needs opset >= 10 (model has {self.opset})")
        shape = self.op("Shape", target)
        one = self.ints([1])
        out = grad
        for j in axes:
            dim = self.op("Slice", shape, self.ints([j]), self.ints([j + 1]), self.ints([0]))
            summed = self.reduce_sum(out, [lead + j], keepdims=True)
            out = self.op("Where", self.op("Equal", dim, one), summed, out)
        return out
