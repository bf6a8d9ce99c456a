"""Explicit randomness: a seed flows in, the same seed gives the same numbers."""

from __future__ import annotations

import random

import numpy as np
import torch

from modelshield.core.errors import InvalidConfigError


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidConfigError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (for code we do not control)."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device``; ``seed=None`` draws a fresh seed from the OS."""
    g = torch.Generator(device=torch.device(device))
    if seed is None:
        g.seed()
    else:
        g.manual_seed(check_seed(seed))
    return g
