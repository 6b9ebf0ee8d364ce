"""Write onnxbp/training/digits.npz, the 8x8 digits demo set shipped inside onnxbp.

    python models/build_digits.py [OUT.npz]        (needs scikit-learn; onnxbp does not)

Source: ``sklearn.datasets.load_digits()``, whose description says: "This is a
copy of the test set of the UCI ML hand-written digits datasets
https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits"
(Creator: E. Alpaydin; Date: July 1998; 1797 instances, "8x8 image of integer
pixels in the range 0..16").  That is the file ``optdigits.tes`` of the UCI
Machine Learning Repository's *Optical Recognition of Handwritten Digits*,
E. Alpaydin and C. Kaynak (1998), https://doi.org/10.24432/C50P49,
https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits .
UCI distributes it under the Creative Commons Attribution 4.0 International
license (CC BY 4.0, https://creativecommons.org/licenses/by/4.0/); attribution
travels with the data in ``digits.npz.license`` beside the file.  The values
are unmodified (only stored as uint8); scikit-learn's BSD license covers its
code, not this data.

The file holds ``images`` (uint8, 1797 x 8 x 8, values 0..16) and ``labels``
(uint8, 1797, values 0..9) in scikit-learn's order.  It is written
byte-for-byte reproducibly (fixed zip timestamps), so rerunning the script
leaves the committed file unchanged.  ``onnxbp.training.data`` scales the
pixels to [0, 1] (/16) exactly as its scikit-learn path did.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "onnxbp" / "training" / "digits.npz"


def digits_arrays():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("build_digits.py needs scikit-learn (pip install scikit-learn); onnxbp itself does not")
    d = load_digits()
    images, labels = np.asarray(d.images), np.asarray(d.target)
    if images.shape != (1797, 8, 8) or labels.shape != (1797,):
        sys.exit(f"unexpected digits shapes {images.shape}, {labels.shape}")
    if not (np.all(images == np.round(images)) and images.min() >= 0 and images.max() <= 16):
        sys.exit("digits pixels are not integers in 0..16")
    if not (labels.min() >= 0 and labels.max() <= 9):
        sys.exit("digits labels are not in 0..9")
    if not np.array_equal(images.reshape(len(images), 64), d.data):
        sys.exit("digits images and data disagree")
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_npz(path: Path, arrays: dict) -> None:
    """An .npz that np.load reads, with fixed timestamps (reproducible bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compresslevel=9)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else OUT
    images, labels = digits_arrays()
    write_npz(out, {"images": images, "labels": labels})
    print(f"wrote {out}: {len(images)} images, {out.stat().st_size} bytes, "
          f"sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
