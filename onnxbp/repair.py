"""Load-time repairs of a private model copy: what onnx's checker refuses although onnxruntime runs it.

:func:`repair` runs in :func:`onnxbp.modelio.load_model` on the copy it makes
(the caller's model is never touched), before the checker:

* **Pooling with ceil_mode=1 whose last window would start in the end
  padding.**  onnx's shape inference keeps that window, onnxruntime drops it
  (onnx/onnx#5741; :func:`onnxbp.rules.pool_arith.pool_axis` has the rule),
  so the declared and the computed shapes differ by one on that axis and
  every tensor downstream is inferred one too long.  The pool's output
  ``Y`` (and its ``Indices``) is renamed ``<Y>/ceil_mode_raw`` and a
  ``Slice`` to onnxruntime's size writes ``Y`` again: the identity on what
  onnxruntime computes (and the same windows on a runtime that keeps the
  extra one), while onnx now infers the runtime shape for ``Y`` and
  downstream.  :func:`onnxbp.shapeinfo.infer` gives the raw output its
  runtime shape where it feeds only such Slices, so the Slice's gradient is
  the identity and the pool rule sees the runtime output size.
* **Graph outputs declared without a type or shape** (hand-built and older
  models): onnx 1.23's checker requires both.  They are filled from shape
  inference (one info log line names them); an output whose rank shape
  inference cannot tell is refused with a :class:`ModelLoadError` naming it.
  Declared output shapes that contradict inference after the pool repair
  are replaced the same way.
"""

from __future__ import annotations

import logging

import onnx

from .errors import ModelLoadError

log = logging.getLogger(__name__)

_POOLS = ("MaxPool", "AveragePool")


def repair(model: onnx.ModelProto, where: str = "the model") -> None:
    """Apply the repairs of the module docstring to ``model`` (a private copy), in place."""
    infos = None
    if any(n.op_type in _POOLS and n.domain in ("", "ai.onnx") and _ceil(n) for n in model.graph.node):
        if _align_ceil_pools(model):
            infos = _infer_undeclared(model)
            _sync_declared_outputs(model, infos)
    if any(_untyped(o) for o in model.graph.output):
        _fill_output_types(model, where, infos or _infer(model))


# ------------------------------------------------------------------ helpers
def _infer(model: onnx.ModelProto) -> dict:
    from . import shapeinfo

    return shapeinfo.infer(model)


def _infer_undeclared(model: onnx.ModelProto) -> dict:
    """Shape inference with the graph outputs' declared types and the value_info set aside (they may
    hold the sizes onnx inferred before the repair, which now contradict it)."""
    g = model.graph
    saved = [onnx.TypeProto() for _ in g.output]
    kept = list(g.value_info)
    for t, out in zip(saved, g.output):
        t.CopyFrom(out.type)
        out.ClearField("type")
    del g.value_info[:]
    try:
        return _infer(model)
    finally:
        for t, out in zip(saved, g.output):
            out.type.CopyFrom(t)
        g.value_info.extend(kept)


def _ceil(node: onnx.NodeProto) -> bool:
    return any(a.name == "ceil_mode" and a.i for a in node.attribute)


def _untyped(vi: onnx.ValueInfoProto) -> bool:
    """Declared without a type, or a tensor type without element type or shape."""
    if not vi.HasField("type") or vi.type.WhichOneof("value") is None:
        return True
    if vi.type.WhichOneof("value") != "tensor_type":
        return False
    tt = vi.type.tensor_type
    return not tt.elem_type or not tt.HasField("shape")


def _type_from(info, declared: onnx.ValueInfoProto) -> onnx.TypeProto:
    from .writer import value_info

    elem = declared.type.tensor_type.elem_type if declared.HasField("type") else 0
    return value_info(declared.name, elem or info.elem_type, list(info.shape)).type


# ------------------------------------------------------------------ missing output types
def _fill_output_types(model: onnx.ModelProto, where: str, infos: dict) -> None:
    filled = []
    for out in model.graph.output:
        if not _untyped(out):
            continue
        info = infos.get(out.name)
        if info is None or not info.elem_type:
            raise ModelLoadError(f"{where}: output {out.name!r} is declared without a type and shape inference "
                                 f"cannot infer one; declare its type and shape (onnx.helper.make_tensor_value_info)")
        if info.shape is None:
            raise ModelLoadError(f"{where}: output {out.name!r} is declared without a shape and shape inference "
                                 f"cannot tell its rank; declare its shape (onnx.helper.make_tensor_value_info)")
        out.type.CopyFrom(_type_from(info, out))
        filled.append(out.name)
    if filled:
        log.info("%s: outputs declared without a type or shape, filled from shape inference: %s",
                 where, ", ".join(f"{n!r}" for n in filled))


def _sync_declared_outputs(model: onnx.ModelProto, infos: dict) -> None:
    """After the pool repair: declared shapes that contradict inference take the inferred (runtime) one."""
    g = model.graph
    fixed = []
    for out in g.output:
        info = infos.get(out.name)
        if _untyped(out) or info is None or info.shape is None:
            continue
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(info.shape) or any(
                d.HasField("dim_value") and isinstance(v, int) and d.dim_value != v for d, v in zip(dims, info.shape)):
            out.type.CopyFrom(_type_from(info, out))
            fixed.append(out.name)
    stale = [vi for vi in g.value_info if vi.name in infos and infos[vi.name].shape is not None
             and vi.type.HasField("tensor_type") and _contradicts(vi, infos[vi.name].shape)]
    for vi in stale:
        g.value_info.remove(vi)
    if fixed or stale:
        log.info("declared shapes corrected to onnxruntime's ceil_mode pooling sizes: %s",
                 ", ".join(f"{n!r}" for n in fixed + [vi.name for vi in stale]))


def _contradicts(vi: onnx.ValueInfoProto, shape: tuple) -> bool:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return False
    dims = tt.shape.dim
    return len(dims) != len(shape) or any(d.HasField("dim_value") and isinstance(v, int) and d.dim_value != v
                                          for d, v in zip(dims, shape))


# ------------------------------------------------------------------ ceil_mode pools
def _align_ceil_pools(model: onnx.ModelProto) -> int:
    """Insert the runtime-size Slices (module docstring); return how many pools were aligned."""
    from .naming import NameAuthority
    from .rules.pool_arith import ceil_mode_disagreement
    from .types import default_opset
    from .writer import GraphWriter

    g = model.graph
    infos = _infer(model)
    names = NameAuthority(model)
    opset = default_opset(model)
    aligned = 0
    out_nodes = []
    for node in g.node:
        out_nodes.append(node)
        if node.op_type not in _POOLS or node.domain not in ("", "ai.onnx") or not _ceil(node):
            continue
        runtime = runtime_spatial(node, infos)
        if runtime is None:
            continue
        label = node.name or node.output[0]
        w = GraphWriter(names, opset, infos, prefix=f"{label}/ceil_mode",
                        doc=f"onnxbp: onnxruntime's output size of ceil_mode {node.op_type} '{label}'")
        rank = len(runtime) + 2
        inferred = infos.get(node.output[0])
        for k, y in enumerate(node.output[:2]):
            if not y:
                continue
            declared = infos.get(y)
            if declared is None or declared.shape is None or len(declared.shape) != rank:
                continue
            if not ceil_mode_disagreement(list(declared.shape[2:]), runtime):
                continue
            raw = names.fresh(f"{y}/ceil_mode_raw")
            node.output[k] = raw
            w.rename_output(w.slice(raw, [0] * len(runtime), runtime, list(range(2, rank))), y)
        if w.nodes:
            log.info("node %r (%s, ceil_mode=1): onnx infers spatial sizes %s, onnxruntime computes %s (its last "
                     "window would start in the end padding); added a Slice to the runtime size",
                     label, node.op_type, list(inferred.shape[2:]), runtime)
            out_nodes.extend(w.take_nodes())
            aligned += 1
    if aligned:
        del g.node[:]
        g.node.extend(out_nodes)
    return aligned


def runtime_spatial(node: onnx.NodeProto, infos: dict):
    """onnxruntime's output spatial sizes of a ceil_mode=1 pool whose input's spatial dims are static, else None."""
    from onnx import helper

    from .rules.pool_arith import pool_geometry

    x = infos.get(node.input[0]) if node.input else None
    if not _ceil(node) or x is None or x.shape is None or len(x.shape) < 3 or not all(isinstance(v, int) for v in x.shape[2:]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n = [int(v) for v in x.shape[2:]]
    nsp = len(n)
    k = [int(v) for v in attrs.get("kernel_shape", [])]
    if len(k) != nsp:
        return None
    s = [int(v) for v in attrs.get("strides", [1] * nsp)]
    d = [int(v) for v in attrs.get("dilations", [1] * nsp)]
    pads = [int(v) for v in attrs.get("pads", [0] * (2 * nsp))]
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if len(s) != nsp or len(d) != nsp or len(pads) != 2 * nsp:
        return None
    return pool_geometry(n, k, s, d, pads, auto_pad or "NOTSET", 1)[2]
