"""What the analysis and the rules see of a forward graph.

A :class:`GraphView` is built once per gradient build: the model's opset, the
tensor infos from :mod:`onnxbp.shapeinfo`, a label for every node (unnamed
nodes get a fresh one from the naming authority), the rule entry of each
node, and the values fixed at build time (:meth:`GraphView.constant_value`).

Its node list is the *analysis view* of the graph: a ``SplitToSequence``
whose sequence is read only by ``SequenceAt`` at constant positions, each
chunk exactly once (torch's ``chunk`` through the dynamo exporter), is seen as
one ``Split`` whose outputs are the SequenceAt outputs: the engine handles
tensors, not sequences.  The forward graph itself is not changed; backward
nodes only read its tensors (the input and the SequenceAt outputs).  Where
the view does not apply, the reason is kept (:attr:`GraphView.sequence_why`)
for the error a requested gradient through the sequence raises.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import shapeinfo
from .naming import NameAuthority, free_names, has_subgraph, outer_names  # noqa: F401  (re-exported)
from .registry import Registry, RuleEntry
from .types import TensorInfo, default_opset

log = logging.getLogger(__name__)


class GraphView:
    """The forward graph as the engine reads it (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, registry: Registry, names: Optional[NameAuthority] = None):
        """``names``: the naming authority to draw from (an enclosing build's, when ``model`` is a
        subgraph made standalone); by default one over ``model``."""
        self.model = model
        self.registry = registry
        self.opset = default_opset(model)
        self.graph = model.graph
        self.infos = shapeinfo.infer(model)
        self.names = names if names is not None else NameAuthority(model)
        self._inputs = {i.name for i in model.graph.input}
        self._constants = {t.name: t for t in model.graph.initializer if t.name not in self._inputs}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                self._constants.setdefault(node.output[0], value)
        self.sequence_why: dict = {}
        self._folded: Optional[dict] = None  # shapeinfo.folded_ints, computed on first known_value()
        self.nodes = self._analysis_view(list(model.graph.node))
        self._captures = {id(n): outer_names(n) for n in self.nodes if has_subgraph(n)}
        self._labels: dict = {}
        self._entries: dict = {}
        for i, node in enumerate(self.nodes):
            label = node.name or self.names.fresh(f"{node.op_type}_{i}")
            self._labels[id(node)] = label

    # --------------------------------------------------------------- reading
    def info(self, name: str) -> TensorInfo:
        return self.infos.get(name, TensorInfo())

    def label(self, node: onnx.NodeProto) -> str:
        """The node's name, or the fresh name it is called by in messages and backward names."""
        return self._labels.get(id(node)) or node.name or node.op_type

    def entry_for(self, node: onnx.NodeProto) -> Optional[RuleEntry]:
        key = id(node)
        if key not in self._entries:
            domain = node.domain if node.domain not in ("", "ai.onnx") else ""
            version = self.opset
            if domain:
                version = next((i.version for i in self.model.opset_import if i.domain == domain), 1)
            self._entries[key] = self.registry.lookup(node.op_type, domain, version)
        return self._entries[key]

    def constant_value(self, name: Optional[str]) -> Optional[np.ndarray]:
        """The value of a forward tensor fixed at build time, else ``None``.

        Known: initializers that are not also graph inputs (those can be
        overridden at run time) and outputs of forward ``Constant`` nodes with
        a ``value`` tensor.
        """
        tensor = self._constants.get(name) if name else None
        return None if tensor is None else numpy_helper.to_array(tensor)

    def known_value(self, name: Optional[str]) -> Optional[np.ndarray]:
        """:meth:`constant_value`, else the value of a small integer tensor that is fixed given the
        static shapes (``shapeinfo.folded_ints``: ``Reshape(Cast(Constant))``, ``Shape -> Gather``
        of static dims, ...), else ``None``.  For rules that need axes or positions at build time."""
        value = self.constant_value(name)
        if value is not None or not name:
            return value
        if self._folded is None:
            self._folded = shapeinfo.folded_ints(self.model, self.infos)
        return self._folded.get(name)

    def tensor_names(self) -> set:
        """Every tensor of the forward graph: inputs, initializers and node outputs."""
        g = self.graph
        return {i.name for i in g.input} | {t.name for t in g.initializer} | \
            {o for n in g.node for o in n.output if o}

    def inputs(self, node: onnx.NodeProto) -> list:
        """The node's inputs, then the outer-scope tensors its subgraphs (If/Loop/Scan bodies) read.

        The analysis follows both: a gradient that reaches a body only through
        such a capture still passes through the node.
        """
        captures = self._captures.get(id(node))
        return list(node.input) + captures if captures else list(node.input)

    def captures(self, node: onnx.NodeProto) -> list:
        """The outer-scope tensors the node's subgraphs read (empty for nodes without subgraphs)."""
        return list(self._captures.get(id(node), ()))

    def has_subgraphs(self, node: onnx.NodeProto) -> bool:
        """Control flow: If, Loop, Scan (any node with a graph attribute)."""
        return id(node) in self._captures

    def const_ints(self, name: str) -> Optional[list]:
        value = self.constant_value(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def rank(self, name: str) -> Optional[int]:
        shape = self.info(name).shape
        return None if shape is None else len(shape)

    # ---------------------------------------------------------- the view
    def _analysis_view(self, nodes: list) -> list:
        consumers: dict = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        graph_outputs = {o.name for o in self.graph.output}
        replaced: set = set()
        view = []
        for n in nodes:
            if id(n) in replaced:
                continue
            if n.op_type != "SplitToSequence" or n.domain not in ("", "ai.onnx"):
                view.append(n)
                continue
            split, why = self._split_view(n, consumers, graph_outputs)
            if split is None:
                self.sequence_why[n.output[0]] = why
                view.append(n)
                continue
            synthetic, users = split
            replaced.update(id(u) for u in users)
            view.append(synthetic)
        return view

    def _split_view(self, n, consumers, graph_outputs):
        """``((Split node, SequenceAt users), None)``, or ``(None, why not)``."""
        seq = n.output[0]
        users = consumers.get(seq, [])
        if seq in graph_outputs:
            return None, "the sequence is a graph output"
        other = next((u for u in users if u.op_type != "SequenceAt"), None)
        if other is not None:
            return None, f"the sequence is read by {other.op_type} node '{other.name}'"
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        keepdims = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
        x = self.info(n.input[0])
        if x.shape is None:
            return None, f"the rank of {n.input[0]!r} is unknown"
        dim = x.shape[axis % len(x.shape)]
        has_split = len(n.input) > 1 and bool(n.input[1])
        split = self.const_ints(n.input[1]) if has_split else None
        if has_split and split is None:
            return None, f"its split {n.input[1]!r} is computed at run time"
        if split is None:
            if not keepdims:
                return None, "keepdims=0 drops the split axis"
            if not isinstance(dim, int):
                return None, f"the size of axis {axis} of {n.input[0]!r} is not static"
            count = dim
        elif len(split) == 1 and self.rank(n.input[1]) == 0:
            if not isinstance(dim, int):
                return None, f"the size of axis {axis} of {n.input[0]!r} is not static"
            count = -(-dim // split[0])
        else:
            count = len(split)
        outputs = [""] * count
        for u in users:
            pos = self.const_ints(u.input[1])
            if pos is None or len(pos) != 1 or not -count <= pos[0] < count:
                return None, (f"SequenceAt node '{u.name}' reads a position that is not a constant in "
                              f"[-{count}, {count})")
            k = pos[0] % count
            if outputs[k]:
                return None, f"chunk {k} is read twice"
            outputs[k] = u.output[0]
        if not all(outputs):
            return None, f"chunk {outputs.index('')} of {count} is never read"
        synthetic = helper.make_node("Split", [n.input[0]], outputs, name=n.name or f"{seq}/split", axis=axis)
        log.info("differentiating SplitToSequence %s and its %d SequenceAt reads as one Split", n.name, count)
        return (synthetic, users), None
