"""The engine: activity analysis, reverse walk, fan-out accumulation, naming and splicing.

``gradient(model, wrt)`` returns a model that computes the forward outputs
and the vector-Jacobian product ``<p>_grad = sum_Y (dY/dp)^T . <Y>_grad`` for
every ``p`` in ``wrt``.

1. *Activity*: a tensor is active if it depends on some ``p`` through
   floating-point tensors and differentiable inputs of ops that let a
   gradient flow (``no_gradient`` ops and integer tensors stop it).
2. *Usefulness*: walking backwards from the float graph outputs, a node is
   on the path if one of its outputs is active and useful and one of its
   differentiable inputs is active.  Only those nodes are differentiated.
3. *Reverse walk*: in reverse topological order each on-path node's rule
   receives the (accumulated) gradients of its outputs and returns the
   gradients of its inputs.  A tensor consumed by several nodes gets the Sum
   of their contributions.
4. *Splicing*: backward nodes are appended after the forward nodes, the
   ``<Y>_grad`` inputs and ``<p>_grad`` outputs are added, dead backward nodes
   are pruned, and the result must pass ``onnx.checker`` with ``full_check``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .builder import FLOAT_TYPES, GradContext, TensorInfo
from .errors import (
    InternalError,
    ModelLoadError,
    NameCollisionError,
    NotDifferentiableError,
    OptionError,
    UnsupportedOpError,
    WrtError,
)
from .modelio import ModelLike, load_model
from . import shapeinfo
from .naming import NameAuthority
from .registry import NO_GRADIENT, NOT_DIFFERENTIABLE, REGISTRY, Registry, RuleEntry

log = logging.getLogger(__name__)

_TYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}


def gradient(model: ModelLike, wrt: Optional[Iterable[str]] = None, *, grad_suffix: str = "_grad",
             registry: Optional[Registry] = None, **options: Any) -> onnx.ModelProto:
    """Return a model computing the forward outputs and the gradients of ``wrt``.

    ``model`` is an ``onnx.ModelProto`` (never modified) or a path.  ``wrt``
    names initializers or float graph inputs; ``None`` means every float
    initializer through which a gradient reaches an output.  Options
    (``conv_strategy=...`` and others, see ``onnxbp ops``) select lowerings.
    """
    proto = load_model(model)
    return _Builder(proto, registry or REGISTRY, options, grad_suffix).run(
        None if wrt is None else list(wrt))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type, str(elem_type))


class _Builder:
    """State of one gradient build.  Rules see it only through GradContext."""

    def __init__(self, model: onnx.ModelProto, registry: Registry, options: dict, grad_suffix: str):
        self.registry = registry
        self.grad_suffix = grad_suffix
        self._options = self._validate_options(options)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
            raise ModelLoadError(f"the model fails the ONNX checker (full_check): {first}") from None
        self.model = model
        self._prepare(model)

    # ---------------------------------------------------------------- setup
    def _validate_options(self, options: dict) -> dict:
        specs = self.registry.options()
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

    def _prepare(self, model: onnx.ModelProto) -> None:
        self.opset = default_opset(model)
        self.graph = model.graph
        self.infos = shapeinfo.infer(model)
        self.nodes = self._analysis_view(list(model.graph.node))
        self.names = NameAuthority(model)
        self.new_nodes: list = []
        self._const_cache: dict = {}
        self._labels: dict = {}
        self._created: set = set()
        for i, node in enumerate(self.nodes):
            label = node.name or f"{node.op_type}_{i}"
            if not node.name:
                label = self.names.fresh(label)
            self._labels[id(node)] = label

    def constant_value(self, name: Optional[str]) -> Optional[np.ndarray]:
        """The value of a forward tensor fixed at build time, else ``None``.

        Known: initializers that are not also graph inputs (those can be
        overridden at run time) and outputs of forward ``Constant`` nodes with
        a ``value`` tensor.
        """
        if not name or any(i.name == name for i in self.graph.input):
            return None
        for init in self.graph.initializer:
            if init.name == name:
                return numpy_helper.to_array(init)
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] == name:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                return None if value is None else numpy_helper.to_array(value)
        return None

    def _const_ints(self, name: str) -> Optional[list]:
        value = self.constant_value(name)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def _analysis_view(self, nodes: list) -> list:
        """The node list the analysis and the rules see.

        A ``SplitToSequence`` whose sequence is read only by ``SequenceAt`` at
        constant positions, each chunk exactly once (torch's ``chunk`` through
        the dynamo exporter), is seen as one ``Split`` whose outputs are the
        SequenceAt outputs: the engine handles tensors, not sequences.  The
        forward graph itself is not changed; backward nodes only read its
        tensors (the input and the SequenceAt outputs).  Where the view does
        not apply, the reason is kept for the error a requested gradient
        through the sequence raises (``self._sequence_why``).
        """
        consumers: dict = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        graph_outputs = {o.name for o in self.graph.output}
        self._sequence_why: dict = {}
        replaced: set = set()
        view = []
        for n in nodes:
            if id(n) in replaced:
                continue
            if n.op_type != "SplitToSequence" or n.domain not in ("", "ai.onnx"):
                view.append(n)
                continue
            split, why = self._split_view(n, consumers, graph_outputs)
            if split is None:
                self._sequence_why[n.output[0]] = why
                view.append(n)
                continue
            synthetic, users = split
            replaced.update(id(u) for u in users)
            view.append(synthetic)
        return view

    def _split_view(self, n, consumers, graph_outputs):
        """``((Split node, SequenceAt users), None)``, or ``(None, why not)``."""
        seq = n.output[0]
        users = consumers.get(seq, [])
        if seq in graph_outputs:
            return None, "the sequence is a graph output"
        other = next((u for u in users if u.op_type != "SequenceAt"), None)
        if other is not None:
            return None, f"the sequence is read by {other.op_type} node '{other.name}'"
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        keepdims = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
        x = self.info(n.input[0])
        if x.shape is None:
            return None, f"the rank of {n.input[0]!r} is unknown"
        dim = x.shape[axis % len(x.shape)]
        has_split = len(n.input) > 1 and bool(n.input[1])
        split = self._const_ints(n.input[1]) if has_split else None
        if has_split and split is None:
            return None, f"its split {n.input[1]!r} is computed at run time"
        if split is None:
            if not keepdims:
                return None, "keepdims=0 drops the split axis"
            if not isinstance(dim, int):
                return None, f"the size of axis {axis} of {n.input[0]!r} is not static"
            count = dim
        elif len(split) == 1 and self._rank_of(n.input[1]) == 0:
            if not isinstance(dim, int):
                return None, f"the size of axis {axis} of {n.input[0]!r} is not static"
            count = -(-dim // split[0])
        else:
            count = len(split)
        outputs = [""] * count
        for u in users:
            pos = self._const_ints(u.input[1])
            if pos is None or len(pos) != 1 or not -count <= pos[0] < count:
                return None, f"SequenceAt node '{u.name}' reads a position that is not a constant in [-{count}, {count})"
            k = pos[0] % count
            if outputs[k]:
                return None, f"chunk {k} is read twice"
            outputs[k] = u.output[0]
        if not all(outputs):
            return None, f"chunk {outputs.index('')} of {count} is never read"
        synthetic = helper.make_node("Split", [n.input[0]], outputs, name=n.name or f"{seq}/split", axis=axis)
        log.info("differentiating SplitToSequence %s and its %d SequenceAt reads as one Split", n.name, count)
        return (synthetic, users), None

    def _rank_of(self, name: str) -> Optional[int]:
        shape = self.info(name).shape
        return None if shape is None else len(shape)

    def option(self, name: str) -> Any:
        if name not in self._options:
            raise OptionError(f"option {name!r} is read by a rule but was never declared")
        return self._options[name]

    def info(self, name: str) -> TensorInfo:
        return self.infos.get(name, TensorInfo())

    def node_label(self, node: onnx.NodeProto) -> str:
        return self._labels.get(id(node)) or node.name or node.op_type

    def entry_for(self, node: onnx.NodeProto) -> Optional[RuleEntry]:
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        version = self.opset
        if domain:
            version = next((i.version for i in self.model.opset_import if i.domain == domain), 1)
        return self.registry.lookup(node.op_type, domain, version)

    # -------------------------------------------------------------- emitting
    def emit(self, ctx: GradContext, op_type: str, inputs: list, n_out: int, domain: str,
             name: Optional[str], attrs: dict) -> list:
        node_name = self.names.fresh(f"{ctx.prefix}/grad/{name or op_type}")
        if n_out == 1:
            outs = [self.names.fresh(f"{node_name}_out")]
        else:
            outs = [self.names.fresh(f"{node_name}_out{k}") for k in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None,
                                doc_string=f"onnxbp: backward of node '{ctx.prefix}' ({ctx.op_type}) "
                                           f"by rule {ctx.entry.source}",
                                **attrs)
        self.new_nodes.append(node)
        self._created.update(outs)
        elem = self._result_type(op_type, inputs, attrs)
        if elem:
            for o in outs:
                self.infos[o] = TensorInfo(elem, None)
        return outs

    _INT64_RESULTS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}
    _BOOL_RESULTS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
                     "Or", "Xor", "IsNaN", "IsInf"}

    def _result_type(self, op_type: str, inputs: list, attrs: dict) -> int:
        """Element type of a backward node's outputs, so later rules can ask ``g.dtype`` of them."""
        if op_type in self._INT64_RESULTS:
            return onnx.TensorProto.INT64
        if op_type in self._BOOL_RESULTS:
            return onnx.TensorProto.BOOL
        if op_type == "Cast":
            return int(attrs.get("to", 0))
        if op_type == "Where" and len(inputs) > 1:
            return self.info(inputs[1]).elem_type
        if op_type in ("ConstantOfShape", "Constant"):
            return 0
        for name in inputs:
            if name and self.info(name).elem_type:
                return self.info(name).elem_type
        return 0

    def constant(self, arr: np.ndarray) -> str:
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.names.fresh("onnxbp/grad/const")
        node = helper.make_node("Constant", [], [name], name=name,
                                value=numpy_helper.from_array(np.array(arr, order="C", copy=True)),
                                doc_string="onnxbp: constant of the backward graph")
        self.new_nodes.append(node)
        self._created.add(name)
        self._const_cache[key] = name
        self.infos[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(arr.dtype), tuple(arr.shape))
        return name

    def ensure_forward_output(self, node: onnx.NodeProto, i: int) -> str:
        if i < len(node.output) and node.output[i]:
            return node.output[i]
        while len(node.output) <= i:
            node.output.append("")
        name = self.names.fresh(f"{self.node_label(node)}/output{i}")
        node.output[i] = name
        log.info("added output %d (%s) to forward node %s", i, name, self.node_label(node))
        return name

    # -------------------------------------------------------------- analysis
    def _diff_inputs(self, node: onnx.NodeProto, entry: Optional[RuleEntry]) -> list:
        skip = set(entry.non_differentiable_inputs) if entry else set()
        return [i for i, n in enumerate(node.input) if n and i not in skip]

    def _activity(self, sources: Iterable[str]) -> tuple:
        """Forward pass: active tensors, and where activity stopped (for messages)."""
        active = set(sources)
        stops: list = []
        for node in self.nodes:
            entry = self.entry_for(node)
            live_all = [i for i, n in enumerate(node.input) if n in active]
            if not live_all:
                continue
            live = [i for i in self._diff_inputs(node, entry) if node.input[i] in active]
            if not live:
                stops.append((node, f"input {node.input[live_all[0]]!r} of node "
                                    f"'{self.node_label(node)}' ({node.op_type}) is not differentiable"))
                continue
            if entry is not None and entry.kind == NO_GRADIENT:
                stops.append((node, f"node '{self.node_label(node)}' ({node.op_type}) passes no gradient"))
                continue
            if entry is not None and entry.kind == NOT_DIFFERENTIABLE:
                why = f" ({entry.reason})" if entry.reason else ""
                stops.append((node, f"node '{self.node_label(node)}' ({node.op_type}) is not differentiable{why}"))
            for out in node.output:
                if not out:
                    continue
                if self.info(out).is_float or self.info(out).elem_type == 0:
                    active.add(out)
                else:
                    stops.append((node, f"output {out!r} of node '{self.node_label(node)}' "
                                        f"({node.op_type}) is {_type_name(self.info(out).elem_type)}"))
        return active, stops

    def _usefulness(self, active: set) -> tuple:
        useful = {o.name for o in self.graph.output if o.name in active}
        on_path: list = []
        for node in reversed(self.nodes):
            if not any(o and o in useful for o in node.output):
                continue
            entry = self.entry_for(node)
            if entry is not None and entry.kind == NO_GRADIENT:
                continue
            live = [i for i in self._diff_inputs(node, entry) if node.input[i] in active]
            if not live:
                continue
            on_path.append(node)
            useful.update(node.input[i] for i in live)
        on_path.reverse()
        return useful, on_path

    def _explain_unreachable(self, p: str) -> str:
        consumers = [n for n in self.nodes if p in n.input]
        is_output = any(o.name == p for o in self.graph.output)
        if not consumers and not is_output:
            return f"{p!r} is not used by any node"
        active, stops = self._activity([p])
        if stops:
            return f"every path from {p!r} to the outputs stops: " + "; ".join(s for _, s in stops[:3])
        return f"{p!r} does not lead to any floating-point graph output"

    def _resolve_wrt(self, wrt: Optional[list], useful_all: set) -> list:
        graph_inputs = {i.name for i in self.graph.input}
        inits = {t.name for t in self.graph.initializer}
        if wrt is None:
            chosen = []
            state = self._state_only_initializers()
            for t in self.graph.initializer:
                if t.data_type not in FLOAT_TYPES:
                    continue
                if t.name in state:
                    log.info("initializer %s holds state (e.g. running statistics): not in the default wrt", t.name)
                elif t.name in useful_all:
                    chosen.append(t.name)
                else:
                    log.info("initializer %s gets no gradient: %s", t.name, self._explain_unreachable(t.name))
            if not chosen:
                raise WrtError("the model has no floating-point initializer through which a gradient "
                               "reaches an output; name graph inputs with wrt=[...] / --wrt")
            return chosen
        if isinstance(wrt, str):
            wrt = [wrt]
        seen = []
        for p in wrt:
            if p in seen:
                raise WrtError(f"wrt names {p!r} twice")
            seen.append(p)
            if p not in graph_inputs and p not in inits:
                hint = ("it is an intermediate tensor; onnxbp differentiates w.r.t. initializers and graph inputs"
                        if p in {o for n in self.nodes for o in n.output} else "no such tensor in the graph")
                raise WrtError(f"wrt name {p!r} is not an initializer or graph input ({hint})")
            info = self.info(p)
            if info.elem_type not in FLOAT_TYPES:
                raise WrtError(f"wrt name {p!r} has type {_type_name(info.elem_type)}; gradients exist "
                               f"only for floating-point tensors (float, double, float16, bfloat16)")
        return seen

    def _state_only_initializers(self) -> set:
        """Initializers consumed only at inputs a rule declares as state (BatchNorm's running stats)."""
        uses: dict = {}
        for node in self.nodes:
            entry = self.entry_for(node)
            state = set(entry.state_inputs) if entry is not None else set()
            for i, name in enumerate(node.input):
                if name:
                    uses.setdefault(name, []).append(i in state)
        return {name for name, flags in uses.items() if flags and all(flags)}

    def _check_path_ops(self, on_path: list) -> None:
        missing = [n for n in on_path if self.entry_for(n) is None]
        if missing:
            n = missing[0]
            dom = n.domain or "ai.onnx"
            others = sorted({f"{m.op_type}" for m in missing[1:]} - {n.op_type})
            more = f" (also without rules: {', '.join(others[:6])})" if others else ""
            reg_dom = f", domain={n.domain!r}" if n.domain not in ("", "ai.onnx") else ""
            if n.op_type == "SplitToSequence" and n.output[0] in self._sequence_why:
                raise UnsupportedOpError(
                    f"node '{self.node_label(n)}' (op SplitToSequence) is differentiated only when its sequence "
                    f"is read by SequenceAt at constant positions, each chunk once (as one Split); here "
                    f"{self._sequence_why[n.output[0]]}"
                )
            raise UnsupportedOpError(
                f"node '{self.node_label(n)}' (op {n.op_type}, domain {dom}, opset {self.opset}) has no "
                f"gradient rule and a requested gradient flows through it{more}; register one with "
                f"@onnxbp.register_gradient({n.op_type!r}{reg_dom}) or see `onnxbp ops` for supported ops"
            )
        for n in on_path:
            e = self.entry_for(n)
            if e.kind == NOT_DIFFERENTIABLE:
                why = f" ({e.reason})" if e.reason else ""
                raise NotDifferentiableError(
                    f"node '{self.node_label(n)}' (op {n.op_type}) is not differentiable{why}, but a requested "
                    f"gradient must pass through it; request gradients only of tensors that do not reach "
                    f"the outputs through it"
                )

    # ------------------------------------------------------------- the build
    def run(self, wrt: Optional[list]) -> onnx.ModelProto:
        float_inputs = [i.name for i in self.graph.input if self.info(i.name).is_float]
        float_inits = [t.name for t in self.graph.initializer if t.data_type in FLOAT_TYPES]
        candidates = wrt if wrt is not None else float_inits
        active_all, _ = self._activity([c for c in (candidates if isinstance(candidates, list) else [candidates])
                                        if c in set(float_inputs) | set(float_inits)])
        useful_all, _ = self._usefulness(active_all)
        params = self._resolve_wrt(wrt, useful_all)

        unreachable = [p for p in params if p not in useful_all]
        if unreachable:
            p = unreachable[0]
            raise NotDifferentiableError(
                f"no gradient of {p!r} reaches the outputs: {self._explain_unreachable(p)}")

        active, _ = self._activity(params)
        useful, on_path = self._usefulness(active)
        self._check_path_ops(on_path)

        need_opset = max([self.entry_for(n).min_opset for n in on_path] + [1])
        if need_opset > self.opset:
            self._upgrade_opset(need_opset)
            active, _ = self._activity(params)
            useful, on_path = self._usefulness(active)
            self._check_path_ops(on_path)

        return self._build(params, active, useful, on_path)

    def _upgrade_opset(self, target: int) -> None:
        log.info("converting the model from opset %d to %d: the backward ops need it", self.opset, target)
        try:
            converted = onnx.version_converter.convert_version(self.model, target)
            # The converter keeps the IR version; the new opset may need a newer one.
            converted.ir_version = max(converted.ir_version,
                                       helper.find_min_ir_version_for(list(converted.opset_import)))
            onnx.checker.check_model(converted, full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedOpError(
                f"the backward graph needs opset {target}, and onnx's version converter could not convert "
                f"the model from opset {self.opset}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
            ) from None
        self.model = converted
        self._prepare(converted)

    def _accumulate(self, grads: dict, name: str, final_name: Optional[str] = None) -> Optional[str]:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        node_name = self.names.fresh(f"{name}{self.grad_suffix}/accumulate")
        out = self.names.fresh(f"{name}{self.grad_suffix}/sum")
        self.new_nodes.append(helper.make_node(
            "Sum", list(parts), [out], name=node_name,
            doc_string=f"onnxbp: sum of the {len(parts)} gradient contributions to '{name}' (fan-out)"))
        self._created.add(out)
        self.infos[out] = TensorInfo(self.info(name).elem_type, None)
        grads[name] = [out]
        return out

    def _build(self, params: list, active: set, useful: set, on_path: list) -> onnx.ModelProto:
        g = self.graph
        grads: dict = {}
        new_inputs = []
        for out in g.output:
            info = self.info(out.name)
            if not info.is_float:
                continue
            gname = out.name + self.grad_suffix
            if self.names.is_used(gname):
                raise NameCollisionError(
                    f"the model already has a tensor or node named {gname!r}, the name of the upstream "
                    f"gradient input for output {out.name!r}; pass another grad_suffix (--grad-suffix)")
            self.names.reserve(gname)
            new_inputs.append(self._value_info(gname, out.name, out.type))
            self.infos[gname] = info
            if out.name in active and out.name in useful:
                grads.setdefault(out.name, []).append(gname)
        out_names = []
        for p in params:
            gname = p + self.grad_suffix
            if self.names.is_used(gname):
                raise NameCollisionError(
                    f"the model already has a tensor or node named {gname!r}, the name of the gradient "
                    f"output for {p!r}; pass another grad_suffix (--grad-suffix)")
            self.names.reserve(gname)
            out_names.append(gname)

        for node in reversed(on_path):
            entry = self.entry_for(node)
            grad_outputs = [self._accumulate(grads, o) if o else None for o in node.output]
            if not any(grad_outputs):
                continue
            skip = set(entry.non_differentiable_inputs)
            needs = [bool(n) and n in active and n in useful and i not in skip
                     for i, n in enumerate(node.input)]
            ctx = GradContext(self, node, entry, grad_outputs, needs)
            result = entry.fn(ctx)
            self._collect(ctx, entry, needs, result, grads)

        final_outputs = []
        claimed: set = set()
        renamed: dict = {}  # a tensor renamed to one gradient output, shared by another
        consumed = {i for n in self.new_nodes for i in n.input}
        for p, gname in zip(params, out_names):
            src = self._accumulate(grads, p)
            if src is None:  # pragma: no cover - excluded by the usefulness check
                raise InternalError(f"no gradient was produced for {p!r}")
            src = renamed.get(src, src)
            renamable = src in self._created and src not in claimed and src not in consumed
            if renamable:
                self._rename(src, gname)
                renamed[src] = gname
            else:
                self.new_nodes.append(helper.make_node(
                    "Identity", [src], [gname], name=self.names.fresh(f"{gname}/identity"),
                    doc_string=f"onnxbp: gradient output for '{p}'"))
            claimed.add(src)
            final_outputs.append(self._value_info(gname, p, None))

        self._prune(out_names)
        g.node.extend(self.new_nodes)
        g.input.extend(new_inputs)
        g.output.extend(final_outputs)
        meta = self.model.metadata_props.add()
        meta.key = "onnxbp.gradients"
        meta.value = ",".join(f"{p}={n}" for p, n in zip(params, out_names))
        try:
            onnx.checker.check_model(self.model, full_check=True)
        except Exception as exc:  # noqa: BLE001 - ValidationError or InferenceError
            first = str(exc).strip().splitlines()[0]
            raise InternalError(f"the gradient model fails the ONNX checker: {first}") from None
        log.info("gradient model: %d forward nodes, %d backward nodes, %d gradients",
                 len(self.nodes), len(self.new_nodes), len(params))
        return self.model

    def _collect(self, ctx: GradContext, entry: RuleEntry, needs: list, result: Any, grads: dict) -> None:
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
                    f"rule {entry.source} for node '{ctx.prefix}' ({ctx.op_type}) returned no gradient for "
                    f"input {i} ({ctx.node.input[i]!r}), which a requested gradient needs")
            if not isinstance(value, str):
                raise InternalError(f"rule {entry.source} returned {value!r} for input {i}; expected a name")
            grads.setdefault(ctx.node.input[i], []).append(value)

    def _rename(self, old: str, new: str) -> None:
        for node in self.new_nodes:
            for k, o in enumerate(node.output):
                if o == old:
                    node.output[k] = new
        for key, val in list(self._const_cache.items()):
            if val == old:
                del self._const_cache[key]

    def _prune(self, outputs: Sequence[str]) -> None:
        needed = set(outputs)
        keep = []
        for node in reversed(self.new_nodes):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        dropped = len(self.new_nodes) - len(keep)
        if dropped:
            log.debug("pruned %d unused backward nodes", dropped)
        self.new_nodes = list(reversed(keep))

    def _value_info(self, name: str, like: str, tp: Optional[onnx.TypeProto]) -> onnx.ValueInfoProto:
        info = self.info(like)
        if info.shape is not None or tp is None or not tp.tensor_type.HasField("shape"):
            shape = None if info.shape is None else [d if d is not None else None for d in info.shape]
            return helper.make_tensor_value_info(name, info.elem_type, shape)
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(tp)
        return vi
