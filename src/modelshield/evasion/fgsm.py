"""Fast Gradient Sign Method (Goodfellow et al. 2015), any norm via steepest ascent.

With ``random_start`` it is the FGSM-RS step of Wong et al. (2020): start uniformly in the
ball, then take one step of size ``alpha`` (default 1.25·eps) and project.
"""

from __future__ import annotations

import time

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.results import AttackResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import _lp
from modelshield.evasion.base import attack_loss, check_batch, finalize, register_attack


@register_attack("fgsm")
def fgsm(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    random_start: bool = False,
    alpha: float | None = None,
    loss: str = "ce",
    seed: int | None = 0,
) -> AttackResult:
    """One steepest-ascent step of size eps (FGSM; Goodfellow et al. 2015)."""
    started = time.perf_counter()
    out_device, out_dtype = x.device, x.dtype
    x, y = check_batch(model, x, y, threat)
    sign = -1.0 if threat.targeted else 1.0
    start = x
    if random_start:
        g = make_generator(seed, x.device)
        start = _lp.clip_to_bounds(
            x
            + _lp.sample_ball(
                x.shape, threat.norm, threat.eps, generator=g, device=x.device, dtype=x.dtype
            ),
            threat.bounds,
        )
    step = threat.eps if alpha is None else alpha
    if random_start and alpha is None:
        step = 1.25 * threat.eps
    x_in = start.clone().requires_grad_(True)
    obj = attack_loss(model(x_in), y, loss).sum() * sign
    (grad,) = torch.autograd.grad(obj, x_in)
    x_adv = x_in.detach() + step * _lp.steepest_ascent(grad, threat.norm)
    config = {"random_start": random_start, "alpha": step, "loss": loss}
    queries = torch.ones(len(x), dtype=torch.long)
    return finalize(
        model,
        x,
        y,
        x_adv,
        threat,
        attack="fgsm",
        queries=queries,
        config=config,
        seed=seed,
        started=started,
        out_device=out_device,
        out_dtype=out_dtype,
    )
