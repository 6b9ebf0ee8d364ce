"""Attention (opset 23): scaled dot-product attention with grouped heads, masks and softcap.

The forward (onnx's definition, heads on axis 1 in the 4-D layout; 3-D inputs
``(B, L, H*E)`` are split into ``q_num_heads`` / ``kv_num_heads`` heads first and
the output merged back)::

    Kr, Vr = K, V with each of the Hkv heads repeated r = Hq/Hkv times (head h reads h // r)
    S0 = Q Kr^T * s                     s = scale, default 1/sqrt(E)
    S1 = c * tanh(S0 / c)               softcap c > 0 (else S1 = S0)
    S  = S1 + bias                      bias: attn_mask (float: added; bool: 0 / -inf),
                                        is_causal: -inf above the diagonal
    P  = softmax(S, last axis)          rows with every key masked: P = 0
    Y  = P Vr

Backward (the chain rule through each line; softmax's Jacobian is
``diag(P) - P P^T`` per row)::

    Vr' = P^T Y',   P' = Y' Vr^T,   S' = P * (P' - rowsum(P' * P))
    attn_mask' = S' summed over the axes the (float) mask was broadcast along
    S0' = S' * (1 - tanh^2(S0 / c))     (S' without softcap)
    Q' = s * S0' Kr,   Kr' = s * S0'^T Q
    K', V' = Kr', Vr' summed over each head's r copies

Supported: 3-D and 4-D inputs, grouped-query heads, ``scale``, ``softcap``,
``is_causal``, a bool or float ``attn_mask`` whose last axis covers every key,
``softmax_precision`` (precision only).  Refused (one-line errors naming the
node): ``past_key`` / ``past_value`` (the KV cache), gradients of the
``present_key`` / ``present_value`` / ``qk_matmul_output`` outputs.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..registry import SMOOTH, register_gradient


def _heads(g, t, heads, rank):
    """4-D (B, H, L, E) view of an input: itself, or (B, L, H*E) split into ``heads``."""
    if rank == 4:
        return t
    return g.transpose(g.op("Reshape", t, g.ints([0, 0, heads, -1])), [0, 2, 1, 3])


def _merge(g, t, rank):
    """Back to the input layout: (B, H, L, E) -> (B, L, H*E) for 3-D inputs."""
    if rank == 4:
        return t
    return g.op("Reshape", g.transpose(t, [0, 2, 1, 3]), g.ints([0, 0, -1]))


def _repeat(g, t, r):
    """(B, Hkv, S, E) -> (B, Hkv*r, S, E), head h reading head h // r (onnx: numpy.repeat)."""
    if r == 1:
        return t
    shape = g.op("Shape", t)
    big = g.op("Expand", g.unsqueeze(t, [2]), g.ints([1, 1, r, 1, 1]))
    target = g.op("Concat", g.op("Slice", shape, g.ints([0]), g.ints([1]), g.ints([0])),
                  g.op("Mul", g.op("Slice", shape, g.ints([1]), g.ints([2]), g.ints([0])), g.ints([r])),
                  g.op("Slice", shape, g.ints([2]), g.ints([4]), g.ints([0])), axis=0)
    return g.op("Reshape", big, target)


def _unrepeat(g, t, like, r):
    """Sum the r copies of each head: (B, Hkv*r, S, E) -> shape of ``like`` (B, Hkv, S, E)."""
    if r == 1:
        return t
    shape = g.op("Shape", like)
    split = g.op("Concat", g.op("Slice", shape, g.ints([0]), g.ints([2]), g.ints([0])), g.ints([r]),
                 g.op("Slice", shape, g.ints([2]), g.ints([4]), g.ints([0])), axis=0)
    return g.reduce_sum(g.op("Reshape", t, split), [2], keepdims=False)


def _dim(g, t, axis):
    return g.op("Slice", g.op("Shape", t), g.ints([axis]), g.ints([axis + 1]), g.ints([0]))


@register_gradient("Attention", since=23, until=23, smoothness=SMOOTH, non_differentiable_inputs=(4, 5),
                   lowering="P=softmax(softcap(QKr^T*s)+bias); Vr'=P^T Y', S'=P*(P'-rowsum(P'*P)), "
                            "Q'=s*S0' Kr, Kr'=s*S0'^T Q; grouped heads summed back")
def attention_grad(g):
    """The module docstring's backward: Q', K', V' and a float attn_mask's gradient."""
    q, k, v = g.input(0), g.input(1), g.input(2)
    mask = g.input(3)
    if g.input(4) is not None or g.input(5) is not None:
        g.fail("past_key/past_value (a KV cache) are not supported; differentiate the model without the cache")
    for i, what in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if g.grad_output(i) is not None:
            g.fail(f"output {i} ({what}) is differentiated; only output 0 (Y) is supported")
    dy = g.grad_output(0)
    rank = g.rank(q)
    if rank not in (3, 4) or g.rank(k) != rank or g.rank(v) != rank:
        g.fail(f"Q, K, V must all be 3-D or all 4-D; got ranks {g.rank(q)}, {g.rank(k)}, {g.rank(v)}")
    if rank == 3:
        hq, hkv = g.attr("q_num_heads"), g.attr("kv_num_heads")
        if not hq or not hkv:
            g.fail("3-D inputs need the q_num_heads and kv_num_heads attributes")
    else:
        hq = g.static_shape(q, axes=[1])[1]
        hkv = g.static_shape(k, axes=[1])[1]
    if hq % hkv:
        g.fail(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    r = hq // hkv
    q4, k4, v4 = _heads(g, q, hq, rank), _heads(g, k, hkv, rank), _heads(g, v, hkv, rank)
    kr, vr = _repeat(g, k4, r), _repeat(g, v4, r)
    scale = g.attr("scale")
    if scale is not None:
        s = g.const(float(scale), like=q)
    else:
        e = g.op("Cast", _dim(g, q4, 3), to=g.dtype(q))
        s = g.op("Reciprocal", g.op("Sqrt", e))
    s0 = g.op("Mul", g.op("MatMul", q4, g.transpose(kr, [0, 1, 3, 2])), s)
    softcap = float(g.attr("softcap", 0.0) or 0.0)
    if softcap > 0:
        th = g.op("Tanh", g.op("Div", s0, g.const(softcap, like=q)))
        s1 = g.op("Mul", th, g.const(softcap, like=q))
    else:
        s1 = s0
    masked = False
    scores = s1
    qs, ks = g.shape(q), g.shape(k)
    score_shape = (qs[0], hq, qs[2], ks[2]) if rank == 4 else (qs[0], hq, qs[1], ks[1])
    if mask is not None:
        mshape = g.shape(mask)
        if mshape and isinstance(mshape[-1], int) and isinstance(score_shape[3], int) \
                and mshape[-1] != score_shape[3]:
            g.fail(f"attn_mask's last axis ({mshape[-1]}) is shorter than the {score_shape[3]} keys (padded by "
                   f"the op); only masks covering every key are supported")
        if g.dtype(mask) == TensorProto.BOOL:
            scores = g.op("Where", mask, scores, g.const(-np.inf, like=q))
        else:
            scores = g.op("Add", scores, mask)
        masked = True  # a float mask may hold -inf too
    if g.attr("is_causal", 0):
        lower = g.op("Cast", g.op("Trilu", g.fill_like(s1, 1.0), upper=0), to=TensorProto.BOOL)
        scores = g.op("Where", lower, scores, g.const(-np.inf, like=q))
        masked = True
    p = g.op("Softmax", scores, axis=-1)
    if masked:  # a row with every key masked: onnx defines P = 0 (softmax gives NaN)
        p = g.op("Where", g.op("IsNaN", p), g.const(0.0, like=q), p)
    dy4 = _heads(g, dy, hq, rank)
    out = [None] * len(g.inputs)
    if g.needs_grad(2):
        dvr = g.op("MatMul", g.transpose(p, [0, 1, 3, 2]), dy4)
        out[2] = _merge(g, _unrepeat(g, dvr, v4, r), rank)
    want_scores = g.needs_grad(0) or g.needs_grad(1) or (mask is not None and g.needs_grad(3))
    if not want_scores:
        return out
    dp = g.op("MatMul", dy4, g.transpose(vr, [0, 1, 3, 2]))
    ds = g.op("Mul", p, g.op("Sub", dp, g.reduce_sum(g.op("Mul", dp, p), [3], keepdims=True)))
    if mask is not None and g.needs_grad(3):
        if g.dtype(mask) == TensorProto.BOOL:
            g.fail("a bool attn_mask has no gradient")
        out[3] = g.unbroadcast(ds, mask, grad_shape=score_shape)
    if softcap > 0:
        ds = g.op("Mul", ds, g.op("Sub", g.const(1.0, like=q), g.op("Mul", th, th)))
    ds = g.op("Mul", ds, s)
    if g.needs_grad(0):
        out[0] = _merge(g, g.op("MatMul", ds, kr), rank)
    if g.needs_grad(1):
        dkr = g.op("MatMul", g.transpose(ds, [0, 1, 3, 2]), q4)
        out[1] = _merge(g, _unrepeat(g, dkr, k4, r), rank)
    return out

