"""Training data: ``.npz`` files or the bundled 8x8 digits, validated up front.

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test``.  The name
``digits`` loads ``digits.npz`` shipped beside this module (the 1797 images of
the UCI hand-written digits test set, the same arrays as
``sklearn.datasets.load_digits``; source and CC BY 4.0 attribution in
``digits.npz.license``, written by ``models/build_digits.py``), scales pixels to
[0, 1] (/16), and splits it 80/20 with a fixed seed; images are shaped N x 64
for a 2-D model input or N x 1 x 8 x 8 for a 4-D one.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .losses import check_targets

KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_SPLIT_SEED = 0
DIGITS_FILE = "digits.npz"


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = "data"

    def __len__(self) -> int:
        return len(self.x_train)


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The shipped digits: pixels ``(1797, 8, 8)`` uint8 in 0..16 and labels ``(1797,)`` uint8 in 0..9."""
    try:
        with resources.files(__package__).joinpath(DIGITS_FILE).open("rb") as fh, \
                np.load(fh, allow_pickle=False) as z:
            return z["images"], z["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"the digits data shipped with onnxbp ({DIGITS_FILE} in {__package__}) is missing or "
                        f"unreadable ({type(exc).__name__}); reinstall onnxbp") from None


def load_digits_dataset(input_dims: Optional[Sequence] = None, test_fraction: float = 0.2,
                        seed: int = DIGITS_SPLIT_SEED) -> Dataset:
    images, labels = digits_arrays()
    x = (images.reshape(len(images), 64) / np.float32(16.0)).astype(np.float32)  # k/16: exact in float32
    y = labels.astype(np.int64)
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
        x, y = validate_arrays(getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}"), input_dims, input_name,
                               loss, output_dims, x_name=f"x_{split}", y_name=f"y_{split}")
        out[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        out[f"y_{split}"] = (np.asarray(y, dtype=np.int64) if loss == "cross_entropy"
                             else np.ascontiguousarray(y, dtype=np.float32))
    return Dataset(**out, name=ds.name)


def validate_arrays(x, y, input_dims: Optional[Sequence], input_name: str, loss: str,
                    output_dims: Optional[Sequence], *, x_name: str = "inputs", y_name: str = "targets") -> tuple:
    """Check a set of samples (a data split or one batch) against the model and the loss.

    ``x``: samples along axis 0 for model input ``input_name`` of dims
    ``input_dims`` (axis 0 is the batch); ``y``: their targets or None.
    Raises :class:`DataError` with one line naming the array; returns the
    arrays as numpy arrays.
    """
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{x_name} is empty")
    if input_dims is not None:
        bad = x.ndim != len(input_dims) or any(isinstance(d, int) and d != s
                                               for d, s in zip(input_dims[1:], x.shape[1:]))
        if bad:
            want = "N x " + " x ".join(str(d) if isinstance(d, int) else "?" for d in input_dims[1:])
            raise DataError(f"{x_name} has shape {tuple(x.shape)}, but model input {input_name!r} expects {want}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{x_name} has dtype {x.dtype}; expected numbers")
    if not np.all(np.isfinite(x)):
        n_bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise DataError(f"{x_name} contains {n_bad} NaN or infinite values")
    if y is None:
        return x, None
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != len(x):
        raise DataError(f"{x_name} has {len(x)} samples but {y_name} has {len(y) if y.ndim else 0}")
    n_classes = None
    if loss == "cross_entropy":
        n_classes = output_dims[1] if output_dims is not None and len(output_dims) > 1 else None
        if y.ndim != (len(output_dims) - 1 if output_dims else 1):
            raise DataError(f"{y_name} has shape {tuple(y.shape)}; cross_entropy needs one integer label per sample")
    elif output_dims is not None:
        if y.ndim != len(output_dims) or any(isinstance(d, int) and d != s
                                              for d, s in zip(output_dims[1:], y.shape[1:])):
            raise DataError(f"{y_name} has shape {tuple(y.shape)}, but the model output is "
                            f"N x {' x '.join(str(d) if isinstance(d, int) else '?' for d in output_dims[1:])}")
    check_targets(loss, y, n_classes, what=y_name)
    return x, y
