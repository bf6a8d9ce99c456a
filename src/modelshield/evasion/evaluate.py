"""Robust accuracy over an eps grid, per sample, with intervals and self-checks.

Eps values are run in increasing order and each attacks only the points still robust at
the previous one: an adversarial example at a smaller eps lies in every larger ball, so
this is exact for the per-sample worst case and saves most of the work. To keep the
"robust accuracy rising with eps" check meaningful, each eps also re-attacks a few points
that fell at the previous eps; an attack that fails on them is not converging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.results import RobustnessResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import checks
from modelshield.evasion.base import ATTACKS

logger = logging.getLogger(__name__)

Checkpoint = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]
BLACK_BOX_MEMBERS = frozenset({"square", "hopskipjump"})
RECHECK = 32


def _no_cache(key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return compute()


def _attack_batches(
    attack: str,
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: LpThreat,
    *,
    seed: int,
    batch_size: int,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, int], int]:
    """Success mask, per-member counts and total queries of an attack over batches."""
    spec = ATTACKS.get(attack)
    success: list[torch.Tensor] = []
    counts: dict[str, int] = {}
    queries = 0
    for i in range(0, len(x), batch_size):
        res = spec(
            model, x[i : i + batch_size], y[i : i + batch_size], threat=threat, seed=seed, **kwargs
        )
        success.append(
            res.success.cpu() if res.success is not None else torch.zeros(0, dtype=torch.bool)
        )
        for k, v in res.config.get("fooled_by", {}).items():
            counts[k] = counts.get(k, 0) + int(v)
        queries += int(res.queries.sum()) if res.queries is not None else 0
    return (torch.cat(success) if success else torch.zeros(0, dtype=torch.bool)), counts, queries


def evaluate_robustness(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "linf",
    eps_grid: Sequence[float],
    attack: str = "autoattack",
    attack_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 500,
    checkpoint: Checkpoint | None = None,
    confidence: float = 0.95,
) -> RobustnessResult:
    """Per-sample robustness of ``model`` on ``(x, y)`` at every eps in ``eps_grid``.

    ``attack`` is a registered white-box attack (the AutoAttack-style ensemble by
    default). ``checkpoint(key, compute)`` may store each eps's outcome so an interrupted
    evaluation resumes (the scan passes its run directory's).
    """
    started = time.perf_counter()
    spec = ATTACKS.get(attack)
    if spec.access != "white-box":
        raise InvalidConfigError(
            f"evaluate_robustness needs a white-box attack; {attack} is {spec.access}"
        )
    grid = [float(e) for e in eps_grid]
    if not grid or any(e <= 0 for e in grid) or grid != sorted(set(grid)):
        raise InvalidConfigError(
            f"eps_grid must be increasing positive values, got {list(eps_grid)}"
        )
    if len(x) == 0:
        raise DataError("no samples to evaluate")
    kwargs = dict(attack_kwargs or {})
    cache = checkpoint or _no_cache
    model.check_input(x)
    flags, stats = checks.validity_checks(model, x, y)
    with torch.no_grad():
        clean_correct = (model.predict(x) == y.to(model.device)).cpu()
    robust = torch.zeros(len(x), len(grid), dtype=torch.bool)
    prev = clean_correct.clone()
    fooled_by: list[dict[str, int]] = []
    queries: list[int] = []
    g = make_generator(seed)
    for k, eps in enumerate(grid):
        threat = LpThreat(norm=norm, eps=eps, bounds=model.bounds)  # type: ignore[arg-type]
        fell_before = (clean_correct & ~prev).nonzero().squeeze(1)
        recheck = (
            fell_before[torch.randperm(len(fell_before), generator=g)[:RECHECK]]
            if k
            else fell_before[:0]
        )

        def compute(
            k: int = k,
            threat: LpThreat = threat,
            prev: torch.Tensor = prev,
            recheck: torch.Tensor = recheck,
        ) -> dict[str, Any]:
            todo = prev.nonzero().squeeze(1)
            logger.info(
                "robustness: %s eps %.4g (%d/%d) on %d points",
                attack,
                threat.eps,
                k + 1,
                len(grid),
                len(todo),
            )
            succ, counts, q = _attack_batches(
                attack,
                model,
                x[todo],
                y[todo],
                threat,
                seed=seed + k,
                batch_size=batch_size,
                kwargs=kwargs,
            )
            still = prev.clone()
            still[todo[succ]] = False
            missed = 0
            if len(recheck):
                again, _, q2 = _attack_batches(
                    attack,
                    model,
                    x[recheck],
                    y[recheck],
                    threat,
                    seed=seed + k,
                    batch_size=batch_size,
                    kwargs=kwargs,
                )
                missed, q = int((~again).sum()), q + q2
            return {
                "eps": threat.eps,
                "robust": still.tolist(),
                "fooled_by": counts,
                "queries": q,
                "rechecked": len(recheck),
                "recheck_missed": missed,
            }

        row = cache(f"{attack}-{norm}-eps{k}-{eps:.6g}", compute)
        robust[:, k] = torch.tensor(row["robust"], dtype=torch.bool)
        prev = robust[:, k]
        fooled_by.append({k2: int(v) for k2, v in row["fooled_by"].items()})
        queries.append(int(row["queries"]))
        if row["rechecked"] and row["recheck_missed"] / row["rechecked"] > 0.05:
            flags.append(
                f"at eps {eps:.4g} the attack failed on {row['recheck_missed']} of "
                f"{row['rechecked']} points it had already broken at a smaller eps: robust "
                "accuracy would rise with eps (the attack is not converging)"
            )
        flags += checks.check_blackbox_beats_whitebox(
            eps, row["fooled_by"], BLACK_BOX_MEMBERS, len(x)
        )
    accs, cis = [], []
    for k in range(len(grid)):
        acc, ci = accuracy_with_ci(robust[:, k], confidence)
        accs.append(acc)
        cis.append(list(ci))
    clean_acc, clean_ci = accuracy_with_ci(clean_correct, confidence)
    return RobustnessResult(
        config={"attack_kwargs": kwargs, "batch_size": batch_size, "confidence": confidence},
        seed=seed,
        wall_time=time.perf_counter() - started,
        attack=attack,
        norm=norm,
        bounds=list(model.bounds),
        eps=grid,
        clean_correct=clean_correct,
        robust=robust,
        robust_accuracy=accs,
        ci=cis,
        clean_accuracy=clean_acc,
        clean_ci=list(clean_ci),
        fooled_by=fooled_by,
        queries=queries,
        flags=flags,
        checks=stats,
    )
