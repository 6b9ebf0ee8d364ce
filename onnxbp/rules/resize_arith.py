"""Pure arithmetic of Resize (no onnx imports): the output shape and one matrix per axis.

Resize with modes nearest, linear and cubic is *separable*: along each axis
``k`` the output position ``i`` reads a fixed combination of input positions,
the same for every index of the other axes, so

    Y = X x_0 A_0 x_1 A_1 ... x_{r-1} A_{r-1}        (A_k: out_k x in_k)

(``x_k`` contracts axis ``k``).  Y is linear in X (plus, for
``tf_crop_and_resize``, the constant ``extrapolation_value`` at positions
whose source coordinate lies outside the input: rows of zeros in ``A_k``).
The gradient contracts ``Y'`` with every ``A_k^T``.

The matrices follow onnxruntime's CPU kernel (``upsamplebase.h``,
``upsample.cc``), which is what runs the forward model, in float32 where it
computes in float32 (coordinates, weights), so that nearest-neighbour
rounding ties fall the same way:

* scales: ``out = int(float32(scale) * in)``; sizes: ``scale = float32(out) /
  float32(in)``; ``keep_aspect_ratio_policy`` not_larger / not_smaller takes
  the min / max of the resized axes' scales and ``out = round(scale * in)``.
* if every output dim equals its input dim the op is a copy; an axis whose
  scale is exactly 1 is the identity (onnxruntime skips the coordinate
  transform there; a rank-1 nearest resize is the exception: it transforms).
* the source coordinate of output position ``x`` per
  ``coordinate_transformation_mode`` (:func:`original_coords`); opset 10 is
  ``asymmetric`` with the ``simple`` nearest rounding (ceil when downscaling,
  truncation otherwise).
* nearest: the rounded coordinate, clamped into ``[0, in)``;
  linear: the clamped coordinate's two neighbours with weights ``1 - d`` and
  ``d`` (0.5 and 0.5 at the last position); cubic: Keys' kernel with
  ``cubic_coeff_a`` on the four neighbours ``floor(c)-1 .. floor(c)+2``,
  clamped to the edge, or with ``exclude_outside=1`` dropped and the rest
  renormalised; ``tf_crop_and_resize`` with a coordinate outside
  ``[0, in-1]`` gives a zero row (the extrapolation value, a constant).

tests/test_resize_arith.py checks every matrix against onnxruntime's Resize
run on the identity (resizing ``I_n`` along axis 0 gives ``A`` itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np

MODES = ("nearest", "linear", "cubic")
COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_crop_and_resize", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
POLICIES = ("stretch", "not_larger", "not_smaller")

_F = np.float32


def output_shape(in_shape: Sequence[int], *, scales: Optional[Sequence[float]] = None,
                 sizes: Optional[Sequence[int]] = None, policy: str = "stretch") -> tuple:
    """``(out_shape, scales)`` over all axes as onnxruntime computes them (scales as float32 values).

    ``scales`` / ``sizes`` are given for every axis (exactly one of them); a
    keep_aspect_ratio_policy other than stretch applies to every axis (see
    :func:`output_shape_axes` for the opset-18 ``axes`` subset).
    """
    return _output_shape(in_shape, scales, sizes, policy, None)


def output_shape_axes(in_shape: Sequence[int], axes: Sequence[int], *, scales=None, sizes=None,
                      policy: str = "stretch") -> tuple:
    """:func:`output_shape` with the opset-18 ``axes`` attribute: ``scales``/``sizes`` list only ``axes``."""
    rank = len(in_shape)
    if scales is not None:
        scales = expand_axes(scales, axes, rank, 1.0)
    if sizes is not None:
        sizes = expand_axes(sizes, axes, rank, None, fill=in_shape)
    return _output_shape(in_shape, scales, sizes, policy, list(axes))


def expand_axes(values: Sequence, axes: Sequence[int], rank: int, default, fill: Optional[Sequence] = None) -> list:
    """Values given for ``axes`` spread over ``rank`` axes (``default`` or ``fill[i]`` elsewhere)."""
    out = list(fill) if fill is not None else [default] * rank
    for v, a in zip(values, axes):
        out[a] = v
    return out


def _output_shape(in_shape, scales, sizes, policy, axes) -> tuple:
    if (scales is None) == (sizes is None):
        raise ValueError("exactly one of scales and sizes")
    if policy not in POLICIES:
        raise ValueError(f"keep_aspect_ratio_policy {policy!r}")
    n = [int(d) for d in in_shape]
    if scales is not None:
        s = [_F(v) for v in scales]
        return [int(_F(sv) * _F(d)) for sv, d in zip(s, n)], [float(v) for v in s]
    out = [int(v) for v in sizes]
    s = [_F(1.0) if d == 0 else _F(o) / _F(d) for o, d in zip(out, n)]
    if policy != "stretch":
        chosen = range(len(n)) if not axes else axes
        pick = min if policy == "not_larger" else max
        p = pick(s[a] for a in chosen)
        for i in range(len(n)):
            if i in chosen:
                s[i] = p
                out[i] = int(np.floor(_F(p) * _F(n[i]) + 0.5))  # std::round: halves away from zero
            else:
                s[i], out[i] = _F(1.0), n[i]
    return out, [float(v) for v in s]


def original_coords(n_in: int, n_out: int, scale: float, coord: str, roi: tuple = (0.0, 1.0)) -> np.ndarray:
    """The source coordinate of each output position (float32, onnxruntime's arithmetic)."""
    x = np.arange(n_out, dtype=_F)
    s, lin, lout = _F(scale), _F(n_in), _F(n_out)
    half = _F(0.5)
    if coord == "asymmetric":
        return x / s
    if coord == "half_pixel":
        return (x + half) / s - half
    if coord == "pytorch_half_pixel":
        return (x + half) / s - half if n_out > 1 else np.zeros(n_out, _F)
    if coord == "tf_half_pixel_for_nn":
        return (x + half) / s
    if coord == "align_corners":
        return np.zeros(n_out, _F) if n_out == 1 else x * (lin - _F(1)) / (lout - _F(1))
    if coord == "tf_crop_and_resize":
        r0, r1 = _F(roi[0]), _F(roi[1])
        if n_out > 1:
            return r0 * (lin - _F(1)) + (x * (r1 - r0) * (lin - _F(1))) / (lout - _F(1))
        return np.full(n_out, 0.5 * (float(r0) + float(r1)) * (float(lin) - 1), dtype=_F)
    if coord == "half_pixel_symmetric":
        width = s * lin
        adjustment = lout / width
        center = lin / _F(2)
        offset = center * (_F(1) - adjustment)
        # onnxruntime adds the double literals 0.5 here: the sum is double, then float
        return (np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(_F)
    raise ValueError(f"coordinate_transformation_mode {coord!r}")


def nearest_index(c: np.ndarray, mode: str, downscale: bool) -> np.ndarray:
    """onnxruntime's rounding of a source coordinate to an input position (not yet clamped)."""
    c = np.asarray(c, dtype=_F)
    if mode == "simple":
        return np.ceil(c).astype(np.int64) if downscale else np.trunc(c).astype(np.int64)
    if mode == "floor":
        return np.floor(c).astype(np.int64)
    if mode == "ceil":
        return np.ceil(c).astype(np.int64)
    # onnxruntime >= 1.2x treats a coordinate within 1e-6 of a half as a tie (microsoft/onnxruntime#28291)
    fl = np.floor(c)
    tie = np.abs((c - fl) - _F(0.5)) <= _F(1e-6)
    away = np.where(c >= 0, np.floor(c + _F(0.5)), np.ceil(c - _F(0.5)))  # std::round: ties away from 0
    if mode == "round_prefer_ceil":
        return np.where(tie, fl + 1, away).astype(np.int64)
    if mode == "round_prefer_floor":
        return np.where(tie, fl, away).astype(np.int64)
    raise ValueError(f"nearest_mode {mode!r}")


def cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic weights of the neighbours ``floor-1 .. floor+2`` for fraction ``s`` (float32)."""
    s = np.abs(np.asarray(s, dtype=_F))
    a = _F(a)
    one, two = _F(1), _F(2)
    c0 = ((a * (s + one) - _F(5) * a) * (s + one) + _F(8) * a) * (s + one) - _F(4) * a
    c1 = ((a + two) * s - (a + _F(3))) * s * s + one
    t = one - s
    c2 = ((a + two) * t - (a + _F(3))) * t * t + one
    u = two - s
    c3 = ((a * u - _F(5) * a) * u + _F(8) * a) * u - _F(4) * a
    return np.stack([c0, c1, c2, c3], axis=-1)


def axis_matrix(n_in: int, n_out: int, scale: float, *, mode: str = "nearest", coord: str = "half_pixel",
                nearest_mode: str = "round_prefer_floor", cubic_a: float = -0.75, exclude_outside: int = 0,
                roi: tuple = (0.0, 1.0), rank1: bool = False) -> np.ndarray:
    """``A`` (n_out x n_in, float64) with ``Y[i] = sum_m A[i, m] X[m]`` along one axis.

    ``scale`` is the axis' float32 scale; ``rank1``: the input has rank 1
    (onnxruntime's nearest kernel then transforms even at scale 1).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}")
    if coord not in COORD_MODES:
        raise ValueError(f"coordinate_transformation_mode {coord!r}")
    A = np.zeros((n_out, n_in), dtype=np.float64)
    if n_out == 0 or n_in == 0:
        return A
    rows = np.arange(n_out)
    if _F(scale) == _F(1) and not (mode == "nearest" and rank1):
        A[rows, np.minimum(rows, n_in - 1)] = 1.0
        return A
    c = original_coords(n_in, n_out, scale, coord, roi)
    outside = (c < 0) | (c > _F(n_in - 1)) if coord == "tf_crop_and_resize" else np.zeros(n_out, bool)
    if mode == "nearest":
        idx = np.clip(nearest_index(c, nearest_mode, _F(scale) < _F(1)), 0, n_in - 1)
        A[rows, idx] = 1.0
    elif mode == "linear":
        v = np.clip(c, _F(0), _F(n_in - 1))
        x1 = np.minimum(v.astype(np.int64), n_in - 1)
        x2 = np.minimum(x1 + 1, n_in - 1)
        d1 = np.abs(v - x1.astype(_F)).astype(np.float64)
        d2 = np.abs(v - x2.astype(_F)).astype(np.float64)
        same = x1 == x2
        d1[same], d2[same] = 0.5, 0.5
        np.add.at(A, (rows, x1), d2)
        np.add.at(A, (rows, x2), d1)
    else:
        base = np.floor(c).astype(np.int64)
        w = cubic_coeffs(c - np.floor(c), cubic_a)  # (n_out, 4), float32
        taps = base[:, None] + np.arange(-1, 3)[None, :]
        if exclude_outside:
            w = np.where((taps < 0) | (taps >= n_in), _F(0), w)
            total = w.sum(axis=1, dtype=_F, keepdims=True)
            w = w.astype(np.float64) / total.astype(np.float64)
        w = w.astype(np.float64)
        np.add.at(A, (np.repeat(rows, 4), np.clip(taps, 0, n_in - 1).reshape(-1)), w.reshape(-1))
    A[outside] = 0.0
    return A


#: the filter's support (width in input pixels at scale 1) of onnxruntime's antialias kernels
AA_SUPPORT = {"linear": 2.0, "cubic": 4.0}


def _aa_filter(mode: str, x, a):
    """Pillow's triangle / Keys cubic filter at ``x`` (float32), as onnxruntime's antialias kernels."""
    x = abs(_F(x))
    one = _F(1)
    if mode == "linear":
        return one - x if x < one else _F(0)
    if x < one:
        return ((a + _F(2)) * x - (a + _F(3))) * x * x + one
    if x < _F(2):
        return (((x - _F(5)) * x + _F(8)) * x - _F(4)) * a
    return _F(0)


def antialias_axis_matrix(n_in: int, n_out: int, scale: float, *, mode: str = "linear", coord: str = "half_pixel",
                          cubic_a: float = -0.75, exclude_outside: int = 0, roi: tuple = (0.0, 1.0)) -> np.ndarray:
    """``A`` (n_out x n_in, float64) of one axis of Resize with ``antialias=1`` (modes linear, cubic).

    onnxruntime's antialias kernels (``upsample_antialias.h``, after Pillow's
    ``Resample.c``): output ``i`` is centred at ``c = 0.5 + x_original(i)``;
    when downscaling (``1/scale >= 1``) the filter is stretched by ``1/scale``
    (support ``s/2 * 1/scale``, argument ``* scale``), otherwise it is the
    plain filter (support ``s/2``); ``s`` is 2 (triangle) or 4 (cubic).  The
    window is ``floor(c - support + 0.5) .. floor(c + support + 0.5)``
    (at most ``2 ceil(support) + 1`` taps); weights are normalised to sum 1.
    Taps outside ``[0, n_in)`` are dropped (``exclude_outside=1``) or folded
    onto the edge pixel.  An axis whose size does not change is copied;
    ``tf_crop_and_resize`` rows whose centre is outside ``[0, n_in-1]`` get
    the extrapolation value (zero rows).  All in float32, as the kernel.
    """
    if mode not in AA_SUPPORT:
        raise ValueError(f"antialias mode {mode!r}")
    A = np.zeros((n_out, n_in), dtype=np.float64)
    if n_out == 0 or n_in == 0:
        return A
    a = _F(cubic_a)
    inv_rscale = _F(1) / _F(scale)  # onnxruntime's "scale"
    half_support = _F(AA_SUPPORT[mode]) * _F(0.5)
    support = half_support * inv_rscale if inv_rscale >= _F(1) else half_support
    window = int(math.ceil(float(support))) * 2 + 1
    arg_scale = _F(1) / inv_rscale if inv_rscale >= _F(1) else _F(1)
    if inv_rscale == _F(1):
        coords = np.arange(n_out, dtype=_F)
    else:
        coords = original_coords(n_in, n_out, scale, coord, roi)
    centers = (_F(0.5) + coords).astype(_F)
    crop = coord == "tf_crop_and_resize"
    for i, center in enumerate(centers):
        if crop and (center - _F(0.5) < 0 or center - _F(0.5) > _F(n_in - 1)):
            continue  # extrapolation_value: a constant
        if n_out == n_in:
            A[i, i] = 1.0  # the kernel copies an axis whose size does not change
            continue
        xmin_real = int(math.floor(float(center - support + _F(0.5))))
        xmax_real = int(math.floor(float(center + support + _F(0.5))))
        xmax_real = xmin_real + min(max(xmax_real - xmin_real, 0), window)
        xmin_cut, xmax_cut = min(max(xmin_real, 0), n_in), min(max(xmax_real, 0), n_in)
        xmin, xmax = (xmin_cut, xmax_cut) if exclude_outside else (xmin_real, xmax_real)
        span = xmax - xmin
        buf = [_F(0)] * max(window, span)
        total = _F(0)
        for x in range(span):
            w = _aa_filter(mode, (_F(x + xmin) - center + _F(0.5)) * arg_scale, a)
            buf[x] = w
            total = _F(total + w)
        if not exclude_outside and xmin_cut < xmax_cut:
            neg = min(max(-xmin, 0), span - 1)
            for x in range(neg):
                buf[neg] = _F(buf[neg] + buf[x])
            bound = min(max(span + xmin - n_in, 0), span - 1)
            for x in range(span - bound, span):
                buf[span - bound - 1] = _F(buf[span - bound - 1] + buf[x])
            if neg or bound:
                for x in range(xmax_cut - xmin_cut):
                    buf[x] = buf[x + neg]
        inv = _F(1) if total == _F(0) else _F(1) / total
        for x in range(xmax_cut - xmin_cut):
            A[i, xmin_cut + x] = float(_F(buf[x] * inv))
    if n_out == n_in and not crop:
        return np.eye(n_in)
    return A


def is_identity(A: np.ndarray) -> bool:
    return A.shape[0] == A.shape[1] and np.array_equal(A, np.eye(A.shape[0]))


def scale_is_one(scale: float) -> bool:
    return _F(scale) == _F(1) and math.isfinite(scale)
