"""Time the Conv backward lowerings of onnxbp on onnxruntime CPU.

For each case a Conv model (X input, W and B initializers) is differentiated
with ``conv_strategy="transpose"`` and ``"seed"``; the forward Conv and its
output are removed from the gradient model so only the backward (dX, dW, dB,
or one of them with ``--parts``) is timed.  Sessions use 2 intra-op threads
and ``session.intra_op.allow_spinning=0``; the lowerings' runs are
interleaved (A B C A B C ...) so that machine noise hits all alike.  Prints a
markdown table of median and min-max (ms) per lowering and the ratios
seed / transpose and auto / transpose of the medians.

    python benchmarks/bench_conv.py            # full grid
    python benchmarks/bench_conv.py --quick    # batch 8, 28x28 maps, fewer repeats
    python benchmarks/bench_conv.py --parts    # also time dX alone and dW alone
    python benchmarks/bench_conv.py --weights-as-inputs --cases wide --sizes 2 4 8 --parts --only-parts

``--weights-as-inputs`` makes W a graph input fed each run, as in a training step (the optimizer
updates it), so onnxruntime cannot constant-fold the seed form's kernel rotation or prepack kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.modelio import cpu_session as session

STRATEGIES = ("transpose", "seed", "patches", "auto")

#: name, C, M, k, stride, pad, group
CASES = [
    ("3x3 s1", 64, 64, 3, 1, 1, 1),
    ("3x3 s2", 64, 128, 3, 2, 1, 1),
    ("1x1 s2", 64, 128, 1, 2, 0, 1),
    ("7x7 s2 stem", 3, 64, 7, 2, 3, 1),
    ("dw 3x3 s1", 64, 64, 3, 1, 1, 64),
    ("dw 3x3 s2", 64, 64, 3, 2, 1, 64),
    ("1x1 s1", 64, 256, 1, 1, 0, 1),
    ("wide 3x3 s1", 512, 512, 3, 1, 1, 1),   # ResNet-18's last stage: weight-bound on small maps
    ("wide 3x3 s2", 256, 512, 3, 2, 1, 1),
]


def conv_model(batch, c, m, size, k, stride, pad, group, rng, weights_as_inputs=False):
    w = (rng.standard_normal((m, c // group, k, k)) * 0.1).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[k, k], strides=[stride] * 2,
                            pads=[pad] * 4, group=group)
    out = (size + 2 * pad - k) // stride + 1
    graph = helper.make_graph(
        [node], "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, c, size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, m, out, out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    if weights_as_inputs:
        model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.shape)))
        model.graph.initializer.remove(model.graph.initializer[0])
    return model, (batch, m, out, out)


def backward_only(gm: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the forward Conv (and output Y): the backward never reads Y."""
    m = onnx.ModelProto()
    m.CopyFrom(gm)
    keep = [n for n in m.graph.node if "Y" not in n.output]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    outs = [o for o in m.graph.output if o.name != "Y"]
    del m.graph.output[:]
    m.graph.output.extend(outs)
    onnx.checker.check_model(m, full_check=True)
    return m


def bench_case(name, batch, size, spec, wrt, repeats, threads, rng, weights_as_inputs=False):
    c, m, k, stride, pad, group = spec
    model, yshape = conv_model(batch, c, m, size, k, stride, pad, group, rng, weights_as_inputs)
    feeds = {"X": rng.standard_normal((batch, c, size, size)).astype(np.float32),
             "W": (rng.standard_normal((m, c // group, k, k)) * 0.1).astype(np.float32),
             "Y_grad": rng.standard_normal(yshape).astype(np.float32)}
    runs = {}
    for s in STRATEGIES:
        gm = backward_only(onnxbp.gradient(model, wrt, conv_strategy=s))
        sess = session(gm, threads)
        names = [o.name for o in sess.get_outputs()]
        inputs = {i.name for i in sess.get_inputs()}
        f = {kk: v for kk, v in feeds.items() if kk in inputs}
        runs[s] = (sess, names, f)
    results = {s: [] for s in STRATEGIES}
    outs = {}
    for s, (sess, names, f) in runs.items():  # warm-up, and the two lowerings must agree
        outs[s] = sess.run(names, f)
    for other in STRATEGIES[1:]:
        for a, b in zip(outs["transpose"], outs[other]):
            scale = float(np.max(np.abs(a))) or 1.0
            assert float(np.max(np.abs(a - b))) <= 1e-3 * scale, f"{name}: lowerings disagree"
    for _ in range(repeats):
        for s, (sess, names, f) in runs.items():
            t0 = time.perf_counter()
            sess.run(names, f)
            results[s].append((time.perf_counter() - t0) * 1e3)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 and 28x28 only, 3 repeats")
    ap.add_argument("--parts", action="store_true", help="also time dX alone and dW alone")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                    help="only the cases whose name contains one of these (e.g. 's1' 'stem')")
    ap.add_argument("--only-parts", action="store_true", help="with --parts: skip the dX+dW+dB rows")
    ap.add_argument("--weights-as-inputs", action="store_true",
                    help="W is a graph input fed each run (a training step), not an initializer")
    ap.add_argument("--sizes", nargs="+", type=int, default=None, help="input map sizes (default 56 28)")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 8 32)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    batches = args.batches or ((8,) if args.quick else (8, 32))
    sizes = args.sizes or ((28,) if args.quick else (56, 28))
    parts = [("dX+dW+dB", ["X", "W", "B"])]
    if args.parts:
        parts = parts[1:] if args.only_parts else parts
        parts += [("dX", ["X"]), ("dW", ["W"])]
    cases = [c for c in CASES if (any(f in c[0] for f in args.cases) if args.cases else not c[0].startswith("wide"))]
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, no spinning, "
          f"{repeats} interleaved repeats; times in ms", file=sys.stderr)
    rows = []
    for part, wrt in parts:
        for name, *spec in cases:
            for batch in batches:
                for size in sizes:
                    r = bench_case(name, batch, size, spec, wrt, repeats, args.threads, rng,
                                   args.weights_as_inputs)
                    med = {s: statistics.median(v) for s, v in r.items()}
                    row = (part, name, batch, f"{size}x{size}",
                           *(f"{med[s]:.1f} ({min(r[s]):.1f}-{max(r[s]):.1f})" for s in STRATEGIES),
                           f"{med['seed'] / med['transpose']:.2f}", f"{med['patches'] / med['transpose']:.2f}",
                           f"{med['auto'] / med['transpose']:.2f}")
                    rows.append(row)
                    print("| " + " | ".join(map(str, row)) + " |", file=sys.stderr, flush=True)
    head = ("grads", "case", "batch", "map", *(f"{s} median (min-max)" for s in STRATEGIES),
            "seed/transpose", "patches/transpose", "auto/transpose")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
