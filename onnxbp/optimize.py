"""Graph clean-ups that change no value: common-subexpression elimination.

A training step is written by several writers (the forward's training-mode
rewrite, the backward's rules, the running-statistics stage) that each compute
what they need.  Some of it is the same computation twice: the BatchNormalization
backward and the running-statistics stage both compute the batch mean, the
centred input, its square and the batch variance of every BN input (four passes
over the activation, done twice).  :func:`eliminate_common_subexpressions` keeps
the first of each set of identical nodes and points the readers of the others
at it, so each is computed once.  Two nodes are identical when they run the same
op (domain, type, attributes) on the same inputs; a ``Constant`` is identified by
its value, so constants written by different writers merge too, and with them
the nodes that read them.  Nothing random (Dropout, Random*, Bernoulli,
Multinomial) and nothing with a subgraph is merged, and a node producing a graph
output is kept as it is (its duplicates may read it).  The values are the same bits
(the kept node computes what the dropped one would have).
"""

from __future__ import annotations

import hashlib
import logging

import onnx

from .naming import has_subgraph, outer_names

log = logging.getLogger(__name__)

#: Ops whose two runs on the same inputs differ.
_NONDETERMINISTIC = {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Bernoulli", "Multinomial"}


def eliminate_common_subexpressions(graph: onnx.GraphProto) -> int:
    """Merge identical nodes of ``graph`` (in place, top level only); return how many were removed."""
    outputs = {o.name for o in graph.output}
    captured = _captured(graph)
    rename: dict = {}
    seen: dict = {}
    keep = []
    removed = 0
    for node in graph.node:
        if rename:
            for k, name in enumerate(node.input):
                if name in rename:
                    node.input[k] = rename[name]
        key = _key(node)
        if key is None:
            keep.append(node)
            continue
        first = seen.get(key)
        if first is None or any(o in outputs or o in captured for o in node.output):
            seen.setdefault(key, node)
            keep.append(node)
            continue
        for mine, theirs in zip(node.output, first.output):
            if mine:
                rename[mine] = theirs
        removed += 1
    if removed:
        del graph.node[:]
        graph.node.extend(keep)
        log.info("common-subexpression elimination: %d duplicate nodes removed", removed)
    return removed


def _key(node: onnx.NodeProto):
    if node.op_type in _NONDETERMINISTIC or not node.output:
        return None
    attrs = []
    for a in sorted(node.attribute, key=lambda a: a.name):
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            return None
        if a.type == onnx.AttributeProto.TENSOR and a.t.name:  # a Constant's value: its name is not its value
            t = onnx.TensorProto()
            t.CopyFrom(a.t)
            t.ClearField("name")
            a = onnx.helper.make_attribute(a.name, t)
        b = a.SerializeToString(deterministic=True)
        attrs.append(hashlib.sha1(b).digest() if len(b) > 256 else b)
    return (node.domain, node.op_type, tuple(node.input), tuple(bool(o) for o in node.output), tuple(attrs))


def _captured(graph: onnx.GraphProto) -> set:
    """Names the subgraphs of ``graph``'s nodes read from the outer scope (kept as they are)."""
    out: set = set()
    for node in graph.node:
        if has_subgraph(node):
            out.update(outer_names(node))
    return out
