"""The op table: one entry per built-in gradient rule (in the style of PyTorch's OpInfo).

Each :class:`OpInfo` names an op, the opsets it is checked at, its samples
(input shapes, dtypes and value domains), an attribute grid, the inputs that
are differentiated, a torch reference where torch expresses the op (else
``None``: finite differences only) and tolerances.  ``tests/test_optable.py``
runs every entry x opset x attribute combination x sample through
:func:`onnxbp.testing.check_rule`: float64 finite differences (float32 where
onnxruntime has no float64 kernel), torch autograd in float64, standard-domain
ops and onnx's full checker.

Value domains keep finite differences meaningful: ``positive`` for
Log/Sqrt/Pow bases and variances, ``nonzero`` for denominators, ``unit``
inside Tan's good range, and ``kinks``: every sample is at least 0.05 away
from each point where the derivative jumps (Relu/Abs/LeakyRelu at 0, Clip's
bounds, HardSigmoid/HardSwish corners).  Random normal inputs have no ties
(probability one), so Max/Min/ReduceMax/MaxPool are differentiable there.

Entries are deliberately small: the exhaustive grids (every Conv attribute
combination under three lowerings, 700 pooling cases, BatchNorm in every
opset, Dropout's random masks, ties) stay in the per-family test files; this
table makes sure no rule is without a check and that each is checked the same
way.  A registered rule without an entry fails ``test_every_rule_has_an_entry``.
Known rule defects are strict xfails (``OpInfo.xfail``, with the reason), so a
fix shows up as an unexpected pass.

Every entry here has a torch reference; an op torch does not express gets
``ref=None`` and is checked by finite differences alone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from onnx import TensorProto

from onnxbp.testing import Constant, constant

F32 = np.float32
DEFAULT_OPSETS = (17,)


# ------------------------------------------------------------------ specs
@dataclass(frozen=True)
class Rand:
    """A float graph input drawn at test time (standard normal, then mapped into ``domain``)."""

    shape: tuple
    domain: str = "normal"  # normal | positive | nonzero | unit | spaced
    kinks: Any = ()  # values to keep >= 0.05 away from, or a function of the attrs
    scale: float = 1.0
    dtype: Any = F32

    def draw(self, rng: np.random.Generator, attrs: dict) -> np.ndarray:
        x = rng.standard_normal(self.shape) * self.scale
        if self.domain == "positive":
            x = np.abs(x) + 0.2
        elif self.domain == "nonzero":
            x = np.sign(x) * (np.abs(x) + 0.3)
        elif self.domain == "unit":
            x = np.clip(x * 0.5, -1.2, 1.2)
        elif self.domain == "spaced":  # all values >= 0.04 apart: no near-ties for Max-like ops
            n = int(np.prod(self.shape))
            x = ((rng.permutation(n) - n / 2) * 0.05 + rng.uniform(-0.005, 0.005, n)).reshape(self.shape)
        elif self.domain != "normal":
            raise ValueError(f"unknown value domain {self.domain!r}")
        kinks = self.kinks(attrs) if callable(self.kinks) else self.kinks
        x = np.array(x, dtype=np.float64)
        for k in kinks:
            close = np.abs(x - k) < 0.05
            x[close] = k + np.where(x[close] >= k, 1, -1) * (0.05 + np.abs(x[close] - k) * 2)
        return np.asarray(x, dtype=self.dtype)


def R(*shape, **kw) -> Rand:
    return Rand(tuple(shape), **kw)


def I64(values) -> Constant:
    """An int64 constant input (axes, shapes, pads, indices)."""
    return constant(np.asarray(values, dtype=np.int64))


@dataclass(frozen=True)
class Sample:
    """One set of node inputs (in node-input order), with what is specific to it."""

    inputs: dict  # name -> Rand | np.ndarray (fed as is) | Constant (initializer) | None (omitted)
    attrs: dict = field(default_factory=dict)  # merged over the grid's attributes
    name: str = ""
    outputs: Any = 1  # a count or node output names
    graph_outputs: Optional[tuple] = None  # default: every node output
    wrt: Optional[tuple] = None  # default: every float graph input except non-differentiable ones
    opsets: Optional[tuple] = None  # only at these opsets (default: the entry's)
    ref: bool = True  # False: finite differences only for this sample


def S(name: str = "", attrs: Optional[dict] = None, **inputs) -> Sample:
    return Sample(inputs=dict(inputs), attrs=dict(attrs or {}), name=name)


def _with(sample: Sample, **kw) -> Sample:
    d = dict(sample.__dict__)
    d.update(kw)
    return Sample(**d)


@dataclass(frozen=True)
class OpInfo:
    """What the table knows of one op (``variant`` tells several entries of an op apart)."""

    op: str
    samples: Any  # tuple of Sample, or a function attrs -> tuple of Sample
    opsets: tuple = DEFAULT_OPSETS
    attrs: tuple = ({},)
    ref: Optional[Callable] = None  # ref(attrs) -> torch fn(*node inputs) -> output(s)
    fd_rtol: Optional[float] = None  # None: onnxbp.testing's defaults (1e-4 float64, 1e-3 float32)
    ref_rtol: float = 2e-5
    ref_atol: float = 1e-6
    variant: str = ""
    note: str = ""
    #: Known rule defects: ``(predicate(case), reason)``; matching cases are strict xfails, so
    #: the table notices when a fix lands.
    xfail: tuple = ()

    @property
    def name(self) -> str:
        return self.op + (f"[{self.variant}]" if self.variant else "")


@dataclass(frozen=True)
class Case:
    """One parametrised check: entry x opset x attributes x sample."""

    entry: OpInfo
    opset: int
    attrs: dict
    sample: Sample

    @property
    def id(self) -> str:
        parts = [self.entry.name, f"opset{self.opset}"]
        if self.sample.name:
            parts.append(self.sample.name)
        if self.attrs:
            parts.append(",".join(f"{k}={_short(v)}" for k, v in self.attrs.items()
                                  if k not in self.sample.attrs) or "")
        return "-".join(p for p in parts if p)

    @property
    def xfail_reason(self) -> Optional[str]:
        return next((reason for pred, reason in self.entry.xfail if pred(self)), None)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def output_names(self) -> list:
        outs = self.sample.outputs
        return (["Y"] if outs == 1 else [f"Y{k}" for k in range(outs)]) if isinstance(outs, int) else list(outs)

    def inputs(self) -> dict:
        rng = np.random.default_rng([self.seed, 0])  # not check_rule's streams: upstream != inputs
        return {n: (s.draw(rng, self.attrs) if isinstance(s, Rand) else s) for n, s in self.sample.inputs.items()}


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return str(v)


def cases(entries=None) -> list:
    out = []
    for e in entries or TABLE:
        for opset in e.opsets:
            for grid in e.attrs:
                samples = e.samples(grid) if callable(e.samples) else e.samples
                for s in samples:
                    if s.opsets is not None and opset not in s.opsets:
                        continue
                    out.append(Case(e, opset, {**grid, **s.attrs}, s))
    return out


# ------------------------------------------------------------------ torch helpers
def _t():
    import torch

    return torch


def _F():
    import torch.nn.functional as F

    return F


def _ints(t) -> list:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _axes(a, axes_input, rank):
    """Reduce/Squeeze/Unsqueeze axes from the attribute or the input, normalised."""
    axes = a.get("axes") if axes_input is None else _ints(axes_input)
    return None if axes is None else [x % rank for x in axes]


def _reduce_ref(fn):
    def ref(a):
        def f(x, axes=None):
            dims = _axes(a, axes, x.dim()) or list(range(x.dim()))
            return fn(x, dims, bool(a.get("keepdims", 1)))
        return f
    return ref


def _onnx_pads_to_torch(pads):
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[n + i])]
    return out


def _conv_pads(a, spatial, k, strides, dil):
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for n, kk, s, d in zip(spatial, k, strides, dil):
            out = -(-n // s)
            total = max(0, (out - 1) * s + (kk - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            pb.append(small if auto == "SAME_UPPER" else big)
            pe.append(big if auto == "SAME_UPPER" else small)
        return pb + pe
    if auto == "VALID":
        return [0] * (2 * len(spatial))
    return list(a.get("pads", [0] * (2 * len(spatial))))


def _torch_conv(a):
    def f(x, w, b=None):
        F = _F()
        nsp = x.dim() - 2
        k = list(w.shape[2:])
        st = a.get("strides", [1] * nsp)
        dl = a.get("dilations", [1] * nsp)
        pads = _conv_pads(a, list(x.shape[2:]), k, st, dl)
        x = F.pad(x, _onnx_pads_to_torch(pads))
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp]
        return conv(x, w, b, stride=st, dilation=dl, groups=a.get("group", 1))
    return f


def _torch_conv_transpose(a):
    def f(x, w, b=None):
        F = _F()
        nsp = x.dim() - 2
        st = a.get("strides", [1] * nsp)
        dl = a.get("dilations", [1] * nsp)
        pads = a.get("pads", [0] * (2 * nsp))
        assert pads[:nsp] == pads[nsp:], "the table's ConvTranspose samples use symmetric pads"
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nsp]
        return conv(x, w, b, stride=st, padding=pads[:nsp], output_padding=a.get("output_padding", [0] * nsp),
                    groups=a.get("group", 1), dilation=dl)
    return f


def _torch_pool(kind):
    def ref(a):
        def f(x):
            F = _F()
            nsp = x.dim() - 2
            k = a["kernel_shape"]
            st = a.get("strides", [1] * nsp)
            pads = a.get("pads", [0] * (2 * nsp))
            assert pads[:nsp] == pads[nsp:], "the table's pooling samples use symmetric pads"
            if kind == "max":
                pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nsp]
                return pool(x, k, st, pads[:nsp], dilation=a.get("dilations", [1] * nsp))
            pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nsp]
            return pool(x, k, st, pads[:nsp], count_include_pad=bool(a.get("count_include_pad", 0)))
        return f
    return ref


def _torch_pad(a):
    def f(x, pads=None, value=None, axes=None):
        F = _F()
        p = list(a["pads"]) if pads is None else _ints(pads)
        rank = x.dim()
        if axes is not None:  # pads for the listed axes only
            full = [0] * (2 * rank)
            ax = [v % rank for v in _ints(axes)]
            for j, axis in enumerate(ax):
                full[axis], full[rank + axis] = p[j], p[len(ax) + j]
            p = full
        mode = a.get("mode", "constant")
        tp = _onnx_pads_to_torch(p)
        if mode == "constant":
            y = F.pad(x, tp)
            if value is not None:  # differentiable in the pad value: value * (1 on padded positions)
                y = y + value.reshape(()) * F.pad(_t().zeros_like(x), tp, value=1.0)
            elif "value" in a:
                y = F.pad(x, tp, value=a["value"])
            return y
        # torch pads only trailing dims in these modes: drop the leading zero pairs
        while tp and tp[-2:] == [0, 0]:
            tp = tp[:-2]
        return F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])
    return f


def _slice_ref(a):
    def f(x, starts=None, ends=None, axes=None, steps=None):
        torch = _t()
        st = a["starts"] if starts is None else _ints(starts)
        en = a["ends"] if ends is None else _ints(ends)
        ax = (a.get("axes") if axes is None else _ints(axes)) or list(range(len(st)))
        sp = [1] * len(st) if steps is None else _ints(steps)
        for s, e, axis, step in zip(st, en, ax, sp):
            axis %= x.dim()
            idx = np.arange(x.shape[axis])[s:e:step].copy()  # python slicing clamps as ONNX does
            x = x.index_select(axis, torch.tensor(idx, dtype=torch.int64))
        return x
    return f


def _softmax_ref(log, coerced):
    def ref(a):
        def f(x):
            axis = a.get("axis", 1 if coerced else -1) % x.dim()
            if coerced:  # opset < 13: a 2-D softmax over the flattened axes axis..rank-1
                shape = x.shape
                x = x.reshape(int(np.prod(shape[:axis])), -1)
                y = x.log_softmax(-1) if log else x.softmax(-1)
                return y.reshape(shape)
            return x.log_softmax(axis) if log else x.softmax(axis)
        return f
    return ref


def _bn_ref(a):
    def f(x, s, b, mean, var):
        eps = float(np.float32(a.get("epsilon", 1e-5)))  # ONNX float attributes are float32
        shape = [1, -1] + [1] * (x.dim() - 2)
        if a.get("training_mode", 0):
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
        return (x - mean.reshape(shape)) / (var.reshape(shape) + eps).sqrt() * s.reshape(shape) + b.reshape(shape)
    return f


def _group_norm_ref(a):
    return lambda x, s, b: _F().group_norm(x, a["num_groups"], s, b, float(np.float32(a.get("epsilon", 1e-5))))


def _attention_ref(a):
    def f(q, k, v, mask=None):
        F = _F()
        three = q.dim() == 3
        if three:  # (B, L, H*E) -> (B, H, L, E)
            q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)
                       for t, h in ((q, a["q_num_heads"]), (k, a["kv_num_heads"]), (v, a["kv_num_heads"])))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(a.get("is_causal", 0)),
                                           scale=a.get("scale"), enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1) if three else y
    return f


def _gemm_ref(a):
    def f(A, B, C=None):
        A = A.T if a.get("transA", 0) else A
        B = B.T if a.get("transB", 0) else B
        y = a.get("alpha", 1.0) * (A @ B)
        return y if C is None else y + a.get("beta", 1.0) * C
    return f


def _gather_ref(a):
    def f(data, idx):
        axis = a.get("axis", 0) % data.dim()
        flat = idx.reshape(-1) % data.shape[axis]
        y = data.index_select(axis, flat)
        return y.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))
    return f


def _split_ref(a):
    def f(x, split=None):
        axis = a.get("axis", 0) % x.dim()
        if split is not None:
            sizes = _ints(split)
        elif "split" in a:
            sizes = a["split"]
        else:
            n = a["num_outputs"]
            sizes = [-(-x.shape[axis] // n)] * n
        return tuple(_t().split(x, sizes, axis))
    return f


def _sce_ref(a):
    def f(x, t, w=None):
        F = _F()
        red = a.get("reduction", "mean")
        loss = F.cross_entropy(x, t, weight=w, reduction=red, ignore_index=a.get("ignore_index", -100))
        return loss, x.log_softmax(1)  # the outputs: loss, log_prob
    return f


def _torch_resize(a):
    """torch.nn.functional.interpolate for the Resize configurations torch has (the table only asks those).

    nearest: asymmetric + floor is torch's ``nearest``, half_pixel + round_prefer_ceil its
    ``nearest-exact``; linear / cubic (a = -0.75, exclude_outside 0): pytorch_half_pixel or half_pixel
    (no output dim of 1) is ``align_corners=False``, align_corners ``True``.  ``antialias=1`` when
    downscaling is torch's ``antialias=True`` with exclude_outside=1 (torch drops the taps outside
    the input and renormalises) and, for cubic, a = -0.5 (Pillow's).  The batch and channel axes are
    not resized.
    """
    def f(x, *rest):
        F = _F()
        scales, sizes = (rest[0], None) if len(rest) == 1 else ((list(rest) + [None] * 3)[1:3])
        nsp = x.dim() - 2
        mode = a.get("mode", "nearest")
        coord = a.get("coordinate_transformation_mode", "half_pixel")
        kw = {}
        if sizes is not None:
            kw["size"] = _ints(sizes)[-nsp:]
        else:
            s = [float(v) for v in scales.tolist()]
            assert s[:len(s) - nsp] == [1.0] * (len(s) - nsp), "the table resizes spatial axes only"
            kw["scale_factor"] = s[-nsp:]
        if mode == "nearest":
            tmode = {"asymmetric": "nearest", "half_pixel": "nearest-exact"}[coord]
        else:
            tmode = ({1: "linear", 2: "bilinear", 3: "trilinear"}[nsp] if mode == "linear" else "bicubic")
            kw["align_corners"] = coord == "align_corners"
            if a.get("antialias", 0):
                assert a.get("exclude_outside", 0) == 1, "torch's antialias drops the outside taps"
                assert mode == "linear" or a.get("cubic_coeff_a") == -0.5, "torch's antialiased bicubic has a = -0.5"
                kw["antialias"] = True
        return F.interpolate(x, mode=tmode, **kw)
    return f


def _resize_samples(scales_ok: tuple, sizes_ok: tuple, x=(1, 2, 4, 5)):
    """Samples for one Resize opset: scales up / down / mixed and sizes, in the node-input order."""
    def build(opset):
        out = []
        for name, sc in scales_ok:
            sc = constant(np.array(sc, F32))
            roi = constant(np.zeros(0, F32)) if opset == 11 else None  # opset 11: roi is not optional
            inputs = dict(X=R(*x), scales=sc) if opset == 10 else dict(X=R(*x), roi=roi, scales=sc)
            out.append(_with(S(name, **inputs), opsets=(opset,)))
        if opset > 10:
            for name, sz in sizes_ok:
                empty = constant(np.zeros(0, F32))
                inputs = (dict(X=R(*x), roi=empty, scales=empty, sizes=I64(sz)) if opset == 11
                          else dict(X=R(*x), roi=None, scales=None, sizes=I64(sz)))
                out.append(_with(S(name, **inputs), opsets=(opset,)))
        return out
    return build


_RESIZE_SCALES = (("up", [1, 1, 2, 1.5]), ("down", [1, 1, 0.5, 0.75]), ("mixed", [1, 1, 1.7, 0.6]))
_RESIZE_SIZES = (("sizes", [1, 2, 7, 3]),)


def _resize_entry(variant, attrs, opsets, ref=True, scales=_RESIZE_SCALES, sizes=_RESIZE_SIZES, **kw) -> OpInfo:
    build = _resize_samples(scales, sizes)
    samples = tuple(s for o in opsets for s in build(o))
    return OpInfo("Resize", samples, opsets=opsets, attrs=attrs, ref=_torch_resize if ref else None,
                  variant=variant, **kw)


def _resize_cases(opset, rows) -> tuple:
    """One-off Resize samples ``(name, attrs, X shape, scales or None, sizes or None, roi or None)``."""
    out = []
    for name, attrs, shape, sc, sz, roi in rows:
        c = (lambda v: None if v is None else constant(np.array(v, F32)))
        if opset == 10:
            inputs = dict(X=R(*shape), scales=c(sc))
        else:
            empty = constant(np.zeros(0, F32)) if opset == 11 else None  # opset 11: roi, scales required
            inputs = dict(X=R(*shape), roi=c(roi) if roi is not None else empty,
                          scales=c(sc) if sc is not None else empty, sizes=None if sz is None else I64(sz))
        out.append(_with(S(name, attrs, **inputs), opsets=(opset,)))
    return tuple(out)


def _mod_operands(shape_a, shape_b, seed):
    """(A, B) with |B| in [0.5, 2] and the fractional part of |A / B| in [0.2, 0.8]: Mod's jumps
    (A / B an integer) stay far from every finite-difference step."""
    rng = np.random.default_rng(seed)
    b = (rng.choice([-1.0, 1.0], shape_b) * rng.uniform(0.5, 2.0, shape_b))
    shape = np.broadcast_shapes(shape_a, shape_b)
    q = rng.choice([-1.0, 1.0], shape) * (rng.integers(0, 4, shape) + rng.uniform(0.2, 0.8, shape))
    a = q * b
    assert a.shape == tuple(shape_a), "A must carry the broadcast shape"
    return a.astype(F32), b.astype(F32)


def _mod_samples(_):
    out = []
    for name, sa, sb in (("same", (2, 3), (2, 3)), ("bcast-B", (2, 3, 4), (3, 1)), ("scalar-B", (3, 2), ())):
        a, b = _mod_operands(sa, sb, zlib.crc32(name.encode()))
        out.append(S(name, A=a, B=b))
    return tuple(out)


def _cumsum_ref(a):
    def f(x, axis):
        ax = int(axis) % x.dim()
        rev, excl = a.get("reverse", 0), a.get("exclusive", 0)
        src = x.flip(ax) if rev else x
        y = src.cumsum(ax) - (src if excl else 0)
        return y.flip(ax) if rev else y
    return f


def _nd_index(i):
    return tuple(i[..., k] for k in range(i.shape[-1]))


def _einsum_samples(_):
    rows = (("ij,jk->ik", (2, 3), (3, 4)), ("bij,bjk->bik", (2, 2, 3), (2, 3, 2)),
            ("bhqd,bhkd->bhqk", (1, 2, 3, 4), (1, 2, 2, 4)), ("ij,j->i", (3, 4), (4,)), ("i,i->", (4,), (4,)),
            ("ij,jk", (2, 3), (3, 4)), ("...ij,...jk->...ik", (2, 2, 3), (2, 3, 2)), ("ij->ji", (2, 3)),
            ("ij->", (2, 3)), ("ijk->ik", (2, 3, 4)), ("ij,kj->i", (2, 3), (4, 3)),
            ("ab,bc,cd->ad", (2, 3), (3, 2), (2, 4)),
            ("i,j->ij", (3,), (2,)))
    return tuple(S(eq.replace(",", "_").replace("->", "-to-").replace("...", "ell"), {"equation": eq},
                   **{f"X{k}": R(*sh) for k, sh in enumerate(shapes)}) for eq, *shapes in rows)


def _lrn_ref(a):
    return lambda x: _F().local_response_norm(x, a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75),
                                               a.get("bias", 1.0))


SELU_A, SELU_G = 1.67326319217681884765625, 1.05070102214813232421875


def _unary(op, fn, *, domain="normal", kinks=(), scale=1.0, opsets=DEFAULT_OPSETS, attrs=({},), **kw) -> OpInfo:
    samples = (S("3x5", X=R(3, 5, domain=domain, kinks=kinks, scale=scale)),
               S("2x1x3x2", X=R(2, 1, 3, 2, domain=domain, kinks=kinks, scale=scale)),
               S("scalar", X=R(domain=domain, kinks=kinks, scale=scale)))
    return OpInfo(op, samples, opsets=opsets, attrs=attrs, ref=(lambda a: (lambda x: fn(x, a))) if fn else None, **kw)


def _binary(op, fn, b_domain="normal", opsets=(7, 17)) -> OpInfo:
    samples = (S("same", A=R(2, 3), B=R(2, 3, domain=b_domain)),
               S("bcast", A=R(2, 1, 4), B=R(3, 1, domain=b_domain)),
               S("scalar", A=R(), B=R(2, 3, domain=b_domain)))
    return OpInfo(op, samples, opsets=opsets, ref=lambda a: fn)


def _variadic(op, fn, opsets=DEFAULT_OPSETS) -> OpInfo:
    samples = (S("three-bcast", X0=R(2, 3, 4), X1=R(3, 1), X2=R(4)),
               S("two", X0=R(2, 3), X1=R(2, 3)),
               S("one", X0=R(3, 2)))
    return OpInfo(op, samples, opsets=opsets, ref=lambda a: fn)


def _torch_fold(fn):
    def f(*xs):
        y = xs[0]
        for x in xs[1:]:
            y = fn(y, x)
        return y
    return f


REDUCE_REFS = {
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: _t().linalg.vector_norm(x, 2, dim=d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: _t().logsumexp(x, d, keepdim=k),
}


def _reduce_entries(op) -> list:
    """Two entries: the axes attribute (opsets before the change) and the axes input."""
    change = 13 if op == "ReduceSum" else 18
    kinks = (0.0,) if op == "ReduceL1" else ()
    axes = [None, [1], [0, 2], [-1]]
    keep = ({"keepdims": 1}, {"keepdims": 0})

    def attr_samples(_):
        return tuple(S("all" if ax is None else "axes" + "_".join(map(str, ax)),
                       {} if ax is None else {"axes": ax}, X=R(2, 3, 4, kinks=kinks)) for ax in axes)

    def input_samples(_):
        return tuple(S("all" if ax is None else "axes" + "_".join(map(str, ax)),
                       X=R(2, 3, 4, kinks=kinks), axes=None if ax is None else I64(ax)) for ax in axes)

    ref = _reduce_ref(REDUCE_REFS[op])
    return [OpInfo(op, attr_samples, opsets=(change - 1,), attrs=keep, ref=ref, variant="axes-attr"),
            OpInfo(op, input_samples, opsets=(change,), attrs=keep, ref=ref, variant="axes-input")]


def _bool(rows) -> np.ndarray:
    return np.array(rows, dtype=bool)


# ------------------------------------------------------------------ the table
TABLE: list = [
    # ---------------------------------------------------------- elementwise
    _binary("Add", lambda a, b: a + b),
    _binary("Sub", lambda a, b: a - b),
    _binary("Mul", lambda a, b: a * b),
    _binary("Div", lambda a, b: a / b, b_domain="nonzero"),
    OpInfo("Pow", (S("same", A=R(2, 3, domain="positive"), B=R(2, 3, scale=0.7)),
                   S("bcast", A=R(2, 3, domain="positive"), B=R(3, scale=0.7)),
                   S("const-exponent", A=R(2, 3), B=constant(np.array(3.0, F32)))),
           opsets=(12, 17), ref=lambda a: lambda x, y: x ** y),
    OpInfo("Relu", (S("2x3x4", X=R(2, 3, 4, kinks=(0.0,))), S("scalar", X=R(kinks=(0.0,)))), opsets=(7, 17),
           ref=lambda a: lambda x: x.relu()),
    OpInfo("Neg", (S("2x3", X=R(2, 3)),), ref=lambda a: lambda x: -x),
    OpInfo("Identity", (S("2x3", X=R(2, 3)),), ref=lambda a: lambda x: x * 1),
    _variadic("Sum", _torch_fold(lambda a, b: a + b)),
    _variadic("Mean", lambda *xs: _torch_fold(lambda a, b: a + b)(*xs) / len(xs)),
    _variadic("Max", _torch_fold(lambda a, b: _t().maximum(a, b))),
    _variadic("Min", _torch_fold(lambda a, b: _t().minimum(a, b))),
    OpInfo("Cast", (S("float-to-double", {"to": TensorProto.DOUBLE}, X=R(2, 3)),
                    S("double-to-float", {"to": TensorProto.FLOAT}, X=R(2, 3, dtype=np.float64)),
                    S("float-to-float", {"to": TensorProto.FLOAT}, X=R(3))),
           opsets=(9, 17), ref=lambda a: lambda x: x * 1),
    OpInfo("CastLike", (S("to-double", X=R(2, 3), T=constant(np.zeros(1, np.float64))),
                        S("to-float", X=R(2, 3, dtype=np.float64), T=constant(np.zeros(1, F32)))),
           opsets=(15, 19), ref=lambda a: lambda x, t: x * 1),
    OpInfo("Flatten", (S("2x3x4", X=R(2, 3, 4)),), opsets=(11, 17),
           attrs=({}, {"axis": 0}, {"axis": 2}, {"axis": -1}),
           ref=lambda a: lambda x: x.reshape(int(np.prod(x.shape[:_flatten_axis(a, x.dim())])), -1)),
    # ---------------------------------------------------------- tensor movement
    OpInfo("Reshape", (S("4x6", X=R(2, 3, 4), shape=I64([4, 6])), S("flat", X=R(2, 3, 4), shape=I64([-1])),
                       S("zero-copies-dim", X=R(2, 3, 4), shape=I64([0, -1])),
                       S("infer", X=R(2, 3, 4), shape=I64([2, -1, 2]))),
           opsets=(13, 17),
           ref=lambda a: lambda x, s: x.reshape([x.shape[i] if v == 0 else v for i, v in enumerate(_ints(s))])),
    OpInfo("Squeeze", (_with(S("attr-1", {"axes": [1]}, X=R(2, 1, 3, 1)), opsets=(11,)),
                       _with(S("attr-all", X=R(2, 1, 3, 1)), opsets=(11,)),
                       _with(S("input-1_3", X=R(2, 1, 3, 1), axes=I64([1, 3])), opsets=(13,)),
                       _with(S("input--1", X=R(2, 1, 3, 1), axes=I64([-1])), opsets=(13,)),
                       _with(S("input-all", X=R(2, 1, 3, 1)), opsets=(13,))),
           opsets=(11, 13),
           ref=lambda a: lambda x, axes=None: x.reshape(
               [d for i, d in enumerate(x.shape)
                if i not in (_axes(a, axes, x.dim()) or [j for j, e in enumerate(x.shape) if e == 1])])),
    OpInfo("Unsqueeze", (_with(S("attr-0", {"axes": [0]}, X=R(2, 3)), opsets=(11,)),
                         _with(S("attr-1_3", {"axes": [1, 3]}, X=R(2, 3)), opsets=(11,)),
                         _with(S("input-1_3", X=R(2, 3), axes=I64([1, 3])), opsets=(13,)),
                         _with(S("input--1", X=R(2, 3), axes=I64([-1])), opsets=(13,))),
           opsets=(11, 13),
           ref=lambda a: lambda x, axes=None: x.reshape(_unsqueezed(list(x.shape), a, axes))),
    OpInfo("Transpose", (S("2x3x4", X=R(2, 3, 4)),), attrs=({}, {"perm": [1, 0, 2]}, {"perm": [2, 0, 1]}),
           ref=lambda a: lambda x: x.permute(*(a.get("perm") or list(reversed(range(x.dim())))))),
    OpInfo("Concat", (S("axis1", {"axis": 1}, A=R(2, 3), B=R(2, 1), C=R(2, 2)),
                      S("axis-2", {"axis": -2}, A=R(1, 3), B=R(2, 3))),
           opsets=(11, 17), ref=lambda a: lambda *xs: _t().cat(xs, a["axis"])),
    OpInfo("Split", (_with(S("attr", {"axis": 1, "split": [1, 3, 2]}, X=R(3, 6, 2)), outputs=3, opsets=(11,)),
                     _with(S("input-some-used", {"axis": 1}, X=R(3, 6, 2), split=I64([1, 3, 2])), outputs=3,
                           graph_outputs=("Y0", "Y2"), opsets=(13,)),
                     _with(S("num_outputs", {"axis": 1, "num_outputs": 3}, X=R(3, 6, 2)), outputs=3,
                           opsets=(18,))),
           opsets=(11, 13, 18), ref=_split_ref, note="more output subsets in test_tensor_grad.py"),
    OpInfo("Slice", (_with(S("attrs", {"starts": [1, 0], "ends": [3, -1], "axes": [0, 2]}, X=R(3, 4, 6)),
                           opsets=(9,)),
                     _with(S("basic", X=R(3, 4, 6), starts=I64([1]), ends=I64([3]), axes=I64([0])), opsets=(13,)),
                     _with(S("clamped", X=R(3, 4, 6), starts=I64([-3]), ends=I64([100]), axes=I64([-1])),
                           opsets=(13,)),
                     _with(S("steps", X=R(3, 4, 6), starts=I64([0, 2]), ends=I64([5, 100]), axes=I64([2, 1]),
                             steps=I64([2, 1])), opsets=(13,)),
                     _with(S("negative-steps", X=R(3, 4, 6), starts=I64([-1, 3]), ends=I64([-100, 0]),
                             axes=I64([0, 1]), steps=I64([-1, -3])), opsets=(13,))),
           opsets=(9, 13), ref=_slice_ref),
    OpInfo("Expand", (S("3x1-to-2x3x4", X=R(3, 1), shape=I64([2, 3, 4])),
                      S("1x4-by-3x1", X=R(1, 4), shape=I64([3, 1]))),
           opsets=(8, 17),
           ref=lambda a: lambda x, s: x.expand(np.broadcast_shapes(tuple(x.shape), tuple(_ints(s))))),
    OpInfo("Tile", (S("2x1", X=R(2, 3), repeats=I64([2, 1])), S("2x3", X=R(2, 3), repeats=I64([2, 3]))),
           opsets=(6, 8, 17), ref=lambda a: lambda x, r: x.repeat(*_ints(r))),
    OpInfo("Gather", (S("axis0-repeats", {"axis": 0}, data=R(5, 4), indices=I64([[0, 2], [4, 0]])),
                      S("axis1-negative", {"axis": 1}, data=R(5, 4), indices=I64([3, -1, 3])),
                      S("scalar-index", {"axis": 0}, data=R(5, 4), indices=I64(2)),
                      S("scalar-index-axis2-negative", {"axis": 2}, data=R(2, 3, 4, 2), indices=I64(-1)),
                      S("constant-run", {"axis": 1}, data=R(2, 5, 3), indices=I64([1, 2, 3])),
                      S("constant-run-whole-axis", {"axis": 0}, data=R(3, 2), indices=I64([0, 1, 2])),
                      S("qkv-split", {"axis": 0}, data=R(3, 2, 4), indices=I64(1)),
                      S("runtime-indices", {"axis": 1}, data=R(2, 5), indices=np.array([4, 0, 4], np.int64))),
           opsets=(13, 17), ref=_gather_ref),
    OpInfo("GatherElements", (S("axis1", {"axis": 1}, data=R(3, 4), indices=I64([[0, 3], [1, 1], [3, 0]])),
                              S("axis0", {"axis": 0}, data=R(3, 4), indices=I64([[2, 0, 1, 2], [2, 2, 0, 1]]))),
           ref=lambda a: lambda d, i: _t().gather(d, a.get("axis", 0), i % d.shape[a.get("axis", 0)])),
    OpInfo("ScatterElements",
           (S("none-axis1", {"axis": 1}, data=R(3, 4), indices=I64([[0, 3], [1, 2], [3, 0]]), updates=R(3, 2)),
            _with(S("add-repeats-axis0", {"axis": 0, "reduction": "add"}, data=R(3, 4),
                    indices=I64([[2, 0, 1, 2], [2, 2, 0, 1]]), updates=R(2, 4)), opsets=(17,))),
           opsets=(13, 17),
           ref=lambda a: lambda d, i, u: (_t().scatter_add if a.get("reduction") == "add" else _t().scatter)(
               d, a.get("axis", 0), i, u)),
    OpInfo("Pad", (_with(S("attr-constant", {"pads": [0, 1, 2, 1, 0, 1], "mode": "constant"}, X=R(2, 3, 4)),
                         opsets=(10,)),
                   _with(S("attr-reflect", {"pads": [0, 1, 2, 0, 1, 2], "mode": "reflect"}, X=R(2, 3, 4)),
                         opsets=(10,)),
                   _with(S("constant-value", X=R(2, 3, 4), pads=I64([0, 1, 2, 1, 0, 1]), value=R()),
                         opsets=(13, 18)),
                   _with(S("crop", X=R(2, 3, 4), pads=I64([0, -1, 1, 0, 1, -1])), opsets=(13, 18)),
                   _with(S("reflect", {"mode": "reflect"}, X=R(2, 3, 4), pads=I64([0, 1, 2, 0, 1, 2])),
                         opsets=(13, 18)),
                   _with(S("edge", {"mode": "edge"}, X=R(2, 3, 4), pads=I64([0, 2, 1, 0, 1, 3])), opsets=(13, 18)),
                   _with(S("axes", X=R(2, 3, 4), pads=I64([1, 2, 0, 1]), value=None, axes=I64([2, 0])),
                         opsets=(18,)),
                   _with(S("wrap", {"mode": "wrap"}, X=R(2, 3, 4), pads=I64([0, 1, 2, 0, 2, 1])), opsets=(19,))),
           opsets=(10, 13, 18, 19), ref=_torch_pad),
    OpInfo("Where", (S("bcast", C=_bool([[True, False, True], [False, False, True]]), A=R(2, 1), B=R(3)),
                     S("same", C=_bool([[False, True], [True, True]]), A=R(2, 2), B=R(2, 2))),
           opsets=(9, 17), ref=lambda a: lambda c, x, y: _t().where(c, x, y)),
    # ---------------------------------------------------------- activations
    OpInfo("Sigmoid", _unary("Sigmoid", None).samples, opsets=(7, 17), ref=lambda a: lambda x: x.sigmoid()),
    OpInfo("Tanh", _unary("Tanh", None).samples, opsets=(7, 17), ref=lambda a: lambda x: x.tanh()),
    _unary("Softplus", lambda x, a: _F().softplus(x)),
    _unary("Softsign", lambda x, a: _F().softsign(x), kinks=(0.0,)),
    _unary("LeakyRelu", lambda x, a: _F().leaky_relu(x, a.get("alpha", 0.01)), kinks=(0.0,), opsets=(7, 17),
           attrs=({}, {"alpha": 0.2}, {"alpha": 1.5})),
    _unary("HardSigmoid", lambda x, a: (a.get("alpha", 0.2) * x + a.get("beta", 0.5)).clamp(0, 1),
           kinks=lambda a: [-a.get("beta", 0.5) / a.get("alpha", 0.2), (1 - a.get("beta", 0.5)) / a.get("alpha", 0.2)],
           scale=3.0, opsets=(7, 17), attrs=({}, {"alpha": 0.5, "beta": 0.3})),
    _unary("HardSwish", lambda x, a: _F().hardswish(x), kinks=(-3.0, 3.0), scale=2.5, opsets=(14, 17)),
    _unary("Elu", lambda x, a: _F().elu(x, a.get("alpha", 1.0)), kinks=(0.0,), opsets=(7, 17),
           attrs=({}, {"alpha": 0.5})),
    _unary("Selu", lambda x, a: a.get("gamma", SELU_G) * _t().where(x > 0, x, a.get("alpha", SELU_A) * (x.exp() - 1)),
           kinks=(0.0,), opsets=(7, 17), attrs=({}, {"alpha": 1.2, "gamma": 0.8})),
    _unary("Celu", lambda x, a: _F().celu(x, a.get("alpha", 1.0)), kinks=(0.0,), opsets=(12, 17),
           attrs=({}, {"alpha": 2.0})),
    _unary("Gelu", lambda x, a: _F().gelu(x, approximate=a.get("approximate", "none")), scale=2.0, opsets=(20,),
           attrs=({}, {"approximate": "tanh"})),
    _unary("Erf", lambda x, a: _t().erf(x), opsets=(9, 17)),
    _unary("Exp", lambda x, a: x.exp(), opsets=(7, 17)),
    _unary("Log", lambda x, a: x.log(), domain="positive", opsets=(7, 17)),
    _unary("Sqrt", lambda x, a: x.sqrt(), domain="positive", opsets=(7, 17)),
    _unary("Reciprocal", lambda x, a: x.reciprocal(), domain="nonzero", opsets=(7, 17)),
    _unary("Abs", lambda x, a: x.abs(), kinks=(0.0,), opsets=(7, 17)),
    _unary("Sin", lambda x, a: x.sin()),
    _unary("Cos", lambda x, a: x.cos()),
    _unary("Tan", lambda x, a: x.tan(), domain="unit"),
    _unary("Mish", lambda x, a: _F().mish(x), scale=2.0, opsets=(18,)),
    OpInfo("PRelu", (S("slope-per-channel", X=R(2, 3, 4, kinks=(0.0,)), slope=R(3, 1)),
                     S("slope-last-axis", X=R(2, 3, 4, kinks=(0.0,)), slope=R(4)),
                     S("same-shape", X=R(2, 3, kinks=(0.0,)), slope=R(2, 3))),
           opsets=(9, 17), ref=lambda a: lambda x, s: _t().where(x > 0, x, s * x)),
    OpInfo("Clip", (S("both", {"min": -0.5, "max": 0.5}, X=R(3, 4, kinks=(-0.5, 0.5))),
                    S("min-only", {"min": -0.5}, X=R(3, 4, kinks=(-0.5,)))),
           opsets=(7, 10), variant="attrs",
           ref=lambda a: lambda x: x.clamp(a.get("min"), a.get("max"))),
    OpInfo("Clip", (S("both", X=R(3, 4, kinks=(-0.5, 0.5)), min=constant(np.array(-0.5, F32)),
                      max=constant(np.array(0.5, F32))),
                    S("max-only", X=R(3, 4, kinks=(0.5,)), min=None, max=constant(np.array(0.5, F32))),
                    S("min-only", X=R(3, 4, kinks=(-0.5,)), min=constant(np.array(-0.5, F32))),
                    S("none", X=R(3, 4))),
           opsets=(11, 17), variant="inputs",
           ref=lambda a: lambda x, lo=None, hi=None: x * 1 if lo is None and hi is None else x.clamp(lo, hi)),
    # ---------------------------------------------------------- reductions, softmax
    *[e for op in REDUCE_REFS for e in _reduce_entries(op)],
    OpInfo("Softmax", (S("2x3x4", X=R(2, 3, 4)),), opsets=(13, 17), attrs=({}, {"axis": 0}, {"axis": 1}),
           ref=_softmax_ref(False, False), variant="axis"),
    OpInfo("Softmax", (S("2x3x4", X=R(2, 3, 4)),), opsets=(11, 12), attrs=({}, {"axis": 0}, {"axis": 2}),
           ref=_softmax_ref(False, True), variant="coerced-2d"),
    OpInfo("LogSoftmax", (S("2x3x4", X=R(2, 3, 4)),), opsets=(13, 17), attrs=({}, {"axis": 0}, {"axis": 1}),
           ref=_softmax_ref(True, False), variant="axis"),
    OpInfo("LogSoftmax", (S("2x3x4", X=R(2, 3, 4)),), opsets=(11, 12), attrs=({}, {"axis": 0}, {"axis": 2}),
           ref=_softmax_ref(True, True), variant="coerced-2d"),
    # ---------------------------------------------------------- linear algebra
    OpInfo("MatMul", (S("2d", A=R(3, 4), B=R(4, 5)), S("batched-by-2d", A=R(2, 3, 4), B=R(4, 5)),
                      S("vector-by-batched", A=R(4), B=R(2, 4, 3)), S("broadcast-batch", A=R(2, 1, 3, 4), B=R(3, 4, 2)),
                      S("matrix-by-vector", A=R(3, 4), B=R(4))),
           opsets=(8, 17), ref=lambda a: lambda x, y: x @ y),
    OpInfo("Gemm", lambda a: (
        S("C-row", A=R(4, 3) if a.get("transA") else R(3, 4), B=R(5, 4) if a.get("transB") else R(4, 5), C=R(5)),
        S("C-col", A=R(4, 3) if a.get("transA") else R(3, 4), B=R(5, 4) if a.get("transB") else R(4, 5), C=R(3, 1)),
        S("no-C", A=R(4, 3) if a.get("transA") else R(3, 4), B=R(5, 4) if a.get("transB") else R(4, 5))),
        attrs=({}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}, {"transA": 1, "transB": 1, "beta": 0.0}),
        opsets=(13,), ref=_gemm_ref, note="C shapes x opsets in test_linalg_grad.py"),
    # ---------------------------------------------------------- conv, pooling (small; grids in their files)
    OpInfo("Conv", (S("2d-bias", X=R(1, 2, 5, 5), W=R(3, 2, 3, 3), B=R(3)),
                    S("2d-stride-pad", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, X=R(1, 2, 5, 5), W=R(3, 2, 3, 3)),
                    S("2d-dilated-asym", {"dilations": [2, 1], "pads": [1, 0, 0, 1]}, X=R(2, 2, 5, 4),
                      W=R(2, 2, 2, 3), B=R(2)),
                    S("2d-group-same", {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]}, X=R(1, 4, 5, 5),
                      W=R(4, 2, 3, 3), B=R(4)),
                    S("1d", {"strides": [2], "pads": [1, 1]}, X=R(2, 2, 7), W=R(3, 2, 3), B=R(3))),
           opsets=(11, 17), ref=lambda a: _torch_conv(a),
           note="every attribute combination under 3 lowerings in test_conv_grad.py"),
    OpInfo("ConvTranspose", (S("2d-bias", X=R(1, 2, 4, 4), W=R(2, 3, 3, 3), B=R(3)),
                             S("2d-stride-pad-outpad", {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                        "output_padding": [1, 1]}, X=R(1, 2, 3, 3), W=R(2, 3, 3, 3)),
                             S("2d-group", {"group": 2}, X=R(1, 2, 3, 3), W=R(2, 2, 2, 2), B=R(4)),
                             S("1d-stride", {"strides": [2]}, X=R(1, 2, 5), W=R(2, 1, 3))),
           opsets=(8, 17), ref=lambda a: _torch_conv_transpose(a)),
    OpInfo("MaxPool", (S("2x2-s2", {"kernel_shape": [2, 2], "strides": [2, 2]}, X=R(1, 2, 5, 5)),
                       S("3x3-s2-p1", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                         X=R(1, 2, 5, 5)),
                       S("overlap-dilated", {"kernel_shape": [2, 2], "dilations": [2, 1]}, X=R(1, 2, 5, 4)),
                       _with(S("with-indices", {"kernel_shape": [3], "strides": [2]}, X=R(2, 3, 7)),
                             outputs=["Y", "I"]),
                       S("1d", {"kernel_shape": [3], "strides": [2]}, X=R(2, 3, 7))),
           opsets=(12, 17), ref=_torch_pool("max"),
           note="700 pooling cases, ties and opsets in test_pool_grad.py"),
    OpInfo("AveragePool", (S("2x2-s2", {"kernel_shape": [2, 2], "strides": [2, 2]}, X=R(1, 2, 5, 5)),
                           S("3x3-p1-excl", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, X=R(1, 2, 4, 5)),
                           S("3x3-p1-incl", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
                             X=R(1, 2, 4, 5)),
                           S("1d", {"kernel_shape": [3], "strides": [2]}, X=R(2, 3, 7))),
           opsets=(11, 17), ref=_torch_pool("avg")),
    OpInfo("GlobalAveragePool", (S("2d", X=R(2, 3, 4, 5)), S("1d", X=R(2, 3, 5))),
           ref=lambda a: lambda x: x.mean(list(range(2, x.dim())), keepdim=True)),
    # onnxruntime has no float64 GlobalMaxPool: float32 differences with steps ~1e-2 need the
    # top two values of each window well apart ("spaced").
    OpInfo("GlobalMaxPool", (S("2d", X=R(2, 3, 4, 5, domain="spaced")), S("1d", X=R(2, 3, 5, domain="spaced"))),
           ref=lambda a: lambda x: x.amax(list(range(2, x.dim())), keepdim=True)),
    # ---------------------------------------------------------- scans, triangles, N-D gathers, Einsum
    OpInfo("CumSum", (S("axis1", X=R(3, 4), axis=I64(1)), S("axis-neg", X=R(2, 3, 4), axis=I64(-3)),
                      S("1d", X=R(5), axis=constant(np.array(0, np.int32)))),
           opsets=(11, 14), attrs=({}, {"exclusive": 1}, {"reverse": 1}, {"exclusive": 1, "reverse": 1}),
           ref=_cumsum_ref),
    OpInfo("Trilu", (S("default-k", X=R(3, 4)), S("k1", X=R(3, 4), k=I64(1)), S("k-2-batched", X=R(2, 4, 3), k=I64(-2)),
                     S("k-past-edge", X=R(3, 4), k=I64(5))),
           opsets=(14,), attrs=({}, {"upper": 0}),
           ref=lambda a: lambda x, k=None: (_t().triu if a.get("upper", 1) else _t().tril)(
               x, 0 if k is None else int(k))),
    OpInfo("GatherND", (S("points-repeated", data=R(3, 4, 2), indices=I64([[0, 1], [2, 3], [0, 1]])),
                        S("slices-negative", data=R(3, 4, 2), indices=I64([[1], [-1], [1]])),
                        S("batched-indices", data=R(3, 4), indices=I64([[[0, 3], [2, 2]], [[1, 0], [0, 3]]]))),
           opsets=(13, 17), ref=lambda a: lambda d, i: d[_nd_index(i % _t().tensor(d.shape[:i.shape[-1]]))]),
    OpInfo("ScatterND", (S("none-rows", data=R(4, 3), indices=I64([[1], [3]]), updates=R(2, 3)),
                         S("none-points", data=R(4, 3), indices=I64([[0, 2], [3, 1]]), updates=R(2)),
                         _with(S("add-repeats", {"reduction": "add"}, data=R(4, 3), indices=I64([[1], [1], [0]]),
                                 updates=R(3, 3)), opsets=(16, 18))),
           opsets=(13, 16, 18),
           ref=lambda a: lambda d, i, u: d.index_put(_nd_index(i), u, accumulate=a.get("reduction") == "add")),
    OpInfo("Einsum", _einsum_samples, opsets=(12, 17), ref=lambda a: lambda *xs: _t().einsum(a["equation"], *xs)),
    # ---------------------------------------------------------- Mod (Floor, Ceil, Round, Sign pass no gradient)
    OpInfo("Mod", _mod_samples, opsets=(10, 13, 28), attrs=({"fmod": 1},), variant="fmod",
           ref=lambda a: lambda x, y: _t().fmod(x, y)),
    OpInfo("Mod", _mod_samples, opsets=(28,), attrs=({}, {"fmod": 0}), variant="floor",
           ref=lambda a: lambda x, y: _t().remainder(x, y), note="float Mod with fmod=0 needs opset 28"),
    # ---------------------------------------------------------- resampling (Resize: exhaustive grid in
    # tests/test_resize_arith.py; symbolic batch, runtime sizes and refusals in tests/test_resize_grad.py)
    _resize_entry("torch-linear", tuple({"mode": "linear", "coordinate_transformation_mode": c}
                                        for c in ("half_pixel", "pytorch_half_pixel", "align_corners")),
                  (11, 13, 19)),
    _resize_entry("torch-cubic", tuple({"mode": "cubic", "coordinate_transformation_mode": c}
                                       for c in ("half_pixel", "align_corners")), (13, 18)),
    _resize_entry("torch-nearest", ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                     "nearest_mode": "floor"},
                                    {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                                     "nearest_mode": "round_prefer_ceil"}),
                  (11, 13), scales=(("up", [1, 1, 2, 3]), ("down", [1, 1, 0.5, 0.5])),
                  sizes=(("sizes", [1, 2, 8, 10]),)),
    _resize_entry("nearest-modes", tuple({"mode": "nearest", "coordinate_transformation_mode": c, "nearest_mode": m}
                                         for c in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
                                         for m in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")),
                  (13,), ref=False, scales=(("mixed", [1, 1, 1.7, 0.6]),), sizes=(("sizes", [1, 2, 7, 3]),)),
    _resize_entry("fd-coordinate-modes", tuple({"mode": m, "coordinate_transformation_mode": c}
                                               for m in ("linear", "cubic")
                                               for c in ("asymmetric", "half_pixel_symmetric")), (19,), ref=False),
    _resize_entry("torch-antialias", ({"mode": "linear", "antialias": 1, "exclude_outside": 1},
                                      {"mode": "cubic", "antialias": 1, "exclude_outside": 1, "cubic_coeff_a": -0.5}),
                  (18, 19), scales=(("down", [1, 1, 0.5, 0.75]), ("down-more", [1, 1, 0.3, 0.6])),
                  sizes=(("sizes-down", [1, 2, 2, 3]),)),
    OpInfo("Resize", _resize_cases(18, (
        ("linear-fold-edges", {"mode": "linear", "antialias": 1}, (1, 2, 6, 5), [1, 1, 0.5, 0.4], None, None),
        ("cubic-fold-edges", {"mode": "cubic", "antialias": 1}, (1, 2, 6, 5), [1, 1, 0.5, 0.7], None, None),
        ("linear-up", {"mode": "linear", "antialias": 1}, (1, 2, 3, 4), [1, 1, 2, 1.5], None, None),
        ("cubic-mixed", {"mode": "cubic", "antialias": 1, "coordinate_transformation_mode": "align_corners"},
         (1, 2, 6, 5), [1, 1, 1.7, 0.6], None, None),
        ("nhwc", {"mode": "linear", "antialias": 1}, (1, 6, 5, 2), [1, 0.5, 0.6, 1], None, None),
        ("2d-asymmetric", {"mode": "cubic", "antialias": 1, "coordinate_transformation_mode": "asymmetric"},
         (6, 7), [0.5, 0.45], None, None),
        ("trilinear-5d", {"mode": "linear", "antialias": 1}, (1, 2, 4, 5, 6), [1, 1, 0.5, 0.6, 0.5], None, None),
        ("crop", {"mode": "linear", "antialias": 1, "coordinate_transformation_mode": "tf_crop_and_resize",
                  "extrapolation_value": 1.5}, (1, 2, 6, 5), None, [1, 2, 3, 2],
         [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]))),
           opsets=(18,), variant="antialias", note="onnxruntime's Pillow-style filters; exclude_outside=0 folds "
                                                    "the outside taps onto the edge pixels"),
    OpInfo("Resize", _resize_cases(10, (("nearest-up", {"mode": "nearest"}, (1, 2, 3, 4), [1, 1, 2, 1.5], None, None),
                                        ("nearest-down", {"mode": "nearest"}, (1, 2, 4, 5), [1, 1, 0.5, 0.6], None,
                                         None),
                                        ("linear-up", {"mode": "linear"}, (1, 2, 3, 4), [1, 1, 2, 1.5], None, None),
                                        ("linear-down", {"mode": "linear"}, (1, 2, 4, 5), [1, 1, 0.5, 0.6], None,
                                         None))),
           opsets=(10,), variant="opset10", note="asymmetric coordinates, nearest rounds down (ceil when downscaling)"),
    OpInfo("Resize", _resize_cases(11, (
        ("tf_half_pixel_for_nn", {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
         (1, 2, 4, 5), [1, 1, 1.7, 0.6], None, None),
        ("crop-linear", {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                         "extrapolation_value": 2.0}, (1, 2, 4, 5), None, [1, 2, 5, 3],
         [0, 0, -0.2, 0.3, 1, 1, 0.9, 1.4]),
        ("crop-nearest", {"mode": "nearest", "coordinate_transformation_mode": "tf_crop_and_resize"},
         (1, 2, 4, 5), None, [1, 2, 6, 4], [0, 0, 0.1, -0.3, 1, 1, 0.8, 0.9]))),
           opsets=(11,), variant="opset11-modes"),
    OpInfo("Resize", _resize_cases(13, (
        ("cubic-exclude-a", {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, (1, 2, 4, 5),
         [1, 1, 1.7, 0.6], None, None),
        ("cubic-crop", {"mode": "cubic", "coordinate_transformation_mode": "tf_crop_and_resize"}, (1, 2, 4, 5),
         [1, 1, 2, 1.5], None, [0, 0, 0.2, -0.1, 1, 1, 0.9, 1.2]),
        ("linear-2d", {"mode": "linear"}, (4, 5), [1.5, 0.8], None, None),
        ("cubic-2d", {"mode": "cubic"}, (4, 5), None, [6, 3], None),
        ("linear-3d-all-axes", {"mode": "linear"}, (3, 4, 5), [1.5, 0.5, 1.2], None, None),
        ("linear-5d", {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, (1, 2, 3, 4, 3),
         [1, 1, 1.5, 0.75, 2], None, None),
        ("nearest-5d-channels", {"mode": "nearest"}, (1, 2, 3, 2, 3), [1, 2, 1.5, 1, 2], None, None),
        ("nearest-rank1", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"}, (5,), [1.6], None, None),
        ("nearest-batch-axis", {"mode": "nearest"}, (2, 3, 4), [2, 1, 0.5], None, None),
        ("identity-scales", {"mode": "linear"}, (1, 2, 3, 4), [1, 1, 1, 1], None, None),
        ("identity-sizes", {"mode": "cubic"}, (1, 2, 3, 4), None, [1, 2, 3, 4], None),
        ("same-size-scale", {"mode": "linear"}, (1, 2, 10, 4), [1, 1, 1.05, 1], None, None))),
           opsets=(13,), variant="opset13-shapes", note="a scale whose output size equals the input's is a copy"),
    OpInfo("Resize", _resize_cases(18, (
        ("axes-scales", {"mode": "linear", "axes": [2, 3]}, (2, 2, 4, 5), [2, 0.6], None, None),
        ("axes-negative-sizes", {"mode": "nearest", "axes": [-1]}, (2, 2, 4, 5), None, [8], None),
        ("not_larger", {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
         (1, 2, 4, 5), None, [7, 7], None),
        ("not_smaller", {"mode": "cubic", "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
         (1, 2, 4, 5), None, [6, 6], None),
        ("not_larger-all-axes", {"mode": "nearest", "keep_aspect_ratio_policy": "not_larger"},
         (1, 2, 4, 5), None, [2, 4, 6, 6], None),
        ("crop-axes", {"mode": "linear", "axes": [3, 2], "coordinate_transformation_mode": "tf_crop_and_resize"},
         (1, 2, 4, 5), None, [4, 6], [0.1, -0.2, 0.9, 1.1]))),
           opsets=(18,), variant="opset18-axes-policy"),
    OpInfo("Resize", _resize_cases(19, (
        ("half_pixel_symmetric-nearest", {"mode": "nearest", "coordinate_transformation_mode": "half_pixel_symmetric"},
         (1, 2, 4, 5), [1, 1, 1.7, 0.6], None, None),
        ("half_pixel_symmetric-sizes", {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric",
                                        "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
         (1, 2, 4, 5), None, [7, 9], None))),
           opsets=(19,), variant="opset19-symmetric"),
    # ---------------------------------------------------------- normalisation, dropout
    OpInfo("BatchNormalization",
           (S("inference-4d", X=R(2, 3, 4, 3), scale=R(3, domain="positive"), B=R(3), mean=R(3, scale=0.1),
              var=R(3, domain="positive")),
            S("inference-2d", X=R(4, 3), scale=R(3, domain="positive"), B=R(3), mean=R(3, scale=0.1),
              var=R(3, domain="positive")),
            _with(S("training", {"training_mode": 1, "momentum": 0.8}, X=R(3, 2, 5), scale=R(2, domain="positive"),
                    B=R(2), mean=R(2, scale=0.1), var=R(2, domain="positive")),
                  outputs=["Y", "running_mean", "running_var"], graph_outputs=("Y",), wrt=("X", "scale", "B"))),
           opsets=(15,), attrs=({"epsilon": 1e-3},), ref=lambda a: _bn_ref(a),
           note="every opset, running statistics outputs in test_norm_grad.py"),
    OpInfo("InstanceNormalization", (S("3d", X=R(2, 3, 4), scale=R(3, domain="positive"), B=R(3)),
                                     S("4d", X=R(2, 2, 3, 3), scale=R(2, domain="positive"), B=R(2))),
           attrs=({"epsilon": 1e-3},),
           ref=lambda a: lambda x, s, b: _F().instance_norm(x, weight=s, bias=b,
                                                             eps=float(np.float32(a["epsilon"]))),),
    OpInfo("LayerNormalization", (S("last-axis", X=R(2, 3, 4), scale=R(4), B=R(4)),
                                  S("axis1-no-bias", {"axis": 1}, X=R(2, 3, 4), scale=R(3, 4))),
           attrs=({"epsilon": 1e-4},),
           ref=lambda a: lambda x, s, b=None: _F().layer_norm(x, tuple(x.shape[a.get("axis", -1) % x.dim():]), s, b,
                                                              float(np.float32(a["epsilon"]))),),
    OpInfo("GroupNormalization", (S("3d-2groups", {"num_groups": 2}, X=R(2, 6, 3), scale=R(6), bias=R(6)),
                                  S("4d-3groups", {"num_groups": 3}, X=R(2, 6, 2, 3), scale=R(6), bias=R(6)),
                                  S("4d-per-channel-groups", {"num_groups": 4}, X=R(1, 4, 2, 3), scale=R(4),
                                    bias=R(4))),
           opsets=(21,), attrs=({"epsilon": 1e-3},), ref=_group_norm_ref,
           note="opset 21: scale and bias per channel (onnx's checker refuses opsets 18-20 as deprecated)"),
    OpInfo("RMSNormalization", (S("last-axis", X=R(2, 3, 4), scale=R(4)),
                                S("axis1", {"axis": 1}, X=R(2, 3, 4), scale=R(3, 4)),
                                S("axis-2-broadcast-scale", {"axis": -2}, X=R(2, 3, 4), scale=R(4))),
           opsets=(23,), attrs=({"epsilon": 1e-3},),
           ref=lambda a: lambda x, s: _F().rms_norm(x, tuple(x.shape[a.get("axis", -1) % x.dim():]), None,
                                                    float(np.float32(a["epsilon"]))) * s),
    OpInfo("Attention", (S("4d", Q=R(2, 2, 3, 4), K=R(2, 2, 5, 4), V=R(2, 2, 5, 3)),
                         S("4d-grouped-heads", Q=R(1, 4, 3, 4), K=R(1, 2, 5, 4), V=R(1, 2, 5, 4)),
                         S("3d-heads", {"q_num_heads": 2, "kv_num_heads": 1}, Q=R(2, 3, 8), K=R(2, 5, 4),
                           V=R(2, 5, 6)),
                         S("causal-scale", {"is_causal": 1, "scale": 0.3}, Q=R(1, 2, 4, 4), K=R(1, 2, 4, 4),
                           V=R(1, 2, 4, 2)),
                         S("float-mask", Q=R(1, 2, 3, 4), K=R(1, 2, 5, 4), V=R(1, 2, 5, 3), attn_mask=R(3, 5)),
                         S("bool-mask", Q=R(1, 2, 3, 4), K=R(1, 2, 5, 4), V=R(1, 2, 5, 3),
                           attn_mask=_bool([[True, False, True, True, False], [False, False, True, False, False],
                                            [True, True, True, True, True]])),
                         _with(S("softcap", {"softcap": 2.0}, Q=R(1, 2, 3, 4), K=R(1, 2, 5, 4), V=R(1, 2, 5, 3),
                                 attn_mask=R(1, 1, 3, 5)), ref=False),
                         _with(S("kv-cache", Q=R(1, 2, 3, 4), K=R(1, 2, 4, 4), V=R(1, 2, 4, 3), attn_mask=None,
                                 past_key=R(1, 2, 2, 4), past_value=R(1, 2, 2, 3)),
                               outputs=["Y", "present_key", "present_value"], ref=False),
                         _with(S("kv-cache-causal-grouped", {"is_causal": 1}, Q=R(1, 4, 3, 4), K=R(1, 2, 3, 4),
                                 V=R(1, 2, 3, 4), attn_mask=None, past_key=R(1, 2, 2, 4), past_value=R(1, 2, 2, 4)),
                               outputs=["Y", "present_key", "present_value"], ref=False),
                         _with(S("kv-cache-3d-mask-y-only", {"q_num_heads": 2, "kv_num_heads": 1}, Q=R(2, 3, 8),
                                 K=R(2, 4, 4), V=R(2, 4, 6), attn_mask=R(3, 6), past_key=R(2, 1, 2, 4),
                                 past_value=R(2, 1, 2, 6)), outputs=["Y", "present_key", "present_value"],
                               graph_outputs=("Y",), ref=False),
                         _with(S("kv-cache-present-only", Q=R(1, 2, 3, 4), K=R(1, 2, 4, 4), V=R(1, 2, 4, 3),
                                 attn_mask=None, past_key=R(1, 2, 2, 4), past_value=R(1, 2, 2, 3)),
                               outputs=["Y", "present_key", "present_value"],
                               graph_outputs=("present_key", "present_value"),
                               wrt=("K", "V", "past_key", "past_value"), ref=False),
                         *(_with(S(f"qk-mode{m}-{kind}", {"qk_matmul_output_mode": m, **attrs}, Q=R(1, 2, 3, 4),
                                   K=R(1, 2, 3, 4), V=R(1, 2, 3, 3), attn_mask=R(3, 5), past_key=R(1, 2, 2, 4),
                                   past_value=R(1, 2, 2, 3)),
                                 outputs=["Y", "present_key", "present_value", "qk"], ref=False)
                           for m in range(4)
                           for kind, attrs in (("softcap-causal", {"softcap": 2.0, "is_causal": 1}), ("plain", {}))
                           if (m, kind) != (2, "softcap-causal")),  # -inf in the float64 reference: test_norm_grad
                         _with(S("qk-mode3-only-bool-mask", {"qk_matmul_output_mode": 3}, Q=R(1, 2, 3, 4),
                                 K=R(1, 2, 5, 4), V=R(1, 2, 5, 3),
                                 attn_mask=_bool([[True, False, True, True, False], [False, False, False, False, False],
                                                  [True, True, True, True, True]]), past_key=R(1, 2, 0, 4),
                                 past_value=R(1, 2, 0, 3)),
                               outputs=["Y", "present_key", "present_value", "qk"], graph_outputs=("qk",),
                               wrt=("Q", "K"), ref=False)),
           opsets=(23,), ref=_attention_ref,
           note="torch has no softcap, KV cache or qk output: finite differences only there; qk_matmul_output as "
                "onnxruntime computes it"),
    OpInfo("LRN", (S("C5", X=R(1, 5, 3, 3)),), opsets=(13,),
           attrs=({"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 1.0}, {"size": 5, "alpha": 2.0, "beta": 0.5, "bias": 2.0}),
           ref=_lrn_ref,
           note="onnxruntime runs only 4-D inputs and odd sizes; the others are checked with numpy in test_norm_grad.py"),
    OpInfo("Dropout", (_with(S("attr-ratio", {"ratio": 0.3}, X=R(4, 3)), opsets=(7, 10)),
                       _with(S("inference", X=R(4, 3), ratio=constant(np.array(0.3, F32)),
                               training_mode=constant(np.array(False))), opsets=(13,)),
                       _with(S("training-ratio0", X=R(4, 3), ratio=constant(np.array(0.0, F32)),
                               training_mode=constant(np.array(True))), outputs=["Y", "mask"],
                             graph_outputs=("Y",), opsets=(13,))),
           opsets=(7, 10, 13), ref=lambda a: lambda x, *rest: x * 1,
           note="random masks (ratio > 0 in training) are compared with Y' * mask / (1 - ratio) in "
                "test_norm_grad.py: finite differences do not apply"),
    # ---------------------------------------------------------- loss
    OpInfo("SoftmaxCrossEntropyLoss",
           (S("2d", X=R(3, 4), labels=I64([1, 0, 3])),
            S("2d-weighted", X=R(3, 4), labels=I64([1, 0, 3]), weights=R(4, domain="positive")),
            S("spatial", X=R(2, 4, 3), labels=I64([[1, 0, 3], [2, 2, 1]])),
            _with(S("log-prob-output", X=R(3, 4), labels=I64([1, 0, 3])), outputs=["Y", "log_prob"])),
           opsets=(13,), attrs=({}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 1}),
           ref=_sce_ref, note="the grid of reduction x weights x ignore_index x spatial in test_training.py"),
]


def _flatten_axis(a, rank):
    axis = a.get("axis", 1)
    return axis + rank if axis < 0 else axis


def _unsqueezed(shape, a, axes_input):
    axes = a.get("axes") if axes_input is None else _ints(axes_input)
    rank = len(shape) + len(axes)
    for ax in sorted(v % rank for v in axes):
        shape.insert(ax, 1)
    return shape
