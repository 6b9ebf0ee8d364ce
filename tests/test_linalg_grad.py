"""Gemm and MatMul gradients over every attribute / broadcast combination.

Each case is compared with (1) onnxbp's finite-difference checker (float64
forward, per-element central differences, rtol 1e-4) and (2) torch autograd
in float64 where torch is installed (rtol 1e-5 on float32 gradients).
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from onnx import helper

from gradutil import HAS_TORCH, assert_close, assert_fd, make_model, run_gradient

M, K, N = 3, 4, 5
C_SHAPES = [None, (), (1,), (N,), (M, 1), (1, N), (M, N)]


def _gemm_case(trans_a, trans_b, alpha, beta, c_shape, opset=17):
    rng = np.random.default_rng(zlib.crc32(repr((trans_a, trans_b, alpha, beta, c_shape, opset)).encode()))
    a_shape = (K, M) if trans_a else (M, K)
    b_shape = (N, K) if trans_b else (K, N)
    inputs = [("A", np.float32, list(a_shape)), ("B", np.float32, list(b_shape))]
    inits = {}
    node_inputs = ["A", "B"]
    if c_shape is not None:
        inits["C"] = rng.standard_normal(c_shape).astype(np.float32)
        node_inputs.append("C")
    attrs = dict(transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    node = helper.make_node("Gemm", node_inputs, ["Y"], name="gemm", **attrs)
    model = make_model([node], inputs, [("Y", np.float32, [M, N])], inits, opset=opset)
    feeds = {"A": rng.standard_normal(a_shape).astype(np.float32),
             "B": rng.standard_normal(b_shape).astype(np.float32)}
    return model, feeds, inits


@pytest.mark.parametrize("c_shape", C_SHAPES, ids=lambda s: "noC" if s is None else "C" + "x".join(map(str, s)))
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([0, 1], [0, 1])))
def test_gemm_all_attributes(trans_a, trans_b, alpha, beta, c_shape):
    model, feeds, inits = _gemm_case(trans_a, trans_b, alpha, beta, c_shape)
    wrt = ["A", "B"] + (["C"] if c_shape is not None else [])
    gm, outs, grads, ups = run_gradient(model, feeds, wrt)
    # The seeds fold transposes into Gemm's flags: no Transpose node is emitted.
    assert not [n for n in gm.graph.node if n.op_type == "Transpose"]
    assert_fd(model, wrt, feeds=feeds, rtol=1e-4)
    if HAS_TORCH:
        import torch

        a = torch.tensor(feeds["A"], dtype=torch.float64, requires_grad=True)
        b = torch.tensor(feeds["B"], dtype=torch.float64, requires_grad=True)
        aa = a.T if trans_a else a
        bb = b.T if trans_b else b
        y = alpha * aa @ bb
        leaves = [a, b]
        if c_shape is not None:
            c = torch.tensor(inits["C"], dtype=torch.float64, requires_grad=True)
            y = y + beta * c
            leaves.append(c)
        y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
        for name, leaf in zip(wrt, leaves):
            assert_close(grads[name], leaf.grad.numpy(), 1e-5, 1e-6, f"Gemm d{name}")


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([0, 1], [0, 1])))
@pytest.mark.parametrize("c_shape", [(N,), (M, N)], ids=["C_N", "C_MN"])
def test_gemm_opset9_without_optional_c(trans_a, trans_b, c_shape):
    """Opset < 11: Gemm needs C, so the backward uses MatMul/Transpose instead."""
    model, feeds, _ = _gemm_case(trans_a, trans_b, 0.5, 2.0, c_shape, opset=9)
    gm, _, _, _ = run_gradient(model, feeds, ["A", "B", "C"])
    assert all(n.op_type != "Gemm" for n in gm.graph.node[1:])
    assert_fd(model, ["A", "B", "C"], feeds=feeds, rtol=1e-4)


MATMUL_SHAPES = [
    ((K,), (K,)),
    ((K,), (K, N)),
    ((M, K), (K,)),
    ((M, K), (K, N)),
    ((2, M, K), (K, N)),
    ((M, K), (2, K, N)),
    ((2, M, K), (2, K, N)),
    ((1, M, K), (3, K, N)),
    ((2, 1, M, K), (3, K, N)),
    ((K,), (2, K, N)),
    ((2, M, K), (K,)),
    ((2, 3, M, K), (1, 3, K, N)),
]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_matmul_broadcasting(sa, sb):
    rng = np.random.default_rng(len(sa) * 10 + len(sb))
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    y_shape = np.matmul(a, b).shape
    model = make_model([helper.make_node("MatMul", ["A", "B"], ["Y"], name="mm")],
                       [("A", np.float32, list(sa)), ("B", np.float32, list(sb))],
                       [("Y", np.float32, list(y_shape))])
    feeds = {"A": a, "B": b}
    _, _, grads, ups = run_gradient(model, feeds, ["A", "B"])
    assert_fd(model, ["A", "B"], feeds=feeds, rtol=1e-4)
    if HAS_TORCH:
        import torch

        ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
        tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
        torch.matmul(ta, tb).backward(torch.tensor(ups["Y"], dtype=torch.float64))
        assert_close(grads["A"], ta.grad.numpy(), 1e-5, 1e-6, "MatMul dA")
        assert_close(grads["B"], tb.grad.numpy(), 1e-5, 1e-6, "MatMul dB")


def test_matmul_symbolic_batch_weight_gradient():
    """(N, S, K) x (K, J) with symbolic N: one folded GEMM for dW, runs at any batch size."""
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
                       [("X", np.float32, ["batch", 3, K])], [("Y", np.float32, ["batch", 3, N])],
                       {"W": w})
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, K)).astype(np.float32)
        _, _, grads, ups = run_gradient(model, {"X": x}, ["W", "X"])
        ref_w = np.einsum("bsk,bsn->kn", x.astype(np.float64), ups["Y"].astype(np.float64))
        assert_close(grads["W"], ref_w, 1e-5, 1e-6, "dW")
        assert_close(grads["X"], ups["Y"].astype(np.float64) @ w.T.astype(np.float64), 1e-5, 1e-6, "dX")


@pytest.mark.parametrize("b_batch", [2, 1], ids=["same", "broadcast"])
def test_matmul_batch_dims_named_differently(b_batch):
    """Batch dims that shape inference names differently ('na' vs 'nb', as a TorchScript export of an
    attention block leaves them) are resolved at run time: summed where B's dim is 1."""
    rng = np.random.default_rng(7 + b_batch)
    a = rng.standard_normal((2, 2, M, K)).astype(np.float32)
    b = rng.standard_normal((b_batch, 2, K, N)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["A", "B"], ["Y"], name="mm")],
                       [("A", np.float32, ["na", 2, M, K]), ("B", np.float32, ["nb", 2, K, N])],
                       [("Y", np.float32, ["ny", 2, M, N])])
    feeds = {"A": a, "B": b}
    _, _, grads, _ = run_gradient(model, feeds, ["A", "B"])
    assert grads["B"].shape == b.shape and grads["A"].shape == a.shape
    assert_fd(model, ["A", "B"], feeds=feeds, rtol=1e-4)
