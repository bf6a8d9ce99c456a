"""A plain supervised training loop, seeded, used by the demo and by shadow/reference models."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from modelshield.core.errors import InvalidConfigError
from modelshield.core.seeding import make_generator

logger = logging.getLogger(__name__)


def train_classifier(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train ``module`` with Adam and cross-entropy.

    The same seed and the same initial module give the same weights. ``seed`` drives only
    the batch order and dropout: seed torch (``seed_everything``) before building the
    module too, since torch seeds each process at random.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InvalidConfigError(
            f"epochs, batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}"
        )
    torch.manual_seed(seed)
    module = module.to(device)
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    g = make_generator(seed)
    n = len(x)
    for epoch in range(epochs):
        module.train()
        order = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(module(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        logger.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, total / max(n, 1))
    module.eval()
    return module
