"""Shape folding: integer shape subgraphs that onnx's data propagation skips."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbp
from onnxbp import shapeinfo
from onnxbp.types import TensorInfo
from gradutil import assert_fd, assert_standard, make_model


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


# ------------------------------------------------------------ values fixed by the static shapes
def _ints(name, v, attr=False):
    if attr:  # the dynamo exporter writes Constant(value_ints=[-1])
        return helper.make_node("Constant", [], [name], value_ints=list(v))
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [], [v]))


def _swin_slice_model():
    """The dynamo exporter's ``x[:, 0::2]`` (Swin's patch merging): every Slice parameter is
    ``Reshape(Cast(Constant scalar), Constant(value_ints=[-1]))``, so none is an initializer."""
    nodes = [_ints("m1", [-1], attr=True)]
    for p, v in (("st", 0), ("en", 2 ** 63 - 1), ("ax", 1), ("sp", 2)):
        nodes += [_ints(p + "_c", v), helper.make_node("Cast", [p + "_c"], [p + "_i"], to=TensorProto.INT64),
                  helper.make_node("Reshape", [p + "_i", "m1"], [p], name="rs_" + p)]
    nodes += [helper.make_node("Slice", ["X", "st", "en", "ax", "sp"], ["s"], name="slice"),
              helper.make_node("Mul", ["s", "W"], ["Y"], name="mul")]
    rng = np.random.default_rng(0)
    return make_model(nodes, [("X", np.float32, [2, 6, 3])], [("Y", np.float32, [2, 3, 3])],
                      {"W": rng.standard_normal((2, 3, 3)).astype(np.float32)})


def test_folded_ints_reshape_cast_constant_value_ints():
    model = _swin_slice_model()
    vals = shapeinfo.folded_ints(model, shapeinfo.infer(model))
    assert {k: v.tolist() for k, v in vals.items() if k in ("st", "en", "ax", "sp")} == \
        {"st": [0], "en": [2 ** 63 - 1], "ax": [1], "sp": [2]}
    assert vals["ax"].dtype == np.int64


def test_slice_with_computed_axes_differentiates():
    """Was: 'Slice with runtime axes is not supported' (Swin through both exporters)."""
    model = _swin_slice_model()
    gm = onnxbp.gradient(model, ["W", "X"])
    assert_standard(gm)
    ops = {n.op_type for n in gm.graph.node[len(model.graph.node):]}
    assert "ScatterElements" not in ops  # the static rule (Pad / interleave), not the runtime one
    assert_fd(model, ["W", "X"])


def test_folded_ints_leave_out_overridable_initializers_and_runtime_values():
    nodes = [helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Add", ["s", "k"], ["t"]),
             helper.make_node("Reshape", ["X", "t"], ["Y"])]
    model = make_model(nodes, [("X", np.float32, ["N", 4])], [("Y", np.float32, ["N", 4])],
                       {"k": np.array([0, 0], np.int64)})
    vals = shapeinfo.folded_ints(model, shapeinfo.infer(model))
    assert "s" not in vals and "t" not in vals  # the symbolic batch N: not fixed at build time
    model.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, [2]))
    assert "k" not in shapeinfo.folded_ints(model, shapeinfo.infer(model))


def test_torch_pad_pads_are_folded():
    """TorchScript's F.pad: pads = Cast(Reshape(Transpose(Slice(Reshape(Concat(pads, ConstantOfShape))))))
    (MobileNetV2's TF-style padding); the Pad output's dims were 'unk__' and the Conv after it refused."""
    zero = helper.make_tensor("z", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Constant", [], ["p4"], value=helper.make_tensor("p4", TensorProto.INT64, [4], [0, 1, 1, 0])),
        helper.make_node("Constant", [], ["n4"], value=helper.make_tensor("n4", TensorProto.INT64, [1], [4])),
        helper.make_node("ConstantOfShape", ["n4"], ["zeros"], value=zero),
        helper.make_node("Concat", ["p4", "zeros"], ["cat"], axis=0),
        _ints("rs_t", [-1, 2], attr=True),
        helper.make_node("Reshape", ["cat", "rs_t"], ["pairs"]),
        _ints("a", [0], attr=True), _ints("b", [-1], attr=True), _ints("c", [-(2 ** 63 - 1)], attr=True),
        helper.make_node("Slice", ["pairs", "b", "c", "a", "b"], ["rev"]),
        helper.make_node("Transpose", ["rev"], ["tr"], perm=[1, 0]),
        helper.make_node("Reshape", ["tr", "b"], ["flat"]),
        helper.make_node("Cast", ["flat"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["X", "pads"], ["xp"], name="pad"),
        helper.make_node("Conv", ["xp", "W"], ["Y"], name="conv", kernel_shape=[2, 2]),
    ]
    rng = np.random.default_rng(1)
    model = make_model(nodes, [("X", np.float32, ["N", 2, 4, 4])], [("Y", np.float32, ["N", 3, 4, 4])],
                       {"W": rng.standard_normal((3, 2, 2, 2)).astype(np.float32)})
    infos = shapeinfo.infer(model)
    # torch's pads (0, 1, 1, 0) = W left/right, H top/bottom -> ONNX [0, 0, 1, 0, 0, 0, 0, 1]
    assert infos["pads"].shape == (8,)
    assert infos["xp"].shape == ("N", 2, 5, 5)
    assert_fd(model, ["W", "X"])


def test_unsqueeze_axes_from_range():
    """The dynamo exporter's group norm: Unsqueeze(weight, Range(1, rank - 1, 1)); the rank was unknown."""
    nodes = [_ints("one", 1), _ints("three", 3),
             helper.make_node("Range", ["one", "three", "one"], ["axes"]),
             helper.make_node("Unsqueeze", ["W", "axes"], ["w3"]),
             helper.make_node("Mul", ["X", "w3"], ["Y"], name="mul")]
    rng = np.random.default_rng(2)
    model = make_model(nodes, [("X", np.float32, ["N", 4, 3, 3])], [("Y", np.float32, ["N", 4, 3, 3])],
                       {"W": rng.standard_normal((4,)).astype(np.float32)})
    assert shapeinfo.infer(model)["w3"].shape == (4, 1, 1)
    assert_fd(model, ["W", "X"])
