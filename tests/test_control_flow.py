"""Control flow (If, Loop, Scan): differentiated, never differentiated around as if the subgraph were not there.

* If: both branches; the tensors the branches read from the outer graph (their
  captures) get their gradients through a backward If on the same condition
  (onnxbp/controlflow.py); a branch that does not read a capture gives a zero.
* Loop with a build-time constant trip count and Scan with a static length:
  unrolled before differentiation (onnxbp/unroll.py), outer captures read in
  every iteration.
* Anything else on a gradient path is refused with a one-line
  ``UnsupportedOpError`` naming the node and what is supported (exact texts
  below).

Every gradient is compared with float64 central differences
(``onnxbp.check_gradients``, rtol 1e-4, atol 1e-6) and with torch autograd in
float64 on equivalent torch code (normwise: max|ours - torch| <= 1e-6 + 2e-5
max|torch|, ours being float32); every gradient model passes
``onnx.checker.check_model(full_check=True)`` and has only standard ops
(``assert_standard``) and runs in onnxruntime's CPU provider.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from gradutil import HAS_TORCH, assert_close
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.graphview import outer_names
from onnxbp.testing import assert_standard, run_gradient

F = TensorProto.FLOAT
I64 = TensorProto.INT64
B = TensorProto.BOOL
FD_RTOL, FD_ATOL = 1e-4, 1e-6
REF_RTOL, REF_ATOL = 2e-5, 1e-6

SUPPORTED = ("control flow is differentiated for If (both branches) and, by unrolling (at most 1024 "
             "iterations), for Loop with a build-time constant trip count M whose condition is absent, constant "
             "or passed through the body unchanged, and for Scan (opset 9 or later) with a static scan-axis "
             "length")

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is a test extra")


def _vi(name, elem=F, shape=(3,)):
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    m = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 10)
    onnx.checker.check_model(m, full_check=True)
    return m


def _loop_body(nodes, carried, scans=(), extra_inputs=(), cond_out="c_out", cond_nodes=None):
    """A Loop body: inputs (i, c_in, *carried), outputs (c_out, *carried outputs, *scan outputs)."""
    cond_nodes = [helper.make_node("Identity", ["c_in"], ["c_out"])] if cond_nodes is None else cond_nodes
    return helper.make_graph(
        list(nodes) + list(cond_nodes), "body",
        [_vi("i", I64, []), _vi("c_in", B, [])] + [_vi(n, F, s) for n, s in carried],
        [_vi(cond_out, B, [])] + [_vi(n, F, s) for n, s in list(extra_inputs) + list(scans)])


def fd(model, wrt, feeds=None):
    """float64 central differences (onnxbp's checker), rtol 1e-4."""
    report = onnxbp.check_gradients(model, wrt, feeds=feeds, rtol=FD_RTOL, atol=FD_ATOL, precision="float64")
    assert report.passed, "\n" + report.table()
    return report


def torch_grads(fn, model, feeds, wrt, upstream):
    """VJP of ``fn`` (torch, float64) at the model's initializers and ``feeds``."""
    import torch

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update(feeds)
    leaves = {k: torch.tensor(np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v),
                              requires_grad=k in wrt) for k, v in values.items()}
    outs = fn(**leaves)
    total = sum((outs[k] * torch.tensor(np.asarray(u, np.float64))).sum() for k, u in upstream.items() if k in outs)
    grads = torch.autograd.grad(total, [leaves[p] for p in wrt], allow_unused=True)
    return {p: (g.numpy() if g is not None else np.zeros(np.shape(values[p]))) for p, g in zip(wrt, grads)}


def compare(model, feeds, wrt, fn):
    """The gradient model (checked, standard ops, run in onnxruntime) against torch autograd."""
    gm, _, grads, ups = run_gradient(model, feeds, wrt, seed=1)
    if HAS_TORCH and fn is not None:
        ref = torch_grads(fn, model, feeds, wrt, ups)
        for p in wrt:
            assert_close(grads[p], ref[p], REF_RTOL, REF_ATOL, f"{p}_grad vs torch")
    return gm, grads, ups


def _t(x):
    import torch

    return torch.as_tensor(x)


# ---------------------------------------------------------------------------------------- the reproducer
def loop_model():
    """y = x * W2^4: four iterations of a body that reads the outer W2 (not a Loop input)."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "W2"], ["acc_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", I64, []), _vi("c_in", B, []), _vi("acc_in")],
        [_vi("c_out", B, []), _vi("acc_out")])
    return _model([helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)], [_vi("x")], [_vi("y")],
                  [_init("trip", np.array(4, np.int64)), _init("W2", np.full(3, 1.1, np.float32))])


def if_model():
    """y = If(c, x * W, x + W) * W: the branches read x and W from the outer graph."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "W"], ["t"])], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Add", ["x", "W"], ["e"])], "else", [], [_vi("e")])
    return _model([helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other),
                   helper.make_node("Mul", ["z", "W"], ["y"], name="direct")],
                  [_vi("x"), _vi("c", B, [])], [_vi("y")], [_init("W", np.full(3, 0.5, np.float32))])


def test_reproducer_loop_weight_gradient_counts_every_iteration():
    """The issue: W2_grad of y = x * W2^4 is 4 x W2^3 u (it was u-like: one iteration's worth)."""
    x = np.array([1.0, 2.0, 3.0], np.float32)
    u = np.ones(3, np.float32)
    gm, _, grads, _ = run_gradient(loop_model(), {"x": x}, ["W2", "x"], upstream={"y": u})
    np.testing.assert_allclose(grads["W2"], 4 * x * 1.1 ** 3 * u, rtol=1e-6)
    np.testing.assert_allclose(grads["x"], 1.1 ** 4 * u, rtol=1e-6)
    assert "Loop" not in {n.op_type for n in gm.graph.node}  # unrolled: four Mul copies read W2
    assert [n.name for n in gm.graph.node if n.op_type == "Mul" and "W2" in n.input and "/grad/" not in n.name] \
        == [f"loop/iter{i}/Mul" for i in range(4)]
    fd(loop_model(), ["W2", "x"])


@pytest.mark.parametrize("taken", [True, False])
def test_reproducer_if_reading_outer_tensors_gets_both_paths(taken):
    """W reaches y directly and through the branch; x only through the branch."""
    model = if_model()
    x = np.array([0.3, -1.2, 2.0], np.float32)
    feeds = {"x": x, "c": np.array(taken)}
    _, grads, ups = compare(model, feeds, ["W", "x"], lambda x, W, c: {
        "y": (x * W if bool(c) else x + W) * W})
    u, w = ups["y"], 0.5
    want_w = (2 * x * w if taken else x + 2 * w) * u
    np.testing.assert_allclose(grads["W"], want_w, rtol=1e-6)
    np.testing.assert_allclose(grads["x"], (w * w if taken else w) * u, rtol=1e-6)
    fd(model, ["W", "x"], feeds={"c": np.array(taken)})


# ---------------------------------------------------------------------------------------- If
def _if_case(reads: str, outputs: str):
    """If(c) with two outputs z1, z2; ``reads``: which branches read W (both, then, else);
    ``outputs``: "both" (y = z1 * V + z2) or "first" (z2 unused).  x and V are read by both."""
    then_nodes = [helper.make_node("Mul", ["x", "W" if reads in ("both", "then") else "x"], ["t1"]),
                  helper.make_node("Tanh", ["x"], ["t2"])]
    else_nodes = [helper.make_node("Add", ["x", "W" if reads in ("both", "else") else "V"], ["e0"]),
                  helper.make_node("Sigmoid", ["e0"], ["e1"]),
                  helper.make_node("Mul", ["e1", "V"], ["e2"])]
    then = helper.make_graph(then_nodes, "then", [], [_vi("t1"), _vi("t2")])
    other = helper.make_graph(else_nodes, "else", [], [_vi("e1"), _vi("e2")])
    nodes = [helper.make_node("If", ["c"], ["z1", "z2"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Mul", ["z1", "V"], ["p"])]
    nodes.append(helper.make_node("Add", ["p", "z2"], ["y"]) if outputs == "both"
                 else helper.make_node("Identity", ["p"], ["y"]))
    model = _model(nodes, [_vi("x"), _vi("c", B, [])], [_vi("y")],
                   [_init("W", np.array([0.5, -0.7, 1.3], np.float32)), _init("V", np.array([1.5, 0.2, -0.4], np.float32))])

    def ref(x, W, V, c):
        import torch

        if bool(c):
            z1 = x * (W if reads in ("both", "then") else x)
            z2 = torch.tanh(x)
        else:
            z1 = torch.sigmoid(x + (W if reads in ("both", "else") else V))
            z2 = z1 * V
        return {"y": z1 * V + z2 if outputs == "both" else z1 * V}

    return model, ref


@pytest.mark.parametrize("outputs", ["both", "first"])
@pytest.mark.parametrize("reads", ["both", "then", "else"])
@pytest.mark.parametrize("taken", [True, False], ids=["then_taken", "else_taken"])
def test_if(taken, reads, outputs):
    model, ref = _if_case(reads, outputs)
    feeds = {"x": np.array([0.3, -1.2, 2.0], np.float32), "c": np.array(taken)}
    gm, grads, _ = compare(model, feeds, ["W", "V", "x"], ref)
    if reads != "both" and (reads == "then") != taken:
        assert not grads["W"].any()  # the taken branch does not read W: a real zero
    fd(model, ["W", "V", "x"], feeds={"c": np.array(taken)})
    ifs = [n for n in gm.graph.node if n.op_type == "If"]
    assert len(ifs) == 2 and ifs[1].input[0] == "c"  # the backward If shares the condition


def test_if_branch_passes_a_capture_through():
    """A branch that passes an outer tensor through, the other a constant: y = If(c, W, k) * x."""
    then = helper.make_graph([helper.make_node("Identity", ["W"], ["w"])], "then", [], [_vi("w")])
    other = helper.make_graph([helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", F, [3], [1, 2, 3]))],
                              "else", [], [_vi("k")])
    model = _model([helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other),
                    helper.make_node("Mul", ["z", "x"], ["y"])], [_vi("x"), _vi("c", B, [])], [_vi("y")],
                   [_init("W", np.array([0.5, -0.7, 1.3], np.float32))])
    for taken in (True, False):
        feeds = {"x": np.array([0.3, -1.2, 2.0], np.float32), "c": np.array(taken)}
        compare(model, feeds, ["W", "x"], lambda x, W, c: {"y": (W if bool(c) else _t([1.0, 2.0, 3.0])) * x})
        fd(model, ["W", "x"], feeds={"c": np.array(taken)})


@pytest.mark.parametrize("opset", [8, 11, 17])
def test_if_branch_with_its_own_initializer(opset):
    """A branch holding an initializer k (kept, renamed, in the backward branch); zeros below opset 9 are constants."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t0"]), helper.make_node("Mul", ["t0", "W"], ["t"])],
                             "then", [], [_vi("t")], [_init("k", np.array([2.0, 3.0, 4.0], np.float32))])
    other = helper.make_graph([helper.make_node("Add", ["x", "x"], ["e"])], "else", [], [_vi("e")])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_vi("x"), _vi("c", B, [])], [_vi("y")], [_init("W", np.array([0.5, -0.7, 1.3], np.float32))],
                   opset=opset)
    for taken in (True, False):
        feeds = {"x": np.array([0.3, -1.2, 2.0], np.float32), "c": np.array(taken)}
        compare(model, feeds, ["W", "x"], lambda x, W, c: {"y": x * _t([2.0, 3.0, 4.0]) * W if bool(c) else x + x})
        fd(model, ["W", "x"], feeds={"c": np.array(taken)})


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_on_a_condition_computed_from_data(sign):
    """c = ReduceSum(x) > 0 (not differentiable, computed in the graph); y = If(c, x * W, W - x)."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "W"], ["t"])], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Sub", ["W", "x"], ["e"])], "else", [], [_vi("e")])
    model = _model([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                    helper.make_node("Greater", ["total", "zero"], ["c"]),
                    helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_vi("x")], [_vi("y")], [_init("W", np.array([0.5, -0.7, 1.3], np.float32)),
                                            _init("zero", np.array(0.0, np.float32))])
    feeds = {"x": sign * np.array([0.3, 1.2, 0.7], np.float32)}
    compare(model, feeds, ["W", "x"], lambda x, W, zero: {"y": x * W if float(x.detach().sum()) > 0 else W - x})
    report = onnxbp.check_gradients(model, ["W"], rtol=FD_RTOL, atol=FD_ATOL, precision="float64")
    assert report.passed, report.table()


@pytest.mark.parametrize("outer, inner", [(True, True), (True, False), (False, True)])
def test_nested_if(outer, inner):
    """If(c1, If(c2, x*W, tanh(x+W)), x-W) * W: the inner If is differentiated inside the outer branch's build."""
    inner_then = helper.make_graph([helper.make_node("Mul", ["x", "W"], ["it"])], "it", [], [_vi("it")])
    inner_else = helper.make_graph([helper.make_node("Add", ["x", "W"], ["ia"]), helper.make_node("Tanh", ["ia"], ["ie"])],
                                   "ie", [], [_vi("ie")])
    then = helper.make_graph([helper.make_node("If", ["c2"], ["t"], then_branch=inner_then, else_branch=inner_else)],
                             "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Sub", ["x", "W"], ["e"])], "else", [], [_vi("e")])
    model = _model([helper.make_node("If", ["c1"], ["z"], name="outer", then_branch=then, else_branch=other),
                    helper.make_node("Mul", ["z", "W"], ["y"])],
                   [_vi("x"), _vi("c1", B, []), _vi("c2", B, [])], [_vi("y")],
                   [_init("W", np.array([0.5, -0.7, 1.3], np.float32))])

    def ref(x, W, c1, c2):
        import torch

        z = (x * W if bool(c2) else torch.tanh(x + W)) if bool(c1) else x - W
        return {"y": z * W}

    feeds = {"x": np.array([0.3, -1.2, 2.0], np.float32), "c1": np.array(outer), "c2": np.array(inner)}
    compare(model, feeds, ["W", "x"], ref)
    fd(model, ["W", "x"], feeds={"c1": np.array(outer), "c2": np.array(inner)})


def test_loop_inside_if_branch_and_if_inside_loop_body():
    """A Loop (3 x Mul by W) inside the then branch; an If (Mul by W or Identity) inside a Loop body."""
    body = _loop_body([helper.make_node("Mul", ["a_in", "W"], ["a_out"])], [("a_in", (3,))],
                      extra_inputs=[("a_out", (3,))])
    then = helper.make_graph([helper.make_node("Loop", ["trip", "", "x"], ["t"], body=body)], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e")])
    inner_then = helper.make_graph([helper.make_node("Mul", ["b_in", "W"], ["bt"])], "bt", [], [_vi("bt")])
    inner_else = helper.make_graph([helper.make_node("Sin", ["b_in"], ["be"])], "be", [], [_vi("be")])
    body2 = _loop_body([helper.make_node("If", ["c"], ["b_out"], then_branch=inner_then, else_branch=inner_else)],
                       [("b_in", (3,))], extra_inputs=[("b_out", (3,))])
    model = _model([helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other),
                    helper.make_node("Loop", ["trip", "", "z"], ["y"], name="loop2", body=body2)],
                   [_vi("x"), _vi("c", B, [])], [_vi("y")],
                   [_init("W", np.array([0.5, -0.7, 1.3], np.float32)), _init("trip", np.array(3, np.int64))])

    def ref(x, W, c, trip):
        import torch

        z = x * W * W * W if bool(c) else -x
        for _ in range(3):
            z = z * W if bool(c) else torch.sin(z)
        return {"y": z}

    for taken in (True, False):
        feeds = {"x": np.array([0.3, -1.2, 2.0], np.float32), "c": np.array(taken)}
        compare(model, feeds, ["W", "x"], ref)
        fd(model, ["W", "x"], feeds={"c": np.array(taken)})


# ---------------------------------------------------------------------------------------- Loop
def _loop_case(trips: int):
    """Carried (a, b), a scan output s, captures W and V, the iteration number used:
    a' = a * W + b;  b' = tanh(a) + 0.1 i;  s_i = a' * V.  Outputs: a_final, s (trips x 3); b_final unused."""
    body = _loop_body(
        [helper.make_node("Mul", ["a", "W"], ["aw"]), helper.make_node("Add", ["aw", "b"], ["a2"]),
         helper.make_node("Tanh", ["a"], ["ta"]), helper.make_node("Cast", ["i"], ["fi"], to=F),
         helper.make_node("Mul", ["fi", "k"], ["ki"]), helper.make_node("Add", ["ta", "ki"], ["b2"]),
         helper.make_node("Mul", ["a2", "V"], ["s_i"])],
        [("a", (3,)), ("b", (3,))], scans=[("s_i", (3,))], extra_inputs=[("a2", (3,)), ("b2", (3,))])
    model = _model([helper.make_node("Loop", ["trip", "", "x", "h"], ["a_final", "b_final", "s"], name="loop",
                                     body=body)],
                   [_vi("x"), _vi("h")], [_vi("a_final"), _vi("s", F, (trips, 3))],
                   [_init("trip", np.array(trips, np.int64)), _init("W", np.array([0.9, -0.6, 1.1], np.float32)),
                    _init("V", np.array([0.3, 1.2, -0.8], np.float32)), _init("k", np.array(0.1, np.float32))])

    def ref(x, h, W, V, k, trip):
        import torch

        a, b, s = x, h, []
        for i in range(trips):
            a, b = a * W + b, torch.tanh(a) + i * k
            s.append(a * V)
        return {"a_final": a, "s": torch.stack(s)}

    return model, ref


@pytest.mark.parametrize("trips", [1, 2, 3, 4, 5])
def test_loop(trips):
    model, ref = _loop_case(trips)
    feeds = {"x": np.array([0.3, -1.2, 0.7], np.float32), "h": np.array([0.1, 0.4, -0.5], np.float32)}
    wrt = ["W", "V", "k", "x", "h"] if trips > 1 else ["W", "V", "x", "h"]  # k reaches only a' of iteration 2
    gm, _, _ = compare(model, feeds, wrt, ref)
    assert "Loop" not in {n.op_type for n in gm.graph.node}
    fd(model, wrt)


@pytest.mark.parametrize("cond", ["initial_true", "body_constant_true", "outer_constant_true"])
def test_loop_with_a_condition_that_stays_true(cond):
    """A cond input that is a constant true, a body that sets its condition to a constant true (or an outer one)."""
    cond_nodes = {"initial_true": None,
                  "body_constant_true": [helper.make_node("Constant", [], ["c_out"],
                                                         value=helper.make_tensor("t", B, [], [True]))],
                  "outer_constant_true": [helper.make_node("Identity", ["always"], ["c_out"])]}[cond]
    body = _loop_body([helper.make_node("Mul", ["a", "W"], ["m"]), helper.make_node("Sin", ["m"], ["a2"])],
                      [("a", (3,))], extra_inputs=[("a2", (3,))], cond_nodes=cond_nodes)
    model = _model([helper.make_node("Loop", ["trip", "go", "x"], ["y"], body=body)], [_vi("x")], [_vi("y")],
                   [_init("trip", np.array(3, np.int64)), _init("go", np.array(True)), _init("always", np.array(True)),
                    _init("W", np.array([0.9, -0.6, 1.1], np.float32))])

    def ref(x, W, trip, go, always):
        import torch

        for _ in range(3):
            x = torch.sin(x * W)
        return {"y": x}

    compare(model, {"x": np.array([0.3, -1.2, 0.7], np.float32)}, ["W", "x"], ref)
    fd(model, ["W", "x"])


def test_loop_with_initial_condition_false_runs_no_iteration():
    body = _loop_body([helper.make_node("Mul", ["a", "W"], ["a2"])], [("a", (3,))], extra_inputs=[("a2", (3,))])
    model = _model([helper.make_node("Loop", ["trip", "stop", "x"], ["z"], body=body),
                    helper.make_node("Mul", ["z", "W"], ["y"])], [_vi("x")], [_vi("y")],
                   [_init("trip", np.array(3, np.int64)), _init("stop", np.array(False)),
                    _init("W", np.array([0.9, -0.6, 1.1], np.float32))])
    compare(model, {"x": np.array([0.3, -1.2, 0.7], np.float32)}, ["W", "x"], lambda x, W, trip, stop: {"y": x * W})
    fd(model, ["W", "x"])


def test_nested_loops():
    """A Loop (2 iterations) whose body holds a Loop (3 iterations) reading the outer W: y = x * W^6."""
    inner = _loop_body([helper.make_node("Mul", ["b", "W"], ["b2"])], [("b", (3,))], extra_inputs=[("b2", (3,))])
    outer = _loop_body([helper.make_node("Loop", ["trip3", "", "a"], ["a2"], body=inner)], [("a", (3,))],
                       extra_inputs=[("a2", (3,))])
    model = _model([helper.make_node("Loop", ["trip2", "", "x"], ["y"], body=outer)], [_vi("x")], [_vi("y")],
                   [_init("trip2", np.array(2, np.int64)), _init("trip3", np.array(3, np.int64)),
                    _init("W", np.array([0.9, -0.6, 1.1], np.float32))])
    x = np.array([0.3, -1.2, 0.7], np.float32)
    _, grads, ups = compare(model, {"x": x}, ["W", "x"], lambda x, W, trip2, trip3: {"y": x * W ** 6})
    w = np.array([0.9, -0.6, 1.1])
    np.testing.assert_allclose(grads["W"], 6 * x * w ** 5 * ups["y"], rtol=1e-5)
    fd(model, ["W", "x"])


def test_loop_off_the_path_stays_a_loop():
    """A Loop that reads only a tensor not differentiated is left as it is (not unrolled)."""
    model = loop_model()
    g = model.graph
    g.node.append(helper.make_node("Mul", ["x", "V"], ["y2"]))
    g.initializer.append(_init("V", np.full(3, 0.5, np.float32)))
    g.output.append(_vi("y2"))
    gm = onnxbp.gradient(model, ["V"])
    assert [n.op_type for n in gm.graph.node].count("Loop") == 1
    fd(model, ["V"])


# ---------------------------------------------------------------------------------------- Scan
def _scan_case(in_axis: int, in_dir: int, out_axis: int, out_dir: int):
    """h' = tanh(h * W + x_t); o_t = h' * V.  X is (3, 4) scanned along in_axis (length 3 or 4)."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["h", "W"], ["hw"]), helper.make_node("Add", ["hw", "x_t"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h2"]), helper.make_node("Mul", ["h2", "V"], ["o_t"])],
        "body", [_vi("h", F, (4 if in_axis == 0 else 3,)), _vi("x_t", F, (4 if in_axis == 0 else 3,))],
        [_vi("h2", F, (4 if in_axis == 0 else 3,)), _vi("o_t", F, (4 if in_axis == 0 else 3,))])
    n = 4 if in_axis == 0 else 3
    length = 3 if in_axis == 0 else 4
    attrs = {"num_scan_inputs": 1, "scan_input_axes": [in_axis], "scan_input_directions": [in_dir],
             "scan_output_axes": [out_axis], "scan_output_directions": [out_dir]}
    out_shape = (length, n) if out_axis == 0 else (n, length)
    model = _model([helper.make_node("Scan", ["h0", "X"], ["h_final", "O"], name="scan", body=body, **attrs)],
                   [_vi("h0", F, (n,)), _vi("X", F, (3, 4))], [_vi("h_final", F, (n,)), _vi("O", F, out_shape)],
                   [_init("W", np.linspace(-0.9, 1.1, n).astype(np.float32)),
                    _init("V", np.linspace(1.2, -0.4, n).astype(np.float32))])

    def ref(h0, X, W, V):
        import torch

        xs = list(torch.unbind(X, dim=in_axis))
        if in_dir:
            xs = xs[::-1]
        h, outs = h0, []
        for x_t in xs:
            h = torch.tanh(h * W + x_t)
            outs.append(h * V)
        if out_dir:
            outs = outs[::-1]
        return {"h_final": h, "O": torch.stack(outs, dim=out_axis)}

    return model, ref


@pytest.mark.parametrize("in_axis, in_dir, out_axis, out_dir", [
    (0, 0, 0, 0), (0, 1, 0, 0), (1, 0, 0, 0), (1, 1, 1, 0), (0, 0, 1, 1), (1, 0, -1, 1)])
def test_scan(in_axis, in_dir, out_axis, out_dir):
    model, ref = _scan_case(in_axis, in_dir, out_axis, out_dir)
    rng = np.random.default_rng(3)
    n = 4 if in_axis == 0 else 3
    feeds = {"h0": rng.standard_normal(n).astype(np.float32), "X": rng.standard_normal((3, 4)).astype(np.float32)}
    gm, _, _ = compare(model, feeds, ["W", "V", "h0", "X"], ref)
    assert "Scan" not in {n.op_type for n in gm.graph.node}
    fd(model, ["W", "V", "h0", "X"])


def test_scan_without_state_two_scan_inputs():
    """No state; A (3, 2) scanned forward on axis 0, B (2, 3) backward on axis 1: O_t = tanh(A_t * B_{2-t} * W)."""
    body = helper.make_graph([helper.make_node("Mul", ["a_t", "b_t"], ["ab"]), helper.make_node("Mul", ["ab", "W"], ["abw"]),
                              helper.make_node("Tanh", ["abw"], ["o_t"])],
                             "body", [_vi("a_t", F, (2,)), _vi("b_t", F, (2,))], [_vi("o_t", F, (2,))])
    model = _model([helper.make_node("Scan", ["A", "B"], ["O"], body=body, num_scan_inputs=2, scan_input_axes=[0, 1],
                                     scan_input_directions=[0, 1])],
                   [_vi("A", F, (3, 2)), _vi("B", F, (2, 3))], [_vi("O", F, (3, 2))],
                   [_init("W", np.array([0.7, -1.1], np.float32))])

    def ref(A, B, W):
        import torch

        return {"O": torch.stack([torch.tanh(A[t] * B[:, 2 - t] * W) for t in range(3)])}

    rng = np.random.default_rng(5)
    feeds = {"A": rng.standard_normal((3, 2)).astype(np.float32), "B": rng.standard_normal((2, 3)).astype(np.float32)}
    compare(model, feeds, ["W", "A", "B"], ref)
    fd(model, ["W", "A", "B"])


def test_scan_opset_11_spelling():
    """Split and Squeeze with attributes below opset 13."""
    model, ref = _scan_case(0, 1, 0, 0)
    model.opset_import[0].version = 11
    onnx.checker.check_model(model, full_check=True)
    feeds = {"h0": np.array([0.1, 0.2, -0.3, 0.5], np.float32), "X": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    compare(model, feeds, ["W", "h0", "X"], ref)
    fd(model, ["W", "h0", "X"])


# ---------------------------------------------------------------------------------------- refusals
def _refusal(model, wrt=None):
    with pytest.raises(onnxbp.UnsupportedOpError) as info:
        onnxbp.gradient(model, wrt)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_refused_loop_with_a_runtime_trip_count():
    model = loop_model()
    g = model.graph
    del g.initializer[0]
    g.input.append(_vi("trip", I64, []))
    assert _refusal(model, ["W2"]) == (
        "node 'loop' (op Loop) is not unrolled, and a requested gradient flows through it: its trip count M "
        f"('trip') is computed at run time, not a build-time constant; {SUPPORTED}")


def test_refused_loop_without_a_trip_count():
    body = _loop_body([helper.make_node("Mul", ["a", "W"], ["a2"])], [("a", (3,))], extra_inputs=[("a2", (3,))])
    model = _model([helper.make_node("Loop", ["", "go", "x"], ["y"], name="while", body=body)], [_vi("x"), _vi("go", B, [])],
                   [_vi("y")], [_init("W", np.full(3, 0.5, np.float32))])
    assert _refusal(model) == (
        "node 'while' (op Loop) is not unrolled, and a requested gradient flows through it: it has no trip count M "
        f"(it runs until its condition turns false); {SUPPORTED}")


def test_refused_loop_with_a_data_dependent_condition():
    cond_nodes = [helper.make_node("ReduceSum", ["a2"], ["total"], keepdims=0),
                  helper.make_node("Less", ["total", "limit"], ["c_out"])]
    body = _loop_body([helper.make_node("Mul", ["a", "W"], ["a2"])], [("a", (3,))], extra_inputs=[("a2", (3,))],
                      cond_nodes=cond_nodes)
    model = _model([helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)], [_vi("x")], [_vi("y")],
                   [_init("trip", np.array(5, np.int64)), _init("limit", np.array(10.0, np.float32)),
                    _init("W", np.full(3, 1.5, np.float32))])
    assert _refusal(model) == (
        "node 'loop' (op Loop) is not unrolled, and a requested gradient flows through it: its body computes its "
        f"condition 'c_out', so the number of iterations depends on the data; {SUPPORTED}")


def test_refused_loop_beyond_the_iteration_limit():
    model = loop_model()
    model.graph.initializer[0].CopyFrom(_init("trip", np.array(5000, np.int64)))
    assert _refusal(model, ["W2"]) == (
        "node 'loop' (op Loop) is not unrolled, and a requested gradient flows through it: its trip count 5000 "
        f"exceeds the limit of 1024 iterations; {SUPPORTED}")


def test_refused_loop_with_an_initial_condition_computed_at_run_time():
    model = loop_model()
    model.graph.node[0].input[1] = "go"
    model.graph.input.append(_vi("go", B, []))
    assert _refusal(model, ["W2"]) == (
        "node 'loop' (op Loop) is not unrolled, and a requested gradient flows through it: its initial condition "
        f"('go') is computed at run time; {SUPPORTED}")


def test_refused_scan_of_a_dynamic_length():
    model, _ = _scan_case(0, 0, 0, 0)
    model.graph.input[1].CopyFrom(_vi("X", F, ("T", 4)))
    model.graph.output[1].CopyFrom(_vi("O", F, ("T", 4)))
    assert _refusal(model, ["W"]) == (
        "node 'scan' (op Scan) is not unrolled, and a requested gradient flows through it: the length of axis 0 of "
        f"its scan input 'X' is not static ('T'); {SUPPORTED}")


def test_refused_other_subgraph_op_names_what_is_supported():
    """SequenceMap (a body, no rule): the generic control-flow refusal, naming the capture."""
    body = helper.make_graph([helper.make_node("Mul", ["e", "W"], ["e2"])], "body", [_vi("e")], [_vi("e2")])
    model = _model([helper.make_node("SequenceConstruct", ["x", "x"], ["s"]),
                    helper.make_node("SequenceMap", ["s"], ["s2"], name="map", body=body),
                    helper.make_node("ConcatFromSequence", ["s2"], ["y"], axis=0)],
                   [_vi("x")], [_vi("y", F, (6,))], [_init("W", np.full(3, 0.5, np.float32))])
    assert _refusal(model, ["W"]) == (
        "node 'map' (op SequenceMap, domain ai.onnx) has subgraphs and no gradient rule, and a requested gradient "
        "flows through it (its inputs or the outer-scope tensors its body reads: 'W'); "
        f"{SUPPORTED}; differentiating around it would be wrong: request gradients only of tensors that do not "
        "reach the outputs through it (also without rules: ConcatFromSequence)")


# ---------------------------------------------------------------------------------------- the rest
def test_control_flow_off_the_path_is_left_alone():
    """An If on another path (it reads only k) does not stop the gradient of W through y = x * W."""
    then = helper.make_graph([helper.make_node("Neg", ["k"], ["t"])], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["k"], ["e"])], "else", [], [_vi("e")])
    model = _model([helper.make_node("Mul", ["x", "W"], ["y"]),
                    helper.make_node("If", ["c"], ["z"], name="side", then_branch=then, else_branch=other)],
                   [_vi("x"), _vi("k"), _vi("c", B, [])], [_vi("y"), _vi("z")],
                   [_init("W", np.full(3, 0.5, np.float32))])
    gm = onnxbp.gradient(model, ["W", "x"])
    assert [o.name for o in gm.graph.output] == ["y", "z", "W_grad", "x_grad"]
    assert [n.op_type for n in gm.graph.node].count("If") == 1
    fd(model, ["W", "x"], feeds={"c": np.array(True)})


def test_outer_names_of_nested_subgraphs():
    """A Loop whose body holds an If reading the outer W: the Loop captures W (and what its body reads)."""
    inner_then = helper.make_graph([helper.make_node("Mul", ["a", "W"], ["t"])], "t", [], [_vi("t")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "e", [], [_vi("e")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["a"]),
         helper.make_node("If", ["flag"], ["acc_out"], then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", I64, []), _vi("c_in", B, []), _vi("acc_in")],
        [_vi("c_out", B, []), _vi("acc_out")])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)
    assert outer_names(loop) == ["flag", "W"]


def test_loop_through_its_carried_input_alone():
    """A body that reads nothing from outside: the gradient reaches the Loop through its carried input."""
    body = helper.make_graph(
        [helper.make_node("Tanh", ["acc_in"], ["acc_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", I64, []), _vi("c_in", B, []), _vi("acc_in")],
        [_vi("c_out", B, []), _vi("acc_out")])
    model = _model([helper.make_node("Mul", ["x", "W"], ["h"]),
                    helper.make_node("Loop", ["trip", "", "h"], ["y"], name="loop", body=body)], [_vi("x")], [_vi("y")],
                   [_init("trip", np.array(2, np.int64)), _init("W", np.full(3, 0.5, np.float32))])
    compare(model, {"x": np.array([0.3, -1.2, 0.7], np.float32)}, ["W", "x"],
            lambda x, W, trip: {"y": __import__("torch").tanh(__import__("torch").tanh(x * W))})
    fd(model, ["W", "x"])


def test_gradient_model_keeps_outputs_and_checks(tmp_path):
    """The contract's names, the full checker and onnxruntime: default wrt of a model with If and Loop."""
    gm = onnxbp.gradient(loop_model())
    assert [o.name for o in gm.graph.output] == ["y", "W2_grad"]
    assert [i.name for i in gm.graph.input] == ["x", "y_grad"]
    assert_standard(gm)
    gm = onnxbp.gradient(if_model())
    assert [o.name for o in gm.graph.output] == ["y", "W_grad"]
    assert_standard(gm)


def test_cli_grad_and_check(tmp_path, capsys):
    from cli.main import main

    for name, build in (("loop", loop_model), ("if", if_model)):
        src = tmp_path / f"{name}.onnx"
        onnx.save(build(), src)
        out = tmp_path / f"{name}_grad.onnx"
        assert main(["grad", str(src), "-o", str(out)]) == 0
        onnx.checker.check_model(onnx.load(out), full_check=True)
        assert main(["check", str(src), "--rtol", "1e-4"]) == 0
    assert "passed: all 1 gradients agree" in capsys.readouterr().out


def test_cli_refuses_with_one_line_and_writes_nothing(tmp_path, capsys):
    from cli.main import main

    model = loop_model()
    del model.graph.initializer[0]
    model.graph.input.append(_vi("trip", I64, []))
    src = tmp_path / "loop.onnx"
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    assert main(["grad", str(src), "-o", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node 'loop' (op Loop) is not unrolled" in err[0]
