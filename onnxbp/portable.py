"""Forward ops that not every runtime implements, expanded into plain ops (``target="portable"``).

tract (0.23) has no SoftmaxCrossEntropyLoss and runs BatchNormalization with
one output only, so a training step (its loss node, its BatchNormalization
nodes in training mode) does not load there.  :func:`expand_for_portability`
rewrites those nodes in place into ops that onnxruntime, onnx's
ReferenceEvaluator, OpenVINO and tract all run, with the same output names
and the same values (docs/portability.md):

SoftmaxCrossEntropyLoss(X (N, C, d...), t, [W]; reduction, ignore_index)::

    log_prob = LogSoftmax(X, axis=1)     (opset < 13 and rank > 2: C moved last and back)
    picked   = GatherElements(log_prob, Unsqueeze(t', 1), axis=1), t' = 0 where t == ignore_index
    w        = Gather(W, t') (1 without W), 0 where t == ignore_index
    loss     = -w * picked (none) | ReduceSum (sum) | ReduceSum / ReduceSum(w) (mean; ReduceMean
               without W and ignore_index)

BatchNormalization(X, scale, B, mean, var; training_mode=1, epsilon, momentum)::

    mu = ReduceMean(X, [0, 2...]), v = ReduceMean((X - mu)^2, [0, 2...])   (biased, as the spec)
    Y  = (X - mu) / Sqrt(v + epsilon) * scale + B                          (scale, B as (C, 1...))
    running_mean = mean * momentum + mu * (1 - momentum), running_var likewise with v

The gradient rules never see the expanded nodes: the pass runs on the
finished model (the training step's last stage).

:func:`separate_backward_constants` (run by ``onnxbp.gradient`` and the
training steps under ``target="portable"``) gives the backward its own copy
of a square constant that the forward reads too: OpenVINO CPU (2026.4)
otherwise hands one reader the other's layout (docs/portability.md, bug 4).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .errors import ShapeError, UnsupportedAttributeError
from .shapeinfo import infer
from .types import FLOAT_TYPES, np_dtype
from .writer import GraphWriter

log = logging.getLogger(__name__)

_DOC = "onnxbp portable expansion"


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _needs_expansion(node: onnx.NodeProto) -> bool:
    if node.op_type == "SoftmaxCrossEntropyLoss" and node.domain in ("", "ai.onnx"):
        return True
    return (node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")
            and int(_attr(node, "training_mode", 0)) == 1)


def expand_for_portability(model: onnx.ModelProto) -> list:
    """Rewrite the model's SoftmaxCrossEntropyLoss and training-mode BatchNormalization nodes (main
    graph) into plain ops, in place, keeping their output names; return the rewritten nodes' names.
    Nodes whose name followed by "." begins a tensor's name are renamed (tract bug 2)."""
    g = model.graph
    rename_prefix_nodes(model)
    if not any(_needs_expansion(n) for n in g.node):
        return []
    infos = infer(model)
    w = GraphWriter.for_model(model, "portable", _DOC, infos=infos)
    new_nodes, done = [], []
    for node in g.node:
        if not _needs_expansion(node):
            new_nodes.append(node)
            continue
        scoped = w.scoped(f"portable/{node.name or node.op_type}")
        if node.op_type == "SoftmaxCrossEntropyLoss":
            _expand_sce(scoped, node, infos)
        else:
            _expand_bn(scoped, node, infos)
        new_nodes.extend(w.take_nodes())
        done.append(node.name or node.op_type)
    del g.node[:]
    g.node.extend(new_nodes)
    log.info("target=portable: expanded %d node(s) into plain ops: %s", len(done), ", ".join(done))
    return done


def rename_prefix_nodes(model: onnx.ModelProto) -> list:
    """Rename main-graph nodes named ``n`` where a tensor's name begins with ``n.``: tract (0.23)
    names the nodes it adds for a node ``n`` ``n.bias``, ``n.kernel``, ... and refuses the model
    ("Duplicate node name: conv1.bias") when a graph input already has that name, as a training
    step's parameter ``conv1.bias`` of the Conv ``conv1`` does (docs/portability.md, tract bug 2).
    Returns the old names."""
    from .naming import NameAuthority

    g = model.graph
    tensors = {vi.name for vi in list(g.input) + list(g.output)} | {t.name for t in g.initializer}
    tensors |= {o for n in g.node for o in n.output}

    def clashes(name: str) -> bool:
        return bool(name) and any(t.startswith(name + ".") for t in tensors)

    names, renamed = NameAuthority(model), []
    for node in g.node:
        if clashes(node.name):
            new = names.fresh(node.name.replace(".", "_") + "_node")
            while clashes(new):
                new = names.fresh(new + "_")
            renamed.append(node.name)
            node.name = new
    if renamed:
        log.info("target=portable: renamed %d node(s) whose name prefixes a tensor's: %s", len(renamed),
                 ", ".join(renamed))
    return renamed


def _rank(w: GraphWriter, node: onnx.NodeProto, infos: dict, name: str) -> int:
    info = infos.get(name)
    if info is None or info.shape is None:
        raise ShapeError(f"target='portable': {node.op_type} node {node.name!r}: the rank of its input "
                          f"{name!r} is unknown; the expansion needs it")
    return len(info.shape)


def _expand_sce(w: GraphWriter, node: onnx.NodeProto, infos: dict) -> None:
    x, labels = node.input[0], node.input[1]
    weights = node.input[2] if len(node.input) > 2 and node.input[2] else None
    loss_out = node.output[0]
    logp_out = node.output[1] if len(node.output) > 1 and node.output[1] else None
    reduction = _attr(node, "reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("mean", "sum", "none"):
        raise UnsupportedAttributeError(f"target='portable': SoftmaxCrossEntropyLoss node {node.name!r}: "
                          f"reduction={reduction!r}; supported: mean, sum, none")
    ignore = _attr(node, "ignore_index", None)
    rank = _rank(w, node, infos, x)
    if w.opset >= 13 or rank == 2:
        logp = w.op("LogSoftmax", x, axis=1, out=logp_out)
    else:  # opset 12: LogSoftmax flattens from `axis` on; move C last, where that is the row
        perm = [0] + list(range(2, rank)) + [1]
        back = [0, rank - 1] + list(range(1, rank - 1))
        logp = w.transpose(w.op("LogSoftmax", w.transpose(x, perm), axis=rank - 1), back)
        if logp_out:
            logp = w.op("Identity", logp, out=logp_out)
    safe, ignored = labels, None
    if ignore is not None:
        ignored = w.op("Equal", labels, w.const(int(ignore), like=labels))
        safe = w.op("Where", ignored, w.const(0, like=labels), labels)
    picked = w.squeeze(w.op("GatherElements", logp, w.unsqueeze(safe, [1]), axis=1), [1])  # (N, d...)
    wt = None
    if weights is not None:
        wt = w.op("Gather", weights, safe, axis=0)
    if ignored is not None:
        keep = w.op("Cast", w.op("Not", ignored), to=w.dtype(x))
        wt = keep if wt is None else w.op("Mul", wt, keep)
    per = w.op("Neg", picked if wt is None else w.op("Mul", picked, wt))
    axes = list(range(rank - 1))
    if reduction == "none":
        w.op("Identity", per, out=loss_out)
    elif reduction == "sum":
        w.op("ReduceSum", per, w.ints(axes), keepdims=0, out=loss_out) if w.opset >= 13 else \
            w.op("ReduceSum", per, axes=axes, keepdims=0, out=loss_out)
    elif wt is None:
        w.op("ReduceMean", per, w.ints(axes), keepdims=0, out=loss_out) if w.opset >= 18 else \
            w.op("ReduceMean", per, axes=axes, keepdims=0, out=loss_out)
    else:
        w.op("Div", w.reduce_sum(per, axes, keepdims=False), w.reduce_sum(wt, axes, keepdims=False),
             out=loss_out)


def _expand_bn(w: GraphWriter, node: onnx.NodeProto, infos: dict) -> None:
    x, scale, bias, mean, var = node.input[:5]
    outs = list(node.output) + [""] * (3 - len(node.output))
    rank = _rank(w, node, infos, x)
    eps = float(_attr(node, "epsilon", 1e-5))
    mom = float(_attr(node, "momentum", 0.9))
    f = np_dtype(w.dtype(x))
    axes = [0] + list(range(2, rank))
    per_channel = [1, -1] + [1] * (rank - 2)
    mu = w.reduce_mean(x, axes, True)
    d = w.op("Sub", x, mu)
    v = w.reduce_mean(w.op("Mul", d, d), axes, True)
    inv = w.op("Sqrt", w.op("Add", v, w.const(eps, dtype=f)))
    y = w.op("Mul", w.op("Div", d, inv), w.op("Reshape", scale, w.ints(per_channel)))
    w.op("Add", y, w.op("Reshape", bias, w.ints(per_channel)), out=outs[0])
    keep, new = w.const(np.asarray(mom, dtype=f)), w.const(np.asarray(1.0 - mom, dtype=f))
    for out, run, batch in ((outs[1], mean, mu), (outs[2], var, v)):
        if out:
            w.op("Add", w.op("Mul", run, keep), w.op("Mul", w.op("Reshape", batch, w.ints([-1])), new), out=out)


#: Ops whose outputs are not a function of their inputs: never treated as constants.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli", "Dropout"})
_COPY_DOC = "onnxbp portable: the backward's own copy of a forward constant (OpenVINO bug 4)"


def _foldable(node: onnx.NodeProto) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type not in _NONDETERMINISTIC
            and all(o for o in node.output)
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS,
                                   onnx.AttributeProto.SPARSE_TENSOR) for a in node.attribute))


def _may_alias_layouts(shape) -> bool:
    """Whether a permutation of a tensor of this shape can have the same shape (two equal dims > 1), or
    the shape is unknown: where OpenVINO bug 4 can give a reader the other reader's layout."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return True
    dims = [d for d in shape if d != 1]
    return len(dims) != len(set(dims))


def separate_backward_constants(model: onnx.ModelProto, n_forward: int | None = None,
                                infos: dict | None = None) -> list:
    """Give the backward its own copy of every float constant it shares with the forward (in place).

    OpenVINO CPU (2026.4) computes wrong values when a constant with two equal dimensions is read by
    two ops in different layouts (a Gemm with transB=1 and a MatMul; a Conv and the ConvTranspose of
    its dX), as a forward op and the backward op of its input gradient read their weight
    (docs/portability.md, bug 4).  A constant here is an initializer that is not a graph input, or the
    output of a forward node whose inputs are all constants (a Transpose or Constant of the export); a
    backward node that reads one that a forward node also reads, of a shape where a permutation can
    keep the shape (:func:`_may_alias_layouts`), reads a copy instead: the constant's cone (its
    initializers as Constant nodes, its forward nodes re-written on them), written first in the graph.
    Values are unchanged, so every gradient is the one verified; the model grows by the copies.

    ``n_forward``: the first ``n_forward`` nodes are the forward (a gradient model); ``None``: the
    nodes onnxbp did not write (no ``onnxbp`` doc string, a training step).  Returns the copied names.
    """
    g = model.graph
    nodes = list(g.node)
    if n_forward is None:
        forward = [not n.doc_string.startswith("onnxbp") for n in nodes]
    else:
        forward = [k < n_forward for k in range(len(nodes))]
    listed = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in listed}
    const, producer = set(inits), {}
    for node, fwd in zip(nodes, forward):
        if fwd and _foldable(node) and all(not i or i in const for i in node.input):
            const.update(node.output)
            producer.update((o, node) for o in node.output)
    forward_reads = {i for node, fwd in zip(nodes, forward) if fwd for i in node.input}
    if infos is None:
        infos = infer(model)

    def wanted(t: str) -> bool:
        info = infos.get(t)
        if t not in const or t not in forward_reads or info is None or info.elem_type not in FLOAT_TYPES:
            return False
        return _may_alias_layouts(info.shape)

    targets = [i for node, fwd in zip(nodes, forward) if not fwd for i in node.input if i and wanted(i)]
    if not targets:
        return []
    w = GraphWriter.for_model(model, "portable/copy", _COPY_DOC, infos=infos)
    copies: dict = {}

    def copy(t: str) -> str:
        if t in copies:
            return copies[t]
        if t in inits:
            # not w.const: that shares equal values, and each copy must be a tensor of its own
            copies[t] = w.op("Constant", name=t, value=onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(inits[t]).copy()))
            return copies[t]
        node = producer[t]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        outs = w.op(node.op_type, *[copy(i) if i else "" for i in node.input], outputs=len(node.output),
                    name=node.op_type, **attrs)
        for o, c in zip(node.output, (outs,) if len(node.output) == 1 else outs):
            copies[o] = c
        return copies[t]

    for t in dict.fromkeys(targets):
        copy(t)
    for node, fwd in zip(nodes, forward):
        if not fwd:
            for k, i in enumerate(node.input):
                if i in copies and wanted(i):
                    node.input[k] = copies[i]
    new = w.take_nodes()
    del g.node[:]
    g.node.extend(new + nodes)
    done = list(dict.fromkeys(targets))
    log.info("target=portable: %d forward constant(s) copied for the backward (OpenVINO bug 4): %s",
             len(done), ", ".join(done))
    return done
