"""Unknown ranks and broadcast axes after onnx's shape inference (issue 13).

Two halves:

* shape folding (``onnxbp.shapeinfo``) now evaluates the integer ops torch's exporters put in shape
  subgraphs that it used to skip: ``Mod`` (``unflatten``'s ``dim % rank``: torchvision's
  ``MultiheadAttention`` lost the rank of its packed q/k/v ``Squeeze``), ``Neg``/``Abs``/``Min``/
  ``Max``/``Equal``/``Where``/``Not``/``And``, ``Size`` and ``ReduceProd`` of a shape, and exact
  ``(Un)Squeeze`` values; it learns the output dims of ``Range`` (``torch.arange`` of a computed
  length), ``Tile`` and ``ConstantOfShape`` of folded values (DETR's masks and query embeddings).
  Every number asserted here is also what onnxruntime computes.
* ``GradContext.unbroadcast`` where a rank stays unknown: the summed axes are computed at run time
  from ``Shape(grad)`` and ``Shape(target)`` (opset >= 13) instead of refusing; graphs whose ranks
  are known are written as before.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbp
from onnxbp import shapeinfo
from gradutil import assert_fd, make_model, run_gradient, session


def _c(name, v, dtype=TensorProto.INT64):
    v = np.asarray(v)
    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name, dtype, list(v.shape), v.reshape(-1).tolist()))


def _runtime_shapes(model, feeds):
    """onnxruntime's shape of every node output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outs = [o for n in m.graph.node for o in n.output if o]
    del m.graph.output[:]
    for o in outs:
        m.graph.output.add().name = o
    return {o: v.shape for o, v in zip(outs, session(m).run(outs, feeds))}


def _unflatten_model():
    """torch's ``x.unflatten(-1, (3, E))`` as TorchScript writes it: the dim is normalised with Mod,
    the sizes around it are Slices of Shape(x) ending at that computed dim (torchvision MHA)."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"], name="shape"),
        _c("m1", [-1]), _c("r", [3]), _c("one", [1]), _c("zero", [0]), _c("big", [2 ** 62]),
        _c("parts", [3, 4]),
        helper.make_node("Add", ["m1", "r"], ["dim0"], name="add"),            # -1 + rank
        helper.make_node("Mod", ["dim0", "r"], ["dim"], name="mod"),           # (-1 + 3) % 3 = 2
        helper.make_node("Slice", ["s", "zero", "dim"], ["head"], name="head"),
        helper.make_node("Add", ["dim", "one"], ["dim1"], name="add1"),
        helper.make_node("Slice", ["s", "dim1", "big"], ["tail"], name="tail"),
        helper.make_node("Concat", ["head", "parts", "tail"], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["X", "target"], ["R"], name="reshape"),
        helper.make_node("Unsqueeze", ["R", "zero"], ["U"], name="unsq"),
        helper.make_node("Transpose", ["U"], ["T"], name="tr", perm=[3, 1, 2, 0, 4]),
        helper.make_node("Squeeze", ["T", "m1s"], ["S"], name="sq"),
        helper.make_node("Gather", ["S", "g1"], ["K"], name="gather", axis=0),
        helper.make_node("Mul", ["K", "W"], ["Y"], name="mul"),
    ]
    rng = np.random.default_rng(0)
    inits = {"m1s": np.array([3], np.int64), "g1": np.array(1, np.int64),
             "W": rng.standard_normal((4,)).astype(np.float32)}
    return make_model(nodes, [("X", np.float32, [5, 2, 12])], [("Y", np.float32, [5, 2, 4])], inits)


def test_mod_folds_unflatten_target():
    model = _unflatten_model()
    infos = shapeinfo.infer(model)
    assert infos["R"].shape == (5, 2, 3, 4)
    assert infos["S"].shape == (3, 5, 2, 4)
    assert infos["K"].shape == (5, 2, 4)
    x = np.random.default_rng(1).standard_normal((5, 2, 12)).astype(np.float32)
    rt = _runtime_shapes(model, {"X": x})
    for t in ("R", "U", "T", "S", "K"):
        assert infos[t].shape == rt[t], t
    folded = shapeinfo.folded_ints(model, infos)
    assert folded["dim"].tolist() == [2] and folded["target"].tolist() == [5, 2, 3, 4]


def test_mod_folded_gather_differentiates():
    """The rank the Gather rule needs was unknown before Mod folded ('rank ... unknown')."""
    model = _unflatten_model()
    x = np.random.default_rng(2).standard_normal((5, 2, 12)).astype(np.float32)
    _, _, grads, ups = run_gradient(model, {"X": x}, ["X", "W"])
    k = x.reshape(5, 2, 3, 4)[:, :, 1, :]
    u = ups["Y"]
    np.testing.assert_allclose(grads["W"], (u * k).sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)
    dx = np.zeros((5, 2, 3, 4), np.float32)
    dx[:, :, 1, :] = u * next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")
    np.testing.assert_allclose(grads["X"], dx.reshape(5, 2, 12), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,a,b,attrs,expect", [
    ("Mod", [-1, 5, 7], [3, 3, -3], {}, [2, 2, -2]),
    ("Mod", [-1, 5, 7], [3, 3, -3], {"fmod": 1}, [-1, 2, 1]),
    ("Max", [1, 8, 3], [4, 2, 3], {}, [4, 8, 3]),
    ("Min", [1, 8, 3], [4, 2, 3], {}, [1, 2, 3]),
])
def test_binary_integer_ops_fold(op, a, b, attrs, expect):
    node = helper.make_node(op, ["a", "b"], ["y"], **attrs)
    vals = {"a": np.array(a, dtype=object), "b": np.array(b, dtype=object)}
    assert shapeinfo._eval(node, vals, {}).tolist() == expect


def test_where_equal_expand_target_folds():
    """TorchScript's ``expand(-1, 4, -1)``: Where(Equal(sizes, -1), Shape(x), sizes); and Neg/Abs/Not."""
    vals = {"sizes": np.array([-1, 4, -1], dtype=object), "m1": np.array(-1, dtype=object),
            "s": np.array([2, 1, 8], dtype=object)}
    eq = shapeinfo._eval(helper.make_node("Equal", ["sizes", "m1"], ["eq"]), vals, {})
    assert eq.tolist() == [True, False, True]
    vals["eq"] = eq
    assert shapeinfo._eval(helper.make_node("Where", ["eq", "s", "sizes"], ["t"]), vals, {}).tolist() == [2, 4, 8]
    assert shapeinfo._eval(helper.make_node("Not", ["eq"], ["n"]), vals, {}).tolist() == [False, True, False]
    assert shapeinfo._eval(helper.make_node("Neg", ["s"], ["n"]), vals, {}).tolist() == [-2, -1, -8]
    assert shapeinfo._eval(helper.make_node("Abs", ["sizes"], ["n"]), vals, {}).tolist() == [1, 4, 1]


def test_size_and_reduce_prod_of_shape_fold():
    from onnxbp.types import TensorInfo

    infos = {"x": TensorInfo(TensorProto.FLOAT, (2, 3, 4))}
    assert int(shapeinfo._eval(helper.make_node("Size", ["x"], ["n"]), {}, infos)) == 24
    vals = {"s": np.array([2, 3, 4], dtype=object)}
    out = shapeinfo._eval(helper.make_node("ReduceProd", ["s"], ["p"], keepdims=0), vals, infos)
    assert out.shape == () and int(out) == 24
    out = shapeinfo._eval(helper.make_node("ReduceProd", ["s"], ["p"]), vals, infos)
    assert out.tolist() == [24]
    assert shapeinfo._eval(helper.make_node("Size", ["y"], ["n"]), {}, {"y": TensorInfo(1, ("N", 3))}) is None


@pytest.mark.parametrize("op,shape,axes,expect", [
    ("Squeeze", (1,), None, ()),
    ("Squeeze", (1, 3), [0], (3,)),
    ("Squeeze", (2, 1), [-1], (2,)),
    ("Unsqueeze", (), [0], (1,)),
    ("Unsqueeze", (3,), [0], (1, 3)),
    ("Unsqueeze", (3,), [-1], (3, 1)),
])
def test_squeeze_values_have_exact_shapes(op, shape, axes, expect):
    ins = ["a"] + (["ax"] if axes is not None else [])
    vals = {"a": np.arange(int(np.prod(shape))).astype(object).reshape(shape)}
    if axes is not None:
        vals["ax"] = np.array(axes, dtype=object)
    assert shapeinfo._eval(helper.make_node(op, ins, ["y"]), vals, {}).shape == expect


def _arange_tile_model():
    """DETR's masks and queries: ``torch.arange(w)`` with w from Shape, a Tile by a folded batch,
    ConstantOfShape of a folded shape; onnx leaves all three lengths unknown."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"], name="shape"),
        _c("i0", 0), _c("i2", 2), _c("one", 1), _c("ax0", [0]), _c("r2", [1, 1]),
        helper.make_node("Gather", ["s", "i2"], ["w"], name="gw"),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="gn"),
        helper.make_node("Cast", ["w"], ["wf"], name="castw", to=TensorProto.FLOAT),
        _c("zf", 0.0, TensorProto.FLOAT), _c("onef", 1.0, TensorProto.FLOAT),
        helper.make_node("Range", ["zf", "wf", "onef"], ["ar"], name="range"),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="un"),
        helper.make_node("Concat", ["n1", "r2"], ["reps"], name="cat", axis=0),
        helper.make_node("Unsqueeze", ["Q", "ax0"], ["Q1"], name="uq"),
        helper.make_node("Tile", ["Q1", "reps"], ["QT"], name="tile"),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], name="cos",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["X", "ones"], ["XO"], name="mulo"),
        helper.make_node("MatMul", ["XO", "QT"], ["M"], name="mm"),
        helper.make_node("Add", ["M", "ar"], ["Y"], name="add"),
    ]
    rng = np.random.default_rng(3)
    return make_model(nodes, [("X", np.float32, [2, 3, 5])], [("Y", np.float32, [2, 3, 5])],
                      {"Q": rng.standard_normal((5, 5)).astype(np.float32)})


def test_range_tile_constant_of_shape_dims():
    model = _arange_tile_model()
    infos = shapeinfo.infer(model)
    assert infos["ar"].shape == (5,)
    assert infos["QT"].shape == (2, 5, 5)
    assert infos["ones"].shape == (2, 3, 5) and infos["ones"].elem_type == TensorProto.FLOAT
    assert infos["Y"].shape == (2, 3, 5)
    x = np.random.default_rng(4).standard_normal((2, 3, 5)).astype(np.float32)
    rt = _runtime_shapes(model, {"X": x})
    for t in ("ar", "QT", "ones", "M", "Y"):
        assert infos[t].shape == rt[t], t


def test_range_dims():
    o = lambda v: np.array(v, dtype=object)
    assert shapeinfo._range_dims([o(0), o(7), o(2)]) == [4]
    assert shapeinfo._range_dims([o(5), o(0), o(-2)]) == [3]
    assert shapeinfo._range_dims([o(3), o(1), o(1)]) == [0]
    assert shapeinfo._range_dims([o(0.0), o(2.5), o(0.5)]) == [5]
    assert shapeinfo._range_dims([o(0), None, o(1)]) is None
    assert shapeinfo._range_dims([o(0), o("N"), o(1)]) == ["N"]  # torch.arange(batch)
    assert shapeinfo._range_dims([o(1), o("N"), o(1)]) is None
    assert shapeinfo._range_dims([o(0), o("unk__3"), o(1)]) is None


# --------------------------------------------------------------- unbroadcast at run time
def _unknown_rank_add(opset=17, op="Add", b_shape=(1, 4)):
    """R = Reshape(X, S) with S fed at run time: R's rank is unknown, so is that of Z = R op B.
    Y = ReduceSum(Z * Reshape(UX, SZ)) (a scalar, so the output's rank is known): the upstream of Z
    is UX in Z's shape, and Z * U is a second product of unknown ranks."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Reshape", ["X", "S"], ["R"], name="rs"),
             helper.make_node(op, ["R", "B"], ["Z"], name="bin"),
             helper.make_node("Reshape", ["UX", "SZ"], ["U"], name="rsu"),
             helper.make_node("Mul", ["Z", "U"], ["ZU"], name="mulu"),
             helper.make_node("ReduceSum", ["ZU"], ["Y"], name="sum", keepdims=0)]
    return make_model(nodes, [("X", np.float32, [2, 3, 4]), ("S", np.int64, ["k"]), ("UX", np.float32, [24]),
                              ("SZ", np.int64, ["kz"])],
                      [("Y", np.float32, [])], {"B": rng.standard_normal(b_shape).astype(np.float32)},
                      opset=opset)


def _feeds(s, b_shape, seed=6):
    rng = np.random.default_rng(seed)
    zshape = np.broadcast_shapes(tuple(s), tuple(b_shape))
    return {"X": rng.standard_normal((2, 3, 4)).astype(np.float32), "S": np.array(s, np.int64),
            "UX": rng.standard_normal((24,)).astype(np.float32), "SZ": np.array(zshape, np.int64)}


def _sum_to(shape, t):
    lead = t.ndim - len(shape)
    t = t.sum(axis=tuple(range(lead))) if lead > 0 else t
    return t.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1 and t.shape[i] != 1), keepdims=True)


@pytest.mark.parametrize("op,b_shape,s", [
    ("Add", (1, 4), [2, 3, 4]),      # B broadcast over the leading axis and axis 1
    ("Add", (4,), [6, 4]),           # B's rank below R's: leading axis summed away
    ("Mul", (3, 1), [2, 3, 4]),      # broadcast over the last axis
    ("Sub", (1, 1, 1, 1), [6, 4]),   # B's rank above R's: R broadcast, B summed everywhere
    ("Add", (24,), [24]),            # nothing broadcast: the reductions are no-ops
])
def test_unbroadcast_unknown_rank_sums_at_run_time(op, b_shape, s):
    model = _unknown_rank_add(op=op, b_shape=b_shape)
    feeds = _feeds(s, b_shape)
    gm, _, grads, ups = run_gradient(model, feeds, ["X", "B"])
    assert sum(n.op_type == "NonZero" for n in gm.graph.node) >= 2  # the summed axes are computed at run time
    b = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "B")
    r = feeds["X"].reshape(s)
    zshape = tuple(feeds["SZ"])
    u = feeds["UX"].reshape(zshape) * ups["Y"]
    if op == "Mul":
        db_full, dr_full = u * r, u * b
    else:
        db_full, dr_full = (u if op == "Add" else -u), u
    np.testing.assert_allclose(grads["B"], _sum_to(b_shape, np.broadcast_to(db_full, zshape)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["X"], _sum_to(r.shape, np.broadcast_to(dr_full, zshape)).reshape(2, 3, 4),
                               rtol=1e-5, atol=1e-5)
    assert grads["B"].shape == b_shape and grads["X"].shape == (2, 3, 4)


def test_unbroadcast_unknown_rank_matches_finite_differences():
    model = _unknown_rank_add(op="Mul", b_shape=(3, 1))
    assert_fd(model, ["X", "B"], feeds=_feeds([2, 3, 4], (3, 1), seed=7))


def test_unbroadcast_unknown_rank_old_opset_still_refused():
    model = _unknown_rank_add(opset=11)
    with pytest.raises(onnxbp.ShapeError, match=r"rank of tensor .* is unknown.*opset >= 13 \(model has 11\)"):
        onnxbp.gradient(model, ["B"])


def test_known_ranks_keep_their_static_reduction():
    """Where the ranks are known nothing runtime is written (the graphs of before)."""
    rng = np.random.default_rng(8)
    model = make_model([helper.make_node("Add", ["X", "B"], ["Y"], name="add")],
                       [("X", np.float32, ["N", 3, 4])], [("Y", np.float32, ["N", 3, 4])],
                       {"B": rng.standard_normal((1, 4)).astype(np.float32)})
    gm = onnxbp.gradient(model, ["B"])
    ops = [n.op_type for n in gm.graph.node]
    assert "NonZero" not in ops and "Shape" not in ops and ops.count("ReduceSum") == 2


# --------------------------------------------------------------- values folded from shapes
def test_reduce_axes_computed_from_shape_are_static():
    """``x.sum(dim=-1)`` with the dim computed from the rank (Size(Shape(X)) - 1): the static path,
    no runtime Unsqueeze of the axes tensor."""
    nodes = [helper.make_node("Shape", ["X"], ["s"], name="shape"),
             helper.make_node("Size", ["s"], ["rank"], name="size"),
             _c("one", 1), _c("ax0", [0]),
             helper.make_node("Sub", ["rank", "one"], ["last"], name="sub"),
             helper.make_node("Unsqueeze", ["last", "ax0"], ["axes"], name="unsq"),
             helper.make_node("ReduceSum", ["X", "axes"], ["Y"], name="sum", keepdims=0)]
    model = make_model(nodes, [("X", np.float32, [2, 3, 4])], [("Y", np.float32, [2, 3])])
    infos = shapeinfo.infer(model)
    assert shapeinfo.folded_ints(model, infos)["axes"].tolist() == [2]
    x = np.random.default_rng(9).standard_normal((2, 3, 4)).astype(np.float32)
    gm, _, grads, ups = run_gradient(model, {"X": x}, ["X"])
    bwd = [n for n in gm.graph.node if n.doc_string.startswith("onnxbp")]
    assert not any(n.op_type == "Unsqueeze" and "axes" in n.input for n in bwd)
    np.testing.assert_allclose(grads["X"], np.broadcast_to(ups["Y"][..., None], x.shape), rtol=0, atol=0)


def test_reflect_pad_with_computed_pads_differentiates():
    """TorchScript's F.pad(x, (1, w - 3), mode='reflect') writes its pads from Shape(x): the border
    modes need the pads at build time, which the folding now gives."""
    nodes = [helper.make_node("Shape", ["X"], ["s"], name="shape"),
             _c("i3", [3]), _c("c3", [3]), _c("head", [0, 0, 0, 1, 0, 0, 0]),
             helper.make_node("Gather", ["s", "i3"], ["w"], name="gw"),
             helper.make_node("Sub", ["w", "c3"], ["after"], name="sub"),      # 5 - 3 = 2
             helper.make_node("Concat", ["head", "after"], ["pads"], name="cat", axis=0),
             helper.make_node("Pad", ["X", "pads"], ["Y"], name="pad", mode="reflect")]
    model = make_model(nodes, [("X", np.float32, [1, 2, 3, 5])], [("Y", np.float32, [1, 2, 3, 8])])
    x = np.random.default_rng(10).standard_normal((1, 2, 3, 5)).astype(np.float32)
    _, outs, _, _ = run_gradient(model, {"X": x}, ["X"])
    assert outs["Y"].shape == (1, 2, 3, 8)
    # the adjoint of numpy's reflect pad, by the finite-difference checker
    assert_fd(model, ["X"], feeds={"X": x})


def test_squeeze_with_computed_axes_keeps_symbolic_dims():
    """Squeeze(X, Sub(Size(Shape(X)), 2)) with a symbolic batch: onnx leaves the rank unknown."""
    nodes = [helper.make_node("Shape", ["X"], ["s"], name="shape"),
             helper.make_node("Size", ["s"], ["rank"], name="size"),
             _c("two", 2), _c("ax0", [0]),
             helper.make_node("Sub", ["rank", "two"], ["ax"], name="sub"),
             helper.make_node("Unsqueeze", ["ax", "ax0"], ["axes"], name="unsq"),
             helper.make_node("Squeeze", ["X", "axes"], ["Q"], name="sq"),
             helper.make_node("Identity", ["Q"], ["Y"], name="id")]
    model = make_model(nodes, [("X", np.float32, ["N", 3, 1, 4])], [("Y", np.float32, ["N", 3, 4])])
    infos = shapeinfo.infer(model)
    assert infos["Q"].shape == ("N", 3, 4)
    x = np.zeros((2, 3, 1, 4), np.float32)
    assert _runtime_shapes(model, {"X": x})["Q"] == (2, 3, 4)


def test_cast_of_comparisons_folds():
    vals = {"a": np.array([1, 4, 1], dtype=object), "one": np.array(1, dtype=object)}
    vals["eq"] = shapeinfo._eval(helper.make_node("Equal", ["a", "one"], ["eq"]), vals, {})
    cast = lambda to: shapeinfo._eval(helper.make_node("Cast", ["eq"], ["c"], to=to), vals, {}).tolist()
    assert cast(TensorProto.INT64) == [1, 0, 1]
    assert cast(TensorProto.BOOL) == [True, False, True]
    vals["i"] = np.array([0, 3], dtype=object)
    assert shapeinfo._eval(helper.make_node("Cast", ["i"], ["c"], to=TensorProto.BOOL), vals, {}).tolist() == [False, True]


# --------------------------------------------------------------- a symbolic batch carried through
def _class_token_model():
    """torchvision ViT's ``class_token.expand(n, -1, -1)`` (TorchScript: Where(Equal(t, -1), 1, t)),
    a ``repeat(n, 1, 1)`` Tile and DETR's ``interpolate(mask[None], size=feat.shape[-2:])``, with
    a symbolic batch: onnx names each of those batches afresh ("unk__N")."""
    nodes = [
        helper.make_node("Shape", ["X"], ["s"], name="shape"),
        _c("i0", 0), _c("ax0", [0]), _c("m1", [-1]), _c("m1s", -1), _c("ones3", [1, 1, 1]), _c("r11", [1, 1]),
        helper.make_node("Gather", ["s", "i0"], ["n"], name="gn"),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="un"),
        helper.make_node("Concat", ["n1", "m1", "m1"], ["t"], name="cat", axis=0),
        helper.make_node("Equal", ["t", "m1s"], ["eq"], name="eq"),
        helper.make_node("Where", ["eq", "ones3", "t"], ["target"], name="where"),
        helper.make_node("Expand", ["C", "target"], ["CE"], name="expand"),
        helper.make_node("Concat", ["CE", "X"], ["XC"], name="catx", axis=1),
        helper.make_node("Concat", ["n1", "r11"], ["reps"], name="catr", axis=0),
        helper.make_node("Tile", ["C", "reps"], ["CT"], name="tile"),
        helper.make_node("Add", ["XC", "CT"], ["Y"], name="add"),
        # the mask: Resize(M[None], sizes=[1, N, 2, 2])
        helper.make_node("Unsqueeze", ["M", "ax0"], ["M1"], name="um"),
        helper.make_node("Shape", ["M1"], ["sm"], name="shm", end=2),
        _c("hw", [2, 2]),
        helper.make_node("Concat", ["sm", "hw"], ["sizes"], name="cats", axis=0),
        helper.make_node("Resize", ["M1", "", "", "sizes"], ["MR"], name="resize", mode="nearest"),
        helper.make_node("ReduceSum", ["MR"], ["Z"], name="sum", keepdims=0),
    ]
    rng = np.random.default_rng(11)
    return make_model(nodes, [("X", np.float32, ["N", 16, 32]), ("M", np.float32, ["N", 8, 8])],
                      [("Y", np.float32, ["N", 17, 32]), ("Z", np.float32, [])],
                      {"C": rng.standard_normal((1, 1, 32)).astype(np.float32)})


def test_symbolic_batch_through_expand_tile_resize():
    model = _class_token_model()
    infos = shapeinfo.infer(model)
    assert infos["target"].shape == (3,)
    assert shapeinfo.folded_ints(model, infos).get("target") is None  # 'N' is not a build-time int
    assert infos["CE"].shape == ("N", 1, 32)
    assert infos["XC"].shape == ("N", 17, 32)
    assert infos["CT"].shape == ("N", 1, 32)
    assert infos["MR"].shape == (1, "N", 2, 2)
    rng = np.random.default_rng(12)
    feeds = {"X": rng.standard_normal((3, 16, 32)).astype(np.float32),
             "M": rng.standard_normal((3, 8, 8)).astype(np.float32)}
    rt = _runtime_shapes(model, feeds)
    for t in ("CE", "XC", "CT", "MR"):
        assert tuple(3 if d == "N" else d for d in infos[t].shape) == rt[t], t
    # the class token's gradient: the Expand's copies (row 0 of every batch) plus the Tile's,
    # broadcast over all 17 rows
    _, _, grads, ups = run_gradient(model, feeds, ["C"])
    u = ups["Y"]
    want = u[:, :1, :].sum(axis=0, keepdims=True) + u.sum(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(grads["C"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x,y,expect", [("N", -1, False), (-1, "N", False), ("N", "N", True),
                                        ("N", 1, None), ("N", "M", None), ("unk__3", -1, False)])
def test_equal_on_symbols(x, y, expect):
    vals = {"a": np.array([x], dtype=object), "b": np.array([y], dtype=object)}
    assert shapeinfo._eval(helper.make_node("Equal", ["a", "b"], ["e"]), vals, {}).tolist() == [expect]


def test_expand_value_folds_conv_bias_shape():
    """The dynamo exporter's Conv without bias: B = Expand(CastLike(0, X), Expand(Shape(W)[:1], [1]))."""
    nodes = [helper.make_node("Shape", ["W"], ["sw"], name="sw", start=0, end=1),
             helper.make_node("Constant", [], ["one"], name="one", value_ints=[1]),
             helper.make_node("Expand", ["sw", "one"], ["bshape"], name="e1"),
             _c("zero", 0.0, TensorProto.FLOAT),
             helper.make_node("CastLike", ["zero", "X"], ["z"], name="cl"),
             helper.make_node("Expand", ["z", "bshape"], ["B"], name="e2"),
             helper.make_node("Conv", ["X", "W", "B"], ["C"], name="conv", kernel_shape=[1, 1]),
             helper.make_node("Identity", ["C"], ["Y"], name="id")]
    rng = np.random.default_rng(13)
    model = make_model(nodes, [("X", np.float32, [1, 2, 3, 3])], [("Y", np.float32, [1, 6, 3, 3])],
                       {"W": rng.standard_normal((6, 2, 1, 1)).astype(np.float32)})
    infos = shapeinfo.infer(model)
    assert shapeinfo.folded_ints(model, infos)["bshape"].tolist() == [6]
    assert infos["B"].shape == (6,)
    vals = {"a": np.array([2, 3], dtype=object), "t": np.array([2, 1], dtype=object)}
    out = shapeinfo._eval(helper.make_node("Expand", ["a", "t"], ["y"]), vals, {})
    assert out.tolist() == [[2, 3], [2, 3]]


def test_cast_to_float_divides_as_floats():
    """ceil(h / 2) as TorchScript writes it: Cast(h, float) / Cast(2, float) -> Ceil -> Cast(int)."""
    vals = {"h": np.array(7, dtype=object), "two": np.array(2, dtype=object)}
    for name in ("h", "two"):
        vals[name + "f"] = shapeinfo._eval(helper.make_node("Cast", [name], [name + "f"], to=TensorProto.FLOAT),
                                           vals, {})
    vals["q"] = shapeinfo._eval(helper.make_node("Div", ["hf", "twof"], ["q"]), vals, {})
    assert float(vals["q"]) == 3.5
    assert int(shapeinfo._eval(helper.make_node("Ceil", ["q"], ["c"]), vals, {})) == 4
    r = shapeinfo._eval(helper.make_node("Range", ["two", "h", "two"], ["r"]), vals, {})
    assert r.tolist() == [2, 4, 6]
    r = shapeinfo._eval(helper.make_node("Range", ["twof", "hf", "twof"], ["r"]), vals, {})
    assert r.tolist() == [2.0, 4.0, 6.0]
