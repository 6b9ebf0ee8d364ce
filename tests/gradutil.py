"""Shared helpers for gradient tests: build tiny models, run them, compare.

Tolerances are stated where they are used; gradients are float32 unless a
test says otherwise.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

import onnxbp
from onnxbp.checker import gradient_names
from onnxbp.modelio import cpu_session

try:  # torch is a test extra; tests that need it skip without it
    import torch  # noqa: F401

    HAS_TORCH = True
except Exception:  # pragma: no cover
    HAS_TORCH = False

STANDARD_DOMAINS = ("", "ai.onnx")

#: Worst relative errors seen per test file and reference ("fd" / "ref"),
#: printed by conftest's terminal summary (the numbers for closing notes).
WORST_ERRORS: dict = {}


def _record(kind: str, rel: float) -> None:
    current = os.environ.get("PYTEST_CURRENT_TEST", "unknown::")
    family = current.split("::")[0].rsplit("/", 1)[-1].removeprefix("test_").removesuffix(".py")
    key = (family, kind)
    if np.isfinite(rel):
        WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), float(rel))


def _elem(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(nodes, inputs: Sequence, outputs: Sequence, initializers: Mapping = None,
               opset: int = 17, ir_version: Optional[int] = None, check: bool = True) -> onnx.ModelProto:
    """``inputs``/``outputs``: (name, dtype, shape-or-None); ``initializers``: {name: array}."""
    graph = helper.make_graph(
        list(nodes), "test",
        [helper.make_tensor_value_info(n, _elem(t), s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, _elem(t), s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    elif opset <= 21:
        model.ir_version = min(model.ir_version, 10)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def assert_standard(model: onnx.ModelProto) -> None:
    """Only standard-domain ops, and onnx's full checker passes."""
    bad = [(n.name, n.op_type, n.domain) for n in model.graph.node if n.domain not in STANDARD_DOMAINS]
    assert not bad, f"non-standard ops in the gradient model: {bad}"
    onnx.checker.check_model(model, full_check=True)


session = cpu_session  # 1 intra-op thread, no spinning


def run_gradient(model: onnx.ModelProto, feeds: Mapping, wrt=None, upstream: Mapping = None,
                 seed: int = 0, **options):
    """Build the gradient model, check it is standard, run it.

    Returns ``(grad_model, outputs, grads, upstream)``: forward outputs and
    gradients as dicts keyed by forward output / parameter name.
    """
    gm = onnxbp.gradient(model, wrt, **options)
    assert_standard(gm)
    names = gradient_names(gm)
    sess = session(gm)
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
    res = dict(zip(out_names, sess.run(out_names, run_feeds)))
    outputs = {k: res[k] for k in fwd_outputs}
    grads = {p: res[g] for p, g in names.items()}
    return gm, outputs, grads, ups


def assert_fd(model: onnx.ModelProto, wrt=None, feeds=None, rtol: float = 1e-3, **kwargs):
    """Run onnxbp's finite-difference checker and fail with its table."""
    report = onnxbp.check_gradients(model, wrt, feeds=feeds, rtol=rtol, **kwargs)
    assert report.passed, "\n" + report.table()
    for r in report.results:
        _record(f"finite differences ({report.precision})", r.max_rel_err)
    return report


def assert_close(ours, ref, rtol: float, atol: float, what: str = "") -> float:
    """Compare arrays; return the normwise relative error max|a-b| / max|b|."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    assert err <= atol + rtol * scale, f"{what}: max abs err {err:.3e} > {atol} + {rtol}*{scale:.3e}"
    rel = err / max(scale, 1e-30)
    _record("reference (torch/numpy)", rel)
    return rel
