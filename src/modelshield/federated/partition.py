"""Splitting a data set among federated clients: IID, or non-IID by a Dirichlet prior.

Non-IID follows Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data
Distribution"): for every class, the shares of its samples given to the ``n`` clients are
drawn from ``Dirichlet(alpha · 1)``; small ``alpha`` gives each client few classes, large
``alpha`` tends to IID. Every client gets at least ``min_size`` samples (the draw is
repeated, as in the common FedLab/Flower-datasets practice, until it does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.seeding import make_generator

MAX_REDRAWS = 1000


def _check(n_samples: int, n_clients: int, min_size: int) -> None:
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise InvalidConfigError(
            f"the number of clients must be an integer >= 1, got {n_clients!r}"
        )
    if n_samples < n_clients * max(min_size, 1):
        raise DataError(
            f"{n_samples} samples cannot give {n_clients} clients {max(min_size, 1)} each"
        )


def iid_partition(n_samples: int, n_clients: int, *, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random split into ``n_clients`` parts whose sizes differ by at most one."""
    _check(n_samples, n_clients, 1)
    perm = torch.randperm(n_samples, generator=make_generator(seed))
    return [part.sort().values for part in torch.tensor_split(perm, n_clients)]


def dirichlet_partition(
    labels: torch.Tensor,
    n_clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 2,
) -> list[torch.Tensor]:
    """Label-skewed split: class ``c``'s samples go to the clients in proportions drawn
    from ``Dirichlet(alpha)`` (Hsu et al. 2019)."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InvalidConfigError(f"alpha must be > 0, got {alpha!r}")
    labels = labels.detach().cpu().long()
    _check(len(labels), n_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = torch.unique(labels).tolist()
    for _ in range(MAX_REDRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in classes:
            members = rng.permutation((labels == c).nonzero().flatten().numpy())
            shares = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = np.round(np.cumsum(shares) * len(members)).astype(np.int64)[:-1]
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].append(chunk)
        out = [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(
        f"could not give every one of {n_clients} clients {min_size} samples with alpha={alpha}; "
        "raise alpha or use fewer clients"
    )
