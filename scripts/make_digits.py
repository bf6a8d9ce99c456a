"""Build the bundled demo dataset ``src/modelshield/core/_data/digits.npz``.

Provenance: scikit-learn's ``load_digits`` (1797 8x8 images of hand-written digits, 10
classes), the test part of "Optical Recognition of Handwritten Digits" by E. Alpaydin and
C. Kaynak, UCI Machine Learning Repository (1998), https://doi.org/10.24432/C50P49,
licensed CC BY 4.0. Pixel counts 0..16 are divided by 16, so values lie in [0, 1].

The archive is written deterministically (fixed zip timestamps, fixed member order), so
running this script again gives a byte-identical file::

    python scripts/make_digits.py            # needs scikit-learn
    python scripts/make_digits.py --out other.npz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from modelshield.core.io import atomic_open

logger = logging.getLogger("make_digits")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/modelshield/core/_data/digits.npz"
PROVENANCE = (
    "scikit-learn load_digits: UCI ML hand-written digits (Optical Recognition of "
    "Handwritten Digits, E. Alpaydin and C. Kaynak, 1998, doi:10.24432/C50P49); "
    "pixel counts 0..16 divided by 16"
)
LICENSE = "CC BY 4.0"


def build_arrays() -> dict[str, np.ndarray]:
    """The arrays stored in the bundle, from scikit-learn's copy of the data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float64) / 16.0).astype(np.float32)[:, None]
    y = np.asarray(digits.target, dtype=np.int64)
    return {
        "x": x,  # (1797, 1, 8, 8) in [0, 1]
        "y": y,  # (1797,) in 0..9
        "num_classes": np.asarray(10, dtype=np.int64),
        "classes": np.asarray([str(i) for i in range(10)], dtype=np.str_),
        "provenance": np.asarray(PROVENANCE, dtype=np.str_),
        "license": np.asarray(LICENSE, dtype=np.str_),
    }


def write_npz(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Write an ``.npz`` byte-for-byte reproducibly (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    with atomic_open(out, "wb") as fh:
        fh.write(buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arrays = build_arrays()
    write_npz(arrays, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    logger.info("wrote %s (%d samples, sha256 %s)", args.out, len(arrays["y"]), digest)


if __name__ == "__main__":
    main()
