"""The portability matrix: gradient models run in other ONNX runtimes against onnxruntime.

Runtimes: onnx.reference.ReferenceEvaluator ("reference"), OpenVINO CPU with
``INFERENCE_PRECISION_HINT=f32`` ("openvino"), tract ("tract").  Each is
imported only when asked for; tests/test_portability.py skips a runtime that
is not installed (``pip install -e .[portability]``).

    python tests/portutil.py            # prints the matrices of docs/portability.md

Models: ``models/lenet.onnx`` and :func:`build_resnet_small` (gradient model and
training step, both targets), and every ``models.zoo`` family (its TorchScript
export at opset 17 with the symbolic batch ``N``: gradient model,
``target="portable"``; needs torch).  Cells whose runtime has a documented
upstream bug (:data:`KNOWN_BUGS`) are also run with the op fixed
(:func:`run_reference_fixed`).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import onnxbp
from onnxbp.modelio import cpu_session

RUNTIMES = ("reference", "openvino", "tract")
LENET = os.path.join(ROOT, "models", "lenet.onnx")


# ----------------------------------------------------------------------------- models
def build_resnet_small(seed: int = 0, batch="N") -> onnx.ModelProto:
    """A ResNet-style network with BatchNormalization (inference mode) and a symbolic batch.

    x (N, 3, 8, 8) -> Conv 3x3 (3->8) BN ReLU -> basic block (Conv 3x3/2 (8->16) BN ReLU, Conv 3x3
    (16->16) BN; shortcut Conv 1x1/2 (8->16) BN; Add ReLU) -> depthwise Conv 3x3 (group 16) BN ReLU
    -> GlobalAveragePool -> Flatten -> Gemm (16->10).
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def conv_bn(x, name, cin, cout, k, s, group=1, relu=True):
        w = init(f"{name}.w", rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k)))
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.c"], name=f"{name}.conv", kernel_shape=[k, k],
                                      strides=[s, s], pads=[k // 2] * 4, group=group))
        bn = [init(f"{name}.{p}", v) for p, v in (("scale", 1 + 0.1 * rng.standard_normal(cout)),
                                                  ("bias", 0.1 * rng.standard_normal(cout)),
                                                  ("mean", 0.1 * rng.standard_normal(cout)),
                                                  ("var", 1 + 0.1 * rng.random(cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c"] + bn, [f"{name}.bn"], name=f"{name}.bn"))
        if not relu:
            return f"{name}.bn"
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    h = conv_bn("x", "stem", 3, 8, 3, 1)
    a = conv_bn(h, "b1a", 8, 16, 3, 2)
    a = conv_bn(a, "b1b", 16, 16, 3, 1, relu=False)
    s = conv_bn(h, "b1s", 8, 16, 1, 2, relu=False)
    nodes.append(helper.make_node("Add", [a, s], ["b1.add"], name="b1.add"))
    nodes.append(helper.make_node("Relu", ["b1.add"], ["b1.r"], name="b1.relu"))
    d = conv_bn("b1.r", "dw", 16, 16, 3, 1, group=16)
    nodes.append(helper.make_node("GlobalAveragePool", [d], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    fw = init("fc.w", rng.standard_normal((10, 16)) * 0.25)
    fb = init("fc.b", 0.1 * rng.standard_normal(10))
    nodes.append(helper.make_node("Gemm", ["flat", fw, fb], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet_small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


MODELS = {"lenet": lambda: onnx.load(LENET), "resnet_small": build_resnet_small}


def zoo_families() -> list:
    from models.zoo import FAMILIES
    return list(FAMILIES)


@functools.cache
def _zoo_export(family: str) -> bytes:
    """The family's TorchScript export (opset 17, symbolic batch ``N``), exported once per process."""
    from models.zoo import build
    from models.zoo.export import export
    model, shape = build(family)
    return export(model, shape, "torchscript", 17).SerializeToString()


def load_model(kind: str) -> onnx.ModelProto:
    """A fresh copy of model ``kind``: ``lenet``, ``resnet_small`` or a ``models.zoo`` family."""
    if kind in MODELS:
        return MODELS[kind]()
    return onnx.load_from_string(_zoo_export(kind))


def fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The model with its symbolic batch (every graph input's and output's first dim_param) fixed."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_value = batch  # clears dim_param (a oneof)
    del model.graph.value_info[:]
    return model


def gradient_case(kind: str, target: str = "onnxruntime", batch: int = 4, seed: int = 0,
                  static: bool = False):
    """(gradient model, feeds): every parameter's gradient, the seeds random.  ``static``: the batch
    fixed to ``batch`` before differentiating."""
    model = load_model(kind)
    if static:
        fix_batch(model, batch)
    gm = onnxbp.gradient(model, target=target)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in gm.graph.input:
        if vi.name in {t.name for t in gm.graph.initializer}:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return gm, feeds


def training_case(kind: str, target: str = "onnxruntime", batch: int = 4, seed: int = 0):
    """(training-step model, feeds): cross-entropy, SGD with momentum (its state carried), the
    model's BatchNormalization in training mode with its running statistics carried."""
    from onnxbp.training import SGD, build_step_model
    model = load_model(kind)
    sm = build_step_model(model, loss="cross_entropy", optimizer=SGD(momentum=0.9), target=target)
    rng = np.random.default_rng(seed)
    spec, feeds = sm.spec, dict(sm.initial)
    n_classes = value_dims(sm.model, spec.output)[1] if spec.output else 10
    for vi in sm.model.graph.input:
        if vi.name in feeds or vi.name in {t.name for t in sm.model.graph.initializer}:
            continue
        if vi.name == spec.lr:
            feeds[vi.name] = np.array(0.05, dtype=np.float32)
        elif vi.name == spec.step:
            feeds[vi.name] = np.array(1, dtype=np.int64)
        elif vi.name == spec.target:
            feeds[vi.name] = rng.integers(0, n_classes, size=batch).astype(np.int64)
        else:
            dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return sm.model, feeds


def value_dims(model: onnx.ModelProto, name: str) -> list:
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in inferred.graph.value_info:
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return [None, 10]


CASES = {"grad": gradient_case, "step": training_case}


# ----------------------------------------------------------------------------- runtimes
def run_onnxruntime(model: onnx.ModelProto, feeds: dict) -> dict:
    sess = cpu_session(model)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, sess.run(names, feeds)))


def run_reference(model: onnx.ModelProto, feeds: dict) -> dict:
    from onnx.reference import ReferenceEvaluator
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model).run(names, feeds)))


@functools.cache
def _reference_fixed_ops() -> tuple:
    """onnx.reference ops with the upstream bugs of docs/portability.md fixed, for ``new_ops``:
    MaxPool whose Indices output always comes from the strided-pool code path (bug 5: the stride-1
    path decodes the window's argmax with the output shape and drops the (n, c) plane offset), and
    LRN summing over every channel (bug 7: its loop runs over the batch dimension)."""
    import math

    from onnx.reference.ops.op_lrn import LRN as _LRN
    from onnx.reference.ops.op_max_pool import MaxPool as _MaxPool

    class MaxPool(_MaxPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            if len(self.output) > 1 and self.output[1] and (auto_pad in (None, "NOTSET")):
                return self._max_pool(x, auto_pad, ceil_mode, dilations, kernel_shape, pads, storage_order or 0,
                                      strides)
            return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                kernel_shape=kernel_shape, pads=pads, storage_order=storage_order, strides=strides)

    class LRN(_LRN):
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            sq = np.zeros(x.shape, dtype=x.dtype)
            lo, hi = math.floor((size - 1) / 2), math.ceil((size - 1) / 2) + 1
            for c in range(x.shape[1]):
                sq[:, c] = np.sum(x[:, max(0, c - lo):min(x.shape[1], c + hi)] ** 2, axis=1)
            return ((x / ((bias + (alpha / size) * sq) ** beta)).astype(x.dtype),)

    return (MaxPool, LRN)


def run_reference_fixed(model: onnx.ModelProto, feeds: dict) -> dict:
    """The ReferenceEvaluator with the ops of :func:`_reference_fixed_ops` (bugs 5 and 7) replaced."""
    from onnx.reference import ReferenceEvaluator
    names = [o.name for o in model.graph.output]
    return dict(zip(names, ReferenceEvaluator(model, new_ops=list(_reference_fixed_ops())).run(names, feeds)))


def run_openvino(model: onnx.ModelProto, feeds: dict) -> dict:
    import openvino as ov
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        onnx.save(model, path)
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled(feeds)
    return {o.name: np.asarray(res[compiled.output(o.name)]) for o in model.graph.output}


def run_tract(model: onnx.ModelProto, feeds: dict) -> dict:
    import tract
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        onnx.save(model, path)
        runnable = tract.onnx().load(path).into_model().into_runnable()
    init_names = {t.name for t in model.graph.initializer}
    order = [vi.name for vi in model.graph.input if vi.name not in init_names]
    # tract.Tensor.from_numpy keeps a 0-d array's rank (np.ascontiguousarray would make it rank 1)
    outs = runnable.run([tract.Tensor.from_numpy(np.asarray(feeds[n])) for n in order])
    return {o.name: t.to_numpy() for o, t in zip(model.graph.output, outs)}


RUNNERS = {"onnxruntime": run_onnxruntime, "reference": run_reference, "openvino": run_openvino,
           "tract": run_tract}

#: (runtime, model) cells a runtime's own bug breaks (docs/portability.md: bug number, the op).  The
#: tests assert the symptom and run the cell again with the op fixed (:func:`run_reference_fixed`).
KNOWN_BUGS = {("reference", "inception"): (5, "MaxPool Indices of a stride-1 pool"),
              ("reference", "alexnet"): (7, "LRN normalizes only the first N channels")}
FIXED_RUNNERS = {"reference": run_reference_fixed}

#: Gradient models: an output whose max|ref| is below GRAD_FLOOR times the largest |ref| of all the
#: outputs is judged against that floor (like tests/test_networks.py's 1e-3 G): MLP-Mixer's token-MLP
#: output bias has a true gradient of 0 (the LayerNorms remove a per-token shift exactly), so its
#: values (8.6e-08 against G = 5.1) are roundoff, which no runtime reproduces to 1e-5 of itself.
GRAD_FLOOR = 1e-2


def max_rel_diff(got: dict, ref: dict, floor: float = 0.0) -> float:
    """max over outputs of max|got - ref| / max(max|ref|, floor * G, 1e-6) (normwise per output; G the
    largest max|ref| of all the outputs)."""
    big = max((float(np.max(np.abs(np.asarray(r, dtype=np.float64)))) for r in ref.values()
               if np.asarray(r).size), default=0.0)
    worst = 0.0
    for name, r in ref.items():
        g = np.asarray(got[name], dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            raise AssertionError(f"{name}: shape {g.shape} != onnxruntime's {r.shape}")
        if r.size:
            scale = max(float(np.max(np.abs(r))), floor * big, 1e-6)
            worst = max(worst, float(np.max(np.abs(g - r))) / scale)
    return worst


def error_summary(exc: Exception, limit: int = 200) -> str:
    """The informative lines of a runtime's error (OpenVINO and tract wrap theirs in locations and
    backtraces)."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    keep = []
    for ln in lines:
        if ln.startswith("Stack backtrace"):
            break
        if not ln or ln.startswith(("Exception from", "Caused by", "Check '", "at ")) or ln.endswith(":"):
            continue
        keep.append(ln)
    return "; ".join(keep)[:limit] or type(exc).__name__


def _run_cell(runtime: str, gm: onnx.ModelProto, feeds: dict, ref: dict, floor: float, kind: str) -> str:
    try:
        got = RUNNERS[runtime](gm, {k: v.copy() for k, v in feeds.items()})
    except Exception as exc:  # noqa: BLE001  # a runtime's refusal is the cell's value
        return f"error: {type(exc).__name__}: {error_summary(exc)}"
    text = f"{max_rel_diff(got, ref, floor):.1e}"
    if (runtime, kind) in KNOWN_BUGS:
        fixed = FIXED_RUNNERS[runtime](gm, {k: v.copy() for k, v in feeds.items()})
        text = f"{text} (bug {KNOWN_BUGS[runtime, kind][0]}; op fixed: {max_rel_diff(fixed, ref, floor):.1e})"
    return text


def cell(runtime: str, kind: str, target: str, what: str = "grad") -> str:
    """One matrix cell: the max relative difference against onnxruntime, or the error's first line."""
    gm, feeds = CASES[what](kind, target)
    # copies: onnxruntime writes a training-mode BatchNormalization's running statistics into the
    # caller's input arrays (docs/portability.md, bug 1)
    ref = run_onnxruntime(gm, {k: v.copy() for k, v in feeds.items()})
    return _run_cell(runtime, gm, feeds, ref, GRAD_FLOOR if what == "grad" else 0.0, kind)


def zoo_row(family: str, runtimes=RUNTIMES) -> list:
    """The zoo matrix row of one family: gradient model, target="portable", batch 4 through ``N``."""
    gm, feeds = gradient_case(family, "portable")
    ref = run_onnxruntime(gm, {k: v.copy() for k, v in feeds.items()})
    return [_run_cell(rt, gm, feeds, ref, GRAD_FLOOR, family) for rt in runtimes]


def main() -> int:
    targets = [a for a in sys.argv[1:] if a in ("onnxruntime", "portable")] or ["onnxruntime", "portable"]
    print("| runtime | model | model kind | target | max rel. diff vs onnxruntime |")
    print("|---|---|---|---|---|")
    for rt in RUNTIMES:
        for kind in MODELS:
            for what in CASES:
                for target in targets:
                    print(f"| {rt} | {kind} | {what} | {target} | {cell(rt, kind, target, what)} |", flush=True)
    if "--no-zoo" in sys.argv:
        return 0
    print()
    print("| zoo family (grad, target=portable) | reference | OpenVINO f32 | tract |")
    print("|---|---|---|---|")
    for fam in zoo_families():
        print(f"| {fam} | " + " | ".join(zoo_row(fam)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
