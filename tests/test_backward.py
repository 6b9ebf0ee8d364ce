"""The lower-level API, onnxbp.backward: seeds, where gradients live, naming, frozen parameters.

Numbers are compared with numpy's closed forms of the same vector-Jacobian
products (float32, rtol 1e-5) and, where stated, with onnxbp.gradient.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp import metadata
from onnxbp.testing import assert_standard, session

RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 4)).astype(np.float32)
W = RNG.standard_normal((4, 5)).astype(np.float32)
B = RNG.standard_normal((5,)).astype(np.float32)


def _loss_model() -> onnx.ModelProto:
    """h = x @ W + b;  y = tanh(h);  loss = sum(y * y) (a scalar)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "b"], ["h"], name="add"),
        helper.make_node("Tanh", ["h"], ["y"], name="tanh"),
        helper.make_node("Mul", ["y", "y"], ["sq"], name="sq"),
        helper.make_node("ReduceSum", ["sq"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "loss", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(bw: onnxbp.Backward, feeds: dict, names) -> list:
    """Run the backward model (checked by backward itself) with ``names`` as outputs."""
    assert_standard(bw.model)
    m = onnx.ModelProto()
    m.CopyFrom(bw.model)
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return session(m).run(list(names), feeds)


def _reference(seed_y=None, seed_loss=1.0, seed_h=None):
    """d/dW, d/db, d/dx of  seed_loss*loss + <seed_y, y> + <seed_h, h>."""
    h = X @ W + B
    y = np.tanh(h)
    dy = 2 * y * seed_loss + (0 if seed_y is None else seed_y)
    dh = dy * (1 - y * y) + (0 if seed_h is None else seed_h)
    return {"W": X.T @ dh, "b": dh.sum(0), "x": dh @ W.T}


def _close(got, want, what):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)


def test_scalar_loss_seed_is_one():
    bw = onnxbp.backward(_loss_model(), ["W", "b", "x"], seeds=["loss"])
    assert list(bw.gradients) == ["W", "b", "x"]
    assert bw.seed_inputs == [] and [i.name for i in bw.model.graph.input] == ["x"]
    # No output is spliced in: the forward outputs are all there is.
    assert [o.name for o in bw.model.graph.output] == ["loss", "y"]
    got = _run(bw, {"x": X}, list(bw.gradients.values()))
    ref = _reference()
    for (p, _), g in zip(bw.gradients.items(), got):
        _close(g, ref[p], p)


def test_seed_constant_fill_scales():
    two = onnxbp.backward(_loss_model(), ["W"], seeds={"loss": 2.5})
    got = _run(two, {"x": X}, [two.gradients["W"]])[0]
    _close(got, _reference(seed_loss=2.5)["W"], "W")


def test_seed_new_input_on_an_intermediate_tensor():
    bw = onnxbp.backward(_loss_model(), ["W", "x"], seeds={"h": "h_seed"})
    assert bw.seed_inputs == ["h_seed"] and bw.seeds == {"h": "h_seed"}
    vi = next(i for i in bw.model.graph.input if i.name == "h_seed")
    assert vi.type.tensor_type.elem_type == TensorProto.FLOAT
    s = RNG.standard_normal((3, 5)).astype(np.float32)
    got = _run(bw, {"x": X, "h_seed": s}, [bw.gradients["W"], bw.gradients["x"]])
    ref = _reference(seed_loss=0.0, seed_h=s)
    _close(got[0], ref["W"], "W")
    _close(got[1], ref["x"], "x")


def test_seeds_on_two_tensors_add_up_and_existing_tensor_as_seed():
    # y is seeded with the forward tensor y itself: d/dp of loss + <y, y> (= 2 * loss).
    bw = onnxbp.backward(_loss_model(), ["b"], seeds={"loss": 1.0, "y": "y"})
    got = _run(bw, {"x": X}, [bw.gradients["b"]])[0]
    y = np.tanh(X @ W + B)
    _close(got, _reference(seed_y=y)["b"], "b")


def test_default_seeds_match_gradient():
    model = _loss_model()
    bw = onnxbp.backward(model)
    assert bw.seed_inputs == ["loss_grad", "y_grad"]
    gm = onnxbp.gradient(model)
    feeds = {"x": X, "loss_grad": np.array(0.7, np.float32), "y_grad": RNG.standard_normal((3, 5)).astype(np.float32)}
    ours = _run(bw, feeds, [bw.gradients["W"], bw.gradients["b"]])
    theirs = session(gm).run(["W_grad", "b_grad"], feeds)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_grad_names_rename_or_identity():
    bw = onnxbp.backward(_loss_model(), ["W", "b"], seeds=["loss"], grad_names={"W": "dW", "b": "db"})
    assert bw.gradients == {"W": "dW", "b": "db"}
    produced = {o for n in bw.model.graph.node for o in n.output}
    assert {"dW", "db"} <= produced
    bw2 = onnxbp.backward(_loss_model(), ["W"], seeds=["loss"], grad_names=lambda p: f"d_{p}")
    assert bw2.gradients == {"W": "d_W"}


def test_frozen_and_errors():
    bw = onnxbp.backward(_loss_model(), seeds=["loss"], frozen=["W"])
    assert list(bw.gradients) == ["b"]
    cases = [
        (dict(wrt=["W"], seeds=["loss"], frozen=["W"]), onnxbp.WrtError, "wrt names 'W', which is frozen"),
        (dict(seeds=["nope"]), onnxbp.WrtError, "seed tensor 'nope' is not a tensor of the graph"),
        (dict(seeds={"loss": [1.0]}), onnxbp.WrtError, "the seed of 'loss' is [1.0]; give a number or a tensor name"),
        (dict(wrt=["W"], seeds=["loss"], grad_names={"W": "x"}), onnxbp.NameCollisionError,
         "the model already has a tensor or node named 'x', the name of the gradient output for 'W'"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error) as info:
            onnxbp.backward(_loss_model(), **kwargs)
        assert text in str(info.value)


def test_input_never_modified_unless_inplace():
    model = _loss_model()
    before = model.SerializeToString()
    onnxbp.backward(model, seeds=["loss"])
    assert model.SerializeToString() == before
    bw = onnxbp.backward(model, seeds=["loss"], inplace=True)
    assert bw.model is model and len(model.graph.node) > 5


def test_shared_input_of_a_later_product():
    """``h = x + pos; y = h * x`` w.r.t. x and pos: one gradient feeds the other's Sum (fan-out)."""
    nodes = [helper.make_node("Add", ["x", "pos"], ["h"]), helper.make_node("Mul", ["h", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3])
                                           for n in ("x", "pos")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gm = onnxbp.gradient(model, ["x", "pos"])
    x, pos, dy = (RNG.standard_normal(3).astype(np.float32) for _ in range(3))
    gx, gp = session(gm).run(["x_grad", "pos_grad"], {"x": x, "pos": pos, "y_grad": dy})
    _close(gx, dy * (2 * x + pos), "x")
    _close(gp, dy * x, "pos")


def test_gradient_names_survive_dropped_metadata():
    """A rewriting tool (an onnx-graphsurgeon round trip) may drop metadata_props: names fall back to the contract."""
    gm = onnxbp.gradient(_loss_model(), ["W", "x"])
    assert metadata.gradient_names(gm) == {"W": "W_grad", "x": "x_grad"}
    del gm.metadata_props[:]
    assert metadata.gradient_names(gm) == {"W": "W_grad", "x": "x_grad"}
    with pytest.raises(onnxbp.OnnxbpError, match="no onnxbp.gradients metadata and no output named <input>_grad"):
        metadata.gradient_names(_loss_model())


@pytest.mark.parametrize("ir_version", [3, 4])
def test_int_constants_below_opset_9_are_initializers(ir_version):
    """Constant-1 (opsets < 9) holds only float tensors: Tile's backward needs int64 shapes, written as
    initializers (listed as graph inputs too where IR < 4 requires it).  FD float64, rtol 1e-4."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["X", "r"], ["Y"])], "tile",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])]
        + ([helper.make_tensor_value_info("r", TensorProto.INT64, [2])] if ir_version < 4 else []),
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(np.array([2, 1], np.int64), "r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = ir_version
    gm = onnxbp.gradient(model, ["X"])
    assert not any(n.op_type == "Constant" and n.attribute[0].t.data_type == TensorProto.INT64
                   for n in gm.graph.node)
    added = [t.name for t in gm.graph.initializer if t.name != "r"]
    assert added and all(n.startswith("onnxbp/grad/const") for n in added)
    assert set(added) <= {i.name for i in gm.graph.input} if ir_version < 4 else \
        not set(added) & {i.name for i in gm.graph.input}
    report = onnxbp.check_gradients(model, ["X"], rtol=1e-4)
    assert report.passed, report.table()


def test_output_that_is_a_differentiated_input_names_the_real_clash_and_the_fix_works():
    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    model = helper.make_model(helper.make_graph([], "id", [vi], [vi]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnxbp.NameCollisionError) as info:
        onnxbp.gradient(model, ["x"], grad_suffix="_g")
    assert str(info.value) == (
        "the gradient output for 'x' and the upstream-gradient input for output 'x' would both be named 'x_g' "
        "('x' is differentiated and is also a graph output, so every suffix gives both the same name); give the "
        "output its own name (an Identity node) or leave 'x' out of wrt")
    fixed = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [vi],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    gm = onnxbp.gradient(fixed, ["x"])
    dy = RNG.standard_normal(3).astype(np.float32)
    np.testing.assert_array_equal(session(gm).run(["x_grad"], {"x": dy * 0, "y_grad": dy})[0], dy)
