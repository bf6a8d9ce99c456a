"""AutoAttack-style ensembles (Croce & Hein 2020): diverse attacks, worst case per sample.

Each attack runs only on the points every earlier attack failed on, so the cost falls as
points fall; the first successful adversarial example per sample is kept. Black-box
members (Square) see the model only through a score oracle, as in AutoAttack. Members
that do not support the threat's norm, or need more classes than the model has, are
skipped and the skip is recorded in the result's config.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import InvalidConfigError
from modelshield.core.oracle import from_classifier
from modelshield.core.results import AttackResult
from modelshield.core.threat import LpThreat, QueryAccess
from modelshield.evasion.base import ATTACKS, check_batch, finalize, register_attack

logger = logging.getLogger(__name__)

NEEDS_THREE_CLASSES = frozenset({"apgd-dlr", "apgd-t"})


@dataclass(frozen=True)
class Member:
    """One attack of an ensemble with its settings."""

    attack: str
    kwargs: dict[str, Any] = field(default_factory=dict)


STANDARD = (
    Member("apgd-ce", {"steps": 100}),
    Member("apgd-t", {"steps": 100, "n_target_classes": 9}),
    Member("square", {"max_queries": 5000}),
)
"""AutoAttack's standard version without FAB-T: APGD-CE → APGD-T → Square."""

FAST = (
    Member("apgd-ce", {"steps": 50}),
    Member("apgd-t", {"steps": 50, "n_target_classes": 3}),
)
"""A cheaper version: fewer steps and target classes, no Square."""


def _usable(member: Member, model: Classifier, threat: LpThreat) -> str | None:
    if member.attack not in ATTACKS:
        return f"{member.attack} is not available"
    spec = ATTACKS.get(member.attack)
    if threat.norm not in spec.norms:
        return f"{member.attack} does not support {threat.norm}"
    if member.attack in NEEDS_THREE_CLASSES and model.num_classes < 3:
        return f"{member.attack} needs at least 3 classes"
    return None


def run_ensemble(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    members: tuple[Member, ...] = STANDARD,
    name: str = "ensemble",
    seed: int | None = 0,
    scale_steps: float = 1.0,
) -> AttackResult:
    """Run ``members`` in order on the still-robust points; keep the first success per sample.

    ``scale_steps`` multiplies every member's ``steps``/``max_queries`` (for cheap profiles).
    ``config["fooled_by"]`` counts, per member, the points it broke first.
    """
    started = time.perf_counter()
    if threat.targeted:
        raise InvalidConfigError(
            f"{name} is an untargeted evaluation; use a targeted attack directly"
        )
    if not scale_steps > 0:
        raise InvalidConfigError(f"scale_steps must be > 0, got {scale_steps}")
    out_device, out_dtype = x.device, x.dtype
    x, y = check_batch(model, x, y, threat)
    with torch.no_grad():
        fooled = model.logits(x).argmax(1) != y
    best = x.clone()
    queries = torch.zeros(len(x), dtype=torch.long)
    fooled_by: dict[str, int] = {"clean": int(fooled.sum())}
    skipped: dict[str, str] = {}
    for k, member in enumerate(members):
        why = _usable(member, model, threat)
        if why is not None:
            skipped[member.attack] = why
            continue
        todo = (~fooled).nonzero().squeeze(1)
        if not len(todo):
            break
        spec = ATTACKS.get(member.attack)
        kwargs = dict(member.kwargs)
        for key in ("steps", "max_queries"):
            if key in kwargs:
                kwargs[key] = max(1, round(kwargs[key] * scale_steps))
        sub_seed = None if seed is None else seed + k
        target = (
            from_classifier(model, QueryAccess(output="logits"))
            if spec.access != "white-box"
            else model
        )
        res = spec(target, x[todo], y[todo], threat=threat, seed=sub_seed, **kwargs)
        if res.success is None or res.x_adv is None:  # every guard sets both
            raise RuntimeError(f"{member.attack} returned no adversarial inputs")
        hit = res.success.to(x.device)
        best[todo[hit]] = res.x_adv.to(x.device, x.dtype)[hit]
        fooled[todo[hit]] = True
        if res.queries is not None:
            queries[todo.cpu()] += res.queries.cpu()
        fooled_by[member.attack] = int(hit.sum())
        logger.debug("%s: %s broke %d of %d", name, member.attack, int(hit.sum()), len(todo))
    if len(skipped) == len(members):
        raise InvalidConfigError(
            f"no member of {name} can run here: "
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
        )
    config = {
        "members": [{"attack": m.attack, **m.kwargs} for m in members],
        "scale_steps": scale_steps,
        "fooled_by": fooled_by,
        "skipped": skipped,
    }
    return finalize(
        model,
        x,
        y,
        best,
        threat,
        attack=name,
        queries=queries,
        config=config,
        seed=seed,
        started=started,
        out_device=out_device,
        out_dtype=out_dtype,
    )


@register_attack("autoattack", access="white-box", norms=("linf", "l2", "l1"), targeted=False)
def autoattack(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    seed: int | None = 0,
    scale_steps: float = 1.0,
) -> AttackResult:
    """AutoAttack standard (Croce & Hein 2020): APGD-CE → APGD-T → Square, worst case."""
    return run_ensemble(
        model,
        x,
        y,
        threat=threat,
        members=STANDARD,
        name="autoattack",
        seed=seed,
        scale_steps=scale_steps,
    )


@register_attack("autoattack-fast", access="white-box", norms=("linf", "l2", "l1"), targeted=False)
def autoattack_fast(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    seed: int | None = 0,
    scale_steps: float = 1.0,
) -> AttackResult:
    """A cheaper AutoAttack: APGD-CE (50 steps) → APGD-T (3 targets × 50 steps)."""
    return run_ensemble(
        model,
        x,
        y,
        threat=threat,
        members=FAST,
        name="autoattack-fast",
        seed=seed,
        scale_steps=scale_steps,
    )
