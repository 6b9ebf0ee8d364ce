"""The gradient of If: another If on the same condition, each branch differentiated by onnxbp itself.

The derivation: ``If(c, f, g)(t)`` is ``f(t)`` where ``c`` holds and ``g(t)``
otherwise, where ``t`` are the outer-scope tensors the branches read (their
*captures*; If has no other differentiable input, and its condition has no
gradient).  So its vector-Jacobian product is ``If(c, VJP_f, VJP_g)``:

* each backward branch is built by :func:`onnxbp.backward` itself, run on the
  forward branch turned into a standalone graph (the tensors it reads from
  outside become its inputs; each seeded output ``Y_k`` gets a seed input
  that the backward branch reads as the outer gradient ``dY_k``);
* the backward branch recomputes the branch's forward (the forward If keeps
  only its outputs), renamed through the naming authority so no name is
  defined twice in the model;
* both backward branches output the gradients of the same tensors, the union
  of the captures whose gradient is requested; a branch that does not read a
  capture, or through which no gradient reaches it, outputs a real zero of its
  shape (both branches of an If must produce the same outputs).

Control flow nested in a branch follows from the recursion: a nested If is
differentiated by this rule inside the branch's build, a nested Loop or Scan
is unrolled there (:mod:`onnxbp.unroll`) or refused with its reason.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedOpError
from .naming import free_names, reads
from .registry import register_gradient
from .types import FLOAT_TYPES, TensorInfo
from .unroll import copy_nodes, prune_nodes
from .writer import GraphWriter, value_info

log = logging.getLogger(__name__)

_INLINE_CONSTANT_ELEMENTS = 4096  # captured float constants up to this size stay constants in a branch's build


@register_gradient("If", non_differentiable_inputs=(0,),
                   lowering="If(cond) of the branches' backward graphs (each by onnxbp's backward(), the "
                            "branch's forward recomputed); gradients flow to the outer tensors they read")
def if_grad(g):
    """If(cond, f, g)' = If(cond, f', g'): see the module docstring."""
    caps = g.captures
    base = len(g.node.input)
    needed = [c for k, c in enumerate(caps) if g.needs_grad(base + k)]
    if not needed:
        return {}
    seeds = {k: g.grad_output(k) for k in range(len(g.node.output)) if g.grad_output(k)}
    branches = {which: _branch_backward(g, which, needed, seeds) for which in ("then_branch", "else_branch")}
    outs = g.op("If", g.input(0), outputs=len(needed), **branches)
    outs = [outs] if isinstance(outs, str) else list(outs)
    for c, o in zip(needed, outs):
        g.set_info(o, TensorInfo(g.dtype(c), g.shape(c)))
    return {base + caps.index(c): o for c, o in zip(needed, outs)}


def _info_of(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorInfo(tt.elem_type, shape)


def _branch_backward(g, which: str, needed: list, seeds: dict) -> onnx.GraphProto:
    """The backward graph of one branch: outputs the gradients of ``needed``, in that order."""
    branch = g.attr(which)
    names = g.names
    prefix = f"{g.label}/grad/{which}"
    free = free_names(branch)
    w = GraphWriter(names, g.opset, {}, prefix=prefix, doc=f"onnxbp: backward of the {which} of node "
                    f"'{g.label}' (If) by rule {g.entry.source}", const_base=f"{prefix}/const")

    # The branch as a standalone graph: what it reads from outside are its inputs (constants stay constant).
    inputs, const_caps = [], []
    for c in free:
        info, value = g.info(c), g.constant_value(c)
        if c not in needed and value is not None and (
                info.elem_type not in FLOAT_TYPES or value.size <= _INLINE_CONSTANT_ELEMENTS):
            const_caps.append(numpy_helper.from_array(np.asarray(value), c))
        elif not info.elem_type:
            raise UnsupportedOpError(
                f"node '{g.label}' (op If): the type of {c!r}, which its {which} reads, is unknown after shape "
                f"inference, so the branch cannot be differentiated; give the model's inputs types")
        else:
            inputs.append(value_info(c, info.elem_type, info.shape))
    seed_inputs, outputs, seed_of, outer_of = [], [], {}, {}
    for k, dy in seeds.items():
        info = _info_of(branch.output[k])
        if not info.elem_type:
            info = TensorInfo(g.info(g.output(k)).elem_type, None)
        out = w.op("Identity", branch.output[k].name, name=f"output{k}")
        seed = names.fresh(f"{prefix}/seed{k}")
        seed_inputs.append(value_info(seed, info.elem_type, info.shape))
        outputs.append(value_info(out, info.elem_type, info.shape))
        seed_of[out] = seed
        outer_of[seed] = dy
    body = []
    for n in branch.node:  # copies; unnamed nodes get names that say where they are
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = n.name or names.fresh(f"{g.label}/{which}/{n.op_type}")
        body.append(copy)
    standalone = helper.make_graph(body + w.take_nodes(), f"{g.label}/{which}",
                                   inputs + seed_inputs, outputs, const_caps + list(branch.initializer))
    wrt = [c for c in needed if c in {i.name for i in inputs}]
    bw = g.differentiate(standalone, wrt, seed_of) if wrt else None
    gradients = bw.gradients if bw is not None else {}
    model_graph = bw.model.graph if bw is not None else standalone
    log.debug("If '%s' %s: gradients of %d of %d requested captures reach its outputs", g.label, which,
              len(gradients), len(needed))

    # The outputs: each requested capture's gradient, or a zero where the branch gives none.
    results = []
    for c in needed:
        src = gradients.get(c)
        if src is None:
            w.set_info(c, g.info(c))
            src = w.zeros_like(c)
        results.append(w.op("Identity", src, name="gradient"))
    tail = onnx.GraphProto()
    w.flush_into(tail, onnx.IR_VERSION, keep=results)  # (graph inputs for old IR versions are not wanted here)
    nodes = prune_nodes(list(model_graph.node) + list(tail.node), results)

    # Names the forward branch defines are defined again here (the recomputed forward): fresh ones.
    forward_defined = {o for n in branch.node for o in n.output if o} | {t.name for t in branch.initializer}
    forward_nodes = {n.name for n in body}
    mapping = dict(outer_of)
    local = {t.name for t in const_caps}
    initializers = []
    for t in list(model_graph.initializer) + list(tail.initializer):
        if t.name in local:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        if t.name in forward_defined:  # the branch's own initializers: defined again here
            mapping[t.name] = names.fresh(t.name)
            copy.name = mapping[t.name]
        initializers.append(copy)
    copied = copy_nodes(nodes, mapping, names,
                        rename=lambda o: names.fresh(o) if o in forward_defined else o,
                        rename_node=lambda n: names.fresh(n.name) if n.name in forward_nodes else n.name)
    read = {i for n in copied for i in reads(n)}
    initializers = [t for t in initializers if t.name in read]
    out_vis = [value_info(r, g.dtype(c), g.shape(c)) for r, c in zip(results, needed)]
    return helper.make_graph(copied, f"{prefix}", [], out_vis, initializers)
