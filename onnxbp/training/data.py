"""Training data: ``.npz`` files or scikit-learn's bundled 8x8 digits, validated up front.

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test``.  The name
``digits`` loads ``sklearn.datasets.load_digits`` (shipped inside
scikit-learn, no download), scales pixels to [0, 1] (/16), and splits it
80/20 with a fixed seed; images are shaped N x 64 for a 2-D model input or
N x 1 x 8 x 8 for a 4-D one.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import DataError
from .losses import check_targets

KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_SPLIT_SEED = 0


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"

    def __len__(self) -> int:
        return len(self.x_train)


def load_digits_dataset(input_dims: Optional[Sequence] = None, test_fraction: float = 0.2,
                        seed: int = DIGITS_SPLIT_SEED) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    if input_dims is not None and len(input_dims) == 4:
        x = x.reshape(-1, 1, 8, 8)
    elif input_dims is not None and len(input_dims) not in (2, 4):
        raise DataError(f"the digits set is N x 64 or N x 1 x 8 x 8, but the model input has rank {len(input_dims)}")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    te, tr = idx[:n_test], idx[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], name="digits")


def load_npz(path) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file '{p}' does not exist (give an .npz with {', '.join(KEYS)}, or 'digits')")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DataError(f"data file '{p}' lacks {', '.join(missing)} (it has {', '.join(z.files) or 'nothing'}); "
                                f"an .npz needs {', '.join(KEYS)}")
            arrays = {k: z[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"data file '{p}' is not a readable .npz ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Dataset(**arrays, name=p.name)


def load_dataset(data: str, input_dims: Optional[Sequence] = None) -> Dataset:
    if str(data) == "digits":
        return load_digits_dataset(input_dims)
    return load_npz(os.fspath(data))


def validate_dataset(ds: Dataset, input_dims: Optional[Sequence], input_name: str, loss: str,
                     output_dims: Optional[Sequence]) -> Dataset:
    """Check shapes, NaN and labels against the model and the loss; return the converted arrays."""
    out = {}
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if x.ndim == 0 or len(x) == 0:
            raise DataError(f"x_{split} is empty")
        if len(y) != len(x):
            raise DataError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if input_dims is not None:
            bad = x.ndim != len(input_dims) or any(isinstance(d, int) and d != s
                                                   for d, s in zip(input_dims[1:], x.shape[1:]))
            if bad:
                want = "N x " + " x ".join(str(d) if isinstance(d, int) else "?" for d in input_dims[1:])
                raise DataError(f"x_{split} has shape {tuple(x.shape)}, but model input {input_name!r} expects {want}")
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"x_{split} has dtype {x.dtype}; expected numbers")
        if not np.all(np.isfinite(x)):
            n_bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise DataError(f"x_{split} contains {n_bad} NaN or infinite values")
        n_classes = None
        if loss == "cross_entropy":
            n_classes = output_dims[1] if output_dims is not None and len(output_dims) > 1 else None
            if y.ndim != (len(output_dims) - 1 if output_dims else 1):
                raise DataError(f"y_{split} has shape {tuple(y.shape)}; cross_entropy needs one integer label per sample")
        elif output_dims is not None:
            if y.ndim != len(output_dims) or any(isinstance(d, int) and d != s
                                                  for d, s in zip(output_dims[1:], y.shape[1:])):
                raise DataError(f"y_{split} has shape {tuple(y.shape)}, but the model output is "
                                f"N x {' x '.join(str(d) if isinstance(d, int) else '?' for d in output_dims[1:])}")
        check_targets(loss, y, n_classes, what=f"y_{split}")
        out[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        out[f"y_{split}"] = (np.asarray(y, dtype=np.int64) if loss == "cross_entropy"
                             else np.ascontiguousarray(y, dtype=np.float32))
    return Dataset(**out, name=ds.name)
