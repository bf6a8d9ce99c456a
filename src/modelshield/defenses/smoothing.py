"""Randomized smoothing with a certified L2 radius (Cohen, Rosenfeld & Kolter, ICML 2019).

The smoothed classifier ``g(x) = argmax_c P(f(x + δ) = c)``, ``δ ~ N(0, σ²I)``, is robust
in L2 around ``x``: if the top class has probability at least ``p_A > 1/2``, no
perturbation of L2 norm below ``σ·Φ⁻¹(p_A)`` changes ``g(x)`` (Theorem 1, with the
runner-up bounded by ``1 - p_A``). ``g`` cannot be evaluated exactly, so the paper's
Monte Carlo algorithms are implemented here:

* ``PREDICT`` (:meth:`SmoothedClassifier.predict`): top-2 counts from ``n`` noisy samples
  and a two-sided binomial test; abstain (``-1``) unless its p-value is ``<= alpha``. The
  prediction differs from ``g(x)`` with probability at most ``alpha``.
* ``CERTIFY`` (:meth:`SmoothedClassifier.certify`): guess the top class from ``n0``
  samples, bound ``p_A`` from below with a one-sided Clopper–Pearson interval at level
  ``alpha`` from ``n`` fresh samples, abstain when the bound is ``<= 1/2``, else report
  the radius ``σ·Φ⁻¹(p_A_lower)``. With probability at least ``1 - alpha`` the reported
  class is ``g(x)`` and ``g`` is constant on the L2 ball of that radius.

The noise is added in the model's input space (the adapter's normalisation stays inside
the :class:`~modelshield.core.classifier.Classifier`) and is **not clamped** to the input
bounds, as in the paper. The certificate is a statement about the smoothed classifier of
exactly the base model given; clamping ``x + δ`` would smooth a different base model
(``f∘clip``), whose certificate is a different one and which the Gaussian training below
does not match. The base model must therefore accept inputs slightly outside its bounds.

:func:`gaussian_augmentation_train` is the paper's training recipe: cross-entropy on
inputs with the same Gaussian noise added, so that ``f`` is accurate under noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.metrics import beta_ppf, betainc, norm_ppf
from modelshield.core.results import Result
from modelshield.core.seeding import check_seed, make_generator

logger = logging.getLogger(__name__)

__all__ = [
    "ABSTAIN",
    "CertifyResult",
    "SmoothedClassifier",
    "binomial_test_two_sided",
    "gaussian_augmentation_train",
    "pa_lower_bound",
]

#: The label reported when the smoothed classifier abstains.
ABSTAIN = -1


# -- validation ------------------------------------------------------------------------------
def _check_positive_float(value: object, name: str, *, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if math.isfinite(v) and (v > 0.0 or (allow_zero and v == 0.0)):
            return v
    allowed = ">= 0" if allow_zero else "> 0"
    raise InvalidConfigError(f"{name} must be a finite number {allowed}, got {value!r}")


def _check_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_alpha(alpha: object) -> float:
    ok = not isinstance(alpha, bool) and isinstance(alpha, (int, float))
    if ok and 0.0 < float(alpha) < 1.0:  # type: ignore[arg-type]
        return float(alpha)  # type: ignore[arg-type]
    raise InvalidConfigError(f"alpha must be a probability in (0, 1), got {alpha!r}")


def _check_labels(y: object, n: int, num_classes: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"labels must be a vector of length {n}, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


# -- the statistics ----------------------------------------------------------------------------
def pa_lower_bound(count: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower bound on ``p`` at level ``alpha`` from ``count``/``n``.

    ``P(p < bound) <= alpha``; the lower end of the two-sided interval at confidence
    ``1 - 2·alpha`` (Cohen et al.'s ``LowerConfBound``).
    """
    n = _check_int(n, "n")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= n:
        raise InvalidConfigError(f"count must be an integer in [0, n={n}], got {count!r}")
    alpha = _check_alpha(alpha)
    if count == 0:
        return 0.0
    return beta_ppf(alpha, count, n - count + 1)


def binomial_test_two_sided(n_a: int, n_b: int) -> float:
    """Two-sided p-value of ``n_a`` successes in ``n_a + n_b`` trials with ``p = 1/2``.

    The test in Cohen et al.'s ``PREDICT`` (``scipy.stats.binomtest(n_a, n_a + n_b, 0.5)``);
    1 for a tie.
    """
    if isinstance(n_a, bool) or isinstance(n_b, bool) or min(n_a, n_b) < 0:
        raise InvalidConfigError(f"counts must be integers >= 0, got {n_a!r}, {n_b!r}")
    k, m = max(n_a, n_b), n_a + n_b
    if m == 0 or 2 * k == m:
        return 1.0
    # P(X >= k) for X ~ Binomial(m, 1/2) is I_{1/2}(k, m - k + 1); the test is symmetric.
    return min(1.0, 2.0 * betainc(float(k), float(m - k + 1), 0.5))


# -- the result --------------------------------------------------------------------------------
@dataclass
class CertifyResult(Result):
    """Outcome of ``CERTIFY`` (Cohen et al. 2019) on a batch.

    ``prediction[i]``: the smoothed classifier's class for sample ``i`` or ``-1`` (abstain);
    ``radius[i]``: its certified L2 radius (0 when abstaining); ``p_a_lower[i]``: the
    one-sided Clopper–Pearson lower bound on the top class's probability under noise;
    ``count_a[i]``: how many of the ``n`` noisy samples fell in the guessed top class.
    Each certificate holds with probability at least ``1 - alpha``.
    """

    result_type: ClassVar[str] = "certification"

    sigma: float = 0.0
    n0: int = 0
    n: int = 0
    alpha: float = 0.0
    prediction: torch.Tensor | None = None
    radius: torch.Tensor | None = None
    p_a_lower: torch.Tensor | None = None
    count_a: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prediction is None or self.radius is None:
            raise DataError("this CertifyResult holds no predictions")
        return self.prediction, self.radius

    def _labels(self, y: torch.Tensor | None) -> torch.Tensor:
        pred, _ = self._parts()
        if y is None:
            y = self.labels
        if y is None:
            raise DataError("no labels: pass y or certify with labels=...")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(pred):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise DataError(f"y must be a vector of length {len(pred)}, got {shape}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"y must hold integer labels, got dtype {y.dtype}")
        return y.to(pred.device).long()

    @property
    def abstain_rate(self) -> float:
        """Fraction of samples on which the smoothed classifier abstained."""
        pred, _ = self._parts()
        return float((pred == ABSTAIN).float().mean()) if len(pred) else float("nan")

    @property
    def max_certifiable_radius(self) -> float:
        """The largest radius ``n`` samples can certify: ``σ·Φ⁻¹(alpha^(1/n))``."""
        if self.n < 1 or not 0.0 < self.alpha < 1.0:
            return float("nan")
        return self.sigma * norm_ppf(pa_lower_bound(self.n, self.n, self.alpha))

    def certified_accuracy(
        self, radii: Sequence[float], y: torch.Tensor | None = None
    ) -> list[float]:
        """Per radius ``r``: fraction of samples predicted correctly with radius ``>= r``.

        Abstentions count as wrong. ``y`` defaults to the labels given to ``certify``.
        """
        pred, radius = self._parts()
        labels = self._labels(y)
        out: list[float] = []
        correct = pred == labels
        for r in radii:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0.0:
                raise InvalidConfigError(f"radii must be numbers >= 0, got {r!r}")
            ok = correct & (radius >= float(r))
            out.append(float(ok.float().mean()) if len(pred) else float("nan"))
        return out

    def curve(
        self,
        y: torch.Tensor | None = None,
        max_radius: float | None = None,
        points: int = 50,
    ) -> dict[str, list[float]]:
        """Certified accuracy on ``points`` evenly spaced radii from 0 to ``max_radius``.

        ``max_radius`` defaults to :attr:`max_certifiable_radius`, so curves of runs with
        the same ``sigma``, ``n`` and ``alpha`` share their axis. Returns
        ``{"radius": [...], "certified_accuracy": [...]}``.
        """
        points = _check_int(points, "points", minimum=2)
        top = self.max_certifiable_radius if max_radius is None else max_radius
        top = _check_positive_float(top, "max_radius", allow_zero=True)
        radii = [top * i / (points - 1) for i in range(points)]
        return {"radius": radii, "certified_accuracy": self.certified_accuracy(radii, y)}


# -- the smoothed classifier ---------------------------------------------------------------------
class SmoothedClassifier:
    """Gaussian randomized smoothing of a base :class:`Classifier` (Cohen et al., ICML 2019).

    ``sigma`` is the noise's standard deviation in the input space; ``batch_size`` bounds
    how many noisy inputs go through the base model at once. Noise is drawn from a
    generator seeded per call, so the same seed, inputs and ``batch_size`` give the same
    numbers.
    """

    def __init__(self, base: Classifier, sigma: float, *, batch_size: int = 1000) -> None:
        if not isinstance(base, Classifier):
            raise UnsupportedModelError(
                f"base must be a modelshield Classifier (white-box adapter), got "
                f"{type(base).__name__}; wrap a module with modelshield.core.classifier.from_torch"
            )
        self.base = base
        self.sigma = _check_positive_float(sigma, "sigma")
        self.batch_size = _check_int(batch_size, "batch_size")

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.base.input_shape

    def __repr__(self) -> str:
        return (
            f"SmoothedClassifier({self.base!r}, sigma={self.sigma}, batch_size={self.batch_size})"
        )

    # -- sampling ---------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        self.base.check_input(x)
        if not bool(torch.isfinite(x).all()):
            raise DataError("inputs contain NaN or infinite values")
        return x.detach().to(self.base.device)

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Class counts ``(N, C)`` of the base model on ``num`` noisy copies of each input.

        All ``N·num`` noisy inputs are processed in chunks of ``batch_size`` (a chunk may
        span several inputs), so many points with few samples run as fast as one point
        with many. ``generator`` must live on the base model's device.
        """
        num = _check_int(num, "num")
        x = self._prepare(x)
        b, c = len(x), self.num_classes
        counts = torch.zeros(b * c, dtype=torch.long, device=x.device)
        total = b * num
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            owner = torch.arange(start, stop, device=x.device) // num
            noise = torch.randn(
                (stop - start, *self.input_shape),
                generator=generator,
                device=x.device,
                dtype=x.dtype,
            )
            pred = self.base(x[owner] + self.sigma * noise).argmax(dim=1)
            counts.index_add_(0, owner * c + pred, torch.ones_like(pred))
        return counts.view(b, c)

    def _generator(self, seed: int) -> torch.Generator:
        return make_generator(check_seed(seed), device=self.base.device)

    # -- PREDICT ----------------------------------------------------------------------------
    def predict(
        self, x: torch.Tensor, n: int = 100, alpha: float = 0.001, seed: int = 0
    ) -> torch.Tensor:
        """Cohen et al.'s ``PREDICT``: the smoothed class, or ``-1`` (abstain).

        Counts the base model's classes on ``n`` noisy copies of each input and returns the
        top class when a two-sided binomial test of its count against the runner-up's has
        p-value ``<= alpha``. A returned class differs from ``g(x)`` with probability at
        most ``alpha``. Returns int64 labels on ``x``'s device.
        """
        n = _check_int(n, "n")
        alpha = _check_alpha(alpha)
        counts = self.sample_counts(x, n, self._generator(seed)).cpu()
        top = counts.topk(2, dim=1)
        pred = torch.full((len(counts),), ABSTAIN, dtype=torch.long)
        for i in range(len(counts)):
            n_a, n_b = int(top.values[i, 0]), int(top.values[i, 1])
            if binomial_test_two_sided(n_a, n_b) <= alpha:
                pred[i] = top.indices[i, 0]
        logger.debug(
            "smoothed predict: %d inputs, n=%d, abstained on %d",
            len(pred),
            n,
            int((pred == ABSTAIN).sum()),
        )
        return pred.to(x.device)

    # -- CERTIFY ----------------------------------------------------------------------------
    def certify(
        self,
        x: torch.Tensor,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        seed: int = 0,
        *,
        labels: torch.Tensor | None = None,
    ) -> CertifyResult:
        """Cohen et al.'s ``CERTIFY``: class and certified L2 radius per input.

        The top class is guessed from ``n0`` noisy samples; ``n`` fresh samples give a
        one-sided Clopper–Pearson lower bound ``p_A_lower`` at level ``alpha`` on its
        probability. Abstain (``-1``, radius 0) when ``p_A_lower <= 1/2``, else the radius
        is ``sigma·Φ⁻¹(p_A_lower)``. ``labels`` (optional) are stored with the result for
        :meth:`CertifyResult.certified_accuracy`.
        """
        started = time.perf_counter()
        self._prepare(x)
        n0 = _check_int(n0, "n0")
        n = _check_int(n, "n")
        alpha = _check_alpha(alpha)
        y = None if labels is None else _check_labels(labels, len(x), self.num_classes)
        gen = self._generator(seed)
        guess = self.sample_counts(x, n0, gen).argmax(dim=1)
        counts = self.sample_counts(x, n, gen)
        count_a = counts.gather(1, guess[:, None]).squeeze(1).cpu()
        guess = guess.cpu()
        m = len(count_a)
        p_lower = torch.zeros(m, dtype=torch.float64)
        radius = torch.zeros(m, dtype=torch.float64)
        pred = torch.full((m,), ABSTAIN, dtype=torch.long)
        for i in range(m):
            pl = pa_lower_bound(int(count_a[i]), n, alpha)
            p_lower[i] = pl
            if pl > 0.5:
                pred[i] = guess[i]
                radius[i] = self.sigma * norm_ppf(pl)
        dev = x.device
        result = CertifyResult(
            config={
                "defense": "randomized_smoothing",
                "norm": "l2",
                "sigma": self.sigma,
                "n0": n0,
                "n": n,
                "alpha": alpha,
                "batch_size": self.batch_size,
                "base": self.base.name,
            },
            seed=seed,
            sigma=self.sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            prediction=pred.to(dev),
            radius=radius.to(dev),
            p_a_lower=p_lower.to(dev),
            count_a=count_a.to(dev),
            labels=None if y is None else y.to(dev),
        )
        result.wall_time = time.perf_counter() - started
        logger.info(
            "certified %d inputs (sigma=%g, n0=%d, n=%d, alpha=%g): abstained on %d, "
            "median radius %.4g, %.2fs",
            m,
            self.sigma,
            n0,
            n,
            alpha,
            int((pred == ABSTAIN).sum()),
            float(radius.median()) if m else float("nan"),
            result.wall_time,
        )
        return result


# -- training ------------------------------------------------------------------------------------
def gaussian_augmentation_train(
    module: nn.Module | Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train with Gaussian data augmentation, the base-model training of Cohen et al. 2019.

    Adam on cross-entropy, as :func:`modelshield.core.train.train_classifier`, with fresh
    noise ``N(0, sigma²I)`` added to every input of every batch (not clamped, like the
    smoothing it prepares for). For a :class:`Classifier`, the noise is added in its input
    space, before its normalisation, and its module is trained in place. Returns the
    trained module in eval mode; the same seed gives the same weights.
    """
    sigma = _check_positive_float(sigma, "sigma", allow_zero=True)
    epochs = _check_int(epochs, "epochs")
    batch_size = _check_int(batch_size, "batch_size")
    lr = _check_positive_float(lr, "lr")
    weight_decay = _check_positive_float(weight_decay, "weight_decay", allow_zero=True)
    check_seed(seed)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise DataError("x must be a floating-point batch tensor (N, ...)")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"y must be a vector of length {len(x)}, got {shape}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"y must hold integer labels, got dtype {y.dtype}")

    if isinstance(module, Classifier):
        if not isinstance(module.module, nn.Module):
            raise UnsupportedModelError(
                f"cannot train a Classifier around {type(module.module).__name__}; "
                "it needs an nn.Module"
            )
        clf = module.to(device)
        net: nn.Module = clf.module
        forward = clf.__call__
    elif isinstance(module, nn.Module):
        net = module.to(device)
        forward = net.__call__
    else:
        raise UnsupportedModelError(
            f"module must be an nn.Module or a Classifier, got {type(module).__name__}"
        )
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    g = make_generator(seed)
    count = len(x)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(count, generator=g)
        total = 0.0
        for i in range(0, count, batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx].cpu()
            noise = torch.randn(xb.shape, generator=g, dtype=xb.dtype)  # device-independent
            xb = (xb + sigma * noise).to(device)
            yb = y[idx].to(device).long()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        logger.debug(
            "gaussian augmentation (sigma=%g) epoch %d/%d loss %.4f",
            sigma,
            epoch + 1,
            epochs,
            total / max(count, 1),
        )
    net.eval()
    return net
