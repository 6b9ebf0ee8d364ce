"""Run training-step models with onnxruntime, parameters kept as OrtValues.

Two sets of OrtValues hold the carried tensors (parameters, optimizer state,
running statistics).  Step k reads set A and writes set B through IOBinding;
step k+1 reads B and writes A.  Nothing is copied back to numpy between
steps; only the scalar loss is read.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..modelio import ModelLike, load_model, save_model_atomic
from .errors import DataError, TrainingError
from .losses import check_targets
from .optimizers import AdamW
from .step import StepModel, build_step_model

log = logging.getLogger(__name__)


def session_options(threads: Optional[int] = None, mem_pattern: bool = True) -> ort.SessionOptions:
    """CPU session options; ``mem_pattern=False`` for training-step sessions.

    onnxruntime's memory pattern plans one block for all intermediate tensors
    of a run.  For a training step (forward activations kept for the backward,
    then the backward's temporaries) that block is about twice the live
    working set: a CIFAR ResNet-18 step at batch 32 needs 544 MiB above the
    built session with it and 275 MiB without, at the same speed (interleaved
    medians 1584 vs 1575 ms) and with bit-identical results
    (benchmarks/bench_train_memory.py).
    """
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _dims(vi):
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _np_dtype(vi):
    return helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)


class Trainer:
    """Train a forward ONNX model with plain onnxruntime.

    ``Trainer(model, loss="cross_entropy", optimizer=AdamW(), requires_grad=None,
    frozen_params=None, threads=None, seed=None)``; then :meth:`train_step`,
    :meth:`evaluate` (inference mode: BN running stats, no dropout),
    :meth:`state_dict` / :meth:`load_state_dict`, :meth:`export`.
    """

    def __init__(self, model: ModelLike, *, loss: str = "cross_entropy", optimizer=None,
                 requires_grad: Optional[Sequence[str]] = None, frozen_params: Optional[Sequence[str]] = None,
                 output: Optional[str] = None, threads: Optional[int] = None, seed: Optional[int] = None,
                 bn_stats: str = "torch", **grad_options):
        self.forward = load_model(model)
        self.source = model if isinstance(model, (str, os.PathLike)) else None
        self.optimizer = optimizer if optimizer is not None else AdamW()
        self.step_model: StepModel = build_step_model(
            self.forward, loss=loss, optimizer=self.optimizer, requires_grad=requires_grad,
            frozen_params=frozen_params, output=output, bn_stats=bn_stats, dropout_seed=seed, **grad_options)
        self.spec = self.step_model.spec
        if len(self.spec.data_inputs) != 1:
            raise TrainingError(f"Trainer feeds exactly one data input; the model has "
                                f"{len(self.spec.data_inputs)} ({', '.join(self.spec.data_inputs)})")
        self.input_name = self.spec.data_inputs[0]
        self.session = ort.InferenceSession(self.step_model.model.SerializeToString(),
                                            session_options(threads, mem_pattern=False),
                                            providers=["CPUExecutionProvider"])
        self.eval_model = self._make_eval_model()
        self.eval_session = ort.InferenceSession(self.eval_model.SerializeToString(), session_options(threads),
                                                 providers=["CPUExecutionProvider"])
        step_inputs = {i.name: i for i in self.step_model.model.graph.input}
        x_vi = step_inputs[self.input_name]
        self.input_dims = _dims(x_vi)
        self.input_dtype = _np_dtype(x_vi)
        out_vi = next(o for o in self.forward.graph.output if o.name == self.spec.output)
        self.output_dims = _dims(out_vi)
        self.target_dtype = _np_dtype(step_inputs[self.spec.target]) if self.spec.target else None
        self.step_count = 0
        self._carried = list(self.spec.updates)
        self._a = {}
        self._b = {}
        for name in self._carried:
            arr = np.ascontiguousarray(self.step_model.initial[name])
            self._a[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
            self._a[name].update_inplace(arr)
            self._b[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
        self._loss_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32)
        self._binding = self.session.io_binding()
        self._eval_binding = self.eval_session.io_binding()

    # ------------------------------------------------------------------ models
    def _make_eval_model(self) -> onnx.ModelProto:
        """The forward model with carried tensors as inputs (inference-mode BN and Dropout)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.forward)
        carried = set(self.spec.updates)
        keep, moved = [], []
        for t in m.graph.initializer:
            (moved if t.name in carried else keep).append(t)
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        existing = {i.name for i in m.graph.input}
        for t in moved:
            if t.name in existing:
                continue
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        del m.graph.output[:]
        m.graph.output.extend([o for o in self.forward.graph.output if o.name == self.spec.output])
        return m

    # ------------------------------------------------------------------- steps
    def check_batch(self, x: np.ndarray, y: Optional[np.ndarray] = None, what: str = "batch") -> tuple:
        """Validate and convert a batch; raise :class:`DataError` with one line."""
        x = np.asarray(x)
        dims = self.input_dims
        if dims is not None:
            if x.ndim != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, x.shape)):
                raise DataError(f"{what}: inputs have shape {tuple(x.shape)}, but model input "
                                f"{self.input_name!r} expects {tuple(d if isinstance(d, int) else '?' for d in dims)}")
        if np.issubdtype(x.dtype, np.floating) or np.issubdtype(self.input_dtype, np.floating):
            if not np.all(np.isfinite(x)):
                raise DataError(f"{what}: inputs contain NaN or infinite values")
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if y is not None:
            y = np.asarray(y)
            if y.shape[:1] != x.shape[:1]:
                raise DataError(f"{what}: {x.shape[0]} inputs but {y.shape[0] if y.ndim else 0} targets")
            n_classes = self.output_dims[1] if self.spec.loss_kind == "cross_entropy" else None
            check_targets(self.spec.loss_kind, y, n_classes, what=what)
            if self.spec.loss_kind != "cross_entropy" and self.output_dims is not None:
                od = self.output_dims
                if y.ndim != len(od) or any(isinstance(d, int) and d != s for d, s in zip(od, y.shape)):
                    raise DataError(f"{what}: targets have shape {tuple(y.shape)}, but the model output "
                                    f"{self.spec.output!r} is {tuple(d if isinstance(d, int) else '?' for d in od)}")
            y = np.ascontiguousarray(y, dtype=self.target_dtype)
        return x, y

    def train_step(self, x: np.ndarray, y: Optional[np.ndarray] = None, lr: float = 1e-3,
                   check: bool = False) -> float:
        """One optimizer step on a batch; returns the loss (before the update)."""
        if check:
            x, y = self.check_batch(x, y)
        else:
            x = np.ascontiguousarray(x, dtype=self.input_dtype)
            if y is not None:
                y = np.ascontiguousarray(y, dtype=self.target_dtype)
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(self.input_name, x)
        if self.spec.target:
            b.bind_cpu_input(self.spec.target, y)
        b.bind_cpu_input(self.spec.lr, np.asarray(lr, dtype=np.float32))
        if self.spec.step:
            b.bind_cpu_input(self.spec.step, np.asarray(self.step_count + 1, dtype=np.int64))
        for name, out in self.spec.updates.items():
            b.bind_ortvalue_input(name, self._a[name])
            b.bind_ortvalue_output(out, self._b[name])
        b.bind_ortvalue_output(self.spec.loss, self._loss_value)
        self.session.run_with_iobinding(b)
        self._a, self._b = self._b, self._a
        self.step_count += 1
        return float(self._loss_value.numpy())

    def evaluate(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Model outputs in inference mode (running BN statistics, no dropout)."""
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        outs = []
        b = self._eval_binding
        for i in range(0, max(len(x), 1), batch_size):
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            b.bind_cpu_input(self.input_name, x[i:i + batch_size])
            for name in self._eval_inputs():
                b.bind_ortvalue_input(name, self._a[name])
            b.bind_output(self.spec.output, "cpu")
            self.eval_session.run_with_iobinding(b)
            outs.append(b.copy_outputs_to_cpu()[0])
        return np.concatenate(outs, axis=0) if outs else np.zeros((0,))

    def _eval_inputs(self):
        if not hasattr(self, "_eval_names"):
            names = {i.name for i in self.eval_model.graph.input}
            self._eval_names = [n for n in self._carried if n in names]
        return self._eval_names

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        logits = self.evaluate(x)
        return float(np.mean(np.argmax(logits, axis=1) == np.asarray(y)))

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss in inference mode (numpy, float64)."""
        out = self.evaluate(x).astype(np.float64)
        kind = self.spec.loss_kind
        if kind == "cross_entropy":
            z = out - out.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            return float(-np.mean(np.take_along_axis(logp, np.asarray(y)[:, None], axis=1)))
        if kind == "mse":
            return float(np.mean((out - y) ** 2))
        if kind == "l1":
            return float(np.mean(np.abs(out - y)))
        return float(np.mean(out))

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Numpy copies of every carried tensor, plus ``step``."""
        d = {name: np.array(self._a[name].numpy(), copy=True) for name in self._carried}
        return {"tensors": d, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        missing = [n for n in self._carried if n not in tensors]
        if missing:
            raise TrainingError(f"the saved state lacks {missing[0]!r} (it was saved for another model, "
                                f"optimizer or set of trainable parameters)")
        for name in self._carried:
            arr = np.ascontiguousarray(tensors[name])
            want = self.step_model.initial[name]
            if arr.shape != want.shape:
                raise TrainingError(f"the saved state has {name!r} with shape {arr.shape}, the model needs {want.shape}")
            self._a[name].update_inplace(arr.astype(want.dtype))
        self.step_count = int(state.get("step", 0))

    def parameters(self) -> dict:
        """Current values of the forward model's trained tensors (params and BN running stats)."""
        names = list(self.spec.params) + list(self.spec.buffers)
        return {n: np.array(self._a[n].numpy(), copy=True) for n in names}

    def to_model(self) -> onnx.ModelProto:
        """The forward model with the trained weights as initializers (a normal inference model)."""
        return export_model(self.forward, self.parameters())

    def export(self, path, source=None):
        return save_model_atomic(self.to_model(), path, source=source if source is not None else self.source)


def export_model(forward: ModelLike, weights: dict) -> onnx.ModelProto:
    """Write ``weights`` into ``forward``'s initializers (same names, types and shapes)."""
    m = load_model(forward)
    inits = {t.name: t for t in m.graph.initializer}
    for name, arr in weights.items():
        if name not in inits:
            raise TrainingError(f"cannot export: {name!r} is not an initializer of the forward model")
        old = inits[name]
        arr = np.asarray(arr, dtype=helper.tensor_dtype_to_np_dtype(old.data_type))
        if tuple(arr.shape) != tuple(old.dims):
            raise TrainingError(f"cannot export: {name!r} has shape {arr.shape}, the model has {tuple(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.checker.check_model(m, full_check=True)
    return m
