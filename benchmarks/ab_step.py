"""A/B of onnxbp's training-step model: this tree against another revision, interleaved in one process.

    python benchmarks/ab_step.py --before 2ab6252 --nets resnet18 mobilenetv2 --opt sgd --reps 21

Each side's step model is built by its own onnxbp (the other revision from a temporary ``git worktree``,
in a child process) for the same forward model (``bench_peers.py``'s nets, weights and batches), then
both run in this process under the Trainer's session options (2 threads, no spinning, no memory pattern)
with the Trainer's IOBinding protocol (parameters and state carried in OrtValues), their steps
interleaved A B B A ...  Prints medians, min-max and the ratio B/A per net, and checks that both sides
give the same losses on the first steps (``--loss-rtol``).  A lever is measured by committing it and
comparing against the commit before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

BUILD = r'''
import json, sys, numpy as np, onnx
from onnxbp.training import SGD, AdamW
from onnxbp.training.step import build_step_model
forward, opt, rg, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
optimizer = SGD(momentum=0.9) if opt == "sgd" else AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
sm = build_step_model(forward, optimizer=optimizer, requires_grad=rg)
onnx.save(sm.model, out + ".onnx")
np.savez(out + ".npz", **sm.initial)
open(out + ".json", "w").write(sm.spec.to_json())
'''


def build(tree: Path, forward: Path, opt: str, requires_grad, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", BUILD, str(forward), opt, json.dumps(requires_grad), str(out)],
                   check=True, env=env, cwd=str(tree))
    return time.perf_counter() - t


class Side:
    def __init__(self, prefix: Path, threads: int):
        import onnx
        import onnxruntime as ort

        from onnxbp.modelio import cpu_session

        self.spec = json.loads(Path(str(prefix) + ".json").read_text())
        initial = np.load(str(prefix) + ".npz")
        self.sess = cpu_session(onnx.load(str(prefix) + ".onnx"), threads, mem_pattern=False)  # the Trainer's options
        self.a, self.b = {}, {}
        for name in self.spec["updates"]:
            arr = np.ascontiguousarray(initial[name])
            self.a[name] = ort.OrtValue.ortvalue_from_numpy(arr)
            self.b[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
        self.loss = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32)
        self.binding = self.sess.io_binding()
        self.count = 0

    def step(self, x, y, lr) -> tuple:
        b, s = self.binding, self.spec
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(s["data_inputs"][0], x)
        if s.get("target"):
            b.bind_cpu_input(s["target"], y)
        b.bind_cpu_input(s["lr"], np.asarray(lr, np.float32))
        if s.get("step"):
            b.bind_cpu_input(s["step"], np.asarray(self.count + 1, np.int64))
        for name, out in s["updates"].items():
            b.bind_ortvalue_input(name, self.a[name])
            b.bind_ortvalue_output(out, self.b[name])
        b.bind_ortvalue_output(s["loss"], self.loss)
        t = time.perf_counter()
        self.sess.run_with_iobinding(b)
        dt = time.perf_counter() - t
        self.a, self.b = self.b, self.a
        self.count += 1
        return float(self.loss.numpy()), dt


def main(argv=None) -> int:
    import bench_peers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the git revision to compare this tree against")
    ap.add_argument("--nets", nargs="+", default=["resnet18", "mobilenetv2"])
    ap.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss-rtol", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args(argv)
    lr = bench_peers.LR[args.opt]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(before), args.before],
                       check=True)
        try:
            print(f"| net | optimizer | {args.before} ms median (min-max) | this tree | this/{args.before} |")
            print("|---|---|---:|---:|---:|")
            for name in args.nets:
                case = bench_peers.prepare(bench_peers.NETS[name], args, tmp / "cases")
                fwd = case.dir / "forward.onnx"
                build(before, fwd, args.opt, case.requires_grad, tmp / f"{name}-A")
                build(ROOT, fwd, args.opt, case.requires_grad, tmp / f"{name}-B")
                sides = {"A": Side(tmp / f"{name}-A", args.threads), "B": Side(tmp / f"{name}-B", args.threads)}
                losses = {k: [] for k in sides}
                times = {k: [] for k in sides}
                order = ["A", "B"]
                for i in range(args.warmup + args.reps):
                    k_ = i % len(case.xs)
                    for s in (order if i % 2 == 0 else order[::-1]):
                        loss, dt = sides[s].step(case.xs[k_], case.ys[k_], lr)
                        losses[s].append(loss)
                        if i >= args.warmup:
                            times[s].append(dt * 1e3)
                for a, b in zip(losses["A"][:2], losses["B"][:2]):
                    if abs(a - b) > args.loss_rtol * max(abs(a), 1e-12):
                        raise SystemExit(f"{name}: losses differ: {losses['A'][:2]} vs {losses['B'][:2]}")
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"| {name} | {args.opt} | {med['A']:.1f} ({min(times['A']):.1f}-{max(times['A']):.1f}) | "
                      f"{med['B']:.1f} ({min(times['B']):.1f}-{max(times['B']):.1f}) | {med['B'] / med['A']:.2f} |",
                      flush=True)
                del sides
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
