"""The finite-difference checker catches wrong gradients, in both precisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.float64 import float64_model
from onnxbp.modelio import cpu_session
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


CONV_EMULATION_CASES = [
    # dims, spatial, kernel, strides, dilations, pads / auto_pad, group, C, M
    (2, (7, 6), (3, 3), (1, 1), (1, 1), [1, 1, 1, 1], 1, 3, 4),
    (2, (8, 8), (3, 2), (2, 1), (1, 2), [0, 1, 2, 0], 1, 2, 3),
    (2, (9, 7), (3, 3), (2, 2), (1, 1), "SAME_UPPER", 1, 2, 2),  # ORT: no dilation with SAME
    (2, (6, 6), (3, 3), (1, 1), (1, 1), "VALID", 2, 4, 6),
    (2, (6, 6), (3, 3), (2, 2), (1, 1), [1, 1, 1, 1], 4, 4, 8),  # depthwise with multiplier
    (1, (11,), (3,), (2,), (2,), [2, 0], 1, 2, 3),
    (3, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 2), [1, 0, 1, 0, 1, 1], 1, 2, 2),
]


@pytest.mark.parametrize("case", CONV_EMULATION_CASES, ids=lambda c: f"{c[0]}d-g{c[6]}")
def test_float64_conv_emulation_matches_onnxruntime(case):
    """The checker's float64 forward rewrites Conv as Slices and MatMuls: same numbers as ORT's Conv."""
    dims, n, k, s, d, pads, group, c, m = case
    rng = np.random.default_rng(len(n) * 7 + group)
    attrs = dict(kernel_shape=list(k), strides=list(s), dilations=list(d), group=group)
    if isinstance(pads, str):
        attrs["auto_pad"] = pads
    else:
        attrs["pads"] = pads
    w = rng.standard_normal((m, c // group) + tuple(k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], name="conv", **attrs)
    model = make_model([node], [("X", np.float32, ["N", c] + list(n))], [("Y", np.float32, None)],
                       {"W": w, "B": b}, check=False)
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_param = "N"
    x = rng.standard_normal((2, c) + tuple(n)).astype(np.float32)
    _assert_float64_emulation(model, x, "Conv")


def _assert_float64_emulation(model, x, op_type):
    """float64_model rewrites every ``op_type`` node and computes onnxruntime's float32 numbers in float64."""
    ref = cpu_session(model).run(None, {"X": x})[0]
    emulated = float64_model(model, {"X": x})
    assert not [n for n in emulated.graph.node if n.op_type == op_type]
    got = cpu_session(emulated).run(None, {"X": x.astype(np.float64)})[0]
    assert got.dtype == np.float64 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


CONV_TRANSPOSE_EMULATION_CASES = [
    # attrs, X shape, W shape (C, M/g, k...)
    (dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), (2, 4, 5, 5), (4, 3, 3, 3)),
    (dict(strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 0], group=2), (2, 4, 4, 6), (4, 3, 3, 2)),
    (dict(), (1, 3, 4, 4), (3, 2, 2, 2)),
    (dict(strides=[3], pads=[1, 0], group=4, output_padding=[2]), (2, 4, 7), (4, 1, 4)),  # depthwise 1d
    (dict(strides=[2, 2], auto_pad="SAME_UPPER"), (2, 2, 5, 5), (2, 3, 3, 3)),
    (dict(strides=[2, 2], output_shape=[10, 9]), (2, 2, 5, 5), (2, 3, 3, 3)),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSE_EMULATION_CASES, ids=lambda c: f"{len(c[1]) - 2}d-{sorted(c[0])}")
def test_float64_conv_transpose_emulation_matches_onnxruntime(case):
    """ConvTranspose (no float64 kernel in onnxruntime; a strided Conv's dX in every gradient model, so
    in a second-order check's first-order model) rewritten as MatMuls and Pads: same numbers as ORT."""
    attrs, xs, ws = case
    rng = np.random.default_rng(len(xs) + len(attrs))
    w = rng.standard_normal(ws).astype(np.float32)
    b = rng.standard_normal(ws[1] * attrs.get("group", 1)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], name="convt", **attrs)
    model = make_model([node], [("X", np.float32, list(xs))], [("Y", np.float32, None)], {"W": w, "B": b},
                       check=False)
    x = rng.standard_normal(xs).astype(np.float32)
    _assert_float64_emulation(model, x, "ConvTranspose")


@pytest.mark.parametrize("seed", range(4))
def test_conv_network_checks_in_float64(seed):
    """LeNet (Conv, Relu, MaxPool, Gemm): per-element float64 checks, reliable at every seed."""
    from pathlib import Path

    lenet = Path(__file__).resolve().parent.parent / "models" / "lenet.onnx"
    report = onnxbp.check_gradients(str(lenet), seed=seed, batch_size=3)
    assert report.precision == "float64"
    assert report.passed, report.table()


def test_wrong_conv_rule_is_caught_in_float64():
    from pathlib import Path

    def bad_conv(g):
        right = onnxbp.REGISTRY.lookup("Conv").fn(g)
        return [right[0], right[1] and g.op("Mul", right[1], g.const(1.01, like=g.input(1))),
                *right[2:]]

    lenet = Path(__file__).resolve().parent.parent / "models" / "lenet.onnx"
    reg = _registry_with("Conv", bad_conv, min_opset=11)
    reg.declare_option("conv_strategy", ("auto",), "auto", "test")  # the options the built-in rule reads
    reg.declare_option("target", ("onnxruntime",), "onnxruntime", "test")
    gm = onnxbp.gradient(str(lenet), ["conv2.weight", "conv1.bias"], registry=reg)
    report = onnxbp.check_gradients(str(lenet), grad_model=gm)
    assert {r.name: r.passed for r in report.results} == {"conv2.weight": False, "conv1.bias": True}


FLOAT64_REWRITE_CASES = [
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], count_include_pad=0), 2),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 1, 0, 1], count_include_pad=1), 2),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), 2),
    ("AveragePool", dict(kernel_shape=[2], strides=[1], auto_pad="SAME_UPPER"), 1),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[3, 1], dilations=[2, 1], auto_pad="SAME_UPPER",
                         ceil_mode=1), 2),  # onnxruntime's SAME ignores dilation: a negative end pad
    ("AveragePool", dict(kernel_shape=[2, 2, 2], strides=[2, 1, 2], dilations=[1, 2, 1]), 3),
    ("GlobalAveragePool", {}, 2),
    ("GlobalAveragePool", {}, 3),
    ("HardSigmoid", dict(alpha=0.3, beta=0.4), 2),
    ("HardSwish", {}, 2),
    ("LRN", dict(size=3, alpha=1e-2, beta=0.75, bias=1.5), 2),
    ("LRN", dict(size=5), 2),
    ("Erf", {}, 2),
    ("Clip", dict(min=-0.5, max=0.7), 2),  # opset < 11 attributes (run at opset 9 below)
]


@pytest.mark.parametrize("op,attrs,dims", FLOAT64_REWRITE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(FLOAT64_REWRITE_CASES)])
def test_float64_rewrites_match_onnxruntime(op, attrs, dims):
    """Ops without a float64 kernel are rewritten for the checker: same numbers as ORT's float32."""
    opset = 19 if "dilations" in attrs else 9 if op == "Clip" else 17
    shape = (2, 5) + (7, 6, 5)[:dims]
    node = helper.make_node(op, ["X"], ["Y"], name="op", **attrs)
    model = make_model([node], [("X", np.float32, list(shape))],
                       [("Y", np.float32, [f"y{i}" for i in range(len(shape))])], opset=opset, check=False)
    onnx.checker.check_model(model)
    x = np.random.default_rng(dims).standard_normal(shape).astype(np.float32)
    ref = cpu_session(model).run(None, {"X": x})[0]
    emulated = float64_model(model, {"X": x})
    assert not [n for n in emulated.graph.node if n.op_type == op]
    got = cpu_session(emulated).run(None, {"X": x.astype(np.float64)})[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=2e-6 if op != "Erf" else 0, atol=1e-6 if op != "Erf" else 2e-7)


def test_float64_rewrites_use_only_pure_arithmetic_helpers():
    """onnxbp/float64.py takes shared arithmetic from rules/*_arith.py, never from a rule module."""
    import ast
    from pathlib import Path

    import onnxbp.float64 as f64

    tree = ast.parse(Path(f64.__file__).read_text())
    from_rules = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  for a in n.names if n.module and "rules" in n.module]
    assert from_rules and all(name.endswith("_arith") for _, name in from_rules), from_rules


def test_float64_model_is_valid_and_keeps_the_outputs():
    """The rewritten float64 model passes onnx's checker; node names are unique; outputs keep their names."""
    from pathlib import Path

    lenet = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "lenet.onnx"))
    x = np.random.default_rng(0).standard_normal([2] + [d.dim_value for d in
                                                        lenet.graph.input[0].type.tensor_type.shape.dim[1:]])
    m = float64_model(lenet, {lenet.graph.input[0].name: x.astype(np.float32)})
    onnx.checker.check_model(m, full_check=True)
    names = [n.name for n in m.graph.node if n.name]
    assert len(names) == len(set(names))
    assert [o.name for o in m.graph.output] == [o.name for o in lenet.graph.output]
    assert not [n for n in m.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("kwargs, text", [
    ({"batch_size": 0}, "batch_size=0 (needs a whole number >= 1)"),
    ({"rtol": float("nan")}, "rtol=nan (needs a finite number >= 0)"),
    ({"rtol": -1.0}, "rtol=-1.0 (needs a finite number >= 0)"),
    ({"atol": float("inf")}, "atol=inf (needs a finite number >= 0)"),
    ({"rtol": 0.0, "atol": 0.0}, "rtol=0 with atol=0 (no finite difference is exact)"),
    ({"max_elements": 0}, "max_elements=0 (needs a whole number >= 1)"),
    ({"precision": "float16"}, "precision='float16' (choose auto, float64 or float32)"),
])
def test_options_that_would_check_nothing_are_refused(kwargs, text):
    """A check that passes having checked nothing is worse than none."""
    with pytest.raises(onnxbp.OptionError) as info:
        onnxbp.check_gradients(str(Path(__file__).resolve().parent.parent / "models" / "mlp.onnx"), **kwargs)
    assert str(info.value) == f"check_gradients: {text}"


# ----------------------------------------------------------------- float16
def _f16_mlp():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Tanh", ["H"], ["T"]),
             helper.make_node("MatMul", ["T", "V"], ["Y"])]
    g = helper.make_graph(nodes, "f16", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, ["N", 5])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, ["N", 2])],
                          [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float16), "W"),
                           numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float16), "V")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_float16_model_is_checked_in_a_wider_type(precision):
    """float16 parameters: the finite differences run on the model widened to float64 (or float32),
    and the float16 gradient is held to 20 float16 roundings (2e-2), stated in the method."""
    report = onnxbp.check_gradients(_f16_mlp(), precision=precision)
    assert report.passed, report.table()
    assert all("float16 rtol 2e-02" in r.method for r in report.results)
    assert all(r.max_rel_err < 2e-2 for r in report.results)


def test_float16_wrong_gradient_still_fails():
    m = _f16_mlp()
    gm = onnxbp.gradient(m)
    scaled = helper.make_node("Mul", ["W_grad_raw", "k"], ["W_grad"])
    for n in gm.graph.node:
        n.output[:] = ["W_grad_raw" if o == "W_grad" else o for o in n.output]
    gm.graph.node.append(scaled)
    gm.graph.initializer.append(numpy_helper.from_array(np.asarray(1.1, np.float16), "k"))
    report = onnxbp.check_gradients(m, grad_model=gm)
    assert not report.passed
    assert [r.name for r in report.results if not r.passed] == ["W"]


def test_a_check_that_would_not_fit_in_memory_is_refused_up_front(monkeypatch):
    import onnxbp.checker as checker

    monkeypatch.setattr(checker, "_available_memory", lambda: 100 << 20)
    with pytest.raises(onnxbp.MemoryLimitError) as exc:
        onnxbp.check_gradients(_f16_mlp())
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith("checking this model needs about 0.3 GiB (8 copies of its 0.00 GiB of initializers); "
                           "0.1 GiB are available")


def test_finite_differences_leave_the_parameter_values_untouched():
    """The float64 and float32 checks perturb a work copy in place; the caller's values stay as given."""
    m = _f16_mlp()
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    for precision in ("float64", "float32"):
        report = onnxbp.check_gradients(m, precision=precision)
        assert report.passed, report.table()
    assert np.array_equal(onnx.numpy_helper.to_array(m.graph.initializer[0]), w)
