"""The epoch loop: shuffled mini-batches, per-epoch metrics, checkpoints and resume.

The library does not print; ``on_batch(epoch, done, total, loss)`` and
``on_epoch(record)`` callbacks report progress (the CLI draws a progress
bar).  On resume, parameters, optimizer state, running statistics, the
optimizer step, the shuffling RNG state and the metric history come back
from the checkpoint, so the continued run takes the same batches as an
uninterrupted one (Dropout masks, drawn inside onnxruntime, are not part of
the saved state).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import numpy as np

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset
from .errors import TrainingError

log = logging.getLogger(__name__)


def lr_at(schedule: str, lr: float, step: int, total: int) -> float:
    """Learning rate of 0-based ``step`` of ``total``: constant, or cosine annealing to 0
    (``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max=total`` stepped per batch)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise TrainingError(f"unknown learning-rate schedule {schedule!r}; choose constant or cosine")


def fit(trainer, data: Dataset, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
        checkpoint_dir=None, resume: bool = False, lr_schedule: str = "constant",
        on_batch: Optional[Callable] = None, on_epoch: Optional[Callable] = None) -> dict:
    """Train for ``epochs`` epochs (counting those a resumed checkpoint already did); return the history."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise TrainingError(f"need epochs >= 0, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    rng = np.random.default_rng(seed)
    history = {"epoch": [], "train_loss": [], "test_loss": [], "test_accuracy": [], "seconds": []}
    lr_at(lr_schedule, lr, 0, 1)
    config = {"optimizer": trainer.spec.optimizer, "loss": trainer.spec.loss_kind,
              "batch_size": batch_size, "lr": lr, "seed": seed, "lr_schedule": lr_schedule}
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise TrainingError("resume needs a checkpoint directory")
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
        log.info("resumed from %s at epoch %d (step %d)", checkpoint_dir, start, meta["step"])
    classify = trainer.spec.loss_kind == "cross_entropy"
    n = len(data.x_train)
    per_epoch = (n + batch_size - 1) // batch_size
    if trainer.spec.buffers and n % batch_size == 1 and per_epoch > 1:
        # BatchNormalization in training mode needs >1 value per channel (torch raises); drop the
        # one-sample last batch of each epoch.
        per_epoch -= 1
        log.info("dropping the one-sample last batch of each epoch (BatchNormalization needs > 1)")
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        total = per_epoch
        losses = []
        for k in range(total):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            step_lr = lr_at(lr_schedule, lr, (epoch - 1) * per_epoch + k, epochs * per_epoch)
            loss = trainer.train_step(data.x_train[idx], data.y_train[idx], lr=step_lr)
            if not np.isfinite(loss):
                raise TrainingError(f"the loss became {loss} at epoch {epoch}, batch {k + 1}; "
                                    f"lower the learning rate (now {lr:g})")
            losses.append(loss * len(idx))
            if on_batch is not None:
                on_batch(epoch, k + 1, total, loss)
        train_loss = float(np.sum(losses) / min(n, total * batch_size))
        test_loss = trainer.eval_loss(data.x_test, data.y_test)
        acc = trainer.accuracy(data.x_test, data.y_test) if classify else None
        seconds = time.perf_counter() - t0
        for key, val in (("epoch", epoch), ("train_loss", train_loss), ("test_loss", test_loss),
                         ("test_accuracy", acc), ("seconds", seconds)):
            history[key].append(val)
        if checkpoint_dir is not None:
            state = trainer.state_dict()
            save_checkpoint(checkpoint_dir, state["tensors"], {
                "epoch": epoch, "step": state["step"], "rng_state": rng.bit_generator.state,
                "history": history, "config": config})
        if on_epoch is not None:
            on_epoch({k: v[-1] for k, v in history.items()} | {"epochs": epochs})
    return history
