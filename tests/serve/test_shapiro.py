"""Shapiro–Wilk (Royston 1992, AS R94) against scipy.stats.shapiro."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelshield.core.errors import DataError
from modelshield.serve.detector import shapiro_wilk

stats = pytest.importorskip("scipy.stats")

SIZES = [*range(3, 31), 40, 50, 75, 100, 200, 500, 1000, 2500, 4999, 5000]


def _sample(rng: np.random.Generator, dist: str, n: int) -> np.ndarray:
    if dist == "normal":
        return rng.normal(3.0, 2.0, size=n)
    if dist == "exponential":
        return rng.exponential(size=n)
    if dist == "uniform":
        return rng.uniform(size=n)
    if dist == "t3":
        return rng.standard_t(3, size=n)
    if dist == "lognormal":
        return rng.lognormal(sigma=1.0, size=n)
    return np.concatenate([rng.normal(0, 1, n // 2), rng.normal(5, 1, n - n // 2)])  # bimodal


DISTS = ["normal", "exponential", "uniform", "t3", "lognormal", "bimodal"]


@pytest.mark.parametrize("dist", DISTS)
def test_matches_scipy(dist: str) -> None:
    rng = np.random.default_rng(DISTS.index(dist))
    for n in SIZES:
        for _ in range(4):
            x = _sample(rng, dist, n)
            ours = shapiro_wilk(x)
            ref = stats.shapiro(x)
            # SciPy's swilk works in single precision: agreement to ~1e-7 is all there is.
            assert ours.w == pytest.approx(float(ref.statistic), abs=2e-6), (dist, n)
            assert ours.p_value == pytest.approx(float(ref.pvalue), abs=1e-5, rel=1e-4), (dist, n)
            assert ours.n == n


def test_accepts_tensors_and_is_shift_and_scale_invariant() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = shapiro_wilk(x)
    b = shapiro_wilk(1e6 + 1e-3 * x)
    assert a.w == pytest.approx(b.w, abs=1e-9)
    assert a.p_value == pytest.approx(b.p_value, rel=1e-6)


def test_normal_data_is_not_rejected_and_skewed_data_is() -> None:
    rng = np.random.default_rng(1)
    normal_p = [shapiro_wilk(rng.normal(size=200)).p_value for _ in range(200)]
    # p-values of a valid test are uniform under the null: about 5% below 0.05.
    assert 0.01 <= np.mean(np.array(normal_p) < 0.05) <= 0.10
    assert shapiro_wilk(rng.exponential(size=200)).p_value < 1e-6


def test_edge_cases() -> None:
    assert shapiro_wilk([1.0, 1.0, 1.0, 1.0]).w == 1.0
    assert shapiro_wilk([1.0, 1.0, 1.0, 1.0]).p_value == 1.0
    for bad in ([1.0, 2.0], np.zeros(5001)):
        with pytest.raises(DataError, match="3 to 5000"):
            shapiro_wilk(bad)
    with pytest.raises(DataError, match="NaN"):
        shapiro_wilk([1.0, float("nan"), 2.0, 3.0])
