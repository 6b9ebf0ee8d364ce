"""Seeded gradient fuzzer (issue 12, "Keep it closed"): random graphs against finite differences.

Each case is a random graph from :mod:`fuzzgraphs` (ops with gradient rules,
fan-out, numpy broadcasting, a symbolic batch dim, float initializers and
float graph inputs).  ``onnxbp.gradient`` must build a standard-ops model, and
``onnxbp.check_gradients(rtol=1e-3)`` must pass.  The default suite runs
``FAST`` seeds, ``-m slow`` runs ``SLOW`` more.

When the checker fails in its float32 fallback (onnxruntime has no float64
kernel for Softplus, Softsign, Mean, Tan, Elu, Selu, Celu, LeakyRelu, PRelu,
InstanceNormalization, GlobalMaxPool, so a random graph holding one is checked
in float32), an independent float64 reference decides: central differences of
the forward model run by ``onnx.reference`` in float64.  If it agrees with the
gradient the case is counted as a checker false alarm (the gradient is right),
otherwise as a wrong gradient.

If/Loop: a gradient through control flow (an input or an outer-scope capture)
is built (the If by its rule, the Loop unrolled) and passes the check; control
flow off the gradient path is left alone and the gradient passes the check.

Outcomes are counted per case and written to ``/tmp/onnxbp_fuzz_summary.json``
by the last test of each run (``test_zz_summary`` / ``test_zz_summary_slow``),
which also prints them with capturing disabled.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxbp
from onnxbp.testing import assert_standard

from fuzzgraphs import control_flow_case, random_case

FAST = range(0, 40)
SLOW = range(1000, 1400)
CF_FAST = range(0, 10)
CF_SLOW = range(100, 160)
RTOL = 1e-3
SUMMARY_PATH = "/tmp/onnxbp_fuzz_summary.json"

#: Seeds where onnxbp is known to be wrong or to fail internally: {seed: reason}.
KNOWN_BAD: dict = {}

OUTCOMES = ("correct", "clear error", "internal error", "wrong gradient", "checker false alarm (float32)")
SUMMARY: dict = {}


def _record(run: str, kind: str, outcome: str, seed: int, seconds: float, detail: str = "") -> None:
    s = SUMMARY.setdefault(run, {"counts": {}, "seconds": 0.0, "graphs": 0, "cases": []})
    key = f"{kind}: {outcome}"
    s["counts"][key] = s["counts"].get(key, 0) + 1
    s["graphs"] += 1
    s["seconds"] += seconds
    if outcome not in ("correct",) and not outcome.startswith("refused"):
        s["cases"].append({"kind": kind, "seed": seed, "outcome": outcome, "detail": detail[:500]})


def _run_name(seed: int, fast) -> str:
    return "default" if seed in fast else "slow"


# ----------------------------------------------------------------------------------------
# The independent float64 reference (onnx.reference, float64 throughout)


def _to_float64(model: onnx.ModelProto, params) -> onnx.ModelProto:
    """A float64 copy with the parameters as graph inputs (for onnx.reference, not onnxruntime)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    F, D = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE

    def conv_tensor(t):
        if t.data_type == F:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def conv_graph(gr):
        for vi in list(gr.input) + list(gr.output) + list(gr.value_info):
            if vi.type.tensor_type.elem_type == F:
                vi.type.tensor_type.elem_type = D
        for t in gr.initializer:
            conv_tensor(t)
        for n in gr.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    conv_graph(a.g)
                elif n.op_type == "Cast" and a.name == "to" and a.i == F:
                    a.i = D

    keep = []
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.name in params:
            if t.name not in have:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep)
    conv_graph(g)
    return m


def _reference(model):
    """onnx.reference with the kernels onnxbp's checker fixes (onnxbp.float64._reference_fixes)."""
    from onnx.reference import ReferenceEvaluator

    from onnxbp.float64 import _reference_fixes

    return ReferenceEvaluator(model, new_ops=_reference_fixes())


def reference_float64_check(model, gm, feeds, rtol=RTOL, atol=1e-5, max_elements=24, seed=0):
    """Worst relative error of gm's gradients against float64 central differences by onnx.reference
    (errors within ``atol`` count as zero); None where onnx.reference cannot be trusted on the model."""
    from onnxbp.metadata import gradient_names

    names = gradient_names(gm)
    params = list(names)
    rng = np.random.default_rng(seed)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values = {p: np.asarray(feeds[p] if p in feeds else inits[p], dtype=np.float64) for p in params}
    sess = onnxbp.modelio.cpu_session(gm)
    gm_inputs = {i.name for i in gm.graph.input}
    fwd_names = [o.name for o in model.graph.output]
    run = {k: v for k, v in feeds.items() if k in gm_inputs}
    fouts = onnxbp.modelio.cpu_session(model).run(fwd_names, {k: v for k, v in feeds.items()
                                                              if k in {i.name for i in model.graph.input}})
    ups = {}
    for name, y in zip(fwd_names, fouts):
        if name + "_grad" in gm_inputs:
            ups[name] = rng.standard_normal(np.shape(y)).astype(np.float32)
            run[name + "_grad"] = ups[name]
    grads = dict(zip(params, sess.run([names[p] for p in params], run)))
    # The reference must agree with onnxruntime on the float32 model before it judges anything;
    # where onnx.reference cannot run the model or disagrees, there is no verdict (None).
    try:
        refs = _reference(model).run(fwd_names, {k: v for k, v in feeds.items()
                                                 if k in {i.name for i in model.graph.input}})
    except Exception:  # noqa: BLE001 - an onnx.reference limitation, not onnxbp's
        return None
    for y_ref, y in zip(refs, fouts):
        if np.shape(y_ref) != np.shape(y) or not np.allclose(np.asarray(y_ref, np.float64), y,
                                                              rtol=1e-4, atol=1e-5):
            return None
    ref = _reference(_to_float64(model, params))
    base = {k: (np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else v)
            for k, v in feeds.items() if k in {i.name for i in model.graph.input}}

    def f(vals):
        outs = ref.run(None, {**base, **vals})
        return sum(float(np.sum(ups[n].astype(np.float64) * np.asarray(y, np.float64)))
                   for n, y in zip(fwd_names, outs) if n in ups)

    worst = 0.0
    for p in params:
        x = values[p].reshape(-1)
        idx = np.arange(x.size) if x.size <= max_elements else rng.choice(x.size, max_elements, replace=False)
        num, ana = [], np.asarray(grads[p], np.float64).reshape(-1)[idx]
        for i in idx:
            eps = 1e-6 * max(1.0, abs(x[i]))
            xp, xm = x.copy(), x.copy()
            xp[i] += eps
            xm[i] -= eps
            num.append((f({**values, p: xp.reshape(values[p].shape)})
                        - f({**values, p: xm.reshape(values[p].shape)})) / (2 * eps))
        num = np.array(num)
        scale = max(float(np.max(np.abs(num), initial=0)), float(np.max(np.abs(ana), initial=0)), 1e-6)
        err = float(np.max(np.abs(num - ana), initial=0))
        worst = max(worst, max(err - atol, 0.0) / scale)   # within atol counts as exact
    return worst


# ----------------------------------------------------------------------------------------
# Plain graphs


def _params(seeds):
    return [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BAD[s])) if s in KNOWN_BAD else s
            for s in seeds]


def _fuzz_one(seed: int, run: str) -> None:
    case = random_case(seed)
    t0 = time.perf_counter()
    outcome, detail = "correct", ""
    try:
        gm = onnxbp.gradient(case.model, case.wrt)
        assert_standard(gm)
        report = onnxbp.check_gradients(case.model, case.wrt, feeds=case.feeds, rtol=RTOL)
    except onnxbp.InternalError as exc:
        outcome, detail = "internal error", f"InternalError: {exc}"
    except onnxbp.OnnxbpError as exc:
        outcome, detail = "clear error", f"{type(exc).__name__}: {exc}"
    except AssertionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an untyped exception is an internal error
        outcome, detail = "internal error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        prec = SUMMARY.setdefault(run, {"counts": {}, "seconds": 0.0, "graphs": 0, "cases": []}) \
            .setdefault("checker precision", {})
        prec[report.precision] = prec.get(report.precision, 0) + 1
        rel = None
        if report.precision == "float32":
            # No float64 forward in onnxruntime: the float64 onnx.reference check is the arbiter.
            rel = reference_float64_check(case.model, gm, case.feeds, seed=seed)
            ref = SUMMARY[run].setdefault("float64 reference", {})
            key = "unavailable" if rel is None else ("agrees" if rel <= RTOL else "disagrees")
            ref[key] = ref.get(key, 0) + 1
        if not report.passed or (rel is not None and rel > RTOL):
            detail = f"checker ({report.precision}):\n{report.table()}"
            if rel is not None:
                detail += f"\nfloat64 onnx.reference check: worst rel. error {rel:.2e}"
            outcome = "checker false alarm (float32)" if rel is not None and rel <= RTOL else "wrong gradient"
    _record(run, "graph", outcome, seed, time.perf_counter() - t0, detail)
    if outcome in ("internal error", "wrong gradient"):
        pytest.fail(f"seed {seed}: {outcome}\n{detail}\nwrt={case.wrt}\n{case.node_list()}", pytrace=False)
    if outcome == "clear error":
        # The generator only builds graphs onnxbp supports: a refusal is a finding too.
        pytest.fail(f"seed {seed}: refused a supported graph\n{detail}\n{case.node_list()}", pytrace=False)


@pytest.mark.parametrize("seed", _params(FAST))
def test_fuzz_graph(seed):
    _fuzz_one(seed, "default")


@pytest.mark.slow
@pytest.mark.parametrize("seed", _params(SLOW))
def test_fuzz_graph_slow(seed):
    _fuzz_one(seed, "slow")


def test_generator_is_seeded_and_valid():
    """The same seed gives the same model; models pass the full checker (random_case runs it)."""
    a, b = random_case(7), random_case(7)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert random_case(8).model.SerializeToString() != a.model.SerializeToString()
    ops = {n.op_type for s in range(30) for n in random_case(s).model.graph.node}
    rules = {e.op_type for e in onnxbp.REGISTRY.entries() if e.kind == "rule"}
    assert ops - {"Constant"} <= rules, ops - rules
    assert len(ops) >= 40


# ----------------------------------------------------------------------------------------
# If / Loop


def _fuzz_control_flow(seed: int, run: str) -> None:
    case = control_flow_case(seed)
    t0 = time.perf_counter()
    outcome, detail = "correct", ""
    try:
        gm = onnxbp.gradient(case.model, case.wrt)
    except onnxbp.UnsupportedOpError as exc:
        text = str(exc)
        ok = text.startswith("node '") and "control flow is differentiated for If" in text and "\n" not in text
        if case.expect == "refused" and ok:
            outcome = "refused (clear)"
            if f"node '{case.control_node}'" not in text:
                outcome, detail = "clear error", f"refused, naming another node: {text}"
        else:
            outcome, detail = "clear error", text
    except onnxbp.InternalError as exc:
        outcome, detail = "internal error", f"InternalError: {exc}"
    except onnxbp.OnnxbpError as exc:
        outcome, detail = "clear error", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        outcome, detail = "internal error", f"{type(exc).__name__}: {exc}"
    else:
        if case.expect == "refused":
            outcome, detail = "wrong gradient", "a gradient through control flow was built instead of refused"
        else:
            assert_standard(gm)
            report = onnxbp.check_gradients(case.model, case.wrt, feeds=case.feeds, rtol=RTOL)
            if not report.passed:
                outcome, detail = "wrong gradient", report.table()
    _record(run, case.kind, outcome, seed, time.perf_counter() - t0, detail)
    want = "refused (clear)" if case.expect == "refused" else "correct"
    if outcome != want:
        pytest.fail(f"control-flow seed {seed} ({case.kind}): expected {want}, got {outcome}\n{detail}\n"
                    f"{case.node_list()}", pytrace=False)


@pytest.mark.parametrize("seed", CF_FAST)
def test_fuzz_control_flow(seed):
    _fuzz_control_flow(seed, "default")


@pytest.mark.slow
@pytest.mark.parametrize("seed", CF_SLOW)
def test_fuzz_control_flow_slow(seed):
    _fuzz_control_flow(seed, "slow")


# ----------------------------------------------------------------------------------------
# The summary (last in the module, so it runs after the cases in a serial run)


def _summary(run: str, capsys) -> None:
    s = SUMMARY.get(run)
    if not s:
        pytest.skip(f"no {run} fuzz cases ran in this process")
    old = {}
    if os.path.exists(SUMMARY_PATH):
        try:
            with open(SUMMARY_PATH) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = {}
    old[run] = s
    with open(SUMMARY_PATH, "w") as fh:
        json.dump(old, fh, indent=1)
    with capsys.disabled():
        print(f"\nonnxbp fuzz summary ({run}): {s['graphs']} cases, {s['seconds']:.1f} s in cases")
        for key, n in sorted(s["counts"].items()):
            print(f"  {key:<50} {n}")
        print(f"  checker precision (graphs checked): {s.get('checker precision', {})}")
        print(f"  float64 onnx.reference check of the float32-checked graphs: {s.get('float64 reference', {})}")
        for c in s["cases"]:
            print(f"  - {c['kind']} seed {c['seed']}: {c['outcome']}: {c['detail'].splitlines()[0] if c['detail'] else ''}")
        print(f"  (written to {SUMMARY_PATH})")


def test_zz_summary(capsys):
    _summary("default", capsys)


@pytest.mark.slow
def test_zz_summary_slow(capsys):
    _summary("slow", capsys)
