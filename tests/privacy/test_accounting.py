"""DP-SGD privacy accounting, cross-checked against independent implementations.

References used for the expected values and tolerances:

* ``dp_accounting.rdp.RdpAccountant`` (Google): the same RDP bound (Mironov 2017; Mironov,
  Talwar & Zhang 2019) and the same RDP → (ε, δ) conversion (Balle et al. 2020, Thm 21 =
  Canonne, Kamath & Steinke 2020, Prop. 12). Its default orders equal our ``RDP_ORDERS``.
  At integer orders both libraries evaluate the same finite binomial sum. At fractional
  orders Opacus sums the alternating series of Mironov et al. 2019 §3.3 with its signs
  (it matches numerical integration of A_α to ~1e-12), while dp-accounting 0.6.0 adds the
  *absolute values* of the terms (``gammaln`` of a negative binomial coefficient) and drops
  orders whose sum has not converged after 1000 terms: a valid but looser upper bound.
  Hence, with identical grids and conversion, ours <= theirs exactly (slack 1e-6 for
  rounding), and theirs exceeds ours only through those fractional orders: below 0.1 % on
  this grid, so 1 % leaves room, while a wrong q, σ or conversion moves ε by >= 5 %. (Where
  ε is huge, q = 0.1 and σ <= 0.8 over thousands of steps, the gap reaches 20-50 %; such
  points are left out of the grid.)
* ``dp_accounting.pld.PLDAccountant``: privacy-loss distributions with pessimistic
  rounding, an upper bound that is near-exact for a fine discretisation (1e-4; at 1e-3 the
  rounding of 3750 compositions overshoots by up to 0.03 at small ε).
* ``prv_accountant.PRVAccountant`` (Microsoft, the reference code of Gopi, Lee & Wutschitz
  2021) which returns ``(ε_low, ε_estimate, ε_up)`` for the same ``eps_error``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import sys
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from prv_accountant import PRVAccountant as ReferencePRVAccountant
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from modelshield.core.errors import InvalidConfigError, UnknownComponentError
from modelshield.privacy import accounting
from modelshield.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    RDP_ORDERS,
    OpacusNotInstalledError,
    check_dp_parameters,
    compute_epsilon,
    epsilon_curve,
    find_noise_multiplier,
    sample_rate_for,
)

# (sample_rate, noise_multiplier, steps, delta): every q x σ pair appears, with 1, 100 or
# 1000-3750 steps; 3750 only for small q (for q = 0.1 ε would be tens to hundreds).
GRID = [
    (0.001, 0.6, 100, 1e-5),
    (0.001, 1.0, 3750, 1e-6),
    (0.001, 1.3, 1000, 1e-5),
    (0.001, 2.0, 1, 1e-5),
    (0.001, 5.0, 10, 1e-5),  # large noise: RDP's best order is above 63
    (0.004, 0.6, 1, 1e-6),
    (0.004, 1.0, 100, 1e-5),
    (0.004, 1.3, 3750, 1e-5),
    (0.004, 2.0, 3750, 1e-6),
    (0.01, 0.6, 100, 1e-6),
    (0.01, 1.0, 1000, 1e-5),
    (0.01, 1.3, 1, 1e-5),
    (0.01, 2.0, 3750, 1e-5),
    (0.1, 0.6, 1, 1e-5),
    (0.1, 1.0, 100, 1e-6),
    (0.1, 1.3, 1, 1e-6),
    (0.1, 2.0, 100, 1e-5),
]
IDS = [f"q={q}-s={s}-n={n}-d={d:g}" for q, s, n, d in GRID]


@functools.cache
def ours(q: float, sigma: float, steps: int, delta: float, accountant: str) -> float:
    return compute_epsilon(
        sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta, accountant=accountant
    )


def dpsgd_event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


# --------------------------------------------------------------------------- cross-checks


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID, ids=IDS)
def test_rdp_matches_dp_accounting(q: float, sigma: float, steps: int, delta: float) -> None:
    theirs = RdpAccountant().compose(dpsgd_event(q, sigma, steps)).get_epsilon(delta)
    eps = ours(q, sigma, steps, delta, "rdp")
    assert eps <= theirs * (1 + 1e-6)  # same orders, ours evaluates each order exactly
    assert eps == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID, ids=IDS)
def test_prv_matches_pld(q: float, sigma: float, steps: int, delta: float) -> None:
    # ours = ε̂ + eps_error with |ε̂ - ε| <= eps_error, so ε <= ours <= ε + 2·eps_error; the
    # pessimistic PLD at interval 1e-4 sits above ε by < 1 % (0.002 at most on this grid).
    pld = (
        PLDAccountant(value_discretization_interval=1e-4)
        .compose(dpsgd_event(q, sigma, steps))
        .get_epsilon(delta)
    )
    eps = ours(q, sigma, steps, delta, "prv")
    assert abs(eps - pld) <= 2 * PRV_EPS_ERROR + 0.01 * pld


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID, ids=IDS)
def test_prv_within_reference_prv_bounds(q: float, sigma: float, steps: int, delta: float) -> None:
    # Same algorithm and error budget as the reference (eps_error, delta_error = δ/1000).
    # Ours is an upper bound, so it cannot lie below the reference's lower end; both
    # estimates are within eps_error of the truth, so ours <= reference upper + eps_error.
    # Both use the same mesh and domain rule (Gopi et al. 2021, Thm 5.5, Remark 5.6), so
    # their estimates differ by discretisation detail only (<= 6e-4 here): ours must be the
    # *upper* end, not the estimate, which eps_error / 2 tells apart.
    reference = ReferencePRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(q, sigma)],
        eps_error=PRV_EPS_ERROR,
        delta_error=delta / 1000,
        max_self_compositions=[steps],
    )
    low, _estimate, up = reference.compute_epsilon(delta, [steps])
    eps = ours(q, sigma, steps, delta, "prv")
    assert low <= eps <= up + PRV_EPS_ERROR
    assert abs(eps - up) <= PRV_EPS_ERROR / 2


@pytest.mark.parametrize(("q", "sigma", "steps", "delta"), GRID, ids=IDS)
def test_rdp_is_looser_than_prv(q: float, sigma: float, steps: int, delta: float) -> None:
    # Theory only promises rdp >= prv - 2·eps_error; on this grid RDP is strictly looser.
    assert ours(q, sigma, steps, delta, "rdp") > ours(q, sigma, steps, delta, "prv")


# Opacus MNIST example README: "(1.19 / 3.01 / 7.10, 1e-5)-DP" for σ = 1.3 / 1.1 / 0.7 over
# 15 / 60 / 45 epochs. These were computed with batch 256 of 60 000 (q = 256/60000, steps =
# ceil(epochs·60000/256), the TF Privacy tutorial's setting) and the older conversion of
# Mironov 2017, Prop. 3: ε = min_α RDP(α) + log(1/δ)/(α−1). We first reproduce them to
# their printed precision from the same RDP curve, then check that ours is exactly the
# Balle et al. 2020 conversion of that curve over RDP_ORDERS, and so lower than the README.
@pytest.mark.parametrize(
    ("sigma", "epochs", "readme"), [(1.3, 15, 1.19), (1.1, 60, 3.01), (0.7, 45, 7.10)]
)
def test_rdp_opacus_mnist_readme(sigma: float, epochs: int, readme: float) -> None:
    from opacus.accountants.analysis.rdp import compute_rdp

    q, delta = 256 / 60000, 1e-5
    steps = math.ceil(epochs * 60000 / 256)
    orders = np.array(RDP_ORDERS)
    rdp = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    assert classic == pytest.approx(readme, abs=0.005)
    balle = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    eps = compute_epsilon(
        sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta, accountant="rdp"
    )
    assert eps == pytest.approx(float(np.min(balle)), rel=1e-9)
    assert eps < readme
    # PRV is tighter still and agrees with the reference PRV implementation
    prv = compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
    assert prv < eps


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_no_noise_is_infinite_and_no_steps_is_free(accountant: str) -> None:
    kw: dict[str, Any] = {"sample_rate": 0.01, "delta": 1e-5, "accountant": accountant}
    assert compute_epsilon(noise_multiplier=0.0, steps=10, **kw) == math.inf
    assert compute_epsilon(noise_multiplier=1.0, steps=0, **kw) == 0.0
    assert compute_epsilon(noise_multiplier=0.0, steps=0, **kw) == 0.0  # nothing released
    # full-batch gradient descent (q = 1) is the plain Gaussian mechanism
    assert 0 < compute_epsilon(noise_multiplier=1.0, steps=1, **{**kw, "sample_rate": 1.0}) < 6
    # both conversions can go negative for large δ; ε is clamped at 0
    assert compute_epsilon(noise_multiplier=1.0, steps=1000, **{**kw, "delta": 0.5}) == 0.0


GOOD: dict[str, Any] = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 100, "delta": 1e-5}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("sample_rate", math.nan),
        ("sample_rate", 0.0),
        ("sample_rate", -0.1),
        ("sample_rate", 1.5),
        ("sample_rate", "0.1"),
        ("noise_multiplier", math.nan),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", math.inf),
        ("steps", -1),
        ("steps", 1.5),
        ("steps", True),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", math.nan),
        ("delta", -1e-5),
    ],
)
def test_invalid_parameters_are_rejected(name: str, value: object) -> None:
    params: dict[str, Any] = {**GOOD, name: value}
    with pytest.raises(InvalidConfigError, match=name) as info:
        check_dp_parameters(**params)
    assert repr(value) in str(info.value)
    with pytest.raises(InvalidConfigError, match=name):
        compute_epsilon(**params)


@pytest.mark.parametrize("name", ["gdp", "RDP", ""])
def test_unknown_accountant(name: str) -> None:
    for call in (
        lambda: compute_epsilon(**GOOD, accountant=name),
        lambda: epsilon_curve(**{**GOOD, "steps": [1]}, accountant=name),
        lambda: find_noise_multiplier(
            target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=10, accountant=name
        ),
    ):
        with pytest.raises(UnknownComponentError, match="known: prv, rdp"):
            call()


def test_sample_rate_for() -> None:
    assert sample_rate_for(256, 60000) == 256 / 60000
    assert sample_rate_for(10, 10) == 1.0
    for b, n in [(0, 10), (11, 10), (1.5, 10), (1, 0)]:
        with pytest.raises(InvalidConfigError):
            sample_rate_for(b, n)  # type: ignore[arg-type]


def test_prv_falls_back_to_rdp_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accounting, "PRV_MAX_GRID_POINTS", 10)
    with caplog.at_level(logging.WARNING, logger=accounting.__name__):
        eps = compute_epsilon(**GOOD)
    assert eps == compute_epsilon(**GOOD, accountant="rdp")
    assert any("using the RDP bound" in r.getMessage() for r in caplog.records)


def test_find_noise_multiplier_falls_back_to_rdp_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kw: dict[str, Any] = {"target_epsilon": 2.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    rdp = find_noise_multiplier(**kw, accountant="rdp")
    monkeypatch.setattr(accounting, "PRV_MAX_GRID_POINTS", 10)
    with caplog.at_level(logging.WARNING, logger=accounting.__name__):
        assert find_noise_multiplier(**kw) == rdp
    assert any("RDP noise multiplier" in r.getMessage() for r in caplog.records)


def test_missing_opacus_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(OpacusNotInstalledError, match=r"modelshield\[dp\]"):
        compute_epsilon(**GOOD)


# --------------------------------------------------------------------------- curve, inverse


def test_epsilon_curve_is_a_per_epoch_ledger() -> None:
    epochs = [250 * k for k in range(1, 7)]
    kw: dict[str, Any] = {"sample_rate": 0.004, "noise_multiplier": 1.0, "delta": 1e-5}
    curve = epsilon_curve(steps=epochs, **kw)
    assert len(curve) == len(epochs)
    assert all(a < b for a, b in itertools.pairwise(curve))
    assert curve[-1] == compute_epsilon(steps=epochs[-1], **kw)
    assert epsilon_curve(steps=[500, 250, 500], **kw) == [curve[1], curve[0], curve[1]]
    assert epsilon_curve(steps=[], **kw) == []
    rdp = epsilon_curve(steps=epochs, accountant="rdp", **kw)
    assert rdp[-1] == compute_epsilon(steps=epochs[-1], accountant="rdp", **kw)


def test_epsilon_curve_is_monotone_where_prv_wobbles() -> None:
    # at ε ≈ eps_error the PRV bound is not monotone in the step count; the curve is
    kw: dict[str, Any] = {"sample_rate": 0.001, "noise_multiplier": 2.0, "delta": 1e-5}
    counts = [1, 2, 3, 4]
    curve = epsilon_curve(steps=counts, **kw)
    assert all(a <= b for a, b in itertools.pairwise(curve))
    assert all(c >= compute_epsilon(steps=n, **kw) for c, n in zip(curve, counts, strict=True))


def test_epsilon_curve_rejects_bad_steps() -> None:
    kw: dict[str, Any] = {"sample_rate": 0.01, "noise_multiplier": 1.0, "delta": 1e-5}
    for steps in (100, "100", [1, -1], [1, 2.5]):
        with pytest.raises(InvalidConfigError, match="steps"):
            epsilon_curve(steps=steps, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_find_noise_multiplier_round_trip(accountant: str) -> None:
    kw: dict[str, Any] = {
        "delta": 1e-5,
        "sample_rate": 0.01,
        "steps": 1000,
        "accountant": accountant,
    }
    tol = 0.01
    sigma = find_noise_multiplier(target_epsilon=2.0, epsilon_tolerance=tol, **kw)
    eps = compute_epsilon(noise_multiplier=sigma, **kw)
    assert 2.0 - tol < eps <= 2.0


def test_find_noise_multiplier_is_monotone_and_prv_needs_less_noise() -> None:
    kw: dict[str, Any] = {"delta": 1e-5, "sample_rate": 0.004, "steps": 3750}
    sigmas = [
        find_noise_multiplier(target_epsilon=t, accountant="rdp", **kw)
        for t in (0.5, 1.0, 2.0, 4.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    prv = find_noise_multiplier(target_epsilon=1.0, **kw)
    assert 0 < prv < sigmas[1]
    assert find_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=0) == 0.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("target_epsilon", 0.0),
        ("target_epsilon", -1.0),
        ("target_epsilon", math.nan),
        ("target_epsilon", math.inf),
        ("epsilon_tolerance", 0.0),
        ("delta", 1.0),
        ("steps", -1),
    ],
)
def test_find_noise_multiplier_rejects_bad_input(name: str, value: float) -> None:
    kw: dict[str, Any] = {
        "target_epsilon": 1.0,
        "delta": 1e-5,
        "sample_rate": 0.01,
        "steps": 10,
        name: value,
    }
    with pytest.raises(InvalidConfigError, match=name):
        find_noise_multiplier(**kw)


def test_find_noise_multiplier_unreachable_target() -> None:
    # PRV's bound never drops below about eps_error, whatever the noise
    with pytest.raises(InvalidConfigError, match="cannot be reached"):
        find_noise_multiplier(
            target_epsilon=PRV_EPS_ERROR / 10, delta=1e-5, sample_rate=0.01, steps=10
        )
