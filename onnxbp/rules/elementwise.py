"""Broadcasting arithmetic and simple activations.

For ``Y = f(A, B)`` with numpy broadcasting, each input's gradient is the
local derivative times ``Y'``, summed over the axes along which that input
was broadcast (``g.unbroadcast``); the same summation the seeds apply to the
bias (seed 002 section 2.2).
"""

from __future__ import annotations

from ..registry import LINEAR, PIECEWISE, SMOOTH, register_gradient


@register_gradient("Add", smoothness=LINEAR, lowering="A'=B'=Y' summed over broadcast axes")
def add_grad(g):
    a, b = g.inputs
    dy = g.grad_output(0)
    return [g.needs_grad(0) and g.unbroadcast(dy, a), g.needs_grad(1) and g.unbroadcast(dy, b)]


@register_gradient("Sub", smoothness=LINEAR, lowering="A'=Y', B'=-Y', summed over broadcast axes")
def sub_grad(g):
    a, b = g.inputs
    dy = g.grad_output(0)
    return [g.needs_grad(0) and g.unbroadcast(dy, a),
            g.needs_grad(1) and g.op("Neg", g.unbroadcast(dy, b))]


@register_gradient("Mul", smoothness=LINEAR, lowering="A'=Y'*B, B'=Y'*A, summed over broadcast axes")
def mul_grad(g):
    a, b = g.inputs
    dy = g.grad_output(0)
    return [g.needs_grad(0) and g.unbroadcast(g.op("Mul", dy, b), a),
            g.needs_grad(1) and g.unbroadcast(g.op("Mul", dy, a), b)]


@register_gradient("Div", smoothness=SMOOTH, lowering="A'=Y'/B, B'=-Y'*Y/B, summed over broadcast axes")
def div_grad(g):
    a, b = g.inputs
    dy = g.grad_output(0)
    da = db = None
    if g.needs_grad(0):
        da = g.unbroadcast(g.op("Div", dy, b), a)
    if g.needs_grad(1):
        db = g.unbroadcast(g.op("Neg", g.op("Mul", dy, g.op("Div", g.output(0), b))), b)
    return [da, db]


@register_gradient("Neg", smoothness=LINEAR, lowering="X'=-Y'")
def neg_grad(g):
    return [g.op("Neg", g.grad_output(0))]


@register_gradient("Relu", smoothness=PIECEWISE, lowering="X'=Y'*Cast(Y>0)")
def relu_grad(g):
    # Y > 0 exactly where X > 0 (NaN: neither).  Reading Y, not X, lets X be freed after
    # the forward: Y is kept anyway when the next layer's backward needs it (a Conv's dW).
    y = g.output(0)
    return [g.select(g.op("Greater", y, g.const(0.0, like=y)), g.grad_output(0), like=y)]


@register_gradient("Sum", smoothness=LINEAR, lowering="X_i'=Y' summed over broadcast axes")
def sum_grad(g):
    dy = g.grad_output(0)
    return [g.needs_grad(i) and g.unbroadcast(dy, x) for i, x in enumerate(g.inputs)]
