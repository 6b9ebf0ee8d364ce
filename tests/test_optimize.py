"""optimize.eliminate_common_subexpressions: identical nodes computed once, values unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxbp.modelio import cpu_session
from onnxbp.optimize import eliminate_common_subexpressions


def _model(nodes, outputs, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2, 3]) for o in outputs],
                          list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32),
                                                                                  "t_" + name))


def _run(m, x):
    return cpu_session(m).run(None, {"X": x})


def test_duplicates_across_differently_named_constants_merge_and_values_stay():
    nodes = [_const("a", 2.0), helper.make_node("Mul", ["X", "a"], ["m1"]), helper.make_node("Exp", ["m1"], ["e1"]),
             _const("b", 2.0), helper.make_node("Mul", ["X", "b"], ["m2"]), helper.make_node("Exp", ["m2"], ["e2"]),
             helper.make_node("Add", ["e1", "e2"], ["Y"]),
             _const("c", 3.0), helper.make_node("Mul", ["X", "c"], ["Z"])]
    m = _model(nodes, ["Y", "Z"])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    before = _run(m, x)
    assert eliminate_common_subexpressions(m.graph) == 3  # b, m2, e2
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["Constant", "Mul", "Exp", "Add", "Constant", "Mul"]
    assert list(m.graph.node[3].input) == ["e1", "e1"]
    after = _run(m, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike", "Dropout"])
def test_random_ops_are_never_merged(op):
    attrs = {"seed": 1.0} if op.startswith("Random") else {}
    ins = ["X"] if op.startswith("Random") else ["X", "r", "t"]
    extra = [] if op.startswith("Random") else [
        helper.make_node("Constant", [], ["r"], value=numpy_helper.from_array(np.asarray(0.5, np.float32))),
        helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.asarray(True)))]
    nodes = extra + [helper.make_node(op, ins, ["r1"], **attrs), helper.make_node(op, ins, ["r2"], **attrs),
                     helper.make_node("Sub", ["r1", "r2"], ["Y"])]
    m = _model(nodes, ["Y"])
    assert eliminate_common_subexpressions(m.graph) == 0


def test_graph_outputs_and_different_attributes_are_kept():
    nodes = [helper.make_node("Relu", ["X"], ["Y1"]), helper.make_node("Relu", ["X"], ["Y2"]),
             helper.make_node("LeakyRelu", ["X"], ["L1"], alpha=0.1),
             helper.make_node("LeakyRelu", ["X"], ["L2"], alpha=0.2),
             helper.make_node("Add", ["L1", "L2"], ["Y3"])]
    m = _model(nodes, ["Y1", "Y2", "Y3"])
    assert eliminate_common_subexpressions(m.graph) == 0
    assert len(m.graph.node) == 5


def test_training_step_computes_batch_statistics_once():
    """The BatchNormalization backward and the running-statistics stage share mean/centred/variance."""
    from onnxbp.testing.models import make_model
    from onnxbp.training import SGD
    from onnxbp.training.step import build_step_model

    rng = np.random.default_rng(0)
    c = 4
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["h", "g", "b", "rm", "rv"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    m = make_model(nodes, [("x", np.float32, ["N", 2, 6, 6])], [("logits", np.float32, ["N", c])],
                   {"w": rng.standard_normal((c, 2, 3, 3)).astype(np.float32), "g": np.ones(c, np.float32),
                    "b": np.zeros(c, np.float32), "rm": np.zeros(c, np.float32), "rv": np.ones(c, np.float32)})
    sm = build_step_model(m, optimizer=SGD(momentum=0.9))
    ops = [n.op_type for n in sm.model.graph.node]
    modes = sorted(next((a.i for a in n.attribute if a.name == "training_mode"), 0)
                   for n in sm.model.graph.node if n.op_type == "BatchNormalization")
    assert modes == [0, 1]  # the forward, and the backward's affine map of X (rules/norm.py)
    # batch mean and variance once each (the backward and the running-statistics stage share them)
    assert ops.count("ReduceMean") == 1 and ops.count("ReduceSumSquare") == 1 and ops.count("Size") == 2


# ---------------------------------------------------------------- match_scalar_ranks
def _scalar_model():
    """W [6, 4, 1, 1] times a constant scalar, plus a rank-0 graph input; a (2, 3) tensor times the same
    constant (its last dim is not 1: left alone)."""
    nodes = [_const("s", 0.9),
             helper.make_node("Mul", ["W", "s"], ["a"]),
             helper.make_node("Add", ["a", "lr"], ["b"]),
             helper.make_node("Sub", ["lr", "b"], ["c"]),         # the scalar first: the same Reshape
             helper.make_node("Mul", ["X", "s"], ["d"]),
             helper.make_node("Mul", ["k", "W"], ["e"])]          # a one-element initializer of rank 1
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [6, 4, 1, 1]),
                                       helper.make_tensor_value_info("lr", onnx.TensorProto.FLOAT, []),
                                       helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, d)
                           for o, d in (("c", [6, 4, 1, 1]), ("d", [2, 3]), ("e", [6, 4, 1, 1]))],
                          [numpy_helper.from_array(np.array([2.0], np.float32), "k")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def test_match_scalar_ranks_reshapes_the_scalars_of_trailing_one_tensors_only():
    from onnxbp.optimize import match_scalar_ranks
    from onnxbp.shapeinfo import infer

    m = _scalar_model()
    rng = np.random.default_rng(0)
    feeds = {"W": rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "lr": np.array(0.25, np.float32),
             "X": rng.standard_normal((2, 3)).astype(np.float32)}
    before = cpu_session(m).run(None, feeds)
    ranked = onnx.ModelProto()
    ranked.CopyFrom(m)
    assert match_scalar_ranks(ranked, infer(ranked)) == 4  # s, lr twice (one Reshape), k; not X * s
    onnx.checker.check_model(ranked, full_check=True)
    after = cpu_session(ranked).run(None, feeds)
    for a, b in zip(before, after):
        assert a.shape == b.shape and np.array_equal(a, b)
    infos = infer(ranked)
    by_out = {n.output[0]: n for n in ranked.graph.node}
    for out in ("a", "b", "c", "e"):
        assert all(len(infos[i].shape) == 4 for i in by_out[out].input), out
    assert list(by_out["d"].input) == ["X", "s"]
    assert [n.op_type for n in ranked.graph.node].count("Reshape") == 1  # lr's, shared by b and c
    assert len(m.graph.node) == 6  # the input model is untouched (the pass works on the copy)


def test_training_step_has_no_rank_zero_scalar_on_a_one_by_one_weight():
    """The SGD update of a 1x1-conv weight reads rank-4 scalars (no flat-view Reshapes)."""
    from onnxbp.shapeinfo import infer
    from onnxbp.testing.models import make_model
    from onnxbp.training import SGD
    from onnxbp.training.step import build_step_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["h"], ["p"]),
             helper.make_node("Flatten", ["p"], ["logits"])]
    m = make_model(nodes, [("x", np.float32, [4, 3, 5, 5])], [("logits", np.float32, [4, 6])],
                   {"w": rng.standard_normal((6, 3, 1, 1)).astype(np.float32)})
    sm = build_step_model(m, optimizer=SGD(momentum=0.9))
    infos = infer(sm.model)
    reads_w = [n for n in sm.model.graph.node if n.op_type in ("Mul", "Add") and n.name.startswith("train/sgd")]
    assert reads_w and all(len(infos[i].shape) == 4 for n in reads_w for i in n.input)
    assert not [n for n in sm.model.graph.node if n.op_type == "Reshape" and n.name.startswith("train/")]
