"""Elementwise optimizer math on a weight's own shape vs its flat view, in onnxruntime (CPU).

An optimizer update is a chain of elementwise ops with scalars.  onnxruntime
runs that chain far slower on tensors shaped like 1x1-conv weights
(``[M, C, 1, 1]``) than on the same data viewed flat, which is why the
training step computes the update of such parameters on ``Reshape(p, [-1])``
(a free alias) and reshapes the result back (``onnxbp/training/step.py``).
This script measures the chain ``c = (x * s + x) * s`` both ways per shape,
interleaved, and prints medians, min-max and the ratio::

    python benchmarks/bench_optimizer_views.py --reps 31 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper

from onnxbp.modelio import cpu_session

SHAPES = [(960, 160, 1, 1), (1280, 320, 1, 1), (32, 1, 3, 3), (512, 512, 3, 3), (1000, 1280), (4096,)]


def chain_model(shape, flat: bool):
    x, nodes = "x", []
    if flat:
        nodes.append(helper.make_node("Reshape", ["x", "flat"], ["xf"]))
        x = "xf"
    nodes += [helper.make_node("Mul", [x, "s"], ["a"]), helper.make_node("Add", ["a", x], ["b"]),
              helper.make_node("Mul", ["b", "s"], ["c"])]
    nodes.append(helper.make_node("Reshape", ["c", "shape"], ["y"]) if flat else helper.make_node("Identity", ["c"], ["y"]))
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.9]),
             helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("shape", TensorProto.INT64, [len(shape)], list(shape))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print("| shape | own shape ms (min-max) | flat view ms (min-max) | own / flat |\n|---|---|---|---|")
    for shape in SHAPES:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        sessions = {flat: cpu_session(chain_model(shape, flat), args.threads) for flat in (False, True)}
        out = {flat: sessions[flat].run(None, {"x": x})[0] for flat in (False, True)}
        assert np.array_equal(out[False], out[True])
        times = {False: [], True: []}
        for r in range(args.reps + 2):
            for flat in ((False, True) if r % 2 else (True, False)):
                t = time.perf_counter()
                sessions[flat].run(None, {"x": x})
                if r >= 2:
                    times[flat].append((time.perf_counter() - t) * 1e3)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {'x'.join(map(str, shape))} | {a:.3f} ({min(times[False]):.3f}-{max(times[False]):.3f}) | "
              f"{b:.3f} ({min(times[True]):.3f}-{max(times[True]):.3f}) | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
