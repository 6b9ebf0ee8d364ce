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
from onnx import numpy_helper

from ..modelio import ModelLike, convert_opset, cpu_session, load_model, save_model_atomic
from .data import validate_arrays
from .errors import DataError, TrainingError
from ..types import TensorInfo, default_opset, np_dtype, value_info_dims
from ..writer import GraphWriter, value_info
from .losses import add_loss
from .optimizers import AdamW
from .step import StepModel, build_step_model, in_place_updates

log = logging.getLogger(__name__)


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
        self.source = model if isinstance(model, (str, os.PathLike)) else None
        self.optimizer = optimizer if optimizer is not None else AdamW()
        self.step_model: StepModel = build_step_model(
            model, loss=loss, optimizer=self.optimizer, requires_grad=requires_grad,
            frozen_params=frozen_params, output=output, bn_stats=bn_stats, dropout_seed=seed, **grad_options)
        self.spec = self.step_model.spec
        self.forward = self.step_model.forward
        if len(self.spec.data_inputs) != 1:
            raise TrainingError(f"Trainer feeds exactly one data input; the model has "
                                f"{len(self.spec.data_inputs)} ({', '.join(self.spec.data_inputs)})")
        self.input_name = self.spec.data_inputs[0]
        self._threads = threads
        # Without onnxruntime's memory pattern: for a training step (forward activations kept for the
        # backward, then the backward's temporaries) its one planned block is about twice the live working
        # set (CIFAR ResNet-18, batch 32: 544 vs 275 MiB above the built session), at the same speed and
        # with bit-identical results (benchmarks/bench_train_memory.py).
        self.session = cpu_session(self.step_model.model, threads, mem_pattern=False)
        self.eval_model = self._make_eval_model()
        self.eval_session = cpu_session(self.eval_model, threads)
        step_inputs = {i.name: i for i in self.step_model.model.graph.input}
        x_vi = step_inputs[self.input_name]
        self.input_dims = value_info_dims(x_vi)
        self.input_dtype = np_dtype(x_vi.type.tensor_type.elem_type)
        out_vi = next(o for o in self.forward.graph.output if o.name == self.spec.output)
        self.output_dims = value_info_dims(out_vi)
        self.target_dtype = np_dtype(step_inputs[self.spec.target].type.tensor_type.elem_type) if self.spec.target else None
        self.step_count = 0
        self._carried = list(self.spec.updates)
        self._a = {}
        self._b = {}
        # Carried tensors are double-buffered (read from _a, written to _b, swapped after the step),
        # except optimizer state that step.in_place_updates shows may be overwritten by its update.
        self.in_place = set(in_place_updates(self.step_model.model, self.spec))
        for name in self._carried:
            arr = np.ascontiguousarray(self.step_model.initial[name])
            self._a[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
            self._a[name].update_inplace(arr)
            self._b[name] = (self._a[name] if name in self.in_place
                             else ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype))
        self._loss_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32)
        self._binding = self.session.io_binding()
        self._eval_binding = self.eval_session.io_binding()

    # ------------------------------------------------------------------ models
    def _make_eval_model(self, with_loss: bool = False) -> onnx.ModelProto:
        """The forward model with carried tensors as inputs (inference-mode BN and Dropout).

        ``with_loss``: the step's loss appended, the loss the only output.
        """
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
            m.graph.input.append(value_info(t.name, t.data_type, t.dims))
        del m.graph.output[:]
        out_vi = next(o for o in self.forward.graph.output if o.name == self.spec.output)
        if not with_loss:
            m.graph.output.append(out_vi)
            return m
        if default_opset(m) < 13:  # the loss ops (SoftmaxCrossEntropyLoss) need opset 13, as in the step
            m = convert_opset(m, 13, "the evaluation loss", TrainingError)
        w = GraphWriter.for_model(m, "eval", "onnxbp.training: evaluation loss",
                                  infos={out_vi.name: TensorInfo(out_vi.type.tensor_type.elem_type,
                                                                 value_info_dims(out_vi))})
        self._eval_loss_name = w.fresh("loss")
        target = self.spec.target or w.fresh("target")
        target_vi = add_loss(w, self.spec.loss_kind, out_vi, target, self._eval_loss_name)
        m.graph.node.extend(w.take_nodes())
        if target_vi is not None:
            m.graph.input.append(target_vi)
        m.graph.output.append(value_info(self._eval_loss_name, out_vi.type.tensor_type.elem_type, None))
        return m

    # ------------------------------------------------------------------- steps
    def check_batch(self, x: np.ndarray, y: Optional[np.ndarray] = None, what: str = "batch") -> tuple:
        """Validate and convert a batch; raise :class:`DataError` with one line."""
        batch = self.input_dims[0] if self.input_dims else None
        if isinstance(batch, int) and np.ndim(x) and len(x) != batch:
            raise DataError(f"{what} inputs hold {len(x)} samples, but model input {self.input_name!r} has a "
                            f"static batch of {batch}")
        x, y = validate_arrays(x, y, self.input_dims, self.input_name, self.spec.loss_kind, self.output_dims,
                               x_name=f"{what} inputs", y_name=f"{what} targets")
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if y is not None:
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

    def eval_loss(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
        """Mean loss in inference mode, computed by the same loss graph the step trains with."""
        if not hasattr(self, "_loss_session"):
            self._loss_session = cpu_session(self._make_eval_model(with_loss=True), self._threads)
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        carried = {n: self._a[n] for n in self._eval_inputs()}
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            feeds = {self.input_name: x[i:i + batch_size], **carried}
            if self.spec.target:
                feeds[self.spec.target] = np.ascontiguousarray(y[i:i + batch_size], dtype=self.target_dtype)
            n = len(feeds[self.input_name])
            total += float(np.asarray(self._loss_session.run([self._eval_loss_name], feeds)[0]).reshape(-1)[0]) * n
            count += n
        return total / count if count else float("nan")

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
        arr = np.asarray(arr, dtype=np_dtype(old.data_type))
        if tuple(arr.shape) != tuple(old.dims):
            raise TrainingError(f"cannot export: {name!r} has shape {arr.shape}, the model has {tuple(old.dims)}")
        old.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.checker.check_model(m, full_check=True)
    return m
