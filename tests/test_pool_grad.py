"""Pooling gradients (onnxbp/rules/pool.py): MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.

References, with tolerances stated where they are used:

* finite differences (onnxbp.check_gradients through assert_fd; float64
  elements + directions where onnxruntime runs the forward in float64, e.g.
  MaxPool, else float32 random directions), rtol 1e-3, on tie-free inputs
  (distinct values spaced >= 0.05 apart, so no step crosses a kink);
* torch autograd in float64 where torch expresses the case: explicit pads
  through F.pad (-inf for max), ceil_mode windows by extra end padding, the
  output cropped to onnxruntime's output size; native avg_pool where torch's
  count_include_pad semantics apply (symmetric pads <= k/2, no dilation);
* for AveragePool, the exact linear map of onnxruntime's forward, probed with
  basis vectors (one batch item per input element): X' = J^T Y';
* for ties, onnxruntime's own Indices: the gradient must land exactly where
  they point (numpy scatter-add).

Grids: hand-picked edge cases plus seeded samplers over dims 1/2/3, kernel,
strides, dilations, explicit asymmetric pads, auto_pad, ceil_mode,
storage_order (MaxPool) and count_include_pad (AveragePool).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gradutil import (
    HAS_TORCH,
    assert_close,
    assert_fd,
    assert_standard,
    make_model,
    run_gradient,
    session,
)
from onnx import helper

import onnxbp
from onnxbp.errors import ShapeError, UnsupportedAttributeError
from onnxbp.rules import pool_arith as P

AUTO = ("NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


# ------------------------------------------------------------------ cases


def _case(op, n, k, s=None, d=None, pads=None, auto_pad="NOTSET", ceil=0, order=0, cip=0,
          C=2, batch=2):
    dims = len(n)
    return {"op": op, "n": list(n), "k": list(k), "s": list(s or [1] * dims),
            "d": list(d or [1] * dims), "pads": None if pads is None else list(pads),
            "auto_pad": auto_pad, "ceil": ceil, "order": order, "cip": cip, "C": C, "batch": batch}


def _geometry(c):
    dims = len(c["n"])
    pads = c["pads"] or [0] * (2 * dims)
    return [P.pool_axis(c["n"][i], c["k"][i], c["s"][i], c["d"][i], pads[i], pads[dims + i],
                        c["auto_pad"], c["ceil"]) for i in range(dims)]


def _attrs(c):
    a = {"kernel_shape": c["k"], "strides": c["s"]}
    if any(v > 1 for v in c["d"]):
        a["dilations"] = c["d"]
    if c["auto_pad"] != "NOTSET":
        a["auto_pad"] = c["auto_pad"]
    elif c["pads"] is not None:
        a["pads"] = c["pads"]
    if c["ceil"]:
        a["ceil_mode"] = 1
    if c["op"] == "MaxPool" and c["order"]:
        a["storage_order"] = 1
    if c["op"] == "AveragePool":
        a["count_include_pad"] = c["cip"]
    return a


def _model(c, opset=None, indices=False, batch_dim=None):
    dims = len(c["n"])
    opset = opset or (19 if c["op"] == "AveragePool" else 17)
    outs = ["Y", "I"] if indices else ["Y"]
    node = helper.make_node(c["op"], ["X"], outs, **_attrs(c))
    nb = c["batch"] if batch_dim is None else batch_dim
    ospec = [("Y", np.float32, [None] * (dims + 2))]
    if indices:
        ospec.append(("I", np.int64, [None] * (dims + 2)))
    return make_model([node], [("X", np.float32, [nb, c["C"]] + c["n"])], ospec, opset=opset)


def _inferred(c):
    """The output spatial sizes onnx's shape inference gives the pool (before onnxbp.repair)."""
    m = onnx.shape_inference.infer_shapes(_model(c))
    return [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim[2:]]


def _inferred_agrees(c):
    """onnx shape inference and onnxruntime give the same output size."""
    return _inferred(c) == [o for _, _, o in _geometry(c)]


def _ceil_dropped(c):
    """onnx infers the ceil_mode window onnxruntime drops (onnxbp.repair aligns the model)."""
    return P.ceil_mode_disagreement(_inferred(c), [o for _, _, o in _geometry(c)])


def _pure_pad(c):
    """Some window reads no element of X (dilations): MaxPool outputs -FLT_MAX there."""
    geo = _geometry(c)
    return not all(all(P.real_windows(c["n"][i], c["k"][i], c["s"][i], c["d"][i], *geo[i]))
                   for i in range(len(c["n"])))


def _quiet_session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _valid(c):
    geo = _geometry(c)
    if any(o < 1 for _, _, o in geo):
        return False
    if c["auto_pad"] == "NOTSET" and c["pads"] and any(
            p >= c["k"][i % len(c["n"])] for i, p in enumerate(c["pads"])):
        return False  # onnxruntime: "Pad should be smaller than kernel"
    try:
        if not (_inferred_agrees(c) or (c["ceil"] and _ceil_dropped(c))):
            return False
        # onnxruntime runs it (MaxPool refuses the negative SAME pads that AveragePool takes)
        x = np.zeros([c["batch"], c["C"]] + c["n"], np.float32)
        _quiet_session(_model(c)).run(None, {"X": x})
        if c["op"] == "MaxPool":
            _quiet_session(_model(c, indices=True)).run(None, {"X": x})
        return True
    except Exception:  # noqa: BLE001 - onnx or onnxruntime rejects the attribute combination
        return False


def _sample(op, rng, count):
    out = []
    while len(out) < count:
        dims = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        kmax, nrange = {1: (4, (3, 12)), 2: (3, (3, 9)), 3: (3, (2, 6))}[dims]
        k = [int(rng.integers(1, kmax + 1)) for _ in range(dims)]
        s = [int(rng.choice([1, 1, 2, 3])) for _ in range(dims)]
        d = [int(rng.choice([1, 1, 1, 2])) for _ in range(dims)]
        if op == "AveragePool" and rng.random() < 0.3:
            d = [1] * dims
        n = [int(rng.integers(*nrange)) for _ in range(dims)]
        auto_pad = str(rng.choice(AUTO))
        pads = None
        if auto_pad == "NOTSET" and rng.random() < 0.8:
            pads = [int(rng.integers(0, k[i % dims])) for i in range(2 * dims)]
        c = _case(op, n, k, s, d, pads, auto_pad, ceil=int(rng.random() < 0.4),
                  order=int(rng.random() < 0.3), cip=int(rng.random() < 0.5),
                  C=int(rng.integers(1, 4)), batch=int(rng.integers(1, 3)))
        if _valid(c):
            out.append(c)
    return out


MAX_EDGE = [
    # overlapping windows: kernel 3 stride 1 and kernel 3 stride 2
    _case("MaxPool", (7, 7), (3, 3), (1, 1)),
    _case("MaxPool", (9, 8), (3, 3), (2, 2), pads=(1, 1, 1, 1)),
    _case("MaxPool", (10,), (3,), (1,), pads=(2, 1)),
    _case("MaxPool", (5, 4, 6), (3, 2, 3), (1, 2, 2), pads=(1, 0, 2, 0, 1, 1)),
    # storage_order=1 (column-major Indices) 2-D and 3-D
    _case("MaxPool", (6, 7), (3, 2), (2, 1), pads=(1, 0, 0, 1), order=1),
    _case("MaxPool", (4, 5, 3), (2, 3, 2), (1, 2, 1), order=1, ceil=1),
    # ceil_mode, incl. windows that run past the padded input
    _case("MaxPool", (8, 8), (3, 3), (2, 2), ceil=1),
    _case("MaxPool", (6,), (3,), (2,), pads=(1, 1), ceil=1),
    # ceil_mode windows that would start in the end padding: onnxruntime drops them, onnx infers them
    _case("MaxPool", (5,), (3,), (3,), pads=(0, 2), ceil=1),
    _case("MaxPool", (5, 7), (3, 3), (3, 3), pads=(1, 1, 1, 1), ceil=1),
    _case("MaxPool", (5, 6), (2, 3), (3, 3), (1, 1), pads=(1, 0, 1, 2), ceil=1, order=1),
    # dilations, incl. windows made only of padding (they output -FLT_MAX)
    _case("MaxPool", (9, 7), (3, 2), (2, 1), (2, 3), pads=(2, 1, 0, 1)),
    _case("MaxPool", (3,), (2,), (1,), (4,), pads=(1, 1)),
    # auto_pad modes (onnxruntime's MaxPool refuses the negative SAME pads of kernel < stride)
    _case("MaxPool", (7, 6), (3, 3), (2, 3), auto_pad="SAME_UPPER"),
    _case("MaxPool", (7, 6), (3, 4), (2, 3), auto_pad="SAME_LOWER"),
    _case("MaxPool", (7, 6), (3, 3), (2, 2), auto_pad="VALID"),
    _case("MaxPool", (8, 5, 4), (2, 3, 2), (2, 2, 1), auto_pad="SAME_UPPER", order=1),
    # 1x1 kernel, kernel == input, stride > kernel
    _case("MaxPool", (5, 5), (1, 1), (2, 2)),
    _case("MaxPool", (3, 4), (3, 4)),
    _case("MaxPool", (11,), (2,), (4,), pads=(1, 0)),
]

AVG_EDGE = [
    # count_include_pad 0/1 with asymmetric pads and ceil_mode windows past the padded input
    _case("AveragePool", (8, 8), (3, 3), (2, 2), pads=(1, 0, 1, 1), cip=0, ceil=1),
    _case("AveragePool", (8, 8), (3, 3), (2, 2), pads=(1, 0, 1, 1), cip=1, ceil=1),
    _case("AveragePool", (8,), (3,), (2,), pads=(1, 2), cip=1, ceil=1),
    _case("AveragePool", (8,), (3,), (2,), pads=(1, 2), cip=0, ceil=1),
    # ceil_mode windows that would start in the end padding (dropped by onnxruntime), both divisors
    _case("AveragePool", (5,), (3,), (3,), pads=(0, 2), cip=0, ceil=1),
    _case("AveragePool", (5,), (3,), (3,), pads=(0, 2), cip=1, ceil=1),
    _case("AveragePool", (5, 7), (3, 3), (3, 3), pads=(1, 1, 1, 1), cip=0, ceil=1),
    _case("AveragePool", (5, 7), (3, 3), (3, 3), pads=(1, 1, 1, 1), cip=1, ceil=1),
    # overlapping windows, 3-D, dilations (opset 19)
    _case("AveragePool", (6, 5, 4), (3, 2, 2), (1, 1, 2), pads=(1, 0, 1, 1, 1, 0), cip=1),
    _case("AveragePool", (9, 7), (3, 2), (2, 1), (2, 3), pads=(2, 1, 0, 1), cip=0),
    _case("AveragePool", (9, 7), (3, 2), (2, 1), (2, 3), pads=(2, 1, 0, 1), cip=1),
    _case("AveragePool", (3,), (2,), (1,), (4,), pads=(1, 1), cip=0),
    # auto_pad, incl. onnxruntime's negative SAME end pad (kernel < stride)
    _case("AveragePool", (7, 6), (3, 2), (2, 3), auto_pad="SAME_UPPER", cip=1),
    _case("AveragePool", (7, 6), (3, 2), (2, 3), auto_pad="SAME_LOWER", cip=0),
    _case("AveragePool", (7,), (1,), (3,), auto_pad="SAME_LOWER", cip=1),
    _case("AveragePool", (7, 6), (2, 3), (2, 2), auto_pad="VALID"),
    # a negative SAME end pad that also crops a dilated ceil_mode window
    _case("AveragePool", (3, 2, 3), (2, 2, 2), (3, 1, 2), (2, 1, 1), auto_pad="SAME_UPPER", ceil=1, cip=0),
    _case("AveragePool", (3, 2, 3), (2, 2, 2), (3, 1, 2), (2, 1, 1), auto_pad="SAME_UPPER", ceil=1, cip=1),
    # untouched trailing rows, global-like kernel, stride > kernel
    _case("AveragePool", (8, 8), (3, 3), (2, 2)),
    _case("AveragePool", (3, 4), (3, 4)),
    _case("AveragePool", (11,), (2,), (4,), pads=(1, 0), cip=1),
]

assert all(_valid(c) for c in MAX_EDGE + AVG_EDGE), [c for c in MAX_EDGE + AVG_EDGE if not _valid(c)]
MAX_GRID = MAX_EDGE + _sample("MaxPool", np.random.default_rng(20261122), 150)
AVG_GRID = AVG_EDGE + _sample("AveragePool", np.random.default_rng(11222026), 100)
MAX_SLOW = _sample("MaxPool", np.random.default_rng(7), 400)
AVG_SLOW = _sample("AveragePool", np.random.default_rng(8), 300)


def _ids(grid):
    def one(c):
        a = "x".join(map(str, c["n"])) + f"_k{'x'.join(map(str, c['k']))}_s{'x'.join(map(str, c['s']))}"
        a += f"_d{'x'.join(map(str, c['d']))}"
        a += f"_p{'.'.join(map(str, c['pads']))}" if c["pads"] else ""
        a += "" if c["auto_pad"] == "NOTSET" else f"_{c['auto_pad']}"
        a += "_ceil" if c["ceil"] else ""
        a += "_cm" if c["op"] == "MaxPool" and c["order"] else ""
        a += f"_cip{c['cip']}" if c["op"] == "AveragePool" else ""
        return a
    return [f"{i}-{one(c)}" for i, c in enumerate(grid)]


def _tie_free(shape, rng):
    """Distinct values 0.05 apart in random order (kinks are far from any FD step)."""
    size = int(np.prod(shape))
    return (rng.permutation(size).astype(np.float64) * 0.05 - size * 0.025).reshape(shape).astype(np.float32)


# ------------------------------------------------------------------ torch references


def _torch_pool(c, x, dy, y_shape):
    """dX by torch autograd (float64); None if torch cannot express the case."""
    import torch
    import torch.nn.functional as F

    dims = len(c["n"])
    geo = _geometry(c)
    out = list(y_shape[2:])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    t = xt
    pad_spec = []
    for i in reversed(range(dims)):  # F.pad lists the last axis first
        pb, pe, _ = geo[i]
        ek = (c["k"][i] - 1) * c["d"][i] + 1
        total = c["n"][i] + pb + pe
        extra = max(0, (out[i] - 1) * c["s"][i] + ek - total)
        pad_spec += [pb, pe + extra]
    if c["op"] == "MaxPool":
        t = F.pad(t, pad_spec, value=float("-inf"))  # negative values crop
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        y = fn(t, c["k"], c["s"], 0, c["d"], ceil_mode=False)
    else:
        # native torch avg_pool: symmetric pads <= k/2, no dilation (torch's count semantics)
        if any(v > 1 for v in c["d"]):
            return None
        pb = [g[0] for g in geo]
        pe = [g[1] for g in geo]
        if pb != pe or any(p < 0 or 2 * p > k or n < k for p, k, n in zip(pb, c["k"], c["n"])):
            return None  # (onnxruntime also pools an input smaller than the kernel; torch refuses)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        y = fn(t, c["k"], c["s"], pb, ceil_mode=bool(c["ceil"]), count_include_pad=bool(c["cip"]))
    y = y[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]
    assert list(y.shape) == list(y_shape), f"torch reference shape {tuple(y.shape)} != {y_shape}"
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return xt.grad.numpy()


def _ort_avg_jacobian(c):
    """The exact linear map of onnxruntime's AveragePool for one (n, c) plane: (out, in)."""
    total = int(np.prod(c["n"]))
    cc = dict(c, C=1, batch=total)
    sess = session(_model(cc))
    basis = np.eye(total, dtype=np.float32).reshape([total, 1] + c["n"])
    y = sess.run(None, {"X": basis})[0]
    return y.reshape(total, -1).T.astype(np.float64)


# ------------------------------------------------------------------ MaxPool


def _check_max(c, seed):
    rng = np.random.default_rng(seed)
    m = _model(c)
    x = _tie_free([c["batch"], c["C"]] + c["n"], rng)
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"], seed=seed)
    y, dy = outs["Y"], ups["Y"]
    # the forward outputs of the gradient model equal the forward model's
    np.testing.assert_array_equal(y, session(m).run(None, {"X": x})[0])
    if HAS_TORCH:
        ref = _torch_pool(c, x, dy, y.shape)
        assert_close(grads["X"], ref, 1e-6, 1e-7, f"MaxPool dX vs torch {c}")
    if not _pure_pad(c):  # a constant -FLT_MAX output overflows the FD sum; torch covers it
        assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm, seed=seed)
    return grads["X"], dy


@pytest.mark.parametrize("c", MAX_GRID, ids=_ids(MAX_GRID))
def test_maxpool_grid(c):
    _check_max(c, seed=len(c["n"]) * 1000 + sum(c["n"]))


@pytest.mark.slow
@pytest.mark.parametrize("c", MAX_SLOW, ids=_ids(MAX_SLOW))
def test_maxpool_grid_slow(c):
    _check_max(c, seed=17)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("c", [
    _case("MaxPool", (8, 8), (3, 3), (1, 1)),
    _case("MaxPool", (9,), (3,), (1,), pads=(1, 1)),
    _case("MaxPool", (5, 6, 5), (3, 3, 3), (1, 1, 2)),
], ids=["2d-k3s1", "1d-k3s1-pad", "3d-k3s1"])
def test_maxpool_overlap_accumulates(c):
    """Elements selected by several windows get the sum of their Y' (an overwriting
    scatter or MaxUnpool would keep one): equal to torch autograd and FD."""
    rng = np.random.default_rng(5)
    m = _model(c, indices=True)
    x = _tie_free([c["batch"], c["C"]] + c["n"], rng)
    y, idx = session(m).run(None, {"X": x})
    counts = np.bincount(idx.reshape(-1), minlength=x.size)
    assert counts.max() >= 3, "the case must have elements selected by several windows"
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"], seed=5)
    np.testing.assert_array_equal(outs["I"], idx)
    ref = _torch_pool(c, x, ups["Y"], y.shape)
    assert_close(grads["X"], ref, 1e-6, 1e-7, "overlapping MaxPool vs torch")
    # an overwriting scatter loses gradient exactly at the multiply-selected elements
    overwrite = np.zeros(x.size)
    overwrite[idx.reshape(-1)] = ups["Y"].reshape(-1)
    multi = counts.reshape(x.shape) > 1
    assert not np.allclose(overwrite.reshape(x.shape)[multi], ref[multi])
    assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm)


TIE_CASES = [
    _case("MaxPool", (6, 6), (3, 3), (1, 1)),
    _case("MaxPool", (7, 6), (3, 2), (2, 1), pads=(1, 0, 1, 1), order=1),
    _case("MaxPool", (9,), (3,), (2,), pads=(1, 1), ceil=1),
    _case("MaxPool", (4, 5, 4), (2, 3, 2), (1, 1, 2), order=1),
    _case("MaxPool", (4, 5, 4), (3, 2, 2), (2, 1, 1), pads=(1, 0, 0, 1, 1, 1)),
    _case("MaxPool", (8, 7), (2, 2), (1, 2), (2, 1), pads=(1, 1, 0, 0), order=1),
    _case("MaxPool", (7, 7), (3, 3), (2, 2), auto_pad="SAME_LOWER"),
]


@pytest.mark.parametrize("c", TIE_CASES, ids=_ids(TIE_CASES))
@pytest.mark.parametrize("low_opset", [False, True], ids=["opset17", "opset11"])
def test_maxpool_ties_follow_ort_indices(c, low_opset):
    """Integer inputs (many ties): X' is the scatter-add of Y' at onnxruntime's own Indices."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 3, [3, c["C"]] + c["n"]).astype(np.float32)
    c = dict(c, batch=3)
    opset = 11 if low_opset else 17
    fwd = _model(c, opset=opset, indices=True)
    y, idx = session(fwd).run(None, {"X": x})
    # without the Indices output in the model: onnxbp adds it to the forward node
    _gm, outs, grads, ups = run_gradient(_model(c, opset=opset), {"X": x}, ["X"], seed=3)
    np.testing.assert_array_equal(outs["Y"], y)
    plane = int(np.prod(c["n"]))
    flat = idx.reshape(-1)
    if c["order"]:
        base, r = flat - flat % plane, flat % plane
        flat = base + np.ravel_multi_index(np.unravel_index(r, c["n"], order="F"), c["n"])
    expect = np.zeros(x.size, dtype=np.float64)
    np.add.at(expect, flat, ups["Y"].reshape(-1).astype(np.float64))
    np.testing.assert_allclose(grads["X"], expect.reshape(x.shape), rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(grads["X"]) < x.size  # ties: some elements get nothing


@pytest.mark.parametrize("opset", [1, 6, 7, 8, 10, 11, 12, 13, 15])
@pytest.mark.parametrize("indices", [False, True], ids=["Y", "Y+Indices"])
def test_maxpool_old_opsets_converted(opset, indices):
    """Opset < 16 models are converted (ScatterElements reduction=add needs 16); the
    forward outputs stay identical and the gradient matches FD/torch."""
    if indices and opset < 8:
        pytest.skip("MaxPool has no Indices output before opset 8")
    extra = {} if opset < 10 else {"ceil": 1}
    c = _case("MaxPool", (7, 6), (3, 3), (2, 1), pads=(1, 1, 0, 1), order=int(opset >= 8), **extra)
    if opset < 8:
        c["order"] = 0
    m = _model(c, opset=opset, indices=indices)
    x = _tie_free([c["batch"], c["C"]] + c["n"], np.random.default_rng(opset))
    before = session(m).run(None, {"X": x})
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"])
    assert onnxbp.engine.default_opset(gm) == 16
    for name, ref in zip([o.name for o in m.graph.output], before):
        np.testing.assert_array_equal(outs[name], ref)
    if HAS_TORCH:
        assert_close(grads["X"], _torch_pool(c, x, ups["Y"], outs["Y"].shape), 1e-6, 1e-7, "converted")
    assert_fd(m, ["X"], feeds={"X": x})


def test_maxpool_conversion_failure_is_clear(monkeypatch):
    """When onnx's converter cannot lift the model to opset 16 the error says so."""
    def broken(model, target):
        raise RuntimeError("No Adapter For MaxPool")

    monkeypatch.setattr(onnx.version_converter, "convert_version", broken)
    c = _case("MaxPool", (5, 5), (2, 2))
    with pytest.raises(onnxbp.errors.UnsupportedOpError,
                       match=r"needs opset 16.*could not convert the model from opset 11.*No Adapter"):
        onnxbp.gradient(_model(c, opset=11), ["X"])


# ------------------------------------------------------------------ AveragePool


def _check_avg(c, seed, fd=True):
    rng = np.random.default_rng(seed)
    m = _model(c)
    x = rng.standard_normal([c["batch"], c["C"]] + c["n"]).astype(np.float32)
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"], seed=seed)
    dy = ups["Y"].astype(np.float64)
    J = _ort_avg_jacobian(c)
    planes = dy.reshape(c["batch"] * c["C"], -1)
    ref = (planes @ J).reshape(x.shape)
    assert_close(grads["X"], ref, 1e-5, 1e-6, f"AveragePool dX vs onnxruntime's linear map {c}")
    if HAS_TORCH:
        tref = _torch_pool(c, x, ups["Y"], outs["Y"].shape)
        if tref is not None:
            assert_close(grads["X"], tref, 1e-5, 1e-6, f"AveragePool dX vs torch {c}")
    if fd:
        assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm, seed=seed)


@pytest.mark.parametrize("c", AVG_GRID, ids=_ids(AVG_GRID))
def test_averagepool_grid(c):
    _check_avg(c, seed=len(c["n"]) * 1000 + sum(c["n"]))


@pytest.mark.slow
@pytest.mark.parametrize("c", AVG_SLOW, ids=_ids(AVG_SLOW))
def test_averagepool_grid_slow(c):
    _check_avg(c, seed=23)


def test_avg_counts_match_onnxruntime_probe():
    """The pure divisor helper equals 1 / (onnxruntime's Jacobian entries) on every window."""
    for c in AVG_EDGE:
        J = _ort_avg_jacobian(c)
        geo = _geometry(c)
        cnt = P.outer([P.avg_counts(c["n"][i], c["k"][i], c["s"][i], c["d"][i], geo[i][0], geo[i][1],
                                    geo[i][2], c["cip"]) for i in range(len(c["n"]))]).reshape(-1)
        for row, want in zip(J, cnt):
            nz = row[row != 0]
            if nz.size:
                np.testing.assert_allclose(1.0 / nz, want, rtol=1e-6, err_msg=str(c))


@pytest.mark.parametrize("opset", [9, 10, 11, 19])
def test_averagepool_opsets(opset):
    c = _case("AveragePool", (7, 6), (3, 2), (2, 2), pads=(1, 1, 1, 0), cip=1,
              ceil=int(opset >= 10))
    m = _model(c, opset=opset)
    x = np.random.default_rng(opset).standard_normal([2, 2, 7, 6]).astype(np.float32)
    _gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"])
    np.testing.assert_array_equal(outs["Y"], session(m).run(None, {"X": x})[0])
    ref = (ups["Y"].reshape(4, -1).astype(np.float64) @ _ort_avg_jacobian(c)).reshape(x.shape)
    assert_close(grads["X"], ref, 1e-5, 1e-6, f"AveragePool opset {opset}")


# ------------------------------------------------------------------ symbolic batch / channels


@pytest.mark.parametrize("c", [
    _case("MaxPool", (7, 6), (3, 3), (2, 2), pads=(1, 1, 1, 0), order=1, C=3),
    _case("MaxPool", (9,), (3,), (2,), (2,), pads=(1, 2), ceil=1, C=3),
    _case("AveragePool", (7, 6), (3, 3), (2, 2), pads=(1, 1, 1, 0), cip=0, ceil=1, C=3),
    _case("AveragePool", (5, 4, 4), (2, 2, 3), (2, 1, 1), cip=1, C=3),
], ids=["max2d", "max1d", "avg2d", "avg3d"])
def test_symbolic_batch_and_channels(c):
    """Batch (and channels) symbolic: one gradient model runs at several batch sizes."""
    dims = len(c["n"])
    node = helper.make_node(c["op"], ["X"], ["Y"], **_attrs(c))
    opset = 19 if c["op"] == "AveragePool" else 17
    m = make_model([node], [("X", np.float32, ["N", "C"] + c["n"])],
                   [("Y", np.float32, [None] * (dims + 2))], opset=opset)
    gm = onnxbp.gradient(m, ["X"])
    assert_standard(gm)
    sess = session(gm)
    for batch in (1, 3):
        x = _tie_free([batch, c["C"]] + c["n"], np.random.default_rng(batch))
        y = session(m).run(None, {"X": x})[0]
        dy = np.random.default_rng(batch + 10).standard_normal(y.shape).astype(np.float32)
        gx = sess.run(["X_grad"], {"X": x, "Y_grad": dy})[0]
        if c["op"] == "MaxPool":
            if HAS_TORCH:
                assert_close(gx, _torch_pool(c, x, dy, y.shape), 1e-6, 1e-7, f"batch {batch}")
        else:
            cc = dict(c, batch=batch)
            ref = (dy.reshape(batch * c["C"], -1).astype(np.float64) @ _ort_avg_jacobian(cc))
            assert_close(gx, ref.reshape(x.shape), 1e-5, 1e-6, f"batch {batch}")
    assert_fd(m, ["X"], feeds={"X": _tie_free([2, c["C"]] + c["n"], np.random.default_rng(0))})


# ------------------------------------------------------------------ global pools

GLOBAL_SHAPES = [(2, 3, 7), (2, 3, 4, 5), (1, 2, 3, 4, 3)]


@pytest.mark.parametrize("shape", GLOBAL_SHAPES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools(op, shape):
    rng = np.random.default_rng(len(shape))
    out = list(shape[:2]) + [1] * (len(shape) - 2)
    m = make_model([helper.make_node(op, ["X"], ["Y"])], [("X", np.float32, list(shape))],
                   [("Y", np.float32, out)], opset=17)
    x = _tie_free(shape, rng)
    gm, _outs, grads, ups = run_gradient(m, {"X": x}, ["X"])
    axes = tuple(range(2, len(shape)))
    if HAS_TORCH:
        import torch

        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y = xt.mean(dim=axes, keepdim=True) if op == "GlobalAveragePool" else xt.amax(dim=axes, keepdim=True)
        y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
        assert_close(grads["X"], xt.grad.numpy(), 1e-6, 1e-7, f"{op} vs torch")
    assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm)


@pytest.mark.parametrize("opset", [1, 7, 11])
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools_old_opsets(op, opset):
    m = make_model([helper.make_node(op, ["X"], ["Y"])], [("X", np.float32, [2, 3, 4, 5])],
                   [("Y", np.float32, [2, 3, 1, 1])], opset=opset)
    x = _tie_free((2, 3, 4, 5), np.random.default_rng(opset))
    gm, outs, _grads, _ups = run_gradient(m, {"X": x}, ["X"])
    np.testing.assert_array_equal(outs["Y"], session(m).run(None, {"X": x})[0])
    assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm)


def test_global_average_symbolic_spatial():
    """Spatial dims symbolic too: P = Size(X)/Size(Y) at run time."""
    m = make_model([helper.make_node("GlobalAveragePool", ["X"], ["Y"])],
                   [("X", np.float32, ["N", 3, "H", "W"])], [("Y", np.float32, ["N", 3, 1, 1])], opset=17)
    gm = onnxbp.gradient(m, ["X"])
    assert_standard(gm)
    sess = session(gm)
    for shape in [(1, 3, 4, 5), (2, 3, 6, 2)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        dy = np.random.default_rng(1).standard_normal(shape[:2] + (1, 1)).astype(np.float32)
        gx = sess.run(["X_grad"], {"X": x, "Y_grad": dy})[0]
        assert_close(gx, np.broadcast_to(dy / (shape[2] * shape[3]), shape), 1e-6, 1e-7, str(shape))


def test_global_maxpool_tie_policy():
    """Ties share Y' evenly among the maxima (torch.amax's policy; documented)."""
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]]], dtype=np.float32)
    m = make_model([helper.make_node("GlobalMaxPool", ["X"], ["Y"])], [("X", np.float32, [1, 2, 2, 2])],
                   [("Y", np.float32, [1, 2, 1, 1])], opset=17)
    dy = np.array([[[[2.0]], [[-4.0]]]], dtype=np.float32)
    _, _, grads, _ = run_gradient(m, {"X": x}, ["X"], upstream={"Y": dy})
    mask = (x == x.max(axis=(2, 3), keepdims=True)).astype(np.float64)
    expect = mask * dy / mask.sum(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(grads["X"], expect, rtol=1e-7)
    if HAS_TORCH:
        import torch

        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        xt.amax(dim=(2, 3), keepdim=True).backward(torch.tensor(dy, dtype=torch.float64))
        np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-7)


# ------------------------------------------------------------------ errors and helpers


CEIL_DROP = [dict(_case(op, (5, 7), (3, 3), (3, 3), pads=(1, 1, 1, 1), ceil=1, cip=cip), C=3)
             for op, cip in (("MaxPool", 0), ("AveragePool", 0), ("AveragePool", 1))]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("c", CEIL_DROP, ids=["max", "avg-cip0", "avg-cip1"])
def test_ceil_mode_dropped_window_matches_torch(c):
    """onnx infers the ceil_mode window that would start in the end padding; onnxruntime and torch
    (ceil_mode=True: the last window must start inside the input or the left padding) drop it.
    The model is loaded with a Slice to the runtime size: the output, a downstream Tanh and the
    upstream gradient input get onnxruntime's shape, and X' equals torch's native ceil_mode pool."""
    import torch
    import torch.nn.functional as F

    assert _inferred(c) == [3, 3] and [o for _, _, o in _geometry(c)] == [2, 3]
    node = helper.make_node(c["op"], ["X"], ["P"], **_attrs(c))
    relu = helper.make_node("Tanh", ["P"], ["Y"])
    # declared as onnx infers it (what an exporter writes): one position too long on axis 2
    m = make_model([node, relu], [("X", np.float32, ["N", 3, 5, 7])], [("Y", np.float32, ["N", 3, 3, 3])],
                   opset=19)
    before = m.SerializeToString()
    x = _tie_free([2, 3, 5, 7], np.random.default_rng(3))
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"], seed=3)
    assert m.SerializeToString() == before  # the caller's model is not modified
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in list(gm.graph.input) + list(gm.graph.output)}
    assert declared["Y"] == declared["Y_grad"] == ["N", 3, 2, 3]
    np.testing.assert_array_equal(outs["Y"], _quiet_session(m).run(None, {"X": x})[0])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    if c["op"] == "MaxPool":
        y = F.max_pool2d(xt, 3, 3, 1, ceil_mode=True)
    else:
        y = F.avg_pool2d(xt, 3, 3, 1, ceil_mode=True, count_include_pad=bool(c["cip"]))
    y = torch.tanh(y)
    assert tuple(y.shape) == outs["Y"].shape == (2, 3, 2, 3)
    np.testing.assert_allclose(outs["Y"], y.detach().numpy(), rtol=1e-6, atol=1e-7)
    y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
    assert_close(grads["X"], xt.grad.numpy(), 1e-6, 1e-7, f"ceil_mode {c['op']} dX vs torch")
    assert_fd(m, ["X"], feeds={"X": x}, grad_model=gm, seed=3)
    assert_standard(gm)


def test_ceil_mode_disagreement_without_load_model_is_refused():
    """backward(inplace=True) skips load_model, so nothing aligns the shapes: refused as before."""
    for op in ("MaxPool", "AveragePool"):
        c = _case(op, (5,), (3,), (3,), pads=(0, 2), ceil=1)
        assert _ceil_dropped(c) and not _inferred_agrees(c)
        with pytest.raises(UnsupportedAttributeError,
                           match=r"declared/inferred with 3 positions on spatial axis 0, but onnxruntime "
                                 r"computes 2 \(ceil_mode=1.*load the model with onnxbp.load_model"):
            onnxbp.backward(_model(c), ["X"], inplace=True)


def test_ceil_mode_alignment_keeps_indices_output():
    """A MaxPool whose Indices are a graph output: both outputs get onnxruntime's size."""
    c = _case("MaxPool", (5,), (3,), (3,), pads=(0, 2), ceil=1)
    m = _model(c, indices=True)
    loaded = onnxbp.load_model(m)
    slices = [n for n in loaded.graph.node if n.op_type == "Slice"]
    assert sorted(o for n in slices for o in n.output) == ["I", "Y"]
    x = _tie_free([2, 2, 5], np.random.default_rng(1))
    y, idx = _quiet_session(m).run(None, {"X": x})
    gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"], seed=1)
    np.testing.assert_array_equal(outs["I"], idx)
    expect = np.zeros(x.size)
    np.add.at(expect, idx.reshape(-1), ups["Y"].reshape(-1))
    np.testing.assert_allclose(grads["X"], expect.reshape(x.shape), rtol=1e-7)


def test_storage_order_needs_static_spatial_dims():
    node = helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], storage_order=1)
    m = make_model([node], [("X", np.float32, ["N", 2, "H", 5])], [("Y", np.float32, [None] * 4)])
    with pytest.raises(ShapeError, match=r"dim 2 of tensor 'X' is symbolic \('H'\).*needs it static"):
        onnxbp.gradient(m, ["X"])


def test_averagepool_needs_static_spatial_dims():
    node = helper.make_node("AveragePool", ["X"], ["Y"], kernel_shape=[2, 2])
    m = make_model([node], [("X", np.float32, [2, 2, 4, "W"])], [("Y", np.float32, [None] * 4)])
    with pytest.raises(ShapeError, match=r"dim 3 of tensor 'X' is symbolic \('W'\)"):
        onnxbp.gradient(m, ["X"])


def test_maxpool_symbolic_spatial_without_storage_order():
    """storage_order=0 and no dilation: no static dims needed (runtime Size/Shape)."""
    node = helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    m = make_model([node], [("X", np.float32, ["N", 2, "H", "W"])], [("Y", np.float32, [None] * 4)])
    gm = onnxbp.gradient(m, ["X"])
    assert_standard(gm)
    sess = session(gm)
    c = _case("MaxPool", (7, 9), (3, 3), (2, 2), pads=(1, 1, 1, 1))
    for n in ([7, 9], [6, 5]):
        c = dict(c, n=n, batch=2)
        x = _tie_free([2, 2] + n, np.random.default_rng(n[0]))
        y = session(m).run(None, {"X": x})[0]
        dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
        gx = sess.run(["X_grad"], {"X": x, "Y_grad": dy})[0]
        if HAS_TORCH:
            assert_close(gx, _torch_pool(c, x, dy, y.shape), 1e-6, 1e-7, str(n))


@pytest.mark.parametrize("dtype", [np.float64, np.float16], ids=["float64", "float16"])
def test_maxpool_dtypes(dtype):
    """float64 scatters in float64; float16 accumulates in float (onnxruntime's ScatterElements
    adds only float/double) and is cast back."""
    c = _case("MaxPool", (7, 6), (3, 3), (1, 2), pads=(1, 1, 1, 0), order=1)
    node = helper.make_node("MaxPool", ["X"], ["Y", "I"], **_attrs(c))
    m = make_model([node], [("X", dtype, [2, 2, 7, 6])],
                   [("Y", dtype, [None] * 4), ("I", np.int64, [None] * 4)], opset=17)
    x = _tie_free((2, 2, 7, 6), np.random.default_rng(4)).astype(dtype)
    _gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X"])
    assert grads["X"].dtype == dtype
    flat = outs["I"].reshape(-1)
    base, r = flat - flat % 42, flat % 42
    flat = base + np.ravel_multi_index(np.unravel_index(r, (7, 6), order="F"), (7, 6))
    expect = np.zeros(x.size)
    np.add.at(expect, flat, ups["Y"].reshape(-1).astype(np.float64))
    # float16: one rounding of the float sum (not recorded among the float32 worst errors)
    tol = 1e-3 if dtype == np.float16 else 1e-12
    np.testing.assert_allclose(grads["X"].astype(np.float64), expect.reshape(x.shape), rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
def test_float16_pools(op):
    """float16 gradients equal the float32 gradients of the same input to float16 accuracy."""
    attrs = {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "count_include_pad": 1} \
        if op == "AveragePool" else {}
    x = _tie_free((2, 3, 6, 5), np.random.default_rng(2))
    dy = None
    results = []
    for dt in (np.float32, np.float16):
        m = make_model([helper.make_node(op, ["X"], ["Y"], **attrs)], [("X", dt, [2, 3, 6, 5])],
                       [("Y", dt, [None] * 4)], opset=19)
        if dy is None:
            y = session(m).run(None, {"X": x})[0]
            dy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
        _, _, grads, _ = run_gradient(m, {"X": x.astype(dt)}, ["X"], upstream={"Y": dy.astype(dt)})
        assert grads["X"].dtype == dt
        results.append(grads["X"])
    # float16 roundoff of inputs and Y' (not recorded among the float32 worst errors)
    scale = float(np.max(np.abs(results[0])))
    np.testing.assert_allclose(results[1].astype(np.float32), results[0], rtol=0, atol=2e-3 * scale)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("opset", [13, 17])
def test_pools_in_a_network(opset):
    """Conv -> MaxPool (k3 s2, Indices added) -> AveragePool -> GlobalMaxPool + GlobalAveragePool
    -> Flatten -> Gemm: W, G and X gradients against torch autograd (float64) and the forward
    unchanged (opset 13 is converted to 16).  (Finite differences with float32 steps would cross
    the max kinks of the conv outputs; each pool is FD-checked alone above.)"""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(opset)
    nodes = [
        helper.make_node("Conv", ["X", "W"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("GlobalMaxPool", ["a"], ["gm"]),
        helper.make_node("GlobalAveragePool", ["a"], ["ga"]),
        helper.make_node("Add", ["gm", "ga"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "G"], ["Y"]),
    ]
    inits = {"W": (rng.standard_normal((4, 2, 3, 3)) * 0.5).astype(np.float32),
             "G": rng.standard_normal((4, 3)).astype(np.float32)}
    m = make_model(nodes, [("X", np.float32, ["N", 2, 9, 9])], [("Y", np.float32, ["N", 3])], inits,
                   opset=opset)
    x = _tie_free((2, 2, 9, 9), rng)
    _, outs, grads, ups = run_gradient(m, {"X": x}, ["W", "G", "X"])
    np.testing.assert_array_equal(outs["Y"], session(m).run(None, {"X": x})[0])
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for k, v in (("X", x), ("W", inits["W"]), ("G", inits["G"]))}
    a = F.avg_pool2d(F.max_pool2d(F.conv2d(t["X"], t["W"], padding=1), 3, 2, 1), 3, 1, 1,
                     count_include_pad=False)
    y = (a.amax(dim=(2, 3)) + a.mean(dim=(2, 3))) @ t["G"]
    y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
    for k in ("W", "G", "X"):
        assert_close(grads[k], t[k].grad.numpy(), 1e-4, 1e-5, f"network d{k} vs torch")


def test_storage_order_value_is_checked():
    node = helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], storage_order=2)
    m = make_model([node], [("X", np.float32, [1, 2, 4, 4])], [("Y", np.float32, [None] * 4)])
    with pytest.raises(UnsupportedAttributeError,
                       match=r"storage_order=2 is not supported; use 0 \(row-major\) or 1 \(column-major\)"):
        onnxbp.gradient(m, ["X"])
