"""SplitToSequence read back by SequenceAt (torch's ``chunk`` through the dynamo exporter).

The engine differentiates tensors, not sequences: a ``SplitToSequence`` whose
sequence is read only by ``SequenceAt`` at constant positions, each chunk
exactly once, is differentiated as one ``Split`` whose outputs are the
``SequenceAt`` outputs (its gradient is the Concat of the chunks' gradients).
Every case compares with onnxbp's finite-difference checker (float64 forward,
per-element central differences, rtol 1e-4) and with the numpy adjoint
(chunk gradients concatenated, zeros for a chunk that reaches no output,
rtol 1e-6); each emitted model holds only standard-domain ops and passes the
full checker (``run_gradient``).  Sequences the view cannot see through raise
a one-line error naming the node and op.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from gradutil import assert_close, assert_fd, make_model, run_gradient

F = np.float32
SHAPE = (2, 6, 5)


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _chunk_sizes(dim, split):
    if split is None:
        return [1] * dim
    if np.ndim(split) == 0:
        return [split] * (dim // split) + ([dim % split] if dim % split else [])
    return list(split)


def _model(axis, split, positions, keepdims=1, used=None):
    """x (a graph input) times w (an initializer), split into a sequence, each chunk
    read by SequenceAt at ``positions[k]`` and scaled by its own weight."""
    rng = _rng(axis, repr(split), positions)
    dim = SHAPE[axis]
    sizes = _chunk_sizes(dim, split)
    used = set(range(len(sizes))) if used is None else set(used)
    inits = {"w": rng.standard_normal(SHAPE).astype(F)}
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"], name="scale")]
    ins = ["xw"]
    if split is not None:
        inits["split"] = np.asarray(split, np.int64)
        ins.append("split")
    nodes.append(helper.make_node("SplitToSequence", ins, ["seq"], name="chunk", axis=axis,
                                  **({} if split is not None else {"keepdims": keepdims})))
    outputs = []
    for k, pos in enumerate(positions):
        inits[f"pos{k}"] = np.asarray(pos, np.int64)
        nodes.append(helper.make_node("SequenceAt", ["seq", f"pos{k}"], [f"c{k}"], name=f"at{k}"))
        if k in used:
            shape = list(SHAPE)
            shape[axis] = sizes[pos % len(sizes)]
            if split is None and not keepdims:
                del shape[axis]
            inits[f"v{k}"] = rng.standard_normal(shape).astype(F)
            nodes.append(helper.make_node("Mul", [f"c{k}", f"v{k}"], [f"y{k}"], name=f"use{k}"))
            outputs.append((f"y{k}", F, shape))
    model = make_model(nodes, [("x", F, list(SHAPE))], outputs, inits, opset=17)
    return model, sizes, inits


CASES = [
    # (axis, split, positions): every chunk read exactly once, in any order
    (1, None, [0, 1, 2, 3, 4, 5]),
    (0, None, [1, 0]),
    (-1, None, [4, -2, 2, 1, -5]),
    (1, 2, [0, 1, 2]),
    (1, 4, [1, 0]),              # uneven: chunks of 4 and 2
    (2, 2, [2, 0, 1]),           # 5 = 2 + 2 + 1
    (1, [1, 3, 2], [0, 1, 2]),
    (1, [6], [0]),
    (-1, [3, 2], [-1, -2]),
    (0, [1, 1], [1, 0]),
]


@pytest.mark.parametrize("axis,split,positions", CASES, ids=[f"axis{a}-split{s}-at{p}" for a, s, p in CASES])
@pytest.mark.parametrize("wrt", [["x"], ["w"], ["x", "w"]], ids=["dx", "dw", "both"])
def test_split_to_sequence_chunks(axis, split, positions, wrt):
    model, sizes, inits = _model(axis, split, positions)
    x = _rng("x", axis).standard_normal(SHAPE).astype(F)
    gm, outs, grads, ups = run_gradient(model, {"x": x}, wrt)
    assert [n.op_type for n in gm.graph.node].count("Concat") >= 1
    # numpy adjoint: d(xw) is the concatenation of the chunk gradients in sequence order
    pieces = [None] * len(sizes)
    for k, pos in enumerate(positions):
        pieces[pos % len(sizes)] = ups[f"y{k}"] * inits[f"v{k}"]
    dxw = np.concatenate(pieces, axis=axis)
    ref = {"x": dxw * inits["w"], "w": dxw * x}
    for p in wrt:
        assert_close(grads[p], ref[p], 1e-6, 1e-7, f"d{p}")
    assert_fd(model, wrt, feeds={"x": x}, rtol=1e-4)


@pytest.mark.parametrize("unused", [0, 2])
def test_chunk_reaching_no_output_gets_zero_gradient(unused):
    model, sizes, inits = _model(1, [1, 3, 2], [0, 1, 2], used={0, 1, 2} - {unused})
    x = _rng("unused", unused).standard_normal(SHAPE).astype(F)
    gm, outs, grads, ups = run_gradient(model, {"x": x}, ["x"])
    pieces = [ups[f"y{k}"] * inits[f"v{k}"] if k != unused else
              np.zeros((2, sizes[k], 5), F) for k in range(3)]
    assert_close(grads["x"], np.concatenate(pieces, axis=1) * inits["w"], 1e-6, 1e-7, "dx")
    assert_fd(model, ["x"], feeds={"x": x}, rtol=1e-4)


def test_forward_graph_is_unchanged():
    model, _, _ = _model(1, 2, [0, 1, 2])
    gm = onnxbp.gradient(model, ["x"])
    forward = [(n.name, n.op_type) for n in model.graph.node]
    assert [(n.name, n.op_type) for n in gm.graph.node][:len(forward)] == forward
    assert "Split" not in {n.op_type for n in gm.graph.node}


def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_sequence_position_computed_at_run_time_raises():
    model, _, _ = _model(1, 2, [0, 1, 2])
    pos = next(t for t in model.graph.initializer if t.name == "pos1")
    model.graph.initializer.remove(pos)
    model.graph.input.append(helper.make_tensor_value_info("pos1", TensorProto.INT64, []))
    with pytest.raises(onnxbp.UnsupportedOpError) as exc:
        onnxbp.gradient(model, ["x"])
    text = _one_line(exc)
    assert "'chunk' (op SplitToSequence) is differentiated only when" in text
    assert "SequenceAt node 'at1' reads a position that is not a constant" in text


def test_chunk_read_twice_raises():
    model, _, _ = _model(1, 2, [0, 1, 2])
    # a fourth read of chunk 0
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(0, np.int64), "pos_again"))
    model.graph.node.append(helper.make_node("SequenceAt", ["seq", "pos_again"], ["again"], name="again"))
    model.graph.output.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, [2, 2, 5]))
    with pytest.raises(onnxbp.UnsupportedOpError) as exc:
        onnxbp.gradient(model, ["x"])
    assert "here chunk 0 is read twice" in _one_line(exc)


def test_keepdims_0_without_split_raises():
    """keepdims=0 drops the split axis: the chunks are not the outputs of a Split."""
    model, _, _ = _model(1, None, [0, 1, 2, 3, 4, 5], keepdims=0)
    with pytest.raises(onnxbp.UnsupportedOpError) as exc:
        onnxbp.gradient(model, ["x"])
    assert "here keepdims=0 drops the split axis" in _one_line(exc)
