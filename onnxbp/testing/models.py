"""Tiny models for gradient tests: one-node models, running gradient models, the standard-ops check.

The building blocks of :func:`onnxbp.testing.check_rule`, public for tests
that need more than one node (see :mod:`onnxbp.testing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..engine import gradient
from ..metadata import gradient_names
from ..modelio import cpu_session

#: The domains of standard ONNX ops (the only ones a gradient model may add).
STANDARD_DOMAINS = ("", "ai.onnx")

# ---------------------------------------------------------------- model building
@dataclass(frozen=True)
class Constant:
    """An input held as an initializer (not a graph input); see :func:`constant`."""

    value: np.ndarray


def constant(value) -> Constant:
    """Mark a node input as an initializer: ``inputs={"X": (2, 3), "axes": constant([1])}``.

    Python ints (and lists of them) become int64 and Python floats float32;
    numpy arrays and scalars keep their dtype.
    """
    arr = np.asarray(value)
    if not isinstance(value, (np.ndarray, np.generic)):
        arr = arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32 if arr.dtype.kind == "f" else arr.dtype)
    return Constant(arr)


def _elem(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _ir_version(model: onnx.ModelProto, opset: int, ir_version: Optional[int]) -> None:
    if ir_version is not None:
        model.ir_version = ir_version
    elif opset <= 21:
        model.ir_version = min(model.ir_version, 10)


def make_model(nodes, inputs: Sequence, outputs: Sequence, initializers: Mapping = None,
               opset: int = 17, ir_version: Optional[int] = None, check: bool = True, *,
               functions: Sequence[onnx.FunctionProto] = (),
               opset_imports: Optional[Mapping[str, int]] = None) -> onnx.ModelProto:
    """A model from nodes.

    ``inputs``/``outputs``: ``(name, dtype, shape-or-None)``; ``initializers``:
    ``{name: array}``; ``functions``: model-local functions; ``opset_imports``:
    extra ``{domain: version}`` (the domains of ``functions`` are imported at
    version 1 unless given).  ``ir_version`` defaults to at most 10 for opsets
    <= 21 (what onnxruntime reads); ``check`` runs the full onnx checker.
    """
    graph = helper.make_graph(
        list(nodes), "test",
        [helper.make_tensor_value_info(n, _elem(t), s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, _elem(t), s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
    )
    imports = {"": opset}
    for fn in functions:
        imports.setdefault(fn.domain, 1)
        for imp in fn.opset_import:
            imports.setdefault(imp.domain, imp.version)
    imports.update(opset_imports or {})
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in imports.items()],
                              functions=list(functions) or None)
    _ir_version(model, opset, ir_version)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _input_list(inputs) -> list:
    items = list(inputs.items()) if isinstance(inputs, Mapping) else [tuple(i) for i in inputs]
    names = [n for n, _ in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"input names must be unique, repeated: {dup}")
    return items


def _is_shape(spec) -> bool:
    return isinstance(spec, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in spec)


def one_node_model(op_type: str, inputs, attrs: Optional[Mapping[str, Any]] = None, *,
                   outputs: Union[int, Sequence[str]] = 1, graph_outputs: Optional[Sequence[str]] = None,
                   domain: str = "", opset: int = 17, domain_version: int = 1,
                   functions: Sequence[onnx.FunctionProto] = (), output_types: Optional[Mapping] = None,
                   node_name: str = "op", ir_version: Optional[int] = None) -> onnx.ModelProto:
    """A model with one node ``op_type(inputs) -> outputs``, checked with onnx's full checker.

    ``inputs``: see the module docstring (shape tuple, array, :func:`constant`,
    ``None``).  ``outputs``: a count (1 gives ``Y``, n gives ``Y0..Y{n-1}``)
    or names (``""`` for an omitted optional output).  ``graph_outputs``: the
    node outputs that become graph outputs (default: all).  Their types come
    from onnx shape inference (a custom-domain op needs a function in
    ``functions``, or ``output_types={name: (dtype, shape)}``).
    """
    items = _input_list(inputs)
    out_names = ([("Y" if outputs == 1 else f"Y{k}") for k in range(outputs)]
                 if isinstance(outputs, int) else list(outputs))
    g_outs = [o for o in out_names if o] if graph_outputs is None else list(graph_outputs)
    clash = sorted({n for n, _ in items} & {o for o in out_names if o})
    if clash:
        raise ValueError(f"{op_type}: names used for both an input and an output: {clash}")
    missing = [o for o in g_outs if o not in out_names]
    if missing:
        raise ValueError(f"graph_outputs {missing} are not outputs of the node ({out_names})")
    node_inputs, graph_inputs, inits = [], [], {}
    for name, spec in items:
        if spec is None:
            node_inputs.append("")
            continue
        node_inputs.append(name)
        if isinstance(spec, Constant):
            inits[name] = spec.value
        elif _is_shape(spec):
            graph_inputs.append((name, np.float32, [int(d) for d in spec]))
        else:
            arr = np.asarray(spec)
            graph_inputs.append((name, arr.dtype, list(arr.shape)))
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    node = helper.make_node(op_type, node_inputs, out_names, name=node_name, domain=domain or None,
                            **dict(attrs or {}))
    opset_imports = {} if domain in STANDARD_DOMAINS else {domain: domain_version}
    # Output types from shape inference on an untyped draft.
    draft = make_model([node], graph_inputs, [], inits, opset, ir_version, check=False,
                       functions=functions, opset_imports=opset_imports)
    draft.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in g_outs)
    given = dict(output_types or {})
    try:
        inferred = onnx.shape_inference.infer_shapes(draft, strict_mode=False, data_prop=True)
        known = {vi.name: vi for vi in list(inferred.graph.output) + list(inferred.graph.value_info)}
    except Exception:  # noqa: BLE001 - fall through to the message below
        known = {}
    untyped = [o for o in g_outs if o not in given and not _has_rank(known.get(o))]
    if untyped:  # ops onnx has no inference for (GroupNormalization): onnxbp's shape inference
        from ..shapeinfo import infer

        infos = infer(draft)
        for o in untyped:
            info = infos.get(o)
            if info is not None and info.elem_type and info.shape is not None:
                known[o] = helper.make_tensor_value_info(o, info.elem_type, list(info.shape))
    outs = []
    for o in g_outs:
        if o in given:
            dtype, shape = given[o]
            outs.append(helper.make_tensor_value_info(o, _elem(dtype), shape))
            continue
        vi = known.get(o)
        tt = vi.type.tensor_type if vi is not None and vi.type.HasField("tensor_type") else None
        # The checker wants an element type and a shape field (a rank) on every graph output.
        what = "type" if tt is None or not tt.elem_type else "rank" if not tt.HasField("shape") else None
        if what:
            raise ValueError(f"{op_type}: onnx shape inference gives no {what} for output {o!r}; "
                             f"pass output_types={{{o!r}: (dtype, shape)}}")
        outs.append(vi)
    model = onnx.ModelProto()
    model.CopyFrom(draft)
    del model.graph.output[:]
    model.graph.output.extend(outs)
    onnx.checker.check_model(model, full_check=True)
    return model


def _has_rank(vi) -> bool:
    return vi is not None and vi.type.HasField("tensor_type") and bool(vi.type.tensor_type.elem_type) \
        and vi.type.tensor_type.HasField("shape")


# ---------------------------------------------------------------- checks
def _subgraph_nodes(node: onnx.NodeProto):
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            for n in g.node:
                yield n
                yield from _subgraph_nodes(n)


def assert_standard(model: onnx.ModelProto, forward: Optional[onnx.ModelProto] = None) -> None:
    """Only standard-domain ops, and onnx's full checker passes.

    With ``forward`` (the model the gradient was built from), nodes of the
    forward model are exempt: a custom-domain forward node stays as it was;
    only what onnxbp added must be standard.
    """
    exempt = []
    if forward is not None:
        exempt = [(n.op_type, n.domain, tuple(n.input), {o for o in n.output if o})
                  for n in forward.graph.node if n.domain not in STANDARD_DOMAINS]

    def is_forward(n):
        for k, (op, dom, ins, outs) in enumerate(exempt):
            if n.op_type == op and n.domain == dom and tuple(n.input) == ins and outs <= set(n.output):
                del exempt[k]  # each forward node is exempt once
                return True
        return False

    bad = []
    for n in model.graph.node:
        for m in [n, *_subgraph_nodes(n)]:
            if m.domain not in STANDARD_DOMAINS and not (m is n and is_forward(n)):
                bad.append((m.name, m.op_type, m.domain))
    assert not bad, f"non-standard ops in the gradient model: {bad}"
    onnx.checker.check_model(model, full_check=True)


session = cpu_session  # 1 intra-op thread, no spinning


def _run_grad_model(gm: onnx.ModelProto, model: onnx.ModelProto, feeds: Mapping,
                    upstream: Optional[Mapping] = None, seed: Any = 0):
    names = gradient_names(gm)
    rng = np.random.default_rng(seed)
    fwd_outputs = [o.name for o in model.graph.output]
    ups = dict(upstream or {})
    run_feeds = dict(feeds)
    if len(ups) < len(fwd_outputs):
        fsess = session(model)
        outs = fsess.run(fwd_outputs, {k: v for k, v in feeds.items()
                                       if k in {i.name for i in model.graph.input}})
        for name, y in zip(fwd_outputs, outs):
            if name not in ups and np.issubdtype(np.asarray(y).dtype, np.floating):
                ups[name] = rng.standard_normal(np.shape(y)).astype(np.asarray(y).dtype)
    gm_inputs = {i.name for i in gm.graph.input}
    for name, u in ups.items():
        if name + "_grad" in gm_inputs:
            run_feeds[name + "_grad"] = u
    run_feeds = {k: v for k, v in run_feeds.items() if k in gm_inputs}
    out_names = fwd_outputs + list(names.values())
    res = dict(zip(out_names, session(gm).run(out_names, run_feeds)))
    outputs = {k: res[k] for k in fwd_outputs}
    grads = {p: res[g] for p, g in names.items()}
    return outputs, grads, ups


def run_gradient(model: onnx.ModelProto, feeds: Mapping, wrt=None, upstream: Mapping = None,
                 seed: int = 0, **options):
    """Build the gradient model, check it is standard, run it.

    Returns ``(grad_model, outputs, grads, upstream)``: forward outputs and
    gradients as dicts keyed by forward output / parameter name; upstream
    gradients not given in ``upstream`` are drawn standard normal from ``seed``.
    """
    gm = gradient(model, wrt, **options)
    assert_standard(gm)
    outputs, grads, ups = _run_grad_model(gm, model, feeds, upstream, seed)
    return gm, outputs, grads, ups
