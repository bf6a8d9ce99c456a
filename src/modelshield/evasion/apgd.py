"""Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a step size that adapts itself.

"Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", Algorithm 1. The step size starts at ``η = 2ε``; each step moves by steepest
ascent, projects, and mixes in momentum ``α = 0.75`` (the first step has none). At the
checkpoints ``w_j = ⌈p_j·N⌉`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``) a sample halves its step and restarts
from its best point when fewer than ``ρ = 0.75`` of the steps since the last checkpoint
raised its loss (condition 1), or when neither its step size nor its best loss changed since
the last checkpoint (condition 2). Everything is per sample.

Three registered attacks: ``apgd-ce`` (cross-entropy), ``apgd-dlr`` (the Difference of
Logits Ratio, invariant to shifts and scalings of the logits) and ``apgd-t`` (targeted DLR
over the top target classes, as in AutoAttack).

Choices the paper leaves open, or where this code departs from its reference code:

- The random start is uniform in the ball for every norm (:func:`_lp.sample_ball`). The
  reference code starts on the sphere; in L2 a uniform point in a ``d``-dimensional ball has
  radius ``ε·U^(1/d)``, within a few percent of ``ε`` once ``d`` is in the tens.
- A restart from the best point also drops the momentum (the next step has none).
- A sample leaves the run as soon as it is fooled and keeps that point; an unfooled sample
  returns its highest-loss point. Restarts and target classes run only on unfooled samples.
- L1 is an extension, not the paper's APGD-L1 (Croce & Hein, ICCV 2021, which also adapts
  the sparsity of its steps): the step is the sparse SLIDE direction of
  :func:`_lp.steepest_ascent` with a fixed ``l1_sparsity``, taken over the coordinates the
  box lets move (as APGD-L1 does; without it most steps push pixels already at 0 or 1),
  then the projection onto the L1 ball and the box.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

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

ALPHA = 0.75
"""Momentum: weight of the new step against the previous displacement."""
RHO = 0.75
"""Condition 1: halve the step when fewer than this fraction of steps raised the loss."""

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
State = dict[str, torch.Tensor]


# -- losses and schedule ---------------------------------------------------------------------
def _need_classes(logits: torch.Tensor, k: int, what: str) -> None:
    if logits.shape[1] < k:
        raise InvalidConfigError(
            f"{what} needs at least {k} classes, the model has {logits.shape[1]}"
        )


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss ``−(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)`` per sample.

    ``π`` sorts the logits in decreasing order (Croce & Hein 2020, eq. 5). Needs 3 classes.
    """
    _need_classes(logits, 3, "the DLR loss")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12)`` per sample.

    Croce & Hein 2020, eq. 6. With exactly 3 classes ``z_π4`` is taken as ``z_π3`` (an
    extension: the paper's models have 10 or more classes).
    """
    _need_classes(logits, 3, "the targeted DLR loss")
    top = logits.sort(dim=1, descending=True).values
    fourth = top[:, 3] if logits.shape[1] > 3 else top[:, 2]
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + fourth) / 2 + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints ``w_j = ⌈p_j·N⌉`` for ``N = steps``, from ``w_0 = 0``.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` while
    ``p_j ≤ 1``. Worked in hundredths, so the ceiling is exact; repeats (small ``N``) dropped.
    """
    out, p_prev, p = [0], 0, 22
    while p <= 100:
        w = -(-p * steps // 100)
        if w > out[-1]:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return out


# -- one run -----------------------------------------------------------------------------------
def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def _value_and_grad(
    model: Classifier, x_adv: torch.Tensor, objective: Objective, s: State
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-sample loss and its gradient at ``x_adv`` (one forward-backward pass)."""
    xa = x_adv.detach().clone().requires_grad_(True)
    logits = model(xa)
    f = objective(logits, s["y"], s["t"])
    (grad,) = torch.autograd.grad(f.sum(), xa)
    return logits.detach(), f.detach(), grad


def _movable(grad: torch.Tensor, x_adv: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Zero the gradient where the box blocks the step (for L1, where sparse steps are scarce)."""
    low, high = bounds
    blocked = ((x_adv <= low) & (grad < 0)) | ((x_adv >= high) & (grad > 0))
    return grad.masked_fill(blocked, 0)


def _retire(s: State, fooled: torch.Tensor, x_at: torch.Tensor, out: State) -> State:
    """Write fooled samples' points to ``out`` and drop them from the state."""
    hit = s["idx"][fooled]
    out["x"][hit] = x_at[fooled]
    out["success"][hit] = True
    keep = ~fooled
    return {k: v[keep] for k, v in s.items()}


def _checkpoint(s: State, window: int) -> None:
    """Conditions 1 and 2 at a checkpoint: halve ``η`` and go back to the best point."""
    halve = (s["ups"] < RHO * window) | (~s["reduced"] & (s["f_best"] <= s["f_ckpt"]))
    h = _col(halve, s["cur"])
    s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
    s["cur"] = torch.where(h, s["best"], s["cur"])
    s["prev"] = torch.where(h, s["best"], s["prev"])  # no momentum out of a restart
    s["g"] = torch.where(h, s["g_best"], s["g"])
    s["f"] = torch.where(halve, s["f_best"], s["f"])
    s["ups"] = torch.zeros_like(s["ups"])
    s["f_ckpt"] = s["f_best"].clone()
    s["reduced"] = halve


def _apgd_run(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    threat: LpThreat,
    *,
    objective: Objective,
    steps: int,
    l1_sparsity: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run (Algorithm 1); returns per sample (x_adv, loss, success, forward passes)."""
    n, norm, eps = len(x), threat.norm, threat.eps
    noise = _lp.sample_ball(x.shape, norm, eps, generator=generator, device=x.device, dtype=x.dtype)
    start = _lp.clip_to_bounds(x + noise, threat.bounds)
    out = {"x": start.clone(), "success": torch.zeros(n, dtype=torch.bool, device=x.device)}
    queries = torch.zeros(n, dtype=torch.long, device=x.device)
    goal = t if threat.targeted else y
    s: State = {"x": x, "y": y, "t": t, "goal": goal, "idx": torch.arange(n, device=x.device)}
    logits, f, g = _value_and_grad(model, start, objective, s)
    queries += 1
    s.update(cur=start, prev=start, f=f, g=g, best=start, f_best=f, g_best=g, f_ckpt=f)
    s.update(
        eta=torch.full_like(f, 2 * eps),
        ups=torch.zeros_like(f),
        reduced=torch.zeros_like(f, dtype=torch.bool),
    )
    s = _retire(s, is_success(logits.argmax(1), goal, threat.targeted), start, out)
    schedule, last = set(checkpoints(steps)), 0
    for step in range(1, steps + 1):
        if not len(s["idx"]):
            break
        a = 1.0 if step == 1 else ALPHA
        cur = s["cur"]
        grad = _movable(s["g"], cur, threat.bounds) if norm == "l1" else s["g"]
        ascent = _lp.steepest_ascent(grad, norm, l1_sparsity=l1_sparsity)
        z = _lp.project_to_threat(
            cur + _col(s["eta"], cur) * ascent, s["x"], norm, eps, threat.bounds
        )
        moved = cur + a * (z - cur) + (1 - a) * (cur - s["prev"])
        new = _lp.project_to_threat(moved, s["x"], norm, eps, threat.bounds)
        logits, f, g = _value_and_grad(model, new, objective, s)
        queries[s["idx"]] += 1
        better = f > s["f_best"]
        b = _col(better, new)
        s.update(prev=cur, cur=new, g=g, ups=s["ups"] + (f > s["f"]).to(f.dtype), f=f)
        s.update(best=torch.where(b, new, s["best"]), g_best=torch.where(b, g, s["g_best"]))
        s["f_best"] = torch.where(better, f, s["f_best"])
        s = _retire(s, is_success(logits.argmax(1), s["goal"], threat.targeted), new, out)
        if step in schedule:
            _checkpoint(s, step - last)
            last = step
    loss = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    out["x"][s["idx"]] = s["best"]
    loss[s["idx"]] = s["f_best"]
    return out["x"], loss, out["success"], queries


# -- the attacks ---------------------------------------------------------------------------------
def _ce(logits: torch.Tensor, y: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
    return attack_loss(logits, y, "ce")


def _dlr(logits: torch.Tensor, y: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
    return dlr_loss(logits, y)


_OBJECTIVES: dict[str, Objective] = {"apgd-ce": _ce, "apgd-dlr": _dlr, "apgd-t": dlr_targeted_loss}


def _apgd(
    attack: str,
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int,
    restarts: int,
    seed: int | None,
    l1_sparsity: float,
    target: torch.Tensor | None = None,
    n_target_classes: int = 1,
) -> AttackResult:
    """Shared driver: targets × restarts, each on the still-unfooled samples, then the guard."""
    started = time.perf_counter()
    check_count(steps, "steps")
    check_count(restarts, "restarts")
    check_count(n_target_classes, "n_target_classes")
    if not isinstance(l1_sparsity, (int, float)) or not 0.0 <= l1_sparsity <= 1.0:
        raise InvalidConfigError(f"l1_sparsity must be in [0, 1], got {l1_sparsity!r}")
    if attack != "apgd-t" and threat.targeted:
        raise InvalidConfigError(
            f"{attack} is untargeted; for a targeted threat use apgd-t with target=..."
        )
    if attack != "apgd-ce" and model.num_classes < 3:
        raise InvalidConfigError(
            f"{attack} uses the DLR loss, which needs at least 3 classes; "
            f"the model has {model.num_classes}"
        )
    if target is not None and not threat.targeted:
        raise InvalidConfigError("target is only used with a targeted threat (targeted=True)")
    out_device, out_dtype = x.device, x.dtype
    x, y = check_batch(model, x, y, threat)
    if threat.targeted:
        targets = resolve_goal(y, target, threat, model.num_classes)[:, None]
    with torch.no_grad():
        clean = model.logits(x)
    queries = torch.ones(len(x), dtype=torch.long, device=x.device)
    objective = _OBJECTIVES[attack]
    if attack == "apgd-t" and not threat.targeted:
        k = min(n_target_classes, model.num_classes - 1)
        targets = clean.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices
    elif not threat.targeted:
        targets = y[:, None]
    goal = targets[:, 0] if threat.targeted else y
    fooled = is_success(clean.argmax(1), goal, threat.targeted)
    best = x.clone()
    best_loss = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
    g = make_generator(seed, x.device)
    for rank in range(targets.shape[1]):
        for _ in range(restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if not len(todo):
                break
            x_r, f_r, s_r, q_r = _apgd_run(
                model,
                x[todo],
                y[todo],
                targets[todo, rank],
                threat,
                objective=objective,
                steps=steps,
                l1_sparsity=l1_sparsity,
                generator=g,
            )
            queries[todo] += q_r
            take = s_r | (f_r > best_loss[todo])
            best[todo[take]] = x_r[take]
            best_loss[todo[take]] = f_r[take]
            fooled[todo] |= s_r
    config: dict[str, object] = {
        "steps": steps,
        "restarts": restarts,
        "rho": RHO,
        "momentum": ALPHA,
    }
    if attack == "apgd-t" and not threat.targeted:
        config["n_target_classes"] = targets.shape[1]
    if threat.norm == "l1":
        config["l1_sparsity"] = l1_sparsity
    return finalize(
        model,
        x,
        goal,
        best,
        threat,
        attack=attack,
        queries=queries.cpu(),
        config=config,
        seed=seed,
        started=started,
        out_device=out_device,
        out_dtype=out_dtype,
    )


@register_attack("apgd-ce", access="white-box", norms=("linf", "l2", "l1"), targeted=False)
def apgd_ce(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int = 100,
    restarts: int = 1,
    seed: int | None = 0,
    l1_sparsity: float = 0.95,
) -> AttackResult:
    """APGD on the cross-entropy loss (Croce & Hein 2020); untargeted."""
    return _apgd(
        "apgd-ce",
        model,
        x,
        y,
        threat=threat,
        steps=steps,
        restarts=restarts,
        seed=seed,
        l1_sparsity=l1_sparsity,
    )


@register_attack("apgd-dlr", access="white-box", norms=("linf", "l2", "l1"), targeted=False)
def apgd_dlr(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int = 100,
    restarts: int = 1,
    seed: int | None = 0,
    l1_sparsity: float = 0.95,
) -> AttackResult:
    """APGD on the DLR loss (Croce & Hein 2020); untargeted, needs at least 3 classes."""
    return _apgd(
        "apgd-dlr",
        model,
        x,
        y,
        threat=threat,
        steps=steps,
        restarts=restarts,
        seed=seed,
        l1_sparsity=l1_sparsity,
    )


@register_attack("apgd-t", access="white-box", norms=("linf", "l2", "l1"), targeted=True)
def apgd_t(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int = 100,
    restarts: int = 1,
    seed: int | None = 0,
    target: torch.Tensor | None = None,
    n_target_classes: int = 9,
    l1_sparsity: float = 0.95,
) -> AttackResult:
    """APGD on the targeted DLR loss over the top target classes (Croce & Hein 2020).

    Untargeted threat (AutoAttack's APGD-T): one run per target class, the
    ``n_target_classes`` (capped at ``C − 1``) highest clean logits other than ``y``, each
    on the samples still unfooled. Targeted threat: one run towards ``target``.
    """
    return _apgd(
        "apgd-t",
        model,
        x,
        y,
        threat=threat,
        steps=steps,
        restarts=restarts,
        seed=seed,
        l1_sparsity=l1_sparsity,
        target=target,
        n_target_classes=n_target_classes,
    )
