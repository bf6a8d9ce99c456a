"""How good a stolen copy is: fidelity to the victim, and transferability of attacks.

Fidelity is top-1 agreement between copy and victim (Jagielski et al., USENIX Security
2020, "High Accuracy and High Fidelity Extraction of Neural Networks"). Transferability
is the rate at which adversarial examples crafted on the copy with PGD (Madry et al. 2018)
also fool the victim (Papernot et al., AsiaCCS 2017), among the points both classify
correctly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.threat import LpThreat
from modelshield.evasion.run import run_attack
from modelshield.extraction.base import (
    Victim,
    check_inputs,
    check_positive_int,
    copy_logits,
    victim_top1,
)


def fidelity(copy: nn.Module, victim_labels: Tensor, x: Tensor) -> float:
    """Top-1 agreement of ``copy`` with the victim's labels ``victim_labels`` on ``x``."""
    x = check_inputs(x, "x")
    labels = victim_labels.detach().cpu().reshape(-1).long()
    if len(labels) != len(x):
        raise DataError(f"victim_labels has {len(labels)} rows for {len(x)} inputs")
    pred = copy_logits(copy, x).argmax(dim=1)
    return float((pred == labels).float().mean())


def _rate(hits: Tensor, among: Tensor) -> float:
    n = int(among.sum())
    return float((hits & among).sum()) / n if n else math.nan


def transferability(
    copy: nn.Module,
    victim: Victim,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Craft untargeted PGD examples on ``copy`` and try them on ``victim``.

    Returns ``{"attack", "norm", "eps", "steps", "n", "n_both_correct", "success_on_copy",
    "transfer_rate", "transfer_given_copy_success", "victim_queries"}``. Rates are over
    the points copy and victim both classify correctly (``nan`` when there are none);
    ``transfer_given_copy_success`` is over those where the example fooled the copy. Victim
    answers are read without charging any budget (``victim_queries`` counts them).
    """
    x = check_inputs(x, "x")
    if not isinstance(y, Tensor) or y.ndim != 1 or len(y) != len(x):
        raise DataError(f"y must be labels (N,) matching x ({len(x)} rows)")
    check_positive_int(steps, "steps")
    threat = LpThreat(norm=norm, eps=eps, bounds=bounds)  # type: ignore[arg-type]
    if threat.eps <= 0:
        raise InvalidConfigError(f"eps must be > 0 for a transfer attack, got {eps}")
    y = y.detach().cpu().long()
    dev = next((p.device for p in copy.parameters()), torch.device("cpu"))
    clf = from_torch(copy, input_shape=tuple(x.shape[1:]), bounds=threat.bounds, device=dev)
    res = run_attack("pgd", clf, x.to(dev), y.to(dev), threat=threat, seed=seed, steps=steps)
    if res.x_adv is None:
        raise RuntimeError("pgd returned no adversarial inputs")
    x_adv = res.x_adv.detach().cpu()
    xc = x.detach().cpu()
    copy_clean = copy_logits(copy, xc).argmax(dim=1) == y
    copy_adv = copy_logits(copy, x_adv).argmax(dim=1) != y
    victim_clean = victim_top1(victim, xc) == y
    victim_adv = victim_top1(victim, x_adv) != y
    both = copy_clean & victim_clean
    return {
        "attack": "pgd",
        "norm": threat.norm,
        "eps": threat.eps,
        "steps": steps,
        "n": len(x),
        "n_both_correct": int(both.sum()),
        "success_on_copy": _rate(copy_adv, both),
        "transfer_rate": _rate(victim_adv, both),
        "transfer_given_copy_success": _rate(victim_adv, both & copy_adv),
        "victim_queries": 2 * len(x),
    }
