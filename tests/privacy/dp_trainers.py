"""Training procedures for the DP-audit tests, importable as ``tests.privacy.dp_trainers:NAME``.

``noise_left_out`` is DP-SGD with the classic bug: the ledger accounts for noise
multiplier ``sigma`` but no noise is added. ``correct`` is the same procedure without the
bug. Both start every run from the same initial weights (the auditor's choice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

import modelshield.privacy.dp as dp
from modelshield.core.architectures import mlp
from modelshield.privacy.accounting import compute_epsilon

# (epochs, expected batch, lr, noise multiplier): one run with hundreds of canaries;
# many runs on 60 examples
ONE_RUN = (80, 50, 4.0, 12.0)
MANY_RUNS = (30, 20, 1.0, 20.0)
Setting = tuple[int, int, float, float]


def claimed_epsilon(n: int, setting: Setting = ONE_RUN, delta: float = 1e-5) -> float:
    """What the (buggy or not) ledger claims for a run on ``n`` examples."""
    epochs, batch, _, sigma = setting
    cfg = dp.DPConfig(noise_multiplier=sigma, epochs=epochs, batch_size=batch)
    q, steps = dp.plan_steps(cfg, n)
    return compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)


@contextlib.contextmanager
def _without_noise() -> Iterator[None]:
    original = dp.build_engine

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        engine = original(*args, **kwargs)
        engine.optimizer.noise_multiplier = 0.0  # the bug: accounted for, never added
        return engine

    dp.build_engine = build
    try:
        yield
    finally:
        dp.build_engine = original


def _train(
    x: torch.Tensor, y: torch.Tensor, seed: int, *, bug: bool, setting: Setting
) -> nn.Module:
    epochs, batch, lr, sigma = setting
    torch.manual_seed(0)
    module = mlp(tuple(x.shape[1:]), num_classes=3)  # the tests use 3-class data
    cfg = dp.DPConfig(
        noise_multiplier=sigma, epochs=epochs, batch_size=batch, lr=lr, mode="hooks", seed=seed
    )
    with _without_noise() if bug else contextlib.nullcontext():
        return dp.train_dp(module, x, y, cfg, num_classes=3, account_epochs=False).module


def noise_left_out(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    return _train(x, y, seed, bug=True, setting=ONE_RUN)


def correct(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    return _train(x, y, seed, bug=False, setting=ONE_RUN)


def noise_left_out_many(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    return _train(x, y, seed, bug=True, setting=MANY_RUNS)


def correct_many(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    return _train(x, y, seed, bug=False, setting=MANY_RUNS)


def bn_net() -> nn.Module:
    """A small CNN with BatchNorm (DP-SGD must replace it) for 1x6x6 inputs, 3 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
