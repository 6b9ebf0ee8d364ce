"""Check a gradient rule in one call: build a one-node model, differentiate it, compare.

:func:`check_rule` is what onnxbp's own op table runs for every built-in rule
(``tests/optable.py``), and what a user runs for a rule of their own::

    report = onnxbp.testing.check_rule("Softsign", inputs={"X": (3, 4)})

It

1. builds a one-node model (:func:`one_node_model`; output types come from
   onnx shape inference),
2. builds its gradient model with :func:`onnxbp.gradient`,
3. checks that every node onnxbp emitted is a standard-domain op and that the
   gradient model passes ``onnx.checker.check_model(full_check=True)``,
4. runs the gradient model on random upstream gradients and checks each
   gradient's shape and dtype,
5. compares with finite differences (:func:`onnxbp.check_gradients`): float64
   central differences where onnxruntime has a float64 kernel for the op
   (default ``rtol=1e-4``), else float32 random directions (``rtol=1e-3``),
6. optionally compares with a reference vector-Jacobian product
   ``reference(values, upstream, wrt) -> {input name: gradient}`` (normwise:
   ``max|ours - ref| <= ref_atol + ref_rtol * max|ref|``); :func:`torch_vjp`
   turns a torch forward function into one.

On failure it raises ``AssertionError`` with a one-line message naming the
op, the input and the error; otherwise it returns a :class:`RuleCheck` with
the models, the values used and the worst errors.

Inputs
------
``inputs`` lists the node's inputs in order (a dict, or ``(name, spec)``
pairs).  A spec is

* a shape tuple such as ``(3, 4)``: a float32 graph input, standard normal
  values drawn from ``seed`` (the upstream gradients and the checker's draws
  come from other streams: never the inputs' values, even for arrays the
  caller drew from ``np.random.default_rng(seed)``);
* a numpy array: a graph input fed with that value (any dtype: integer
  indices, boolean conditions, or floats from a chosen domain such as
  positive values for ``Log``);
* :func:`constant` ``(array)``: an initializer (axes, shapes, pads, a fixed
  exponent), not a graph input;
* ``None``: an omitted optional input.

``wrt`` defaults to every floating-point graph input that is not at one of
the rule's ``non_differentiable_inputs``.

A custom-domain op
------------------
onnxruntime runs an op of a custom domain only if it knows its kernel; the
portable way is an ONNX *model-local function* (a ``FunctionProto`` whose
body is standard ops), passed in ``functions``.  onnxruntime runs (inlines)
the function for the forward and the finite differences; onnxbp sees the
node itself and calls the registered rule.  Function bodies are typed by
their inputs, so write constants with ``CastLike`` and the float64
finite-difference check works too::

    import numpy as np
    import onnxbp
    import onnxbp.testing
    from onnx import helper, TensorProto

    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    softsign = helper.make_function(
        "my.ops", "MySoftsign", ["X"], ["Y"],
        [helper.make_node("Constant", [], ["one_f"], value=one),
         helper.make_node("CastLike", ["one_f", "X"], ["one"]),
         helper.make_node("Abs", ["X"], ["ax"]),
         helper.make_node("Add", ["one", "ax"], ["den"]),
         helper.make_node("Div", ["X", "den"], ["Y"])],
        [helper.make_opsetid("", 17)])

    @onnxbp.register_gradient("MySoftsign", domain="my.ops", smoothness="smooth")
    def my_softsign_grad(g):
        x = g.input(0)
        denom = g.op("Add", g.const(1.0, like=x), g.op("Abs", x))
        return [g.op("Div", g.grad_output(0), g.op("Mul", denom, denom))]

    report = onnxbp.testing.check_rule(
        "MySoftsign", domain="my.ops", functions=[softsign],
        inputs={"X": (3, 4)},
        reference=lambda v, u, wrt: {"X": u["Y"] / (1 + np.abs(v["X"])) ** 2})
    print(report.summary())
    # MySoftsign (my.ops, opset 17): ok; finite differences (float64) 1.3e-07; reference 1.3e-07

A wrong rule (say ``Div(dY, denom)`` instead of ``Div(dY, denom^2)``) fails
with one line (wrapped here)::

    AssertionError: check_rule MySoftsign (my.ops, opset 17): input 'X': finite
    differences (float64) max rel err 5.7e-01 (max abs err 8.4e-01) > rtol 1e-04

and, with the reference, a second clause ``; input 'X': reference max abs
err ...``.  Forward nodes of a custom domain stay in the gradient model, as
they were; only the nodes onnxbp adds must be standard.
"""

from __future__ import annotations

from .models import (
    STANDARD_DOMAINS,
    Constant,
    assert_standard,
    constant,
    make_model,
    one_node_model,
    run_gradient,
    session,
)
from .rules import FD_ATOL, FD_RTOL_FLOAT32, FD_RTOL_FLOAT64, REF_ATOL, REF_RTOL, RuleCheck, check_rule, \
    relative_error, torch_vjp

__all__ = [
    "STANDARD_DOMAINS", "Constant", "constant", "make_model", "one_node_model", "assert_standard",
    "run_gradient", "session", "check_rule", "RuleCheck", "torch_vjp", "relative_error",
    "FD_RTOL_FLOAT64", "FD_RTOL_FLOAT32", "FD_ATOL", "REF_RTOL", "REF_ATOL",
]
