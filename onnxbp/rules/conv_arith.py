"""Pure per-axis arithmetic of the Conv gradients (no onnx imports).

One spatial axis of an ONNX Conv has input length ``n``, kernel length
``k``, stride ``s``, dilation ``d`` and pads ``pb`` (begin) / ``pe`` (end).
Seed 001 section 2 writes the forward map as ``h = p*s - pad + r*d``, so the
effective (dilated) kernel spans ``ek = (k-1)*d + 1`` input positions and

    out = floor((n + pb + pe - ek) / s) + 1

The padded input has ``n + pb + pe`` positions; the last window ends at
``(out-1)*s + ek``; the ``rem = n + pb + pe - ((out-1)*s + ek)`` positions
after it (``0 <= rem < s``) are touched by no window (e.g. n=8, k=3, s=2,
no pads: rem = 1, input row 7 gets an exactly-zero gradient).

ConvTranspose with the same ``k, s, d, pb, pe`` and ``output_padding`` ``op``
maps an input of length ``n`` to ``s*(n-1) + op + ek - pb - pe`` positions
(:func:`conv_transpose_out_size`); it is the adjoint of that Conv, so a Conv
over its output gives back ``n + floor(op/s)`` positions.

Every helper takes and returns plain ints / lists, so the table-driven tests
in tests/test_conv_arith.py check them alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

AUTO_PAD_MODES = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def effective_kernel(k: int, d: int) -> int:
    """Span of a dilated kernel: ``(k-1)*d + 1``."""
    return (k - 1) * d + 1


def resolve_auto_pad(auto_pad: str, in_sizes: Sequence[int], kernel: Sequence[int],
                     strides: Sequence[int], dilations: Sequence[int],
                     pads: Sequence[int] | None = None) -> list:
    """Explicit ONNX pads ``[b_1..b_n, e_1..e_n]`` for an ``auto_pad`` mode.

    NOTSET: ``pads`` (zeros when absent).  VALID: zeros.  SAME_*: the ONNX
    spec's ``total = max(0, (ceil(n/s)-1)*s + (k-1)*d + 1 - n)``; SAME_UPPER
    puts the odd extra at the end, SAME_LOWER at the beginning.
    """
    rank = len(in_sizes)
    if auto_pad in ("NOTSET", "", None):
        out = list(pads) if pads is not None else [0] * (2 * rank)
        if len(out) != 2 * rank:
            raise ValueError(f"pads has {len(out)} values, expected {2 * rank}")
        return [int(p) for p in out]
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"auto_pad={auto_pad!r}; supported: {', '.join(AUTO_PAD_MODES)}")
    totals = []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        n, k, s, d = int(n), int(k), int(s), int(d)
        target = -(-n // s)  # ceil(n / s)
        totals.append(max(0, (target - 1) * s + effective_kernel(k, d) - n))
    return split_total(totals, auto_pad)


def split_total(totals: Sequence[int], auto_pad: str) -> list:
    """ONNX pads ``[b..., e...]`` from per-axis totals: SAME_UPPER puts the odd extra at the end,
    any other mode at the beginning (the spec's rule for Conv and ConvTranspose alike)."""
    begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


def conv_out_size(n: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    """Forward output length of one axis (seed 001 section 2, ``P``)."""
    return (n + pb + pe - effective_kernel(k, d)) // s + 1


def untouched_tail(n: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    """Padded positions after the last window (``0 <= rem < s``)."""
    out = conv_out_size(n, k, s, d, pb, pe)
    return n + pb + pe - ((out - 1) * s + effective_kernel(k, d))


def transpose_output_padding(n: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    """ConvTranspose ``output_padding`` that restores the input length ``n``.

    ConvTranspose(dY, W, same s/d/pads) yields ``s*(out-1) + ek + op - pb - pe``
    positions; equal to ``n`` for ``op = rem``, which is always ``< s``.
    """
    return untouched_tail(n, k, s, d, pb, pe)


def bpa_pads(n: int, k: int, s: int, d: int, pb: int, pe: int) -> tuple:
    """Begin/end pads of the zero-inserted dY for the seed's BPA (sections 2.1.2-2.3.2).

    Zero insertion makes ``(out-1)*s + 1`` positions.  The seed pads by
    ``(k-1)*d - pad`` at each side; the end also gets ``rem`` so that the
    stride-1, dilation-d conv with the rotated kernel yields exactly ``n``
    positions (the untouched rows then read only zeros).  Negative values
    mean cropping.  Total length is ``n + (k-1)*d``.
    """
    ek1 = effective_kernel(k, d) - 1
    return ek1 - pb, ek1 - pe + untouched_tail(n, k, s, d, pb, pe)


def bpw_crop(n: int, k: int, s: int, d: int, pb: int, pe: int) -> int:
    """Length of BPW(a)'s result before cropping to ``k``.

    BPW(a) convolves the padded input (length ``n+pb+pe``) with dY as kernel,
    dilation ``s`` (span ``(out-1)*s + 1``) and stride ``d``; the result has
    ``floor((n+pb+pe - (out-1)*s - 1)/d) + 1 >= k`` positions, of which the
    first ``k`` are the kernel gradient: ``conv_out_size`` with the roles of
    kernel and output, and of stride and dilation, exchanged.
    """
    return conv_out_size(n, conv_out_size(n, k, s, d, pb, pe), d, s, pb, pe)


def split_pads(begin: Sequence[int], end: Sequence[int]) -> tuple:
    """Split signed per-axis pads into (crop_begin, crop_end, pad_begin, pad_end), all >= 0."""
    return ([max(0, -b) for b in begin], [max(0, -e) for e in end],
            [max(0, b) for b in begin], [max(0, e) for e in end])


def kernel_offset_slices(kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                         out: Sequence[int]) -> list:
    """``(offsets, starts, ends)`` for every kernel offset ``r`` (row-major order).

    Offset ``r`` of every window reads the strided slice ``[r*d, r*d +
    (out-1)*s + 1)`` (step ``s``) of the padded input: the im2col view of
    seed 001 section 2.4.1 one offset at a time.
    """
    rows = []
    for offs in itertools.product(*[range(int(k)) for k in kernel]):
        starts = [o * int(d) for o, d in zip(offs, dilations)]
        ends = [b + (int(o) - 1) * int(s) + 1 for b, o, s in zip(starts, out, strides)]
        rows.append((list(offs), starts, ends))
    return rows


# ---------------------------------------------------------------- ConvTranspose
def conv_transpose_out_size(n: int, k: int, s: int, d: int, pb: int, pe: int, op: int = 0) -> int:
    """ConvTranspose's output length: ``s*(n-1) + op + ek - pb - pe`` (ONNX spec)."""
    return s * (n - 1) + op + effective_kernel(k, d) - pb - pe


def conv_transpose_pads(auto_pad: str, in_sizes: Sequence[int], kernel: Sequence[int],
                        strides: Sequence[int], dilations: Sequence[int],
                        output_padding: Sequence[int], pads: Sequence[int] | None = None,
                        output_shape: Sequence[int] | None = None) -> list:
    """ConvTranspose's explicit pads ``[b..., e...]`` (the ONNX spec's pad generation).

    NOTSET without ``output_shape``: ``pads`` (zeros when absent); VALID
    without it: zeros.  Otherwise the requested size (``output_shape``, else
    ``n*s`` for SAME_*) fixes ``total = conv_transpose_out_size(pads 0) -
    want``, split by :func:`split_total`.  A negative total (the request is
    larger than the natural size) raises ValueError.
    """
    rank = len(in_sizes)
    if output_shape is None and auto_pad in ("NOTSET", "", None):
        return [int(p) for p in (pads if pads is not None else [0] * (2 * rank))]
    if output_shape is None and auto_pad == "VALID":
        return [0] * (2 * rank)
    want = output_shape if output_shape is not None else [n * s for n, s in zip(in_sizes, strides)]
    totals = [conv_transpose_out_size(int(n), int(k), int(s), int(d), 0, 0, int(op)) - int(w)
              for n, k, s, d, op, w in zip(in_sizes, kernel, strides, dilations, output_padding, want)]
    for i, t in enumerate(totals):
        if t < 0:
            raise ValueError(f"output_shape {list(want)} is larger than the natural output size on "
                             f"spatial axis {i}")
    return split_total(totals, auto_pad)


def conv_transpose_weight_pads(pads: Sequence[int], output_padding: Sequence[int]) -> list:
    """Pads of the channel-swapped Conv that gives ConvTranspose's weight gradient.

    ``W'[c, o, r] = sum X[b, c, i] Y'[b, o, i*s - pb + r*d]`` is a Conv of Y'
    (length ``m = conv_transpose_out_size``) with X as kernel (dilation
    ``s``) and stride ``d``; begin pad ``pb``; its result has ``k`` or more
    positions once the end pad is ``max(pe - op, 0)`` (``op`` positions of
    Y' already stand past the last window).
    """
    nsp = len(output_padding)
    return [int(p) for p in pads[:nsp]] + [max(int(pads[nsp + i]) - int(output_padding[i]), 0)
                                           for i in range(nsp)]
