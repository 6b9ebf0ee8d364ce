"""Conv gradients (onnxbp/rules/conv.py) for both lowerings.

Every case builds one tiny Conv model, runs the gradient model once
(run_gradient: standard ops + full_check) and compares dX, dW, dB with

* torch autograd in float64 (explicit pads through F.pad, so asymmetric and
  auto_pad-resolved pads are exercised), rtol 1e-4 / atol 1e-5 normwise on
  float32 results, and
* onnxbp.check_gradients on the same gradient model (float32 random
  directions with the exact large step of linear ops), rtol 1e-3.

The grid: hand-picked edge cases plus a seeded sampler over dims 1/2/3,
strides, dilations, pads (asymmetric, >= effective kernel), auto_pad modes,
groups (1, depthwise, depthwise x multiplier, general), bias on/off and
kernel_shape present/absent; each case runs under every strategy and target="portable".
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from gradutil import HAS_TORCH, assert_close, make_model, run_gradient, session
from onnx import helper

import onnxbp
from onnxbp.rules import conv_arith as ca

STRATEGIES = ("transpose", "seed", "patches")
#: The lowerings the gradient checks cover: each conv_strategy, and target="portable" (no runtime-shaped
#: weight-gradient kernel: im2col Gemm for group 1, a batched MatMul per group otherwise).
LOWERINGS = STRATEGIES + ("portable",)


def _opts(lowering: str) -> dict:
    return {"target": "portable"} if lowering == "portable" else {"conv_strategy": lowering}
GROUPS = [  # (C, M, group)
    (2, 3, 1), (3, 2, 1), (4, 4, 4), (3, 6, 3), (4, 6, 2), (6, 4, 2), (1, 2, 1),
]
AUTO = ("NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

WORST: dict = {}  # (strategy, reference, gradient) -> (worst rel err, case)


def _case(dims, n, k, s, d, group=(2, 3, 1), pads=None, auto_pad="NOTSET", bias=True,
          kshape=True, batch=2):
    return dict(dims=dims, n=list(n), k=list(k), s=list(s), d=list(d), group=group,
                pads=None if pads is None else list(pads), auto_pad=auto_pad, bias=bias,
                kshape=kshape, batch=batch)


def _valid(c):
    pads = ca.resolve_auto_pad(c["auto_pad"], c["n"], c["k"], c["s"], c["d"], c["pads"])
    nsp = c["dims"]
    return all(ca.conv_out_size(c["n"][i], c["k"][i], c["s"][i], c["d"][i], pads[i], pads[nsp + i]) >= 1
               for i in range(nsp))


def _sample(rng, count):
    out = []
    while len(out) < count:
        dims = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
        kmax, nrange = {1: (4, (3, 13)), 2: (3, (3, 9)), 3: (2, (2, 6))}[dims]
        k = [int(rng.integers(1, kmax + 1)) for _ in range(dims)]
        s = [int(rng.choice([1, 1, 2, 3])) for _ in range(dims)]
        d = [int(rng.choice([1, 1, 2])) for _ in range(dims)]
        n = [int(rng.integers(*nrange)) for _ in range(dims)]
        auto_pad = str(rng.choice(AUTO))
        pads = None
        if auto_pad == "NOTSET" and rng.random() < 0.85:
            # up to the effective kernel span: pads >= ek give windows of pure padding
            pads = [int(rng.integers(0, ca.effective_kernel(k[i % dims], d[i % dims]) + 1))
                    for i in range(2 * dims)]
        group = GROUPS[int(rng.integers(len(GROUPS)))]
        c = _case(dims, n, k, s, d, group, pads, auto_pad, bool(rng.random() < 0.6),
                  bool(rng.random() < 0.5))
        if auto_pad.startswith("SAME") and any(v > 1 for v in d):
            continue  # onnxruntime refuses to run the forward (test_same_with_dilation)
        if _valid(c):
            out.append(c)
    return out


EDGE = [
    # trailing rows touched by no window: H=8, k=3, s=2 (row 7 gets no gradient)
    _case(2, (8, 8), (3, 3), (2, 2), (1, 1)),
    _case(1, (8,), (3,), (2,), (1,)),
    _case(1, (10,), (2,), (3,), (2,), pads=(0, 0)),
    # the worked example of docs/conv-backward.md: stride 2, dilation 2, pads (2, 0); and pads (2, 1)
    _case(1, (10,), (3,), (2,), (2,), pads=(2, 0)),
    _case(1, (9,), (3,), (2,), (2,), pads=(2, 1)),
    # asymmetric pads, incl. pads >= the (effective) kernel
    _case(2, (5, 6), (3, 2), (1, 2), (2, 1), pads=(0, 2, 3, 1)),
    _case(2, (4, 4), (2, 2), (1, 1), (1, 1), pads=(2, 0, 0, 2)),
    _case(1, (3,), (1,), (1,), (1,), pads=(2, 3)),
    _case(3, (4, 5, 3), (2, 3, 1), (2, 1, 2), (1, 2, 1), pads=(1, 0, 1, 0, 2, 1)),
    # auto_pad modes with strides and dilations
    _case(2, (7, 6), (3, 2), (2, 3), (1, 1), auto_pad="SAME_UPPER"),
    _case(2, (7, 6), (3, 2), (2, 3), (1, 1), auto_pad="SAME_LOWER"),
    _case(2, (7, 6), (3, 2), (2, 3), (2, 1), auto_pad="VALID"),
    _case(1, (5,), (4,), (1,), (1,), auto_pad="SAME_UPPER"),
    _case(1, (5,), (4,), (1,), (1,), auto_pad="SAME_LOWER"),
    # groups: depthwise, depthwise with multiplier, general
    _case(2, (6, 6), (3, 3), (2, 2), (1, 1), group=(4, 4, 4), pads=(1, 1, 1, 1)),
    _case(2, (6, 5), (3, 3), (1, 2), (2, 1), group=(3, 6, 3), pads=(1, 0, 2, 1)),
    _case(3, (3, 4, 4), (2, 2, 2), (1, 2, 1), (1, 1, 2), group=(4, 6, 2)),
    _case(1, (9,), (3,), (2,), (1,), group=(6, 4, 2), pads=(0, 1)),
    # 1x1 convs, kernel as large as the input, stride larger than the kernel
    _case(2, (5, 5), (1, 1), (2, 2), (1, 1)),
    _case(2, (3, 4), (3, 4), (1, 1), (1, 1)),
    _case(1, (11,), (2,), (4,), (1,), pads=(1, 0)),
    # no bias, kernel_shape absent
    _case(2, (6, 7), (2, 3), (2, 1), (1, 2), bias=False, kshape=False, pads=(1, 1, 0, 2)),
]

GRID = EDGE + _sample(np.random.default_rng(20261122), 300)
#: the exhaustive extra (pytest -m slow): 1500 more sampled cases
SLOW_GRID = _sample(np.random.default_rng(11222026), 1500)


def _conv_model(c, batch_dim=None, opset=17):
    C, M, grp = c["group"]
    nb = c["batch"] if batch_dim is None else batch_dim
    attrs = dict(strides=c["s"], dilations=c["d"], group=grp)
    if c["kshape"]:
        attrs["kernel_shape"] = c["k"]
    if c["auto_pad"] != "NOTSET":
        attrs["auto_pad"] = c["auto_pad"]
    elif c["pads"] is not None:
        attrs["pads"] = c["pads"]
    ins = ["X", "W"] + (["B"] if c["bias"] else [])
    node = helper.make_node("Conv", ins, ["Y"], **attrs)
    inputs = [("X", np.float32, [nb, C] + c["n"]), ("W", np.float32, [M, C // grp] + c["k"])]
    if c["bias"]:
        inputs.append(("B", np.float32, [M]))
    return make_model([node], inputs, [("Y", np.float32, [nb, M] + _out_sizes(c))], opset=opset)


def _out_sizes(c):
    pads = ca.resolve_auto_pad(c["auto_pad"], c["n"], c["k"], c["s"], c["d"], c["pads"])
    nsp = c["dims"]
    return [ca.conv_out_size(c["n"][i], c["k"][i], c["s"][i], c["d"][i], pads[i], pads[nsp + i])
            for i in range(nsp)]


def _feeds(c, rng, batch=None):
    C, M, grp = c["group"]
    nb = batch or c["batch"]
    f = {"X": rng.standard_normal([nb, C] + c["n"]).astype(np.float32),
         "W": rng.standard_normal([M, C // grp] + c["k"]).astype(np.float32)}
    if c["bias"]:
        f["B"] = rng.standard_normal([M]).astype(np.float32)
    return f


def _torch_ref(c, feeds, upstream):
    import torch
    import torch.nn.functional as F

    dims, grp = c["dims"], c["group"][2]
    pads = ca.resolve_auto_pad(c["auto_pad"], c["n"], c["k"], c["s"], c["d"], c["pads"])
    tp = []
    for i in reversed(range(dims)):
        tp += [pads[i], pads[dims + i]]
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in feeds.items()}
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    y = conv(F.pad(t["X"], tp), t["W"], t.get("B"), stride=c["s"], dilation=c["d"], groups=grp)
    u = torch.tensor(upstream, dtype=torch.float64)
    (y * u).sum().backward()
    return y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def _id(c):
    return (f"{c['dims']}d-n{'x'.join(map(str, c['n']))}-k{'x'.join(map(str, c['k']))}"
            f"-s{''.join(map(str, c['s']))}-d{''.join(map(str, c['d']))}"
            f"-{c['auto_pad'] if c['auto_pad'] != 'NOTSET' else 'p' + ''.join(map(str, c['pads'] or []))}"
            f"-g{c['group'][0]}.{c['group'][1]}.{c['group'][2]}{'-b' if c['bias'] else ''}"
            f"{'-ks' if c['kshape'] else ''}")


def _record(strategy, kind, grad, err, what):
    key = (strategy, kind, grad)
    if err >= WORST.get(key, (-1.0, ""))[0]:
        WORST[key] = (err, what)


@pytest.mark.parametrize("batch,expect_dw", [(32, "transpose"), (None, "patches")])
def test_auto_takes_the_fewest_nodes_for_small_convs(batch, expect_dw):
    """'auto' below MIN_PATCHES_SIZE im2col elements (LeNet's 8-channel 4x4 conv at batch 32: 36,864):
    dX by ConvTranspose, and dW by the channel-swapped Conv where the batch is static (a symbolic
    batch keeps "patches": the swapped Conv's own gradient needs the batch static)."""
    from onnxbp.rules.conv import MIN_PATCHES_SIZE

    c = _case(2, (4, 4), (3, 3), (1, 1), (1, 1), group=(8, 16, 1), pads=(1, 1, 1, 1), batch=32)
    assert 32 * 16 * 8 * 9 < MIN_PATCHES_SIZE
    model = _conv_model(c, batch_dim="N" if batch is None else None)
    ops = [n.op_type for n in onnxbp.gradient(model, ["X"]).graph.node]
    assert "ConvTranspose" in ops and "Conv" not in ops[1:]
    ops = [n.op_type for n in onnxbp.gradient(model, ["W"]).graph.node][1:]
    assert (ops.count("Gemm") == 1 and ops.count("Slice") == 9) == (expect_dw == "patches")
    assert (ops.count("Conv") == 1) == (expect_dw == "transpose")
    for s in ("seed", "patches"):  # an explicit strategy is honoured whatever the size
        ops = [n.op_type for n in onnxbp.gradient(model, ["X"], conv_strategy=s).graph.node][1:]
        assert "ConvTranspose" not in ops


@pytest.mark.parametrize("strategy", LOWERINGS)
@pytest.mark.parametrize("case", GRID, ids=[f"{i:03d}-{_id(c)}" for i, c in enumerate(GRID)])
def test_conv_grad_grid(case, strategy):
    rng = np.random.default_rng(zlib.crc32(_id(case).encode()))
    model = _conv_model(case)
    feeds = _feeds(case, rng)
    wrt = [k for k in ("X", "W", "B") if k in feeds]
    gm, outs, grads, ups = run_gradient(model, feeds, wrt, **_opts(strategy))
    for k in wrt:
        assert grads[k].shape == feeds[k].shape, k
    if HAS_TORCH:
        y_ref, g_ref = _torch_ref(case, feeds, ups["Y"])
        assert_close(outs["Y"], y_ref, 1e-4, 1e-5, "forward Y vs torch (auto_pad resolution)")
        for k in wrt:
            err = assert_close(grads[k], g_ref[k], 1e-4, 1e-5, f"d{k} vs torch")
            _record(strategy, "torch", "d" + k, err, _id(case))
    report = onnxbp.check_gradients(model, wrt, feeds=feeds, grad_model=gm, precision="float32",
                                    rtol=1e-3, directions=2)
    assert report.passed, "\n" + report.table()
    for r in report.results:
        _record(strategy, "fd", "d" + r.name, r.max_rel_err, _id(case))


@pytest.mark.parametrize("case", EDGE, ids=[f"edge{i:02d}-{_id(c)}" for i, c in enumerate(EDGE)])
def test_conv_grad_auto(case):
    """'auto' mixes the lowerings (seed dX, transpose dW on stride-1 convs): same checks."""
    test_conv_grad_grid(case, "auto")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", SLOW_GRID, ids=[f"slow{i:04d}-{_id(c)}" for i, c in enumerate(SLOW_GRID)])
def test_conv_grad_grid_exhaustive(case, strategy):
    test_conv_grad_grid(case, strategy)


#: slow-grid cases where, on one axis, the weight gradient's kernel reads the start padding alone
#: (the data would crop to nothing): the transpose-form dW keeps one position and trims its result
EDGE_CASES = [SLOW_GRID[i] for i in (519, 1221)]


@pytest.mark.parametrize("strategy", ["transpose", "patches"])
@pytest.mark.parametrize("case", EDGE_CASES, ids=[_id(c) for c in EDGE_CASES])
def test_conv_grad_weight_reads_only_padding(case, strategy):
    test_conv_grad_grid(case, strategy)


def test_grid_size_and_coverage():
    """The sampler covers every attribute family the rule handles."""
    assert len(GRID) * len(STRATEGIES) >= 400
    seen = {(c["dims"], c["auto_pad"]) for c in GRID}
    assert {(dm, ap) for dm in (1, 2, 3) for ap in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")} <= seen
    assert any(c["group"][2] == c["group"][0] == c["group"][1] for c in GRID)  # depthwise
    assert any(c["group"][2] == c["group"][0] < c["group"][1] for c in GRID)  # depthwise x multiplier
    assert any(1 < c["group"][2] < c["group"][0] for c in GRID)  # general groups
    assert any(c["pads"] and c["pads"][0] != c["pads"][c["dims"]] for c in GRID)  # asymmetric
    tails = [c for c in GRID if any(ca.untouched_tail(c["n"][i], c["k"][i], c["s"][i], c["d"][i], 0, 0)
                                    for i in range(c["dims"])) and not c["pads"] and c["auto_pad"] in
             ("NOTSET", "VALID")]
    assert tails
    assert {True, False} == {c["bias"] for c in GRID} == {c["kshape"] for c in GRID}


@pytest.mark.parametrize("strategy", LOWERINGS)
def test_untouched_rows_get_exact_zero(strategy):
    """H=8, k=3, s=2: input row/col 7 is read by no window, its gradient is exactly 0."""
    c = _case(2, (8, 8), (3, 3), (2, 2), (1, 1), bias=False)
    rng = np.random.default_rng(7)
    feeds = _feeds(c, rng)
    _, _, grads, _ = run_gradient(_conv_model(c), feeds, ["X"], **_opts(strategy))
    dx = grads["X"]
    assert np.all(dx[:, :, 7, :] == 0.0) and np.all(dx[:, :, :, 7] == 0.0)
    assert np.all(dx[:, :, :7, :7] != 0.0)  # every other position is read (tie-free random data)


@pytest.mark.parametrize("strategy", LOWERINGS)
def test_worked_example_zero_rows(strategy):
    """docs' example (n=10, k=3, s=2, d=2, pads (2, 0)): odd rows and the tail row 9 are read by
    no window, so their gradient is exactly 0; the even rows are not."""
    c = _case(1, (10,), (3,), (2,), (2,), pads=(2, 0), bias=False)
    feeds = _feeds(c, np.random.default_rng(5))
    _, _, grads, _ = run_gradient(_conv_model(c), feeds, ["X"], **_opts(strategy))
    dx = grads["X"]
    assert np.all(dx[:, :, 1::2] == 0.0)
    assert np.all(dx[:, :, 0:9:2] != 0.0)


@pytest.mark.parametrize("strategy", LOWERINGS)
def test_symbolic_batch(strategy):
    """X has batch dim 'N'; one gradient model runs with batch 2 and 3."""
    c = _case(2, (7, 6), (3, 2), (2, 1), (1, 2), group=(4, 6, 2), pads=(1, 0, 0, 2))
    model = _conv_model(c, batch_dim="N")
    for batch in (2, 3):
        rng = np.random.default_rng(batch)
        feeds = _feeds(c, rng, batch)
        _, _, grads, ups = run_gradient(model, feeds, ["X", "W", "B"], **_opts(strategy))
        assert grads["X"].shape[0] == batch
        if HAS_TORCH:
            _, ref = _torch_ref(c, feeds, ups["Y"])
            for k in ("X", "W", "B"):
                assert_close(grads[k], ref[k], 1e-4, 1e-5, f"d{k} batch {batch}")


@pytest.mark.parametrize("strategy", ("auto",) + LOWERINGS)
@pytest.mark.parametrize("wrt", (["X"], ["W"], ["B"], ["W", "B"]))
def test_only_requested_gradients(strategy, wrt):
    """Each gradient is emitted only when needed: no ConvTranspose/Conv for dB alone."""
    c = _case(2, (6, 6), (3, 3), (2, 1), (1, 1), pads=(1, 0, 1, 1))
    model = _conv_model(c)
    feeds = _feeds(c, np.random.default_rng(3))
    gm, _, grads, ups = run_gradient(model, feeds, wrt, **_opts(strategy))
    assert set(grads) == set(wrt)
    added = [n.op_type for n in gm.graph.node][len(model.graph.node):]
    added = [op for op in added if op != "Constant"]
    if wrt == ["B"]:
        assert added == ["ReduceSum"]
    if HAS_TORCH:
        _, ref = _torch_ref(c, feeds, ups["Y"])
        for k in wrt:
            assert_close(grads[k], ref[k], 1e-4, 1e-5, f"d{k}")


def test_strategy_lowerings_differ():
    """'transpose' uses ConvTranspose for dX; 'seed' a Conv on the zero-inserted dY."""
    c = _case(2, (8, 8), (3, 3), (2, 2), (1, 1), group=(4, 6, 2), pads=(1, 0, 1, 1))
    model = _conv_model(c)
    ops = {}
    for s in ("transpose", "seed"):
        gm = onnxbp.gradient(model, ["X"], conv_strategy=s)
        ops[s] = [n.op_type for n in gm.graph.node][1:]
    assert "ConvTranspose" in ops["transpose"] and "Conv" not in ops["transpose"]
    assert "ConvTranspose" not in ops["seed"] and "Conv" in ops["seed"] and "Pad" in ops["seed"]


@pytest.mark.parametrize("strides,kernel,expect", [
    ([1, 1], [3, 3], "seed"), ([2, 1], [3, 3], "transpose"), ([1, 1], [1, 1], "transpose"),
    ([1, 1], [1, 3], "seed"),
])
def test_auto_picks_per_node(strides, kernel, expect):
    """'auto': dX by the seed form for stride-1 non-1x1 convs (faster on ORT CPU), dW by transpose
    (2 input channels; convs large enough for the forms with more nodes: MIN_PATCHES_SIZE)."""
    c = _case(2, (16, 16), kernel, strides, (1, 1), batch=64)
    gm = onnxbp.gradient(_conv_model(c), ["X"])
    ops = [n.op_type for n in gm.graph.node][1:]
    assert ("ConvTranspose" in ops) == (expect == "transpose")
    assert ("Conv" in ops) == (expect == "seed")
    gm = onnxbp.gradient(_conv_model(c), ["W"])
    assert [n.op_type for n in gm.graph.node][1:].count("Conv") == 1  # dW: channel-swapped Conv
    assert not any(n.op_type == "Pad" for n in gm.graph.node)


@pytest.mark.parametrize("channels,group,expect", [(8, 1, "patches"), (4, 1, "transpose"),
                                                   (8, 2, "transpose"), (16, 16, "transpose")])
def test_auto_weight_gradient_lowering(channels, group, expect):
    """'auto': dW by one Gemm on the im2col matrix of 9 strided slices for group-1 convs with >= 8
    input channels."""
    c = _case(2, (6, 6), (3, 3), (1, 1), (1, 1), group=(channels, channels, group), pads=(1, 1, 1, 1), batch=32)
    ops = [n.op_type for n in onnxbp.gradient(_conv_model(c), ["W"]).graph.node][1:]
    if expect == "patches":
        assert ops.count("Gemm") == 1 and ops.count("Slice") == 9 and "Conv" not in ops
    else:
        assert "Gemm" not in ops and ops.count("Conv") == 1


@pytest.mark.parametrize("strategy", LOWERINGS)
@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_with_dilation(strategy, mode):
    """onnxruntime refuses to run Conv with SAME and dilation > 1; the gradient still follows the
    ONNX spec: its backward is checked by swapping in the explicit-pads forward node."""
    c = _case(2, (7, 6), (3, 2), (2, 1), (2, 3), group=(4, 6, 2), auto_pad=mode)
    pads = ca.resolve_auto_pad(mode, c["n"], c["k"], c["s"], c["d"])
    gm = onnxbp.gradient(_conv_model(c), ["X", "W", "B"], **_opts(strategy))
    fwd = gm.graph.node[0]
    assert fwd.op_type == "Conv" and any(a.name == "auto_pad" for a in fwd.attribute)
    explicit = helper.make_node("Conv", list(fwd.input), list(fwd.output), name=fwd.name, pads=pads,
                                strides=c["s"], dilations=c["d"], group=c["group"][2], kernel_shape=c["k"])
    gm.graph.node[0].CopyFrom(explicit)
    feeds = _feeds(c, np.random.default_rng(11))
    feeds["Y_grad"] = np.random.default_rng(12).standard_normal([2, 6] + _out_sizes(c)).astype(np.float32)
    sess = session(gm)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(names, feeds)))
    if HAS_TORCH:
        y_ref, ref = _torch_ref(c, {k: feeds[k] for k in ("X", "W", "B")}, feeds["Y_grad"])
        assert_close(res["Y"], y_ref, 1e-4, 1e-5, "Y")
        for k in ("X", "W", "B"):
            assert_close(res[k + "_grad"], ref[k], 1e-4, 1e-5, f"d{k}")


@pytest.mark.parametrize("strategy", LOWERINGS)
@pytest.mark.parametrize("opset", [9, 11, 13, 21])
def test_opsets(strategy, opset):
    """Old models are upgraded to opset 11 (Pad/Slice inputs); newer ones keep their opset."""
    c = _case(2, (7, 6), (3, 2), (2, 1), (1, 2), group=(4, 6, 2), pads=(1, 0, 0, 2))
    model = _conv_model(c, opset=opset)
    feeds = _feeds(c, np.random.default_rng(opset))
    gm, _, grads, ups = run_gradient(model, feeds, ["X", "W", "B"], **_opts(strategy))
    assert max(i.version for i in gm.opset_import if i.domain in ("", "ai.onnx")) == max(opset, 11)
    if HAS_TORCH:
        _, ref = _torch_ref(c, feeds, ups["Y"])
        for k in ("X", "W", "B"):
            assert_close(grads[k], ref[k], 1e-4, 1e-5, f"d{k}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cli_flag(tmp_path, capsys, strategy):
    """The declared option reaches the CLI as --conv-strategy."""
    import onnx
    from cli.main import main

    c = _case(2, (8, 8), (3, 3), (2, 2), (1, 1))
    src, dst = tmp_path / "conv.onnx", tmp_path / "grad.onnx"
    onnx.save(_conv_model(c), src)
    assert main(["grad", str(src), "-o", str(dst), "--wrt", "X", "--conv-strategy", strategy]) == 0
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    # Stride 2: dX is a ConvTranspose in the transpose form, a Conv of the zero-inserted dY in the seed
    # form, and one Gemm (no Conv at all: the forward Conv is not needed for dX) in the patches form.
    assert ("ConvTranspose" in ops) == (strategy == "transpose")
    assert (ops.count("Conv") == 2) == (strategy == "seed")
    assert (ops.count("Gemm") == 1 and ops.count("Conv") == 1) == (strategy == "patches")
    assert "wrote" in capsys.readouterr().out


def test_unknown_spatial_size_error():
    node = helper.make_node("Conv", ["X", "W"], ["Y"], kernel_shape=[3, 3])
    model = make_model([node], [("X", np.float32, ["N", 2, "H", 5]), ("W", np.float32, [3, 2, 3, 3])],
                       [("Y", np.float32, ["N", 3, "H", 3])])
    with pytest.raises(onnxbp.ShapeError, match=r"dim 2 of tensor 'X' is symbolic \('H'\)"):
        onnxbp.gradient(model, ["W"])


def test_unknown_kernel_size_error():
    """Without kernel_shape, the kernel size comes from W and must be static."""
    node = helper.make_node("Conv", ["X", "W"], ["Y"])
    model = make_model([node], [("X", np.float32, [2, 2, 5, 5]), ("W", np.float32, [3, 2, "kh", "kw"])],
                       [("Y", np.float32, [2, 3, "h", "w"])])
    with pytest.raises(onnxbp.ShapeError, match=r"dim 2 of tensor 'W' is symbolic \('kh'\)"):
        onnxbp.gradient(model, ["X"])


def test_bad_option_value_error():
    c = _case(1, (5,), (3,), (1,), (1,))
    with pytest.raises(onnxbp.OptionError, match="conv_strategy='fast' is not supported; choose one of auto"):
        onnxbp.gradient(_conv_model(c), ["W"], conv_strategy="fast")


def test_unsupported_auto_pad_error():
    node = helper.make_node("Conv", ["X", "W"], ["Y"], auto_pad="SAME")
    model = make_model([node], [("X", np.float32, [1, 2, 5]), ("W", np.float32, [3, 2, 3])],
                       [("Y", np.float32, [1, 3, 3])], check=False)
    with pytest.raises(onnxbp.OnnxbpError, match="auto_pad"):
        onnxbp.gradient(model, ["W"])


def test_worst_relative_errors():
    """Summary (read with -s): worst normwise relative error per lowering and gradient over the grid."""
    if not WORST:
        pytest.skip("run together with test_conv_grad_grid")
    lines = []
    for (strategy, kind, grad), (err, what) in sorted(WORST.items()):
        lines.append(f"conv_strategy={strategy:9s} {grad} vs {kind:5s}: worst rel err {err:.3e} ({what})")
        # torch: float32 ORT vs float64 torch; fd: float32 random directions (checker's own tolerance)
        assert math.isfinite(err) and err < (1e-4 if kind == "torch" else 1e-2)
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("group", GROUPS, ids=[f"g{c}.{m}.{g}" for c, m, g in GROUPS])
@pytest.mark.parametrize("dims", (1, 2, 3))
def test_portable_weight_gradient_has_no_runtime_kernel(dims, group):
    """target="portable": dW adds no Conv/ConvTranspose (their kernel would be dY or X, shaped at run
    time: OpenVINO and tract refuse that with a symbolic batch): one Gemm for group 1, one batched
    MatMul per group otherwise; the values match torch with a symbolic batch."""
    n, k, s, d = [(7,), (5, 6), (4, 3, 4)][dims - 1], [(3,), (3, 2), (2, 2, 1)][dims - 1], \
        [(2,), (1, 2), (2, 1, 1)][dims - 1], [(1,), (2, 1), (1, 1, 2)][dims - 1]
    c = _case(dims, n, k, s, d, group=group, pads=[1] * dims + [0] * dims)
    model = _conv_model(c, batch_dim="N")
    gm = onnxbp.gradient(model, ["W"], target="portable")
    added = [nd.op_type for nd in gm.graph.node][len(model.graph.node):]
    assert "Conv" not in added and "ConvTranspose" not in added, added
    assert added.count("Gemm" if group[2] == 1 else "MatMul") == 1, added
    feeds = _feeds(c, np.random.default_rng(dims * 10 + group[2]), 3)
    _, _, grads, ups = run_gradient(model, feeds, ["W"], target="portable")
    if HAS_TORCH:
        _, ref = _torch_ref(c, feeds, ups["Y"])
        assert_close(grads["W"], ref["W"], 1e-4, 1e-5, "dW portable")


def test_cli_target_flag(tmp_path):
    """The declared option reaches the CLI as --target; a grouped conv's dW then has no Conv."""
    import onnx
    from cli.main import main

    c = _case(2, (8, 8), (3, 3), (2, 2), (1, 1), group=(4, 6, 2))
    src, dst = tmp_path / "conv.onnx", tmp_path / "grad.onnx"
    onnx.save(_conv_model(c, batch_dim="N"), src)
    assert main(["grad", str(src), "-o", str(dst), "--wrt", "W", "--target", "portable"]) == 0
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    assert ops.count("Conv") == 1 and "ConvTranspose" not in ops and "MatMul" in ops
    with pytest.raises(SystemExit):
        main(["grad", str(src), "-o", str(dst), "--target", "tensorrt"])
