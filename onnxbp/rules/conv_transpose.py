"""ConvTranspose: the adjoint of Conv, differentiated with Convs.

Notation as in rules/conv.py, per spatial axis; X (N, C_in, n...), W (C_in,
C_out/g, k...), Y (N, C_out, m...), output_padding ``op``::

    Y[b, o, i*s - pb + r*d] += X[b, c, i] * W[c, o, r]      (c in o's group)
    m = s*(n-1) + op + (k-1)*d + 1 - pb - pe               (conv_arith.conv_transpose_out_size)

auto_pad / output_shape are first resolved to explicit pads by the spec's pad
generation (conv_arith.conv_transpose_pads); all pad arithmetic lives in
conv_arith.

X' (seed 004, "Alternative with transposed convolution"): ConvTranspose is
    Conv's adjoint w.r.t. its input, so X' is the Conv of Y' with W, the same
    strides, dilations, pads and group.  That Conv yields ``n + floor(op/s)``
    positions (conv_arith.conv_out_size of ``m``); the extra ones are cropped.
W' (seed 000/001 section 2.4.1, seed 004 summary): the conv weight-gradient
    identity with the roles of X and Y' exchanged, ``W'[c, o, r] = sum_{b,i}
    X[b, c, i] Y'[b, o, i*s - pb + r*d]``: a channel-swapped Conv (conv.py's
    ``weight_grad``) with Y' as data and X as kernel, stride d, dilation s,
    pads (pb, max(pe - op, 0)) (conv_arith.conv_transpose_weight_pads),
    cropped to k and transposed to W's layout.  Under ``target="portable"`` the same sum is
    conv.py's ``im2col_weight_grad`` with Y' as the data (padded by those pads), X as the output
    gradient, W's (C_in, C_out/g, k) layout directly: no runtime-shaped kernel.
B': ReduceSum(Y') over batch and spatial axes.
"""

from __future__ import annotations

from ..registry import LINEAR, register_gradient
from . import conv_arith as ca
from .conv import im2col_weight_grad, weight_grad


@register_gradient("ConvTranspose", smoothness=LINEAR,
                   lowering="X'=Conv(Y', W, same strides/dilations/pads/group); "
                            "W'=Conv(Y'^T, X^T, strides<->dilations) cropped; B'=ReduceSum(Y')")
def conv_transpose_grad(g):
    x, w = g.input(0), g.input(1)
    dy = g.grad_output(0)
    rank = g.rank(x)
    nsp = rank - 2
    if nsp < 1:
        g.fail("ConvTranspose needs at least one spatial axis")
    sp = list(range(2, rank))
    ks = list(g.static_shape(w)[2:])
    xs = g.static_shape(x, axes=range(1, rank))
    ys = g.static_shape(g.output(0), axes=range(1, rank))
    cin, n = xs[1], list(xs[2:])
    cout, m = ys[1], list(ys[2:])
    strides = list(g.attr("strides", [1] * nsp))
    dil = list(g.attr("dilations", [1] * nsp))
    group = int(g.attr("group", 1))
    opad = list(g.attr("output_padding", [0] * nsp))
    auto_pad = g.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ca.AUTO_PAD_MODES:
        g.fail(f"ConvTranspose auto_pad={auto_pad!r} is unknown; supported: {', '.join(ca.AUTO_PAD_MODES)}")
    out_shape = g.attr("output_shape")
    if out_shape is not None and len(out_shape) == rank:  # some exporters include N and C
        out_shape = list(out_shape)[2:]
    try:
        pads = ca.conv_transpose_pads(auto_pad, n, ks, strides, dil, opad, g.attr("pads"), out_shape)
    except ValueError as exc:
        g.fail(f"{exc}; only cropping output shapes are supported")
    axes = list(zip(ks, strides, dil, pads[:nsp], pads[nsp:]))
    for i, (k, s, d, pb, pe) in enumerate(axes):
        want = ca.conv_transpose_out_size(n[i], k, s, d, pb, pe, opad[i])
        if want != m[i]:
            g.fail(f"spatial dim {i}: expected output size {want} from the attributes, shape inference "
                   f"says {m[i]}")
    out = [None, None, None]
    if g.needs_grad(0):
        dx = g.op("Conv", dy, w, strides=strides, dilations=dil, pads=pads, group=group, kernel_shape=ks)
        # n + floor(op / s) positions: drop the extra ones
        extra = [i for i, a in enumerate(axes) if ca.conv_out_size(m[i], *a) != n[i]]
        if extra:
            dx = g.slice(dx, [0] * len(extra), [n[i] for i in extra], [2 + i for i in extra])
        out[0] = dx
    if g.needs_grad(1):
        wpads = ca.conv_transpose_weight_pads(pads, opad)
        if g.option("target") == "portable":  # no runtime-shaped kernel: im2col (docs/portability.md)
            out[1] = im2col_weight_grad(g, dy, x, group, cin, cout, m, ks, strides, dil, wpads[:nsp],
                                        wpads[nsp:], n)
        else:
            out[1] = weight_grad(g, dy, x, group, cout // group, cin // group, m, n, ks, wpads, dil, strides)
    if len(g.inputs) > 2 and g.input(2) is not None and g.needs_grad(2):
        out[2] = g.reduce_sum(dy, [0] + sp, keepdims=False)
    return out
