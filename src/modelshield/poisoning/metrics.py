"""How well a poisoning attack worked: clean accuracy and attack success rate (ASR).

ASR (Gu et al. 2017; the usual definition since): of the test inputs whose true class is
not the target, the share classified as the target once the trigger is stamped on them.
For targeted label flipping (no trigger) the analogue is the share of source-class test
inputs classified as the target. Every rate comes with its Clopper–Pearson interval.
"""

from __future__ import annotations

from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.results import PoisonResult
from modelshield.poisoning.triggers import Trigger, apply_trigger


def clean_accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    correct = model.predict(x).cpu() == y.cpu()
    acc, ci = accuracy_with_ci(correct)
    return {"value": acc, "ci": list(ci), "n": len(y)}


def attack_success_rate(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    trigger: Trigger,
    target_class: int,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """Share of triggered non-target test inputs classified as ``target_class``."""
    keep = y != target_class
    xt = apply_trigger(x[keep], trigger, bounds)
    hit = model.predict(xt).cpu() == target_class
    rate, ci = accuracy_with_ci(hit)
    return {"value": rate, "ci": list(ci), "n": int(keep.sum())}


def flip_success_rate(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target_class: int,
    source_class: int | None = None,
) -> dict[str, Any]:
    """Share of source-class (default: every non-target) test inputs classified as the target."""
    keep = y == source_class if source_class is not None else y != target_class
    hit = model.predict(x[keep]).cpu() == target_class
    rate, ci = accuracy_with_ci(hit)
    return {"value": rate, "ci": list(ci), "n": int(keep.sum())}


def evaluate_poisoning(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, record: PoisonResult
) -> dict[str, Any]:
    """Clean accuracy, and the ASR the record's attack aims at (``None`` when it has none:
    random label flipping only degrades accuracy)."""
    out: dict[str, Any] = {"clean_accuracy": clean_accuracy(model, x, y)}
    trig = record.details.get("trigger")
    tc = record.target_class
    bounds = tuple(record.details.get("bounds") or model.bounds)
    if trig and tc is not None:
        out["attack_success_rate"] = attack_success_rate(
            model,
            x,
            y,
            trigger=Trigger.from_dict(trig),
            target_class=tc,
            bounds=bounds,  # type: ignore[arg-type]
        )
    elif tc is not None:
        out["attack_success_rate"] = flip_success_rate(
            model, x, y, target_class=tc, source_class=record.details.get("source_class")
        )
    else:
        out["attack_success_rate"] = None
    return out
