"""Export a zoo network to ONNX with either torch exporter.

TorchScript exporter (``dynamo=False``)
    Symbolic batch via ``dynamic_axes`` (dim name ``N``), ``do_constant_folding=False``
    and ``training=TrainingMode.PRESERVE`` on the eval()-mode model.  Why: with
    ``training=EVAL`` (the default for an eval model) the exporter's eval
    peephole pass folds BatchNormalization into the preceding Conv, so the
    ONNX weights no longer equal any torch parameter; PRESERVE keeps the
    model in eval mode (Dropout becomes Identity, BatchNormalization uses the
    running statistics) but skips that fusion, and without constant folding
    every initializer keeps its ``state_dict`` name (``layers.0.conv1.0.weight``).
Dynamo exporter (``dynamo=True``, needs ``onnxscript``)
    ``dynamic_shapes`` with a ``Dim`` for the batch; opset 18 by default.
    ``exporter="dynamo"`` passes ``optimize=False``: the raw graph, with its
    Identity chains, Constant nodes and shape subgraphs, and every parameter
    an initializer named after it.  ``exporter="dynamo-opt"`` passes
    ``optimize=True``: onnxscript's optimizer folds BatchNormalization into
    the Conv weights (new values under the Conv weight's name plus a new
    ``<weight>_bias``), so only the unfolded parameters and the input
    gradient can be compared with torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

INPUT, OUTPUT = "input", "logits"


def export_torchscript(model: torch.nn.Module, shape, opset: int = 17) -> onnx.ModelProto:
    x = torch.randn(*shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(model: torch.nn.Module, shape, opset: int = 18, optimize: bool = False) -> onnx.ModelProto:
    x = torch.randn(2, *shape[1:])
    batch = torch.export.Dim("N", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                 output_names=[OUTPUT], dynamic_shapes=({0: batch},), optimize=optimize,
                                 verbose=False, report=False)
    return prog.model_proto


def export(model, shape, exporter: str = "torchscript", opset: int = 17) -> onnx.ModelProto:
    if exporter == "torchscript":
        return export_torchscript(model, shape, opset)
    if exporter == "dynamo":
        return export_dynamo(model, shape, opset, optimize=False)
    if exporter == "dynamo-opt":
        return export_dynamo(model, shape, opset, optimize=True)
    raise ValueError(f"unknown exporter {exporter!r}; use 'torchscript', 'dynamo' or 'dynamo-opt'")


def param_map(onnx_model: onnx.ModelProto, torch_model: torch.nn.Module) -> dict:
    """``{onnx initializer name: (torch parameter name, transposed)}`` for every float
    initializer that is a torch parameter: by name, else by value (also transposed,
    for Linear weights an exporter stored as W^T for MatMul).  Buffers (BN running
    stats), exporter constants and parameters whose values an exporter
    changed (BN folded into Conv) are left out.
    """
    params = {k: v.detach().numpy() for k, v in torch_model.named_parameters()}
    out = {}
    taken = set()
    inits = [t for t in onnx_model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    for t in inits:
        if t.name in params and np.array_equal(numpy_helper.to_array(t), params[t.name]):
            out[t.name] = (t.name, False)
            taken.add(t.name)
    for t in inits:
        if t.name in out:
            continue
        arr = numpy_helper.to_array(t)
        for k, v in params.items():
            if k in taken:
                continue
            if arr.shape == v.shape and np.array_equal(arr, v):
                out[t.name] = (k, False)
                taken.add(k)
                break
            if arr.ndim == 2 and arr.shape == v.T.shape and np.array_equal(arr, v.T):
                out[t.name] = (k, True)
                taken.add(k)
                break
    return out
