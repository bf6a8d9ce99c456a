"""Carlini–Wagner L2: closed forms on linear models, the eps cap, and torchattacks side by side."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelshield.core.architectures import mlp
from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.threat import LpThreat
from modelshield.core.train import train_classifier
from modelshield.evasion import ATTACKS, cw

D = 6


def linear_setup(
    bounds: tuple[float, float] = (0.0, 1.0), n: int = 64
) -> tuple[Classifier, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (0, w·x + b) with the boundary through the box's centre; inputs well inside.

    Returns the model, w, b (as a 0-d tensor), inputs and the model's own labels.
    """
    lo, hi = bounds
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g)
    b = -(w * (lo + hi) / 2).sum()
    lin = nn.Linear(D, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = w
        lin.bias[1] = b
    model = from_torch(lin, input_shape=(D,), bounds=bounds)
    x = lo + (hi - lo) * (0.3 + 0.4 * torch.rand(n, D, generator=g))
    return model, w, b, x, model.predict(x)


def big_eps(bounds: tuple[float, float]) -> float:
    """An L2 radius no point in the box can exceed: pure minimal distances."""
    return (bounds[1] - bounds[0]) * math.sqrt(D)


def foot_inside(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, bounds, shift=0.0):
    """Whether the point at (signed) hyperplane distance + shift along w lies inside the box."""
    lo, hi = bounds
    s = x @ w + b
    foot = x - ((s + torch.sign(s) * shift * w.norm()) / w.norm() ** 2)[:, None] * w
    margin = 0.02 * (hi - lo)
    return ((foot > lo + margin) & (foot < hi - margin)).all(dim=1)


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 2.0)])
def test_distance_is_the_hyperplane_distance(bounds) -> None:
    """Minimal L2 distance to the boundary of a linear binary classifier is |w·x+b|/‖w‖."""
    model, w, b, x, y = linear_setup(bounds)
    dist = (x @ w + b).abs() / w.norm()
    inside = foot_inside(x, w, b, bounds)
    assert inside.sum() >= 48
    r = cw(model, x, y, threat=LpThreat("l2", big_eps(bounds), bounds=bounds), steps=100)
    assert r.success.all()
    err = (r.distance - dist)[inside]
    assert (err.abs() <= 0.02 * dist[inside] + 1e-3).all(), err.abs().max()
    # no successful point can be closer than the true minimum
    assert (r.distance >= dist * (1 - 1e-4) - 1e-5).all()
    assert torch.equal(model.predict(r.x_adv), 1 - y)


def test_confidence_adds_kappa_over_norm_w() -> None:
    """With κ the nearest point has margin κ: distance (|w·x+b| + κ)/‖w‖."""
    model, w, b, x, y = linear_setup()
    kappa = 0.05 * float(w.norm())
    expected = ((x @ w + b).abs() + kappa) / w.norm()
    inside = foot_inside(x, w, b, (0.0, 1.0), shift=0.05)
    assert inside.sum() >= 40
    r = cw(model, x, y, threat=LpThreat("l2", big_eps((0, 1))), confidence=kappa)
    err = (r.distance - expected)[inside]
    assert (err.abs() <= 0.02 * expected[inside] + 1e-3).all(), err.abs().max()
    margin = (model.logits(r.x_adv) * torch.tensor([-1.0, 1.0])).sum(1).abs()
    assert (margin >= kappa * (1 - 1e-3)).all()


def test_targeted_reaches_target_at_the_same_distance() -> None:
    model, w, b, x, y = linear_setup()
    threat = LpThreat("l2", big_eps((0, 1)), targeted=True)
    with pytest.raises(InvalidConfigError, match="target"):
        cw(model, x, y, threat=threat)
    r = cw(model, x, y, threat=threat, target=1 - y)
    assert r.success.all()
    assert torch.equal(model.predict(r.x_adv), 1 - y)
    dist = (x @ w + b).abs() / w.norm()
    inside = foot_inside(x, w, b, (0.0, 1.0))
    assert ((r.distance - dist)[inside].abs() <= 0.02 * dist[inside] + 1e-3).all()


def test_eps_caps_the_minimal_point_and_returns_clean_inputs_beyond() -> None:
    model, w, b, x, y = linear_setup()
    dist = (x @ w + b).abs() / w.norm()
    eps = float(dist.median())
    r = cw(model, x, y, threat=LpThreat("l2", eps))
    near, far = dist < eps * 0.97, dist > eps
    assert r.success[near].all()
    assert not r.success[far].any()
    assert torch.equal(r.x_adv[~r.success], x[~r.success])  # clean, not a projected point
    assert (r.distance[~r.success] == 0).all()
    assert (r.distance[r.success] <= eps * (1 + 1e-6)).all()


def test_already_misclassified_points_need_no_perturbation() -> None:
    model, _, _, x, y = linear_setup()
    wrong = torch.arange(len(y)) % 4 == 0
    labels = torch.where(wrong, 1 - y, y)
    r = cw(model, x, labels, threat=LpThreat("l2", 1.0))
    assert r.success[wrong].all()
    assert torch.equal(r.x_adv[wrong], x[wrong])
    assert (r.distance[wrong] == 0).all()


def test_registration_and_bad_config() -> None:
    spec = ATTACKS.get("cw")
    assert spec.norms == ("l2",) and spec.minimal and spec.access == "white-box"
    model, _, _, x, y = linear_setup()
    with pytest.raises(InvalidConfigError, match="norm"):
        cw(model, x, y, threat=LpThreat("linf", 0.1))
    for kwargs in (
        {"steps": 0},
        {"binary_search_steps": 1.5},
        {"initial_const": 0.0},
        {"lr": -1.0},
        {"confidence": float("nan")},
    ):
        with pytest.raises(InvalidConfigError):
            cw(model, x, y, threat=LpThreat("l2", 1.0), **kwargs)


def test_side_by_side_with_torchattacks_on_digits() -> None:
    """On a digits MLP: success ≥ torchattacks' CW (c=1, no binary search, same steps) and
    median L2 of successful points ≤ theirs × 1.05, over all and over jointly fooled points."""
    torchattacks = pytest.importorskip("torchattacks")
    train, test = load_dataset("digits").split(0.7, seed=0)
    torch.manual_seed(0)
    net = train_classifier(
        mlp((1, 8, 8), 10, hidden=(64,)), train.x, train.y, epochs=30, lr=3e-3, seed=0
    )
    model = from_torch(net, input_shape=(1, 8, 8))
    x, y = test.x[:300], test.y[:300]
    assert model.accuracy(x, y) > 0.9
    ours = cw(model, x, y, threat=LpThreat("l2", 8.0), steps=100)  # 8 = sqrt(64): no cap
    adv = torchattacks.CW(net, c=1, kappa=0, steps=100, lr=0.01)(x, y)
    with torch.no_grad():
        theirs_ok = net(adv).argmax(dim=1) != y
    theirs_d = (adv - x).flatten(1).norm(dim=1)
    assert ours.success_rate >= float(theirs_ok.float().mean())
    assert ours.distance[ours.success].median() <= 1.05 * theirs_d[theirs_ok].median()
    both = ours.success & theirs_ok
    assert ours.distance[both].median() <= 1.05 * theirs_d[both].median()
