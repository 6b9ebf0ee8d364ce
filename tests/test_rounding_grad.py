"""Floor, Ceil, Round, Sign: zero gradient (the registry's no_gradient), checked where it matters,
on a path beside a differentiable one, against torch autograd (which defines all four as zero).

Mod itself is in the op table (tests/optable.py: fmod=1 at opsets 10, 13, 28 against torch.fmod,
fmod=0 at opset 28 against torch.remainder).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbp
from gradutil import HAS_TORCH
from onnxbp.registry import NO_GRADIENT
from onnxbp.testing import make_model, run_gradient

F32 = TensorProto.FLOAT


@pytest.mark.parametrize("op", ["Floor", "Ceil", "Round", "Sign"])
def test_registered_as_no_gradient(op):
    assert onnxbp.REGISTRY.lookup(op, "", 17).kind == NO_GRADIENT


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("op", ["Floor", "Ceil", "Round", "Sign"])
def test_zero_through_the_step_op_beside_a_live_path(op):
    """Y = X * P(W) + W * X  with P piecewise constant: W' = sum(Y' * X) only, X' = Y' * (P(W) + W)."""
    nodes = [helper.make_node(op, ["W"], ["p"]),
             helper.make_node("Mul", ["X", "p"], ["a"]),
             helper.make_node("Mul", ["W", "X"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["Y"])]
    w = np.array([[1.3, -0.6, 2.7], [-1.8, 0.2, 0.9]], np.float32)
    model = make_model(nodes, [("X", F32, [2, 3])], [("Y", F32, [2, 3])], {"W": w}, opset=17)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
    assert op not in [n.op_type for n in gm.graph.node[len(model.graph.node):]]

    import torch
    fn = {"Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign}[op]
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    (tx * fn(tw) + tw * tx).backward(torch.tensor(ups["Y"], dtype=torch.float64))
    np.testing.assert_allclose(grads["X"], tx.grad.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads["W"], tw.grad.numpy(), rtol=1e-6, atol=1e-6)
