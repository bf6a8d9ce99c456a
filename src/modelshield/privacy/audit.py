"""Membership audit of a trained model: sample members and non-members, build reference
models where the attack needs them, score, and measure (ROC, AUC, TPR at low FPR).

The target's training data gives the members, held-out data the non-members, in equal
numbers. Reference (shadow) models are trained on random halves of that pool (each point
in exactly half of them: the LiRA online scheme), so every attack sees the same points.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.data import Dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.core.results import MembershipResult
from modelshield.core.seeding import make_generator
from modelshield.exec import Executor
from modelshield.privacy.membership import (
    evaluate_scores,
    label_only_scores,
    lira_scores,
    loss_scores,
    rmia_scores,
    shadow_attack_scores,
)
from modelshield.privacy.shadow import ShadowSpec, train_reference_models

logger = logging.getLogger(__name__)

ATTACKS = ("loss", "shadow", "lira", "lira-offline", "rmia", "label-only")
MEMBERSHIP_ATTACKS: Registry[str] = Registry("membership-attacks", singular="membership attack")
for _name, _paper in (
    ("loss", "loss threshold (Yeom et al. 2018)"),
    ("shadow", "shadow models (Shokri et al. 2017)"),
    ("lira", "LiRA online (Carlini et al. 2022)"),
    ("lira-offline", "LiRA offline (Carlini et al. 2022)"),
    ("rmia", "RMIA (Zarifzadeh et al. 2024)"),
    ("label-only", "label-only, augmentation (Choquette-Choo et al. 2021)"),
):
    MEMBERSHIP_ATTACKS.add(_name, _name, help=_paper)
NEEDS_REFERENCES = frozenset({"shadow", "lira", "lira-offline", "rmia"})


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: attack, sample size, reference models and their recipe."""

    attack: str = "lira"
    n: int = 500
    """Members (and as many non-members) drawn; fewer if the data has fewer."""
    shadow_models: int = 8
    spec: ShadowSpec | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise InvalidConfigError(
                f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}"
            )
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 10:
            raise InvalidConfigError(f"n must be an integer >= 10, got {self.n!r}")
        k = self.shadow_models
        if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2:
            raise InvalidConfigError(f"shadow_models must be an even integer >= 2, got {k!r}")


def _sample(
    members: Dataset, nonmembers: Dataset, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal numbers of members and non-members: (x, y, is_member, unused non-members)."""
    n = min(n, len(members), len(nonmembers))
    if n < 5:
        raise DataError(
            f"need at least 5 members and 5 non-members, got {len(members)} and {len(nonmembers)}"
        )
    g = make_generator(seed)
    mi = torch.randperm(len(members), generator=g)[:n]
    ni = torch.randperm(len(nonmembers), generator=g)[:n]
    x = torch.cat([members.x[mi], nonmembers.x[ni]])
    y = torch.cat([members.y[mi], nonmembers.y[ni]])
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    rest = torch.randperm(len(nonmembers), generator=g)
    unused = rest[~torch.isin(rest, ni)]
    return x, y, is_member, unused


def default_spec(input_shape: tuple[int, ...]) -> ShadowSpec:
    """A small CNN for images, an MLP otherwise."""
    return ShadowSpec(arch="small_cnn" if len(input_shape) == 3 else "mlp", epochs=20)


def audit_membership(
    model: Classifier,
    members: Dataset,
    nonmembers: Dataset,
    config: AuditConfig,
    *,
    executor: Executor | None = None,
    cache_dir: str | Path | None = None,
) -> MembershipResult:
    """Score members against non-members with ``config.attack``; ROC/AUC/TPR@FPR included."""
    started = time.perf_counter()
    x, y, is_member, unused = _sample(members, nonmembers, config.n, config.seed)
    num_classes = model.num_classes
    if int(y.max()) >= num_classes:
        raise DataError(
            f"labels go up to {int(y.max())} but the model predicts {num_classes} classes"
        )
    with torch.no_grad():
        target = model.logits(x).cpu()
    info: dict[str, object] = {"n_members": int(is_member.sum()), "attack": config.attack}
    attack = config.attack
    if attack == "loss":
        scores = loss_scores(target, y)
    elif attack == "label-only":
        scores = label_only_scores(model.predict, x, y, bounds=model.bounds, seed=config.seed)
    else:
        spec = config.spec or default_spec(tuple(x.shape[1:]))
        logger.info(
            "training %d reference models (%s, %d epochs)",
            config.shadow_models,
            spec.arch,
            spec.epochs,
        )
        refs = train_reference_models(
            x,
            y,
            num_classes,
            config.shadow_models,
            spec,
            seed=config.seed,
            cache_dir=cache_dir,
            executor=executor,
        )
        ref_logits = refs.logits(x, executor=executor)
        info.update(
            shadow_models=refs.k,
            spec=spec.to_dict(),
            trained=len(refs.trained),
            cached=len(refs.cached),
        )
        if attack == "shadow":
            scores = shadow_attack_scores(target, y, ref_logits, y, refs.masks, seed=config.seed)
        elif attack in ("lira", "lira-offline"):
            # few references: one pooled variance (Carlini et al. recommend it below ~64)
            scores = lira_scores(
                target,
                y,
                ref_logits,
                refs.masks,
                online=attack == "lira",
                fixed_variance=refs.k < 64,
            )
        else:
            # RMIA's population z: held-out points outside the audit pool (non-members of the
            # target); with none left, the pool's non-members stand in
            if len(unused) >= 50:
                z_idx = unused[: 4 * len(x)]
                zx, zy = nonmembers.x[z_idx], nonmembers.y[z_idx]
                with torch.no_grad():
                    z_target = model.logits(zx).cpu()
                z_refs = refs.logits(zx, executor=executor)
            else:
                out = ~is_member
                zx, zy, z_target, z_refs = x[out], y[out], target[out], ref_logits[:, out]
            info["population"] = len(zx)
            scores = rmia_scores(target, y, ref_logits, refs.masks, z_target, zy, z_refs)
    return evaluate_scores(
        attack, scores, is_member, seed=config.seed, config=info, started=started
    )
