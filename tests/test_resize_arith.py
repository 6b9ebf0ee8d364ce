"""Tests of onnxbp/rules/resize_arith.py (Resize's per-axis interpolation matrices), alone.

The reference is onnxruntime's own Resize: resizing the identity ``I_n``
along axis 0 (the other axis at scale 1) gives the matrix ``A`` itself
(``Y = A I``), so every matrix is compared entry by entry with what the
kernel computes, over a grid of modes x coordinate modes x nearest modes x
scales / sizes x input lengths.  A second grid resizes random 2-D and 4-D
inputs along two axes at once and checks ``Y = A_0 X A_1^T`` (separability,
the premise of the gradient), and the output shapes (scales, sizes,
keep_aspect_ratio_policy, axes) against the shapes onnxruntime produces.
The same grid runs with ``antialias=1`` (linear and cubic).
Tolerance: 1e-6 absolute (weights are float32 in the kernel).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxbp.rules import resize_arith as ra

ATOL = 1e-6


def _run(x, opset, attrs, scales=None, sizes=None, roi=None):
    """onnxruntime's Resize of ``x`` (inputs as initializers, in the opset's input layout)."""
    inits, ins = [], ["X"]

    def init(name, dtype, values):
        inits.append(helper.make_tensor(name, dtype, [len(values)], list(values)))
        ins.append(name)

    if opset == 10:
        init("scales", TensorProto.FLOAT, scales)
    else:
        for name, value in (("roi", roi), ("scales", scales)):  # opset 11 wants them present, empty
            if value is not None or opset == 11:
                init(name, TensorProto.FLOAT, [] if value is None else value)
            else:
                ins.append("")
        if sizes is not None:
            init("sizes", TensorProto.INT64, sizes)
    node = helper.make_node("Resize", ins, ["Y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": np.asarray(x, np.float32)})[0]


def _matrix_case(n, spec, opset, mode, coord, nearest, exclude=0, a=-0.75, roi=(0.0, 1.0), antialias=0):
    attrs = {"mode": mode}
    if opset >= 11:
        attrs["coordinate_transformation_mode"] = coord
        if mode == "nearest":
            attrs["nearest_mode"] = nearest
    if mode == "cubic" or antialias:
        attrs.update(exclude_outside=exclude, cubic_coeff_a=a)
    if antialias:
        attrs["antialias"] = 1
    kind, v = spec
    if kind == "scale":
        out, sc = ra.output_shape((n, n), scales=[v, 1.0])
        kw = {"scales": [v, 1.0]}
    else:
        out, sc = ra.output_shape((n, n), sizes=[v, n])
        kw = {"sizes": [v, n]}
    if out[0] == 0:
        return  # an empty output: nothing to compare
    full_roi = [roi[0], 0.0, roi[1], 1.0] if coord == "tf_crop_and_resize" else None
    y = _run(np.eye(n, dtype=np.float32), opset, attrs, roi=full_roi, **kw)
    if out == [n, n]:
        A = np.eye(n)
    elif antialias:
        A = ra.antialias_axis_matrix(n, out[0], sc[0], mode=mode, coord=coord, cubic_a=a, exclude_outside=exclude,
                                     roi=roi)
    else:
        A = ra.axis_matrix(n, out[0], sc[0], mode=mode, coord=coord, nearest_mode=nearest, cubic_a=a,
                           exclude_outside=exclude, roi=roi)
    assert y.shape == A.shape, (y.shape, A.shape)
    np.testing.assert_allclose(A, y, atol=ATOL, rtol=0)


SPECS = [("scale", 2.0), ("scale", 0.5), ("scale", 1.7), ("scale", 0.6), ("scale", 3.0), ("scale", 0.35),
         ("size", 1), ("size", 4), ("size", 9)]
LENGTHS = [1, 3, 7]
COORDS = [c for c in ra.COORD_MODES if c != "tf_half_pixel_for_nn"]
ROI = (0.2, 0.9)


@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("nearest", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
def test_nearest_matrices(coord, nearest):
    for n, spec in itertools.product(LENGTHS, SPECS):
        _matrix_case(n, spec, 19, "nearest", coord, nearest, roi=ROI)


@pytest.mark.parametrize("coord", COORDS)
def test_linear_matrices(coord):
    for n, spec in itertools.product(LENGTHS, SPECS):
        _matrix_case(n, spec, 19, "linear", coord, None, roi=ROI)


@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("exclude,a", [(0, -0.75), (1, -0.75), (0, -0.5), (1, -0.5)])
def test_cubic_matrices(coord, exclude, a):
    for n, spec in itertools.product(LENGTHS, SPECS):
        _matrix_case(n, spec, 19, "cubic", coord, None, exclude=exclude, a=a, roi=ROI)


@pytest.mark.parametrize("roi", [(0.0, 1.0), (-0.3, 0.6), (0.4, 1.5), (0.9, 0.1)])
@pytest.mark.parametrize("mode", ra.MODES)
def test_crop_and_resize_rois(roi, mode):
    """Coordinates outside [0, n-1] give zero rows (the constant extrapolation value)."""
    for n, spec in itertools.product([2, 6], [("size", 1), ("size", 5), ("scale", 1.5), ("scale", 0.5)]):
        _matrix_case(n, spec, 13, mode, "tf_crop_and_resize", "round_prefer_floor", roi=roi)


AA_SPECS = [("scale", 0.5), ("scale", 0.3), ("scale", 0.75), ("scale", 0.125), ("scale", 2.0), ("scale", 1.7),
            ("size", 1), ("size", 3)]


@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("mode,exclude,a", [("linear", 0, -0.75), ("linear", 1, -0.75), ("cubic", 0, -0.75),
                                            ("cubic", 1, -0.75), ("cubic", 0, -0.5), ("cubic", 1, -0.5)])
def test_antialias_matrices(coord, mode, exclude, a):
    """antialias=1: the stretched, normalised filters, edges folded (exclude 0) or dropped (exclude 1)."""
    for n, spec in itertools.product([1, 5, 9, 16], AA_SPECS):
        _matrix_case(n, spec, 18, mode, coord, None, exclude=exclude, a=a, roi=ROI, antialias=1)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_opset10_asymmetric_simple(mode):
    """Resize-10: asymmetric coordinates; nearest truncates (ceil when downscaling)."""
    for n, spec in itertools.product([3, 7], [("scale", 2.0), ("scale", 0.5), ("scale", 1.7), ("scale", 0.6)]):
        _matrix_case(n, spec, 10, mode, "asymmetric", "simple")


@pytest.mark.parametrize("nearest", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
def test_tf_half_pixel_for_nn(nearest):
    for n, spec in itertools.product([3, 7], SPECS):
        _matrix_case(n, spec, 11, "nearest", "tf_half_pixel_for_nn", nearest)


def test_round_ties_within_1e6():
    """onnxruntime treats a coordinate within 1e-6 of a half as a tie (4/7 scale: 2/s = 3.4999998)."""
    s = float(np.float32(4) / np.float32(7))
    c = ra.original_coords(7, 4, s, "asymmetric")
    assert c[2] != 3.5 and abs(c[2] - 3.5) < 1e-6
    assert ra.nearest_index(c, "round_prefer_ceil", True)[2] == 4
    assert ra.nearest_index(c, "round_prefer_floor", True)[2] == 3
    _matrix_case(7, ("size", 4), 19, "nearest", "asymmetric", "round_prefer_ceil")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_rank1_nearest_transforms_at_scale_1(mode):
    """A rank-1 nearest resize applies the coordinate transform even at scale 1 (tf_half_pixel_for_nn shows it)."""
    x = np.arange(5, dtype=np.float32)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn",
             "nearest_mode": "round_prefer_ceil"}
    if mode == "nearest":
        y = _run(x, 11, attrs, scales=[1.6])
        A = ra.axis_matrix(5, 8, 1.6, mode="nearest", coord="tf_half_pixel_for_nn",
                           nearest_mode="round_prefer_ceil", rank1=True)
        np.testing.assert_array_equal(A @ x, y)
    a1 = ra.axis_matrix(4, 4, 1.0, mode=mode, coord="tf_half_pixel_for_nn", nearest_mode="round_prefer_ceil")
    assert ra.is_identity(a1)


# ------------------------------------------------------------ separability and shapes
SEP_ATTRS = [
    {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor"},
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"},
    {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
    {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
    {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 0.0},
    {"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel"},
    {"mode": "cubic", "coordinate_transformation_mode": "half_pixel_symmetric", "exclude_outside": 1},
    {"mode": "cubic", "coordinate_transformation_mode": "tf_crop_and_resize"},
]


def _attrs_of(a):
    return dict(mode=a.get("mode", "nearest"), coord=a.get("coordinate_transformation_mode", "half_pixel"),
                nearest_mode=a.get("nearest_mode", "round_prefer_floor"), exclude_outside=a.get("exclude_outside", 0))


@pytest.mark.parametrize("attrs", SEP_ATTRS, ids=lambda a: f"{a['mode']}-{a['coordinate_transformation_mode']}")
@pytest.mark.parametrize("rank", [2, 4])
def test_separable_two_axes(attrs, rank):
    rng = np.random.default_rng(0)
    for (h, w), (sh, sw) in itertools.product([(4, 5), (6, 3)], [(2.0, 1.5), (0.5, 1.7), (1.3, 0.6)]):
        lead = [] if rank == 2 else [2, 3]
        x = rng.standard_normal(lead + [h, w]).astype(np.float32)
        scales = [1.0] * len(lead) + [sh, sw]
        roi = [0.0] * len(lead) + [0.1, -0.2] + [1.0] * len(lead) + [0.8, 1.3]
        crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
        y = _run(x, 19, attrs, scales=scales, roi=roi if crop else None)
        out, sc = ra.output_shape(x.shape, scales=scales)
        kw = _attrs_of(attrs)
        mats = [ra.axis_matrix(n, o, s, roi=(roi[i], roi[rank + i]) if crop else (0.0, 1.0), **kw)
                for i, (n, o, s) in enumerate(zip(x.shape[-2:], out[-2:], sc[-2:]), start=len(lead))]
        want = np.einsum("im,...mn,jn->...ij", mats[0], x.astype(np.float64), mats[1])
        assert y.shape == want.shape
        np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ra.POLICIES)
@pytest.mark.parametrize("axes", [None, [2, 3], [3, 1]])
def test_output_shapes_sizes_policy_axes(policy, axes):
    x = np.zeros((1, 3, 4, 6), np.float32)
    for sizes in ([1, 3, 7, 5], [1, 5, 9, 9], [1, 3, 2, 13]):
        given = sizes if axes is None else [sizes[a] for a in axes]
        attrs = {"mode": "nearest", "keep_aspect_ratio_policy": policy}
        if axes is not None:
            attrs["axes"] = axes
        y = _run(x, 18, attrs, sizes=given)
        if axes is None:
            out, _ = ra.output_shape(x.shape, sizes=given, policy=policy)
        else:
            out, _ = ra.output_shape_axes(x.shape, axes, sizes=given, policy=policy)
        assert list(y.shape) == out


@pytest.mark.parametrize("scales", [[1, 1, 1.5, 0.7], [1, 2, 0.35, 3.3], [1, 1, 1.05, 1.0]])
def test_output_shapes_scales(scales):
    x = np.zeros((1, 3, 10, 6), np.float32)
    y = _run(x, 13, {"mode": "nearest"}, scales=scales)
    assert list(y.shape) == ra.output_shape(x.shape, scales=scales)[0]
    y = _run(x, 18, {"mode": "nearest", "axes": [2, 3]}, scales=scales[2:])
    assert list(y.shape) == ra.output_shape_axes(x.shape, [2, 3], scales=scales[2:])[0]
