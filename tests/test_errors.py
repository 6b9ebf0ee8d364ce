"""Bad input gets one clear line naming what is wrong and what is supported; nothing is lost."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbp
from gradutil import make_model


def _mm(extra_nodes=(), extra_inputs=(), out="Y", out_type=np.float32, out_shape=(2, 2), domains=()):
    w = np.ones((3, 2), np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"), *extra_nodes]
    model = make_model(nodes, [("X", np.float32, [2, 3]), *extra_inputs],
                       [(out, out_type, list(out_shape))], {"W": w}, check=False)
    for d in domains:
        model.opset_import.append(helper.make_opsetid(d, 1))
    onnx.checker.check_model(model)
    return model


def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_op_without_rule_names_node_op_domain_and_how_to_register():
    node = helper.make_node("Softsign2", ["Y"], ["Z"], name="custom_act", domain="my.ops")
    model = _mm([node], out="Z", domains=["my.ops"])
    with pytest.raises(onnxbp.UnsupportedOpError) as exc:
        onnxbp.gradient(model)
    text = _one_line(exc)
    assert "'custom_act'" in text and "Softsign2" in text and "my.ops" in text
    assert "register_gradient('Softsign2', domain='my.ops')" in text and "onnxbp ops" in text


def test_wrt_not_in_graph():
    with pytest.raises(onnxbp.WrtError) as exc:
        onnxbp.gradient(_mm(), ["nope"])
    assert "'nope' is not an initializer or graph input" in _one_line(exc)
    assert "no such tensor" in str(exc.value)


def test_wrt_intermediate_tensor():
    model = _mm([helper.make_node("Relu", ["Y"], ["Z"], name="r")], out="Z")
    with pytest.raises(onnxbp.WrtError) as exc:
        onnxbp.gradient(model, ["Y"])
    assert "intermediate tensor" in _one_line(exc)


def test_wrt_integer_tensor():
    node = helper.make_node("Cast", ["I"], ["If"], name="cast", to=TensorProto.FLOAT)
    add = helper.make_node("Add", ["Y", "If"], ["Z"], name="add")
    model = _mm([node, add], extra_inputs=[("I", np.int64, [2, 2])], out="Z")
    with pytest.raises(onnxbp.WrtError) as exc:
        onnxbp.gradient(model, ["I"])
    text = _one_line(exc)
    assert "'I' has type INT64" in text and "floating-point" in text


def test_gradient_only_through_argmax_raises():
    nodes = [helper.make_node("ArgMax", ["Y"], ["idx"], name="argmax", axis=1),
             helper.make_node("Cast", ["idx"], ["Z"], name="cast", to=TensorProto.FLOAT)]
    model = _mm(nodes, out="Z", out_shape=(2, 1))
    with pytest.raises(onnxbp.NotDifferentiableError) as exc:
        onnxbp.gradient(model, ["W"])
    text = _one_line(exc)
    assert "no gradient of 'W' reaches the outputs" in text and "'argmax' (ArgMax) is not differentiable" in text


def test_gradient_only_through_shape_raises():
    nodes = [helper.make_node("Shape", ["Y"], ["s"], name="shape_of_y"),
             helper.make_node("Cast", ["s"], ["Z"], name="cast", to=TensorProto.FLOAT)]
    model = _mm(nodes, out="Z", out_shape=(2,))
    with pytest.raises(onnxbp.NotDifferentiableError) as exc:
        onnxbp.gradient(model, ["W"])
    assert "'shape_of_y' (Shape) passes no gradient" in _one_line(exc)


def test_gradient_only_through_a_piecewise_constant_op_raises():
    """Floor passes no gradient (zero, as in torch): a parameter reaching the outputs only through it
    has no gradient path, reported like Shape's."""
    model = _mm([helper.make_node("Floor", ["Y"], ["Z"], name="floor")], out="Z")
    with pytest.raises(onnxbp.NotDifferentiableError) as exc:
        onnxbp.gradient(model, ["W"])
    text = _one_line(exc)
    assert "no gradient of 'W' reaches the outputs" in text and "'floor' (Floor) passes no gradient" in text


def test_unused_parameter_explicitly_requested():
    model = _mm()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    with pytest.raises(onnxbp.NotDifferentiableError) as exc:
        onnxbp.gradient(model, ["unused"])
    assert "'unused' is not used by any node" in _one_line(exc)
    # ...but the default wrt simply leaves it out.
    gm = onnxbp.gradient(model)
    assert [o.name for o in gm.graph.output] == ["Y", "W_grad"]


def test_not_onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe at all")
    with pytest.raises(onnxbp.ModelLoadError) as exc:
        onnxbp.gradient(str(path))
    assert str(path) in _one_line(exc) and "not an ONNX model" in str(exc.value)


def test_truncated_file(tmp_path):
    data = _mm().SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnxbp.ModelLoadError) as exc:
        onnxbp.gradient(str(path))
    assert "trunc.onnx" in _one_line(exc)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(onnxbp.ModelLoadError, match="no such file"):
        onnxbp.gradient(str(tmp_path / "missing.onnx"))
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(onnxbp.ModelLoadError, match="is empty"):
        onnxbp.gradient(str(tmp_path / "empty.onnx"))


def test_model_failing_the_checker():
    model = _mm()
    model.graph.node[0].input[1] = "undefined_tensor"
    with pytest.raises(onnxbp.ModelLoadError) as exc:
        onnxbp.gradient(model)
    text = _one_line(exc)
    assert "fails the ONNX checker" in text and "undefined_tensor" in text


def test_unknown_rank_names_the_tensor():
    """MatMul needs ranks; a Reshape to a runtime shape of unknown length leaves the rank unknown."""
    w = np.ones((3, 2), np.float32)
    nodes = [helper.make_node("Reshape", ["X", "S"], ["R"], name="rs"),
             helper.make_node("MatMul", ["R", "W"], ["Y"], name="mm")]
    model = make_model(nodes, [("X", np.float32, [2, 3]), ("S", np.int64, ["r"])],
                       [("Y", np.float32, ["a", "b"])], {"W": w})
    with pytest.raises(onnxbp.ShapeError) as exc:
        onnxbp.gradient(model, ["W"])
    text = _one_line(exc)
    assert "'R'" in text and "unknown" in text and "'mm'" in text


def test_output_path_equal_to_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_mm(), str(path))
    before = path.read_bytes()
    gm = onnxbp.gradient(str(path))
    with pytest.raises(onnxbp.OutputPathError) as exc:
        onnxbp.save_model_atomic(gm, str(path), source=str(path))
    assert "is the input model" in _one_line(exc)
    assert path.read_bytes() == before


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    gm = onnxbp.gradient(_mm())
    out = tmp_path / "out.onnx"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        onnxbp.save_model_atomic(gm, str(out))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_option_and_bad_value():
    with pytest.raises(onnxbp.OptionError) as exc:
        onnxbp.gradient(_mm(), bogus_option=1)
    assert "unknown option 'bogus_option'" in _one_line(exc)


def test_name_collision_with_contract_names():
    model = _mm([helper.make_node("Relu", ["Y"], ["W_grad"], name="r")], out="W_grad")
    with pytest.raises(onnxbp.NameCollisionError) as exc:
        onnxbp.gradient(model, ["W"])
    assert "'W_grad'" in _one_line(exc) and "grad_suffix" in str(exc.value)
    gm = onnxbp.gradient(model, ["W"], grad_suffix="_d")
    assert [o.name for o in gm.graph.output] == ["W_grad", "W_d"]


def test_saved_model_gets_the_usual_file_mode(tmp_path):
    out = tmp_path / "g.onnx"
    onnxbp.save_model_atomic(onnxbp.gradient(_mm()), str(out))
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~mask)


def _onnxruntime_refuses(kind):
    vi = lambda n, s=(2, 3): helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))  # noqa: E731
    if kind == "gemm6":  # onnx's checker passes; onnxruntime has no Gemm kernel before opset 7
        inits = [onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "W"),
                 onnx.numpy_helper.from_array(np.ones(4, np.float32), "C")]
        graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "C"], ["y"])], "g", [vi("x")],
                                  [vi("y", (2, 4))], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    if kind == "duplicate":
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["a"], name="n"),
                                   helper.make_node("Neg", ["a"], ["y"], name="n")], "g", [vi("x")], [vi("y")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x")], [vi("y")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)])


@pytest.mark.parametrize("kind, api_text, cli_text", [
    ("gemm6", None, "cannot load it: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation "
                    "for Gemm(6)"),
    ("duplicate", "2 nodes are named 'n'; onnxruntime refuses duplicate node names",
     "2 nodes are named 'n'; onnxruntime refuses duplicate node names"),
    ("opset99", "default opset 99 is newer than any this onnx knows",
     "default opset 99 is newer than any this onnx knows (1.."),
])
def test_models_onnxruntime_cannot_load_are_refused_up_front(tmp_path, capsys, kind, api_text, cli_text):
    from cli.main import main

    model = _onnxruntime_refuses(kind)
    onnx.checker.check_model(model, full_check=True)  # onnx itself accepts every one of them
    if api_text:
        with pytest.raises(onnxbp.ModelLoadError, match=__import__("re").escape(api_text)):
            onnxbp.gradient(model, ["x"])
    src, out = tmp_path / f"{kind}.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert main(["grad", str(src), "-o", str(out), "--wrt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and cli_text in err and not out.exists()


# ----------------------------------------------------- checks on a skeleton
def _big_weight_model():
    """A MatMul whose 64x32 weight is large enough for modelio.skeleton to take its data out."""
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000
    return make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
                      [("X", np.float32, [2, 64])], [("Y", np.float32, [2, 32])], {"W": w})


def test_skeleton_takes_out_large_weights_only_and_leaves_the_model_alone():
    from onnxbp.modelio import skeleton
    model = _big_weight_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "small"))
    before = model.SerializeToString()
    sk = skeleton(model)
    assert model.SerializeToString() == before
    assert [t.name for t in sk.graph.initializer] == ["small"]
    w_in = next(i for i in sk.graph.input if i.name == "W")
    assert [d.dim_value for d in w_in.type.tensor_type.shape.dim] == [64, 32]
    assert onnx.ModelProto.ByteSize(sk) < 1000 < onnx.ModelProto.ByteSize(model) // 8
    # the gradient of the full model is unchanged by checking on skeletons
    g = onnxbp.gradient(model, ["W"])
    assert [t.name for t in g.graph.initializer if t.name == "W"] == ["W"]
    assert len(onnx.numpy_helper.to_array(next(t for t in g.graph.initializer if t.name == "W"))) == 64


@pytest.mark.parametrize("damage, expected", [
    ("short_raw", "TensorProto (tensor name: W) raw_data size (8000 bytes) is too small for the declared shape "
                  "and type (8192 bytes required)."),
    ("short_float", "TensorProto (tensor name: W) float_data size (10) is too small for the declared shape "
                    "(2048 values required)."),
    ("two_fields", "TensorProto (tensor name: W) should hold its values in exactly one of raw_data and "
                   "float_data; it has raw_data, float_data"),
])
def test_large_weights_taken_out_of_the_checker_are_still_checked(damage, expected):
    model = _big_weight_model()
    w = model.graph.initializer[0]
    if damage == "short_raw":
        w.raw_data = w.raw_data[:8000]
    elif damage == "short_float":
        w.ClearField("raw_data")
        w.float_data.extend([1.0] * 10)
    else:
        w.float_data.extend([1.0] * 2048)
    with pytest.raises(onnxbp.ModelLoadError) as exc:
        onnxbp.gradient(model)
    assert _one_line(exc) == f"the model fails the ONNX checker: {expected}"
