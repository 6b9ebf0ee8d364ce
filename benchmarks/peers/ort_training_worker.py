"""onnxruntime-training side of ``benchmarks/bench_peers.py``: a worker in the peer virtual environment.

Runs with the python of ``benchmarks/peers/.venv-ort-training`` (onnxruntime-training-cpu 1.19.2,
onnx 1.17.0, torch 2.13.0; ``benchmarks/peers/setup.sh`` makes it) and imports nothing of onnxbp::

    python ort_training_worker.py --model FWD.onnx --batches B.npz --meta META.json \
        --optimizer sgd|adamw --threads 2 --workdir DIR [--artifacts-only | --reuse-artifacts]

It builds the training artifacts from the forward model (``generate_artifacts``: cross-entropy
loss, the optimizer below) in ``DIR``, loads them with ``onnxruntime.training.api``
(CheckpointState, Module, Optimizer; ``intra_op_num_threads=threads``, one inter-op thread,
``session.intra_op.allow_spinning=0``) and answers one JSON line per command line on stdin:

* ``{"cmd": "step", "i": k}`` -> ``{"loss": float, "t": seconds}``: one step on batch ``k % n``
  (forward + backward, optimizer step, gradient reset), timed here with perf_counter;
* ``{"cmd": "rss"}`` -> ``{"rss": MiB, "hwm": MiB}`` (VmRSS, VmHWM); ``{"cmd": "reset_hwm"}``
  resets VmHWM (``/proc/self/clear_refs``) and answers ``{"ok": bool}``;
* ``{"cmd": "quit"}``.

The first line it writes is ``{"ready": true, "build_s": ..., "load_s": ..., ...}`` (or
``{"error": "..."}``).  Protocol lines go to the original stdout only; everything else
(onnxruntime's and torch's messages) is sent to stderr.

Optimizers (``onnxruntime.training.artifacts``; both the ones onnxruntime-training 1.19 has):
* ``sgd``: ``SGDOptimizerV2``, plain SGD ``p -= lr * g``.  It has no momentum and no weight
  decay (the kernel has no momentum input), so the onnxbp and torch sides' SGD with momentum 0.9
  is compared with plain SGD here.  The first update is the same (momentum buffers start at
  zero, PyTorch sets ``buf = g`` on the first step), so the loss after it still agrees.
* ``adamw``: ``AdamWOptimizer`` with ``adam_mode=0``, the PyTorch AdamW rule (decoupled decay
  ``p *= 1 - lr*wd`` first; bias corrections on m and v), betas (0.9, 0.999), eps 1e-8,
  weight decay 0.01.  ``OptimType.AdamW`` would give mode 1 (Hugging Face's AdamW: eps 1e-6, no
  decay by default, bias correction folded into the lr, decay after the update).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def status_mib() -> dict:
    """VmRSS and VmHWM of this process in MiB (bench_peers.py imports this too)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0]) / 1024.0
    return vals


def _rss() -> dict:
    vals = status_mib()
    return {"rss": vals.get("VmRSS"), "hwm": vals.get("VmHWM")}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _adamw_block(lr_unused=None):
    from onnxruntime.training.onnxblock.optim import optim

    class TorchAdamWOptimizer(optim.AdamWOptimizer):
        """The AdamWOptimizer node in adam_mode 0 (PyTorch's AdamW) instead of 1."""

        def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):
            node_attributes = dict(node_attributes, adam_mode=0)
            return super()._build_optimizer_node(input_names, output_name, node_name, node_attributes)

    block = optim.AdamW(bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    block._adamw = TorchAdamWOptimizer(bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return block


def generate(model_path: str, meta: dict, optimizer: str, workdir: str) -> float:
    import onnx
    import onnxruntime as ort
    from onnxruntime.training import artifacts

    ort.set_default_logger_severity(3)
    t0 = time.perf_counter()
    model = onnx.load(model_path)
    opt = artifacts.OptimType.SGD if optimizer == "sgd" else _adamw_block()
    trainable = list(meta["requires_grad"])
    frozen = [t.name for t in model.graph.initializer if t.name not in set(trainable)
              and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)]
    artifacts.generate_artifacts(model, requires_grad=trainable, frozen_params=frozen,
                                 loss=artifacts.LossType.CrossEntropyLoss, optimizer=opt,
                                 artifact_directory=workdir)
    _fix_eval_batchnorm(os.path.join(workdir, "eval_model.onnx"))
    return time.perf_counter() - t0


def _fix_eval_batchnorm(path: str) -> None:
    """generate_artifacts switches the eval model's BatchNormalization nodes to training_mode=0 but
    leaves the running-statistics outputs that training mode needs and inference mode forbids (the
    eval model then fails to load): keep only Y."""
    import onnx

    m = onnx.load(path)
    changed = False
    for node in m.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            mode = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "training_mode"), 0)
            if not mode:
                del node.output[1:]
                changed = True
    if changed:
        onnx.save(m, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--meta", required=True)
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--artifacts-only", action="store_true", help="generate the artifacts and exit")
    ap.add_argument("--reuse-artifacts", action="store_true", help="load artifacts generated before")
    args = ap.parse_args(argv)

    # protocol on a private copy of stdout; fd 1 (anything a library prints) goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        with open(args.meta) as f:
            meta = json.load(f)
        os.makedirs(args.workdir, exist_ok=True)
        build_s = 0.0
        if not args.reuse_artifacts:
            build_s = generate(args.model, meta, args.optimizer, args.workdir)
        if args.artifacts_only:
            say({"ready": True, "build_s": build_s})
            return 0
        import numpy as np
        import onnxruntime as ort
        from onnxruntime.training import api

        batches = np.load(args.batches)
        xs = [np.ascontiguousarray(batches[f"x{k}"]) for k in range(int(batches["n"]))]
        ys = [np.ascontiguousarray(batches[f"y{k}"]).astype(np.int64) for k in range(int(batches["n"]))]
        rss_imports = _rss()["rss"]
        t0 = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        d = args.workdir
        state = api.CheckpointState.load_checkpoint(os.path.join(d, "checkpoint"))
        module = api.Module(os.path.join(d, "training_model.onnx"), state, os.path.join(d, "eval_model.onnx"),
                            device="cpu", session_options=so)
        optimizer = api.Optimizer(os.path.join(d, "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(args.lr)
        module.train()
        load_s = time.perf_counter() - t0
        say({"ready": True, "build_s": build_s, "load_s": load_s, "onnxruntime": ort.__version__, "rss_imports": rss_imports,
             "inputs": module.input_names(), "n_params": module.get_parameters_size(trainable_only=True)})
        for line in sys.stdin:
            cmd = json.loads(line)
            c = cmd.get("cmd")
            if c == "step":
                k = int(cmd["i"]) % len(xs)
                t = time.perf_counter()
                loss = module(xs[k], ys[k])
                optimizer.step()
                module.lazy_reset_grad()
                t = time.perf_counter() - t
                say({"loss": float(np.asarray(loss).reshape(-1)[0]), "t": t})
            elif c == "rss":
                say(_rss())
            elif c == "reset_hwm":
                say({"ok": _reset_hwm()})
            elif c == "quit":
                break
            else:
                say({"error": f"unknown command {c!r}"})
        return 0
    except Exception as exc:  # noqa: BLE001  (one line for the driver, the traceback on stderr)
        traceback.print_exc()
        say({"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]})
        return 1


if __name__ == "__main__":
    sys.exit(main())
