"""Unary activations and elementwise math (onnxbp/rules/activation.py).

Every case builds a one-node model, checks the emitted gradient model is
standard ONNX (run_gradient -> assert_standard), and compares the gradient
with

1. onnxbp's finite-difference checker: float64 forward with per-element
   central differences where onnxruntime has float64 kernels (rtol 1e-4),
   else float32 random directions with Richardson extrapolation (rtol 1e-3);
2. torch autograd in float64 on the same float32 inputs (normwise rtol 2e-5,
   atol 1e-6) where torch expresses the op.

Inputs are drawn away from kinks: every sample is at least 0.05 away from
each point where the op's derivative jumps (0 for Abs/LeakyRelu/PRelu/Elu,
the bounds for Clip, the corners of HardSigmoid/HardSwish), so finite
differences never straddle one.  Domains are respected (Log/Sqrt positive,
Reciprocal away from 0, Tan inside (-1.2, 1.2)).
"""

from __future__ import annotations


import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxbp
from gradutil import HAS_TORCH, assert_close, make_model, run_gradient
from gradutil import record_family as _record
from gradutil import seed_of as _seed
from gradutil import fd_check as _fd

TORCH_RTOL, TORCH_ATOL = 2e-5, 1e-6




def _away_from(x, kinks, gap=0.05):
    x = np.array(x, dtype=np.float64)
    for k in kinks:
        close = np.abs(x - k) < gap
        x[close] = k + np.where(x[close] >= k, 1, -1) * (gap + np.abs(x[close] - k) * 2)
    return x.astype(np.float32)


def _torch_check(family, fn, inputs, grads, ups, names):
    import torch

    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in inputs]
    y = fn(*leaves)
    y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
    for name, leaf in zip(names, leaves):
        err = assert_close(grads[name], leaf.grad.numpy(), TORCH_RTOL, TORCH_ATOL, f"{family} d{name}")
        _record(family, torch_err=err)


# ------------------------------------------------------------- unary table
def _t():
    import torch
    import torch.nn.functional as F

    return torch, F


SELU_A, SELU_G = 1.67326319217681884765625, 1.05070102214813232421875

# op -> (attr grid, kinks(attrs), domain transform, torch fn(x, attrs), min opset)
UNARY = {
    "Sigmoid": ([{}], None, None, lambda x, a: _t()[0].sigmoid(x), 1),
    "Tanh": ([{}], None, None, lambda x, a: _t()[0].tanh(x), 1),
    "Softplus": ([{}], None, None, lambda x, a: _t()[1].softplus(x), 1),
    "Softsign": ([{}], [0.0], None, lambda x, a: _t()[1].softsign(x), 1),
    "LeakyRelu": ([{}, {"alpha": 0.2}, {"alpha": 1.5}], [0.0], None,
                  lambda x, a: _t()[1].leaky_relu(x, a.get("alpha", 0.01)), 1),
    "HardSigmoid": ([{}, {"alpha": 0.5, "beta": 0.3}, {"alpha": 1 / 6, "beta": 0.5}],
                    lambda a: [-a.get("beta", 0.5) / a.get("alpha", 0.2),
                               (1 - a.get("beta", 0.5)) / a.get("alpha", 0.2)],
                    lambda x, a: x * 3.0 / max(1.0, a.get("alpha", 0.2) * 10),
                    lambda x, a: _t()[0].clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1), 1),
    "HardSwish": ([{}], [-3.0, 3.0], lambda x, a: x * 2.5, lambda x, a: _t()[1].hardswish(x), 14),
    "Elu": ([{}, {"alpha": 0.5}, {"alpha": 2.0}], [0.0], None,
            lambda x, a: _t()[1].elu(x, a.get("alpha", 1.0)), 1),
    "Selu": ([{}, {"alpha": 1.2, "gamma": 0.8}], [0.0], None,
             lambda x, a: a.get("gamma", SELU_G) * _t()[0].where(
                 x > 0, x, a.get("alpha", SELU_A) * (_t()[0].exp(x) - 1)), 1),
    "Celu": ([{}, {"alpha": 0.5}, {"alpha": 2.0}], [0.0], None,
             lambda x, a: _t()[1].celu(x, a.get("alpha", 1.0)), 12),
    "Gelu": ([{}, {"approximate": "none"}, {"approximate": "tanh"}], None, lambda x, a: x * 2,
             lambda x, a: _t()[1].gelu(x, approximate=a.get("approximate", "none")), 20),
    "Erf": ([{}], None, None, lambda x, a: _t()[0].erf(x), 9),
    "Exp": ([{}], None, None, lambda x, a: _t()[0].exp(x), 1),
    "Log": ([{}], None, lambda x, a: np.abs(x) + 0.2, lambda x, a: _t()[0].log(x), 1),
    "Sqrt": ([{}], None, lambda x, a: np.abs(x) + 0.2, lambda x, a: _t()[0].sqrt(x), 1),
    "Reciprocal": ([{}], None, lambda x, a: np.sign(x) * (np.abs(x) + 0.3),
                   lambda x, a: _t()[0].reciprocal(x), 1),
    "Abs": ([{}], [0.0], None, lambda x, a: _t()[0].abs(x), 1),
    "Sin": ([{}], None, None, lambda x, a: _t()[0].sin(x), 7),
    "Cos": ([{}], None, None, lambda x, a: _t()[0].cos(x), 7),
    "Tan": ([{}], None, lambda x, a: np.clip(x * 0.5, -1.2, 1.2), lambda x, a: _t()[0].tan(x), 7),
    "Mish": ([{}], None, lambda x, a: x * 2, lambda x, a: _t()[1].mish(x), 18),
}

FAMILY = {
    "Sigmoid": "sigmoid/tanh", "Tanh": "sigmoid/tanh", "Softplus": "softplus/softsign/mish",
    "Softsign": "softplus/softsign/mish", "Mish": "softplus/softsign/mish",
    "LeakyRelu": "relu-like (LeakyRelu/PRelu/Abs)", "Abs": "relu-like (LeakyRelu/PRelu/Abs)",
    "HardSigmoid": "hard (HardSigmoid/HardSwish/Clip)", "HardSwish": "hard (HardSigmoid/HardSwish/Clip)",
    "Elu": "elu family (Elu/Selu/Celu)", "Selu": "elu family (Elu/Selu/Celu)",
    "Celu": "elu family (Elu/Selu/Celu)", "Gelu": "gelu/erf", "Erf": "gelu/erf",
    "Exp": "exp/log/sqrt/reciprocal/pow", "Log": "exp/log/sqrt/reciprocal/pow",
    "Sqrt": "exp/log/sqrt/reciprocal/pow", "Reciprocal": "exp/log/sqrt/reciprocal/pow",
    "Sin": "trig", "Cos": "trig", "Tan": "trig",
}


def _unary_cases():
    for op, (grid, *_rest) in UNARY.items():
        for attrs in grid:
            yield pytest.param(op, attrs, id=op + "".join(f"-{k}{v if not isinstance(v, float) else round(v, 3)}"
                                                       for k, v in attrs.items()))


def _unary_input(op, attrs, shape, seed):
    _, kinks, transform, _, _ = UNARY[op]
    x = np.random.default_rng(seed).standard_normal(shape)
    if transform is not None:
        x = transform(x, attrs)
    if kinks is not None:
        x = _away_from(x, kinks(attrs) if callable(kinks) else kinks)
    return np.asarray(x, dtype=np.float32)


def _unary_model(op, attrs, shape, opset, dtype=np.float32):
    node = helper.make_node(op, ["X"], ["Y"], name="op", **attrs)
    return make_model([node], [("X", dtype, list(shape))], [("Y", dtype, list(shape))], opset=opset)


@pytest.mark.parametrize("shape", [(3, 5), (2, 1, 3, 2), ()], ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("op,attrs", list(_unary_cases()))
def test_unary(op, attrs, shape):
    opset = max(17, UNARY[op][4])
    x = _unary_input(op, attrs, shape, _seed(op, attrs, shape))
    model = _unary_model(op, attrs, shape, opset)
    feeds = {"X": x}
    gm, _, grads, ups = run_gradient(model, feeds, ["X"])
    assert grads["X"].shape == shape
    _fd(model, ["X"], feeds, gm, FAMILY[op])
    if HAS_TORCH:
        fn = UNARY[op][3]
        _torch_check(FAMILY[op], lambda t: fn(t, attrs), [x], grads, ups, ["X"])


# Opsets where the emitted ops differ: no Where below 9 (Cast masks), no Sign
# below 9, no float Equal below 11.
OLD_OPSET_CASES = [("Sigmoid", {}, 7), ("Tanh", {}, 7), ("LeakyRelu", {"alpha": 0.2}, 7),
                   ("LeakyRelu", {"alpha": 0.2}, 9), ("Abs", {}, 7), ("Abs", {}, 9),
                   ("Elu", {"alpha": 0.5}, 7), ("Selu", {}, 7), ("Exp", {}, 7), ("Sqrt", {}, 9),
                   ("Erf", {}, 9), ("HardSigmoid", {}, 7), ("Reciprocal", {}, 11), ("Log", {}, 11)]


@pytest.mark.parametrize("op,attrs,opset", OLD_OPSET_CASES,
                         ids=[f"{o}-opset{v}" for o, _, v in OLD_OPSET_CASES])
def test_unary_old_opsets(op, attrs, opset):
    shape = (2, 3, 4)
    x = _unary_input(op, attrs, shape, _seed(op, opset))
    model = _unary_model(op, attrs, shape, opset)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    if opset < 9:
        assert not [n for n in gm.graph.node if n.op_type in ("Where", "Sign")]
    _fd(model, ["X"], {"X": x}, gm, FAMILY[op])
    if HAS_TORCH:
        fn = UNARY[op][3]
        _torch_check(FAMILY[op], lambda t: fn(t, attrs), [x], grads, ups, ["X"])


@pytest.mark.parametrize("op", ["Sigmoid", "Gelu", "LeakyRelu"])
def test_unary_symbolic_batch(op):
    """A symbolic batch dim stays symbolic: the gradient model runs for two batch sizes."""
    attrs = {"alpha": 0.2} if op == "LeakyRelu" else {}
    opset = max(17, UNARY[op][4])
    node = helper.make_node(op, ["X"], ["Y"], name="op", **attrs)
    model = make_model([node], [("X", np.float32, ["N", 4])], [("Y", np.float32, ["N", 4])], opset=opset)
    for n in (1, 3):
        x = _unary_input(op, attrs, (n, 4), _seed(op, n))
        gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
        assert grads["X"].shape == (n, 4)
        _fd(model, ["X"], {"X": x}, gm, FAMILY[op])
        if HAS_TORCH:
            fn = UNARY[op][3]
            _torch_check(FAMILY[op], lambda t: fn(t, attrs), [x], grads, ups, ["X"])


def test_unary_float64_model():
    """Rules build constants in the input's type: a float64 model stays float64."""
    x = _unary_input("Gelu", {}, (3, 4), 1).astype(np.float64)
    model = _unary_model("Gelu", {"approximate": "tanh"}, (3, 4), 20, dtype=np.float64)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert grads["X"].dtype == np.float64
    _fd(model, ["X"], {"X": x}, gm, "gelu/erf")
    if HAS_TORCH:
        import torch

        t = torch.tensor(x, requires_grad=True)
        torch.nn.functional.gelu(t, approximate="tanh").backward(torch.tensor(ups["Y"]))
        err = assert_close(grads["X"], t.grad.numpy(), 1e-12, 1e-14, "Gelu float64")
        _record("gelu/erf", torch_err=err)


def test_gelu_unknown_approximate_fails_clearly():
    node = helper.make_node("Gelu", ["X"], ["Y"], name="gelu", approximate="cubic")
    model = make_model([node], [("X", np.float32, [2])], [("Y", np.float32, [2])], opset=20)
    with pytest.raises(onnxbp.UnsupportedAttributeError, match=r"approximate='cubic' is not supported"):
        onnxbp.gradient(model, ["X"])


# --------------------------------------------------------------------- Clip
CLIP_CASES = [  # (opset, min, max): None = not given
    (7, -0.5, 0.7), (7, None, 0.3), (7, -0.2, None), (7, None, None),
    (9, -0.5, 0.7), (11, -0.5, 0.7), (11, None, 0.3), (11, -0.2, None), (11, None, None),
    (13, -1.0, 1.0), (17, 0.0, 2.0),
]


@pytest.mark.parametrize("opset,lo,hi", CLIP_CASES, ids=[f"opset{o}-min{a}-max{b}" for o, a, b in CLIP_CASES])
def test_clip(opset, lo, hi):
    """Inputs are kept >= 0.05 away from the bounds; the boundary convention is tested separately."""
    shape = (4, 6)
    rng = np.random.default_rng(_seed("clip", opset, lo, hi))
    x = _away_from(rng.standard_normal(shape), [b for b in (lo, hi) if b is not None])
    inits = {}
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        node = helper.make_node("Clip", ["X"], ["Y"], name="clip", **attrs)
    else:
        ins = ["X", "", ""]
        if lo is not None:
            inits["lo"] = np.array(lo, np.float32)
            ins[1] = "lo"
        if hi is not None:
            inits["hi"] = np.array(hi, np.float32)
            ins[2] = "hi"
        while ins[-1] == "":
            ins.pop()
        node = helper.make_node("Clip", ins, ["Y"], name="clip")
    model = make_model([node], [("X", np.float32, list(shape))], [("Y", np.float32, list(shape))],
                       inits, opset=opset)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    _fd(model, ["X"], {"X": x}, gm, FAMILY["HardSigmoid"])
    if HAS_TORCH:
        import torch

        def ref(t):
            return t * 1.0 if lo is None and hi is None else torch.clamp(t, lo, hi)

        _torch_check(FAMILY["HardSigmoid"], ref, [x], grads, ups, ["X"])


@pytest.mark.skipif(not HAS_TORCH, reason="compares with torch.clamp's boundary convention")
@pytest.mark.parametrize("opset", [7, 11, 13])
def test_clip_boundary_convention_matches_torch(opset):
    """X exactly on a bound passes the gradient (min <= X <= max), as torch.clamp."""
    import torch

    lo, hi = -0.5, 0.5
    x = np.array([[-1.0, -0.5, 0.0, 0.5, 1.0, 0.25]], np.float32)
    if opset < 11:
        node = helper.make_node("Clip", ["X"], ["Y"], name="clip", min=lo, max=hi)
        inits = {}
    else:
        node = helper.make_node("Clip", ["X", "lo", "hi"], ["Y"], name="clip")
        inits = {"lo": np.array(lo, np.float32), "hi": np.array(hi, np.float32)}
    model = make_model([node], [("X", np.float32, [1, 6])], [("Y", np.float32, [1, 6])], inits, opset=opset)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.clamp(t, lo, hi).backward(torch.tensor(ups["Y"], dtype=torch.float64))
    np.testing.assert_array_equal(grads["X"] != 0, t.grad.numpy() != 0)
    assert_close(grads["X"], t.grad.numpy(), 1e-6, 0, "Clip at the bounds")


def test_clip_bounds_are_not_differentiable():
    """min/max inputs (opset >= 11) get no gradient: asking for one fails with a clear message."""
    node = helper.make_node("Clip", ["X", "lo", "hi"], ["Y"], name="clip")
    model = make_model([node], [("X", np.float32, [3]), ("lo", np.float32, []), ("hi", np.float32, [])],
                       [("Y", np.float32, [3])], opset=13)
    msg = r"input 'lo' of node 'clip' \(Clip\) is not differentiable"
    with pytest.raises(onnxbp.NotDifferentiableError, match=msg):
        onnxbp.gradient(model, ["lo"])
    # X alone is fine, with the bounds as runtime inputs.
    x = np.array([-1.0, 0.1, 2.0], np.float32)
    feeds = {"X": x, "lo": np.array(-0.5, np.float32), "hi": np.array(1.0, np.float32)}
    gm, _, grads, ups = run_gradient(model, feeds, ["X"])
    _fd(model, ["X"], feeds, gm, FAMILY["HardSigmoid"])
    ref = ups["Y"] * ((x >= -0.5) & (x <= 1.0))
    _record(FAMILY["HardSigmoid"], torch_err=assert_close(grads["X"], ref, 1e-6, 0, "Clip runtime bounds (numpy)"))


# -------------------------------------------------------------------- PRelu
PRELU_SLOPES = [(3, 1, 1), (1,), (5,), (4, 5), (1, 3, 1, 1), (2, 3, 4, 5)]


@pytest.mark.parametrize("slope_shape", PRELU_SLOPES, ids=lambda s: "slope" + "x".join(map(str, s)))
@pytest.mark.parametrize("opset", [7, 9, 16])
def test_prelu(slope_shape, opset):
    """Slope broadcasts unidirectionally to X; its gradient is summed over the broadcast axes."""
    x_shape = (2, 3, 4, 5)
    rng = np.random.default_rng(_seed("prelu", slope_shape, opset))
    x = _away_from(rng.standard_normal(x_shape), [0.0])
    slope = rng.uniform(0.05, 0.5, slope_shape).astype(np.float32)
    node = helper.make_node("PRelu", ["X", "S"], ["Y"], name="prelu")
    model = make_model([node], [("X", np.float32, list(x_shape)), ("S", np.float32, list(slope_shape))],
                       [("Y", np.float32, list(x_shape))], opset=opset)
    feeds = {"X": x, "S": slope}
    gm, _, grads, ups = run_gradient(model, feeds, ["X", "S"])
    assert grads["S"].shape == slope_shape
    _fd(model, ["X", "S"], feeds, gm, FAMILY["LeakyRelu"])
    if HAS_TORCH:
        import torch

        _torch_check(FAMILY["LeakyRelu"], lambda a, s: torch.where(a > 0, a, a * s), [x, slope], grads, ups,
                     ["X", "S"])


def test_prelu_symbolic_batch_slope_only():
    """Only the slope is requested (X' not emitted); batch dim symbolic."""
    node = helper.make_node("PRelu", ["X", "S"], ["Y"], name="prelu")
    model = make_model([node], [("X", np.float32, ["N", 3, 4])], [("Y", np.float32, ["N", 3, 4])],
                       {"S": np.full((3, 1), 0.25, np.float32)}, opset=17)
    x = _away_from(np.random.default_rng(3).standard_normal((5, 3, 4)), [0.0])
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["S"])
    assert grads["S"].shape == (3, 1)
    _fd(model, ["S"], {"X": x}, gm, FAMILY["LeakyRelu"])
    ref = np.sum(ups["Y"] * np.where(x > 0, 0, x), axis=(0, 2)).reshape(3, 1)
    _record(FAMILY["LeakyRelu"], torch_err=assert_close(grads["S"], ref, 1e-5, 1e-6, "PRelu dS (numpy)"))


# ---------------------------------------------------------------------- Pow
POW_SHAPES = [((3, 4), (3, 4)), ((3, 4), ()), ((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3))]


@pytest.mark.parametrize("sa,sb", POW_SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("opset", [7, 13, 17])
def test_pow_both_inputs(sa, sb, opset):
    """Base in [0.3, 2] (log(base) defined), exponent in [-2, 2]."""
    rng = np.random.default_rng(_seed("pow", sa, sb, opset))
    a = rng.uniform(0.3, 2.0, sa).astype(np.float32)
    b = rng.uniform(-2.0, 2.0, sb).astype(np.float32)
    ys = np.broadcast_shapes(sa, sb)
    node = helper.make_node("Pow", ["A", "B"], ["Y"], name="pow")
    model = make_model([node], [("A", np.float32, list(sa)), ("B", np.float32, list(sb))],
                       [("Y", np.float32, list(ys))], opset=opset)
    feeds = {"A": a, "B": b}
    gm, _, grads, ups = run_gradient(model, feeds, ["A", "B"])
    assert grads["A"].shape == sa and grads["B"].shape == sb
    _fd(model, ["A", "B"], feeds, gm, FAMILY["Exp"])
    if HAS_TORCH:
        import torch

        _torch_check(FAMILY["Exp"], torch.pow, [a, b], grads, ups, ["A", "B"])


@pytest.mark.parametrize("opset", [9, 17])
def test_pow_exponent_only(opset):
    """Only the exponent is requested: B' = Y' * Y * log(A), no base gradient emitted."""
    rng = np.random.default_rng(_seed("pow-exp", opset))
    a = rng.uniform(0.3, 2.0, (3, 4)).astype(np.float32)
    node = helper.make_node("Pow", ["A", "B"], ["Y"], name="pow")
    model = make_model([node], [("A", np.float32, [3, 4])], [("Y", np.float32, [3, 4])],
                       {"B": rng.uniform(-1, 2, (4,)).astype(np.float32)}, opset=opset)
    gm, _, grads, ups = run_gradient(model, {"A": a}, ["B"])
    assert grads["B"].shape == (4,)
    _fd(model, ["B"], {"A": a}, gm, FAMILY["Exp"])
    if HAS_TORCH:
        import torch

        b = numpy_helper.to_array(model.graph.initializer[0])
        _torch_check(FAMILY["Exp"], lambda t: torch.pow(torch.tensor(a, dtype=torch.float64), t), [b], grads,
                     ups, ["B"])


@pytest.mark.parametrize("const", [None, 0.0, 1.0, 2.0, 3.0, -0.5], ids=lambda c: f"B{c}")
def test_pow_constant_exponent_folding(const):
    """Constant one-valued exponents are folded; the runtime exponent (None) keeps the general form."""
    rng = np.random.default_rng(_seed("pow-fold", const))
    a = rng.uniform(0.3, 2.0, (3, 4)).astype(np.float32)
    b = rng.uniform(-2, 2, (3, 4)).astype(np.float32) if const is None else np.full((4,), const, np.float32)
    node = helper.make_node("Pow", ["A", "B"], ["Y"], name="pow")
    inputs = [("A", np.float32, [3, 4])]
    inits = {}
    feeds = {"A": a}
    if const is None:
        inputs.append(("B", np.float32, [3, 4]))
        feeds["B"] = b
    else:
        inits["B"] = b
    model = make_model([node], inputs, [("Y", np.float32, [3, 4])], inits, opset=17)
    gm, _, grads, ups = run_gradient(model, feeds, ["A"])
    n_pow = sum(n.op_type == "Pow" for n in gm.graph.node)
    assert n_pow == (1 if const in (1.0, 2.0) else 2)
    if const == 0.0:  # the general form, masked where B = 0
        assert any(n.op_type == "Where" for n in gm.graph.node)
    _fd(model, ["A"], feeds, gm, FAMILY["Exp"])
    if HAS_TORCH:
        import torch

        tb = torch.tensor(b, dtype=torch.float64)
        _torch_check(FAMILY["Exp"], lambda t: torch.pow(t, tb), [a], grads, ups, ["A"])


@pytest.mark.skipif(not HAS_TORCH, reason="compares torch's values at the singular points")
@pytest.mark.parametrize("opset", [11, 17])
def test_pow_singular_points_match_torch(opset):
    """A = 0 with B = 0 (A' = 0, not NaN) and A = 0 with B > 0 (B' = 0, not 0 * -inf)."""
    import torch

    a = np.array([0.0, 0.0, 0.0, 1.5, 2.0], np.float32)
    b = np.array([0.0, 2.0, 1.5, 0.0, -1.0], np.float32)
    node = helper.make_node("Pow", ["A", "B"], ["Y"], name="pow")
    model = make_model([node], [("A", np.float32, [5]), ("B", np.float32, [5])], [("Y", np.float32, [5])],
                       opset=opset)
    _, _, grads, ups = run_gradient(model, {"A": a, "B": b}, ["A", "B"])
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    torch.pow(ta, tb).backward(torch.tensor(ups["Y"], dtype=torch.float64))
    assert np.all(np.isfinite(grads["A"])) and np.all(np.isfinite(grads["B"]))
    _record(FAMILY["Exp"], torch_err=assert_close(grads["A"], ta.grad.numpy(), 1e-6, 1e-7, "Pow dA at 0"))
    _record(FAMILY["Exp"], torch_err=assert_close(grads["B"], tb.grad.numpy(), 1e-6, 1e-7, "Pow dB at 0"))


@pytest.mark.parametrize("exp_dtype", [np.float32, np.int64])
def test_pow_base_only_with_constant_exponent(exp_dtype):
    """Exponent a constant (int64 allowed from opset 12): no exponent gradient (no Log) is emitted."""
    rng = np.random.default_rng(_seed("pow-base", str(exp_dtype)))
    a = rng.standard_normal((3, 4)).astype(np.float32)  # integer powers: negative bases are fine
    node = helper.make_node("Pow", ["A", "B"], ["Y"], name="pow")
    model = make_model([node], [("A", np.float32, [3, 4])], [("Y", np.float32, [3, 4])],
                       {"B": np.array([1, 2, 3, 2], dtype=exp_dtype)}, opset=15)
    gm, _, grads, ups = run_gradient(model, {"A": a}, ["A"])
    assert not [n for n in gm.graph.node if n.op_type == "Log"]
    _fd(model, ["A"], {"A": a}, gm, FAMILY["Exp"])
    if HAS_TORCH:
        import torch

        e = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
        _torch_check(FAMILY["Exp"], lambda t: torch.pow(t, e), [a], grads, ups, ["A"])


def test_activation_chain_accumulates():
    """A small MLP-like chain mixing rules: Gemm -> Gelu -> Mul(Sigmoid) gate -> Softplus."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
             helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
             helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
             helper.make_node("Mul", ["g", "s"], ["m"], name="gate"),
             helper.make_node("Softplus", ["m"], ["Y"], name="sp")]
    model = make_model(nodes, [("X", np.float32, [4, 3])], [("Y", np.float32, [4, 5])],
                       {"W": rng.standard_normal((3, 5)).astype(np.float32)}, opset=20)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
    _fd(model, ["X", "W"], {"X": x}, gm, "gelu/erf")
    if HAS_TORCH:
        import torch
        import torch.nn.functional as F

        wv = numpy_helper.to_array(model.graph.initializer[0])

        def f(tx, tw):
            h = tx @ tw
            return F.softplus(F.gelu(h) * torch.sigmoid(h))

        _torch_check("gelu/erf", f, [x, wv], grads, ups, ["X", "W"])


# ------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("op,attrs", list(_unary_cases()))
def test_unary_large_every_opset(op, attrs):
    """A (4, 8, 16) tensor at every opset from the op's first (>= 7) to 21, 96 FD elements."""
    shape = (4, 8, 16)
    for opset in range(max(7, UNARY[op][4]), 22):
        x = _unary_input(op, attrs, shape, _seed(op, attrs, opset))
        model = _unary_model(op, attrs, shape, opset)
        gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
        report = onnxbp.check_gradients(model, ["X"], feeds={"X": x}, grad_model=gm, rtol=1e-3,
                                        max_elements=96)
        assert report.passed, "\n" + report.table()
        _record(FAMILY[op], fd_report=report)
        if HAS_TORCH:
            fn = UNARY[op][3]
            _torch_check(FAMILY[op], lambda t: fn(t, attrs), [x], grads, ups, ["X"])
