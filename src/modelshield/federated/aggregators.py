"""Aggregation rules over client updates, as plain functions on a stack ``(n, d)``.

The Flower strategies of :mod:`modelshield.federated.strategies` call these for the rules
Flower lacks (norm bounding, FLTrust); the tests also check Flower's own Krum, Bulyan,
median and trimmed mean against them.

- ``fedavg``: the example-weighted mean (McMahan et al. 2017).
- ``median``: the coordinate-wise median (Yin et al. 2018).
- ``trimmed_mean``: per coordinate, drop the ``⌊βn⌋`` largest and smallest, average the rest.
- ``krum`` / ``multikrum``: score each update by the sum of squared distances to its
  ``n − f − 2`` nearest others; keep the ``m`` best and average them (Blanchard et al. 2017).
- ``bulyan``: pick ``θ = n − 2f`` updates by repeated Krum, then per coordinate average the
  ``θ − 2f`` values closest to the median (El Mhamdi et al. 2018).
- ``norm_bound``: clip every update to L2 norm ``M``, then the weighted mean (Sun et al.
  2019, "Can You Really Backdoor Federated Learning?").
- ``fltrust``: trust score ``ReLU(cos(u_i, g0))`` against the server's own update ``g0``
  on a small clean root set, every update rescaled to ``‖g0‖``, the trust-weighted mean
  (Cao et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modelshield.core.errors import InvalidConfigError


def _stack(updates: Sequence[Tensor] | Tensor) -> Tensor:
    u = updates if isinstance(updates, Tensor) else torch.stack([t.flatten() for t in updates])
    if u.ndim != 2 or len(u) == 0:
        raise InvalidConfigError(f"need a non-empty stack of updates (n, d), got {tuple(u.shape)}")
    return u.double()


def fedavg(
    updates: Sequence[Tensor] | Tensor, weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    u = _stack(updates)
    w = (
        torch.ones(len(u), dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64)
    )
    if w.shape != (len(u),) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise InvalidConfigError("weights must be non-negative, one per update, not all zero")
    return (w[:, None] * u).sum(0) / w.sum()


def median(updates: Sequence[Tensor] | Tensor) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return torch.quantile(_stack(updates), 0.5, dim=0)


def trimmed_mean(updates: Sequence[Tensor] | Tensor, beta: float) -> Tensor:
    u = _stack(updates)
    if not 0 <= beta < 0.5:
        raise InvalidConfigError(f"beta must be in [0, 0.5), got {beta!r}")
    k = math.floor(beta * len(u))
    s = u.sort(dim=0).values
    return s[k : len(u) - k].mean(0)


def krum_scores(updates: Sequence[Tensor] | Tensor, f: int) -> Tensor:
    """Each update's sum of squared distances to its ``max(1, n − f − 2)`` nearest others."""
    u = _stack(updates)
    n = len(u)
    if f < 0 or n < 2:
        raise InvalidConfigError(f"Krum needs f >= 0 and at least 2 updates (n={n}, f={f})")
    d2 = torch.cdist(u, u) ** 2
    d2.fill_diagonal_(float("inf"))
    return d2.topk(max(1, n - f - 2), dim=1, largest=False).values.sum(1)


def multikrum(updates: Sequence[Tensor] | Tensor, f: int, m: int) -> Tensor:
    u = _stack(updates)
    if not 1 <= m <= len(u):
        raise InvalidConfigError(f"m must be in [1, {len(u)}], got {m}")
    best = krum_scores(u, f).topk(m, largest=False).indices
    return u[best].mean(0)


def krum(updates: Sequence[Tensor] | Tensor, f: int) -> Tensor:
    return multikrum(updates, f, 1)


def bulyan(updates: Sequence[Tensor] | Tensor, f: int) -> Tensor:
    u = _stack(updates)
    n = len(u)
    if n < 4 * f + 3:
        raise InvalidConfigError(f"Bulyan needs n >= 4f + 3 (n={n}, f={f})")
    theta = n - 2 * f
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        sub = u[remaining]
        # Krum over what is left (El Mhamdi et al. keep f fixed)
        scores = krum_scores(sub, f) if len(sub) >= 2 else torch.zeros(len(sub))
        pick = remaining[int(scores.argmin())]
        chosen.append(pick)
        remaining.remove(pick)
    sel = u[chosen]
    beta = theta - 2 * f
    med = torch.quantile(sel, 0.5, dim=0)
    closest = (sel - med).abs().topk(beta, dim=0, largest=False).indices
    return sel.gather(0, closest).mean(0)


def clip_to_norm(updates: Sequence[Tensor] | Tensor, max_norm: float) -> Tensor:
    """Every update scaled down to L2 norm at most ``max_norm``."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise InvalidConfigError(f"max_norm must be > 0, got {max_norm!r}")
    u = _stack(updates)
    norms = u.norm(dim=1, keepdim=True)
    return u * torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)


def norm_bound(
    updates: Sequence[Tensor] | Tensor,
    max_norm: float,
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    return fedavg(clip_to_norm(updates, max_norm), weights)


def fltrust(updates: Sequence[Tensor] | Tensor, server_update: Tensor) -> Tensor:
    u = _stack(updates)
    g0 = server_update.flatten().double()
    if g0.shape != (u.shape[1],):
        raise InvalidConfigError(
            f"the server update has {g0.numel()} values, the updates {u.shape[1]}"
        )
    g0n = g0.norm()
    un = u.norm(dim=1).clamp_min(1e-12)
    trust = torch.relu((u @ g0) / (un * g0n.clamp_min(1e-12)))
    if float(trust.sum()) <= 0:
        return torch.zeros_like(g0)
    scaled = u * (g0n / un)[:, None]
    return (trust[:, None] * scaled).sum(0) / trust.sum()
