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

import json
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import metadata
from ..engine import backward
from ..errors import OnnxbpError
from ..modelio import ModelLike, check_full, convert_opset, load_model
from ..optimize import eliminate_common_subexpressions
from ..types import FLOAT_TYPES, TensorInfo, default_opset, np_dtype, value_info_dims
from ..writer import GraphWriter, set_attr, value_info
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
    forward: Optional[onnx.ModelProto] = None  # the forward model as loaded and checked


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
    try:
        bw = backward(m, req, seeds={fl.loss: 1.0}, frozen=set(frozen) | set(buffers),
                      check=False, inplace=True, **grad_options)
    except OnnxbpError as exc:
        raise type(exc)(f"building the backward graph of the training step: {exc}") from None
    m = bw.model
    fwd_inits = {t.name: t for t in fwd.graph.initializer}
    params = [p for p in (req or list(fwd_inits)) if p in bw.gradients]
    frozen_all = [t.name for t in fwd.graph.initializer
                  if t.data_type in FLOAT_TYPES and t.name not in bw.gradients and t.name not in buffers]
    for p in frozen_all:
        if p not in frozen:
            log.info("parameter %s gets no gradient from the loss; it stays constant", p)

    st = _Carried(m, fwd_inits)
    w = GraphWriter.for_model(m, "train", _DOC, infos=bw.infos)
    lr = w.fresh("lr")
    step = w.fresh("step") if optimizer.needs_step else None
    bw.infos[lr] = TensorInfo(TensorProto.FLOAT, ())
    if step:
        bw.infos[step] = TensorInfo(TensorProto.INT64, ())
    st.inputs.append(value_info(lr, TensorProto.FLOAT, []))
    if step:
        st.inputs.append(value_info(step, TensorProto.INT64, []))
    state_map = _optimizer_stage(w, st, optimizer, params, bw.gradients, lr, step)
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
        output=out_vi.name, params=params, buffers=[b for b in buffers if b in st.updates], state=state_map,
        updates=st.updates, frozen=frozen_all, loss_kind=loss, optimizer=optimizer.config())
    eliminate_common_subexpressions(g)
    metadata.put(m, META_KEY, spec.to_json())
    check_full(m, TrainingError, "the training-step model fails the ONNX checker (a bug; please report)")
    log.info("training step: %d params, %d carried tensors, %d nodes", len(params), len(st.updates), len(g.node))
    return StepModel(m, spec, st.initial, loaded)


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
        dims = [int(d) for d in t.dims]
        if len(dims) > 1 and 1 in dims[1:]:
            # [M, C, 1, 1]-like (1x1 conv weights): onnxruntime's elementwise kernels run 17-29x slower on
            # them than on the flat view, while a flat view of other shapes is no faster or slower
            # (benchmarks/bench_optimizer_views.py); Reshape is free (an alias).
            ow = w.scoped(f"train/{p}/flat")
            flat, shape = ow.ints([-1]), ow.ints(dims)
            new_p, new_state = optimizer.emit(
                ow, ow.op("Reshape", p, flat), ow.op("Reshape", grads[p], flat),
                {k: ow.op("Reshape", s, flat) for k, s in state_in.items()}, lr, step, t.data_type)
            new_p = ow.op("Reshape", new_p, shape)
            new_state = {k: ow.op("Reshape", v, shape) for k, v in new_state.items()}
        else:
            new_p, new_state = optimizer.emit(w, p, grads[p], state_in, lr, step, t.data_type)
        st.carry(w, p, new_p)
        for kind, sname in state_in.items():
            st.carry(w, sname, new_state[kind], like=p)
    return state_map


def _running_stats_stage(w: GraphWriter, st: _Carried, bns: list, bn_stats: str, infos: dict) -> None:
    """Stage 4: BatchNormalization running statistics as carried tensors.

    ``bn_stats="torch"`` turns ONNX's biased running variance into PyTorch's
    unbiased one; it reads only X and BN's outputs, never the running-stat
    inputs after BN: onnxruntime (1.32, CPU) writes a training-mode BN's
    running_mean/var into its input buffers in place when those outputs are
    not graph outputs, so a later reader would see the new values.
    """
    for node, rm_onnx, rv_onnx in bns:
        x, mean_in, var_in = node.input[0], node.input[3], node.input[4]
        t = st.fwd_inits[var_in]
        rv_new = rv_onnx
        if bn_stats == "torch":
            bw = w.scoped("train/bn")
            f = np_dtype(t.data_type)
            mom = next((a.f for a in node.attribute if a.name == "momentum"), 0.9)
            shape = infos.get(x, TensorInfo()).shape
            if shape is None:
                raise TrainingError(f"BatchNormalization node {node.name!r}: the rank of its input {x!r} is unknown")
            axes = [0] + list(range(2, len(shape)))
            mean = bw.reduce_mean(x, axes, True)
            d = bw.op("Sub", x, mean, name="centered")
            # the same nodes as the BatchNormalization backward's batch statistics (rules/norm.py), so
            # that optimize.eliminate_common_subexpressions computes them once
            var_b = bw.squeeze(bw.reduce_mean(bw.op("Mul", d, d, name="sq"), axes, True), axes)
            c = bw.op("Cast", bw.op("Shape", rv_onnx, name="channels"), to=t.data_type)
            n = bw.op("Div", bw.op("Cast", bw.op("Size", x, name="size"), to=t.data_type), c, name="count")
            nm1 = bw.op("Sub", n, bw.const(1.0, dtype=f), name="count_minus_1")
            corr = bw.op("Div", bw.op("Mul", var_b, bw.const(1.0 - mom, dtype=f)), nm1, name="bessel")
            rv_new = bw.op("Add", rv_onnx, corr, name="unbiased_running_var")
        for src, name in ((rm_onnx, mean_in), (rv_new, var_in)):
            if name in st.updates:
                continue
            st.to_input(name)
            st.carry(w, name, src)
