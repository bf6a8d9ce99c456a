"""Model inversion against white-box image classifiers (MI-Face).

Follows Fredrikson, Jha & Ristenpart, "Model Inversion Attacks that Exploit Confidence
Information and Basic Countermeasures" (CCS 2015), Algorithm 1: for each class, gradient
descent on the input, from a blank (zeros) or average image, to lower the cost
``c(x) = 1 - f_label(x)`` (``objective="prob"``) or its smoother ``-log f_label(x)``
(``objective="ce"``, the default), plus a small total-variation and L2 prior, with the image
projected into the model's input bounds after every step. Each class gets one representative.

The representatives are scored against the real data the attacker is trying to recover:
cosine similarity and mean squared error to the class's mean image, and whether the class
mean nearest (in Euclidean distance) to a representative is its own class.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.results import Result
from modelshield.core.seeding import check_seed

logger = logging.getLogger(__name__)

__all__ = ["InversionResult", "class_means", "mi_face"]

OBJECTIVES = ("ce", "prob")
INITS = ("zeros", "mean", "random")


@dataclass
class InversionResult(Result):
    """One representative per attacked class, with how close it comes to the real data.

    ``images[i]`` reconstructs class ``classes[i]``; ``confidence[i]`` is the model's
    probability of that class on it. With reference data, ``cosine[i]`` / ``mse[i]`` compare
    it with the class's mean image, ``nearest[i]`` is the class whose mean is nearest, and
    ``nearest_fraction`` is the share of representatives nearest their own class mean
    (chance: ``1 / num_classes``).
    """

    result_type: ClassVar[str] = "model-inversion"

    attack: str = "mi-face"
    classes: list[int] = field(default_factory=list)
    images: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    mse: torch.Tensor | None = None
    nearest: torch.Tensor | None = None
    nearest_correct: torch.Tensor | None = None
    mean_confidence: float = float("nan")
    mean_cosine: float = float("nan")
    mean_mse: float = float("nan")
    nearest_fraction: float = float("nan")
    steps: int = 0
    queries: int = 0

    def summary(self) -> dict[str, Any]:
        """The headline numbers and per-class scores, without the images."""
        d = self.to_dict()
        d.pop("images", None)
        return d


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean image ``(num_classes, *x.shape[1:])``; classes without data are NaN."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError("reference x and y must be torch tensors")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise DataError(
            f"reference y must have shape ({x.shape[0]},) and be non-empty, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"reference labels must be integer class indices in [0, {num_classes})")
    flat = x.detach().reshape(x.shape[0], -1).double()
    sums = torch.zeros(num_classes, flat.shape[1], dtype=torch.float64, device=flat.device)
    sums.index_add_(0, y.to(flat.device).long(), flat)
    counts = torch.bincount(y.to(flat.device).long(), minlength=num_classes).double()
    means = sums / counts.unsqueeze(1)  # NaN where a class has no data
    return means.to(x.dtype).reshape(num_classes, *x.shape[1:])


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image over the last two (spatial) dimensions."""
    if x.ndim < 3:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(dim=1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).sum(dim=1)
    return dh + dw


def _check_number(name: str, value: Any, *, low: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (positive and v <= low):
        rel = ">" if positive else ">="
        raise InvalidConfigError(f"{name} must be finite and {rel} {low:g}, got {value!r}")
    return v


def mi_face(
    classifier: Classifier,
    *,
    classes: Sequence[int] | None = None,
    steps: int = 300,
    lr: float = 0.05,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    objective: str = "ce",
    init: str | torch.Tensor = "zeros",
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> InversionResult:
    """MI-Face model inversion (Fredrikson et al., CCS 2015), white-box.

    For every class in ``classes`` (default: all), minimise ``objective`` (``"ce"``:
    ``-log p_class``; ``"prob"``: the paper's ``1 - p_class``) ``+ tv_weight * TV(x) +
    l2_weight * ||x||^2 / d`` over the input by Adam steps of size ``lr``, projecting into
    ``classifier.bounds`` after each of ``steps`` steps. ``init``: ``"zeros"`` (the lower
    bound, the paper's blank image), ``"mean"`` (the reference data's mean image),
    ``"random"`` (uniform in bounds, seeded) or a tensor of shape ``input_shape``.
    ``reference=(x, y)``: real data to score the representatives (class means) and for
    ``init="mean"``. ``queries`` counts forward passes (one per class per step, plus one).
    """
    start = time.perf_counter()
    if not isinstance(classifier, Classifier):
        raise UnsupportedModelError(
            f"mi_face needs a white-box Classifier, got {type(classifier).__name__}"
        )
    nc = classifier.num_classes
    if classes is None:
        cls = list(range(nc))
    else:
        try:
            cls = [int(c) for c in classes]
        except (TypeError, ValueError):
            raise InvalidConfigError(f"classes must be class indices, got {classes!r}") from None
        if not cls or any(not 0 <= c < nc for c in cls):
            raise InvalidConfigError(f"classes must be non-empty indices in [0, {nc}), got {cls}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidConfigError(f"steps must be a positive integer, got {steps!r}")
    lr = _check_number("lr", lr, low=0.0, positive=True)
    tv_weight = _check_number("tv_weight", tv_weight, low=0.0)
    l2_weight = _check_number("l2_weight", l2_weight, low=0.0)
    if objective not in OBJECTIVES:
        raise InvalidConfigError(
            f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}"
        )
    check_seed(seed)
    low, high = classifier.bounds
    shape = classifier.input_shape
    dev = classifier.device

    means: torch.Tensor | None = None
    if reference is not None:
        if not isinstance(reference, (tuple, list)) or len(reference) != 2:
            raise InvalidConfigError("reference must be a pair (x, y) of tensors")
        ref_x, ref_y = reference
        classifier.check_input(ref_x)
        means = class_means(ref_x.to(dev).float(), ref_y.to(dev), nc)

    k = len(cls)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != shape:
            raise DataError(f"init must have shape {shape}, got {tuple(init.shape)}")
        x0 = init.detach().to(dev, torch.float32).expand(k, *shape).clone()
    elif init == "zeros":
        x0 = torch.full((k, *shape), low, device=dev)
    elif init == "mean":
        if reference is None:
            raise InvalidConfigError("init='mean' needs reference=(x, y)")
        x0 = reference[0].to(dev).float().mean(dim=0).expand(k, *shape).clone()
    elif init == "random":
        g = torch.Generator().manual_seed(seed)
        x0 = (low + (high - low) * torch.rand((k, *shape), generator=g)).to(dev)
    else:
        raise InvalidConfigError(
            f"init must be one of {', '.join(INITS)} or a tensor, got {init!r}"
        )
    x = x0.clamp(low, high).requires_grad_(True)
    target = torch.tensor(cls, device=dev)
    opt = torch.optim.Adam([x], lr=lr)
    d = math.prod(shape)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        logp = F.log_softmax(classifier(x), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        cost = -logp if objective == "ce" else 1.0 - logp.exp()
        reg = tv_weight * _total_variation(x) + l2_weight * x.pow(2).flatten(1).sum(dim=1) / d
        (cost + reg).sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(low, high)
        if logger.isEnabledFor(logging.DEBUG) and (step + 1) % 50 == 0:
            logger.debug(
                "mi-face step %d/%d: mean p %.3f", step + 1, steps, float(logp.exp().mean())
            )
    images = x.detach()
    with torch.no_grad():
        conf = F.softmax(classifier(images), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)

    result = InversionResult(
        config={
            "classes": cls,
            "steps": steps,
            "lr": lr,
            "tv_weight": tv_weight,
            "l2_weight": l2_weight,
            "objective": objective,
            "init": init if isinstance(init, str) else "tensor",
            "bounds": [low, high],
        },
        seed=seed,
        classes=cls,
        images=images,
        confidence=conf,
        mean_confidence=float(conf.mean()),
        steps=steps,
        queries=k * (steps + 1),
    )
    if means is not None:
        flat = images.flatten(1)
        mflat = means.flatten(1)
        own = mflat[target]
        result.cosine = F.cosine_similarity(flat, own, dim=1)
        result.mse = (flat - own).pow(2).mean(dim=1)
        dist = torch.cdist(flat, mflat.nan_to_num(float("inf")))
        result.nearest = dist.nan_to_num(float("inf")).argmin(dim=1)
        result.nearest_correct = result.nearest == target
        result.mean_cosine = float(result.cosine.nanmean())
        result.mean_mse = float(result.mse.nanmean())
        result.nearest_fraction = float(result.nearest_correct.double().mean())
    result.wall_time = time.perf_counter() - start
    logger.info(
        "mi-face: %d classes, mean confidence %.3f, nearest own class mean %.2f",
        k,
        result.mean_confidence,
        result.nearest_fraction,
    )
    return result
