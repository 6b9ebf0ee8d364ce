"""Pure per-axis arithmetic of pooling (no onnx imports), onnxruntime's semantics.

One spatial axis of a MaxPool / AveragePool has input length ``n``, kernel
``k``, stride ``s``, dilation ``d`` and pads ``pb`` (begin) / ``pe`` (end).
Output window ``p`` reads the input positions ``p*s - pb + r*d`` (``r < k``);
positions outside ``[0, min(n, n + pe))`` are padding (-inf for max, 0 for
the sum).  The window spans ``ek = (k-1)*d + 1`` positions
(:func:`conv_arith.effective_kernel`) and, with ``num = n + pb + pe - ek``,

    out = trunc(num / s) + 1                      ceil_mode=0 (C++ division)
    out = ceil(num / s) + 1, minus one when the last window starts in the
          end padding, ``(out-1)*s >= n + pb``      ceil_mode=1 (onnx/onnx#5741)

For ``num >= 0`` the first is Conv's output length
(:func:`conv_arith.conv_out_size`).  auto_pad SAME_* differs from Conv's
(:func:`conv_arith.resolve_auto_pad`): onnxruntime sizes it without the
dilation and without clamping at zero, ``need = (ceil(n/s) - 1)*s + k - n``,
and splits it with truncating division, ``pb = trunc(need/2)`` (SAME_UPPER)
or ``trunc((need+1)/2)`` (SAME_LOWER), ``pe = need - pb``; so ``pe`` (and
``pb``) may be negative when ``k < s``, clipping the windows at ``n + pe``.

onnx's shape inference (:func:`onnx_out_size`) takes the ceiling without
that drop, so a ceil_mode output is inferred one position longer than
onnxruntime's on every axis where the last window starts in the end padding
(:func:`ceil_mode_disagreement`); ``onnxbp.repair`` aligns such models.

AveragePool divides window ``p`` by the number of its positions inside
``[0, min(n, n + pe))`` (count_include_pad=0) or ``[-pb, n + pe)``
(count_include_pad=1); the divisor of a grid of axes is the outer product.
A ceil_mode window that runs past the padded input divides by fewer than k.

Every helper takes and returns plain ints / lists (the grids are numpy
arrays), so tests/test_pool_arith.py checks them alone against a brute-force
enumeration of the windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .conv_arith import AUTO_PAD_MODES, effective_kernel  # noqa: F401 - AUTO_PAD_MODES re-exported


def tdiv(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def same_pads(n: int, k: int, s: int, auto_pad: str) -> tuple:
    """onnxruntime's (pb, pe) for auto_pad SAME_UPPER / SAME_LOWER (no dilation, may be negative)."""
    need = (tdiv(n + s - 1, s) - 1) * s + k - n
    pb = tdiv(need + 1, 2) if auto_pad == "SAME_LOWER" else tdiv(need, 2)
    return pb, need - pb


def pool_axis(n: int, k: int, s: int, d: int, pb: int, pe: int, auto_pad: str = "NOTSET",
              ceil_mode: int = 0) -> tuple:
    """(pb, pe, out) of one spatial axis, as onnxruntime's PoolAttributes computes them."""
    if auto_pad == "VALID":
        pb = pe = 0
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = same_pads(n, k, s, auto_pad)
    num = n + pb + pe - effective_kernel(k, d)
    if not ceil_mode:
        return pb, pe, tdiv(num, s) + 1
    out = -(-num // s) + 1
    if (out - 1) * s >= n + pb:
        out -= 1
    return pb, pe, out


def onnx_out_size(n: int, k: int, s: int, d: int, pb: int, pe: int, auto_pad: str = "NOTSET",
                  ceil_mode: int = 0) -> int:
    """The output length onnx's shape inference gives one axis: no ceil_mode drop; SAME pads sized
    with the dilated kernel and clamped at zero (``ceil(n/s)`` outputs unless ceil_mode adds one)."""
    ek = effective_kernel(k, d)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = 0, max(ek - s if n % s == 0 else ek - n % s, 0)
    elif auto_pad == "VALID":
        pb = pe = 0
    num = n + pb + pe - ek
    return (-(-num // s) if ceil_mode else num // s) + 1


def ceil_mode_disagreement(inferred: Sequence, runtime: Sequence[int]) -> bool:
    """Whether an inferred output (spatial dims) is onnxruntime's ``runtime`` one with the ceil_mode
    window onnxruntime drops kept: some axis one longer, every other equal (or not static)."""
    longer = False
    for a, b in zip(inferred, runtime):
        if not isinstance(a, int) or a == b:
            continue
        if a != b + 1:
            return False
        longer = True
    return longer and len(inferred) == len(runtime)


def pool_geometry(n: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int],
                  pads: Sequence[int], auto_pad: str = "NOTSET", ceil_mode: int = 0) -> tuple:
    """``(pb, pe, out)``, each a list over the spatial axes; ``pads`` is ONNX's ``[b..., e...]``."""
    nsp = len(n)
    geo = [pool_axis(n[i], k[i], s[i], d[i], pads[i], pads[nsp + i], auto_pad, ceil_mode)
           for i in range(nsp)]
    return [a for a, _, _ in geo], [b for _, b, _ in geo], [c for _, _, c in geo]


def window_positions(n: int, k: int, s: int, d: int, pb: int, out: int) -> list:
    """Input positions (possibly outside [0, n)) read by each output position."""
    return [[p * s - pb + r * d for r in range(k)] for p in range(out)]


def avg_counts(n: int, k: int, s: int, d: int, pb: int, pe: int, out: int,
               count_include_pad: int) -> list:
    """AveragePool's per-output divisor along one axis (0 for a window of pure padding)."""
    lo, hi = (-pb, n + pe) if count_include_pad else (0, min(n, n + pe))
    return [sum(lo <= q < hi for q in win) for win in window_positions(n, k, s, d, pb, out)]


def real_windows(n: int, k: int, s: int, d: int, pb: int, pe: int, out: int) -> list:
    """Whether each window along one axis reads at least one element of X."""
    hi = min(n, n + pe)
    return [any(0 <= q < hi for q in win) for win in window_positions(n, k, s, d, pb, out)]


def outer(vectors: Sequence[Sequence[float]]) -> np.ndarray:
    """Outer product of per-axis vectors: the (out_1, ..., out_k) grid."""
    grid = np.ones((), dtype=np.float64)
    for v in vectors:
        grid = np.multiply.outer(grid, np.asarray(v, dtype=np.float64))
    return grid


def avg_divisors(n: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int],
                 pb: Sequence[int], pe: Sequence[int], out: Sequence[int],
                 count_include_pad: int) -> np.ndarray:
    """AveragePool's (out...) grid of divisors; a window of pure padding gets 1, not 0.

    Such a window outputs 0 and no element of X reaches it, so any nonzero
    divisor gives the same forward and backward.
    """
    grid = outer([avg_counts(n[i], k[i], s[i], d[i], pb[i], pe[i], out[i], count_include_pad)
                  for i in range(len(n))])
    grid[grid == 0] = 1.0
    return grid


def transpose_fit(n: int, k: int, s: int, d: int, pb: int, pe: int, out: int) -> tuple:
    """How X's axis maps onto the windows' frame: ``(crop_begin, crop_end, pad_begin, pad_end)``.

    The windows cover the frame ``[-pb, -pb + L)`` of X positions, ``L =
    (out-1)*s + (k-1)*d + 1``, and read X only in ``[0, min(n, n + pe))``
    (a negative SAME pad clips them).  Backward, a pad-free ``ConvTranspose(dY,
    ones, s, d)`` yields the frame: crop ``crop_begin`` / ``crop_end`` from
    it and pad ``pad_begin`` / ``pad_end`` zeros to get ``n`` positions.
    Forward, the adjoint: crop ``pad_begin`` / ``pad_end`` from X and pad
    ``crop_begin`` / ``crop_end`` zeros to get the frame, in which offset
    ``r`` of every window is the strided slice ``[r*d, r*d + (out-1)*s + 1)``.
    All four are >= 0 and ``L - crop_begin - crop_end + pad_begin + pad_end = n``.
    """
    end, hi = (out - 1) * s + effective_kernel(k, d) - pb, min(n, n + pe)
    return max(pb, 0), max(end - hi, 0), max(-pb, 0), n - min(end, hi)


def transpose_fits(n: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int],
                   pb: Sequence[int], pe: Sequence[int], out: Sequence[int]) -> tuple:
    """:func:`transpose_fit` over every spatial axis: four lists ``(crop_b, crop_e, pad_b, pad_e)``."""
    fits = [transpose_fit(n[i], k[i], s[i], d[i], pb[i], pe[i], out[i]) for i in range(len(n))]
    return tuple([f[j] for f in fits] for j in range(4))
