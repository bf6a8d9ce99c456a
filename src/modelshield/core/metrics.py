"""Metrics and their confidence intervals: the one place they are computed.

Binomial intervals follow Clopper & Pearson (1934), exact, through the regularised
incomplete beta function (continued fraction, Numerical Recipes §6.4), so no SciPy is
needed at run time; tests check them against SciPy.
"""

from __future__ import annotations

import math

import torch

from modelshield.core.errors import InvalidConfigError


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution by bisection on :func:`betainc`."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``k`` successes out of ``n``."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise InvalidConfigError(f"k must be in [0, n={n}], got {k}")
    if not 0.0 < confidence < 1.0:
        raise InvalidConfigError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else beta_ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta_ppf(1 - alpha / 2, k + 1, n - k)
    return (lo, hi)


def accuracy_with_ci(
    correct: torch.Tensor, confidence: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """Mean of a boolean vector with its Clopper–Pearson interval."""
    n = int(correct.numel())
    k = int(correct.sum())
    if n == 0:
        return float("nan"), (0.0, 1.0)
    return k / n, clopper_pearson(k, n, confidence)


# Acklam's rational approximation to the inverse normal CDF (relative error < 1.15e-9),
# https://web.archive.org/web/20151030215612/http://home.online.no/~pjacklam/notes/invnorm/
_ACKLAM_A = (
    -3.969683028665376e01,
    2.209460984245205e02,
    -2.759285104469687e02,
    1.383577518672690e02,
    -3.066479806614716e01,
    2.506628277459239e00,
)
_ACKLAM_B = (
    -5.447609879822406e01,
    1.615858368580409e02,
    -1.556989798598866e02,
    6.680131188771972e01,
    -1.328068155288572e01,
)
_ACKLAM_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549671010229528e00,
    4.374664141464968e00,
    2.938163982698783e00,
)
_ACKLAM_D = (
    7.784695709041462e-03,
    3.224671290700398e-01,
    2.445134137142996e00,
    3.754408661907416e00,
)
_ACKLAM_P_LOW = 0.02425


def _norm_ppf_lower(p: float) -> float:
    """``Φ⁻¹(p)`` for ``0 < p <= 0.5`` (the result is <= 0)."""
    a, b, c, d = _ACKLAM_A, _ACKLAM_B, _ACKLAM_C, _ACKLAM_D
    if p < _ACKLAM_P_LOW:
        q = math.sqrt(-2.0 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0
        )
    else:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
        x /= ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0
    if x * x / 2.0 < 700.0:
        # One Halley step on Φ(x) - p (Acklam's refinement) brings the error to ~1e-15;
        # Φ(x) = 0.5·erfc(-x/√2) for x <= 0 is accurate in relative terms in the tail.
        e = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
        u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
        return x - u / (1.0 + x * u / 2.0)
    # Deep tail (p below ~1e-304, where the density underflows): Newton steps on
    # log Φ(x) - log p, with log Φ from the asymptotic (Mills ratio) series.
    log_p = math.log(p)
    for _ in range(3):
        log_pdf = -x * x / 2.0 - 0.5 * math.log(2.0 * math.pi)
        log_cdf = log_pdf - math.log(-x) + math.log1p(_mills_series(x))
        x -= (log_cdf - log_p) / math.exp(log_pdf - log_cdf)
    return x


def _mills_series(x: float) -> float:
    """``Φ(x)·√(2π)·(-x)·exp(x²/2) - 1`` for ``x << 0`` (asymptotic, terms to x⁻¹²)."""
    inv = 1.0 / (x * x)
    term, total = 1.0, 0.0
    for k in range(1, 7):
        term *= -(2 * k - 1) * inv
        total += term
    return total


def norm_ppf(p: float) -> float:
    """Inverse of the standard normal CDF, ``Φ⁻¹(p)``; ``-inf`` at 0 and ``inf`` at 1.

    Acklam's rational approximation refined by one Halley step with :func:`math.erfc`
    (agrees with ``scipy.stats.norm.ppf`` to ~1e-15 relative). Upper-half values are
    computed as ``-Φ⁻¹(1 - p)``, where ``1 - p`` is exact, so both tails keep their accuracy.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise InvalidConfigError(f"p must be a probability in [0, 1], got {p!r}")
    p = float(p)
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    if p <= 0.5:
        return _norm_ppf_lower(p)
    return -_norm_ppf_lower(1.0 - p)
