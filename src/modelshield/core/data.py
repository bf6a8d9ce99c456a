"""Datasets: load labelled inputs from common offline formats, validate them, split them.

:func:`load_dataset` reads

* ``.npz`` archives holding arrays ``x`` and ``y`` (the standard format; never unpickled),
* CSV files with a header row (one label column, all other columns numeric features),
* IDX files (the MNIST / Fashion-MNIST format, gzipped or not),
* image folders ``root/<class_name>/*.png`` (Pillow, ``pip install 'modelshield[images]'``),
* the bundled scikit-learn digits (``"digits"`` or ``"bundled:digits"``), for demos and tests.

Every problem with the data raises :class:`~modelshield.core.errors.DataError` with a
one-line message that starts with the file and names the problem.
"""

from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import importlib.resources
import io
import logging
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.io import atomic_open, sha256_file
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import check_bounds

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_DATASETS", "Dataset", "check_dataset", "load_dataset"]

#: Names accepted as ``load_dataset(name)`` or ``load_dataset("bundled:" + name)``.
BUNDLED_DATASETS: tuple[str, ...] = ("digits",)

_SUPPORTED = (
    "a .npz with arrays x and y, a CSV with a header row, an IDX images/labels pair, "
    "an image folder root/<class>/*.png, or 'bundled:digits'"
)
_IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"idx\d", re.IGNORECASE)


# -- the dataset type --------------------------------------------------------------------------
@dataclass(eq=False)
class Dataset:
    """Labelled inputs: ``x`` float32 ``(N, ...)`` and ``y`` int64 ``(N,)`` class indices.

    ``source`` is the file or directory read (``"bundled:digits"`` for the bundle) and
    ``meta`` holds JSON-serialisable facts about it (format, class names, sha256, scale).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "dataset"
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, shape={tuple(self.input_shape)}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``x.shape[1:]``."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def classes(self) -> list[str] | None:
        """Class names when the source has them (image folders, CSV text labels)."""
        names = self.meta.get("classes")
        return list(names) if names is not None else None

    def subset(self, idx: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        """The samples at ``idx`` (integer indices in ``[0, N)`` or a boolean mask)."""
        n = len(self)
        index = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
        if index.dtype == torch.bool:
            if index.shape != (n,):
                raise InvalidConfigError(
                    f"boolean mask must have shape ({n},), got {tuple(index.shape)}"
                )
            index = index.nonzero().flatten()
        elif index.numel() == 0:
            index = index.to(torch.long).flatten()
        elif index.dtype.is_floating_point or index.dtype.is_complex or index.ndim != 1:
            raise InvalidConfigError(
                f"idx must be a 1-D sequence of integer indices or a boolean mask, "
                f"got dtype {index.dtype} and shape {tuple(index.shape)}"
            )
        index = index.to(torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise InvalidConfigError(
                f"idx must lie in [0, {n}), got values in [{int(index.min())}, {int(index.max())}]"
            )
        dev = self.x.device
        return Dataset(
            x=self.x[index.to(dev)],
            y=self.y[index.to(self.y.device)],
            num_classes=self.num_classes,
            name=self.name,
            source=self.source,
            meta=copy.deepcopy(self.meta),
        )

    def split(
        self, fraction: float, seed: int = 0, *, stratify: bool = True
    ) -> tuple[Dataset, Dataset]:
        """Split into ``(first, rest)`` with ``round(fraction * N)`` samples in ``first``.

        Stratified by default: every class is split in the same proportion (largest
        remainder rounding), so the first part has exactly ``round(fraction * N)`` samples.
        The same ``seed`` gives the same split; both parts keep the original sample order.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise InvalidConfigError(f"fraction must be a number in (0, 1), got {fraction!r}")
        if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
            raise InvalidConfigError(f"fraction must be in (0, 1), got {fraction!r}")
        check_seed(seed)
        n = len(self)
        if n < 2:
            raise DataError(f"{self.source}: cannot split {n} sample(s) into two parts")
        k = min(max(round(fraction * n), 1), n - 1)
        gen = make_generator(seed)
        y = self.y.detach().cpu()
        if stratify:
            labels = y.numpy()
            classes, counts = np.unique(labels, return_counts=True)
            quotas = fraction * counts
            take = np.floor(quotas).astype(np.int64)
            remaining = k - int(take.sum())
            if remaining > 0:
                # largest fractional part first; ties broken by class order (deterministic)
                order = sorted(
                    (i for i in range(len(classes)) if take[i] < counts[i]),
                    key=lambda i: (-(quotas[i] - take[i]), i),
                )
                for i in order[:remaining]:
                    take[i] += 1
            first: list[torch.Tensor] = []
            for cls, t in zip(classes.tolist(), take.tolist(), strict=True):
                members = (y == cls).nonzero().flatten()
                perm = torch.randperm(len(members), generator=gen)
                first.append(members[perm[:t]])
            first_idx = torch.cat(first)
        else:
            first_idx = torch.randperm(n, generator=gen)[:k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[first_idx] = True
        part_a, part_b = self.subset(mask), self.subset(~mask)
        for part, which in ((part_a, 0), (part_b, 1)):
            part.meta["split"] = {
                "fraction": float(fraction),
                "seed": seed,
                "part": which,
                "stratify": stratify,
            }
        return part_a, part_b

    def to_npz(self, path: str | os.PathLike[str]) -> Path:
        """Write ``x``, ``y``, ``num_classes`` (and class names) as ``.npz``, atomically.

        The file loads back with :func:`load_dataset` (no pickles inside).
        """
        arrays: dict[str, np.ndarray] = {
            "x": self.x.detach().cpu().to(torch.float32).numpy(),
            "y": self.y.detach().cpu().to(torch.int64).numpy(),
            "num_classes": np.asarray(self.num_classes, dtype=np.int64),
        }
        if self.classes is not None:
            arrays["classes"] = np.asarray([str(c) for c in self.classes], dtype=np.str_)
        target = Path(path)
        with atomic_open(target, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy stub quirk
        logger.info("wrote %d samples to %s", len(self), target)
        return target

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary: size, shape, classes, value range, provenance."""
        n = len(self)
        x = self.x.detach()
        counts = (
            torch.bincount(self.y.detach().cpu(), minlength=self.num_classes).tolist()
            if n and int(self.y.min()) >= 0
            else []
        )
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "format": self.meta.get("format"),
            "n": n,
            "shape": list(self.input_shape),
            "dtype": str(x.dtype).replace("torch.", ""),
            "num_classes": self.num_classes,
            "class_counts": counts,
            "classes": self.classes,
            "min": float(x.min()) if n else None,
            "max": float(x.max()) if n else None,
            "scale": self.meta.get("scale"),
            "sha256": self.meta.get("sha256"),
        }
        if self.meta.get("sha256_of"):
            out["sha256_of"] = self.meta["sha256_of"]
        return out


# -- validation --------------------------------------------------------------------------------
def check_dataset(
    ds: Dataset,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
) -> Dataset:
    """Check a :class:`Dataset` against its own contract and, when given, a model's.

    Raises :class:`DataError` on: wrong tensor types, no samples, ``x``/``y`` length
    mismatch, NaN/inf in ``x``, labels outside ``[0, num_classes)``, values outside
    ``bounds`` and a sample shape other than ``input_shape``. Returns ``ds`` unchanged.
    """
    src = ds.source or ds.name
    x, y = ds.x, ds.y
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(
            f"{src}: x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if not x.is_floating_point():
        raise DataError(f"{src}: x must be a floating-point tensor, got {x.dtype}")
    if y.dtype != torch.int64:
        raise DataError(f"{src}: y must be an int64 tensor of class indices, got {y.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{src}: x must have shape (N, ...) with at least one feature dimension, "
            f"got {tuple(x.shape)}"
        )
    if y.ndim != 1:
        raise DataError(f"{src}: y must have shape (N,), got {tuple(y.shape)}")
    n = int(x.shape[0])
    if n == 0:
        raise DataError(f"{src}: no samples")
    if int(y.shape[0]) != n:
        raise DataError(
            f"{src}: x and y lengths differ: x has {n} samples, y has {int(y.shape[0])} labels"
        )
    finite = torch.isfinite(x).reshape(n, -1)
    if not bool(finite.all()):
        bad = ~finite
        count = int(bad.sum())
        first = int(bad.any(dim=1).nonzero()[0, 0])
        raise DataError(f"{src}: x has {count} NaN/inf value(s), the first in sample {first}")
    if num_classes is not None:
        nc = _check_num_classes(num_classes)
    elif (
        isinstance(ds.num_classes, bool)
        or not isinstance(ds.num_classes, int)
        or ds.num_classes < 2
    ):
        raise DataError(f"{src}: num_classes must be an integer >= 2, got {ds.num_classes!r}")
    else:
        nc = ds.num_classes
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0:
        at = int((y < 0).nonzero()[0, 0])
        raise DataError(
            f"{src}: label {ymin} at sample {at} is negative; labels must be class indices "
            f"0..{nc - 1}"
        )
    if ymax >= nc:
        at = int((y >= nc).nonzero()[0, 0])
        raise DataError(
            f"{src}: label {int(y[at])} at sample {at} is outside [0, {nc}) (num_classes={nc})"
        )
    if bounds is not None:
        lo, hi = check_bounds(bounds)
        xmin, xmax = float(x.min()), float(x.max())
        tol = 1e-6 * (hi - lo)
        if xmin < lo - tol or xmax > hi + tol:
            raise DataError(
                f"{src}: values span [{xmin:g}, {xmax:g}], outside bounds [{lo:g}, {hi:g}]; "
                f"{_scale_hint(xmin, xmax, lo, hi)}"
            )
    if input_shape is not None:
        want = _check_shape(input_shape)
        if ds.input_shape != want:
            raise DataError(
                f"{src}: sample shape {ds.input_shape} does not match input_shape {want}"
            )
    return ds


def _scale_hint(xmin: float, xmax: float, lo: float, hi: float) -> str:
    if xmin >= 0 and xmax > hi and hi > 0:
        factor = 255 if xmax <= 255 else math.ceil(xmax / hi)
        return (
            f"rescale it, e.g. --scale {factor} (scale={factor} in Python) divides by {factor}, "
            "or set --bounds"
        )
    return "rescale the data (--scale N divides by N) or set --bounds to the model's input range"


def _check_num_classes(num_classes: Any) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 2
    ):
        raise InvalidConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_shape(shape: Sequence[int] | str) -> tuple[int, ...]:
    if isinstance(shape, str):
        parts = [p for p in re.split(r"[,x×\s]+", shape.strip("()[] ")) if p]
        try:
            shape = [int(p) for p in parts]
        except ValueError:
            raise InvalidConfigError(
                f"input_shape must be sizes like '1,28,28', got {shape!r}"
            ) from None
    try:
        dims = tuple(int(s) for s in shape)
        ok = bool(dims) and all(
            d > 0 and not isinstance(s, bool) for d, s in zip(dims, shape, strict=True)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidConfigError(f"input_shape must be positive integer sizes, got {shape!r}")
    return dims


def _parse_scale(scale: str | float) -> float | None:
    """``None`` for "auto", 1.0 for "none", else the divisor."""
    if isinstance(scale, str):
        s = scale.strip().lower()
        if s == "auto":
            return None
        if s == "none":
            return 1.0
        try:
            value = float(s)
        except ValueError:
            raise InvalidConfigError(
                f"scale must be 'auto', 'none' or a positive number, got {scale!r}"
            ) from None
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidConfigError(
            f"scale must be 'auto', 'none' or a positive number, got {scale!r}"
        )
    else:
        value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise InvalidConfigError(f"scale must be a positive finite number, got {scale!r}")
    return value


# -- loading -----------------------------------------------------------------------------------
@dataclass
class _Raw:
    """What a reader returns before scaling and validation."""

    x: np.ndarray
    y: np.ndarray
    name: str
    source: str
    meta: dict[str, Any]
    integer_valued: bool = False  # x holds whole numbers even if its dtype is float (CSV)
    num_classes: int | None = None  # stored in the file
    classes: list[str] | None = None


def load_dataset(
    path: str | os.PathLike[str],
    *,
    label_column: str | int | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | str | None = None,
    scale: str | float = "auto",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    x_key: str = "x",
    y_key: str = "y",
) -> Dataset:
    """Load a labelled dataset from ``path`` (format chosen by extension and content).

    ``path`` is a ``.npz`` (arrays ``x_key``/``y_key``), a CSV (header row; label column
    ``label_column``, default ``"label"`` if present else the last), an IDX images file
    (labels found beside it), a directory holding one IDX pair, ``"IMAGES,LABELS"``, an
    image folder ``root/<class>/*.png``, or ``"digits"`` / ``"bundled:digits"``.

    ``scale="auto"`` divides whole-number data in ``[0, 255]`` (max > 1) by 255; ``"none"``
    leaves values alone; a number divides by it. Afterwards values must lie in ``bounds``
    (``None`` skips that check). Flat features are reshaped to ``input_shape`` when the
    sizes agree. ``num_classes`` defaults to the file's class count, else ``max(y) + 1``.
    """
    divisor = _parse_scale(scale)
    bounds_v = None if bounds is None else check_bounds(bounds)
    shape_v = None if input_shape is None else _check_shape(input_shape)
    nc_arg = None if num_classes is None else _check_num_classes(num_classes)
    raw = _read(path, label_column=label_column, x_key=x_key, y_key=y_key)
    return _finish(raw, divisor=divisor, bounds=bounds_v, input_shape=shape_v, num_classes=nc_arg)


def _read(
    path: str | os.PathLike[str], *, label_column: str | int | None, x_key: str, y_key: str
) -> _Raw:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidConfigError(f"path must be a file path or name, got {type(path).__name__}")
    spec = os.fspath(path)
    key = spec.strip()
    if key.lower().startswith("bundled:"):
        _refuse_label_column(label_column, spec, "bundled")
        return _read_bundled(key.split(":", 1)[1])
    if key in BUNDLED_DATASETS:
        if not Path(key).exists():
            _refuse_label_column(label_column, spec, "bundled")
            return _read_bundled(key)
        logger.warning(
            "%r is a local path; reading it (use 'bundled:%s' for the bundled dataset)", key, key
        )
    p = Path(spec).expanduser()
    if not p.exists() and "," in spec:
        parts = [Path(s.strip()).expanduser() for s in spec.split(",")]
        if len(parts) != 2 or not all(str(q) not in ("", ".") for q in parts):
            raise DataError(f"{spec}: expected 'IMAGES,LABELS' (two IDX files)")
        if any(q.exists() for q in parts):
            _refuse_label_column(label_column, spec, "IDX")
            return _read_idx_pair(parts[0], parts[1])
    if not p.exists():
        raise DataError(f"{spec}: no such file or directory")
    if p.is_dir():
        pair = _idx_pair_in_dir(p)
        if pair is not None:
            _refuse_label_column(label_column, spec, "IDX")
            return _read_idx_pair(*pair)
        _refuse_label_column(label_column, spec, "image folder")
        return _read_image_folder(p)
    kind = _sniff(p)
    if kind == "csv":
        return _read_csv(p, label_column)
    _refuse_label_column(label_column, spec, kind)
    if kind == "npz":
        return _read_npz(p, x_key=x_key, y_key=y_key)
    return _read_idx_pair(*_idx_partner(p))


def _refuse_label_column(label_column: str | int | None, spec: str, kind: str) -> None:
    if label_column is not None:
        raise InvalidConfigError(
            f"label_column applies to CSV files only; {spec} is read as {kind} data"
        )


def _sniff(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return "csv"
    if name.endswith((".pt", ".pth", ".pkl", ".pickle", ".joblib")):
        raise DataError(
            f"{p}: pickle-based files are not read as data (loading them can run code); "
            "save the arrays with numpy.savez(path, x=..., y=...)"
        )
    head = _head(p, 8)
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        raise DataError(
            f"{p}: a .npy file holds one array; save inputs and labels together with "
            "numpy.savez(path, x=..., y=...)"
        )
    if _IDX_NAME.search(name) or "ubyte" in name or _is_idx_magic(head):
        return "idx"
    if head.startswith(_GZIP_MAGIC):
        try:
            with gzip.open(p, "rb") as fh:
                inner = fh.read(4)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{p}: unreadable gzip file ({e})") from None
        return "idx" if _is_idx_magic(inner) else "csv"
    if name.endswith(".txt") or _looks_like_text(p):
        return "csv"
    raise DataError(f"{p}: unrecognised data format; expected {_SUPPORTED}")


def _head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError as e:
        raise DataError(f"{p}: cannot read file ({e.strerror or e})") from None


def _looks_like_text(p: Path) -> bool:
    chunk = _head(p, 4096)
    if not chunk or b"\x00" in chunk:
        return False
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(chunk) - 4  # a multi-byte character cut at the chunk's end
    return True


def _finish(
    raw: _Raw,
    *,
    divisor: float | None,
    bounds: tuple[float, float] | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
) -> Dataset:
    src = raw.source
    x = _check_x(raw.x, src)
    y = _labels_to_int(raw.y, src)
    n = x.shape[0]
    if n == 0:
        raise DataError(f"{src}: no samples")
    if y.shape[0] != n:
        raise DataError(
            f"{src}: x and y lengths differ: x has {n} samples, y has {y.shape[0]} labels"
        )
    if x.dtype.kind == "f":
        finite = np.isfinite(x.reshape(n, -1))
        if not finite.all():
            count = int((~finite).sum())
            first = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise DataError(f"{src}: x has {count} NaN/inf value(s), the first in sample {first}")
    applied = 1.0
    if divisor is None:  # auto
        integer = x.dtype.kind in "iu" or raw.integer_valued
        if integer and x.dtype.kind != "b":
            xmin, xmax = float(x.min()), float(x.max())
            if 1 < xmax <= 255 and xmin >= 0:
                applied = 255.0
                logger.info(
                    "%s: whole-number values in [%g, %g]; dividing by 255 (scale='auto')",
                    src,
                    xmin,
                    xmax,
                )
    else:
        applied = divisor
    xf = np.array(x, dtype=np.float32, order="C")  # always a fresh, writable copy
    if applied != 1.0:
        xf /= np.float32(applied)
    tensor = torch.from_numpy(xf)
    if input_shape is not None and tuple(tensor.shape[1:]) != input_shape:
        tensor = _maybe_reshape(tensor, input_shape, src)
    ymax = int(y.max())
    if num_classes is not None:
        nc = num_classes
    elif raw.num_classes is not None:
        nc = max(raw.num_classes, ymax + 1, 2)
    elif raw.classes is not None:
        nc = max(len(raw.classes), ymax + 1, 2)
    else:
        nc = max(ymax + 1, 2)
    meta = dict(raw.meta)
    meta["scale"] = applied
    if raw.classes is not None:
        meta["classes"] = list(raw.classes)
    ds = Dataset(
        x=tensor,
        y=torch.from_numpy(y),
        num_classes=nc,
        name=raw.name,
        source=src,
        meta=meta,
    )
    check_dataset(ds, input_shape=input_shape, bounds=bounds)
    logger.debug("loaded %r", ds)
    return ds


def _check_x(x: np.ndarray, src: str) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{src}: x has dtype {x.dtype}; expected numbers (int, uint or float)")
    if x.ndim < 2:
        raise DataError(
            f"{src}: x must have shape (N, ...) with at least one feature dimension, got {x.shape}"
        )
    return x


def _labels_to_int(y: np.ndarray, src: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot labels? take argmax over axis 1)" if y.ndim == 2 else ""
        raise DataError(f"{src}: y must have shape (N,) of class indices, got {y.shape}{hint}")
    if y.dtype.kind in "biu":
        if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{src}: label {int(y.max())} is too large for a class index")
        return np.ascontiguousarray(y, dtype=np.int64)
    if y.dtype.kind != "f":
        raise DataError(f"{src}: y has dtype {y.dtype}; expected integer class indices")
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{src}: y must be integer class indices; label {y[at]!r} at sample {at} is not"
        )
    return np.ascontiguousarray(y, dtype=np.int64)


def _maybe_reshape(x: torch.Tensor, want: tuple[int, ...], src: str) -> torch.Tensor:
    """Reshape flat (or singleton-padded) samples to ``want`` when nothing is reordered."""
    have = tuple(x.shape[1:])
    same_size = math.prod(have) == math.prod(want)
    squeezed = tuple(d for d in have if d != 1) == tuple(d for d in want if d != 1)
    if same_size and (len(have) == 1 or squeezed):
        logger.info("%s: reshaping samples from %s to input_shape %s", src, have, want)
        return x.reshape(x.shape[0], *want)
    hint = ""
    if same_size and len(have) == len(want) and sorted(have) == sorted(want):
        hint = " (channels-last data? transpose it to channels-first)"
    raise DataError(f"{src}: sample shape {have} does not match input_shape {want}{hint}")


# -- npz ---------------------------------------------------------------------------------------
def _read_npz(
    p: Path, *, x_key: str, y_key: str, name: str | None = None, source: str | None = None
) -> _Raw:
    src = source or str(p)
    try:
        # our own handle: np.load(path) leaks its file when the zip is corrupt
        with open(p, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{src}: not an .npz archive (arrays x and y in one zip)")
            keys = list(z.files)
            for k, arg in ((x_key, "x_key"), (y_key, "y_key")):
                if k not in keys:
                    raise DataError(
                        f"{src}: no array {k!r} (arrays: {', '.join(keys) or 'none'}); "
                        f"choose one with {arg}="
                    )
            x, y = z[x_key], z[y_key]
            extras = {
                k: z[k] for k in ("num_classes", "classes", "provenance", "license") if k in keys
            }
    except DataError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object arrays" in str(e).lower():
            raise DataError(
                f"{src}: holds pickled (object) arrays, which are refused because loading "
                "them can run code; save plain numeric arrays"
            ) from None
        raise DataError(f"{src}: corrupt or unreadable .npz ({e})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{src}: corrupt or unreadable .npz ({e})") from None
    stored_nc = _scalar_int(extras["num_classes"]) if "num_classes" in extras else None
    names = extras.get("classes")
    classes = (
        [str(c) for c in names.tolist()]
        if names is not None and names.dtype.kind == "U" and names.ndim == 1
        else None
    )
    meta: dict[str, Any] = {"format": "npz", "x_key": x_key, "y_key": y_key}
    for k in ("provenance", "license"):
        if k in extras and extras[k].dtype.kind == "U" and extras[k].ndim == 0:
            meta[k] = str(extras[k].item())
    meta["sha256"] = sha256_file(p)
    meta["sha256_of"] = "file"
    return _Raw(
        x=x,
        y=y,
        name=name or _stem(p),
        source=src,
        meta=meta,
        num_classes=stored_nc,
        classes=classes,
    )


def _scalar_int(a: np.ndarray) -> int | None:
    if a.ndim == 0 and a.dtype.kind in "iu":
        return int(a)
    return None


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".gz", ".npz", ".csv", ".tsv", ".txt"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or p.name


# -- bundled -----------------------------------------------------------------------------------
def _read_bundled(name: str) -> _Raw:
    if name not in BUNDLED_DATASETS:
        raise DataError(
            f"bundled:{name}: no such bundled dataset (bundled: {', '.join(BUNDLED_DATASETS)})"
        )
    ref = importlib.resources.files("modelshield.core").joinpath(f"_data/{name}.npz")
    with importlib.resources.as_file(ref) as p:
        if not p.is_file():
            raise DataError(f"bundled:{name}: the bundled file is missing from the install ({p})")
        raw = _read_npz(p, x_key="x", y_key="y", name=name, source=f"bundled:{name}")
    raw.meta["format"] = "bundled"
    return raw


# -- CSV ---------------------------------------------------------------------------------------
def _open_text(p: Path) -> IO[str]:
    if _head(p, 2) == _GZIP_MAGIC:
        return gzip.open(p, "rt", encoding="utf-8-sig", newline="")
    return open(p, encoding="utf-8-sig", newline="")


def _read_csv(p: Path, label_column: str | int | None) -> _Raw:
    src = str(p)
    try:
        with _open_text(p) as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{src}: not UTF-8 text (byte {e.start}); expected a CSV file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{src}: cannot read file ({e})") from None
    first_line = text.split("\n", 1)[0]
    if p.name.lower().endswith((".tsv", ".tsv.gz")):
        delim = "\t"
    else:
        delim = max((",", ";", "\t"), key=first_line.count)
        if first_line.count(delim) == 0:
            delim = ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"{src}: empty file; expected a CSV with a header row")
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise DataError(
            f"{src}: CSV needs a label column and at least one feature column, "
            f"found {len(header)} column(s) (delimiter {delim!r})"
        )
    if all(_is_number(h) for h in header):
        logger.warning("%s: first row is all numbers; it is read as the header (column names)", src)
    label_idx = _label_index(header, label_column, src)
    feat_idx = [j for j in range(len(header)) if j != label_idx]

    table = _csv_fast(text, delim, len(header), label_idx, feat_idx)
    x, labels = table or _csv_slow(text, delim, header, label_idx, feat_idx, src)
    classes: list[str] | None = None
    if labels.dtype.kind == "U":
        classes = sorted(set(labels.tolist()))
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.asarray([lookup[s] for s in labels.tolist()], dtype=np.int64)
        logger.info("%s: %d text labels mapped to class indices by name", src, len(classes))
    else:
        y = labels
    finite = x[np.isfinite(x)]
    integer_valued = bool(finite.size) and bool(np.all(finite == np.floor(finite)))
    meta = {
        "format": "csv",
        "label_column": header[label_idx],
        "feature_columns": [header[j] for j in feat_idx],
        "delimiter": delim,
        "sha256": sha256_file(p),
        "sha256_of": "file",
    }
    return _Raw(
        x=x,
        y=y,
        name=_stem(p),
        source=src,
        meta=meta,
        integer_valued=integer_valued,
        classes=classes,
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _label_index(header: list[str], label_column: str | int | None, src: str) -> int:
    if label_column is None:
        if "label" in header:
            return header.index("label")
        lowered = [h.lower() for h in header]
        return lowered.index("label") if "label" in lowered else len(header) - 1
    if isinstance(label_column, bool):
        raise InvalidConfigError(f"label_column must be a column name, got {label_column!r}")
    if isinstance(label_column, int):
        if not -len(header) <= label_column < len(header):
            raise DataError(
                f"{src}: label_column {label_column} is out of range for {len(header)} columns"
            )
        return label_column % len(header)
    if label_column not in header:
        shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
        raise DataError(f"{src}: no column named {label_column!r} (columns: {shown})")
    return header.index(label_column)


def _csv_fast(
    text: str, delim: str, ncols: int, label_idx: int, feat_idx: list[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """numpy's C parser for the common all-numeric case; ``None`` when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = np.loadtxt(
                io.StringIO(text),
                delimiter=delim,
                skiprows=1,
                dtype=np.float64,
                ndmin=2,
                comments=None,
            )
    except ValueError:
        return None
    if table.shape[0] == 0 or table.shape[1] != ncols:
        return None
    return np.ascontiguousarray(table[:, feat_idx]), table[:, label_idx]


def _csv_slow(
    text: str, delim: str, header: list[str], label_idx: int, feat_idx: list[int], src: str
) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, to name the row and column of the first bad cell."""
    ncols = len(header)
    rows: list[list[float]] = []
    label_cells: list[tuple[str, int, int]] = []  # (text, row, line)
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    next(reader, None)  # the header
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        line = reader.line_num
        r = len(rows) + 1
        if len(row) != ncols:
            raise DataError(
                f"{src}: row {r} (line {line}) has {len(row)} fields but the header has {ncols}"
            )
        values: list[float] = []
        for j in feat_idx:
            cell = row[j]
            try:
                values.append(float(cell))
            except ValueError:
                raise DataError(
                    f"{src}: non-numeric value {cell!r} at row {r} (line {line}), "
                    f"column {header[j]!r}"
                ) from None
        rows.append(values)
        label_cells.append((row[label_idx].strip(), r, line))
    if not rows:
        raise DataError(f"{src}: no samples (the CSV has a header but no data rows)")
    numeric = [_is_number(c) for c, _, _ in label_cells]
    if all(numeric):
        labels: np.ndarray = np.asarray([float(c) for c, _, _ in label_cells], dtype=np.float64)
    elif not any(numeric):
        labels = np.asarray([c for c, _, _ in label_cells], dtype=np.str_)
    else:
        cell, r, line = label_cells[numeric.index(False)]
        raise DataError(
            f"{src}: non-numeric label {cell!r} at row {r} (line {line}), column "
            f"{header[label_idx]!r}, while other labels are numbers"
        )
    return np.asarray(rows, dtype=np.float64), labels


# -- IDX ---------------------------------------------------------------------------------------
def _is_idx_magic(head: bytes) -> bool:
    return (
        len(head) >= 4
        and head[0] == 0
        and head[1] == 0
        and head[2] in _IDX_DTYPES
        and 1 <= head[3] <= 8
    )


def _read_idx(p: Path) -> tuple[np.ndarray, str]:
    """Parse one IDX file (gzipped or not); returns the array and the file's sha256."""
    try:
        blob = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file or directory") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read file ({e.strerror or e})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if blob[:2] == _GZIP_MAGIC:
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{p}: corrupt gzip data ({e})") from None
    if not _is_idx_magic(blob[:4]):
        raise DataError(
            f"{p}: not an IDX file (magic bytes {blob[:4].hex() or 'missing'}; "
            "expected 0000 <type> <ndim>)"
        )
    dtype = np.dtype(_IDX_DTYPES[blob[2]])
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{p}: truncated IDX header ({len(blob)} bytes, need {header})")
    dims = [int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4)]
    count = math.prod(dims)
    expected = count * dtype.itemsize
    have = len(blob) - header
    if have < expected:
        raise DataError(
            f"{p}: truncated IDX data: header declares shape {tuple(dims)} "
            f"({expected} bytes) but the file holds {have}"
        )
    if have > expected:
        raise DataError(
            f"{p}: corrupt IDX file: {have - expected} bytes follow the data the header "
            f"declares (shape {tuple(dims)})"
        )
    arr = np.frombuffer(blob, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True), digest


def _idx_swap(name: str, to_labels: bool) -> list[str]:
    """Candidate partner names: images<->labels and idx3<->idx1, with and without .gz."""
    pairs = (("images", "labels"), ("idx3", "idx1"))
    out = name
    for a, b in pairs:
        src, dst = (a, b) if to_labels else (b, a)
        out = re.sub(src, dst, out, flags=re.IGNORECASE)
    if out == name:
        return []
    base = out[:-3] if out.lower().endswith(".gz") else out
    return list(dict.fromkeys([out, base, base + ".gz"]))


def _is_labels_name(name: str) -> bool:
    low = name.lower()
    return "labels" in low or "idx1" in low


def _idx_partner(p: Path) -> tuple[Path, Path]:
    """``(images, labels)`` for an IDX file given either one of the pair."""
    is_labels = _is_labels_name(p.name)
    candidates = _idx_swap(p.name, to_labels=not is_labels)
    for c in candidates:
        q = p.with_name(c)
        if q != p and q.is_file():
            return (q, p) if is_labels else (p, q)
    what = "images" if is_labels else "labels"
    looked = ", ".join(dict.fromkeys(candidates)) or "a name with images->labels, idx3->idx1"
    raise DataError(
        f"{p}: {what} file not found beside it (looked for {looked}); pass both as 'IMAGES,LABELS'"
    )


def _idx_pair_in_dir(d: Path) -> tuple[Path, Path] | None:
    files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    idx_files = [f for f in files if _IDX_NAME.search(f.name) and "ubyte" in f.name.lower()]
    if not idx_files:
        return None
    images = [f for f in idx_files if not _is_labels_name(f.name)]
    pairs: list[tuple[Path, Path]] = []
    for img in images:
        for c in _idx_swap(img.name, to_labels=True):
            q = img.with_name(c)
            if q.is_file():
                pairs.append((img, q))
                break
    # the same images file gzipped and not counts once
    unique = {(_stem(a), _stem(b)): (a, b) for a, b in pairs}
    if len(unique) == 1:
        return next(iter(unique.values()))
    if not unique:
        raise DataError(
            f"{d}: IDX files found ({', '.join(f.name for f in idx_files[:4])}) but no "
            "images/labels pair; pass both as 'IMAGES,LABELS'"
        )
    names = ", ".join(a.name for a, _ in unique.values())
    raise DataError(f"{d}: holds {len(unique)} IDX pairs ({names}); name the images file to load")


def _read_idx_pair(images: Path, labels: Path) -> _Raw:
    x, dx = _read_idx(images)
    y, dy = _read_idx(labels)
    if x.ndim == 1 and y.ndim >= 2:
        logger.info("%s: looks like the labels file; swapping with %s", images, labels)
        images, labels, x, y, dx, dy = labels, images, y, x, dy, dx
    if y.ndim != 1:
        raise DataError(f"{labels}: IDX labels must be 1-D, got shape {y.shape}")
    if x.ndim < 2:
        raise DataError(f"{images}: IDX images must have shape (N, ...), got {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{images}: x and y lengths differ: {x.shape[0]} images but {labels.name} "
            f"has {y.shape[0]} labels"
        )
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    manifest = f"{images.name}\t{dx}\n{labels.name}\t{dy}\n"
    meta = {
        "format": "idx",
        "images": str(images),
        "labels": str(labels),
        "sha256": hashlib.sha256(manifest.encode()).hexdigest(),
        "sha256_of": "manifest",
        "files_sha256": {images.name: dx, labels.name: dy},
    }
    name = re.sub(r"[-._]?images.*$", "", _stem(images), flags=re.IGNORECASE) or _stem(images)
    return _Raw(x=x, y=y, name=name, source=f"{images},{labels}", meta=meta)


# -- image folders -----------------------------------------------------------------------------
def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(
            "reading image folders needs Pillow: pip install 'modelshield[images]'"
        ) from None
    return Image


def _image_files(d: Path) -> tuple[list[Path], list[Path]]:
    images: list[Path] = []
    skipped: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            f = Path(dirpath) / fn
            (images if f.suffix.lower() in _IMAGE_EXTS else skipped).append(f)
    return images, skipped


def _decode(image_mod: Any, blob: bytes, f: Path) -> np.ndarray:
    try:
        with image_mod.open(io.BytesIO(blob)) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                pal = im.getpalette() or []
                gray = all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
                im = im.convert("L" if gray else "RGB")
            elif mode in ("1", "L", "LA", "La"):
                im = im.convert("L")
            elif mode.startswith(("I", "F")):
                return np.array(im)
            elif mode != "RGB":
                im = im.convert("RGB")
            return np.array(im)
    except Exception as e:  # Pillow raises many kinds on bad files
        raise DataError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None


def _read_image_folder(root: Path) -> _Raw:
    src = str(root)
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    if not class_dirs:
        loose = [f for f in root.iterdir() if f.suffix.lower() in _IMAGE_EXTS]
        if loose:
            raise DataError(
                f"{src}: images sit directly in the folder; an image folder needs one "
                "sub-folder per class (root/<class>/*.png)"
            )
        raise DataError(
            f"{src}: no samples: no IDX files and no class sub-folders; expected {_SUPPORTED}"
        )
    image_mod = _pil()
    files: list[tuple[Path, int]] = []
    skipped: list[Path] = []
    for label, d in enumerate(class_dirs):
        imgs, other = _image_files(d)
        if not imgs:
            raise DataError(
                f"{d}: class folder {d.name!r} has no images ({', '.join(sorted(_IMAGE_EXTS))})"
            )
        files.extend((f, label) for f in imgs)
        skipped.extend(other)
    if skipped:
        logger.warning(
            "%s: skipped %d file(s) that are not images, e.g. %s", src, len(skipped), skipped[0]
        )
    arrays: list[np.ndarray] = []
    manifest = hashlib.sha256()
    first: tuple[Path, tuple[int, int]] | None = None
    for f, _ in files:
        try:
            blob = f.read_bytes()
        except OSError as e:
            raise DataError(f"{f}: cannot read file ({e.strerror or e})") from None
        manifest.update(f"{f.relative_to(root).as_posix()}\t".encode())
        manifest.update(hashlib.sha256(blob).hexdigest().encode() + b"\n")
        a = _decode(image_mod, blob, f)
        size = (int(a.shape[1]), int(a.shape[0]))  # (width, height)
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise DataError(
                f"{src}: images differ in size: {first[0]} is {first[1][0]}x{first[1][1]}, "
                f"{f} is {size[0]}x{size[1]} (WxH); resize them to one size"
            )
        arrays.append(a)
    if any(a.ndim == 3 for a in arrays):
        if not all(a.ndim == 3 for a in arrays):
            logger.info("%s: mixed grayscale and colour images; reading all as RGB", src)
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        x = np.stack(arrays).transpose(0, 3, 1, 2)
    else:
        x = np.stack(arrays)[:, None]
    classes = [d.name for d in class_dirs]
    meta = {
        "format": "image_folder",
        "sha256": manifest.hexdigest(),
        "sha256_of": "manifest",
        "files": len(files),
    }
    y = np.asarray([label for _, label in files], dtype=np.int64)
    return _Raw(x=x, y=y, name=root.name, source=src, meta=meta, classes=classes)
