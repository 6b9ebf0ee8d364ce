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
        # the tensor itself where it is one (its runtime shape settles dims that are not static)
        da = g.unbroadcast(da, a if ra > 1 else sa2, grad_shape=batch + tuple(sa2[-2:]))
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
            db = g.unbroadcast(db, b if rb > 1 else sb2, grad_shape=batch + tuple(sb2[-2:]))
        if rb == 1:
            db = g.squeeze(db, [1])
    return [da, db]


def _swap_last(rank):
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def _static(d):
    return isinstance(d, int)


# ---------------------------------------------------------------- Einsum
def _einsum_terms(g, n_inputs):
    """(input terms, output term) of the node's equation, the implicit output made explicit."""
    eq = (g.attr("equation") or "").replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != n_inputs:
        g.fail(f"equation {eq!r} has {len(terms)} operands but the node has {n_inputs} inputs")
    for t in terms + ([out] if arrow else []):
        body = t.replace("...", "", 1)
        if not all(c.isalpha() for c in body) or "." in body:
            g.fail(f"equation {eq!r}: subscripts must be letters with at most one '...' per term")
    if not arrow:
        letters = "".join(t.replace("...", "") for t in terms)
        out = ("..." if any("..." in t for t in terms) else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, out, eq


def _ellipsis_dims(shape, term):
    """The dims ``...`` stands for in an operand of ``shape`` with subscripts ``term``."""
    if "..." not in term:
        return []
    pos = term.index("...")
    n = len(shape) - (len(term) - 3)
    return list(shape[pos:pos + n])


@register_gradient("Einsum", since=12, smoothness=LINEAR,
                   lowering="operand i' = Einsum(other operands, Y'; '<other terms>,<out>-><term i>'), "
                            "axes summed in operand i alone re-expanded (Unsqueeze + Expand)")
def einsum_grad(g):
    """``Y`` is linear in each operand: ``Y[out] = sum X_i[t_i] * prod_j X_j[t_j]``, so ``X_i'[t_i] =
    sum Y'[out] * prod_{j != i} X_j[t_j]``: another Einsum with ``t_i`` as its output.  A subscript only
    operand ``i`` carries (summed away in the forward) is broadcast back: the Einsum leaves it out and
    ``Expand`` restores it.  Refused: a subscript repeated within operand ``i`` (a diagonal), and ``...``
    that broadcasts (operand i's ``...`` dims differing from the output's)."""
    xs = g.inputs
    terms, out, eq = _einsum_terms(g, len(xs))
    dy = g.grad_output(0)
    grads = [None] * len(xs)
    for i, (x, t) in enumerate(zip(xs, terms)):
        if not g.needs_grad(i):
            continue
        letters = t.replace("...", "")
        if len(set(letters)) != len(letters):
            g.fail(f"equation {eq!r}: operand {i} repeats a subscript (a diagonal); supported are equations "
                   f"whose operands each have distinct subscripts")
        ell = 0
        if "..." in t:
            shape = g.shape(x)
            ours = _ellipsis_dims(shape, t) if shape is not None else None
            theirs = _ellipsis_dims(g.shape(g.output(0)) or (), out) if "..." in out else None
            if ours is None or theirs is None or len(ours) != len(theirs) or any(
                    a is None or a != b for a, b in zip(ours, theirs)):
                g.fail(f"equation {eq!r}: the '...' dims of operand {i} ({ours}) are not the output's "
                       f"({theirs}); broadcasting within '...' is not supported")
            ell = len(ours)
        others = [j for j in range(len(xs)) if j != i]
        seen = set("".join(terms[j] for j in others) + out)
        # subscripts only operand i has were summed away in the forward: broadcast back below
        target = "".join(c for c in t.replace("...", "?") if c == "?" or c in seen).replace("?", "...")
        if not others and target == out:
            r = dy
        else:
            r = g.op("Einsum", *[xs[j] for j in others], dy,
                     equation=",".join([terms[j] for j in others] + [out]) + "->" + target)
        if target != t:
            pos, k = [], 0
            for c in t.replace("...", "?"):
                if c == "?":
                    k += ell
                    continue
                if c not in seen:
                    pos.append(k)
                k += 1
            r = g.op("Expand", g.unsqueeze(r, pos), g.op("Shape", x))
        grads[i] = r
    return grads
