"""Projected Gradient Descent (Madry et al. 2018) for L∞, L2 and L1.

Random start in the ball (direction uniform, radius uniform in [0, eps]: in high
dimension a volume-uniform start sits on the sphere and converges worse), ``steps`` steepest-ascent steps of size ``step_size`` (default
``2.5·eps/steps``), projection after each; ``restarts`` independent runs. Per sample the
first successful iterate is kept (the attack stops working on points already fooled: the
robust accuracy is the same and the cost falls with it). For L1 the step is the sparse
SLIDE direction (Tramèr & Boneh 2019).
"""

from __future__ import annotations

import time

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import InvalidConfigError
from modelshield.core.results import AttackResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import _lp
from modelshield.evasion.base import (
    attack_loss,
    check_batch,
    check_count,
    finalize,
    is_success,
    register_attack,
    resolve_goal,
)

_COMPACT_EVERY = 4
"""Steps between dropping fooled points from the batch: each drop waits for the device."""


def _pgd_run(
    model: Classifier,
    x: torch.Tensor,
    goal: torch.Tensor,
    threat: LpThreat,
    *,
    steps: int,
    step_size: float,
    random_start: bool,
    loss: str,
    l1_sparsity: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PGD run on a batch; returns (x_adv, success, forward passes per sample)."""
    sign = -1.0 if threat.targeted else 1.0
    x_adv = x.clone()
    if random_start:
        noise = _lp.sample_ball(
            x.shape,
            threat.norm,
            threat.eps,
            generator=generator,
            device=x.device,
            dtype=x.dtype,
            radius="uniform",
        )
        x_adv = _lp.clip_to_bounds(x + noise, threat.bounds)
    success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
    active = torch.arange(len(x), device=x.device)
    for t in range(steps):
        xa = x_adv[active].clone().requires_grad_(True)
        logits = model(xa)
        queries[active] += 1
        target = goal[active]
        done = is_success(logits.argmax(dim=1), target, threat.targeted) | success[active]
        obj = attack_loss(logits, target, loss).sum() * sign
        (grad,) = torch.autograd.grad(obj, xa)
        with torch.no_grad():
            success[active] = done
            direction = _lp.steepest_ascent(grad, threat.norm, l1_sparsity=l1_sparsity)
            stepped = _lp.project_to_threat(
                xa.detach() + step_size * direction,
                x[active],
                threat.norm,
                threat.eps,
                threat.bounds,
            )
            # fooled points stay where they were fooled; no host sync inside the step
            frozen = done.view(-1, *([1] * (x.ndim - 1)))
            x_adv[active] = torch.where(frozen, xa.detach(), stepped)
            if (t + 1) % _COMPACT_EVERY == 0:  # drop fooled points (one sync per few steps)
                active = active[~done]
                if not len(active):
                    break
    if len(active):
        with torch.no_grad():
            pred = model(x_adv[active]).argmax(dim=1)
            queries[active] += 1
            success[active] = is_success(pred, goal[active], threat.targeted)
    return x_adv, success, queries


@register_attack("pgd")
def pgd(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    target: torch.Tensor | None = None,
    loss: str = "ce",
    l1_sparsity: float = 0.95,
    seed: int | None = 0,
) -> AttackResult:
    """PGD with random start and restarts (Madry et al. 2018).

    Untargeted by default; with ``threat.targeted`` the attack drives towards ``target``.
    """
    started = time.perf_counter()
    check_count(steps, "steps")
    check_count(restarts, "restarts")
    if step_size is not None and not step_size > 0:
        raise InvalidConfigError(f"step_size must be > 0, got {step_size!r}")
    out_device, out_dtype = x.device, x.dtype
    x, y = check_batch(model, x, y, threat)
    goal = resolve_goal(y, target, threat, model.num_classes)
    alpha = step_size if step_size is not None else 2.5 * threat.eps / steps
    g = make_generator(seed, x.device)
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
    for _ in range(restarts):
        todo = (~fooled).nonzero().squeeze(1)
        if not len(todo):
            break
        x_r, s_r, q_r = _pgd_run(
            model,
            x[todo],
            goal[todo],
            threat,
            steps=steps,
            step_size=alpha,
            random_start=random_start,
            loss=loss,
            l1_sparsity=l1_sparsity,
            generator=g,
        )
        queries[todo] += q_r
        best[todo] = torch.where(
            (s_r | ~fooled[todo]).view(-1, *([1] * (x.ndim - 1))), x_r, best[todo]
        )
        fooled[todo] |= s_r
    config = {
        "steps": steps,
        "step_size": alpha,
        "restarts": restarts,
        "random_start": random_start,
        "loss": loss,
    }
    if threat.norm == "l1":
        config["l1_sparsity"] = l1_sparsity
    return finalize(
        model,
        x,
        goal,
        best,
        threat,
        attack="pgd",
        queries=queries.cpu(),
        config=config,
        seed=seed,
        started=started,
        out_device=out_device,
        out_dtype=out_dtype,
    )
