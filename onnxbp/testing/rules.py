"""``check_rule``: one call checks a gradient rule (see :mod:`onnxbp.testing`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from ..checker import CheckReport, check_gradients
from ..engine import gradient
from ..registry import REGISTRY, RULE
from ..types import FLOAT_TYPES
from .models import (
    STANDARD_DOMAINS,
    Constant,
    _elem,
    _input_list,
    _is_shape,
    _run_grad_model,
    assert_standard,
    one_node_model,
)

#: Default tolerances: finite differences against float32 gradients
#: (float64 forward / float32 fallback), and the normwise reference check.
FD_RTOL_FLOAT64, FD_RTOL_FLOAT32, FD_ATOL = 1e-4, 1e-3, 1e-6
REF_RTOL, REF_ATOL = 2e-5, 1e-6


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
    consts = {n: v.value for n, v in items if isinstance(v, Constant)}
    for p in check.wrt:  # graph inputs or initializers
        want = np.asarray(feeds[p] if p in feeds else consts[p])
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
