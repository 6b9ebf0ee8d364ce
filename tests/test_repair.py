"""Load-time repairs (onnxbp/repair.py): graph outputs declared without a type or shape.

onnx 1.23's checker refuses such outputs although onnxruntime runs the model;
load_model fills them from shape inference on its private copy (one info log
line names them) and the gradient model is built as for any other.  The
ceil_mode pooling repair is tested with the pooling rules
(tests/test_pool_grad.py: test_ceil_mode_*).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from gradutil import assert_fd, session
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.errors import ModelLoadError

ROOT = Path(__file__).resolve().parent.parent


def _untyped_model(kind: str = "none") -> onnx.ModelProto:
    """Gemm -> Relu with a symbolic batch; output 'Y' declared without a type ('none'), with an
    element type but no shape ('elem'), or with a shape but no element type ('noelem')."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Gemm", ["X", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"]),
             helper.make_node("ReduceSum", ["H"], ["S"], keepdims=0)]
    y = onnx.ValueInfoProto(name="Y", doc_string="declared by hand")
    if kind == "elem":
        y.type.tensor_type.elem_type = TensorProto.FLOAT
    elif kind == "noelem":
        y.type.tensor_type.shape.dim.add().dim_param = "N"
        y.type.tensor_type.shape.dim.add().dim_value = 3
    s = onnx.ValueInfoProto(name="S")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                              [y, s], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("kind", ["none", "elem", "noelem"])
def test_outputs_without_type_are_filled(kind, caplog):
    m = _untyped_model(kind)
    before = m.SerializeToString()
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)  # what onnx says of the model as given
    with caplog.at_level(logging.INFO, logger="onnxbp.repair"):
        gm = onnxbp.gradient(m, ["W"])
    assert m.SerializeToString() == before  # the caller's model is untouched
    lines = [r.getMessage() for r in caplog.records if r.name == "onnxbp.repair"]
    assert len(lines) == 1 and "filled from shape inference: 'Y', 'S'" in lines[0]
    declared = {o.name: (o.type.tensor_type.elem_type,
                         [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]) for o in gm.graph.output}
    assert declared["Y"] == (TensorProto.FLOAT, ["N", 3])
    assert declared["S"] == (TensorProto.FLOAT, [])
    assert next(o for o in gm.graph.output if o.name == "Y").doc_string == "declared by hand"
    onnx.checker.check_model(gm, full_check=True)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    y_seed = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    y, s, dw = session(gm).run(["Y", "S", "W_grad"], {"X": x, "Y_grad": y_seed, "S_grad": np.array(0.5, np.float32)})
    w = numpy_helper.to_array(m.graph.initializer[0])
    h = x @ w
    np.testing.assert_allclose(y, np.maximum(h, 0), rtol=1e-5)
    np.testing.assert_allclose(dw, x.T @ (y_seed * (h > 0) + 0.5), rtol=1e-4, atol=1e-5)
    loaded = onnxbp.load_model(m)
    assert_fd(loaded, ["W"], feeds={"X": x})


def test_output_of_unknown_rank_is_refused():
    """Shape inference cannot tell the rank of a Reshape to a runtime shape: say which output."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["X", "shape"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, ["R"])],
        [onnx.ValueInfoProto(name="Y")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(ModelLoadError, match=r"^the model: output 'Y' is declared without a shape and shape "
                                             r"inference cannot tell its rank; declare its shape"):
        onnxbp.gradient(m, ["X"])


def test_cli_fills_untyped_outputs(tmp_path):
    src = tmp_path / "untyped.onnx"
    onnx.save(_untyped_model(), str(src))
    out = tmp_path / "g.onnx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run = subprocess.run([sys.executable, "-m", "onnxbp", "-v", "grad", str(src), "-o", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "INFO onnxbp.repair: 'untyped.onnx': outputs declared without a type or shape, filled from shape " \
           "inference: 'Y', 'S'" in run.stderr.replace(str(src), "untyped.onnx")
    gm = onnx.load(str(out))
    onnx.checker.check_model(gm, full_check=True)
    assert [o.name for o in gm.graph.output] == ["Y", "S", "W_grad"]
    assert not onnx.load(str(src)).graph.output[0].HasField("type")  # the input file is untouched
