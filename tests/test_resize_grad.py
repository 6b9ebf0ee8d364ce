"""Resize gradients beyond the op table: a symbolic batch, sizes computed at run time (the exporters'
``Concat(Shape(X)[:2], [h, w])``), the emitted lowering, and the refusals with their messages.

Numbers are compared with torch autograd of ``F.interpolate`` in float64 (normwise, 1e-5) on the
same upstream gradients; the op table (tests/optable.py) holds the attribute grid.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbp
from gradutil import HAS_TORCH
from onnxbp.errors import UnsupportedAttributeError
from onnxbp.testing import make_model, run_gradient

F32 = TensorProto.FLOAT


def _init(name, values, dtype=np.float32):
    return {name: np.asarray(values, dtype=dtype)}


def _runtime_sizes_model(opset=13, mode="linear", hw=(8, 7), batch="N", coord="half_pixel"):
    """X (N, 3, 4, 5) -> Resize with sizes = Concat(Shape(X)[0:2], [h, w])."""
    nodes = [helper.make_node("Shape", ["X"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["X", "", "", "sizes"], ["Y"], name="up", mode=mode,
                              coordinate_transformation_mode=coord)]
    inits = {**_init("zero", [0], np.int64), **_init("two", [2], np.int64), **_init("hw", hw, np.int64)}
    return make_model(nodes, [("X", F32, [batch, 3, 4, 5])], [("Y", F32, [batch, 3, *hw])], inits, opset=opset)


def _torch_grad(x, up, **kw):
    import torch
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    y = torch.nn.functional.interpolate(t, **kw)
    y.backward(torch.from_numpy(up.astype(np.float64)))
    return t.grad.numpy()


def _close(ours, ref, tol=1e-5):
    err = np.max(np.abs(ours - ref))
    assert err <= tol * max(1.0, np.max(np.abs(ref))), err


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("batch", [1, 3])
def test_runtime_sizes_symbolic_batch(batch):
    """One gradient model, two batch sizes: only the resized axes' sizes are static."""
    model = _runtime_sizes_model()
    gm = onnxbp.gradient(model, ["X"])
    x = np.random.default_rng(batch).standard_normal((batch, 3, 4, 5)).astype(np.float32)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"], seed=batch)
    _close(grads["X"], _torch_grad(x, ups["Y"], size=(8, 7), mode="bilinear", align_corners=False))
    dims = [d.dim_param or d.dim_value for d in gm.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "N"


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_axes_attribute_symbolic_batch_and_channels():
    """Opset 18 ``axes``: constant sizes for H, W only; N and C symbolic."""
    node = helper.make_node("Resize", ["X", "", "", "sizes"], ["Y"], mode="cubic", axes=[2, 3])
    model = make_model([node], [("X", F32, ["N", "C", 4, 5])], [("Y", F32, ["N", "C", 7, 3])],
                       _init("sizes", [7, 3], np.int64), opset=18)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    _close(grads["X"], _torch_grad(x, ups["Y"], size=(7, 3), mode="bicubic", align_corners=False))


def _ops(gm, model):
    return [n.op_type for n in gm.graph.node[len(model.graph.node):] if n.op_type != "Constant"]


def test_lowering_nchw_is_two_matmuls():
    """Spatial axes are the last two: A_H^T @ Y' @ A_W, no Transpose, no Reshape."""
    node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], mode="linear")
    model = make_model([node], [("X", F32, ["N", 3, 4, 5])], [("Y", F32, ["N", 3, 8, 10])],
                       _init("scales", [1, 1, 2, 2]), opset=13)
    gm = onnxbp.gradient(model, ["X"])
    assert sorted(_ops(gm, model)) == ["MatMul", "MatMul"]


def test_lowering_earlier_axis_reshapes_once():
    """An axis before the last two: Reshape to (d_0..d_{k-1}, out_k, -1), MatMul; one Reshape back."""
    node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], mode="nearest")
    model = make_model([node], [("X", F32, ["N", 2, 3, 2, 3])], [("Y", F32, ["N", 4, 4, 2, 6])],
                       _init("scales", [1, 2, 1.5, 1, 2]), opset=13)
    gm = onnxbp.gradient(model, ["X"])
    assert _ops(gm, model).count("MatMul") == 3 and "Transpose" not in _ops(gm, model)
    x = np.random.default_rng(1).standard_normal((2, 2, 3, 2, 3)).astype(np.float32)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    # nearest (half_pixel, round_prefer_floor) at these scales: a 0/1 selection; check by its adjoint
    from onnxbp.rules import resize_arith as ra
    mats = [ra.axis_matrix(n, o, s) for n, o, s in [(2, 4, 2.0), (3, 4, 1.5), (3, 6, 2.0)]]
    want = np.einsum("ncdhw,ci,dj,wk->nijhk", ups["Y"].astype(np.float64), *mats)
    _close(grads["X"], want, 1e-6)


def test_identity_resize_passes_the_gradient_through():
    node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], mode="cubic")
    model = make_model([node], [("X", F32, [1, 2, 10, 4])], [("Y", F32, [1, 2, 10, 4])],
                       _init("scales", [1, 1, 1.05, 1]), opset=13)  # floor(10.5) = 10: onnxruntime copies
    gm, _, grads, ups = run_gradient(model, {"X": np.ones((1, 2, 10, 4), np.float32)}, ["X"])
    assert "MatMul" not in _ops(gm, model)
    np.testing.assert_array_equal(grads["X"], ups["Y"])


# ------------------------------------------------------------------ refusals
def _refusal(node, x_shape, inits, y_shape, opset, inputs=()):
    model = make_model([node], [("X", F32, x_shape), *inputs], [("Y", F32, y_shape)], inits, opset=opset)
    with pytest.raises(UnsupportedAttributeError) as exc:
        onnxbp.gradient(model, ["X"])
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_antialias_nearest_is_refused():
    node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], name="aa", mode="nearest", antialias=1)
    text = _refusal(node, [1, 1, 4, 4], _init("scales", [1, 1, 0.5, 0.5]), [1, 1, 2, 2], 18)
    assert text == ("node 'aa' (Resize, opset 18): antialias=1 with mode 'nearest' is not defined (onnxruntime "
                    "refuses it); supported: antialias=1 with modes linear and cubic")


def test_runtime_scales_are_refused():
    node = helper.make_node("Resize", ["X", "", "s"], ["Y"], name="rs", mode="nearest")
    text = _refusal(node, [1, 1, 4, 4], {}, [1, 1, None, None], 13, inputs=[("s", F32, [4])])
    assert text == ("node 'rs' (Resize, opset 13): the scales input 's' is computed at run time; the Resize "
                    "gradient needs it as a build-time constant (or give sizes)")


def test_symbolic_resized_axis_is_refused():
    node = helper.make_node("Resize", ["X", "", "scales"], ["Y"], name="sym", mode="linear")
    text = _refusal(node, ["N", 3, "H", 5], _init("scales", [1, 1, 2, 2]), ["N", 3, None, 10], 13)
    assert text == ("node 'sym' (Resize, opset 13): dim 2 of input 'X' is symbolic ('H'), but scales resizes "
                    "that axis by 2; the Resize gradient needs the input size of every resized axis static "
                    "(other dims, such as a symbolic batch, may stay symbolic)")


def test_constant_sizes_over_a_symbolic_batch_are_refused():
    node = helper.make_node("Resize", ["X", "", "", "sizes"], ["Y"], name="sz", mode="nearest")
    text = _refusal(node, ["N", 3, 4, 5], _init("sizes", [1, 3, 8, 10], np.int64), [1, 3, 8, 10], 13)
    assert text.startswith("node 'sz' (Resize, opset 13): dim 0 of input 'X' is symbolic ('N'), but sizes sets "
                           "it to 1;")


def test_runtime_roi_is_refused():
    node = helper.make_node("Resize", ["X", "roi", "", "sizes"], ["Y"], name="crop", mode="linear",
                            coordinate_transformation_mode="tf_crop_and_resize")
    text = _refusal(node, [1, 1, 4, 4], _init("sizes", [1, 1, 3, 3], np.int64), [1, 1, 3, 3], 13,
                    inputs=[("roi", F32, [8])])
    assert text == ("node 'crop' (Resize, opset 13): coordinate_transformation_mode=tf_crop_and_resize needs the "
                    "roi input as a build-time constant (initializer or Constant); 'roi' is computed at run time "
                    "or missing")


def test_roi_scales_sizes_get_no_gradient():
    entry = onnxbp.REGISTRY.lookup("Resize", "", 13)
    assert entry.non_differentiable_inputs == (1, 2, 3)
    assert onnxbp.REGISTRY.lookup("Resize", "", 9) is None  # Resize starts at opset 10
