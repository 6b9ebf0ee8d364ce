"""Data-parallel training on MPI (onnxbp.training.distributed).

Single-process tests check the split step (gradient and update models) and the data-parallel
Trainer on ``MPI.COMM_SELF`` against the fused step; the ``mpirun -n 2`` tests (tests/mpi_worker.py)
check parity with one process on the same global batch for 20 steps (1e-5 relative, SGD with
momentum and AdamW, LeNet and a CNN with BatchNormalization), resuming with another number of
ranks, and the faults: a rank killed or raising mid-epoch, ranks holding different models.

The BatchNormalization CNN normalises with each rank's batch statistics (PyTorch DDP without
SyncBatchNorm), so its single-process reference is torch on the same global batch with
BatchNorm applied per shard (the two halves), the loss the mean over the global batch; its
running statistics are those of the whole global batch (unbiased variance, as torch's).

mpirun runs with ``--oversubscribe`` and, as root (containers), ``--allow-run-as-root``.
Everything here skips cleanly without mpi4py (the test extra installs it with Open MPI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxbp
from onnxbp.testing import assert_standard
from onnxbp.training import SGD, AdamW, Trainer, TrainingError
from onnxbp.training import distributed
from onnxbp.training.step import build_split_step, build_step_model

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet.onnx"
MLP = ROOT / "models" / "mlp.onnx"
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"
STEPS = 20
RTOL = 1e-5

try:
    from mpi4py import MPI
except ImportError:
    MPI = None
needs_mpi = pytest.mark.skipif(MPI is None, reason="needs mpi4py (pip install 'onnxbp[mpi]')")


def _mpirun_exe():
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


needs_mpirun = pytest.mark.skipif(MPI is None or _mpirun_exe() is None, reason="needs mpi4py and mpirun")


def mpirun(n, *args, timeout=180, mpmd=None):
    """``mpirun -n N ARGS`` (``mpmd``: more ``[n, args]`` app contexts); returns (rc, output, seconds)."""
    cmd = [_mpirun_exe(), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-n", str(n), *map(str, args)]
    for m, more in mpmd or ():
        cmd += [":", "-n", str(m), *map(str, more)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def _conv_bn(rng):
    from test_training_parity import convnet

    return convnet(rng, bn=True)


def _npz(path, n=40):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((n, 64)).astype(np.float32), y_train=rng.integers(0, 10, n),
             x_test=rng.random((10, 64)).astype(np.float32), y_test=rng.integers(0, 10, 10))
    return path


# ------------------------------------------------------------------ the split step, single process
@pytest.mark.parametrize("opt", [SGD(momentum=0.9), AdamW()], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("net", ["lenet", "conv_bn"])
def test_split_models_are_standard_and_carry_the_fused_names(net, opt):
    model = LENET if net == "lenet" else _conv_bn(np.random.default_rng(0))[0]
    split = build_split_step(model, optimizer=opt)
    fused = build_step_model(model, optimizer=opt)
    assert_standard(split.gradient)
    assert_standard(split.update)
    assert split.spec.updates == fused.spec.updates and split.spec.state == fused.spec.state
    g_in = {i.name for i in split.gradient.graph.input}
    g_out = [o.name for o in split.gradient.graph.output]
    assert g_in == set(split.spec.data_inputs) | {split.spec.target} | set(split.spec.params)
    assert g_out[0] == split.spec.loss and g_out[1:1 + len(split.grads)] == [split.grads[p] for p in split.spec.params]
    u_in = {i.name for i in split.update.graph.input}
    assert set(split.grads.values()) <= u_in and set(split.spec.updates) <= u_in
    assert not u_in & set(split.spec.data_inputs), "the update model must not read the batch"
    assert {o.name for o in split.update.graph.output} == set(split.spec.updates.values())
    assert not [n for n in split.update.graph.node if n.op_type in ("Conv", "BatchNormalization")]
    assert len(split.moments) == (1 if net == "conv_bn" else 0)
    meta = json.loads(onnxbp.metadata.get(split.update, "onnxbp.training"))
    assert meta["role"] == "update" and meta["grads"] == split.grads


@needs_mpi
@pytest.mark.parametrize("opt", [lambda: SGD(momentum=0.9), lambda: AdamW()], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("net", ["lenet", "conv_bn"])
def test_comm_self_trainer_equals_the_fused_step(net, opt):
    """One rank: the split step (gradient model, Allreduce, update model) gives the fused step's values."""
    rng = np.random.default_rng(1)
    model, shape = (LENET, (16, 1, 8, 8)) if net == "lenet" else (_conv_bn(rng)[0], (16, 2, 6, 6))
    a = Trainer(model, optimizer=opt(), threads=1)
    b = Trainer(model, optimizer=opt(), threads=1, comm=MPI.COMM_SELF)
    assert b.in_place == a.in_place and b.in_place
    for _ in range(8):
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, 3, 16)
        la, lb = a.train_step(x, y, lr=0.02), b.train_step(x, y, lr=0.02)
        assert lb == pytest.approx(la, rel=1e-6)
    sa, sb = a.state_dict()["tensors"], b.state_dict()["tensors"]
    assert set(sa) == set(sb)
    for name in sa:
        np.testing.assert_allclose(sb[name], sa[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert b._dist.comm_seconds > 0 and b._dist.allreduce_bytes > 0


def test_shards_are_disjoint_contiguous_and_even():
    for n in (0, 1, 5, 15, 16):
        idx = np.arange(100, 100 + n)
        parts = [distributed.shard(idx, r, 4) for r in range(4)]
        np.testing.assert_array_equal(np.concatenate(parts), idx)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1, sizes


def test_buckets_pack_parameters_into_a_few_flat_buffers():
    shapes = {"a": (100, 100), "b": (10,), "c": (300, 100), "d": (5, 5)}
    dtypes = {k: np.dtype(np.float32) for k in shapes}
    dtypes["d"] = np.dtype(np.float64)
    bk = distributed.Buckets(shapes, dtypes, cap_bytes=50_000)
    assert bk.members == [["a", "b"], ["c"], ["d"]]  # cap, then a parameter larger than the cap, then a dtype
    assert [b.dtype for b in bk.buffers] == [np.float32, np.float32, np.float64]
    bk.buffers[0][:] = np.arange(10010)
    np.testing.assert_array_equal(bk.views["b"], np.arange(10000, 10010))
    np.testing.assert_array_equal(bk.ortvalues["b"].numpy(), np.arange(10000, 10010))  # the same memory
    assert bk.nbytes == (10010 + 30000) * 4 + 25 * 8


def test_without_mpi4py_a_one_line_error_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(TrainingError, match=r"distributed training needs mpi4py .*pip install 'onnxbp\[mpi\]'"):
        Trainer(MLP, comm=object())
    from cli.main import main

    rc = main(["train", str(MLP), "--data", "digits", "--distributed", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'onnxbp[mpi]'" in err


class _Ranks:
    """A stand-in communicator for the collective checks: allgather returns the given values."""

    def __init__(self, values):
        self.values = values

    def allgather(self, _value):
        return self.values


def test_hash_check_names_the_differing_rank():
    distributed.check_same(_Ranks(["ab", "ab"]), "a model", "ab")
    with pytest.raises(TrainingError, match=r"rank 2 of 3 holds a model different from rank 0's"):
        distributed.check_same(_Ranks(["ab", "ab", "cd"]), "a model", "ab")
    m1 = onnx.load(str(LENET))
    m2 = onnx.load(str(LENET))
    assert distributed.model_options_digest(m1, {"lr": 1}) == distributed.model_options_digest(m2, {"lr": 1})
    assert distributed.model_options_digest(m1, {"lr": 1}) != distributed.model_options_digest(m1, {"lr": 2})
    assert distributed.model_options_digest(m1, {}) != distributed.model_options_digest(onnx.load(str(MLP)), {})
    w = next(t for t in m2.graph.initializer if t.dims)  # one weight value changed
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1e-3
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    assert distributed.model_options_digest(m1, {"lr": 1}) != distributed.model_options_digest(m2, {"lr": 1})


@pytest.mark.slow
def test_model_digest_of_a_model_over_2gb():
    """The startup check hashes the model piece by piece: protobuf cannot serialize one over 2 GB."""
    shape = [270, 1024, 1024]  # two weights of 1.13 GB: a 2.26 GB model
    m = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w0"], ["h"]), onnx.helper.make_node("Add", ["h", "w1"], ["y"])], "big",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)]))
    for k in range(2):  # filled in place: make_model would copy (serialize) a graph over 2 GB
        t = m.graph.initializer.add()
        t.name, t.data_type = f"w{k}", onnx.TensorProto.FLOAT
        t.dims.extend(shape)
        t.raw_data = np.full(shape, k, np.float32).tobytes()
    assert sum(len(t.raw_data) for t in m.graph.initializer) > 2**31  # ByteSize() itself fails over 2 GB
    d = distributed.model_options_digest(m, {})
    assert len(d) == 64 and d != distributed.model_options_digest(m, {"lr": 1})


# ------------------------------------------------------------------ mpirun -n 2
def _lenet_batches(path, rng):
    # 18 batches of 16 (8 per rank), one of 15 (8 + 7) and one of 1 (rank 1 gets none)
    sizes = [16] * (STEPS - 2) + [15, 1]
    arrays = {}
    for k, n in enumerate(sizes):
        arrays[f"x{k}"] = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        arrays[f"y{k}"] = rng.integers(0, 10, n)
    np.savez(path, **arrays)
    return [(arrays[f"x{k}"], arrays[f"y{k}"]) for k in range(STEPS)]


def _torch_ghost_bn(model_parts, opt_name, lr, rng, path):
    """The BN CNN in torch: each step's global batch of 16 normalised as two shards of 8, the loss
    their mean; kink-free batches drawn against the reference (tests/test_training_parity.py).
    Returns (losses, [params per step], [running stats per step]) and writes the batches."""
    import torch
    from test_training_parity import _kink_free_batch

    _, net, order, _, in_shape, n_cls = model_parts
    opt = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
           "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.05)}[opt_name](list(net.parameters()))
    bn = net[1]
    rm, rv = bn.running_mean.detach().numpy().astype(np.float64), bn.running_var.detach().numpy().astype(np.float64)
    seen = []
    bn.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach().numpy()))
    teacher = rng.standard_normal((int(np.prod(in_shape)), n_cls))
    losses, params, stats, arrays = [], [], [], {}
    net.train()
    for k in range(STEPS):
        x = _kink_free_batch(rng, net, (16,) + in_shape)
        y = np.argmax(x.reshape(16, -1) @ teacher, axis=1)
        arrays[f"x{k}"], arrays[f"y{k}"] = x, y
        seen.clear()
        opt.zero_grad()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        loss = 0.5 * (torch.nn.functional.cross_entropy(net(xt[:8]), yt[:8]) +
                      torch.nn.functional.cross_entropy(net(xt[8:]), yt[8:]))
        loss.backward()
        opt.step()
        h = np.concatenate(seen[-2:]).astype(np.float64)
        per_c = h.transpose(1, 0, 2, 3).reshape(h.shape[1], -1)
        rm = 0.9 * rm + 0.1 * per_c.mean(1)
        rv = 0.9 * rv + 0.1 * per_c.var(1, ddof=1)
        losses.append(loss.item())
        params.append({n: p.detach().numpy().copy() for n, p in zip(order, net.parameters())})
        stats.append({"rm": rm.copy(), "rv": rv.copy()})
    np.savez(path, **arrays)
    return np.array(losses), params, stats


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """One mpirun -n 2 for the four parity cases; the single-process references beside it."""
    pytest.importorskip("torch")
    if MPI is None or _mpirun_exe() is None:
        pytest.skip("needs mpi4py and mpirun")
    d = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(7)
    cases, refs = [], {}
    for opt_name, lr in (("sgd_momentum", 0.05), ("adamw", 3e-3)):
        name = f"lenet/{opt_name}"
        batches = _lenet_batches(d / f"lenet_{opt_name}.npz", rng)
        single = Trainer(LENET, optimizer={"sgd_momentum": lambda: SGD(momentum=0.9),
                                           "adamw": lambda: AdamW(weight_decay=0.05)}[opt_name](), threads=1)
        losses, params = [], []
        for x, y in batches:
            losses.append(single.train_step(x, y, lr=lr))
            params.append(single.parameters())
        refs[name] = (np.array(losses), params)
        cases.append({"name": name, "model": str(LENET), "optimizer": opt_name, "lr": lr,
                      "batches": str(d / f"lenet_{opt_name}.npz"), "steps": STEPS})
        name = f"conv_bn/{opt_name}"
        parts = _conv_bn(np.random.default_rng(11))
        model_path = d / "conv_bn.onnx"
        onnx.save(parts[0], str(model_path))
        losses, params, stats = _torch_ghost_bn(parts, opt_name, lr, rng, d / f"conv_bn_{opt_name}.npz")
        refs[name] = (losses, [p | s for p, s in zip(params, stats)])
        cases.append({"name": name, "model": str(model_path), "optimizer": opt_name, "lr": lr,
                      "batches": str(d / f"conv_bn_{opt_name}.npz"), "steps": STEPS})
    (d / "cases.json").write_text(json.dumps(cases))
    rc, out, _ = mpirun(2, sys.executable, WORKER, "parity", d / "cases.json", d / "out.npz")
    assert rc == 0, out[-3000:]
    with np.load(d / "out.npz") as z:
        got = {k: z[k] for k in z.files}
    return refs, got


@needs_mpirun
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("net", ["lenet", "conv_bn"])
def test_two_ranks_match_one_process_on_the_global_batch(parity_runs, net, opt_name):
    refs, got = parity_runs
    name = f"{net}/{opt_name}"
    ref_loss, ref_params = refs[name]
    loss = got[f"{name}/loss"]
    rel = np.abs(loss - ref_loss) / np.abs(ref_loss)
    assert rel.max() <= RTOL, f"{name}: worst per-step loss rel error {rel.max():.2e} at step {rel.argmax()}"
    assert ref_loss[-5:].mean() < ref_loss[:5].mean(), "the reference did not train; the comparison would be vacuous"
    worst = {}
    for k, want in enumerate(ref_params):
        for p, v in want.items():
            have = got[f"{name}/{p}"][k]
            err = np.linalg.norm(have - v) / max(np.linalg.norm(v), 1e-12)
            worst[p] = max(worst.get(p, 0.0), err)
            assert err <= RTOL, f"{name}: {p} differs by {err:.2e} (normwise) after step {k + 1}"
    assert set(worst) == {k.split("/", 2)[2] for k in got if k.startswith(name + "/")} - {"loss", "buckets"}
    assert int(got[f"{name}/buckets"]) == 1


@needs_mpirun
def test_resume_with_another_number_of_ranks(tmp_path):
    """1 process, then 2 ranks, then 1 process again: the same weights and losses as one uninterrupted run."""
    data = _npz(tmp_path / "d.npz")
    common = ["train", MLP, "--data", data, "--optimizer", "sgd", "--lr", 0.05, "--batch-size", 8, "--threads", 1,
              "--seed", 3, "--lr-schedule", "constant", "--no-progress"]
    from cli.main import main

    ck = tmp_path / "ck"
    assert main([str(a) for a in common + ["--epochs", 3, "-o", tmp_path / "full.onnx", "--metrics",
                                           tmp_path / "full.json"]]) == 0
    assert main([str(a) for a in common + ["--epochs", 1, "-o", tmp_path / "a.onnx", "--checkpoint", ck]]) == 0
    rc, out, _ = mpirun(2, sys.executable, "-m", "onnxbp", *common, "--epochs", 2, "-o", tmp_path / "b.onnx",
                        "--checkpoint", ck, "--resume", "--distributed")
    assert rc == 0, out[-3000:]
    assert out.count("epoch 2/2") == 1, "rank 0 alone prints"
    assert main([str(a) for a in common + ["--epochs", 3, "-o", tmp_path / "c.onnx", "--checkpoint", ck,
                                           "--resume", "--metrics", tmp_path / "c.json"]]) == 0
    full, part = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "c.json").read_text())
    np.testing.assert_allclose(part["train_loss"], full["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(part["test_loss"], full["test_loss"], rtol=1e-5)
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "full.onnx")).graph.initializer}
    wc = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "c.onnx")).graph.initializer}
    for k in wa:
        np.testing.assert_allclose(wc[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)


@needs_mpirun
@pytest.mark.parametrize("kind", ["kill", "raise"])
def test_a_failing_rank_ends_every_rank_and_the_checkpoint_stays_loadable(tmp_path, kind):
    data, ck = _npz(tmp_path / "d.npz"), tmp_path / "ck"
    rc, out, seconds = mpirun(2, sys.executable, WORKER, "fault", kind, MLP, data, ck, timeout=120)
    assert rc != 0
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    if kind == "raise":
        assert "onnxbp: error: injected failure on rank 1 at step 8 (rank 1 of 2; aborting all ranks)" in out
    else:
        assert "signal 9" in out or "Killed" in out, out[-2000:]
    from onnxbp.training.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(ck)
    assert meta["epoch"] == 1 and meta["step"] == 5 and meta["ranks"] == 2 and "fc1.weight" in tensors
    assert [p.name for p in ck.iterdir()] == ["checkpoint.npz"]


@needs_mpirun
@pytest.mark.parametrize("differs,message", [
    ("model", "rank 1 of 2 holds a model or Trainer options different from rank 0's"),
    ("lr", "rank 1 of 2 holds training options or data different from rank 0's")])
def test_ranks_holding_different_models_or_options_refuse_to_start(tmp_path, differs, message):
    args = ["--data", "digits", "--epochs", 1, "--distributed", "--no-progress", "-o", tmp_path / "o.onnx"]
    other = [MLP if differs == "model" else LENET, *args] + (["--lr", 0.1] if differs == "lr" else [])
    rc, out, seconds = mpirun(1, sys.executable, "-m", "onnxbp", "train", LENET, *args,
                              mpmd=[(1, [sys.executable, "-m", "onnxbp", "train", *other])])
    assert rc != 0 and seconds < 60
    assert out.count(f"onnxbp: error: {message}") == 1, out[-2000:]
    assert "MPI_ABORT" not in out, "a startup check every rank fails ends the job without aborting it"
    assert not (tmp_path / "o.onnx").exists()
