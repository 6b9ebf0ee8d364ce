"""One training step (forward + loss + backward + optimizer update): onnxbp step model in
onnxruntime vs PyTorch eager, on CPU with 2 threads, measured interleaved side by side.

    python benchmarks/bench_train_step.py [--reps 15] [--batch 32] [--json out.json]

Networks (same architecture and initial weights on both sides):
* lenet    : models/lenet.onnx (1x8x8 input), batch 32
* resnet18 : CIFAR-style ResNet-18 built here with onnx.helper (3x32x32 input; 3x3 stem, no
             max-pool, 4 stages x 2 BasicBlocks of 64/128/256/512 channels with BatchNormalization
             in training mode, global average pooling, 10-way Gemm), batch 32

Both sides: cross-entropy loss, SGD with momentum 0.9 (torch.optim.SGD rules).  onnxruntime:
intra_op_num_threads=2, session.intra_op.allow_spinning=0, parameters kept in OrtValues
(IOBinding).  torch: torch.set_num_threads(2).  Each repetition times one ORT step and one
torch step back to back (order alternating), after warm-up steps; the report gives the median,
min and max per side and the ratio of medians (ORT / torch; < 1 means onnxbp+ORT is faster).
The first-step losses are compared as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxbp  # noqa: E402
from onnxbp.training import SGD, Trainer  # noqa: E402


# --------------------------------------------------------------------------- ResNet-18 (ONNX)
class _Net:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], {}, 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def conv(self, x, cin, cout, k, stride, prefix):
        w = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        self.inits[f"{prefix}.weight"] = w
        y = self.name(prefix)
        p = k // 2
        self.nodes.append(helper.make_node("Conv", [x, f"{prefix}.weight"], [y], name=prefix, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[p, p, p, p]))
        return y

    def bn(self, x, c, prefix):
        for suffix, v in (("weight", np.ones(c)), ("bias", np.zeros(c)), ("running_mean", np.zeros(c)),
                          ("running_var", np.ones(c))):
            self.inits[f"{prefix}.{suffix}"] = v.astype(np.float32)
        y = self.name(prefix)
        self.nodes.append(helper.make_node("BatchNormalization", [x] + [f"{prefix}.{s}" for s in
                                           ("weight", "bias", "running_mean", "running_var")], [y], name=prefix,
                                           epsilon=1e-5, momentum=0.9))
        return y

    def op(self, op, inputs, **attrs):
        y = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [y], name=y, **attrs))
        return y


def build_resnet18(width=64, n_classes=10, seed=0) -> onnx.ModelProto:
    net = _Net(seed)
    x = net.op("Relu", [net.bn(net.conv("x", 3, width, 3, 1, "conv1"), width, "bn1")])
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        cout = width * mult
        for block in range(2):
            stride = 2 if (stage > 1 and block == 0) else 1
            pre = f"layer{stage}.{block}"
            h = net.op("Relu", [net.bn(net.conv(x, cin, cout, 3, stride, f"{pre}.conv1"), cout, f"{pre}.bn1")])
            h = net.bn(net.conv(h, cout, cout, 3, 1, f"{pre}.conv2"), cout, f"{pre}.bn2")
            sc = x
            if stride != 1 or cin != cout:
                sc = net.bn(net.conv(x, cin, cout, 1, stride, f"{pre}.downsample.0"), cout, f"{pre}.downsample.1")
            x = net.op("Relu", [net.op("Add", [h, sc])])
            cin = cout
    if onnxbp.REGISTRY.lookup("GlobalAveragePool", "", 17) is not None:
        pooled = net.op("Flatten", [net.op("GlobalAveragePool", [x])], axis=1)
        opset = 17
    else:  # same math; ReduceMean has a rule
        pooled = net.op("Flatten", [net.op("ReduceMean", [x, "pool_axes"], keepdims=1)], axis=1)
        net.inits["pool_axes"] = np.array([2, 3], np.int64)
        opset = 18
    bound = 1 / np.sqrt(cin)
    net.inits["fc.weight"] = net.rng.uniform(-bound, bound, (n_classes, cin)).astype(np.float32)
    net.inits["fc.bias"] = net.rng.uniform(-bound, bound, n_classes).astype(np.float32)
    net.nodes.append(helper.make_node("Gemm", [pooled, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(net.nodes, "resnet18", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
                          [numpy_helper.from_array(v, k) for k, v in net.inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


# --------------------------------------------------------------------------- torch twins
def torch_resnet18(width, n_classes):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            cin = width
            for stage, mult in enumerate((1, 2, 4, 8), start=1):
                cout = width * mult
                blocks = [Block(cin, cout, 2 if stage > 1 else 1), Block(cout, cout, 1)]
                setattr(self, f"layer{stage}", nn.Sequential(*blocks))
                cin = cout
            self.fc = nn.Linear(cin, n_classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))

    return ResNet()


def torch_lenet():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


_LENET_NAMES = {"0": "conv1", "3": "conv2", "7": "fc1", "9": "fc2"}


def load_weights(module, model: onnx.ModelProto, rename=lambda k: k):
    import torch

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = module.state_dict()
    new = {}
    for k, v in state.items():
        src = rename(k)
        if k.endswith("num_batches_tracked"):
            new[k] = v
            continue
        if src not in inits:
            raise KeyError(f"torch tensor {k} ({src}) has no ONNX initializer")
        new[k] = torch.from_numpy(inits[src].copy()).reshape(v.shape)
    module.load_state_dict(new)


# --------------------------------------------------------------------------- timing
def bench(name, model, torch_net, in_shape, batch, reps, warmup, lr=0.01, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch,) + in_shape).astype(np.float32) for _ in range(4)]
    ys = [rng.integers(0, 10, batch) for _ in range(4)]
    t0 = time.perf_counter()
    trainer = Trainer(model, optimizer=SGD(momentum=0.9), threads=2)
    build_s = time.perf_counter() - t0
    topt = torch.optim.SGD(torch_net.parameters(), lr=lr, momentum=0.9)
    lossf = torch.nn.CrossEntropyLoss()
    torch_net.train()

    def ort_step(i):
        return trainer.train_step(xs[i % 4], ys[i % 4], lr=lr)

    def torch_step(i):
        topt.zero_grad(set_to_none=True)
        loss = lossf(torch_net(torch.from_numpy(xs[i % 4])), torch.from_numpy(ys[i % 4]))
        loss.backward()
        topt.step()
        return loss.item()

    first = (ort_step(0), torch_step(0))
    for i in range(1, warmup):
        ort_step(i)
        torch_step(i)
    times = {"ort": [], "torch": []}
    for r in range(reps):
        order = (("ort", ort_step), ("torch", torch_step)) if r % 2 == 0 else (("torch", torch_step), ("ort", ort_step))
        for side, fn in order:
            t = time.perf_counter()
            fn(r)
            times[side].append(time.perf_counter() - t)
    return {"net": name, "batch": batch, "reps": reps, "build_s": build_s, "first_loss_ort": first[0],
            "first_loss_torch": first[1], **{f"{s}_{k}": v for s in times for k, v in _summary(times[s]).items()},
            "ratio": statistics.median(times["ort"]) / statistics.median(times["torch"]),
            "times": times}


def _summary(ts):
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    ap.add_argument("--nets", nargs="+", default=["lenet", "resnet18"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    results = []
    for name in args.nets:
        if name == "lenet":
            model = onnx.load(str(ROOT / "models" / "lenet.onnx"))
            tnet = torch_lenet()
            load_weights(tnet, model, lambda k: f"{_LENET_NAMES[k.split('.')[0]]}.{k.split('.')[1]}")
            shape = (1, 8, 8)
        else:
            model = build_resnet18(args.width)
            tnet = torch_resnet18(args.width, 10)
            load_weights(tnet, model)
            shape = (3, 32, 32)
        res = bench(name, model, tnet, shape, args.batch, args.reps, args.warmup)
        results.append(res)
        print(f"{name}: built in {res['build_s']:.2f} s; first-step loss ort {res['first_loss_ort']:.6f} "
              f"torch {res['first_loss_torch']:.6f}", file=sys.stderr)
    print(f"\none training step, batch {args.batch}, 2 threads, {args.reps} interleaved reps "
          f"(onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print("| net | onnxbp+ORT median ms (min-max) | torch median ms (min-max) | ratio ORT/torch |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['net']} | {r['ort_median_ms']:.2f} ({r['ort_min_ms']:.2f}-{r['ort_max_ms']:.2f}) | "
              f"{r['torch_median_ms']:.2f} ({r['torch_min_ms']:.2f}-{r['torch_max_ms']:.2f}) | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
