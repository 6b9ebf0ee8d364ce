"""Shared helpers for gradient tests: build tiny models, run them, compare.

Tolerances are stated where they are used; gradients are float32 unless a
test says otherwise.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import onnx

import onnxbp

# The generic machinery lives in onnxbp.testing (public: users check their own rules with it).
from onnxbp.testing import (  # noqa: F401  (re-exported for the test files)
    STANDARD_DOMAINS,
    assert_standard,
    make_model,
    run_gradient,
    session,
)

try:  # torch is a test extra; tests that need it skip without it
    import torch  # noqa: F401

    HAS_TORCH = True
except Exception:  # pragma: no cover
    HAS_TORCH = False

#: Worst relative errors seen per test file and reference ("fd" / "ref"),
#: printed by conftest's terminal summary (the numbers for closing notes).
WORST_ERRORS: dict = {}


def _record(kind: str, rel: float) -> None:
    current = os.environ.get("PYTEST_CURRENT_TEST", "unknown::")
    family = current.split("::")[0].rsplit("/", 1)[-1].removeprefix("test_").removesuffix(".py")
    key = (family, kind)
    if np.isfinite(rel):
        WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), float(rel))


def seed_of(*key) -> int:
    """A stable seed for a test case (the same on every run and machine)."""
    return zlib.crc32(repr(key).encode())


def record_family(family, fd_report=None, torch_err=None):
    """Worst relative errors per op family, in the table conftest prints at the end."""
    if fd_report is not None:
        key = (family, f"finite differences ({fd_report.precision})")
        WORST_ERRORS[key] = max([WORST_ERRORS.get(key, 0.0)] + [r.max_rel_err for r in fd_report.results])
    if torch_err is not None:
        key = (family, "reference (torch/numpy)")
        WORST_ERRORS[key] = max(WORST_ERRORS.get(key, 0.0), torch_err)


def fd_check(model, wrt, feeds, gm, family):
    """Finite differences of ``gm``: float64 at rtol 1e-4, or the float32 fallback at rtol 1e-3."""
    report = onnxbp.check_gradients(model, wrt, feeds=feeds, grad_model=gm, rtol=1e-4)
    if report.precision == "float32":
        report = onnxbp.check_gradients(model, wrt, feeds=feeds, grad_model=gm, rtol=1e-3)
    assert report.passed, "\n" + report.table()
    record_family(family, fd_report=report)
    return report


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


_TORCHVISION_OPS = None


def import_torchvision():
    """Make ``import torchvision`` work where it can (timm and transformers' image models import it).

    The torchvision wheel on PyPI is a CUDA build: with torch's CPU build (the test extra's torch
    2.13.0) its C ops do not load, and torchvision 0.28 then fails at import time registering fake
    kernels for ``torchvision::nms`` and ``::qnms``, ops that do not exist ("operator torchvision::nms
    does not exist").  transformers imports torchvision whenever it is installed, so that failure
    also breaks ``from transformers import BertForSequenceClassification`` ("Could not import
    module ...").  Where that is the failure, the two op schemas are defined (no kernel: no test
    calls them) and the import is retried.  Returns the module, or None where torchvision is absent.
    Called once from conftest (only when torchvision is installed) and by tests/test_architectures.py.
    """
    global _TORCHVISION_OPS
    import sys

    import torch

    try:
        import torchvision
        return torchvision
    except ImportError:
        return None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
        del sys.modules[k]
    if _TORCHVISION_OPS is None:
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision
