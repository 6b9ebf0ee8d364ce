"""Training data loading: the digits set shipped inside onnxbp (no scikit-learn) and .npz files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxbp.training.data import digits_arrays, load_dataset, load_digits_dataset, load_npz
from onnxbp.training.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
# UCI optdigits.tes class counts (178 zeros, 182 ones, ...), as the UCI description lists them.
UCI_TEST_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
# sha256 of images.tobytes() + labels.tobytes() (uint8, C order), as models/build_digits.py wrote them.
DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_shipped_digits_arrays():
    images, labels = digits_arrays()
    assert images.dtype == labels.dtype == np.uint8
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16 and labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == UCI_TEST_CLASS_COUNTS
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == DIGITS_SHA256


def test_shipped_digits_have_their_license_beside_them():
    here = ROOT / "onnxbp" / "training"
    text = (here / "digits.npz.license").read_text()
    assert "SPDX-License-Identifier: CC-BY-4.0" in text and "Alpaydin" in text and "Kaynak" in text
    assert "10.24432/C50P49" in text
    assert (here / "digits.npz").stat().st_size < 100_000


def test_digits_dataset_split_and_shapes():
    ds = load_dataset("digits", (None, 64))
    assert ds.name == "digits" and len(ds.x_train) == 1438 and len(ds.x_test) == 359
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32 and ds.x_train.shape[1:] == (64,)
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.x_train * 16).tolist()) <= set(range(17))  # k/16 exactly
    four = load_digits_dataset(("N", 1, 8, 8))
    assert four.x_train.shape == (1438, 1, 8, 8)
    np.testing.assert_array_equal(four.x_train.reshape(-1, 64), ds.x_train)
    with pytest.raises(DataError, match="rank 3"):
        load_digits_dataset(("N", 8, 8))


def test_digits_load_without_scikit_learn(tmp_path):
    """scikit-learn made unimportable: the digits still load, and nothing tries to import it."""
    code = ("import sys\n"
            "sys.modules['sklearn'] = None  # import sklearn now raises ImportError\n"
            "from onnxbp.training.data import load_dataset\n"
            "ds = load_dataset('digits', (None, 1, 8, 8))\n"
            "print(ds.x_train.shape, ds.x_test.shape)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1438, 1, 8, 8) (359, 1, 8, 8)"


def test_digits_equal_the_scikit_learn_path():
    """Bit for bit what the former loader built from sklearn.datasets.load_digits."""
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * 0.2))
    te, tr = idx[:n_test], idx[n_test:]
    ds = load_digits_dataset((None, 64))
    for got, want in ((ds.x_train, x[tr]), (ds.x_test, x[te]), (ds.y_train, y[tr]), (ds.y_test, y[te])):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    images, labels = digits_arrays()
    np.testing.assert_array_equal(images, d.images)
    np.testing.assert_array_equal(labels, d.target)


def test_npz_round_trip_and_errors(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x_train=np.zeros((4, 3), np.float32), y_train=np.arange(4), x_test=np.ones((2, 3), np.float32),
             y_test=np.arange(2))
    ds = load_dataset(str(p))
    assert ds.name == "d.npz" and ds.x_train.shape == (4, 3) and ds.y_test.tolist() == [0, 1]
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz")
    np.savez(tmp_path / "part.npz", x_train=np.zeros((1, 1)))
    with pytest.raises(DataError, match="lacks y_train, x_test, y_test"):
        load_npz(tmp_path / "part.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "bad.npz")
