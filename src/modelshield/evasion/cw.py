"""Carlini–Wagner L2 (Carlini & Wagner, "Towards Evaluating the Robustness of Neural
Networks", IEEE S&P 2017).

A minimum-norm attack. The box ``threat.bounds = (lo, hi)`` is removed by the change of
variables ``x' = lo + (hi - lo)·(tanh(w) + 1)/2``; Adam then minimises, per sample,

    ‖x' − x‖²₂ + c · f(x'),   f(x') = max(z_y − max_{i≠y} z_i, −κ)        (untargeted)
                              f(x') = max(max_{i≠t} z_i − z_t, −κ)        (targeted)

with ``z`` the logits and ``κ = confidence``. The constant ``c`` is found per sample by
binary search: multiplied by 10 until a first success, then bisected between the largest
failing and the smallest successful value. Over all iterates of all searches, the
successful point (margin ≥ κ) with the smallest L2 distance is kept.

One departure from the paper's code: a search counts as successful, for the update of
``c``, only through iterates in the second half of its steps (or its last iterate when it
stopped early). Adam's first steps have a fixed size in ``w``, so a point close to the
boundary is pushed across it at any ``c``, even one too small to keep it there; counting
that transient crossing sends the bisection to ever smaller ``c`` and leaves the answer at
the size of the first step. Such points are still kept as candidates.

How it fits a fixed-budget threat model: the returned point is that smallest successful
point when its L2 distance is ≤ ``threat.eps``, else the clean input, so the guard's
projection never moves (and never spoils) a successful point, and ``result.distance`` is
the minimal distance found for successful points (0 elsewhere). To read off the pure
minimal distances, pass an ``eps`` no point can exceed, e.g. ``(hi − lo)·sqrt(d)`` for
``d`` input features (``LpThreat`` needs a finite eps).
"""

from __future__ import annotations

import math
import time

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import InvalidConfigError
from modelshield.core.results import AttackResult
from modelshield.core.threat import LpThreat
from modelshield.evasion.base import (
    check_batch,
    check_count,
    check_norm,
    finalize,
    register_attack,
    resolve_goal,
)

_NORMS = ("l2",)
_TANH_SHRINK = 1 - 1e-6  # keeps atanh finite for inputs on the box's faces
_NO_BOUND = 1e10  # "no successful c yet" marker for the binary search


def _margin(logits: torch.Tensor, goal: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-sample margin by which the goal is met (the negative of the C&W ``f`` before
    clamping): ``max_{i≠y} z_i − z_y`` untargeted, ``z_t − max_{i≠t} z_i`` targeted."""
    z_goal = logits.gather(1, goal[:, None]).squeeze(1)
    z_other = logits.scatter(1, goal[:, None], float("-inf")).amax(dim=1)
    return z_goal - z_other if targeted else z_other - z_goal


def _meets_goal(
    logits: torch.Tensor, goal: torch.Tensor, targeted: bool, kappa: float
) -> torch.Tensor:
    """Success with confidence κ, as in the paper's code: the top-1 label of the logits with
    the goal's logit moved by κ against the attacker (κ = 0: the model's own verdict)."""
    shifted = logits.scatter_add(
        1, goal[:, None], logits.new_full((len(goal), 1), -kappa if targeted else kappa)
    )
    pred = shifted.argmax(dim=1)
    return pred == goal if targeted else pred != goal


def _check_number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        allowed = "> 0" if positive else ">= 0"
        raise InvalidConfigError(f"{name} must be finite and {allowed}, got {value!r}")
    return v


@register_attack("cw", access="white-box", norms=_NORMS, minimal=True)
def cw(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    steps: int = 100,
    binary_search_steps: int = 9,
    initial_const: float = 1e-2,
    lr: float = 1e-2,
    confidence: float = 0.0,
    abort_early: bool = True,
    target: torch.Tensor | None = None,
    seed: int | None = 0,
) -> AttackResult:
    """Carlini–Wagner L2 minimum-norm attack (Carlini & Wagner, IEEE S&P 2017).

    ``steps`` Adam steps (learning rate ``lr``) for each of ``binary_search_steps`` values
    of the constant ``c``, starting at ``initial_const``; ``confidence`` is κ. With
    ``abort_early`` a search stops once no sample's objective fell by 0.01% over the last
    ``steps // 10`` steps. Returns the smallest successful point per sample if its L2
    distance is ≤ ``threat.eps``, else the clean input (see the module docstring). The
    attack is deterministic; ``seed`` is recorded only.
    """
    started = time.perf_counter()
    check_norm("cw", threat, _NORMS)
    check_count(steps, "steps")
    check_count(binary_search_steps, "binary_search_steps")
    c0 = _check_number("initial_const", initial_const, positive=True)
    _check_number("lr", lr, positive=True)
    kappa = _check_number("confidence", confidence, positive=False)
    out_device, out_dtype = x.device, x.dtype
    x, y = check_batch(model, x, y, threat)
    goal = resolve_goal(y, target, threat, model.num_classes)

    n = len(x)
    lo, hi = threat.bounds
    x_unit = ((x - lo) / (hi - lo) * 2 - 1).clamp(-1, 1) * _TANH_SHRINK
    w0 = torch.atanh(x_unit)
    best = x.clone()
    best_l2 = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    queries = torch.zeros(n, dtype=torch.long)
    if n:  # points that meet the goal already need no perturbation
        with torch.no_grad():
            best_l2[_meets_goal(model(x), goal, threat.targeted, kappa)] = 0.0
    queries += 1

    const = torch.full((n,), c0, dtype=x.dtype, device=x.device)
    lower = torch.zeros_like(const)
    upper = torch.full_like(const, _NO_BOUND)
    check_every = max(1, steps // 10)
    settle = steps // 2  # earlier successes do not move c (see the module docstring)
    for _ in range(binary_search_steps if n else 0):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        prev = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        for it in range(steps):
            x_adv = lo + (hi - lo) * (torch.tanh(w) + 1) / 2
            l2sq = (x_adv - x).flatten(1).pow(2).sum(dim=1)
            logits = model(x_adv)
            margin = _margin(logits, goal, threat.targeted)
            loss = l2sq + const * (-margin).clamp_min(-kappa)
            (w.grad,) = torch.autograd.grad(loss.sum(), w)  # leaves the model's .grad alone
            opt.step()
            queries += 1
            with torch.no_grad():
                ok = _meets_goal(logits.detach(), goal, threat.targeted, kappa)
                if it >= settle:
                    found |= ok
                l2 = l2sq.detach().sqrt()
                better = ok & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = x_adv.detach()[better]
                if abort_early and it % check_every == 0:
                    stalled = loss.detach() > prev * 0.9999
                    if bool(stalled.all()):
                        break
                    prev = loss.detach()
        with torch.no_grad():  # ×10 until the first success, then bisection
            found |= ok  # the last iterate counts even when the search stopped early
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            bracketed = upper < _NO_BOUND
            const = torch.where(bracketed, (lower + upper) / 2, const * 10)

    keep = best_l2 <= threat.eps
    x_out = torch.where(keep.view(-1, *([1] * (x.ndim - 1))), best, x)
    config = {
        "steps": steps,
        "binary_search_steps": binary_search_steps,
        "initial_const": c0,
        "lr": lr,
        "confidence": kappa,
        "abort_early": abort_early,
    }
    return finalize(
        model,
        x,
        goal,
        x_out,
        threat,
        attack="cw",
        queries=queries,
        config=config,
        seed=seed,
        started=started,
        out_device=out_device,
        out_dtype=out_dtype,
    )
