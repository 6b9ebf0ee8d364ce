"""Whole real networks: onnxbp gradients against torch autograd (onnxbp issue 5, "Proof").

For each family in ``models.zoo`` the torch model (eval mode, seeded weights,
BatchNorm with warmed-up running statistics) is exported to ONNX, onnxbp
builds the gradient model for every parameter plus the network input, and
onnxruntime runs it on a random input (batch 2, fed through the symbolic
batch dim ``N``) with a random upstream gradient ``u``.  torch computes the
same vector-Jacobian product with ``y.backward(u)``; every parameter gradient
and the input gradient must match in the normwise relative error
``max|ours - torch| / max|torch|`` (``gradutil.assert_close``) within the
case's stated ``rtol`` (float32 through a deep net: 1e-4 for most, looser
where stated).  Parameters are matched to ONNX initializers by name, else by
value (see ``models.zoo.export.param_map``); initializers that are not torch
parameters (BatchNorm running statistics, exporter constants) get gradients
too and are covered by the finite-difference check.

The finite-difference checker (``onnxbp.check_gradients``) also runs on each
network: float64 forward (ops without a float64 kernel in onnxruntime, Conv
among them, are rewritten for the check), per-element central differences,
rtol 1e-3.

Exports: the TorchScript exporter at opset 17 for every family, a few at
opsets 11 and 13 (Softmax < 13, Split/Squeeze/Unsqueeze/Reduce* with axes as
attributes, HardSwish before opset 14), and the dynamo exporter (opset 18)
where ``onnxscript`` is installed.  See docs/networks.md for the numbers.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import onnx
from gradutil import _record, assert_close, assert_standard, session

import onnxbp
from models.zoo import FAMILIES, build
from models.zoo.export import INPUT, OUTPUT, export, param_map
from onnxbp.checker import gradient_names

try:
    import onnxscript  # noqa: F401

    HAS_ONNXSCRIPT = True
except Exception:  # noqa: BLE001  # pragma: no cover
    HAS_ONNXSCRIPT = False

BATCH = 2

#: (family, exporter, opset, rtol vs torch)
CASES = [(fam, "torchscript", 17, 1e-4) for fam in FAMILIES] + [
    ("vit", "torchscript", 11, 1e-4),
    ("shufflenet", "torchscript", 11, 1e-4),
    ("mobilenet_v3", "torchscript", 13, 1e-4),
    ("convnext", "torchscript", 13, 1e-4),
    ("squeezenet", "torchscript", 11, 1e-4),
]
#: dynamo export (optimize=False: raw graph; "dynamo-opt": onnxscript optimizer, BN folded)
DYNAMO_DEFAULT = ("resnet_basic", "shufflenet", "alexnet", "convnext", "vit")
DYNAMO_CASES = [(fam, "dynamo", 18, 1e-4) for fam in FAMILIES] + [
    (fam, "dynamo-opt", 18, 1e-4) for fam in ("resnet_basic", "mobilenet_v2", "vit")]

#: onnxbp's finite-difference checker runs every network's forward in float64
#: (ops without a float64 kernel in onnxruntime, Conv among them, are rewritten
#: for the check) with per-element central differences, at this tolerance.
FD_RTOL = 1e-3


def run_network(family: str, exporter: str, opset: int, seed: int = 0, with_input: bool = True, proto=None):
    """Export, differentiate (every parameter, plus the input), run in onnxruntime and in torch."""
    model, shape = build(family, seed)
    if proto is None:
        proto = export(model, shape, exporter, opset)
    t0 = time.perf_counter()
    gm_params = onnxbp.gradient(proto)               # every parameter (wrt=None)
    t_build = time.perf_counter() - t0
    params = list(gradient_names(gm_params))
    gm = onnxbp.gradient(proto, params + [INPUT]) if with_input else gm_params
    assert_standard(gm)
    names = gradient_names(gm)

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH,) + tuple(shape[1:])).astype(np.float32)
    out_name = proto.graph.output[0].name
    y_onnx = session(proto).run([out_name], {INPUT: x})[0]
    u = rng.standard_normal(y_onnx.shape).astype(np.float32)
    fetch = [out_name] + list(names.values())
    res = dict(zip(fetch, session(gm).run(fetch, {INPUT: x, out_name + "_grad": u})))

    xt = torch.from_numpy(x).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    yt = model(xt)
    yt.backward(torch.from_numpy(u))
    errs = {"<forward>": assert_close(res[out_name], yt.detach().numpy(), 1e-4, 1e-6, f"{family} forward")}
    return {"family": family, "proto": proto, "gm": gm, "names": names, "res": res, "xt": xt,
            "tparams": dict(model.named_parameters()), "mapping": param_map(proto, model),
            "t_build": t_build, "params": params, "errs": errs, "with_input": with_input}


def compare(r, rtol: float, require_all: bool = True) -> float:
    """Compare every mapped parameter gradient (and the input gradient) with torch.

    The error of a tensor is ``max|ours - torch| / max(max|torch|, 1e-3 G)`` where
    ``G`` is the largest gradient entry of the whole network: a parameter whose
    true gradient is zero (the MLP-Mixer token-MLP output bias is a per-token
    shift that the following LayerNorms remove exactly) is judged against the
    network's gradient scale, not against its own roundoff.  Returns the worst.
    """
    family, names, res, tparams = r["family"], r["names"], r["res"], r["tparams"]
    pairs = []
    if r["with_input"]:
        pairs.append((INPUT, res[names[INPUT]], r["xt"].grad.numpy()))
    for init, (tname, transposed) in r["mapping"].items():
        tg = tparams[tname].grad
        tg = np.zeros(tuple(tparams[tname].shape), np.float32) if tg is None else tg.numpy()
        assert init in names, f"{family}: no gradient for parameter {init} ({tname})"
        pairs.append((init, res[names[init]], tg.T if transposed else tg))
    big = max(float(np.max(np.abs(ref))) for _, _, ref in pairs if ref.size)
    worst = 0.0
    floor = 1e-3 * big
    for name, ours, ref in pairs:
        if float(np.max(np.abs(ref))) >= floor:
            assert_close(ours, ref, rtol, 0.0, f"{family} d{name}")
        assert ours.shape == ref.shape, f"{family} d{name}: shape {ours.shape} != {ref.shape}"
        err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
        rel = err / max(float(np.max(np.abs(ref))), floor)
        assert rel <= rtol, f"{family} d{name}: error {err:.3e} > {rtol} * max(|ref|, 1e-3 G = {floor:.3e})"
        _record("reference (torch/numpy)", rel)
        r["errs"][name] = rel
        worst = max(worst, rel)
    if require_all:
        missing = sorted(set(tparams) - {t for t, _ in r["mapping"].values()})
        assert not missing, f"{family}: torch parameters without an ONNX initializer: {missing}"
    r["compared"] = len(pairs) - int(r["with_input"])
    r["worst"] = worst
    return worst


def fd_check(r) -> float:
    """onnxbp's own finite-difference checker on the exported network (every parameter):
    float64 forward, per-element central differences plus random directions, rtol 1e-3."""
    report = onnxbp.check_gradients(r["proto"], r["params"], rtol=FD_RTOL, directions=2, batch_size=1)
    assert report.precision == "float64", f"{r['family']}: float64 forward unavailable"
    assert report.passed, f"{r['family']}: finite differences at rtol={FD_RTOL}\n" + report.table()
    r["fd_worst"] = max(x.max_rel_err for x in report.results)
    return r["fd_worst"]


def _case_id(c):
    return f"{c[0]}-{c[1]}{c[2]}"


def _run_case(family, exporter, opset, rtol):
    r = run_network(family, exporter, opset)
    compare(r, rtol, require_all=exporter != "dynamo-opt")
    if exporter != "dynamo-opt":
        assert r["compared"] == len(r["tparams"])
    fd_check(r)


@pytest.mark.torch
@pytest.mark.parametrize("family,exporter,opset,rtol", CASES, ids=[_case_id(c) for c in CASES])
def test_network_vs_torch(family, exporter, opset, rtol):
    _run_case(family, exporter, opset, rtol)


@pytest.mark.torch
@pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="the dynamo exporter needs onnxscript (pip install onnxscript)")
@pytest.mark.parametrize("family,exporter,opset,rtol", [
    pytest.param(*c, id=_case_id(c), marks=() if c[0] in DYNAMO_DEFAULT else pytest.mark.slow)
    for c in DYNAMO_CASES])
def test_network_dynamo_vs_torch(family, exporter, opset, rtol):
    _run_case(family, exporter, opset, rtol)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("family", list(FAMILIES))
def test_network_vs_torch_other_seed(family):
    """Every TorchScript family again with other weights and inputs (seed 1)."""
    r = run_network(family, "torchscript", 17, seed=1)
    compare(r, 1e-4)


@pytest.mark.torch
def test_symbolic_batch_gradient_runs_at_other_batch_sizes():
    """One gradient model (symbolic batch N) runs at batch 1 and 5; per-sample input
    gradients do not depend on the other samples (eval-mode BN), checked against torch."""
    model, shape = build("resnet_basic")
    proto = export(model, shape, "torchscript", 17)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    gm = onnxbp.gradient(proto, [INPUT])
    names = gradient_names(gm)
    sess = session(gm)
    rng = np.random.default_rng(3)
    for n in (1, 5):
        x = rng.standard_normal((n,) + tuple(shape[1:])).astype(np.float32)
        u = rng.standard_normal((n, 10)).astype(np.float32)
        gx = sess.run([names[INPUT]], {INPUT: x, OUTPUT + "_grad": u})[0]
        xt = torch.from_numpy(x).requires_grad_(True)
        model(xt).backward(torch.from_numpy(u))
        assert_close(gx, xt.grad.numpy(), 1e-4, 0.0, f"batch {n} d{INPUT}")


def test_zoo_build_cli_writes_models(tmp_path):
    """``python -m models.zoo.write OUTDIR --only ...`` writes loadable, checker-clean models."""
    from models.zoo.write import main

    assert main([str(tmp_path), "--only", "vgg,squeezenet", "--opset", "13"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["squeezenet.ts13.onnx", "vgg.ts13.onnx"]
    for f in files:
        m = onnx.load(str(tmp_path / f))
        onnx.checker.check_model(m, full_check=True)
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    import models.zoo

    assert models.zoo.build is build  # the CLI module's import does not shadow the package's build()
