"""Reductions, Softmax/LogSoftmax and variadic Mean/Max/Min (onnxbp/rules/reduce.py).

Every case checks the emitted gradient model is standard ONNX
(run_gradient -> assert_standard) and compares with

1. onnxbp's finite-difference checker: float64 per-element central
   differences where onnxruntime has float64 kernels (rtol 1e-4), else float32
   random directions with Richardson extrapolation (rtol 1e-3);
2. torch autograd in float64 on the same float32 inputs (normwise rtol 2e-5,
   atol 1e-6).

Random normal inputs have no ties (probability one), so ReduceMax/Min and
Max/Min are differentiable there; ReduceL1 inputs are kept >= 0.05 away from
0.  Ties are tested separately against torch's convention (the gradient is
split evenly among the maxima, as torch.amax and torch.maximum), where finite
differences do not apply.
"""

from __future__ import annotations


import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxbp
from gradutil import HAS_TORCH, assert_close, make_model, run_gradient
from gradutil import record_family as _record
from gradutil import seed_of as _seed
from gradutil import fd_check as _fd

TORCH_RTOL, TORCH_ATOL = 2e-5, 1e-6




def _torch_grads(fn, inputs, ups):
    import torch

    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in inputs]
    fn(*leaves).backward(torch.tensor(ups["Y"], dtype=torch.float64))
    return [leaf.grad.numpy() for leaf in leaves]


def _torch_check(family, fn, inputs, grads, ups, names):
    for name, ref in zip(names, _torch_grads(fn, inputs, ups)):
        _record(family, torch_err=assert_close(grads[name], ref, TORCH_RTOL, TORCH_ATOL, f"{family} d{name}"))


# --------------------------------------------------------------- Reduce*
# op -> (opset from which axes is an input, torch fn(x, dims, keepdim), elementwise noop fn)
def _torch_reduce(op):
    import torch

    return {
        "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
        "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
        "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
        "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
        "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
        "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k),
        "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
        "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    }[op]


NOOP_ELEMENTWISE = {  # what onnxruntime computes with noop_with_empty_axes=1 and no axes
    "ReduceSum": lambda x: x * 1.0, "ReduceMean": lambda x: x * 1.0, "ReduceMax": lambda x: x * 1.0,
    "ReduceMin": lambda x: x * 1.0, "ReduceSumSquare": lambda x: x * x, "ReduceL2": lambda x: x.abs(),
    "ReduceL1": lambda x: x.abs(), "ReduceLogSumExp": lambda x: x * 1.0,
}

AXES_INPUT_SINCE = {"ReduceSum": 13}  # the others: 18
REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2",
              "ReduceL1", "ReduceLogSumExp"]
FAMILY = {"ReduceSum": "ReduceSum/Mean (linear)", "ReduceMean": "ReduceSum/Mean (linear)",
          "ReduceMax": "ReduceMax/Min", "ReduceMin": "ReduceMax/Min",
          "ReduceSumSquare": "ReduceL1/L2/SumSquare/LSE", "ReduceL2": "ReduceL1/L2/SumSquare/LSE",
          "ReduceL1": "ReduceL1/L2/SumSquare/LSE", "ReduceLogSumExp": "ReduceL1/L2/SumSquare/LSE"}

X_SHAPE = (2, 3, 4)
AXES = [None, [1], [-1], [0, 2], [-3, -1], [0, 1, 2]]


def _out_shape(shape, axes, keepdims, noop=False):
    if not axes:
        if noop:
            return list(shape)
        axes = list(range(len(shape)))
    axes = {a % len(shape) for a in axes}
    if keepdims:
        return [1 if i in axes else d for i, d in enumerate(shape)]
    return [d for i, d in enumerate(shape) if i not in axes]


def _reduce_model(op, axes, keepdims, mode, noop=0, x_shape=X_SHAPE, runtime_axes=False):
    """mode 'attr': axes attribute at an opset before the change; 'input': axes input after it."""
    since = AXES_INPUT_SINCE.get(op, 18)
    attrs = {"keepdims": keepdims}
    inits, inputs, ins = {}, [("X", np.float32, list(x_shape))], ["X"]
    if mode == "attr":
        opset = since - 1 if since == 13 else 13
        if axes is not None:
            attrs["axes"] = axes
    else:
        opset = since if since == 18 else 13
        if noop:
            attrs["noop_with_empty_axes"] = 1
        if axes is not None:
            ins.append("axes")
            if runtime_axes:
                inputs.append(("axes", np.int64, [len(axes)]))
            else:
                inits["axes"] = np.array(axes, np.int64)
    node = helper.make_node(op, ins, ["Y"], name="reduce", **attrs)
    y_shape = _out_shape(x_shape, axes, keepdims, noop)
    if runtime_axes:  # shape inference cannot know the dims, only the rank
        y_shape = [None] * len(y_shape)
    return make_model([node], inputs, [("Y", np.float32, y_shape)], inits, opset=opset)


def _reduce_input(op, shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    if op == "ReduceL1":
        x = np.sign(x) * (np.abs(x) + 0.05)
    return x.astype(np.float32)


def _check_reduce(op, model, x, axes, keepdims, noop=False, feeds_extra=None):
    feeds = {"X": x, **(feeds_extra or {})}
    gm, _, grads, ups = run_gradient(model, feeds, ["X"])
    assert grads["X"].shape == x.shape
    _fd(model, ["X"], feeds, gm, FAMILY[op])
    if HAS_TORCH:
        if not axes and noop:
            fn = NOOP_ELEMENTWISE[op]
        else:
            dims = tuple(range(x.ndim)) if not axes else tuple(axes)
            red = _torch_reduce(op)
            fn = lambda t: red(t, dims, bool(keepdims))  # noqa: E731
        _torch_check(FAMILY[op], fn, [x], grads, ups, ["X"])
    return gm


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("axes", AXES, ids=lambda a: "all" if a is None else "ax" + "_".join(map(str, a)))
@pytest.mark.parametrize("mode", ["attr", "input"])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce(op, mode, axes, keepdims):
    x = _reduce_input(op, X_SHAPE, _seed(op, mode, axes, keepdims))
    model = _reduce_model(op, axes, keepdims, mode)
    _check_reduce(op, model, x, axes, keepdims)


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_noop_with_empty_axes(op, keepdims):
    """noop_with_empty_axes=1 and no axes: the op is elementwise (ORT squares/abs-es for SumSquare/L2/L1)."""
    x = _reduce_input(op, X_SHAPE, _seed(op, "noop", keepdims))
    model = _reduce_model(op, None, keepdims, "input", noop=1)
    _check_reduce(op, model, x, None, keepdims, noop=True)


@pytest.mark.parametrize("axes", [[1], [-1], [0, 2]], ids=lambda a: "ax" + "_".join(map(str, a)))
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2"])
def test_reduce_axes_known_only_at_run_time(op, keepdims, axes):
    """axes is a graph input: Unsqueeze(Y', axes) and n = Size(X)/Size(Y) are computed at run time."""
    x = _reduce_input(op, X_SHAPE, _seed(op, "runtime", axes, keepdims))
    model = _reduce_model(op, axes, keepdims, "input", runtime_axes=True)
    gm = _check_reduce(op, model, x, axes, keepdims, feeds_extra={"axes": np.array(axes, np.int64)})
    if not keepdims:
        assert any(n.op_type == "Unsqueeze" and "axes" in n.input for n in gm.graph.node)


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("noop", [0, 1])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
def test_reduce_runtime_axes_fed_empty(op, noop, keepdims):
    """A runtime axes input fed an empty tensor: all axes (noop=0) or elementwise (noop=1)."""
    opset = AXES_INPUT_SINCE.get(op, 18)
    node = helper.make_node(op, ["X", "axes"], ["Y"], name="reduce", keepdims=keepdims,
                            noop_with_empty_axes=noop)
    rank = 3 if noop or keepdims else 0
    model = make_model([node], [("X", np.float32, list(X_SHAPE)), ("axes", np.int64, [None])],
                       [("Y", np.float32, [None] * rank)], opset=opset)
    x = _reduce_input(op, X_SHAPE, _seed(op, "empty", noop, keepdims))
    _check_reduce(op, model, x, None, keepdims, noop=bool(noop), feeds_extra={"axes": np.zeros(0, np.int64)})


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMin", "ReduceLogSumExp"])
def test_reduce_axes_from_constant_node(op):
    """axes produced by a Constant node is read at build time (static Unsqueeze, constant count)."""
    opset = AXES_INPUT_SINCE.get(op, 18)
    nodes = [helper.make_node("Constant", [], ["ax"], name="axes", value=helper.make_tensor(
                 "ax", 7, [2], [0, -1])),
             helper.make_node(op, ["X", "ax"], ["Y"], name="reduce", keepdims=0)]
    model = make_model(nodes, [("X", np.float32, list(X_SHAPE))], [("Y", np.float32, [3])], opset=opset)
    x = _reduce_input(op, X_SHAPE, _seed(op, "const-node"))
    gm = _check_reduce(op, model, x, [0, -1], 0)
    assert not [n for n in gm.graph.node if n.op_type == "Size"]


@pytest.mark.parametrize("opset", [7, 9, 11])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL1"])
def test_reduce_old_opsets(op, opset):
    """Opset 7 has no Expand (a ones constant of X's static shape is used), < 9 no Sign."""
    axes, keepdims = [1, 2], 0
    x = _reduce_input(op, X_SHAPE, _seed(op, opset))
    node = helper.make_node(op, ["X"], ["Y"], name="reduce", axes=axes, keepdims=keepdims)
    model = make_model([node], [("X", np.float32, list(X_SHAPE))],
                       [("Y", np.float32, _out_shape(X_SHAPE, axes, keepdims))], opset=opset)
    gm = _check_reduce(op, model, x, axes, keepdims)
    if opset < 8:
        assert not [n for n in gm.graph.node if n.op_type == "Expand"]


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("axes", [[0], [1], [0, 1]], ids=lambda a: "ax" + "_".join(map(str, a)))
@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
def test_reduce_symbolic_batch(op, axes, keepdims):
    """Batch dim symbolic ('N'), also when it is reduced (ReduceMean's count then comes from Size)."""
    node = helper.make_node(op, ["X"], ["Y"], name="reduce", axes=axes, keepdims=keepdims)
    y_shape = _out_shape(("N", 3, 4), axes, keepdims)
    opset = 12 if op == "ReduceSum" else 17  # axes still an attribute
    model = make_model([node], [("X", np.float32, ["N", 3, 4])], [("Y", np.float32, y_shape)], opset=opset)
    for n in (1, 3):
        x = _reduce_input(op, (n, 3, 4), _seed(op, axes, keepdims, n))
        _check_reduce(op, model, x, axes, keepdims)


@pytest.mark.skipif(not HAS_TORCH, reason="tie convention is torch's")
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("axes", [None, [1], [0, 2]],
                         ids=lambda a: "all" if a is None else "ax" + "_".join(map(str, a)))
@pytest.mark.parametrize("op,opset", [("ReduceMax", 13), ("ReduceMin", 13), ("ReduceMax", 18), ("ReduceMax", 9)])
def test_reduce_max_min_ties_split_evenly_like_torch(op, opset, axes, keepdims):
    """Integer-valued inputs with many ties: gradient split evenly among the extrema (torch.amax/amin)."""
    x = np.random.default_rng(_seed(op, opset, axes, keepdims)).integers(0, 3, X_SHAPE).astype(np.float32)
    ins, inits, attrs = ["X"], {}, {"keepdims": keepdims}
    if axes is not None:
        if opset >= 18:
            ins.append("axes")
            inits["axes"] = np.array(axes, np.int64)
        else:
            attrs["axes"] = axes
    node = helper.make_node(op, ins, ["Y"], name="reduce", **attrs)
    model = make_model([node], [("X", np.float32, list(X_SHAPE))],
                       [("Y", np.float32, _out_shape(X_SHAPE, axes, keepdims))], inits, opset=opset)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    dims = tuple(range(3)) if axes is None else tuple(axes)
    red = _torch_reduce(op)
    _torch_check("ties (Reduce*/Max/Min)", lambda t: red(t, dims, bool(keepdims)), [x], grads, ups, ["X"])


# ------------------------------------------------------------- Softmax family
def _torch_softmax(log, axis, legacy, rank):
    import torch

    def fn(t):
        if legacy:  # coerce to 2-D at axis, normalise each row, shape back
            a = axis % rank
            rows = int(np.prod(t.shape[:a]))
            t2 = t.reshape(rows, -1)
            y = torch.log_softmax(t2, 1) if log else torch.softmax(t2, 1)
            return y.reshape(t.shape)
        return torch.log_softmax(t, axis) if log else torch.softmax(t, axis)

    return fn


SOFTMAX_CASES = [(opset, axis) for opset in (11, 13) for axis in (None, 0, 1, 2, -1, -2)]


@pytest.mark.parametrize("opset,axis", SOFTMAX_CASES, ids=[f"opset{o}-axis{a}" for o, a in SOFTMAX_CASES])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, opset, axis):
    """Opset 11 normalises the flattened trailing block at axis (default 1); 13 one axis (default -1)."""
    shape = (2, 3, 4)
    x = (np.random.default_rng(_seed(op, opset, axis)).standard_normal(shape) * 2).astype(np.float32)
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["X"], ["Y"], name="sm", **attrs)
    model = make_model([node], [("X", np.float32, list(shape))], [("Y", np.float32, list(shape))], opset=opset)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    _fd(model, ["X"], {"X": x}, gm, "Softmax/LogSoftmax")
    if HAS_TORCH:
        legacy = opset < 13
        eff = axis if axis is not None else (1 if legacy else -1)
        _torch_check("Softmax/LogSoftmax", _torch_softmax(op == "LogSoftmax", eff, legacy, 3),
                     [x], grads, ups, ["X"])


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_old_opsets(op, opset):
    shape = (2, 3, 2, 2)
    x = np.random.default_rng(_seed(op, opset)).standard_normal(shape).astype(np.float32)
    node = helper.make_node(op, ["X"], ["Y"], name="sm", axis=2)
    model = make_model([node], [("X", np.float32, list(shape))], [("Y", np.float32, list(shape))], opset=opset)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    _fd(model, ["X"], {"X": x}, gm, "Softmax/LogSoftmax")
    if HAS_TORCH:
        _torch_check("Softmax/LogSoftmax", _torch_softmax(op == "LogSoftmax", 2, True, 4), [x], grads, ups, ["X"])


@pytest.mark.parametrize("opset,axis", [(11, 1), (13, -1), (13, 0)])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_symbolic_batch(op, opset, axis):
    node = helper.make_node(op, ["X"], ["Y"], name="sm", axis=axis)
    model = make_model([node], [("X", np.float32, ["N", 3, 4])], [("Y", np.float32, ["N", 3, 4])], opset=opset)
    for n in (1, 3):
        x = np.random.default_rng(_seed(op, opset, axis, n)).standard_normal((n, 3, 4)).astype(np.float32)
        gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
        _fd(model, ["X"], {"X": x}, gm, "Softmax/LogSoftmax")
        if HAS_TORCH:
            _torch_check("Softmax/LogSoftmax", _torch_softmax(op == "LogSoftmax", axis, opset < 13, 3),
                         [x], grads, ups, ["X"])


def _unknown_rank_softmax(op, opset, axis):
    """Reshape(X, S) with S a runtime shape input: the Softmax input's rank is unknown."""
    nodes = [helper.make_node("Reshape", ["X", "S"], ["r"], name="reshape"),
             helper.make_node(op, ["r"], ["Y"], name="sm", axis=axis)]
    return make_model(nodes, [("X", np.float32, [2, 3, 4]), ("S", np.int64, [None])],
                      [("Y", np.float32, [None, None, None])], opset=opset)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_legacy_unknown_rank_uses_flatten(op):
    """Opset < 13 with unknown rank: Flatten at axis, 2-D formula, Reshape to Shape(X)."""
    model = _unknown_rank_softmax(op, 11, 1)
    x = np.random.default_rng(_seed(op, "unknown-rank")).standard_normal((2, 3, 4)).astype(np.float32)
    feeds = {"X": x, "S": np.array([2, 3, 4], np.int64)}
    gm, _, grads, ups = run_gradient(model, feeds, ["X"])
    assert any(n.op_type == "Flatten" for n in gm.graph.node)
    _fd(model, ["X"], feeds, gm, "Softmax/LogSoftmax")
    if HAS_TORCH:
        _torch_check("Softmax/LogSoftmax", _torch_softmax(op == "LogSoftmax", 1, True, 3), [x], grads, ups, ["X"])


def test_softmax13_unknown_rank_names_the_tensor():
    model = _unknown_rank_softmax("Softmax", 13, -1)
    with pytest.raises(onnxbp.ShapeError, match=r"rank of tensor 'r' is unknown"):
        onnxbp.gradient(model, ["X"])


def test_softmax_cross_entropy_chain():
    """LogSoftmax -> Mul(one-hot) -> ReduceSum -> ReduceMean: the usual loss, gradient softmax - onehot."""
    rng = np.random.default_rng(5)
    onehot = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 4)]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["z"], name="mm"),
             helper.make_node("LogSoftmax", ["z"], ["lp"], name="lsm", axis=-1),
             helper.make_node("Mul", ["lp", "T"], ["m"], name="pick"),
             helper.make_node("ReduceSum", ["m", "ax"], ["s"], name="rs", keepdims=0),
             helper.make_node("ReduceMean", ["s"], ["Y"], name="mean", keepdims=0)]
    model = make_model(nodes, [("X", np.float32, [4, 3])], [("Y", np.float32, [])],
                       {"W": rng.standard_normal((3, 5)).astype(np.float32), "T": onehot,
                        "ax": np.array([1], np.int64)}, opset=17)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
    _fd(model, ["X", "W"], {"X": x}, gm, "Softmax/LogSoftmax")
    if HAS_TORCH:
        import torch

        w = numpy_helper.to_array(model.graph.initializer[0])
        tt = torch.tensor(onehot, dtype=torch.float64)
        f = lambda a, b: (torch.log_softmax(a @ b, -1) * tt).sum(1).mean()  # noqa: E731
        _torch_check("Softmax/LogSoftmax", f, [x, w], grads, ups, ["X", "W"])


# ------------------------------------------------------ variadic Mean/Max/Min
VARIADIC_SHAPES = [[(3, 4)], [(3, 4), (3, 4)], [(3, 4), (4,)], [(2, 1, 4), (3, 1), ()],
                   [(1, 3, 1), (2, 1, 4), (3, 4)]]


def _torch_variadic(op):
    import torch

    def fn(*ts):
        if op == "Mean":
            return sum(ts) / len(ts)
        b = torch.broadcast_tensors(*ts)
        st = torch.stack(b)
        return torch.amax(st, 0) if op == "Max" else torch.amin(st, 0)

    return fn


@pytest.mark.parametrize("shapes", VARIADIC_SHAPES, ids=lambda ss: "-".join("x".join(map(str, s)) or "s" for s in ss))
@pytest.mark.parametrize("opset", [8, 13])
@pytest.mark.parametrize("op", ["Mean", "Max", "Min"])
def test_variadic(op, opset, shapes):
    rng = np.random.default_rng(_seed(op, opset, shapes))
    names = [f"X{i}" for i in range(len(shapes))]
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ys = list(np.broadcast_shapes(*shapes))
    node = helper.make_node(op, names, ["Y"], name="v")
    model = make_model([node], [(n, np.float32, list(s)) for n, s in zip(names, shapes)],
                       [("Y", np.float32, ys)], opset=opset)
    feeds = dict(zip(names, xs))
    gm, _, grads, ups = run_gradient(model, feeds, names)
    for n, s in zip(names, shapes):
        assert grads[n].shape == s
    _fd(model, names, feeds, gm, "Mean/Max/Min (variadic)")
    if HAS_TORCH:
        _torch_check("Mean/Max/Min (variadic)", _torch_variadic(op), xs, grads, ups, names)


@pytest.mark.parametrize("op", ["Max", "Min", "Mean"])
def test_variadic_opset7_same_shapes(op):
    """Opset 7 Max/Min/Mean have no broadcasting; the masks are built without float Equal."""
    rng = np.random.default_rng(_seed(op, 7))
    xs = [rng.standard_normal((2, 5)).astype(np.float32) for _ in range(3)]
    node = helper.make_node(op, ["A", "B", "C"], ["Y"], name="v")
    model = make_model([node], [(n, np.float32, [2, 5]) for n in "ABC"], [("Y", np.float32, [2, 5])], opset=7)
    feeds = dict(zip("ABC", xs))
    gm, _, grads, ups = run_gradient(model, feeds, list("ABC"))
    assert not [n for n in gm.graph.node if n.op_type in ("Equal", "Where")]
    _fd(model, list("ABC"), feeds, gm, "Mean/Max/Min (variadic)")
    if HAS_TORCH:
        _torch_check("Mean/Max/Min (variadic)", _torch_variadic(op), xs, grads, ups, list("ABC"))


@pytest.mark.skipif(not HAS_TORCH, reason="tie convention is torch's")
@pytest.mark.parametrize("op", ["Max", "Min"])
def test_variadic_ties_split_like_torch_maximum(op):
    """Two inputs tied: 0.5/0.5 as torch.maximum/minimum; three-way ties split in thirds (torch.amax of the stack)."""
    import torch

    a = np.array([[1.0, 2.0, 3.0, 0.5]], np.float32)
    b = np.array([[1.0, 1.0, 3.0, 0.5]], np.float32)
    c = np.array([[1.0, 2.0, 0.0, 4.0]], np.float32)
    node = helper.make_node(op, ["A", "B"], ["Y"], name="v")
    model = make_model([node], [("A", np.float32, [1, 4]), ("B", np.float32, [1, 4])],
                       [("Y", np.float32, [1, 4])], opset=13)
    _, _, grads, ups = run_gradient(model, {"A": a, "B": b}, ["A", "B"])
    pair = torch.maximum if op == "Max" else torch.minimum
    _torch_check("ties (Reduce*/Max/Min)", pair, [a, b], grads, ups, ["A", "B"])
    node = helper.make_node(op, ["A", "B", "C"], ["Y"], name="v")
    model = make_model([node], [(n, np.float32, [1, 4]) for n in "ABC"], [("Y", np.float32, [1, 4])], opset=13)
    _, _, grads, ups = run_gradient(model, {"A": a, "B": b, "C": c}, list("ABC"))
    _torch_check("ties (Reduce*/Max/Min)", _torch_variadic(op), [a, b, c], grads, ups, list("ABC"))


@pytest.mark.skipif(not HAS_TORCH, reason="compares torch's subgradient at 0")
@pytest.mark.parametrize("opset", [11, 18])
def test_reduce_l2_all_zero_group_matches_torch(opset):
    """A group of zeros has norm 0: gradient 0 there (torch), finite everywhere."""
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    x[1] = 0.0
    ins, inits, attrs = ["X"], {}, {"keepdims": 0}
    if opset >= 18:
        ins.append("axes")
        inits["axes"] = np.array([1], np.int64)
    else:
        attrs["axes"] = [1]
    node = helper.make_node("ReduceL2", ins, ["Y"], name="l2", **attrs)
    model = make_model([node], [("X", np.float32, [3, 4])], [("Y", np.float32, [3])], inits, opset=opset)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    assert np.all(np.isfinite(grads["X"]))
    _torch_check(FAMILY["ReduceL2"], lambda t: torch_norm(t), [x], grads, ups, ["X"])


def torch_norm(t):
    import torch

    return torch.linalg.vector_norm(t, 2, dim=1)


@pytest.mark.parametrize("op", ["Max", "Mean"])
def test_variadic_symbolic_batch(op):
    """Max/Mean of a [N, 4] input and a [4] parameter: the parameter's gradient sums over N."""
    node = helper.make_node(op, ["X", "B"], ["Y"], name="v")
    model = make_model([node], [("X", np.float32, ["N", 4])], [("Y", np.float32, ["N", 4])],
                       {"B": np.linspace(-1, 1, 4).astype(np.float32)}, opset=13)
    for n in (1, 5):
        x = np.random.default_rng(_seed(op, n)).standard_normal((n, 4)).astype(np.float32)
        gm, _, grads, ups = run_gradient(model, {"X": x}, ["X", "B"])
        assert grads["B"].shape == (4,)
        _fd(model, ["X", "B"], {"X": x}, gm, "Mean/Max/Min (variadic)")
        if HAS_TORCH:
            b = numpy_helper.to_array(model.graph.initializer[0])
            _torch_check("Mean/Max/Min (variadic)", _torch_variadic(op), [x, b], grads, ups, ["X", "B"])


def test_max_of_a_tensor_with_itself():
    """Max(X, X): each input gets half, the two contributions sum to Y' (as torch.maximum(x, x))."""
    x = np.random.default_rng(2).standard_normal((3, 3)).astype(np.float32)
    node = helper.make_node("Max", ["X", "X"], ["Y"], name="v")
    model = make_model([node], [("X", np.float32, [3, 3])], [("Y", np.float32, [3, 3])], opset=13)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    _record("ties (Reduce*/Max/Min)", torch_err=assert_close(grads["X"], ups["Y"], 1e-6, 0, "Max(X, X)"))


# ------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("mode", ["attr", "input"])
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce_4d_every_axes_subset(op, mode, keepdims):
    """All 15 non-empty axes subsets of a 4-D tensor, with mixed-sign spellings."""
    import itertools

    shape = (2, 3, 4, 5)
    for r in range(1, 5):
        for subset in itertools.combinations(range(4), r):
            axes = [a - 4 if (a + r) % 2 else a for a in subset]
            x = _reduce_input(op, shape, _seed(op, mode, keepdims, subset))
            model = _reduce_model(op, axes, keepdims, mode, x_shape=shape)
            _check_reduce(op, model, x, axes, keepdims)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [9, 11, 13, 18])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_4d_every_axis(op, opset):
    shape = (2, 3, 4, 5)
    for axis in range(-4, 4):
        if opset < 11 and axis < 0:
            continue
        x = np.random.default_rng(_seed(op, opset, axis)).standard_normal(shape).astype(np.float32) * 3
        node = helper.make_node(op, ["X"], ["Y"], name="sm", axis=axis)
        model = make_model([node], [("X", np.float32, list(shape))], [("Y", np.float32, list(shape))],
                           opset=opset)
        gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
        _fd(model, ["X"], {"X": x}, gm, "Softmax/LogSoftmax")
        if HAS_TORCH:
            _torch_check("Softmax/LogSoftmax", _torch_softmax(op == "LogSoftmax", axis, opset < 13, 4),
                         [x], grads, ups, ["X"])


def test_reduce_sum_opset7_symbolic_dim_needs_static_shape():
    """Opset 7 has no Expand: ReduceSum/Mean broadcast back with a ones constant, which needs static dims."""
    node = helper.make_node("ReduceSum", ["X"], ["Y"], name="rs", axes=[1], keepdims=0)
    model = make_model([node], [("X", np.float32, ["N", 3])], [("Y", np.float32, ["N"])], opset=7)
    with pytest.raises(onnxbp.ShapeError, match=r"dim 0 of tensor 'X' is symbolic \('N'\)"):
        onnxbp.gradient(model, ["X"])
