"""FGSM and PGD: closed forms on linear models and the attack contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.oracle import from_classifier
from modelshield.core.threat import LpThreat, QueryAccess
from modelshield.evasion import ATTACKS, _lp, fgsm, pgd


def linear_binary(w: torch.Tensor, b: float = 0.0) -> nn.Module:
    """Logits (0, w·x + b): class 1 iff w·x + b > 0."""
    lin = nn.Linear(len(w), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = w
        lin.bias[1] = b
    return lin


@pytest.fixture
def toy():
    torch.manual_seed(0)
    w = torch.randn(6)
    model = from_torch(linear_binary(w), input_shape=(6,))
    x = torch.rand(64, 6) * 0.6 + 0.2
    y = model.predict(x)
    return model, w, x, y


def test_fgsm_linf_is_eps_sign_w(toy) -> None:
    model, w, x, y = toy
    eps = 0.05
    r = fgsm(model, x, y, threat=LpThreat("linf", eps))
    delta = r.x_adv - x
    expected = eps * torch.sign(w)[None] * torch.where(y == 1, -1.0, 1.0)[:, None]
    assert torch.allclose(delta, expected, atol=1e-6)


def test_fgsm_l2_is_eps_w_over_norm(toy) -> None:
    model, w, x, y = toy
    eps = 0.1
    r = fgsm(model, x, y, threat=LpThreat("l2", eps))
    expected = eps * (w / w.norm())[None] * torch.where(y == 1, -1.0, 1.0)[:, None]
    assert torch.allclose(r.x_adv - x, expected, atol=1e-6)


def test_pgd_l2_finds_points_beyond_the_hyperplane_distance(toy) -> None:
    """A point is L2-attackable iff its distance |w·x|/||w|| to the boundary is below eps."""
    model, w, x, y = toy
    dist = (x @ w).abs() / w.norm()
    eps = float(dist.median())
    r = pgd(model, x, y, threat=LpThreat("l2", eps), steps=50)
    margin = 0.05 * eps
    assert r.success[dist < eps - margin].all()
    assert not r.success[dist > eps + margin].any()


def test_pgd_targeted_needs_target_and_reaches_it(toy) -> None:
    model, _, x, y = toy
    with pytest.raises(InvalidConfigError):
        pgd(model, x, y, threat=LpThreat("linf", 0.3, targeted=True))
    target = 1 - y
    r = pgd(model, x, y, threat=LpThreat("linf", 1.0, targeted=True), target=target)
    assert r.success.all()
    assert torch.equal(model.predict(r.x_adv), target)


def make_models():
    torch.manual_seed(1)
    flat = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    conv = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)
    )
    return [
        (from_torch(flat, input_shape=(12,)), (12,)),
        (from_torch(conv, input_shape=(2, 4, 4)), (2, 4, 4)),
    ]


CASES = [
    (name, norm)
    for name in sorted(ATTACKS.names())
    for norm in ("linf", "l2", "l1")
    if norm in ATTACKS.get(name).norms
]


@pytest.mark.parametrize(("name", "norm"), CASES)
@pytest.mark.parametrize("which", [0, 1])
def test_attack_contract(name: str, norm: str, which: int) -> None:
    """Every registered attack: within eps, in bounds, success = model's verdict, deterministic."""
    model, shape = make_models()[which]
    spec = ATTACKS.get(name)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, *shape, generator=g, dtype=torch.float64).float()
    y = torch.randint(0, 3, (20,), generator=g)
    eps = {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm]
    threat = LpThreat(norm, eps)
    kwargs: dict = {}
    if name.startswith("autoattack"):
        kwargs["scale_steps"] = 0.05  # the members' steps and queries, scaled down
    elif "steps" in spec.fn.__code__.co_varnames:
        kwargs["steps"] = 10
    if spec.access == "white-box":
        target = model
    else:
        access = QueryAccess(output="label" if spec.access == "label" else "logits")
        target = from_classifier(model, access)
        kwargs["max_queries"] = 200
    r1 = spec(target, x, y, threat=threat, seed=11, **kwargs)
    if spec.access != "white-box":
        target = from_classifier(model, access)
    r2 = spec(target, x, y, threat=threat, seed=11, **kwargs)
    assert r1.x_adv.shape == x.shape and r1.x_adv.dtype == x.dtype and r1.x_adv.device == x.device
    assert (_lp.lp_norm(r1.x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert r1.x_adv.min() >= 0 and r1.x_adv.max() <= 1
    assert torch.equal(r1.success, model.predict(r1.x_adv).cpu() != y)
    assert torch.equal(r1.x_adv, r2.x_adv)
    assert torch.allclose(r1.distance, _lp.lp_norm(r1.x_adv - x, norm))
    assert r1.queries is not None and r1.queries.shape == (20,) and (r1.queries >= 0).all()


def test_attacks_reject_bad_input(toy) -> None:
    model, _, x, y = toy
    with pytest.raises(DataError, match="outside bounds"):
        pgd(model, x + 2, y, threat=LpThreat())
    with pytest.raises(DataError, match="labels"):
        pgd(model, x, y + 5, threat=LpThreat())
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fgsm(model, bad, y, threat=LpThreat())
    with pytest.raises(DataError, match="shape"):
        pgd(model, x[:, :3], y, threat=LpThreat())
    with pytest.raises(InvalidConfigError):
        pgd(model, x, y, threat=LpThreat(), steps=0)


def test_pgd_at_least_as_strong_as_fgsm() -> None:
    model, shape = make_models()[0]
    x = torch.rand(200, *shape, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    t = LpThreat("linf", 0.05)
    assert (
        pgd(model, x, y, threat=t, steps=20).robust_accuracy
        <= fgsm(model, x, y, threat=t).robust_accuracy
    )
