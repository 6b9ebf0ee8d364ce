"""Finite-difference checker for gradient models (the library's, and users' own rules).

The gradient model computes ``g_p = VJP_p(u)`` for random upstream gradients
``u``.  The checker compares it with central differences of the *forward*
model's scalar ``f(p) = sum_Y <u_Y, Y(p)>``:

float64 (preferred)
    The forward model is converted to float64 (initializers, Constant nodes,
    Cast targets, graph types); ops without a float64 kernel in onnxruntime
    are rewritten first with ops that have one (:mod:`onnxbp.float64`: Conv
    as Pad, strided Slices and MatMuls, AveragePool as a sum of strided
    Slices over onnxruntime's counts, GlobalAveragePool as ReduceMean, Clip,
    HardSigmoid and HardSwish with Max/Min, LRN as a channel-window sum, Erf
    by Abramowitz & Stegun 7.1.26).  Where onnxruntime has float64 kernels for
    every op, each sampled element is checked: ``(f(p+eps e_i) - f(p-eps e_i))
    / 2 eps`` with ``eps = 1e-6 max(1, |p_i|)``, plus random directions.
float32 (fallback; onnxruntime's CPU Conv has no float64 kernel)
    Random-direction checks ``<v, g_p>`` against ``(f(p+eps v) -
    f(p-eps v)) / 2 eps``.  The step depends on the smoothness class of the
    ops in the model: a large step (``eps = rms(p)``) is exact for linear and
    multilinear ops; for kinks (Relu, MaxPool) and smooth ops a small step
    with Richardson extrapolation, and a consistency test between two step
    sizes that re-draws the direction when a kink was crossed.  A roundoff
    floor ``4 eps32 sum|u Y| / eps`` is added to the tolerance.

Errors per gradient: ``max_abs_err`` is the largest absolute difference over
the checks; ``max_rel_err`` divides it by the largest reference magnitude
(elementwise checks) or, for a direction ``v``, by ``max(|analytic|,
|numeric|, rms(v) ||g||)`` (the last is the typical size of ``<v, g>``, so a
directional derivative that cancels to nearly zero is not judged against
itself).  A
check passes when ``abs_err <= atol + rtol * scale (+ roundoff floor)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from . import arguments
from .engine import gradient
from .errors import MemoryLimitError, OnnxbpError, OptionError
from .float64 import float64_model, reference_runner, to_float64
from .metadata import gradient_names, zero_gradients
from .modelio import ModelLike, cpu_session, first_line, initializers_as_inputs, load_model
from .registry import LINEAR, PIECEWISE, REGISTRY, RULE, SMOOTH
from .types import FLOAT_TYPES, default_opset, np_dtype
from .writer import value_info

log = logging.getLogger(__name__)

_EPS32 = float(np.finfo(np.float32).eps)


@dataclass
class GradCheck:
    """The outcome for one gradient."""

    name: str
    grad_name: str
    shape: tuple
    method: str
    checks: int
    max_abs_err: float
    max_rel_err: float
    passed: bool
    note: str = ""


@dataclass
class CheckReport:
    results: list = field(default_factory=list)
    precision: str = "float32"
    smoothness: str = SMOOTH

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def table(self) -> str:
        head = ("gradient", "shape", "method", "checks", "max abs err", "max rel err", "result")
        rows = [head]
        for r in self.results:
            rows.append((r.name, "x".join(map(str, r.shape)) or "scalar", r.method, str(r.checks),
                         f"{r.max_abs_err:.3e}", f"{r.max_rel_err:.3e}",
                         ("ok" if r.passed else "FAIL") + (f" ({r.note})" if r.note else "")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _concrete_shape(vi: onnx.ValueInfoProto, batch_size: int) -> tuple:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch_size for d in dims)


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, batch_size: int = 2,
                 feeds: Optional[Mapping] = None) -> dict:
    """Random values for the model's graph inputs that are not initializers.

    Floats are standard normal (tie-free with probability one); integers are
    zeros and booleans False unless given in ``feeds``.  Symbolic or unknown
    dims become ``batch_size``.
    """
    inits = {t.name for t in model.graph.initializer}
    out = dict(arguments.mapping(feeds, "feeds", OptionError) or {})
    declared = {vi.name: vi for vi in model.graph.input}
    for name, value in out.items():
        vi = declared.get(name)
        if vi is None:
            raise OptionError(f"feeds[{name!r}]: the model has no input {name!r}")
        _check_feed(name, np.asarray(value), vi)
    for vi in model.graph.input:
        if vi.name in inits or vi.name in out:
            continue
        elem = vi.type.tensor_type.elem_type
        shape = _concrete_shape(vi, batch_size)
        dtype = np_dtype(elem)
        if elem in FLOAT_TYPES:
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[vi.name] = np.zeros(shape, dtype=dtype)
    return out


def _check_feed(name: str, value: np.ndarray, vi: onnx.ValueInfoProto) -> None:
    """A given feed must have the input's rank and its static dims."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    if value.ndim != len(dims) or any(isinstance(d, int) and d != n for d, n in zip(dims, value.shape)):
        raise OptionError(f"feeds[{name!r}] has shape {tuple(value.shape)}; the model input {name!r} is "
                          f"{' x '.join(str(d) for d in dims) or 'a scalar'}")


class _Forward:
    """f(params) = sum_Y <u_Y, Y> in float64, on a float32 or float64 forward model."""

    def __init__(self, model: onnx.ModelProto, feeds: dict, upstream: dict, params: Sequence[str],
                 precision: str, param_values: Optional[Mapping] = None):
        self.precision = precision
        self.engine = "onnxruntime"
        m = initializers_as_inputs(model, params)
        self.out_names = [o.name for o in m.graph.output]
        self.dtype = np.float64 if precision == "float64" else None
        if precision != "float64" and _narrow_floats(m):
            # float16/bfloat16: the finite differences of the model as it is would be float16 noise;
            # they run on the model widened to float32
            m, self.dtype = to_float64(m, onnx.TensorProto.FLOAT), np.float32
        self.feeds = {k: self._cast(v) for k, v in feeds.items()}
        self.upstream = upstream
        if precision != "float64":
            self._run = cpu_session(m).run
            return
        values = dict(feeds)
        values.update(param_values or {})
        try:
            self._run = cpu_session(float64_model(m, values)).run
            self(param_values or {})
        except Exception as exc:  # noqa: BLE001 - no float64 kernel in onnxruntime: onnx.reference, if trusted
            log.info("onnxruntime cannot run the model in float64 (%s); trying onnx.reference",
                     first_line(exc, type(exc).__name__)[:120])
            self._run = reference_runner(m, values)
            self.engine = "onnx.reference"

    def _cast(self, v):
        v = np.asarray(v)
        if self.dtype is not None and _is_float(v) and v.dtype != self.dtype:
            return v.astype(self.dtype)
        return v

    def outputs(self, values: dict, names: Sequence[str]) -> list:
        """The outputs ``names`` at parameter values ``values`` (float64 where the forward is)."""
        feeds = dict(self.feeds)
        feeds.update({k: self._cast(v) for k, v in values.items()})
        return self._run(list(names), feeds)

    def __call__(self, values: dict) -> tuple:
        feeds = dict(self.feeds)
        feeds.update({k: self._cast(v) for k, v in values.items()})
        outs = self._run(self.out_names, feeds)
        total, mag = 0.0, 0.0
        for name, y in zip(self.out_names, outs):
            if name in self.upstream:
                u = self.upstream[name].astype(np.float64)
                y64 = np.asarray(y, dtype=np.float64)
                total += float(np.sum(u * y64))
                mag += float(np.sum(np.abs(u * y64)))
        return total, mag


#: Peak memory of a check, in copies of the model's initializers: the model, the gradient model, the
#: parameter values, an onnxruntime session being created (two), and the float64 work copy of a
#: parameter (two) with its float32 direction.  Measured: a 302 MB Gemm weight peaks at 2.43 GB
#: (8.0 copies; 7.48 GB before the finite differences worked in place, 2026-12-01).
_MEMORY_COPIES = 8


def _available_memory():
    """Bytes the machine can still give (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def _check_memory(model: onnx.ModelProto) -> None:
    """Refuse up front, with a one-line MemoryLimitError, a check that would not fit in the memory the
    machine has available, instead of being killed part-way."""
    avail = _available_memory()
    if avail is None:
        return
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    need = _MEMORY_COPIES * weights + (256 << 20)
    if need > avail:
        raise MemoryLimitError(f"checking this model needs about {need / 2 ** 30:.1f} GiB ({_MEMORY_COPIES} copies "
                               f"of its {weights / 2 ** 30:.2f} GiB of initializers); {avail / 2 ** 30:.1f} GiB "
                               f"are available: check on a machine with more memory, or check a smaller "
                               f"configuration of the model (the gradient rules do not depend on its size)")


def _is_float(v: np.ndarray) -> bool:
    return v.dtype.kind == "f" or v.dtype.name == "bfloat16"


def _narrow_floats(model: onnx.ModelProto) -> bool:
    narrow = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(vi.type.tensor_type.elem_type in narrow for vi in list(model.graph.input) + list(model.graph.output)) \
        or any(t.data_type in narrow for t in model.graph.initializer)


#: The least relative tolerance a gradient computed in float16 / bfloat16 is held to: 20 units of its
#: type's rounding (eps 9.8e-4 / 7.8e-3); float32 and float64 gradients keep the caller's rtol.
NARROW_RTOL = {"float16": 20 * 2.0 ** -10, "bfloat16": 20 * 2.0 ** -7}


def _model_smoothness(model: onnx.ModelProto) -> str:
    opset = default_opset(model)
    order = {LINEAR: 0, PIECEWISE: 1, SMOOTH: 2}
    worst = LINEAR
    for node in model.graph.node:
        e = REGISTRY.lookup(node.op_type, node.domain, opset)
        s = e.smoothness if e is not None and e.kind == RULE else (LINEAR if e is not None else SMOOTH)
        if order[s] > order[worst]:
            worst = s
    return worst


def check_gradients(model: ModelLike, wrt: Optional[Sequence[str]] = None, *,
                    feeds: Optional[Mapping] = None, seed: int = 0, batch_size: int = 2,
                    rtol: float = 1e-3, atol: float = 1e-6, directions: int = 3,
                    max_elements: int = 24, precision: str = "auto",
                    grad_model: Optional[onnx.ModelProto] = None, **options) -> CheckReport:
    """Build (or take) the gradient model, run it, and compare with finite differences.

    ``precision``: "auto" (float64 forward where onnxruntime can run it),
    "float64" or "float32".  Returns a :class:`CheckReport`; ``report.passed``
    tells pass/fail and ``report.table()`` formats it.
    """
    _check_options(batch_size, rtol, atol, directions, max_elements, precision)
    fwd = load_model(model)
    gm = grad_model if grad_model is not None else gradient(fwd, wrt, **options)
    names = gradient_names(gm)
    zeros = set(zero_gradients(gm))  # structurally zero outputs (a nested call), noted in the table
    params = list(names)
    rng = np.random.default_rng(seed)

    base_feeds = random_feeds(fwd, rng, batch_size, feeds)
    inits = {t.name: t for t in fwd.graph.initializer if t.name in params and t.name not in base_feeds}
    values = {p: base_feeds[p].copy() if p in base_feeds else numpy_helper.to_array(inits[p]) for p in params}
    del inits

    _check_memory(fwd)
    fwd_sess = cpu_session(fwd)
    out_meta = fwd_sess.get_outputs()
    fwd_outs = fwd_sess.run([o.name for o in out_meta], base_feeds)
    del fwd_sess  # each session holds the weights: one at a time
    upstream = {}
    gm_feeds = {k: v for k, v in base_feeds.items() if k in {i.name for i in gm.graph.input}}
    gm_inputs = {i.name for i in gm.graph.input}
    for o, y in zip(out_meta, fwd_outs):
        y = np.asarray(y)
        gname = next((n for n in gm_inputs if n == o.name + _suffix(names)), None)
        if gname is None or not np.issubdtype(y.dtype, np.floating):
            continue
        u = rng.standard_normal(y.shape).astype(y.dtype)
        upstream[o.name] = u
        gm_feeds[gname] = u
    grad_sess = cpu_session(gm)
    grads = dict(zip(names.values(), grad_sess.run(list(names.values()), gm_feeds)))
    # What the finite differences do not need goes now: each session and model holds the weights.
    del grad_sess, fwd_outs, gm_feeds, gm

    smooth = _model_smoothness(fwd)
    report = CheckReport(smoothness=smooth)
    f64 = None
    if precision in ("auto", "float64"):
        try:
            f64 = _Forward(fwd, base_feeds, upstream, params, "float64", values)
            f64(values)
        except Exception as exc:  # noqa: BLE001 - no float64 kernel: fall back
            if precision == "float64":
                raise OnnxbpError(f"the forward model cannot run in float64 in onnxruntime or onnx.reference: "
                                  f"{first_line(exc, type(exc).__name__)}") from None
            log.info("float64 forward unavailable (%s); using float32 checks",
                     first_line(exc, type(exc).__name__)[:120])
            f64 = None
    report.precision = "float64" if f64 is not None else "float32"
    f32 = None if f64 is not None else _Forward(fwd, base_feeds, upstream, params, "float32")

    for p in params:
        g_native = g = np.asarray(grads.pop(names[p]))
        x = np.asarray(values[p])
        tol = max(rtol, NARROW_RTOL.get(g_native.dtype.name, 0.0))
        if tol != rtol:
            log.info("gradient %s is computed in %s: checked with rtol %.1e", names[p], g_native.dtype.name, tol)
        if g.shape != x.shape:
            report.results.append(GradCheck(p, names[p], x.shape, "shape", 1, float("inf"), float("inf"),
                                            False, f"gradient shape {g.shape} != {x.shape}"))
            continue
        if f64 is not None:
            res = _check_f64(p, names[p], x, g, values, f64, rng, tol, atol, directions, max_elements)
        else:
            res = _check_f32(p, names[p], x, g, values, f32, rng, tol, atol, directions, smooth)
        if tol != rtol:
            res.method += f", {g_native.dtype.name} rtol {tol:.0e}"
        if p in zeros:
            res.note = "structurally zero"
        report.results.append(res)
    return report


def _typical(v: np.ndarray, g: np.ndarray) -> float:
    """Typical size of <v, g> for a random direction: rms(v) * ||g||.

    Directional derivatives that cancel to nearly zero are judged against
    this, not against themselves.
    """
    return max(_rms(v) * float(np.sqrt(_dot64(g, g))), 1e-12)


#: Elements per chunk of the float64 reductions and updates over a parameter (no full-size temporaries).
_CHUNK = 1 << 20


def _dot64(a: np.ndarray, b: np.ndarray) -> float:
    """<a, b> accumulated in float64, chunk by chunk."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(sum(np.dot(a[i:i + _CHUNK].astype(np.float64), b[i:i + _CHUNK].astype(np.float64))
                     for i in range(0, a.size, _CHUNK)))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(_dot64(a, a) / a.size)) if a.size else 0.0


def _axpy_into(out: np.ndarray, x: np.ndarray, alpha: float, v: np.ndarray) -> None:
    """out = x + alpha * v (flat arrays), computed in float64 chunk by chunk, stored in out's dtype."""
    for i in range(0, out.size, _CHUNK):
        j = i + _CHUNK
        out[i:j] = x[i:j].astype(np.float64) + alpha * v[i:j].astype(np.float64)


def _suffix(names: dict) -> str:
    p, n = next(iter(names.items()))
    return n[len(p):]


def _check_options(batch_size, rtol, atol, directions, max_elements, precision) -> None:
    """Refuse options that would make the check empty or meaningless (it would pass having checked nothing)."""
    def whole(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    problems = []
    if not whole(batch_size) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} (needs a whole number >= 1)")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            problems.append(f"{name}={v!r} (needs a finite number >= 0)")
    if isinstance(rtol, (int, float)) and isinstance(atol, (int, float)) and rtol == 0 and atol == 0:
        problems.append("rtol=0 with atol=0 (no finite difference is exact)")
    if not whole(directions) or directions < 0:
        problems.append(f"directions={directions!r} (needs a whole number >= 0)")
    if not whole(max_elements) or max_elements < 1:
        problems.append(f"max_elements={max_elements!r} (needs a whole number >= 1)")
    if precision not in ("auto", "float64", "float32"):
        problems.append(f"precision={precision!r} (choose auto, float64 or float32)")
    if problems:
        raise OptionError(f"check_gradients: {'; '.join(problems)}")


def _check_f64(p, gname, x, g, values, f, rng, rtol, atol, directions, max_elements) -> GradCheck:
    # One float64 work copy of the parameter, perturbed in place (an element, or x + eps*v in chunks):
    # a 1 GB weight costs 2 GB here, not one copy per evaluation.
    work = x.astype(np.float64).reshape(-1)
    xf = x.reshape(-1)
    n = work.size
    idx = np.arange(n) if n <= max_elements else np.sort(rng.choice(n, size=max_elements, replace=False))
    num = np.empty(len(idx))
    vals = dict(values)
    vals[p] = work.reshape(x.shape)
    for k, i in enumerate(idx):
        orig = float(work[i])
        eps = 1e-6 * max(1.0, abs(orig))
        work[i] = orig + eps
        fp, _ = f(vals)
        work[i] = orig - eps
        fm, _ = f(vals)
        work[i] = orig
        num[k] = (fp - fm) / (2 * eps)
    ana = g.reshape(-1)[idx].astype(np.float64)
    scale = max(float(np.max(np.abs(num), initial=0.0)), float(np.max(np.abs(ana), initial=0.0)), 1e-12)
    abs_err = float(np.max(np.abs(ana - num))) if len(idx) else 0.0
    passed = abs_err <= atol + rtol * scale
    max_rel = abs_err / scale
    checks = len(idx)
    eps = 1e-6 * max(1.0, _rms(xf))
    for _ in range(directions):
        v = rng.standard_normal(x.shape, dtype=np.float32).reshape(-1)
        _axpy_into(work, xf, eps, v)
        fp, _ = f(vals)
        _axpy_into(work, xf, -eps, v)
        fm, _ = f(vals)
        nd = (fp - fm) / (2 * eps)
        ad = _dot64(v, g)
        err = abs(ad - nd)
        sc = max(abs(ad), abs(nd), _typical(v, g))
        passed = passed and err <= atol + rtol * sc
        abs_err, max_rel = max(abs_err, err), max(max_rel, err / sc)
        checks += 1
    method = "float64 elements+directions" + (" (onnx.reference)" if f.engine == "onnx.reference" else "")
    return GradCheck(p, gname, x.shape, method, checks, abs_err, max_rel, passed)


def _check_f32(p, gname, x, g, values, f, rng, rtol, atol, directions, smooth) -> GradCheck:
    xt = f.dtype or x.dtype  # float16/bfloat16 parameters are perturbed in the widened model's float32
    xf = x.reshape(-1)
    work = np.empty(x.size, dtype=xt)  # x + eps*v, written in place (no full-size temporaries)
    rms = _rms(xf)
    scale_x = rms if rms > 1e-3 else 1.0
    abs_err = max_rel = 0.0
    passed = True
    checks = 0
    note = ""

    vals = dict(values)
    vals[p] = work.reshape(x.shape)

    def at(h, v):
        _axpy_into(work, xf, h, v)
        return f(vals)

    def central(v, eps):
        fp, mp = at(eps, v)
        fm, mm = at(-eps, v)
        return (fp - fm) / (2 * eps), max(mp, mm)

    for _ in range(directions):
        for attempt in range(6):
            v = rng.standard_normal(x.size, dtype=np.float32)
            v /= max(_rms(v), 1e-12)
            if smooth == LINEAR:
                eps = scale_x
                nd, mag = central(v, eps)
                noise = 8 * _EPS32 * mag / eps
                consistent = True
            else:
                # Each retry (a kink was crossed) also halves the step.
                eps = (2e-2 if smooth == SMOOTH else 1e-2) * scale_x * 0.5 ** attempt
                d1, mag = central(v, eps)
                d2, _ = central(v, eps / 2)
                d4, _ = central(v, eps / 4)
                r1, r2 = (4 * d2 - d1) / 3, (4 * d4 - d2) / 3
                noise = 8 * _EPS32 * mag / (eps / 4)
                nd = r2
                consistent = abs(r1 - r2) <= 4 * noise + 1e-2 * max(abs(r1), abs(r2), 1e-12)
                # A kink closer to x than every step makes all central differences agree on
                # the mean of the two one-sided slopes.  One-sided differences expose it: their
                # gap shrinks with the step on a smooth function and stays at the jump at a kink.
                f0 = f(values)[0]
                gaps = []
                for h in (eps / 2, eps / 4):
                    fp = at(h, v)[0]
                    fm = at(-h, v)[0]
                    gaps.append(abs((fp - f0) - (f0 - fm)) / h)
                consistent = consistent and gaps[1] <= 0.75 * gaps[0] + 4 * noise
            if consistent:
                break
        else:
            note = "kinks crossed in every direction tried"
        ad = _dot64(v, g)
        err = abs(ad - nd)
        sc = max(abs(ad), abs(nd), _typical(v, g))
        ok = err <= atol + rtol * sc + noise
        passed = passed and ok and not note
        abs_err, max_rel = max(abs_err, err), max(max_rel, err / sc)
        checks += 1
    method = "float32 directions, " + ("large step (linear)" if smooth == LINEAR else "Richardson")
    return GradCheck(p, gname, x.shape, method, checks, abs_err, max_rel, passed, note)
