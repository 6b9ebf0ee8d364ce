"""Build a large MLP (square MatMul layers) to measure onnxbp on models with big weights (issue 13).

    python benchmarks/big_model.py OUT.onnx --gib 2.5 [--external]

Each layer is a ``D x D`` float32 weight (``--dim``, default 8192: 256 MiB), followed by Relu; the
number of layers gives about ``--gib`` GiB of weights.  ``--external`` writes the weights to
``OUT.onnx.data`` tensor by tensor (the build never holds them all); without it the model is one
protobuf file (below 2 GB only).  Nothing it writes is committed.  Measure a gradient build with

    /usr/bin/time -v onnxbp grad OUT.onnx -o OUT_grad.onnx     # "Maximum resident set size"
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
    args = p.parse_args()
    build(args.out, args.gib, args.dim, args.external)


if __name__ == "__main__":
    main()
