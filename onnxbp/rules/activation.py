"""Unary activations and elementwise math.

Each rule is the chain rule for an elementwise ``Y = f(X)``: ``X' = Y' . f'(X)``
(seed 004 treats every op this way: "the operator implementations and the
corresponding derivatives").  Where the derivative is cheaper in terms of the
forward output ``Y`` the rule reads ``Y`` instead of recomputing::

    Sigmoid     X' = Y' . Y . (1 - Y)
    Tanh        X' = Y' . (1 - Y^2)
    Exp         X' = Y' . Y
    Sqrt        X' = Y' / (2 Y)
    Reciprocal  X' = -Y' . Y^2
    Tan         X' = Y' . (1 + Y^2)
    Elu/Selu    X' = Y' . (Y + gamma alpha) for X <= 0 (Elu: gamma = 1)
    Celu        X' = Y' . (Y / alpha + 1)   for X <= 0
    Pow         A' = Y' . B . A^(B-1),  B' = Y' . Y . log(A)  (B' only when requested)

Pow follows torch at the singular points from opset 11 (float Equal): ``A'``
is 0 where ``B = 0`` (not ``0 . 0^-1 = NaN``) and ``B'`` is 0 where ``A = 0``
(not ``0 . log 0``); older opsets leave those points NaN.  A constant ``B``
that is one value is folded (``B = 1``: ``A' = Y'``; ``B = 2``: ``A' = 2 A Y'``;
else ``B . A^(B-1)`` with a constant ``B - 1``) and needs no mask when nonzero.
Negative bases give ``B' = NaN`` (log), as in torch.

Gelu (seed 004, gelu section): ``Y = X . Phi(X)`` with ``Phi(x) = (1 + erf(x /
sqrt 2)) / 2``; the seed derives ``d erf(z)/dz = 2/sqrt(pi) exp(-z^2)`` ("the
function inside the integral") and hence ``Y/X' = Phi(X) + X . phi(X)`` with
``phi(x) = exp(-x^2/2) / sqrt(2 pi)``.  The ``approximate="tanh"`` form
``Y = X/2 . (1 + tanh(u))``, ``u = c (X + 0.044715 X^3)``, ``c = sqrt(2/pi)``,
differentiates to ``(1 + t)/2 + X/2 . (1 - t^2) . c . (1 + 3 . 0.044715 X^2)``.

Conventions at kinks (torch's, so both agree everywhere):

* Clip: the gradient passes where ``min <= X <= max`` (inclusive, as
  ``torch.clamp``).  Opset >= 11 computes the mask as ``Equal(X, Y)``, which
  is exactly that set; the ``min``/``max`` inputs are treated as
  non-differentiable.
* LeakyRelu/PRelu/Elu/Selu/Celu: ``X = 0`` takes the negative branch (slope
  ``alpha``), Abs has gradient 0 at 0 (``sign``).
* HardSigmoid: gradient ``alpha`` only strictly inside ``0 < alpha X + beta < 1``.
* HardSwish: ``X/3 + 1/2`` strictly inside ``-3 < X < 3``, 0 at and below
  -3, 1 at and above 3.

Branch choices are ``Y' . Cast(mask)`` (``g.select``), not ``Where``: exact for
finite gradients and several times faster in onnxruntime; any opset.
Float ``Equal`` needs opset 11, so older masks use Less/Greater/Not.
"""

from __future__ import annotations

import math

import numpy as np

from ..registry import PIECEWISE, SMOOTH, register_gradient


# ---------------------------------------------------------------- helpers
def _c(g, value, like):
    return g.const(value, like=like)


def _mask(g, cond, like):
    return g.op("Cast", cond, to=g.dtype(like))


def _gt0(g, x):
    return g.op("Greater", x, _c(g, 0.0, x))


def _sign(g, x):
    if g.opset >= 9:
        return g.op("Sign", x)
    zero = _c(g, 0.0, x)
    return g.op("Sub", _mask(g, g.op("Greater", x, zero), x), _mask(g, g.op("Less", x, zero), x))


def _scale(g, t, factor, like):
    return t if factor == 1.0 else g.op("Mul", t, _c(g, factor, like))


# ------------------------------------------------------------- piecewise
@register_gradient("Clip", until=10, smoothness=PIECEWISE,
                   lowering="X'=Y'*Cast(min<=X<=max) (min/max attributes)")
def clip_attr_grad(g):
    x, dy = g.input(0), g.grad_output(0)
    conds = []
    if g.has_attr("min"):
        conds.append(g.op("Not", g.op("Less", x, _c(g, g.attr("min"), x))))
    if g.has_attr("max"):
        conds.append(g.op("Not", g.op("Greater", x, _c(g, g.attr("max"), x))))
    if not conds:
        return [dy]
    cond = conds[0] if len(conds) == 1 else g.op("And", *conds)
    return [g.select(cond, dy, like=x)]


@register_gradient("Clip", since=11, smoothness=PIECEWISE, non_differentiable_inputs=(1, 2),
                   lowering="X'=Y'*Cast(Equal(X, Y)), i.e. min<=X<=max; min/max get none")
def clip_grad(g):
    x, dy = g.input(0), g.grad_output(0)
    if g.input(1) is None and g.input(2) is None:
        return [dy]
    return [g.select(g.op("Equal", x, g.output(0)), dy, like=x)]


@register_gradient("LeakyRelu", smoothness=PIECEWISE, lowering="X'=Where(X>0, Y', alpha*Y')")
def leaky_relu_grad(g):
    x, dy = g.input(0), g.grad_output(0)
    alpha = g.attr("alpha", 0.01)
    return [g.select(_gt0(g, x), dy, _scale(g, dy, alpha, x), like=x)]


@register_gradient("PRelu", smoothness=PIECEWISE,
                   lowering="X'=Where(X>0, Y', slope*Y'); slope'=Where(X>0, 0, X*Y') summed over broadcast axes")
def prelu_grad(g):
    x, slope = g.inputs
    dy = g.grad_output(0)
    pos = _gt0(g, x)
    dx = ds = None
    if g.needs_grad(0):
        dx = g.select(pos, dy, g.op("Mul", dy, slope), like=x)
    if g.needs_grad(1):
        ds = g.unbroadcast(g.select(g.op("Not", pos), g.op("Mul", dy, x), like=x), slope)
    return [dx, ds]


@register_gradient("HardSigmoid", smoothness=PIECEWISE,
                   lowering="X'=alpha*Y' where 0<Y<1, else 0")
def hard_sigmoid_grad(g):
    x, y, dy = g.input(0), g.output(0), g.grad_output(0)
    alpha = g.attr("alpha", 0.2)
    inside = g.op("And", g.op("Greater", y, _c(g, 0.0, x)), g.op("Less", y, _c(g, 1.0, x)))
    return [g.select(inside, _scale(g, dy, alpha, x), like=x)]


@register_gradient("HardSwish", smoothness=PIECEWISE,
                   lowering="X'=Y'*(X/3+1/2) for -3<X<3, Y' for X>=3, 0 for X<=-3")
def hard_swish_grad(g):
    x, dy = g.input(0), g.grad_output(0)
    inside = g.op("And", g.op("Greater", x, _c(g, -3.0, x)), g.op("Less", x, _c(g, 3.0, x)))
    slope = g.op("Add", g.op("Mul", x, _c(g, 1.0 / 3.0, x)), _c(g, 0.5, x))
    outside = g.op("Cast", _gt0(g, x), to=g.dtype(x))
    return [g.op("Mul", dy, g.select(inside, slope, outside, like=x))]


@register_gradient("Abs", smoothness=PIECEWISE, lowering="X'=Y'*Sign(X)")
def abs_grad(g):
    x = g.input(0)
    return [g.op("Mul", g.grad_output(0), _sign(g, x))]


# ---------------------------------------------------------------- smooth
@register_gradient("Sigmoid", smoothness=SMOOTH, lowering="X'=Y'*Y*(1-Y)")
def sigmoid_grad(g):
    y, dy = g.output(0), g.grad_output(0)
    return [g.op("Mul", g.op("Mul", dy, y), g.op("Sub", _c(g, 1.0, y), y))]


@register_gradient("Tanh", smoothness=SMOOTH, lowering="X'=Y'*(1-Y^2)")
def tanh_grad(g):
    y, dy = g.output(0), g.grad_output(0)
    return [g.op("Mul", dy, g.op("Sub", _c(g, 1.0, y), g.op("Mul", y, y)))]


@register_gradient("Softplus", smoothness=SMOOTH, lowering="X'=Y'*Sigmoid(X)")
def softplus_grad(g):
    return [g.op("Mul", g.grad_output(0), g.op("Sigmoid", g.input(0)))]


@register_gradient("Softsign", smoothness=SMOOTH, lowering="X'=Y'/(1+|X|)^2")
def softsign_grad(g):
    x = g.input(0)
    d = g.op("Add", _c(g, 1.0, x), g.op("Abs", x))
    return [g.op("Div", g.grad_output(0), g.op("Mul", d, d))]


@register_gradient("Elu", smoothness=SMOOTH, lowering="X'=Where(X>0, Y', Y'*(Y+alpha))")
def elu_grad(g):
    x, y, dy = g.input(0), g.output(0), g.grad_output(0)
    alpha = g.attr("alpha", 1.0)
    neg = g.op("Mul", dy, g.op("Add", y, _c(g, alpha, x)))
    return [g.select(_gt0(g, x), dy, neg, like=x)]


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


@register_gradient("Selu", smoothness=SMOOTH,
                   lowering="X'=Where(X>0, gamma*Y', Y'*(Y+gamma*alpha))")
def selu_grad(g):
    x, y, dy = g.input(0), g.output(0), g.grad_output(0)
    alpha, gamma = g.attr("alpha", _SELU_ALPHA), g.attr("gamma", _SELU_GAMMA)
    neg = g.op("Mul", dy, g.op("Add", y, _c(g, alpha * gamma, x)))
    return [g.select(_gt0(g, x), _scale(g, dy, gamma, x), neg, like=x)]


@register_gradient("Celu", smoothness=SMOOTH, lowering="X'=Where(X>0, Y', Y'*(Y/alpha+1))")
def celu_grad(g):
    x, y, dy = g.input(0), g.output(0), g.grad_output(0)
    alpha = g.attr("alpha", 1.0)
    neg = g.op("Mul", dy, g.op("Add", _scale(g, y, 1.0 / alpha, x), _c(g, 1.0, x)))
    return [g.select(_gt0(g, x), dy, neg, like=x)]


# Seed 004, gelu section: d erf(z)/dz = 2/sqrt(pi) exp(-z^2), so gelu' = Phi + x phi.
@register_gradient("Gelu", since=20, smoothness=SMOOTH,
                   lowering="none: X'=Y'*(Phi(X)+X*phi(X)); tanh: X'=Y'*d/dX of the tanh form")
def gelu_grad(g):
    x, dy = g.input(0), g.grad_output(0)
    approx = g.attr("approximate", "none")
    if approx == "none":
        phi_cdf = g.op("Mul", g.op("Add", g.op("Erf", g.op("Mul", x, _c(g, 1.0 / math.sqrt(2.0), x))),
                                   _c(g, 1.0, x)), _c(g, 0.5, x))
        pdf = g.op("Mul", g.op("Exp", g.op("Mul", g.op("Mul", x, x), _c(g, -0.5, x))),
                   _c(g, 1.0 / math.sqrt(2.0 * math.pi), x))
        return [g.op("Mul", dy, g.op("Add", phi_cdf, g.op("Mul", x, pdf)))]
    if approx == "tanh":
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        x2 = g.op("Mul", x, x)
        inner = g.op("Add", _c(g, 1.0, x), g.op("Mul", x2, _c(g, k, x)))        # 1 + k x^2
        t = g.op("Tanh", g.op("Mul", g.op("Mul", x, inner), _c(g, c, x)))     # tanh(c(x + k x^3))
        half_1pt = g.op("Mul", g.op("Add", t, _c(g, 1.0, x)), _c(g, 0.5, x))
        du = g.op("Add", _c(g, c, x), g.op("Mul", x2, _c(g, 3.0 * k * c, x)))  # c (1 + 3 k x^2)
        sech2 = g.op("Sub", _c(g, 1.0, x), g.op("Mul", t, t))
        second = g.op("Mul", g.op("Mul", g.op("Mul", x, _c(g, 0.5, x)), sech2), du)
        return [g.op("Mul", dy, g.op("Add", half_1pt, second))]
    g.fail(f"approximate={approx!r} is not supported; supported: 'none', 'tanh'")


# Seed 004, gelu section: the derivative of erf is its integrand.
@register_gradient("Erf", smoothness=SMOOTH, lowering="X'=Y'*2/sqrt(pi)*exp(-X^2)")
def erf_grad(g):
    x = g.input(0)
    e = g.op("Exp", g.op("Neg", g.op("Mul", x, x)))
    return [g.op("Mul", g.grad_output(0), g.op("Mul", e, _c(g, 2.0 / math.sqrt(math.pi), x)))]


@register_gradient("Exp", smoothness=SMOOTH, lowering="X'=Y'*Y")
def exp_grad(g):
    return [g.op("Mul", g.grad_output(0), g.output(0))]


@register_gradient("Log", smoothness=SMOOTH, lowering="X'=Y'/X")
def log_grad(g):
    return [g.op("Div", g.grad_output(0), g.input(0))]


@register_gradient("Sqrt", smoothness=SMOOTH, lowering="X'=Y'/(2Y)")
def sqrt_grad(g):
    y = g.output(0)
    return [g.op("Div", g.op("Mul", g.grad_output(0), _c(g, 0.5, y)), y)]


@register_gradient("Reciprocal", smoothness=SMOOTH, lowering="X'=-Y'*Y^2")
def reciprocal_grad(g):
    y = g.output(0)
    return [g.op("Neg", g.op("Mul", g.grad_output(0), g.op("Mul", y, y)))]


@register_gradient("Sin", smoothness=SMOOTH, lowering="X'=Y'*Cos(X)")
def sin_grad(g):
    return [g.op("Mul", g.grad_output(0), g.op("Cos", g.input(0)))]


@register_gradient("Cos", smoothness=SMOOTH, lowering="X'=-Y'*Sin(X)")
def cos_grad(g):
    return [g.op("Neg", g.op("Mul", g.grad_output(0), g.op("Sin", g.input(0))))]


@register_gradient("Tan", smoothness=SMOOTH, lowering="X'=Y'*(1+Y^2)")
def tan_grad(g):
    y = g.output(0)
    return [g.op("Mul", g.grad_output(0), g.op("Add", _c(g, 1.0, y), g.op("Mul", y, y)))]


@register_gradient("Mish", smoothness=SMOOTH,
                   lowering="X'=Y'*(t+X*Sigmoid(X)*(1-t^2)), t=Tanh(Softplus(X))")
def mish_grad(g):
    x = g.input(0)
    t = g.op("Tanh", g.op("Softplus", x))
    sech2 = g.op("Sub", _c(g, 1.0, x), g.op("Mul", t, t))
    d = g.op("Add", t, g.op("Mul", g.op("Mul", x, g.op("Sigmoid", x)), sech2))
    return [g.op("Mul", g.grad_output(0), d)]


@register_gradient("Pow", smoothness=SMOOTH,
                   lowering="A'=Y'*B*A^(B-1) (0 where B=0), B'=Y'*Y*log(A) (0 where A=0; only when "
                            "requested), summed over broadcast axes; constant B=1/2 folded")
def pow_grad(g):
    a, b = g.inputs
    y, dy = g.output(0), g.grad_output(0)
    da = db = None
    if g.needs_grad(0):
        da = g.unbroadcast(g.op("Mul", dy, _pow_base_local(g, a, b)), a)
    if g.needs_grad(1):
        db = g.op("Mul", g.op("Mul", dy, y), g.op("Log", a))  # in A's (= Y's) type
        if g.opset >= 11:  # torch: no exponent gradient where the base is 0 (log 0 = -inf)
            zero = _c(g, 0.0, a)
            db = g.op("Where", g.op("Equal", a, zero), zero, db)
        if g.dtype(b) != g.dtype(a):
            db = g.op("Cast", db, to=g.dtype(b))
        db = g.unbroadcast(db, b)
    return [da, db]


def _pow_base_local(g, a, b):
    """dY/dA = B . A^(B-1); constant B folded (B=1: 1, B=2: 2A); 0 where B = 0, as torch."""
    const = g.constant_value(b)
    if const is not None and const.size and np.all(const == const.reshape(-1)[0]):
        e = float(const.reshape(-1)[0])
        if e == 1.0:
            return _c(g, 1.0, a)
        if e == 2.0:
            return g.op("Mul", a, _c(g, 2.0, a))
        if e != 0.0:
            return g.op("Mul", g.op("Pow", a, _c(g, e - 1.0, a)), _c(g, e, a))
    e = b if g.dtype(b) == g.dtype(a) else g.op("Cast", b, to=g.dtype(a))
    local = g.op("Mul", e, g.op("Pow", a, g.op("Sub", e, _c(g, 1.0, a))))
    may_be_zero = const is None or bool(np.any(const == 0))
    if may_be_zero and g.opset >= 11:  # float Equal needs opset 11
        # B = 0 at A = 0 would give 0 * inf = NaN; the derivative of A^0 is 0.
        zero_b = g.op("Equal", b, g.const(0, like=b))
        local = g.op("Where", zero_b, _c(g, 0.0, a), local)
    return local
