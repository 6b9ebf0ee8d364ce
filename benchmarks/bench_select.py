"""Gradient branch selection on onnxruntime CPU: ``Where`` against ``Cast``/``Mul``.

Piecewise rules (Relu, Clip, LeakyRelu, HardSigmoid, Dropout, ...) choose per
element between gradient branches.  ``GradContext.select`` emits
``a * Cast(cond) [+ b * Cast(Not(cond))]`` instead of ``Where(cond, a, b)``;
this script times both on a ResNet-sized activation, interleaved, with
2 intra-op threads and no spinning, and checks the results are bit-identical.

    python benchmarks/bench_select.py [--shape 32 64 32 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, shape) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "dy")]
    used = {i for n in nodes for i in n.input}
    inits = [numpy_helper.from_array(np.full((), v, np.float32), k)
             for k, v in (("zero", 0.0), ("alpha", 0.01)) if k in used]
    g = helper.make_graph(nodes, "select", ins, [helper.make_tensor_value_info("dx", TensorProto.FLOAT, shape)],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def variants(shape) -> dict:
    gt = helper.make_node("Greater", ["x", "zero"], ["m"])
    cast = helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT)
    scaled = helper.make_node("Mul", ["dy", "alpha"], ["b"])
    return {
        # Relu's gradient: dy where x > 0, else 0
        "relu: Where(x>0, dy, 0)": _model([gt, helper.make_node("Where", ["m", "dy", "zero"], ["dx"])], shape),
        "relu: dy*Cast(x>0)": _model([gt, cast, helper.make_node("Mul", ["dy", "mf"], ["dx"])], shape),
        # LeakyRelu's gradient: dy where x > 0, else alpha*dy
        "leaky: Where(x>0, dy, alpha*dy)": _model([gt, scaled, helper.make_node("Where", ["m", "dy", "b"], ["dx"])],
                                                  shape),
        "leaky: dy*Cast(m) + alpha*dy*Cast(!m)": _model([
            gt, cast, scaled, helper.make_node("Mul", ["dy", "mf"], ["p"]),
            helper.make_node("Not", ["m"], ["nm"]), helper.make_node("Cast", ["nm"], ["nmf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["b", "nmf"], ["q"]), helper.make_node("Add", ["p", "q"], ["dx"])], shape),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 32, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    models = variants(args.shape)
    sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                for k, m in models.items()}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(args.shape).astype(np.float32),
             "dy": rng.standard_normal(args.shape).astype(np.float32)}
    results = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    times = {k: [] for k in sessions}
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, shape {tuple(args.shape)}, "
          f"{args.repeats} interleaved repeats")
    print("| variant | median ms | min-max ms | bit-identical to Where |")
    print("|---|---|---|---|")
    keys = list(times)
    for i, k in enumerate(keys):
        ref = results[keys[i - i % 2]]
        same = "-" if i % 2 == 0 else ("yes" if np.array_equal(results[k], ref) else "NO")
        ts = times[k]
        print(f"| {k} | {1e3 * statistics.median(ts):.2f} | {1e3 * min(ts):.2f}-{1e3 * max(ts):.2f} | {same} |")
    for i in range(0, len(keys), 2):
        a, b = keys[i], keys[i + 1]
        print(f"ratio ({b}) / ({a}): {statistics.median(times[b]) / statistics.median(times[a]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
