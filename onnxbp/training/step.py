"""Build ONE training-step graph of standard ops: forward, loss, backward, optimizer update.

::

    inputs : data inputs (e.g. x), target (labels), lr (float scalar), [step (int64 scalar)],
             every trainable parameter, its optimizer state, BatchNormalization running stats
    outputs: loss, [logits], the updated parameters, state and running stats

The build is four stages on one private copy of the model, which is loaded
and checked once on entry and once on exit:

1. *forward + loss*: BatchNormalization and Dropout switched to training
   mode, the loss nodes appended; the loss is the graph's only output.
2. *backward*: :func:`onnxbp.backward` seeded with 1.0 at the loss; it
   returns the tensor of each parameter's gradient (nothing is spliced in
   and taken out again).
3. *optimizer*: parameters become inputs; each gets its optimizer state and
   update (:mod:`onnxbp.training.optimizers`).
4. *running statistics*: BatchNormalization's updated running mean and
   (optionally PyTorch's unbiased) variance become outputs.

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

import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import metadata, shapeinfo
from ..engine import backward
from ..errors import OnnxbpError
from ..modelio import ModelLike, check_full, compact, convert_opset, load_model
from ..optimize import eliminate_common_subexpressions, match_scalar_ranks
from ..portable import expand_for_portability, separate_backward_constants
from ..rules.norm import batch_moments
from ..types import FLOAT_TYPES, TensorInfo, default_opset, np_dtype, value_info_dims
from ..writer import GraphWriter, set_attr, value_info
from .conv_forward import lower_weight_bound_convs
from .errors import TrainingError
from .losses import LOSSES, add_loss
from .optimizers import AdamW

log = logging.getLogger(__name__)

META_KEY = metadata.TRAINING_KEY
_DOC = "onnxbp.training: train"


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
    clip_grad_norm: Optional[float] = None  # max global gradient norm (None: no clipping)

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
    initial: dict                    # carried input name -> initial numpy value (a Trainer moves them into
                                     # its buffers: its step_model.initial is empty once built)
    forward: Optional[onnx.ModelProto] = None  # the forward model as loaded and checked


def resolve_params(model: onnx.ModelProto, requires_grad: Optional[Iterable[str]],
                   frozen_params: Optional[Iterable[str]]) -> tuple:
    """(trainable-or-None, frozen, buffers) with the checks of ORT's generate_artifacts.

    Names may be glob patterns (``bert.embeddings.*``, ``*.bias``; :mod:`fnmatch`): each stands for
    the floating-point initializers it matches, in model order, and one matching none is an error.
    """
    inits = {t.name: t for t in model.graph.initializer}
    req = None if requires_grad is None else expand_patterns(model, requires_grad, "requires_grad")
    frozen = [] if frozen_params is None else expand_patterns(model, frozen_params, "frozen_params")
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


def expand_patterns(model: onnx.ModelProto, names: Iterable[str], kind: str) -> list:
    """Parameter names with glob patterns replaced by the float initializers they match."""
    if isinstance(names, str):
        names = [names]
    floats = [t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES]
    out: list = []
    for pat in names:
        if not any(c in pat for c in "*?["):
            matched = [pat]
        else:
            matched = [n for n in floats if fnmatch.fnmatchcase(n, pat)]
            if not matched:
                raise TrainingError(f"{kind} pattern {pat!r} matches no floating-point initializer of the model")
        out.extend(n for n in matched if n not in out)
    return out


def build_step_model(model: ModelLike, *, loss: str = "cross_entropy", optimizer=None,
                     requires_grad: Optional[Sequence[str]] = None,
                     frozen_params: Optional[Sequence[str]] = None,
                     output: Optional[str] = None, return_logits: bool = False,
                     bn_stats: str = "torch", dropout_seed: Optional[int] = None,
                     conv_forward: str = "auto", clip_grad_norm: Optional[float] = None,
                     **grad_options) -> StepModel:
    """Return the training-step model of ``model`` (a forward model, never modified).

    ``loss``: cross_entropy | lm_cross_entropy | mse | l1 | output (:func:`~onnxbp.training.losses.add_loss`).
    Every graph input that is not an initializer is a data input (several are fed by name: token
    ids and an attention mask).  ``optimizer``: an :class:`SGD`,
    :class:`Adam` or :class:`AdamW` instance (default ``AdamW()``).
    ``requires_grad``: the parameters to train (default: every float
    initializer a gradient reaches, except frozen ones and BatchNormalization
    running statistics).  ``frozen_params``: parameters kept constant.  Both take glob patterns
    (``"bert.embeddings.*"``).  ``clip_grad_norm``: scale the gradients by
    ``min(1, max_norm / (norm + 1e-6))``, ``norm`` their global 2-norm, before the update
    (``torch.nn.utils.clip_grad_norm_``), in the graph.
    ``conv_forward``: "auto" writes the forward of weight-bound trainable Convs as one Gemm over the
    batch (:mod:`onnxbp.training.conv_forward`), "conv" keeps every Conv as it is.
    """
    optimizer = optimizer if optimizer is not None else AdamW()
    b = _forward_backward(model, loss, optimizer, requires_grad, frozen_params, output, bn_stats, dropout_seed,
                          dict(grad_options, conv_forward=conv_forward))
    m, bw, fl, out_vi = b.model, b.bw, b.fl, b.out_vi
    st = _Carried(m, b.fwd_inits)
    w = GraphWriter.for_model(m, "train", _DOC, infos=bw.infos)
    lr, step = _scalar_inputs(w, st, optimizer, bw.infos)
    grads = clip_gradients(w, b.params, bw.gradients, b.fwd_inits, clip_grad_norm)
    state_map = _optimizer_stage(w, st, optimizer, b.params, grads, lr, step)
    _running_stats_stage(w, st, fl.batch_norms, bn_stats, bw.infos)
    st.finish(w)

    g = m.graph
    g.node.extend(w.take_nodes())
    listed = {i.name for i in g.input}
    g.input.extend([vi for vi in st.inputs if vi.name not in listed])
    logits = None
    if return_logits:
        logits = out_vi.name
        g.output.append(out_vi)
    g.output.extend(st.outputs)
    spec = StepSpec(
        data_inputs=fl.data_inputs, target=fl.target, lr=lr, step=step, loss=fl.loss, logits=logits,
        output=out_vi.name, params=b.params, buffers=[x for x in b.buffers if x in st.updates], state=state_map,
        updates=st.updates, frozen=b.frozen_all, loss_kind=loss, optimizer=optimizer.config(),
        clip_grad_norm=clip_grad_norm)
    if grad_options.get("target") == "portable":  # the loss and training-mode BN as plain ops
        expand_for_portability(m)
    eliminate_common_subexpressions(g)
    match_scalar_ranks(m, shapeinfo.infer(m))
    if grad_options.get("target") == "portable":  # frozen weights the backward shares (OpenVINO bug 4)
        separate_backward_constants(m)
    metadata.put(m, META_KEY, spec.to_json())
    check_full(m, TrainingError, "the training-step model fails the ONNX checker (a bug; please report)")
    log.info("training step: %d params, %d carried tensors, %d nodes", len(b.params), len(st.updates), len(g.node))
    return StepModel(compact(m), spec, st.initial, b.loaded)  # compact: the weights taken out are freed


@dataclass
class SplitStep:
    """The training step split for data-parallel training (:mod:`onnxbp.training.distributed`).

    ``gradient``: what each worker computes on its shard: inputs the data, the target and the
    parameters; outputs the loss, each parameter's gradient (``grads[p]``) and, per
    BatchNormalization, its batch mean, biased variance and the size of its input (``moments``).
    ``update``: what every worker applies identically: inputs ``lr``, ``step``, the carried tensors
    (the same names and initial values as :func:`build_step_model`'s, so checkpoints move between
    the two), the gradients (``grads[p]``, averaged over the workers) and, per BatchNormalization,
    the global batch mean, variance and per-channel count; outputs the carried tensors' next values.
    """

    gradient: onnx.ModelProto
    update: onnx.ModelProto
    spec: StepSpec
    grads: dict                      # param -> gradient tensor (output of gradient, input of update)
    moments: list                    # per BatchNormalization: see _moment_names
    initial: dict
    forward: Optional[onnx.ModelProto] = None


def build_split_step(model: ModelLike, *, loss: str = "cross_entropy", optimizer=None,
                     requires_grad: Optional[Sequence[str]] = None,
                     frozen_params: Optional[Sequence[str]] = None,
                     output: Optional[str] = None, bn_stats: str = "torch", dropout_seed: Optional[int] = None,
                     clip_grad_norm: Optional[float] = None, **grad_options) -> SplitStep:
    """The step of :func:`build_step_model` as two models: the local gradient and the update.

    Both come from the same stages: stages 1 and 2 (forward + loss, backward) make the gradient
    model; stage 3 (the optimizer) and stage 4 (running statistics, from the global batch
    moments instead of one batch's) make the update model, with the gradients as inputs.
    """
    optimizer = optimizer if optimizer is not None else AdamW()
    b = _forward_backward(model, loss, optimizer, requires_grad, frozen_params, output, bn_stats, dropout_seed,
                          grad_options)
    m, bw, fl = b.model, b.bw, b.fl
    upd = onnx.ModelProto()
    upd.ir_version = m.ir_version
    upd.opset_import.extend(m.opset_import)
    upd.graph.name = f"{m.graph.name or 'model'}_update"
    st = _Carried(upd, b.fwd_inits)
    # One writer, names fresh in the whole gradient model: the update's carried names are the fused step's.
    w = GraphWriter.for_model(m, "train", _DOC, infos=bw.infos)
    lr, step = _scalar_inputs(w, st, optimizer, bw.infos)
    grad_inputs = []
    for p in b.params:
        t = b.fwd_inits[p]
        grad_inputs.append(value_info(bw.gradients[p], t.data_type, t.dims))
        bw.infos[bw.gradients[p]] = TensorInfo(t.data_type, tuple(int(d) for d in t.dims))
    clipped = clip_gradients(w, b.params, bw.gradients, b.fwd_inits, clip_grad_norm)  # of the averaged gradients
    state_map = _optimizer_stage(w, st, optimizer, b.params, clipped, lr, step)
    moments = _moment_names(w, fl.batch_norms, b.fwd_inits)
    moment_inputs = []
    for mo in moments:
        t = b.fwd_inits[mo["buffers"][0]]
        moment_inputs += [value_info(mo["mean"], t.data_type, t.dims), value_info(mo["var"], t.data_type, t.dims),
                          value_info(mo["count"], t.data_type, [])]
        for k in ("mean", "var"):
            bw.infos[mo[k]] = TensorInfo(t.data_type, tuple(int(d) for d in t.dims))
        bw.infos[mo["count"]] = TensorInfo(t.data_type, ())
    _running_stats_stage(w, st, fl.batch_norms, bn_stats, bw.infos, moments=moments)
    st.finish(w)
    ug = upd.graph
    ug.node.extend(w.take_nodes())
    ug.input.extend(st.inputs + grad_inputs + moment_inputs)
    ug.output.extend(st.outputs)

    # The gradient model: parameters as inputs; loss, gradients and batch moments as outputs.
    g = m.graph
    for mo, (node, _, _) in zip(moments, fl.batch_norms):
        _batch_moments(w.scoped("train/bn"), node.input[0], b.fwd_inits[mo["buffers"][1]].data_type, bw.infos,
                       node, out=(mo["mean"], mo["var"]))
        w.op("Size", node.input[0], out=mo["size"], name="train/bn/size")
    g.node.extend(w.take_nodes())
    trained = set(b.params)
    kept = [t for t in g.initializer if t.name not in trained]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.input.extend(value_info(p, b.fwd_inits[p].data_type, b.fwd_inits[p].dims) for p in b.params)
    for p in b.params:
        t = b.fwd_inits[p]
        g.output.append(value_info(bw.gradients[p], t.data_type, t.dims))
    for mo in moments:
        t = b.fwd_inits[mo["buffers"][0]]
        g.output.extend([value_info(mo["mean"], t.data_type, t.dims), value_info(mo["var"], t.data_type, t.dims),
                         value_info(mo["size"], TensorProto.INT64, [])])

    spec = StepSpec(
        data_inputs=fl.data_inputs, target=fl.target, lr=lr, step=step, loss=fl.loss, logits=None,
        output=b.out_vi.name, params=b.params, buffers=[x for x in b.buffers if x in st.updates], state=state_map,
        updates=st.updates, frozen=b.frozen_all, loss_kind=loss, optimizer=optimizer.config(),
        clip_grad_norm=clip_grad_norm)
    grads = {p: bw.gradients[p] for p in b.params}
    for part, role in ((m, "gradient"), (upd, "update")):
        if grad_options.get("target") == "portable":  # the loss and training-mode BN as plain ops
            expand_for_portability(part)
        eliminate_common_subexpressions(part.graph)
        match_scalar_ranks(part, shapeinfo.infer(part))
        if grad_options.get("target") == "portable":
            separate_backward_constants(part)
        metadata.put(part, META_KEY, json.dumps({"role": role, "spec": spec.__dict__, "grads": grads,
                                                 "moments": moments}, sort_keys=True))
        check_full(part, TrainingError, f"the data-parallel {role} model fails the ONNX checker (a bug; please report)")
    log.info("split training step: %d params, gradient model %d nodes, update model %d nodes", len(b.params),
             len(g.node), len(ug.node))
    return SplitStep(compact(m), compact(upd), spec, grads, moments, st.initial, b.loaded)


@dataclass
class _Backward:
    """Stages 1 and 2 on a private copy: what both the fused and the split step build on."""

    model: onnx.ModelProto           # the forward + loss + backward graph
    bw: object                       # the onnxbp.backward result
    fl: "_ForwardLoss"
    out_vi: onnx.ValueInfoProto
    loaded: onnx.ModelProto          # the forward model as loaded and checked
    fwd_inits: dict
    params: list
    buffers: list
    frozen_all: list


def _forward_backward(model, loss, optimizer, requires_grad, frozen_params, output, bn_stats, dropout_seed,
                      grad_options) -> _Backward:
    if loss not in LOSSES:
        raise TrainingError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if bn_stats not in ("torch", "onnx"):
        raise TrainingError(f"bn_stats={bn_stats!r}; choose torch or onnx")
    grad_options = dict(grad_options)
    conv_forward = grad_options.pop("conv_forward", "auto")  # a step option, not a backward one
    if conv_forward not in ("auto", "conv"):
        raise TrainingError(f"conv_forward={conv_forward!r}; choose auto or conv")
    loaded = fwd = load_model(model)
    has_train_ops = any(n.op_type in ("BatchNormalization", "Dropout") for n in fwd.graph.node)
    need = 14 if has_train_ops else 13
    if default_opset(fwd) < need:
        log.info("converting the model from opset %d to %d for training", default_opset(fwd), need)
        fwd = convert_opset(fwd, need, "training", TrainingError)
    req, frozen, buffers = resolve_params(fwd, requires_grad, frozen_params)
    out_vi = _loss_output(fwd, output)

    m = onnx.ModelProto()
    m.CopyFrom(fwd)
    fl = _forward_and_loss(m, loss, out_vi, dropout_seed)
    if conv_forward == "auto":
        trained = req if req is not None else [t.name for t in m.graph.initializer if t.data_type in FLOAT_TYPES
                                               and t.name not in frozen and t.name not in buffers]
        lower_weight_bound_convs(m, trained, shapeinfo.infer(m))
    try:
        bw = backward(m, req, seeds={fl.loss: 1.0}, frozen=set(frozen) | set(buffers),
                      check=False, inplace=True, **grad_options)
    except OnnxbpError as exc:
        raise type(exc)(f"building the backward graph of the training step: {exc}") from None
    fwd_inits = {t.name: t for t in fwd.graph.initializer}
    params = [p for p in (req or list(fwd_inits)) if p in bw.gradients]
    frozen_all = [t.name for t in fwd.graph.initializer
                  if t.data_type in FLOAT_TYPES and t.name not in bw.gradients and t.name not in buffers]
    for p in frozen_all:
        if p not in frozen:
            log.info("parameter %s gets no gradient from the loss; it stays constant", p)
    return _Backward(bw.model, bw, fl, out_vi, loaded, fwd_inits, params, buffers, frozen_all)


def clip_gradients(w: GraphWriter, params: list, grads: dict, fwd_inits: dict,
                   max_norm: Optional[float]) -> dict:
    """Gradient clipping by global norm, as ``torch.nn.utils.clip_grad_norm_(max_norm)`` does it::

        norm  = sqrt(sum_p ReduceSumSquare(g_p))          (in float32)
        scale = min(1, max_norm / (norm + 1e-6))
        g_p   = g_p * scale

    Returns ``{p: clipped gradient tensor}`` (``grads`` itself without ``max_norm``).  torch takes
    the norm of the per-tensor norms; the sum of squares is the same number up to float32 roundoff.
    """
    if max_norm is None:
        return grads
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise TrainingError(f"clip_grad_norm={max_norm!r}; give a positive maximum norm")
    if not params:
        return grads
    cw = w.scoped("train/clip_grad_norm")
    elem = fwd_inits[params[0]].data_type
    f = np_dtype(elem)
    squares = []
    for p in params:
        sq = cw.op("ReduceSumSquare", grads[p], name="sum_sq", keepdims=0)
        if fwd_inits[p].data_type != elem:
            sq = cw.cast(sq, elem)
        squares.append(sq)
    total = cw.add_n(squares) if len(squares) > 1 else squares[0]
    norm = cw.op("Sqrt", total, name="global_norm")
    coef = cw.op("Div", cw.const(float(max_norm), dtype=f), cw.op("Add", norm, cw.const(1e-6, dtype=f), name="norm_eps"),
                 name="coef")
    scale = cw.op("Min", coef, cw.const(1.0, dtype=f), name="scale")
    out = {}
    for p in params:
        s = scale if fwd_inits[p].data_type == elem else cw.cast(scale, fwd_inits[p].data_type)
        out[p] = cw.op("Mul", grads[p], s, name="clipped")
    return out


def _scalar_inputs(w: GraphWriter, st: "_Carried", optimizer, infos: dict) -> tuple:
    """The ``lr`` (float) and, for optimizers that need it, ``step`` (int64) scalar inputs."""
    lr = w.fresh("lr")
    step = w.fresh("step") if optimizer.needs_step else None
    infos[lr] = TensorInfo(TensorProto.FLOAT, ())
    st.inputs.append(value_info(lr, TensorProto.FLOAT, []))
    if step:
        infos[step] = TensorInfo(TensorProto.INT64, ())
        st.inputs.append(value_info(step, TensorProto.INT64, []))
    return lr, step


#: Ops that may write their output into the buffer of an input they read: each output element
#: depends only on the same element of the inputs (onnxruntime's elementwise kernels).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Identity", "Sqrt", "Neg"}


def in_place_updates(model: onnx.ModelProto, spec: StepSpec) -> list:
    """The optimizer state tensors whose next value may be written over the current one.

    State ``s`` (momentum, Adam moments) with next value ``o`` qualifies when every node that reads
    ``s`` runs before the node ``P`` that writes ``o`` because ``P`` depends on it (a reader is
    an ancestor of ``P``), or is ``P`` itself and elementwise.  onnxruntime writes a bound output
    only when its node runs, so binding ``o`` to ``s``'s buffer gives the same values with one
    buffer instead of two (the :class:`Trainer` double-buffers everything else).  Parameters do
    not qualify: the backward reads them (dX of a Conv or Gemm reads W) on paths that do not lead
    to their update.
    """
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return []
    producer = {o: n for n in g.node for o in n.output}
    readers: dict = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = []
    for names in spec.state.values():
        for s in names.values():
            o = spec.updates.get(s)
            p = producer.get(o)
            if p is None or o in spec.updates:
                continue
            rs = [r for r in readers.get(s, []) if r is not p]
            if s in p.input and p.op_type not in _ELEMENTWISE:
                continue
            if all(_reaches(r, p, readers) for r in rs):
                out.append(s)
    return out


def _reaches(src: onnx.NodeProto, dst: onnx.NodeProto, consumers: dict, limit: int = 256) -> bool:
    """Whether ``dst`` depends on ``src`` (a search of at most ``limit`` nodes: an optimizer chain is
    short; a longer search answers no, which only costs a buffer)."""
    seen, todo = set(), [src]
    while todo and len(seen) < limit:
        n = todo.pop()
        for o in n.output:
            for c in consumers.get(o, ()):
                if c is dst:
                    return True
                if id(c) not in seen:
                    seen.add(id(c))
                    todo.append(c)
    return False


def _loss_output(fwd: onnx.ModelProto, output: Optional[str]) -> onnx.ValueInfoProto:
    outs = list(fwd.graph.output)
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
    return out_vi


@dataclass
class _ForwardLoss:
    loss: str
    target: Optional[str]
    data_inputs: list
    batch_norms: list  # [(bn node, running mean output, running var output)]


def _forward_and_loss(m: onnx.ModelProto, loss: str, out_vi: onnx.ValueInfoProto,
                      dropout_seed: Optional[int]) -> _ForwardLoss:
    """Stage 1: training mode, loss nodes, the loss as the only output (in place)."""
    g = m.graph
    inits = {t.name for t in g.initializer}
    data_inputs = [i.name for i in g.input if i.name not in inits]
    out_elem = out_vi.type.tensor_type.elem_type
    out_dims = value_info_dims(out_vi)
    w = GraphWriter.for_model(m, "train", _DOC, infos={out_vi.name: TensorInfo(out_elem, out_dims)})
    bns = _to_training_mode(w, g, dropout_seed)
    for k, node in enumerate(w.take_nodes()):  # the training_mode constant goes before its consumers
        g.node.insert(k, node)
    loss_name = w.fresh("loss")
    target_name = w.fresh("labels" if loss == "cross_entropy" else "target")
    target_vi = add_loss(w, loss, out_vi, target_name, loss_name)
    g.node.extend(w.take_nodes())
    del g.output[:]
    loss_dims = out_dims if loss == "output" else []  # the model's own loss keeps its shape ([] or [1])
    g.output.append(value_info(loss_name, out_elem, loss_dims))
    if target_vi is not None:
        g.input.append(target_vi)
    return _ForwardLoss(loss_name, target_name if target_vi is not None else None, data_inputs, bns)


def _to_training_mode(w: GraphWriter, graph: onnx.GraphProto, seed: Optional[int]) -> list:
    """Switch BN and Dropout nodes to training mode; return [(bn_node, rm_out, rv_out)]."""
    bns = []
    true = None
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            set_attr(node, "training_mode", 1)
            label = node.name or node.output[0]
            del node.output[1:]
            rm = w.fresh(f"{label}/running_mean_onnx")
            rv = w.fresh(f"{label}/running_var_onnx")
            node.output.extend([rm, rv])
            bns.append((node, rm, rv))
        elif node.op_type == "Dropout":
            if true is None:
                true = w.const(np.array(True), dtype=np.bool_)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = true
            if seed is not None and not any(a.name == "seed" for a in node.attribute):
                set_attr(node, "seed", int(seed))
    return bns


class _Carried:
    """The tensors a step carries to the next: inputs, the outputs of their next values, initial values."""

    def __init__(self, m: onnx.ModelProto, fwd_inits: dict):
        self.graph = m.graph
        self.fwd_inits = fwd_inits
        self.inputs: list = []
        self.outputs: list = []
        self.updates: dict = {}
        self.initial: dict = {}
        self._pending: list = []  # (carried name, its next value, the output name)

    def to_input(self, name: str, initial: Optional[np.ndarray] = None, like: Optional[str] = None) -> None:
        """Make ``name`` a step input (removing its initializer), typed like forward initializer ``like``."""
        t = self.fwd_inits[like or name]
        for init in self.graph.initializer:
            if init.name == name:
                self.graph.initializer.remove(init)
                break
        self.inputs.append(value_info(name, t.data_type, t.dims))
        self.initial[name] = numpy_helper.to_array(t) if initial is None else initial

    def carry(self, w: GraphWriter, name: str, new_value: str, like: Optional[str] = None) -> None:
        """``new_value`` becomes the output ``<name>.new``, the next step's ``name`` (see :meth:`finish`)."""
        t = self.fwd_inits[like or name]
        out = w.fresh(f"{name}.new")
        self._pending.append((name, new_value, out))
        self.updates[name] = out
        self.outputs.append(value_info(out, t.data_type, t.dims))

    def finish(self, w: GraphWriter) -> None:
        """Name each next value's tensor as its output (other nodes may read a graph output too);
        an Identity only where the value is not ours to rename (a forward tensor) or is carried twice."""
        mapping: dict = {}
        for name, value, out in self._pending:
            if w.created(value) and value not in mapping:
                mapping[value] = out
            else:
                w.op("Identity", value, out=out, name=f"{name}/out")
        w.rename_tensors(mapping)
        self._pending = []


def _optimizer_stage(w: GraphWriter, st: _Carried, optimizer, params: list, grads: dict, lr: str,
                     step: Optional[str]) -> dict:
    """Stage 3: parameters and optimizer state as inputs, their updates as outputs."""
    state_map = {}
    for p in params:
        t = st.fwd_inits[p]
        st.to_input(p)
        state_in = {}
        for kind in optimizer.state_names():
            sname = w.fresh(f"{p}.{kind}")
            state_in[kind] = sname
            st.to_input(sname, np.zeros_like(st.initial[p]), like=p)
        state_map[p] = state_in
        new_p, new_state = optimizer.emit(w, p, grads[p], state_in, lr, step, t.data_type)
        st.carry(w, p, new_p)
        for kind, sname in state_in.items():
            st.carry(w, sname, new_state[kind], like=p)
    return state_map


def _running_stats_stage(w: GraphWriter, st: _Carried, bns: list, bn_stats: str, infos: dict,
                         moments: Optional[list] = None) -> None:
    """Stage 4: BatchNormalization running statistics as carried tensors.

    ``bn_stats="torch"`` turns ONNX's biased running variance into PyTorch's
    unbiased one; it reads only X and BN's outputs, never the running-stat
    inputs after BN: onnxruntime (1.32, CPU) writes a training-mode BN's
    running_mean/var into its input buffers in place when those outputs are
    not graph outputs, so a later reader would see the new values.

    ``moments`` (the update model of :func:`build_split_step`, one entry per BN): the running
    statistics follow ONNX's formula from the global batch mean, biased variance and per-channel
    count, which are inputs (there is no BN node in that model).
    """
    for k, (node, rm_onnx, rv_onnx) in enumerate(bns):
        x, mean_in, var_in = node.input[0], node.input[3], node.input[4]
        t = st.fwd_inits[var_in]
        f = np_dtype(t.data_type)
        mom = _momentum(node)
        if moments is not None:
            mo = moments[k]
            bw = w.scoped("train/bn")
            keep, new = bw.const(mom, dtype=f), bw.const(1.0 - mom, dtype=f)
            rm_new = bw.op("Add", bw.op("Mul", mean_in, keep), bw.op("Mul", mo["mean"], new), name="running_mean")
            var = mo["var"]
            if bn_stats == "torch":
                nm1 = bw.op("Sub", mo["count"], bw.const(1.0, dtype=f), name="count_minus_1")
                var = bw.op("Mul", var, bw.op("Div", mo["count"], nm1, name="bessel"), name="unbiased_var")
            rv_new = bw.op("Add", bw.op("Mul", var_in, keep), bw.op("Mul", var, new), name="running_var")
        else:
            rm_new, rv_new = rm_onnx, rv_onnx
            if bn_stats == "torch":
                bw = w.scoped("train/bn")
                _, var_b = _batch_moments(bw, x, t.data_type, infos, node)
                shape = infos[x].shape
                count = [shape[a] for a in [0] + list(range(2, len(shape)))]
                if all(isinstance(d, int) for d in count):  # n - 1 as a constant
                    nm1 = bw.const(float(np.prod(count)) - 1.0, dtype=f)
                else:  # tract 0.23 fails ("eval() called on a Dummy op") on Sub(n) with the backward's n
                    c = bw.op("Cast", bw.op("Shape", rv_onnx, name="channels"), to=t.data_type)
                    n = bw.op("Div", bw.op("Cast", bw.op("Size", x, name="size"), to=t.data_type), c, name="count")
                    nm1 = bw.op("Sub", n, bw.const(1.0, dtype=f), name="count_minus_1")
                corr = bw.op("Div", bw.op("Mul", var_b, bw.const(1.0 - mom, dtype=f)), nm1, name="bessel")
                rv_new = bw.op("Add", rv_onnx, corr, name="unbiased_running_var")
        for src, name in ((rm_new, mean_in), (rv_new, var_in)):
            if name in st.updates:
                continue
            st.to_input(name)
            st.carry(w, name, src)


def _momentum(node: onnx.NodeProto) -> float:
    return next((a.f for a in node.attribute if a.name == "momentum"), 0.9)


def _batch_moments(bw: GraphWriter, x: str, elem: int, infos: dict, node: onnx.NodeProto,
                   out: Optional[tuple] = None) -> tuple:
    """The batch mean (kept dims) and biased variance (per channel) of BN input ``x``; ``out``:
    also write them, per channel, to these two names (the split step's gradient outputs)."""
    shape = infos.get(x, TensorInfo()).shape
    if shape is None:
        raise TrainingError(f"BatchNormalization node {node.name!r}: the rank of its input {x!r} is unknown")
    axes = [0] + list(range(2, len(shape)))
    # the same nodes as the BatchNormalization backward's batch statistics (rules/norm.py), so that
    # optimize.eliminate_common_subexpressions computes them once
    mean, _, var_b, _ = batch_moments(bw, x, axes, shape, node.input[1])
    if out is not None:
        bw.op("Reshape", mean, bw.ints([-1]), out=out[0], name="batch_mean")
        bw.op("Identity", var_b, out=out[1], name="batch_var")
    return mean, var_b


def _moment_names(w: GraphWriter, bns: list, fwd_inits: dict) -> list:
    """Per BatchNormalization node, the names of its batch moments in the split step (JSON-ready)."""
    out = []
    for node, _, _ in bns:
        label = node.name or node.output[0]
        out.append({"node": label, "buffers": [node.input[3], node.input[4]],
                    "channels": int(np.prod(fwd_inits[node.input[3]].dims)), "momentum": _momentum(node),
                    "mean": w.fresh(f"{label}/batch_mean"), "var": w.fresh(f"{label}/batch_var"),
                    "size": w.fresh(f"{label}/input_size"), "count": w.fresh(f"{label}/global_count")})
    return out
