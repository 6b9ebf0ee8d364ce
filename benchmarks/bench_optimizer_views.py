"""Elementwise optimizer math with a scalar, three ways, in onnxruntime (CPU).

An optimizer update is a chain of elementwise ops with scalars.  onnxruntime
(1.32) runs that chain far slower on tensors whose last dim is 1 (1x1-conv
weights ``[M, C, 1, 1]``, depthwise ``[C, 1, 3, 3]`` is not one) when the
scalar is rank 0: its broadcast then goes element by element.  Three forms of
the chain ``c = (x * s + x) * s``:

- own: the weight's shape, a rank-0 scalar ``s``;
- flat: ``Reshape(x, [-1])``, the chain, and ``Reshape`` back (what the
  training step did until 2026-12-02; the Reshapes copy a graph input and
  write a graph output);
- ranked: the weight's shape with ``s`` of shape ``[1] * rank``
  (``onnxbp.optimize.match_scalar_ranks``, what the step does now).

Interleaved per shape; prints medians, min-max and the ratios to "ranked"::

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
FORMS = ("own", "flat", "ranked")


def chain_model(shape, form: str):
    x, nodes = "x", []
    if form == "flat":
        nodes.append(helper.make_node("Reshape", ["x", "flat"], ["xf"]))
        x = "xf"
    nodes += [helper.make_node("Mul", [x, "s"], ["a"]), helper.make_node("Add", ["a", x], ["b"]),
              helper.make_node("Mul", ["b", "s"], ["c"])]
    nodes.append(helper.make_node("Reshape", ["c", "shape"], ["y"]) if form == "flat"
                 else helper.make_node("Identity", ["c"], ["y"]))
    s_dims = [1] * len(shape) if form == "ranked" else []
    inits = [helper.make_tensor("s", TensorProto.FLOAT, s_dims, [0.9]),
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
    print("| shape | own ms (min-max) | flat ms (min-max) | ranked ms (min-max) | own / ranked | flat / ranked |\n"
          "|---|---|---|---|---:|---:|")
    for shape in SHAPES:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        sessions = {f: cpu_session(chain_model(shape, f), args.threads) for f in FORMS}
        out = {f: sessions[f].run(None, {"x": x})[0] for f in FORMS}
        assert np.array_equal(out["own"], out["flat"]) and np.array_equal(out["own"], out["ranked"])
        times = {f: [] for f in FORMS}
        for r in range(args.reps + 2):
            for f in (FORMS if r % 2 else FORMS[::-1]):
                t = time.perf_counter()
                sessions[f].run(None, {"x": x})
                if r >= 2:
                    times[f].append((time.perf_counter() - t) * 1e3)
        med = {f: statistics.median(times[f]) for f in FORMS}
        cells = " | ".join(f"{med[f]:.3f} ({min(times[f]):.3f}-{max(times[f]):.3f})" for f in FORMS)
        print(f"| {'x'.join(map(str, shape))} | {cells} | {med['own'] / med['ranked']:.2f} | "
              f"{med['flat'] / med['ranked']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
