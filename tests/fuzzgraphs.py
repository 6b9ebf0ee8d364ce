"""A seeded generator of small random ONNX graphs for the gradient fuzzer (tests/test_fuzz.py).

``random_case(seed)`` returns a :class:`Case`: a valid model (``onnx.checker``
with ``full_check`` passes, onnxruntime runs it) built from ops that have a
gradient rule, plus bounded feeds for its graph inputs and the ``wrt`` to
differentiate.  The same seed gives the same case on every machine.

How a graph is grown
    A pool of float tensors starts with 1-2 graph inputs whose first dim is the
    symbolic batch ``N`` (the checker feeds ``N = 2``) and sometimes a float
    initializer.  Each step picks an op from the table ``OPS`` and its
    operand(s) from the pool (recent tensors first; a tensor already consumed
    is picked again a third of the time, so fan-out is common), creating new
    float initializers (the parameters) for weights and broadcast operands.
    Every tensor carries its shape (``"N"`` for the batch dim, which is never
    sliced, concatenated, split or reshaped away), an upper bound ``hi`` on
    ``|value|`` and, for positive tensors, a lower bound ``lo``.  The bounds
    keep every value finite and away from singularities: Exp only below 3, Log,
    Sqrt, Reciprocal, Pow with a fractional exponent and Div's denominator only
    on tensors with ``lo >= 0.2`` (made by Softplus+c, Exp(Tanh), Sigmoid+c);
    tensors whose bound grows past 8 are squashed (Tanh/Sigmoid/Softsign) or
    normalised before they are used again.  Every tensor has at most 64
    elements at ``N = 2``.
    Tensors nothing consumes become graph outputs (and one consumed tensor now
    and then), so every node reaches an output.

Kinks
    Relu, LeakyRelu, Abs, Clip, Max/Min, ReduceMax/Min/L1, MaxPool,
    HardSigmoid/HardSwish and PRelu are included.  Inputs are continuous
    random values, so a kink is met with probability ~0 at the float64 check's
    step (1e-6); Max/Min/Where never get the same tensor twice.

Opsets: 17 for most seeds, 13 for one in five (no LayerNormalization there;
Split/Squeeze/Unsqueeze/ReduceSum take their axes as inputs in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT
I64 = TensorProto.INT64
N = "N"          # the symbolic batch dim
BATCH = 2        # what the checker feeds for N
MAX_ELEMS = 64
SQUASH_ABOVE = 8.0


@dataclass
class T:
    name: str
    shape: tuple
    hi: float                 # |value| <= hi
    lo: Optional[float] = None  # value >= lo > 0 when set
    active: bool = False      # depends on a float initializer (a parameter)
    uses: int = 0


def numel(shape) -> int:
    return int(np.prod([BATCH if d == N else d for d in shape])) if shape else 1


def _bcast(a: tuple, b: tuple) -> Optional[tuple]:
    """numpy broadcasting with the symbolic dim; None when incompatible."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        else:
            return None
    return tuple(reversed(out))


@dataclass
class Case:
    seed: int
    model: onnx.ModelProto
    feeds: dict
    wrt: Optional[list]
    kind: str = "plain"
    expect: str = "correct"          # "correct" or "refused" (control flow on the path)
    control_node: str = ""

    def node_list(self) -> str:
        return node_list(self.model)


def node_list(model: onnx.ModelProto) -> str:
    g = model.graph
    lines = [f"opset {model.opset_import[0].version}; inputs "
             + ", ".join(f"{i.name}{_vi_shape(i)}" for i in g.input)
             + "; initializers " + ", ".join(f"{t.name}{list(t.dims)}" for t in g.initializer
                                              if t.data_type == F)
             + "; outputs " + ", ".join(o.name for o in g.output)]
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.name if isinstance(v, onnx.GraphProto) else v) for k, v in attrs.items()}
        lines.append(f"  {n.name}: {n.op_type}({', '.join(n.input)}) -> {', '.join(n.output)}"
                     + (f" {attrs}" if attrs else ""))
    return "\n".join(lines)


def _vi_shape(vi) -> str:
    dims = vi.type.tensor_type.shape.dim
    return "[" + ",".join(d.dim_param or str(d.dim_value) for d in dims) + "]"


class Builder:
    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list = []
        self.inits: list = []
        self.int_inits: list = []
        self.inputs: list = []       # (name, shape)
        self.feeds: dict = {}
        self.pool: list = []
        self.k = 0
        self.forced_outputs: list = []

    # -- names, constants, parameters -------------------------------------------------
    def fresh(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def param(self, shape, lo=-1.0, hi=1.0, positive_min=None) -> T:
        shape = tuple(int(d) for d in shape)
        val = self.rng.uniform(lo, hi, size=shape).astype(np.float32)
        name = self.fresh("p")
        self.inits.append(numpy_helper.from_array(val, name))
        bound = max(abs(lo), abs(hi))
        return T(name, shape, bound, lo if lo > 0 else None, active=True)

    def ints(self, values, name="c") -> str:
        name = self.fresh(name)
        self.int_inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def fconst(self, value, shape=(), param=False) -> str:
        """A float constant: a Constant node (not differentiated), or an initializer (a parameter)."""
        name = self.fresh("k")
        tensor = numpy_helper.from_array(np.full(shape, value, np.float32), name)
        if param:
            self.inits.append(tensor)
        else:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("const_"), value=tensor))
        return name

    def graph_input(self, shape) -> T:
        name = self.fresh("x")
        self.inputs.append((name, tuple(shape)))
        concrete = tuple(BATCH if d == N else d for d in shape)
        self.feeds[name] = self.rng.uniform(-1, 1, size=concrete).astype(np.float32)
        return T(name, tuple(shape), 1.0)

    def node(self, op, inputs, n_out=1, **attrs) -> list:
        outs = [self.fresh("t") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh(op.lower() + "_"), **attrs))
        return outs

    def add(self, t: T) -> T:
        self.pool.append(t)
        return t

    # -- picking operands -----------------------------------------------------------------
    def pick(self, pred=lambda t: True, exclude=()) -> Optional[T]:
        cands = [t for t in self.pool if pred(t) and t.name not in exclude]
        if not cands:
            return None
        unused = [t for t in cands if t.uses == 0]
        if unused and self.rng.random() > 0.33:
            cands = unused
        # Recent tensors first.
        w = np.array([1.0 + i for i in range(len(cands))]) ** 1.5
        t = cands[int(self.rng.choice(len(cands), p=w / w.sum()))]
        return t

    def use(self, *ts):
        for t in ts:
            t.uses += 1

    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    # -- bounded helpers -------------------------------------------------------------------
    def squash(self, t: T) -> T:
        op = self.choice(["Tanh", "Sigmoid", "Softsign"])
        self.use(t)
        (o,) = self.node(op, [t.name])
        lo = None
        if op == "Sigmoid":
            lo = 1 / (1 + math.exp(min(t.hi, 50)))
            lo = lo if lo > 0 else None
        return self.add(T(o, t.shape, 1.0, lo, t.active))

    def tame(self, t: T) -> T:
        return self.squash(t) if t.hi > SQUASH_ABOVE else t

    def positive(self, t: T, minimum=0.2) -> T:
        """A tensor >= minimum derived from t."""
        if t.lo is not None and t.lo >= minimum and t.hi <= SQUASH_ABOVE:
            return t
        t = self.tame(t)
        self.use(t)
        way = self.choice(["softplus", "exp", "sigmoid"])
        c = float(self.rng.uniform(minimum, 1.0))
        if way == "softplus":
            (s,) = self.node("Softplus", [t.name])
            (o,) = self.node("Add", [s, self.fconst(c, param=True)])
            return self.add(T(o, t.shape, math.log1p(math.exp(t.hi)) + c, c, t.active))
        if way == "exp":
            (th,) = self.node("Tanh", [t.name])
            (o,) = self.node("Exp", [th])
            return self.add(T(o, t.shape, math.e, 1 / math.e, t.active))
        (s,) = self.node("Sigmoid", [t.name])
        (o,) = self.node("Add", [s, self.fconst(c, param=True)])
        return self.add(T(o, t.shape, 1 + c, c, t.active))

    def broadcast_partner(self, a: T) -> T:
        """A tensor that broadcasts with a: from the pool, or a new parameter."""
        if self.rng.random() < 0.4:
            b = self.pick(lambda t: t.name != a.name and _bcast(a.shape, t.shape) is not None
                          and numel(_bcast(a.shape, t.shape)) <= MAX_ELEMS and t.hi <= SQUASH_ABOVE)
            if b is not None:
                return b
        # A suffix of a's shape with some dims set to 1 (never N: a parameter has no batch dim).
        keep = int(self.rng.integers(0, len(a.shape) + 1))
        shape = list(a.shape[len(a.shape) - keep:])
        shape = [1 if (d == N or self.rng.random() < 0.3) else d for d in shape]
        if self.rng.random() < 0.15 and numel(a.shape) * 2 <= MAX_ELEMS and a.shape and a.shape[0] != N:
            shape = [2] + [1] * len(a.shape)            # b is bigger: a broadcasts
        return self.add(self.param(shape))


# ----------------------------------------------------------------------------------------
# The op table: each entry grows the graph by a node or a few, or returns False.

UNARY_SMOOTH = ["Tanh", "Sigmoid", "Softsign", "Sin", "Cos", "Erf", "Neg", "Identity", "Softplus",
                "Elu", "Celu", "Selu"]
UNARY_KINK = ["Relu", "LeakyRelu", "Abs", "HardSigmoid", "HardSwish", "Clip"]


def op_unary(b: Builder) -> bool:
    a = b.pick()
    a = b.tame(a)
    op = b.choice(UNARY_SMOOTH + UNARY_KINK)
    if op == "HardSwish" and b.opset < 14:
        op = "HardSigmoid"
    b.use(a)
    attrs, extra = {}, []
    if op == "LeakyRelu":
        attrs["alpha"] = float(b.rng.uniform(0.05, 0.3))
    if op in ("Elu", "Celu"):
        attrs["alpha"] = float(b.rng.uniform(0.5, 1.5))
    if op == "Clip":
        lo = float(b.rng.uniform(-0.8, -0.1))
        extra = [b.fconst(lo), b.fconst(lo + float(b.rng.uniform(0.3, 1.2)))]
    (o,) = b.node(op, [a.name] + extra, **attrs)
    hi = {"Tanh": 1, "Sigmoid": 1, "Softsign": 1, "Sin": 1, "Cos": 1, "Erf": 1, "HardSigmoid": 1,
          "Clip": 1.2}.get(op, a.hi * 1.1 + 1)
    lo = None
    if op == "Softplus":
        lo = math.log1p(math.exp(-a.hi))
    b.add(T(o, a.shape, hi, lo, a.active))
    return True


def op_exp_log(b: Builder) -> bool:
    op = b.choice(["Exp", "Log", "Sqrt", "Reciprocal", "Tan", "Pow", "Pow"])
    a = b.pick()
    if op == "Exp":
        if a.hi > 3:
            a = b.squash(a)
        b.use(a)
        (o,) = b.node("Exp", [a.name])
        return bool(b.add(T(o, a.shape, math.exp(a.hi), math.exp(-a.hi), a.active)))
    if op == "Tan":
        a = a if a.hi <= 1 else b.squash(a)
        b.use(a)
        (o,) = b.node("Tan", [a.name])
        return bool(b.add(T(o, a.shape, math.tan(min(a.hi, 1.0)), None, a.active)))
    if op == "Pow" and b.rng.random() < 0.5:
        a = b.tame(a)
        e = float(b.choice([2.0, 3.0]))
        b.use(a)
        (o,) = b.node("Pow", [a.name, b.fconst(e)])
        return bool(b.add(T(o, a.shape, a.hi ** e + 1e-3, None, a.active)))
    a = b.positive(a)
    b.use(a)
    if op == "Log":
        (o,) = b.node("Log", [a.name])
        hi = max(abs(math.log(a.lo)), abs(math.log(a.hi)))
        return bool(b.add(T(o, a.shape, hi, None, a.active)))
    if op == "Sqrt":
        (o,) = b.node("Sqrt", [a.name])
        return bool(b.add(T(o, a.shape, math.sqrt(a.hi), math.sqrt(a.lo), a.active)))
    if op == "Reciprocal":
        (o,) = b.node("Reciprocal", [a.name])
        return bool(b.add(T(o, a.shape, 1 / a.lo, 1 / a.hi, a.active)))
    e = float(b.choice([0.5, 1.5, -1.0, -0.5]))
    (o,) = b.node("Pow", [a.name, b.fconst(e)])
    vals = [a.lo ** e, a.hi ** e]
    return bool(b.add(T(o, a.shape, max(vals), min(vals), a.active)))


def op_binary(b: Builder) -> bool:
    a = b.tame(b.pick())
    op = b.choice(["Add", "Sub", "Mul", "Div", "Add", "Mul", "Max", "Min", "Sum", "Mean", "PRelu", "Where"])
    if op == "Mul" and b.rng.random() < 0.15:           # x * x: fan-out into one node
        b.use(a, a)
        (o,) = b.node("Mul", [a.name, a.name])
        return bool(b.add(T(o, a.shape, a.hi * a.hi, None, a.active)))
    c = b.broadcast_partner(a)
    if op in ("Max", "Min", "Where") and c.name == a.name:
        return False
    out = _bcast(a.shape, c.shape)
    if out is None or numel(out) > MAX_ELEMS:
        return False
    x, y = (a, c) if b.rng.random() < 0.7 else (c, a)
    active = a.active or c.active
    if op == "PRelu":
        # slope must broadcast to X (unidirectionally): X is the bigger one.
        if _bcast(x.shape, y.shape) != tuple(x.shape):
            x, y = y, x
        if _bcast(x.shape, y.shape) != tuple(x.shape):
            return False
        b.use(x, y)
        (o,) = b.node("PRelu", [x.name, y.name])
        return bool(b.add(T(o, x.shape, x.hi * max(1, y.hi), None, active)))
    if op == "Div":
        y = b.positive(y)
        b.use(x, y)
        (o,) = b.node("Div", [x.name, y.name])
        return bool(b.add(T(o, out, x.hi / y.lo, None, active)))
    if op == "Where":
        k = int(b.rng.integers(0, len(out) + 1))
        cshape = tuple(1 if d == N else d for d in out[len(out) - k:])
        cond = b.rng.random(cshape) < 0.5
        name = b.fresh("cond")
        b.int_inits.append(numpy_helper.from_array(np.asarray(cond), name))
        b.use(x, y)
        (o,) = b.node("Where", [name, x.name, y.name])
        return bool(b.add(T(o, out, max(x.hi, y.hi), None, active)))
    b.use(x, y)
    ins = [x.name, y.name]
    if op in ("Sum", "Mean") and b.rng.random() < 0.5:
        ins.append(x.name)                               # a repeated operand
    (o,) = b.node(op, ins)
    hi = {"Mul": x.hi * y.hi, "Sum": x.hi * 2 + y.hi}.get(op, x.hi + y.hi)
    return bool(b.add(T(o, out, hi, None, active)))


def op_matmul(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) >= 1 and t.shape[-1] != N)
    if a is None:
        return False
    a = b.tame(a)
    k = a.shape[-1]
    if len(a.shape) >= 2 and a.shape[-2] != N and b.rng.random() < 0.25:
        # a @ a^T: both operands from one tensor
        perm = list(range(len(a.shape)))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        b.use(a, a)
        (t,) = b.node("Transpose", [a.name], perm=perm)
        out = a.shape[:-1] + (a.shape[-2],)
        if numel(out) > MAX_ELEMS:
            return False
        (o,) = b.node("MatMul", [a.name, t])
        return bool(b.add(T(o, out, a.hi * a.hi * k, None, a.active)))
    m = int(b.rng.integers(1, 5))
    wshape = (k, m) if len(a.shape) > 1 or b.rng.random() < 0.5 else (k,)
    if len(a.shape) >= 3 and b.rng.random() < 0.3:
        wshape = (a.shape[-3] if a.shape[-3] != N else 1, k, m)
    out = _bcast(a.shape[:-2], wshape[:-2]) if len(a.shape) >= 2 else ()
    if out is None:
        return False
    if len(wshape) == 1:
        out = a.shape[:-1]
    elif len(a.shape) == 1:
        out = (m,)
    else:
        out = out + (a.shape[-2], m)
    if numel(out) > MAX_ELEMS:
        return False
    w = b.add(b.param(wshape, -1, 1))
    x, y = a, w
    b.use(x, y)
    (o,) = b.node("MatMul", [x.name, y.name])
    return bool(b.add(T(o, tuple(out), a.hi * k, None, True)))


def op_gemm(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) == 2 and t.shape[1] != N)
    if a is None:
        return False
    a = b.tame(a)
    mrows, k = a.shape
    n = int(b.rng.integers(1, 5))
    if numel((mrows, n)) > MAX_ELEMS:
        return False
    trans_b = int(b.rng.integers(2))
    w = b.add(b.param((n, k) if trans_b else (k, n)))
    ins = [a.name, w.name]
    attrs = {"transB": trans_b, "alpha": float(b.rng.uniform(0.5, 1.5))}
    if b.rng.random() < 0.7:
        cshape = b.choice([(n,), (1, n), ()] + ([(mrows, 1)] if mrows != N else []))
        c = b.add(b.param(cshape))
        ins.append(c.name)
        attrs["beta"] = float(b.rng.uniform(0.5, 1.5))
        b.use(c)
    b.use(a, w)
    (o,) = b.node("Gemm", ins, **attrs)
    return bool(b.add(T(o, (mrows, n), a.hi * k * 1.5 + 1.5, None, True)))


REDUCE = ["ReduceSum", "ReduceMean", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare",
          "ReduceLogSumExp", "ReduceL1", "ReduceMax", "ReduceMin"]


def op_reduce(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) >= 1)
    if a is None:
        return False
    a = b.tame(a)
    op = b.choice(REDUCE)
    r = len(a.shape)
    naxes = int(b.rng.integers(1, r + 1))
    axes = sorted(int(x) for x in b.rng.choice(r, size=naxes, replace=False))
    if b.rng.random() < 0.3:
        axes = [x - r for x in axes]                     # negative axes
    keep = int(b.rng.integers(2))
    b.use(a)
    if op == "ReduceL2":
        # ReduceL2 has a kink at 0: keep its input away from zero.
        a = b.positive(a)
    if op == "ReduceSum" or b.opset >= 18:
        (o,) = b.node(op, [a.name, b.ints(axes)], keepdims=keep)
    else:
        (o,) = b.node(op, [a.name], axes=axes, keepdims=keep)
    pos = {x % r for x in axes}
    out = tuple((1 if i in pos else d) for i, d in enumerate(a.shape) if keep or i not in pos)
    cnt = numel(tuple(a.shape[i] for i in pos))
    hi = {"ReduceSum": a.hi * cnt, "ReduceL2": a.hi * math.sqrt(cnt), "ReduceSumSquare": a.hi ** 2 * cnt,
          "ReduceLogSumExp": a.hi + math.log(cnt), "ReduceL1": a.hi * cnt}.get(op, a.hi)
    return bool(b.add(T(o, out, hi, None, a.active)))


def op_softmax(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) >= 1)
    if a is None:
        return False
    a = b.tame(a)
    op = b.choice(["Softmax", "LogSoftmax"])
    axis = int(b.rng.integers(-len(a.shape), len(a.shape)))
    b.use(a)
    (o,) = b.node(op, [a.name], axis=axis)
    hi = 1.0 if op == "Softmax" else 2 * a.hi + math.log(max(2, numel(a.shape)))
    b.add(T(o, a.shape, hi, None, a.active))
    return True


def op_layernorm(b: Builder) -> bool:
    if b.opset < 17:
        return False
    a = b.pick(lambda t: len(t.shape) >= 1 and N not in t.shape[-1:] and numel(t.shape[-1:]) >= 2)
    if a is None:
        return False
    a = b.tame(a)
    r = len(a.shape)
    # normalise over the trailing static dims
    first = r - 1
    while first > 0 and a.shape[first - 1] != N and b.rng.random() < 0.4:
        first -= 1
    norm = a.shape[first:]
    scale = b.add(b.param(norm, 0.5, 1.5))
    ins = [a.name, scale.name]
    if b.rng.random() < 0.7:
        ins.append(b.add(b.param(norm)).name)
    b.use(a, scale)
    axis = first if b.rng.random() < 0.5 else first - r
    (o,) = b.node("LayerNormalization", ins, axis=axis, epsilon=1e-3)
    b.add(T(o, a.shape, 1.5 * math.sqrt(numel(norm)) + 1, None, True))
    return True


def op_transpose(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) >= 2)
    if a is None:
        return False
    perm = [int(p) for p in b.rng.permutation(len(a.shape))]
    b.use(a)
    (o,) = b.node("Transpose", [a.name], perm=perm)
    b.add(T(o, tuple(a.shape[p] for p in perm), a.hi, a.lo, a.active))
    return True


def _factor(n: int, rng) -> list:
    """A random factorisation of n into 1-3 factors."""
    out = []
    while n > 1 and len(out) < 2:
        ds = [d for d in range(2, n + 1) if n % d == 0]
        d = ds[int(rng.integers(len(ds)))]
        out.append(d)
        n //= d
    if n > 1:
        out.append(n)
    rng.shuffle(out)
    return out or [1]


def op_reshape(b: Builder) -> bool:
    a = b.pick(lambda t: N not in t.shape[1:])
    if a is None:
        return False
    op = b.choice(["Reshape", "Reshape", "Flatten"])
    b.use(a)
    if a.shape and a.shape[0] == N:
        rest = numel(a.shape[1:])
        if op == "Flatten":
            (o,) = b.node("Flatten", [a.name], axis=1)
            return bool(b.add(T(o, (N, rest), a.hi, a.lo, a.active)))
        dims = _factor(rest, b.rng)
        if b.rng.random() < 0.3:
            target = [0] + dims[:-1] + [-1]
        else:
            target = [0] + dims
        (o,) = b.node("Reshape", [a.name, b.ints(target)])
        return bool(b.add(T(o, (N,) + tuple(dims), a.hi, a.lo, a.active)))
    n = numel(a.shape)
    if op == "Flatten" and len(a.shape) >= 1:
        axis = int(b.rng.integers(0, len(a.shape) + 1))
        (o,) = b.node("Flatten", [a.name], axis=axis)
        shape = (numel(a.shape[:axis]), numel(a.shape[axis:]))
        return bool(b.add(T(o, shape, a.hi, a.lo, a.active)))
    dims = _factor(n, b.rng)
    (o,) = b.node("Reshape", [a.name, b.ints(dims)])
    b.add(T(o, tuple(dims), a.hi, a.lo, a.active))
    return True


def _static_axes(t: T, min_size=1) -> list:
    return [i for i, d in enumerate(t.shape) if d != N and d >= min_size]


def op_concat(b: Builder) -> bool:
    a = b.pick(lambda t: bool(_static_axes(t)))
    if a is None:
        return False
    axis = b.choice(_static_axes(a))

    def fits(t):
        return (t.name != a.name and len(t.shape) == len(a.shape)
                and all(x == y for i, (x, y) in enumerate(zip(t.shape, a.shape)) if i != axis)
                and t.shape[axis] != N)

    parts = [a]
    other = b.pick(fits)
    if other is not None and b.rng.random() < 0.7:
        parts.append(other)
    elif N not in a.shape and b.rng.random() < 0.5:
        shape = list(a.shape)
        shape[axis] = int(b.rng.integers(1, 3))
        parts.append(b.add(b.param(shape)))
    else:
        parts.append(a)                                  # concat(a, a): fan-out
    if b.rng.random() < 0.3:
        parts.append(a)
    shape = list(a.shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    if numel(shape) > MAX_ELEMS:
        return False
    b.use(*parts)
    (o,) = b.node("Concat", [p.name for p in parts], axis=axis - (len(a.shape) if b.rng.random() < 0.3 else 0))
    b.add(T(o, tuple(shape), max(p.hi for p in parts), None, any(p.active for p in parts)))
    return True


def _try_op(b: "Builder", fn) -> bool:
    """Add one op with ``fn``; roll the builder back where it fails."""
    mark = (len(b.nodes), len(b.inits), len(b.int_inits), len(b.pool), len(b.inputs))
    uses = [t.uses for t in b.pool]
    if fn(b):
        return True
    del b.nodes[mark[0]:], b.inits[mark[1]:], b.int_inits[mark[2]:], b.pool[mark[3]:], b.inputs[mark[4]:]
    for t, u in zip(b.pool, uses):
        t.uses = u
    return False


def _pick_static_axis(b: "Builder"):
    """A tensor with a static axis (of size >= 2, not the batch), that axis and its size; None if none."""
    a = b.pick(lambda t: bool(_static_axes(t, 2)))
    if a is None:
        return None
    axis = b.choice(_static_axes(a, 2))
    return a, axis, a.shape[axis]


def op_split(b: Builder) -> bool:
    picked = _pick_static_axis(b)
    if picked is None:
        return False
    a, axis, d = picked
    nparts = int(b.rng.integers(2, min(d, 3) + 1))
    cuts = sorted(int(c) for c in b.rng.choice(np.arange(1, d), size=nparts - 1, replace=False))
    sizes = [y - x for x, y in zip([0] + cuts, cuts + [d])]
    b.use(a)
    outs = b.node("Split", [a.name, b.ints(sizes)], n_out=nparts, axis=axis)
    for o, s in zip(outs, sizes):
        shape = list(a.shape)
        shape[axis] = s
        b.add(T(o, tuple(shape), a.hi, a.lo, a.active))
    if b.rng.random() < 0.3:                 # a Split output nobody reads: no gradient arrives there
        b.pool[-1].uses = -99
    return True


def op_slice(b: Builder) -> bool:
    a = b.pick(lambda t: bool(_static_axes(t, 2)))
    if a is None:
        return False
    axes = sorted(set(int(b.choice(_static_axes(a, 2))) for _ in range(int(b.rng.integers(1, 3)))))
    starts, ends, steps, shape = [], [], [], list(a.shape)
    for ax in axes:
        d = a.shape[ax]
        step = int(b.choice([1, 1, 2, -1]))
        if step > 0:
            s = int(b.rng.integers(0, d - 1))
            e = int(b.rng.integers(s + 1, d + 1))
            if b.rng.random() < 0.2:
                e = 1000                          # clamped
            n = len(range(s, min(e, d), step))
        else:
            s = int(b.rng.integers(1, d))
            e = int(b.rng.integers(-d - 1, s)) if b.rng.random() < 0.5 else -1000
            n = len(range(s, max(e, -1) if e >= 0 else (e + d if e >= -d else -1), step))
        starts.append(s)
        ends.append(e)
        steps.append(step)
        shape[ax] = n
    if any(s == 0 for s in shape):
        return False
    b.use(a)
    neg = b.rng.random() < 0.3
    ins = [a.name, b.ints(starts), b.ints(ends), b.ints([x - len(a.shape) if neg else x for x in axes]),
           b.ints(steps)]
    (o,) = b.node("Slice", ins)
    b.add(T(o, tuple(shape), a.hi, a.lo, a.active))
    return True


def op_squeeze(b: Builder) -> bool:
    a = b.pick()
    b.use(a)
    ones = [i for i, d in enumerate(a.shape) if d == 1]
    if ones and b.rng.random() < 0.6:
        ax = b.choice(ones)
        (o,) = b.node("Squeeze", [a.name, b.ints([ax])])
        shape = tuple(d for i, d in enumerate(a.shape) if i != ax)
    else:
        if len(a.shape) >= 4:
            return False
        ax = int(b.rng.integers(0, len(a.shape) + 1))
        (o,) = b.node("Unsqueeze", [a.name, b.ints([ax])])
        shape = a.shape[:ax] + (1,) + a.shape[ax:]
    b.add(T(o, shape, a.hi, a.lo, a.active))
    return True


def op_expand_tile(b: Builder) -> bool:
    a = b.pick(lambda t: numel(t.shape) * 2 <= MAX_ELEMS and len(t.shape) <= 3)
    if a is None:
        return False
    b.use(a)
    if b.rng.random() < 0.6:
        # Expand: grow size-1 dims, maybe prepend one; N stays as 1 in the target shape
        target = [1 if d == N else (int(b.rng.integers(2, 4)) if d == 1 else d) for d in a.shape]
        out = [d if d == N else t for d, t in zip(a.shape, target)]
        if b.rng.random() < 0.3 or not any(d == 1 for d in a.shape):
            target = [int(b.rng.integers(2, 4))] + target
            out = [target[0]] + out
        if numel(out) > MAX_ELEMS:
            return False
        (o,) = b.node("Expand", [a.name, b.ints(target)])
        return bool(b.add(T(o, tuple(out), a.hi, a.lo, a.active)))
    reps = [1 if d == N else int(b.rng.integers(1, 3)) for d in a.shape]
    out = tuple(d if d == N else d * r for d, r in zip(a.shape, reps))
    if numel(out) > MAX_ELEMS or not a.shape:
        return False
    (o,) = b.node("Tile", [a.name, b.ints(reps)])
    b.add(T(o, out, a.hi, a.lo, a.active))
    return True


def op_gather(b: Builder) -> bool:
    picked = _pick_static_axis(b)
    if picked is None:
        return False
    a, axis, d = picked
    b.use(a)
    if b.rng.random() < 0.3 and N not in a.shape:
        # GatherElements: indices of a's shape with the axis resized
        shape = list(a.shape)
        shape[axis] = int(b.rng.integers(1, d + 1))
        idx = b.rng.integers(-d, d, size=shape)
        (o,) = b.node("GatherElements", [a.name, b.ints(idx)], axis=axis)
        return bool(b.add(T(o, tuple(shape), a.hi, a.lo, a.active)))
    if b.rng.random() < 0.3:
        idx = np.array(int(b.rng.integers(-d, d)))
        ishape = ()
    else:
        k = int(b.rng.integers(1, 4))
        idx = b.rng.integers(-d, d, size=(k,))            # repeats allowed: scatter-adds
        ishape = (k,)
    shape = a.shape[:axis] + ishape + a.shape[axis + 1:]
    (o,) = b.node("Gather", [a.name, b.ints(idx)], axis=axis)
    b.add(T(o, shape, a.hi, a.lo, a.active))
    return True


def op_pad(b: Builder) -> bool:
    a = b.pick(lambda t: bool(_static_axes(t, 2)))
    if a is None:
        return False
    r = len(a.shape)
    mode = b.choice(["constant", "constant", "reflect", "edge"])
    pads = [0] * (2 * r)
    shape = list(a.shape)
    for ax in _static_axes(a, 2):
        if b.rng.random() < 0.6:
            lo_, hi_ = int(b.rng.integers(0, 2)), int(b.rng.integers(0, 2))
            pads[ax], pads[ax + r] = lo_, hi_
            shape[ax] += lo_ + hi_
    if numel(shape) > MAX_ELEMS:
        return False
    b.use(a)
    ins = [a.name, b.ints(pads)]
    if mode == "constant" and b.rng.random() < 0.5:
        ins.append(b.fconst(float(b.rng.uniform(-1, 1))))
    (o,) = b.node("Pad", ins, mode=mode)
    b.add(T(o, tuple(shape), a.hi + 1, None, a.active))
    return True


def op_cast_dropout(b: Builder) -> bool:
    a = b.pick()
    b.use(a)
    way = b.choice(["cast", "dropout"])
    if way == "cast":
        (d,) = b.node("Cast", [a.name], to=TensorProto.DOUBLE)
        (o,) = b.node("Cast", [d], to=F)
    else:
        (o,) = b.node("Dropout", [a.name], n_out=1)
    b.add(T(o, a.shape, a.hi, a.lo, a.active))
    return True


def op_image(b: Builder) -> bool:
    """Conv, pools and the normalisations on an (N, C, H, W) tensor."""
    a = b.pick(lambda t: len(t.shape) == 4 and t.shape[0] == N and N not in t.shape[1:]
               and min(t.shape[2:]) >= 2)
    if a is None:
        return False
    a = b.tame(a)
    _, c, h, w = a.shape
    op = b.choice(["Conv", "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                   "BatchNormalization", "InstanceNormalization", "LRN"])
    b.use(a)
    if op in ("Conv", "MaxPool", "AveragePool"):
        kh, kw = int(b.rng.integers(1, min(3, h) + 1)), int(b.rng.integers(1, min(3, w) + 1))
        pads = [int(b.rng.integers(0, k)) for k in (kh, kw)] * 2 if b.rng.random() < 0.5 else [0, 0, 0, 0]
        strides = [int(b.rng.integers(1, 3)), int(b.rng.integers(1, 3))]
        oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (w + pads[1] + pads[3] - kw) // strides[1] + 1
        if op == "Conv":
            group = c if (c > 1 and b.rng.random() < 0.3) else 1
            m = group * int(b.rng.integers(1, 3)) if group > 1 else int(b.rng.integers(1, 4))
            wt = b.add(b.param((m, c // group, kh, kw)))
            ins = [a.name, wt.name]
            if b.rng.random() < 0.6:
                ins.append(b.add(b.param((m,))).name)
            if numel((N, m, oh, ow)) > MAX_ELEMS:
                return False
            (o,) = b.node("Conv", ins, kernel_shape=[kh, kw], pads=pads, strides=strides, group=group)
            return bool(b.add(T(o, (N, m, oh, ow), a.hi * c * kh * kw + 1, None, True)))
        attrs = {"kernel_shape": [kh, kw], "pads": pads, "strides": strides}
        if op == "AveragePool":
            attrs["count_include_pad"] = int(b.rng.integers(2))
        elif any(pads):
            pads = [min(p, k - 1) for p, k in zip(pads, [kh, kw, kh, kw])]
            attrs["pads"] = pads
        (o,) = b.node(op, [a.name], **attrs)
        return bool(b.add(T(o, (N, c, oh, ow), a.hi, None, a.active)))
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        (o,) = b.node(op, [a.name])
        return bool(b.add(T(o, (N, c, 1, 1), a.hi, None, a.active)))
    if op == "BatchNormalization":
        scale, bias = b.add(b.param((c,), 0.5, 1.5)), b.add(b.param((c,)))
        mean = b.fresh("mean")
        var = b.fresh("var")
        b.int_inits.append(numpy_helper.from_array(b.rng.uniform(-0.5, 0.5, c).astype(np.float32), mean))
        b.int_inits.append(numpy_helper.from_array(b.rng.uniform(0.5, 1.5, c).astype(np.float32), var))
        b.use(scale, bias)
        (o,) = b.node(op, [a.name, scale.name, bias.name, mean, var], epsilon=1e-3)
        return bool(b.add(T(o, a.shape, 1.5 * (a.hi + 0.5) / math.sqrt(0.5) + 1, None, True)))
    if op == "InstanceNormalization":
        scale, bias = b.add(b.param((c,), 0.5, 1.5)), b.add(b.param((c,)))
        b.use(scale, bias)
        (o,) = b.node(op, [a.name, scale.name, bias.name], epsilon=1e-3)
        return bool(b.add(T(o, a.shape, 1.5 * math.sqrt(h * w) + 1, None, True)))
    (o,) = b.node("LRN", [a.name], size=int(b.choice([1, 3])), alpha=1e-2, beta=0.75, bias=1.0)
    b.add(T(o, a.shape, a.hi, None, a.active))
    return True


def op_sce_loss(b: Builder) -> bool:
    a = b.pick(lambda t: len(t.shape) == 2 and t.shape[0] == N and t.shape[1] >= 2)
    if a is None:
        return False
    a = b.tame(a)
    b.use(a)
    labels = b.fresh("labels")
    b.inputs.append((labels, (N,), I64))
    b.feeds[labels] = b.rng.integers(0, a.shape[1], size=(BATCH,)).astype(np.int64)
    red = b.choice(["mean", "sum", "none"])
    (o,) = b.node("SoftmaxCrossEntropyLoss", [a.name, labels], reduction=red)
    b.add(T(o, () if red != "none" else (N,), 2 * a.hi + 3, None, a.active))
    return True


OPS = [  # (weight, builder)
    (6, op_unary), (3, op_exp_log), (8, op_binary), (3, op_matmul), (2, op_gemm), (3, op_reduce),
    (2, op_softmax), (1.5, op_layernorm), (2, op_transpose), (2, op_reshape), (2, op_concat),
    (1.5, op_split), (2, op_slice), (2, op_squeeze), (1.5, op_expand_tile), (1.5, op_gather),
    (1, op_pad), (0.7, op_cast_dropout), (5, op_image), (0.4, op_sce_loss),
]


def _initial_shapes(b: Builder) -> list:
    shapes = []
    kind = b.rng.random()
    if kind < 0.3:
        shapes.append((N, int(b.rng.integers(1, 4)), int(b.rng.integers(2, 5)), int(b.rng.integers(2, 5))))
    elif kind < 0.6:
        shapes.append((N, int(b.rng.integers(2, 6))))
    else:
        shapes.append((N, int(b.rng.integers(1, 4)), int(b.rng.integers(2, 5))))
    if b.rng.random() < 0.4:
        shapes.append(tuple(shapes[0][:1]) + tuple(int(d) if b.rng.random() < 0.8 else 1
                                                   for d in shapes[0][1:]))
    return shapes


def _finish(b: Builder, seed: int, name="fuzz", extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    used_as_input = {i for n in b.nodes for i in n.input}
    outs = [t for t in b.pool if t.name not in used_as_input and t.uses >= 0
            and any(t.name in n.output for n in b.nodes)]
    outs += [t for t in b.forced_outputs if t not in outs]
    if not outs:
        outs = [b.pool[-1]]
    read = used_as_input | {i for n in extra_nodes for i in n.input} | {t.name for t in outs}
    for n in b.nodes + list(extra_nodes):          # what subgraphs read from the outer scope
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read |= {i for m in a.g.node for i in m.input}
    inputs = [(n, s, rest[0] if rest else F) for n, s, *rest in b.inputs if n in read]
    for n in list(b.feeds):
        if n not in read:
            del b.feeds[n]
    f_inputs = [helper.make_tensor_value_info(n, e, list(s)) for n, s, e in inputs]
    outputs = [helper.make_tensor_value_info(t.name, F, list(t.shape)) for t in outs] + list(extra_outputs)
    inits = [t for t in b.inits + b.int_inits if t.name in read]
    graph = helper.make_graph(b.nodes + list(extra_nodes), name, f_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _last_dim_param(b: Builder, shape) -> T:
    return b.add(b.param([shape[-1]] if shape and shape[-1] != N else [1]))


def _ensure_param_reaches(b: Builder) -> None:
    """When no parameter reaches an output yet, scale the last tensor by a new one."""
    used = {i for n in b.nodes for i in n.input}
    made = {o for n in b.nodes for o in n.output}
    if any(t.active for t in b.pool if t.name in made and t.name not in used and t.uses >= 0):
        return
    last = next(t for t in reversed(b.pool) if t.uses >= 0)
    w = _last_dim_param(b, last.shape)
    b.use(last, w)
    (o,) = b.node("Mul", [last.name, w.name])
    b.add(T(o, _bcast(last.shape, w.shape), last.hi, None, True))


def random_case(seed: int, n_nodes: Optional[int] = None) -> Case:
    rng0 = np.random.default_rng([seed, 12])
    opset = 13 if rng0.random() < 0.2 else 17
    b = Builder(seed, opset)
    for s in _initial_shapes(b):
        b.add(b.graph_input(s))
    if b.rng.random() < 0.5:
        b.add(b.param(b.pool[0].shape[1:]))
    target = n_nodes or int(b.rng.integers(5, 21))
    weights = np.array([w for w, _ in OPS], dtype=float)
    tries = 0
    while len(b.nodes) < target and tries < 400:
        tries += 1
        fn = OPS[int(b.rng.choice(len(OPS), p=weights / weights.sum()))][1]
        _try_op(b, fn)
    if b.rng.random() < 0.3:
        consumed = [t for t in b.pool if t.uses > 0 and any(t.name in n.output for n in b.nodes)]
        if consumed:
            b.forced_outputs.append(b.choice(consumed))    # an output that is also read further on
    _ensure_param_reaches(b)
    model = _finish(b, seed)
    wrt = None
    if b.rng.random() < 0.3:
        params = [t.name for t in model.graph.initializer if t.data_type == F and t.name.startswith("p")]
        wrt = params + [i.name for i in model.graph.input if i.type.tensor_type.elem_type == F]
    return Case(seed, model, dict(b.feeds), wrt)


# ----------------------------------------------------------------------------------------
# If / Loop


def _vi(name, elem=F, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def control_flow_case(seed: int) -> Case:
    """A random graph with an If or a Loop, on the gradient path or off it (both differentiated:
    the If by its rule, the Loop, of a constant trip count, unrolled).

    Variants: ``if_capture`` (the branches read an on-path tensor of the outer
    graph), ``loop_input`` (an on-path tensor is a loop-carried input), ``loop_capture``
    (the body reads an on-path outer tensor), and ``*_off`` (the node reads only a
    graph input that is not differentiated; its output is a separate graph output).
    """
    b = Builder(seed + 1_000_003, 17)
    for s in _initial_shapes(b)[:1]:
        b.add(b.graph_input(s))
    b.add(b.param(b.pool[0].shape[1:]))
    weights = np.array([w for w, fn in OPS if fn not in (op_sce_loss,)], dtype=float)
    fns = [fn for _, fn in OPS if fn not in (op_sce_loss,)]
    target = int(b.rng.integers(3, 10))
    tries = 0
    while len(b.nodes) < target and tries < 200:
        tries += 1
        fn = fns[int(b.rng.choice(len(fns), p=weights / weights.sum()))]
        _try_op(b, fn)
    variant = ["if_capture", "loop_input", "loop_capture", "if_off", "loop_off"][seed % 5]
    on = variant in ("if_capture", "loop_input", "loop_capture")
    if on:
        src = b.pick(lambda t: t.active)
    else:
        src = b.graph_input((N, 3))
    src = b.tame(src)
    b.use(src)
    shape = list(src.shape)
    ushape = [d if d != N else "N" for d in shape]
    cf_name = b.fresh(variant.split("_")[0])
    out = b.fresh("cf")
    body_op = b.choice(["Mul", "Add", "Sub"])
    other_op = b.choice(["Tanh", "Neg", "Identity", "Sigmoid"])
    cond = b.fresh("flag")
    b.int_inits.append(numpy_helper.from_array(np.array(bool(b.rng.random() < 0.5)), cond))
    if variant.startswith("if"):
        k1 = b.fconst(float(b.rng.uniform(0.5, 1.5)))
        then = helper.make_graph([helper.make_node(body_op, [src.name, k1], ["then_out"])], "then", [],
                                 [_vi("then_out", F, ushape)])
        other = helper.make_graph([helper.make_node(other_op, [src.name], ["else_out"])], "else", [],
                                  [_vi("else_out", F, ushape)])
        node = helper.make_node("If", [cond], [out], name=cf_name, then_branch=then, else_branch=other)
    else:
        trip = b.ints(int(b.rng.integers(1, 4)))
        acc_in, acc_out = "acc_in", "acc_out"
        if variant == "loop_capture":
            init = b.graph_input(shape) if N in shape else b.add(b.param([d for d in shape]))
            body_nodes = [helper.make_node(body_op, [acc_in, src.name], ["m"]),
                          helper.make_node("Tanh", ["m"], [acc_out])]
            carried = init.name
        else:
            k1 = "loop_k"
            body_nodes = [helper.make_node("Constant", [], [k1], value=helper.make_tensor(k1, F, [], [0.7])),
                          helper.make_node(body_op, [acc_in, k1], ["m"]),
                          helper.make_node(other_op, ["m"], [acc_out])]
            carried = src.name
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
        body = helper.make_graph(body_nodes, "body",
                                 [_vi("i", I64, []), _vi("c_in", TensorProto.BOOL, []), _vi(acc_in, F, ushape)],
                                 [_vi("c_out", TensorProto.BOOL, []), _vi(acc_out, F, ushape)])
        node = helper.make_node("Loop", [trip, "", carried], [out], name=cf_name, body=body)
    b.nodes.append(node)
    cf = T(out, tuple(shape), 2 * src.hi + 2, None, on)
    if on:
        # the control-flow output feeds the rest of the graph
        b.add(cf)
        cf.uses = 0
        w = _last_dim_param(b, shape)
        b.use(cf, w)
        (o,) = b.node("Mul", [cf.name, w.name])
        b.add(T(o, _bcast(tuple(shape), w.shape), cf.hi, None, True))
    else:
        _ensure_param_reaches(b)
        b.forced_outputs.append(cf)
    model = _finish(b, seed, name="fuzz_cf")
    return Case(seed, model, dict(b.feeds), None, kind=variant, expect="correct", control_node=cf_name)
