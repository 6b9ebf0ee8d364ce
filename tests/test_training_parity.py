"""Training-step parity with PyTorch: same initial weights, same batches, 50 steps.

Per-step losses must agree within 1e-4 relative (float32 on both sides), for
SGD with momentum (plain, Nesterov + weight decay) and AdamW, on an MLP and
on small nets with BatchNormalization in training mode (whose running
statistics are compared too, torch semantics: unbiased running_var).

Batches are kink-free: a batch that puts some Relu input within KINK_MARGIN
of zero under the reference's current weights is redrawn (for both sides)
before either steps.  The two sides' weights differ by float32 roundoff
(~1e-7); a Relu input closer to zero than that can fall on different sides of
the kink in the two runs, after which the trajectories legitimately part
(seen: a pre-activation of 3e-7 at step 45 turned a 1e-7 agreement into 1e-3).
The same rule the checker applies to its inputs near max/relu kinks.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbp
from onnxbp.training import SGD, Adam, AdamW, Trainer

torch = pytest.importorskip("torch")

STEPS = 50
RTOL = 1e-4
KINK_MARGIN = 1e-4


def _has(op):
    return onnxbp.REGISTRY.lookup(op, "", 17) is not None


needs_bn = pytest.mark.skipif(not _has("BatchNormalization"), reason="needs BatchNormalization training-mode rule")
needs_conv = pytest.mark.skipif(not _has("Conv"), reason="needs the Conv gradient rule")


def _model(nodes, inits, x_shape, n_out):
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _lin(rng, o, i):
    return ((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
            (rng.standard_normal(o) * 0.1).astype(np.float32))


def mlp(rng, bn=False):
    d_in, h, c = 12, 16, 5
    w1, b1 = _lin(rng, h, d_in)
    w2, b2 = _lin(rng, c, h)
    # layers feeding BatchNormalization have no bias (its gradient is exactly zero)
    inits = {"w1": w1, "w2": w2, "b2": b2} if bn else {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    nodes = [helper.make_node("Gemm", ["x", "w1"] + ([] if bn else ["b1"]), ["h"], transB=1)]
    tm = [torch.nn.Linear(d_in, h, bias=not bn)]
    src = "h"
    if bn:
        inits.update({"g": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
                      "be": (0.1 * rng.standard_normal(h)).astype(np.float32),
                      "rm": (0.1 * rng.standard_normal(h)).astype(np.float32),
                      "rv": (1 + 0.2 * rng.random(h)).astype(np.float32)})
        nodes.append(helper.make_node("BatchNormalization", ["h", "g", "be", "rm", "rv"], ["hb"],
                                      epsilon=1e-5, momentum=0.9))
        tm.append(torch.nn.BatchNorm1d(h, eps=1e-5, momentum=0.1))
        src = "hb"
    nodes += [helper.make_node("Relu", [src], ["a"]),
              helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=1)]
    tm += [torch.nn.ReLU(), torch.nn.Linear(h, c)]
    net = torch.nn.Sequential(*tm)
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w1))
        if not bn:
            net[0].bias.copy_(torch.from_numpy(b1))
        net[-1].weight.copy_(torch.from_numpy(w2)); net[-1].bias.copy_(torch.from_numpy(b2))
        if bn:
            net[1].weight.copy_(torch.from_numpy(inits["g"])); net[1].bias.copy_(torch.from_numpy(inits["be"]))
            net[1].running_mean.copy_(torch.from_numpy(inits["rm"]))
            net[1].running_var.copy_(torch.from_numpy(inits["rv"]))
    order = ["w1"] + (["g", "be"] if bn else ["b1"]) + ["w2", "b2"]
    bufs = {"rm": net[1].running_mean, "rv": net[1].running_var} if bn else {}
    return _model(nodes, inits, ["N", d_in], c), net, order, bufs, (d_in,), c


def convnet(rng, bn=True):
    cin, cout, hw, c = 2, 4, 6, 3
    wc = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
    bc = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    wf, bf = _lin(rng, c, cout * hw * hw)
    inits = {"wc": wc} if bn else {"wc": wc, "bc": bc}
    nodes = [helper.make_node("Conv", ["x", "wc"] + ([] if bn else ["bc"]), ["c1"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1])]
    tm = [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
    src = "c1"
    if bn:
        inits.update({"g": (1 + 0.1 * rng.standard_normal(cout)).astype(np.float32),
                      "be": (0.1 * rng.standard_normal(cout)).astype(np.float32),
                      "rm": np.zeros(cout, np.float32), "rv": np.ones(cout, np.float32)})
        nodes.append(helper.make_node("BatchNormalization", ["c1", "g", "be", "rm", "rv"], ["cb"],
                                      epsilon=1e-5, momentum=0.9))
        tm.append(torch.nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))
        src = "cb"
    inits.update({"wf": wf, "bf": bf})
    nodes += [helper.make_node("Relu", [src], ["r"]), helper.make_node("Flatten", ["r"], ["f"], axis=1),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1)]
    tm += [torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(cout * hw * hw, c)]
    net = torch.nn.Sequential(*tm)
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(wc))
        if not bn:
            net[0].bias.copy_(torch.from_numpy(bc))
        net[-1].weight.copy_(torch.from_numpy(wf)); net[-1].bias.copy_(torch.from_numpy(bf))
        if bn:
            net[1].weight.copy_(torch.from_numpy(inits["g"])); net[1].bias.copy_(torch.from_numpy(inits["be"]))
    order = ["wc"] + (["g", "be"] if bn else ["bc"]) + ["wf", "bf"]
    bufs = {"rm": net[1].running_mean, "rv": net[1].running_var} if bn else {}
    return _model(nodes, inits, ["N", cin, hw, hw], c), net, order, bufs, (cin, hw, hw), c


OPTIMIZERS = {
    "sgd_momentum": (lambda: SGD(momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 0.05),
    "sgd_nesterov_wd": (lambda: SGD(momentum=0.9, nesterov=True, weight_decay=1e-3),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), 0.05),
    "sgd_dampening": (lambda: SGD(momentum=0.8, dampening=0.3),
                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3), 0.05),
    "adamw": (lambda: AdamW(weight_decay=0.05), lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05), 3e-3),
    "adam_l2_amsgrad": (lambda: Adam(weight_decay=1e-3, amsgrad=True),
                        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-3, amsgrad=True), 3e-3),
}

NETS = {
    "mlp": (lambda rng: mlp(rng, bn=False), ()),
    "mlp_bn": (lambda rng: mlp(rng, bn=True), (needs_bn,)),
    "conv": (lambda rng: convnet(rng, bn=False), (needs_conv,)),
    "conv_bn": (lambda rng: convnet(rng, bn=True), (needs_bn, needs_conv)),
}


def _relu_margin(net, x) -> float:
    """Smallest |Relu input| of a batch under ``net``'s current weights (BN statistics untouched)."""
    probe = copy.deepcopy(net)
    seen = []
    hooks = [m.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].abs().min().item()))
             for m in probe.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        probe(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return min(seen)


def _kink_free_batch(rng, net, shape, tries=50):
    for _ in range(tries):
        x = rng.standard_normal(shape).astype(np.float32)
        if _relu_margin(net, x) > KINK_MARGIN:
            return x
    raise AssertionError(f"no kink-free batch in {tries} draws")


def _run(net_name, opt_name, seed=0, steps=STEPS, batch=16):
    rng = np.random.default_rng(seed)
    model, net, order, bufs, in_shape, n_cls = NETS[net_name][0](rng)
    ours_opt, torch_opt, lr = OPTIMIZERS[opt_name]
    trainer = Trainer(model, loss="cross_entropy", optimizer=ours_opt(), threads=1)
    torch.manual_seed(seed)
    params = dict(zip(order, net.parameters()))
    topt = torch_opt(list(net.parameters()))
    lossf = torch.nn.CrossEntropyLoss()
    net.train()
    teacher = rng.standard_normal((int(np.prod(in_shape)), n_cls))  # learnable labels
    ours, ref = [], []
    for _ in range(steps):
        x = _kink_free_batch(rng, net, (batch,) + in_shape)
        y = np.argmax(x.reshape(batch, -1) @ teacher, axis=1)
        ours.append(trainer.train_step(x, y, lr=lr))
        topt.zero_grad()
        loss = lossf(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        topt.step()
        ref.append(loss.item())
    return np.array(ours), np.array(ref), trainer, params, bufs


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("net_name", [pytest.param(n, marks=m) for n, (_, m) in NETS.items()])
def test_losses_match_torch(net_name, opt_name):
    ours, ref, trainer, params, bufs = _run(net_name, opt_name)
    rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)
    assert rel.max() <= RTOL, f"{net_name}/{opt_name}: worst per-step loss rel error {rel.max():.2e} at step {rel.argmax()}"
    # single-batch losses are noisy: compare the first and last ten steps
    assert ref[-10:].mean() < ref[:10].mean(), "the reference did not train; the comparison would be vacuous"
    # the parameters and running statistics after 50 steps agree too
    state = trainer.parameters()
    for name, p in list(params.items()) + list(bufs.items()):
        want = p.detach().numpy()
        err = np.linalg.norm(state[name] - want) / max(np.linalg.norm(want), 1e-12)
        assert err < 1e-4, f"{net_name}/{opt_name}: {name} differs from torch by {err:.2e} (normwise)"


@needs_bn
def test_bn_onnx_semantics_differs_only_in_running_var():
    """bn_stats='onnx' keeps ONNX's biased running_var; running_mean and losses are unchanged."""
    rng = np.random.default_rng(3)
    model = mlp(rng, bn=True)[0]
    a = Trainer(model, optimizer=SGD(momentum=0.9), bn_stats="torch")
    b = Trainer(model, optimizer=SGD(momentum=0.9), bn_stats="onnx")
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    assert a.train_step(x, y, lr=0.01) == pytest.approx(b.train_step(x, y, lr=0.01), rel=1e-6)
    pa, pb = a.parameters(), b.parameters()
    np.testing.assert_allclose(pa["rm"], pb["rm"], rtol=1e-6)
    h = x @ numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1")).T
    rv0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "rv"))
    np.testing.assert_allclose(pa["rv"], 0.9 * rv0 + 0.1 * h.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(pb["rv"], 0.9 * rv0 + 0.1 * h.var(0), rtol=1e-5)
