"""Build a large MLP (square MatMul layers) to measure onnxbp on models with big weights (issue 13).

    python benchmarks/big_model.py OUT.onnx --gib 2.5 [--external]

Each layer is a ``D x D`` float32 weight (``--dim``, default 8192: 256 MiB), followed by Relu; the
number of layers gives about ``--gib`` GiB of weights.  ``--external`` writes the weights to
``OUT.onnx.data`` tensor by tensor (the build never holds them all); without it the model is one
protobuf file (below 2 GB only).  Nothing it writes is committed.  Measure a gradient build with

    /usr/bin/time -v onnxbp grad OUT.onnx -o OUT_grad.onnx     # "Maximum resident set size"

and a Trainer (build and two SGD steps, batch 4) with

    python benchmarks/big_model.py OUT.onnx --gib 1 --external --train   # prints RSS after build / steps
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def build(out: Path, gib: float, dim: int = 8192, external: bool = False, seed: int = 0) -> Path:
    layer_bytes = dim * dim * 4
    layers = max(1, round(gib * 2**30 / layer_bytes))
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    data_path = out.with_name(out.name + ".data")
    fh = open(data_path, "wb") if external else None
    try:
        for i in range(layers):
            w = (rng.standard_normal((dim, dim), dtype=np.float32) * (1.0 / np.sqrt(dim))).astype(np.float32)
            name = f"w{i}"
            if external:
                offset = fh.tell()
                fh.write(w.tobytes())
                t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[dim, dim],
                                data_location=TensorProto.EXTERNAL)
                for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
            else:
                t = numpy_helper.from_array(w, name)
            del w
            inits.append(t)
            h = f"h{i}"
            nodes.append(helper.make_node("MatMul", [x, name], [h], name=f"matmul{i}"))
            x = f"r{i}"
            nodes.append(helper.make_node("Relu", [h], [x], name=f"relu{i}"))
    finally:
        if fh is not None:
            fh.close()
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)
    print(f"wrote {out}: {layers} layers of {dim}x{dim} float32 "
          f"({layers * layer_bytes / 2**30:.2f} GiB of weights{', external: ' + data_path.name if external else ''})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--gib", type=float, default=2.5, help="GiB of weights (default 2.5)")
    p.add_argument("--dim", type=int, default=8192, help="layer width (default 8192: 256 MiB a layer)")
    p.add_argument("--external", action="store_true", help="weights in OUT.data (required over 2 GB)")
    p.add_argument("--train", action="store_true", help="then build a Trainer on it and run two SGD steps, "
                                                        "printing the resident set size (in a fresh process)")
    args = p.parse_args()
    build(args.out, args.gib, args.dim, args.external)
    if args.train:  # in a fresh process, so the build's own memory is not counted
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import big_model; big_model.train_rss(big_model.Path({str(args.out)!r}), {args.dim})"],
                       check=True)


def _rss_gib() -> tuple:
    """(current, peak) resident set size in GiB, from /proc/self/status."""
    got = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            got[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return got["VmRSS"], got["VmHWM"]


def train_rss(path: Path, dim: int) -> None:
    import time

    from onnxbp.training import SGD, Trainer

    weights = os.path.getsize(path.with_name(path.name + ".data")) if path.with_name(path.name + ".data").exists() \
        else os.path.getsize(path)
    t = time.perf_counter()
    tr = Trainer(str(path), optimizer=SGD(momentum=0.0), threads=2)
    now, peak = _rss_gib()
    print(f"Trainer built in {time.perf_counter() - t:.1f} s: RSS {now:.2f} GiB, peak {peak:.2f} GiB "
          f"({weights / 2**30:.2f} GiB of weights)")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, dim)).astype(np.float32), np.arange(4)
    for _ in range(2):
        tr.train_step(x, y, 1e-3)
    now, peak = _rss_gib()
    print(f"after 2 steps: RSS {now:.2f} GiB, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
