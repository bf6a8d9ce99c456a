"""Aggregation rules against Flower's own implementations and closed forms; attack maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelshield.federated import aggregators as agg
from modelshield.federated.attacks import lie_z, little_is_enough
from modelshield.federated.partition import dirichlet_partition, iid_partition

flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate")


def _updates(n: int = 11, d: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    u[:2] += 8.0  # two outliers
    return u


def _flower(u: torch.Tensor) -> list[tuple[list[np.ndarray], int]]:
    # two "layers" per client, equal example counts
    return [([row[:3].numpy(), row[3:].numpy()], 10) for row in u]


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays])


def test_krum_and_multikrum_match_flower() -> None:
    u = _updates()
    for f in (0, 1, 2, 3):
        assert np.allclose(agg.krum(u, f).numpy(), _flat(flwr_agg.aggregate_krum(_flower(u), f, 0)))
        for m in (2, 5):
            ours = agg.multikrum(u, f, m).numpy()
            assert np.allclose(ours, _flat(flwr_agg.aggregate_krum(_flower(u), f, m)))


def test_median_and_trimmed_mean_match_flower() -> None:
    for n in (10, 11):
        u = _updates(n)
        assert np.allclose(agg.median(u).numpy(), _flat(flwr_agg.aggregate_median(_flower(u))))
        for beta in (0.0, 0.1, 0.2, 0.4):
            ours = agg.trimmed_mean(u, beta).numpy()
            assert np.allclose(ours, _flat(flwr_agg.aggregate_trimmed_avg(_flower(u), beta)))


def test_bulyan_matches_flower() -> None:
    u = _updates(n=11)
    for f in (1, 2):
        theirs = flwr_agg.aggregate_bulyan(_flower(u), f, flwr_agg.aggregate_krum, to_keep=0)
        assert np.allclose(agg.bulyan(u, f).numpy(), _flat(theirs))


def test_fedavg_is_the_weighted_mean() -> None:
    u = _updates(4, 3)
    w = [1.0, 2.0, 3.0, 4.0]
    want = sum(wi * ui for wi, ui in zip(w, u, strict=True)) / 10
    assert torch.allclose(agg.fedavg(u, w), want)


def test_norm_bound_clips_only_the_long_updates() -> None:
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    assert torch.allclose(
        agg.clip_to_norm(u, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.float64)
    )
    assert torch.allclose(agg.norm_bound(u, 1.0), torch.tensor([0.45, 0.6], dtype=torch.float64))


def test_fltrust_drops_opposed_updates_and_rescales() -> None:
    g0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    u = torch.tensor([[10.0, 0.0], [-5.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # trust: 1, 0 (negative cosine), 1/sqrt(2); rescaled to |g0| = 1
    t3 = 1 / math.sqrt(2)
    want = (1.0 * torch.tensor([1.0, 0.0]) + t3 * torch.tensor([t3, t3])) / (1 + t3)
    assert torch.allclose(agg.fltrust(u, g0), want.double())
    assert torch.equal(agg.fltrust(-u[:1], g0), torch.zeros(2, dtype=torch.float64))


def test_lie_z_follows_baruch_et_al() -> None:
    # n = 50, m = 12 (24%): s = floor(26) - 12 = 14, z = Phi^-1(36/50)
    assert lie_z(50, 12) == pytest.approx(0.5828415072712162, rel=1e-6)
    est = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = little_is_enough(est, 50, 12)
    sigma = est.std(0)
    assert torch.allclose(out, est.mean(0) - lie_z(50, 12) * sigma)


def test_partitions_cover_every_sample_once() -> None:
    parts = iid_partition(103, 10, seed=1)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    labels = torch.arange(1000) % 10
    for alpha in (0.1, 1.0, 100.0):
        parts = dirichlet_partition(labels, 8, alpha=alpha, seed=0)
        assert sorted(torch.cat(parts).tolist()) == list(range(1000))
    # small alpha: clients see few classes; large alpha: nearly all
    few = dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    many = dirichlet_partition(labels, 8, alpha=100.0, seed=0)
    classes = lambda ps: np.mean([len(torch.unique(labels[p])) for p in ps])  # noqa: E731
    assert classes(few) < 5 < classes(many)
    assert (
        dirichlet_partition(labels, 8, alpha=0.5, seed=3)[0].tolist()
        == dirichlet_partition(labels, 8, alpha=0.5, seed=3)[0].tolist()
    )
