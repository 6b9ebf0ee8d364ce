"""The one authority for new names, and what a node reads across subgraph scopes.

Every backward tensor and node gets its name here, so that new names never
collide with each other or with any name the model already uses (including
names inside subgraphs of If/Loop/Scan attributes).  :func:`outer_names`,
:func:`free_names` and :func:`reads` tell which tensors a node's subgraphs
read from enclosing scopes (the layers above, writer and graphview, use them).
"""

from __future__ import annotations

import re

import onnx


def _graph_names(graph: onnx.GraphProto, out: set) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        out.add(vi.name)
    for init in graph.initializer:
        out.add(init.name)
    for sinit in graph.sparse_initializer:
        out.add(sinit.values.name)
    for node in graph.node:
        out.add(node.name)
        out.update(node.input)
        out.update(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _graph_names(attr.g, out)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _graph_names(g, out)
    out.discard("")


def model_names(model: onnx.ModelProto) -> set:
    names: set = set()
    _graph_names(model.graph, names)
    for fn in model.functions:
        names.add(fn.name)
    return names


_SAFE = re.compile(r"\s+")


class NameAuthority:
    """Hands out names that are unique across the whole model."""

    def __init__(self, model: onnx.ModelProto):
        self._used = model_names(model)
        self._next: dict = {}  # base -> the next suffix to try (keeps fresh() O(1) for a reused base)

    def is_used(self, name: str) -> bool:
        return name in self._used

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly; the caller has checked it is free."""
        self._used.add(name)
        return name

    def fresh(self, base: str) -> str:
        """Return ``base`` if free, else ``base_1``, ``base_2``, ... and claim it."""
        base = _SAFE.sub("_", base) or "t"
        if base not in self._used:
            self._used.add(base)
            return base
        i = self._next.get(base, 1)
        while f"{base}_{i}" in self._used:
            i += 1
        name = f"{base}_{i}"
        self._next[base] = i + 1
        self._used.add(name)
        return name


# ------------------------------------------------------------ subgraph scopes
def has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether the node has a graph attribute (If, Loop, Scan)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def outer_names(node: onnx.NodeProto) -> list:
    """Names the node's subgraphs read from an enclosing scope, in first-use order."""
    found: list = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
            if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for name in free_names(g):
                if name not in found:
                    found.append(name)
    return found


def free_names(graph: onnx.GraphProto) -> list:
    """Tensors a (sub)graph reads that it does not define itself (inputs, initializers, node outputs),
    nested subgraphs included, in first-use order."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {t.values.name for t in graph.sparse_initializer}
    free: list = []
    for node in graph.node:
        for name in list(node.input) + (outer_names(node) if has_subgraph(node) else []):
            if name and name not in defined and name not in free:
                free.append(name)
        defined.update(o for o in node.output if o)
    return free


def reads(node: onnx.NodeProto) -> list:
    """Every tensor a node reads: its inputs, then what its subgraphs read from outside."""
    names = [i for i in node.input if i]
    return names + outer_names(node) if has_subgraph(node) else names
