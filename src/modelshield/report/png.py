"""A tiny PNG encoder (zlib only) for the report's image grids.

Images arrive as flat floats in ``[0, 1]`` with a ``[C, H, W]`` or ``[H, W]`` shape and leave
as 8-bit greyscale or RGB PNGs, upscaled by pixel repetition (nearest neighbour) so that
an 8×8 trigger or a 28×28 digit is big enough to see. Upscaling in the file, not only in
CSS, keeps small images crisp in every viewer and in print.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from modelshield.core.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (0 greyscale, 2 RGB)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: bytes, width: int, height: int, channels: int = 1) -> bytes:
    """Encode 8-bit ``pixels`` (row-major, channels interleaved) as a PNG file."""
    if channels not in _COLOUR_TYPE:
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if width < 1 or height < 1:
        raise DataError(f"image size must be positive, got {width}x{height}")
    stride = width * channels
    if len(pixels) != stride * height:
        raise DataError(f"got {len(pixels)} bytes for a {width}x{height}x{channels} image")
    raw = b"".join(b"\x00" + pixels[r * stride : (r + 1) * stride] for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def _byte(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return 0
    return min(255, max(0, round(float(v) * 255)))


def upscale_factor(height: int, width: int, min_size: int = 96, max_scale: int = 16) -> int:
    """Integer factor that brings the longer side to at least ``min_size`` pixels."""
    return max(1, min(max_scale, math.ceil(min_size / max(height, width, 1))))


def image_to_png(
    shape: Sequence[int], data: Sequence[float], *, min_size: int = 96, max_scale: int = 16
) -> tuple[bytes, int, int]:
    """PNG bytes and displayed ``(width, height)`` for a flat ``[C, H, W]`` / ``[H, W]`` image.

    Values are clipped to ``[0, 1]`` (missing values show black); the image is upscaled by
    :func:`upscale_factor` with nearest-neighbour repetition.
    """
    dims = [int(s) for s in shape]
    if len(dims) == 2:
        dims = [1, *dims]
    if len(dims) != 3 or dims[0] not in _COLOUR_TYPE or min(dims) < 1:
        raise DataError(f"image shape must be [H, W] or [C, H, W] with C 1 or 3, got {list(shape)}")
    c, h, w = dims
    if len(data) != c * h * w:
        raise DataError(f"image data has {len(data)} values, shape {list(shape)} needs {c * h * w}")
    s = upscale_factor(h, w, min_size, max_scale)
    plane = h * w
    levels = bytes(_byte(v) for v in data)
    rows: list[bytes] = []
    for r in range(h):
        row = bytearray()
        for col in range(w):
            px = bytes(levels[k * plane + r * w + col] for k in range(c))
            row += px * s
        rows.extend([bytes(row)] * s)
    return encode_png(b"".join(rows), w * s, h * s, c), w * s, h * s


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding in ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
