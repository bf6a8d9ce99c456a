"""The secret key of a trigger-set watermark (Adi et al., USENIX Security 2018).

Adi, Baum, Cisse, Pinkas & Keshet, "Turning Your Weakness Into a Strength: Watermarking
Deep Neural Networks by Backdooring": the owner picks a *trigger set* of inputs with
labels chosen at random, and trains the model to give those labels. Only the owner knows
the trigger set; a model that gives the trigger labels far more often than chance carries
the mark.

A :class:`WatermarkKey` holds only a 128-bit secret seed and the public facts of the
model it belongs to (input shape, value bounds, class count). Everything else is derived
from the seed, deterministically and identically on any machine:

* the trigger **inputs** are out-of-distribution: uniform pixel noise (``"noise"``, the
  default) or abstract images (``"patterns"``: random rectangles, discs and strokes over a
  random background, with light pixel noise), drawn from the seed, never from the
  training data;
* the trigger **labels** are uniform over the ``num_classes`` classes, drawn from a second
  stream of the same seed that is cryptographically independent of the first.

Both streams are SHAKE-256 (FIPS 202) outputs of the seed under different domain tags, so
the same key gives byte-identical triggers on every machine and library version (neither
``torch.Generator`` nor NumPy's ``Generator`` methods promise that), and seeing the trigger
inputs (which verification shows the suspect) tells nothing about the labels. Pixel values
are whole levels ``k / 255`` of the bounds, computed with correctly rounded float64
arithmetic, so there is no libm or FMA difference between machines either.

The independence of labels from inputs is what makes verification exact: see
:func:`modelshield.watermark.verify.verify`.

The key file (``key.json``) is a secret: it is written atomically with mode 0600, and
:meth:`WatermarkKey.public_dict` (what reports show) leaves the seed out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.threat import check_bounds

logger = logging.getLogger(__name__)

KEY_FORMAT = "modelshield-watermark-key"
KEY_VERSION = 1
SEED_BITS = 128
TRIGGER_KINDS: tuple[str, ...] = ("noise", "patterns")
MAX_TRIGGERS = 100_000
_DOMAIN = b"modelshield/watermark/v1/"


class _Stream:
    """An endless byte stream: SHAKE-256 of (domain tag, purpose, seed).

    SHAKE is an extendable-output function: a longer digest starts with the shorter one,
    so the buffer grows by recomputing a longer digest and the stream never changes.
    """

    def __init__(self, seed: int, purpose: str) -> None:
        material = _DOMAIN + purpose.encode("ascii") + b"\x00" + seed.to_bytes(16, "big")
        self._hash = hashlib.shake_256(material)
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        need = self._pos + n
        if need > len(self._buf):
            size = max(need, 2 * len(self._buf), 4096)
            self._buf = self._hash.copy().digest(size)
        out = self._buf[self._pos : need]
        self._pos = need
        return out

    def below(self, k: int) -> int:
        """One integer uniform in ``[0, k)``: 32-bit draws, rejection above the last full
        multiple of ``k`` (exactly uniform, no modulo bias)."""
        if not 1 <= k <= 1 << 32:
            raise InvalidConfigError(f"cannot draw uniformly from [0, {k})")
        limit = (1 << 32) - ((1 << 32) % k)
        while True:
            v = int.from_bytes(self.take(4), "big")
            if v < limit:
                return v % k

    def levels(self, n: int) -> np.ndarray:
        """``n`` bytes as uint8 levels in [0, 255] (uniform: 256 levels per byte)."""
        return np.frombuffer(self.take(n), dtype=np.uint8).copy()


def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` for image shapes (``(H, W)`` counts as one channel), else ``None``."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return None


def _pattern(stream: _Stream, c: int, h: int, w: int) -> np.ndarray:
    """One abstract image as integer levels ``(C, H, W)``: a random background, 3 to 6
    random shapes (filled rectangle, disc or 1-pixel stroke) of random colours, and pixel
    noise of +-24 levels. Integer arithmetic only."""
    img = np.empty((c, h, w), dtype=np.int64)
    for ch in range(c):
        img[ch] = stream.below(256)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for _ in range(3 + stream.below(4)):
        kind = stream.below(3)
        colour = [stream.below(256) for _ in range(c)]
        if kind == 0:  # rectangle
            y0, y1 = sorted((stream.below(h), stream.below(h)))
            x0, x1 = sorted((stream.below(w), stream.below(w)))
            mask = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
        elif kind == 1:  # disc
            cy, cx = stream.below(h), stream.below(w)
            r = 1 + stream.below(max(1, min(h, w) // 3))
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:  # stroke between two points, rasterised by integer rounding
            y0, x0, y1, x1 = stream.below(h), stream.below(w), stream.below(h), stream.below(w)
            steps = max(abs(y1 - y0), abs(x1 - x0), 1)
            mask = np.zeros((h, w), dtype=bool)
            for k in range(steps + 1):
                py = y0 + (2 * k * (y1 - y0) + steps) // (2 * steps)
                px = x0 + (2 * k * (x1 - x0) + steps) // (2 * steps)
                mask[py, px] = True
        for ch in range(c):
            img[ch][mask] = colour[ch]
    noise = stream.levels(c * h * w).astype(np.int64).reshape(c, h, w) % 49 - 24
    return np.clip(img + noise, 0, 255)


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidConfigError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidConfigError(f"{name} must be {allowed}, got {v}")
    return v


@dataclass(frozen=True)
class WatermarkKey:
    """The owner's secret: a seed and the facts needed to regenerate the trigger set.

    ``seed``: the secret (an integer in ``[0, 2**128)``); ``n``: number of triggers;
    ``input_shape``: one input's shape (no batch dimension); ``bounds``: input value range;
    ``num_classes``: classes of the marked model (labels are uniform over them); ``kind``:
    ``"noise"`` (uniform pixel noise) or ``"patterns"`` (abstract images); ``model_sha256``: the file the mark was embedded in
    (informational; set by ``watermark embed``); ``created``: ISO time.

    Build one with :meth:`generate` (seed from :func:`secrets.randbits`); regenerate the
    triggers with :meth:`triggers` and :meth:`labels`; store it with :meth:`save`.
    """

    seed: int = field(repr=False)
    n: int
    input_shape: tuple[int, ...]
    num_classes: int
    bounds: tuple[float, float] = (0.0, 1.0)
    kind: str = "noise"
    model_sha256: str | None = None
    created: str = ""
    version: int = KEY_VERSION

    def __post_init__(self) -> None:
        _check_int(self.seed, "seed", 0, (1 << SEED_BITS) - 1)
        _check_int(self.n, "n (number of triggers)", 1, MAX_TRIGGERS)
        _check_int(self.num_classes, "num_classes", 2, 1 << 32)
        try:
            shape = tuple(_check_int(s, "input_shape entries", 1) for s in self.input_shape)
        except TypeError:
            raise InvalidConfigError(
                f"input_shape must be a sequence of positive integers, got {self.input_shape!r}"
            ) from None
        if not shape or math.prod(shape) > 1 << 24:
            raise InvalidConfigError(
                f"input_shape must be non-empty and at most 2**24 values, got {shape}"
            )
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "bounds", check_bounds(self.bounds))
        if self.kind not in TRIGGER_KINDS:
            raise InvalidConfigError(
                f"kind must be one of {', '.join(TRIGGER_KINDS)}, got {self.kind!r}"
            )
        if self.kind == "patterns" and _image_dims(shape) is None:
            raise InvalidConfigError(
                f"kind 'patterns' needs image inputs (C, H, W) or (H, W), got input_shape {shape}; "
                "use kind 'noise'"
            )
        if self.version != KEY_VERSION:
            raise DataError(
                f"watermark key version {self.version!r} is not supported (this modelshield "
                f"reads version {KEY_VERSION})"
            )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        n: int = 100,
        bounds: tuple[float, float] = (0.0, 1.0),
        kind: str | None = None,
        seed: int | None = None,
    ) -> WatermarkKey:
        """A new key. ``seed=None`` (the default, and the only safe choice outside tests)
        draws 128 bits from :func:`secrets.randbits`; never derive it from a global seed.
        ``kind=None`` picks ``"noise"``: on the bundled digits it costs a small CNN less
        clean accuracy than ``"patterns"`` and survives fine-tuning and pruning better
        (``benchmarks/watermark.py``)."""
        shape = tuple(int(s) for s in input_shape)
        if kind is None:
            kind = "noise"
        secret = secrets.randbits(SEED_BITS) if seed is None else seed
        created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        return cls(
            seed=secret,
            n=n,
            input_shape=shape,
            num_classes=num_classes,
            bounds=bounds,
            kind=kind,
            created=created,
        )

    def with_model(self, sha256: str | None) -> WatermarkKey:
        """The same key, naming the model file it was embedded in."""
        return replace(self, model_sha256=sha256)

    # -- the trigger set ----------------------------------------------------------------
    def trigger_levels(self) -> np.ndarray:
        """The trigger inputs as integer levels ``(n, *input_shape)`` in [0, 255] (uint8)."""
        stream = _Stream(self.seed, f"inputs/{self.kind}")
        size = math.prod(self.input_shape)
        if self.kind == "noise":
            return stream.levels(self.n * size).reshape(self.n, *self.input_shape)
        dims = _image_dims(self.input_shape)
        assert dims is not None  # checked in __post_init__
        out = np.stack([_pattern(stream, *dims) for _ in range(self.n)])
        return out.astype(np.uint8).reshape(self.n, *self.input_shape)

    def triggers(self) -> torch.Tensor:
        """The trigger inputs, float32 ``(n, *input_shape)`` inside ``bounds``.

        Level ``k`` maps to ``low + k * ((high - low) / 255)`` in float64 (one rounded
        multiply, one rounded add), then to float32: the same bytes on every machine.
        """
        low, high = self.bounds
        levels = self.trigger_levels().astype(np.float64)
        scaled = np.multiply(levels, (high - low) / 255.0)
        values = np.add(scaled, low)
        return torch.from_numpy(np.clip(values, low, high).astype(np.float32))

    def labels(self) -> torch.Tensor:
        """The trigger labels, int64 ``(n,)``, uniform over ``num_classes`` and drawn
        independently of the trigger inputs (their own stream of the seed)."""
        stream = _Stream(self.seed, "labels")
        return torch.tensor([stream.below(self.num_classes) for _ in range(self.n)])

    def trigger_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(triggers, labels)``."""
        return self.triggers(), self.labels()

    # -- identity -----------------------------------------------------------------------
    @property
    def key_id(self) -> str:
        """A public 16-hex-digit fingerprint of the key (SHA-256 of its defining fields);
        it names the key in reports without revealing the seed."""
        material = json.dumps(
            [
                self.version,
                f"{self.seed:032x}",
                self.n,
                list(self.input_shape),
                list(self.bounds),
                self.num_classes,
                self.kind,
            ]
        ).encode()
        return hashlib.sha256(_DOMAIN + b"key-id\x00" + material).hexdigest()[:16]

    @property
    def chance(self) -> float:
        """Probability that a model unrelated to the key matches one trigger label: 1/K."""
        return 1.0 / self.num_classes

    def public_dict(self) -> dict[str, Any]:
        """What reports may show: everything but the seed."""
        return {
            "key_id": self.key_id,
            "version": self.version,
            "n": self.n,
            "input_shape": list(self.input_shape),
            "bounds": list(self.bounds),
            "num_classes": self.num_classes,
            "kind": self.kind,
            "model_sha256": self.model_sha256,
            "created": self.created,
        }

    def to_dict(self) -> dict[str, Any]:
        """The key file's content, seed included (a secret: keep it out of reports)."""
        return {
            "format": KEY_FORMAT,
            "version": self.version,
            "method": "trigger-set watermark (Adi et al., USENIX Security 2018)",
            "seed": f"{self.seed:032x}",
            "n": self.n,
            "input_shape": list(self.input_shape),
            "bounds": list(self.bounds),
            "num_classes": self.num_classes,
            "kind": self.kind,
            "model_sha256": self.model_sha256,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "watermark key") -> WatermarkKey:
        """Parse :meth:`to_dict` output; :class:`DataError` names what is wrong."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: not a JSON object")
        if d.get("format", KEY_FORMAT) != KEY_FORMAT:
            raise DataError(f"{source}: not a modelshield watermark key (format {d['format']!r})")
        missing = [k for k in ("seed", "n", "input_shape", "num_classes") if k not in d]
        if missing:
            raise DataError(f"{source}: missing field(s) {', '.join(missing)}")
        raw_seed = d["seed"]
        try:
            seed = int(raw_seed, 16) if isinstance(raw_seed, str) else raw_seed
        except ValueError:
            raise DataError(f"{source}: seed must be a hex string, got {raw_seed!r}") from None
        try:
            return cls(
                seed=seed,
                n=d["n"],
                input_shape=tuple(d["input_shape"]),
                num_classes=d["num_classes"],
                bounds=tuple(d.get("bounds", (0.0, 1.0))),  # type: ignore[arg-type]
                kind=d.get("kind", "noise"),
                model_sha256=d.get("model_sha256"),
                created=str(d.get("created", "")),
                version=d.get("version", KEY_VERSION),
            )
        except InvalidConfigError as exc:
            raise DataError(f"{source}: {exc}") from exc
        except TypeError as exc:
            raise DataError(f"{source}: malformed field ({exc})") from exc

    # -- files --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the key file atomically with mode 0600; refuse to replace an existing one
        unless ``overwrite``."""
        with staged_key_file(self, path, overwrite=overwrite) as commit:
            return commit()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WatermarkKey:
        """Read a key file; :class:`DataError` for a missing or malformed one."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"watermark key {p}: no such file") from None
        except OSError as exc:
            raise DataError(f"watermark key {p}: cannot read it ({exc.strerror or exc})") from exc
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"watermark key {p}: not JSON ({exc.msg} at line {exc.lineno})"
            ) from exc
        if os.name == "posix" and p.stat().st_mode & 0o077:
            logger.warning(
                "watermark key %s is readable by other users (mode %o); it is a secret: chmod 600",
                p,
                p.stat().st_mode & 0o777,
            )
        return cls.from_dict(d, source=f"watermark key {p}")


def check_key_destination(path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Fail early (before any training) when a key cannot go to ``path``."""
    p = Path(path)
    if p.is_dir():
        raise InvalidConfigError(f"key file {p} is a directory; name a file, e.g. {p / 'key.json'}")
    if p.exists() and not overwrite:
        raise InvalidConfigError(
            f"key file {p} already exists; refusing to overwrite a secret key (pass --force to replace it)"
        )
    return p


@contextlib.contextmanager
def staged_key_file(
    key: WatermarkKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Iterator[Callable[[], Path]]:
    """Write the key now to a private temporary file beside ``path`` (mode 0600, synced);
    the yielded ``commit()`` moves it into place atomically.

    Without ``overwrite``, ``commit`` links the file into place, which fails if ``path``
    appeared meanwhile (no silent replacement of a key). If the block raises, or never
    commits, the temporary file is removed and ``path`` is untouched.
    """
    target = check_key_destination(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    committed = False
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # mkstemp's default; said explicitly: the key is a secret
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key.to_json())
            fh.flush()
            os.fsync(fh.fileno())

        def commit() -> Path:
            nonlocal committed
            if overwrite:
                os.replace(tmp, target)
            else:
                try:
                    os.link(tmp, target)  # atomic, and fails if the target exists
                except FileExistsError:
                    raise InvalidConfigError(
                        f"key file {target} already exists; refusing to overwrite a secret key "
                        "(pass --force to replace it)"
                    ) from None
                except OSError:  # a file system without hard links
                    check_key_destination(target, overwrite=False)
                    os.replace(tmp, target)
                else:
                    os.unlink(tmp)
            committed = True
            return target

        yield commit
    finally:
        if not committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
