"""The one graph-writing layer: every node onnxbp adds to a model is written here.

A :class:`GraphWriter` appends standard-op nodes to a node list.  Node and
tensor names come from the model's one :class:`~onnxbp.naming.NameAuthority`;
constants are deduplicated; the element type of every new tensor is recorded
so later writers can ask ``w.dtype(t)``.  On top of ``op`` it speaks the small
vocabulary the rules, the training builder and the checker share: constants,
zeros, casts and the opset-aware helpers (reductions, squeeze/unsqueeze,
slice, pad) whose spelling changed between opsets.

Writers are cheap *scopes* over one shared state: ``w.scoped(prefix, doc)``
names its nodes ``<prefix>/<op or name>`` and tags them with ``doc``, while
nodes, names and constants stay shared.  The gradient rules' ``GradContext``
is such a scope (one per forward node); the training builder uses one per
stage.  No other module builds protobuf nodes by hand.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InternalError, UnsupportedAttributeError
from .naming import NameAuthority, reads
from .types import TensorInfo, np_dtype

_CONSTANT_NODE_TYPES_BEFORE_9 = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_INT64_RESULTS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
_BOOL_RESULTS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
                 "Or", "Xor", "IsNaN", "IsInf"}


def value_info(name: str, elem_type: int, dims: Optional[Sequence]) -> onnx.ValueInfoProto:
    """A tensor ValueInfo (a graph input or output); ``dims`` None for an unknown rank."""
    return helper.make_tensor_value_info(name, elem_type, None if dims is None else list(dims))


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set attribute ``name`` of an existing node (replacing an earlier value)."""
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


class _State:
    """What every scope of one writer shares."""

    def __init__(self, names: NameAuthority, opset: int, infos: dict, const_base: str):
        self.names = names
        self.opset = opset
        self.infos = infos
        self.const_base = const_base
        self.nodes: list = []
        self.initializers: list = []
        self.created: set = set()
        self.producer: dict = {}  # output name -> the node (or initializer) that writes it
        self.consts: dict = {}
        self.const_keys: dict = {}  # constant name -> its key in consts
        self.memo: dict = {}


class GraphWriter:
    """Writes nodes of standard ops; see the module docstring.

    ``GraphWriter(names, opset, infos=None, prefix="onnxbp", doc="onnxbp")``:
    ``names`` is the model's :class:`NameAuthority`, ``opset`` its default
    opset (helpers pick the spelling for it), ``infos`` a shared
    ``{tensor: TensorInfo}`` map that the writer extends.  ``share=`` another
    writer: a scope of that writer (its names, opset, infos, nodes and
    constants; the other arguments but ``prefix`` and ``doc`` are ignored),
    as :meth:`scoped` makes; subclasses such as ``GradContext`` use it.
    """

    def __init__(self, names: Optional[NameAuthority] = None, opset: int = 0, infos: Optional[dict] = None, *,
                 prefix: str = "onnxbp", doc: str = "onnxbp", const_base: Optional[str] = None,
                 share: Optional["GraphWriter"] = None):
        if share is None and names is None:
            raise InternalError("GraphWriter needs a NameAuthority (names=) or a writer to share")
        self._w = share._w if share is not None else _State(names, opset, {} if infos is None else infos,
                                                             const_base or f"{prefix}/const")
        self.prefix = prefix
        self.doc = doc

    @classmethod
    def for_model(cls, model: onnx.ModelProto, prefix: str, doc: str, infos: Optional[dict] = None):
        """A writer whose names are fresh in ``model`` and whose helpers use its opset."""
        from .types import default_opset

        return cls(NameAuthority(model), default_opset(model), infos, prefix=prefix, doc=doc)

    def scoped(self, prefix: str, doc: Optional[str] = None) -> "GraphWriter":
        """A writer sharing this one's nodes, names and constants, naming nodes ``<prefix>/...``."""
        return GraphWriter(prefix=prefix, doc=doc or self.doc, share=self)

    # ------------------------------------------------------------ shared state
    @property
    def opset(self) -> int:
        """The default-domain opset the helpers write for."""
        return self._w.opset

    @property
    def names(self) -> NameAuthority:
        return self._w.names

    @property
    def nodes(self) -> list:
        """The nodes written so far, in order (shared by every scope)."""
        return self._w.nodes

    def take_nodes(self) -> list:
        """Return the nodes written so far and start a new list (constants are forgotten too).

        For writers whose constants are all Constant nodes (opset >= 9); see :meth:`flush_into`.
        """
        if self._w.initializers:
            raise InternalError(f"{self.prefix}: constants were written as initializers (opset "
                                f"{self.opset} < 9); add them with flush_into(graph)")
        nodes = list(self._w.nodes)
        self._w.nodes.clear()
        self._w.producer.clear()
        self._w.consts.clear()
        self._w.const_keys.clear()
        self._w.memo.clear()
        return nodes

    def flush_into(self, graph: onnx.GraphProto, ir_version: int, keep: Sequence[str] = ()) -> list:
        """Append the written nodes (and the initializers of constants, below opset 9) to ``graph``.

        Returns the nodes.  Initializers no node reads and ``keep`` does not
        name are dropped.  Models of IR version < 4 list every initializer as
        a graph input too, so those initializers are added as inputs.
        """
        used = {i for n in self._w.nodes for i in n.input} | set(keep)
        inits = [t for t in self._w.initializers if t.name in used]
        self._w.initializers.clear()
        nodes = self.take_nodes()
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        if ir_version < 4:
            graph.input.extend(value_info(t.name, t.data_type, t.dims) for t in inits)
        return nodes

    def created(self, name: str) -> bool:
        """Whether ``name`` is an output of a node this writer wrote."""
        return name in self._w.created

    def fresh(self, base: str) -> str:
        """A new unique name (for inputs/outputs the caller adds itself)."""
        return self._w.names.fresh(base)

    def info(self, name: str) -> TensorInfo:
        return self._w.infos.get(name, TensorInfo())

    def dtype(self, name: str) -> int:
        return self.info(name).elem_type

    def set_info(self, name: str, info: TensorInfo) -> None:
        """Record what is known of tensor ``name`` (outputs of ops whose type the writer cannot tell: If)."""
        self._w.infos[name] = info

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key for this writer (a shared subgraph, e.g. Adam's bias corrections)."""
        if key not in self._w.memo:
            self._w.memo[key] = build()
        return self._w.memo[key]

    def fail(self, what: str) -> None:
        """Raise a one-line :class:`UnsupportedAttributeError` naming this scope."""
        raise UnsupportedAttributeError(f"{self.prefix}: {what}")

    # ---------------------------------------------------------------- writing
    def op(self, op_type: str, *inputs: Optional[str], outputs: int = 1, domain: str = "",
           name: Optional[str] = None, out: Optional[str] = None, **attrs: Any) -> Union[str, tuple]:
        """Write one node; return its output name (a tuple if ``outputs > 1``).

        ``name`` is the node's short name (default: the op type); ``out`` an
        exact output name the caller has reserved.  Attributes that are
        ``None`` are left out.
        """
        attrs = {k: v for k, v in attrs.items() if v is not None}
        w = self._w
        node_name = w.names.fresh(f"{self.prefix}/{name or op_type}")
        if out is not None:
            if outputs != 1:
                raise InternalError(f"{self.prefix}: op({op_type!r}, out=...) takes one output")
            outs = [out]
        elif outputs == 1:
            outs = [w.names.fresh(f"{node_name}_out")]
        else:
            outs = [w.names.fresh(f"{node_name}_out{k}") for k in range(outputs)]
        ins = [i or "" for i in inputs]
        node = helper.make_node(op_type, ins, outs, name=node_name, domain=domain or None,
                                doc_string=self.doc, **attrs)
        w.nodes.append(node)
        w.created.update(outs)
        w.producer.update((o, node) for o in outs)
        elem = self._result_type(op_type, ins, attrs)
        if elem:
            for o in outs:
                w.infos[o] = TensorInfo(elem, None)
        return outs[0] if outputs == 1 else tuple(outs)

    def add_nodes(self, nodes: Sequence[onnx.NodeProto]) -> None:
        """Append existing nodes, in order, among the written ones (copies of forward nodes: the
        iterations of an unrolled Loop, the recomputed forward of an If branch)."""
        w = self._w
        for node in nodes:
            w.nodes.append(node)
            w.producer.update((o, node) for o in node.output if o)

    def _result_type(self, op_type: str, inputs: list, attrs: dict) -> int:
        """Element type of a new node's outputs, so later writers can ask ``dtype`` of them."""
        if any(isinstance(v, onnx.GraphProto) for v in attrs.values()):
            return 0  # control flow: the caller records its outputs' types (set_info)
        if op_type in _INT64_RESULTS:
            return onnx.TensorProto.INT64
        if op_type in _BOOL_RESULTS:
            return onnx.TensorProto.BOOL
        if op_type == "Cast":
            return int(attrs.get("to", 0))
        if op_type == "Where" and len(inputs) > 1:
            return self.dtype(inputs[1])
        if op_type == "ConstantOfShape":
            value = attrs.get("value")
            return value.data_type if isinstance(value, onnx.TensorProto) else onnx.TensorProto.FLOAT
        if op_type == "Constant":
            return 0
        for name in inputs:
            if name and self.dtype(name):
                return self.dtype(name)
        return 0

    def const(self, value: Any, *, like: Optional[str] = None, dtype: Any = None) -> str:
        """A constant tensor; dtype from tensor ``like``, an explicit numpy ``dtype``, or the value's."""
        if like is not None:
            if not self.dtype(like):
                raise InternalError(f"{self.prefix}: const(like={like!r}) but the element type of {like!r} "
                                    f"is unknown; pass like= a tensor of known type")
            arr = np.asarray(value, dtype=np_dtype(self.dtype(like)))
        elif dtype is not None:
            arr = np.asarray(value, dtype=dtype)
        else:
            arr = np.asarray(value)
        w = self._w
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in w.consts:
            return w.consts[key]
        name = w.names.fresh(w.const_base)
        tensor = numpy_helper.from_array(np.array(arr, order="C", copy=True))
        if self.opset < 9 and arr.dtype not in _CONSTANT_NODE_TYPES_BEFORE_9:
            # Before opset 9, Constant holds only float16/float/double: others become initializers.
            tensor.name = name
            w.initializers.append(tensor)
            w.producer[name] = tensor
        else:
            node = helper.make_node("Constant", [], [name], name=name, value=tensor,
                                    doc_string=f"{self.doc} (constant)")
            w.nodes.append(node)
            w.producer[name] = node
        w.created.add(name)
        w.consts[key] = name
        w.const_keys[name] = key
        w.infos[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(arr.dtype), tuple(arr.shape))
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, pads, starts, ...)."""
        return self.const(np.asarray(list(values), dtype=np.int64).reshape(-1))

    def rename_output(self, old: str, new: str) -> None:
        """Make the node that writes ``old`` write ``new`` (a name the caller reserved)."""
        w = self._w
        producer = w.producer.pop(old, None)
        if producer is None:
            raise InternalError(f"{self.prefix}: rename_output({old!r}): no written node outputs it")
        if isinstance(producer, onnx.TensorProto):
            producer.name = new
        else:
            producer.output[list(producer.output).index(old)] = new
        w.producer[new] = producer
        key = w.const_keys.pop(old, None)
        if key is not None:
            del w.consts[key]
        w.created.discard(old)
        w.created.add(new)
        if old in w.infos:
            w.infos[new] = w.infos[old]

    def rename_tensors(self, mapping: dict) -> None:
        """Rename tensors the writer wrote, ``{old: new}``, at their producers and every written consumer.

        One pass over the written nodes; the new names are the caller's (reserved) names.
        """
        w = self._w
        for old, new in mapping.items():
            if old not in w.producer:
                raise InternalError(f"{self.prefix}: rename_tensors({old!r}): no written node outputs it")
        for node in w.nodes:
            for k, name in enumerate(node.input):
                if name in mapping:
                    node.input[k] = mapping[name]
        for old, new in mapping.items():
            self.rename_output(old, new)

    def prune(self, keep_outputs: Sequence[str]) -> int:
        """Drop the written nodes that no name in ``keep_outputs`` depends on; return how many."""
        w = self._w
        needed = set(keep_outputs)
        keep = []
        for node in reversed(w.nodes):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(reads(node))  # an If's branches read outer tensors too
        dropped = len(w.nodes) - len(keep)
        if dropped:
            kept = {id(n) for n in keep}
            for node in w.nodes:
                if id(node) not in kept:
                    for o in node.output:
                        w.producer.pop(o, None)
        w.nodes[:] = reversed(keep)
        return dropped

    # ------------------------------------------------------- tensors of a shape
    def fill_like(self, t: str, value: float, like: Optional[str] = None) -> str:
        """A tensor shaped like ``t`` (its runtime shape) holding ``value``, dtype of ``like`` (default ``t``)."""
        elem = self.dtype(like or t)
        if self.opset >= 9:
            return self.op("ConstantOfShape", self.op("Shape", t),
                           value=numpy_helper.from_array(np.full(1, value, dtype=np_dtype(elem))))
        shape = self.info(t).shape
        if shape is None or not all(isinstance(d, int) for d in shape):
            self.fail(f"a tensor shaped like {t!r} needs opset >= 9 or a static shape")
        return self.const(np.full(shape, value), dtype=np_dtype(elem))

    def zeros_like(self, t: str, like: Optional[str] = None) -> str:
        """Zeros shaped like ``t`` (runtime shape), dtype of ``like`` (default ``t``)."""
        return self.fill_like(t, 0.0, like)

    def zeros(self, shape: str, elem_type: int) -> str:
        """Zeros of runtime shape ``shape`` (a 1-D int64 tensor) and element type ``elem_type``."""
        return self.fill(shape, 0, elem_type)

    def fill(self, shape: str, value, elem_type: int) -> str:
        """``value`` in a tensor of runtime shape ``shape`` (a 1-D int64 tensor), element type ``elem_type``."""
        return self.op("ConstantOfShape", shape,
                       value=numpy_helper.from_array(np.full(1, value, dtype=np_dtype(elem_type))))

    def cast(self, x: str, to: int) -> str:
        """``x`` as element type ``to`` (no node when it already is)."""
        if self.dtype(x) == to:
            return x
        return self.op("Cast", x, to=to)

    # -------------------------------------------------- opset-aware helpers
    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        return self._reduce("ReduceSum", 13, x, axes, keepdims)

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        return self._reduce("ReduceMean", 18, x, axes, keepdims)

    def reduce_sum_square(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        return self._reduce("ReduceSumSquare", 18, x, axes, keepdims)

    def _reduce(self, op_type: str, axes_as_input_since: int, x: str, axes: Sequence[int],
                keepdims: bool) -> str:
        axes = [int(a) for a in axes]
        if not axes:
            return x
        if self.opset >= axes_as_input_since:
            return self.op(op_type, x, self.ints(axes), keepdims=int(keepdims))
        return self.op(op_type, x, axes=axes, keepdims=int(keepdims))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self._axes_op("Squeeze", x, axes)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self._axes_op("Unsqueeze", x, axes)

    def _axes_op(self, op_type: str, x: str, axes: Sequence[int]) -> str:
        """Squeeze / Unsqueeze: axes an input from opset 13, an attribute before."""
        if not axes:
            return x
        if self.opset >= 13:
            return self.op(op_type, x, self.ints(axes))
        return self.op(op_type, x, axes=list(axes))

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        if self.opset >= 10:
            args = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
            if steps is not None:
                args.append(self.ints(steps))
            return self.op("Slice", *args)
        if steps is not None and any(s != 1 for s in steps):
            self.fail("slicing with steps needs opset >= 10")
        return self.op("Slice", x, starts=list(starts), ends=list(ends), axes=list(axes))

    def pad(self, x: str, pads: Sequence[int], value: float = 0.0, like: Optional[str] = None) -> str:
        """Constant-mode Pad; ``pads`` is ONNX's [begin..., end...] over all axes.

        ``like`` names a tensor of ``x``'s element type when ``x``'s own is
        not recorded.
        """
        if not any(pads):
            return x
        if self.opset >= 11:
            return self.op("Pad", x, self.ints(pads), self.const(value, like=like or x))
        return self.op("Pad", x, pads=[int(p) for p in pads], value=float(value))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        if list(perm) == list(range(len(perm))):
            return x
        return self.op("Transpose", x, perm=list(perm))

    def select(self, cond: str, a: str, b: Optional[str] = None, *, like: Optional[str] = None) -> str:
        """``a`` where ``cond`` holds, else ``b`` (zero when None): a gradient's branch choice.

        Written as ``a * Cast(cond) [+ b * Cast(Not(cond))]`` rather than
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

    def add_n(self, names: Sequence[Optional[str]]) -> Optional[str]:
        """The sum of the given tensors (one Sum node; the tensor itself when there is one)."""
        names = [n for n in names if n]
        if not names:
            return None
        if len(names) == 1:
            return names[0]
        return self.op("Sum", *names)
