"""Second order (issue 14): nested gradient(), Hessian-vector products and gradient penalties.

References: ``torch.autograd.grad(create_graph=True)`` in float64 on the same
weights (MLP and LeNet re-implemented from the ONNX initializers; a ResNet
basic block with eval-mode BatchNorm and a pre-norm transformer block
(LayerNorm, MatMul attention, Softmax, GELU) exported from torch; the zoo's
ConvNeXt (depthwise 7x7 conv, LayerNorm and a written-out channels-first
LayerNorm, Erf GELU, layer scale, stride-2 patchify convs), ViT (patch conv,
class token Expand/Concat, multi-head attention with a Where mask, Softmax,
Gather) and MobileNetV3 (depthwise convs, BatchNorm, HardSwish, squeeze-
excitation with HardSigmoid, GlobalAveragePool) under the loss
``sum(logits^2)``), and float64 central differences of the first-order
gradient model (``check_second_order``, ``check_gradients``).  Each case runs
with the symbolic batch ``N`` and with a static batch.  onnxbp's models run in
float32 in onnxruntime, so the tolerance is normwise: ``max|ours - ref| /
max|ref| <= 1e-4`` against torch (``gradutil.assert_close``), ``rtol 1e-3``
(the checker's per-element test) against finite differences.

torch has no double backward for ``hardsigmoid`` ("derivative for
aten::hardsigmoid_backward is not implemented"): MobileNetV3's torch twin
computes HardSigmoid as ``relu6(x + 3) / 6``, the same function (ONNX's
HardSigmoid with alpha 1/6), on the same weights; the float64 finite
differences of the first-order model check it independently of torch.
"""

from __future__ import annotations

import io
import os
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from gradutil import assert_close, assert_standard, session  # noqa: E402

import onnxbp  # noqa: E402
from onnxbp import metadata  # noqa: E402
from models.zoo.export import param_map  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")
BATCH = 2
RTOL_TORCH = 1e-4
F = torch.nn.functional


def _close(ours, ref, rtol, what):
    """Normwise: max|ours - ref| <= 1e-8 + rtol * max|ref| (the 1e-8 for blocks that are exactly zero)."""
    return assert_close(ours, ref, rtol, 1e-8, what)


# ------------------------------------------------------------------ models and torch twins
def _static(model: onnx.ModelProto, batch: int = BATCH) -> onnx.ModelProto:
    """``model`` with every symbolic input/output dim fixed to ``batch`` (intermediate infos dropped)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_value = batch
    del m.graph.value_info[:]
    return m


def _with_square_loss(path: str) -> onnx.ModelProto:
    """The bundled model plus ``sq = logits * logits`` (the loss ``sum(logits^2)``, summed by the seed)."""
    m = onnx.load(path)
    m.graph.node.append(helper.make_node("Mul", ["logits", "logits"], ["sq"], name="square_loss"))
    m.graph.output.append(helper.make_tensor_value_info("sq", TensorProto.FLOAT, ["N", 10]))
    return m


def _mlp_torch(p, x):
    h = F.relu(F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    return F.linear(h, p["fc2.weight"], p["fc2.bias"])


def _lenet_torch(p, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], padding=1)), 2)
    h = F.relu(F.linear(h.flatten(1), p["fc1.weight"], p["fc1.bias"]))
    return F.linear(h, p["fc2.weight"], p["fc2.bias"])


class _BasicBlock(torch.nn.Module):
    """ResNet basic block with a projection shortcut; eval-mode BatchNorm with warmed-up statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = torch.nn.Conv2d(3, 4, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(4)
        self.c2, self.b2 = torch.nn.Conv2d(4, 4, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(4)
        self.sc, self.bs = torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)
        for bn in (self.b1, self.b2, self.bs):
            with torch.no_grad():
                bn.weight.copy_(1 + 0.2 * torch.randn(4))
                bn.bias.copy_(0.1 * torch.randn(4))
                bn.running_mean.copy_(0.1 * torch.randn(4))
                bn.running_var.copy_(1 + 0.3 * torch.rand(4))
        self.eval()

    def forward(self, x):
        y = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.bs(self.sc(x)))
        out = self.fc(y.mean(dim=(2, 3)))
        return (out * out).sum()


class _TransformerBlock(torch.nn.Module):
    """Pre-norm block: LayerNorm, single-head attention (MatMul, Softmax), GELU MLP."""

    def __init__(self, dim=8, tokens=5):
        super().__init__()
        torch.manual_seed(1)
        self.n1, self.n2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.copy_(1 + 0.2 * torch.randn(dim))
                n.bias.copy_(0.1 * torch.randn(dim))
        self.dim, self.tokens = dim, tokens
        self.eval()

    def forward(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.dim ** -0.5, dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return (x * x).mean()


class _SquareLoss(torch.nn.Module):
    """A zoo network under the loss ``sum(logits^2)`` (a scalar: export output ``loss``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return (y * y).sum()


class _HardSigmoid6(torch.nn.Module):
    """``relu6(x + 3) / 6``: torch's Hardsigmoid with a double backward (its own has none)."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def _twice_differentiable(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (same weights) whose Hardsigmoids are :class:`_HardSigmoid6`."""
    import copy

    twin = copy.deepcopy(module)
    for sub in list(twin.modules()):
        for name, child in list(sub.named_children()):
            if isinstance(child, torch.nn.Hardsigmoid):
                setattr(sub, name, _HardSigmoid6())
    return twin


def _export(module: torch.nn.Module, shape, dynamic: bool) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["loss"],
                          dynamic_axes={"input": {0: "N"}} if dynamic else None,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


class _Case:
    """A loss model, its torch twin ``loss(params, x)`` and how ONNX initializers map to its params."""

    def __init__(self, name, model, loss_fn, names, input_name, x_shape, loss=None):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.names = names  # {onnx initializer: (torch key, transposed)}
        self.input_name, self.x_shape, self.loss = input_name, x_shape, loss


def _bundled(kind: str, dynamic: bool) -> _Case:
    path = os.path.join(MODELS, f"{kind}.onnx")
    m = _with_square_loss(path)
    if not dynamic:
        m = _static(m)
    net = _mlp_torch if kind == "mlp" else _lenet_torch
    names = {t.name: (t.name, False) for t in m.graph.initializer}
    shape = (BATCH, 64) if kind == "mlp" else (BATCH, 1, 8, 8)
    return _Case(kind, m, lambda p, x: (net(p, x) ** 2).sum(), names, "x", shape, loss="sq")


def _exported(kind: str, dynamic: bool) -> _Case:
    module, shape = (_BasicBlock(), (BATCH, 3, 6, 6)) if kind == "resnet_basic" else (_TransformerBlock(), (BATCH, 5, 8))
    m = _export(module, shape, dynamic)
    names = param_map(m, module)
    module.double()  # the reference runs in float64 on the exported float32 values
    buffers = dict(module.named_buffers())

    def loss_fn(p, x):
        return torch.func.functional_call(module, {**buffers, **p}, (x,))

    return _Case(kind, m, loss_fn, names, "input", shape)


#: zoo families (models.zoo) checked under sum(logits^2), batch 2
ZOO = ("convnext", "vit", "mobilenet_v3")


def _zoo(kind: str, dynamic: bool) -> _Case:
    from models.zoo import build

    net, shape = build(kind)
    module = _SquareLoss(net).eval()
    shape = (BATCH,) + tuple(shape[1:])
    m = _export(module, shape, dynamic)
    names = param_map(m, module)
    assert {t for t, _ in names.values()} == {k for k, _ in module.named_parameters()}, kind
    twin = _twice_differentiable(module).double()  # float64 reference on the exported float32 values
    buffers = dict(twin.named_buffers())

    def loss_fn(p, x):
        return torch.func.functional_call(twin, {**buffers, **p}, (x,))

    return _Case(kind, m, loss_fn, names, "input", shape)


def make_case(kind: str, dynamic: bool) -> _Case:
    if kind in ZOO:
        return _zoo(kind, dynamic)
    return _bundled(kind, dynamic) if kind in ("mlp", "lenet") else _exported(kind, dynamic)


KINDS = ["mlp", "lenet", "resnet_basic", "transformer", *ZOO]
CASES = [(k, d) for k in KINDS for d in (True, False)]
IDS = [f"{k}-{'symbolic' if d else 'static'}" for k, d in CASES]


def _torch_params(case: _Case, rng):
    """float64 torch leaves for every mapped initializer, and the ONNX values."""
    inits = {t.name: numpy_helper.to_array(t) for t in case.model.graph.initializer}
    onnx_vals, leaves = {}, {}
    for oname, (tname, transposed) in case.names.items():
        val = inits[oname]
        onnx_vals[oname] = val
        t = torch.tensor(val.T if transposed else val, dtype=torch.float64, requires_grad=True)
        leaves[tname] = t
    return onnx_vals, leaves


def _to_onnx(arr, transposed):
    arr = arr.detach().numpy() if hasattr(arr, "detach") else np.asarray(arr)
    return arr.T if transposed else arr


# ------------------------------------------------------------------------------- HVP vs torch
@pytest.mark.parametrize("kind,dynamic", CASES, ids=IDS)
def test_hvp_matches_torch(kind, dynamic):
    """H v of the loss w.r.t. every mapped parameter against torch's double backward (float64),
    normwise rtol 1e-4; the first-order gradients (gradients=True) too."""
    case = make_case(kind, dynamic)
    rng = np.random.default_rng(14)
    wrt = list(case.names)
    h = onnxbp.hvp(case.model, wrt, case.loss, gradients=True)
    onnx.checker.check_model(h, full_check=True)
    assert_standard(h)
    spec = metadata.second_order(h)
    assert spec["kind"] == "hvp" and spec["params"] == wrt
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    onnx_vals, leaves = _torch_params(case, rng)
    v = {p: rng.standard_normal(onnx_vals[p].shape).astype(np.float32) for p in wrt}
    feeds = {case.input_name: x, **{spec["vectors"][p]: v[p] for p in wrt}}
    names = [spec["outputs"][p] for p in wrt] + [spec["gradients"][p] for p in wrt]
    outs = dict(zip(names, session(h).run(names, feeds)))

    loss = case.loss_fn(leaves, torch.tensor(x, dtype=torch.float64))
    tkeys = [case.names[p][0] for p in wrt]
    grads = torch.autograd.grad(loss, [leaves[k] for k in tkeys], create_graph=True)
    tv = [torch.tensor(_to_onnx(v[p], case.names[p][1]), dtype=torch.float64) for p in wrt]
    hv = torch.autograd.grad(grads, [leaves[k] for k in tkeys], grad_outputs=tv, allow_unused=True,
                             materialize_grads=True)
    for p, g_ref, hv_ref in zip(wrt, grads, hv):
        tr = case.names[p][1]
        _close(outs[spec["gradients"][p]], _to_onnx(g_ref, tr), RTOL_TORCH, f"{kind} grad {p}")
        _close(outs[spec["outputs"][p]], _to_onnx(hv_ref, tr), RTOL_TORCH, f"{kind} Hv {p}")


@pytest.mark.parametrize("kind,dynamic", [("mlp", True), ("lenet", True), ("lenet", False),
                                          ("resnet_basic", True), ("transformer", True),
                                          ("vit", False), ("mobilenet_v3", True),
                                          pytest.param("convnext", True, marks=pytest.mark.slow),
                                          pytest.param("convnext", False, marks=pytest.mark.slow),
                                          pytest.param("vit", True, marks=pytest.mark.slow),
                                          pytest.param("mobilenet_v3", False, marks=pytest.mark.slow)])
def test_hvp_against_finite_differences(kind, dynamic):
    """check_second_order: H v against float64 central differences of the gradient along v, every
    element, rtol 1e-3 (ConvNeXt's first-order model has ConvTranspose, run in float64 by the
    checker's rewrite; MobileNetV3's HardSigmoid is checked here independently of torch)."""
    case = make_case(kind, dynamic)
    report = onnxbp.check_second_order(case.model, "hvp", list(case.names), loss=case.loss)
    assert report.precision == "float64"
    assert report.passed, report.table()
    assert len(report.results) == len(case.names)


# ------------------------------------------------------------------- gradient penalty vs torch
@pytest.mark.parametrize("kind,dynamic", CASES, ids=IDS)
def test_gradient_penalty_matches_torch(kind, dynamic):
    """||dL/dx||^2 and its gradient w.r.t. every mapped parameter against torch (float64),
    normwise rtol 1e-4."""
    case = make_case(kind, dynamic)
    rng = np.random.default_rng(15)
    wrt = list(case.names)
    pm = onnxbp.gradient_penalty(case.model, case.input_name, wrt, loss=case.loss)
    onnx.checker.check_model(pm, full_check=True)
    spec = metadata.second_order(pm)
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    names = [spec["output"]] + [spec["gradients"][p] for p in wrt]
    outs = dict(zip(names, session(pm).run(names, {case.input_name: x})))

    _, leaves = _torch_params(case, rng)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(case.loss_fn(leaves, xt), [xt], create_graph=True)
    pen = (gx * gx).sum()
    tkeys = [case.names[p][0] for p in wrt]
    dpen = torch.autograd.grad(pen, [leaves[k] for k in tkeys], allow_unused=True, materialize_grads=True)
    _close(np.asarray(outs[spec["output"]]), pen.detach().numpy(), RTOL_TORCH, f"{kind} penalty")
    for p, ref in zip(wrt, dpen):
        _close(outs[spec["gradients"][p]], _to_onnx(ref, case.names[p][1]), RTOL_TORCH,
                     f"{kind} d penalty / d {p}")


def test_wgan_gp_centered_penalty_matches_torch():
    """center=1: mean_i (||dL/dx_i||_2 - 1)^2 over the batch with a per-sample critic (the MLP's summed
    logits), and its parameter gradients, against torch; rtol 1e-4."""
    m = onnx.load(os.path.join(MODELS, "mlp.onnx"))
    pm = onnxbp.gradient_penalty(m, center=1.0)
    spec = metadata.second_order(pm)
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    params = list(spec["gradients"])
    names = [spec["output"]] + [spec["gradients"][p] for p in params]
    outs = dict(zip(names, session(pm).run(names, {"x": x})))
    leaves = {t.name: torch.tensor(numpy_helper.to_array(t), dtype=torch.float64, requires_grad=True)
              for t in m.graph.initializer}
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(_mlp_torch(leaves, xt).sum(), [xt], create_graph=True)
    pen = ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    dpen = torch.autograd.grad(pen, [leaves[p] for p in params], allow_unused=True, materialize_grads=True)
    _close(np.asarray(outs[spec["output"]]), pen.detach().numpy(), RTOL_TORCH, "wgan-gp penalty")
    for p, ref in zip(params, dpen):
        _close(outs[spec["gradients"][p]], ref.detach().numpy(), RTOL_TORCH, f"wgan-gp d/d {p}")


def test_gradient_penalty_is_a_training_loss():
    """The penalty model (gradients=False) is a loss like any other: one SGD step of the training-step
    builder (loss='output') moves each parameter by -lr * d penalty / d p, the values onnxbp's own
    gradient of the penalty gives (rtol 1e-5)."""
    from onnxbp.training import SGD, build_step_model

    m = onnx.load(os.path.join(MODELS, "mlp.onnx"))
    pm = onnxbp.gradient_penalty(m, gradients=False, keep_outputs=False)
    ref = onnxbp.gradient_penalty(m)
    step = build_step_model(pm, loss="output", output="gradient_penalty", optimizer=SGD(momentum=0.0))
    rng = np.random.default_rng(17)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    spec = metadata.second_order(ref)
    grads = dict(zip(spec["gradients"], session(ref).run(list(spec["gradients"].values()), {"x": x})))
    lr = 0.1
    sess = session(step.model)
    feeds = dict(step.initial)
    feeds[step.spec.data_inputs[0]] = x
    feeds[step.spec.lr] = np.asarray(lr, np.float32)
    if step.spec.step:
        feeds[step.spec.step] = np.asarray(1, np.int64)
    feeds = {k: val for k, val in feeds.items() if k in {i.name for i in step.model.graph.input}}
    outs = dict(zip([o.name for o in step.model.graph.output], sess.run(None, feeds)))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for p, g in grads.items():
        new = outs[step.spec.updates[p]] if p in step.spec.updates else None
        assert new is not None, f"the step does not update {p}"
        np.testing.assert_allclose(new, inits[p] - lr * g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- nested gradient()
@pytest.mark.parametrize("path", ["mlp.onnx", "lenet.onnx"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["symbolic", "static"])
def test_nested_gradient_default_names(path, dynamic):
    """gradient(gradient(m)) with default options: inputs <Y>_grad2, outputs <p>_grad2 next to the
    first-order <p>_grad, order 2 in the metadata; float64 FD of the first-order model, rtol 1e-3."""
    m = onnx.load(os.path.join(MODELS, path))
    if not dynamic:
        m = _static(m)
    g1 = onnxbp.gradient(m)
    g2 = onnxbp.gradient(g1)
    params = [t.name for t in m.graph.initializer]
    outs = [o.name for o in g2.graph.output]
    assert outs[: len(g1.graph.output)] == [o.name for o in g1.graph.output]
    assert outs[len(g1.graph.output):] == [p + "_grad2" for p in params]
    ins = {i.name for i in g2.graph.input}
    assert {"logits_grad", "logits_grad2"} <= ins
    assert {p + "_grad_grad2" for p in params} <= ins  # the seeds of the first-order outputs
    assert metadata.gradient_order(g2) == 2
    assert metadata.gradient_names(g2) == {p: p + "_grad2" for p in params}
    del g2.metadata_props[:]  # a rewriting tool dropped the metadata: the contract's names still tell
    assert metadata.gradient_order(g2) == 2
    assert metadata.gradient_names(g2) == {p: p + "_grad2" for p in params}
    report = onnxbp.check_gradients(g1, grad_model=onnxbp.gradient(g1))
    assert report.precision == "float64"
    assert report.passed, report.table()
    g3 = onnxbp.gradient(onnxbp.gradient(g1))  # the order keeps counting, names never collide
    assert metadata.gradient_order(g3) == 3
    assert set(metadata.gradient_names(g3).values()) == {p + "_grad3" for p in params}


@pytest.mark.parametrize("kind,dynamic", [
    ("vit", True),
    pytest.param("vit", False, marks=pytest.mark.slow),
    pytest.param("convnext", True, marks=pytest.mark.slow),   # ~40 s on 2 cores
    pytest.param("mobilenet_v3", True, marks=pytest.mark.slow),  # ~70 s: 81 tensors, BN statistics too
], ids=lambda v: v if isinstance(v, str) else ("symbolic" if v else "static"))
def test_nested_gradient_of_zoo_network(kind, dynamic):
    """gradient(gradient(m)) of a zoo network (logits, every float initializer of the first-order
    model, BatchNorm statistics included): float64 central differences of the first-order model
    (ConvTranspose and the rest rewritten for float64 by the checker), every element, rtol 1e-3."""
    from models.zoo import build
    from models.zoo.export import export

    net, shape = build(kind)
    m = export(net, shape, "torchscript", 17)
    if not dynamic:
        m = _static(m)
    g1 = onnxbp.gradient(m)
    g2 = onnxbp.gradient(g1)
    assert metadata.gradient_order(g2) == 2
    assert_standard(g2)
    report = onnxbp.check_gradients(g1, grad_model=g2, batch_size=BATCH)
    assert report.precision == "float64"
    assert report.passed, report.table()


def _strided_convs(dynamic: bool) -> onnx.ModelProto:
    """A group-1 and a depthwise conv, 3x3 stride 2 pads 1 (on 8x8 and 4x4: the weight gradient's
    swapped Conv would give 4 > 3 positions, the crop case), squared between and after: the loss
    ``sum(y^2)``."""
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", strides=[2, 2], pads=[1] * 4),
             helper.make_node("Mul", ["a", "a"], ["a2"], name="sq1"),
             helper.make_node("Conv", ["a2", "dw"], ["y"], name="dw", group=4, strides=[2, 2], pads=[1] * 4),
             helper.make_node("Mul", ["y", "y"], ["loss"], name="sq2")]
    batch = "N" if dynamic else BATCH
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [batch, 4, 2, 2])],
        [numpy_helper.from_array(0.5 * rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "dw")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _pad_fed_kernels(model: onnx.ModelProto) -> list:
    """Convs whose kernel is a Pad's output, directly or through Transposes (which onnxruntime's
    transpose optimizer cancels in pairs): the pattern its Pad_Fusion mis-rewrites."""
    prod = {o: n for n in model.graph.node for o in n.output}
    bad = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        t = n.input[1]
        while t in prod and prod[t].op_type == "Transpose":
            t = prod[t].input[0]
        if t in prod and prod[t].op_type == "Pad":
            bad.append(n.name)
    return bad


@pytest.mark.parametrize("dynamic", [True, False], ids=["symbolic", "static"])
@pytest.mark.parametrize("strategy", ["auto", "transpose", "seed"])
def test_hvp_of_strided_and_depthwise_convs(dynamic, strategy):
    """Two regressions of the zoo's MobileNetV3 / ConvNeXt HVPs.  (1) A depthwise conv's weight
    gradient is a Conv with group C whose kernel's channel axis is the batch: with a symbolic batch
    its own gradient needs no static channel count.  (2) The crop of a strided conv's weight gradient
    is on X, not on the result: a Slice of the result made the second derivative a Pad feeding a
    Conv's kernel (through a Transpose pair), which onnxruntime 1.32's Pad_Fusion folds into the
    Conv's pads while rewiring the data input (MobileNetV3's HVP session failed to load).  Float64
    central differences of the first-order model, rtol 1e-3."""
    m = _strided_convs(dynamic)
    h = onnxbp.hvp(m, ["w", "dw"], conv_strategy=strategy)
    assert_standard(h)
    assert not _pad_fed_kernels(h)
    session(h)
    report = onnxbp.check_second_order(m, "hvp", ["w", "dw"], conv_strategy=strategy)
    assert report.precision == "float64"
    assert report.passed, report.table()


def _with_unused_param():
    """y = x @ W, plus an initializer c that reaches only an integer output (Shape)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Mul", ["y", "y"], ["y2"], name="sq"),
             helper.make_node("Shape", ["c"], ["cs"], name="shape_of_c")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("cs", TensorProto.INT64, [1])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2) / 5, "W"),
         numpy_helper.from_array(np.ones(4, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_structurally_zero_second_derivative_is_a_stated_zero(caplog):
    """A wrt name no gradient reaches: first order keeps refusing (a likely mistake); in a nested call
    (or with zero_unreachable=True) it is a zero output, logged and listed in the metadata."""
    m = _with_unused_param()
    with pytest.raises(onnxbp.NotDifferentiableError, match="no gradient of 'c' reaches the outputs"):
        onnxbp.gradient(m, ["W", "c"])
    g1 = onnxbp.gradient(m, ["W"])
    with caplog.at_level("INFO", logger="onnxbp.engine"):
        g2 = onnxbp.gradient(g1, ["W", "c"])
    assert "the gradient of 'c' is structurally zero" in caplog.text
    assert metadata.zero_gradients(g2) == ["c"]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32),
             "y2_grad": rng.standard_normal((2, 2)).astype(np.float32),
             "y2_grad2": rng.standard_normal((2, 2)).astype(np.float32),
             "W_grad_grad2": rng.standard_normal((3, 2)).astype(np.float32)}
    (cz,) = session(g2).run(["c_grad2"], feeds)
    assert cz.shape == (4,) and cz.dtype == np.float32 and not cz.any()
    first = onnxbp.gradient(m, ["W", "c"], zero_unreachable=True)
    assert metadata.zero_gradients(first) == ["c"]
    report = onnxbp.check_gradients(g1, ["W", "c"], grad_model=g2)
    assert report.passed, report.table()


def test_hvp_structurally_zero_block_is_zero_and_stated():
    """The MLP with its logits summed (a linear loss): the gradient of the last bias is constant, so
    its row of H is zero: a zero output listed in the metadata; torch agrees (rtol 1e-4)."""
    m = onnx.load(os.path.join(MODELS, "mlp.onnx"))
    h = onnxbp.hvp(m)
    spec = metadata.second_order(h)
    assert spec["zeros"] == ["fc2.bias"]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    v = {p: rng.standard_normal(inits[p].shape).astype(np.float32) for p in spec["params"]}
    outs = session(h).run([spec["outputs"][p] for p in spec["params"]],
                          {"x": x, **{spec["vectors"][p]: v[p] for p in spec["params"]}})
    leaves = {p: torch.tensor(inits[p], dtype=torch.float64, requires_grad=True) for p in spec["params"]}
    loss = _mlp_torch(leaves, torch.tensor(x, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    # torch: the last bias's gradient does not require grad (it is constant); <grad, v> without it
    s = sum((g * torch.tensor(v[p], dtype=torch.float64)).sum() for p, g in zip(leaves, grads) if g.requires_grad)
    hv = torch.autograd.grad(s, list(leaves.values()), allow_unused=True, materialize_grads=True)
    for p, ours, ref in zip(spec["params"], outs, hv):
        if p == "fc2.bias":
            assert not ours.any()
        _close(ours, ref.detach().numpy(), RTOL_TORCH, f"Hv {p}")


def test_second_order_refusals():
    """One-line typed errors: an ambiguous loss, an x that is not a data input, a taken name."""
    m = _with_square_loss(os.path.join(MODELS, "mlp.onnx"))
    with pytest.raises(onnxbp.WrtError, match=r"the model has 2 floating-point outputs \(logits, sq\); "
                                              r"name the tensor to differentiate with loss=\.\.\."):
        onnxbp.hvp(m)
    with pytest.raises(onnxbp.WrtError, match="x name 'fc1.weight' is not a graph input"):
        onnxbp.gradient_penalty(m, "fc1.weight", loss="sq")
    with pytest.raises(onnxbp.WrtError, match="seed tensor 'nope' is not a tensor of the graph"):
        onnxbp.hvp(m, loss="nope")
    with pytest.raises(onnxbp.NameCollisionError, match="named 'sq', the name of the gradient penalty output"):
        onnxbp.gradient_penalty(m, loss="sq", output="sq")
    with pytest.raises(onnxbp.OptionError, match="second-order check 'hessian' is unknown"):
        onnxbp.check_second_order(m, "hessian")


# ------------------------------------------------------------------------------------ the CLI
def test_cli_check_second_order(capsys):
    """`onnxbp check --second-order hvp|gradient-penalty` checks and exits 0; a bad loss exits 2 with
    the one-line error."""
    from cli.main import main

    lenet = os.path.join(MODELS, "lenet.onnx")
    assert main(["check", lenet, "--second-order", "hvp"]) == 0
    out = capsys.readouterr().out
    assert "hvp, 8 parameters, float64 finite differences" in out
    assert "fc2.bias" in out and "structurally zero" in out and "passed: all 8 gradients" in out
    assert main(["check", lenet, "--second-order", "gradient-penalty", "--x", "x"]) == 0
    assert "gradient-penalty, 4 parameters" in capsys.readouterr().out
    assert main(["check", lenet, "--second-order", "hvp", "--loss", "nope"]) == 2
    assert "onnxbp: error: seed tensor 'nope' is not a tensor of the graph" in capsys.readouterr().err


def test_cli_grad_of_a_gradient_model(tmp_path, capsys):
    """`onnxbp grad` on its own output writes the order-2 model with the _grad2 names."""
    from cli.main import main

    g1, g2 = tmp_path / "g1.onnx", tmp_path / "g2.onnx"
    assert main(["grad", os.path.join(MODELS, "mlp.onnx"), "-o", str(g1)]) == 0
    assert main(["grad", str(g1), "-o", str(g2)]) == 0
    assert "fc1.weight_grad2" in capsys.readouterr().out
    m = onnx.load(str(g2))
    assert metadata.gradient_order(m) == 2
    assert [o.name for o in m.graph.output][-1] == "fc2.bias_grad2"
