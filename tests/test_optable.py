"""Every built-in gradient rule, driven by the op table (tests/optable.py).

For every entry x opset x attribute combination x sample,
:func:`onnxbp.testing.check_rule`

(a) compares the gradient model with finite differences of the forward model:
    float64 per-element central differences where onnxruntime has float64
    kernels for the op (the checker rewrites Conv, AveragePool, Clip, Erf,
    LRN, HardSigmoid/HardSwish for it), rtol 1e-4 on float32 gradients;
    otherwise float32 random directions with Richardson extrapolation, rtol
    1e-3 (the entry's ``fd_rtol`` overrides both);
(b) compares with torch autograd in float64 on the same inputs where the entry
    has a reference (normwise: max|ours - torch| <= ref_atol + ref_rtol *
    max|torch|; 2e-5 and 1e-6 unless the entry says otherwise);
(c) checks that every node onnxbp emitted is a standard-domain op and that the
    gradient model passes ``onnx.checker.check_model(full_check=True)``.

The worst relative errors go to conftest's "worst relative error per rule
family" summary (family ``table:<rule module>``) and, per op, to
/tmp/onnxbp_relerr_optable.json.

Coverage: ``test_every_rule_has_an_entry`` fails, naming them, when a built-in
rule (kind "rule", default domain) has no entry, and
``test_every_rule_opset_range_is_checked`` when a registered opset range of an
op is never exercised; ``test_every_entry_has_a_rule`` fails when the table
names an op (or an opset) without a rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradutil
import onnxbp
import optable
from gradutil import HAS_TORCH
from onnxbp.registry import RULE
from onnxbp.testing import check_rule, torch_vjp

CASES = optable.cases()
PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail_reason)]
                       if c.xfail_reason else []) for c in CASES]
WORST_BY_OP: dict = {}


def _family(op: str, opset: int) -> str:
    entry = onnxbp.REGISTRY.lookup(op, "", opset)
    module = entry.fn.__module__.rsplit(".", 1)[-1] if entry is not None and entry.fn is not None else "?"
    return f"table:{module}"


def _record(case, report) -> None:
    family = _family(case.entry.op, case.opset)
    kinds = []
    if report.fd is not None:
        kinds.append((f"finite differences ({report.fd_precision})", report.fd_max_rel_err))
    if report.reference_errors:
        kinds.append(("reference (torch/numpy)", report.ref_max_rel_err))
    for kind, rel in kinds:
        if np.isfinite(rel):
            key = (family, kind)
            gradutil.WORST_ERRORS[key] = max(gradutil.WORST_ERRORS.get(key, 0.0), float(rel))
            op_key = f"{case.entry.name} {kind}"
            WORST_BY_OP[op_key] = max(WORST_BY_OP.get(op_key, 0.0), float(rel))


@pytest.fixture(scope="module", autouse=True)
def _dump_errors():
    yield
    if WORST_BY_OP:
        with open("/tmp/onnxbp_relerr_optable.json", "w") as fh:
            json.dump(WORST_BY_OP, fh, indent=1, sort_keys=True)


def _reference(case):
    """torch autograd of the entry's reference, with the outputs matched to the graph outputs by name."""
    if case.entry.ref is None or not case.sample.ref or not HAS_TORCH:
        return None
    fn = case.entry.ref(case.attrs)
    names = case.output_names

    def reference(values, upstream, wrt):
        def graph_outputs(*args):
            outs = fn(*args)
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            by_name = dict(zip(names, outs))
            return tuple(by_name[n] for n in upstream)

        return torch_vjp(graph_outputs)(values, upstream, wrt)

    return reference


@pytest.mark.parametrize("case", PARAMS)
def test_op(case):
    e, s = case.entry, case.sample
    report = check_rule(e.op, case.inputs(), case.attrs, opset=case.opset, wrt=s.wrt, outputs=s.outputs,
                        graph_outputs=s.graph_outputs, reference=_reference(case), rtol=e.fd_rtol,
                        ref_rtol=e.ref_rtol, ref_atol=e.ref_atol, seed=case.seed)
    _record(case, report)
    assert report.fd is not None and report.fd.results  # finite differences ran for every case


# ------------------------------------------------------------------ coverage
def _builtin_rules(registry) -> list:
    """Rules of the default domain registered by onnxbp itself (not by a test or a user)."""
    return [e for e in registry.entries()
            if e.kind == RULE and e.domain in ("", "ai.onnx") and e.fn is not None
            and e.fn.__module__.split(".")[0] == "onnxbp"]


#: Built-in rules checked by their own test file instead of the table (one-node models cannot hold them).
CHECKED_ELSEWHERE = {"If": "tests/test_control_flow.py"}


def missing_entries(registry, table) -> list:
    """Ops with a built-in rule and no table entry (nor a test file of their own)."""
    return sorted({e.op_type for e in _builtin_rules(registry)} - {t.op for t in table} - set(CHECKED_ELSEWHERE))


def unchecked_ranges(registry, cases) -> list:
    """Registered (op, since..until) ranges of ops in the table that no case's opset falls in."""
    opsets = {}
    for c in cases:
        opsets.setdefault(c.entry.op, set()).add(c.opset)
    out = []
    for e in _builtin_rules(registry):
        if e.op_type in opsets and not any(e.since <= v <= e.until for v in opsets[e.op_type]):
            out.append(f"{e.op_type} opsets {e.since}..{'latest' if e.until >= 10_000 else e.until}")
    return out


def entries_without_rule(registry, table) -> list:
    """Table entries (at one of their opsets) for which the registry has no gradient rule."""
    bad = []
    for t in table:
        for opset in t.opsets:
            entry = registry.lookup(t.op, "", opset)
            if entry is None or entry.kind != RULE:
                bad.append(f"{t.name} at opset {opset} ({'no entry' if entry is None else entry.kind})")
    return bad


def test_every_rule_has_an_entry():
    missing = missing_entries(onnxbp.REGISTRY, optable.TABLE)
    assert not missing, f"registered rules with no entry in tests/optable.py: {', '.join(missing)}"


def test_every_rule_opset_range_is_checked():
    """Each registered (op, since..until) range is exercised at one opset of the table at least."""
    uncovered = unchecked_ranges(onnxbp.REGISTRY, CASES)
    assert not uncovered, "registered opset ranges the table never checks: " + "; ".join(uncovered)


def test_every_entry_has_a_rule():
    bad = entries_without_rule(onnxbp.REGISTRY, optable.TABLE)
    assert not bad, "table entries without a gradient rule: " + "; ".join(bad)


def test_every_entry_has_cases():
    counts = {}
    for c in CASES:
        counts[c.entry.name] = counts.get(c.entry.name, 0) + 1
    empty = [e.name for e in optable.TABLE if not counts.get(e.name)]
    assert not empty, f"table entries that produce no case: {empty}"
    ids = [c.id for c in CASES]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    assert not dup, f"duplicate case ids: {dup}"


def test_coverage_checks_see_gaps():
    """The three coverage checks on a made-up registry and table."""
    def rule(g):  # pragma: no cover - never run
        return []

    rule.__module__ = "onnxbp.rules.made_up"
    reg = onnxbp.Registry()
    reg.register("Relu")(rule)
    reg.register("Softmax", until=12)(rule)
    reg.register("Softmax", since=13)(rule)
    reg.register("MyOp", "my.ops")(rule)  # other domains are the user's business
    reg.no_gradient(["Shape"])
    table = [optable.OpInfo("Softmax", (optable.S(X=optable.R(2)),), opsets=(13,)),
             optable.OpInfo("Shape", (optable.S(X=optable.R(2)),))]
    assert missing_entries(reg, table) == ["Relu"]
    assert unchecked_ranges(reg, optable.cases(table)) == ["Softmax opsets 1..12"]
    assert entries_without_rule(reg, table) == ["Shape at opset 17 (no_gradient)"]


def test_every_op_a_rule_emits_has_a_registry_entry():
    """Gradients of gradients (issue 14) need every op a backward graph holds to be differentiable
    again (or declared no-gradient / not-differentiable).  One case per entry and opset."""
    from onnxbp.testing import one_node_model
    from onnxbp.types import FLOAT_TYPES, default_opset

    emitted: dict = {}
    seen = set()
    for case in CASES:
        if case.xfail_reason or (case.entry.name, case.opset) in seen:
            continue
        seen.add((case.entry.name, case.opset))
        s = case.sample
        model = one_node_model(case.entry.op, case.inputs(), case.attrs, opset=case.opset, outputs=s.outputs,
                               graph_outputs=s.graph_outputs)
        wrt = s.wrt or [i.name for i in model.graph.input if i.type.tensor_type.elem_type in FLOAT_TYPES]
        gm = onnxbp.gradient(model, wrt)
        for node in gm.graph.node[len(model.graph.node):]:
            emitted.setdefault((node.op_type, default_opset(gm)), set()).add(case.entry.name)
    missing = sorted(f"{op} (opset {opset}; emitted by {', '.join(sorted(by))})"
                     for (op, opset), by in emitted.items() if onnxbp.REGISTRY.lookup(op, "", opset) is None)
    assert not missing, "ops emitted by rules without a registry entry: " + "; ".join(missing)
