"""The graph-writing layer: names, constants, scopes, the opset-aware spellings, renaming and pruning."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxbp.errors import InternalError, UnsupportedAttributeError
from onnxbp.naming import NameAuthority
from onnxbp.testing import session
from onnxbp.types import TensorInfo
from onnxbp.writer import GraphWriter


def _writer(opset: int, names=("x",)) -> GraphWriter:
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in names], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return GraphWriter(NameAuthority(model), opset, {n: TensorInfo(TensorProto.FLOAT, (2, 3)) for n in names},
                       prefix="t", doc="test")


def _run(w: GraphWriter, opset: int, out: str, x: np.ndarray) -> np.ndarray:
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    w.flush_into(model.graph, model.ir_version)
    return session(model).run([out], {"x": x})[0]


@pytest.mark.parametrize("opset", [7, 11, 13, 17, 18])
def test_opset_spellings_compute_the_same(opset):
    """reduce_sum/reduce_mean/squeeze/unsqueeze/pad/slice write each opset's form; same numbers at every opset."""
    w = _writer(opset)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = w.unsqueeze(w.reduce_sum("x", [1], keepdims=False), [1])           # (2, 1): row sums
    y = w.op("Add", y, w.squeeze(w.reduce_mean("x", [0], keepdims=True), [0]))  # + column means (3,)
    y = w.pad(y, [0, 1, 0, 0], 5.0, like="x")                             # (2, 4), a 5 column first
    y = w.slice(y, [0], [3], [1])                                         # (2, 3)
    out = _run(w, opset, y, x)
    ref = np.pad(x.sum(1, keepdims=True) + x.mean(0), [(0, 0), (1, 0)], constant_values=5.0)[:, :3]
    np.testing.assert_array_equal(out, ref)


def test_constants_deduplicated_scopes_share_state_and_memo():
    w = _writer(17)
    a, b = w.const(1.5, like="x"), w.scoped("other").const(1.5, like="x")
    assert a == b and w.const(1.5, dtype=np.float64) != a
    assert w.ints([1, 2]) == w.ints([1, 2])
    node = w.scoped("block/grad", "doc here").op("Relu", "x")
    assert w.nodes[-1].name == "block/grad/Relu" and w.nodes[-1].doc_string == "doc here"
    assert node == "block/grad/Relu_out" and w.dtype(node) == TensorProto.FLOAT
    calls = []
    assert w.memo("k", lambda: calls.append(1) or "v") == "v" == w.memo("k", lambda: calls.append(1) or "w")
    assert calls == [1]
    assert w.dtype(w.op("Shape", "x")) == TensorProto.INT64 and w.dtype(w.op("Equal", "x", "x")) == TensorProto.BOOL
    assert w.cast("x", TensorProto.FLOAT) == "x"


def test_rename_prune_and_errors():
    w = _writer(17)
    r = w.op("Relu", "x")
    dead = w.op("Neg", "x")
    s = w.op("Sigmoid", r)
    w.rename_tensors({r: "relu_y"})
    assert [n.input[0] for n in w.nodes if n.op_type == "Sigmoid"] == ["relu_y"]
    assert w.prune([s]) == 1 and all(dead not in n.output for n in w.nodes)
    with pytest.raises(InternalError, match="no written node outputs it"):
        w.rename_output("nope", "x2")
    with pytest.raises(UnsupportedAttributeError, match="t: slicing with steps needs opset >= 10"):
        _writer(9).slice("x", [0], [1], [0], [2])
    with pytest.raises(InternalError, match="the element type of 'unknown' is unknown"):
        w.const(1.0, like="unknown")


def test_non_float_constants_below_opset_9_are_initializers():
    w = _writer(8)
    shape = w.ints([3, 2])
    assert not w.nodes and w.created(shape)
    with pytest.raises(InternalError, match="add them with flush_into"):
        w.take_nodes()
    y = w.op("Reshape", "x", shape)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(w, 8, y, x), x.reshape(3, 2))
