"""Check a gradient rule in one call: build a one-node model, differentiate it, compare.

:func:`check_rule` is what onnxbp's own op table runs for every built-in rule
(``tests/optable.py``), and what a user runs for a rule of their own::

    report = onnxbp.testing.check_rule("Softsign", inputs={"X": (3, 4)})

It

1. builds a one-node model (:func:`one_node_model`; output types come from
   onnx shape inference),
2. builds its gradient model with :func:`onnxbp.gradient`,
3. checks that every node onnxbp emitted is a standard-domain op and that the
   gradient model passes ``onnx.checker.check_model(full_check=True)``,
4. runs the gradient model on random upstream gradients and checks each
   gradient's shape and dtype,
5. compares with finite differences (:func:`onnxbp.check_gradients`): float64
   central differences where onnxruntime has a float64 kernel for the op
   (default ``rtol=1e-4``), else float32 random directions (``rtol=1e-3``),
6. optionally compares with a reference vector-Jacobian product
   ``reference(values, upstream, wrt) -> {input name: gradient}`` (normwise:
   ``max|ours - ref| <= ref_atol + ref_rtol * max|ref|``); :func:`torch_vjp`
   turns a torch forward function into one.

On failure it raises ``AssertionError`` with a one-line message naming the
op, the input and the error; otherwise it returns a :class:`RuleCheck` with
the models, the values used and the worst errors.

Inputs
------
``inputs`` lists the node's inputs in order (a dict, or ``(name, spec)``
pairs).  A spec is

* a shape tuple such as ``(3, 4)``: a float32 graph input, standard normal
  values drawn from ``seed`` (the upstream gradients and the checker's draws
  come from other streams: never the inputs' values, even for arrays the
  caller drew from ``np.random.default_rng(seed)``);
* a numpy array: a graph input fed with that value (any dtype: integer
  indices, boolean conditions, or floats from a chosen domain such as
  positive values for ``Log``);
* :func:`constant` ``(array)``: an initializer (axes, shapes, pads, a fixed
  exponent), not a graph input;
* ``None``: an omitted optional input.

``wrt`` defaults to every floating-point graph input that is not at one of
the rule's ``non_differentiable_inputs``.

A custom-domain op
------------------
onnxruntime runs an op of a custom domain only if it knows its kernel; the
portable way is an ONNX *model-local function* (a ``FunctionProto`` whose
body is standard ops), passed in ``functions``.  onnxruntime runs (inlines)
the function for the forward and the finite differences; onnxbp sees the
node itself and calls the registered rule.  Function bodies are typed by
their inputs, so write constants with ``CastLike`` and the float64
finite-difference check works too::

    import numpy as np
    import onnxbp
    import onnxbp.testing
    from onnx import helper, TensorProto

    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    softsign = helper.make_function(
        "my.ops", "MySoftsign", ["X"], ["Y"],
        [helper.make_node("Constant", [], ["one_f"], value=one),
         helper.make_node("CastLike", ["one_f", "X"], ["one"]),
         helper.make_node("Abs", ["X"], ["ax"]),
         helper.make_node("Add", ["one", "ax"], ["den"]),
         helper.make_node("Div", ["X", "den"], ["Y"])],
        [helper.make_opsetid("", 17)])

    @onnxbp.register_gradient("MySoftsign", domain="my.ops", smoothness="smooth")
    def my_softsign_grad(g):
        x = g.input(0)
        denom = g.op("Add", g.const(1.0, like=x), g.op("Abs", x))
        return [g.op("Div", g.grad_output(0), g.op("Mul", denom, denom))]

    report = onnxbp.testing.check_rule(
        "MySoftsign", domain="my.ops", functions=[softsign],
        inputs={"X": (3, 4)},
        reference=lambda v, u, wrt: {"X": u["Y"] / (1 + np.abs(v["X"])) ** 2})
    print(report.summary())
    # MySoftsign (my.ops, opset 17): ok; finite differences (float64) 1.3e-07; reference 1.3e-07

A wrong rule (say ``Div(dY, denom)`` instead of ``Div(dY, denom^2)``) fails
with one line (wrapped here)::

    AssertionError: check_rule MySoftsign (my.ops, opset 17): input 'X': finite
    differences (float64) max rel err 5.7e-01 (max abs err 8.4e-01) > rtol 1e-04

and, with the reference, a second clause ``; input 'X': reference max abs
err ...``.  Forward nodes of a custom domain stay in the gradient model, as
they were; only the nodes onnxbp adds must be standard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .checker import CheckReport, check_gradients
from .engine import gradient
from .metadata import gradient_names
from .modelio import cpu_session
from .registry import REGISTRY, RULE
from .types import FLOAT_TYPES

__all__ = [
    "STANDARD_DOMAINS", "Constant", "constant", "make_model", "one_node_model", "assert_standard",
    "run_gradient", "check_rule", "RuleCheck", "torch_vjp", "relative_error",
]

#: The domains of standard ONNX ops (the only ones a gradient model may add).
STANDARD_DOMAINS = ("", "ai.onnx")

#: Default tolerances: finite differences against float32 gradients
#: (float64 forward / float32 fallback), and the normwise reference check.
FD_RTOL_FLOAT64, FD_RTOL_FLOAT32, FD_ATOL = 1e-4, 1e-3, 1e-6
REF_RTOL, REF_ATOL = 2e-5, 1e-6


# ---------------------------------------------------------------- model building
@dataclass(frozen=True)
class Constant:
    """An input held as an initializer (not a graph input); see :func:`constant`."""

    value: np.ndarray


def constant(value) -> Constant:
    """Mark a node input as an initializer: ``inputs={"X": (2, 3), "axes": constant([1])}``.

    Python ints and lists of ints become int64; floats keep numpy's dtype
    unless given as an array.
    """
    arr = np.asarray(value)
    if arr.dtype == np.int32 and not isinstance(value, np.ndarray):
        arr = arr.astype(np.int64)
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
    outs = []
    for o in g_outs:
        if o in given:
            dtype, shape = given[o]
            outs.append(helper.make_tensor_value_info(o, _elem(dtype), shape))
            continue
        vi = known.get(o)
        tt = vi.type.tensor_type if vi is not None and vi.type.HasField("tensor_type") else None
        if tt is None or not tt.elem_type:
            raise ValueError(f"{op_type}: onnx shape inference gives no type for output {o!r}; "
                             f"pass output_types={{{o!r}: (dtype, shape)}}")
        vi2 = onnx.ValueInfoProto()
        vi2.CopyFrom(vi)
        if not tt.HasField("shape"):  # rank unknown: the checker wants a shape field
            raise ValueError(f"{op_type}: onnx shape inference gives no rank for output {o!r}; "
                             f"pass output_types={{{o!r}: (dtype, shape)}}")
        outs.append(vi2)
    model = onnx.ModelProto()
    model.CopyFrom(draft)
    del model.graph.output[:]
    model.graph.output.extend(outs)
    onnx.checker.check_model(model, full_check=True)
    return model


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


def relative_error(ours, ref) -> tuple:
    """``(max|a-b|, max|b|)`` in float64 (the normwise error and its scale)."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return err, scale


# ---------------------------------------------------------------- check_rule
@dataclass
class RuleCheck:
    """What :func:`check_rule` did and found (``failures`` is empty when it passed)."""

    op_type: str
    domain: str
    opset: int
    model: onnx.ModelProto
    grad_model: Optional[onnx.ModelProto] = None
    wrt: list = field(default_factory=list)
    feeds: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    fd: Optional[CheckReport] = None
    fd_rtol: float = 0.0
    reference_errors: dict = field(default_factory=dict)  # input -> normwise relative error
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def fd_precision(self) -> str:
        return self.fd.precision if self.fd is not None else ""

    @property
    def fd_max_rel_err(self) -> float:
        if self.fd is None or not self.fd.results:
            return float("nan")
        return max(r.max_rel_err for r in self.fd.results)

    @property
    def ref_max_rel_err(self) -> float:
        return max(self.reference_errors.values()) if self.reference_errors else float("nan")

    @property
    def where(self) -> str:
        return f"{self.op_type} ({self.domain or 'ai.onnx'}, opset {self.opset})"

    def summary(self) -> str:
        parts = [f"{self.where}: " + ("ok" if self.passed else "FAIL")]
        if self.fd is not None:
            parts.append(f"finite differences ({self.fd_precision}) {self.fd_max_rel_err:.1e}")
        if self.reference_errors:
            parts.append(f"reference {self.ref_max_rel_err:.1e}")
        return "; ".join(parts) + ("" if self.passed else " -- " + "; ".join(self.failures))

    def message(self) -> str:
        """The one-line failure message :func:`check_rule` raises."""
        return f"check_rule {self.where}: " + "; ".join(self.failures)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _materialize(items, rng) -> list:
    out = []
    for name, spec in items:
        if _is_shape(spec):
            spec = rng.standard_normal(tuple(int(d) for d in spec)).astype(np.float32)
        elif spec is not None and not isinstance(spec, Constant):
            spec = np.asarray(spec)  # numpy scalars too: onnxruntime feeds arrays
        out.append((name, spec))
    return out


def check_rule(op_type: str, inputs, attrs: Optional[Mapping[str, Any]] = None, *,
               domain: str = "", opset: int = 17, wrt: Optional[Sequence[str]] = None,
               outputs: Union[int, Sequence[str]] = 1, graph_outputs: Optional[Sequence[str]] = None,
               functions: Sequence[onnx.FunctionProto] = (), domain_version: int = 1,
               output_types: Optional[Mapping] = None,
               reference: Optional[Callable] = None, rtol: Optional[float] = None, atol: float = FD_ATOL,
               ref_rtol: float = REF_RTOL, ref_atol: float = REF_ATOL, precision: str = "auto",
               upstream: Optional[Mapping] = None, seed: int = 0, finite_differences: bool = True,
               raise_on_failure: bool = True, registry=None, **gradient_options) -> RuleCheck:
    """Check the gradient rule of ``op_type`` on one node; see the module docstring.

    ``rtol``/``atol``: finite-difference tolerances (``rtol`` defaults to 1e-4
    with a float64 forward, 1e-3 with the float32 fallback).  ``reference``:
    ``reference(values, upstream, wrt) -> {name: gradient}`` with ``values``
    the node inputs by name (float inputs as float64), ``upstream`` the
    upstream gradient of each float graph output (float64); compared with
    ``ref_rtol``/``ref_atol``.  ``precision``: ``"auto"``, ``"float64"`` or
    ``"float32"`` for the finite differences; ``finite_differences=False``
    skips them (a reference is then required).  ``registry`` and other
    keyword options go to :func:`onnxbp.gradient`.  Raises ``AssertionError``
    (one line) unless ``raise_on_failure=False``; returns a :class:`RuleCheck`.
    """
    # Independent streams for the inputs, the upstream gradients and the checker's draws: an
    # upstream equal to the input (same seed, same shape) would hide errors in normalisations,
    # whose VJP vanishes on span{1, x}.
    items = _materialize(_input_list(inputs), np.random.default_rng([seed, 1]))
    fd_seed = int(np.random.SeedSequence([seed, 3]).generate_state(1)[0])
    model = one_node_model(op_type, items, attrs, outputs=outputs, graph_outputs=graph_outputs,
                           domain=domain, opset=opset, domain_version=domain_version, functions=functions,
                           output_types=output_types)
    check = RuleCheck(op_type, domain, opset, model)

    def fail(msg: str) -> RuleCheck:
        check.failures.append(msg)
        if raise_on_failure:
            raise AssertionError(check.message())
        return check

    reg = registry if registry is not None else REGISTRY
    entry = reg.lookup(op_type, domain, opset if domain in STANDARD_DOMAINS else domain_version)
    if entry is None or entry.kind != RULE:
        what = "no entry" if entry is None else f"a {entry.kind} entry"
        return fail(f"the registry has {what}, not a gradient rule, for this op")
    feeds = {n: v for n, v in items if v is not None and not isinstance(v, Constant)}
    check.feeds = feeds
    if wrt is None:
        nd = set(entry.non_differentiable_inputs)
        wrt = [n for k, (n, v) in enumerate(items) if n in feeds and k not in nd
               and _elem(np.asarray(v).dtype) in FLOAT_TYPES]
    check.wrt = list(wrt)
    if not check.wrt:
        return fail("no differentiable float input to check (pass wrt=)")
    options = dict(gradient_options)
    if registry is not None:
        options["registry"] = registry
    try:
        gm = gradient(model, check.wrt, **options)
    except Exception as exc:  # noqa: BLE001 - reported as the check's failure
        check.failures.append(f"building the gradient model failed: {_first_line(exc)}")
        if raise_on_failure:
            raise AssertionError(check.message()) from exc
        return check
    check.grad_model = gm
    try:
        assert_standard(gm, forward=model)
    except Exception as exc:  # noqa: BLE001
        return fail(_first_line(exc) if not isinstance(exc, AssertionError) else str(exc))
    try:
        _, grads, ups = _run_grad_model(gm, model, feeds, upstream, [seed, 2])
    except Exception as exc:  # noqa: BLE001
        return fail(f"running the gradient model failed: {_first_line(exc)}")
    check.grads, check.upstream = grads, ups
    for p in check.wrt:
        want = np.asarray(feeds[p])
        got = np.asarray(grads[p])
        if got.shape != want.shape or got.dtype != want.dtype:
            fail(f"input {p!r}: gradient is {got.dtype}{list(got.shape)}, the input {want.dtype}{list(want.shape)}")
    if check.failures:
        return check

    if finite_differences:
        try:
            rep = check_gradients(model, check.wrt, feeds=feeds, grad_model=gm, seed=fd_seed,
                                  rtol=FD_RTOL_FLOAT64 if rtol is None else rtol, atol=atol, precision=precision)
            if rtol is None and rep.precision == "float32":
                rep = check_gradients(model, check.wrt, feeds=feeds, grad_model=gm, seed=fd_seed,
                                      rtol=FD_RTOL_FLOAT32, atol=atol, precision=precision)
        except Exception as exc:  # noqa: BLE001
            return fail(f"finite differences failed to run: {_first_line(exc)}")
        check.fd = rep
        check.fd_rtol = rtol if rtol is not None else (FD_RTOL_FLOAT32 if rep.precision == "float32"
                                                      else FD_RTOL_FLOAT64)
        for r in rep.results:
            if not r.passed:
                detail = f" ({r.note})" if r.note else ""
                check.failures.append(
                    f"input {r.name!r}: finite differences ({rep.precision}) max rel err {r.max_rel_err:.1e} "
                    f"(max abs err {r.max_abs_err:.1e}) > rtol {check.fd_rtol:.0e}{detail}")
    elif reference is None:
        return fail("finite_differences=False needs a reference")

    if reference is not None:
        values = {}
        for n, v in items:  # in node-input order; None for omitted inputs
            v = v.value if isinstance(v, Constant) else v
            values[n] = None if v is None else (np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f"
                                                else np.asarray(v))
        ups64 = {o.name: np.asarray(ups[o.name], dtype=np.float64) for o in model.graph.output if o.name in ups}
        try:
            ref = reference(values, ups64, list(check.wrt))
        except Exception as exc:  # noqa: BLE001
            return fail(f"the reference failed: {_first_line(exc)}")
        if not isinstance(ref, Mapping):
            ref = dict(zip(check.wrt, ref))
        for p in check.wrt:
            if p not in ref or ref[p] is None:
                continue
            r = np.asarray(ref[p], dtype=np.float64)
            if r.shape != np.shape(grads[p]):
                check.failures.append(f"input {p!r}: reference gradient shape {list(r.shape)} "
                                      f"!= {list(np.shape(grads[p]))}")
                continue
            err, scale = relative_error(grads[p], r)
            check.reference_errors[p] = err / max(scale, 1e-30)
            if not err <= ref_atol + ref_rtol * scale:
                check.failures.append(f"input {p!r}: reference max abs err {err:.1e} > "
                                      f"{ref_atol:.0e} + {ref_rtol:.0e} * {scale:.1e} "
                                      f"(rel err {err / max(scale, 1e-30):.1e})")
    if check.failures and raise_on_failure:
        raise AssertionError(check.message())
    return check


def torch_vjp(fn: Callable) -> Callable:
    """A ``reference`` for :func:`check_rule` from a torch forward function.

    ``fn(*inputs)`` takes the node's inputs in order as torch tensors (float
    inputs in float64, ``None`` for omitted ones) and returns the float graph
    outputs (a tensor, or a tuple in graph-output order).  The returned
    reference differentiates it with torch autograd in float64.  Needs torch
    (a test extra; imported when the reference is called).
    """

    def reference(values: Mapping, upstream: Mapping, wrt: Sequence[str]) -> dict:
        import torch

        args, leaves = [], {}
        for name, v in values.items():
            if v is None:
                args.append(None)
                continue
            t = torch.from_numpy(np.array(v))
            if name in wrt:
                t = t.to(torch.float64).requires_grad_(True)
                leaves[name] = t
            args.append(t)
        outs = fn(*args)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        names = list(upstream)
        if len(outs) != len(names):
            raise ValueError(f"the torch function returned {len(outs)} outputs, the model has "
                             f"{len(names)} float graph outputs {names}")
        pairs = [(o, torch.from_numpy(np.asarray(upstream[n])).to(o.dtype)) for o, n in zip(outs, names)
                 if o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
        return {n: (t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape)))
                for n, t in leaves.items()}

    return reference
