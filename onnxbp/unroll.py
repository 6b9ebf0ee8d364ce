"""Unrolling Loop and Scan into plain nodes before differentiation, and scope-aware node copies.

A ``Loop`` or ``Scan`` through which a requested gradient flows is replaced,
before the reverse walk, by one copy of its body per iteration
(:func:`unroll`); the engine then differentiates the copies like any other
nodes.  The node's outputs keep their names and values; only the way they are
computed changes.  Per iteration ``i`` of a copy:

* the body's loop-carried inputs are the previous iteration's carried outputs
  (the node's initial values for ``i = 0``); the node's final carried outputs
  are an ``Identity`` of the last iteration's;
* ``Loop``: the iteration-number input is a constant ``i`` (int64), the
  condition input a constant ``true``; per-iteration scan outputs are stacked
  as ``Concat(Unsqueeze(v_0, 0), ..., Unsqueeze(v_{n-1}, 0), axis=0)``;
* ``Scan``: each scan input is cut once into its ``n`` slices along its scan
  axis (``Split`` and ``Squeeze``), iteration ``i`` reading slice ``i`` (or
  ``n - 1 - i`` in reverse direction); scan outputs are stacked with
  ``Unsqueeze``/``Concat`` along their scan output axes (in reverse order for
  reverse direction);
* outer-scope tensors the body reads are read by every copy, so their
  gradients accumulate over the iterations (the engine's fan-out ``Sum``).

Every name a copy defines (its tensors, node names, the names inside nested
subgraphs) is fresh from the one naming authority (:mod:`onnxbp.naming`):
``<node>/iter<i>/<body name>``.  A nested If stays an If (differentiated by
its rule); a nested Loop or Scan becomes a top-level node that the engine
unrolls in its next round.

What is unrolled (anything else is refused with :class:`UnsupportedOpError`,
naming the node): a ``Loop`` whose trip count ``M`` is a build-time constant
(an initializer or a ``Constant``), whose initial condition is absent or a
constant, and whose body passes the condition through unchanged (or sets it
to a constant true); a ``Scan`` of opset 9 or later whose scan inputs have a
static length on their scan axes; at most :data:`MAX_ITERATIONS` iterations
and :data:`MAX_NODES` copied nodes; tensor-typed carried values and scan
outputs only.

:func:`copy_nodes` and :func:`prune_nodes` are the scope-aware helpers the
If rule (:mod:`onnxbp.controlflow`) shares: copies whose references into
nested subgraphs follow a renaming, and dead-node removal that counts what
subgraphs read.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UnsupportedOpError
from .graphview import GraphView
from .naming import NameAuthority, reads
from .writer import GraphWriter

log = logging.getLogger(__name__)

#: The most iterations one Loop or Scan is unrolled to.
MAX_ITERATIONS = 1024
#: The most body nodes one unrolled Loop or Scan may copy in all (iterations x body nodes).
MAX_NODES = 100_000

SUPPORTED = (f"control flow is differentiated for If (both branches) and, by unrolling (at most "
             f"{MAX_ITERATIONS} iterations), for Loop with a build-time constant trip count M whose condition "
             f"is absent, constant or passed through the body unchanged, and for Scan (opset 9 or later) with "
             f"a static scan-axis length")

LOOP_OPS = ("Loop", "Scan")


def is_loop(node: onnx.NodeProto) -> bool:
    """A default-domain Loop or Scan (what :func:`unroll` handles)."""
    return node.op_type in LOOP_OPS and node.domain in ("", "ai.onnx")


def unroll(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], view: GraphView) -> int:
    """Replace each of ``nodes`` (Loop/Scan nodes of ``model.graph``) by its iterations, in place.

    ``view`` is the :class:`GraphView` of ``model`` (constants, shapes, labels,
    the naming authority).  Raises :class:`UnsupportedOpError` naming the node
    when one cannot be unrolled.  Returns the number of nodes written.
    """
    targets = {id(n) for n in nodes}
    w = GraphWriter(view.names, view.opset, view.infos, prefix="onnxbp/unroll",
                    doc="onnxbp: unrolled control flow", const_base="onnxbp/unroll/const")
    out: list = []
    written = 0
    for node in model.graph.node:
        if id(node) not in targets:
            out.append(node)
            continue
        label = view.label(node)
        scope = w.scoped(f"{label}/unroll", f"onnxbp: unrolled {node.op_type} '{label}'")
        iterations = (_unroll_loop if node.op_type == "Loop" else _unroll_scan)(node, label, view, scope)
        tmp = onnx.GraphProto()
        written += len(w.flush_into(tmp, model.ir_version))
        out.extend(tmp.node)
        model.graph.initializer.extend(tmp.initializer)
        model.graph.input.extend(tmp.input)
        log.info("unrolled %s '%s': %d iterations", node.op_type, label, iterations)
    del model.graph.node[:]
    model.graph.node.extend(out)
    return written


# ------------------------------------------------------------------ refusals
def _refuse(node: onnx.NodeProto, label: str, why: str) -> None:
    raise UnsupportedOpError(f"node '{label}' (op {node.op_type}) is not unrolled, and a requested gradient "
                             f"flows through it: {why}; {SUPPORTED}")


def _check_tensor_types(node, label, values: Sequence[onnx.ValueInfoProto], what: str) -> None:
    for vi in values:
        kind = vi.type.WhichOneof("value")
        if kind not in (None, "tensor_type"):
            _refuse(node, label, f"its {what} {vi.name!r} is a {kind.replace('_type', '')}, not a tensor")


def _check_size(node, label, iterations: int, body: onnx.GraphProto) -> None:
    if iterations > MAX_ITERATIONS:
        _refuse(node, label, f"its trip count {iterations} exceeds the limit of {MAX_ITERATIONS} iterations")
    if iterations * len(body.node) > MAX_NODES:
        _refuse(node, label, f"{iterations} iterations of its {len(body.node)}-node body exceed the limit of "
                             f"{MAX_NODES} unrolled nodes")


# ---------------------------------------------------------------------- Loop
def _passes_true(body: onnx.GraphProto, cond_in: str, cond_out: str, view: GraphView) -> bool:
    """Whether the body's condition output stays true when its condition input is true."""
    producers = {o: n for n in body.node for o in n.output if o}
    name, seen = cond_out, set()
    while name not in seen:
        seen.add(name)
        if name == cond_in:
            return True
        node = producers.get(name)
        if node is None:  # an outer-scope tensor
            value = view.constant_value(name)
            return value is not None and value.size == 1 and bool(value.reshape(-1)[0])
        if node.op_type == "Identity":
            name = node.input[0]
            continue
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return value is not None and bool(np.all(numpy_helper.to_array(value)))
        return False
    return False


def _unroll_loop(node: onnx.NodeProto, label: str, view: GraphView, w: GraphWriter) -> int:
    body = next(a.g for a in node.attribute if a.name == "body")
    trip = node.input[0] if len(node.input) > 0 else ""
    cond = node.input[1] if len(node.input) > 1 else ""
    init = list(node.input[2:])
    n_carried = len(init)
    n_scan = len(body.output) - 1 - n_carried
    if not trip:
        _refuse(node, label, "it has no trip count M (it runs until its condition turns false)")
    m = view.constant_value(trip)
    if m is None or m.size != 1:
        _refuse(node, label, f"its trip count M ({trip!r}) is computed at run time, not a build-time constant")
    iterations = max(int(m.reshape(-1)[0]), 0)
    if cond:
        c = view.constant_value(cond)
        if c is None or c.size != 1:
            _refuse(node, label, f"its initial condition ({cond!r}) is computed at run time")
        if not bool(c.reshape(-1)[0]):
            iterations = 0
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if not _passes_true(body, cond_in, cond_out, view):
        _refuse(node, label, f"its body computes its condition {cond_out!r}, so the number of iterations "
                             f"depends on the data")
    _check_size(node, label, iterations, body)
    _check_tensor_types(node, label, list(body.input[2:]) + list(body.output[1:]),
                        "loop-carried value or scan output")
    if iterations == 0 and n_scan and any(node.output[n_carried:]):
        _refuse(node, label, "it runs no iteration, so its scan outputs have no static shape")

    read = _names_read(body)
    carried = init
    scans: list = [[] for _ in range(n_scan)]
    bool_true = np.ones(_static_shape(body.input[1]), dtype=bool)
    consts = _body_constants(body, w)
    for i in range(iterations):
        mapping = dict(consts)
        if body.input[0].name in read:
            mapping[body.input[0].name] = w.const(np.full(_static_shape(body.input[0]), i, dtype=np.int64))
        if cond_in in read:
            mapping[cond_in] = w.const(bool_true)
        for vi, value in zip(body.input[2:], carried):
            mapping[vi.name] = value
        w.add_nodes(copy_nodes(body.node, mapping, w.names, prefix=f"{label}/iter{i}"))
        outs = [mapping.get(o.name, o.name) for o in body.output]
        carried = outs[1:1 + n_carried]
        for k in range(n_scan):
            scans[k].append(outs[1 + n_carried + k])
    for k, name in enumerate(node.output[:n_carried]):
        if name:
            w.op("Identity", carried[k], out=name, name=f"carried{k}")
    for k, name in enumerate(node.output[n_carried:n_carried + n_scan]):
        if name:
            w.op("Concat", *[w.unsqueeze(v, [0]) for v in scans[k]], out=name, name=f"scan_output{k}", axis=0)
    return iterations


# ---------------------------------------------------------------------- Scan
def _unroll_scan(node: onnx.NodeProto, label: str, view: GraphView, w: GraphWriter) -> int:
    if view.opset < 9:
        _refuse(node, label, f"Scan-8 (opset {view.opset}: a batch axis and sequence_lens) is not unrolled")
    body = next(a.g for a in node.attribute if a.name == "body")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n_in = int(attrs["num_scan_inputs"])
    n_state = len(node.input) - n_in
    n_out = len(body.output) - n_state
    in_axes = list(attrs.get("scan_input_axes") or [0] * n_in)
    in_dirs = list(attrs.get("scan_input_directions") or [0] * n_in)
    out_axes = list(attrs.get("scan_output_axes") or [0] * n_out)
    out_dirs = list(attrs.get("scan_output_directions") or [0] * n_out)
    _check_tensor_types(node, label, list(body.input) + list(body.output), "state or scan value")
    xs = list(node.input[n_state:])
    length, axes = None, []
    for x, axis in zip(xs, in_axes):
        shape = view.info(x).shape
        if shape is None:
            _refuse(node, label, f"the rank of its scan input {x!r} is unknown")
        axis = axis % len(shape)
        axes.append(axis)
        dim = shape[axis]
        if not isinstance(dim, int):
            _refuse(node, label, f"the length of axis {axis} of its scan input {x!r} is not static ({dim!r})")
        if length is not None and dim != length:
            _refuse(node, label, f"its scan inputs have different lengths ({length} and {dim})")
        length = dim
    if not length:
        _refuse(node, label, "it has no scan input of static, non-zero length")
    _check_size(node, label, length, body)

    slices = []
    for x, axis in zip(xs, axes):
        if length == 1:
            parts = [x]
        elif w.opset >= 13:
            parts = list(w.op("Split", x, w.ints([1] * length), outputs=length, name="slices", axis=axis))
        else:
            parts = list(w.op("Split", x, outputs=length, name="slices", axis=axis, split=[1] * length))
        slices.append([w.squeeze(p, [axis]) for p in parts])
    state = list(node.input[:n_state])
    scans: list = [[] for _ in range(n_out)]
    consts = _body_constants(body, w)
    for i in range(length):
        mapping = dict(consts)
        for vi, value in zip(body.input[:n_state], state):
            mapping[vi.name] = value
        for j, vi in enumerate(body.input[n_state:]):
            mapping[vi.name] = slices[j][i if in_dirs[j] == 0 else length - 1 - i]
        w.add_nodes(copy_nodes(body.node, mapping, w.names, prefix=f"{label}/iter{i}"))
        outs = [mapping.get(o.name, o.name) for o in body.output]
        state = outs[:n_state]
        for k in range(n_out):
            scans[k].append(outs[n_state + k])
    for k, name in enumerate(node.output[:n_state]):
        if name:
            w.op("Identity", state[k], out=name, name=f"state{k}")
    for k, name in enumerate(node.output[n_state:n_state + n_out]):
        if name:
            values = scans[k] if out_dirs[k] == 0 else scans[k][::-1]
            axis = out_axes[k]
            w.op("Concat", *[w.unsqueeze(v, [axis]) for v in values], out=name, name=f"scan_output{k}", axis=axis)
    return length


# ------------------------------------------------------------------ helpers
def _static_shape(vi: onnx.ValueInfoProto) -> tuple:
    """The declared shape of a body input (scalar when undeclared); unknown dims count as 1."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)


def _body_constants(body: onnx.GraphProto, w: GraphWriter) -> dict:
    """The body's initializers, as constants every iteration reads: ``{body name: outer name}``."""
    return {t.name: w.const(numpy_helper.to_array(t)) for t in body.initializer}


def _names_read(graph: onnx.GraphProto) -> set:
    """Every name a node of ``graph`` (or of a nested subgraph, from outside it) reads."""
    read = set()
    for node in graph.node:
        read.update(reads(node))
    read.update(o.name for o in graph.output)
    return read


def _subgraph_attrs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a, [a.g]
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield a, list(a.graphs)


def copy_nodes(nodes: Sequence[onnx.NodeProto], mapping: dict, names: NameAuthority, *,
               prefix: Optional[str] = None,
               rename: Optional[Callable[[str], str]] = None,
               rename_node: Optional[Callable[[onnx.NodeProto], str]] = None) -> list:
    """Copies of ``nodes`` whose inputs read ``mapping.get(name, name)``, also inside nested subgraphs.

    Outputs are renamed by ``rename`` (default: fresh ``<prefix>/<name>``) and
    the renaming recorded in ``mapping``; node names by ``rename_node``
    (default: fresh ``<prefix>/<name or op>``).  Names defined inside nested
    subgraphs (their inputs, initializers and node outputs) are always fresh,
    so copies never collide with their originals.
    """
    if rename is None:
        def rename(o: str) -> str:
            return names.fresh(f"{prefix}/{o}")
    if rename_node is None:
        def rename_node(n: onnx.NodeProto) -> str:
            return names.fresh(f"{prefix}/{n.name or n.op_type}")
    out = []
    for node in nodes:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = rename_node(node)
        for k, name in enumerate(node.input):
            if name:
                new.input[k] = mapping.get(name, name)
        for attr, graphs in _subgraph_attrs(new):
            copies = [_copy_graph(g, mapping, names) for g in graphs]
            if attr.type == onnx.AttributeProto.GRAPH:
                attr.g.CopyFrom(copies[0])
            else:
                del attr.graphs[:]
                attr.graphs.extend(copies)
        for k, name in enumerate(node.output):
            if name:
                new_name = rename(name)
                mapping[name] = new_name
                new.output[k] = new_name
        out.append(new)
    return out


def _copy_graph(graph: onnx.GraphProto, outer: dict, names: NameAuthority) -> onnx.GraphProto:
    """A copy of a nested subgraph: what it defines gets fresh names, what it reads from outside follows ``outer``."""
    mapping = dict(outer)
    new = onnx.GraphProto()
    new.CopyFrom(graph)
    for vi in new.input:
        mapping[vi.name] = names.fresh(vi.name)
        vi.name = mapping[vi.name]
    for t in new.initializer:
        mapping[t.name] = names.fresh(t.name)
        t.name = mapping[t.name]
    for t in new.sparse_initializer:
        mapping[t.values.name] = names.fresh(t.values.name)
        t.values.name = mapping[t.values.name]
    nodes = copy_nodes(graph.node, mapping, names, rename=names.fresh,
                       rename_node=lambda n: names.fresh(n.name or n.op_type))
    del new.node[:]
    new.node.extend(nodes)
    for vi in new.output:
        vi.name = mapping.get(vi.name, vi.name)
    del new.value_info[:]  # shape inference finds them again under the new names
    return new


def prune_nodes(nodes: Sequence[onnx.NodeProto], keep: Sequence[str]) -> list:
    """The nodes some name in ``keep`` depends on, in order (what nested subgraphs read counts)."""
    needed = set(keep)
    kept = []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output if o):
            kept.append(node)
            needed.update(reads(node))
    kept.reverse()
    return kept
