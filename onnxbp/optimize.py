"""Graph clean-ups that change no value: common-subexpression elimination, rank-matched scalars.

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

:func:`match_scalar_ranks` gives a one-element operand of an elementwise op the
rank of the op's output where that output's last dim is 1 (a ``[M, C, 1, 1]``
1x1-conv weight, a ``(1, C, 1, 1)`` per-channel statistic): onnxruntime (1.32,
CPU) broadcasts a lower-rank scalar against such a tensor element by element,
10-30x slower than a ``[1, 1, 1, 1]`` one (``benchmarks/bench_optimizer_views.py``).
A constant gets a reshaped copy, any other tensor one Reshape per rank; the
values and the output shapes are the same.
"""

from __future__ import annotations

import hashlib
import logging
import math

import onnx

from .naming import has_subgraph, outer_names
from .writer import GraphWriter

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


#: Elementwise ops with numpy broadcasting (Where: the condition and both values).
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "Equal",
                 "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Where", "BitShift"}


def match_scalar_ranks(model: onnx.ModelProto, infos: dict) -> int:
    """Rank-matched one-element operands (module docstring) in ``model``'s main graph, in place;
    ``infos``: ``{tensor: TensorInfo}`` (shapeinfo.infer).  Returns how many operands were replaced."""
    graph = model.graph
    values = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.output
              and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    values.update((t.name, t) for t in graph.initializer)
    inputs = {i.name for i in graph.input}
    w = GraphWriter.for_model(model, "rank_matched", "onnxbp: a scalar at its reader's rank (optimize.py)")
    shared: dict = {}      # (tensor, rank) -> the rank-matched tensor
    new_before: dict = {}  # index of the reading node -> nodes to insert before it
    replaced = 0
    for k, node in enumerate(graph.node):
        if node.op_type not in _BROADCASTING or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        out = _static(infos, node.output[0])
        if not out or len(out) < 2 or out[-1] != 1 or math.prod(out) == 1:
            continue
        for i, name in enumerate(node.input):
            dims = _static(infos, name) if name else None
            if dims is None or len(dims) >= len(out) or math.prod(dims) != 1:
                continue
            key = (name, len(out))
            if key not in shared:
                ones = [1] * len(out)
                if name in values and name not in inputs:
                    shared[key] = w.const(onnx.numpy_helper.to_array(values[name]).reshape(ones))
                else:
                    shared[key] = w.op("Reshape", name, w.ints(ones))
                new_before.setdefault(k, []).extend(w.take_nodes())
            node.input[i] = shared[key]
            replaced += 1
    if replaced:
        nodes = []
        for k, node in enumerate(graph.node):
            nodes.extend(new_before.get(k, ()))
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        log.info("rank-matched scalars: %d operands", replaced)
    return replaced


def _static(infos: dict, name: str):
    info = infos.get(name)
    shape = getattr(info, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return list(shape)


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
