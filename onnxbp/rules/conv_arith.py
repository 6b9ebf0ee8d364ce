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

Every helper takes and returns plain ints / lists, so the table-driven tests
in tests/test_conv_arith.py check them alone.
"""

from __future__ import annotations

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
    begins, ends = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        n, k, s, d = int(n), int(k), int(s), int(d)
        target = -(-n // s)  # ceil(n / s)
        total = max(0, (target - 1) * s + effective_kernel(k, d) - n)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begins.append(small)
            ends.append(big)
        else:
            begins.append(big)
            ends.append(small)
    return begins + ends


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
    first ``k`` are the kernel gradient.
    """
    out = conv_out_size(n, k, s, d, pb, pe)
    return (n + pb + pe - (out - 1) * s - 1) // d + 1


def split_pads(begin: Sequence[int], end: Sequence[int]) -> tuple:
    """Split signed per-axis pads into (crop_begin, crop_end, pad_begin, pad_end), all >= 0."""
    return ([max(0, -b) for b in begin], [max(0, -e) for e in end],
            [max(0, b) for b in begin], [max(0, e) for e in end])
