"""Ops that only move or relabel elements, and the ops no gradient flows through.

Flatten (seed 002 names it beside linear, conv and max-pool) and Reshape are
inverted by reshaping ``Y'`` back to the input's runtime shape, so a symbolic
batch dimension stays symbolic.
"""

from __future__ import annotations

from ..registry import LINEAR, REGISTRY, register_gradient


# Seed 002 (flat module): the gradient of a reshape is the reshape back.
@register_gradient("Flatten", smoothness=LINEAR, lowering="X'=Reshape(Y', Shape(X))")
def flatten_grad(g):
    x = g.input(0)
    return [g.op("Reshape", g.grad_output(0), g.op("Shape", x))]


@register_gradient("Reshape", since=5, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=Reshape(Y', Shape(X))")
def reshape_grad(g):
    x = g.input(0)
    return [g.op("Reshape", g.grad_output(0), g.op("Shape", x)), None]


@register_gradient("Identity", smoothness=LINEAR, lowering="X'=Y'")
def identity_grad(g):
    return [g.grad_output(0)]


@register_gradient("Cast", smoothness=LINEAR, lowering="X'=Cast(Y', to=type of X) (float to float only)")
def cast_grad(g):
    x = g.input(0)
    return [g.op("Cast", g.grad_output(0), to=g.dtype(x))]


REGISTRY.no_gradient(
    ["Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero", "OneHot",
     "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
     "IsNaN", "IsInf", "BitShift", "RandomNormal", "RandomUniform", "RandomNormalLike",
     "RandomUniformLike", "Multinomial", "Bernoulli", "Constant"],
    reason="its output does not depend differentiably on its inputs",
)
REGISTRY.not_differentiable(["ArgMax", "ArgMin"], reason="its output is an index")
# Floor, Ceil, Round, Sign (zero gradient, no_gradient) live with Mod in rules/rounding.py.


@register_gradient("CastLike", since=15, smoothness=LINEAR, non_differentiable_inputs=(1,),
                   lowering="X'=CastLike(Y', X) (the type template gets no gradient)")
def castlike_grad(g):
    x = g.input(0)
    return [g.op("CastLike", g.grad_output(0), x), None]
