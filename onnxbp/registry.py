"""The gradient-rule registry.

Every op onnxbp knows has exactly one outcome per (domain, op_type, opset):

``rule``
    A function ``fn(g: GradContext)`` that emits the backward ops for the
    node and returns the input gradients.
``no_gradient``
    No gradient flows through the op (Shape, Size, comparisons, ops whose
    outputs are integers or random).  Gradient paths stop there cleanly; a
    requested gradient that can reach the outputs *only* through such ops
    raises :class:`NotDifferentiableError`.
``not_differentiable``
    The op sits on a differentiable path but has no meaningful gradient
    (ArgMax, ArgMin: indices).  Requesting a gradient through it raises.

Rules are registered by the :func:`register_gradient` decorator next to the
rule; registering the same op twice for overlapping opsets is an error unless
``override=True``.  The registry is keyed by opset: a rule may cover
``since <= opset <= until`` only, for ops whose meaning changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from .errors import RuleRegistrationError

log = logging.getLogger(__name__)

RULE = "rule"
NO_GRADIENT = "no_gradient"
NOT_DIFFERENTIABLE = "not_differentiable"

#: Smoothness classes, used by the finite-difference checker to pick step sizes.
LINEAR = "linear"  # (multi)linear / polynomial of degree <= 3 in each input
PIECEWISE = "piecewise"  # piecewise linear: kinks (Relu, MaxPool, Abs, Clip)
SMOOTH = "smooth"  # everything else

MAX_OPSET = 10_000


@dataclass(frozen=True)
class RuleEntry:
    op_type: str
    domain: str
    kind: str
    fn: Optional[Callable] = None
    since: int = 1
    until: int = MAX_OPSET
    lowering: str = ""
    non_differentiable_inputs: tuple = ()
    smoothness: str = SMOOTH
    min_opset: int = 1
    reason: str = ""
    state_inputs: tuple = ()

    def covers(self, opset: int) -> bool:
        return self.since <= opset <= self.until

    @property
    def source(self) -> str:
        if self.fn is None:
            return self.kind
        return f"{self.fn.__module__}.{self.fn.__qualname__}"


@dataclass(frozen=True)
class OptionSpec:
    name: str
    choices: tuple
    default: str
    help: str


class Registry:
    """Maps (domain, op_type, opset) to a :class:`RuleEntry`."""

    def __init__(self):
        self._entries: dict[tuple[str, str], list[RuleEntry]] = {}
        self._options: dict[str, OptionSpec] = {}

    # -- registration -----------------------------------------------------
    def _add(self, entry: RuleEntry, override: bool) -> None:
        if entry.since > entry.until:
            raise RuleRegistrationError(
                f"rule for {entry.op_type!r}: since={entry.since} is after until={entry.until}"
            )
        key = (_norm_domain(entry.domain), entry.op_type)
        existing = self._entries.setdefault(key, [])
        clashes = [e for e in existing if e.since <= entry.until and entry.since <= e.until]
        if clashes and not override:
            old = clashes[0]
            raise RuleRegistrationError(
                f"op {entry.op_type!r} (domain {entry.domain or 'ai.onnx'!r}) already has a "
                f"{old.kind} entry for opsets {old.since}..{_fmt_until(old.until)} from {old.source}; "
                f"pass override=True to replace it"
            )
        for old in clashes:
            existing.remove(old)
            log.info("overriding %s entry for %s from %s", old.kind, entry.op_type, old.source)
        existing.append(entry)
        existing.sort(key=lambda e: e.since)

    def register(
        self,
        op_type: str,
        domain: str = "",
        *,
        since: int = 1,
        until: int = MAX_OPSET,
        override: bool = False,
        lowering: str = "",
        non_differentiable_inputs: Sequence[int] = (),
        smoothness: str = SMOOTH,
        min_opset: int = 1,
        state_inputs: Sequence[int] = (),
    ) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn(g) -> gradients`` as the rule for ``op_type``.

        ``lowering`` is the one-line description ``onnxbp ops`` prints.
        ``non_differentiable_inputs`` lists input indices through which no
        gradient flows (shape, indices, axes inputs).  ``min_opset`` is the
        default-domain opset the emitted backward ops need; older models are
        converted with onnx's version converter first.  ``state_inputs`` lists
        inputs that hold state rather than trainable parameters (BatchNorm's
        running mean and variance): initializers used only there are left out
        of the default ``wrt`` (they can still be requested by name).
        """
        if smoothness not in (LINEAR, PIECEWISE, SMOOTH):
            raise RuleRegistrationError(
                f"rule for {op_type!r}: smoothness must be one of linear, piecewise, smooth"
            )

        def decorator(fn: Callable) -> Callable:
            if not callable(fn):
                raise RuleRegistrationError(f"rule for {op_type!r} is not callable")
            doc = (fn.__doc__ or "").strip().splitlines()
            entry = RuleEntry(
                op_type=op_type,
                domain=domain,
                kind=RULE,
                fn=fn,
                since=since,
                until=until,
                lowering=lowering or (doc[0] if doc else ""),
                non_differentiable_inputs=tuple(non_differentiable_inputs),
                smoothness=smoothness,
                min_opset=min_opset,
                state_inputs=tuple(state_inputs),
            )
            self._add(entry, override)
            return fn

        return decorator

    def no_gradient(
        self, op_types: Iterable[str], domain: str = "", *, reason: str = "", override: bool = False
    ) -> None:
        """Declare that no gradient flows through these ops (gradient paths stop there)."""
        for op in _as_list(op_types):
            self._add(RuleEntry(op, domain, NO_GRADIENT, reason=reason,
                                lowering=f"no gradient flows ({reason})" if reason else "no gradient flows"),
                      override)

    def not_differentiable(
        self, op_types: Iterable[str], domain: str = "", *, reason: str = "", override: bool = False
    ) -> None:
        """Declare these ops not differentiable: a requested gradient through them raises."""
        for op in _as_list(op_types):
            self._add(RuleEntry(op, domain, NOT_DIFFERENTIABLE, reason=reason,
                                lowering=f"not differentiable ({reason})" if reason else "not differentiable"),
                      override)

    def unregister(self, op_type: str, domain: str = "") -> None:
        """Remove every entry of an op (mostly for tests of user rules)."""
        self._entries.pop((_norm_domain(domain), op_type), None)

    # -- options rules read through ``g.option(name)`` ---------------------
    def declare_option(self, name: str, choices: Sequence[str], default: str, help: str) -> None:
        if name in self._options:
            raise RuleRegistrationError(f"option {name!r} is declared twice")
        if default not in choices:
            raise RuleRegistrationError(f"option {name!r}: default {default!r} not in {choices}")
        self._options[name] = OptionSpec(name, tuple(choices), default, help)

    def options(self) -> dict[str, OptionSpec]:
        return dict(self._options)

    # -- lookup ------------------------------------------------------------
    def lookup(self, op_type: str, domain: str = "", opset: int = MAX_OPSET) -> Optional[RuleEntry]:
        for entry in self._entries.get((_norm_domain(domain), op_type), ()):
            if entry.covers(opset):
                return entry
        return None

    def entries(self) -> list[RuleEntry]:
        out = [e for es in self._entries.values() for e in es]
        return sorted(out, key=lambda e: (e.domain, e.op_type, e.since))


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _fmt_until(until: int) -> str:
    return "latest" if until >= MAX_OPSET else str(until)


def _as_list(x) -> list:
    return [x] if isinstance(x, str) else list(x)


#: The default registry, which the built-in rules populate.
REGISTRY = Registry()

#: Lowering targets (option ``target``): which runtimes the emitted ops must run in.
TARGETS = ("onnxruntime", "portable")

REGISTRY.declare_option(
    "target", choices=TARGETS, default="onnxruntime",
    help="the runtimes the gradient ops are lowered for: 'onnxruntime' = the forms measured fastest "
         "there; 'portable' = forms that onnxruntime, onnx's ReferenceEvaluator, OpenVINO and tract all "
         "run with a symbolic batch: no Conv/ConvTranspose weight gradient uses a runtime-shaped kernel "
         "(group 1: one Gemm on the im2col matrix; grouped: a batched MatMul per group), see "
         "docs/portability.md",
)


def register_gradient(op_type: str, domain: str = "", **kwargs) -> Callable[[Callable], Callable]:
    """Decorator registering a gradient rule in the default registry.

    Example::

        @onnxbp.register_gradient("MySoftsign", domain="my.ops")
        def softsign_grad(g):
            x, = g.inputs
            dy = g.grad_output(0)
            one = g.const(1.0, like=x)
            denom = g.op("Add", one, g.op("Abs", x))
            return [g.op("Div", dy, g.op("Mul", denom, denom))]
    """
    return REGISTRY.register(op_type, domain, **kwargs)


def no_gradient(op_types, domain: str = "", **kwargs) -> None:
    REGISTRY.no_gradient(op_types, domain, **kwargs)


def not_differentiable(op_types, domain: str = "", **kwargs) -> None:
    REGISTRY.not_differentiable(op_types, domain, **kwargs)
