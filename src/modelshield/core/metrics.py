"""Metrics and their confidence intervals: the one place they are computed.

Binomial intervals follow Clopper & Pearson (1934), exact, through the regularised
incomplete beta function (continued fraction, Numerical Recipes §6.4), so no SciPy is
needed at run time; tests check them against SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def bootstrap_mean_ci(
    values: torch.Tensor,
    *,
    confidence: float = 0.95,
    n_boot: int = 2000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron 1979) for the mean of per-record ``values``.

    Pass paired differences (e.g. ``attack_correct - baseline_correct``) to get an interval
    on a difference of accuracies measured on the same records.
    """
    if not 0.0 < confidence < 1.0:
        raise InvalidConfigError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidConfigError(f"n_boot must be a positive integer, got {n_boot!r}")
    v = values.detach().double().flatten().cpu()
    n = int(v.numel())
    if n == 0:
        return (float("nan"), float("nan"))
    idx = torch.randint(0, n, (n_boot, n), generator=generator)
    means = v[idx].mean(dim=1)
    alpha = 1.0 - confidence
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return (float(lo), float(hi))


# -- ROC metrics for membership inference ----------------------------------------------------
# Carlini et al., "Membership Inference Attacks From First Principles" (S&P 2022) argue for
# reporting the full ROC curve and the TPR at a low FPR rather than accuracy or AUC alone.


def _check_scores_labels(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a score vector and a boolean label vector; return float64 / bool copies on CPU."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InvalidConfigError(
            "scores and labels must be torch.Tensor, got "
            f"{type(scores).__name__} and {type(labels).__name__}"
        )
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape[0] != labels.shape[0]:
        raise InvalidConfigError(
            "scores and labels must be 1-D of the same length, got shapes "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    s = scores.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise InvalidConfigError("scores contain NaN or infinite values")
    lab = labels.detach().cpu()
    if lab.dtype != torch.bool:
        if bool(((lab != 0) & (lab != 1)).any()):
            raise InvalidConfigError("labels must be boolean (or 0/1): True marks a member")
        lab = lab.bool()
    n_pos = int(lab.sum())
    if n_pos == 0 or n_pos == lab.numel():
        raise InvalidConfigError(
            f"labels need both members and non-members, got {n_pos} members of {lab.numel()}"
        )
    return s, lab


def roc_curve(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ROC curve of ``scores`` (higher = positive) against boolean ``labels``.

    One point per distinct score (ties move together), starting at ``(0, 0)`` with
    threshold ``+inf``; a point is "positive" when its score is ``>= threshold``. Matches
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``. Returns float64 tensors
    ``(fpr, tpr, thresholds)``.
    """
    s, lab = _check_scores_labels(scores, labels)
    order = torch.argsort(s, descending=True, stable=True)
    s_sorted = s[order]
    pos = lab[order].to(torch.float64)
    tp = torch.cumsum(pos, 0)
    fp = torch.cumsum(1.0 - pos, 0)
    # last index of each run of equal scores
    last = torch.ones_like(s_sorted, dtype=torch.bool)
    last[:-1] = s_sorted[1:] != s_sorted[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp[last] / tp[-1]])
    fpr = torch.cat([zero, fp[last] / fp[-1]])
    thr = torch.cat([torch.full((1,), math.inf, dtype=torch.float64), s_sorted[last]])
    return fpr, tpr, thr


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoidal on the exact curve: ties count one half)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(torch.trapezoid(tpr, fpr))


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, fpr: float) -> float:
    """Largest TPR over thresholds whose FPR is ``<= fpr`` (Carlini et al. 2022, Table 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr <= 1.0:
        raise InvalidConfigError(f"fpr must be a number in [0, 1], got {fpr!r}")
    f, t, _ = roc_curve(scores, labels)
    ok = f <= fpr + 1e-12
    return float(t[ok].max())  # (0, 0) is always present


def bootstrap_ci(
    fn: Callable[[torch.Tensor, torch.Tensor], float],
    scores: torch.Tensor,
    labels: torch.Tensor,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(scores, labels)`` (Efron & Tibshirani 1993).

    Members and non-members are resampled separately (stratified), so every replicate
    keeps both classes and the class balance of the original sample.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidConfigError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if isinstance(confidence, bool) or not 0.0 < float(confidence) < 1.0:
        raise InvalidConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    s, lab = _check_scores_labels(scores, labels)
    g = torch.Generator().manual_seed(int(seed))
    pos = torch.nonzero(lab).flatten()
    neg = torch.nonzero(~lab).flatten()
    stats = torch.empty(n_boot, dtype=torch.float64)
    for b in range(n_boot):
        ip = pos[torch.randint(len(pos), (len(pos),), generator=g)]
        ineg = neg[torch.randint(len(neg), (len(neg),), generator=g)]
        idx = torch.cat([ip, ineg])
        stats[b] = float(fn(s[idx], lab[idx]))
    alpha = 1.0 - float(confidence)
    q = torch.tensor([alpha / 2, 1.0 - alpha / 2], dtype=torch.float64)
    lo, hi = torch.quantile(stats, q).tolist()
    return float(lo), float(hi)


def precision_recall(
    flagged: Sequence[int] | torch.Tensor, truth: Sequence[int] | torch.Tensor, n: int
) -> tuple[float, float]:
    """Precision and recall of ``flagged`` sample indices against the ``truth`` indices
    among ``n`` samples. Precision is 1 when nothing is flagged (no false alarm), recall
    is 1 when there is nothing to find."""
    f = torch.as_tensor(flagged, dtype=torch.long).flatten()
    t = torch.as_tensor(truth, dtype=torch.long).flatten()
    for name, v in (("flagged", f), ("truth", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
            raise InvalidConfigError(
                f"{name} indices must lie in [0, {n}), got {v.min()}..{v.max()}"
            )
    mf = torch.zeros(n, dtype=torch.bool)
    mt = torch.zeros(n, dtype=torch.bool)
    mf[f] = True
    mt[t] = True
    hit = int((mf & mt).sum())
    precision = hit / int(mf.sum()) if bool(mf.any()) else 1.0
    recall = hit / int(mt.sum()) if bool(mt.any()) else 1.0
    return precision, recall
