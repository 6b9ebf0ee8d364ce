"""Resize: the gradient of a separable linear resampling.

With modes ``nearest``, ``linear`` and ``cubic`` every output element of
Resize is a fixed weighted sum of input elements, and the weights factor over
the axes (rules/resize_arith.py, which computes them exactly as onnxruntime's
kernel does):

    Y[i_0, ..., i_{r-1}] = sum_m A_0[i_0, m_0] ... A_{r-1}[i_{r-1}, m_{r-1}] X[m_0, ..., m_{r-1}]
                           (+ extrapolation_value where tf_crop_and_resize samples outside X)

so Y is linear in X and the vector-Jacobian product is the adjoint, applied one
axis at a time:

    X' = Y' x_0 A_0^T x_1 A_1^T ... x_{r-1} A_{r-1}^T

``A_k`` (out_k x in_k) is a build-time constant; axes whose matrix is the
identity (scale 1, the batch and channels) are skipped.  Each remaining axis
is one MatMul against a constant: the last axis ``Y' @ A``, the one before it
``A^T @ Y'`` (broadcast over the leading axes, no Transpose), and an earlier
axis ``k`` after a free Reshape to ``(d_0..d_{k-1}, out_k, -1)`` (Reshape's 0
copies the leading dims, so a symbolic batch stays symbolic); axes are
processed last first so one final ``Reshape(., Shape(X))`` restores the
shape.  A dense MatMul costs ``out_k * in_k`` per line where the sparse
matrix has 1, 2 or 4 entries per row; for the sizes Resize sees in networks
(feature maps up to a few hundred per axis) one BLAS call beats the index
tensors a scatter formulation would build at run time.

What must be known at build time: the mode attributes, the ``scales`` or
``sizes`` input as a constant (or, for ``sizes`` computed at run time, the
output dims from shape inference) and ``roi`` for tf_crop_and_resize, and the
input sizes of the axes that are resized.  ``antialias=1`` (opset 18+, linear
and cubic) is the same linear map with wider, normalised filters
(``resize_arith.antialias_axis_matrix``, onnxruntime's Pillow-style kernel).
Refused with a one-line error: runtime ``scales``, runtime ``roi``, and a
resized axis whose input size is not static.  roi, scales and sizes get no gradient.
"""

from __future__ import annotations

import numpy as np

from ..registry import LINEAR, register_gradient
from . import resize_arith as ra


def _const_or_none(g, name):
    if name is None:
        return None
    value = g.known_value(name)  # a constant, or sizes computed from static shapes
    return None if value is None else np.asarray(value).reshape(-1)


def _is_empty(g, name) -> bool:
    """An omitted input, or one whose static shape is (0,)."""
    if name is None:
        return True
    value = g.known_value(name)
    if value is not None:
        return np.asarray(value).size == 0
    shape = g.shape(name)
    return shape is not None and len(shape) == 1 and shape[0] == 0


class _Resize:
    """Static facts of one Resize node: per axis ``(n_in, n_out, scale)`` and the roi."""

    def __init__(self, g):
        self.g = g
        opset = g.opset
        self.x, self.y = g.input(0), g.output(0)
        self.rank = g.rank(self.x)
        self.mode = g.attr("mode", "nearest")
        if self.mode not in ra.MODES:
            g.fail(f"mode={self.mode!r} is unknown; supported: {', '.join(ra.MODES)}")
        self.coord = g.attr("coordinate_transformation_mode", "half_pixel") if opset >= 11 else "asymmetric"
        if self.coord not in ra.COORD_MODES:
            g.fail(f"coordinate_transformation_mode={self.coord!r} is unknown; supported: {', '.join(ra.COORD_MODES)}")
        self.nearest = g.attr("nearest_mode", "round_prefer_floor") if opset >= 11 else "simple"
        if self.nearest not in ra.NEAREST_MODES[:-1] + (("simple",) if opset < 11 else ()):
            g.fail(f"nearest_mode={self.nearest!r} is unknown; supported: {', '.join(ra.NEAREST_MODES[:-1])}")
        self.cubic_a = float(g.attr("cubic_coeff_a", -0.75))
        self.exclude = int(g.attr("exclude_outside", 0))
        self.policy = g.attr("keep_aspect_ratio_policy", "stretch") if opset >= 18 else "stretch"
        if self.policy not in ra.POLICIES:
            g.fail(f"keep_aspect_ratio_policy={self.policy!r} is unknown; supported: {', '.join(ra.POLICIES)}")
        self.antialias = opset >= 18 and bool(int(g.attr("antialias", 0)))
        if self.antialias and self.mode == "nearest":
            g.fail("antialias=1 with mode 'nearest' is not defined (onnxruntime refuses it); "
                   "supported: antialias=1 with modes linear and cubic")
        axes = g.attr("axes") if opset >= 18 else None
        if axes is not None:
            axes = [int(a) for a in axes]
            if any(not -self.rank <= a < self.rank for a in axes) or len({a % self.rank for a in axes}) != len(axes):
                g.fail(f"axes={axes} are out of range or repeated for input rank {self.rank}")
            axes = [a % self.rank for a in axes]
        self.axes = axes
        self.in_dims = list(g.shape(self.x))
        roi_name = g.input(1) if opset >= 11 else None
        scales_name = g.input(2) if opset >= 11 else g.input(1)
        sizes_name = g.input(3) if opset >= 11 else None
        self.roi = self._roi(roi_name)
        if not _is_empty(g, scales_name):
            self._from_scales(scales_name)
        elif sizes_name is not None:
            self._from_sizes(sizes_name)
        else:
            g.fail("neither scales nor sizes is given")
        self._check_output()

    # ----------------------------------------------------------- inputs
    def _expand(self, values, default, what):
        if self.axes is None:
            if len(values) != self.rank:
                self.g.fail(f"{what} has {len(values)} values for input rank {self.rank}")
            return list(values)
        if len(values) != len(self.axes):
            self.g.fail(f"{what} has {len(values)} values for axes={self.axes}")
        return ra.expand_axes(values, self.axes, self.rank, None,
                              fill=default if isinstance(default, list) else [default] * self.rank)

    def _roi(self, name):
        if self.coord != "tf_crop_and_resize":
            return [(0.0, 1.0)] * self.rank
        value = _const_or_none(self.g, name)
        if value is None or value.size == 0:
            self.g.fail(f"coordinate_transformation_mode=tf_crop_and_resize needs the roi input as a build-time "
                        f"constant (initializer or Constant); {name!r} is computed at run time or missing")
        n = len(self.axes) if self.axes is not None else self.rank
        if value.size != 2 * n:
            self.g.fail(f"roi has {value.size} values; expected {2 * n}")
        starts = self._expand([float(v) for v in value[:n]], [0.0] * self.rank, "roi")
        ends = self._expand([float(v) for v in value[n:]], [1.0] * self.rank, "roi")
        return list(zip(starts, ends))

    def _static(self, i, why):
        d = self.in_dims[i]
        if not isinstance(d, int):
            what = f"symbolic ({d!r})" if isinstance(d, str) else "unknown"
            self.g.fail(f"dim {i} of input {self.x!r} is {what}, but {why}; the Resize gradient needs the input "
                        f"size of every resized axis static (other dims, such as a symbolic batch, may stay symbolic)")
        return d

    def _from_scales(self, name):
        value = _const_or_none(self.g, name)
        if value is None:
            self.g.fail(f"the scales input {name!r} is computed at run time; the Resize gradient needs it as a "
                        f"build-time constant (or give sizes)")
        scales = self._expand([float(v) for v in value], 1.0, "scales")
        self.scales, self.out_dims = [], []
        for i, s in enumerate(scales):
            if ra.scale_is_one(s):
                self.scales.append(1.0)
                self.out_dims.append(self.in_dims[i])
                continue
            n = self._static(i, f"scales resizes that axis by {s:g}")
            out, sc = ra.output_shape([n], scales=[s])
            self.scales.append(sc[0])
            self.out_dims.append(out[0])

    def _from_sizes(self, name):
        value = _const_or_none(self.g, name)
        if value is not None:
            sizes = self._expand([int(v) for v in value], self.in_dims, "sizes")
            chosen = self.axes if self.axes is not None else list(range(self.rank))
            n = [self._static(i, f"sizes sets it to {sizes[i]}") if i in chosen else 1 for i in range(self.rank)]
            out, sc = ra.output_shape_axes(n, chosen, sizes=[sizes[i] for i in chosen], policy=self.policy)
            self.out_dims = [out[i] if i in chosen else self.in_dims[i] for i in range(self.rank)]
            self.scales = [sc[i] if i in chosen else 1.0 for i in range(self.rank)]
            return
        # sizes computed at run time (exporters' Concat(Shape(X)[:2], [h, w])): the inferred output dims
        if self.policy != "stretch":
            self.g.fail(f"keep_aspect_ratio_policy={self.policy} needs the sizes input {name!r} as a build-time "
                        f"constant; it is computed at run time")
        y_dims = self.g.shape(self.y)
        if y_dims is None or len(y_dims) != self.rank:
            self.g.fail(f"the sizes input {name!r} is computed at run time and the output's shape is not "
                        f"inferred; the Resize gradient needs constant sizes or static output dims")
        self.out_dims, self.scales = [], []
        for i, (d_in, d_out) in enumerate(zip(self.in_dims, y_dims)):
            if d_in is not None and d_in == d_out:
                self.out_dims.append(d_in)
                self.scales.append(1.0)
                continue
            if not isinstance(d_out, int):
                self.g.fail(f"the sizes input {name!r} is computed at run time and output dim {i} is not "
                            f"static after shape inference ({d_out!r}); the Resize gradient needs constant sizes "
                            f"or static output dims on the resized axes")
            n = self._static(i, f"the output has {d_out} there")
            out, sc = ra.output_shape([n], sizes=[d_out])
            self.out_dims.append(out[0])
            self.scales.append(sc[0])

    def _check_output(self):
        y_dims = self.g.shape(self.y)
        if y_dims is None or len(y_dims) != self.rank:
            return
        for i, (declared, ours) in enumerate(zip(y_dims, self.out_dims)):
            if isinstance(declared, int) and isinstance(ours, int) and declared != ours:
                self.g.fail(f"output {self.y!r} is declared/inferred with {declared} positions on axis {i}, but "
                            f"onnxruntime computes {ours}; the upstream gradient would get the wrong shape")

    # ----------------------------------------------------------- matrices
    def matrices(self) -> dict:
        """``{axis: A}`` for the axes whose matrix is not the identity (empty: Resize is a copy)."""
        if all(a == b for a, b in zip(self.in_dims, self.out_dims)):
            return {}  # onnxruntime copies when no dim changes
        out = {}
        for k in range(self.rank):
            if ra.scale_is_one(self.scales[k]) and not (self.mode == "nearest" and self.rank == 1):
                continue
            n_in = self._static(k, "that axis is resized")
            if self.antialias:
                A = ra.antialias_axis_matrix(n_in, int(self.out_dims[k]), self.scales[k], mode=self.mode,
                                             coord=self.coord, cubic_a=self.cubic_a, exclude_outside=self.exclude,
                                             roi=self.roi[k])
                if not ra.is_identity(A):
                    out[k] = A
                continue
            A = ra.axis_matrix(n_in, int(self.out_dims[k]), self.scales[k], mode=self.mode, coord=self.coord,
                               nearest_mode=self.nearest, cubic_a=self.cubic_a, exclude_outside=self.exclude,
                               roi=self.roi[k], rank1=self.rank == 1)
            if not ra.is_identity(A):
                out[k] = A
        return out


@register_gradient("Resize", since=10, smoothness=LINEAR, non_differentiable_inputs=(1, 2, 3),
                   lowering="X'=Y' contracted with A_k^T along each resized axis k (MatMul against a build-time "
                            "constant A_k, onnxruntime's interpolation weights; Reshape for axes before the last two)")
def resize_grad(g):
    """Resize is linear in X: ``Y = X x_0 A_0 ... x_{r-1} A_{r-1}``, so ``X' = Y' x_0 A_0^T ... x_{r-1} A_{r-1}^T``."""
    info = _Resize(g)
    x = info.x
    rank = info.rank
    t = g.grad_output(0)
    merged = False
    for k, A in sorted(info.matrices().items(), reverse=True):
        out_k = A.shape[0]
        if k == rank - 1:
            t = g.op("MatMul", t, g.const(A, like=x))  # (..., out) @ (out, in)
        elif k == rank - 2:
            t = g.op("MatMul", g.const(A.T, like=x), t)  # (in, out) @ (..., out, W)
        else:
            t = g.op("Reshape", t, g.ints([0] * k + [out_k, -1]))  # (d_0..d_{k-1}, out_k, rest)
            t = g.op("MatMul", g.const(A.T, like=x), t)
            merged = True
    if merged:
        t = g.op("Reshape", t, g.op("Shape", x))
    return [t] + [None] * (len(g.inputs) - 1)
