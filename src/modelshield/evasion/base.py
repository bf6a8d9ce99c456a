"""What every evasion attack shares: the registry, input checks, losses, and the final guard.

The guard (:func:`finalize`) is the Foolbox habit: never trust an attack's output. It
projects the returned inputs into the threat set and recomputes success and distance from
the model itself, so no attack can report a perturbation it did not make.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.core.results import AttackResult
from modelshield.core.threat import LpThreat
from modelshield.evasion import _lp

ATTACKS: Registry[Callable[..., AttackResult]] = Registry("attacks")


def check_batch(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, threat: LpThreat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch and move it to the model's device (dtype kept)."""
    model.check_input(x)
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"labels must be a vector of length {len(x)}, got {shape}")
    if y.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= model.num_classes):
        raise DataError(
            f"labels must lie in [0, {model.num_classes - 1}], got [{int(y.min())}, {int(y.max())}]"
        )
    if not bool(torch.isfinite(x).all()):
        raise DataError("inputs contain NaN or infinite values")
    low, high = threat.bounds
    tol = 1e-6 * max(1.0, high - low)
    if len(x) and (float(x.min()) < low - tol or float(x.max()) > high + tol):
        raise DataError(
            f"inputs lie in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside bounds {threat.bounds}"
        )
    return x.to(model.device), y.to(model.device).long()


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss to *maximise* (untargeted) or whose negative to maximise (targeted).

    ``ce``: cross-entropy. ``margin``: the C&W margin ``max_{j≠y} z_j − z_y``.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return other - true
    raise InvalidConfigError(f"loss must be 'ce' or 'margin', got {loss!r}")


def is_success(pred: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    return pred == y if targeted else pred != y


def finalize(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    threat: LpThreat,
    *,
    attack: str,
    queries: torch.Tensor,
    config: dict[str, Any],
    seed: int | None,
    started: float,
    out_device: torch.device,
    out_dtype: torch.dtype,
) -> AttackResult:
    """Project into the threat set, recompute success from the model, package the result."""
    with torch.no_grad():
        x_adv = _lp.project_to_threat(x_adv.detach(), x, threat.norm, threat.eps, threat.bounds)
        pred_adv = model.logits(x_adv).argmax(dim=1)
        pred_clean = model.logits(x).argmax(dim=1)
        success = is_success(pred_adv, y, threat.targeted)
        distance = _lp.lp_norm(x_adv - x, threat.norm)
    return AttackResult(
        config=config,
        seed=seed,
        wall_time=time.perf_counter() - started,
        attack=attack,
        threat=threat.to_dict(),
        x_adv=x_adv.to(device=out_device, dtype=out_dtype),
        success=success.cpu(),
        distance=distance.float().cpu(),
        queries=(queries + 2).cpu(),
        clean_correct=(pred_clean == y).cpu() if not threat.targeted else None,
    )
