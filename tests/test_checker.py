"""The finite-difference checker catches wrong gradients, in both precisions."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxbp
from onnxbp.registry import PIECEWISE, RULE, Registry
from gradutil import make_model


def _registry_with(op, fn, **kw):
    reg = Registry()
    for e in onnxbp.REGISTRY.entries():
        if e.kind == RULE and e.op_type != op:
            reg.register(e.op_type, e.domain, since=e.since, until=e.until, smoothness=e.smoothness,
                         non_differentiable_inputs=e.non_differentiable_inputs)(e.fn)
    reg.register(op, **kw)(fn)
    return reg


def _model():
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
                       helper.make_node("Relu", ["H"], ["Y"], name="relu")],
                      [("X", np.float32, ["N", 4])], [("Y", np.float32, ["N", 3])], {"W": w})


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_correct_gradients_pass(precision):
    report = onnxbp.check_gradients(_model(), ["W", "X"], precision=precision, batch_size=3)
    assert report.passed, report.table()
    assert report.precision == precision
    assert all(r.max_rel_err < 1e-3 for r in report.results)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("wrong", ["scaled", "mask_inverted"])
def test_wrong_rule_is_caught(precision, wrong):
    def bad_relu(g):
        x, dy = g.input(0), g.grad_output(0)
        zero = g.const(0.0, like=x)
        if wrong == "scaled":
            return [g.op("Mul", g.op("Where", g.op("Greater", x, zero), dy, zero), g.const(1.01, like=x))]
        return [g.op("Where", g.op("Less", x, zero), dy, zero)]

    model = _model()
    gm = onnxbp.gradient(model, ["W"], registry=_registry_with("Relu", bad_relu, smoothness=PIECEWISE))
    report = onnxbp.check_gradients(model, ["W"], grad_model=gm, precision=precision)
    assert not report.passed
    assert "FAIL" in report.table()


def test_report_table_lists_every_gradient():
    report = onnxbp.check_gradients(_model())
    table = report.table()
    assert "W" in table and "max rel err" in table and "ok" in table
