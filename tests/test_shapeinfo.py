"""Shape folding: integer shape subgraphs that onnx's data propagation skips."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbp
from onnxbp import shapeinfo
from onnxbp.types import TensorInfo
from gradutil import assert_fd, make_model


def _shuffle_model(groups=2, c=8, hw=4):
    """A channel shuffle whose Reshape target is built from Shape/Gather/Div/Cast (TorchScript style)."""
    const = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [v]))
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], name="conv0", kernel_shape=[1, 1]),
        helper.make_node("Shape", ["c"], ["s"], name="shape"),
        const("i0", 0), const("i1", 1), const("i2", 2), const("i3", 3), const("g", groups),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="gn"),
        helper.make_node("Gather", ["s", "i1"], ["ch"], name="gc"),
        helper.make_node("Gather", ["s", "i2"], ["h"], name="gh"),
        helper.make_node("Gather", ["s", "i3"], ["w"], name="gw"),
        helper.make_node("Div", ["ch", "g"], ["cg"], name="div"),
        helper.make_node("Cast", ["cg"], ["cg64"], name="cast", to=TensorProto.INT64),
        *[helper.make_node("Unsqueeze", [v, "ax0"], [v + "_u"], name="u" + v) for v in ("n", "g", "cg64", "ch", "h", "w")],
        helper.make_node("Concat", ["n_u", "g_u", "cg64_u", "h_u", "w_u"], ["shape5"], name="cat", axis=0),
        helper.make_node("Reshape", ["c", "shape5"], ["r5"], name="rs5"),
        helper.make_node("Transpose", ["r5"], ["t5"], name="tr", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Concat", ["n_u", "ch_u", "h_u", "w_u"], ["shape4"], name="cat4", axis=0),
        helper.make_node("Reshape", ["t5", "shape4"], ["r4"], name="rs4"),
        helper.make_node("Conv", ["r4", "W2"], ["Y"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((c, c, 1, 1)).astype(np.float32),
             "W2": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
             "ax0": np.array([0], np.int64)}
    return make_model(nodes, [("X", np.float32, ["N", c, hw, hw])], [("Y", np.float32, ["N", c, hw, hw])],
                      inits)


def test_channel_shuffle_dims_are_folded():
    model = _shuffle_model()
    infos = shapeinfo.infer(model)
    assert infos["r5"].shape == ("N", 2, 4, 4, 4)
    assert infos["r4"].shape == ("N", 8, 4, 4)


def test_channel_shuffle_gradient_symbolic_batch():
    model = _shuffle_model()
    gm = onnxbp.gradient(model)
    assert [o.name for o in gm.graph.output] == ["Y", "W_grad", "W2_grad"]
    report = assert_fd(model, batch_size=3)
    assert report.precision == "float64"


@pytest.mark.parametrize("shape,target,expect", [
    (("N", 16, 4, 4), ["N", 2, 8, 4, 4], ["N", 2, 8, 4, 4]),
    (("N", 16, 4, 4), ["N", -1], ["N", 256]),
    (("N", 16, 4, 4), [0, -1, 16], ["N", 16, 16]),
    (("N", 16, 4, 4), [-1, 64], [None, 64]),
    ((2, 3, 4), [-1], [24]),
    ((2, None, 4), [2, -1], [2, None]),
])
def test_reshape_dims(shape, target, expect):
    assert shapeinfo._reshape_dims(TensorInfo(1, shape), np.array(target, dtype=object), 0) == expect


@pytest.mark.parametrize("shape,args,expect", [
    (("N", 16, 4, 4), [[0], [8], [1], None], ["N", 8, 4, 4]),
    (("N", 16, 4, 4), [[8], [2 ** 63 - 1], [1], None], ["N", 8, 4, 4]),
    (("N", 16, 4, 4), [[-1], [-17], [1], [-2]], ["N", 8, 4, 4]),
    (("N", 16, 5, 4), [[1, 0], [5, 3], [2, 3], [2, 1]], ["N", 16, 2, 3]),
    (("N", None, 4, 4), [[0], [8], [1], None], ["N", None, 4, 4]),
])
def test_slice_dims(shape, args, expect):
    args = [None if a is None else np.array(a, dtype=object) for a in args]
    assert shapeinfo._slice_dims(TensorInfo(1, shape), args) == expect
