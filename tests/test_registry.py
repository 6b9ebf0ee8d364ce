"""The rule registry: user rules, duplicate registration, opset ranges, outcomes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxbp
from onnxbp.registry import LINEAR, NO_GRADIENT, NOT_DIFFERENTIABLE, RULE, Registry
from gradutil import make_model


def test_registering_twice_is_an_error_unless_override():
    reg = Registry()

    @reg.register("Foo")
    def first(g):
        return [g.grad_output(0)]

    with pytest.raises(onnxbp.RuleRegistrationError) as exc:
        reg.register("Foo")(lambda g: None)
    text = str(exc.value)
    assert "'Foo'" in text and "override=True" in text and "first" in text

    @reg.register("Foo", override=True)
    def second(g):
        return [g.grad_output(0)]

    assert reg.lookup("Foo").fn is second


def test_builtin_rule_cannot_be_silently_replaced():
    with pytest.raises(onnxbp.RuleRegistrationError):
        onnxbp.register_gradient("Gemm")(lambda g: None)


def test_opset_ranges_select_the_rule():
    reg = Registry()
    reg.register("Bar", until=12)(lambda g: "old")
    reg.register("Bar", since=13)(lambda g: "new")
    assert reg.lookup("Bar", opset=11).fn(None) == "old"
    assert reg.lookup("Bar", opset=13).fn(None) == "new"
    with pytest.raises(onnxbp.RuleRegistrationError):
        reg.register("Bar", since=10, until=14)(lambda g: None)
    assert reg.lookup("Baz") is None


def test_outcomes_are_distinct():
    reg = Registry()
    reg.no_gradient(["Shape"])
    reg.not_differentiable(["ArgMax"], reason="index")
    reg.register("Relu")(lambda g: None)
    kinds = {e.op_type: e.kind for e in reg.entries()}
    assert kinds == {"Shape": NO_GRADIENT, "ArgMax": NOT_DIFFERENTIABLE, "Relu": RULE}


def test_user_rule_for_an_op_onnxbp_does_not_cover():
    """A user registers Softsign (standard op, no built-in rule needed here) in a private registry."""
    reg = Registry()
    for e in onnxbp.REGISTRY.entries():  # reuse the built-ins
        if e.kind == RULE:
            reg.register(e.op_type, e.domain, since=e.since, until=e.until,
                         non_differentiable_inputs=e.non_differentiable_inputs)(e.fn)
    reg.register("Softsign", override=True)(_softsign_grad)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
                        helper.make_node("Softsign", ["H"], ["Y"], name="act")],
                       [("X", np.float32, [3, 4])], [("Y", np.float32, [3, 4])], {"W": w})
    gm = onnxbp.gradient(model, ["W"], registry=reg)
    report = onnxbp.check_gradients(model, ["W"], grad_model=gm, feeds={"X": x})
    assert report.passed, report.table()
    assert any("_softsign_grad" in n.doc_string for n in gm.graph.node)


def _softsign_grad(g):
    """X' = Y' / (1 + |X|)^2"""
    x = g.input(0)
    denom = g.op("Add", g.const(1.0, like=x), g.op("Abs", x))
    return [g.op("Div", g.grad_output(0), g.op("Mul", denom, denom))]


def test_rule_returning_nothing_for_a_needed_input_raises():
    reg = Registry()
    reg.register("Relu")(lambda g: [None])
    model = make_model([helper.make_node("Relu", ["X"], ["Y"], name="r")],
                       [("X", np.float32, [2])], [("Y", np.float32, [2])])
    with pytest.raises(onnxbp.NotDifferentiableError) as exc:
        onnxbp.gradient(model, ["X"], registry=reg)
    assert "returned no gradient for input 0 ('X')" in str(exc.value)


def test_custom_domain_rule_builds_standard_backward():
    """A user op in its own domain: the backward emitted by its rule is standard ops only."""

    @onnxbp.register_gradient("Scale2", domain="my.ops", smoothness=LINEAR)
    def scale2_grad(g):
        return [g.op("Mul", g.grad_output(0), g.const(2.0, like=g.input(0)))]

    try:
        graph = helper.make_graph(
            [helper.make_node("Scale2", ["X"], ["Y"], name="s", domain="my.ops")], "g",
            [helper.make_tensor_value_info("X", 1, [3])], [helper.make_tensor_value_info("Y", 1, [3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("my.ops", 1)])
        model.ir_version = 8
        gm = onnxbp.gradient(model, ["X"])
        backward = [n for n in gm.graph.node if n.name.startswith("s/grad")]
        assert [n.op_type for n in backward] == ["Mul"] and all(n.domain == "" for n in backward)
    finally:
        onnxbp.REGISTRY.unregister("Scale2", "my.ops")


def test_every_builtin_rule_has_a_lowering_description():
    for e in onnxbp.REGISTRY.entries():
        assert e.lowering, f"{e.op_type} has no lowering text for `onnxbp ops`"


@pytest.mark.parametrize("op", ["Relu", "LeakyRelu"])
@pytest.mark.parametrize("opset", [7, 9, 17])
def test_select_matches_where_bit_for_bit(op, opset):
    """``g.select`` (Cast/Mul, not Where) picks exactly the values np.where picks: Relu
    (zero else-branch) and LeakyRelu (alpha*dy else-branch), at the kink and over a wide
    range of magnitudes."""
    from onnxbp.modelio import cpu_session

    attrs = {"alpha": 0.3} if op == "LeakyRelu" else {}
    model = make_model([helper.make_node(op, ["X"], ["Y"], name="k", **attrs)],
                       [("X", np.float32, [4, 257])], [("Y", np.float32, [4, 257])], opset=opset)
    gm = onnxbp.gradient(model, ["X"])
    assert "Where" not in {n.op_type for n in gm.graph.node}
    rng = np.random.default_rng(opset)
    x = rng.standard_normal((4, 257)).astype(np.float32)
    x[0, :5] = 0.0  # the kink itself takes the else branch
    dy = (rng.standard_normal((4, 257)) * 10.0 ** rng.integers(-30, 30, (4, 257))).astype(np.float32)
    got = cpu_session(gm).run(["X_grad"], {"X": x, "Y_grad": dy})[0]
    other = dy * np.float32(0.3) if op == "LeakyRelu" else np.zeros_like(dy)
    assert np.array_equal(got, np.where(x > 0, dy, other))
