"""Training graphs (onnxbp.training) and the ``onnxbp train`` command.

Tolerances: the SoftmaxCrossEntropyLoss rule is checked against finite
differences (onnxbp's checker, rtol 1e-3) and torch autograd (rtol 1e-5,
float32); one optimizer step of each loss against torch (rtol 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from gradutil import HAS_TORCH, assert_close, assert_fd, assert_standard, make_model, run_gradient
from onnxbp.training import SGD, Adam, AdamW, Trainer, TrainingError, build_step_model

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "models" / "mlp.onnx"
LENET = ROOT / "models" / "lenet.onnx"
HAS_POOL = onnxbp.REGISTRY.lookup("MaxPool", "", 17) is not None and onnxbp.REGISTRY.lookup("Conv", "", 17) is not None


def _main(argv):
    from cli.main import main

    return main([str(a) for a in argv])


# ------------------------------------------------------------------ SoftmaxCrossEntropyLoss rule
def _sce_model(reduction, weighted, ignore, spatial):
    c = 4
    x_shape = ["N", c] + ([3, 2] if spatial else [])
    l_shape = ["N"] + ([3, 2] if spatial else [])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
           helper.make_tensor_value_info("t", TensorProto.INT64, l_shape)]
    inputs = ["x", "t"] + (["w"] if weighted else [])
    attrs = {"reduction": reduction}
    if ignore is not None:
        attrs["ignore_index"] = ignore
    node = helper.make_node("SoftmaxCrossEntropyLoss", inputs, ["loss"], **attrs)
    out_shape = [] if reduction != "none" else l_shape
    inits = [numpy_helper.from_array(np.array([0.5, 1.0, 2.0, 1.5], np.float32), "w")] if weighted else []
    g = helper.make_graph([node], "sce", ins, [helper.make_tensor_value_info("loss", TensorProto.FLOAT, out_shape)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


SCE_GRID = [(r, w, i, s) for r in ("mean", "sum", "none") for w in (False, True) for i in (None, 1)
            for s in (False, True)]


def _sce_feeds(spatial, seed):
    rng = np.random.default_rng(seed)
    shape = (3, 4) + ((3, 2) if spatial else ())
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 4, (3,) + ((3, 2) if spatial else ())).astype(np.int64)
    t.flat[0], t.flat[-1] = 1, 2  # one ignored element where ignore_index=1, one not
    return x, t


@pytest.mark.parametrize("reduction,weighted,ignore,spatial", SCE_GRID)
def test_sce_rule_finite_differences(reduction, weighted, ignore, spatial):
    x, t = _sce_feeds(spatial, seed=1)
    assert_fd(_sce_model(reduction, weighted, ignore, spatial), wrt=["x"], feeds={"x": x, "t": t}, rtol=1e-3)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("reduction,weighted,ignore,spatial", SCE_GRID)
def test_sce_rule_matches_torch(reduction, weighted, ignore, spatial):
    import torch

    x, t = _sce_feeds(spatial, seed=2)
    model = _sce_model(reduction, weighted, ignore, spatial)
    _, outs, grads, ups = run_gradient(model, {"x": x, "t": t}, wrt=["x"], seed=3)
    xt = torch.from_numpy(x).requires_grad_(True)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5]) if weighted else None
    loss = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), weight=w, reduction=reduction,
                                             ignore_index=-100 if ignore is None else ignore)
    loss.backward(torch.from_numpy(np.asarray(ups["loss"], np.float32)))
    assert_close(outs["loss"], loss.detach().numpy(), 1e-5, 1e-6, "loss")
    assert_close(grads["x"], xt.grad.numpy(), 1e-5, 1e-7, "dloss/dx")


# ------------------------------------------------------------------ the step model
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "l1"])
@pytest.mark.parametrize("opt", [SGD(), SGD(momentum=0.9, dampening=0.1), Adam(amsgrad=True), AdamW()],
                         ids=["sgd", "sgd_damp", "adam_ams", "adamw"])
def test_step_model_is_standard_and_self_describing(loss, opt):
    sm = build_step_model(MLP, loss=loss, optimizer=opt, return_logits=True)
    assert_standard(sm.model)
    spec = sm.spec
    ins = {i.name for i in sm.model.graph.input}
    outs = {o.name for o in sm.model.graph.output}
    assert not any(n.endswith("_grad") for n in ins), "the upstream loss gradient must be a constant"
    assert ins == set(spec.data_inputs) | {spec.target, spec.lr} | ({spec.step} if spec.step else set()) | set(spec.updates)
    assert outs == {spec.loss, spec.logits} | set(spec.updates.values())
    assert spec.params == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert (spec.step is not None) == opt.needs_step
    assert all(len(spec.state[p]) == len(opt.state_names()) for p in spec.params)
    meta = {m.key: m.value for m in sm.model.metadata_props}
    assert json.loads(meta["onnxbp.training"])["updates"] == spec.updates


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "l1"])
def test_one_sgd_step_matches_torch_for_each_loss(loss):
    import torch

    rng = np.random.default_rng(5)
    x = rng.random((7, 64)).astype(np.float32)
    y = rng.integers(0, 10, 7) if loss == "cross_entropy" else rng.standard_normal((7, 10)).astype(np.float32)
    tr = Trainer(MLP, loss=loss, optimizer=SGD())
    init = {t.name: numpy_helper.to_array(t) for t in tr.forward.graph.initializer}
    lr = 0.1
    ours = tr.train_step(x, y, lr=lr, check=True)
    tp = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in init.items()}
    h = torch.relu(torch.from_numpy(x) @ tp["fc1.weight"].T + tp["fc1.bias"])
    z = h @ tp["fc2.weight"].T + tp["fc2.bias"]
    ref = {"cross_entropy": lambda: torch.nn.functional.cross_entropy(z, torch.from_numpy(y)),
           "mse": lambda: torch.nn.functional.mse_loss(z, torch.from_numpy(y)),
           "l1": lambda: torch.nn.functional.l1_loss(z, torch.from_numpy(y))}[loss]()
    ref.backward()
    assert ours == pytest.approx(ref.item(), rel=1e-5)
    new = tr.parameters()
    for k, p in tp.items():
        assert_close(new[k], (p - lr * p.grad).detach().numpy(), 1e-5, 1e-7, f"{loss}: {k}")


def test_output_loss_model_trains():
    """loss='output': the model's own scalar output is the loss (here a least-squares fit)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 3)).astype(np.float32)
    b = (a @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "w"], ["p"]), helper.make_node("Sub", ["p", "b"], ["r"]),
             helper.make_node("MatMul", ["r", "r"], ["loss"])]
    m = make_model(nodes, [("a", np.float32, ["N", 3]), ("b", np.float32, ["N"])], [("loss", np.float32, [])],
                   {"w": np.zeros(3, np.float32)})
    # two data inputs: drive the step model directly
    sm = build_step_model(m, loss="output", optimizer=SGD(momentum=0.5))
    sess = ort.InferenceSession(sm.model.SerializeToString(), providers=["CPUExecutionProvider"])
    carried = dict(sm.initial)
    losses = []
    for _ in range(60):
        feeds = {"a": a, "b": b, sm.spec.lr: np.array(0.01, np.float32), **carried}
        res = dict(zip([o.name for o in sm.model.graph.output], sess.run(None, feeds)))
        losses.append(float(res[sm.spec.loss]))
        carried = {k: res[v] for k, v in sm.spec.updates.items()}
    assert losses[-1] < 1e-3 * losses[0]
    np.testing.assert_allclose(carried["w"], [1.0, -2.0, 0.5], atol=1e-2)


def _gemm_then(op, opset):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node(op, ["h"], ["logits"])]
    return make_model(nodes, [("x", np.float32, ["N", 4])], [("logits", np.float32, ["N", 3])],
                      {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_is_converted_for_softmax_cross_entropy(opset):
    sm = build_step_model(_gemm_then("Relu", opset), optimizer=SGD())
    assert_standard(sm.model)
    assert [i.version for i in sm.model.opset_import if i.domain in ("", "ai.onnx")][0] >= 13


def test_op_without_rule_is_a_clear_error():
    with pytest.raises(onnxbp.UnsupportedOpError,
                       match=r"building the backward graph of the training step: node '.*' \(op Hardmax"):
        build_step_model(_gemm_then("Hardmax", 17))


# ------------------------------------------------------------------ parameters
def test_frozen_and_trained_conflict_names_the_parameter():
    with pytest.raises(TrainingError, match=r"parameter 'fc1.bias' cannot be frozen and require gradient "
                                            r"computation at the same time"):
        build_step_model(MLP, requires_grad=["fc1.weight", "fc1.bias"], frozen_params=["fc1.bias"])


@pytest.mark.parametrize("kind", ["requires_grad", "frozen_params"])
def test_unknown_parameter_name(kind):
    with pytest.raises(TrainingError, match=rf"{kind} names 'fc9.weight', which is not an initializer"):
        build_step_model(MLP, **{kind: ["fc9.weight"]})


@pytest.mark.parametrize("how", ["frozen", "requires_grad"])
def test_frozen_parameters_stay_constant(how):
    kw = {"frozen_params": ["fc1.weight", "fc1.bias"]} if how == "frozen" else {"requires_grad": ["fc2.weight", "fc2.bias"]}
    tr = Trainer(MLP, optimizer=AdamW(), **kw)
    assert tr.spec.params == ["fc2.weight", "fc2.bias"]
    assert set(tr.spec.frozen) == {"fc1.weight", "fc1.bias"}
    before = {t.name: numpy_helper.to_array(t) for t in tr.forward.graph.initializer}
    rng = np.random.default_rng(0)
    for _ in range(3):
        tr.train_step(rng.random((8, 64)).astype(np.float32), rng.integers(0, 10, 8), lr=1e-2)
    after = numpy_helper.to_array(next(t for t in tr.to_model().graph.initializer if t.name == "fc1.weight"))
    np.testing.assert_array_equal(after, before["fc1.weight"])
    assert not np.allclose(tr.parameters()["fc2.weight"], before["fc2.weight"])


# ------------------------------------------------------------------ eval, export, dropout
def test_export_round_trip_matches_trainer_eval(tmp_path):
    rng = np.random.default_rng(0)
    tr = Trainer(MLP, optimizer=Adam())
    x = rng.random((32, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    for _ in range(5):
        tr.train_step(x, y, lr=1e-2)
    out = tr.export(tmp_path / "trained.onnx")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["x"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], tr.evaluate(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(onnxbp.OutputPathError, match="is the input model"):
        tr.export(MLP)


@pytest.mark.skipif(onnxbp.REGISTRY.lookup("BatchNormalization", "", 17) is None,
                    reason="needs BatchNormalization training-mode rule")
def test_batchnorm_running_stats_exported_and_used_in_eval(tmp_path):
    rng = np.random.default_rng(4)
    c = 6
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
             helper.make_node("BatchNormalization", ["h", "g", "b", "rm", "rv"], ["hb"], momentum=0.8),
             helper.make_node("Relu", ["hb"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["logits"], transB=1)]
    m = make_model(nodes, [("x", np.float32, ["N", 5])], [("logits", np.float32, ["N", 3])],
                   {"w1": rng.standard_normal((c, 5)).astype(np.float32), "g": np.ones(c, np.float32),
                    "b": np.zeros(c, np.float32), "rm": np.zeros(c, np.float32), "rv": np.ones(c, np.float32),
                    "w2": rng.standard_normal((3, c)).astype(np.float32)})
    tr = Trainer(m, optimizer=AdamW())
    assert tr.spec.buffers == ["rm", "rv"] and "rm" not in tr.spec.params
    x = (rng.standard_normal((64, 5)) * 3 + 1).astype(np.float32)
    y = rng.integers(0, 3, 64)
    for _ in range(30):
        tr.train_step(x, y, lr=0.0)  # lr 0: only the running statistics move
    h = x @ numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1")).T
    p = tr.parameters()
    # 30 updates with momentum 0.8 from (0, 1): torch semantics, unbiased variance
    np.testing.assert_allclose(p["rm"], h.mean(0) * (1 - 0.8 ** 30), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p["rv"], h.var(0, ddof=1) * (1 - 0.8 ** 30) + 0.8 ** 30, rtol=1e-4)
    out = tr.export(tmp_path / "bn.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, tr.evaluate(x), rtol=1e-5, atol=1e-5)
    # inference mode normalises with the running statistics, not the batch's
    hb = (h - p["rm"]) / np.sqrt(p["rv"] + 1e-5)
    np.testing.assert_allclose(got, np.maximum(hb, 0) @ numpy_helper.to_array(m.graph.initializer[-1]).T,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(onnxbp.REGISTRY.lookup("Dropout", "", 17) is None, reason="needs the Dropout rule")
def test_dropout_is_random_in_training_and_off_in_eval():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((3, 16)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
             helper.make_node("Dropout", ["h", "ratio"], ["d"]),
             helper.make_node("Gemm", ["d", "w2"], ["logits"], transB=1)]
    m = make_model(nodes, [("x", np.float32, ["N", 8])], [("logits", np.float32, ["N", 3])],
                   {"w1": w1, "w2": w2, "ratio": np.array(0.5, np.float32)})
    tr = Trainer(m, optimizer=SGD(), seed=1, frozen_params=["ratio"])
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    losses = {tr.train_step(x, y, lr=0.0) for _ in range(4)}
    assert len(losses) > 1, "training-mode Dropout must draw a new mask per step"
    ref = (x @ w1.T) @ w2.T  # eval: Dropout is the identity
    np.testing.assert_allclose(tr.evaluate(x), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the CLI
def _npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((40, 64)).astype(np.float32), "y_train": rng.integers(0, 10, 40),
              "x_test": rng.random((10, 64)).astype(np.float32), "y_test": rng.integers(0, 10, 10)}
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_progress_bar_frames():
    import io

    from cli.train import _Progress

    stream = io.StringIO()
    bar = _Progress(stream, enabled=True, width=10)
    for done in (1, 90):
        bar.batch(2, done, 90, 0.5, 6)
    assert stream.getvalue().endswith("\repoch 2/6 [##########] 90/90 loss 0.5000\n")


def test_cli_trains_mlp_on_digits_and_writes_metrics_plot(tmp_path, capsys):
    out, metrics, plot = tmp_path / "mlp.onnx", tmp_path / "m.json", tmp_path / "c.png"
    rc = _main(["train", MLP, "--data", "digits", "--epochs", 6, "-o", out, "--metrics", metrics,
                "--plot", plot, "--seed", 0, "--threads", 1])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "epoch 6/6" in cap.out and "test accuracy" in cap.out
    assert "\r" not in cap.err  # stderr is not a terminal here: no progress frames in logs
    m = json.loads(metrics.read_text())
    assert m["epoch"] == list(range(1, 7))
    assert len(m["train_loss"]) == len(m["test_accuracy_per_epoch"]) == 6
    assert m["train_loss"][-1] < m["train_loss"][0]
    assert m["test_accuracy"] == m["test_accuracy_per_epoch"][-1] >= 0.9
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    from onnxbp.training.data import load_digits_dataset

    ds = load_digits_dataset((None, 64))
    acc = np.mean(np.argmax(sess.run(None, {"x": ds.x_test})[0], 1) == ds.y_test)
    assert acc == pytest.approx(m["test_accuracy"])


def test_cli_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    """Interrupted in epoch 3 of 4 (cosine schedule), then resumed: same losses and weights as one run."""
    data = _npz(tmp_path / "d.npz")
    common = ["--data", data, "--optimizer", "sgd", "--lr", 0.05, "--batch-size", 8, "--threads", 1, "--seed", 3,
              "--epochs", 4]
    full = tmp_path / "full.json"
    assert _main(["train", MLP, *common, "-o", tmp_path / "a.onnx", "--metrics", full]) == 0
    ck = tmp_path / "ck"
    calls = {"n": 0}
    orig = Trainer.train_step

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12:  # 5 batches per epoch: the 2nd batch of epoch 3
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_step", interrupted)
        assert _main(["train", MLP, *common, "-o", tmp_path / "b.onnx", "--checkpoint", ck]) == 130
    assert (ck / "checkpoint.npz").exists()
    part = tmp_path / "part.json"
    assert _main(["train", MLP, *common, "-o", tmp_path / "c.onnx", "--checkpoint", ck,
                  "--resume", "--metrics", part]) == 0
    a, c = json.loads(full.read_text()), json.loads(part.read_text())
    assert c["epoch"] == [1, 2, 3, 4]
    np.testing.assert_allclose(c["train_loss"], a["train_loss"], rtol=1e-6)
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    wc = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "c.onnx")).graph.initializer}
    for k in wa:
        np.testing.assert_allclose(wc[k], wa[k], rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    assert _main(["train", MLP, "--data", data, "--optimizer", "adamw", "--epochs", 5, "-o", tmp_path / "d.onnx",
                  "--checkpoint", ck, "--resume"]) == 2
    assert "was written with optimizer" in capsys.readouterr().err


def test_cli_ctrl_c_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    data = _npz(tmp_path / "d.npz")
    ck = tmp_path / "ck"
    calls = {"n": 0}
    orig = Trainer.train_step

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2 of 5 batches per epoch
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    rc = _main(["train", MLP, "--data", data, "--epochs", 3, "--batch-size", 8, "-o", tmp_path / "o.onnx",
                "--checkpoint", ck])
    err = capsys.readouterr().err
    assert rc == 130
    assert f"the last checkpoint is intact at {ck / 'checkpoint.npz'}" in err
    from onnxbp.training.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(ck)
    assert meta["epoch"] == 1 and meta["step"] == 5 and "fc1.weight" in tensors
    assert not (tmp_path / "o.onnx").exists()
    assert not [p for p in ck.iterdir() if p.name != "checkpoint.npz"], "temporary files left behind"


BAD_DATA = [
    ("shape", {"x_train": np.zeros((40, 63), np.float32)}, "x_train has shape (40, 63), but model input 'x' expects N x 64"),
    ("label", {"y_test": np.full(10, 10)}, "y_test: label 10 is out of range for a model with 10 classes"),
    ("negative", {"y_train": np.full(40, -1)}, "y_train: label -1 is out of range"),
    ("nan", {"x_test": np.full((10, 64), np.nan, np.float32)}, "x_test contains 640 NaN or infinite values"),
    ("missing", {"y_test": None}, "lacks y_test"),
    ("count", {"y_train": np.zeros(39, np.int64)}, "x_train has 40 samples but y_train has 39"),
    ("float_labels", {"y_train": np.full(40, 0.5)}, "cross_entropy needs integer class labels"),
]


@pytest.mark.parametrize("case,over,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_cli_bad_data_one_line_error(tmp_path, capsys, case, over, message):
    data = _npz(tmp_path / "d.npz", **over)
    rc = _main(["train", MLP, "--data", data, "--epochs", 1, "-o", tmp_path / "o.onnx", "--checkpoint", tmp_path / "ck"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("onnxbp: error:")
    assert not (tmp_path / "ck").exists(), "nothing may be trained before the data is validated"


@pytest.mark.parametrize("loss,over,message", [
    ("mse", {}, "y_train has shape (40,), but the model output is N x 10"),
    ("output", {}, "loss 'output' needs the model output 'logits' to be a scalar loss, but its shape is ['N', 10]"),
])
def test_cli_model_output_does_not_fit_loss(tmp_path, capsys, loss, over, message):
    data = _npz(tmp_path / "d.npz", **over)
    rc = _main(["train", MLP, "--data", data, "--loss", loss, "--epochs", 1, "-o", tmp_path / "o.onnx"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_resume_without_checkpoint(tmp_path, capsys):
    rc = _main(["train", MLP, "--data", "digits", "--resume", "--checkpoint", tmp_path / "none", "-o", tmp_path / "o.onnx"])
    assert rc == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_cli_bad_data_path(tmp_path, capsys):
    rc = _main(["train", MLP, "--data", tmp_path / "nope.npz", "-o", tmp_path / "o.onnx"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_POOL, reason="needs the Conv and MaxPool gradient rules")
def test_lenet_step_model_is_standard_and_learns_digits():
    from onnxbp.training.data import load_digits_dataset
    from onnxbp.training.loop import fit

    tr = Trainer(LENET, optimizer=AdamW(), seed=0, threads=1)
    assert_standard(tr.step_model.model)
    ds = load_digits_dataset(tr.input_dims)
    assert ds.x_train.shape[1:] == (1, 8, 8)
    hist = fit(tr, ds, epochs=3, batch_size=16, lr=5e-3, seed=0, lr_schedule="cosine")
    assert hist["test_accuracy"][-1] >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(not HAS_POOL, reason="needs the Conv and MaxPool gradient rules")
def test_cli_lenet_digits_reaches_097(tmp_path, capsys):
    metrics = tmp_path / "m.json"
    rc = _main(["train", LENET, "--data", "digits", "--epochs", 15, "-o", tmp_path / "lenet.onnx",
                "--metrics", metrics, "--seed", 0])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(metrics.read_text())["test_accuracy"] >= 0.97


def test_cli_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = _main(["train", MLP, "--data", "digits", "--epochs", 1, "-o", tmp_path / "o.onnx", "--plot", tmp_path / "p.png"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--plot needs matplotlib" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_scalar_output_model_does_not_fit_per_sample_losses(loss):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("ReduceSum", ["s"], ["out"], keepdims=0)]
    m = make_model(nodes, [("x", np.float32, ["N", 3])], [("out", np.float32, [])], {"w": np.ones(3, np.float32)})
    msg = {"cross_entropy": r"loss cross_entropy needs the model output 'out' to be \(N, C\[, d...\]\) scores",
           "mse": None}[loss]
    if msg:
        with pytest.raises(TrainingError, match=msg):
            build_step_model(m, loss=loss)
    else:  # a scalar output with an MSE target is legal (a scalar regression target)
        assert build_step_model(m, loss=loss).spec.target == "target"


def test_cli_default_output_name(tmp_path, capsys, monkeypatch):
    """Without -o the trained model is <model name>_trained.onnx in the current directory."""
    monkeypatch.chdir(tmp_path)
    rc = _main(["train", MLP, "--data", "digits", "--epochs", 1, "--no-progress", "--threads", 1])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "mlp_trained.onnx"
    assert out.exists() and "wrote mlp_trained.onnx" in capsys.readouterr().out
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opt", [SGD(momentum=0.9), AdamW(weight_decay=0.01)], ids=["sgd", "adamw"])
def test_optimizer_state_is_updated_in_place_with_the_same_values(opt, monkeypatch):
    """Momentum and Adam moments share one buffer with their next value (step.in_place_updates);
    parameters stay double-buffered (the backward reads them).  Six steps give the same bits as a
    Trainer with every carried tensor double-buffered."""
    import onnxbp.training.trainer as trainer_mod

    lenet = str(Path(__file__).resolve().parents[1] / "models" / "lenet.onnx")
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((16, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(3)]
    t = Trainer(lenet, optimizer=opt, threads=1)
    state = {s for kinds in t.spec.state.values() for s in kinds.values()}
    assert t.in_place == state and not t.in_place & set(t.spec.params)
    monkeypatch.setattr(trainer_mod, "in_place_updates", lambda model, spec: [])
    ref = Trainer(lenet, optimizer=opt, threads=1)
    assert ref.in_place == set()
    for k in range(6):
        x, y = batches[k % 3]
        assert t.train_step(x, y, lr=0.05) == ref.train_step(x, y, lr=0.05)
    a, b = t.state_dict()["tensors"], ref.state_dict()["tensors"]
    assert all(np.array_equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("stride,pads,bias", [(1, 1, True), (2, 1, False), (1, 0, True)])
def test_weight_bound_conv_forward_as_one_gemm_trains_like_the_conv(stride, pads, bias):
    """conv_forward="auto" writes a trainable Conv on small maps with many channels as one Gemm over the
    batch (training/conv_forward.py); five SGD steps match the Conv form to float32 summation order."""
    rng = np.random.default_rng(1)
    c, m_ch, k = 16, 64, 3
    inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node("Conv", inputs, ["h"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[pads] * 4),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("GlobalAveragePool", ["a"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = {"w": (rng.standard_normal((m_ch, c, k, k)) * 0.1).astype(np.float32),
             "fc": (rng.standard_normal((5, m_ch)) * 0.1).astype(np.float32)}
    if bias:
        inits["b"] = (rng.standard_normal(m_ch) * 0.1).astype(np.float32)
    model = make_model(nodes, [("x", np.float32, [2, c, 3, 3])], [("logits", np.float32, [2, 5])], inits)
    lowered = Trainer(model, optimizer=SGD(momentum=0.9), threads=1)
    plain = Trainer(model, optimizer=SGD(momentum=0.9), threads=1, conv_forward="conv")
    ops = [n.op_type for n in lowered.step_model.model.graph.node]
    assert "Conv" not in ops[:ops.index("Relu")] and "Conv" in [n.op_type for n in plain.step_model.model.graph.node]
    x = rng.standard_normal((2, c, 3, 3)).astype(np.float32)
    y = rng.integers(0, 5, 2)
    for _ in range(5):
        la, lb = lowered.train_step(x, y, lr=0.1), plain.train_step(x, y, lr=0.1)
        assert abs(la - lb) <= 1e-5 * max(1.0, abs(lb))
    pa, pb = lowered.parameters(), plain.parameters()
    for name in pa:
        assert_close(pa[name], pb[name], 1e-5, 1e-6, name)


def test_conv_forward_option_is_checked():
    with pytest.raises(TrainingError, match="conv_forward='gemm'; choose auto or conv"):
        build_step_model(str(Path(__file__).resolve().parents[1] / "models" / "lenet.onnx"), conv_forward="gemm")
