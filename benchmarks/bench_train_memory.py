"""Peak memory of a training step: onnxbp's step model in onnxruntime vs PyTorch eager (CPU).

Each side runs in its own fresh process (one process per net and side, so neither library's
allocations or imports count against the other), builds the same network as
``bench_train_step.py`` (same initial weights), runs ``--steps`` SGD-momentum steps at batch 32,
and reports its resident set size (RSS, from /proc/self/status):

* ``after build``: RSS once the model is built (imports, weights, the ORT session) and before
  the first step;
* ``peak``: the process's peak RSS (VmHWM) after the steps;
* ``step working set``: peak minus after build, the memory the steps themselves need
  (activations kept for the backward, gradients, workspace; ORT's arena keeps what it grew).

The run is repeated ``--repeats`` times per side, interleaved, and medians are reported:

    python benchmarks/bench_train_memory.py [--nets lenet resnet18] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
sys.path[:0] = [{root!r}, {bench!r}]

def rss():
    vals = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) / 1024.0  # MiB
    return vals

import numpy as np, onnx, torch
import bench_train_step as b
torch.set_num_threads(2)
torch.manual_seed(0)
side, net, batch, steps = {side!r}, {net!r}, {batch}, {steps}
if net == "lenet":
    model = onnx.load({lenet!r})
    tnet = b.torch_lenet()
    b.load_weights(tnet, model, lambda k: f"{{b._LENET_NAMES[k.split('.')[0]]}}.{{k.split('.')[1]}}")
    shape = (1, 8, 8)
else:
    model = b.build_resnet18()
    tnet = b.torch_resnet18(64, 10)
    b.load_weights(tnet, model)
    shape = (3, 32, 32)
rng = np.random.default_rng(0)
x = rng.standard_normal((batch,) + shape).astype(np.float32)
y = rng.integers(0, 10, batch)
if side == "ort":
    from onnxbp.training import SGD, Trainer
    trainer = Trainer(model, optimizer=SGD(momentum=0.9), threads=2)
    del model, tnet
    step = lambda: trainer.train_step(x, y, lr=0.01)
else:
    del model
    opt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()
    tnet.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(tnet(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()
before = rss()["VmRSS"]
for _ in range(steps):
    step()
print(json.dumps({{"after_build": before, "peak": rss()["VmHWM"]}}))
"""


def measure(side: str, net: str, batch: int, steps: int) -> dict:
    code = _CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), side=side, net=net, batch=batch,
                         steps=steps, lenet=str(ROOT / "models" / "lenet.onnx"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["lenet", "resnet18"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for net in args.nets:
        runs = {"ort": [], "torch": []}
        for r in range(args.repeats):
            for side in (("ort", "torch") if r % 2 == 0 else ("torch", "ort")):
                runs[side].append(measure(side, net, args.batch, args.steps))
        row = {"net": net}
        for side, ms in runs.items():
            row[side] = {k: statistics.median(m[k] for m in ms) for k in ("after_build", "peak")}
            row[side]["step"] = statistics.median(m["peak"] - m["after_build"] for m in ms)
        rows.append(row)
    print(f"peak RSS of a training step, batch {args.batch}, {args.steps} steps, medians of {args.repeats} "
          f"fresh processes per side (MiB)\n")
    print("| net | ORT after build | ORT peak | ORT step working set | torch after build | torch peak "
          "| torch step working set | ratio of step working sets ORT/torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, t = r["ort"], r["torch"]
        print(f"| {r['net']} | {o['after_build']:.0f} | {o['peak']:.0f} | {o['step']:.0f} | {t['after_build']:.0f} "
              f"| {t['peak']:.0f} | {t['step']:.0f} | {o['step'] / max(t['step'], 1e-9):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
