"""Backdoor triggers: the patterns a poisoning attack stamps on inputs.

- ``patch``: a small checkerboard of the bounds' extreme values in a corner (BadNets, Gu et
  al. 2017, used a few pixels at the bottom right of MNIST digits); ``corners=4`` puts it
  in all four corners (Turner et al. 2019, so the trigger survives flips and crops).
- ``blend``: ``(1 - alpha) x + alpha k`` with a key pattern ``k`` of uniform noise drawn
  from a seed (the "blended injection" strategy of Chen et al. 2017).

Images are ``(C, H, W)``; other inputs are treated as flat feature vectors, whose last
features carry the patch. A :class:`Trigger` is a small JSON record, so the poison record
written next to a poisoned data set says exactly how to re-create the trigger at test time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from modelshield.core.errors import InvalidConfigError
from modelshield.core.seeding import make_generator
from modelshield.core.threat import check_bounds

KINDS = ("patch", "blend")


def default_patch_size(input_shape: Sequence[int]) -> int:
    """Side of the square patch: about a ninth of the image side, at least 2 pixels
    (2 on 8×8 digits, 3 on 28×28 MNIST, 4 on 32×32 CIFAR); for flat inputs the number of
    trailing features, about 5% of them."""
    if len(input_shape) == 3:
        return max(2, round(min(input_shape[1], input_shape[2]) / 9))
    return max(1, round(0.05 * math.prod(input_shape)))


@dataclass(frozen=True)
class Trigger:
    """How a backdoor trigger is applied; JSON round-trips through :meth:`to_dict`."""

    kind: str = "patch"
    size: int | None = None
    """Patch side in pixels (flat inputs: trailing features); ``None``: :func:`default_patch_size`."""
    corners: int = 1
    """1: bottom-right corner only; 4: all four corners."""
    alpha: float = 0.2
    """Blend weight of the key pattern."""
    amplitude: float = 1.0
    """Patch contrast: 1 stamps the bounds' extremes; below 1 mixes the patch into the image."""
    seed: int = 0
    """Seed of the blend key pattern."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidConfigError(
                f"trigger kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        if self.size is not None and (isinstance(self.size, bool) or int(self.size) < 1):
            raise InvalidConfigError(f"trigger size must be >= 1 pixel, got {self.size!r}")
        if self.corners not in (1, 4):
            raise InvalidConfigError(f"trigger corners must be 1 or 4, got {self.corners!r}")
        if not (math.isfinite(self.alpha) and 0.0 < self.alpha <= 1.0):
            raise InvalidConfigError(f"blend alpha must be in (0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.amplitude) and 0.0 < self.amplitude <= 1.0):
            raise InvalidConfigError(f"trigger amplitude must be in (0, 1], got {self.amplitude!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trigger:
        known = {
            k: d[k] for k in ("kind", "size", "corners", "alpha", "amplitude", "seed") if k in d
        }
        return cls(**known)


def _checkerboard(h: int, w: int, low: float, high: float) -> torch.Tensor:
    ii = torch.arange(h)[:, None]
    jj = torch.arange(w)[None, :]
    return torch.where((ii + jj) % 2 == 0, torch.tensor(high), torch.tensor(low))


def trigger_mask(trigger: Trigger, input_shape: Sequence[int]) -> torch.Tensor:
    """Boolean mask ``input_shape`` of the inputs a patch trigger overwrites (all for blend)."""
    shape = tuple(int(s) for s in input_shape)
    if trigger.kind == "blend":
        return torch.ones(shape, dtype=torch.bool)
    size = trigger.size or default_patch_size(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 3:
        h, w = shape[1], shape[2]
        if size > min(h, w):
            raise InvalidConfigError(f"trigger size {size} exceeds the image ({h}×{w})")
        rows = [h - size] if trigger.corners == 1 else [0, h - size]
        cols = [w - size] if trigger.corners == 1 else [0, w - size]
        for r in rows:
            for c in cols:
                mask[:, r : r + size, c : c + size] = True
        return mask
    flat = mask.view(-1)
    if size > flat.numel():
        raise InvalidConfigError(f"trigger size {size} exceeds the {flat.numel()} features")
    flat[-size:] = True
    return mask


def _pattern(trigger: Trigger, shape: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    if trigger.kind == "blend":
        g = make_generator(trigger.seed)
        return low + (high - low) * torch.rand(shape, generator=g)
    if len(shape) == 3:
        board = _checkerboard(shape[1], shape[2], low, high)
        # anchor the checkerboard at each patch's bottom-right pixel (always "high")
        flip = (shape[1] - 1 + shape[2] - 1) % 2
        if flip:
            board = low + high - board
        return board.expand(shape).clone()
    n = math.prod(shape)
    alt = torch.where(torch.arange(n) % 2 == (n - 1) % 2, torch.tensor(high), torch.tensor(low))
    return alt.view(shape)


def apply_trigger(
    x: torch.Tensor, trigger: Trigger, bounds: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """``x`` (a batch ``(N, ...)``) with the trigger stamped on every sample; ``x`` is unchanged."""
    bounds = check_bounds(bounds)
    shape = tuple(int(s) for s in x.shape[1:])
    pattern = _pattern(trigger, shape, bounds).to(device=x.device, dtype=x.dtype)
    if trigger.kind == "blend":
        return ((1 - trigger.alpha) * x + trigger.alpha * pattern).clamp(*bounds)
    mask = trigger_mask(trigger, shape).to(x.device)
    a = trigger.amplitude
    stamped = pattern if a >= 1.0 else (1 - a) * x + a * pattern
    return torch.where(mask, stamped, x).clamp(*bounds)
