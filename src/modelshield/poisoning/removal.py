"""Removing a backdoor: retrain without the flagged samples, or fine-prune the model.

- :func:`retrain_without`: train a fresh model on the data minus the detector's flagged
  indices (the remedy of Tran et al. 2018 and Chen et al. 2018).
- :func:`fine_prune` (Liu et al. 2018, "Fine-Pruning"): prune the penultimate units that
  are least active on clean data (backdoor units lie dormant on clean inputs), in steps,
  as long as clean accuracy drops by at most ``max_accuracy_drop``; then fine-tune the
  whole model on the clean data with the pruned units held at zero. Pruning a unit here
  zeroes its column of the final linear layer, so it works on ``nn.Module`` and ``.pt2``
  models alike; for global-average-pooled CNNs the units are the last convolutional
  layer's channels, the layer the paper prunes.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier
from modelshield.core.data import Dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.seeding import make_generator
from modelshield.poisoning.attacks import train_model
from modelshield.poisoning.features import (
    clone_module,
    final_linear_weight,
    penultimate_features,
)

logger = logging.getLogger(__name__)


def retrain_without(
    data: Dataset,
    flagged: list[int] | torch.Tensor,
    *,
    arch: str | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str = "cpu",
    like: Classifier | None = None,
) -> Classifier:
    """A fresh ``arch`` model trained on ``data`` without the ``flagged`` indices.

    ``like``: retrain a freshly initialised copy of this model's architecture instead
    (its own layers, or an exported graph's; :func:`~modelshield.poisoning.audit.fresh_copy`).
    """
    keep = torch.ones(len(data), dtype=torch.bool)
    idx = torch.as_tensor(flagged, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(data)):
        raise DataError(f"flagged indices must lie in [0, {len(data)})")
    keep[idx] = False
    if int(keep.sum()) < 2:
        raise DataError("removing the flagged samples leaves fewer than 2 to train on")
    if like is not None:
        from modelshield.core.train import train_classifier
        from modelshield.poisoning.audit import fresh_copy

        if not isinstance(like.module, torch.nn.Module):
            raise DataError("retraining needs a torch model to copy the architecture of")
        clean = data.subset(keep)
        clone = copy.copy(like)
        clone.module = fresh_copy(like.module, seed=seed)  # type: ignore[assignment]
        train_classifier(
            clone.module,  # type: ignore[arg-type]
            clean.x,
            clean.y,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        return clone
    return train_model(
        data.subset(keep),
        arch=arch,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        bounds=bounds,
        device=device,
    )


def _copy(model: Classifier) -> Classifier:
    clone = copy.copy(model)
    clone.module = clone_module(model.module)
    return clone


def fine_prune(
    model: Classifier,
    clean: Dataset,
    *,
    max_accuracy_drop: float = 0.04,
    step: float = 0.05,
    max_prune: float = 0.95,
    epochs: int = 10,
    lr: float = 1e-4,
    batch_size: int = 64,
    validation: float = 0.2,
    seed: int = 0,
) -> tuple[Classifier, dict[str, Any]]:
    """Fine-pruning (Liu et al. 2018) of a copy of ``model`` with ``clean`` data.

    Returns the pruned, fine-tuned copy and what was done: units pruned, clean accuracy
    before, after pruning and after fine-tuning (on a held-out ``validation`` share).
    """
    started = time.perf_counter()
    if not 0 < max_accuracy_drop < 1 or not 0 < step < 1 or not 0 < max_prune < 1:
        raise InvalidConfigError("max_accuracy_drop, step and max_prune must lie in (0, 1)")
    if len(clean) < 10:
        raise DataError(f"fine-pruning needs clean data; got {len(clean)} samples")
    tune, val = clean.split(1 - validation, seed=seed)
    pruned = _copy(model)
    weight = final_linear_weight(pruned)
    acts = penultimate_features(pruned, tune.x)
    if acts.shape[1] != weight.shape[1]:
        raise InvalidConfigError(
            f"the penultimate layer has {acts.shape[1]} units but the last linear layer takes {weight.shape[1]}"
        )
    order = acts.mean(0).argsort()  # least active first
    base = pruned.accuracy(val.x, val.y)
    original = weight.detach().clone()
    units = weight.shape[1]
    chosen = 0
    frac = step
    while frac <= max_prune + 1e-9:
        k = round(frac * units)
        with torch.no_grad():
            weight.copy_(original)
            weight[:, order[:k]] = 0
        acc = pruned.accuracy(val.x, val.y)
        if base - acc > max_accuracy_drop:
            break
        chosen = k
        frac += step
    mask = torch.ones(units, dtype=torch.bool, device=weight.device)
    mask[order[:chosen]] = False
    with torch.no_grad():
        weight.copy_(original * mask)
    after_prune = pruned.accuracy(val.x, val.y)
    # fine-tune with the pruned units held at zero
    params = (
        [p for p in pruned.module.parameters() if p.requires_grad]
        if hasattr(pruned.module, "parameters")
        else []
    )
    if epochs > 0 and params:
        opt = torch.optim.Adam(params, lr=lr)
        g = make_generator(seed)
        for _ in range(epochs):
            order_b = torch.randperm(len(tune), generator=g)
            for i in range(0, len(tune), batch_size):
                b = order_b[i : i + batch_size]
                xb, yb = tune.x[b].to(pruned.device), tune.y[b].to(pruned.device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(pruned(xb), yb).backward()
                opt.step()
                with torch.no_grad():
                    weight.mul_(mask)
    info = {
        "units": units,
        "pruned": chosen,
        "pruned_fraction": chosen / units,
        "accuracy_before": base,
        "accuracy_after_pruning": after_prune,
        "accuracy_after_fine_tuning": pruned.accuracy(val.x, val.y),
        "fine_tune_epochs": epochs,
        "validation_n": len(val),
        "wall_time": time.perf_counter() - started,
    }
    logger.info("fine-pruning: pruned %d of %d units", chosen, units)
    return pruned, info
