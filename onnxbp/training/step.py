"""Build ONE training-step graph of standard ops: forward, loss, backward, optimizer update.

::

    inputs : data inputs (e.g. x), target (labels), lr (float scalar), [step (int64 scalar)],
             every trainable parameter, its optimizer state, BatchNormalization running stats
    outputs: loss, [logits], the updated parameters, state and running stats

The backward part is ``onnxbp.gradient`` of the forward+loss model, whose only
output is the scalar loss; its upstream-gradient input ``<loss>_grad`` is
replaced by a Constant 1.0, so the step model has no such input.

Training mode: BatchNormalization nodes are switched to ``training_mode=1``
(batch statistics; opset >= 14, three outputs) and Dropout nodes get a
constant ``training_mode=True`` input (a random mask is drawn each run).

Running statistics: ONNX defines ``running = momentum * running + (1 -
momentum) * batch_stat`` with the *biased* batch variance; PyTorch uses
``momentum_torch = 1 - momentum`` and the *unbiased* variance for
``running_var``.  With ``bn_stats="torch"`` (default) the step model matches
PyTorch: ``rv_torch = rv_onnx + (rv_onnx - momentum * rv) / (n - 1)`` where
``n`` is the number of elements per channel (N*H*W); ``bn_stats="onnx"``
keeps the ONNX formula.  (A model exported from torch with momentum 0.1 has
ONNX momentum 0.9; both then agree on running_mean.)

Caution for callers of the raw step model: onnxruntime may overwrite the
numpy arrays fed as BatchNormalization running statistics with the updated
values (in-place kernel); :class:`~onnxbp.training.Trainer` is unaffected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..builder import FLOAT_TYPES
from ..engine import default_opset, gradient
from ..errors import OnnxbpError
from ..modelio import ModelLike, load_model
from .emit import Emitter
from .errors import TrainingError
from .losses import LOSSES, add_loss
from .optimizers import AdamW

log = logging.getLogger(__name__)

META_KEY = "onnxbp.training"


@dataclass
class StepSpec:
    """How to feed and read a step model (also stored as JSON in its metadata)."""

    data_inputs: list                # forward-model inputs fed from the batch
    target: Optional[str]            # labels / target input (None for loss "output")
    lr: str
    step: Optional[str]
    loss: str
    logits: Optional[str]
    output: str                      # the forward model's output the loss reads
    params: list                     # trainable parameter names (inputs; initializers of the forward model)
    buffers: list                    # BatchNormalization running stats (updated without gradient)
    state: dict                      # param -> {state_kind: input name}
    updates: dict                    # every carried input -> output of the next value
    frozen: list                     # float initializers that stay constant
    loss_kind: str = "cross_entropy"
    optimizer: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StepSpec":
        return cls(**json.loads(text))

    @property
    def carried(self) -> list:
        """Inputs whose values carry over from step to step (params, state, buffers)."""
        return list(self.updates)


@dataclass
class StepModel:
    model: onnx.ModelProto
    spec: StepSpec
    initial: dict                    # carried input name -> initial numpy value


def _vi_like(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if dims is None else list(dims))


def _ensure_opset(model: onnx.ModelProto, need: int) -> onnx.ModelProto:
    cur = default_opset(model)
    if cur >= need:
        return model
    log.info("converting the model from opset %d to %d for training", cur, need)
    try:
        out = onnx.version_converter.convert_version(model, need)
        onnx.checker.check_model(out, full_check=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"training needs opset >= {need} and the model (opset {cur}) could not be "
                            f"converted: {first}") from None
    return out


def resolve_params(model: onnx.ModelProto, requires_grad: Optional[Iterable[str]],
                   frozen_params: Optional[Iterable[str]]) -> tuple:
    """(trainable-or-None, frozen, buffers) with the checks of ORT's generate_artifacts."""
    inits = {t.name: t for t in model.graph.initializer}
    req = None if requires_grad is None else list(requires_grad)
    frozen = [] if frozen_params is None else list(frozen_params)
    if req is not None and frozen:
        both = [p for p in req if p in set(frozen)]
        if both:
            raise TrainingError(
                f"parameter {both[0]!r} cannot be frozen and require gradient computation at the same time "
                f"(it is in both requires_grad and frozen_params)")
    for kind, names in (("requires_grad", req or []), ("frozen_params", frozen)):
        for p in names:
            if p not in inits:
                raise TrainingError(f"{kind} names {p!r}, which is not an initializer of the model")
            if inits[p].data_type not in FLOAT_TYPES:
                raise TrainingError(f"{kind} names {p!r}, which is not a floating-point initializer")
    buffers = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for name in node.input[3:5]:
                if name not in inits:
                    raise TrainingError(
                        f"BatchNormalization node {node.name!r}: running statistic {name!r} must be an "
                        f"initializer to be updated in training mode")
                if name not in buffers:
                    buffers.append(name)
    if req is not None:
        clash = [p for p in req if p in buffers]
        if clash:
            raise TrainingError(f"requires_grad names {clash[0]!r}, a BatchNormalization running statistic; "
                                f"those are updated from batch statistics, not trained")
    return req, frozen, buffers


def _to_training_mode(em: Emitter, graph: onnx.GraphProto, seed: Optional[int]) -> list:
    """Switch BN and Dropout nodes to training mode; return [(bn_node, rm_out, rv_out)]."""
    bns = []
    true = None
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for a in list(node.attribute):
                if a.name == "training_mode":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("training_mode", 1))
            label = node.name or node.output[0]
            del node.output[1:]
            rm = em.fresh(f"{label}/running_mean_onnx")
            rv = em.fresh(f"{label}/running_var_onnx")
            node.output.extend([rm, rv])
            bns.append((node, rm, rv))
        elif node.op_type == "Dropout":
            if true is None:
                true = em.const(np.array(True), dtype=np.bool_, hint="training_mode")
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = true
            if seed is not None and not any(a.name == "seed" for a in node.attribute):
                node.attribute.append(helper.make_attribute("seed", int(seed)))
    return bns


def build_step_model(model: ModelLike, *, loss: str = "cross_entropy", optimizer=None,
                     requires_grad: Optional[Sequence[str]] = None,
                     frozen_params: Optional[Sequence[str]] = None,
                     output: Optional[str] = None, return_logits: bool = False,
                     bn_stats: str = "torch", dropout_seed: Optional[int] = None,
                     **grad_options) -> StepModel:
    """Return the training-step model of ``model`` (a forward model, never modified).

    ``loss``: cross_entropy | mse | l1 | output.  ``optimizer``: an :class:`SGD`,
    :class:`Adam` or :class:`AdamW` instance (default ``AdamW()``).
    ``requires_grad``: the parameters to train (default: every float
    initializer a gradient reaches, except frozen ones and BatchNormalization
    running statistics).  ``frozen_params``: parameters kept constant.
    """
    optimizer = optimizer if optimizer is not None else AdamW()
    if loss not in LOSSES:
        raise TrainingError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if bn_stats not in ("torch", "onnx"):
        raise TrainingError(f"bn_stats={bn_stats!r}; choose torch or onnx")
    fwd = load_model(model)
    has_train_ops = any(n.op_type in ("BatchNormalization", "Dropout") for n in fwd.graph.node)
    fwd = _ensure_opset(fwd, 14 if has_train_ops else 13)
    req, frozen, buffers = resolve_params(fwd, requires_grad, frozen_params)

    g = fwd.graph
    inits = {t.name: t for t in g.initializer}
    init_names = set(inits)
    data_inputs = [i for i in g.input if i.name not in init_names]
    outs = list(g.output)
    if output is None:
        if len(outs) != 1:
            raise TrainingError(f"the model has {len(outs)} outputs ({', '.join(o.name for o in outs)}); "
                                f"name the one the loss reads with output=")
        out_vi = outs[0]
    else:
        match = [o for o in outs if o.name == output]
        if not match:
            raise TrainingError(f"output {output!r} is not a graph output of the model")
        out_vi = match[0]
    if out_vi.type.tensor_type.elem_type not in FLOAT_TYPES:
        raise TrainingError(f"model output {out_vi.name!r} is not floating-point; it cannot be trained through")

    # ---- forward + loss model: loss is the only output -------------------------
    lm = onnx.ModelProto()
    lm.CopyFrom(fwd)
    em = Emitter(lm, "train")
    bns = _to_training_mode(em, lm.graph, dropout_seed)
    for k, node in enumerate(em.nodes):  # the training_mode constant goes before its consumers
        lm.graph.node.insert(k, node)
    em.nodes = []
    loss_name = em.fresh("loss")
    target_name = em.fresh("labels" if loss == "cross_entropy" else "target")
    target_vi = add_loss(em, loss, out_vi, target_name, loss_name)
    lg = lm.graph
    lg.node.extend(em.nodes)
    em.nodes = []
    del lg.output[:]
    out_elem = out_vi.type.tensor_type.elem_type
    loss_dims = []
    if loss == "output":  # the model's own loss: keep its shape ([] or [1])
        tt = out_vi.type.tensor_type
        loss_dims = None if not tt.HasField("shape") else [d.dim_value or d.dim_param for d in tt.shape.dim]
    lg.output.append(helper.make_tensor_value_info(loss_name, out_elem, loss_dims))
    if target_vi is not None:
        lg.input.append(target_vi)
    # Non-trainable float initializers become inputs, so gradient(wrt=None) skips them.
    not_trained = set(frozen) | set(buffers)
    if req is not None:
        not_trained |= {t.name for t in lg.initializer if t.data_type in FLOAT_TYPES and t.name not in req}
    keep = [t for t in lg.initializer if t.name not in not_trained]
    moved = [t for t in lg.initializer if t.name in not_trained]
    del lg.initializer[:]
    lg.initializer.extend(keep)
    listed = {i.name for i in lg.input}  # (IR < 4 models also list initializers as inputs)
    for t in moved:
        if t.name not in listed:
            lg.input.append(_vi_like(t.name, t.data_type, t.dims))

    rank_cache: dict = {}
    _rank_of(lm, "", rank_cache)
    try:
        gm = gradient(lm, req, **grad_options)
    except OnnxbpError as exc:
        raise type(exc)(f"building the backward graph of the training step: {exc}") from None
    pairs = [kv.split("=", 1) for m in gm.metadata_props if m.key == "onnxbp.gradients"
             for kv in m.value.split(",") if kv]
    grads = {p: gname for p, gname in pairs}
    params = [p for p in (req or [t.name for t in fwd.graph.initializer]) if p in grads]
    auto_frozen = [t.name for t in fwd.graph.initializer
                   if t.data_type in FLOAT_TYPES and t.name not in grads and t.name not in buffers]
    for p in auto_frozen:
        if p not in frozen:
            log.info("parameter %s gets no gradient from the loss; it stays constant", p)
    frozen_all = [p for p in auto_frozen]

    # ---- post-process into the step model ---------------------------------------
    sg = gm.graph
    em = Emitter(gm, "train")
    upstream = loss_name + "_grad"
    ups = [i for i in sg.input if i.name == upstream]
    if len(ups) != 1:  # pragma: no cover - the engine contract
        raise TrainingError(f"the gradient model has no upstream-gradient input {upstream!r}")
    sg.input.remove(ups[0])
    one = helper.make_node("Constant", [], [upstream], name=em.fresh("train/loss_grad_one"),
                           value=numpy_helper.from_array(np.ones([1] if loss_dims == [1] else [],
                                                                 helper.tensor_dtype_to_np_dtype(out_elem))),
                           doc_string="onnxbp.training: d loss / d loss = 1")
    sg.node.insert(0, one)
    # gradients are outputs of the gradient model; the step model consumes them instead
    grad_names = set(grads.values())
    for o in [o for o in sg.output if o.name in grad_names]:
        sg.output.remove(o)

    lr = em.fresh("lr")
    step = em.fresh("step") if optimizer.needs_step else None
    new_inputs = [helper.make_tensor_value_info(lr, TensorProto.FLOAT, [])]
    if step:
        new_inputs.append(helper.make_tensor_value_info(step, TensorProto.INT64, []))

    gm_inits = {t.name: t for t in sg.initializer}
    updates, state_map, initial = {}, {}, {}
    new_outputs = []
    fwd_inits = {t.name: t for t in fwd.graph.initializer}
    for p in params:
        t = fwd_inits[p]
        arr = numpy_helper.to_array(t)
        if p in gm_inits:
            sg.initializer.remove(gm_inits[p])
        new_inputs.append(_vi_like(p, t.data_type, t.dims))
        initial[p] = arr
        state_in = {}
        for kind in optimizer.state_names():
            sname = em.fresh(f"{p}.{kind}")
            state_in[kind] = sname
            new_inputs.append(_vi_like(sname, t.data_type, t.dims))
            initial[sname] = np.zeros_like(arr)
        state_map[p] = state_in
        new_p, new_state = optimizer.emit(em, p, grads[p], state_in, lr, step, t.data_type)
        p_out = em.fresh(f"{p}.new")
        em.op("Identity", new_p, out=p_out, hint=f"{p}/out")
        updates[p] = p_out
        new_outputs.append(_vi_like(p_out, t.data_type, t.dims))
        for kind, sname in state_in.items():
            s_out = em.fresh(f"{sname}.new")
            em.op("Identity", new_state[kind], out=s_out, hint=f"{sname}/out")
            updates[sname] = s_out
            new_outputs.append(_vi_like(s_out, t.data_type, t.dims))

    opset = default_opset(gm)
    for node, rm_onnx, rv_onnx in bns:
        x, mean_in, var_in = node.input[0], node.input[3], node.input[4]
        t = fwd_inits[var_in]
        f = helper.tensor_dtype_to_np_dtype(t.data_type)
        rm_new, rv_new = rm_onnx, rv_onnx
        if bn_stats == "torch":
            # Reads only X and BN's outputs, never the running-stat inputs after BN: onnxruntime
            # (1.32, CPU) writes a training-mode BN's running_mean/var into its input buffers in place
            # when those outputs are not graph outputs, so a later reader would see the new values.
            mom = next((a.f for a in node.attribute if a.name == "momentum"), 0.9)
            rank = _rank_of(gm, x, rank_cache)
            if rank is None:
                raise TrainingError(f"BatchNormalization node {node.name!r}: the rank of its input {x!r} is unknown")
            axes = [0] + list(range(2, rank))
            mean = _reduce_mean(em, opset, x, axes, True)
            d = em.op("Sub", x, mean, hint="bn/centered")
            var_b = _reduce_mean(em, opset, em.op("Mul", d, d, hint="bn/sq"), axes, False)
            c = em.op("Cast", em.op("Shape", rv_onnx, hint="bn/channels"), to=t.data_type)
            n = em.op("Div", em.op("Cast", em.op("Size", x, hint="bn/size"), to=t.data_type), c, hint="bn/count")
            nm1 = em.op("Sub", n, em.const(1.0, f), hint="bn/count_minus_1")
            corr = em.op("Div", em.op("Mul", var_b, em.const(1.0 - mom, f)), nm1, hint="bn/bessel")
            rv_new = em.op("Add", rv_onnx, corr, hint="bn/unbiased_running_var")
        for src, name in ((rm_new, mean_in), (rv_new, var_in)):
            if name in updates:
                continue
            if name in gm_inits:
                sg.initializer.remove(gm_inits[name])
            if not any(i.name == name for i in sg.input):
                new_inputs.append(_vi_like(name, fwd_inits[name].data_type, fwd_inits[name].dims))
            out = em.fresh(f"{name}.new")
            em.op("Identity", src, out=out, hint=f"{name}/out")
            updates[name] = out
            initial[name] = numpy_helper.to_array(fwd_inits[name])
            new_outputs.append(_vi_like(out, fwd_inits[name].data_type, fwd_inits[name].dims))

    # frozen float initializers that the loss model carried as inputs go back to constants
    for name in frozen_all:
        vis = [i for i in sg.input if i.name == name]
        for vi in vis:
            sg.input.remove(vi)
        if name not in {t.name for t in sg.initializer}:
            sg.initializer.append(fwd_inits[name])
    sg.node.extend(em.nodes)
    existing = {i.name for i in sg.input}
    sg.input.extend([vi for vi in new_inputs if vi.name not in existing])
    logits = None
    if return_logits:
        logits = out_vi.name
        sg.output.append(out_vi)
    sg.output.extend(new_outputs)

    spec = StepSpec(
        data_inputs=[i.name for i in data_inputs], target=target_name if target_vi is not None else None,
        lr=lr, step=step, loss=loss_name, logits=logits, output=out_vi.name, params=params,
        buffers=[b for b in buffers if b in updates], state=state_map, updates=updates,
        frozen=frozen_all, loss_kind=loss, optimizer=optimizer.config())
    del gm.metadata_props[:]
    meta = gm.metadata_props.add()
    meta.key = META_KEY
    meta.value = spec.to_json()
    try:
        onnx.checker.check_model(gm, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TrainingError(f"the training-step model fails the ONNX checker: {first} (a bug; please report)") from None
    log.info("training step: %d params, %d carried tensors, %d nodes", len(params), len(updates), len(sg.node))
    return StepModel(gm, spec, initial)


def _rank_of(model: onnx.ModelProto, name: str, cache: dict):
    if not cache:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001
            inferred = model
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.tensor_type.HasField("shape"):
                cache[vi.name] = len(vi.type.tensor_type.shape.dim)
        cache.setdefault("", None)
    return cache.get(name)


def _reduce_mean(em: Emitter, opset: int, x: str, axes, keepdims: bool) -> str:
    if opset >= 18:
        return em.op("ReduceMean", x, em.ints(axes), keepdims=int(keepdims), hint="bn/mean")
    return em.op("ReduceMean", x, axes=list(axes), keepdims=int(keepdims), hint="bn/mean")
