"""Query-stream detection of model extraction: PRADA and the Shapiro–Wilk test it relies on.

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
from dataclasses import dataclass
from typing import Any

import torch

from modelshield.core.errors import DataError, InvalidConfigError

__all__ = ["PradaMonitor", "ShapiroResult", "shapiro_wilk"]

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
