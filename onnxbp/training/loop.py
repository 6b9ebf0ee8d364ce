"""The epoch loop: shuffled mini-batches, per-epoch metrics, checkpoints and resume.

The library does not print; ``on_batch(epoch, done, total, loss)`` and
``on_epoch(record)`` callbacks report progress (the CLI draws a progress
bar).  On resume, parameters, optimizer state, running statistics, the
optimizer step, the shuffling RNG state and the metric history come back
from the checkpoint, so the continued run takes the same batches as an
uninterrupted one (Dropout masks, drawn inside onnxruntime, are not part of
the saved state).

Data-parallel (a :class:`~onnxbp.training.Trainer` built with ``comm=``):
every rank draws the same permutation per epoch from the same seed, takes the
same global batches of ``batch_size`` samples and trains on its contiguous
part of each (:func:`~onnxbp.training.distributed.shard`; sizes differ by at
most one, an uneven last batch may leave a rank with none, which then
contributes zero gradients: no rank waits for another).  The test metrics are
computed on a shard of the test set per rank and summed.  Rank 0 alone calls
the callbacks and writes the checkpoint; on resume rank 0 reads it and sends
it to the others, so a run may resume with another number of ranks (the
batches depend only on the seed and the global batch size).  The ranks check
first that they hold the same options and data (a hash).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset, n_samples, take
from .errors import TrainingError

log = logging.getLogger(__name__)


SCHEDULES = ("constant", "cosine", "linear")


def lr_at(schedule: str, lr: float, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate of 0-based ``step`` of ``total`` (the schedules of transformers'
    ``get_*_schedule_with_warmup``, stepped per batch):

    * ``warmup`` steps first, linearly from 0: ``lr * step / warmup`` (none when ``warmup=0``);
    * then ``constant``: ``lr``; ``cosine``: ``lr * 0.5 * (1 + cos(pi * p))``, and ``linear``:
      ``lr * (1 - p)``, with ``p = (step - warmup) / (total - warmup)`` the progress after warmup.

    Without warmup, ``cosine`` is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total)``.
    """
    if schedule not in SCHEDULES:
        raise TrainingError(f"unknown learning-rate schedule {schedule!r}; choose {', '.join(SCHEDULES)}")
    if warmup < 0 or warmup > max(total, 0):
        raise TrainingError(f"warmup of {warmup} steps does not fit a run of {total} steps")
    if step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * progress))
    return lr * max(0.0, 1.0 - progress)


def fit(trainer, data: Dataset, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
        checkpoint_dir=None, resume: bool = False, lr_schedule: str = "constant", warmup: int = 0,
        on_batch: Optional[Callable] = None, on_epoch: Optional[Callable] = None) -> dict:
    """Train for ``epochs`` epochs (counting those a resumed checkpoint already did); return the history.

    ``lr_schedule`` / ``warmup``: the learning rate per batch, :func:`lr_at`.  ``data`` holds arrays
    or, for models with several data inputs, dicts of arrays by input name."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise TrainingError(f"need epochs >= 0, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    comm = getattr(trainer, "comm", None)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    lead = rank == 0
    if comm is not None:
        from . import distributed

        distributed.check_same(comm, "training options or data", distributed.digest(
            [epochs, batch_size, lr, seed, lr_schedule, warmup, resume, str(checkpoint_dir)],
            distributed.data_signature(data)))
    rng = np.random.default_rng(seed)
    history = {"epoch": [], "train_loss": [], "test_loss": [], "test_accuracy": [], "seconds": []}
    lr_at(lr_schedule, lr, 0, 1)
    config = {"optimizer": trainer.spec.optimizer, "loss": trainer.spec.loss_kind,
              "batch_size": batch_size, "lr": lr, "seed": seed, "lr_schedule": lr_schedule, "warmup": warmup}
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise TrainingError("resume needs a checkpoint directory")
        if comm is not None:
            tensors, meta = distributed.broadcast_checkpoint(comm, lambda: load_checkpoint(checkpoint_dir))
        else:
            tensors, meta = load_checkpoint(checkpoint_dir)
        saved = meta.get("config", {})
        for key in ("optimizer", "loss"):
            if saved.get(key) != config[key]:
                raise TrainingError(f"the checkpoint in '{checkpoint_dir}' was written with {key} "
                                    f"{saved.get(key)!r}, this run uses {config[key]!r}")
        trainer.load_state_dict({"tensors": tensors, "step": meta["step"]})
        rng.bit_generator.state = meta["rng_state"]
        history = meta["history"]
        start = int(meta["epoch"])
        log.info("resumed from %s at epoch %d (step %d)%s", checkpoint_dir, start, meta["step"],
                 f" on {size} ranks (written on {meta.get('ranks', 1)})" if comm is not None else "")
    classify = trainer.spec.loss_kind in ("cross_entropy", "lm_cross_entropy")
    n = n_samples(data.x_train)
    per_epoch = (n + batch_size - 1) // batch_size
    last = n - (per_epoch - 1) * batch_size
    if comm is not None and trainer.spec.buffers and batch_size // size < 2:
        raise TrainingError(f"BatchNormalization needs at least 2 samples per rank: a batch of {batch_size} "
                            f"over {size} ranks leaves {batch_size // size}; use --batch-size >= {2 * size}")
    short = n % batch_size == 1 if comm is None else last // size < 2
    if trainer.spec.buffers and short and per_epoch > 1:
        # BatchNormalization in training mode needs >1 value per channel (torch raises); drop a last
        # batch that would leave a rank one sample (single process: the one-sample last batch).
        per_epoch -= 1
        log.info("dropping the %d-sample last batch of each epoch (BatchNormalization needs > 1 per rank)", last)
    lr_at(lr_schedule, lr, 0, epochs * per_epoch, warmup)  # a warmup longer than the run fails here
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        total = per_epoch
        losses = []
        for k in range(total):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            step_lr = lr_at(lr_schedule, lr, (epoch - 1) * per_epoch + k, epochs * per_epoch, warmup)
            mine = idx if comm is None else distributed.shard(idx, rank, size)
            loss = trainer.train_step(take(data.x_train, mine), _take_y(data.y_train, mine), lr=step_lr)
            if not np.isfinite(loss):
                raise TrainingError(f"the loss became {loss} at epoch {epoch}, batch {k + 1}; "
                                    f"lower the learning rate (now {lr:g})")
            losses.append(loss * len(idx))
            if on_batch is not None and lead:
                on_batch(epoch, k + 1, total, loss)
        train_loss = float(np.sum(losses) / min(n, total * batch_size))
        if comm is None:
            test_loss = trainer.eval_loss(data.x_test, data.y_test)
            acc = trainer.accuracy(data.x_test, data.y_test) if classify else None
        else:
            test_loss, acc = _sharded_metrics(trainer, data, classify, rank, size)
        seconds = time.perf_counter() - t0
        for key, val in (("epoch", epoch), ("train_loss", train_loss), ("test_loss", test_loss),
                         ("test_accuracy", acc), ("seconds", seconds)):
            history[key].append(val)
        if checkpoint_dir is not None and lead:
            state = trainer.state_dict()
            save_checkpoint(checkpoint_dir, state["tensors"], {
                "epoch": epoch, "step": state["step"], "rng_state": rng.bit_generator.state,
                "history": history, "config": config, "ranks": size})
        if on_epoch is not None and lead:
            on_epoch({k: v[-1] for k, v in history.items()} | {"epochs": epochs})
    return history


def _sharded_metrics(trainer, data: Dataset, classify: bool, rank: int, size: int) -> tuple:
    """Test loss and accuracy of a data-parallel trainer: each rank a shard of the test set, summed."""
    from .distributed import shard

    mine = shard(np.arange(n_samples(data.x_test)), rank, size)
    x, y = take(data.x_test, mine), _take_y(data.y_test, mine)
    m = len(mine)
    loss_sum = trainer.eval_loss(x, y) * m if m else 0.0
    correct = trainer.accuracy(x, y) * m if m and classify else 0.0
    total, loss_sum, correct = trainer._dist.allreduce_sum([m, loss_sum, correct])
    if not total:
        return float("nan"), (None if not classify else float("nan"))
    return float(loss_sum / total), (float(correct / total) if classify else None)


def _take_y(y, idx):
    return None if y is None else y[idx]
