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

from .. import arguments
from ..errors import OnnxbpError
from ..modelio import (ModelLike, check_full, convert_opset, cpu_session, first_line, initializers_as_inputs,
                       load_model, save_model_atomic)
from .data import (Dataset, check_shared_dims, load_dataset, n_samples, take, validate_arrays,
                   validate_dataset)
from .errors import DataError, TrainingError
from ..types import TensorInfo, default_opset, np_dtype, value_info_dims
from ..writer import GraphWriter, value_info
from .losses import IGNORE_INDEX, add_loss
from .optimizers import SGD, Adam, AdamW
from .step import StepModel, build_split_step, build_step_model, in_place_updates

log = logging.getLogger(__name__)


class Trainer:
    """Train a forward ONNX model with plain onnxruntime.

    ``Trainer(model, loss="cross_entropy", optimizer=AdamW(), requires_grad=None,
    frozen_params=None, threads=None, seed=None)``; then :meth:`train_step`,
    :meth:`evaluate` (inference mode: BN running stats, no dropout),
    :meth:`state_dict` / :meth:`load_state_dict`, :meth:`export`.

    Models with several data inputs (a transformer's ``input_ids`` and ``attention_mask``, int64)
    take a batch as a dict ``{input name: array}`` (:attr:`input_names`, :attr:`input_dtypes`);
    a model with one takes its array.  ``requires_grad`` / ``frozen_params`` accept glob patterns
    and ``clip_grad_norm=`` clips the gradients by global norm in the step graph
    (:func:`~onnxbp.training.build_step_model`).

    ``comm=MPI.COMM_WORLD`` (an mpi4py communicator): data-parallel training
    (:mod:`onnxbp.training.distributed`).  Every rank builds the split step (gradient model and
    update model), the ranks check that they hold the same model and options, and
    :meth:`train_step` takes this rank's shard of the global batch (possibly empty) and returns
    the loss of the global batch; the gradients are averaged in ``bucket_mb``-MiB buckets.
    """

    def __init__(self, model: ModelLike, *, loss: str = "cross_entropy", optimizer=None,
                 requires_grad: Optional[Sequence[str]] = None, frozen_params: Optional[Sequence[str]] = None,
                 output: Optional[str] = None, threads: Optional[int] = None, seed: Optional[int] = None,
                 bn_stats: str = "torch", comm=None, bucket_mb: Optional[float] = None, **grad_options):
        self.source = model if isinstance(model, (str, os.PathLike)) else None
        self.optimizer = optimizer if optimizer is not None else AdamW()
        arguments.instance(self.optimizer, (SGD, Adam, AdamW), "optimizer", TrainingError,
                           " (onnxbp.training.SGD(...), Adam(...) or AdamW(...))")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise TrainingError(f"threads must be a whole number >= 1 (or None: onnxruntime's default), got {threads!r}")
        self.comm = comm
        self._dist = None
        options = dict(loss=loss, optimizer=self.optimizer, requires_grad=requires_grad,
                       frozen_params=frozen_params, output=output, bn_stats=bn_stats, **grad_options)
        if comm is None:
            self.step_model: StepModel = build_step_model(model, dropout_seed=seed, **options)
            step_graph = self.step_model.model
        else:
            self.step_model = self._build_split(model, comm, seed, options)
            step_graph = self.step_model.gradient
        self.spec = self.step_model.spec
        self.forward = self.step_model.forward
        if not self.spec.data_inputs:
            raise TrainingError("the model has no data input (every graph input is an initializer); "
                                "there is nothing to feed a batch to")
        self.input_names = list(self.spec.data_inputs)
        self.input_name = self.input_names[0] if len(self.input_names) == 1 else None
        self._threads = threads
        # Without onnxruntime's memory pattern: for a training step (forward activations kept for the
        # backward, then the backward's temporaries) its one planned block is about twice the live working
        # set (CIFAR ResNet-18, batch 32: 544 vs 275 MiB above the built session), at the same speed and
        # with bit-identical results (benchmarks/bench_train_memory.py).
        if comm is None:
            self.session = cpu_session(self.step_model.model, threads, mem_pattern=False)
        else:
            from .distributed import BUCKET_MB, DataParallelStep

            self._dist = DataParallelStep(self.step_model, comm, threads,
                                          BUCKET_MB if bucket_mb is None else bucket_mb)
        self.eval_model = self._make_eval_model()
        self.eval_session = cpu_session(self.eval_model, threads)
        step_inputs = {i.name: i for i in step_graph.graph.input}
        dims = {n: value_info_dims(step_inputs[n]) for n in self.input_names}
        self.input_dtypes = {n: np_dtype(step_inputs[n].type.tensor_type.elem_type) for n in self.input_names}
        # one input: its dims and dtype; several: dicts by input name
        self.input_dims = dims[self.input_name] if self.input_name else dims
        self.input_dtype = self.input_dtypes[self.input_name] if self.input_name else dict(self.input_dtypes)
        out_vi = next(o for o in self.forward.graph.output if o.name == self.spec.output)
        self.output_dims = value_info_dims(out_vi)
        self.target_dtype = np_dtype(step_inputs[self.spec.target].type.tensor_type.elem_type) if self.spec.target else None
        self.step_count = 0
        self._carried = list(self.spec.updates)
        self._a = {}
        self._b = {}
        # Carried tensors are double-buffered (read from _a, written to _b, swapped after the step),
        # except optimizer state that step.in_place_updates shows may be overwritten by its update.
        self.in_place = set(in_place_updates(self.step_model.model if comm is None else self.step_model.update,
                                             self.spec))
        self._carried_types = {}  # name -> (shape, dtype)
        initial = self.step_model.initial
        for name in self._carried:
            arr = np.ascontiguousarray(initial.pop(name))  # the values now live in _a: not held twice
            self._carried_types[name] = (tuple(arr.shape), arr.dtype)
            self._a[name] = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype)
            self._a[name].update_inplace(arr)
            self._b[name] = (self._a[name] if name in self.in_place
                             else ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype))
            del arr
        self._loss_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32)
        self._lr_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.float32)
        self._step_value = ort.OrtValue.ortvalue_from_shape_and_type([], np.int64)
        # Two bindings made once, A -> B and B -> A: a step binds only its batch (lr and the step count
        # are written into their bound values), not every carried tensor again.
        self._sets = (self._a, self._b)
        self._bindings = ()
        if comm is None:
            self.set_session(self.session)
        self._eval_binding = self.eval_session.io_binding()

    def set_session(self, session) -> None:
        """Run the steps with ``session`` (an onnxruntime session of ``step_model.model``, e.g. one
        that profiles); the carried tensors stay where they are."""
        self.session = session
        a, b = self._sets
        self._bindings = (self._bind_carried(a, b), self._bind_carried(b, a))

    def _bind_carried(self, src: dict, dst: dict):
        b = self.session.io_binding()
        for name, out in self.spec.updates.items():
            b.bind_ortvalue_input(name, src[name])
            b.bind_ortvalue_output(out, dst[name])
        b.bind_ortvalue_output(self.spec.loss, self._loss_value)
        b.bind_ortvalue_input(self.spec.lr, self._lr_value)
        if self.spec.step:
            b.bind_ortvalue_input(self.spec.step, self._step_value)
        return b

    @staticmethod
    def _build_split(model: ModelLike, comm, seed: Optional[int], options: dict):
        """The split step on every rank, then the check that all ranks hold the same model and options.

        A rank whose build fails does not leave the others waiting: every rank learns of it."""
        from .distributed import CollectiveError, check_same, import_mpi, model_options_digest

        import_mpi()
        rank = comm.Get_rank()
        split, error = None, None
        try:
            # Dropout masks differ between ranks (they see different samples); the seed is per rank.
            split = build_split_step(model, dropout_seed=None if seed is None else seed + rank, **options)
        except OnnxbpError as exc:
            error = exc
        errors = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise CollectiveError(f"rank {failed[0][0]} of {len(errors)} could not build its training step "
                                  f"({failed[0][1]})")
        opts = {k: (v.config() if k == "optimizer" else v) for k, v in options.items()}
        check_same(comm, "a model or Trainer options", model_options_digest(split.forward, {**opts, "seed": seed}))
        return split

    # ------------------------------------------------------------------ models
    def _make_eval_model(self, with_loss: bool = False) -> onnx.ModelProto:
        """The forward model with carried tensors as inputs (inference-mode BN and Dropout).

        ``with_loss``: the step's loss appended, the loss the only output.
        """
        m = initializers_as_inputs(self.forward, set(self.spec.updates))  # the weights are not copied
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
    def load_data(self, data) -> "Dataset":
        """A data set for this model (``"digits"`` or an .npz path, :mod:`onnxbp.training.data`),
        validated against its inputs, output and loss (:class:`DataError` with one line)."""
        ds = load_dataset(data, self.input_dims if self.input_name else None, self.input_names)
        if isinstance(ds.x_train, dict):
            dims = self.input_dims if self.input_name is None else {self.input_name: self.input_dims}
            return validate_dataset(ds, dims, None, self.spec.loss_kind, self.output_dims, self.input_dtypes)
        if self.input_name is None:
            raise DataError(f"the model has {len(self.input_names)} data inputs ({', '.join(self.input_names)}); "
                            f"the .npz needs <input>_train and <input>_test for each, and labels_train, labels_test")
        return validate_dataset(ds, self.input_dims, self.input_name, self.spec.loss_kind, self.output_dims)

    def feeds(self, x) -> dict:
        """``{input name: contiguous array of the input's dtype}`` from an array (one data input) or a
        dict naming every data input."""
        if isinstance(x, dict):
            missing = [n for n in self.input_names if n not in x]
            extra = [n for n in x if n not in self.input_dtypes]
            if missing or extra:
                raise DataError(f"the batch has {', '.join(map(repr, x)) or 'no arrays'}; the model's data inputs "
                                f"are {', '.join(map(repr, self.input_names))}"
                                + (f" ({', '.join(map(repr, missing))} missing)" if missing else ""))
            return {n: np.ascontiguousarray(x[n], dtype=self.input_dtypes[n]) for n in self.input_names}
        if self.input_name is None:
            raise DataError(f"the model has {len(self.input_names)} data inputs "
                            f"({', '.join(self.input_names)}); give the batch as a dict of arrays by input name")
        return {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtypes[self.input_name])}

    def check_batch(self, x, y: Optional[np.ndarray] = None, what: str = "batch") -> tuple:
        """Validate and convert a batch (an array, or a dict by input name); raise :class:`DataError`
        with one line."""
        xs = x if isinstance(x, dict) else {self.input_name: x} if self.input_name else x
        self.feeds(xs)  # the names
        dims = self.input_dims if self.input_name is None else {self.input_name: self.input_dims}
        out = {}
        for name, arr in xs.items():
            batch = dims[name][0] if dims[name] else None
            if isinstance(batch, int) and np.ndim(arr) and len(arr) != batch:
                raise DataError(f"{what} inputs hold {len(arr)} samples, but model input {name!r} has a "
                                f"static batch of {batch}")
            arr, y = validate_arrays(arr, y, dims[name], name, self.spec.loss_kind, self.output_dims,
                                     x_name=f"{what} inputs" if self.input_name else f"{what} input {name!r}",
                                     y_name=f"{what} targets")
            want = np.dtype(self.input_dtypes[name])
            if np.issubdtype(want, np.integer) and not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{what} input {name!r} has dtype {arr.dtype}; the model takes integers ({want})")
            out[name] = arr
        check_shared_dims(out, dims, lambda n: f"{what} input {n!r}")
        sizes = {len(a) for a in out.values()}
        if len(sizes) > 1:
            counts = ", ".join(f"{k}: {len(v)}" for k, v in out.items())
            raise DataError(f"{what} inputs have different sample counts ({counts})")
        feeds = self.feeds(out)
        if y is not None:
            y = np.ascontiguousarray(y, dtype=self.target_dtype)
        return (feeds[self.input_name] if self.input_name and not isinstance(x, dict) else feeds), y

    def _run(self, session, binding, x, y) -> None:
        """Run a bound session; a failure onnxruntime reports (a batch of the wrong shape or type on
        the unchecked fast path) becomes the one-line DataError that check_batch gives, or a
        TrainingError with onnxruntime's first line."""
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            self.check_batch(x, y)
            raise TrainingError(f"onnxruntime failed to run the step: {first_line(exc)}") from None

    def train_step(self, x: np.ndarray, y: Optional[np.ndarray] = None, lr: float = 1e-3,
                   check: bool = False) -> float:
        """One optimizer step on a batch; returns the loss (before the update)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)) or not np.isfinite(lr):
            raise TrainingError(f"lr must be a finite number, got {lr!r}")
        if check and (self._dist is None or n_samples(x)):
            x, y = self.check_batch(x, y)
        feeds = self.feeds(x)
        if y is not None:
            y = np.ascontiguousarray(y, dtype=self.target_dtype)
        if self._dist is not None:
            loss = self._dist.run((self._a, self._b), feeds, y, lr, self.step_count + 1)
            self._a, self._b = self._b, self._a
            self.step_count += 1
            return float(loss)
        b = self._bindings[0 if self._a is self._sets[0] else 1]
        for name, arr in feeds.items():  # rebinding a name replaces its previous array
            b.bind_cpu_input(name, arr)
        if self.spec.target:
            b.bind_cpu_input(self.spec.target, y)
        self._lr_value.update_inplace(np.asarray(lr, dtype=np.float32))
        if self.spec.step:
            self._step_value.update_inplace(np.asarray(self.step_count + 1, dtype=np.int64))
        self._run(self.session, b, x, y)
        self._a, self._b = self._b, self._a
        self.step_count += 1
        return float(self._loss_value.numpy())

    def evaluate(self, x, batch_size: int = 1024) -> np.ndarray:
        """Model outputs in inference mode (running BN statistics, no dropout); ``x`` an array or a
        dict by input name."""
        feeds = self.feeds(x)
        outs = []
        b = self._eval_binding
        for i in range(0, max(n_samples(feeds), 1), batch_size):
            b.clear_binding_inputs()
            b.clear_binding_outputs()
            for name, arr in take(feeds, slice(i, i + batch_size)).items():
                b.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in self._eval_inputs():
                b.bind_ortvalue_input(name, self._a[name])
            b.bind_output(self.spec.output, "cpu")
            self._run(self.eval_session, b, x, None)
            outs.append(b.copy_outputs_to_cpu()[0])
        return np.concatenate(outs, axis=0) if outs else np.zeros((0,))

    def _eval_inputs(self):
        if not hasattr(self, "_eval_names"):
            names = {i.name for i in self.eval_model.graph.input}
            self._eval_names = [n for n in self._carried if n in names]
        return self._eval_names

    def accuracy(self, x, y: np.ndarray) -> float:
        """The fraction of correct argmax predictions: per sample for ``cross_entropy``, per token
        (labels -100 skipped) for ``lm_cross_entropy``."""
        logits = self.evaluate(x)
        y = np.asarray(y)
        if self.spec.loss_kind == "lm_cross_entropy":
            keep = y != IGNORE_INDEX
            return float(np.mean(np.argmax(logits, axis=-1)[keep] == y[keep])) if keep.any() else float("nan")
        return float(np.mean(np.argmax(logits, axis=1) == y))

    def eval_loss(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> float:
        """Mean loss in inference mode, computed by the same loss graph the step trains with."""
        if not hasattr(self, "_loss_session"):
            self._loss_session = cpu_session(self._make_eval_model(with_loss=True), self._threads)
        xs = self.feeds(x)
        carried = {n: self._a[n] for n in self._eval_inputs()}
        total, count = 0.0, 0
        for i in range(0, n_samples(xs), batch_size):
            part = take(xs, slice(i, i + batch_size))
            feeds = {**part, **carried}
            if self.spec.target:
                feeds[self.spec.target] = np.ascontiguousarray(y[i:i + batch_size], dtype=self.target_dtype)
            n = n_samples(part)
            total += float(np.asarray(self._loss_session.run([self._eval_loss_name], feeds)[0]).reshape(-1)[0]) * n
            count += n
        return total / count if count else float("nan")

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Numpy copies of every carried tensor, plus ``step``."""
        d = {name: np.array(self._a[name].numpy(), copy=True) for name in self._carried}
        return {"tensors": d, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict):
            raise TrainingError(f"load_state_dict takes the dict state_dict() returns ({{'tensors': {{name: array}}, "
                                f"'step': n}}), got {type(state).__name__}")
        tensors = state["tensors"]
        missing = [n for n in self._carried if n not in tensors]
        if missing:
            raise TrainingError(f"the saved state lacks {missing[0]!r} (it was saved for another model, "
                                f"optimizer or set of trainable parameters)")
        for name in self._carried:
            arr = np.ascontiguousarray(tensors[name])
            shape, dtype = self._carried_types[name]
            if arr.shape != shape:
                raise TrainingError(f"the saved state has {name!r} with shape {arr.shape}, the model needs {shape}")
            self._a[name].update_inplace(arr.astype(dtype))
        self.step_count = int(state.get("step", 0))

    def num_parameters(self) -> int:
        """The number of trained values (the elements of every trainable parameter tensor)."""
        return sum(int(np.prod(self._carried_types[p][0], dtype=np.int64)) for p in self.spec.params)

    def parameters(self) -> dict:
        """Current values of the forward model's trained tensors (params and BN running stats)."""
        names = list(self.spec.params) + list(self.spec.buffers)
        return {n: np.array(self._a[n].numpy(), copy=True) for n in names}

    def to_model(self) -> onnx.ModelProto:
        """The forward model with the trained weights as initializers (a normal inference model)."""
        return export_model(self.forward, self.parameters())

    def export(self, path, source=None, external_data: Optional[bool] = None):
        """Write :meth:`to_model` atomically; ``external_data`` as in :func:`onnxbp.save_model_atomic`
        (default: external data over 2 GB or when the source model had it)."""
        return save_model_atomic(self.to_model(), path, source=source if source is not None else self.source,
                                 external_data=external_data)


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
    check_full(m, TrainingError, "the exported model fails the ONNX checker")  # on the skeleton: over 2 GB too
    return m
