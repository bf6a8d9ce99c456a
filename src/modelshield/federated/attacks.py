"""Attacking clients for red-teaming a federation.

Data attacks change what a malicious client trains on; update attacks change what it
sends. ``boost`` scales a backdoor update for model replacement (Bagdasaryan et al. 2020:
a client that sends ``γ(L − G)`` with ``γ = n/η`` replaces the global model ``G`` by its
own ``L`` under FedAvg; with ``m`` colluding clients each scales by ``n/m``).

- ``label-flip``: train on labels ``C − 1 − y`` (Tolpegin et al. 2020).
- ``sign-flip``: send ``−s·Δ`` instead of the honest update ``Δ`` (a Byzantine reversal).
- ``gaussian``: send ``N(0, σ²)`` noise of the update's shape (Blanchard et al. 2017).
- ``backdoor``: train on local data of which a share carries a BadNets trigger relabelled to
  the target class, then boost the update (model replacement).
- ``little-is-enough`` (Baruch et al. 2019): send ``μ − z σ``, with ``μ``, ``σ`` the
  coordinate-wise mean and standard deviation of benign updates and
  ``z = Φ⁻¹((n − s)/n)``, ``s = ⌊n/2 + 1⌋ − m``: small enough per coordinate to pass
  median- and Krum-style filters. The attacker estimates ``μ``, ``σ`` from honest updates
  it computes itself (here: on disjoint shards of its own data, as a single client can).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from modelshield.core.errors import InvalidConfigError
from modelshield.core.metrics import norm_ppf
from modelshield.core.registry import Registry

FL_ATTACKS: Registry[str] = Registry("fl-attacks")
_ATTACKS_HELP = (
    ("label-flip", "train on labels C - 1 - y (Tolpegin et al. 2020)"),
    ("sign-flip", "send the reversed update -s * delta"),
    ("gaussian", "send N(0, sigma^2) noise instead of an update (Blanchard et al. 2017)"),
    ("backdoor", "BadNets-poisoned local data, boosted update (Bagdasaryan et al. 2020)"),
    ("little-is-enough", "mu - z * sigma of benign updates (Baruch et al. 2019)"),
)
for _name, _help in _ATTACKS_HELP:
    FL_ATTACKS.add(_name, _name, help=_help)
ATTACKS = tuple(name for name, _ in _ATTACKS_HELP)
DATA_ATTACKS = ("label-flip", "backdoor")


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    return (num_classes - 1 - y).long()


def sign_flip(update: Tensor, scale: float = 1.0) -> Tensor:
    return -scale * update


def gaussian_update(update: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    if not (math.isfinite(sigma) and sigma > 0):
        raise InvalidConfigError(f"sigma must be > 0, got {sigma!r}")
    return sigma * torch.randn(update.shape, generator=generator, dtype=update.dtype)


def boost(update: Tensor, gamma: float) -> Tensor:
    """Model replacement scaling ``γ Δ`` (Bagdasaryan et al. 2020)."""
    return gamma * update


def lie_z(n: int, m: int) -> float:
    """Baruch et al.'s ``z_max`` for ``n`` workers of which ``m`` are malicious."""
    if not 0 < m < n:
        raise InvalidConfigError(f"need 0 < malicious ({m}) < clients ({n})")
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n
    return norm_ppf(min(max(p, 1e-6), 1 - 1e-6))


def little_is_enough(estimates: Sequence[Tensor] | Tensor, n: int, m: int) -> Tensor:
    """``μ − z σ`` over the attacker's estimates of benign updates (Baruch et al. 2019)."""
    est = (
        estimates
        if isinstance(estimates, Tensor)
        else torch.stack([e.flatten() for e in estimates])
    )
    if len(est) < 2:
        raise InvalidConfigError("little-is-enough needs at least two benign update estimates")
    mu, sigma = est.mean(0), est.std(0)
    return mu - lie_z(n, m) * sigma
