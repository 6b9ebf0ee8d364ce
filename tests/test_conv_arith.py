"""Table-driven tests of onnxbp/rules/conv_arith.py (pure per-axis Conv arithmetic).

Hand-derived rows first (each comment shows the derivation), then brute
force: the helpers must agree with a direct enumeration of which input
positions each output window reads, over a grid of small sizes.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxbp.rules import conv_arith as ca

# ------------------------------------------------------------ auto_pad resolution
# (mode, n, k, s, d, pads) -> expected [begins..., ends...]
AUTO_PAD_ROWS = [
    # SAME: out = ceil(n/s); total = max(0, (out-1)*s + (k-1)*d + 1 - n)
    ("SAME_UPPER", [5], [3], [1], [1], None, [1, 1]),  # total = 4+3-5 = 2
    ("SAME_UPPER", [5], [4], [1], [1], None, [1, 2]),  # total = 3, extra at end
    ("SAME_LOWER", [5], [4], [1], [1], None, [2, 1]),  # total = 3, extra at begin
    ("SAME_UPPER", [8], [3], [2], [1], None, [0, 1]),  # out 4: 6+3-8 = 1
    ("SAME_LOWER", [8], [3], [2], [1], None, [1, 0]),
    ("SAME_UPPER", [7], [3], [2], [1], None, [1, 1]),  # out 4: 6+3-7 = 2
    ("SAME_UPPER", [7], [3], [1], [2], None, [2, 2]),  # ek = 5: 6+5-7 = 4
    ("SAME_UPPER", [5], [1], [3], [1], None, [0, 0]),  # out 2: 3+1-5 < 0 -> 0
    ("SAME_UPPER", [9], [2], [3], [1], None, [0, 0]),  # out 3: 6+2-9 = -1 -> 0
    ("SAME_LOWER", [6, 7], [3, 2], [2, 3], [1, 1], None, [1, 1, 0, 0]),  # 4+3-6=1; 6+2-7=1
    ("VALID", [6, 7], [3, 2], [2, 3], [1, 1], [4, 4, 4, 4], [0, 0, 0, 0]),
    ("NOTSET", [6, 7], [3, 2], [2, 3], [1, 1], [1, 2, 3, 0], [1, 2, 3, 0]),
    ("NOTSET", [6], [3], [2], [1], None, [0, 0]),
]


@pytest.mark.parametrize("mode,n,k,s,d,pads,expected", AUTO_PAD_ROWS)
def test_resolve_auto_pad(mode, n, k, s, d, pads, expected):
    assert ca.resolve_auto_pad(mode, n, k, s, d, pads) == expected


@pytest.mark.parametrize("n,k,s,d", list(itertools.product([1, 2, 5, 8, 9], [1, 2, 3, 4], [1, 2, 3], [1, 2])))
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_output_is_ceil(mode, n, k, s, d):
    """SAME pads give ceil(n/s) outputs and split the total as the spec says."""
    pads = ca.resolve_auto_pad(mode, [n], [k], [s], [d])
    assert ca.conv_out_size(n, k, s, d, pads[0], pads[1]) == -(-n // s)
    assert abs(pads[0] - pads[1]) <= 1
    assert (pads[1] >= pads[0]) if mode == "SAME_UPPER" else (pads[0] >= pads[1])


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("n,k,s,d", [(7, 3, 1, 2), (9, 2, 2, 3), (6, 3, 2, 1), (5, 4, 3, 1)])
def test_output_size_matches_onnx_shape_inference(mode, n, k, s, d):
    """The resolved pads give the output length onnx's own shape inference gives."""
    node = helper.make_node("Conv", ["X", "W"], ["Y"], auto_pad=mode, strides=[s], dilations=[d])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", 1, [1, 1, n]),
                                            helper.make_tensor_value_info("W", 1, [1, 1, k])],
                              [helper.make_tensor_value_info("Y", 1, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    y = model.graph.output[0].type.tensor_type.shape.dim[2].dim_value
    pads = ca.resolve_auto_pad(mode, [n], [k], [s], [d])
    assert ca.conv_out_size(n, k, s, d, pads[0], pads[1]) == y


def test_resolve_auto_pad_errors():
    with pytest.raises(ValueError, match="auto_pad='SAME'; supported: NOTSET, SAME_UPPER"):
        ca.resolve_auto_pad("SAME", [5], [3], [1], [1])
    with pytest.raises(ValueError, match="pads has 3 values, expected 2"):
        ca.resolve_auto_pad("NOTSET", [5], [3], [1], [1], [1, 1, 1])


# --------------------------------------------------------------- per-axis table
# (n, k, s, d, pb, pe) -> (out, tail, output_padding, bpa_pads, bpw_len)
AXIS_ROWS = [
    # n=8,k=3,s=2: out = (8-3)//2+1 = 3, last window ends at 2*2+3 = 7 -> row 7 untouched;
    # BPA pads (2, 2+1); BPW length (8-4-1)//1+1 = 4 -> crop to 3
    ((8, 3, 2, 1, 0, 0), (3, 1, 1, (2, 3), 4)),
    # worked example (docs): n=9,k=3,s=2,d=2,pads (2,1): ek=5, out=(12-5)//2+1=4,
    # windows end at 3*2+5=11 of 12 -> tail 1; BPA pads (4-2, 4-1+1)=(2,4); BPW (12-6-1)//2+1=3
    ((9, 3, 2, 2, 2, 1), (4, 1, 1, (2, 4), 3)),
    # stride 1, no pads: full correlation pads k-1 each side, nothing untouched
    ((5, 3, 1, 1, 0, 0), (3, 0, 0, (2, 2), 3)),
    # "same" pads: BPA pads become (k-1-p) = 1
    ((5, 3, 1, 1, 1, 1), (5, 0, 0, (1, 1), 3)),
    # pads larger than the effective kernel: negative BPA pads (crop)
    ((3, 1, 1, 1, 2, 3), (8, 0, 0, (-2, -3), 1)),
    # stride 3 > k: n=11,k=2,s=3,d=1,pads (1,0): out=(12-2)//3+1=4, ends 9+2=11 of 12 -> tail 1;
    # BPA pads (1-1, 1-0+1); BPW length (12-9-1)//1+1 = 3
    ((11, 2, 3, 1, 1, 0), (4, 1, 1, (0, 2), 3)),
    # k=1, s=2: out=(5-1)//2+1=3, tail 0
    ((5, 1, 2, 1, 0, 0), (3, 0, 0, (0, 0), 1)),
    # BPW result longer than k: n=10,k=2,s=3,d=2: ek=3, out=(10-3)//3+1=3, ends 6+3=9 -> tail 1;
    # BPW length (10-6-1)//2+1 = 2 = k
    ((10, 2, 3, 2, 0, 0), (3, 1, 1, (2, 3), 2)),
    # n=7,k=2,s=1,d=1,pads (0,3): out=9; BPW (10-8-1)//1+1 = 2
    ((7, 2, 1, 1, 0, 3), (9, 0, 0, (1, -2), 2)),
    # BPW longer than k: n=8,k=2,s=4,d=1: out=(8-2)//4+1=2, ends 4+2=6 -> tail 2;
    # BPW length (8-4-1)//1+1 = 4 > k: crop 2
    ((8, 2, 4, 1, 0, 0), (2, 2, 2, (1, 3), 4)),
]


@pytest.mark.parametrize("axis,expected", AXIS_ROWS)
def test_axis_table(axis, expected):
    out, tail, op, bpa, bpw = expected
    assert ca.conv_out_size(*axis) == out
    assert ca.untouched_tail(*axis) == tail
    assert ca.transpose_output_padding(*axis) == op
    assert ca.bpa_pads(*axis) == bpa
    assert ca.bpw_crop(*axis) == bpw


@pytest.mark.parametrize("begin,end,expected", [
    ([2, -1], [0, 3], ([0, 1], [0, 0], [2, 0], [0, 3])),
    ([-2], [-3], ([2], [3], [0], [0])),
    ([0, 0, 0], [0, 0, 0], ([0] * 3, [0] * 3, [0] * 3, [0] * 3)),
])
def test_split_pads(begin, end, expected):
    assert ca.split_pads(begin, end) == expected


def _brute(n, k, s, d, pb, pe):
    """Enumerate windows: which input positions are read, and the BPA/BPW identities."""
    padded = n + pb + pe
    windows = [p for p in range(padded) if p * s + (k - 1) * d < padded]
    read = {p * s + r * d - pb for p in windows for r in range(k)}
    out = len(windows)
    last_end = (out - 1) * s + (k - 1) * d + 1
    return out, padded - last_end, read


@pytest.mark.parametrize("n", [1, 2, 4, 7, 9])
@pytest.mark.parametrize("k,s,d", list(itertools.product([1, 2, 3], [1, 2, 3], [1, 2])))
def test_against_enumeration(n, k, s, d):
    """Every helper against a direct enumeration, over all pads up to the effective kernel."""
    ek = ca.effective_kernel(k, d)
    for pb, pe in itertools.product(range(ek + 1), repeat=2):
        if n + pb + pe < ek:
            continue
        out, tail, read = _brute(n, k, s, d, pb, pe)
        assert ca.conv_out_size(n, k, s, d, pb, pe) == out
        assert ca.untouched_tail(n, k, s, d, pb, pe) == tail and 0 <= tail < s
        # ConvTranspose length with output_padding restores n
        op = ca.transpose_output_padding(n, k, s, d, pb, pe)
        assert s * (out - 1) + ek + op - pb - pe == n
        # BPA(b): zero-inserted dY, padded, gives exactly n outputs of a stride-1 conv with ek span;
        # output h reads zero-inserted index h - before + r'*d, a multiple of s inside [0, (out-1)s]
        before, after = ca.bpa_pads(n, k, s, d, pb, pe)
        zlen = (out - 1) * s + 1
        assert before + zlen + after - ek + 1 == n
        for h in range(n):
            hits = [r for r in range(k) if 0 <= h - before + (k - 1 - r) * d < zlen
                    and (h - before + (k - 1 - r) * d) % s == 0]
            assert bool(hits) == (h in read)
        # BPW(a): length before cropping, >= k
        blen = ca.bpw_crop(n, k, s, d, pb, pe)
        assert blen >= k and blen == (n + pb + pe - (zlen - 1) - 1) // d + 1


def test_effective_kernel_rows():
    assert [ca.effective_kernel(k, d) for k, d in [(1, 1), (1, 5), (3, 1), (3, 2), (4, 3)]] == [1, 1, 3, 5, 10]


def test_numpy_free():
    """The helpers are pure ints: no numpy or onnx types leak out."""
    vals = ca.resolve_auto_pad("SAME_UPPER", [np.int64(7)], [3], [2], [1])
    assert all(type(v) is int for v in vals)


@pytest.mark.parametrize("totals,mode,expected", [
    ([3, 2, 0], "SAME_UPPER", [1, 1, 0, 2, 1, 0]),  # odd extra at the end
    ([3, 2, 0], "SAME_LOWER", [2, 1, 0, 1, 1, 0]),  # ... at the beginning
    ([5], "NOTSET", [3, 2]),  # ConvTranspose with output_shape: as SAME_LOWER
])
def test_split_total(totals, mode, expected):
    assert ca.split_total(totals, mode) == expected


@pytest.mark.parametrize("k,s,d", list(itertools.product([1, 2, 3], [1, 2, 3], [1, 2])))
def test_kernel_offset_slices_against_enumeration(k, s, d):
    """Offset r of the windows is the strided slice [r*d, r*d + (out-1)*s + 1) of the padded input."""
    for out in (1, 2, 5):
        rows = ca.kernel_offset_slices([k, 2], [s, 1], [d, 1], [out, 3])
        assert [offs for offs, _, _ in rows] == [list(o) for o in itertools.product(range(k), range(2))]
        for offs, starts, ends in rows:
            assert list(range(starts[0], ends[0], s)) == [p * s + offs[0] * d for p in range(out)]
            assert list(range(starts[1], ends[1], 1)) == [p + offs[1] for p in range(3)]


# ------------------------------------------------------------------ ConvTranspose
def _conv_transpose_1d(x, w, s, d, pb, pe, op):
    """ConvTranspose by enumeration: tap (i, r) adds x[i] w[r] at i*s + r*d, then crop pb / pe."""
    full = np.zeros((len(x) - 1) * s + (len(w) - 1) * d + 1 + op)
    for i, r in itertools.product(range(len(x)), range(len(w))):
        full[i * s + r * d] += x[i] * w[r]
    return full[pb:len(full) - pe]


@pytest.mark.parametrize("n", [1, 2, 4, 5])
@pytest.mark.parametrize("k,s,d", list(itertools.product([1, 2, 3], [1, 2, 3], [1, 2])))
def test_conv_transpose_against_enumeration(n, k, s, d):
    """Output size, the Conv that is its adjoint (X'), and the weight-gradient Conv's pads (W')."""
    rng = np.random.default_rng(n * 100 + k * 10 + s + d)
    ek = ca.effective_kernel(k, d)
    for pb, pe, op in itertools.product(range(ek), range(ek), range(max(s, d))):
        m = ca.conv_transpose_out_size(n, k, s, d, pb, pe, op)
        if m < 1:
            continue
        x, w = rng.standard_normal(n), rng.standard_normal(k)
        y = _conv_transpose_1d(x, w, s, d, pb, pe, op)
        assert len(y) == m
        # X': Conv of Y' with W (same s, d, pads) gives n + op // s positions, the first n are X'
        dy = rng.standard_normal(m)
        assert ca.conv_out_size(m, k, s, d, pb, pe) == n + op // s
        dypad = np.concatenate([np.zeros(pb), dy, np.zeros(pe)])
        dx = [sum(dypad[i * s + r * d] * w[r] for r in range(k)) for i in range(n)]
        np.testing.assert_allclose(dx, [np.dot(dy, _conv_transpose_1d(np.eye(n)[i], w, s, d, pb, pe, op))
                                        for i in range(n)], atol=1e-12)
        # W': Conv of Y' (pads conv_transpose_weight_pads) with X as kernel, dilation s, stride d
        wpb, wpe = ca.conv_transpose_weight_pads([pb, pe], [op])
        assert wpb == pb and ca.conv_out_size(m, n, d, s, wpb, wpe) >= k
        dypad = np.concatenate([np.zeros(wpb), dy, np.zeros(wpe)])
        dw = [sum(dypad[r * d + i * s] * x[i] for i in range(n)) for r in range(k)]
        np.testing.assert_allclose(dw, [np.dot(dy, _conv_transpose_1d(x, np.eye(k)[r], s, d, pb, pe, op))
                                        for r in range(k)], atol=1e-12)


@pytest.mark.parametrize("attrs", [
    dict(auto_pad="SAME_UPPER"), dict(auto_pad="SAME_LOWER"), dict(auto_pad="VALID"),
    dict(pads=[1, 0, 2, 1]), dict(output_shape=[6, 7]), dict(output_shape=[6, 7], auto_pad="SAME_UPPER"),
    dict(output_shape=[5, 8], output_padding=[1, 0]), dict(auto_pad="SAME_LOWER", dilations=[2, 1]),
])
def test_conv_transpose_pads_match_onnx_shape_inference(attrs):
    n, k, strides = [3, 4], [3, 2], [2, 2]
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], strides=strides, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", 1, [1, 2] + n),
                                            helper.make_tensor_value_info("W", 1, [2, 3] + k)],
                              [helper.make_tensor_value_info("Y", 1, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    inferred = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim[2:]]
    dil, opad = attrs.get("dilations", [1, 1]), attrs.get("output_padding", [0, 0])
    pads = ca.conv_transpose_pads(attrs.get("auto_pad", "NOTSET"), n, k, strides, dil, opad, attrs.get("pads"),
                                  attrs.get("output_shape"))
    got = [ca.conv_transpose_out_size(n[i], k[i], strides[i], dil[i], pads[i], pads[2 + i], opad[i])
           for i in range(2)]
    assert got == inferred
    if "output_shape" in attrs:
        assert got == attrs["output_shape"]


def test_conv_transpose_pads_refuse_growing_output_shape():
    with pytest.raises(ValueError, match=r"output_shape \[9, 9\] is larger than the natural output size on "
                                         r"spatial axis 0"):
        ca.conv_transpose_pads("NOTSET", [3, 3], [3, 3], [2, 2], [1, 1], [0, 0], None, [9, 9])
