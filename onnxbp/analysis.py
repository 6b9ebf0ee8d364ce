"""Activity analysis: which tensors depend on the parameters, and which nodes to differentiate.

1. *Activity*: a tensor is active if it depends on some ``p`` through
   floating-point tensors and differentiable inputs of ops that let a
   gradient flow (``no_gradient`` ops and integer tensors stop it).
2. *Usefulness*: walking backwards from the seeded tensors (by default the
   float graph outputs), a node is on the path if one of its outputs is
   active and useful and one of its differentiable inputs is active.  Only
   those nodes are differentiated.

Every function reads a :class:`~onnxbp.graphview.GraphView` and writes
nothing; the messages name the node that stopped a gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import onnx

from .errors import NotDifferentiableError, UnsupportedOpError, WrtError
from .graphview import GraphView
from .registry import NO_GRADIENT, NOT_DIFFERENTIABLE, RuleEntry
from .types import FLOAT_TYPES, type_name
from .unroll import SUPPORTED as CONTROL_FLOW_SUPPORTED

log = logging.getLogger(__name__)


@dataclass
class Path:
    """The result of the analysis for one set of parameters and seeds."""

    active: set      # tensors that depend on a parameter
    useful: set      # active tensors a seed depends on
    nodes: list      # forward nodes to differentiate, in forward order


def diff_inputs(inputs: Sequence[str], entry: Optional[RuleEntry]) -> list:
    """Indices into ``inputs`` (:meth:`GraphView.inputs`: the node's inputs, then its subgraphs'
    outer-scope reads) that a gradient may flow into."""
    skip = set(entry.non_differentiable_inputs) if entry else set()
    return [i for i, n in enumerate(inputs) if n and i not in skip]


def activity(view: GraphView, sources: Iterable[str]) -> tuple:
    """Forward pass: ``(active tensors, [(node, why activity stopped there)])``."""
    active = set(sources)
    stops: list = []
    for node in view.nodes:
        entry = view.entry_for(node)
        inputs = view.inputs(node)
        live_all = [i for i, n in enumerate(inputs) if n in active]
        if not live_all:
            continue
        label = view.label(node)
        live = [i for i in diff_inputs(inputs, entry) if inputs[i] in active]
        if not live:
            stops.append((node, f"input {inputs[live_all[0]]!r} of node '{label}' ({node.op_type}) "
                                f"is not differentiable"))
            continue
        if entry is not None and entry.kind == NO_GRADIENT:
            stops.append((node, f"node '{label}' ({node.op_type}) passes no gradient"))
            continue
        if entry is not None and entry.kind == NOT_DIFFERENTIABLE:
            why = f" ({entry.reason})" if entry.reason else ""
            stops.append((node, f"node '{label}' ({node.op_type}) is not differentiable{why}"))
        for out in node.output:
            if not out:
                continue
            info = view.info(out)
            if info.is_float or info.elem_type == 0:
                active.add(out)
            else:
                stops.append((node, f"output {out!r} of node '{label}' ({node.op_type}) is "
                                    f"{type_name(info.elem_type)}"))
    return active, stops


def usefulness(view: GraphView, active: set, targets: Sequence[str]) -> tuple:
    """Backward pass from ``targets``: ``(useful tensors, on-path nodes in forward order)``."""
    useful = {t for t in targets if t in active}
    on_path: list = []
    for node in reversed(view.nodes):
        if not any(o and o in useful for o in node.output):
            continue
        entry = view.entry_for(node)
        if entry is not None and entry.kind == NO_GRADIENT:
            continue
        inputs = view.inputs(node)
        live = [i for i in diff_inputs(inputs, entry) if inputs[i] in active]
        if not live:
            continue
        on_path.append(node)
        useful.update(inputs[i] for i in live)
    on_path.reverse()
    return useful, on_path


def path(view: GraphView, params: Sequence[str], targets: Sequence[str]) -> Path:
    active, _ = activity(view, params)
    useful, nodes = usefulness(view, active, targets)
    return Path(active, useful, nodes)


def explain_unreachable(view: GraphView, p: str, targets: Sequence[str]) -> str:
    consumers = [n for n in view.nodes if p in n.input]
    if not consumers and p not in targets:
        return f"{p!r} is not used by any node"
    _, stops = activity(view, [p])
    if stops:
        return f"every path from {p!r} to the outputs stops: " + "; ".join(s for _, s in stops[:3])
    return f"{p!r} does not lead to any floating-point graph output"


def state_only_initializers(view: GraphView) -> set:
    """Initializers consumed only at inputs a rule declares as state (BatchNorm's running stats)."""
    uses: dict = {}
    for node in view.nodes:
        entry = view.entry_for(node)
        state = set(entry.state_inputs) if entry is not None else set()
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append(i in state)
    return {name for name, flags in uses.items() if flags and all(flags)}


def resolve_wrt(view: GraphView, wrt: Optional[Sequence[str]], targets: Sequence[str],
                frozen: Iterable[str] = ()) -> list:
    """The parameters to differentiate: ``wrt`` checked, or the default set of initializers.

    The default is every float initializer through which a gradient reaches a
    target, except state (BatchNorm running statistics) and ``frozen``.
    """
    graph = view.graph
    frozen = set(frozen)
    if wrt is None:
        inits = [t.name for t in graph.initializer if t.data_type in FLOAT_TYPES and t.name not in frozen]
        reach = path(view, inits, targets).useful
        chosen = []
        state = state_only_initializers(view)
        for name in inits:
            if name in state:
                log.info("initializer %s holds state (e.g. running statistics): not in the default wrt", name)
            elif name in reach:
                chosen.append(name)
            elif log.isEnabledFor(logging.INFO):  # the explanation walks the graph: only when shown
                log.info("initializer %s gets no gradient: %s", name, explain_unreachable(view, name, targets))
        if not chosen:
            raise WrtError("the model has no floating-point initializer through which a gradient "
                           "reaches an output; name graph inputs with wrt=[...] / --wrt")
        return chosen
    if isinstance(wrt, str):
        wrt = [wrt]
    if not wrt:
        raise WrtError("wrt is empty; name initializers or graph inputs, or pass wrt=None (every float "
                       "initializer that reaches an output)")
    graph_inputs = {i.name for i in graph.input}
    inits = {t.name for t in graph.initializer}
    seen: list = []
    for p in wrt:
        if p in seen:
            raise WrtError(f"wrt names {p!r} twice")
        if p in frozen:
            raise WrtError(f"wrt names {p!r}, which is frozen")
        seen.append(p)
        if p not in graph_inputs and p not in inits:
            hint = ("it is an intermediate tensor; onnxbp differentiates w.r.t. initializers and graph inputs"
                    if p in {o for n in view.nodes for o in n.output} else "no such tensor in the graph")
            raise WrtError(f"wrt name {p!r} is not an initializer or graph input ({hint})")
        info = view.info(p)
        if info.elem_type not in FLOAT_TYPES:
            raise WrtError(f"wrt name {p!r} has type {type_name(info.elem_type)}; gradients exist "
                           f"only for floating-point tensors (float, double, float16, bfloat16)")
    return seen


def check_reachable(view: GraphView, params: Sequence[str], targets: Sequence[str]) -> None:
    reach = path(view, params, targets).useful
    for p in params:
        if p not in reach:
            raise NotDifferentiableError(
                f"no gradient of {p!r} reaches the outputs: {explain_unreachable(view, p, targets)}")


def check_path_ops(view: GraphView, on_path: Sequence[onnx.NodeProto]) -> None:
    """Every node on the path has a rule, and none is declared not differentiable."""
    missing = [n for n in on_path if view.entry_for(n) is None]
    if missing:
        n = missing[0]
        dom = n.domain or "ai.onnx"
        others = sorted({f"{m.op_type}" for m in missing[1:]} - {n.op_type})
        more = f" (also without rules: {', '.join(others[:6])})" if others else ""
        reg_dom = f", domain={n.domain!r}" if n.domain not in ("", "ai.onnx") else ""
        if view.has_subgraphs(n):
            captures = view.captures(n)
            through = (f"its inputs or the outer-scope tensors its body reads: "
                       f"{', '.join(repr(c) for c in captures[:4])}" if captures else "its inputs")
            raise UnsupportedOpError(
                f"node '{view.label(n)}' (op {n.op_type}, domain {dom}) has subgraphs and no gradient rule, "
                f"and a requested gradient flows through it ({through}); {CONTROL_FLOW_SUPPORTED}; "
                f"differentiating around it would be wrong: request gradients only of tensors that do not "
                f"reach the outputs through it{more}"
            )
        if n.op_type == "SplitToSequence" and n.output[0] in view.sequence_why:
            raise UnsupportedOpError(
                f"node '{view.label(n)}' (op SplitToSequence) is differentiated only when its sequence "
                f"is read by SequenceAt at constant positions, each chunk once (as one Split); here "
                f"{view.sequence_why[n.output[0]]}"
            )
        raise UnsupportedOpError(
            f"node '{view.label(n)}' (op {n.op_type}, domain {dom}, opset {view.opset}) has no "
            f"gradient rule and a requested gradient flows through it{more}; register one with "
            f"@onnxbp.register_gradient({n.op_type!r}{reg_dom}) or see `onnxbp ops` for supported ops"
        )
    for n in on_path:
        e = view.entry_for(n)
        if e.kind == NOT_DIFFERENTIABLE:
            why = f" ({e.reason})" if e.reason else ""
            raise NotDifferentiableError(
                f"node '{view.label(n)}' (op {n.op_type}) is not differentiable{why}, but a requested "
                f"gradient must pass through it; request gradients only of tensors that do not reach "
                f"the outputs through it"
            )
