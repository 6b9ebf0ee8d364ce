"""Gradients of BatchNormalization, LayerNormalization, InstanceNormalization, LRN, Dropout.

Every emitted model runs through run_gradient (standard ops, onnx full
checker).  Finite differences: onnxbp's checker, float64 per-element where
onnxruntime has float64 kernels (BatchNormalization, LayerNormalization;
rtol 1e-4), else float32 random directions with Richardson extrapolation
(InstanceNormalization, LRN; rtol 1e-3 plus the checker's roundoff floor).
torch autograd in float64 where torch has the op (rtol 1e-4: our gradients
are float32).  Dropout in training mode is random, so it is compared with
``Y' * mask / (1 - ratio)`` using the mask of the same run.  The worst
relative error per op goes to /tmp/onnxbp_relerr_norm.json.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxbp
from gradutil import HAS_TORCH, assert_close, assert_fd, make_model, run_gradient

F = np.float32
ERRS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _dump_errors():
    yield
    with open("/tmp/onnxbp_relerr_norm.json", "w") as fh:
        json.dump(ERRS, fh, indent=1, sort_keys=True)


def _record(op, value):
    ERRS[op] = max(ERRS.get(op, 0.0), float(value))


def _rng(*key):
    """A generator seeded by the test case (crc32: stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _check(op, model, feeds, wrt, rtol=1e-4, **kw):
    gm, outs, grads, ups = run_gradient(model, feeds, wrt)
    rep = assert_fd(model, wrt, feeds=feeds, rtol=rtol, **kw)
    _record(op, max(r.max_rel_err for r in rep.results))
    return gm, outs, grads, ups


def _torch_compare(op, leaves, names, fn, ups, grads, rtol=1e-4):
    import torch

    ts = [torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True) for v in leaves]
    fn(*ts).backward(torch.tensor(np.asarray(ups, dtype=np.float64)))
    for name, t in zip(names, ts):
        _record(op + " (torch)", assert_close(grads[name], t.grad.numpy(), rtol, 1e-5, f"{op} d{name}"))


# ---------------------------------------------------------------- BatchNormalization
BN_SHAPES = [(4, 3), (3, 2, 5), (2, 3, 4, 3)]


def _bn_model(shape, opset, training, eps=1e-3, momentum=0.8, running_outputs=False, batch_dim=None):
    rng = _rng("bn", shape, opset, training)
    c = shape[1]
    inits = {"scale": rng.uniform(0.5, 1.5, c).astype(F), "B": rng.standard_normal(c).astype(F),
             "mean": rng.standard_normal(c).astype(F) * 0.1, "var": rng.uniform(0.5, 1.5, c).astype(F)}
    attrs = dict(epsilon=eps, momentum=momentum)
    outs = ["Y"]
    if training:
        if opset >= 14:
            attrs["training_mode"] = 1
            outs += ["rm", "rv"]
        else:
            outs += ["rm", "rv", "sm", "sv"]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], outs, name="bn", **attrs)
    xshape = list(shape)
    if batch_dim:
        xshape[0] = batch_dim
    gouts = [("Y", F, xshape)]
    if running_outputs:
        gouts += [("rm", F, [c]), ("rv", F, [c])]
    model = make_model([node], [("X", F, xshape)], gouts, inits, opset=opset)
    x = rng.standard_normal(shape).astype(F) * 2 + 0.5
    return model, {"X": x}, inits


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_inference(shape, opset):
    model, feeds, inits = _bn_model(shape, opset, training=False)
    wrt = ["X", "scale", "B", "mean", "var"]
    _, _, grads, ups = _check("BatchNormalization (inference)", model, feeds, wrt)
    if HAS_TORCH:
        import torch.nn.functional as tf

        def fn(x, s, b, m, v):
            return tf.batch_norm(x, m, v, s, b, training=False, eps=1e-3)

        # torch does not differentiate w.r.t. running_mean/var: those are checked by FD above.
        import torch

        m, v = (torch.tensor(inits[k], dtype=torch.float64) for k in ("mean", "var"))
        _torch_compare("BatchNormalization (inference)", [feeds["X"], inits["scale"], inits["B"]], wrt[:3],
                       lambda x, s, b: fn(x, s, b, m, v), ups["Y"], grads)


@pytest.mark.parametrize("opset", [7, 9, 12, 14, 15])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_training(shape, opset):
    """Batch statistics: the full backward through mean and variance."""
    model, feeds, inits = _bn_model(shape, opset, training=True)
    wrt = ["X", "scale", "B"]
    _, outs, grads, ups = _check("BatchNormalization (training)", model, feeds, wrt)
    if HAS_TORCH:
        import torch.nn.functional as tf

        def fn(x, s, b):
            return tf.batch_norm(x, None, None, s, b, training=True, eps=1e-3)

        _torch_compare("BatchNormalization (training)", [feeds["X"], inits["scale"], inits["B"]], wrt, fn,
                       ups["Y"], grads)


@pytest.mark.parametrize("opset", [9, 15])
def test_batchnorm_training_running_stats_outputs(opset):
    """running_mean/var as graph outputs: input_mean' = momentum * running_mean' (exact), and X' is
    still the batch-statistics gradient (the running stats are not back-propagated into X)."""
    model, feeds, inits = _bn_model((3, 2, 4), opset, training=True, running_outputs=True)
    _check("BatchNormalization (training)", model, feeds, ["mean", "var"])
    _, _, grads, ups = run_gradient(model, feeds, ["X", "mean", "var"])
    assert_close(grads["mean"], 0.8 * ups["rm"], 1e-6, 1e-7, "dmean")
    assert_close(grads["var"], 0.8 * ups["rv"], 1e-6, 1e-7, "dvar")
    if HAS_TORCH:
        import torch
        import torch.nn.functional as tf

        scale = torch.tensor(inits["scale"], dtype=torch.float64)
        bias = torch.tensor(inits["B"], dtype=torch.float64)
        _torch_compare("BatchNormalization (training)", [feeds["X"]], ["X"],
                       lambda x: tf.batch_norm(x, None, None, scale, bias, training=True, eps=1e-3),
                       ups["Y"], grads)


def test_batchnorm_training_symbolic_batch():
    model, _, inits = _bn_model((2, 3, 4, 4), 15, training=True, batch_dim="batch")
    for n in (2, 5):
        x = _rng("bn-sym", n).standard_normal((n, 3, 4, 4)).astype(F)
        _, _, grads, ups = _check("BatchNormalization (training)", model, {"X": x}, ["X", "scale", "B"])
        if HAS_TORCH:
            import torch.nn.functional as tf

            _torch_compare("BatchNormalization (training)", [x, inits["scale"], inits["B"]], ["X", "scale", "B"],
                           lambda a, s, b: tf.batch_norm(a, None, None, s, b, training=True, eps=1e-3),
                           ups["Y"], grads)


@pytest.mark.parametrize("opset", [9, 15])
def test_batchnorm_training_default_wrt(opset):
    """wrt=None leaves out the running statistics (state, not parameters: the rule declares
    inputs 3 and 4 as state_inputs).  Requested by name, in training mode with the running stats
    unused, Y does not depend on input_mean/input_var, so their gradient is exactly zero."""
    model, feeds, inits = _bn_model((3, 2, 4), opset, training=True)
    _, _, grads, ups = run_gradient(model, feeds)
    assert set(grads) == {"scale", "B"}
    _, _, grads, ups = run_gradient(model, feeds, ["scale", "B", "mean", "var"])
    assert not grads["mean"].any() and not grads["var"].any()
    _check("BatchNormalization (training)", model, feeds, ["scale", "B"])
    rep = assert_fd(model, ["mean", "var"], feeds=feeds, rtol=1e-4)  # FD of a constant: ~0 up to roundoff
    assert max(r.max_abs_err for r in rep.results) < 1e-8


# ---------------------------------------------------------------- LayerNormalization
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("shape,axis,with_b,scale_full", [
    ((3, 5), -1, True, True), ((2, 3, 4), -1, False, True), ((2, 3, 4), 1, True, True),
    ((2, 3, 4), 1, True, False), ((4, 6), 0, True, True),
])
def test_layernorm(opset, shape, axis, with_b, scale_full):
    rng = _rng("ln", opset, shape, axis, with_b, scale_full)
    a = axis % len(shape)
    norm_shape = shape[a:]
    sshape = norm_shape if scale_full else (1,) * (len(norm_shape) - 1) + norm_shape[-1:]
    inits = {"S": rng.uniform(0.5, 1.5, sshape).astype(F)}
    ins = ["X", "S"]
    if with_b:
        inits["B"] = rng.standard_normal(sshape).astype(F)
        ins.append("B")
    node = helper.make_node("LayerNormalization", ins, ["Y"], name="ln", axis=axis, epsilon=1e-4)
    model = make_model([node], [("X", F, list(shape))], [("Y", F, list(shape))], inits, opset=opset)
    x = rng.standard_normal(shape).astype(F)
    wrt = ["X"] + list(inits)
    _, _, grads, ups = _check("LayerNormalization", model, {"X": x}, wrt)
    if HAS_TORCH:
        import torch.nn.functional as tf

        def fn(t, s, b=None):
            y = tf.layer_norm(t, norm_shape, None, None, eps=1e-4) * s
            return y + b if b is not None else y

        _torch_compare("LayerNormalization", [x] + [inits[k] for k in wrt[1:]], wrt, fn, ups["Y"], grads)


@pytest.mark.parametrize("outputs", [("Y", "Mean"), ("Y", "InvStdDev"), ("Y", "Mean", "InvStdDev")])
def test_layernorm_mean_invstd_outputs_differentiated(outputs):
    rng = _rng("ln-out", outputs)
    x = rng.standard_normal((3, 2, 4)).astype(F)
    inits = {"S": rng.uniform(0.5, 1.5, (2, 4)).astype(F)}
    names = ["Y", "Mean", "InvStdDev"]
    node_outs = [n if n in outputs else "" for n in names]
    while node_outs[-1] == "":
        node_outs.pop()
    node = helper.make_node("LayerNormalization", ["X", "S"], node_outs, name="ln", axis=1)
    shapes = {"Y": [3, 2, 4], "Mean": [3, 1, 1], "InvStdDev": [3, 1, 1]}
    model = make_model([node], [("X", F, [3, 2, 4])], [(n, F, shapes[n]) for n in outputs], inits, opset=17)
    _check("LayerNormalization", model, {"X": x}, ["X", "S"])


def test_layernorm_symbolic_batch():
    s = _rng("ln-sym").uniform(0.5, 1.5, (4,)).astype(F)
    node = helper.make_node("LayerNormalization", ["X", "S"], ["Y"], name="ln")
    model = make_model([node], [("X", F, ["b", 3, 4])], [("Y", F, ["b", 3, 4])], {"S": s}, opset=17)
    for n in (1, 3):
        _check("LayerNormalization", model, {"X": _rng("ln-sym", n).standard_normal((n, 3, 4)).astype(F)},
               ["X", "S"])


# ---------------------------------------------------------------- InstanceNormalization
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 2, 3, 4), (1, 2, 2, 2, 3)], ids=lambda s: "x".join(map(str, s)))
def test_instancenorm(shape):
    rng = _rng("in", shape)
    c = shape[1]
    inits = {"S": rng.uniform(0.5, 1.5, c).astype(F), "B": rng.standard_normal(c).astype(F)}
    node = helper.make_node("InstanceNormalization", ["X", "S", "B"], ["Y"], name="in", epsilon=1e-3)
    model = make_model([node], [("X", F, list(shape))], [("Y", F, list(shape))], inits, opset=13)
    x = rng.standard_normal(shape).astype(F)
    _, _, grads, ups = _check("InstanceNormalization", model, {"X": x}, ["X", "S", "B"], rtol=1e-3)
    if HAS_TORCH:
        import torch.nn.functional as tf

        _torch_compare("InstanceNormalization", [x, inits["S"], inits["B"]], ["X", "S", "B"],
                       lambda t, s, b: tf.instance_norm(t, weight=s, bias=b, eps=1e-3), ups["Y"], grads)


# ---------------------------------------------------------------- LRN
# onnxruntime's CPU LRN takes only 4-D inputs and odd sizes, so those are what can be checked.
@pytest.mark.parametrize("size,alpha,beta,bias", [(1, 1e-2, 0.75, 1.0), (3, 0.5, 0.75, 1.0), (5, 2.0, 0.5, 2.0),
                                                  (3, 0.3, 1.5, 0.5), (7, 1.0, 0.9, 1.0), (5, 1e-4, 0.75, 1.0)])
@pytest.mark.parametrize("shape", [(2, 6, 3, 2), (1, 9, 2, 3)], ids=["C6", "C9"])
def test_lrn(shape, size, alpha, beta, bias):
    rng = _rng("lrn", shape, size, alpha, beta, bias)
    x = rng.standard_normal(shape).astype(F)
    node = helper.make_node("LRN", ["X"], ["Y"], name="lrn", size=size, alpha=alpha, beta=beta, bias=bias)
    model = make_model([node], [("X", F, list(shape))], [("Y", F, list(shape))], opset=13)
    _, _, grads, ups = _check("LRN", model, {"X": x}, ["X"], rtol=1e-3)
    if HAS_TORCH:
        import torch.nn.functional as tf

        _torch_compare("LRN", [x], ["X"], lambda t: tf.local_response_norm(t, size, alpha, beta, bias),
                       ups["Y"], grads)


def _backward_only(gm, x, dy):
    """Run only the backward nodes of a gradient model (the forward LRN node removed)."""
    import onnx

    from gradutil import session

    m = onnx.ModelProto()
    m.CopyFrom(gm)
    fwd = [n for n in m.graph.node if n.op_type == "LRN"]
    m.graph.node.remove(fwd[0])
    keep = [o for o in m.graph.output if o.name != "Y"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    return session(m).run(["X_grad"], {"X": x, "Y_grad": dy})[0]


@pytest.mark.parametrize("size,shape", [(2, (2, 5, 3)), (4, (1, 6, 2, 2)), (6, (2, 4, 3)), (3, (2, 5)),
                                        (5, (1, 4, 2, 2, 2))])
def test_lrn_even_sizes_and_other_ranks_against_numpy(size, shape):
    """onnxruntime runs LRN only for 4-D inputs and odd sizes; the rule follows the spec for all.
    Here the backward nodes alone run in onnxruntime and are compared with float64 central
    differences of a numpy LRN written from the spec's window max(0, c-floor((size-1)/2)) ..
    min(C-1, c+ceil((size-1)/2))."""
    rng = _rng("lrn-spec", size, shape)
    x = rng.standard_normal(shape).astype(F)
    alpha, beta, bias = 0.7, 0.75, 1.0
    node = helper.make_node("LRN", ["X"], ["Y"], name="lrn", size=size, alpha=alpha, beta=beta, bias=bias)
    model = make_model([node], [("X", F, list(shape))], [("Y", F, list(shape))], opset=13)
    gm = onnxbp.gradient(model, ["X"])
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2

    def lrn(z):
        sq = np.zeros_like(z)
        for c in range(z.shape[1]):
            sq[:, c] = (z[:, max(0, c - lo):min(z.shape[1], c + hi + 1)] ** 2).sum(axis=1)
        return z / (bias + alpha / size * sq) ** beta

    u = rng.standard_normal(shape).astype(F)
    ours = _backward_only(gm, x, u)
    x64, u64 = x.astype(np.float64), u.astype(np.float64)
    num = np.zeros_like(x64)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x64)
        e[i] = 1e-6
        num[i] = np.sum(u64 * (lrn(x64 + e) - lrn(x64 - e))) / 2e-6
    _record("LRN (numpy, even/other ranks)", assert_close(ours, num, 1e-4, 1e-6, "LRN dX"))


# ---------------------------------------------------------------- Dropout
def _dropout_model(opset, ratio=0.3, training="const", with_mask=True, ratio_runtime=False):
    ins = [("X", F, [4, 8, 3])]
    inits = {}
    node_in = ["X"]
    if opset >= 12:
        if ratio_runtime:
            ins.append(("R", F, []))
        else:
            inits["R"] = np.array(ratio, F)
        node_in.append("R")
        if training in ("const", "false"):
            inits["T"] = np.array(training == "const")
            node_in.append("T")
        elif training == "runtime":
            ins.append(("T", TensorProto.BOOL, []))
            node_in.append("T")
        attrs = {"seed": 7}
    else:
        attrs = {"ratio": ratio}
    outs = ["Y", "M"] if with_mask else ["Y"]
    node = helper.make_node("Dropout", node_in, outs, name="dropout", **attrs)
    gouts = [("Y", F, [4, 8, 3])] + ([("M", TensorProto.BOOL if opset >= 10 else F, [4, 8, 3])] if with_mask else [])
    return make_model([node], ins, gouts, inits, opset=opset)


@pytest.mark.parametrize("opset", [12, 13, 22])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask-output", "mask-omitted"])
@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_dropout_training(opset, with_mask, ratio):
    model = _dropout_model(opset, ratio, "const", with_mask)
    x = _rng("do", opset, with_mask, ratio).standard_normal((4, 8, 3)).astype(F)
    gm, outs, grads, ups = run_gradient(model, {"X": x}, ["X"])
    dropout = next(n for n in gm.graph.node if n.op_type == "Dropout")
    assert len(dropout.output) == 2 and dropout.output[1]  # the mask output exists (added if omitted)
    mask = outs["M"] if with_mask else (outs["Y"] != 0)
    assert 0 < mask.mean() < 1
    # The forward is exact: Y = X * mask / (1 - ratio) ...
    assert_close(outs["Y"], x * mask / (1 - ratio), 1e-6, 0, "forward")
    # ... and so is the gradient.
    _record("Dropout (training)", assert_close(grads["X"], ups["Y"] * mask / (1 - ratio), 1e-6, 0, "dX"))


@pytest.mark.parametrize("training", [True, False])
def test_dropout_runtime_training_mode_and_ratio(training):
    model = _dropout_model(13, training="runtime", ratio_runtime=True)
    x = _rng("do-rt", training).standard_normal((4, 8, 3)).astype(F)
    feeds = {"X": x, "R": np.array(0.4, F), "T": np.array(training)}
    gm, outs, grads, ups = run_gradient(model, feeds, ["X"])
    mask = outs["M"]
    scale = 1 / (1 - 0.4) if training else 1.0
    if not training:
        assert mask.all()
    _record("Dropout (training)", assert_close(grads["X"], ups["Y"] * mask * scale, 1e-6, 0, "dX"))
    if not training:
        _check("Dropout (inference)", model, feeds, ["X"])


@pytest.mark.parametrize("opset,training", [(7, None), (10, None), (12, None), (13, "false")])
def test_dropout_inference_is_identity(opset, training):
    model = _dropout_model(opset, training=training if training else "none", with_mask=False)
    x = _rng("do-inf", opset).standard_normal((4, 8, 3)).astype(F)
    gm, _, grads, ups = _check("Dropout (inference)", model, {"X": x}, ["X"])
    assert_close(grads["X"], ups["Y"], 0, 0, "dX")
    assert len(next(n for n in gm.graph.node if n.op_type == "Dropout").output) == 1  # no mask added


# ---------------------------------------------------------------- a training step
@pytest.mark.parametrize("opset", [13, 15])
def test_training_step_mlp_batchnorm_dropout(opset):
    """MatMul -> BatchNorm (training, running stats as graph outputs) -> Relu -> Dropout (training)
    -> MatMul, wrt=None, symbolic batch: every parameter's gradient against torch autograd with
    the same dropout mask; running stats treated as buffers (input_mean' = momentum*running_mean')."""
    rng = _rng("train-step", opset)
    w1 = rng.standard_normal((5, 4)).astype(F) * 0.5
    w2 = rng.standard_normal((4, 3)).astype(F) * 0.5
    inits = {"W1": w1, "W2": w2, "scale": rng.uniform(0.5, 1.5, 4).astype(F), "B": rng.standard_normal(4).astype(F),
             "mean": np.zeros(4, F), "var": np.ones(4, F), "R": np.array(0.25, F), "T": np.array(True)}
    bn_attrs = dict(epsilon=1e-5, momentum=0.9)
    bn_outs = ["h2", "rm", "rv"]
    if opset >= 14:
        bn_attrs["training_mode"] = 1
    else:
        bn_outs += ["sm", "sv"]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h1"], name="mm1"),
             helper.make_node("BatchNormalization", ["h1", "scale", "B", "mean", "var"], bn_outs, name="bn",
                              **bn_attrs),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("Dropout", ["h3", "R", "T"], ["h4", "mask"], name="do", seed=11),
             helper.make_node("MatMul", ["h4", "W2"], ["Y"], name="mm2")]
    model = make_model(nodes, [("X", F, ["batch", 5])],
                       [("Y", F, ["batch", 3]), ("rm", F, [4]), ("rv", F, [4]), ("mask", TensorProto.BOOL, ["batch", 4])],
                       inits, opset=opset)
    x = rng.standard_normal((6, 5)).astype(F)
    _, outs, grads, ups = run_gradient(model, {"X": x})
    assert set(grads) == {"W1", "W2", "scale", "B"}  # running stats are state, not in the default wrt
    _, outs, grads, ups = run_gradient(model, {"X": x}, ["W1", "W2", "scale", "B", "mean", "var"])
    if HAS_TORCH:
        import torch
        import torch.nn.functional as tf

        t = {k: torch.tensor(np.asarray(v, dtype=np.float64), requires_grad=True)
             for k, v in inits.items() if k in grads}
        mask = torch.tensor(outs["mask"], dtype=torch.float64)
        h = torch.tensor(x, dtype=torch.float64) @ t["W1"]
        h = tf.batch_norm(h, None, None, t["scale"], t["B"], training=True, eps=1e-5)
        y = (torch.relu(h) * mask / 0.75) @ t["W2"]
        y.backward(torch.tensor(ups["Y"], dtype=torch.float64))
        for k in ("W1", "W2", "scale", "B"):
            _record("training step (torch)", assert_close(grads[k], t[k].grad.numpy(), 1e-4, 1e-5, f"d{k}"))
    assert_close(grads["mean"], 0.9 * ups["rm"], 1e-6, 1e-7, "dmean")
    assert_close(grads["var"], 0.9 * ups["rv"], 1e-6, 1e-7, "dvar")


def test_dropout_opset6_training_uses_float_mask_output():
    """Opset 6 (is_test=0) is training mode; onnxruntime has no Dropout-6 kernel, so only the
    emitted graph is checked: the omitted mask output is added and multiplies Y'."""
    from gradutil import assert_standard

    node = helper.make_node("Dropout", ["X"], ["Y"], name="do", ratio=0.3, is_test=0)
    model = make_model([node], [("X", F, [2, 3])], [("Y", F, [2, 3])], opset=6, ir_version=3)
    gm = onnxbp.gradient(model, ["X"])
    assert_standard(gm)
    do = next(n for n in gm.graph.node if n.op_type == "Dropout")
    mask = do.output[1]
    assert mask
    cast = next(n for n in gm.graph.node if n.op_type == "Cast")
    assert list(cast.input) == [mask]
    assert not any(n.op_type == "Where" for n in gm.graph.node)  # Where needs opset 9


def test_float64_batchnorm_training_layernorm_dropout():
    """Backward constants take the model's dtype (float64 here)."""
    D = np.float64
    rng = _rng("f64-norm")
    c = 3
    bn = {"scale": rng.uniform(0.5, 1.5, c), "B": rng.standard_normal(c), "mean": np.zeros(c), "var": np.ones(c)}
    nodes = [helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["h", "rm", "rv"],
                              training_mode=1, epsilon=1e-3),
             helper.make_node("LayerNormalization", ["h", "S"], ["g"], axis=1),
             helper.make_node("Dropout", ["g"], ["Y"])]
    inits = dict(bn, S=rng.uniform(0.5, 1.5, (c, 4)))  # over (C, L): BN's per-channel B is not cancelled
    model = make_model(nodes, [("X", D, ["n", c, 4])], [("Y", D, ["n", c, 4])], inits, opset=15 + 2)
    x = rng.standard_normal((5, c, 4))
    _check("BatchNormalization (training)", model, {"X": x}, ["X", "scale", "B", "S"])


# ---------------------------------------------------------------- GroupNormalization, RMSNormalization, Attention
def _gn_model(opset, scale_len, groups=2):
    from onnx import numpy_helper

    node = helper.make_node("GroupNormalization", ["X", "s", "b"], ["Y"], num_groups=groups)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 6, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6, 3])],
        [numpy_helper.from_array(np.linspace(0.5, 1.5, scale_len).astype(np.float32), "s"),
         numpy_helper.from_array(np.zeros(scale_len, np.float32), "b")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def test_group_norm_symbolic_batch_and_downstream_shapes():
    """onnx infers no shape for GroupNormalization; onnxbp's shape inference gives Y X's shape, so a
    rule downstream that needs ranks (Softmax over an axis) works, with a symbolic batch."""
    m = _gn_model(21, 6)
    m.graph.node.append(helper.make_node("Softmax", ["Y"], ["Z"], axis=1))
    m.graph.output[0].name = "Z"
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 6, 3)).astype(np.float32)
        gm, outs, grads, ups = run_gradient(m, {"X": x}, ["X", "s", "b"])
        assert grads["s"].shape == (6,) and grads["X"].shape == (n, 6, 3)
        assert_fd(m, ["X", "s", "b"], feeds={"X": x}, grad_model=gm)


def test_group_norm_refusals():
    with pytest.raises(onnxbp.ModelLoadError, match=r"fails the ONNX checker: Op registered for GroupNormalization "
                                                    r"is deprecated in domain_version of 18"):
        onnxbp.gradient(_gn_model(18, 2))
    with pytest.raises(onnxbp.UnsupportedAttributeError,
                       match=r"\(GroupNormalization, opset 21\): scale has 2 values but opset 21 takes one per "
                             r"channel \(6\); opsets 18-20 took one per group"):
        onnxbp.gradient(_gn_model(21, 2))


def _attention_model(node, with_past=True, outputs=("Y", "PK", "PV", "QK")):
    q = ("Q", np.float32, [1, 2, 3, 4])
    kv = [("K", np.float32, [1, 2, 4, 4]), ("V", np.float32, [1, 2, 4, 4])]
    past = [("pk", np.float32, [1, 2, 2, 4]), ("pv", np.float32, [1, 2, 2, 4])] if with_past else []
    n_keys = 6 if with_past else 4
    shapes = {"Y": [1, 2, 3, 4], "PK": [1, 2, n_keys, 4], "PV": [1, 2, n_keys, 4], "QK": [1, 2, 3, n_keys]}
    return make_model([node], [q] + kv + past, [(o, np.float32, shapes[o]) for o in outputs], opset=23)


def test_attention_qk_mode2_causal_float32():
    """Mode 2 with is_causal: onnxruntime writes -FLT_MAX at the causal positions (a constant: no
    gradient there); the float64 reference writes -inf, so this case runs its differences in float32."""
    node = helper.make_node("Attention", ["Q", "K", "V", "", "pk", "pv"], ["Y", "PK", "PV", "QK"],
                            is_causal=1, softcap=2.0, qk_matmul_output_mode=2)
    assert_fd(_attention_model(node), ["Q", "K", "V", "pk", "pv"], precision="float32", rtol=2e-3)


def test_attention_present_without_cache():
    """No past: present_key is K itself, so K' = (attention's K') + present_key'."""
    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y", "PK"])
    assert_fd(_attention_model(node, with_past=False, outputs=("Y", "PK")), ["Q", "K", "V"])


def test_attention_refusals():
    node = helper.make_node("Attention", ["Q", "K", "V", "", "pk", "pv"], ["Y", "PK", "PV"], name="att")
    m = _attention_model(node, outputs=("PK", "PV"))
    with pytest.raises(onnxbp.UnsupportedAttributeError) as exc:
        onnxbp.gradient(m, ["Q", "K"])
    assert str(exc.value) == (
        "node 'att' (Attention, opset 23): only present_key/present_value carry a gradient, and they do not "
        "depend on Q or attn_mask: their gradient is structurally zero; leave them out of wrt")
    node = helper.make_node("Attention", ["Q", "K", "V", "", "pk"], ["Y"], name="half")
    m = make_model([node], [("Q", np.float32, [1, 2, 3, 4]), ("K", np.float32, [1, 2, 4, 4]),
                            ("V", np.float32, [1, 2, 4, 4]), ("pk", np.float32, [1, 2, 2, 4])],
                   [("Y", np.float32, [1, 2, 3, 4])], opset=23, check=False)
    with pytest.raises(onnxbp.UnsupportedAttributeError) as exc:
        onnxbp.gradient(m, ["Q"])
    assert str(exc.value) == "node 'half' (Attention, opset 23): past_key and past_value must be given together"


@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batchnorm_training_affine_map_forms(shape):
    """The backward's affine map of X: one inference-mode BatchNormalization (default target), a Mul and
    an Add under target="portable" (tract runs BN only with constant parameters); same gradients, and
    both against torch autograd."""
    model, feeds, inits = _bn_model(shape, 15, training=True)
    wrt = ["X", "scale", "B"]
    res = {}
    for target in ("onnxruntime", "portable"):
        gm, _, grads, ups = run_gradient(model, feeds, wrt, target=target)
        bns = [n for n in gm.graph.node if n.op_type == "BatchNormalization"]
        assert len(bns) == (2 if target == "onnxruntime" else 1), target  # the forward's, and the affine map
        res[target] = (grads, ups)
    for k in wrt:
        assert_close(res["portable"][0][k], res["onnxruntime"][0][k], 1e-5, 1e-6, k)
    if HAS_TORCH:
        import torch.nn.functional as tf

        for target, (grads, ups) in res.items():
            _torch_compare("BatchNormalization (training)", [feeds["X"], inits["scale"], inits["B"]], wrt,
                           lambda x, s, b: tf.batch_norm(x, None, None, s, b, training=True, eps=1e-3),
                           ups["Y"], grads)
