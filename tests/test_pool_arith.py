"""Tests of onnxbp/rules/pool_arith.py (pure per-axis pooling geometry), alone.

Hand-derived rows first (each comment shows the derivation), then brute
force over a grid of kernel, stride, dilation, pads, ceil_mode and auto_pad:
the helpers must agree with a direct numpy enumeration of the taps each
window puts on the input, and with a statement of which windows exist that
does not use the output-size formula.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pytest

from onnxbp.rules import conv_arith as ca
from onnxbp.rules import pool_arith as pa

RULES = Path(pa.__file__).resolve().parent


# ------------------------------------------------------------------ rows
@pytest.mark.parametrize("a,b,want", [(7, 2, 3), (-7, 2, -3), (7, -2, -3), (-7, -2, 3), (-1, 2, 0), (0, 3, 0)])
def test_tdiv_truncates_toward_zero(a, b, want):
    assert pa.tdiv(a, b) == want


@pytest.mark.parametrize("args,want", [
    ((5, 3, 3, 1, 0, 2, "NOTSET", 1), (0, 2, 2)),        # last ceil window starts in the end pad: dropped
    ((5, 2, 2, 1, 0, 1, "NOTSET", 1), (0, 1, 3)),
    ((5, 1, 3, 1, 0, 0, "SAME_UPPER", 0), (0, -1, 2)),   # negative SAME end pad (k < s)
    ((7, 1, 4, 1, 0, 0, "SAME_LOWER", 0), (0, -2, 2)),   # C++ division truncates toward zero
    ((6, 3, 2, 2, 9, 9, "SAME_LOWER", 0), (1, 0, 2)),    # SAME ignores dilation in pad_needed and pads
    ((6, 3, 2, 2, 1, 1, "VALID", 1), (0, 0, 2)),
    ((8, 3, 2, 1, 1, 1, "NOTSET", 0), (1, 1, 4)),        # (8+2-3)//2+1 = 4
    ((8, 3, 2, 1, 1, 1, "NOTSET", 1), (1, 1, 5)),        # ceil(7/2)+1 = 5, starts at 8 < 9: kept
    ((7, 2, 3, 2, 0, 0, "NOTSET", 1), (0, 0, 3)),        # ek 3: ceil(4/3)+1 = 3, last starts at 6 < 7
])
def test_pool_axis_table(args, want):
    assert pa.pool_axis(*args) == want


@pytest.mark.parametrize("n,k,s,mode,want", [
    (5, 3, 1, "SAME_UPPER", (1, 1)),   # need = 4+3-5 = 2
    (5, 4, 1, "SAME_UPPER", (1, 2)),   # need 3: the extra at the end
    (5, 4, 1, "SAME_LOWER", (2, 1)),   # ... at the beginning
    (6, 1, 4, "SAME_UPPER", (0, -1)),  # need = 4+1-6 = -1: trunc(-1/2) = 0
    (6, 1, 4, "SAME_LOWER", (0, -1)),  # trunc(0/2) = 0
    (7, 1, 4, "SAME_UPPER", (-1, -1)),  # need -2: trunc(-2/2) = -1
])
def test_same_pads_rows(n, k, s, mode, want):
    assert pa.same_pads(n, k, s, mode) == want


# ------------------------------------------------------------------ brute force
def _windows_exist(n, k, s, d, pb, pe, ceil):
    """Which window starts exist, stated without the output-size formula.

    ceil_mode=0: a window lies inside the padded axis.  ceil_mode=1: it may
    overhang the padded axis's end by fewer than s positions, but must start
    before the end padding.
    """
    padded, ek = n + pb + pe, (k - 1) * d + 1
    count = 0
    for p in itertools.count():
        start = p * s
        inside = start + ek <= padded if not ceil else (start + ek - padded < s and start < n + pb)
        if not inside:
            return count
        count += 1


def _taps(n, k, s, d, pb, pe, out, include_pad=False):
    """A[p, i]: how many taps of window p land on X[i] (include_pad: on the padded axis, shifted by pb)."""
    lo, hi = (-pb, n + pe) if include_pad else (0, min(n, n + pe))
    a = np.zeros((out, hi - lo), dtype=np.int64)
    for p in range(out):
        taps = p * s - pb + d * np.arange(k)
        taps = taps[(taps >= lo) & (taps < hi)]
        np.add.at(a[p], taps - lo, 1)
    if include_pad:
        return a
    full = np.zeros((out, n), dtype=np.int64)
    full[:, :hi] = a
    return full


GRID = list(itertools.product([1, 2, 3], [1, 2, 3], [1, 2], ["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"],
                              [0, 1]))


def _axes(k, s, d, auto_pad, ceil):
    """(n, pads, pb, pe, out) over n and explicit pads < k (onnxruntime: pads smaller than the kernel)."""
    pad_range = range(k) if auto_pad == "NOTSET" else [0]
    for n, pb0, pe0 in itertools.product(range(1, 10), pad_range, pad_range):
        pb, pe, out = pa.pool_axis(n, k, s, d, pb0, pe0, auto_pad, ceil)
        if n + pb + pe - ca.effective_kernel(k, d) < 0:
            continue  # a kernel longer than the padded axis: no pool to speak of
        yield n, (pb0, pe0), pb, pe, out


@pytest.mark.parametrize("k,s,d,auto_pad,ceil", GRID)
def test_output_size_against_enumeration(k, s, d, auto_pad, ceil):
    for n, _pads, pb, pe, out in _axes(k, s, d, auto_pad, ceil):
        assert out == _windows_exist(n, k, s, d, pb, pe, ceil), (n, pb, pe)
        if not ceil and pb + pe >= 0:  # floor mode is Conv's output length
            assert out == ca.conv_out_size(n, k, s, d, pb, pe)


@pytest.mark.parametrize("k,s,d,auto_pad,ceil", GRID)
def test_auto_pad_resolution(k, s, d, auto_pad, ceil):
    for n, (pb0, pe0), pb, pe, out in _axes(k, s, d, auto_pad, ceil):
        if auto_pad == "NOTSET":
            assert (pb, pe) == (pb0, pe0)
        elif auto_pad == "VALID":
            assert (pb, pe) == (0, 0)
        else:
            need = (-(-n // s) - 1) * s + k - n  # onnxruntime: no dilation, no clamping at 0
            assert pb + pe == need
            if need >= 0:  # the odd extra at the end (SAME_UPPER) or at the beginning (SAME_LOWER)
                assert pe - pb in ((0, 1) if auto_pad == "SAME_UPPER" else (0, -1))
            else:  # halves truncated toward zero: both between need and 0
                assert need <= pb <= 0 and need <= pe <= 0
            if d == 1 and not ceil:
                assert out == -(-n // s)  # SAME: ceil(n / s) outputs


@pytest.mark.parametrize("k,s,d,auto_pad,ceil", GRID)
def test_windows_against_enumeration(k, s, d, auto_pad, ceil):
    """avg_counts, real_windows and window_positions against the enumerated taps."""
    for n, _pads, pb, pe, out in _axes(k, s, d, auto_pad, ceil):
        a = _taps(n, k, s, d, pb, pe, out)
        wins = pa.window_positions(n, k, s, d, pb, out)
        assert len(wins) == out and all(len(w) == k for w in wins)
        assert pa.avg_counts(n, k, s, d, pb, pe, out, 0) == a.sum(axis=1).tolist()
        assert pa.avg_counts(n, k, s, d, pb, pe, out, 1) == \
            _taps(n, k, s, d, pb, pe, out, include_pad=True).sum(axis=1).tolist()
        assert pa.real_windows(n, k, s, d, pb, pe, out) == (a.sum(axis=1) > 0).tolist()


@pytest.mark.parametrize("k,s,d,auto_pad,ceil", GRID)
def test_transpose_fit_is_the_window_sum_and_its_adjoint(k, s, d, auto_pad, ceil):
    """Backward: ConvTranspose(dY, ones) in the frame, cropped and padded, is A^T dY.  Forward: X
    cropped and padded into the frame, summed over conv_arith.kernel_offset_slices, is A X."""
    rng = np.random.default_rng(k * 100 + s * 10 + d)
    for n, _pads, pb, pe, out in _axes(k, s, d, auto_pad, ceil):
        a = _taps(n, k, s, d, pb, pe, out)
        cb, ce, fb, fe = pa.transpose_fit(n, k, s, d, pb, pe, out)
        length = (out - 1) * s + ca.effective_kernel(k, d)
        assert min(cb, ce, fb, fe) >= 0 and length - cb - ce + fb + fe == n
        dy = rng.standard_normal(out)
        frame = np.zeros(length)
        for p, r in itertools.product(range(out), range(k)):
            frame[p * s + r * d] += dy[p]
        dx = np.concatenate([np.zeros(fb), frame[cb:length - ce], np.zeros(fe)])
        np.testing.assert_allclose(dx, a.T @ dy, rtol=0, atol=1e-12)
        x = rng.standard_normal(n)
        framed = np.concatenate([np.zeros(cb), x[fb:n - fe], np.zeros(ce)])
        assert framed.size == length
        y = sum(framed[b:e:s] for _o, (b,), (e,) in ca.kernel_offset_slices([k], [s], [d], [out]))
        np.testing.assert_allclose(y, a @ x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ grids of axes
def test_multi_axis_helpers_are_the_per_axis_ones():
    n, k, s, d, pads = [7, 6, 5], [3, 2, 2], [2, 1, 3], [1, 2, 1], [1, 0, 1, 2, 1, 0]
    for auto_pad, ceil in itertools.product(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"], [0, 1]):
        pb, pe, out = pa.pool_geometry(n, k, s, d, pads, auto_pad, ceil)
        assert [(pb[i], pe[i], out[i]) for i in range(3)] == \
            [pa.pool_axis(n[i], k[i], s[i], d[i], pads[i], pads[3 + i], auto_pad, ceil) for i in range(3)]
        fits = pa.transpose_fits(n, k, s, d, pb, pe, out)
        assert [tuple(f[i] for f in fits) for i in range(3)] == \
            [pa.transpose_fit(n[i], k[i], s[i], d[i], pb[i], pe[i], out[i]) for i in range(3)]
        for cip in (0, 1):
            counts = pa.outer([pa.avg_counts(n[i], k[i], s[i], d[i], pb[i], pe[i], out[i], cip)
                               for i in range(3)])
            div = pa.avg_divisors(n, k, s, d, pb, pe, out, cip)
            assert div.shape == tuple(out)
            np.testing.assert_array_equal(div, np.where(counts == 0, 1.0, counts))


def test_outer_is_the_grid():
    np.testing.assert_array_equal(pa.outer([[1, 2], [3, 4, 5]]), np.outer([1, 2], [3, 4, 5]))
    assert pa.outer([]).shape == ()


def test_pure_padding_window_divides_by_one():
    # n=3, k=2, s=1, d=4, pads (1, 1): ek = 5, out = (5-5)//1+1 = 1; its taps -1 and 3 are both padding
    out = pa.pool_axis(3, 2, 1, 4, 1, 1)[2]
    assert out == 1
    assert pa.avg_counts(3, 2, 1, 4, 1, 1, out, 0) == [0] and pa.avg_counts(3, 2, 1, 4, 1, 1, out, 1) == [2]
    assert pa.avg_divisors([3], [2], [1], [4], [1], [1], [out], 0)[0] == 1.0


def test_pure_modules():
    """pool_arith and conv_arith import no onnx: the arithmetic is checked alone."""
    for name in ("pool_arith.py", "conv_arith.py"):
        tree = ast.parse((RULES / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not [m for m in mods if m.startswith("onnx") or "registry" in m], (name, mods)


# ------------------------------------------------------------------ onnx's inferred size
def _onnx_inferred(n_list, pads_list, k, s, d, auto_pad, ceil):
    """onnx's shape inference of one pool with one spatial axis per (n, pads), all with (k, s, d)."""
    import onnx
    from onnx import helper

    nsp = len(n_list)
    attrs = {"kernel_shape": [k] * nsp, "strides": [s] * nsp, "dilations": [d] * nsp, "ceil_mode": ceil}
    if auto_pad == "NOTSET":
        attrs["pads"] = [p[0] for p in pads_list] + [p[1] for p in pads_list]
    else:
        attrs["auto_pad"] = auto_pad
    node = helper.make_node("AveragePool", ["X"], ["Y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", 1, [1, 1] + list(n_list))],
                              [helper.make_tensor_value_info("Y", 1, None)])
    m = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    return [dim.dim_value for dim in m.graph.output[0].type.tensor_type.shape.dim[2:]]


@pytest.mark.parametrize("k,s,d,auto_pad,ceil", GRID)
def test_onnx_out_size_is_onnx_shape_inference(k, s, d, auto_pad, ceil):
    """onnx_out_size against onnx itself; where it and onnxruntime (pool_axis) differ it is exactly the
    ceil_mode window that would start in the end padding, which ceil_mode_disagreement recognises."""
    axes = list(_axes(k, s, d, auto_pad, ceil))
    for chunk in range(0, len(axes), 8):
        part = axes[chunk:chunk + 8]
        inferred = _onnx_inferred([a[0] for a in part], [a[1] for a in part], k, s, d, auto_pad, ceil)
        for (n, (pb0, pe0), pb, pe, out), got in zip(part, inferred):
            assert pa.onnx_out_size(n, k, s, d, pb0, pe0, auto_pad, ceil) == got, (n, pb0, pe0)
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                continue  # onnxruntime sizes SAME without the dilation: another disagreement
            dropped = ceil and (got - 1) * s >= n + pb
            assert got == out + dropped, (n, pb, pe)
            assert pa.ceil_mode_disagreement([got], [out]) == bool(dropped)


def test_ceil_mode_disagreement_rows():
    assert pa.ceil_mode_disagreement([3, 4], [2, 4])
    assert pa.ceil_mode_disagreement(["H", 4], [2, 3])      # a dim onnx does not know is no evidence
    assert not pa.ceil_mode_disagreement([3, 4], [3, 4])    # agreement
    assert not pa.ceil_mode_disagreement([4, 4], [2, 4])    # two windows apart: not the ceil_mode drop
    assert not pa.ceil_mode_disagreement([2, 4], [3, 4])    # shorter than onnxruntime's
