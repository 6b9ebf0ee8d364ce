"""Training data: ``.npz`` files or the bundled 8x8 digits, validated up front.

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` (a model with one data
input), or, for a model with several (token ids and an attention mask), one array per model
input and split, named ``<input>_train`` and ``<input>_test`` (``input_ids_train``,
``attention_mask_train``, ...), and the labels as ``labels_train`` / ``labels_test`` (or
``y_train`` / ``y_test``).  Then ``Dataset.x_train`` is a dict ``{input name: array}``.  The name
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
from .losses import IGNORE_INDEX, check_targets

KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_SPLIT_SEED = 0
DIGITS_FILE = "digits.npz"


@dataclass
class Dataset:
    x_train: object                  # an array, or {model input name: array} (same length each)
    y_train: Optional[np.ndarray]
    x_test: object
    y_test: Optional[np.ndarray]
    name: str = "data"

    def __len__(self) -> int:
        return n_samples(self.x_train)


def n_samples(x) -> int:
    """The number of samples of a batch or split: an array, or a dict of arrays (its first one)."""
    if isinstance(x, dict):
        return len(next(iter(x.values()))) if x else 0
    return len(x)


def take(x, idx):
    """Samples ``idx`` of an array or of each array of a dict."""
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


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


def load_npz(path, input_names: Optional[Sequence[str]] = None) -> Dataset:
    """Read an .npz: ``x_train, y_train, x_test, y_test``, or, when it has no ``x_train`` and
    ``input_names`` are given, ``<input>_train`` / ``<input>_test`` per input and
    ``labels_train`` / ``labels_test`` (or ``y_train`` / ``y_test``; absent: no targets)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file '{p}' does not exist (give an .npz with {', '.join(KEYS)}, or 'digits')")
    try:
        with np.load(p, allow_pickle=False) as z:
            files = list(z.files)
            if "x_train" not in files and input_names:
                return _named_npz(p, z, list(input_names))
            missing = [k for k in KEYS if k not in files]
            if missing:
                raise DataError(f"data file '{p}' lacks {', '.join(missing)} (it has {', '.join(files) or 'nothing'}); "
                                f"an .npz needs {', '.join(KEYS)}")
            arrays = {k: z[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"data file '{p}' is not a readable .npz ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Dataset(**arrays, name=p.name)


def _named_npz(p: Path, z, names: list) -> Dataset:
    files = set(z.files)
    want = [f"{n}_{split}" for split in ("train", "test") for n in names]
    missing = [k for k in want if k not in files]
    if missing:
        raise DataError(f"data file '{p}' lacks {', '.join(missing)} (it has {', '.join(sorted(files)) or 'nothing'}); "
                        f"for model inputs {', '.join(names)} an .npz needs <input>_train and <input>_test for each, "
                        f"and labels_train, labels_test")
    splits = {}
    for split in ("train", "test"):
        label_key = next((k for k in (f"labels_{split}", f"y_{split}") if k in files), None)
        splits[split] = ({n: z[f"{n}_{split}"] for n in names}, None if label_key is None else z[label_key])
    return Dataset(splits["train"][0], splits["train"][1], splits["test"][0], splits["test"][1], name=p.name)


def load_dataset(data: str, input_dims: Optional[Sequence] = None,
                 input_names: Optional[Sequence[str]] = None) -> Dataset:
    if str(data) == "digits":
        if input_names is not None and len(input_names) != 1:
            raise DataError(f"the digits set feeds one model input; the model has {len(input_names)} "
                            f"({', '.join(input_names)})")
        return load_digits_dataset(input_dims)
    return load_npz(os.fspath(data), input_names)


def validate_dataset(ds: Dataset, input_dims, input_name: Optional[str], loss: str,
                     output_dims: Optional[Sequence], input_dtypes: Optional[dict] = None) -> Dataset:
    """Check shapes, NaN and labels against the model and the loss; return the converted arrays.

    One data input: ``input_dims`` its dims, ``input_name`` its name.  Several (``ds.x_train`` a
    dict): ``input_dims`` maps each model input to its dims and ``input_dtypes`` to its numpy
    dtype (integer inputs, token ids and masks, must hold integers).
    """
    out = {}
    for split in ("train", "test"):
        xs, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        if loss != "output" and y is None:
            raise DataError(f"the data has no labels for its {split} split; loss {loss} needs them "
                            f"(labels_{split} in the .npz)")
        if not isinstance(xs, dict):
            x, y = validate_arrays(xs, y, input_dims, input_name, loss, output_dims,
                                   x_name=f"x_{split}", y_name=f"y_{split}")
            out[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.float32)
        else:
            dims = dict(input_dims or {})
            dtypes = dict(input_dtypes or {})
            converted = {}
            for name, x in xs.items():
                want = np.dtype(dtypes.get(name, np.float32))
                x, y = validate_arrays(x, y, dims.get(name), name, loss, output_dims,
                                       x_name=f"{name}_{split}", y_name=f"labels_{split}")
                if np.issubdtype(want, np.integer) and not np.issubdtype(x.dtype, np.integer):
                    raise DataError(f"{name}_{split} has dtype {x.dtype}; model input {name!r} takes integers "
                                    f"({want})")
                converted[name] = np.ascontiguousarray(x, dtype=want)
            check_shared_dims(converted, dims, lambda n, s=split: f"{n}_{split}")
            out[f"x_{split}"] = converted
        out[f"y_{split}"] = (None if y is None else
                             np.asarray(y, dtype=np.int64) if loss in ("cross_entropy", "lm_cross_entropy")
                             else np.ascontiguousarray(y, dtype=np.float32))
    return Dataset(**out, name=ds.name)


def check_shared_dims(arrays: dict, dims: dict, label=lambda name: name) -> None:
    """Inputs whose dims share a symbolic name (``N``, ``T``) must agree on its size: ``input_ids`` and
    ``attention_mask`` of one batch have the same sequence length.  ``label(name)`` names an array."""
    seen: dict = {}
    for name, arr in arrays.items():
        for axis, d in enumerate(dims.get(name) or ()):
            if isinstance(d, str) and d and axis < np.ndim(arr):
                size = int(np.shape(arr)[axis])
                first = seen.setdefault(d, (name, size))
                if first[1] != size:
                    raise DataError(f"{label(name)} has {d}={size} (axis {axis}), but {label(first[0])} has "
                                    f"{d}={first[1]}; the model's inputs share that dimension")


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
    elif loss == "lm_cross_entropy":
        n_classes = output_dims[2] if output_dims is not None and len(output_dims) == 3 else None
        want_t = output_dims[1] if output_dims is not None and len(output_dims) == 3 else None
        if y.ndim != 2 or (isinstance(want_t, int) and y.shape[1] != want_t):
            raise DataError(f"{y_name} has shape {tuple(y.shape)}; lm_cross_entropy needs N x "
                            f"{want_t if isinstance(want_t, int) else 'T'} next-token labels (-100: ignored)")
    elif output_dims is not None:
        if y.ndim != len(output_dims) or any(isinstance(d, int) and d != s
                                              for d, s in zip(output_dims[1:], y.shape[1:])):
            raise DataError(f"{y_name} has shape {tuple(y.shape)}, but the model output is "
                            f"N x {' x '.join(str(d) if isinstance(d, int) else '?' for d in output_dims[1:])}")
    check_targets(loss, y, n_classes, what=y_name)
    return x, y


def causal_lm_labels(input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Next-token labels for a causal language model: ``labels[:, t] = input_ids[:, t + 1]``, and
    ``-100`` (ignored by the ``lm_cross_entropy`` loss) at the last position and wherever the next
    token is padding (``attention_mask`` 0)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise DataError(f"input_ids has shape {tuple(ids.shape)}; causal LM labels need N x T token ids")
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[:, :-1] = ids[:, 1:]
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise DataError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        labels[:, :-1][mask[:, 1:] == 0] = IGNORE_INDEX
    return labels
