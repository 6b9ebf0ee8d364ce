"""The engine: the reverse walk, fan-out accumulation and splicing.

Two entry points:

``backward(model, wrt, seeds)``
    The lower-level API.  Adds the backward subgraph to the graph and returns
    a :class:`Backward`: the model and, for each ``p`` in ``wrt``, the tensor
    holding ``sum_s (ds/dp)^T . seed_s`` over the seeded tensors ``s``.  A
    seed is a tensor of the graph (an output or any intermediate, such as a
    loss) with a constant fill (a scalar loss gets 1.0), an existing tensor, or
    a new graph input.  No output is added: callers (the gradient model, the
    training step, second-order and data-parallel builders) decide what the
    gradients become.

``gradient(model, wrt)``
    The gradient model of the contract: the forward outputs plus one input
    ``<Y>_grad`` per float output (its seed) and one output ``<p>_grad`` per
    parameter, and the ``onnxbp.gradients`` metadata.  A thin wrapper on
    ``backward``.

The build: Loop and Scan nodes a requested gradient flows through are
unrolled first (:mod:`onnxbp.unroll`); the analysis (:mod:`onnxbp.analysis`)
picks the nodes on a path from the parameters to the seeds; in reverse topological order each on-path
node's rule (:mod:`onnxbp.registry`) receives the accumulated gradients of
its outputs through a :class:`~onnxbp.context.GradContext` and returns the
gradients of its inputs.  A tensor consumed by several nodes gets the Sum of
their contributions.  Backward nodes are appended after the forward nodes,
dead ones are pruned, and the result must pass ``onnx.checker`` with
``full_check``.  The If rule (:mod:`onnxbp.controlflow`) builds each backward
branch with a nested build of the branch made standalone
(:meth:`_Build.sub_backward`, sharing the naming authority).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper

from . import analysis, arguments, metadata, unroll
from .context import GradContext
from .errors import (
    InternalError,
    ModelLoadError,
    NameCollisionError,
    NotDifferentiableError,
    OptionError,
    UnsupportedOpError,
    WrtError,
)
from .graphview import GraphView
from .modelio import ModelLike, check_full, check_loadable, convert_opset, load_model
from .naming import NameAuthority, reads
from .registry import REGISTRY, Registry, RuleEntry
from .types import TensorInfo, default_opset, np_dtype
from .writer import GraphWriter

log = logging.getLogger(__name__)

__all__ = ["Backward", "backward", "gradient", "default_opset"]

SeedSpec = Union[None, Sequence[str], Mapping[str, Union[str, float, int]]]


@dataclass
class Backward:
    """What :func:`backward` added: where each gradient lives.

    ``model`` is the forward graph with the backward nodes appended and the
    new seed inputs added.  ``gradients`` maps each ``wrt`` name (in order) to
    the tensor holding its gradient; ``seeds`` maps each seeded tensor to the
    tensor holding its seed; ``seed_inputs`` lists the graph inputs added for
    seeds; ``infos`` is what shape inference knows of the tensors
    (``{name: TensorInfo}``; backward tensors carry their element type).
    """

    model: onnx.ModelProto
    gradients: dict
    seeds: dict
    seed_inputs: list = field(default_factory=list)
    infos: dict = field(default_factory=dict)
    forward_nodes: int = 0
    backward_nodes: int = 0
    zeros: list = field(default_factory=list)  # wrt names whose gradient is structurally zero


def backward(model: ModelLike, wrt: Optional[Iterable[str]] = None, seeds: SeedSpec = None, *,
             grad_names: Union[None, Mapping[str, str], Callable[[str], str]] = None,
             registry: Optional[Registry] = None,
             frozen: Iterable[str] = (), check: bool = True, inplace: bool = False,
             zero_unreachable: bool = False, base_dir: Optional[str] = None, **options: Any) -> Backward:
    """Add the backward subgraph of ``model`` and return where each gradient lives.

    ``model``: an ``onnx.ModelProto`` (copied unless ``inplace=True``) or a
    path.  ``wrt``: initializers or float graph inputs (``None``: every float
    initializer through which a gradient reaches a seed, except state such as
    BatchNorm running statistics, and except ``frozen``).  ``seeds``: ``None`` seeds every float
    graph output ``Y`` with a new input ``Y_grad``; a list of tensor names
    seeds each with 1.0 (a scalar loss; a non-scalar tensor gets ones of its
    shape); a dict maps tensor -> seed, a number (that constant fill), the
    name of an existing tensor, or the name of a new graph input (added with
    the seeded tensor's type).  ``grad_names`` (a dict, or a function of the
    parameter name) gives exact names to gradient tensors (the tensor is
    renamed, or an Identity added).  ``check``: run
    ``onnx.checker`` (full) on entry and exit.  ``zero_unreachable``: a
    ``wrt`` name no gradient reaches (a structurally zero derivative, common
    in second order: the gradient of a linear loss does not depend on the
    last bias) gets a zero tensor of its shape, listed in ``.zeros`` and
    logged, instead of a :class:`NotDifferentiableError`.  ``base_dir``: the
    folder of the data files of a ModelProto whose tensors refer to external
    data (a path's are read from its folder).  Options select
    lowerings (``conv_strategy=...``; ``onnxbp ops``).
    """
    if inplace and isinstance(model, onnx.ModelProto) and base_dir is None:
        proto = model  # _Build runs the full check when asked
    else:
        proto = load_model(model, check=check, base_dir=base_dir, copy=not inplace)
    return _Build(proto, _registry(registry), options, check).run(
        None if wrt is None else _names(wrt), seeds, grad_names, frozen=frozen, check_exit=check,
        zero_unreachable=zero_unreachable)


def gradient(model: ModelLike, wrt: Optional[Iterable[str]] = None, *, grad_suffix: Optional[str] = None,
             registry: Optional[Registry] = None, zero_unreachable: Optional[bool] = None,
             base_dir: Optional[str] = None, inplace: bool = False, **options: Any) -> onnx.ModelProto:
    """Return a model computing the forward outputs and the gradients of ``wrt``.

    ``model`` is an ``onnx.ModelProto`` (never modified) or a path.  ``wrt``
    names initializers or float graph inputs; ``None`` means every float
    initializer through which a gradient reaches an output.  The model gets
    one input ``<Y><grad_suffix>`` per float output (the upstream gradient)
    and outputs ``<p><grad_suffix>``.

    ``grad_suffix=None`` is the suffix of the result's order
    (:func:`metadata.order_suffix`): ``_grad`` for a forward model, ``_grad2``
    when ``model`` is itself a gradient model (order 1, known from its
    metadata, :func:`metadata.gradient_order`), ``_grad3`` next; so
    ``gradient(gradient(m))`` adds inputs ``<Y>_grad2`` (``logits_grad2``,
    ``<p>_grad_grad2`` for the first-order outputs) and outputs ``<p>_grad2``
    next to the first-order ``<p>_grad``.  The order is recorded in the
    metadata.  ``zero_unreachable`` (default: true
    for a gradient model, false for a forward model) gives a ``wrt`` name no
    gradient reaches a zero output, recorded in the metadata
    (``onnxbp.zero_gradients``), instead of raising
    :class:`NotDifferentiableError`.  Options (``conv_strategy=...`` and
    others, see ``onnxbp ops``) select lowerings.

    Models with external data: a path's data files are read from its folder;
    a ModelProto whose tensors still refer to external files needs
    ``base_dir`` (their folder).  ``inplace=True`` (a ModelProto) builds on
    ``model`` itself, which becomes the result, instead of on a copy: one
    copy of the weights fewer (``onnxbp grad`` does this for a model it
    loaded).
    """
    proto = load_model(model, base_dir=base_dir, copy=not inplace)
    order = metadata.gradient_order(proto) + 1
    if grad_suffix is None:
        grad_suffix = metadata.order_suffix(order)
    arguments.suffix(grad_suffix, OptionError)
    if zero_unreachable is None:
        zero_unreachable = order > 1
    build = _Build(proto, _registry(registry), options, check=True)
    seeds = {o.name: o.name + grad_suffix for o in build.view.graph.output if build.view.info(o.name).is_float}
    result = build.run(None if wrt is None else _names(wrt), seeds, lambda p: p + grad_suffix,
                       check_exit=False, suffix_hint=True, zero_unreachable=zero_unreachable)
    g = result.model.graph
    for p, t in result.gradients.items():
        g.output.append(build.value_info(t, p, None))
    if build._options.get("target") == "portable":  # OpenVINO bug 4 (docs/portability.md); a registry
        # of the user's own may not declare the option
        from .portable import separate_backward_constants

        separate_backward_constants(result.model, result.forward_nodes)
    metadata.set_gradient_names(result.model, result.gradients, order=order, zeros=result.zeros)
    check_full(result.model, InternalError, "the gradient model fails the ONNX checker")
    log.info("gradient model (order %d): %d forward nodes, %d backward nodes, %d gradients%s",
             order, result.forward_nodes, result.backward_nodes, len(result.gradients),
             f", {len(result.zeros)} structurally zero" if result.zeros else "")
    return result.model


def _names(wrt: Iterable[str]) -> list:
    return arguments.names(wrt, "wrt", WrtError)


def _registry(registry: Optional[Registry]) -> Registry:
    if registry is None:
        return REGISTRY
    return arguments.instance(registry, Registry, "registry", OptionError, " (onnxbp.Registry)")


class _Build:
    """State of one backward build.  Rules see it only through GradContext."""

    def __init__(self, model: onnx.ModelProto, registry: Registry, options: dict, check: bool,
                 names: Optional[NameAuthority] = None):
        self.registry = registry
        self._options = _validate_options(registry, options)
        self._names = names  # an enclosing build's: this build differentiates a subgraph of its model
        if check:
            check_full(model, ModelLoadError, "the model fails the ONNX checker (full_check)")
            check_loadable(model)
        self._prepare(model)

    def _prepare(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.view = GraphView(model, self.registry, self._names)
        self.writer = GraphWriter(self.view.names, self.view.opset, self.view.infos,
                                  prefix="onnxbp/grad", doc="onnxbp: backward graph",
                                  const_base="onnxbp/grad/const")

    # ------------------------------------------------------- what rules read
    def option(self, name: str) -> Any:
        if name not in self._options:
            raise OptionError(f"option {name!r} is read by a rule but was never declared")
        return self._options[name]

    def ensure_forward_output(self, node: onnx.NodeProto, i: int) -> str:
        if i < len(node.output) and node.output[i]:
            return node.output[i]
        while len(node.output) <= i:
            node.output.append("")
        name = self.view.names.fresh(f"{self.view.label(node)}/output{i}")
        node.output[i] = name
        log.info("added output %d (%s) to forward node %s", i, name, self.view.label(node))
        return name

    def sub_backward(self, graph: onnx.GraphProto, wrt: Sequence[str], seeds: Mapping[str, str]) -> Backward:
        """Differentiate ``graph`` (a subgraph made standalone: what it reads from outside are its
        inputs) with this build's registry, options, opset and naming authority.

        ``wrt`` names graph inputs; parameters no gradient reaches are left out
        of the result's ``gradients`` (the caller supplies their zero).  The
        graph is not checked: it becomes a subgraph again.
        """
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                  ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        sub = _Build(model, self.registry, self._options, check=False, names=self.view.names)
        return sub.run(list(wrt), dict(seeds), None, check_exit=False, partial=True)

    # ------------------------------------------------------------ the build
    def run(self, wrt: Optional[list], seeds: SeedSpec, grad_names, *, check_exit: bool,
            frozen: Iterable[str] = (), suffix_hint: bool = False, partial: bool = False,
            zero_unreachable: bool = False) -> Backward:
        seed_map = self._seed_map(seeds)
        targets = list(seed_map)
        frozen = arguments.names(frozen, "frozen", WrtError)
        if not callable(grad_names):
            arguments.mapping(grad_names, "grad_names", WrtError, str)
        params = analysis.resolve_wrt(self.view, wrt, targets, frozen)
        if self._unroll(params, targets):
            params = analysis.resolve_wrt(self.view, wrt, targets, frozen)
        if partial:  # a subgraph's build: what no gradient reaches gets its zero from the caller
            reach = analysis.path(self.view, params, targets).useful
            params = [p for p in params if p in reach]
            if not params:
                return Backward(self.model, {}, {}, [], self.view.infos, len(self.view.nodes), 0)
        zeros: list = []
        if not partial and zero_unreachable:
            reach = analysis.path(self.view, params, targets).useful
            zeros = [p for p in params if p not in reach]
            for p in zeros:
                log.info("the gradient of %r is structurally zero (%s): a zero tensor", p,
                         analysis.explain_unreachable(self.view, p, targets))
        elif not partial:
            analysis.check_reachable(self.view, params, targets)
        live = [p for p in params if p not in zeros]
        on_path = analysis.path(self.view, live, targets).nodes
        analysis.check_path_ops(self.view, on_path)
        need = _needed_opset(self.view, on_path)
        if need > self.view.opset and self._names is not None:
            raise InternalError(f"a subgraph's backward needs opset {need} but its model has {self.view.opset}")
        if need > self.view.opset:
            log.info("converting the model from opset %d to %d: the backward ops need it", self.view.opset, need)
            self._prepare(convert_opset(self.model, need, "the backward graph"))
            analysis.check_path_ops(self.view, analysis.path(self.view, live, targets).nodes)
        if callable(grad_names):
            grad_names = {p: grad_names(p) for p in params}
        return self._build(params, targets, seed_map, grad_names or {}, check_exit, suffix_hint, zeros)

    def _unroll(self, params: list, targets: list) -> bool:
        """Unroll the Loop and Scan nodes a requested gradient flows through (:mod:`onnxbp.unroll`),
        round after round for the ones their bodies held; whether anything was unrolled."""
        if not any(unroll.is_loop(n) for n in self.view.nodes):
            return False
        changed = False
        for _ in range(_MAX_NESTING):
            loops = [n for n in analysis.path(self.view, params, targets).nodes if unroll.is_loop(n)]
            if not loops:
                return changed
            unroll.unroll(self.model, loops, self.view)
            self._prepare(self.model)
            changed = True
        raise UnsupportedOpError(f"Loop/Scan nodes are nested more than {_MAX_NESTING} deep; {unroll.SUPPORTED}")

    def _seed_map(self, seeds: SeedSpec) -> dict:
        """``{seeded tensor: seed}``: a fill value (float) or a tensor name (existing or a new input)."""
        graph = self.view.graph
        if seeds is None:
            return {o.name: o.name + "_grad" for o in graph.output if self.view.info(o.name).is_float}
        if not isinstance(seeds, Mapping):
            seeds = {s: 1.0 for s in arguments.names(seeds, "seeds", WrtError)}
        if not seeds:
            raise WrtError("seeds is empty; name the tensors to differentiate (a loss), or pass seeds=None "
                           "(every float output, each with an upstream-gradient input)")
        known = self.view.tensor_names()
        out = {}
        for t, seed in seeds.items():
            if t not in known:
                raise WrtError(f"seed tensor {t!r} is not a tensor of the graph")
            if not self.view.info(t).is_float:
                raise WrtError(f"seed tensor {t!r} is not floating-point; only float tensors are differentiated")
            if not isinstance(seed, (str, int, float, np.floating, np.integer)) or isinstance(seed, bool):
                raise WrtError(f"the seed of {t!r} is {seed!r}; give a number or a tensor name")
            out[t] = seed
        return out

    def _build(self, params: list, targets: list, seed_map: dict, grad_names: Mapping[str, str],
               check_exit: bool, suffix_hint: bool, zeros: Sequence[str] = ()) -> Backward:
        view, w = self.view, self.writer
        g = view.graph
        path = analysis.path(view, [p for p in params if p not in zeros], targets)
        existing = view.tensor_names()
        grads: dict = {}
        seed_tensors, seed_inputs, new_inputs = {}, [], []
        for t, seed in seed_map.items():
            if isinstance(seed, str) and seed not in existing:
                self._claim(seed, f"the upstream gradient input for {'output ' if suffix_hint else ''}{t!r}",
                            suffix_hint)
                out_vi = next((o for o in g.output if o.name == t), None)
                new_inputs.append(self.value_info(seed, t, out_vi.type if out_vi is not None else None))
                view.infos[seed] = view.info(t)
                seed_inputs.append(seed)
            seed_tensors[t] = seed
        for name in grad_names.values():
            p = next(k for k, v in grad_names.items() if v == name)
            if name in seed_inputs:
                t = next(k for k, v in seed_tensors.items() if v == name)
                raise NameCollisionError(
                    f"the gradient output for {p!r} and the upstream-gradient input for output {t!r} would both "
                    f"be named {name!r} ({p!r} is differentiated and is also a graph output, so every suffix "
                    f"gives both the same name); give the output its own name (an Identity node) or leave "
                    f"{p!r} out of wrt")
            self._claim(name, f"the gradient output for {p!r}", suffix_hint)
        for t, seed in seed_tensors.items():
            if t in path.active and t in path.useful:
                if not isinstance(seed, str):
                    seed = self._fill(t, float(seed))
                    seed_tensors[t] = seed
                grads.setdefault(t, []).append(seed)

        for node in reversed(path.nodes):
            entry = view.entry_for(node)
            grad_outputs = [self._accumulate(grads, o) if o else None for o in node.output]
            if not any(grad_outputs):
                continue
            skip = set(entry.non_differentiable_inputs)
            inputs = view.inputs(node)  # then the outer-scope tensors its subgraphs read (If)
            needs = [bool(n) and n in path.active and n in path.useful and i not in skip
                     for i, n in enumerate(inputs)]
            ctx = GradContext(self, node, entry, grad_outputs, needs)
            self._collect(ctx, entry, needs, entry.fn(ctx), grads, inputs)

        sources = {}
        for p in params:
            if p in zeros:
                sources[p] = self._zero_gradient(p)
                continue
            src = self._accumulate(grads, p)
            if src is None:  # pragma: no cover - excluded by the reachability check
                raise InternalError(f"no gradient was produced for {p!r}")
            sources[p] = src
        gradients = self._name_gradients(params, sources, grad_names)
        dropped = w.prune(list(gradients.values()))
        if dropped:
            log.debug("pruned %d unused backward nodes", dropped)
        g.input.extend(new_inputs)
        nodes = w.flush_into(g, self.model.ir_version, keep=list(gradients.values()))
        if check_exit:
            check_full(self.model, InternalError, "the backward graph fails the ONNX checker")
        return Backward(self.model, gradients, seed_tensors, seed_inputs, view.infos,
                        len(view.nodes), len(nodes), [p for p in params if p in zeros])

    def _zero_gradient(self, p: str) -> str:
        """The structurally zero gradient of ``p``: zeros of its shape (static: from a shape constant)."""
        w = self.writer.scoped(f"{p}_grad", f"onnxbp: the gradient of '{p}' is structurally zero "
                                             f"(no gradient reaches it from the seeds)")
        info = self.view.info(p)
        if w.opset >= 9 and info.shape is not None and all(isinstance(d, int) for d in info.shape):
            out = w.zeros(w.ints(list(info.shape)), info.elem_type)
        else:
            out = w.zeros_like(p)
        self.view.infos[out] = info
        return out

    def _claim(self, name: str, what: str, suffix_hint: bool) -> None:
        """Reserve a name the caller fixes, or raise naming the tensor or node that already has it."""
        if self.view.names.is_used(name):
            raise NameCollisionError(
                f"the model already has a tensor or node named {name!r}, the name of {what}"
                f"{'; pass another grad_suffix (--grad-suffix)' if suffix_hint else ''}")
        self.view.names.reserve(name)

    def _fill(self, t: str, value: float) -> str:
        """A constant seed for ``t``: a constant of its static shape, else ones of its runtime shape."""
        info = self.view.info(t)
        if info.shape is not None and all(isinstance(d, int) for d in info.shape):
            return self.writer.const(np.full(info.shape, value, dtype=np_dtype(info.elem_type)))
        return self.writer.fill_like(t, value)

    def _name_gradients(self, params: list, sources: dict, grad_names: Mapping[str, str]) -> dict:
        """Give gradients their requested names: rename the tensor where it is ours alone, else Identity."""
        w = self.writer
        consumed = {i for n in w.nodes for i in reads(n)}
        claimed: set = set()
        renamed: dict = {}  # a tensor renamed to one gradient output, shared by another
        out = {}
        for p in params:
            src = renamed.get(sources[p], sources[p])
            name = grad_names.get(p)
            if name is None:
                out[p] = src
            elif w.created(src) and src not in claimed and src not in consumed:
                w.rename_output(src, name)
                renamed[src] = name
                out[p] = name
            else:
                w.op("Identity", src, out=name, name=f"{name}/identity")
                out[p] = name
            claimed.update((src, out[p]))
        return out

    def _accumulate(self, grads: dict, name: str) -> Optional[str]:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        out = self.writer.scoped(f"{name}_grad", f"onnxbp: sum of the {len(parts)} gradient contributions "
                                               f"to '{name}' (fan-out)").op("Sum", *parts, name="accumulate")
        self.view.infos[out] = TensorInfo(self.view.info(name).elem_type, None)
        grads[name] = [out]
        return out

    def _collect(self, ctx: GradContext, entry: RuleEntry, needs: list, result: Any, grads: dict,
                 inputs: list) -> None:
        if result is None:
            result = {}
        if isinstance(result, (list, tuple)):
            result = {i: r for i, r in enumerate(result)}
        if not isinstance(result, dict):
            raise InternalError(f"rule {entry.source} returned {type(result).__name__}; "
                                f"return a list aligned with the node's inputs or a dict")
        for i, needed in enumerate(needs):
            if not needed:
                continue
            value = result.get(i)
            if not value:
                raise NotDifferentiableError(
                    f"rule {entry.source} for node '{ctx.label}' ({ctx.op_type}) returned no gradient for "
                    f"input {i} ({inputs[i]!r}), which a requested gradient needs")
            if not isinstance(value, str):
                raise InternalError(f"rule {entry.source} returned {value!r} for input {i}; expected a name")
            grads.setdefault(inputs[i], []).append(value)

    def value_info(self, name: str, like: str, tp: Optional[onnx.TypeProto]) -> onnx.ValueInfoProto:
        """A ValueInfo for ``name`` typed like tensor ``like`` (its inferred shape, else ``tp``)."""
        info = self.view.info(like)
        if info.shape is not None or tp is None or not tp.tensor_type.HasField("shape"):
            shape = None if info.shape is None else list(info.shape)
            return helper.make_tensor_value_info(name, info.elem_type, shape)
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(tp)
        return vi


_MAX_NESTING = 16


def _needed_opset(view: GraphView, on_path: Sequence[onnx.NodeProto]) -> int:
    """The opset the backward ops of ``on_path`` need, counting the nodes inside their subgraphs
    (an If's branches are differentiated at the model's opset)."""
    need = 1

    def nested(node: onnx.NodeProto) -> None:
        nonlocal need
        for a in node.attribute:
            graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in graphs:
                for n in g.node:
                    e = view.registry.lookup(n.op_type, n.domain if n.domain != "ai.onnx" else "", view.opset)
                    if e is not None:
                        need = max(need, e.min_opset)
                    nested(n)

    for n in on_path:
        need = max(need, view.entry_for(n).min_opset)
        if view.has_subgraphs(n):
            nested(n)
    return need


def _validate_options(registry: Registry, options: dict) -> dict:
    specs = registry.options()
    out = {name: spec.default for name, spec in specs.items()}
    for key, value in options.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise OptionError(f"unknown option {key!r}; known options: {known}")
        if value not in specs[key].choices:
            raise OptionError(
                f"option {key}={value!r} is not supported; choose one of {', '.join(specs[key].choices)}"
            )
        out[key] = value
    return out
