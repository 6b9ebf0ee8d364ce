"""target="portable": gradient models and training steps in other runtimes (docs/portability.md).

The runtime matrix (onnx's ReferenceEvaluator, OpenVINO CPU with
INFERENCE_PRECISION_HINT=f32, tract) runs LeNet and a ResNet-style network
with BatchNormalization, each with a symbolic batch, as a gradient model and
as a training step (cross-entropy, SGD with momentum, BatchNormalization in
training mode), against onnxruntime CPU on the same feeds: max relative
difference (normwise per output) <= RTOL[runtime].  Every ``models.zoo``
family's gradient model (target="portable", exported once per session by
the ``zoo_case`` fixture; needs torch) runs in the same runtimes
(``test_zoo_gradient_matrix``, ~40 s of the default suite on 2 cores).  A
runtime that is not installed is skipped (``pip install -e .[portability]``).
The expansion checks (SoftmaxCrossEntropyLoss, training-mode
BatchNormalization as plain ops) need onnxruntime only.  ``test_bug*`` are
the minimal reproductions of docs/portability.md's runtime bugs: each
asserts the bug's symptom and fails once the runtime fixes it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from portutil import (
    FIXED_RUNNERS,
    GRAD_FLOOR,
    KNOWN_BUGS,
    MODELS,
    RUNNERS,
    build_resnet_small,
    gradient_case,
    max_rel_diff,
    run_onnxruntime,
    training_case,
    zoo_families,
)

import onnxbp
from onnxbp.portable import (
    expand_for_portability,
    rename_prefix_nodes,
    separate_backward_constants,
)
from onnxbp.shapeinfo import infer

#: Measured (docs/portability.md): <= 1e-6 everywhere; the bound leaves float32 reassociation room.
RTOL = {"reference": 1e-5, "openvino": 1e-5, "tract": 1e-5}
#: The zoo's gradient models (deeper nets; measured worst 4.8e-06, Inception in OpenVINO): the same bound.
ZOO_RTOL = {"reference": 1e-5, "openvino": 1e-5, "tract": 1e-5}
try:
    ZOO = zoo_families()
except ImportError:  # pragma: no cover - models/ is part of the checkout
    ZOO = []
IMPORTS = {"reference": "onnx.reference", "openvino": "openvino", "tract": "tract"}
CASES = {"grad": gradient_case, "step": training_case}


def _copy(feeds):
    # onnxruntime writes a training-mode BatchNormalization's running statistics into the caller's
    # input arrays (bug 1 in docs/portability.md): every run gets its own copies
    return {k: np.array(v, copy=True) for k, v in feeds.items()}


@pytest.mark.parametrize("what", ["grad", "step"])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("runtime", list(RTOL))
def test_portable_matrix(runtime, kind, what):
    pytest.importorskip(IMPORTS[runtime])
    for batch in (4, 3):  # one model, two batch sizes: the batch stays symbolic
        model, feeds = CASES[what](kind, "portable", batch=batch)
        ref = run_onnxruntime(model, _copy(feeds))
        got = RUNNERS[runtime](model, _copy(feeds))
        assert set(got) == set(ref)
        err = max_rel_diff(got, ref)
        assert err <= RTOL[runtime], f"{runtime} {kind} {what} batch {batch}: max rel diff {err:.2e}"


@pytest.mark.parametrize("what", ["grad", "step"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_portable_equals_default_lowering(kind, what):
    """The portable lowering computes the same values as the default one (onnxruntime), and leaves
    no runtime-shaped Conv kernel, SoftmaxCrossEntropyLoss or training-mode BatchNormalization."""
    model, feeds = CASES[what](kind, "portable")
    base, _ = CASES[what](kind, "onnxruntime")
    onnx.checker.check_model(model, full_check=True)
    got, ref = run_onnxruntime(model, _copy(feeds)), run_onnxruntime(base, _copy(feeds))
    assert set(got) == set(ref)
    assert max_rel_diff(got, ref) <= 1e-5
    ops = [n.op_type for n in model.graph.node]
    assert "SoftmaxCrossEntropyLoss" not in ops
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"
                and any(a.name == "training_mode" and a.i == 1 for a in n.attribute)]
    infos = infer(model)
    for n in model.graph.node:  # every Conv kernel has a static shape (the batch never reaches it)
        if n.op_type in ("Conv", "ConvTranspose"):
            shape = infos[n.input[1]].shape
            assert shape is not None and all(isinstance(d, int) for d in shape), f"{n.name}: kernel {shape}"


# ------------------------------------------------------------------ the zoo's gradient models
@pytest.fixture(scope="session")
def zoo_case():
    """``zoo_case(family)``: (portable gradient model, feeds, onnxruntime's outputs), exported,
    differentiated, checked (full check) and run in onnxruntime once per test session."""
    cache = {}

    def get(family):
        if family not in cache:
            pytest.importorskip("torch")
            gm, feeds = gradient_case(family, "portable")
            onnx.checker.check_model(gm, full_check=True)
            cache[family] = (gm, feeds, run_onnxruntime(gm, _copy(feeds)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", ZOO)
@pytest.mark.parametrize("runtime", list(ZOO_RTOL))
def test_zoo_gradient_matrix(zoo_case, runtime, family):
    """Every zoo family's gradient model (target="portable", symbolic batch fed with 4) in each
    runtime against onnxruntime.  A cell of KNOWN_BUGS (an upstream bug of the runtime, kept as
    test_bug5/test_bug7, which fail once it is fixed) runs with the op fixed; ``-m slow`` also
    asserts that the unfixed runtime shows the bug on the network."""
    pytest.importorskip(IMPORTS[runtime])
    gm, feeds, ref = zoo_case(family)
    bug = KNOWN_BUGS.get((runtime, family))
    got = (FIXED_RUNNERS[runtime] if bug else RUNNERS[runtime])(gm, _copy(feeds))
    assert set(got) == set(ref)
    err = max_rel_diff(got, ref, GRAD_FLOOR)
    assert err <= ZOO_RTOL[runtime], f"{runtime} {family}{' (op fixed)' if bug else ''}: max rel diff {err:.2e}"


#: The families whose static-batch gradient models OpenVINO computed wrongly before bug 4's workaround.
STATIC_OPENVINO = [pytest.param(f, marks=() if f == "vit" else pytest.mark.slow)
                   for f in ("vit", "mobilenet_v3", "densenet", "shufflenet")]


@pytest.mark.parametrize("family", STATIC_OPENVINO)
def test_zoo_static_batch_openvino(family):
    """The batch fixed to 4 before differentiating (OpenVINO folds more with static shapes): the
    portable gradient model still matches onnxruntime; the default target's (no copies) does not."""
    pytest.importorskip("openvino")
    pytest.importorskip("torch")
    for target, ok in (("portable", True), ("onnxruntime", False)):
        gm, feeds = gradient_case(family, target, static=True)
        assert gm.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
        err = max_rel_diff(RUNNERS["openvino"](gm, _copy(feeds)), run_onnxruntime(gm, _copy(feeds)), GRAD_FLOOR)
        assert (err <= ZOO_RTOL["openvino"]) == ok, f"{family} static, target={target}: {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("runtime,family", sorted(KNOWN_BUGS))
def test_zoo_known_bug_cells_fail_unfixed(zoo_case, runtime, family):
    """The KNOWN_BUGS cells fail in the runtime as shipped (docs/portability.md: the matrix's value)."""
    pytest.importorskip(IMPORTS[runtime])
    gm, feeds, ref = zoo_case(family)
    err = max_rel_diff(RUNNERS[runtime](gm, _copy(feeds)), ref, GRAD_FLOOR)
    bug = KNOWN_BUGS[runtime, family]
    assert err > 100 * ZOO_RTOL[runtime], f"{runtime} {family}: {err:.2e}: bug {bug[0]} ({bug[1]}) fixed upstream?"


@pytest.mark.parametrize("family", ZOO)
def test_zoo_portable_equals_default_lowering(zoo_case, family):
    """The portable gradient model of every zoo family computes the default lowering's values
    (onnxruntime): its lowerings and the backward's constant copies (bug 4) change no value."""
    gm, feeds, got = zoo_case(family)
    base, _ = gradient_case(family, "onnxruntime")
    ref = run_onnxruntime(base, _copy(feeds))
    assert set(got) == set(ref)
    assert max_rel_diff(got, ref, GRAD_FLOOR) <= 1e-5
    infos = infer(gm)
    for n in gm.graph.node:  # no runtime-shaped kernel; no grouped ConvTranspose but depthwise (bug 6)
        if n.op_type in ("Conv", "ConvTranspose"):
            shape = infos[n.input[1]].shape
            assert shape is not None and all(isinstance(d, int) for d in shape), f"{n.name}: kernel {shape}"
        if n.op_type == "ConvTranspose":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            assert group == 1 or (shape[1] == 1 and shape[0] == group), f"{n.name}: group {group}, W {shape}"


def _sce_model(rank: int, reduction: str, weights: bool, ignore, opset: int, log_prob: bool):
    shape = ["N", 5] + [3] * (rank - 2)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
           helper.make_tensor_value_info("t", TensorProto.INT64, [shape[0]] + shape[2:])]
    inputs = ["x", "t"]
    if weights:
        ins.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [5]))
        inputs.append("w")
    outs = ["loss"] + (["lp"] if log_prob else [])
    node = helper.make_node("SoftmaxCrossEntropyLoss", inputs, outs, name="sce", reduction=reduction,
                            ignore_index=ignore)
    loss_shape = [] if reduction != "none" else [shape[0]] + shape[2:]
    vis = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, loss_shape)]
    if log_prob:
        vis.append(helper.make_tensor_value_info("lp", TensorProto.FLOAT, shape))
    m = helper.make_model(helper.make_graph([node], "sce", ins, vis), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("rank,reduction,weights,ignore,opset,log_prob", [
    (2, "mean", False, None, 13, False), (2, "mean", True, None, 17, True), (2, "sum", False, 1, 13, False),
    (3, "none", True, 2, 13, True), (4, "mean", False, 0, 12, True), (3, "mean", True, 4, 12, False),
    (2, "none", False, None, 18, False), (3, "sum", True, None, 18, True),
])
def test_sce_expansion_matches(rank, reduction, weights, ignore, opset, log_prob):
    """SoftmaxCrossEntropyLoss as plain ops: onnxruntime's own kernel's values (rtol 1e-6)."""
    m = _sce_model(rank, reduction, weights, ignore, opset, log_prob)
    e = onnx.ModelProto()
    e.CopyFrom(m)
    assert expand_for_portability(e) == ["sce"]
    onnx.checker.check_model(e, full_check=True)
    assert "SoftmaxCrossEntropyLoss" not in [n.op_type for n in e.graph.node]
    rng = np.random.default_rng(rank * 100 + opset)
    feeds = {"x": rng.standard_normal([4, 5] + [3] * (rank - 2)).astype(np.float32),
             "t": rng.integers(0, 5, size=[4] + [3] * (rank - 2)).astype(np.int64)}
    if weights:
        feeds["w"] = rng.random(5).astype(np.float32) + 0.5
    ref, got = run_onnxruntime(m, feeds), run_onnxruntime(e, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("rank,momentum,eps", [(4, 0.9, 1e-5), (3, 0.7, 1e-3), (2, 0.99, 1e-5)])
def test_bn_training_expansion_matches(rank, momentum, eps):
    """Training-mode BatchNormalization as plain ops: onnxruntime's kernel's Y and running stats."""
    c = 3
    shape = ["N", c] + [4] * (rank - 2)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn",
                            training_mode=1, momentum=momentum, epsilon=eps)
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [c]) for n in "sbmv"]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [c]) for n in ("rm", "rv")]
    m = helper.make_model(helper.make_graph([node], "bn", ins, outs), opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    e = onnx.ModelProto()
    e.CopyFrom(m)
    assert expand_for_portability(e) == ["bn"]
    onnx.checker.check_model(e, full_check=True)
    assert "BatchNormalization" not in [n.op_type for n in e.graph.node]
    rng = np.random.default_rng(rank)
    feeds = {"x": (rng.standard_normal([5, c] + [4] * (rank - 2)) * 2 + 1).astype(np.float32),
             "s": rng.random(c).astype(np.float32) + 0.5, "b": rng.standard_normal(c).astype(np.float32),
             "m": rng.standard_normal(c).astype(np.float32), "v": rng.random(c).astype(np.float32) + 0.5}
    ref, got = run_onnxruntime(m, _copy(feeds)), run_onnxruntime(e, _copy(feeds))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_expansion_refuses_unknown_rank():
    m = _sce_model(2, "mean", False, None, 13, False)
    m.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(onnxbp.errors.ShapeError, match="SoftmaxCrossEntropyLoss node 'sce': the rank of its input 'x'"):
        expand_for_portability(m)


# ------------------------------------------------------------------ runtime bugs, minimal reproductions
def _bn_training_one_node():
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"],
                            training_mode=1, momentum=0.9)
    add = helper.make_node("Add", ["rm", "rv"], ["z"])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2, 3])] + [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "sbmv"]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])]
    m = helper.make_model(helper.make_graph([node, add], "bn", ins, outs), opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


def test_bug1_onnxruntime_bn_training_writes_into_caller_inputs():
    """onnxruntime 1.32 CPU: a training-mode BatchNormalization whose running_mean/var outputs are not
    graph outputs writes them into the caller's numpy arrays for inputs ``mean`` / ``var``, so the same
    feeds give another result on the next run.  Kept as the reproduction of docs/portability.md bug 1;
    when it fails, onnxruntime fixed it and the copies in the matrix tests can go."""
    from onnxbp.modelio import cpu_session

    sess = cpu_session(_bn_training_one_node())
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((4, 2, 3)).astype(np.float32), "s": np.ones(2, np.float32),
             "b": np.zeros(2, np.float32), "m": np.zeros(2, np.float32), "v": np.ones(2, np.float32)}
    first = sess.run(["z"], feeds)[0]
    second = sess.run(["z"], feeds)[0]
    assert not np.array_equal(feeds["m"], np.zeros(2, np.float32)), "fixed upstream: inputs no longer written"
    assert not np.allclose(first, second)
    fresh = {k: np.array(v, copy=True) for k, v in feeds.items()}
    assert np.array_equal(sess.run(["z"], _copy(fresh))[0], sess.run(["z"], _copy(fresh))[0])


def _tract_dup_model():
    node = helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["y"], name="conv1", kernel_shape=[1, 1])
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3]),
           helper.make_tensor_value_info("conv1.weight", TensorProto.FLOAT, [4, 2, 1, 1]),
           helper.make_tensor_value_info("conv1.bias", TensorProto.FLOAT, [4])]
    m = helper.make_model(helper.make_graph([node], "m", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                              [1, 4, 3, 3])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_bug2_tract_duplicate_node_name():
    """tract 0.23: a Conv named ``conv1`` whose bias is the graph input ``conv1.bias`` fails ("Duplicate
    node name: conv1.bias"); the workaround (rename_prefix_nodes, run by target="portable" on training
    steps) renames the node, and the model then runs and matches onnxruntime."""
    pytest.importorskip("tract")
    from portutil import run_tract

    m = _tract_dup_model()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32),
             "conv1.weight": rng.standard_normal((4, 2, 1, 1)).astype(np.float32),
             "conv1.bias": rng.standard_normal(4).astype(np.float32)}
    with pytest.raises(Exception, match="Duplicate node name: conv1.bias"):
        run_tract(m, feeds)
    assert rename_prefix_nodes(m) == ["conv1"]
    assert m.graph.node[0].name != "conv1"
    np.testing.assert_allclose(run_tract(m, feeds)["y"], run_onnxruntime(m, feeds)["y"], rtol=1e-6, atol=1e-6)


def test_default_target_fails_where_documented():
    """The cells docs/portability.md reports as failing for target="onnxruntime" (symbolic batch):
    the weight-gradient Conv has a runtime-shaped kernel; OpenVINO and tract refuse to compile it."""
    gm, feeds = gradient_case("lenet", "onnxruntime")
    checked = 0
    for runtime, message in (("openvino", "dynamic weights shape"), ("tract", "Expect concrete shape for kernel")):
        try:
            __import__(IMPORTS[runtime])
        except ImportError:
            continue
        with pytest.raises(Exception, match=message):
            RUNNERS[runtime](gm, _copy(feeds))
        checked += 1
    if not checked:
        pytest.skip("neither openvino nor tract is installed")


def test_resnet_small_builds():
    m = build_resnet_small()
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") == 5 and ops.count("Conv") == 5
    assert any(a.name == "group" and a.i == 16 for n in m.graph.node for a in n.attribute)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_portable_split_step_gradient_part():
    """build_split_step(target="portable"): the workers' gradient model has no SoftmaxCrossEntropyLoss
    or training-mode BatchNormalization and computes the default lowering's values (onnxruntime)."""
    from onnxbp.training import SGD
    from onnxbp.training.step import build_split_step

    parts = {t: build_split_step(build_resnet_small(), optimizer=SGD(), target=t) for t in ("onnxruntime", "portable")}
    gm = parts["portable"].gradient
    assert not {"SoftmaxCrossEntropyLoss", "BatchNormalization"} & {n.op_type for n in gm.graph.node}
    rng = np.random.default_rng(3)
    init = {t.name for t in gm.graph.initializer}
    feeds = {}
    for vi in gm.graph.input:
        if vi.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 4 for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 10, size=dims).astype(np.int64)
        else:
            feeds[vi.name] = parts["portable"].initial.get(vi.name, rng.standard_normal(dims).astype(np.float32))
    def by_param(outs, split):  # the gradient tensors' names are the lowering's own
        names = {v: f"grad:{p}" for p, v in split.grads.items()}
        return {names.get(k, k): v for k, v in outs.items()}

    ref = by_param(run_onnxruntime(parts["onnxruntime"].gradient, _copy(feeds)), parts["onnxruntime"])
    got = by_param(run_onnxruntime(gm, _copy(feeds)), parts["portable"])
    assert set(got) == set(ref) and max_rel_diff(got, ref) <= 1e-5
    # not run in tract: its int64 outputs `<bn>/input_size` (Size of a symbolic-batch tensor) come back
    # as tract's TDim, which its Python API cannot return (docs/portability.md, tract bug 3)


def test_bug3_tract_size_output_is_unreadable():
    """tract 0.23: a graph output computed by Size (or Shape) of a symbolic-batch input is a TDim tensor
    that the Python API refuses to return ("Unsupported DatumType in the public API TDim"), also
    through Cast to int64; through Cast to float it comes back.  The reproduction of bug 3."""
    pytest.importorskip("tract")
    import tract
    from portutil import run_tract

    for to, expect in ((TensorProto.INT64, None), (TensorProto.FLOAT, 12.0)):
        nodes = [helper.make_node("Size", ["x"], ["s0"]), helper.make_node("Cast", ["s0"], ["s"], to=to)]
        g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("s", to, [])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        feeds = {"x": np.zeros((4, 3), np.float32)}
        if expect is None:
            with pytest.raises(tract.TractError, match="Unsupported DatumType in the public API TDim"):
                run_tract(m, feeds)
        else:
            assert float(run_tract(m, feeds)["s"]) == expect


def _model(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _square_weight_model(n=4, rows=3):
    """y = x @ W^T (Gemm transB=1), z = u @ W (MatMul): one constant W (n, n) in two layouts, as a
    Linear layer's forward and the backward of its input gradient read it."""
    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return _model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fwd", transB=1),
                   helper.make_node("MatMul", ["u", "W"], ["z"], name="bwd")],
                  [_vi("x", [rows, n]), _vi("u", [rows, n])], [_vi("y", [rows, n]), _vi("z", [rows, n])],
                  [onnx.numpy_helper.from_array(w, "W")])


def test_bug4_openvino_square_weight_read_in_two_layouts():
    """OpenVINO 2026.4 CPU: a square constant W read by Gemm(transB=1) and by MatMul gives the
    MatMul W^T: ``z`` is wrong, ``y`` right (f32; a (4, 5) W, W as a graph input, or a separate
    initializer with the same values are right).  separate_backward_constants (target="portable")
    gives the second reader its own copy, after which both match onnxruntime.  Bug 4 of
    docs/portability.md; fails once OpenVINO fixes it."""
    pytest.importorskip("openvino")
    from portutil import run_openvino

    m = _square_weight_model()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "u": rng.standard_normal((3, 4)).astype(np.float32)}
    ref, got = run_onnxruntime(m, feeds), run_openvino(m, feeds)
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-6)
    assert max_rel_diff({"z": got["z"]}, {"z": ref["z"]}) > 0.1, "fixed upstream: z is right"
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    np.testing.assert_allclose(got["z"], feeds["u"] @ w.T, rtol=1e-5, atol=1e-5)  # the symptom: W^T
    assert separate_backward_constants(m, n_forward=1) == ["W"]
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.node[-1].input[1] != "W"
    got = run_openvino(m, feeds)
    assert max_rel_diff(got, run_onnxruntime(m, feeds)) <= 1e-6


def test_separate_backward_constants_scope():
    """Only float constants that a forward node also reads and whose shape has two equal dims > 1
    (or is unknown) are copied, with their forward cone (a Transpose of the export); graph inputs
    that are initializers (overridable) and non-square weights are left alone; values unchanged."""
    rng = np.random.default_rng(2)
    sq, rect = rng.standard_normal((4, 4)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["S"], ["St"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "St"], ["y"], name="fwd1"),
             helper.make_node("Gemm", ["x", "R"], ["y2"], name="fwd2", transB=1),
             helper.make_node("Transpose", ["St"], ["Stt"], name="bwd1", perm=[1, 0]),
             helper.make_node("MatMul", ["u", "Stt"], ["z"], name="bwd2"),
             helper.make_node("MatMul", ["u2", "R"], ["z2"], name="bwd3")]
    m = _model(nodes, [_vi("x", ["N", 4]), _vi("u", ["N", 4]), _vi("u2", ["N", 5])],
               [_vi("y", ["N", 4]), _vi("y2", ["N", 5]), _vi("z", ["N", 4]), _vi("z2", ["N", 4])],
               [onnx.numpy_helper.from_array(sq, "S"), onnx.numpy_helper.from_array(rect, "R")])
    feeds = {"x": rng.standard_normal((2, 4)).astype(np.float32), "u": rng.standard_normal((2, 4)).astype(np.float32),
             "u2": rng.standard_normal((2, 5)).astype(np.float32)}
    ref = run_onnxruntime(m, feeds)
    assert separate_backward_constants(m, n_forward=3) == ["St"]
    onnx.checker.check_model(m, full_check=True)
    bwd1 = next(n for n in m.graph.node if n.name == "bwd1")
    assert bwd1.input[0] != "St" and next(n for n in m.graph.node if n.name == "bwd3").input[1] == "R"
    copies = [n for n in m.graph.node if n.op_type in ("Constant", "Transpose") and n.name not in ("t", "bwd1")]
    assert [n.op_type for n in copies] == ["Constant", "Transpose"]  # S's copy, then the cone's Transpose
    got = run_onnxruntime(m, feeds)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert separate_backward_constants(m, n_forward=3 + 2) == []  # idempotent: the copies are not forward reads
    m2 = _model(nodes, list(m.graph.input) + [_vi("S", [4, 4])], list(m.graph.output),  # S overridable
                [onnx.numpy_helper.from_array(sq, "S"), onnx.numpy_helper.from_array(rect, "R")])
    assert separate_backward_constants(m2, n_forward=3) == []


def test_gradient_portable_copies_square_weights():
    """onnxbp.gradient(target="portable") applies bug 4's workaround: a square Linear weight's
    backward reads a copy; the default target leaves the model alone; both compute the same."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    m = _model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transB=1)], [_vi("x", ["N", 6])],
               [_vi("y", ["N", 6])], [onnx.numpy_helper.from_array(w, "W")])
    gp, gd = onnxbp.gradient(m, ["x", "W"], target="portable"), onnxbp.gradient(m, ["x", "W"])
    assert [n for n in gp.graph.node if n.op_type == "Constant" and n.name.startswith("portable/copy")]
    assert not [n for n in gd.graph.node if n.name.startswith("portable/copy")]
    feeds = {"x": rng.standard_normal((3, 6)).astype(np.float32), "y_grad": rng.standard_normal((3, 6)).astype(np.float32)}
    got, ref = run_onnxruntime(gp, feeds), run_onnxruntime(gd, feeds)
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)


def _maxpool_model(shape, k, s):
    n = len(shape) - 2
    out = list(shape[:2]) + [(d - k) // s + 1 for d in shape[2:]]
    return _model([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[k] * n, strides=[s] * n)],
                  [_vi("x", shape)], [_vi("y", out), _vi("i", out, TensorProto.INT64)])


def test_bug5_reference_maxpool_indices_stride1():
    """onnx.reference (1.23): MaxPool's Indices for a pool with every stride 1 (and dilation 1) are
    wrong: the window's argmax is decoded with the output's shape instead of the kernel's, and the
    (n, c) plane offset is left out.  Y is right; strided pools (another code path) are right.
    Inception's stride-1 3x3 pool branch hits it; portutil.run_reference_fixed routes Indices
    through the strided path.  Bug 5 of docs/portability.md; fails once onnx fixes it."""
    from onnx.reference import ReferenceEvaluator
    from portutil import run_reference_fixed

    m = _maxpool_model([1, 1, 2, 4], 2, 1)
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    y, i = ReferenceEvaluator(m).run(None, {"x": x})
    ref = run_onnxruntime(m, {"x": x})
    assert np.array_equal(y, ref["y"]) and ref["i"].ravel().tolist() == [5, 6, 7]
    assert i.ravel().tolist() == [4, 5, 6], "fixed upstream"  # (1, w) decoded in a (1, 3) output grid
    m2 = _maxpool_model([2, 3, 4, 4], 3, 1)
    x2 = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert not np.array_equal(ReferenceEvaluator(m2).run(None, {"x": x2})[1], run_onnxruntime(m2, {"x": x2})["i"])
    for mm, xx in ((m, x), (m2, x2), (_maxpool_model([2, 3, 5, 5], 3, 2), np.random.default_rng(1).standard_normal(
            (2, 3, 5, 5)).astype(np.float32))):
        assert np.array_equal(run_reference_fixed(mm, {"x": xx})["i"], run_onnxruntime(mm, {"x": xx})["i"])


def test_bug6_reference_grouped_conv_transpose():
    """onnx.reference (1.23): ConvTranspose with group > 1 works only depthwise (C/g = 1 output
    channel per group and as many input channels as groups): two outputs per group raise a
    broadcast error, two inputs per group a reshape error.
    target="portable" takes a grouped, non-depthwise conv's dX by the rotated-kernel Conv instead
    of ConvTranspose (rules/conv.py).  Bug 6 of docs/portability.md; fails once onnx fixes it."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(4)

    def run(cin, cout_per_group, group):
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=group, kernel_shape=[3, 3])
        m = _model([node], [_vi("x", [1, cin, 4, 4]), _vi("w", [cin, cout_per_group, 3, 3])],
                   [_vi("y", [1, cout_per_group * group, 6, 6])])
        feeds = {"x": rng.standard_normal((1, cin, 4, 4)).astype(np.float32),
                 "w": rng.standard_normal((cin, cout_per_group, 3, 3)).astype(np.float32)}
        return ReferenceEvaluator(m).run(None, feeds)[0], run_onnxruntime(m, feeds)["y"]

    got, ref = run(4, 1, 4)  # depthwise: right
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="could not broadcast"):  # 2 outputs per group (ResNeXt's dX)
        run(4, 2, 2)
    with pytest.raises(ValueError, match="cannot reshape"):  # 2 inputs per group (a channel multiplier's dX)
        run(4, 1, 2)


def test_bug7_reference_lrn_channels():
    """onnx.reference (1.23): LRN's square sum loops over the batch dimension instead of the
    channels, so channels >= N are divided by bias^beta alone (wrong values; an index error for N >
    C).  AlexNet's LRN hits it; portutil.run_reference_fixed sums over the channels.  Bug 7 of
    docs/portability.md; fails once onnx fixes it."""
    from onnx.reference import ReferenceEvaluator
    from portutil import run_reference_fixed

    m = _model([helper.make_node("LRN", ["x"], ["y"], size=3, alpha=0.01, beta=0.75, bias=2.0)],
               [_vi("x", [1, 6, 1, 1])], [_vi("y", [1, 6, 1, 1])])
    x = np.arange(1, 7, dtype=np.float32).reshape(1, 6, 1, 1)
    ref = run_onnxruntime(m, {"x": x})["y"]
    got = ReferenceEvaluator(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(got[0, 0], ref[0, 0], rtol=1e-6)  # channel 0 < N = 1: right
    np.testing.assert_allclose(got[0, 1:], x[0, 1:] / 2.0 ** 0.75, rtol=1e-6)  # the others: x / bias^beta
    assert not np.allclose(got, ref, rtol=1e-3), "fixed upstream"
    np.testing.assert_allclose(run_reference_fixed(m, {"x": x})["y"], ref, rtol=1e-6)
