"""onnxbp.testing: one_node_model and check_rule, for built-in and users' own rules.

A custom-domain op runs in onnxruntime when the model carries it as a
model-local function (FunctionProto); onnxbp differentiates the node with the
registered rule, and the finite differences run the function (in float64
when the body is typed by its inputs: constants through CastLike).
"""

from __future__ import annotations

import re
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbp
import onnxbp.testing as T
from gradutil import HAS_TORCH

DOMAIN = "my.ops"


def _softsign_function(castlike: bool = True) -> onnx.FunctionProto:
    """Y = X / (1 + |X|); with ``castlike=False`` the 1.0 stays float32 (no float64 forward)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Constant", [], ["one_f"], value=one)]
    nodes += ([helper.make_node("CastLike", ["one_f", "X"], ["one"])] if castlike
              else [helper.make_node("Identity", ["one_f"], ["one"])])
    nodes += [helper.make_node("Abs", ["X"], ["ax"]), helper.make_node("Add", ["one", "ax"], ["den"]),
              helper.make_node("Div", ["X", "den"], ["Y"])]
    return helper.make_function(DOMAIN, "MySoftsign", ["X"], ["Y"], nodes, [helper.make_opsetid("", 17)])


def _numpy_vjp(values, upstream, wrt):
    return {"X": upstream["Y"] / (1 + np.abs(values["X"])) ** 2}


@pytest.fixture
def registered():
    """Register MySoftsign rules in the default registry for one test (and remove them after)."""
    onnxbp.REGISTRY.unregister("MySoftsign", DOMAIN)

    def register(fn, **kw):
        onnxbp.register_gradient("MySoftsign", domain=DOMAIN, smoothness="smooth", override=True, **kw)(fn)

    yield register
    onnxbp.REGISTRY.unregister("MySoftsign", DOMAIN)


def _good(g):
    x = g.input(0)
    denom = g.op("Add", g.const(1.0, like=x), g.op("Abs", x))
    return [g.op("Div", g.grad_output(0), g.op("Mul", denom, denom))]


def _wrong_power(g):  # dY / (1+|x|) instead of dY / (1+|x|)^2
    x = g.input(0)
    return [g.op("Div", g.grad_output(0), g.op("Add", g.const(1.0, like=x), g.op("Abs", x)))]


# ------------------------------------------------------------------ one_node_model
def test_one_node_model_infers_outputs_and_keeps_constants():
    m = T.one_node_model("Split", {"X": (3, 6), "split": T.constant([2, 4])}, {"axis": 1}, outputs=2, opset=13)
    assert [o.name for o in m.graph.output] == ["Y0", "Y1"]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output]
    assert dims == [[3, 2], [3, 4]]
    assert [i.name for i in m.graph.input] == ["X"] and [t.name for t in m.graph.initializer] == ["split"]
    assert m.graph.initializer[0].data_type == TensorProto.INT64


def test_one_node_model_omitted_optional_input_and_graph_outputs():
    m = T.one_node_model("Clip", {"X": (2, 2), "min": None, "max": T.constant(np.float32(0.5))})
    assert list(m.graph.node[0].input) == ["X", "", "max"]
    m = T.one_node_model("Split", {"X": (4,)}, {"num_outputs": 2}, outputs=2, graph_outputs=["Y1"], opset=18)
    assert [o.name for o in m.graph.output] == ["Y1"]


def test_one_node_model_clear_errors():
    with pytest.raises(ValueError, match=r"names used for both an input and an output: \['Y'\]"):
        T.one_node_model("Add", {"X": (2,), "Y": (2,)})
    with pytest.raises(ValueError, match=r"MySoftsign: onnx shape inference gives no type for output 'Y'; "
                                         r"pass output_types="):
        T.one_node_model("MySoftsign", {"X": (2,)}, domain=DOMAIN)
    m = T.one_node_model("MySoftsign", {"X": (2,)}, domain=DOMAIN, output_types={"Y": (np.float32, [2])})
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


# ------------------------------------------------------------------ built-in rules
def test_check_rule_builtin_returns_a_report():
    rep = T.check_rule("Mul", {"A": (2, 3), "B": (3,)})
    assert rep.passed and rep.wrt == ["A", "B"] and rep.fd_precision == "float64"
    assert rep.fd_max_rel_err < 1e-5
    assert rep.grads["B"].shape == (3,)
    assert "Mul (ai.onnx, opset 17): ok; finite differences (float64)" in rep.summary()


def test_check_rule_default_wrt_skips_non_differentiable_inputs():
    rep = T.check_rule("Gather", {"data": (4, 3), "indices": np.array([3, 0, 3], np.int64)}, {"axis": 0})
    assert rep.wrt == ["data"]
    rep = T.check_rule("Pad", {"X": (2, 3), "pads": T.constant([1, 0, 0, 2]), "value": np.float32(0.5)}, opset=13)
    assert rep.wrt == ["X", "value"]  # constant_value is differentiable, pads is not


def test_check_rule_float32_fallback_has_looser_tolerance():
    rep = T.check_rule("Softplus", {"X": (3, 4)}, precision="float32")
    assert rep.passed and rep.fd_precision == "float32" and rep.fd_rtol == 1e-3


def test_no_float64_kernel_in_onnxruntime_checks_in_float64_by_onnx_reference():
    rep = T.check_rule("Softplus", {"X": (3, 4)})  # no float64 Softplus kernel in onnxruntime
    assert rep.passed and rep.fd_precision == "float64" and rep.fd_rtol == 1e-4
    assert {r.method for r in rep.fd.results} == {"float64 elements+directions (onnx.reference)"}


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_check_rule_with_torch_reference():
    import torch

    rep = T.check_rule("LogSoftmax", {"X": (2, 5)}, {"axis": 1},
                       reference=T.torch_vjp(lambda x: torch.log_softmax(x, 1)))
    assert rep.passed and rep.ref_max_rel_err < 1e-5


def test_check_rule_reports_a_wrong_reference():
    def wrong(values, upstream, wrt):
        return {"X": 2 * upstream["Y"]}

    with pytest.raises(AssertionError, match=r"^check_rule Neg \(ai\.onnx, opset 17\): input 'X': reference "
                                             r"max abs err .* \(rel err 1\.5e\+00\)$"):
        T.check_rule("Neg", {"X": (3,)}, reference=wrong)


def test_check_rule_op_without_rule():
    with pytest.raises(AssertionError, match=r"check_rule Shape \(ai\.onnx, opset 17\): the registry has a "
                                             r"no_gradient entry, not a gradient rule, for this op"):
        T.check_rule("Shape", {"X": (2, 3)})


# ------------------------------------------------------------------ a user's custom-domain rule
def test_custom_domain_rule_passes_in_float64(registered):
    registered(_good)
    rep = T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()],
                       reference=_numpy_vjp)
    assert rep.passed and rep.fd_precision == "float64"
    assert rep.fd_max_rel_err < 1e-6 and rep.ref_max_rel_err < 1e-6
    # The forward node stays (custom domain, run as the function); what onnxbp added is standard.
    custom = [n for n in rep.grad_model.graph.node if n.domain == DOMAIN]
    assert len(custom) == 1 and custom[0].name == "op"
    assert [f.name for f in rep.grad_model.functions] == ["MySoftsign"]


def test_custom_domain_rule_float32_forward(registered):
    """A function body with a float32 constant runs only in float32: the float32 fallback checks it."""
    registered(_good)
    # |X| >= 0.1: float32 Richardson steps (~1e-2) stay clear of the curvature jump at 0.
    x = np.random.default_rng(5).standard_normal((3, 4))
    x = (np.sign(x) * (np.abs(x) + 0.1)).astype(np.float32)
    rep = T.check_rule("MySoftsign", {"X": x}, domain=DOMAIN, functions=[_softsign_function(castlike=False)])
    assert rep.passed and rep.fd_precision == "float32"


def test_wrong_custom_rule_is_reported(registered):
    registered(_wrong_power)
    with pytest.raises(AssertionError) as info:
        T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()],
                     reference=_numpy_vjp)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.match(r"check_rule MySoftsign \(my\.ops, opset 17\): input 'X': finite differences \(float64\) "
                    r"max rel err \d\.\de-0\d \(max abs err \S+\) > rtol 1e-04; input 'X': reference max abs err",
                    msg), msg


def test_wrong_custom_rule_without_raising(registered):
    registered(_wrong_power)
    rep = T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()],
                       raise_on_failure=False)
    assert not rep.passed and len(rep.failures) == 1 and "FAIL" in rep.summary()
    assert rep.fd_max_rel_err > 0.1


def test_custom_rule_with_wrong_shape_is_reported(registered):
    """A gradient of the wrong shape: onnxbp's own exit check (onnx shape inference) refuses it."""
    registered(lambda g: [g.reduce_sum(g.grad_output(0), [0], keepdims=False)])
    with pytest.raises(AssertionError, match=r"^check_rule MySoftsign \(my\.ops, opset 17\): building the gradient "
                                             r"model failed: InternalError: the gradient model fails the ONNX checker"):
        T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()])


def test_custom_rule_emitting_a_custom_op_is_reported(registered):
    registered(lambda g: [g.op("MySoftsign", g.grad_output(0), domain=DOMAIN)])
    with pytest.raises(AssertionError, match=r"non-standard ops in the gradient model: \[\('op/grad/MySoftsign.*"
                                             r"'MySoftsign', 'my\.ops'\)\]"):
        T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()])


def test_custom_rule_that_raises_is_reported(registered):
    def broken(g):
        g.fail("this rule supports nothing")

    registered(broken)
    with pytest.raises(AssertionError, match=r"building the gradient model failed: UnsupportedAttributeError: "
                                             r".*this rule supports nothing"):
        T.check_rule("MySoftsign", {"X": (3, 4)}, domain=DOMAIN, functions=[_softsign_function()])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_custom_rule_with_torch_reference(registered):
    registered(_good)
    rep = T.check_rule("MySoftsign", {"X": (2, 5)}, domain=DOMAIN, functions=[_softsign_function()],
                       reference=T.torch_vjp(lambda x: x / (1 + x.abs())))
    assert rep.passed and rep.ref_max_rel_err < 1e-6


def test_private_registry():
    reg = onnxbp.Registry()
    reg.register("MySoftsign", DOMAIN, smoothness="smooth")(_good)
    rep = T.check_rule("MySoftsign", {"X": (3,)}, domain=DOMAIN, functions=[_softsign_function()], registry=reg)
    assert rep.passed
    assert onnxbp.REGISTRY.lookup("MySoftsign", DOMAIN) is None


def test_module_docstring_example_runs(registered, capsys):
    """The example in onnxbp.testing's docstring, executed as written."""
    doc = T.__doc__
    start = doc.index("finite-difference check works too::")
    block = doc[start:].split("::", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    code = textwrap.dedent("\n".join(lines))
    onnxbp.REGISTRY.unregister("MySoftsign", DOMAIN)
    exec(compile(code, "onnxbp.testing docstring", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("MySoftsign (my.ops, opset 17): ok; finite differences (float64)")


def test_gradutil_uses_the_public_helpers():
    import gradutil

    assert gradutil.make_model is T.make_model and gradutil.run_gradient is T.run_gradient
    assert gradutil.assert_standard is T.assert_standard
