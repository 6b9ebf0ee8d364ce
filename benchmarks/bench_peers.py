"""One training step three ways: onnxbp (plain onnxruntime), PyTorch eager and onnxruntime-training.

    bash benchmarks/peers/setup.sh                 # once: the onnxruntime-training venv (or pass --setup-peer)
    python benchmarks/bench_peers.py               # speed: every net and optimizer, 21 interleaved reps
    python benchmarks/bench_peers.py --memory      # peak RSS per side, fresh processes
    python benchmarks/bench_peers.py --build-time  # onnxbp.gradient build time, ResNet-18 .. ResNet-152
    python benchmarks/bench_peers.py --grad-ratio --nets resnet18 mobilenetv2   # gradient / forward time

Sides, on the same initial weights and the same batches (cross-entropy, mean over the batch):

* ``onnxbp``: :class:`onnxbp.training.Trainer` (forward + loss + backward + optimizer as one graph of
  standard ops, run by the main venv's onnxruntime; parameters in OrtValues via IOBinding);
* ``torch``: PyTorch eager in this process (``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported,
  the match for onnxruntime's ``allow_spinning=0``; ``torch.set_num_threads(threads)``), torch.optim's
  default (single-tensor, for-loop) SGD / AdamW;
* ``ort-training``: onnxruntime-training 1.19.2 (``generate_artifacts`` + ``onnxruntime.training.api``
  CheckpointState / Module / Optimizer) in its own venv (``benchmarks/peers/setup.sh``), as a worker
  process (``benchmarks/peers/ort_training_worker.py``) that gets the forward model (IR <= 9, opset 17,
  BatchNormalization switched to training mode) and the batches as files and answers "step" commands
  over a pipe, so that the three sides interleave from this one driver.

All sides use ``threads`` intra-op threads (default 2), one inter-op thread and no spinning.  Each
repetition runs one step per side back to back, the order cycling through all permutations; the step
time is taken around the step call in-process (for ort-training inside the worker, so the pipe is not
counted).  Before the warm-up every side runs the same first two steps, and the losses of both (before
any update, and after the first update) are compared across the sides (``--loss-rtol``, default 1e-4).

Optimizers (torch's semantics): ``sgd`` = SGD, momentum 0.9, lr 0.01; ``adamw`` = AdamW, lr 1e-3,
betas (0.9, 0.999), eps 1e-8, weight decay 0.01.  onnxruntime-training 1.19 has no SGD with momentum
(``SGDOptimizerV2`` is ``p -= lr * g``; no momentum or weight-decay input), so its ``sgd`` row is plain
SGD (same first update; each of its later steps does a little less work); its AdamW is the
``AdamWOptimizer`` kernel in ``adam_mode=0`` (PyTorch's rule), which ``OptimType.AdamW`` would not give
(mode 1, Hugging Face's rule, eps 1e-6).

Networks (``--nets``; defaults in brackets):

====================  ======================================================================  =========
lenet                 models/lenet.onnx (1x8x8), batch 32                                     [sgd]
cifar-resnet18        bench_train_step.py's CIFAR ResNet-18 (3x32x32, ``--width`` 64), batch 32 [sgd]
resnet18              torchvision-style ResNet-18, 3x64x64, batch 8, 1000 classes             [sgd adamw]
mobilenetv2           torchvision-style MobileNetV2 (no Dropout), 3x64x64, batch 8, 1000 cls  [sgd adamw]
vit-tiny              ViT-Ti (192 wide, 12 deep, 3 heads), 3x32x32, 4x4 patches, batch 8      [adamw]
bert-tiny             BERT-tiny (2 layers, 128 wide, vocab 30522), 128 tokens, batch 8, 2 cls [adamw]
resnet50/101/152      torchvision-style, 3x64x64, batch 8 (not run by default)                [sgd]
====================  ======================================================================  =========

The torch networks are built in torch (``benchmarks/peer_nets.py``; torchvision is not needed) with
seeded random weights and exported by torch's TorchScript exporter (opset 17, ``dynamo=False``,
``TrainingMode.PRESERVE``, no constant folding: every parameter keeps its name and value).

``--memory``: for each net, optimizer and side a fresh process (``--mem-repeats`` of them, interleaved)
builds the side, runs ``--mem-steps`` steps and reports its RSS after imports, after the build, the peak
during the steps (VmHWM, reset after the build through /proc/self/clear_refs) and the process peak;
"step working set" is the step peak minus the RSS after the build.  The ort-training process imports
torch (onnxruntime.training's Python API does), so compare peaks above imports.  torch creates its
gradients and optimizer state (momentum buffers, AdamW moments) in the first step, so they count in its
step working set; onnxbp and onnxruntime-training allocate them in the build.  The ort-training artifacts
are generated beforehand in a separate process (as one deploys them), so their generation is not counted.

``--build-time``: ``onnxbp.gradient`` on torchvision-style ResNet-18/50/101/152 (median of
``--build-reps``), and the least-squares slope of log(build time) against log(forward node count).
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported anywhere in this process

import argparse
import copy
import io
import itertools
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
DEFAULT_PEER_VENV = PEERS / ".venv-ort-training"
WORKER = PEERS / "ort_training_worker.py"
SETUP = PEERS / "setup.sh"
for _p in (str(BENCH), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SIDES = ("onnxbp", "torch", "ort-training")
PEER_VERSION: list = []  # onnxruntime-training's version, as its worker reports it
LR = {"sgd": 0.01, "adamw": 1e-3}
PEER_OPSET = 17


# ------------------------------------------------------------------------------- networks
@dataclass
class NetDef:
    name: str
    batch: int
    shape: tuple              # one sample's input shape
    classes: int
    optimizers: tuple         # default optimizers
    torch_fn: Callable        # meta dict -> torch module (seeded)
    onnx_fn: Callable | None = None  # (meta, module) -> onnx model, syncing the module's weights to it
    vocab: int | None = None         # int64 token inputs in [0, vocab) instead of float32 N(0, 1)
    note: str = ""


def _lenet_torch(meta):
    import bench_train_step as bts
    return bts.torch_lenet()


def _lenet_onnx(meta, module):
    import bench_train_step as bts
    model = onnx.load(str(ROOT / "models" / "lenet.onnx"))
    bts.load_weights(module, model, lambda k: f"{bts._LENET_NAMES[k.split('.')[0]]}.{k.split('.')[1]}")
    return model


def _cifar_torch(meta):
    import bench_train_step as bts
    return bts.torch_resnet18(meta["width"], 10)


def _cifar_onnx(meta, module):
    import bench_train_step as bts
    model = bts.build_resnet18(meta["width"])
    bts.load_weights(module, model)
    return model


def _tv_resnet(depth):
    def fn(meta):
        import peer_nets
        return peer_nets.resnet(depth, 1000, seed=meta["seed"])
    return fn


def _mobilenet(meta):
    import peer_nets
    return peer_nets.mobilenet_v2(1000, seed=meta["seed"])


def _vit(meta):
    import peer_nets
    return peer_nets.vit_tiny(10, seed=meta["seed"])


def _bert(meta):
    import peer_nets
    return peer_nets.bert_tiny(2, seed=meta["seed"])


NETS = {n.name: n for n in [
    NetDef("lenet", 32, (1, 8, 8), 10, ("sgd",), _lenet_torch, _lenet_onnx, note="models/lenet.onnx"),
    NetDef("cifar-resnet18", 32, (3, 32, 32), 10, ("sgd",), _cifar_torch, _cifar_onnx,
           note="bench_train_step.py's CIFAR ResNet-18"),
    NetDef("resnet18", 8, (3, 64, 64), 1000, ("sgd", "adamw"), _tv_resnet(18)),
    NetDef("mobilenetv2", 8, (3, 64, 64), 1000, ("sgd", "adamw"), _mobilenet),
    NetDef("vit-tiny", 8, (3, 32, 32), 10, ("adamw",), _vit),
    NetDef("bert-tiny", 8, (128,), 2, ("adamw",), _bert, vocab=30522),
    NetDef("resnet50", 8, (3, 64, 64), 1000, ("sgd",), _tv_resnet(50)),
    NetDef("resnet101", 8, (3, 64, 64), 1000, ("sgd",), _tv_resnet(101)),
    NetDef("resnet152", 8, (3, 64, 64), 1000, ("sgd",), _tv_resnet(152)),
]}
DEFAULT_NETS = ["lenet", "cifar-resnet18", "resnet18", "mobilenetv2", "vit-tiny", "bert-tiny"]


def export_torchscript(module, example, opset: int = PEER_OPSET) -> onnx.ModelProto:
    """TorchScript export (dynamo=False) of the module in eval mode, every parameter an initializer
    under its state_dict name (no constant folding, TrainingMode.PRESERVE: no BatchNorm folding);
    symbolic batch ``N``.  The module is put back in train mode.

    The exporter deduplicates initializers of equal value (torchvision's BatchNorm weights are all
    ones, the biases zeros): one initializer and Identity nodes for the others, which would tie those
    parameters in training.  So the module is exported with distinct random values in every float
    tensor, and the real values are written into the initializers (named as in the state_dict)."""
    import torch
    from onnx import numpy_helper

    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    module.eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                              do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    finally:
        module.load_state_dict(state)
        module.train()
    model = onnx.load_from_string(buf.getvalue())
    for t in model.graph.initializer:
        if t.name in state and state[t.name].is_floating_point():
            t.CopyFrom(numpy_helper.from_array(state[t.name].numpy(), t.name))
    return model


def peer_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward model as onnxruntime-training 1.19 (onnx 1.17) takes it: default-domain opset 17
    (converted if higher), the lowest IR version for its opsets (<= 9), BatchNormalization in training
    mode (batch statistics, as the other two sides train; its updated running statistics are computed,
    as outputs nothing reads: onnxruntime-training's API keeps no state besides parameters), and
    LayerNormalization with its optional Mean and InvStdDev outputs (which its gradient builder needs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), PEER_OPSET)
    if opset > PEER_OPSET:
        from onnx import version_converter
        m = version_converter.convert_version(m, PEER_OPSET)
    for node in m.graph.node:
        if node.op_type == "BatchNormalization":
            attrs = [a for a in node.attribute if a.name != "training_mode"]
            del node.attribute[:]
            node.attribute.extend(attrs + [onnx.helper.make_attribute("training_mode", 1)])
            while len(node.output) < 3:  # onnx 1.17 wants the running mean and variance outputs too
                node.output.append(f"{node.output[0]}.running_{'mean' if len(node.output) == 1 else 'var'}_out")
        elif node.op_type == "LayerNormalization":
            # onnxruntime-training's LayerNormalization gradient reads the optional Mean and InvStdDev
            # outputs (it fails to build the gradient graph without them)
            while len(node.output) < 3:
                node.output.append(f"{node.output[0]}.{'mean' if len(node.output) == 1 else 'inv_std_dev'}")
    m.ir_version = min(9, max(3, onnx.helper.find_min_ir_version_for(list(m.opset_import))))
    return m


@dataclass
class Case:
    net: NetDef
    meta: dict
    dir: Path
    model: onnx.ModelProto
    module: object            # torch module with the initial weights (train mode)
    requires_grad: list
    xs: list
    ys: list
    nodes: int = 0
    timings: dict = field(default_factory=dict)


def prepare(net: NetDef, args, workdir: Path) -> Case:
    """Build the torch module and the ONNX forward model with the same weights, the batches, and the
    files the other processes read (forward.onnx, peer.onnx, batches.npz, meta.json, torch_state.pt)."""
    import torch

    from models.zoo.export import param_map

    meta = {"net": net.name, "seed": args.seed, "width": args.width, "batch": net.batch, "shape": list(net.shape),
            "classes": net.classes, "vocab": net.vocab}
    t0 = time.perf_counter()
    module = net.torch_fn(meta)
    rng = np.random.default_rng(args.seed)
    if net.vocab:
        xs = [rng.integers(0, net.vocab, (net.batch,) + net.shape).astype(np.int64) for _ in range(args.batches)]
    else:
        xs = [rng.standard_normal((net.batch,) + net.shape).astype(np.float32) for _ in range(args.batches)]
    ys = [rng.integers(0, net.classes, net.batch).astype(np.int64) for _ in range(args.batches)]
    if net.onnx_fn is not None:
        model = net.onnx_fn(meta, module)
    else:
        model = export_torchscript(module, torch.from_numpy(xs[0][:2]))
    module.train()
    pmap = param_map(model, module)
    tparams = {k for k, _ in module.named_parameters()}
    missing = sorted(tparams - {v[0] for v in pmap.values()})
    if missing:
        raise RuntimeError(f"{net.name}: torch parameters without an ONNX initializer of the same value: {missing[:5]}")
    requires_grad = [t.name for t in model.graph.initializer if t.name in pmap]
    d = workdir / net.name
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "forward.onnx"))
    onnx.save(peer_model(model), str(d / "peer.onnx"))
    np.savez(d / "batches.npz", n=len(xs), **{f"x{k}": x for k, x in enumerate(xs)},
             **{f"y{k}": y for k, y in enumerate(ys)})
    meta["requires_grad"] = requires_grad
    (d / "meta.json").write_text(json.dumps(meta, indent=1))
    torch.save(module.state_dict(), d / "torch_state.pt")
    case = Case(net, meta, d, model, module, requires_grad, xs, ys, nodes=len(model.graph.node))
    case.timings["prepare_s"] = time.perf_counter() - t0
    return case


# ----------------------------------------------------------------------------------- sides
class OnnxbpSide:
    name = "onnxbp"

    def __init__(self, model, requires_grad, xs, ys, opt, lr, threads):
        from onnxbp.training import SGD, AdamW, Trainer

        optimizer = SGD(momentum=0.9) if opt == "sgd" else AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        t0 = time.perf_counter()
        self.trainer = Trainer(model, optimizer=optimizer, requires_grad=requires_grad, threads=threads)
        self.build_s = time.perf_counter() - t0
        self.xs, self.ys, self.lr = xs, ys, lr

    def step(self, i):
        k = i % len(self.xs)
        t = time.perf_counter()
        loss = self.trainer.train_step(self.xs[k], self.ys[k], lr=self.lr)
        return loss, time.perf_counter() - t

    def close(self):
        self.trainer = None


class TorchSide:
    name = "torch"

    def __init__(self, module, xs, ys, opt, lr, threads):
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.module = module
        self.module.train()
        params = list(self.module.parameters())
        if opt == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        else:
            self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        self.xs = [torch.from_numpy(x) for x in xs]
        self.ys = [torch.from_numpy(y) for y in ys]
        self.lossf = torch.nn.CrossEntropyLoss()
        self.build_s = time.perf_counter() - t0

    def step(self, i):
        k = i % len(self.xs)
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.lossf(self.module(self.xs[k]), self.ys[k])
        loss.backward()
        self.opt.step()
        loss = loss.item()
        return loss, time.perf_counter() - t

    def close(self):
        self.module = self.opt = None


def peer_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    return env


class OrtTrainingSide:
    name = "ort-training"

    def __init__(self, python, case_dir: Path, opt, lr, threads, reuse=False, artifacts_only=False):
        self.workdir = case_dir / f"ort-training-{opt}"
        self.log_path = case_dir / f"ort-training-{opt}.log"
        cmd = [str(python), str(WORKER), "--model", str(case_dir / "peer.onnx"), "--batches",
               str(case_dir / "batches.npz"), "--meta", str(case_dir / "meta.json"), "--optimizer", opt,
               "--lr", repr(lr), "--threads", str(threads), "--workdir", str(self.workdir)]
        if reuse:
            cmd.append("--reuse-artifacts")
        if artifacts_only:
            cmd.append("--artifacts-only")
        self.log = open(self.log_path, "w")  # noqa: SIM115  (the worker's stderr while it lives)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=peer_env(threads), cwd=str(case_dir))
        msg = self._read()
        self.build_s = time.perf_counter() - t0
        self.info = msg
        if msg.get("onnxruntime") and not PEER_VERSION:
            PEER_VERSION.append(msg["onnxruntime"])
        if artifacts_only:
            self.close()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the onnxruntime-training worker exited ({self.proc.returncode}); "
                               f"last lines of {self.log_path}:\n{self._tail()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"onnxruntime-training worker: {msg['error']} (log: {self.log_path})")
        return msg

    def _tail(self, n=15) -> str:
        self.log.flush()
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self, i):
        msg = self.ask({"cmd": "step", "i": i})
        return msg["loss"], msg["t"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -------------------------------------------------------------------------------- helpers
def summary(ts) -> dict:
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def _fmt(d: dict, key: str, digits: int) -> str:
    return f"{d[key]:.{digits}f}" if key in d else "–"


def rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def fmt_ms(s) -> str:
    if s is None:
        return "–"
    v = s["median_ms"]
    d = 2 if v < 10 else (1 if v < 100 else 0)
    return f"{v:.{d}f} ({s['min_ms']:.{d}f}-{s['max_ms']:.{d}f})"


def peer_python(args) -> Path | None:
    """The peer venv's python, after running setup.sh if asked; None when it is missing."""
    venv = Path(args.peer_venv)
    py = venv / "bin" / "python"
    if args.setup_peer:
        subprocess.run(["bash", str(SETUP), str(venv)], check=True)
    return py if py.exists() else None


def missing_peer_message(args) -> str:
    return (f"onnxruntime-training venv not found at {args.peer_venv}.  Create it with\n"
            f"    bash {SETUP.relative_to(ROOT)}{'' if Path(args.peer_venv) == DEFAULT_PEER_VENV else ' ' + str(args.peer_venv)}\n"
            f"(or pass --setup-peer), or skip that side with --no-ort-training.")


def cases_wanted(args):
    for name in args.nets:
        net = NETS[name]
        for opt in (args.optimizers or net.optimizers):
            yield net, opt


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def header(args, extra=""):
    import onnxruntime
    import torch

    peer = f", onnxruntime-training {PEER_VERSION[0]} (peer venv)" if PEER_VERSION else ""
    return (f"{extra}{args.threads} threads, no spinning, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}{peer}; "
            f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}")


# ---------------------------------------------------------------------------------- speed
def run_speed(args, workdir: Path, py: Path | None) -> list:
    rows = []
    prepared = {}
    for net, opt in cases_wanted(args):
        if net.name not in prepared:
            prepared[net.name] = prepare(net, args, workdir)
        case = prepared[net.name]
        lr = LR[opt]
        la0 = loadavg()
        t_case = time.perf_counter()
        sides = [OnnxbpSide(case.model, case.requires_grad, case.xs, case.ys, opt, lr, args.threads),
                 TorchSide(copy.deepcopy(case.module), case.xs, case.ys, opt, lr, args.threads)]
        if py is not None:
            sides.append(OrtTrainingSide(py, case.dir, opt, lr, args.threads))
        try:
            losses = {s.name: [] for s in sides}
            for i in range(2):  # before any update, and after the first update
                for s in sides:
                    losses[s.name].append(s.step(i)[0])
            for i in range(2, 2 + args.warmup):
                for s in sides:
                    s.step(i)
            times = {s.name: [] for s in sides}
            perms = list(itertools.permutations(range(len(sides))))
            for r in range(args.reps):
                i = 2 + args.warmup + r
                for k in perms[r % len(perms)]:
                    times[sides[k].name].append(sides[k].step(i)[1])
        finally:
            for s in sides:
                s.close()
        stats = {n: summary(ts) for n, ts in times.items()}
        check = check_losses(losses, case, opt, lr, args)
        row = {"net": net.name, "optimizer": opt, "batch": net.batch, "input": list(net.shape), "lr": lr,
               "reps": args.reps, "warmup": args.warmup, "stats": stats, "times_s": times, "losses": losses,
               "loss_check": check, "loss_ok": check["ok"], "nodes": case.nodes,
               "build_s": {s.name: s.build_s for s in sides}, "loadavg_before": la0, "loadavg_after": loadavg(),
               "case_s": time.perf_counter() - t_case}
        if "torch" in stats:
            row["onnxbp/torch"] = stats["onnxbp"]["median_ms"] / stats["torch"]["median_ms"]
        if "ort-training" in stats:
            row["onnxbp/ort-training"] = stats["onnxbp"]["median_ms"] / stats["ort-training"]["median_ms"]
        rows.append(row)
        l1 = " ".join(f"{n} {ls[1]:.6f}" for n, ls in losses.items())
        print(f"[{net.name} {opt}] {row['case_s']:.1f} s; builds " +
              ", ".join(f"{n} {b:.2f} s" for n, b in row["build_s"].items()) +
              f"; loss after the first update: {l1} ({check['text']})", file=sys.stderr, flush=True)
    return rows


def torch_f64_losses(case: Case, opt: str, lr: float) -> list:
    """The first two losses of the same two steps in float64 torch (the arbiter when sides differ)."""
    import torch

    module = copy.deepcopy(case.module).double().train()
    side = TorchSide(module, [x if x.dtype == np.int64 else x.astype(np.float64) for x in case.xs], case.ys, opt,
                     lr, torch.get_num_threads())
    return [side.step(0)[0], side.step(1)[0]]


def check_losses(losses: dict, case: Case, opt: str, lr: float, args) -> dict:
    """Compare the loss before any update and after the first update across the sides.

    When they differ by more than --loss-rtol, the same two steps run in float64 torch: a float32 step can
    flip a ReLU/Clip mask element that lies within rounding of its threshold (the BatchNormalization output
    before it is then ~1e-7 from 0), which changes that channel's gradient; the float64 step shows which
    sides follow the exact step."""
    names = list(losses)
    pair = {f"{a}~{b}": [rel(x, y) for x, y in zip(losses[a], losses[b])]
            for i, a in enumerate(names) for b in names[i + 1:]}
    worst = max((max(v) for v in pair.values()), default=0.0)
    out = {"pairwise_rel": pair, "max_rel": worst, "ok": worst <= args.loss_rtol}
    if out["ok"]:
        out["text"] = f"max rel diff {worst:.1e}: ok"
        return out
    ref = torch_f64_losses(case, opt, lr)
    vs = {n: rel(ls[1], ref[1]) for n, ls in losses.items()}
    out.update(f64=ref, vs_f64=vs)
    out["text"] = (f"max rel diff {worst:.1e}: MISMATCH; against the float64 torch step: "
                   + ", ".join(f"{n} {d:.1e}" for n, d in vs.items()))
    return out


def print_speed(rows, args, la_before, la_after, wall):
    print(f"\none training step, {args.reps} interleaved reps after {args.warmup} warm-up (+2 checked) steps; "
          + header(args))
    print(f"load average (1, 5, 15 min) before {la_before}, after {la_after}; wall {wall:.0f} s\n")
    print("| net, batch | optimizer | onnxbp ms median (min-max) | torch | ort-training | onnxbp/torch "
          "| onnxbp/ort-training | loss after 1st update (max rel diff) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        st = r["stats"]
        opt = r["optimizer"] + (" (ORT: plain SGD)" if r["optimizer"] == "sgd" and "ort-training" in st else "")
        c = r["loss_check"]
        verdict = "ok" if c["ok"] else "MISMATCH; vs float64: " + ", ".join(f"{n} {d:.0e}" for n, d in c["vs_f64"].items())
        print(f"| {r['net']}, {r['batch']} | {opt} | {fmt_ms(st['onnxbp'])} | {fmt_ms(st.get('torch'))} "
              f"| {fmt_ms(st.get('ort-training'))} | {_fmt(r, 'onnxbp/torch', 2)} | {_fmt(r, 'onnxbp/ort-training', 2)} "
              f"| {r['losses']['onnxbp'][1]:.6f} ({c['max_rel']:.0e} {verdict}) |")
    if not all(r["loss_ok"] for r in rows):
        print("\nMISMATCH: the sides' losses after the first update differ by more than --loss-rtol "
              f"{args.loss_rtol}.  The same two steps in float64 torch tell which sides follow the exact step; "
              "a float32 step can flip a ReLU/Clip mask element whose input lies within rounding of the "
              "threshold, which moves that channel's gradient (another --seed avoids such a tie).")


# --------------------------------------------------------------------------------- memory
def _status_mib() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    from ort_training_worker import status_mib

    return status_mib()


def _reset_hwm() -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    from ort_training_worker import _reset_hwm as reset

    return reset()


def memory_child(side: str, case_dir: str, opt: str, threads: int, steps: int) -> dict:
    """In a fresh main-venv process: build one side from the case files, run ``steps`` steps."""
    d = Path(case_dir)
    meta = json.loads((d / "meta.json").read_text())
    b = np.load(d / "batches.npz")
    xs = [b[f"x{k}"] for k in range(int(b["n"]))]
    ys = [b[f"y{k}"] for k in range(int(b["n"]))]
    if side == "onnxbp":
        import onnxbp.training  # noqa: F401
        imports = _status_mib()["VmRSS"]
        s = OnnxbpSide(onnx.load(str(d / "forward.onnx")), meta["requires_grad"], xs, ys, opt, LR[opt], threads)
    else:
        import torch
        net = NETS[meta["net"]]
        if net.onnx_fn is not None:  # the builders live in bench_train_step, which imports onnxbp
            import bench_train_step  # noqa: F401
        import peer_nets  # noqa: F401
        imports = _status_mib()["VmRSS"]
        module = net.torch_fn(meta)
        module.load_state_dict(torch.load(d / "torch_state.pt"))
        s = TorchSide(module, xs, ys, opt, LR[opt], threads)
    after = _status_mib()
    reset = _reset_hwm()
    for i in range(steps):
        s.step(i)
    end = _status_mib()
    return {"imports": imports, "after_build": after["VmRSS"], "build_peak": after["VmHWM"],
            "step_peak": end["VmHWM"], "peak": max(after["VmHWM"], end["VmHWM"]), "hwm_reset": reset}


def measure_memory(side, case_dir: Path, opt, args, py) -> dict:
    if side == "ort-training":
        w = OrtTrainingSide(py, case_dir, opt, LR[opt], args.threads, reuse=True)
        try:
            imports = w.info.get("rss_imports")
            after = w.ask({"cmd": "rss"})
            reset = w.ask({"cmd": "reset_hwm"})["ok"]
            for i in range(args.mem_steps):
                w.step(i)
            end = w.ask({"cmd": "rss"})
        finally:
            w.close()
        return {"imports": imports, "after_build": after["rss"], "build_peak": after["hwm"], "step_peak": end["hwm"],
                "peak": max(after["hwm"], end["hwm"]), "hwm_reset": reset}
    code = (f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import bench_peers as b; "
            f"print(json.dumps(b.memory_child({side!r}, {str(case_dir)!r}, {opt!r}, {args.threads}, {args.mem_steps})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=peer_env(args.threads),
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory(args, workdir: Path, py: Path | None) -> list:
    rows = []
    prepared = {}
    sides = [s for s in SIDES if s != "ort-training" or py is not None]
    for net, opt in cases_wanted(args):
        if net.name not in prepared:
            prepared[net.name] = prepare(net, args, workdir)
        case = prepared[net.name]
        if py is not None:  # artifacts once, outside the measured processes (as one deploys them)
            OrtTrainingSide(py, case.dir, opt, LR[opt], args.threads, artifacts_only=True)
        runs = {s: [] for s in sides}
        for r in range(args.mem_repeats):
            for s in (sides[r % len(sides):] + sides[:r % len(sides)]):
                runs[s].append(measure_memory(s, case.dir, opt, args, py))
        row = {"net": net.name, "optimizer": opt, "batch": net.batch, "runs": runs, "median": {}}
        for s, ms in runs.items():
            med = {k: statistics.median(m[k] for m in ms if m.get(k) is not None)
                   for k in ("imports", "after_build", "step_peak", "peak") if any(m.get(k) is not None for m in ms)}
            med["step_ws"] = statistics.median(m["step_peak"] - m["after_build"] for m in ms)
            if "imports" in med:
                med["peak_above_imports"] = statistics.median(m["peak"] - m["imports"] for m in ms)
            row["median"][s] = med
        rows.append(row)
        print(f"[{net.name} {opt}] " + ", ".join(f"{s}: peak {row['median'][s]['peak']:.0f} MiB, step working set "
                                                 f"{row['median'][s]['step_ws']:.0f} MiB" for s in sides),
              file=sys.stderr, flush=True)
    return rows


def print_memory(rows, args):
    print(f"\npeak RSS of a training process (MiB), {args.mem_steps} steps, medians of {args.mem_repeats} fresh "
          f"processes per side, interleaved; " + header(args))
    print("imports: RSS once the side's modules are imported; build: after the model/trainer is built; step ws: peak "
          "during the steps minus build; peak: the process's peak; above imports: peak minus imports\n")
    print("| net, batch | optimizer | side | imports | after build | step ws | peak | peak above imports "
          "| step ws / onnxbp's |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = r["median"]["onnxbp"]["step_ws"]
        for s, m in r["median"].items():
            cols = " | ".join(_fmt(m, k, 0) for k in ("imports", "after_build", "step_ws", "peak", "peak_above_imports"))
            print(f"| {r['net']}, {r['batch']} | {r['optimizer']} | {s} | {cols} | {m['step_ws'] / max(base, 1e-9):.2f} |")


# ---------------------------------------------------------------- gradient / forward time
def run_grad_ratio(args, workdir: Path) -> list:
    """Gradient-model time over forward time on the same network, both sides, interleaved.

    onnxbp: ``onnxbp.gradient(model)`` (every parameter; weights as initializers, as the forward)
    against the forward model, both in onnxruntime with the benchmark's session options; torch: one
    forward plus ``backward()`` against a ``no_grad`` forward, in eval mode (inference BatchNorm, as
    the exported forward).  Medians of ``--reps`` interleaved repetitions."""
    import torch

    import onnxbp
    from onnxbp.modelio import cpu_session

    torch.set_num_threads(args.threads)
    rows = []
    nets = [n for n in args.nets if n in NETS and NETS[n].vocab is None]
    for name in nets:
        case = prepare(NETS[name], args, workdir)
        x = case.xs[0]
        gm = onnxbp.gradient(case.model)
        fwd_s, grad_s = cpu_session(case.model, args.threads), cpu_session(gm, args.threads)
        out = fwd_s.get_outputs()[0].name
        y = fwd_s.run(None, {fwd_s.get_inputs()[0].name: x})[0]
        feeds = {fwd_s.get_inputs()[0].name: x}
        gfeeds = dict(feeds, **{out + "_grad": np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)})
        module = copy.deepcopy(case.module).eval()
        tx = torch.from_numpy(x)
        up = torch.from_numpy(gfeeds[out + "_grad"])

        def t_fwd():
            fwd_s.run(None, feeds)

        def t_grad():
            grad_s.run(None, gfeeds)

        def torch_fwd():
            with torch.no_grad():
                module(tx)

        def torch_grad():
            module.zero_grad(set_to_none=True)
            (module(tx) * up).sum().backward()

        fns = {"onnxbp forward": t_fwd, "onnxbp gradient": t_grad, "torch forward": torch_fwd,
               "torch forward+backward": torch_grad}
        for f in fns.values():
            for _ in range(args.warmup):
                f()
        times = {k: [] for k in fns}
        keys = list(fns)
        for r in range(args.reps):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                t = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t)
        st = {k: summary(v) for k, v in times.items()}
        row = {"net": name, "batch": NETS[name].batch, "stats": st,
               "onnxbp ratio": st["onnxbp gradient"]["median_ms"] / st["onnxbp forward"]["median_ms"],
               "torch ratio": st["torch forward+backward"]["median_ms"] / st["torch forward"]["median_ms"]}
        rows.append(row)
        print(f"[{name}] gradient/forward: onnxbp {row['onnxbp ratio']:.2f}, torch {row['torch ratio']:.2f}",
              file=sys.stderr, flush=True)
    return rows


def print_grad_ratio(rows, args):
    print(f"\nGradient model time / forward time, medians of {args.reps} interleaved reps, {args.threads} threads; "
          f"load average {loadavg()}\n")
    print("| net, batch | onnxbp forward ms | onnxbp gradient ms | onnxbp ratio | torch forward ms | "
          "torch fwd+bwd ms | torch ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        st = r["stats"]
        print(f"| {r['net']}, {r['batch']} | {fmt_ms(st['onnxbp forward'])} | {fmt_ms(st['onnxbp gradient'])} | "
              f"{r['onnxbp ratio']:.2f} | {fmt_ms(st['torch forward'])} | {fmt_ms(st['torch forward+backward'])} | "
              f"{r['torch ratio']:.2f} |")


# ----------------------------------------------------------------------------- build time
def run_build_time(args) -> list:
    import peer_nets
    import torch

    import onnxbp

    rows = []
    for depth in args.build_depths:
        module = peer_nets.resnet(depth, 1000, seed=args.seed)
        model = export_torchscript(module, torch.randn(1, 3, 64, 64))
        ts, grad_nodes = [], 0
        for _ in range(args.build_reps):
            t = time.perf_counter()
            g = onnxbp.gradient(model)
            ts.append(time.perf_counter() - t)
            grad_nodes = len(g.graph.node)
            del g
        row = {"net": f"resnet{depth}", "nodes": len(model.graph.node), "grad_nodes": grad_nodes,
               "params": sum(p.numel() for p in module.parameters()), "times_s": ts,
               "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
        if args.build_session:  # onnxruntime session creation of the gradient model, once
            from onnxbp.modelio import cpu_session
            g = onnxbp.gradient(model)
            t = time.perf_counter()
            cpu_session(g, args.threads)
            row["session_s"] = time.perf_counter() - t
        rows.append(row)
        print(f"[resnet{depth}] {len(model.graph.node)} nodes: {statistics.median(ts):.2f} s", file=sys.stderr,
              flush=True)
    return rows


def loglog_slope(xs, ys) -> float:
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else math.nan


def print_build_time(rows, args):
    import onnxbp
    print(f"\nonnxbp.gradient build time (all float initializers), median of {args.build_reps}; onnxbp "
          f"{getattr(onnxbp, '__version__', '?')}, {os.cpu_count()} CPUs; load average {loadavg()}\n")
    sess = any("session_s" in r for r in rows)
    print("| net | forward nodes | gradient-model nodes | build s median (min-max) | ms per forward node |"
          + (" ORT session creation s |" if sess else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if sess else ""))
    for r in rows:
        print(f"| {r['net']} | {r['nodes']} | {r['grad_nodes']} | {r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})"
              f" | {1e3 * r['median_s'] / r['nodes']:.2f} |" + (f" {r['session_s']:.2f} |" if sess else ""))
    slope = loglog_slope([r["nodes"] for r in rows], [r["median_s"] for r in rows])
    print(f"\nlog-log slope of build time vs forward node count: {slope:.2f} (1.00 = linear)")
    return slope


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="networks: " + ", ".join(NETS))
    ap.add_argument("--nets", nargs="+", default=DEFAULT_NETS, choices=list(NETS), metavar="NET")
    ap.add_argument("--optimizers", nargs="+", choices=("sgd", "adamw"), default=None,
                    help="optimizers for every net (default: each net's own list)")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="cifar-resnet18 base width (64 = ResNet-18)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, used round-robin")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss-rtol", type=float, default=1e-4)
    ap.add_argument("--no-ort-training", action="store_true", help="skip the onnxruntime-training side")
    ap.add_argument("--peer-venv", default=str(DEFAULT_PEER_VENV), help="the onnxruntime-training venv")
    ap.add_argument("--setup-peer", action="store_true", help="run benchmarks/peers/setup.sh first (idempotent)")
    ap.add_argument("--memory", action="store_true", help="peak RSS per side in fresh processes instead of speed")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--mem-repeats", type=int, default=3)
    ap.add_argument("--build-time", action="store_true", help="onnxbp.gradient build time, ResNet-18..152")
    ap.add_argument("--grad-ratio", action="store_true",
                    help="gradient-model time / forward time per net, onnxbp and torch (image nets)")
    ap.add_argument("--build-depths", type=int, nargs="+", default=[18, 50, 101, 152], choices=(18, 34, 50, 101, 152))
    ap.add_argument("--build-reps", type=int, default=3)
    ap.add_argument("--build-session", action="store_true",
                    help="with --build-time: also time onnxruntime session creation of each gradient model (once)")
    ap.add_argument("--workdir", default=None, help="keep the models, batches, artifacts and logs here")
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args(argv)

    la_before, t0 = loadavg(), time.perf_counter()
    if args.build_time:
        rows = run_build_time(args)
        slope = print_build_time(rows, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"mode": "build-time", "rows": rows, "slope": slope}, indent=1))
        return 0

    py = None
    if not args.no_ort_training and not args.grad_ratio:
        py = peer_python(args)
        if py is None:
            print(missing_peer_message(args), file=sys.stderr)
            return 2
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_peers_")
        workdir = Path(tmp)
    try:
        if args.grad_ratio:
            rows = run_grad_ratio(args, workdir)
            print_grad_ratio(rows, args)
        elif args.memory:
            rows = run_memory(args, workdir, py)
            print_memory(rows, args)
        else:
            rows = run_speed(args, workdir, py)
            print_speed(rows, args, la_before, loadavg(), time.perf_counter() - t0)
        if args.json:
            Path(args.json).write_text(json.dumps({"mode": "grad-ratio" if args.grad_ratio else ("memory" if args.memory else "speed"), "argv": sys.argv[1:],
                                                   "loadavg_before": la_before, "loadavg_after": loadavg(),
                                                   "wall_s": time.perf_counter() - t0, "rows": rows}, indent=1))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
