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

The KV cache: ``past_key`` / ``past_value`` (4-D, ``(B, Hkv, P, E)``) are
prepended along the sequence, ``Kc = Concat(past_key, K4)``, and the causal
mask is offset by the past length (query ``i`` attends key ``j <= i + P``, as
onnx defines it and onnxruntime computes it); ``present_key`` /
``present_value`` are ``Kc`` / ``Vc``, so their gradients add to ``Kc'`` /
``Vc'``, which split back into past_key' (the first P positions) and K'.

``qk_matmul_output`` (output 3), as onnxruntime computes it (the reference
evaluator differs at mode 0 with softcap, where it returns the softcapped
scores): mode 0 ``S0``, mode 1 ``S1`` (after softcap), mode 2 ``S`` (after
the mask; positions a bool mask or the causal mask replaced are a constant
and get no gradient), mode 3 ``P``.  Its gradient joins the chain at that
point.

Supported: 3-D and 4-D inputs, grouped-query heads, ``scale``, ``softcap``,
``is_causal``, a bool or float ``attn_mask`` whose last axis covers every key,
``softmax_precision`` (precision only), the cache and every output.
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


@register_gradient("Attention", since=23, until=23, smoothness=SMOOTH, non_differentiable_inputs=(),
                   lowering="P=softmax(softcap(QKr^T*s)+bias); Vr'=P^T Y', S'=P*(P'-rowsum(P'*P)), "
                            "Q'=s*S0' Kr, Kr'=s*S0'^T Q; grouped heads summed back; the cache split off")
def attention_grad(g):
    """The module docstring's backward: Q', K', V', past_key', past_value' and a float attn_mask's gradient."""
    q, k, v = g.input(0), g.input(1), g.input(2)
    mask, past_k, past_v = g.input(3), g.input(4), g.input(5)
    if (past_k is None) != (past_v is None):
        g.fail("past_key and past_value must be given together")
    mode = int(g.attr("qk_matmul_output_mode", 0) or 0)
    d_qk = g.grad_output(3)
    if d_qk is not None and mode not in (0, 1, 2, 3):
        g.fail(f"qk_matmul_output_mode={mode} is unknown; supported: 0, 1, 2, 3")
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
    if past_k is not None:  # the cache: present = Concat(past, new) along the sequence
        kc, vc = g.op("Concat", past_k, k4, axis=2), g.op("Concat", past_v, v4, axis=2)
    else:
        kc, vc = k4, v4
    kr, vr = _repeat(g, kc, r), _repeat(g, vc, r)
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
    keep = None  # bool: the scores not replaced by a constant (bool mask, causal)
    scores = s1
    qs = g.shape(q)
    n_keys = g.shape(kc)[2] if g.shape(kc) is not None else None
    score_shape = (qs[0], hq, qs[2] if rank == 4 else qs[1], n_keys)
    if mask is not None:
        mshape = g.shape(mask)
        if mshape and isinstance(mshape[-1], int) and isinstance(n_keys, int) and mshape[-1] != n_keys:
            g.fail(f"attn_mask's last axis ({mshape[-1]}) is shorter than the {n_keys} keys (padded by "
                   f"the op); only masks covering every key are supported")
        if g.dtype(mask) == TensorProto.BOOL:
            scores = g.op("Where", mask, scores, g.const(-np.inf, like=q))
            keep = mask
        else:
            scores = g.op("Add", scores, mask)
        masked = True  # a float mask may hold -inf too
    if g.attr("is_causal", 0):
        # query i attends key j <= i + past length (onnx's bottom-right alignment with a cache)
        offset = (g.op("Gather", g.op("Shape", past_k), g.const(np.array(2, np.int64)))
                  if past_k is not None else None)
        ones = g.fill_like(s1, 1.0)
        tri = g.op("Trilu", ones, offset, upper=0) if offset is not None else g.op("Trilu", ones, upper=0)
        lower = g.op("Cast", tri, to=TensorProto.BOOL)
        scores = g.op("Where", lower, scores, g.const(-np.inf, like=q))
        keep = lower if keep is None else g.op("And", keep, lower)
        masked = True
    p = g.op("Softmax", scores, axis=-1)
    if masked:  # a row with every key masked: onnx defines P = 0 (softmax gives NaN)
        p = g.op("Where", g.op("IsNaN", p), g.const(0.0, like=q), p)
    out = [None] * len(g.inputs)
    d_present_k, d_present_v = g.grad_output(1), g.grad_output(2)

    def to_inputs(d_cache, past, i_new, i_past):
        """(B, Hkv, P+S, E) cache gradient -> the new part (input layout) and the past part."""
        if past is not None:
            n_past = g.op("Slice", g.op("Shape", past), g.ints([2]), g.ints([3]), g.ints([0]))
            if g.needs_grad(i_past):
                out[i_past] = g.op("Slice", d_cache, g.ints([0]), n_past, g.ints([2]))
            d_cache = g.op("Slice", d_cache, n_past, g.ints([np.iinfo(np.int64).max]), g.ints([2]))
        if g.needs_grad(i_new):
            out[i_new] = _merge(g, d_cache, rank)

    def cache_grad(d_rep, present_grad, c4):
        d = _unrepeat(g, d_rep, c4, r) if d_rep is not None else None
        if present_grad is not None:
            d = present_grad if d is None else g.op("Add", d, present_grad)
        return d

    dy4 = _heads(g, dy, hq, rank) if dy is not None else None
    if g.needs_grad(2) or (past_v is not None and g.needs_grad(5)):
        dvr = g.op("MatMul", g.transpose(p, [0, 1, 3, 2]), dy4) if dy4 is not None else None
        d = cache_grad(dvr, d_present_v, vc)
        if d is not None:
            to_inputs(d, past_v, 2, 5)
    want_scores = (g.needs_grad(0) or g.needs_grad(1) or (past_k is not None and g.needs_grad(4))
                   or (mask is not None and g.needs_grad(3)))
    if not want_scores:
        return out
    dp = g.op("MatMul", dy4, g.transpose(vr, [0, 1, 3, 2])) if dy4 is not None else None
    if d_qk is not None and mode == 3:
        dp = d_qk if dp is None else g.op("Add", dp, d_qk)
    ds = (g.op("Mul", p, g.op("Sub", dp, g.reduce_sum(g.op("Mul", dp, p), [3], keepdims=True)))
          if dp is not None else None)
    if d_qk is not None and mode == 2:  # the scores after the mask; positions set to a constant get none
        d2 = d_qk if keep is None else g.op("Where", keep, d_qk, g.const(0.0, like=q))
        ds = d2 if ds is None else g.op("Add", ds, d2)
    if mask is not None and g.needs_grad(3) and ds is not None:
        if g.dtype(mask) == TensorProto.BOOL:
            g.fail("a bool attn_mask has no gradient")
        out[3] = g.unbroadcast(ds, mask, grad_shape=score_shape)
    if d_qk is not None and mode == 1:  # after softcap, before the mask
        ds = d_qk if ds is None else g.op("Add", ds, d_qk)
    if softcap > 0 and ds is not None:
        ds = g.op("Mul", ds, g.op("Sub", g.const(1.0, like=q), g.op("Mul", th, th)))
    if d_qk is not None and mode == 0:  # Q Kr^T * s itself (before softcap)
        ds = d_qk if ds is None else g.op("Add", ds, d_qk)
    if ds is None and (g.needs_grad(0) or (mask is not None and g.needs_grad(3))):
        g.fail("only present_key/present_value carry a gradient, and they do not depend on Q or attn_mask: "
               "their gradient is structurally zero; leave them out of wrt")
    if ds is not None:  # None: only present_key / present_value carry a gradient
        ds = g.op("Mul", ds, s)
        if g.needs_grad(0):
            out[0] = _merge(g, g.op("MatMul", ds, kr), rank)
    dkr = g.op("MatMul", g.transpose(ds, [0, 1, 3, 2]), q4) if ds is not None else None
    d = cache_grad(dkr, d_present_k, kc)
    if d is not None and (g.needs_grad(1) or (past_k is not None and g.needs_grad(4))):
        to_inputs(d, past_k, 1, 4)
    return out
