"""Gradients of tensor-movement ops, Where and ConvTranspose.

Every case runs the emitted model (run_gradient checks it is standard and
passes onnx's full checker) and compares with onnxbp's finite-difference
checker: float64 forward with per-element central differences where
onnxruntime has float64 kernels (all ops here except ConvTranspose), rtol
1e-4 on float32 gradients; ConvTranspose uses float32 random directions with
the large (exact for linear maps) step, rtol 1e-3.  Where torch expresses the
op, the gradient is also compared with torch autograd in float64 (rtol 1e-5,
ConvTranspose 1e-4).  The worst relative error per op is written to
/tmp/onnxbp_relerr_tensor.json at the end of the module.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from onnx import helper

import onnxbp
from gradutil import HAS_TORCH, assert_close, assert_fd, make_model, run_gradient

F = np.float32
ERRS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _dump_errors():
    yield
    with open("/tmp/onnxbp_relerr_tensor.json", "w") as fh:
        json.dump(ERRS, fh, indent=1, sort_keys=True)


def _record(op, value):
    ERRS[op] = max(ERRS.get(op, 0.0), float(value))


def _check(op, model, feeds, wrt, rtol=1e-4, upstream=None, **kw):
    gm, outs, grads, ups = run_gradient(model, feeds, wrt, upstream)
    rep = assert_fd(model, wrt, feeds=feeds, rtol=rtol, **kw)
    _record(op, max(r.max_rel_err for r in rep.results))
    return gm, outs, grads, ups


def _torch_check(op, leaves, out_fn, ups, grads, names, rtol=1e-5):
    import torch

    ts = [torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for v in leaves]
    y = out_fn(*ts)
    y.backward(torch.tensor(np.asarray(ups, dtype=np.float64)))
    for name, t in zip(names, ts):
        _record(op + " (torch)", assert_close(grads[name], t.grad.numpy(), rtol, 1e-6, f"{op} d{name}"))


def _rng(*key):
    """A generator seeded by the test case (crc32: stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _out_shape(model, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [o.shape for o in sess.run(None, feeds)]


def _single(op, ins, outs, inits=None, opset=17, **attrs):
    """One-node model; ins/outs: (name, dtype, shape)."""
    node = helper.make_node(op, [i[0] if i else "" for i in ins if i is not None], [o[0] for o in outs],
                            name=op.lower(), **attrs)
    graph_ins = [i for i in ins if i is not None and i[0] and i[0] not in (inits or {})]
    return make_model([node], graph_ins, outs, inits, opset=opset)


# ---------------------------------------------------------------- Concat
@pytest.mark.parametrize("opset", [9, 13])
@pytest.mark.parametrize("axis,sizes", [(0, [2, 3]), (1, [1, 3, 2]), (-1, [4, 1]), (2, [2, 2, 3])])
def test_concat(opset, axis, sizes):
    rng = _rng("concat", opset, axis, sizes)
    base = [2, 3, 4]
    shapes = []
    for s in sizes:
        sh = list(base)
        sh[axis] = s
        shapes.append(sh)
    names = [f"X{i}" for i in range(len(sizes))]
    feeds = {n: rng.standard_normal(s).astype(F) for n, s in zip(names, shapes)}
    y = np.concatenate(list(feeds.values()), axis=axis)
    model = _single("Concat", [(n, F, s) for n, s in zip(names, shapes)], [("Y", F, list(y.shape))],
                    opset=opset, axis=axis)
    wrt = names[::2] if len(names) > 2 else names  # also leave some inputs without gradient
    _, _, grads, ups = _check("Concat", model, feeds, wrt)
    pieces = np.split(ups["Y"], np.cumsum(sizes)[:-1], axis=axis)
    for n in wrt:
        assert_close(grads[n], pieces[names.index(n)], 0, 0, f"Concat d{n}")


def test_concat_symbolic_batch_static_axis():
    model = _single("Concat", [("A", F, ["n", 2, 3]), ("B", F, ["n", 1, 3])], [("Y", F, ["n", 3, 3])], axis=-2)
    for n in (1, 4):
        rng = _rng("concat-sym-static", n)
        feeds = {"A": rng.standard_normal((n, 2, 3)).astype(F), "B": rng.standard_normal((n, 1, 3)).astype(F)}
        _, _, grads, ups = _check("Concat", model, feeds, ["A", "B"])
        assert_close(grads["A"], ups["Y"][:, :2], 0, 0, "dA")
        assert_close(grads["B"], ups["Y"][:, 2:], 0, 0, "dB")


def test_concat_symbolic_axis_runtime_offsets():
    """Concat along a symbolic batch axis: offsets come from Shape at run time."""
    model = _single("Concat", [("A", F, ["n", 3]), ("B", F, ["m", 3])], [("Y", F, [None, 3])], axis=0)
    gm = onnxbp.gradient(model, ["A", "B"])
    assert any(n.op_type == "Shape" for n in gm.graph.node)
    for na, nb in [(1, 2), (3, 1)]:
        rng = _rng("concat-sym", na, nb)
        feeds = {"A": rng.standard_normal((na, 3)).astype(F), "B": rng.standard_normal((nb, 3)).astype(F)}
        _, _, grads, ups = _check("Concat", model, feeds, ["A", "B"])
        assert_close(grads["A"], ups["Y"][:na], 0, 0, "dA")
        assert_close(grads["B"], ups["Y"][na:], 0, 0, "dB")


# ---------------------------------------------------------------- Split
@pytest.mark.parametrize("opset,style", [(11, "attr"), (13, "input"), (18, "num_outputs"), (18, "input")])
@pytest.mark.parametrize("used", [(0, 1, 2), (1,), (0, 2)])
def test_split(opset, style, used):
    rng = _rng("split", opset, style, used)
    x = rng.standard_normal((3, 6, 2)).astype(F)
    sizes = [2, 2, 2] if style == "num_outputs" else [1, 3, 2]
    outs = [f"Y{k}" for k in range(3)]
    inits = {}
    attrs = dict(axis=1)
    inputs = ["X"]
    if style == "attr":
        attrs["split"] = sizes
    elif style == "input":
        inits["S"] = np.array(sizes, dtype=np.int64)
        inputs.append("S")
    else:
        attrs["num_outputs"] = 3
    node = helper.make_node("Split", inputs, outs, name="split", **attrs)
    # Only the `used` outputs are graph outputs: the others get zero gradient regions.
    gouts = [(outs[k], F, [3, sizes[k], 2]) for k in used]
    model = make_model([node], [("X", F, [3, 6, 2])], gouts, inits, opset=opset)
    _, _, grads, ups = _check("Split", model, {"X": x}, ["X"])
    ref = np.concatenate([ups[outs[k]] if k in used else np.zeros((3, sizes[k], 2), F) for k in range(3)],
                         axis=1)
    assert_close(grads["X"], ref, 0, 0, "Split dX")


# ---------------------------------------------------------------- Slice
SLICE_CASES = [
    # starts, ends, axes, steps
    ([1], [3], [0], None),
    ([0, 1], [2, -1], [1, 2], None),
    ([-3], [100], [-1], None),
    ([0, 2], [5, 100], [2, 1], [2, 1]),
    ([4], [-100], [2], [-1]),
    ([5], [0], [2], [-2]),
    ([-1, 3], [-100, 0], [0, 1], [-1, -3]),
    ([1, 0, 0], [3, 4, 6], [0, 1, 2], [1, 3, 4]),
    ([2], [2], [1], None),  # empty slice: the gradient is exactly zero
    ([0], [6], [2], [7]),  # one element selected, step beyond the dim
]


def _np_slice(x, starts, ends, axes, steps):
    idx = [slice(None)] * x.ndim
    steps = steps or [1] * len(starts)
    for s, e, a, st in zip(starts, ends, axes, steps):
        idx[a] = list(np.arange(x.shape[a])[s:e:st])  # python slicing clamps as ONNX does
    out = x
    for a, sel in enumerate(idx):
        if not isinstance(sel, slice):
            out = np.take(out, sel, axis=a)
    return out


def _slice_ref(x_shape, u, starts, ends, axes, steps):
    """A^T u by accumulating through explicit index lists (numpy)."""
    steps = steps or [1] * len(starts)
    sel = [list(range(d)) for d in x_shape]
    for s, e, a, st in zip(starts, ends, axes, steps):
        sel[a % len(x_shape)] = list(np.arange(x_shape[a % len(x_shape)])[s:e:st])
    out = np.zeros(x_shape, np.float64)
    out[np.ix_(*sel)] += u
    return out


SLICE_GRID = [(i, mode) for mode in ["opset9-attrs", "opset10-consts", "opset13-consts", "opset13-runtime"]
              for i, case in enumerate(SLICE_CASES)
              if not (mode == "opset9-attrs" and case[3] is not None)]  # opset 9 has no steps


@pytest.mark.parametrize("case_id,mode", SLICE_GRID, ids=[f"{m}-{i}" for i, m in SLICE_GRID])
def test_slice(case_id, mode):
    case = SLICE_CASES[case_id]
    starts, ends, axes, steps = case
    rng = _rng("slice", case, mode)
    shape = (4, 5, 6)
    x = rng.standard_normal(shape).astype(F)
    y = _np_slice(x, starts, ends, [a % 3 for a in axes], steps)
    feeds = {"X": x}
    if mode == "opset9-attrs":
        model = _single("Slice", [("X", F, list(shape))], [("Y", F, list(y.shape))], opset=9,
                        starts=starts, ends=ends, axes=axes)
    else:
        params = {"starts": starts, "ends": ends, "axes": axes}
        if steps is not None:
            params["steps"] = steps
        names = list(params)
        inputs = [("X", F, list(shape))] + [(n, np.int64, [len(starts)]) for n in names]
        arrays = {n: np.array(v, dtype=np.int64) for n, v in params.items()}
        if mode.endswith("-consts"):
            model = _single("Slice", inputs, [("Y", F, list(y.shape))], inits=arrays, opset=int(mode[5:7]))
        else:  # starts/ends/steps as graph inputs: known only at run time
            runtime = {k: v for k, v in arrays.items() if k != "axes"}
            model = _single("Slice", inputs, [("Y", F, [None] * 3)], inits={"axes": arrays["axes"]}, opset=13)
            feeds.update(runtime)
    gm, _, grads, ups = _check("Slice", model, feeds, ["X"])
    if mode == "opset13-runtime":
        assert any(n.op_type == "ScatterElements" for n in gm.graph.node)
    elif y.size:
        assert not any(n.op_type.startswith("Scatter") for n in gm.graph.node)
    assert_close(grads["X"], _slice_ref(shape, ups["Y"].astype(np.float64), starts, ends, axes, steps),
                 1e-7, 0, "Slice dX")


def test_slice_steps_with_symbolic_batch_static_path():
    """Sliced axes static, batch symbolic: the Pad/interleave lowering keeps the batch symbolic."""
    inits = {"s": np.array([5, 1], np.int64), "e": np.array([-100, 4], np.int64), "a": np.array([1, 2], np.int64),
             "st": np.array([-2, 2], np.int64)}
    model = _single("Slice", [("X", F, ["n", 6, 4]), ("s",), ("e",), ("a",), ("st",)], [("Y", F, ["n", 3, 2])],
                    inits=inits, opset=13)
    gm = onnxbp.gradient(model, ["X"])
    assert not any(n.op_type.startswith("Scatter") for n in gm.graph.node)
    for n in (1, 3):
        x = _rng("slice-sym-static", n).standard_normal((n, 6, 4)).astype(F)
        _, _, grads, ups = _check("Slice", model, {"X": x}, ["X"])
        ref = np.zeros((n, 6, 4), F)
        ref[:, 5::-2, 1:4:2] = ups["Y"]
        assert_close(grads["X"], ref, 0, 0, "dX")


def test_slice_runtime_starts_ends_default_axes():
    """starts/ends fed at run time, axes and steps omitted: axes default to 0..len(starts)-1."""
    model = _single("Slice", [("X", F, [4, 5]), ("s", np.int64, [2]), ("e", np.int64, [2])],
                    [("Y", F, [None, None])], opset=13)
    x = _rng("slice-rt-default").standard_normal((4, 5)).astype(F)
    feeds = {"X": x, "s": np.array([1, -3], np.int64), "e": np.array([3, 100], np.int64)}
    _, _, grads, ups = _check("Slice", model, feeds, ["X"])
    ref = np.zeros((4, 5), F)
    ref[1:3, 2:] = ups["Y"]
    assert_close(grads["X"], ref, 0, 0, "dX")


def test_slice_symbolic_batch_axis():
    """Slicing a symbolic axis falls back to the runtime (Range/ScatterElements) lowering."""
    inits = {"s": np.array([1], np.int64), "e": np.array([100], np.int64), "a": np.array([0], np.int64),
             "st": np.array([2], np.int64)}
    model = _single("Slice", [("X", F, ["n", 3]), ("s",), ("e",), ("a",), ("st",)], [("Y", F, [None, 3])],
                    inits=inits, opset=13)
    for n in (2, 5):
        x = _rng("slice-sym", n).standard_normal((n, 3)).astype(F)
        _, _, grads, ups = _check("Slice", model, {"X": x}, ["X"])
        ref = np.zeros((n, 3), F)
        ref[1::2] = ups["Y"]
        assert_close(grads["X"], ref, 0, 0, "dX")


def test_slice_starts_ends_from_shape_subgraph():
    """TorchScript's ``x[n // 2:, :, 1:w - 1]`` on a symbolic batch: starts/ends computed from Shape
    (Gather, Div, Sub, Concat) at run time, axes constant.  Differentiated without static positions."""
    from onnx import numpy_helper

    def const(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.int64)))

    nodes = [helper.make_node("Shape", ["X"], ["sh"]), const("i0", [0]), const("i2", [2]), const("one", [1]),
             helper.make_node("Gather", ["sh", "i0"], ["n"]), helper.make_node("Gather", ["sh", "i2"], ["w"]),
             helper.make_node("Sub", ["w", "one"], ["w1"]), helper.make_node("Div", ["n", "i2"], ["half"]),
             helper.make_node("Concat", ["half", "one"], ["starts"], axis=0),
             helper.make_node("Concat", ["n", "w1"], ["ends"], axis=0), const("axes", [0, 2]),
             helper.make_node("Slice", ["X", "starts", "ends", "axes"], ["Y"]),
             helper.make_node("Tanh", ["Y"], ["T"])]
    model = make_model(nodes, [("X", F, ["N", 3, "W"])], [("T", F, ["A", 3, "B"])], opset=17)
    for n, w in ((4, 6), (5, 3)):
        x = _rng("slice-shape", n).standard_normal((n, 3, w)).astype(F)
        _, outs, grads, ups = _check("Slice", model, {"X": x}, ["X"])
        ref = np.zeros((n, 3, w), F)
        ref[n // 2:, :, 1:w - 1] = ups["T"] * (1 - np.tanh(x[n // 2:, :, 1:w - 1]) ** 2)
        assert_close(grads["X"], ref, 1e-5, 1e-6, "dX")


# ---------------------------------------------------------------- Transpose, Squeeze, Unsqueeze
@pytest.mark.parametrize("perm", [None, [0, 2, 1], [2, 0, 1], [1, 2, 0]])
def test_transpose(perm):
    rng = _rng("transpose", perm)
    x = rng.standard_normal((2, 3, 4)).astype(F)
    y = np.transpose(x, perm)
    attrs = {} if perm is None else {"perm": perm}
    model = _single("Transpose", [("X", F, [2, 3, 4])], [("Y", F, list(y.shape))], **attrs)
    _, _, grads, ups = _check("Transpose", model, {"X": x}, ["X"])
    if HAS_TORCH:
        p = perm if perm is not None else [2, 1, 0]
        _torch_check("Transpose", [x], lambda t: t.permute(*p), ups["Y"], grads, ["X"])


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op,axes,shape", [("Squeeze", [1], (2, 1, 3)), ("Squeeze", None, (1, 2, 1, 3)),
                                           ("Squeeze", [-1, 0], (1, 3, 1)),
                                           ("Unsqueeze", [0], (2, 3)), ("Unsqueeze", [1, -1], (2, 3))])
def test_squeeze_unsqueeze(opset, op, axes, shape):
    x = _rng(op, axes, shape).standard_normal(shape).astype(F)
    if op == "Squeeze":
        y = np.squeeze(x, axis=None if axes is None else tuple(axes))
    else:
        y = x
        out_rank = x.ndim + len(axes)
        for a in sorted(a % out_rank for a in axes):
            y = np.expand_dims(y, a)
    ins = [("X", F, list(shape))]
    inits = {}
    attrs = {}
    if axes is not None:
        if opset >= 13:
            inits["axes"] = np.array(axes, np.int64)
            ins.append(("axes",))
        else:
            attrs["axes"] = axes
    model = _single(op, ins, [("Y", F, list(y.shape))], inits=inits, opset=opset, **attrs)
    _, _, grads, ups = _check(op, model, {"X": x}, ["X"])
    assert_close(grads["X"], ups["Y"].reshape(shape), 0, 0, f"{op} dX")


# ---------------------------------------------------------------- Expand, Tile
@pytest.mark.parametrize("xs,shape", [((3, 1), (2, 3, 4)), ((1,), (3, 2)), ((2, 1, 4), (2, 3, 4)),
                                      ((3, 4), (1, 1)), ((1, 3, 1), (2, 1, 5))])
def test_expand(xs, shape):
    x = _rng("expand", xs, shape).standard_normal(xs).astype(F)
    y_shape = np.broadcast_shapes(xs, shape)
    model = _single("Expand", [("X", F, list(xs)), ("S",)], [("Y", F, list(y_shape))],
                    inits={"S": np.array(shape, np.int64)}, opset=13)
    _, _, grads, ups = _check("Expand", model, {"X": x}, ["X"])
    if HAS_TORCH:
        _torch_check("Expand", [x], lambda t: t.expand(*y_shape) if len(xs) == len(y_shape)
                     else t.expand(*y_shape), ups["Y"], grads, ["X"])


@pytest.mark.parametrize("runtime", [False, True], ids=["const-repeats", "runtime-repeats"])
@pytest.mark.parametrize("xs,reps", [((2, 3), (1, 2)), ((2, 3), (3, 2)), ((4,), (3,)), ((2, 1, 3), (2, 3, 1))])
def test_tile(xs, reps, runtime):
    x = _rng("tile", xs, reps).standard_normal(xs).astype(F)
    y = np.tile(x, reps)
    r = np.array(reps, np.int64)
    if runtime:
        model = _single("Tile", [("X", F, list(xs)), ("R", np.int64, [len(reps)])], [("Y", F, [None] * len(xs))], opset=13)
        feeds = {"X": x, "R": r}
    else:
        model = _single("Tile", [("X", F, list(xs)), ("R",)], [("Y", F, list(y.shape))], inits={"R": r},
                        opset=13)
        feeds = {"X": x}
    _, _, grads, ups = _check("Tile", model, feeds, ["X"])
    if HAS_TORCH:
        _torch_check("Tile", [x], lambda t: t.repeat(*reps), ups["Y"], grads, ["X"])


def test_tile_symbolic_batch():
    model = _single("Tile", [("X", F, ["n", 3]), ("R",)], [("Y", F, [None, 6])],
                    inits={"R": np.array([2, 2], np.int64)}, opset=13)
    for n in (1, 3):
        x = _rng("tile-sym", n).standard_normal((n, 3)).astype(F)
        _, _, grads, ups = _check("Tile", model, {"X": x}, ["X"])
        u = ups["Y"].reshape(2, n, 2, 3)
        assert_close(grads["X"], u.sum(axis=(0, 2)), 1e-6, 1e-6, "dX")


# ---------------------------------------------------------------- Gather, GatherElements
GATHER_CASES = [
    (0, np.array([2, 0, 2, -1])),  # duplicates and a negative index
    (1, np.array(1)),  # scalar index
    (1, np.array([[0, -2], [3, 3]])),
    (-1, np.array([[1], [0]])),
    (2, np.array([4, -5, 0])),
]


@pytest.mark.parametrize("opset", [13, 16])
@pytest.mark.parametrize("axis,idx", GATHER_CASES, ids=[str(i) for i in range(len(GATHER_CASES))])
def test_gather(opset, axis, idx):
    rng = _rng("gather", opset, axis, idx.tolist())
    shape = (3, 4, 5)
    x = rng.standard_normal(shape).astype(F)
    y = np.take(x, idx, axis=axis)
    model = _single("Gather", [("X", F, list(shape)), ("I",)], [("Y", F, list(y.shape))],
                    inits={"I": idx.astype(np.int64)}, opset=opset, axis=axis)
    gm, _, grads, ups = _check("Gather", model, {"X": x}, ["X"])
    assert gm.opset_import[0].version >= 16  # the version converter ran for opset 13
    ref = np.zeros(shape)
    a = axis % 3
    pos = idx.reshape(-1) % shape[a]
    u = np.moveaxis(ups["Y"].reshape(shape[:a] + (-1,) + shape[a + 1:]), a, 0)
    dst = np.moveaxis(ref, a, 0)
    for k, p in enumerate(pos):
        dst[p] += u[k]
    assert_close(grads["X"], ref, 1e-6, 1e-6, "Gather dX")
    if HAS_TORCH:
        import torch

        ti = torch.tensor(idx.reshape(-1) % shape[a])
        _torch_check("Gather", [x], lambda t: torch.index_select(t, a, ti).reshape(y.shape), ups["Y"], grads, ["X"])


def test_gather_embedding_symbolic_batch():
    """Embedding lookup: table initializer, (batch, seq) indices with a symbolic batch."""
    table = _rng("emb").standard_normal((7, 4)).astype(F)
    model = _single("Gather", [("E", F, [7, 4]), ("I", np.int64, ["batch", 3])], [("Y", F, ["batch", 3, 4])],
                    inits={"E": table}, opset=16, axis=0)
    for batch in (1, 4):
        idx = _rng("emb", batch).integers(-7, 7, size=(batch, 3)).astype(np.int64)
        _, _, grads, ups = _check("Gather", model, {"I": idx}, ["E"])
        ref = np.zeros((7, 4))
        np.add.at(ref, (idx % 7).reshape(-1), ups["Y"].reshape(-1, 4))
        assert_close(grads["E"], ref, 1e-6, 1e-6, "embedding dE")


def test_gather_symbolic_data_batch():
    model = _single("Gather", [("X", F, ["n", 5]), ("I",)], [("Y", F, ["n", 2, 2])],
                    inits={"I": np.array([[4, -1], [0, 2]], np.int64)}, opset=16, axis=1)
    for n in (1, 3):
        x = _rng("gather-sym", n).standard_normal((n, 5)).astype(F)
        _, _, grads, ups = _check("Gather", model, {"X": x}, ["X"])
        ref = np.zeros((n, 5))
        for k, j in enumerate([4, 4, 0, 2]):
            ref[:, j] += ups["Y"].reshape(n, 4)[:, k]
        assert_close(grads["X"], ref, 1e-6, 1e-6, "dX")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    rng = _rng("gatherel", axis)
    x = rng.standard_normal((3, 4)).astype(F)
    a = axis % 2
    idx_shape = (5, 4) if a == 0 else (3, 6)
    idx = rng.integers(-x.shape[a], x.shape[a], size=idx_shape).astype(np.int64)
    y = np.take_along_axis(x, idx % x.shape[a], axis=a)
    model = _single("GatherElements", [("X", F, [3, 4]), ("I",)], [("Y", F, list(y.shape))],
                    inits={"I": idx}, opset=16, axis=axis)
    _, _, grads, ups = _check("GatherElements", model, {"X": x}, ["X"])
    if HAS_TORCH:
        import torch

        ti = torch.tensor(idx % x.shape[a])
        _torch_check("GatherElements", [x], lambda t: torch.gather(t, a, ti), ups["Y"], grads, ["X"])


# ---------------------------------------------------------------- Pad
PAD_CASES = [
    [0, 1, 2, 0, 2, 1],
    [1, 0, 0, 1, 0, 3],
    [0, -1, 1, 0, 2, -2],  # negative pads crop
    [-1, 0, -2, 0, -1, 0],
]


@pytest.mark.parametrize("opset", [10, 13, 18])
@pytest.mark.parametrize("pads", PAD_CASES, ids=[str(i) for i in range(len(PAD_CASES))])
def test_pad_constant(opset, pads):
    rng = _rng("pad", opset, pads)
    shape = (3, 4, 5)
    x = rng.standard_normal(shape).astype(F)
    cv = np.array(0.5, F)
    p = np.array(pads)
    y_shape = [int(d + p[i] + p[3 + i]) for i, d in enumerate(shape)]
    wrt = ["X"]
    if opset < 11:
        model = _single("Pad", [("X", F, list(shape))], [("Y", F, y_shape)], opset=opset, pads=pads,
                        value=0.5)
    else:
        inits = {"P": p.astype(np.int64), "V": cv}
        model = _single("Pad", [("X", F, list(shape)), ("P",), ("V",)], [("Y", F, y_shape)], inits=inits,
                        opset=opset)
        # With only crops the value is unused: its (exactly zero) gradient is left out.
        wrt = ["X", "V"] if max(pads) > 0 else ["X"]
    _, _, grads, ups = _check("Pad", model, {"X": x}, wrt)
    if HAS_TORCH:
        import torch.nn.functional as tf

        tp = []
        for i in reversed(range(3)):
            tp += [int(p[i]), int(p[3 + i])]
        leaves = [x] + ([cv] if "V" in wrt else [])
        fn = ((lambda t, v: tf.pad(t - v, tp) + v) if "V" in wrt else (lambda t: tf.pad(t, tp, value=0.5)))
        _torch_check("Pad", leaves, fn, ups["Y"], grads, wrt)


def test_pad_with_axes_and_runtime_pads():
    """Opset 18 axes input, pads fed at run time."""
    x = _rng("pad-axes").standard_normal((2, 3, 4)).astype(F)
    model = _single("Pad", [("X", F, [2, 3, 4]), ("P", np.int64, [4]), ("", ), ("A",)], [("Y", F, [None] * 3)],
                    inits={"A": np.array([2, 0], np.int64)}, opset=18)
    feeds = {"X": x, "P": np.array([1, -1, 2, 0], np.int64)}
    _, _, grads, ups = _check("Pad", model, feeds, ["X"])
    # axes (2, 0): axis 2 padded 1 before / 2 after, axis 0 cropped by 1 at the start.
    ref = np.zeros((2, 3, 4))
    ref[1:, :, :] = ups["Y"][:, :, 1:5]
    assert_close(grads["X"], ref, 0, 0, "dX")


@pytest.mark.parametrize("opset,mode", [(13, "reflect"), (13, "edge"), (19, "reflect"), (19, "edge"),
                                        (19, "wrap")])  # wrap exists from opset 19
@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [2, 0, 3, 1, 3, 0], [1, 1, 1, 1, 1, 1]],
                         ids=["a", "b", "c"])
def test_pad_border_modes(opset, mode, pads):
    rng = _rng("pad-border", opset, mode, pads)
    shape = (3, 4, 5)
    x = rng.standard_normal(shape).astype(F)
    y_shape = [d + pads[i] + pads[3 + i] for i, d in enumerate(shape)]
    model = _single("Pad", [("X", F, list(shape)), ("P",)], [("Y", F, y_shape)],
                    inits={"P": np.array(pads, np.int64)}, opset=opset, mode=mode)
    _, _, grads, ups = _check("Pad (" + mode + ")", model, {"X": x}, ["X"])
    # numpy's pad is the same linear map: its adjoint by accumulating through an index map.
    index = np.arange(x.size).reshape(shape)
    src = np.pad(index, [(pads[i], pads[3 + i]) for i in range(3)], mode={"edge": "edge", "reflect": "reflect",
                                                                          "wrap": "wrap"}[mode])
    ref = np.zeros(x.size)
    np.add.at(ref, src.reshape(-1), ups["Y"].reshape(-1).astype(np.float64))
    assert_close(grads["X"], ref.reshape(shape), 1e-6, 1e-6, f"Pad {mode} dX")


def test_pad_reflect_with_axes_opset18():
    x = _rng("pad-refl-axes").standard_normal((2, 3, 4)).astype(F)
    model = _single("Pad", [("X", F, [2, 3, 4]), ("P",), ("",), ("A",)], [("Y", F, [2, 5, 7])],
                    inits={"P": np.array([2, 1, 1, 1], np.int64), "A": np.array([-1, 1], np.int64)},
                    opset=18, mode="reflect")
    _check("Pad (reflect)", model, {"X": x}, ["X"])


def test_pad_reflect_runtime_pads_fails_clearly():
    model = _single("Pad", [("X", F, [3, 4]), ("P", np.int64, [4])], [("Y", F, [None, None])], opset=13,
                    mode="reflect")
    with pytest.raises(onnxbp.UnsupportedAttributeError, match="Pad mode 'reflect' needs constant pads"):
        onnxbp.gradient(model, ["X"])


# ---------------------------------------------------------------- Where
@pytest.mark.parametrize("cs,xs,ys", [((3, 4), (3, 4), (3, 4)), ((3, 4), (4,), (3, 1)),
                                      ((1, 4), (3, 1), ()), ((2, 3, 4), (3, 4), (2, 1, 1))])
def test_where(cs, xs, ys):
    rng = _rng("where", cs, xs, ys)
    c = rng.random(cs) > 0.5
    x = rng.standard_normal(xs).astype(F)
    y = rng.standard_normal(ys).astype(F)
    out = np.where(c, x, y)
    model = _single("Where", [("C",), ("X", F, list(xs)), ("Y", F, list(ys))], [("Z", F, list(out.shape))],
                    inits={"C": c}, opset=13)
    _, _, grads, ups = _check("Where", model, {"X": x, "Y": y}, ["X", "Y"])
    if HAS_TORCH:
        import torch

        tc = torch.tensor(c)
        _torch_check("Where", [x, y], lambda a, b: torch.where(tc, a, b), ups["Z"], grads, ["X", "Y"])


# ---------------------------------------------------------------- ConvTranspose
CT_CASES = [
    # (x spatial, kernel, strides, pads, dilations, output_padding, group, bias)
    ((5, 4), (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), (0, 0), 1, True),
    ((4, 5), (3, 2), (2, 2), (1, 0, 1, 1), (1, 1), (1, 0), 1, False),
    ((3, 4), (2, 3), (2, 3), (0, 1, 1, 0), (2, 1), (1, 2), 1, True),
    ((4, 4), (3, 3), (1, 2), (1, 1, 0, 2), (1, 2), (0, 1), 2, True),
    ((3, 5), (1, 3), (3, 1), (0, 0, 0, 0), (1, 1), (2, 0), 3, False),
    ((4, 3), (3, 3), (1, 1), (2, 2, 2, 2), (1, 1), (0, 0), 1, False),
    ((3, 3), (2, 2), (3, 2), (0, 1, 2, 0), (3, 3), (2, 1), 1, True),
]


def _convt_case(xsp, k, strides, pads, dil, opad, group, bias, batch=2, cin=None, cout=None):
    nsp = len(xsp)
    cin = cin or 2 * group
    cout = cout or 3 * group
    rng = _rng("ct", xsp, k, strides, pads, dil, opad, group, bias)
    x = rng.standard_normal((batch, cin) + tuple(xsp)).astype(F)
    w = rng.standard_normal((cin, cout // group) + tuple(k)).astype(F)
    ysp = [strides[i] * (xsp[i] - 1) + opad[i] + (k[i] - 1) * dil[i] + 1 - pads[i] - pads[nsp + i]
           for i in range(nsp)]
    inits = {"W": w}
    ins = [("X", F, [batch, cin] + list(xsp)), ("W",)]
    if bias:
        inits["B"] = rng.standard_normal(cout).astype(F)
        ins.append(("B",))
    model = _single("ConvTranspose", ins, [("Y", F, [batch, cout] + ysp)], inits=inits, opset=13,
                    strides=list(strides), pads=list(pads), dilations=list(dil), output_padding=list(opad),
                    group=group, kernel_shape=list(k))
    return model, {"X": x}, inits


def _torch_convt(x, w, b, strides, pads, dil, opad, group, nsp):
    import torch.nn.functional as tf

    # torch has symmetric padding only: crop the extra asymmetric part by hand.
    pb, pe = pads[:nsp], pads[nsp:]
    fn = tf.conv_transpose2d if nsp == 2 else (tf.conv_transpose1d if nsp == 1 else tf.conv_transpose3d)
    y = fn(x, w, b, stride=tuple(strides), padding=0, output_padding=tuple(opad), groups=group,
           dilation=tuple(dil))
    idx = [slice(None), slice(None)] + [slice(pb[i], y.shape[2 + i] - pe[i]) for i in range(nsp)]
    return y[tuple(idx)]


@pytest.mark.parametrize("case", CT_CASES, ids=[str(i) for i in range(len(CT_CASES))])
def test_conv_transpose_2d(case):
    xsp, k, strides, pads, dil, opad, group, bias = case
    model, feeds, inits = _convt_case(*case)
    wrt = ["X", "W"] + (["B"] if bias else [])
    gm, outs, grads, ups = _check("ConvTranspose", model, feeds, wrt, rtol=1e-3)
    if HAS_TORCH:
        leaves = [feeds["X"], inits["W"]] + ([inits["B"]] if bias else [])

        def fn(x, w, b=None):
            return _torch_convt(x, w, b, strides, pads, dil, opad, group, 2)

        _torch_check("ConvTranspose", leaves, fn, ups["Y"], grads, wrt, rtol=1e-4)


@pytest.mark.parametrize("case", [
    ((6,), (3,), (2,), (1, 0), (1,), (1,), 1, True),
    ((2, 3, 2), (2, 2, 3), (2, 1, 2), (0, 1, 0, 1, 0, 1), (1, 2, 1), (1, 0, 0), 2, False),
], ids=["1d", "3d"])
def test_conv_transpose_1d_3d(case):
    xsp, k, strides, pads, dil, opad, group, bias = case
    model, feeds, inits = _convt_case(*case)
    wrt = ["X", "W"] + (["B"] if bias else [])
    _, _, grads, ups = _check("ConvTranspose", model, feeds, wrt, rtol=1e-3)
    if HAS_TORCH:
        leaves = [feeds["X"], inits["W"]] + ([inits["B"]] if bias else [])
        _torch_check("ConvTranspose", leaves,
                     lambda x, w, b=None: _torch_convt(x, w, b, strides, pads, dil, opad, group, len(xsp)),
                     ups["Y"], grads, wrt, rtol=1e-4)


def test_conv_transpose_symbolic_batch():
    w = _rng("ct-sym").standard_normal((4, 3, 3, 3)).astype(F)
    model = _single("ConvTranspose", [("X", F, ["n", 4, 3, 3]), ("W",)], [("Y", F, ["n", 6, 7, 7])],
                    inits={"W": w}, opset=13, strides=[2, 2], group=2)
    for n in (1, 3):
        x = _rng("ct-sym", n).standard_normal((n, 4, 3, 3)).astype(F)
        _check("ConvTranspose", model, {"X": x}, ["X", "W"], rtol=1e-3)


@pytest.mark.parametrize("attrs", [
    dict(auto_pad="SAME_UPPER"), dict(auto_pad="SAME_LOWER"), dict(auto_pad="VALID"),
    dict(output_shape=[6, 7]), dict(output_shape=[6, 7], auto_pad="SAME_UPPER"),
    dict(output_shape=[5, 8], output_padding=[1, 0]),
], ids=["same_upper", "same_lower", "valid", "output_shape", "output_shape_same_upper", "output_shape_opad"])
def test_conv_transpose_auto_pad_and_output_shape(attrs):
    """Pads derived as the spec says; the derived pads are checked against the inferred output shape,
    and the gradient against finite differences of onnxruntime's forward."""
    rng = _rng("ct-auto", sorted(attrs.items()))
    x = rng.standard_normal((2, 2, 3, 4)).astype(F)
    w = rng.standard_normal((2, 3, 3, 2)).astype(F)
    model = _single("ConvTranspose", [("X", F, [2, 2, 3, 4]), ("W",)], [("Y", F, [2, 3, None, None])],
                    inits={"W": w}, opset=13, strides=[2, 2], **attrs)
    _check("ConvTranspose", model, {"X": x}, ["X", "W"], rtol=1e-3)


def test_conv_transpose_output_shape_too_large_fails_clearly():
    model = _single("ConvTranspose", [("X", F, [1, 2, 3, 3]), ("W",)], [("Y", F, [1, 2, None, None])],
                    inits={"W": np.ones((2, 2, 3, 3), F)}, opset=13, strides=[2, 2], output_shape=[9, 9])
    with pytest.raises(onnxbp.UnsupportedAttributeError, match="only cropping output shapes are supported"):
        onnxbp.gradient(model, ["W"])


# ---------------------------------------------------------------- float64 models
D = np.float64
F64_CASES = {
    "Slice": lambda: (_single("Slice", [("X", D, [4, 6]), ("s",), ("e",), ("a",), ("st",)], [("Y", D, [2, 2])],
                              inits={"s": np.array([3, 5], np.int64), "e": np.array([-100, 0], np.int64),
                                     "a": np.array([0, 1], np.int64), "st": np.array([-2, -3], np.int64)},
                              opset=13), ["X"]),
    "Split": lambda: (make_model([helper.make_node("Split", ["X"], ["A", "B"], axis=1, num_outputs=2)],
                                 [("X", D, [2, 4])], [("B", D, [2, 2])], opset=18), ["X"]),
    "Gather": lambda: (_single("Gather", [("X", D, [5, 3]), ("I",)], [("Y", D, [2, 2, 3])],
                               inits={"I": np.array([[0, -1], [0, 2]], np.int64)}, opset=16), ["X"]),
    "Pad": lambda: (_single("Pad", [("X", D, [3, 4]), ("P",), ("V",)], [("Y", D, [4, 7])],
                            inits={"P": np.array([1, 2, 0, 1], np.int64), "V": np.array(0.25)}, opset=13),
                    ["X", "V"]),
    "Pad (reflect)": lambda: (_single("Pad", [("X", D, [3, 4]), ("P",)], [("Y", D, [5, 7])],
                                      inits={"P": np.array([1, 2, 1, 1], np.int64)}, opset=13, mode="reflect"),
                              ["X"]),
    "Tile": lambda: (_single("Tile", [("X", D, [2, 3]), ("R",)], [("Y", D, [4, 3])],
                             inits={"R": np.array([2, 1], np.int64)}, opset=13), ["X"]),
    "Where": lambda: (_single("Where", [("C",), ("X", D, [3, 1]), ("Y", D, [4])], [("Z", D, [3, 4])],
                              inits={"C": np.arange(12).reshape(3, 4) % 3 == 0}, opset=13), ["X", "Y"]),
    "Concat": lambda: (_single("Concat", [("A", D, ["n", 2]), ("B", D, ["m", 2])], [("Y", D, [None, 2])],
                               axis=0), ["A", "B"]),
}


@pytest.mark.parametrize("name", list(F64_CASES))
def test_float64_models(name):
    """The backward constants take the model's dtype: float64 models build and check too."""
    model, wrt = F64_CASES[name]()
    rng = _rng("f64", name)
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or 3 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims)
    _check(name, model, feeds, wrt)


@pytest.mark.parametrize("case", CT_CASES + [
    ((6,), (3,), (2,), (1, 0), (1,), (1,), 1, True),
    ((2, 3, 2), (2, 2, 3), (2, 1, 2), (0, 1, 0, 1, 0, 1), (1, 2, 1), (1, 0, 0), 2, False),
], ids=[str(i) for i in range(len(CT_CASES))] + ["1d", "3d"])
def test_conv_transpose_portable(case):
    """target="portable": W' is conv.py's im2col_weight_grad (no Conv whose kernel is X); the same
    finite-difference and torch checks as the default lowering."""
    xsp, k, strides, pads, dil, opad, group, bias = case
    model, feeds, inits = _convt_case(*case)
    wrt = ["X", "W"] + (["B"] if bias else [])
    gm, _, grads, ups = run_gradient(model, feeds, wrt, target="portable")
    gw = onnxbp.gradient(model, ["W"], target="portable")
    assert not {"Conv", "ConvTranspose"} & {n.op_type for n in gw.graph.node[1:]}
    rep = onnxbp.check_gradients(model, wrt, feeds=feeds, grad_model=gm, precision="float32", rtol=1e-3,
                                 directions=2)
    assert rep.passed, "\n" + rep.table()
    if HAS_TORCH:
        leaves = [feeds["X"], inits["W"]] + ([inits["B"]] if bias else [])
        _torch_check("ConvTranspose", leaves,
                     lambda x, w, b=None: _torch_convt(x, w, b, strides, pads, dil, opad, group, len(xsp)),
                     ups["Y"], grads, wrt, rtol=1e-4)
