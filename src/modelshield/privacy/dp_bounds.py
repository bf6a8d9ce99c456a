"""Statistics of empirical differential-privacy auditing: membership guesses about canaries
turned into a lower bound on ε that holds at a stated confidence.

Two settings:

* **Many runs** (Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot &
  Carlini, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
  Learning", S&P 2021). The mechanism is run many times with the canary and many times
  without; a distinguisher scores every run. Any test between the two output distributions
  of an (ε, δ)-DP mechanism has ``FPR + e^ε·FNR >= 1 - δ`` and ``FNR + e^ε·FPR >= 1 - δ``
  (Kairouz, Oh & Viswanath 2015), so Clopper–Pearson upper bounds on the two error rates give
  a lower bound on ε: :func:`eps_from_rates`, :func:`canary_eps_lower`.
* **One run** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023). ``m`` canaries are each included independently with probability 1/2; the
  auditor guesses in/out for ``r`` of them and is right ``v`` times. Under (ε, δ)-DP the
  number of correct guesses is stochastically dominated (up to a δ term) by
  ``Binomial(r, e^ε / (1 + e^ε))``: :func:`one_run_p_value`, :func:`one_run_eps_lower`,
  :func:`one_run_from_scores`.

Everything here is exact finite-sample statistics in plain Python/torch (no SciPy at run
time); the tests check it against SciPy and by simulating mechanisms of known ε.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modelshield.core.errors import InvalidConfigError
from modelshield.core.metrics import beta_ppf
from modelshield.core.results import encode

__all__ = [
    "CanaryBound",
    "OneRunBound",
    "canary_eps_lower",
    "clopper_pearson_upper",
    "eps_from_rates",
    "one_run_eps_lower",
    "one_run_from_scores",
    "one_run_p_value",
]

_EPS_CAP = 64.0
"""Largest ε the one-run bisection looks at; at ε = 64 every p-value here is ~1."""
_EPS_TOL = 1e-9


# -- validation ----------------------------------------------------------------------------


def _check_prob(name: str, value: Any, *, allow_one: bool = True) -> float:
    hi = "1]" if allow_one else "1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0)
    ):
        raise InvalidConfigError(f"{name} must be a number in [0, {hi}, got {value!r}")
    return float(value)


def _check_delta(delta: Any) -> float:
    return _check_prob("delta", delta, allow_one=False)


def _check_confidence(confidence: Any) -> float:
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not 0.0 < confidence < 1.0
    ):
        raise InvalidConfigError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_int(name: str, value: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InvalidConfigError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_scores(name: str, scores: Any) -> torch.Tensor:
    """A non-empty 1-D tensor of finite numbers, as float64 on the CPU."""
    if not isinstance(scores, torch.Tensor):
        raise InvalidConfigError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 1 or scores.numel() == 0:
        raise InvalidConfigError(
            f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}"
        )
    if scores.dtype == torch.bool or scores.is_complex():
        raise InvalidConfigError(f"{name} must hold real numbers, got dtype {scores.dtype}")
    s = scores.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise InvalidConfigError(f"{name} contains NaN or infinite values; all must be finite")
    return s


# -- binomial tools ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _cp_upper(k: int, n: int, confidence: float) -> float:
    if k >= n:
        return 1.0
    if k == 0:  # closed form of the Beta(1, n) quantile
        return -math.expm1(math.log1p(-confidence) / n)
    return beta_ppf(confidence, k + 1, n - k)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson (1934) upper confidence bound on a binomial proportion.

    For ``k`` successes out of ``n`` it is the ``confidence`` quantile of
    ``Beta(k + 1, n - k)`` (1.0 when ``k == n``): ``P[p > upper] <= 1 - confidence`` for
    every true ``p``. :func:`modelshield.core.metrics.clopper_pearson` is the two-sided
    interval; auditing needs only the upper side of each error rate.
    """
    n = _check_int("n", n, lo=1)
    k = _check_int("k", k)
    if k > n:
        raise InvalidConfigError(f"k must be in [0, n={n}], got {k}")
    return _cp_upper(k, n, _check_confidence(confidence))


@functools.lru_cache(maxsize=64)
def _log_binom_coeffs(r: int) -> torch.Tensor:
    """``log C(r, k)`` for ``k = 0..r`` (float64)."""
    k = torch.arange(r + 1, dtype=torch.float64)
    return math.lgamma(r + 1.0) - torch.lgamma(k + 1.0) - torch.lgamma(r - k + 1.0)


def _binom_pmf_rr(r: int, eps: float) -> torch.Tensor:
    """PMF of ``Binomial(r, q)``, ``q = e^ε / (1 + e^ε)``, computed in log space.

    ``log q`` and ``log(1 - q)`` are formed from ε directly, so ``q`` near 1 (large ε) does
    not round to 1 and the terms keep their relative accuracy for ``r`` up to ~10^5.
    """
    softplus = math.log1p(math.exp(-eps))  # eps >= 0, so exp(-eps) <= 1
    log_q, log_1mq = -softplus, -eps - softplus
    k = torch.arange(r + 1, dtype=torch.float64)
    return torch.exp(_log_binom_coeffs(r) + k * log_q + (r - k) * log_1mq)


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    if v <= 0:
        return 1.0
    pmf = _binom_pmf_rr(r, eps)
    p = float(pmf[v:].sum())  # P[Binomial(r, q) >= v]
    if delta > 0.0:
        # alpha = max_{1<=i<=v} P[v > W >= v - i] / i: window sums ending at v - 1.
        window = torch.cumsum(pmf[:v].flip(0), 0)
        i = torch.arange(1, v + 1, dtype=torch.float64)
        alpha = float((window / i).max())
        p += 2.0 * m * delta * alpha
    return min(1.0, p)


# -- hypothesis-testing region -------------------------------------------------------------


def eps_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """Smallest ε for which an (ε, δ)-DP mechanism admits a test with these error rates.

    The hypothesis-testing characterisation of (ε, δ)-DP (Kairouz, Oh & Viswanath 2015; used
    for auditing by Jagielski et al. 2020 and Nasr et al. 2021): every test between the
    outputs on neighbouring inputs has ``FPR + e^ε·FNR >= 1 - δ`` and
    ``FNR + e^ε·FPR >= 1 - δ``. Hence

        ε >= max(log((1 - δ - FNR) / FPR), log((1 - δ - FPR) / FNR)),

    clipped at 0. A rate of 0 gives ``inf`` when the matching numerator is positive. Plug in
    *upper* confidence bounds on the rates to get a lower confidence bound on ε.
    """
    fpr = _check_prob("fpr", fpr)
    fnr = _check_prob("fnr", fnr)
    delta = _check_delta(delta)
    best = 0.0
    for num, den in ((1.0 - delta - fnr, fpr), (1.0 - delta - fpr, fnr)):
        if num <= 0.0:
            continue
        if den == 0.0:
            return math.inf
        best = max(best, math.log(num / den))
    return best


# -- many runs: Jagielski et al. 2020, Nasr et al. 2021 -------------------------------------


@dataclass(frozen=True)
class CanaryBound:
    """Lower bound on ε from runs with and without a canary (:func:`canary_eps_lower`)."""

    eps_lower: float
    """ε lower bound, valid with probability >= ``confidence`` (simultaneously over the
    thresholds tried)."""
    eps_point: float
    """:func:`eps_from_rates` of the empirical rates at ``threshold`` (no interval; may be
    ``inf`` when a count is 0)."""
    threshold: float
    """Guess "canary in" when the score is ``>= threshold``."""
    fp: int
    """Runs without the canary guessed "in" at ``threshold`` (out of ``n_out``)."""
    fn: int
    """Runs with the canary guessed "out" at ``threshold`` (out of ``n_in``)."""
    n_in: int
    n_out: int
    fpr_upper: float
    fnr_upper: float
    confidence: float
    thresholds_tried: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (non-finite floats become ``"inf"``)."""
        out: dict[str, Any] = encode(dataclasses.asdict(self))
        return out


def _geometric_ranks(n: int, count: int) -> list[int]:
    """About ``count`` distinct integers in ``[1, n]``, spaced geometrically from 1."""
    if count <= 1 or n == 1:
        return [1]
    ratio = n ** (1.0 / (count - 1))
    return sorted({min(n, max(1, round(ratio**j))) for j in range(count)})


def canary_eps_lower(
    scores_in: torch.Tensor,
    scores_out: torch.Tensor,
    *,
    delta: float,
    confidence: float = 0.95,
    max_thresholds: int = 32,
) -> CanaryBound:
    """Lower confidence bound on ε from a distinguisher's scores on many independent runs.

    Jagielski, Ullman & Oprea (2020) and Nasr et al. (2021): ``scores_in`` are the
    distinguisher's scores (higher = "the canary was in") on runs trained *with* the
    canary, ``scores_out`` on runs *without*. For each threshold ``t`` the guess is "in"
    when ``score >= t``; one-sided Clopper–Pearson bounds on the false-positive rate
    (out of ``n_out``) and false-negative rate (out of ``n_in``), each at level
    ``1 - (1 - confidence) / (2T)`` (Bonferroni over the ``T`` thresholds and the two rates),
    go into :func:`eps_from_rates`; the result is the largest over thresholds and holds with
    probability at least ``confidence``.

    Thresholds. Choosing thresholds from the pooled scores would make the error counts at
    them non-binomial (the threshold depends on the very scores it classifies). Instead the
    thresholds are order statistics at fixed ranks ``k`` (geometric grid, at most
    ``max_thresholds`` in all), half taken from each sample:

    * just above the ``k``-th largest ``scores_out``: the threshold depends on the out-runs
      only, so the false-negative count is exactly binomial, and the true FPR at it is
      dominated by a ``Beta(k, n_out - k + 1)`` variable, whose quantile is the
      Clopper–Pearson bound for ``k - 1`` false positives (the count observed when scores
      have no ties; ties only make it conservative);
    * at the ``k``-th smallest ``scores_in``: symmetrically for the false-negative rate.

    So the bound is valid for any score distributions, assuming only that the runs are
    independent.
    """
    s_in = _check_scores("scores_in", scores_in)
    s_out = _check_scores("scores_out", scores_out)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    max_thresholds = _check_int("max_thresholds", max_thresholds, lo=2)
    n_in, n_out = int(s_in.numel()), int(s_out.numel())

    out_desc = torch.sort(s_out, descending=True).values.tolist()
    in_asc = torch.sort(s_in).values.tolist()
    # (threshold, rank-based count for the rate the threshold is built on, family)
    candidates: list[tuple[float, int, str]] = []
    for k in _geometric_ranks(n_out, (max_thresholds + 1) // 2):
        candidates.append((math.nextafter(out_desc[k - 1], math.inf), k - 1, "out"))
    for k in _geometric_ranks(n_in, max_thresholds // 2):
        candidates.append((in_asc[k - 1], k - 1, "in"))
    n_thr = len(candidates)
    level = 1.0 - (1.0 - confidence) / (2 * n_thr)

    best: CanaryBound | None = None
    for t, rank_count, family in candidates:
        fp = int((s_out >= t).sum())
        fn = int((s_in < t).sum())
        fp_bound = rank_count if family == "out" else fp
        fn_bound = rank_count if family == "in" else fn
        fpr_u = _cp_upper(fp_bound, n_out, level)
        fnr_u = _cp_upper(fn_bound, n_in, level)
        eps = eps_from_rates(fpr_u, fnr_u, delta)
        if best is None or eps > best.eps_lower:
            best = CanaryBound(
                eps_lower=eps,
                eps_point=eps_from_rates(fp / n_out, fn / n_in, delta),
                threshold=float(t),
                fp=fp,
                fn=fn,
                n_in=n_in,
                n_out=n_out,
                fpr_upper=fpr_u,
                fnr_upper=fnr_u,
                confidence=confidence,
                thresholds_tried=n_thr,
            )
    assert best is not None  # at least one threshold per family
    return best


# -- one run: Steinke, Nasr & Jagielski 2023 ------------------------------------------------


def _check_mrv(m: Any, r: Any, v: Any) -> tuple[int, int, int]:
    m = _check_int("m", m)
    r = _check_int("r", r)
    v = _check_int("v", v)
    if r > m:
        raise InvalidConfigError(f"r (guesses) must be <= m={m} canaries, got {r}")
    if v > r:
        raise InvalidConfigError(f"v (correct guesses) must be <= r={r} guesses, got {v}")
    return m, r, v


def one_run_p_value(*, m: int, r: int, v: int, eps: float, delta: float) -> float:
    """p-value of ``v`` correct guesses out of ``r`` under the null "the mechanism is (ε, δ)-DP".

    Steinke, Nasr & Jagielski (2023), main theorem in its approximate-DP form: ``m``
    canaries are each included independently with probability 1/2; the auditor, seeing the
    output, guesses in/out for ``r`` of them (abstaining on ``m - r``) and gets ``W`` right.
    With ``q = e^ε / (1 + e^ε)`` and ``W' ~ Binomial(r, q)``,

        P[W >= v] <= P[W' >= v] + 2·m·δ·α,   α = max_{1<=i<=v} P[v > W' >= v - i] / i,

    (for pure ε-DP, ``δ = 0``, only the binomial tail remains); returned capped at 1. The
    paper's PDF could not be consulted while this was written, so the formula above is
    exactly what is implemented; it agrees with the p-value snippet the authors published
    with the paper as reproduced in public follow-up code (same ``i`` range, same ``2·m·δ``
    factor). The
    maximum over ``1 <= i <= v`` equals the maximum over ``1 <= i <= m`` (for ``i >= v`` the
    probability no longer grows while ``1/i`` shrinks).

    Binomial terms are summed exactly in log space (:func:`math.lgamma`), accurate for ``r``
    well beyond 10^4. The value is non-decreasing in ε whenever ``2·m·δ <= 1`` (each term of
    the max is then a mixture of increasing binomial tails), and numerically also beyond
    (the tests check both); :func:`one_run_eps_lower` bisects on it.
    """
    m, r, v = _check_mrv(m, r, v)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise InvalidConfigError(f"eps must be a number >= 0, got {eps!r}")
    delta = _check_delta(delta)
    if math.isinf(eps):
        return 1.0 if v <= r else 0.0
    return _p_value(m, r, v, float(eps), delta)


def one_run_eps_lower(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest ε rejected by :func:`one_run_p_value` at level ``1 - confidence``.

    Steinke, Nasr & Jagielski (2023): report the largest ε such that the p-value of the
    observed ``v`` correct guesses out of ``r`` is below ``1 - confidence``; then
    ``ε_true >= eps_lower`` with probability at least ``confidence``. 0.0 when even ε = 0 is
    not rejected. Found by bisection to 1e-9 on the rejected side (the p-value increases with
    ε), searching ε in ``[0, 64]``.
    """
    m, r, v = _check_mrv(m, r, v)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
    if _p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while _p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2.0 * hi
        if hi > _EPS_CAP:
            return lo
    while hi - lo > _EPS_TOL:
        mid = 0.5 * (lo + hi)
        if _p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunBound:
    """Lower bound on ε from one run with ``m`` randomly included canaries
    (:func:`one_run_from_scores`)."""

    eps_lower: float
    """ε lower bound, valid with probability >= ``confidence`` (Bonferroni over the
    ``candidates_tried`` guess counts)."""
    m: int
    r: int
    """Guesses made at the chosen ``(k_plus, k_minus)``: ``k_plus + k_minus``."""
    v: int
    """Correct guesses among them."""
    k_plus: int
    """Highest-scoring canaries guessed "in"."""
    k_minus: int
    """Lowest-scoring canaries guessed "out"."""
    confidence: float
    candidates_tried: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        out: dict[str, Any] = encode(dataclasses.asdict(self))
        return out


def _default_guesses(m: int) -> list[tuple[int, int]]:
    ks = sorted({max(1, m // d) for d in (50, 20, 10, 5, 2)})
    return [(k, k) for k in ks if 2 * k <= m]


def one_run_from_scores(
    scores: torch.Tensor,
    included: torch.Tensor,
    *,
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> OneRunBound:
    """One-run ε lower bound from per-canary membership scores (Steinke, Nasr & Jagielski 2023).

    ``scores[i]`` is the auditor's score for canary ``i`` (higher = more likely included);
    ``included[i]`` whether it was in training, which must have been decided by independent
    fair coin flips before training (the theorem's assumption). For each candidate
    ``(k_plus, k_minus)`` the auditor guesses "in" for the ``k_plus`` highest scores, "out"
    for the ``k_minus`` lowest, and abstains on the rest (ties broken by index); ``v`` is
    the number of correct guesses among ``r = k_plus + k_minus`` and the bound is
    :func:`one_run_eps_lower`.

    The paper reports the best over a few guess counts; to keep the stated confidence, each
    candidate is evaluated at ``1 - (1 - confidence) / len(candidates)`` (Bonferroni) and the
    largest bound is returned. Default candidates: ``k_plus = k_minus = k`` for ``k`` in
    ``{m/50, m/20, m/10, m/5, m/2}`` (floored, at least 1, deduplicated, ``2k <= m``).
    """
    s = _check_scores("scores", scores)
    if not isinstance(included, torch.Tensor):
        raise InvalidConfigError(f"included must be a torch.Tensor, got {type(included).__name__}")
    if included.ndim != 1 or included.shape[0] != s.shape[0]:
        raise InvalidConfigError(
            "scores and included must be 1-D of the same length, got shapes "
            f"{tuple(scores.shape)} and {tuple(included.shape)}"
        )
    inc = included.detach().cpu()
    if inc.dtype != torch.bool:
        if bool(((inc != 0) & (inc != 1)).any()):
            raise InvalidConfigError("included must be boolean (or 0/1): True marks a member")
        inc = inc.bool()
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    m = int(s.numel())

    if guesses is None:
        cands = _default_guesses(m)
        if not cands:
            raise InvalidConfigError(f"one-run auditing needs m >= 2 canaries, got m={m}")
    else:
        cands = []
        for g in guesses:
            if not isinstance(g, (tuple, list)) or len(g) != 2:
                raise InvalidConfigError(
                    f"guesses must be (k_plus, k_minus) pairs of integers, got {g!r}"
                )
            kp = _check_int("k_plus", g[0])
            km = _check_int("k_minus", g[1])
            if kp + km < 1 or kp + km > m:
                raise InvalidConfigError(
                    f"k_plus + k_minus must be in [1, m={m}], got {kp} + {km} = {kp + km}"
                )
            if (kp, km) not in cands:
                cands.append((kp, km))
        if not cands:
            raise InvalidConfigError("guesses must hold at least one (k_plus, k_minus) pair")

    order = torch.sort(s, descending=True, stable=True).indices
    inc_sorted = inc[order]
    level = 1.0 - (1.0 - confidence) / len(cands)

    best: OneRunBound | None = None
    for kp, km in cands:
        v = int(inc_sorted[:kp].sum()) + int((~inc_sorted[m - km :]).sum())
        eps = one_run_eps_lower(m=m, r=kp + km, v=v, delta=delta, confidence=level)
        if best is None or eps > best.eps_lower:
            best = OneRunBound(
                eps_lower=eps,
                m=m,
                r=kp + km,
                v=v,
                k_plus=kp,
                k_minus=km,
                confidence=confidence,
                candidates_tried=len(cands),
            )
    assert best is not None
    return best
