"""Build the bundled example models (never edit the .onnx files by hand).

    python models/build_models.py        # writes models/mlp.onnx and models/lenet.onnx

Both have a symbolic batch dimension ``N`` and seeded weights (He-normal).
* mlp.onnx: 64 -> 32 -> 10, Gemm + Relu + Gemm (digits-sized input).
* lenet.onnx: LeNet-style CNN for 1x8x8 images (the scikit-learn digits):
  Conv 3x3 pad 1 (8) -> Relu -> MaxPool 2 -> Conv 3x3 pad 1 (16) -> Relu
  -> MaxPool 2 -> Flatten -> Gemm 64 -> Relu -> Gemm 10.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
HERE = Path(__file__).resolve().parent


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _model(nodes, inits, x_shape, n_out, name):
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxbp-models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "fc1.weight": _he(rng, (32, 64), 64), "fc1.bias": np.zeros(32, np.float32),
        "fc2.weight": _he(rng, (10, 32), 32), "fc2.bias": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, ["N", 64], 10, "mlp")


def build_lenet(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "conv1.weight": _he(rng, (8, 1, 3, 3), 9), "conv1.bias": np.zeros(8, np.float32),
        "conv2.weight": _he(rng, (16, 8, 3, 3), 72), "conv2.bias": np.zeros(16, np.float32),
        "fc1.weight": _he(rng, (64, 64), 64), "fc1.bias": np.zeros(64, np.float32),
        "fc2.weight": _he(rng, (10, 64), 64), "fc2.bias": np.zeros(10, np.float32),
    }
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", **pool),
        helper.make_node("Flatten", ["p2"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu3"),
        helper.make_node("Gemm", ["a", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, ["N", 1, 8, 8], 10, "lenet")


def main(argv=None) -> int:
    out = Path(argv[0]) if argv else HERE
    for name, build in (("mlp", build_mlp), ("lenet", build_lenet)):
        path = out / f"{name}.onnx"
        onnx.save(build(), str(path))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
