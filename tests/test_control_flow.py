"""Control flow (If, Loop, Scan): never differentiated around as if the subgraph were not there.

A body that reads an outer-scope tensor makes the node depend on it although
the tensor is not among the node's inputs.  Such a node is not differentiated
yet, so a gradient that flows through it (through an input or a capture) is
refused with a message naming the node and the captured tensors; a gradient
that does not touch it is built as usual (checked against finite
differences, float64, rtol 1e-4).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.graphview import outer_names

F = TensorProto.FLOAT


def _vi(name, elem=F, shape=(3,)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _model(nodes, inputs, outputs, inits):
    m = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def loop_model():
    """y = x * W2^4: four iterations of a body that reads the outer W2 (not a Loop input)."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "W2"], ["acc_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("acc_in")],
        [_vi("c_out", TensorProto.BOOL, []), _vi("acc_out")])
    return _model([helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)], [_vi("x")], [_vi("y")],
                  [numpy_helper.from_array(np.array(4, np.int64), "trip"),
                   numpy_helper.from_array(np.full(3, 1.1, np.float32), "W2")])


def if_model():
    """y = If(c, x * W, x + W) * W: the branches read x and W from the outer graph."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "W"], ["t"])], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Add", ["x", "W"], ["e"])], "else", [], [_vi("e")])
    return _model([helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other),
                   helper.make_node("Mul", ["z", "W"], ["y"], name="direct")],
                  [_vi("x"), _vi("c", TensorProto.BOOL, [])], [_vi("y")],
                  [numpy_helper.from_array(np.full(3, 0.5, np.float32), "W")])


@pytest.mark.parametrize("build, wrt, node, captured", [
    (loop_model, None, "loop", "'W2'"),
    (loop_model, ["x"], "loop", "'W2'"),
    (if_model, None, "branch", "'x', 'W'"),
    (if_model, ["x"], "branch", "'x', 'W'"),
])
def test_gradient_through_control_flow_is_refused(build, wrt, node, captured):
    with pytest.raises(onnxbp.UnsupportedOpError) as info:
        onnxbp.gradient(build(), wrt)
    text = str(info.value)
    assert text.startswith(f"node '{node}' (op ")
    assert f"the outer-scope tensors its body reads: {captured}" in text
    assert "control flow is not differentiated, and differentiating around it would be wrong" in text


def test_control_flow_off_the_path_is_left_alone():
    """An If on another path (it reads only k) does not stop the gradient of W through y = x * W."""
    then = helper.make_graph([helper.make_node("Neg", ["k"], ["t"])], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["k"], ["e"])], "else", [], [_vi("e")])
    model = _model([helper.make_node("Mul", ["x", "W"], ["y"]),
                    helper.make_node("If", ["c"], ["z"], name="side", then_branch=then, else_branch=other)],
                   [_vi("x"), _vi("k"), _vi("c", TensorProto.BOOL, [])], [_vi("y"), _vi("z")],
                   [numpy_helper.from_array(np.full(3, 0.5, np.float32), "W")])
    gm = onnxbp.gradient(model, ["W", "x"])
    assert [o.name for o in gm.graph.output] == ["y", "z", "W_grad", "x_grad"]
    report = onnxbp.check_gradients(model, ["W", "x"], feeds={"c": np.array(True)}, rtol=1e-4)
    assert report.passed, report.table()


def test_outer_names_of_nested_subgraphs():
    """A Loop whose body holds an If reading the outer W: the Loop captures W (and what its body reads)."""
    inner_then = helper.make_graph([helper.make_node("Mul", ["a", "W"], ["t"])], "t", [], [_vi("t")])
    inner_else = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "e", [], [_vi("e")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["a"]),
         helper.make_node("If", ["flag"], ["acc_out"], then_branch=inner_then, else_branch=inner_else),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("acc_in")],
        [_vi("c_out", TensorProto.BOOL, []), _vi("acc_out")])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)
    assert outer_names(loop) == ["flag", "W"]


def test_cli_refuses_with_one_line_and_writes_nothing(tmp_path):
    from cli.main import main

    src = tmp_path / "loop.onnx"
    onnx.save(loop_model(), src)
    out = tmp_path / "out.onnx"
    assert main(["grad", str(src), "-o", str(out)]) == 2
    assert not out.exists()


def test_loop_through_its_carried_input_alone_is_refused_as_control_flow():
    """A body that reads nothing from outside: the gradient reaches the Loop through its carried input."""
    body = helper.make_graph(
        [helper.make_node("Tanh", ["acc_in"], ["acc_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("acc_in")],
        [_vi("c_out", TensorProto.BOOL, []), _vi("acc_out")])
    model = _model([helper.make_node("Mul", ["x", "W"], ["h"]),
                    helper.make_node("Loop", ["trip", "", "h"], ["y"], name="loop", body=body)], [_vi("x")], [_vi("y")],
                   [numpy_helper.from_array(np.array(2, np.int64), "trip"),
                    numpy_helper.from_array(np.full(3, 0.5, np.float32), "W")])
    with pytest.raises(onnxbp.UnsupportedOpError) as info:
        onnxbp.gradient(model)
    assert str(info.value).startswith("node 'loop' (op Loop, domain ai.onnx) has subgraphs and no gradient rule, "
                                      "and a requested gradient flows through it (its inputs); control flow is "
                                      "not differentiated")
