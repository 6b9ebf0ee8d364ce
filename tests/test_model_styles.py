"""Model styles (onnxbp issue 5): old model-zoo conventions and old opsets.

* IR 3 / opset 7 models list every initializer as a graph input too (required
  before IR 4).  Such a name is both: onnxbp's default ``wrt`` (every float
  initializer) picks it, and when the caller feeds the input the fed value
  overrides the initializer -- the gradient model then computes the gradient
  at the fed value.
* Weights produced by ``Constant`` nodes (some old converters) are not
  initializers, so ``wrt=None`` does not see them.  Decision: onnxbp does not
  differentiate w.r.t. Constant outputs; naming one in ``wrt`` raises
  ``WrtError`` ("... is not an initializer or graph input (it is an
  intermediate tensor ...)").  Turning the Constants into initializers first
  (:func:`constants_to_initializers` below, four lines of onnx) makes them
  parameters.
* Hand-built small CNN/MLP models at opsets 7, 9 and 11 (Softmax/LogSoftmax
  before 13, BatchNormalization-7 with ``spatial``, Clip with min/max inputs,
  Split/Squeeze/Unsqueeze/ReduceMean with axes attributes, Dropout-7),
  symbolic batch ``N``; ``onnxbp.check_gradients`` must pass (float64 finite
  differences at rtol 1e-3, float64 forward (ops without a float64 kernel
  are rewritten for the check); the Conv models are also compared with torch
  autograd at rtol 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from gradutil import assert_close, assert_fd, run_gradient, session
from onnx import TensorProto, helper, numpy_helper

import onnxbp

F = TensorProto.FLOAT


def _init(rng, name, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    scale = scale if scale is not None else np.sqrt(2.0 / fan_in)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inits, x_shape, y_shape, opset, ir, inits_as_inputs):
    inputs = [helper.make_tensor_value_info("x", F, x_shape)]
    if inits_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "style", inputs, [helper.make_tensor_value_info("y", F, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn_v7(ir=3, inits_as_inputs=True, seed=0):
    """Model-zoo era LeNet: Conv-Relu-MaxPool-Conv-BN(spatial=1)-Relu-Flatten-Gemm-Softmax, opset 7."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "W1", (4, 1, 3, 3)), _init(rng, "B1", (4,), 0.1),
             _init(rng, "W2", (6, 4, 3, 3)),
             numpy_helper.from_array((1 + 0.2 * rng.standard_normal(6)).astype(np.float32), "bn_scale"),
             _init(rng, "bn_bias", (6,), 0.1), _init(rng, "bn_mean", (6,), 0.2),
             numpy_helper.from_array((0.5 + rng.random(6)).astype(np.float32), "bn_var"),
             _init(rng, "W3", (10, 6 * 4 * 4)), _init(rng, "B3", (10,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b2"],
                         epsilon=1e-5, spatial=1),
        helper.make_node("Relu", ["b2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    return _model(nodes, inits, ["N", 1, 8, 8], ["N", 10], 7, ir, inits_as_inputs)


def mlp_v9(ir=4, inits_as_inputs=True, seed=0):
    """MatMul+Add, Sigmoid, Dropout-7 (inference), Gemm, Tanh, LogSoftmax(axis=1); opset 9."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "W1", (12, 16)), _init(rng, "B1", (16,), 0.1),
             _init(rng, "W2", (16, 8)), _init(rng, "B2", (8,), 0.1)]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m"]),
        helper.make_node("Add", ["m", "B1"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["s"]),
        helper.make_node("Dropout", ["s"], ["d"], ratio=0.3),
        helper.make_node("Gemm", ["d", "W2", "B2"], ["g"]),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("LogSoftmax", ["t"], ["y"], axis=1),
    ]
    return _model(nodes, inits, ["N", 12], ["N", 8], 9, ir, inits_as_inputs)


def cnn_v11(seed=0):
    """Opset 11: Conv, Clip(min, max inputs) as ReLU6, Split(split attr) into two branches,
    AveragePool / GlobalAveragePool, Concat, Squeeze/Unsqueeze/ReduceMean with axes attributes,
    Softmax-11 on a 2-D tensor."""
    rng = np.random.default_rng(seed)
    inits = [_init(rng, "W1", (6, 2, 3, 3)), _init(rng, "B1", (6,), 0.1),
             _init(rng, "W2", (4, 2, 3, 3)), _init(rng, "Wfc", (8, 5)),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("Split", ["r1"], ["s1", "s2"], axis=1, split=[2, 4]),
        helper.make_node("Conv", ["s1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["s2"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Concat", ["c2", "ap"], ["cat"], axis=1),                       # N,8,6,6
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),                          # N,8,1,1
        helper.make_node("Squeeze", ["gap"], ["sq"], axes=[2, 3]),                         # N,8
        helper.make_node("MatMul", ["sq", "Wfc"], ["fc"]),                                 # N,5
        helper.make_node("ReduceMean", ["cat"], ["rm"], axes=[1, 2, 3], keepdims=0),       # N
        helper.make_node("Unsqueeze", ["rm"], ["rmu"], axes=[1]),                          # N,1
        helper.make_node("Add", ["fc", "rmu"], ["z"]),
        helper.make_node("Softmax", ["z"], ["y"], axis=1),
    ]
    return _model(nodes, inits, ["N", 2, 6, 6], ["N", 5], 11, 6, False)


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move float ``Constant`` nodes' values into initializers (so they can be parameters)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = []
    for node in m.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value" \
                and node.attribute[0].t.data_type == F:
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def mlp_constant_weights(seed=0):
    """Old-converter style: weights are Constant nodes, not initializers (opset 9)."""
    rng = np.random.default_rng(seed)
    w1, w2 = _init(rng, "W1", (6, 5)), _init(rng, "W2", (5, 3))
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=w1),
        helper.make_node("Constant", [], ["W2"], value=w2),
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Tanh", ["h"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["y"]),
    ]
    return _model(nodes, [], ["N", 6], ["N", 3], 9, 4, False)


#: every style model checks in float64 (the checker rewrites Conv and the other ops
#: without a float64 kernel), per element, at rtol 1e-3
FD_RTOL: dict = {}

STYLE_MODELS = {
    "cnn_opset7_ir3_inits_as_inputs": lambda: cnn_v7(3, True),
    "cnn_opset7_ir4": lambda: cnn_v7(4, False),
    "mlp_opset9_inits_as_inputs": lambda: mlp_v9(4, True),
    "mlp_opset9": lambda: mlp_v9(4, False),
    "cnn_opset11": cnn_v11,
}


@pytest.mark.parametrize("name", list(STYLE_MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_style_model_passes_finite_differences(name, batch):
    model = STYLE_MODELS[name]()
    inits = {t.name for t in model.graph.initializer}
    report = assert_fd(model, None, rtol=FD_RTOL.get(name, 1e-3), batch_size=batch, seed=batch)
    assert report.precision == "float64"
    assert {r.name for r in report.results} == {n for n in inits if n not in ("lo", "hi", "bn_mean", "bn_var")}


@pytest.mark.parametrize("name", list(STYLE_MODELS))
def test_style_model_input_gradient(name):
    """The gradient w.r.t. the data input (a graph input with a symbolic batch dim) as well."""
    model = STYLE_MODELS[name]()
    params = [t.name for t in model.graph.initializer if t.name not in ("lo", "hi", "bn_mean", "bn_var")]
    assert_fd(model, params + ["x"], rtol=FD_RTOL.get(name, 1e-3), batch_size=2, seed=7)


def test_initializer_listed_as_input_can_be_overridden():
    """IR 4+: feeding an initializer that is also a graph input overrides it; the gradient
    is taken at the fed value, equal to the gradient of the model with that value baked in.
    (IR 3: onnxruntime treats such initializers as constants and rejects the feed, for the
    forward model and the gradient model alike: only ``x`` is a session input.)"""
    assert [i.name for i in session(cnn_v7(3, True)).get_inputs()] == ["x"]
    assert [i.name for i in session(onnxbp.gradient(cnn_v7(3, True))).get_inputs()] == ["x", "y_grad"]
    model = cnn_v7(4, True)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    w_new = (rng.standard_normal((4, 1, 3, 3)) * 0.5).astype(np.float32)
    up = {"y": rng.standard_normal((2, 10)).astype(np.float32)}
    _, out_a, grads_a, _ = run_gradient(model, {"x": x, "W1": w_new}, None, up)

    baked = onnx.ModelProto()
    baked.CopyFrom(model)
    for i, t in enumerate(baked.graph.initializer):
        if t.name == "W1":
            baked.graph.initializer[i].CopyFrom(numpy_helper.from_array(w_new, "W1"))
    _, out_b, grads_b, _ = run_gradient(baked, {"x": x}, None, up)
    _, out_c, _, _ = run_gradient(model, {"x": x}, None, up)
    assert_close(out_a["y"], out_b["y"], 1e-6, 1e-7, "forward with the fed W1")
    assert not np.allclose(out_a["y"], out_c["y"]), "feeding W1 did not override the initializer"
    assert set(grads_a) == set(grads_b)
    for p in grads_a:
        assert_close(grads_a[p], grads_b[p], 1e-5, 1e-7, f"d{p} at the fed W1")


def _torch_forward(name, model, x):
    """The style CNNs written in torch with the model's initializers (requires_grad)."""
    import torch
    import torch.nn.functional as tf

    w = {t.name: torch.tensor(numpy_helper.to_array(t).copy(), requires_grad=t.name not in
                              ("lo", "hi", "bn_mean", "bn_var")) for t in model.graph.initializer}
    if name.startswith("cnn_opset7"):
        h = tf.max_pool2d(torch.relu(tf.conv2d(x, w["W1"], w["B1"], padding=1)), 2)
        h = tf.batch_norm(tf.conv2d(h, w["W2"], padding=1), w["bn_mean"], w["bn_var"], w["bn_scale"],
                          w["bn_bias"], False, 0.0, 1e-5)
        y = torch.softmax(tf.linear(torch.relu(h).flatten(1), w["W3"], w["B3"]), 1)
    else:
        h = torch.clamp(tf.conv2d(x, w["W1"], w["B1"], padding=1), 0.0, 6.0)
        s1, s2 = h[:, :2], h[:, 2:]
        cat = torch.cat([tf.conv2d(s1, w["W2"], padding=1),
                         tf.avg_pool2d(s2, 3, 1, 1, count_include_pad=False)], 1)
        z = cat.mean((2, 3)) @ w["Wfc"] + cat.mean((1, 2, 3))[:, None]
        y = torch.softmax(z, 1)
    return y, w


@pytest.mark.torch
@pytest.mark.parametrize("name", ["cnn_opset7_ir3_inits_as_inputs", "cnn_opset11"])
def test_style_cnn_vs_torch(name):
    """The Conv models, where finite differences are float32, against torch autograd (rtol 1e-5)."""
    torch = pytest.importorskip("torch")
    model = STYLE_MODELS[name]()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]))
    x = x.astype(np.float32)
    params = [t.name for t in model.graph.initializer if t.name not in ("lo", "hi", "bn_mean", "bn_var")]
    _, out, grads, ups = run_gradient(model, {"x": x}, params + ["x"], seed=2)
    xt = torch.tensor(x, requires_grad=True)
    y, w = _torch_forward(name, model, xt)
    assert_close(out["y"], y.detach().numpy(), 1e-5, 1e-7, "forward")
    y.backward(torch.tensor(ups["y"]))
    assert_close(grads["x"], xt.grad.numpy(), 1e-5, 1e-8, "dx")
    for p in params:
        assert_close(grads[p], w[p].grad.numpy(), 1e-5, 1e-8, f"d{p}")


def test_constant_node_weights_are_not_parameters():
    model = mlp_constant_weights()
    with pytest.raises(onnxbp.WrtError, match="no floating-point initializer"):
        onnxbp.gradient(model)
    with pytest.raises(onnxbp.WrtError, match=r"wrt name 'W1' is not an initializer or graph input "
                                              r"\(it is an intermediate tensor"):
        onnxbp.gradient(model, ["W1"])
    # the input gradient flows through the Constant weights
    assert_fd(model, ["x"], rtol=1e-3)


def test_constant_node_weights_as_initializers():
    model = constants_to_initializers(mlp_constant_weights())
    onnx.checker.check_model(model, full_check=True)
    report = assert_fd(model, None, rtol=1e-3)
    assert {r.name for r in report.results} == {"W1", "W2"}


def test_gradient_model_keeps_opset_and_symbolic_batch():
    """The gradient of an opset-7 IR-3 model stays runnable at any batch size; the forward
    outputs of the gradient model equal the forward model's."""
    model = cnn_v7(3, True)
    gm = onnxbp.gradient(model)
    x_in = next(i for i in gm.graph.input if i.name == "x")
    assert x_in.type.tensor_type.shape.dim[0].dim_param == "N"
    fwd = session(model)
    rng = np.random.default_rng(5)
    for n in (1, 4):
        x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
        _, out, grads, _ = run_gradient(model, {"x": x}, None, seed=n)
        assert_close(out["y"], fwd.run(["y"], {"x": x})[0], 1e-6, 1e-7, f"forward at batch {n}")
        assert all(np.all(np.isfinite(g)) for g in grads.values())
