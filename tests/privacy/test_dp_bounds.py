"""Empirical DP-auditing statistics, checked against SciPy and by simulating mechanisms of
known ε (randomized response for the one-run bound, the Gaussian mechanism for the
many-run canary bound): the bounds must stay below the true ε at the stated confidence and
still be reasonably tight.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from modelshield.core.errors import InvalidConfigError
from modelshield.core.metrics import clopper_pearson
from modelshield.privacy.dp_bounds import (
    CanaryBound,
    OneRunBound,
    canary_eps_lower,
    clopper_pearson_upper,
    eps_from_rates,
    one_run_eps_lower,
    one_run_from_scores,
    one_run_p_value,
)

# -- independent references (SciPy) -------------------------------------------------------


def _q(eps: float) -> float:
    return 1.0 / (1.0 + math.exp(-eps))


def _ref_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke, Nasr & Jagielski (2023) p-value, written directly with scipy.stats.binom."""
    q = _q(eps)
    tail = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return float(min(1.0, tail))
    cdf_v1 = stats.binom.cdf(v - 1, r, q)
    alpha = max((cdf_v1 - stats.binom.cdf(v - 1 - i, r, q)) / i for i in range(1, v + 1))
    return float(min(1.0, tail + 2 * m * delta * alpha))


def _ref_eps_lower_pure(r: int, v: int, confidence: float) -> float:
    """Invert P[Binomial(r, q) >= v] = 1 - confidence for q, then ε = logit(q)."""
    alpha = 1.0 - confidence
    if stats.binom.sf(v - 1, r, 0.5) >= alpha:
        return 0.0
    q = optimize.brentq(lambda q: stats.binom.sf(v - 1, r, q) - alpha, 0.5, 1 - 1e-15, xtol=1e-15)
    return math.log(q / (1 - q))


def _gdp_eps(mu: float, delta: float) -> float:
    """Exact ε(δ) of μ-GDP (Dong, Roth & Su 2022, Cor. 2.13), inverted numerically."""

    def f(e: float) -> float:
        return stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)

    return optimize.brentq(lambda e: f(e) - delta, 0.0, 200.0) if f(0.0) > delta else 0.0


# -- eps_from_rates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fpr", "fnr", "delta", "expected"),
    [
        (0.1, 0.2, 0.0, math.log(0.8 / 0.1)),
        (0.1, 0.2, 0.05, math.log(0.75 / 0.1)),
        (0.3, 0.01, 1e-5, math.log((1 - 1e-5 - 0.3) / 0.01)),
        (0.5, 0.5, 0.0, 0.0),
        (0.45, 0.5, 0.05, 0.0),  # fpr + fnr = 1 - delta exactly
        (0.6, 0.6, 0.0, 0.0),
        (0.0, 0.5, 0.0, math.inf),
        (0.0, 1.0, 0.0, 0.0),  # the trivial "always out" test proves nothing
        (0.0, 0.0, 0.3, math.inf),
    ],
)
def test_eps_from_rates_closed_form(fpr: float, fnr: float, delta: float, expected: float) -> None:
    got = eps_from_rates(fpr, fnr, delta)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert eps_from_rates(fnr, fpr, delta) == got  # symmetric in the two error rates


def test_eps_from_rates_is_the_tightest_eps_of_the_region() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        fpr, fnr = rng.uniform(0.001, 0.6, size=2)
        delta = float(rng.choice([0.0, 1e-5, 0.01, 0.1]))
        eps = eps_from_rates(float(fpr), float(fnr), delta)
        # (eps, delta)-DP allows these rates: both inequalities of the region hold at eps...
        assert fpr + math.exp(eps) * fnr >= 1 - delta - 1e-12
        assert fnr + math.exp(eps) * fpr >= 1 - delta - 1e-12
        # ...and one of them fails just below it (when eps > 0)
        if eps > 0:
            e = eps - 1e-6
            assert min(fpr + math.exp(e) * fnr, fnr + math.exp(e) * fpr) < 1 - delta
        if fpr + fnr >= 1 - delta:
            assert eps == 0.0


# -- one-sided Clopper–Pearson ------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.5, 0.95, 0.999, 1 - 1e-6])
def test_clopper_pearson_upper_matches_scipy(confidence: float) -> None:
    for n in (1, 7, 50, 500, 5000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1}):
            if not 0 <= k < n:
                continue
            ref = stats.beta.ppf(confidence, k + 1, n - k)
            assert clopper_pearson_upper(k, n, confidence) == pytest.approx(
                ref, rel=1e-9, abs=1e-13
            )
        assert clopper_pearson_upper(n, n, confidence) == 1.0


def test_clopper_pearson_upper_is_the_upper_end_of_the_two_sided_interval() -> None:
    for k, n in ((0, 10), (3, 10), (40, 100)):
        one_sided = clopper_pearson_upper(k, n, 0.975)
        assert one_sided == pytest.approx(clopper_pearson(k, n, 0.95)[1], rel=1e-10)


# -- one-run p-value and bound ------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "r", "v", "eps"),
    [
        (1000, 100, 80, 1.0),
        (1000, 100, 100, 3.0),
        (1000, 1000, 530, 0.0),
        (200, 40, 3, 0.5),
        (10_000, 10_000, 6_000, 0.3),
        (10_000, 10_000, 9_990, 5.0),
        (50, 50, 0, 1.0),
    ],
)
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_one_run_p_value_matches_scipy(m: int, r: int, v: int, eps: float, delta: float) -> None:
    got = one_run_p_value(m=m, r=r, v=v, eps=eps, delta=delta)
    ref = _ref_p_value(m, r, v, eps, delta)
    assert got == pytest.approx(ref, rel=1e-8, abs=1e-14)
    if delta == 0:
        assert got == pytest.approx(stats.binom.sf(v - 1, r, _q(eps)), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [
        (1000, 100, 70, 0.0),
        (1000, 100, 70, 1e-5),
        (1000, 1000, 700, 1e-4),  # 2·m·δ = 0.2
        (1000, 200, 150, 2e-3),  # 2·m·δ = 4 > 1
        (50, 50, 40, 0.05),
    ],
)
def test_one_run_p_value_increases_with_eps(m: int, r: int, v: int, delta: float) -> None:
    ps = np.array(
        [one_run_p_value(m=m, r=r, v=v, eps=e, delta=delta) for e in np.linspace(0, 10, 401)]
    )
    assert np.all(np.diff(ps) >= -1e-12)
    assert ps[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "confidence"),
    [
        (1000, 100, 80, 0.95),
        (1000, 1000, 600, 0.95),
        (1000, 100, 100, 0.95),
        (1000, 40, 35, 0.99),
        (10_000, 2_000, 1_700, 0.9),
        (100, 20, 19, 0.5),
    ],
)
def test_one_run_eps_lower_pure_dp_matches_closed_form(
    m: int, r: int, v: int, confidence: float
) -> None:
    got = one_run_eps_lower(m=m, r=r, v=v, delta=0.0, confidence=confidence)
    assert got == pytest.approx(_ref_eps_lower_pure(r, v, confidence), abs=1e-4)
    assert got > 0


def test_one_run_eps_lower_approx_dp_is_the_boundary_of_the_rejected_set() -> None:
    for m, r, v, delta in ((1000, 1000, 800, 1e-5), (1000, 100, 95, 1e-4), (5000, 500, 450, 1e-6)):
        eps = one_run_eps_lower(m=m, r=r, v=v, delta=delta, confidence=0.95)
        assert 0 < eps <= one_run_eps_lower(m=m, r=r, v=v, delta=0.0, confidence=0.95)
        assert _ref_p_value(m, r, v, eps, delta) < 0.05
        assert _ref_p_value(m, r, v, eps + 1e-6, delta) >= 0.05 - 1e-9


def test_one_run_eps_lower_zero_when_nothing_is_rejected() -> None:
    assert one_run_eps_lower(m=1000, r=1000, v=500, delta=0.0) == 0.0
    assert one_run_eps_lower(m=1000, r=0, v=0, delta=0.0) == 0.0
    assert one_run_eps_lower(m=1000, r=100, v=10, delta=1e-5) == 0.0
    # a large δ swamps the evidence: 2·m·δ·α alone exceeds the level
    assert one_run_eps_lower(m=1000, r=100, v=70, delta=0.01) == 0.0


def test_one_run_perfect_guesses_give_a_large_bound() -> None:
    m = 1000
    scores = torch.arange(m, dtype=torch.float64)
    included = scores >= m / 2  # perfectly separated
    res = one_run_from_scores(scores, included, delta=0.0, guesses=[(50, 50)])
    assert (res.r, res.v, res.k_plus, res.k_minus) == (100, 100, 50, 50)
    # P[Binomial(100, q) >= 100] = q^100 = 0.05  =>  ε = logit(0.05^(1/100)) ≈ 3.49
    q = 0.05 ** (1 / 100)
    assert res.eps_lower == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert res.eps_lower > 3
    # the default grid (Bonferroni over 5 candidates) picks all 1000 guesses, all correct
    res_all = one_run_from_scores(scores, included, delta=1e-5)
    assert res_all.candidates_tried == 5 and res_all.r == res_all.v == 1000
    assert res_all.eps_lower > 5


def test_one_run_from_scores_matches_a_direct_count() -> None:
    g = torch.Generator().manual_seed(3)
    m = 600
    included = torch.rand(m, generator=g) < 0.5
    scores = included.double() + 1.5 * torch.randn(m, generator=g, dtype=torch.float64)
    guesses = [(30, 10), (100, 100), (0, 50), (250, 0)]
    res = one_run_from_scores(scores, included, delta=1e-5, confidence=0.9, guesses=guesses)
    order = np.argsort(-scores.numpy(), kind="stable")
    inc = included.numpy()[order]
    expected = []
    for kp, km in guesses:
        v = int(inc[:kp].sum()) + int((~inc[m - km :]).sum())
        eps = one_run_eps_lower(m=m, r=kp + km, v=v, delta=1e-5, confidence=1 - 0.1 / 4)
        expected.append((eps, kp, km, v))
    best = max(expected, key=lambda t: t[0])
    assert res.candidates_tried == 4 and res.confidence == 0.9
    assert (res.eps_lower, res.k_plus, res.k_minus, res.v) == best
    assert res.eps_lower > 0


# -- validity by simulation ---------------------------------------------------------------


def _randomized_response(eps: float, m: int, trials: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Each canary in w.p. 1/2; the mechanism reports its bit correctly w.p. e^ε/(1+e^ε)."""
    g = torch.Generator().manual_seed(seed)
    included = torch.rand(trials, m, generator=g) < 0.5
    truthful = torch.rand(trials, m, generator=g) < _q(eps)
    reported = torch.where(truthful, included, ~included)
    scores = reported.double() + 1e-3 * torch.rand(trials, m, generator=g, dtype=torch.float64)
    return included, scores


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_one_run_bound_is_valid_and_tight_on_randomized_response(eps: float) -> None:
    # Randomized response on independent bits is exactly ε-DP. True coverage of the default
    # (Bonferroni) bound is ~97.5% here (3000-trial estimate), so 400 trials sit ~3 sd above 95%.
    trials, m = 400, 1000
    included, scores = _randomized_response(eps, m, trials, seed=int(eps * 100))
    bounds = [one_run_from_scores(scores[i], included[i], delta=0.0) for i in range(trials)]
    lows = np.array([b.eps_lower for b in bounds])
    coverage = float((lows <= eps).mean())
    assert coverage >= 0.95, coverage
    assert lows.mean() > 0.6 * eps, lows.mean()  # measured: 0.68·ε (ε=0.5), 0.87·ε (ε=2)
    assert all(b.candidates_tried == 5 for b in bounds)
    # The check has teeth: the plug-in estimate logit(v / r) (no confidence bound) fails it.
    naive = np.array([math.log(b.v / (b.r - b.v)) if b.v < b.r else math.inf for b in bounds])
    assert float((naive <= eps).mean()) < 0.9


def test_one_run_bound_with_delta_is_valid_on_randomized_response() -> None:
    trials, m, eps = 200, 1000, 2.0
    included, scores = _randomized_response(eps, m, trials, seed=7)
    lows = np.array(
        [one_run_from_scores(scores[i], included[i], delta=1e-5).eps_lower for i in range(trials)]
    )
    assert float((lows <= eps).mean()) >= 0.95
    assert lows.mean() > 0.6 * eps


@pytest.mark.parametrize(
    ("mu", "delta", "min_ratio"),
    # measured mean bound / truth: 0.47 (truth 1.57), 0.52 (truth 4.57), 0.26 (truth 10.0:
    # 500 runs a side cannot show ε much above log(500) whatever the mechanism)
    [(1.0, 0.05, 0.4), (2.0, 0.05, 0.45), (2.0, 1e-5, 0.2)],
)
def test_canary_bound_is_valid_on_the_gaussian_mechanism(
    mu: float, delta: float, min_ratio: float
) -> None:
    # scores_in ~ N(μ, 1), scores_out ~ N(0, 1): the distinguisher sees a μ-GDP pair, whose
    # exact ε(δ) is the truth the bound must stay below.
    true_eps = _gdp_eps(mu, delta)
    g = torch.Generator().manual_seed(int(mu * 10))
    trials, n = 100, 500
    lows, naive = [], []
    for _ in range(trials):
        s_in = mu + torch.randn(n, generator=g, dtype=torch.float64)
        s_out = torch.randn(n, generator=g, dtype=torch.float64)
        res = canary_eps_lower(s_in, s_out, delta=delta)
        lows.append(res.eps_lower)
        # plug-in over every pooled threshold, no confidence bound: must fail the check
        fprs = (s_out[None, :] >= torch.cat([s_in, s_out])[:, None]).double().mean(1)
        fnrs = (s_in[None, :] < torch.cat([s_in, s_out])[:, None]).double().mean(1)
        naive.append(
            max(eps_from_rates(float(a), float(b), delta) for a, b in zip(fprs, fnrs, strict=True))
        )
    lows_a = np.array(lows)
    assert float((lows_a <= true_eps).mean()) >= 0.95
    assert float((np.array(naive) <= true_eps).mean()) < 0.5
    assert lows_a.min() > 0  # 500 runs a side detect these mechanisms every time
    assert lows_a.mean() > min_ratio * true_eps


def test_canary_bound_zero_when_scores_carry_no_signal() -> None:
    g = torch.Generator().manual_seed(5)
    lows = [
        canary_eps_lower(
            torch.randn(300, generator=g), torch.randn(300, generator=g), delta=1e-5
        ).eps_lower
        for _ in range(50)
    ]
    assert sum(x == 0.0 for x in lows) >= 48  # ε = 0 truth: positive bounds are false alarms


def test_canary_bound_perfect_separation_matches_the_analytic_value() -> None:
    delta = 1e-5
    s_in = torch.linspace(10.0, 11.0, 50)
    s_out = torch.linspace(0.0, 1.0, 50)
    res = canary_eps_lower(s_in, s_out, delta=delta, confidence=0.95)
    t = res.thresholds_tried
    assert 2 <= t <= 32
    u = stats.beta.ppf(1 - 0.05 / (2 * t), 1, 50)  # CP upper bound for 0 errors of 50
    assert res.eps_lower == pytest.approx(math.log((1 - delta - u) / u), rel=1e-9)
    assert (res.fp, res.fn, res.n_in, res.n_out) == (0, 0, 50, 50)
    assert res.fpr_upper == pytest.approx(u, rel=1e-9) and res.fnr_upper == pytest.approx(u)
    assert res.eps_point == math.inf
    assert 1.0 < res.threshold <= 10.0


def test_canary_bound_reports_a_consistent_threshold() -> None:
    g = torch.Generator().manual_seed(11)
    s_in = 1.5 + torch.randn(200, generator=g)
    s_out = torch.randn(300, generator=g)
    for max_t in (2, 5, 32, 100):
        res = canary_eps_lower(s_in, s_out, delta=1e-5, max_thresholds=max_t)
        assert res.thresholds_tried <= max_t
        s_in64, s_out64 = s_in.double(), s_out.double()
        assert res.fp == int((s_out64 >= res.threshold).sum())
        assert res.fn == int((s_in64 < res.threshold).sum())
        assert res.fpr_upper >= res.fp / 300 and res.fnr_upper >= res.fn / 200
        assert res.eps_lower <= res.eps_point
        level = 1 - 0.05 / (2 * res.thresholds_tried)
        # no ties in continuous scores: the bounds are CP at the observed counts
        assert res.fpr_upper == pytest.approx(stats.beta.ppf(level, res.fp + 1, 300 - res.fp))
        assert res.fnr_upper == pytest.approx(stats.beta.ppf(level, res.fn + 1, 200 - res.fn))
        assert res.eps_lower == pytest.approx(eps_from_rates(res.fpr_upper, res.fnr_upper, 1e-5))


def test_results_serialise_to_json() -> None:
    c = canary_eps_lower(torch.tensor([5.0, 6.0]), torch.tensor([0.0, 1.0]), delta=0.0)
    assert isinstance(c, CanaryBound)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["eps_point"] == "inf" and d["n_in"] == 2
    o = one_run_from_scores(torch.arange(10.0), torch.arange(10) >= 5, delta=0.0)
    assert isinstance(o, OneRunBound)
    assert json.loads(json.dumps(o.to_dict()))["m"] == 10


# -- invalid inputs -----------------------------------------------------------------------


def test_invalid_inputs_raise() -> None:
    ok = torch.randn(20)
    inc = torch.arange(20) % 2 == 0
    bad_calls = [
        lambda: eps_from_rates(1.2, 0.1, 0.0),
        lambda: eps_from_rates(0.1, -0.1, 0.0),
        lambda: eps_from_rates(0.1, 0.1, 1.0),
        lambda: clopper_pearson_upper(5, 4),
        lambda: clopper_pearson_upper(1, 4, 1.0),
        lambda: one_run_p_value(m=10, r=11, v=5, eps=1.0, delta=0.0),
        lambda: one_run_p_value(m=10, r=5, v=6, eps=1.0, delta=0.0),
        lambda: one_run_p_value(m=10, r=5, v=3, eps=-1.0, delta=0.0),
        lambda: one_run_p_value(m=10, r=5, v=3, eps=1.0, delta=-1e-5),
        lambda: one_run_eps_lower(m=10, r=5, v=3, delta=0.0, confidence=0.0),
        lambda: one_run_eps_lower(m=10, r=5, v=3, delta=0.0, confidence=1.0),
        lambda: one_run_eps_lower(m=10, r=5, v=3, delta=1.0),
        lambda: one_run_eps_lower(m=10, r=5.0, v=3, delta=0.0),
        lambda: one_run_from_scores(ok, inc[:10], delta=0.0),  # shape mismatch
        lambda: one_run_from_scores(ok.reshape(4, 5), inc.reshape(4, 5), delta=0.0),
        lambda: one_run_from_scores(torch.tensor([0.0, float("nan")] * 10), inc, delta=0.0),
        lambda: one_run_from_scores(ok, inc, delta=0.0, guesses=[(15, 6)]),  # 21 > m = 20
        lambda: one_run_from_scores(ok, inc, delta=0.0, guesses=[(0, 0)]),
        lambda: one_run_from_scores(ok, inc, delta=0.0, guesses=[]),
        lambda: one_run_from_scores(ok, inc, delta=0.0, confidence=1.5),
        lambda: one_run_from_scores(ok, inc, delta=-0.1),
        lambda: one_run_from_scores(ok, torch.full((20,), 2), delta=0.0),
        lambda: one_run_from_scores(ok[:1], inc[:1], delta=0.0),  # m = 1: no default guesses
        lambda: canary_eps_lower(ok, torch.tensor([]), delta=0.0),
        lambda: canary_eps_lower(ok, torch.tensor([1.0, float("inf")]), delta=0.0),
        lambda: canary_eps_lower(ok, ok, delta=1.0),
        lambda: canary_eps_lower(ok, ok, delta=0.0, confidence=0.0),
        lambda: canary_eps_lower(ok, ok, delta=0.0, max_thresholds=1),
        lambda: canary_eps_lower(ok.numpy(), ok, delta=0.0),  # type: ignore[arg-type]
    ]
    for call in bad_calls:
        with pytest.raises(InvalidConfigError):
            call()
    with pytest.raises(InvalidConfigError, match="k_plus \\+ k_minus"):
        one_run_from_scores(ok, inc, delta=0.0, guesses=[(15, 6)])
    with pytest.raises(InvalidConfigError, match="delta"):
        canary_eps_lower(ok, ok, delta=1.0)
