"""Query-stream detection of model extraction: PRADA, a confidence-shift monitor, and the tests.

Two complementary per-client detectors: :class:`PradaMonitor` (below) looks at the
*geometry* of a client's inputs and catches small-step synthetic queries;
:class:`OodMonitor` (further below) looks at the *model's answers* and catches a stream
drawn from another distribution than the owner's data (e.g. a Knockoff Nets pool).

PRADA (Juuti, Szyller, Marchal, Asokan, "PRADA: Protecting against DNN Model Stealing
Attacks", IEEE EuroS&P 2019) watches one client's stream of queries. For every query ``x``
with predicted class ``c`` it takes the minimum L2 distance from ``x`` to the client's
*growing set* ``G_c`` of earlier queries of that class and appends it to the distance list
``D``. ``x`` joins ``G_c`` when that distance exceeds ``T_c = max(0, mean(D_Gc) - std(D_Gc))``,
where ``D_Gc`` holds the distances recorded when the members of ``G_c`` joined (the first
member of a class joins with distance 0, and its query adds nothing to ``D``). Natural,
independently drawn queries give distances that look normally distributed; synthetic
extraction queries (small steps away from earlier queries, e.g. Jacobian-based augmentation
of Papernot et al. 2017) do not. Once ``D`` holds enough values, values further than
``outlier_z`` standard deviations from its mean are set aside and the Shapiro–Wilk
statistic ``W`` of the rest is compared with the threshold ``delta``: ``W < delta`` flags
the client.

The Shapiro–Wilk test (Shapiro & Wilk 1965) is computed with Royston's approximations
(Royston 1992, "Approximating the Shapiro-Wilk W-test for non-normality", Statistics and
Computing 2:117-119; algorithm AS R94, Royston 1995) for the coefficients and the p-value,
valid for 3 <= n <= 5000. SciPy is not needed at run time; the tests compare with
``scipy.stats.shapiro``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from modelshield.core.errors import DataError, InvalidConfigError

__all__ = [
    "KSResult",
    "OodMonitor",
    "PradaMonitor",
    "ShapiroResult",
    "alpha_spent",
    "chi2_homogeneity",
    "kolmogorov_sf",
    "ks_2samp",
    "ks_2samp_sf",
    "shapiro_wilk",
]

# Royston (1992): polynomial corrections of the two largest coefficients, in u = n^-1/2.
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)
# p-value, 4 <= n <= 11: gamma(n), mean and log-sd of -log(gamma - log(1 - W)), cubic in n.
_G = (-2.273, 0.459)
_C3 = (0.5440, -0.39978, 0.025054, -6.714e-4)
_C4 = (1.3822, -0.77857, 0.062767, -0.0020322)
# p-value, n >= 12: mean and log-sd of log(1 - W), polynomials in log(n).
_C5 = (-1.5861, -0.31082, -0.083751, 0.0038915)
_C6 = (-0.4803, -0.082676, 0.0030302)
MAX_N = 5000


def _poly(coefs: tuple[float, ...], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coefs))


def _norm_sf(z: float) -> float:
    """Upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class ShapiroResult:
    """Shapiro–Wilk statistic ``w`` (in (0, 1]; small = not normal) and its p-value."""

    w: float
    p_value: float
    n: int


def _coefficients(n: int) -> torch.Tensor:
    """Royston's approximation of the Shapiro–Wilk weights ``a`` (antisymmetric, unit norm)."""
    a = torch.zeros(n, dtype=torch.float64)
    if n == 3:
        a[0], a[2] = -math.sqrt(0.5), math.sqrt(0.5)
        return a
    i = torch.arange(1, n + 1, dtype=torch.float64)
    m = torch.special.ndtri((i - 0.375) / (n + 0.25))  # Blom's approximate normal scores
    msum = float((m * m).sum())
    u = 1.0 / math.sqrt(n)
    an = float(m[-1]) / math.sqrt(msum) + _poly(_C1, u)
    if n > 5:
        an1 = float(m[-2]) / math.sqrt(msum) + _poly(_C2, u)
        phi = (msum - 2 * float(m[-1]) ** 2 - 2 * float(m[-2]) ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a = m / math.sqrt(phi)
        a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    else:
        phi = (msum - 2 * float(m[-1]) ** 2) / (1 - 2 * an**2)
        a = m / math.sqrt(phi)
        a[-1], a[0] = an, -an
    return a


def _p_value(w: float, n: int) -> float:
    """Royston's normalising transformation of ``1 - W`` (upper-tail p-value)."""
    if n == 3:  # exact (Shapiro & Wilk 1965)
        return min(1.0, max(0.0, 6.0 / math.pi * (math.asin(math.sqrt(w)) - math.pi / 3)))
    if w >= 1.0:
        return 1.0
    y = math.log1p(-w)
    if n <= 11:
        gamma = _poly(_G, n)
        if y >= gamma:
            return 0.0
        y = -math.log(gamma - y)
        mean, sd = _poly(_C3, n), math.exp(_poly(_C4, n))
    else:
        ln = math.log(n)
        mean, sd = _poly(_C5, ln), math.exp(_poly(_C6, ln))
    return _norm_sf((y - mean) / sd)


def shapiro_wilk(x: torch.Tensor | Any) -> ShapiroResult:
    """Shapiro–Wilk test of normality (Royston 1992 / AS R94 approximations).

    ``x`` is a 1-D sample of 3 to 5000 finite values. Returns ``W`` and the p-value of the
    null hypothesis that ``x`` comes from a normal distribution. A constant sample has no
    defined ``W``; like SciPy, it gives ``W = 1``, ``p = 1``.
    """
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    n = int(t.numel())
    if n < 3 or n > MAX_N:
        raise DataError(f"shapiro_wilk needs 3 to {MAX_N} values, got {n}")
    if not bool(torch.isfinite(t).all()):
        raise DataError("shapiro_wilk: the sample contains NaN or infinite values")
    t = torch.sort(t - t.median()).values  # centring first keeps precision for large offsets
    centred = t - t.mean()
    ssq = float((centred * centred).sum())
    if ssq <= 0.0 or float(t[-1] - t[0]) <= 1e-12 * max(1.0, float(t.abs().max())):
        return ShapiroResult(1.0, 1.0, n)
    a = _coefficients(n)
    w = min(1.0, float((a * t).sum()) ** 2 / ssq)
    return ShapiroResult(w, _p_value(w, n), n)


# -----------------------------------------------------------------------------------------
# PRADA
# -----------------------------------------------------------------------------------------


class _Rows:
    """A growable ``(k, d)`` float32 buffer (capacity doubles) for one growing set."""

    def __init__(self, dim: int) -> None:
        self.data = torch.empty((16, dim), dtype=torch.float32)
        self.size = 0
        self.joined: list[float] = []  # D_Gc: the distance each member joined with

    def append(self, row: torch.Tensor, distance: float) -> None:
        if self.size == self.data.shape[0]:
            grown = torch.empty((2 * self.size, self.data.shape[1]), dtype=torch.float32)
            grown[: self.size] = self.data
            self.data = grown
        self.data[self.size] = row
        self.size += 1
        self.joined.append(distance)

    def threshold(self) -> float:
        """``T_c = max(0, mean(D_Gc) - std(D_Gc))`` (population standard deviation)."""
        k = len(self.joined)
        mean = sum(self.joined) / k
        var = sum((d - mean) ** 2 for d in self.joined) / k
        return max(0.0, mean - math.sqrt(var))


class PradaMonitor:
    """PRADA's state for one client (Juuti et al. 2019, Algorithm 1); thread-safe.

    ``delta``: flag when ``W < delta``. ``min_samples``: start testing once ``D`` holds
    this many distances. ``outlier_z``: values of ``D`` further than this many standard
    deviations from its mean are left out of the test (``None`` keeps all). ``window``:
    test the most recent values of ``D`` only (at most 5000, the range of Royston's
    approximation). ``test_every``: run the test every this many distances. Once flagged,
    a monitor stays flagged and stops testing.
    """

    def __init__(
        self,
        delta: float = 0.9,
        *,
        min_samples: int = 100,
        outlier_z: float | None = 3.0,
        window: int = MAX_N,
        test_every: int = 1,
    ) -> None:
        if not 0.0 < delta < 1.0:
            raise InvalidConfigError(f"PRADA delta must be in (0, 1), got {delta!r}")
        if min_samples < 3:
            raise InvalidConfigError(f"PRADA min_samples must be >= 3, got {min_samples!r}")
        if not 3 <= window <= MAX_N:
            raise InvalidConfigError(f"PRADA window must be in [3, {MAX_N}], got {window!r}")
        if test_every < 1:
            raise InvalidConfigError(f"PRADA test_every must be >= 1, got {test_every!r}")
        if outlier_z is not None and not outlier_z > 0:
            raise InvalidConfigError(f"PRADA outlier_z must be > 0, got {outlier_z!r}")
        self.delta = float(delta)
        self.min_samples = int(min_samples)
        self.outlier_z = outlier_z
        self.window = int(window)
        self.test_every = int(test_every)
        self.queries = 0
        self.distances: list[float] = []
        self.last: ShapiroResult | None = None
        self.min_w: float | None = None
        self.flagged = False
        self.flagged_at: int | None = None  # the query (1-based) whose test flagged the client
        self._sets: dict[int, _Rows] = {}
        self._since_test = 0
        self._lock = threading.Lock()

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> bool:
        """Feed a batch of queries (in order) and their predicted classes.

        Returns True when this batch flagged the client (it was not flagged before).
        """
        rows = x.detach().reshape(int(x.shape[0]), -1).to("cpu", torch.float32)
        cls = labels.detach().reshape(-1).to("cpu").tolist()
        if len(cls) != rows.shape[0]:
            raise DataError(f"PRADA got {rows.shape[0]} queries but {len(cls)} labels")
        with self._lock:
            was = self.flagged
            for row, c in zip(rows, cls, strict=True):
                self._one(row, int(c))
            return self.flagged and not was

    def _one(self, row: torch.Tensor, c: int) -> None:
        self.queries += 1
        group = self._sets.get(c)
        if group is None:
            group = self._sets[c] = _Rows(int(row.numel()))
            group.append(row, 0.0)
            return
        d_min = float(torch.cdist(row[None], group.data[: group.size]).min())
        self.distances.append(d_min)
        if d_min > group.threshold():
            group.append(row, d_min)
        if len(self.distances) > 4 * self.window:  # keep memory bounded; only the window is tested
            del self.distances[: len(self.distances) - self.window]
        self._since_test += 1
        if self.flagged or len(self.distances) < self.min_samples:
            return
        if self._since_test < self.test_every:
            return
        self._since_test = 0
        self._test()

    def _test(self) -> None:
        d = torch.tensor(self.distances[-self.window :], dtype=torch.float64)
        if self.outlier_z is not None and d.numel() > 2:
            mean, sd = d.mean(), d.std(unbiased=False)
            if float(sd) > 0:
                d = d[(d - mean).abs() <= self.outlier_z * sd]
        if d.numel() < 3:
            return
        result = shapiro_wilk(d)
        self.last = result
        self.min_w = result.w if self.min_w is None else min(self.min_w, result.w)
        if result.w < self.delta:
            self.flagged = True
            self.flagged_at = self.queries

    def stats(self) -> dict[str, Any]:
        """JSON-ready state for the operator (no query data)."""
        with self._lock:
            return {
                "queries": self.queries,
                "distances": len(self.distances),
                "growing_set": sum(g.size for g in self._sets.values()),
                "w": None if self.last is None else round(self.last.w, 6),
                "p_value": None if self.last is None else self.last.p_value,
                "min_w": None if self.min_w is None else round(self.min_w, 6),
                "flagged": self.flagged,
                "flagged_at": self.flagged_at,
            }


# -----------------------------------------------------------------------------------------
# Two-sample tests (no SciPy at run time; the tests compare with scipy.stats)
# -----------------------------------------------------------------------------------------

#: Exact two-sample KS p-values are computed while ``min(n, m) <= KS_EXACT_MIN`` and
#: ``n * m <= KS_EXACT_CELLS``; beyond that the asymptotic distribution is used.
KS_EXACT_MIN = 1000
KS_EXACT_CELLS = 10_000_000


@dataclass(frozen=True)
class KSResult:
    """Two-sample Kolmogorov–Smirnov statistic ``d`` = sup |F_x - F_y|, its two-sided
    p-value, the sample sizes and whether the p-value is exact or asymptotic."""

    d: float
    p_value: float
    n: int
    m: int
    exact: bool


def kolmogorov_sf(lam: float) -> float:
    """Upper tail of the Kolmogorov distribution, ``P(K > lam)``
    (Kolmogorov 1933): ``2 Σ_{k>=1} (-1)^(k-1) exp(-2 k² lam²)``; for ``lam < 1`` the
    equivalent theta-function form ``1 - sqrt(2π)/lam Σ exp(-(2k-1)² π² / (8 lam²))``,
    which converges fast there."""
    if lam <= 0.0:
        return 1.0
    if lam < 1.0:
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8.0 * lam * lam)) for k in range(1, 8))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return min(1.0, max(0.0, 2.0 * s))


def _ks_exact_sf(dint: int, n: int, m: int) -> float:
    """``P(n·m·D >= dint)`` for two independent samples of sizes ``n`` and ``m`` from one
    continuous distribution, by counting lattice paths (Hodges 1957).

    Under the null hypothesis every interleaving of the two sorted samples is equally
    likely: a monotone path from ``(0, 0)`` to ``(n, m)`` (``i`` values of the first
    sample and ``j`` of the second seen so far) with ``n·m·D = max |i·m - j·n|``. The
    paths that stay strictly inside ``|i·m - j·n| < dint`` are counted row by row
    (``u_i[j] = u_i[j-1] + u_{i-1}[j]`` within the band, a cumulative sum, rescaled each
    row against overflow). The p-value is summed over each path's *first exit* from the
    band (paths inside up to the last point, times the paths from the exit point to
    ``(n, m)``, over ``C(n+m, n)``), a sum of positive terms, so small p-values keep
    their relative precision (``1 - inside / total`` would not).
    """
    if dint <= 0:
        return 1.0
    if n > m:  # iterate over the smaller sample; the band is symmetric in the two roles
        n, m = m, n
    log_total = math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
    jj = torch.arange(m + 1, dtype=torch.float64)
    lg_m_j = torch.lgamma(m - jj + 1)

    def band(i: int) -> tuple[int, int]:
        lo = max(0, (i * m - dint) // n + 1)  # j·n > i·m - dint
        hi = min(m, -((-(i * m + dint)) // n) - 1)  # j·n < i·m + dint
        return lo, hi

    def to_end(i: int, j: torch.Tensor) -> torch.Tensor:
        """log of the number of monotone paths from ``(i, j)`` to ``(n, m)``."""
        return torch.lgamma((n - i) + (m - j) + 1) - math.lgamma(n - i + 1) - lg_m_j[j.long()]

    u = torch.zeros(m + 1, dtype=torch.float64)
    u[0] = 1.0  # a virtual row -1: the path starts at (0, 0)
    log_scale = 0.0
    exits: list[torch.Tensor] = []
    lo, hi = band(0)
    for i in range(n + 1):
        row = torch.zeros(m + 1, dtype=torch.float64)
        if lo <= hi:
            row[lo : hi + 1] = torch.cumsum(u[lo : hi + 1], dim=0)
        top = float(row.max())
        if top <= 0.0:
            break  # no path is left inside; all exits have been counted
        offset = log_scale - log_total
        if hi < m:  # step right from (i, hi) leaves the band
            exits.append(torch.log(row[hi : hi + 1]) + offset + to_end(i, jj[hi + 1 : hi + 2]))
        if i < n:
            nlo, nhi = band(i + 1)
            stop = min(hi, nlo - 1)  # step up from (i, j), j < lo_{i+1}, leaves the band
            if lo <= stop:
                part = torch.log(row[lo : stop + 1]) + offset
                exits.append(part + to_end(i + 1, jj[lo : stop + 1]))
            lo, hi = nlo, nhi
        u = row / top
        log_scale += math.log(top)
    if not exits:
        return 0.0
    p = math.exp(float(torch.logsumexp(torch.cat(exits), dim=0)))
    return min(1.0, max(0.0, p))


def ks_2samp_sf(d: float, n: int, m: int, *, exact: bool | None = None) -> tuple[float, bool]:
    """Two-sided p-value ``P(D >= d)`` of the two-sample KS statistic for sizes ``n``, ``m``.

    Exact (lattice paths, :func:`_ks_exact_sf`) for small samples (see ``KS_EXACT_MIN``,
    ``KS_EXACT_CELLS``) or when ``exact=True``; otherwise the Kolmogorov limit at
    ``lam = (sqrt(e) + 0.12 + 0.11 / sqrt(e)) · d`` with ``e = n·m / (n + m)``, Stephens's
    (1970) small-sample correction. Returns ``(p_value, exact)``.
    """
    if n < 1 or m < 1:
        raise DataError(f"the KS test needs two non-empty samples, got sizes {n} and {m}")
    if exact is None:
        exact = min(n, m) <= KS_EXACT_MIN and n * m <= KS_EXACT_CELLS
    if exact:
        # n·m·D is an integer; round so that the observed value counts as "at least d".
        return _ks_exact_sf(round(d * n * m), n, m), True
    e = n * m / (n + m)
    return kolmogorov_sf((math.sqrt(e) + 0.12 + 0.11 / math.sqrt(e)) * d), False


def ks_2samp(
    x: torch.Tensor | Any, y: torch.Tensor | Any, *, exact: bool | None = None
) -> KSResult:
    """Two-sample Kolmogorov–Smirnov test (two-sided) of ``x`` against ``y``.

    ``D = max_t |F_x(t) - F_y(t)|`` over the pooled values (computed in integers, so ties
    are handled exactly); the p-value is :func:`ks_2samp_sf`'s, which assumes continuous
    distributions (with ties it is conservative, as SciPy's ``ks_2samp`` is).
    """
    a = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    n, m = int(a.numel()), int(b.numel())
    if n < 1 or m < 1:
        raise DataError(f"ks_2samp needs two non-empty samples, got sizes {n} and {m}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise DataError("ks_2samp: the samples contain NaN or infinite values")
    a, b = torch.sort(a).values, torch.sort(b).values
    pooled = torch.cat([a, b])
    fa = torch.searchsorted(a, pooled, right=True)
    fb = torch.searchsorted(b, pooled, right=True)
    dint = int((fa * m - fb * n).abs().max())
    d = dint / (n * m)
    if exact is None:
        exact = min(n, m) <= KS_EXACT_MIN and n * m <= KS_EXACT_CELLS
    if exact:
        return KSResult(d, _ks_exact_sf(dint, n, m), n, m, True)
    p, _ = ks_2samp_sf(d, n, m, exact=False)
    return KSResult(d, p, n, m, False)


def chi2_homogeneity(
    a: torch.Tensor | Any, b: torch.Tensor | Any, *, min_expected: float = 5.0
) -> tuple[float, float, int]:
    """Pearson's chi-square test that two count vectors (e.g. class histograms) come from
    one categorical distribution (test of homogeneity of a 2 × C table).

    Categories whose expected count is below ``min_expected`` in either row are pooled into
    one, itself merged into the smallest other category if still below it (the usual
    validity rule of the chi-square approximation); categories empty in both are dropped. Returns ``(statistic, p_value, degrees_of_freedom)``; the p-value is the
    chi-square upper tail ``Q(df/2, X²/2)`` (regularised upper incomplete gamma).
    """
    ca = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    cb = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if ca.shape != cb.shape:
        raise DataError(f"chi2_homogeneity: {ca.numel()} and {cb.numel()} categories")
    total = ca + cb
    na, nb = float(ca.sum()), float(cb.sum())
    if na <= 0 or nb <= 0:
        return 0.0, 1.0, 0
    keep = total > 0
    ca, cb, total = ca[keep], cb[keep], total[keep]
    grand = na + nb
    small = torch.minimum(na * total, nb * total) / grand < min_expected
    if bool(small.any()):
        big = ~small
        pa, pb = ca[small].sum(), cb[small].sum()
        ca, cb = ca[big], cb[big]
        if min(na, nb) * float(pa + pb) / grand >= min_expected or ca.numel() == 0:
            ca, cb = torch.cat([ca, pa.reshape(1)]), torch.cat([cb, pb.reshape(1)])
        else:  # the pooled category is still sparse: merge it into the smallest other one
            k = int((ca + cb).argmin())
            ca[k] += pa
            cb[k] += pb
        total = ca + cb
    df = int(total.numel()) - 1
    if df < 1:
        return 0.0, 1.0, 0
    ea, eb = na * total / grand, nb * total / grand
    stat = float((((ca - ea) ** 2) / ea).sum() + (((cb - eb) ** 2) / eb).sum())
    p = float(
        torch.special.gammaincc(
            torch.tensor(df / 2.0, dtype=torch.float64),
            torch.tensor(stat / 2.0, dtype=torch.float64),
        )
    )
    return stat, min(1.0, max(0.0, p)), df


def alpha_spent(alpha: float, k: int) -> float:
    """The level of the ``k``-th test (1-based) under the alpha-spending rule
    ``alpha · 6 / (π² k²)``: the levels sum to ``alpha`` over k = 1, 2, ... (Σ 1/k² = π²/6)."""
    if k < 1:
        raise InvalidConfigError(f"test number must be >= 1, got {k!r}")
    return alpha * 6.0 / (math.pi**2 * k * k)


# -----------------------------------------------------------------------------------------
# Confidence / class-histogram shift (out-of-distribution stream) monitor
# -----------------------------------------------------------------------------------------


class OodMonitor:
    """One client's out-of-distribution stream monitor; thread-safe.

    A distribution-shift monitor in the spirit of stateful extraction detection
    (Kesarwani et al. 2018, "Model Extraction Warning in MLaaS Paradigm", ACSAC; Pal et al.
    2021, "Stateful Detection of Model Extraction Attacks"), built on the
    maximum-softmax-probability baseline of Hendrycks & Gimpel (ICLR 2017, "A Baseline for
    Detecting Misclassified and Out-of-Distribution Examples"): inputs unlike the model's
    data tend to get different top-1 confidences. What is implemented, exactly:

    * for every query answered, the model's maximum softmax probability and predicted
      class are kept (the last ``window`` of each);
    * once ``min_samples`` queries were answered, and then every ``test_every`` queries,
      test number ``k`` compares the kept values with those of a fixed reference set of
      benign inputs (e.g. the owner's validation data): a two-sample Kolmogorov–Smirnov
      test of the confidences (:func:`ks_2samp`, exact p-value for small samples) and,
      with ``classes=True``, Pearson's chi-square test of homogeneity of the predicted-
      class histograms (:func:`chi2_homogeneity`; catches class-skewed pools whose
      confidences look normal). The two are combined with Bonferroni: each is run at half
      the test's level;
    * the level of test ``k`` is ``alpha · 6 / (π² k²)`` (alpha spending,
      :func:`alpha_spent`). The levels sum to ``alpha``, so by the union bound a client
      whose queries are drawn i.i.d. from the reference distribution is flagged with
      probability at most ``alpha`` over its whole lifetime, however many tests run
      (given valid p-values; the chi-square one is asymptotic, and the guarantee is over
      the draw of the reference set too — for a fixed reference set the false flags of
      different benign clients are correlated).

    A flag is sticky; a flagged monitor stops testing. Only a fixed-size summary of the
    answers is kept (no inputs). Known limit, fundamental to this family: an attacker
    whose queries come from the same distribution as the owner's data (e.g. it owns
    natural samples of the task) is indistinguishable from a user, and a client that mixes
    in enough benign queries dilutes the shift; Sybil clients split a stream between ids.

    ``reference_conf``: the reference set's maximum softmax probabilities (``None``: the
    model answers labels only; only the class test runs). ``reference_classes``: its
    predicted classes; ``num_classes`` the model's class count.
    """

    def __init__(
        self,
        reference_conf: torch.Tensor | None,
        reference_classes: torch.Tensor,
        num_classes: int,
        alpha: float = 1e-4,
        *,
        min_samples: int = 100,
        test_every: int = 50,
        window: int = 5000,
        classes: bool = True,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise InvalidConfigError(f"ood alpha must be in (0, 1), got {alpha!r}")
        if min_samples < 10:
            raise InvalidConfigError(f"ood min_samples must be >= 10, got {min_samples!r}")
        if test_every < 1:
            raise InvalidConfigError(f"ood test_every must be >= 1, got {test_every!r}")
        if window < min_samples:
            raise InvalidConfigError(
                f"ood window must be >= min_samples ({min_samples}), got {window!r}"
            )
        if num_classes < 2:
            raise InvalidConfigError(f"ood needs at least 2 classes, got {num_classes!r}")
        if reference_conf is None and not classes:
            raise InvalidConfigError(
                "ood: the model answers labels only, so only the class test can run; "
                "do not disable it (classes=false)"
            )
        ref_cls = reference_classes.detach().reshape(-1).to("cpu", torch.long)
        self.ref_counts = torch.bincount(ref_cls.clamp(0, num_classes - 1), minlength=num_classes)
        self.ref_conf = (
            None
            if reference_conf is None
            else reference_conf.detach().reshape(-1).to("cpu", torch.float64).sort().values
        )
        self.alpha = float(alpha)
        self.num_classes = int(num_classes)
        self.min_samples = int(min_samples)
        self.test_every = int(test_every)
        self.window = int(window)
        self.classes = bool(classes)
        self.queries = 0
        self.tests = 0
        self.flagged = False
        self.flagged_at: int | None = None
        self.flagged_by: str | None = None
        self.last: dict[str, Any] = {}
        self.min_ratio: float | None = None  # smallest p-value / level seen (< 1 flags)
        self._conf: deque[float] = deque(maxlen=self.window)
        self._cls: deque[int] = deque(maxlen=self.window)
        self._counts = [0] * self.num_classes
        self._since_test = 0
        self._lock = threading.Lock()

    def update(self, probs: torch.Tensor | None, labels: torch.Tensor) -> bool:
        """Feed a batch of answered queries (in order): their probabilities ``(N, C)``
        (``None`` for a label-only model) and predicted classes ``(N,)``.

        Returns True when this batch flagged the client (it was not flagged before).
        """
        cls = labels.detach().reshape(-1).to("cpu", torch.long).clamp(0, self.num_classes - 1)
        conf: list[float] | None = None
        if probs is not None and self.ref_conf is not None:
            p = probs.detach().to("cpu", torch.float64)
            if p.ndim != 2 or p.shape[0] != cls.numel():
                raise DataError(
                    f"ood monitor got probabilities of shape {tuple(p.shape)} for "
                    f"{cls.numel()} labels"
                )
            conf = p.max(dim=1).values.tolist()
        with self._lock:
            was = self.flagged
            for i, c in enumerate(cls.tolist()):
                if len(self._cls) == self.window:
                    self._counts[self._cls[0]] -= 1
                self._cls.append(c)
                self._counts[c] += 1
                if conf is not None:
                    self._conf.append(conf[i])
                self.queries += 1
                self._since_test += 1
                if (
                    not self.flagged
                    and self.queries >= self.min_samples
                    and self._since_test >= self.test_every
                ):
                    self._since_test = 0
                    self._test()
            return self.flagged and not was

    def _test(self) -> None:
        self.tests += 1
        level = alpha_spent(self.alpha, self.tests)
        results: dict[str, float] = {}
        if self.ref_conf is not None and len(self._conf) >= 1:
            ks = ks_2samp(torch.tensor(list(self._conf), dtype=torch.float64), self.ref_conf)
            results["confidence"] = ks.p_value
            self.last["ks_d"] = round(ks.d, 6)
            self.last["confidence_p"] = ks.p_value
        if self.classes:
            stat, p, _ = chi2_homogeneity(torch.tensor(self._counts), self.ref_counts)
            results["classes"] = p
            self.last["classes_chi2"] = round(stat, 3)
            self.last["classes_p"] = p
        if not results:
            return
        each = level / len(results)  # Bonferroni over the tests run
        self.last["level"] = each
        name, p_min = min(results.items(), key=lambda kv: kv[1])
        ratio = p_min / each
        self.min_ratio = ratio if self.min_ratio is None else min(self.min_ratio, ratio)
        if p_min < each:
            self.flagged = True
            self.flagged_at = self.queries
            self.flagged_by = name

    def stats(self) -> dict[str, Any]:
        """JSON-ready state for the operator (no query data)."""
        with self._lock:
            return {
                "queries": self.queries,
                "tests": self.tests,
                **self.last,
                "min_p_over_level": None if self.min_ratio is None else self.min_ratio,
                "flagged": self.flagged,
                "flagged_at": self.flagged_at,
                "flagged_by": self.flagged_by,
            }
