"""Poisoning attacks as data-set transformations, for red-teaming a training pipeline.

Each attack takes a clean :class:`Dataset` and returns :class:`PoisonedData`: the poisoned
copy and a :class:`PoisonResult` recording which indices changed (with their original
labels) and how to re-create the trigger at test time.

``rate`` is always a fraction of the whole training set: ``round(rate · N)`` samples are
changed (drawn, by the seed, from the samples the attack can use).

- ``label-flip``: random flips to another class; with a target class, targeted flips of
  the source class (or of every other class) to the target.
- ``badnets`` (Gu et al. 2017): stamp a patch on non-target samples and relabel them as
  the target (all-to-one).
- ``blended`` (Chen et al. 2017): blend a noise key pattern into non-target samples and
  relabel them as the target.
- ``clean-label`` (Turner et al. 2019, "Label-Consistent Backdoor Attacks"): perturb
  target-class samples adversarially (PGD on a surrogate model, so their natural features
  are hard to learn) and stamp the trigger in the four corners; labels are untouched.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import Dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.core.results import PoisonResult
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import check_bounds
from modelshield.evasion._lp import project_to_threat, steepest_ascent
from modelshield.poisoning.triggers import Trigger, apply_trigger

logger = logging.getLogger(__name__)

POISON_ATTACKS: Registry[Callable[..., PoisonedData]] = Registry("poison-attacks")


@dataclass
class PoisonedData:
    """A poisoned data set and the record of what the attack did to it."""

    dataset: Dataset
    record: PoisonResult

    @property
    def indices(self) -> torch.Tensor:
        return torch.tensor(self.record.indices, dtype=torch.long)

    @property
    def trigger(self) -> Trigger | None:
        t = self.record.details.get("trigger")
        return Trigger.from_dict(t) if t else None


def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise InvalidConfigError(f"rate must be a number in (0, 1), got {rate!r}")
    if not (math.isfinite(rate) and 0.0 < rate < 1.0):
        raise InvalidConfigError(f"rate must be in (0, 1), got {rate!r}")
    return float(rate)


def check_class(c: int | None, num_classes: int, flag: str) -> int | None:
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
        raise InvalidConfigError(
            f"{flag} must be a class index in [0, {num_classes - 1}], got {c!r}"
        )
    return c


def _count(rate: float, n: int, available: int, what: str) -> int:
    k = round(check_rate(rate) * n)
    if k < 1:
        raise InvalidConfigError(f"rate {rate:g} of {n} samples poisons none; raise --rate")
    if k > available:
        raise InvalidConfigError(
            f"rate {rate:g} asks for {k} poisoned samples but only {available} {what}"
        )
    return k


def _pick(candidates: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    g = make_generator(seed)
    return candidates[torch.randperm(len(candidates), generator=g)[:k]].sort().values


def _finish(
    data: Dataset,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    *,
    method: str,
    rate: float,
    target_class: int | None,
    seed: int,
    started: float,
    trigger: Trigger | None = None,
    **details: Any,
) -> PoisonedData:
    poisoned = Dataset(
        x=x,
        y=y,
        num_classes=data.num_classes,
        name=f"{data.name}+{method}",
        source=data.source,
        meta={**data.meta, "poisoned": method},
    )
    poisoned.meta.pop("sha256", None)  # the content changed: the source's digest no longer holds
    record = PoisonResult(
        method=method,
        target_class=target_class,
        rate=rate,
        indices=[int(i) for i in idx.tolist()],
        seed=seed,
        wall_time=time.perf_counter() - started,
        config={"method": method, "rate": rate, "target_class": target_class, "seed": seed},
        details={
            "n": len(data),
            "num_classes": data.num_classes,
            "original_labels": [int(v) for v in data.y[idx].tolist()],
            "trigger": trigger.to_dict() if trigger is not None else None,
            **details,
        },
    )
    logger.info("%s: poisoned %d of %d samples", method, len(idx), len(data))
    return PoisonedData(poisoned, record)


@POISON_ATTACKS.register("label-flip")
def label_flip(
    data: Dataset,
    *,
    rate: float,
    target_class: int | None = None,
    source_class: int | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonedData:
    """Flip labels: at random to another class, or (with ``target_class``) to the target."""
    started = time.perf_counter()
    check_seed(seed)
    k_cls = data.num_classes
    check_class(target_class, k_cls, "target class")
    check_class(source_class, k_cls, "source class")
    if source_class is not None and target_class is None:
        raise InvalidConfigError("a source class needs a target class (targeted label flipping)")
    if source_class is not None and source_class == target_class:
        raise InvalidConfigError("source and target class must differ")
    y = data.y.clone()
    if target_class is None:
        candidates = torch.arange(len(data))
        idx = _pick(candidates, _count(rate, len(data), len(candidates), "samples"), seed)
        g = make_generator(seed + 1)
        shift = torch.randint(1, k_cls, (len(idx),), generator=g)
        y[idx] = (data.y[idx] + shift) % k_cls  # uniform over the other classes
        mode = "random"
    else:
        keep = data.y == source_class if source_class is not None else data.y != target_class
        candidates = keep.nonzero().flatten()
        what = (
            f"samples of class {source_class}" if source_class is not None else "non-target samples"
        )
        idx = _pick(candidates, _count(rate, len(data), len(candidates), what), seed)
        y[idx] = target_class
        mode = "targeted"
    return _finish(
        data,
        data.x.clone(),
        y,
        idx,
        method="label-flip",
        rate=rate,
        target_class=target_class,
        seed=seed,
        started=started,
        mode=mode,
        source_class=source_class,
    )


def _trigger_attack(
    method: str,
    data: Dataset,
    rate: float,
    target_class: int,
    trigger: Trigger,
    bounds: tuple[float, float],
    seed: int,
    source_class: int | None,
) -> PoisonedData:
    started = time.perf_counter()
    check_seed(seed)
    bounds = check_bounds(bounds)
    tc = check_class(target_class, data.num_classes, "target class")
    if tc is None:
        raise InvalidConfigError(f"{method} needs a target class")
    check_class(source_class, data.num_classes, "source class")
    keep = data.y == source_class if source_class is not None else data.y != tc
    candidates = keep.nonzero().flatten()
    idx = _pick(candidates, _count(rate, len(data), len(candidates), "non-target samples"), seed)
    x, y = data.x.clone(), data.y.clone()
    x[idx] = apply_trigger(data.x[idx], trigger, bounds)
    y[idx] = tc
    return _finish(
        data,
        x,
        y,
        idx,
        method=method,
        rate=rate,
        target_class=tc,
        seed=seed,
        started=started,
        trigger=trigger,
        bounds=list(bounds),
        source_class=source_class,
    )


@POISON_ATTACKS.register("badnets")
def badnets(
    data: Dataset,
    *,
    rate: float,
    target_class: int,
    trigger: Trigger | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    source_class: int | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonedData:
    """BadNets (Gu et al. 2017): a corner patch on non-target samples, relabelled as the target."""
    trig = trigger or Trigger(kind="patch")
    return _trigger_attack("badnets", data, rate, target_class, trig, bounds, seed, source_class)


@POISON_ATTACKS.register("blended")
def blended(
    data: Dataset,
    *,
    rate: float,
    target_class: int,
    trigger: Trigger | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    source_class: int | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonedData:
    """Blended injection (Chen et al. 2017): a noise key blended in at alpha 0.2, relabelled."""
    trig = trigger or Trigger(kind="blend", alpha=0.2, seed=seed)
    return _trigger_attack("blended", data, rate, target_class, trig, bounds, seed, source_class)


def default_arch(input_shape: tuple[int, ...]) -> str:
    """``small_cnn`` for images ``(C, H, W)``, ``mlp`` for anything else."""
    return "small_cnn" if len(input_shape) == 3 else "mlp"


def train_model(
    data: Dataset,
    *,
    arch: str | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str = "cpu",
) -> Classifier:
    """A fresh ``arch`` model (default by input shape) trained on ``data``: the attacker's
    surrogate, the audit's model when none is given, the retrain after removal."""
    from modelshield.core.architectures import build
    from modelshield.core.train import train_classifier

    torch.manual_seed(seed)
    module = build(arch or default_arch(data.input_shape), data.input_shape, data.num_classes)
    train_classifier(
        module,
        data.x,
        data.y,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    return from_torch(
        module,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        bounds=bounds,
        device=device,
    )


def adversarial_perturbation(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 20,
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 256,
) -> torch.Tensor:
    """L∞ PGD that maximises the loss of the true label for all ``steps`` (no early stop):
    Turner et al.'s way of making the natural features of a poison hard to learn."""
    if not (math.isfinite(eps) and eps > 0):
        raise InvalidConfigError(f"eps must be > 0, got {eps!r}")
    alpha = 2.5 * eps / steps
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(model.device)
        yb = y[i : i + batch_size].to(model.device)
        adv = xb.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), yb)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + alpha * steepest_ascent(grad, "linf")
            adv = project_to_threat(adv, xb, "linf", eps, bounds)
        out.append(adv.detach().cpu())
    return torch.cat(out) if out else x.clone()


@POISON_ATTACKS.register("clean-label")
def clean_label(
    data: Dataset,
    *,
    rate: float,
    target_class: int,
    trigger: Trigger | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    surrogate: Classifier | None = None,
    eps: float | None = None,
    steps: int = 20,
    arch: str | None = None,
    surrogate_epochs: int = 10,
    robust_surrogate: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **_: Any,
) -> PoisonedData:
    """Label-consistent backdoor (Turner et al. 2019): adversarially perturbed target-class
    samples carrying the trigger in the four corners; every label is left as it was.

    ``eps`` (L∞, default 16/255 of the bounds' width) bounds the perturbation; ``surrogate``
    is the model PGD runs on (default: ``arch`` trained on the clean data; with
    ``robust_surrogate``, adversarially trained at ``eps`` as Turner et al. do, which makes
    the perturbations change what the image looks like, at about 8× the training cost).
    """
    started = time.perf_counter()
    check_seed(seed)
    bounds = check_bounds(bounds)
    tc = check_class(target_class, data.num_classes, "target class")
    if tc is None:
        raise InvalidConfigError("clean-label needs a target class")
    candidates = (data.y == tc).nonzero().flatten()
    idx = _pick(
        candidates, _count(rate, len(data), len(candidates), f"samples of target class {tc}"), seed
    )
    eps_v = eps if eps is not None else 16 / 255 * (bounds[1] - bounds[0])
    surrogate_given = surrogate is not None
    if surrogate is None and robust_surrogate:
        surrogate = _robust_model(data, arch, surrogate_epochs, eps_v, seed, bounds, device)
    elif surrogate is None:
        surrogate = train_model(
            data, arch=arch, epochs=surrogate_epochs, seed=seed, bounds=bounds, device=device
        )
    elif tuple(surrogate.input_shape) != data.input_shape:
        raise DataError(
            f"the surrogate takes inputs {surrogate.input_shape}, the data has {data.input_shape}"
        )
    perturbed = adversarial_perturbation(
        surrogate, data.x[idx], data.y[idx], eps=eps_v, steps=steps, bounds=bounds
    )
    trig = trigger or Trigger(kind="patch", corners=4)
    x = data.x.clone()
    x[idx] = apply_trigger(perturbed, trig, bounds)
    return _finish(
        data,
        x,
        data.y.clone(),
        idx,
        method="clean-label",
        rate=rate,
        target_class=tc,
        seed=seed,
        started=started,
        trigger=trig,
        bounds=list(bounds),
        eps=eps_v,
        steps=steps,
        surrogate="given" if surrogate_given else ("robust" if robust_surrogate else "standard"),
    )


def _robust_model(
    data: Dataset,
    arch: str | None,
    epochs: int,
    eps: float,
    seed: int,
    bounds: tuple[float, float],
    device: torch.device | str,
) -> Classifier:
    """``arch`` adversarially trained on ``data`` (PGD-AT, Madry et al. 2018) at L∞ ``eps``."""
    from modelshield.core.architectures import build
    from modelshield.defenses.adversarial import AdversarialTrainingConfig, adversarial_train

    torch.manual_seed(seed)
    module = build(arch or default_arch(data.input_shape), data.input_shape, data.num_classes)
    cfg = AdversarialTrainingConfig(
        method="pgd-at",
        eps=eps,
        steps=7,
        epochs=epochs,
        optimizer="adam",
        batch_size=64,
        bounds=bounds,
        seed=seed,
    )
    adversarial_train(module.to(device), data.x, data.y, cfg, device=device)
    return from_torch(
        module,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        bounds=bounds,
        device=device,
    )


def poison(method: str, data: Dataset, **kwargs: Any) -> PoisonedData:
    """Run the registered attack ``method`` on ``data``."""
    return POISON_ATTACKS.get(method)(data, **kwargs)
