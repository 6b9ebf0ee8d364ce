"""Where one training step spends its time: onnxbp (onnxruntime's profiler) next to PyTorch (torch.profiler).

    python benchmarks/profile_step.py --nets resnet18 mobilenetv2 --opt sgd --steps 10

Same nets, weights and batches as ``bench_peers.py``.  The onnxbp side runs its Trainer's step model in a
session with onnxruntime's profiler on (same options as the Trainer's: 2 threads, no spinning, no memory
pattern) and sums node times per stage (forward, backward = nodes onnxbp wrote under ``onnxbp/grad``,
optimizer = ``train/``) and per op type within each stage; the torch side sums self CPU time per aten op
under forward / backward / optimizer.step record_function ranges.  Profiling adds overhead on both sides:
compare shares and the ranking of ops, and take the step times from ``bench_peers.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import bench_peers  # noqa: E402


def stages_of(model) -> dict:
    """``{node name: stage}`` of a step model: the backward is what the engine wrote (its doc string says
    so), the loss and the optimizer are what the step builder wrote under ``train/``."""
    out = {}
    for n in model.graph.node:
        if n.doc_string.startswith("onnxbp: backward"):
            out[n.name] = "backward"
        elif n.name.startswith("train/conv/"):  # training/conv_forward.py: a Conv's forward as one Gemm
            out[n.name] = "forward"
        elif n.name.startswith("train/") and any(k in n.name for k in ("cross_entropy", "/loss", "mse")):
            out[n.name] = "loss"
        elif n.name.startswith("train/"):
            out[n.name] = "optimizer"
        else:
            out[n.name] = "forward"
    return out


def profile_onnxbp(case, opt, lr, threads, steps) -> dict:
    from onnxbp.modelio import cpu_session

    side = bench_peers.OnnxbpSide(case.model, case.requires_grad, case.xs, case.ys, opt, lr, threads)
    tr = side.trainer
    tr.set_session(cpu_session(tr.step_model.model, threads, mem_pattern=False,
                               profile_prefix=str(Path(tempfile.mkdtemp()) / "ort")))
    for i in range(2):
        side.step(i)          # warm-up (not separable from the profile: dropped below by run index)
    for i in range(steps):
        side.step(i)
    path = tr.session.end_profiling()
    events = json.loads(Path(path).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    keep_from = runs[2]["ts"] if len(runs) > 2 else 0
    stages = stages_of(tr.step_model.model)
    by_stage = collections.Counter()
    by_op = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < keep_from:
            continue
        node = e["name"][: -len("_kernel_time")]
        st = stages.get(node, "made by onnxruntime")
        us = e["dur"] / steps
        by_stage[st] += us
        by_op[st][e["args"].get("op_name", "?")] += us
    total = sum(r["dur"] for r in runs[2:]) / max(1, len(runs) - 2)
    return {"step_ms": total / 1e3, "stages": {k: v / 1e3 for k, v in by_stage.items()},
            "ops": {k: {o: t / 1e3 for o, t in c.most_common()} for k, c in by_op.items()}}


def profile_torch(case, opt, lr, threads, steps) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(threads)
    module = case.module
    params = [p for p in module.parameters() if p.requires_grad]
    o = (torch.optim.SGD(params, lr=lr, momentum=0.9) if opt == "sgd"
         else torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))
    lossf = torch.nn.CrossEntropyLoss()

    def step(i):
        x = torch.from_numpy(case.xs[i % len(case.xs)])
        y = torch.from_numpy(case.ys[i % len(case.ys)])
        with record_function("stage:forward"):
            loss = lossf(module(x), y)
        with record_function("stage:backward"):
            o.zero_grad(set_to_none=False)
            loss.backward()
        with record_function("stage:optimizer"):
            o.step()

    for i in range(2):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            with record_function("stage:step"):
                step(i)
    ev = prof.events()
    stages = collections.Counter()
    for e in ev:
        if e.name.startswith("stage:"):
            stages[e.name[6:]] += e.cpu_time_total / steps / 1e3
    # backward ops run on the autograd thread, outside the record_function range: attribute by name
    ops = collections.defaultdict(collections.Counter)
    for e in prof.key_averages():
        name = e.key
        if name.startswith("stage:") or name.startswith("aten::") is False and "Backward" not in name:
            continue
        st = "backward" if ("Backward" in name or "backward" in name) else "forward/optimizer"
        ops[st][name] += e.self_cpu_time_total / steps / 1e3
    return {"step_ms": stages.pop("step", 0.0), "stages": dict(stages),
            "ops": {k: dict(c.most_common(15)) for k, c in ops.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["resnet18", "mobilenetv2"])
    ap.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args(argv)
    nets = bench_peers.NETS
    lr = 0.01 if args.opt == "sgd" else 1e-3
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets:
            case = bench_peers.prepare(nets[name], args, Path(tmp))
            res = {"onnxbp": profile_onnxbp(case, args.opt, lr, args.threads, args.steps),
                   "torch": profile_torch(case, args.opt, lr, args.threads, args.steps)}
            out[name] = res
            print(f"\n## {name}, batch {case.net.batch}, {args.opt}: ms per step under the profilers "
                  f"(onnxbp {res['onnxbp']['step_ms']:.1f}, torch {res['torch']['step_ms']:.1f})\n")
            print("| stage | onnxbp ms | torch ms |\n|---|---:|---:|")
            for st in ("forward", "loss", "backward", "optimizer"):
                a, b = res["onnxbp"]["stages"].get(st), res["torch"]["stages"].get(st)
                if a is None and b is None:
                    continue
                print(f"| {st} | {'' if a is None else f'{a:.1f}'} | {'' if b is None else f'{b:.1f}'} |")
            for st, ops in res["onnxbp"]["ops"].items():
                top = ", ".join(f"{o} {t:.1f}" for o, t in list(ops.items())[: args.top])
                print(f"\nonnxbp {st}: {top}")
            for st, ops in res["torch"]["ops"].items():
                top = ", ".join(f"{o} {t:.1f}" for o, t in list(ops.items())[: args.top])
                print(f"torch {st} (self time): {top}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
