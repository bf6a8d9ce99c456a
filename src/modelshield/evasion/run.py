"""Run one registered attack over a data set in batches and merge the outcomes."""

from __future__ import annotations

import time
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.oracle import Oracle
from modelshield.core.results import AttackResult
from modelshield.core.threat import LpThreat
from modelshield.evasion.base import ATTACKS


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    kept = [p for p in parts if p is not None]
    return torch.cat(kept) if kept and len(kept) == len(parts) else None


def run_attack(
    name: str,
    model: Classifier | Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    target: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
    **kwargs: Any,
) -> AttackResult:
    """Attack ``(x, y)`` with the registered attack ``name`` batch by batch.

    White-box attacks need a :class:`Classifier`; black-box ones an :class:`Oracle` whose
    access matches theirs (scores for Square, labels suffice for HopSkipJump).
    """
    spec = ATTACKS.get(name)
    if threat.norm not in spec.norms:
        raise InvalidConfigError(f"{name} supports norm {', '.join(spec.norms)}; got {threat.norm}")
    if threat.targeted and not spec.targeted:
        raise InvalidConfigError(f"{name} is untargeted; drop --targeted")
    if spec.access == "white-box" and not isinstance(model, Classifier):
        raise UnsupportedModelError(
            f"{name} is a white-box attack and needs gradients; this model is black-box only"
        )
    if spec.access != "white-box" and not isinstance(model, Oracle):
        raise UnsupportedModelError(f"{name} is a black-box attack and needs an Oracle")
    if len(x) == 0:
        raise DataError("no samples to attack")
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    parts: list[AttackResult] = []
    for i in range(0, len(x), batch_size):
        extra = dict(kwargs)
        if target is not None:
            extra["target"] = target[i : i + batch_size]
        parts.append(
            spec(
                model,
                x[i : i + batch_size],
                y[i : i + batch_size],
                threat=threat,
                seed=seed + i,
                **extra,
            )
        )
    first = parts[0]
    return AttackResult(
        config=first.config,
        seed=seed,
        wall_time=time.perf_counter() - started,
        attack=name,
        threat=first.threat,
        x_adv=_cat([p.x_adv for p in parts]),
        success=_cat([p.success for p in parts]),
        distance=_cat([p.distance for p in parts]),
        queries=_cat([p.queries for p in parts]),
        clean_correct=_cat([p.clean_correct for p in parts]),
    )
