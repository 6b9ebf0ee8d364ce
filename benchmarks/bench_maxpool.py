"""Time onnxbp's MaxPool backward on onnxruntime CPU against torch's max_pool2d backward.

Case (default): X (16, 64, 112, 112) float32, kernel 3, stride 2, pads 1
(ResNet's stem pool).  onnxbp differentiates a one-node MaxPool model; the
gradient model (inputs X and Y_grad) runs the forward MaxPool with its
Indices output plus the backward (Reshape, ScatterElements reduction=add,
Reshape).  What is timed, all interleaved in one loop (A B C D A B C D ...)
so machine noise hits every variant alike:

* ``ort fwd+bwd``  the gradient model: forward MaxPool (+Indices) and backward;
* ``ort fwd``      the forward model alone (MaxPool with Indices, so the same
                   forward kernel as in the gradient model);
* ``ort bwd only``  the backward alone: the gradient model with the forward
                   MaxPool removed and its Indices fed as an input (computed
                   once); also reported as the difference of the two medians
                   above;
* ``ort fwd (no Indices)`` the plain forward MaxPool, for reference (onnxruntime
                   uses a different kernel when Indices are not requested);
* ``torch fwd+bwd`` max_pool2d forward and backward (``y.backward(dy)``);
* ``torch bwd``    backward only: one forward, then ``y.backward(dy,
                   retain_graph=True)`` per repeat (x.grad reset each time).

onnxruntime: 2 intra-op threads, ``session.intra_op.allow_spinning=0``;
torch: ``torch.set_num_threads(2)``.  Prints a markdown table of medians and
min-max in ms, and the ratios ort/torch.

    python benchmarks/bench_maxpool.py                 # the default case, 15 repeats
    python benchmarks/bench_maxpool.py --batch 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxbp
from onnxbp.modelio import cpu_session as session


def maxpool_model(batch, c, size, k, stride, pad, indices):
    out = (size + 2 * pad - k) // stride + 1
    outs = ["Y", "I"] if indices else ["Y"]
    node = helper.make_node("MaxPool", ["X"], outs, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)
    ospec = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, c, out, out])]
    if indices:
        ospec.append(helper.make_tensor_value_info("I", TensorProto.INT64, [batch, c, out, out]))
    graph = helper.make_graph([node], "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                [batch, c, size, size])], ospec)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model, (batch, c, out, out)


def backward_only(gm: onnx.ModelProto, idx_shape) -> tuple:
    """The gradient model without its forward MaxPool: its Indices become an input."""
    m = onnx.ModelProto()
    m.CopyFrom(gm)
    pool = next(n for n in m.graph.node if n.op_type == "MaxPool")
    idx_name = pool.output[1]
    keep = [n for n in m.graph.node if n is not pool]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    outs = [o for o in m.graph.output if o.name != "Y"]
    del m.graph.output[:]
    m.graph.output.extend(outs)
    m.graph.input.append(helper.make_tensor_value_info(idx_name, TensorProto.INT64, list(idx_shape)))
    onnx.checker.check_model(m, full_check=True)
    return m, idx_name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    k, stride, pad = 3, 2, 1
    rng = np.random.default_rng(0)
    model, yshape = maxpool_model(args.batch, args.channels, args.size, k, stride, pad, indices=False)
    fwd_model, _ = maxpool_model(args.batch, args.channels, args.size, k, stride, pad, indices=True)
    gm = onnxbp.gradient(model, ["X"])
    x = rng.standard_normal((args.batch, args.channels, args.size, args.size)).astype(np.float32)
    dy = rng.standard_normal(yshape).astype(np.float32)
    gsess, fsess = session(gm, args.threads), session(fwd_model, args.threads)
    psess = session(model, args.threads)
    bwd_model, idx_name = backward_only(gm, yshape)
    bsess = session(bwd_model, args.threads)
    idx = fsess.run(["I"], {"X": x})[0]
    bfeeds = {"X": x, "Y_grad": dy, idx_name: idx}
    bfeeds = {kk: v for kk, v in bfeeds.items() if kk in {i.name for i in bsess.get_inputs()}}

    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    y_kept = F.max_pool2d(xt, k, stride, pad)

    def ort_fwd_bwd():
        return gsess.run(["X_grad"], {"X": x, "Y_grad": dy})[0]

    def ort_fwd():
        return fsess.run(None, {"X": x})

    def ort_bwd_only():
        return bsess.run(["X_grad"], bfeeds)[0]

    def ort_fwd_plain():
        return psess.run(None, {"X": x})

    def torch_fwd_bwd():
        xt.grad = None
        F.max_pool2d(xt, k, stride, pad).backward(dyt)
        return xt.grad

    def torch_bwd():
        xt.grad = None
        y_kept.backward(dyt, retain_graph=True)
        return xt.grad

    variants = {"ort fwd+bwd": ort_fwd_bwd, "ort fwd": ort_fwd, "ort bwd only": ort_bwd_only,
                "ort fwd (no Indices)": ort_fwd_plain, "torch fwd+bwd": torch_fwd_bwd,
                "torch bwd": torch_bwd}
    # warm-up, and the two gradients must agree (tie-free random input)
    ours, ref = ort_fwd_bwd(), torch_bwd().numpy()
    err = max(float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ort_bwd_only() - ref))))
    assert err <= 1e-5 * float(np.max(np.abs(ref))), f"onnxbp and torch gradients differ by {err}"
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"X {tuple(x.shape)}, kernel {k} stride {stride} pads {pad}, {args.repeats} interleaved repeats; "
          f"max |onnxbp - torch| = {err:.1e}", file=sys.stderr)
    print("| variant | median ms | min-max ms |")
    print("|---|---|---|")
    for name, v in times.items():
        print(f"| {name} | {med[name]:.1f} | {min(v):.1f}-{max(v):.1f} |")
    diff = med["ort fwd+bwd"] - med["ort fwd"]
    print(f"| ort fwd+bwd - ort fwd (difference of medians) | {diff:.1f} | |")
    print()
    print(f"ratio ort/torch fwd+bwd: {med['ort fwd+bwd'] / med['torch fwd+bwd']:.2f}; "
          f"bwd only: {med['ort bwd only'] / med['torch bwd']:.2f} "
          f"(difference of medians: {diff / med['torch bwd']:.2f})")


if __name__ == "__main__":
    main()
