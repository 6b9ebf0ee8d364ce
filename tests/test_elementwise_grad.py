"""Add/Sub/Mul/Div with numpy broadcasting, Relu, Neg, Sum, Flatten, Reshape, Identity, Cast.

Reference: onnxbp's finite-difference checker (float64 forward, rtol 1e-4)
and torch autograd in float64 (rtol 1e-5) where torch is installed.
"""

from __future__ import annotations

import zlib
import numpy as np
import pytest
from onnx import helper

from gradutil import HAS_TORCH, assert_close, assert_fd, make_model, run_gradient

BROADCAST_PAIRS = [
    ((2, 3), (2, 3)),
    ((2, 3), (3,)),
    ((2, 3), (1, 3)),
    ((2, 3), (2, 1)),
    ((2, 1, 4), (3, 1)),
    ((), (2, 3)),
    ((4,), (2, 3, 4)),
    ((1, 3, 1), (2, 1, 5)),
]

TORCH_OPS = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
             "Mul": lambda a, b: a * b, "Div": lambda a, b: a / b}


@pytest.mark.parametrize("sa,sb", BROADCAST_PAIRS, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary_broadcasting(op, sa, sb):
    rng = np.random.default_rng(zlib.crc32(repr((op, sa, sb)).encode()))
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    if op == "Div":  # keep the denominator away from zero
        b = (np.sign(b) * (0.5 + np.abs(b))).astype(np.float32)
    y_shape = np.broadcast_shapes(sa, sb)
    model = make_model([helper.make_node(op, ["A", "B"], ["Y"], name="op")],
                       [("A", np.float32, list(sa)), ("B", np.float32, list(sb))],
                       [("Y", np.float32, list(y_shape))])
    feeds = {"A": a, "B": b}
    _, _, grads, ups = run_gradient(model, feeds, ["A", "B"])
    assert grads["A"].shape == sa and grads["B"].shape == sb
    assert_fd(model, ["A", "B"], feeds=feeds, rtol=1e-4)
    if HAS_TORCH:
        import torch

        ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
        TORCH_OPS[op](ta, tb).backward(torch.tensor(ups["Y"], dtype=torch.float64))
        assert_close(grads["A"], ta.grad.numpy(), 1e-5, 1e-6, f"{op} dA")
        assert_close(grads["B"], tb.grad.numpy(), 1e-5, 1e-6, f"{op} dB")


def test_same_tensor_on_both_inputs_accumulates():
    """Mul(x, x): both inputs are x, so x' = 2 x Y' (two contributions summed)."""
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    model = make_model([helper.make_node("Mul", ["X", "X"], ["Y"], name="sq")],
                       [("X", np.float32, [3, 4])], [("Y", np.float32, [3, 4])])
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert_close(grads["X"], 2 * x.astype(np.float64) * ups["Y"], 1e-6, 1e-7, "d(x*x)")


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 4)])
@pytest.mark.parametrize("op", ["Relu", "Neg", "Identity"])
def test_unary(op, shape):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    x[np.abs(x) < 0.05] = 0.5  # tie-free: away from Relu's kink
    model = make_model([helper.make_node(op, ["X"], ["Y"], name="u")],
                       [("X", np.float32, list(shape))], [("Y", np.float32, list(shape))])
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert_fd(model, ["X"], feeds={"X": x}, rtol=1e-4)
    local = {"Relu": (x > 0).astype(np.float64), "Neg": -np.ones(shape), "Identity": np.ones(shape)}[op]
    assert_close(grads["X"], local * ups["Y"], 1e-6, 1e-7, op)


@pytest.mark.parametrize("opset", [7, 9, 13])
def test_relu_old_opsets(opset):
    """Opset < 9 has no Where: the mask is a Cast of Greater."""
    x = np.random.default_rng(opset).standard_normal((4, 5)).astype(np.float32)
    model = make_model([helper.make_node("Relu", ["X"], ["Y"], name="r")],
                       [("X", np.float32, [4, 5])], [("Y", np.float32, [4, 5])], opset=opset)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert_close(grads["X"], (x > 0) * ups["Y"].astype(np.float64), 1e-6, 1e-7, "relu")


@pytest.mark.parametrize("n_inputs", [1, 2, 3])
def test_sum_variadic_broadcast(n_inputs):
    shapes = [(2, 3, 4), (3, 1), (4,)][:n_inputs]
    rng = np.random.default_rng(n_inputs)
    names = [f"X{i}" for i in range(n_inputs)]
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    y_shape = np.broadcast_shapes(*shapes)
    model = make_model([helper.make_node("Sum", names, ["Y"], name="s")],
                       [(n, np.float32, list(s)) for n, s in zip(names, shapes)],
                       [("Y", np.float32, list(y_shape))])
    _, _, grads, ups = run_gradient(model, feeds, names)
    for n, s in zip(names, shapes):
        ref = ups["Y"].astype(np.float64)
        ref = ref.reshape((-1,) + ref.shape[len(ref.shape) - len(s):]).sum(0) if len(s) < ref.ndim else ref
        ref = ref.sum(axis=tuple(i for i, d in enumerate(s) if d == 1), keepdims=True) if s else ref.sum()
        assert_close(grads[n], ref, 1e-5, 1e-6, f"Sum d{n}")


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
def test_flatten(axis):
    x = np.random.default_rng(axis + 5).standard_normal((2, 3, 4, 5)).astype(np.float32)
    w = np.random.default_rng(axis + 6).standard_normal(x.size).astype(np.float32)
    # Y = Flatten(X) * W (reshaped), so the Flatten gradient is checked through a Mul.
    outer = int(np.prod(x.shape[:axis % 4])) if axis % 4 else 1
    fshape = (outer, x.size // outer)
    model = make_model([helper.make_node("Flatten", ["X"], ["F"], name="flat", axis=axis),
                        helper.make_node("Mul", ["F", "W"], ["Y"], name="mul")],
                       [("X", np.float32, ["N", 3, 4, 5])], [("Y", np.float32, list(fshape))],
                       {"W": w.reshape(fshape)})
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
    assert_close(grads["X"], (ups["Y"] * w.reshape(fshape)).reshape(x.shape), 1e-6, 1e-7, "flatten")
    assert_fd(model, ["X", "W"], feeds={"X": x}, rtol=1e-4)


@pytest.mark.parametrize("target", [[6, 4], [-1], [0, 2, 2, 3], [2, -1, 3]])
def test_reshape_symbolic_batch(target):
    """Reshape back with the runtime Shape(X): works for any batch size."""
    w = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    node_shape = helper.make_node("Constant", [], ["shape"], name="c",
                                  value=helper.make_tensor("v", 7, [len(target)], target))
    model = make_model([node_shape,
                        helper.make_node("Mul", ["X", "W"], ["XW"], name="mul"),
                        helper.make_node("Reshape", ["XW", "shape"], ["Y"], name="rs")],
                       [("X", np.float32, ["N", 3, 4])], [("Y", np.float32, [f"d{i}" for i in range(len(target))])],
                       {"W": w[:1]})
    for batch in (2,):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 4)).astype(np.float32)
        _, outs, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
        assert_close(grads["X"], ups["Y"].reshape(x.shape) * w[:1], 1e-6, 1e-7, "reshape dX")
        assert_fd(model, ["X", "W"], feeds={"X": x}, rtol=1e-4)


@pytest.mark.parametrize("to", ["double", "float16"])
def test_cast_between_float_types(to):
    from onnx import TensorProto

    elem = {"double": TensorProto.DOUBLE, "float16": TensorProto.FLOAT16}[to]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    model = make_model([helper.make_node("Cast", ["X"], ["Y"], name="cast", to=elem)],
                       [("X", np.float32, [3, 4])], [("Y", elem, [3, 4])])
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert grads["X"].dtype == np.float32
    assert_close(grads["X"], ups["Y"].astype(np.float64), 1e-3, 1e-3, "cast")


@pytest.mark.parametrize("template", [np.float64, np.float32])
def test_castlike_template_gets_no_gradient(template):
    """The dynamo exporter writes biases as CastLike(zeros, activation): only input 0 is differentiable."""
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["X"], ["R"], name="relu"),
             helper.make_node("CastLike", ["R", "T"], ["C"], name="castlike"),
             helper.make_node("CastLike", ["C", "X"], ["B"], name="back"),
             helper.make_node("Mul", ["B", "R"], ["Y"], name="mul")]
    model = make_model(nodes, [("X", np.float32, [2, 3])], [("Y", np.float32, [2, 3])],
                       {"T": np.zeros(1, template)}, opset=18)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    r = np.maximum(x, 0).astype(np.float64)
    assert_close(grads["X"], 2 * r * (x > 0) * ups["Y"], 1e-5, 1e-6, "castlike")
    assert_fd(model, ["X"], feeds={"X": np.where(np.abs(x) < 0.05, 0.5, x).astype(np.float32)}, rtol=1e-4)
