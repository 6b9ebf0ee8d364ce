"""Piecewise-constant ops (Floor, Ceil, Round, Sign) and Mod.

Floor, Ceil, Round and Sign are constant between their steps: the derivative
is zero almost everywhere and undefined at the steps.  PyTorch
(``derivatives.yaml``: ``floor``, ``ceil``, ``round``, ``sign``:
``zeros_like(grad)``) and JAX (``lax.floor_p`` etc. with a zero JVP) define
the gradient as exactly zero everywhere, steps included.  onnxbp expresses
that with the registry's ``no_gradient`` kind: no gradient flows through
these ops, so a parameter's gradient is the sum over its other paths (the
same as adding zeros), and nothing is emitted for them.  A parameter that
reaches the outputs *only* through such ops has no gradient path at all and
is reported as such (``NotDifferentiableError`` naming the op), as for Shape
or the comparisons, rather than silently given zeros.  Keeping them
``no_gradient`` also lets a backward graph that emits Sign (Abs, ReduceL1)
or Floor (Mod below) be differentiated again: Sign's second-order term is
zero, as in torch.

Mod (opsets 10, 13, 28) computes ``Y = A - B * q`` with an integer-valued
quotient ``q``: ``trunc(A / B)`` for ``fmod=1`` (C's fmod, the sign of A;
torch.fmod) and ``floor(A / B)`` for ``fmod=0`` (the sign of B; Python's %
and torch.remainder; floats from opset 28).  ``q`` is piecewise constant, so
between the jumps (where ``A / B`` is an integer) the derivatives are those
of PyTorch's ``derivatives.yaml``:

    fmod.Tensor:       self: grad      other: -grad * self.div(other, rounding_mode="trunc")
    remainder.Tensor:  self: grad      other: -grad * self.div(other, rounding_mode="floor")

i.e. ``A' = Y'`` and ``B' = -Y' * q``, each summed over its broadcast axes.
``trunc`` is written ``Sign(A/B) * Floor(|A/B|)`` (ONNX has no Trunc).
torch's floor division corrects ``A/B`` that round onto an integer; at such
points Y jumps and neither gradient is meaningful.  Integer Mod carries no
gradient (integer tensors stop gradient flow).
"""

from __future__ import annotations

from ..registry import PIECEWISE, REGISTRY, register_gradient

REGISTRY.no_gradient(["Floor", "Ceil", "Round", "Sign"],
                     reason="piecewise constant: its gradient is zero, as in PyTorch and JAX")


@register_gradient("Mod", since=10, smoothness=PIECEWISE,
                   lowering="A'=Y', B'=-Y'*trunc(A/B) (fmod=1) or -Y'*floor(A/B) (fmod=0), "
                            "summed over broadcast axes (torch.fmod / torch.remainder)")
def mod_grad(g):
    """``Y = A - B*q``, ``q = trunc(A/B)`` (fmod=1) or ``floor(A/B)`` (fmod=0): ``A' = Y'``, ``B' = -Y' q``."""
    a, b = g.inputs
    dy = g.grad_output(0)
    da = db = None
    if g.needs_grad(0):
        da = g.unbroadcast(dy, a)
    if g.needs_grad(1):
        ratio = g.op("Div", a, b)
        if int(g.attr("fmod", 0)):
            q = g.op("Mul", g.op("Sign", ratio), g.op("Floor", g.op("Abs", ratio)))
        else:
            q = g.op("Floor", ratio)
        db = g.unbroadcast(g.op("Neg", g.op("Mul", dy, q)), b)
    return [da, db]
