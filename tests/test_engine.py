"""The public contract of onnxbp.gradient: inputs, outputs, naming, fan-out, pruning."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxbp
from gradutil import assert_close, assert_fd, make_model, run_gradient, session

MODELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "models"


def _mlp():
    import sys

    sys.path.insert(0, str(MODELS))
    from build_models import build_mlp

    return build_mlp()


def test_outputs_inputs_and_order():
    model = _mlp()
    gm = onnxbp.gradient(model, ["fc2.weight", "x", "fc1.bias"])
    assert [o.name for o in gm.graph.output] == ["logits", "fc2.weight_grad", "x_grad", "fc1.bias_grad"]
    assert [i.name for i in gm.graph.input] == ["x", "logits_grad"]
    # Each gradient output has its parameter's shape and dtype (symbolic batch kept).
    types = {o.name: o.type.tensor_type for o in gm.graph.output}
    assert types["x_grad"].shape.dim[0].dim_param == "N"
    assert [d.dim_value for d in types["fc2.weight_grad"].shape.dim] == [10, 32]
    assert types["fc1.bias_grad"].elem_type == TensorProto.FLOAT


def test_forward_nodes_unchanged_and_input_not_modified():
    model = _mlp()
    before = model.SerializeToString()
    gm = onnxbp.gradient(model)
    assert model.SerializeToString() == before
    n = len(model.graph.node)
    for a, b in zip(model.graph.node, gm.graph.node[:n]):
        assert a.SerializeToString() == b.SerializeToString()
    assert list(model.graph.initializer) == list(gm.graph.initializer)


def test_default_wrt_is_every_float_initializer_reaching_an_output():
    model = _mlp()
    gm = onnxbp.gradient(model)
    assert [o.name for o in gm.graph.output][1:] == [
        "fc1.weight_grad", "fc1.bias_grad", "fc2.weight_grad", "fc2.bias_grad"]


def test_no_dead_nodes_and_only_needed_nodes():
    model = _mlp()
    gm = onnxbp.gradient(model, ["fc2.weight"])
    backward = gm.graph.node[len(model.graph.node):]
    # Only fc2's weight gradient is needed: nothing of fc1 or relu1 is differentiated.
    assert all(n.name.startswith("fc2/grad/") for n in backward), [n.name for n in backward]
    consumed = {i for n in gm.graph.node for i in n.input} | {o.name for o in gm.graph.output}
    for node in backward:
        assert all(o in consumed for o in node.output), f"dead node {node.name}"


def test_backward_nodes_named_after_forward_nodes_with_doc_strings():
    gm = onnxbp.gradient(_mlp())
    backward = [n for n in gm.graph.node if n.doc_string.startswith("onnxbp")]
    assert backward
    for node in backward:
        assert node.name.split("/grad")[0] in {"fc1", "fc2", "relu1", "onnxbp"}, node.name
        assert "rule" in node.doc_string or "constant" in node.doc_string or "sum" in node.doc_string
    gemm_nodes = [n for n in backward if n.name.startswith("fc1/grad")]
    assert any("onnxbp.rules.linalg.gemm_grad" in n.doc_string for n in gemm_nodes)


def test_names_never_collide_with_existing_names():
    """A model already using the names onnxbp would generate still gets unique names."""
    w = np.ones((3, 3), np.float32)
    clash = ["mm/grad/MatMul", "mm/grad/MatMul_out", "onnxbp/grad/const", "mm/grad/Transpose_out"]
    nodes = [helper.make_node("MatMul", ["X", "W"], [clash[1]], name="mm"),
             helper.make_node("Relu", [clash[1]], [clash[2]], name=clash[0]),
             helper.make_node("Identity", [clash[2]], ["Y"], name=clash[3])]
    model = make_model(nodes, [("X", np.float32, [2, 3])], [("Y", np.float32, [2, 3])], {"W": w})
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    gm, _, grads, _ = run_gradient(model, {"X": x}, ["W", "X"])
    names = [o for n in gm.graph.node for o in n.output]
    assert len(names) == len(set(names))
    node_names = [n.name for n in gm.graph.node]
    assert len(node_names) == len(set(node_names))
    assert_fd(model, ["W", "X"], feeds={"X": x}, rtol=1e-4)


def test_fan_out_sums_contributions():
    """x feeds three consumers; its gradient is the Sum of the three contributions."""
    nodes = [helper.make_node("Mul", ["X", "A"], ["m"], name="m"),
             helper.make_node("Relu", ["X"], ["r"], name="r"),
             helper.make_node("Add", ["m", "r"], ["s"], name="s"),
             helper.make_node("Add", ["s", "X"], ["Y"], name="y")]
    a = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    model = make_model(nodes, [("X", np.float32, [2, 4])], [("Y", np.float32, [2, 4])], {"A": a})
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert any(n.op_type == "Sum" and n.name.startswith("X_grad/accumulate") for n in gm.graph.node)
    ref = ups["Y"] * (a + (x > 0) + 1.0)
    assert_close(grads["X"], ref, 1e-6, 1e-7, "fan-out")


def test_several_outputs_and_an_output_consumed_downstream():
    """Y1 is an output and also feeds Y2: its gradient is Y1_grad plus the path through Y2."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm"),
             helper.make_node("Mul", ["Y1", "Y1"], ["Y2"], name="sq")]
    w = np.random.default_rng(3).standard_normal((3, 2)).astype(np.float32)
    model = make_model(nodes, [("X", np.float32, [4, 3])],
                       [("Y1", np.float32, [4, 2]), ("Y2", np.float32, [4, 2])], {"W": w})
    x = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    gm, outs, grads, ups = run_gradient(model, {"X": x}, ["W"])
    assert [i.name for i in gm.graph.input] == ["X", "Y1_grad", "Y2_grad"]
    y1 = x.astype(np.float64) @ w
    ref = x.T.astype(np.float64) @ (ups["Y1"] + 2 * y1 * ups["Y2"])
    assert_close(grads["W"], ref, 1e-5, 1e-6, "dW")
    assert_fd(model, ["W"], feeds={"X": x}, rtol=1e-4)


def test_gradient_equal_to_upstream_input_gets_an_identity():
    """Add(X, B): X' is exactly Y_grad, a graph input, so the output needs its own name."""
    b = np.zeros((2, 3), np.float32)
    model = make_model([helper.make_node("Add", ["X", "B"], ["Y"], name="add")],
                       [("X", np.float32, [2, 3])], [("Y", np.float32, [2, 3])], {"B": b})
    x = np.ones((2, 3), np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X", "B"])
    assert_close(grads["X"], ups["Y"], 0, 0, "dX")
    assert_close(grads["B"], ups["Y"], 0, 0, "dB")


def test_symbolic_batch_runs_at_several_sizes():
    model = _mlp()
    gm = onnxbp.gradient(model, ["fc1.weight", "x"])
    sess = session(gm)
    for batch in (1, 3, 17):
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, 64)).astype(np.float32)
        u = rng.standard_normal((batch, 10)).astype(np.float32)
        logits, dw, dx = sess.run(None, {"x": x, "logits_grad": u})
        assert dw.shape == (32, 64) and dx.shape == (batch, 64)
    assert_fd(model, ["fc1.weight", "x"], batch_size=5)


def test_graph_input_saliency():
    model = _mlp()
    report = onnxbp.check_gradients(model, ["x"])
    assert report.passed and report.results[0].name == "x"


def test_shape_path_stops_cleanly_when_another_path_exists():
    """W reaches Y through Mul (differentiable) and through Shape -> Reshape's shape input."""
    nodes = [helper.make_node("Shape", ["W"], ["s"], name="shape"),
             helper.make_node("Mul", ["X", "W"], ["m"], name="mul"),
             helper.make_node("Reshape", ["m", "s"], ["Y"], name="rs")]
    w = np.random.default_rng(5).standard_normal((2, 3)).astype(np.float32)
    model = make_model(nodes, [("X", np.float32, [2, 3])], [("Y", np.float32, [2, 3])], {"W": w})
    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["W"])
    assert_close(grads["W"], ups["Y"] * x, 1e-6, 1e-7, "dW")


def test_integer_side_outputs_are_ignored():
    """A model with an ArgMax prediction output beside the logits still differentiates the logits."""
    model = _mlp()
    model.graph.node.append(helper.make_node("ArgMax", ["logits"], ["pred"], name="argmax", axis=1))
    model.graph.output.append(helper.make_tensor_value_info("pred", TensorProto.INT64, ["N", 1]))
    gm = onnxbp.gradient(model)
    assert [i.name for i in gm.graph.input] == ["x", "logits_grad"]  # no pred_grad for an int output
    assert onnxbp.check_gradients(model).passed


def test_grad_suffix_option():
    gm = onnxbp.gradient(_mlp(), ["fc1.bias"], grad_suffix="__d")
    assert [o.name for o in gm.graph.output] == ["logits", "fc1.bias__d"]
    assert [i.name for i in gm.graph.input] == ["x", "logits__d"]


def test_ir3_initializers_listed_as_inputs():
    """Old model-zoo style: IR 3, initializers also listed as graph inputs."""
    w = np.random.default_rng(7).standard_normal((3, 2)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
                       [("X", np.float32, [4, 3]), ("W", np.float32, [3, 2])],
                       [("Y", np.float32, [4, 2])], {"W": w}, opset=8, ir_version=3)
    gm = onnxbp.gradient(model)
    assert [o.name for o in gm.graph.output] == ["Y", "W_grad"]
    x = np.random.default_rng(8).standard_normal((4, 3)).astype(np.float32)
    assert_fd(model, ["W"], feeds={"X": x}, rtol=1e-4)


def test_path_input_and_model_proto_give_the_same_result(tmp_path):
    model = _mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    a = onnxbp.gradient(str(path))
    b = onnxbp.gradient(model)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
