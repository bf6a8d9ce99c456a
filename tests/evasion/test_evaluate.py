"""Robustness evaluation, the ensemble and the self-checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import InvalidConfigError
from modelshield.core.threat import LpThreat
from modelshield.evasion import autoattack_fast, checks, evaluate_robustness, pgd


@pytest.fixture(scope="module")
def blobs():
    """A 3-class MLP on close Gaussian blobs: clean accuracy ~1, broken by moderate eps."""
    g = torch.Generator().manual_seed(0)
    n = 300
    y = torch.arange(n) % 3
    centers = 0.5 + 0.08 * torch.randn(3, 20, generator=g)
    x = (centers[y] + 0.05 * torch.randn(n, 20, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return from_torch(net.eval(), input_shape=(20,)), x, y


def test_curve_is_per_sample_worst_case(blobs) -> None:
    model, x, y = blobs
    grid = [0.01, 0.03, 0.06]
    res = evaluate_robustness(model, x, y, eps_grid=grid, attack="autoattack-fast")
    assert res.robust.shape == (len(x), 3)
    # robust at a larger eps implies robust at every smaller one, and clean-correct
    assert (res.robust[:, 1:] <= res.robust[:, :-1]).all()
    assert (res.robust[:, 0] <= res.clean_correct).all()
    accs = res.robust_accuracy
    assert accs == sorted(accs, reverse=True) and accs[-1] < res.clean_accuracy
    for acc, (lo, hi) in zip(accs, res.ci, strict=True):
        assert lo <= acc <= hi
    # each eps's robust points survive a fresh PGD at that eps, but for a few borderline
    # points that any randomised attack breaks for some seeds and not others
    for k, eps in enumerate(grid):
        idx = res.robust[:, k].nonzero().squeeze(1)
        again = pgd(model, x[idx], y[idx], threat=LpThreat("linf", eps), steps=50)
        assert int(again.success.sum()) <= max(2, 0.05 * len(idx))
    assert not res.flags, res.flags


def test_ensemble_no_weaker_than_its_members(blobs) -> None:
    model, x, y = blobs
    t = LpThreat("linf", 0.03)
    ens = autoattack_fast(model, x, y, threat=t)
    p = pgd(model, x, y, threat=t, steps=50)
    assert ens.robust_accuracy <= p.robust_accuracy + 0.005
    fooled_by = ens.config["fooled_by"]
    assert sum(fooled_by.values()) == int(ens.success.sum())


def test_checkpoint_resumes(blobs) -> None:
    model, x, y = blobs
    store: dict[str, dict] = {}
    calls: list[str] = []

    def cache(key, compute):
        if key not in store:
            calls.append(key)
            store[key] = compute()
        return store[key]

    a = evaluate_robustness(model, x, y, eps_grid=[0.02, 0.04], attack="pgd", checkpoint=cache)
    b = evaluate_robustness(model, x, y, eps_grid=[0.02, 0.04], attack="pgd", checkpoint=cache)
    assert len(calls) == 2 and torch.equal(a.robust, b.robust)


def test_bad_grid_and_attack(blobs) -> None:
    model, x, y = blobs
    with pytest.raises(InvalidConfigError):
        evaluate_robustness(model, x, y, eps_grid=[0.04, 0.02])
    with pytest.raises(InvalidConfigError):
        evaluate_robustness(model, x, y, eps_grid=[])


def test_check_flags_softmax_outputs(blobs) -> None:
    model, x, _ = blobs
    soft = from_torch(nn.Sequential(model.module, nn.Softmax(dim=1)), input_shape=(20,))
    assert checks.check_outputs(soft, x)
    assert not checks.check_outputs(model, x)


def test_check_flags_randomised_model(blobs) -> None:
    model, x, _ = blobs
    noisy = nn.Sequential(nn.Dropout(0.5), model.module)
    clf = from_torch(noisy, input_shape=(20,))
    clf.module.train()  # dropout active: two passes differ
    assert checks.check_randomness(clf, x)
    assert not checks.check_randomness(model, x)


class Quantize(nn.Module):
    """Rounds inputs: the forward pass works, every input gradient is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8) / 8


def test_check_flags_zero_gradients(blobs) -> None:
    model, x, y = blobs
    masked = from_torch(nn.Sequential(Quantize(), model.module), input_shape=(20,))
    flags, stats = checks.check_gradients(masked, x, y)
    assert flags and stats["zero_gradient_fraction"] == 1.0
    assert not checks.check_gradients(model, x, y)[0]


def test_monotone_and_blackbox_checks() -> None:
    assert checks.check_monotone([0.1, 0.2, 0.3], [0.8, 0.5, 0.6])
    assert not checks.check_monotone([0.1, 0.2], [0.8, 0.5])
    assert checks.check_blackbox_beats_whitebox(0.1, {"apgd-ce": 4, "square": 2}, {"square"}, 10)
    assert not checks.check_blackbox_beats_whitebox(
        0.1, {"apgd-ce": 4, "square": 0}, {"square"}, 10
    )
