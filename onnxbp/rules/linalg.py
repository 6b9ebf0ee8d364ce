"""Gemm and MatMul: the seeds' back-propagation of matrix multiplication.

Seed 000/001 section 1 (and seed 002 section 2) derive, for ``Y = X . W``::

    BPA (1.1):  X' = Y' . W^T
    BPW (1.2):  W' = X^T . Y'

Gemm computes ``Y = alpha . A~ . B~ + beta . C`` with ``A~ = A^T`` if
``transA`` (likewise B).  Applying BPA/BPW to ``A~`` and ``B~`` and folding the
outer transposes into Gemm's own ``transA``/``transB`` flags gives, with no
Transpose nodes::

    transA=0: A' = Gemm(Y', B, transB=1-transB, alpha)
    transA=1: A' = Gemm(B, Y', transA=transB, transB=1, alpha)
    transB=0: B' = Gemm(A, Y', transA=1-transA, alpha)
    transB=1: B' = Gemm(Y', A, transA=1, transB=transA, alpha)
    C'        = beta . (Y' summed over the axes C was broadcast along)

(Seed 002 section 2.2: the bias gradient sums the output gradient over the
batch.)  MatMul follows numpy semantics: 1-D operands are promoted and the
promoted axis removed again; batch axes broadcast, so each gradient is summed
over the batch axes its operand was broadcast along.
"""

from __future__ import annotations

from ..registry import LINEAR, register_gradient


def _matmul_t(g, a, b, trans_a, trans_b, alpha):
    """alpha . op(a) . op(b) with Gemm (opset >= 11: C optional) or MatMul."""
    if g.opset >= 11:
        return g.op("Gemm", a, b, alpha=float(alpha) if alpha != 1.0 else None,
                    transA=int(trans_a) or None, transB=int(trans_b) or None)
    a = g.transpose(a, [1, 0]) if trans_a else a
    b = g.transpose(b, [1, 0]) if trans_b else b
    out = g.op("MatMul", a, b)
    return out if alpha == 1.0 else g.op("Mul", out, g.const(alpha, like=g.input(0)))


# Seed 000/001 sections 1.1 (BPA) and 1.2 (BPW); seed 002 sections 2.1-2.3.
@register_gradient("Gemm", smoothness=LINEAR,
                   lowering="A'=Gemm(Y',B), B'=Gemm(A,Y') with trans flags folded in; C'=ReduceSum(Y')*beta")
def gemm_grad(g):
    a, b = g.input(0), g.input(1)
    c = g.input(2)
    dy = g.grad_output(0)
    alpha, beta = g.attr("alpha", 1.0), g.attr("beta", 1.0)
    ta, tb = g.attr("transA", 0), g.attr("transB", 0)
    da = db = dc = None
    if g.needs_grad(0):
        da = (_matmul_t(g, dy, b, 0, 1 - tb, alpha) if not ta
              else _matmul_t(g, b, dy, tb, 1, alpha))
    if g.needs_grad(1):
        db = (_matmul_t(g, a, dy, 1 - ta, 0, alpha) if not tb
              else _matmul_t(g, dy, a, 1, ta, alpha))
    if c is not None and g.needs_grad(2):
        dc = g.unbroadcast(dy, c)
        if beta != 1.0:
            dc = g.op("Mul", dc, g.const(beta, like=c))
    return [da, db, dc]


# Seed 000/001 sections 1.1 and 1.2, per batch element, with numpy broadcasting.
@register_gradient("MatMul", smoothness=LINEAR,
                   lowering="A'=MatMul(Y',B^T), B'=MatMul(A^T,Y'), summed over broadcast batch axes")
def matmul_grad(g):
    a, b = g.inputs
    dy = g.grad_output(0)
    ra, rb = g.rank(a), g.rank(b)
    if ra == 1 and rb == 1:  # dot product: Y is a scalar
        return [g.needs_grad(0) and g.op("Mul", dy, b), g.needs_grad(1) and g.op("Mul", dy, a)]
    sa, sb, sy = g.shape(a), g.shape(b), g.shape(g.output(0))
    a2 = a if ra > 1 else g.unsqueeze(a, [0])  # (K,) -> (1, K)
    b2 = b if rb > 1 else g.unsqueeze(b, [1])  # (K,) -> (K, 1)
    sa2 = sa if ra > 1 else (1,) + tuple(sa)
    sb2 = sb if rb > 1 else tuple(sb) + (1,)
    dy2 = dy
    if ra == 1:
        dy2 = g.unsqueeze(dy2, [len(sy) - (1 if rb > 1 else 0)])
    if rb == 1:
        dy2 = g.unsqueeze(dy2, [len(sy) + (1 if ra == 1 else 0)])
    batch = tuple(sy[: len(sy) - (ra > 1) - (rb > 1)])
    da = db = None
    if g.needs_grad(0):
        da = g.op("MatMul", dy2, g.transpose(b2, _swap_last(len(sb2))))
        da = g.unbroadcast(da, sa2, grad_shape=batch + tuple(sa2[-2:]))
        if ra == 1:
            da = g.squeeze(da, [0])
    if g.needs_grad(1):
        if rb == 2 and ra > 2 and _static(sa2[-1]) and _static(sy[-1]) and all(d == 1 for d in sb2[:-2]):
            # Linear layer on a batch of sequences: fold the batch axes into M (one GEMM).
            k, n = sa2[-1], sy[-1]
            a_flat = g.op("Reshape", a2, g.ints([-1, k]))
            dy_flat = g.op("Reshape", dy2, g.ints([-1, n]))
            db = _matmul_t(g, a_flat, dy_flat, 1, 0, 1.0)
        else:
            db = g.op("MatMul", g.transpose(a2, _swap_last(len(sa2))), dy2)
            db = g.unbroadcast(db, sb2, grad_shape=batch + tuple(sb2[-2:]))
        if rb == 1:
            db = g.squeeze(db, [1])
    return [da, db]


def _swap_last(rank):
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _static(d):
    return isinstance(d, int)
