"""Privacy accounting for DP-SGD: the Poisson-subsampled Gaussian mechanism.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") releases, at every
step, a clipped gradient sum over a Poisson sample of the data (each record kept with
probability ``sample_rate``) plus Gaussian noise of standard deviation
``noise_multiplier × clipping norm``. This module turns ``(sample_rate, noise_multiplier,
steps, delta)`` into the epsilon spent, and back, with two accountants from Opacus:

``"rdp"``
    Rényi DP (Mironov 2017) of the subsampled Gaussian, computed per order as in Mironov,
    Talwar & Zhang 2019 ("Rényi Differential Privacy of the Sampled Gaussian Mechanism"),
    composed additively over steps and converted to ``(ε, δ)`` with the conversion of
    Balle et al. 2020 (Theorem 21; Canonne, Kamath & Steinke 2020, Proposition 12). The
    successor of the moments accountant of Abadi et al. 2016. A rigorous upper bound, but
    loose: a few percent above the true epsilon after thousands of steps, several times
    above it after a handful.
``"prv"`` (default)
    Numerical composition of privacy-loss random variables (Gopi, Lee & Wutschitz 2021,
    "Numerical Composition of Differential Privacy"): the privacy-loss distribution is
    discretised and convolved by FFT. We return Opacus's *upper* end of the error band,
    ``ε̂ + eps_error`` with :data:`PRV_EPS_ERROR` ``= 0.01`` and ``delta_error = δ/1000``
    (Opacus's default), so the result is at most about ``2 × 0.01`` above the true epsilon.

The RDP accountant searches the orders :data:`RDP_ORDERS` (1.1 … 10.9 in steps of 0.1,
11 … 63, and 128, 256, 512, 1024), a superset of Opacus's default grid that adds high orders
for small-epsilon regimes (large noise, few steps); a larger grid can only lower the bound.

Where PRV cannot be computed (its grid would exceed :data:`PRV_MAX_GRID_POINTS` points,
e.g. millions of steps at small noise, or the FFT result is not finite, or Opacus raises),
:func:`compute_epsilon` falls back to the RDP bound, which is always valid, and logs a
warning saying so. Opacus is an optional dependency: ``pip install 'modelshield[dp]'``.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from modelshield.core.errors import InvalidConfigError, ModelShieldError, UnknownComponentError

logger = logging.getLogger(__name__)

T = TypeVar("T")

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
"""Names accepted by every function here: ``"prv"`` (default) and ``"rdp"``."""

PRV_EPS_ERROR = 0.01
"""Half-width of the PRV accountant's epsilon error band (Gopi et al. 2021, Theorem 5.5)."""

PRV_MAX_GRID_POINTS = 1 << 24
"""Largest PRV discretisation grid (about 130 MB per array) before falling back to RDP."""

RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10 for x in range(1, 100)),
    *(float(a) for a in range(11, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)
"""Rényi orders searched by the ``"rdp"`` accountant."""

INSTALL_HINT = "pip install 'modelshield[dp]'"


class OpacusNotInstalledError(ModelShieldError, ImportError):
    """Privacy accounting was asked for but Opacus is not installed."""


# --------------------------------------------------------------------------- validation


def _number(name: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidConfigError(f"{name} must be a number {allowed}, got {value!r}")
    return float(value)


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sample_rate(sample_rate: object) -> float:
    allowed = "in (0, 1]"
    q = _number("sample_rate", sample_rate, allowed)
    if not 0.0 < q <= 1.0:  # also rejects NaN
        raise InvalidConfigError(f"sample_rate must be a number {allowed}, got {sample_rate!r}")
    return q


def _check_delta(delta: object) -> float:
    allowed = "in (0, 1)"
    d = _number("delta", delta, allowed)
    if not 0.0 < d < 1.0:
        raise InvalidConfigError(f"delta must be a number {allowed}, got {delta!r}")
    return d


def _check_accountant(accountant: object) -> str:
    if not isinstance(accountant, str) or accountant not in ACCOUNTANTS:
        raise UnknownComponentError(
            f"unknown accountant {accountant!r}; known: {', '.join(ACCOUNTANTS)}"
        )
    return accountant


def check_dp_parameters(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float
) -> None:
    """Raise :class:`InvalidConfigError` unless the DP-SGD parameters are valid.

    Allowed: ``0 < sample_rate <= 1``, ``noise_multiplier >= 0`` and finite, ``steps`` an
    integer ``>= 0`` and ``0 < delta < 1``. NaN is never allowed.
    """
    _check_sample_rate(sample_rate)
    allowed = ">= 0 and finite"
    sigma = _number("noise_multiplier", noise_multiplier, allowed)
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise InvalidConfigError(
            f"noise_multiplier must be a number {allowed}, got {noise_multiplier!r}"
        )
    _integer("steps", steps, 0)
    _check_delta(delta)


def sample_rate_for(batch_size: int, dataset_size: int) -> float:
    """Poisson sampling rate ``batch_size / dataset_size`` of an expected batch size."""
    n = _integer("dataset_size", dataset_size, 1)
    b = _integer("batch_size", batch_size, 1)
    if b > n:
        raise InvalidConfigError(f"batch_size must be <= dataset_size={n}, got {batch_size!r}")
    return b / n


# --------------------------------------------------------------------------- opacus calls


def _quietly(fn: Callable[[], T]) -> T:
    """Call into Opacus, turning its warnings (order-grid edges, NumPy) into debug logs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    for w in caught:
        logger.debug("opacus: %s", w.message)
    return result


def _import_accountants() -> Any:
    try:
        from opacus import accountants
    except ImportError as e:
        raise OpacusNotInstalledError(
            f"privacy accounting needs Opacus, which is not installed ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return accountants


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = _import_accountants().RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return float(_quietly(lambda: accountant.get_epsilon(delta, alphas=list(RDP_ORDERS))))


def _prv_grid_points(q: float, sigma: float, steps: int, delta: float) -> float:
    """Size of the grid Opacus's PRV accountant would build (Gopi et al. 2021, Thm 5.5)."""
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    delta_error = delta / 1000
    half_width = _quietly(
        lambda: compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma)],
            max_self_compositions=[steps],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta_error,
        )
    )
    mesh = PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return 2 * float(half_width) / mesh


def _prv_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountants = _import_accountants()
    params = f"sample_rate={q}, noise_multiplier={sigma}, steps={steps}, delta={delta}"
    try:
        points = _prv_grid_points(q, sigma, steps, delta)
        if not points <= PRV_MAX_GRID_POINTS:
            reason = f"its grid would need {points:.3g} points (limit {PRV_MAX_GRID_POINTS})"
        else:
            accountant = accountants.PRVAccountant()
            accountant.history = [(sigma, q, steps)]
            eps = float(_quietly(lambda: accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR)))
            if math.isfinite(eps):
                return eps
            reason = f"it returned {eps}"
    except (ArithmeticError, RuntimeError, ValueError, MemoryError) as e:
        reason = f"it failed: {e}"
    logger.warning(
        "PRV accountant unusable for %s (%s); using the RDP bound instead", params, reason
    )
    return _rdp_epsilon(q, sigma, steps, delta)


# --------------------------------------------------------------------------- public API


def compute_epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "prv",
) -> float:
    """Epsilon spent by ``steps`` rounds of the Poisson-subsampled Gaussian mechanism.

    ``accountant="prv"`` uses the PRV accountant of Gopi, Lee & Wutschitz 2021 (upper end
    of its ``±0.01`` error band); ``"rdp"`` the RDP bound of Mironov 2017 / Mironov, Talwar
    & Zhang 2019 (successor of the moments accountant of Abadi et al. 2016). Returns
    ``0.0`` for ``steps == 0`` and ``math.inf`` for ``noise_multiplier == 0``.
    """
    check_dp_parameters(
        sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, delta=delta
    )
    name = _check_accountant(accountant)
    q, sigma, n, d = float(sample_rate), float(noise_multiplier), int(steps), float(delta)
    if n == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    eps = _prv_epsilon(q, sigma, n, d) if name == "prv" else _rdp_epsilon(q, sigma, n, d)
    # Both conversions can dip below zero for large delta; (ε, δ)-DP has ε >= 0.
    return max(0.0, eps)


def epsilon_curve(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: Sequence[int],
    delta: float,
    accountant: str = "prv",
) -> list[float]:
    """Epsilon after each of the step counts in ``steps`` (e.g. at the end of each epoch).

    The curve is made non-decreasing in the step count: the value at ``n`` is the largest
    :func:`compute_epsilon` over the given counts ``<= n``. The true epsilon grows with the
    number of steps, so this is still an upper bound; it only matters for epsilons close to
    PRV's error band, where the numerical bound can wobble by a few thousandths.
    """
    _check_accountant(accountant)
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise InvalidConfigError(f"steps must be a sequence of integers >= 0, got {steps!r}")
    counts = [_integer("steps", s, 0) for s in steps]
    check_dp_parameters(
        sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=0, delta=delta
    )
    envelope: dict[int, float] = {}
    running = 0.0
    for n in sorted(set(counts)):
        eps = compute_epsilon(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=n,
            delta=delta,
            accountant=accountant,
        )
        running = max(running, eps)
        envelope[n] = running
    return [envelope[n] for n in counts]


def find_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon is <= the target.

    Bisection by :func:`opacus.accountants.utils.get_noise_multiplier` with the same
    accountant settings as :func:`compute_epsilon` (RDP orders :data:`RDP_ORDERS`, PRV
    ``eps_error`` :data:`PRV_EPS_ERROR`), so ``compute_epsilon`` of the result lies in
    ``(target_epsilon - epsilon_tolerance, target_epsilon]``. Returns ``0.0`` when
    ``steps == 0``. Raises :class:`InvalidConfigError` when even a noise multiplier of
    10⁶ cannot reach the target (PRV cannot certify epsilons below about ``PRV_EPS_ERROR``).
    Where PRV cannot run (see :func:`compute_epsilon`) the RDP answer is returned, with a
    logged warning: it meets the target under the RDP bound, with somewhat more noise.
    """
    allowed = "> 0 and finite"
    target = _number("target_epsilon", target_epsilon, allowed)
    if not (math.isfinite(target) and target > 0.0):
        raise InvalidConfigError(
            f"target_epsilon must be a number {allowed}, got {target_epsilon!r}"
        )
    tol = _number("epsilon_tolerance", epsilon_tolerance, allowed)
    if not (math.isfinite(tol) and tol > 0.0):
        raise InvalidConfigError(
            f"epsilon_tolerance must be a number {allowed}, got {epsilon_tolerance!r}"
        )
    check_dp_parameters(sample_rate=sample_rate, noise_multiplier=1.0, steps=steps, delta=delta)
    name = _check_accountant(accountant)
    if int(steps) == 0:
        return 0.0
    _import_accountants()
    q, n, d = float(sample_rate), int(steps), float(delta)
    try:
        if name == "rdp":
            return _search_noise("rdp", target, d, q, n, tol)
        return _search_noise_prv(target, d, q, n, tol)
    except ValueError as e:
        if "budget is too low" not in str(e):
            raise
        raise InvalidConfigError(
            f"target_epsilon={target_epsilon!r} cannot be reached with the {name!r} "
            f"accountant at sample_rate={sample_rate}, steps={steps}, delta={delta} even "
            f"with noise_multiplier 1e6; ask for a larger epsilon"
        ) from None


def _search_noise(
    name: str, target: float, delta: float, q: float, steps: int, tol: float
) -> float:
    """Opacus's bisection; raises ``ValueError("The privacy budget is too low.")``."""
    from opacus.accountants.utils import get_noise_multiplier

    options: dict[str, Any] = (
        {"alphas": list(RDP_ORDERS)} if name == "rdp" else {"eps_error": PRV_EPS_ERROR}
    )
    sigma = _quietly(
        lambda: get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=name,
            epsilon_tolerance=tol,
            **options,
        )
    )
    return float(sigma)


def _search_noise_prv(target: float, delta: float, q: float, steps: int, tol: float) -> float:
    """PRV bisection, guarded like :func:`compute_epsilon`: RDP's answer where PRV can't run.

    The RDP answer is found first (cheap). Opacus's bisection comes down from above and
    tries noise levels down to about half the answer, so the PRV grid is sized there; if it
    is too large, or PRV fails, the RDP answer (a valid, larger noise) is returned.
    """
    try:
        sigma_rdp: float | None = _search_noise("rdp", target, delta, q, steps, tol)
    except ValueError:
        sigma_rdp = None  # RDP cannot reach the target; PRV (floor ~eps_error) decides
    params = f"target_epsilon={target}, sample_rate={q}, steps={steps}, delta={delta}"
    if sigma_rdp is not None:
        points = _prv_grid_points(q, sigma_rdp / 2, steps, delta)
        if not points <= PRV_MAX_GRID_POINTS:
            logger.warning(
                "PRV accountant unusable for %s (its grid would need %.3g points, limit %d); "
                "using the RDP noise multiplier instead",
                params,
                points,
                PRV_MAX_GRID_POINTS,
            )
            return sigma_rdp
    try:
        return _search_noise("prv", target, delta, q, steps, tol)
    except (ArithmeticError, RuntimeError, ValueError, MemoryError) as e:
        if sigma_rdp is None or "budget is too low" in str(e):
            raise
        logger.warning(
            "PRV accountant failed for %s (%s); using the RDP noise multiplier instead",
            params,
            e,
        )
        return sigma_rdp
