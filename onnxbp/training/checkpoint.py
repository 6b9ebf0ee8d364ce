"""Checkpoints: one ``.npz`` per run directory, replaced atomically after each epoch.

The file holds every carried tensor of the training step (parameters,
optimizer state, BatchNormalization running statistics) under ``t/<name>``,
and a JSON ``meta`` entry: epoch, optimizer step, RNG state of the shuffling
generator, metric history, and the training configuration (checked on
resume).  It is written to a temporary file in the same directory, fsync'ed,
then ``os.replace``'d, so an interrupted write never damages the previous
checkpoint.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..modelio import write_bytes_atomic
from .errors import TrainingError

FILENAME = "checkpoint.npz"


def checkpoint_path(directory) -> Path:
    return Path(directory) / FILENAME


def save_checkpoint(directory, tensors: dict, meta: dict) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / FILENAME
    buf = io.BytesIO()
    arrays = {f"t/{k}": np.asarray(v) for k, v in tensors.items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **arrays)
    return write_bytes_atomic(out, buf.getvalue())


def load_checkpoint(directory) -> tuple:
    """Return (tensors, meta) of the checkpoint in ``directory``."""
    p = checkpoint_path(directory)
    if not p.exists():
        raise TrainingError(f"no checkpoint to resume from: '{p}' does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            tensors = {k[2:]: z[k] for k in z.files if k.startswith("t/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise TrainingError(f"checkpoint '{p}' is unreadable ({type(exc).__name__}); delete it or "
                            f"train without --resume") from None
    return tensors, meta
