"""Shape inference for the engine: onnx's, plus folding of integer shape subgraphs.

Exporters compute Reshape targets at run time: ``Shape -> Gather -> Div ->
Cast -> Unsqueeze -> Concat -> Reshape`` (channel shuffles, head splits).
onnx's data propagation stops at some of these ops, leaving the dims after
the Reshape unknown, although they are static except for the batch.  This
module evaluates such small integer subgraphs on partially known values
(ints, symbolic dim names, or unknown), writes the dims it learns for
Reshape/Expand/Slice/Pad/(Un)Squeeze/Range/Tile/Resize/ConstantOfShape
outputs (and GroupNormalization's, which onnx does not infer) back as
value_info, and lets onnx infer the rest again.  The integer ops evaluated are
those exporters write in shape subgraphs: Shape/Size/Gather/Slice/Concat,
arithmetic with Mod (torch normalises dims as ``(d + rank) % rank``),
Min/Max, comparisons, Where and the logic ops (TorchScript's ``expand(-1)``
targets), Cast, Range, ConstantOfShape, a shape's ReduceProd.  A learned dim
replaces an onnx one when it is static, or a named symbol where onnx wrote a
fresh ``unk__N`` (a symbolic batch carried through Expand/Tile targets).
Nothing here changes the model the user gets back.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .modelio import skeleton
from .types import TensorInfo

log = logging.getLogger(__name__)

_MAX_ELEMENTS = 64  # only small integer tensors are shape vectors


def infer(model: onnx.ModelProto, rounds: int = 32) -> dict:
    """``{tensor name: TensorInfo}`` for every tensor shape inference reaches."""
    work = skeleton(model)  # large weights' values never matter to shapes
    if work is model:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    infos = tensor_infos(_onnx_infer(work))
    for _ in range(rounds):
        learned = _fold(work, infos)
        if not learned:
            break
        by_name = {vi.name: vi for vi in work.graph.value_info}
        for name, (elem, dims) in learned.items():
            vi = by_name.get(name)
            if vi is None:
                vi = work.graph.value_info.add()
                vi.name = name
            vi.CopyFrom(helper.make_tensor_value_info(name, elem, dims))
        log.debug("shape folding learned the dims of %d tensors", len(learned))
        infos = tensor_infos(_onnx_infer(work))
    _ceil_pool_outputs(work, infos)
    return infos


def _dims_of(value) -> list:
    """A folded shape vector as dims: ints, symbol names, None where unknown."""
    return [_as_int(v) if _as_int(v) is not None else v if isinstance(v, str) else None
            for v in np.asarray(value, dtype=object).reshape(-1)]


def _spatial(info: Optional[TensorInfo]) -> Optional[tuple]:
    return None if info is None or info.shape is None else tuple(info.shape[2:])


def _ceil_pool_outputs(model: onnx.ModelProto, infos: dict) -> None:
    """A ceil_mode pool output read only by Slices to onnxruntime's size (``onnxbp.repair``) has that
    size at run time, although onnx infers the window onnxruntime drops: record the runtime shape."""
    from .repair import runtime_spatial

    readers: dict = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    for node in model.graph.node:
        if node.op_type not in ("MaxPool", "AveragePool") or node.domain not in ("", "ai.onnx"):
            continue
        runtime = runtime_spatial(node, infos)
        for y in node.output[:2]:
            info = infos.get(y)
            if runtime is None or not y or info is None or info.shape is None or len(info.shape) != len(runtime) + 2:
                continue
            want = tuple(info.shape[:2]) + tuple(runtime)
            users = readers.get(y, [])
            if users and tuple(info.shape) != want and all(
                    u.op_type == "Slice" and u.input[0] == y and y not in u.input[1:]
                    and _spatial(infos.get(u.output[0])) == tuple(runtime) for u in users):
                infos[y] = TensorInfo(info.elem_type, want)


def _onnx_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                 data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference failure is reported, analysis goes on
        log.warning("shape inference failed (%s); shapes stay unknown", str(exc).splitlines()[0])
        return model


def tensor_infos(model: onnx.ModelProto) -> dict:
    infos: dict = {}

    def from_type(tp: onnx.TypeProto) -> Optional[TensorInfo]:
        if not tp.HasField("tensor_type"):
            return None
        tt = tp.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
        return TensorInfo(tt.elem_type, shape)

    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        info = from_type(vi.type)
        if info is not None:
            old = infos.get(vi.name)
            if old is None or _known(info.shape) > _known(old.shape):
                infos[vi.name] = info
    for init in g.initializer:
        infos[init.name] = TensorInfo(init.data_type, tuple(init.dims))
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    infos[node.output[0]] = TensorInfo(a.t.data_type, tuple(a.t.dims))
    return infos


def _known(shape) -> int:
    if shape is None:
        return -1
    return sum(isinstance(d, int) for d in shape)


# --------------------------------------------------------------------------- folding
def _fold(model: onnx.ModelProto, infos: dict) -> dict:
    """Evaluate small integer subgraphs; return improved (elem_type, dims) of shaped outputs."""
    vals: dict = {}
    for init in model.graph.initializer:
        if init.data_type in _INT_TYPES and int(np.prod(init.dims)) <= _MAX_ELEMENTS:
            vals[init.name] = numpy_helper.to_array(init).astype(object)
    learned: dict = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            out = _eval(node, vals, infos)
        except Exception:  # noqa: BLE001 - anything unexpected: leave this value unknown
            out = None
        if out is not None and node.output:
            vals[node.output[0]] = out
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in vals:
            dims = _reshape_dims(infos.get(node.input[0]), vals[node.input[1]], _attr(node, "allowzero", 0))
            _learn(learned, infos, node.output[0], node.input[0], dims)
        elif node.op_type == "Slice" and len(node.input) >= 3 and all(
                i in vals for i in node.input[1:] if i):
            _learn(learned, infos, node.output[0], node.input[0],
                   _slice_dims(infos.get(node.input[0]), [vals[i] if i else None for i in node.input[1:]]))
        elif node.op_type == "Unsqueeze" and len(node.input) > 1 and node.input[1] in vals:
            src = infos.get(node.input[0])
            axes = [_as_int(v) for v in np.asarray(vals[node.input[1]]).reshape(-1)]
            if src is not None and src.shape is not None and None not in axes:
                rank = len(src.shape) + len(axes)
                axes = sorted(a % rank for a in axes)
                rest = iter(src.shape)
                _learn(learned, infos, node.output[0], node.input[0],
                       [1 if k in axes else next(rest) for k in range(rank)])
        elif node.op_type == "Squeeze" and len(node.input) > 1 and node.input[1] in vals:
            src = infos.get(node.input[0])
            axes = [_as_int(v) for v in np.asarray(vals[node.input[1]]).reshape(-1)]
            if src is not None and src.shape is not None and src.shape and None not in axes:
                rank = len(src.shape)
                drop = {a % rank for a in axes}
                _learn(learned, infos, node.output[0], node.input[0],
                       [d for k, d in enumerate(src.shape) if k not in drop])
        elif node.op_type == "Pad" and len(node.input) > 1 and node.input[1] in vals:
            # F.pad's TorchScript pads are computed (ConstantOfShape, Concat, Reshape, Slice, Transpose)
            src = infos.get(node.input[0])
            axes = vals.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if src is not None and src.shape is not None and (len(node.input) <= 3 or not node.input[3]
                                                               or axes is not None):
                _learn(learned, infos, node.output[0], node.input[0],
                       _pad_dims(list(src.shape), vals[node.input[1]], axes))
        elif node.op_type == "GroupNormalization" and node.input and node.output:
            # onnx has no shape inference for it (a function op): Y has X's type and shape
            src = infos.get(node.input[0])
            if src is not None and src.shape is not None:
                _learn(learned, infos, node.output[0], node.input[0], list(src.shape))
        elif node.op_type == "Range" and len(node.input) == 3:
            # torch.arange(n) of a computed n: onnx infers the length only of constant bounds
            _learn(learned, infos, node.output[0], node.input[0], _range_dims([vals.get(i) for i in node.input]))
        elif node.op_type == "Tile" and len(node.input) > 1 and node.input[1] in vals:
            src = infos.get(node.input[0])
            reps = list(np.asarray(vals[node.input[1]], dtype=object).reshape(-1))
            if src is not None and src.shape is not None and len(reps) == len(src.shape):
                _learn(learned, infos, node.output[0], node.input[0],
                       [d * int(r) if isinstance(d, int) and _as_int(r) is not None
                        else d if _as_int(r) == 1 else r if d == 1 and isinstance(r, str) else None
                        for d, r in zip(src.shape, reps)])
        elif node.op_type == "Resize" and len(node.input) > 3 and node.input[3] in vals \
                and _attr(node, "axes", None) is None \
                and _attr(node, "keep_aspect_ratio_policy", "stretch") in ("stretch", b"stretch"):
            # sizes from Shape (interpolate(mask, size=feature.shape[-2:])): the output dims are the sizes
            sizes = _dims_of(vals[node.input[3]])
            src = infos.get(node.input[0])
            if src is not None and src.shape is not None and len(sizes) == len(src.shape):
                _learn(learned, infos, node.output[0], node.input[0], sizes)
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in vals:
            dims = _dims_of(vals[node.input[0]])
            t = _attr(node, "value", None)
            elem = t.data_type if t is not None else onnx.TensorProto.FLOAT
            _learn(learned, infos, node.output[0], None, dims, elem=elem)
        elif node.op_type == "Expand" and len(node.input) > 1 and node.input[1] in vals:
            src = infos.get(node.input[0])
            target = list(vals[node.input[1]].reshape(-1))
            if src is not None and src.shape is not None:
                dims = _broadcast(list(src.shape), target)
                _learn(learned, infos, node.output[0], node.input[0], dims)
    return learned


_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def folded_ints(model: onnx.ModelProto, infos: dict) -> dict:
    """``{tensor: np.ndarray}``: the small integer tensors whose every element the folding above
    computes from constants and static dims alone (no symbolic dim, nothing read at run time).

    An exporter writes a Slice's axes or starts as ``Reshape(Cast(Constant))`` or ``Shape -> Gather
    -> Add``: values that are fixed once the shapes are static, which ``GraphView.known_value``
    hands to the rules that need them at build time.  Initializers that are also graph inputs
    (a fed value overrides them) are left out, and so is everything computed from them.
    """
    inputs = {i.name for i in model.graph.input}
    vals: dict = {}
    for init in model.graph.initializer:
        if init.name not in inputs and init.data_type in _INT_TYPES and int(np.prod(init.dims)) <= _MAX_ELEMENTS:
            vals[init.name] = numpy_helper.to_array(init).astype(object)
    out: dict = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        try:
            v = _eval(node, vals, infos)
        except Exception:  # noqa: BLE001 - anything unexpected: leave this value unknown
            v = None
        if v is None:
            continue
        vals[node.output[0]] = v
        info = infos.get(node.output[0])
        elem = info.elem_type if info is not None else None
        flat = np.asarray(v, dtype=object).reshape(-1)
        if elem in _INT_TYPES and all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in flat):
            dtype = np.int64 if elem == onnx.TensorProto.INT64 else np.int32
            out[node.output[0]] = np.asarray(v, dtype=object).astype(dtype)
    return out


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _learn(learned, infos, out, src, dims, elem=None):
    if dims is None:
        return
    old = infos.get(out)
    elem = elem or (infos.get(src) or TensorInfo()).elem_type
    if not elem:
        return
    # onnx names dims it could not infer "unk__N": those are unknowns, not symbols.
    dims = [d if isinstance(d, int) or (isinstance(d, str) and not d.startswith("unk__")) else None
            for d in dims]
    if old is not None and old.shape is not None and len(old.shape) == len(dims):
        dims = [o if isinstance(o, int) or _named(o) else d if d is not None else o for o, d in zip(old.shape, dims)]
        # better: more static dims, or as many and more named symbols (a symbolic batch carried
        # through Expand/Tile/Range targets instead of onnx's fresh "unk__N")
        if (_known(tuple(dims)), _symbols(dims)) <= (_known(old.shape), _symbols(old.shape)):
            return
    learned[out] = (elem, dims)


def _named(d) -> bool:
    return isinstance(d, str) and not d.startswith("unk__")


def _symbols(shape) -> int:
    return sum(_named(d) for d in shape)


def _as_int(v):
    return int(v) if isinstance(v, (int, np.integer)) else None


def _eval(node, vals, infos) -> Optional[np.ndarray]:
    op, ins = node.op_type, list(node.input)
    get = vals.get
    if op == "Constant":
        t = _attr(node, "value", None)
        if isinstance(t, onnx.TensorProto) and t.data_type in _INT_TYPES | {onnx.TensorProto.FLOAT} \
                and int(np.prod(t.dims)) <= _MAX_ELEMENTS:
            return numpy_helper.to_array(t).astype(object)
        ints = _attr(node, "value_ints", None)  # the dynamo exporter's [-1] Reshape targets
        if ints is not None and len(ints) <= _MAX_ELEMENTS:
            return np.array([int(v) for v in ints], dtype=object)
        one = _attr(node, "value_int", None)
        return None if one is None else np.array(int(one), dtype=object)
    if op == "Shape":
        info = infos.get(ins[0])
        if info is None or info.shape is None:
            return None
        dims = list(info.shape)
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return np.array(dims[start:end] if end is not None else dims[start:], dtype=object)
    if op == "Size":  # torch's numel
        info = infos.get(ins[0])
        if info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape):
            return None
        return np.array(int(np.prod(info.shape, dtype=np.int64)), dtype=object)
    if any(i and i not in vals for i in ins[:1]):
        return None
    a = get(ins[0]) if ins else None
    if op in ("Identity", "Cast", "Floor", "Ceil"):
        if op == "Floor":
            return _map(a, lambda v: int(np.floor(v)))
        if op == "Ceil":
            return _map(a, lambda v: int(np.ceil(v)))
        to = _attr(node, "to", None)
        if to in _INT_TYPES:
            return _map(_map_bool(a, int), lambda v: int(v))
        if to == onnx.TensorProto.BOOL:
            return _map_bool(_map(a, bool), bool)
        if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            return _map(_map_bool(a, float), float)  # so that a Div after it divides as floats
        return a
    if op == "Gather":
        idx = get(ins[1]) if len(ins) > 1 else None
        if idx is None or _attr(node, "axis", 0) != 0 or a.ndim != 1:
            return None
        return np.array(a[np.asarray(idx, dtype=np.int64)], dtype=object)
    if op in ("Unsqueeze", "Squeeze"):
        return _squeeze_value(node, a, vals)
    if op in ("Neg", "Abs", "Sign", "Not"):
        fn = {"Neg": lambda v: -v, "Abs": abs, "Sign": lambda v: (v > 0) - (v < 0), "Not": lambda v: not v}[op]
        ok = _is_bool if op == "Not" else _num
        a = np.asarray(a, dtype=object)
        return np.array([fn(v) if ok(v) else None for v in a.reshape(-1)], dtype=object).reshape(a.shape)
    if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin") and np.ndim(a) == 1 \
            and (len(ins) < 2 or not ins[1]) and not _attr(node, "axes", None):
        # a shape vector reduced to its numel (x.numel() through Shape -> ReduceProd) or largest dim
        flat = list(np.asarray(a, dtype=object).reshape(-1))
        if not all(_num(v) for v in flat):
            return None
        fn = {"ReduceProd": lambda v: int(np.prod(v, dtype=np.int64)) if v else 1, "ReduceSum": lambda v: sum(v),
              "ReduceMax": max, "ReduceMin": min}[op]
        if op in ("ReduceMax", "ReduceMin") and not flat:
            return None
        out = np.array(fn(flat), dtype=object)
        return out.reshape([1]) if _attr(node, "keepdims", 1) else out
    if op == "Reshape":  # a small integer tensor to a static target ([-1], [1], a scalar's [])
        target = get(ins[1]) if len(ins) > 1 else None
        if target is None or not all(isinstance(d, (int, np.integer)) for d in np.asarray(target).reshape(-1)):
            return None
        dims = [int(d) for d in np.asarray(target).reshape(-1)]
        if _attr(node, "allowzero", 0) == 0:
            dims = [np.shape(a)[i] if d == 0 and i < np.ndim(a) else d for i, d in enumerate(dims)]
        return np.asarray(a, dtype=object).reshape(dims)
    if op == "Concat":
        if any(i not in vals for i in ins) or _attr(node, "axis", 0) not in (0, -1):
            return None
        return np.concatenate([np.asarray(vals[i], dtype=object).reshape(-1) for i in ins])
    if op in _BINARY:
        b = get(ins[1])
        if b is None:
            return None
        fn = _BINARY[op]
        if op == "Mod" and _attr(node, "fmod", 0):
            fn = _fmod
        a2, b2 = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
        out = [fn(x, y) if _num(x) and _num(y) else _equal_dims(x, y) if op == "Equal" else None
               for x, y in zip(a2.reshape(-1), b2.reshape(-1))]
        return np.array(out, dtype=object).reshape(a2.shape)
    if op in ("Max", "Min", "Sum"):  # variadic, broadcasting
        if any(i not in vals for i in ins):
            return None
        arrs = np.broadcast_arrays(*[np.asarray(vals[i], dtype=object) for i in ins])
        fn = {"Max": max, "Min": min, "Sum": sum}[op]
        out = [fn(xs) if all(_num(x) for x in xs) else None for xs in zip(*[x.reshape(-1) for x in arrs])]
        return np.array(out, dtype=object).reshape(arrs[0].shape)
    if op in ("And", "Or", "Xor"):
        b = get(ins[1])
        if b is None:
            return None
        fn = {"And": lambda x, y: x and y, "Or": lambda x, y: x or y, "Xor": lambda x, y: x != y}[op]
        a2, b2 = np.broadcast_arrays(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
        out = [fn(x, y) if _is_bool(x) and _is_bool(y) else None for x, y in zip(a2.reshape(-1), b2.reshape(-1))]
        return np.array(out, dtype=object).reshape(a2.shape)
    if op == "Where":  # TorchScript's expand(-1, n): Where(Equal(sizes, -1), ones, sizes)
        if any(i not in vals for i in ins[:3]):
            return None
        c, x, y = np.broadcast_arrays(*[np.asarray(vals[i], dtype=object) for i in ins[:3]])
        out = [(xv if cv else yv) if _is_bool(cv) else None
               for cv, xv, yv in zip(c.reshape(-1), x.reshape(-1), y.reshape(-1))]
        return np.array(out, dtype=object).reshape(c.shape)
    if op == "Slice":
        if len(ins) < 3 or any(i and i not in vals for i in ins[1:5]):
            return None
        args = [None if not i else [int(v) for v in np.asarray(vals[i]).reshape(-1)] for i in ins[1:5]]
        args += [None] * (4 - len(args))
        starts, ends, axes, steps = args
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        index = [slice(None)] * a.ndim
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            # python's clamping of out-of-range bounds is ONNX's (INT64_MAX / -INT64_MAX as "to the end")
            index[ax % a.ndim] = slice(st, en, sp)
        return np.asarray(a, dtype=object)[tuple(index)]
    if op == "Range":  # the dynamo exporter's GroupNorm: Unsqueeze(weight, Range(1, rank - 1, 1))
        dims = _range_dims([get(i) for i in ins[:3]]) if len(ins) == 3 else None
        if dims is None or not isinstance(dims[0], int) or dims[0] > _MAX_ELEMENTS:
            return None
        start, delta = (np.asarray(get(i), dtype=object).reshape(-1)[0] for i in (ins[0], ins[2]))
        return np.array([start + k * delta for k in range(dims[0])], dtype=object)
    if op == "Expand":  # the dynamo exporter's conv without bias: Expand(0, Expand(Shape(W)[:1], [1]))
        target = get(ins[1]) if len(ins) > 1 else None
        dims = None if target is None else [_as_int(v) for v in np.asarray(target).reshape(-1)]
        if dims is None or None in dims or any(d < 0 for d in dims):
            return None
        shape = np.broadcast_shapes(np.shape(a), tuple(dims))
        if int(np.prod(shape)) > _MAX_ELEMENTS:
            return None
        return np.broadcast_to(np.asarray(a, dtype=object), shape).copy()
    if op == "Transpose":
        return np.transpose(np.asarray(a, dtype=object), _attr(node, "perm", None))
    if op == "ConstantOfShape":  # F.pad's pads: Concat(pads, ConstantOfShape(rank - n))
        dims = [_as_int(v) for v in np.asarray(a).reshape(-1)]
        t = _attr(node, "value", None)
        if None in dims or int(np.prod(dims)) > _MAX_ELEMENTS or \
                (t is not None and t.data_type not in _INT_TYPES):
            return None
        fill = int(numpy_helper.to_array(t).reshape(-1)[0]) if t is not None else 0
        return np.full(dims, fill, dtype=object)
    return None


def _num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def _mod(x, y):
    """ONNX Mod with fmod=0 (the result takes the divisor's sign: python's %); None for a zero divisor."""
    if y == 0:
        return None
    return x % y if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)) else float(np.mod(x, y))


def _fmod(x, y):
    """ONNX Mod with fmod=1 (the dividend's sign, C's fmod)."""
    if y == 0:
        return None
    if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)):
        r = abs(int(x)) % abs(int(y))
        return r if x >= 0 else -r
    return float(np.fmod(x, y))


def _equal_dims(x, y) -> Optional[bool]:
    """Equal where a side is a dim's symbol: a dim is never negative (TorchScript's
    ``Equal(sizes, -1)`` of ``expand(n, -1, -1)``), and a symbol equals itself; else unknown."""
    if isinstance(x, str) and isinstance(y, str):
        return True if x == y else None
    for sym, v in ((x, y), (y, x)):
        if isinstance(sym, str) and _num(v) and v < 0:
            return False
    return None


def _compare(fn):
    return lambda x, y: bool(fn(x, y))


_BINARY = {
    "Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y, "Div": lambda x, y: _div(x, y),
    "Mod": _mod,
    "Equal": _compare(lambda x, y: x == y), "Less": _compare(lambda x, y: x < y),
    "Greater": _compare(lambda x, y: x > y), "LessOrEqual": _compare(lambda x, y: x <= y),
    "GreaterOrEqual": _compare(lambda x, y: x >= y),
}


def _squeeze_value(node, a, vals) -> Optional[np.ndarray]:
    """The value of an (Un)Squeeze of a small folded tensor: axes from the input (opset >= 13) or
    the attribute; Squeeze without axes drops every dim of size 1."""
    a = np.asarray(a, dtype=object)
    ins = list(node.input)
    if len(ins) > 1 and ins[1]:
        if ins[1] not in vals:
            return None
        axes = [_as_int(v) for v in np.asarray(vals[ins[1]]).reshape(-1)]
        if None in axes:
            return None
    else:
        axes = list(_attr(node, "axes", None) or [])
    if node.op_type == "Unsqueeze":
        rank = a.ndim + len(axes)
        axes = sorted(int(x) % rank for x in axes)
        if len(set(axes)) != len(axes):
            return None
        dims, rest = [], iter(a.shape)
        for k in range(rank):
            dims.append(1 if k in axes else next(rest))
        return a.reshape(dims)
    if not axes:
        return a.reshape([d for d in a.shape if d != 1])
    axes = {int(x) % a.ndim for x in axes} if a.ndim else set()
    if any(a.shape[x] != 1 for x in axes):
        return None
    return a.reshape([d for k, d in enumerate(a.shape) if k not in axes])


def _div(x, y):
    if isinstance(x, (int, np.integer)) and isinstance(y, (int, np.integer)):
        q = abs(int(x)) // abs(int(y))
        return q if (x >= 0) == (y > 0) else -q
    return x / y


def _map_bool(a, fn):
    """``fn`` applied to the bool elements of ``a`` (the others as they are)."""
    return np.array([fn(v) if _is_bool(v) else v for v in np.asarray(a, dtype=object).reshape(-1)],
                    dtype=object).reshape(np.shape(a))


def _map(a, fn):
    return np.array([fn(v) if _num(v) else v for v in np.asarray(a, dtype=object).reshape(-1)],
                    dtype=object).reshape(np.shape(a))


def _reshape_dims(src: Optional[TensorInfo], target: np.ndarray, allowzero: int) -> Optional[list]:
    target = list(np.asarray(target, dtype=object).reshape(-1))
    src_dims = list(src.shape) if src is not None and src.shape is not None else None
    dims = []
    for i, v in enumerate(target):
        if isinstance(v, (int, np.integer)):
            v = int(v)
            if v == 0 and not allowzero:
                v = src_dims[i] if src_dims is not None and i < len(src_dims) else None
        elif not isinstance(v, str):
            v = None
        dims.append(v)
    if -1 in dims and src_dims is not None:
        rest_in = list(src_dims)
        rest_out = [d for d in dims if d != -1]
        for d in list(rest_out):  # a symbol on both sides cancels
            if isinstance(d, str) and d in rest_in:
                rest_in.remove(d)
                rest_out.remove(d)
        if all(isinstance(d, int) for d in rest_in + rest_out) and all(d > 0 for d in rest_out):
            total = int(np.prod(rest_in, dtype=np.int64)) if rest_in else 1
            part = int(np.prod(rest_out, dtype=np.int64)) if rest_out else 1
            dims[dims.index(-1)] = total // part if part and total % part == 0 else None
        else:
            dims[dims.index(-1)] = None
    return [None if d == -1 else d for d in dims]


def _range_dims(args: list) -> Optional[list]:
    """``[length]`` of a Range whose start, limit and delta are known scalars (ONNX's
    ``max(ceil((limit - start) / delta), 0)``)."""
    if len(args) != 3 or any(a is None or np.size(a) != 1 for a in args):
        return None
    start, limit, delta = (np.asarray(a, dtype=object).reshape(-1)[0] for a in args)
    if _named(limit) and _num(start) and start == 0 and _num(delta) and delta == 1:
        return [limit]  # torch.arange(n) of a symbolic dim n
    if not all(_num(v) for v in (start, limit, delta)) or delta == 0:
        return None
    if all(isinstance(v, (int, np.integer)) for v in (start, limit, delta)):
        return [max(-(-(int(limit) - int(start)) // int(delta)), 0)]
    return [max(int(np.ceil((limit - start) / delta)), 0)]


def _slice_dims(src: Optional[TensorInfo], args: list) -> Optional[list]:
    """Output dims of a data Slice whose starts/ends/axes/steps are known."""
    if src is None or src.shape is None:
        return None
    dims = list(src.shape)
    rank = len(dims)
    starts, ends = [list(np.asarray(a, dtype=object).reshape(-1)) for a in args[:2]]
    axes = list(np.asarray(args[2], dtype=object).reshape(-1)) if len(args) > 2 and args[2] is not None \
        else list(range(len(starts)))
    steps = list(np.asarray(args[3], dtype=object).reshape(-1)) if len(args) > 3 and args[3] is not None \
        else [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        if not all(isinstance(v, (int, np.integer)) for v in (st, en, ax, sp)):
            return None
        ax = int(ax) % rank
        n = dims[ax]
        if not isinstance(n, int):
            dims[ax] = None
            continue
        st, en, sp = int(st), int(en), int(sp)
        if sp > 0:
            st = min(max(st + n if st < 0 else st, 0), n)
            en = min(max(en + n if en < 0 else en, 0), n)
            dims[ax] = max(0, -(-(en - st) // sp))
        else:
            st = min(max(st + n if st < 0 else st, -1), n - 1)
            en = min(max(en + n if en < 0 else en, -1), n - 1)
            dims[ax] = max(0, -(-(st - en) // -sp))
    return dims


def _pad_dims(dims: list, pads, axes) -> Optional[list]:
    """Output dims of a Pad whose pads (and axes) are known; symbolic dims stay unknown."""
    pads = list(np.asarray(pads, dtype=object).reshape(-1))
    rank = len(dims)
    axes = list(range(rank)) if axes is None else [int(v) % rank for v in np.asarray(axes).reshape(-1)]
    if len(pads) != 2 * len(axes) or not all(isinstance(v, (int, np.integer)) for v in pads):
        return None
    out = list(dims)
    for k, ax in enumerate(axes):
        before, after = int(pads[k]), int(pads[k + len(axes)])
        if isinstance(dims[ax], int):
            out[ax] = dims[ax] + before + after
        elif before or after:  # a padded symbolic dim; an unpadded one keeps its symbol
            out[ax] = None
    return out


def _broadcast(src: list, target: list) -> list:
    n = max(len(src), len(target))
    src = [1] * (n - len(src)) + src
    target = [1] * (n - len(target)) + target
    out = []
    for s_, t in zip(src, target):
        if isinstance(t, (int, np.integer)) and int(t) == 1:
            out.append(s_)
        elif isinstance(s_, int) and s_ == 1:
            out.append(int(t) if isinstance(t, (int, np.integer)) else t if isinstance(t, str) else None)
        elif s_ == t or (isinstance(t, (int, np.integer)) and s_ == int(t)):
            out.append(s_)
        else:
            out.append(s_ if s_ is not None else (int(t) if isinstance(t, (int, np.integer)) else None))
    return out
