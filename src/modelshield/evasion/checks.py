"""Self-checks of a robustness evaluation, in the spirit of AutoAttack's ``checks.py``.

Each check returns flag strings (empty when fine). They catch the usual ways an
evaluation overestimates robustness: probabilities instead of logits, zero or NaN
gradients, a randomised forward pass, a black-box attack beating the white-box ones
(gradient masking), and robust accuracy rising with eps (attacks not converging).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier

PROBE_BATCH = 256


def check_outputs(model: Classifier, x: torch.Tensor) -> list[str]:
    """Flag outputs that look like probabilities (rows in [0, 1] summing to 1)."""
    with torch.no_grad():
        out = model(x[:PROBE_BATCH].to(model.device))
    ones = torch.ones(len(out), device=out.device)
    if bool(((out >= 0) & (out <= 1)).all()) and torch.allclose(out.sum(1), ones, atol=1e-3):
        return [
            "model outputs look like probabilities, not logits: cross-entropy attacks are "
            "weakened (softmax saturates); evaluate on logits"
        ]
    return []


def check_randomness(model: Classifier, x: torch.Tensor) -> list[str]:
    """Flag a model whose two forward passes on the same input differ."""
    xb = x[:PROBE_BATCH].to(model.device)
    with torch.no_grad():
        a, b = model(xb), model(xb)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        return [
            "model is randomised (two forward passes differ): use EOT-style attacks "
            "before trusting robust accuracy"
        ]
    return []


def check_gradients(
    model: Classifier, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[str], dict[str, Any]]:
    """Flag zero or NaN input gradients of the cross-entropy loss."""
    xb = x[:PROBE_BATCH].to(model.device).clone().requires_grad_(True)
    loss = F.cross_entropy(model(xb), y[:PROBE_BATCH].to(model.device), reduction="sum")
    (grad,) = torch.autograd.grad(loss, xb)
    gmax = grad.flatten(1).abs().amax(dim=1)
    zero = float((gmax == 0).float().mean())
    nan = float((~torch.isfinite(gmax)).float().mean())
    flags = []
    if zero > 0.1:
        flags.append(f"zero input gradients for {zero:.0%} of samples (gradient masking?)")
    if nan > 0:
        flags.append(f"NaN or infinite input gradients for {nan:.0%} of samples")
    return flags, {"zero_gradient_fraction": zero, "nan_gradient_fraction": nan}


def check_monotone(
    eps: Sequence[float], attack_accuracy: Sequence[float], tol: float = 0.01
) -> list[str]:
    """Flag robust accuracy (as each eps's attacks found it) rising with eps."""
    flags = []
    for k in range(1, len(eps)):
        if attack_accuracy[k] > attack_accuracy[k - 1] + tol:
            flags.append(
                f"robust accuracy found by the attacks rises from {attack_accuracy[k - 1]:.1%} to "
                f"{attack_accuracy[k]:.1%} as eps grows ({eps[k - 1]:.4g} → {eps[k]:.4g}): "
                "the attacks are not converging"
            )
    return flags


def check_blackbox_beats_whitebox(
    eps: float, fooled_by: dict[str, int], black_box: frozenset[str] | set[str], n: int
) -> list[str]:
    """Flag points that only a black-box attack broke after the white-box ones ran."""
    found = sum(v for k, v in fooled_by.items() if k in black_box)
    if found > 0 and n > 0:
        return [
            f"at eps {eps:.4g} black-box attacks broke {found} point(s) the gradient attacks "
            "missed: a sign of gradient masking"
        ]
    return []


def validity_checks(
    model: Classifier, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[str], dict[str, Any]]:
    """Run the checks that need only the model and clean data."""
    flags = check_outputs(model, x) + check_randomness(model, x)
    gflags, stats = check_gradients(model, x, y)
    return flags + gflags, stats
