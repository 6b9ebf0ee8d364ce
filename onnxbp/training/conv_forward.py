"""The forward of weight-bound convolutions in a training step, as one Gemm over the batch.

In a training step the weights are graph inputs (the optimizer updates them),
so onnxruntime cannot prepack them or use its NCHWc kernels, and its Conv runs
one im2col and one GEMM per image.  Where the weight is large and the maps are
small (ResNet's and MobileNet's last stages) that GEMM is a thin one repeated N
times: on ResNet-18's 512-channel 2x2 maps at batch 8, 10 ms against 3.4 ms for
the same arithmetic as one GEMM over the whole batch.

So a trainable group-1 Conv that is weight-bound by the rule the backward uses
(:func:`onnxbp.rules.conv.weight_bound`: batch times padded map no larger than
the output channels) is written as the seeds' matrix form of the convolution
(seed 001 section 2.4.1, the im2col view; section 1.2, ``Y = W . Xcol``)::

    Xcol(C*K, N*out) = Concat_r Reshape(Slice_r(Pad(Transpose(X, (1, 0, ...)))), (C, N*out))
    Y = Transpose(Reshape(Gemm(Reshape(W, (M, C*K)), Xcol, B as (M, 1)), (M, N, out...)), (1, 0, ...))

with the strided slices of :func:`onnxbp.rules.conv_arith.kernel_offset_slices`.
Its backward is then what the engine's ordinary rules give for these ops: the
weight gradient is one Gemm with the same ``Xcol`` (kept from the forward, not
rebuilt), the input gradient a Gemm with ``W^T`` and the Slices' adjoints.  The
values are the convolution's up to float32 summation order.
"""

from __future__ import annotations

import logging
from typing import Iterable

import onnx

from ..rules import conv_arith as ca
from ..rules.conv import weight_bound
from ..writer import GraphWriter

log = logging.getLogger(__name__)


def lower_weight_bound_convs(m: onnx.ModelProto, trainable: Iterable[str], infos: dict) -> int:
    """Rewrite, in place, the weight-bound trainable Convs of ``m``'s top graph (see the module
    docstring); return how many.  ``infos``: tensor infos of ``m`` (shapeinfo.infer)."""
    trainable = set(trainable)
    inits = {t.name: t for t in m.graph.initializer}
    w = GraphWriter.for_model(m, "train/conv", "onnxbp.training: weight-bound Conv as one Gemm", infos=infos)
    out_nodes = []
    count = 0
    for node in m.graph.node:
        plan = _plan(node, trainable, inits, infos)
        if plan is None:
            out_nodes.append(node)
            continue
        _emit(w.scoped(f"train/conv/{node.name or node.output[0]}"), node, *plan)
        out_nodes.extend(w.take_nodes())
        count += 1
    if count:
        del m.graph.node[:]
        m.graph.node.extend(out_nodes)
        log.info("training step: %d weight-bound Conv forwards written as one Gemm over the batch", count)
    return count


def _plan(node, trainable, inits, infos):
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x, wt = node.input[0], node.input[1]
    if wt not in trainable or wt not in inits:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("group", 1)) != 1:
        return None
    wdims = [int(d) for d in inits[wt].dims]
    xi = infos.get(x)
    if xi is None or xi.shape is None or len(xi.shape) != len(wdims) or len(wdims) < 3:
        return None
    n = list(xi.shape[2:])
    if not all(isinstance(v, int) for v in n) or xi.shape[1] != wdims[1]:
        return None
    nsp = len(n)
    k = [int(v) for v in attrs.get("kernel_shape", wdims[2:])]
    s = [int(v) for v in attrs.get("strides", [1] * nsp)]
    d = [int(v) for v in attrs.get("dilations", [1] * nsp)]
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ca.AUTO_PAD_MODES or k != wdims[2:]:
        return None
    pads = ca.resolve_auto_pad(auto_pad, n, k, s, d, attrs.get("pads") if auto_pad == "NOTSET" else None)
    out = [ca.conv_out_size(n[i], k[i], s[i], d[i], pads[i], pads[nsp + i]) for i in range(nsp)]
    if any(o < 1 for o in out):
        return None
    padded = [n[i] + pads[i] + pads[nsp + i] for i in range(nsp)]
    if not weight_bound(xi.shape[0], padded, wdims[0]):
        return None
    return wdims, k, s, d, pads, out, padded


def _emit(w: GraphWriter, node, wdims, k, s, d, pads, out, padded) -> None:
    x, wt = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    m_out, c = wdims[0], wdims[1]
    nsp = len(k)
    sp = list(range(2, 2 + nsp))
    xt = w.transpose(x, [1, 0] + sp)  # (C, N, n...)
    xt = w.pad(xt, [0, 0] + pads[:nsp] + [0, 0] + pads[nsp:])
    strided = any(v > 1 for v in s)
    pieces = []
    for _offs, starts, ends in ca.kernel_offset_slices(k, s, d, out):
        whole = not strided and starts == [0] * nsp and ends == padded
        piece = xt if whole else w.slice(xt, starts, ends, sp, s if strided else None)  # (C, N, out...)
        pieces.append(w.op("Reshape", piece, w.ints([c, -1])))
    cols = pieces[0] if len(pieces) == 1 else w.op("Reshape", w.op("Concat", *pieces, axis=1),
                                                    w.ints([c * len(pieces), -1]))  # (C*K, N*out)
    w2 = w.op("Reshape", wt, w.ints([m_out, -1]))  # (M, C*K), rows in W's (c, r) order
    bias = w.op("Reshape", b, w.ints([m_out, 1])) if b else None
    y2 = w.op("Gemm", w2, cols, bias)  # (M, N*out)
    y = w.op("Reshape", y2, w.ints([m_out, -1] + out))
    w.op("Transpose", y, perm=[1, 0] + sp, out=node.output[0])
