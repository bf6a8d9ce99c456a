"""APGD (Croce & Hein 2020): schedule and losses by hand, closed forms, torchattacks alongside."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.threat import LpThreat
from modelshield.evasion import ATTACKS, _lp, apgd_ce, apgd_dlr, apgd_t, pgd
from modelshield.evasion.apgd import checkpoints, dlr_loss, dlr_targeted_loss

SLACK = 0.005  # 0.5 percentage points


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and spares a loaded machine oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- schedule and losses, by hand ---------------------------------------------------------------
def test_checkpoints_follow_the_paper_for_100_steps() -> None:
    # p: 0, .22, then steps of max(prev step - .03, .06): +.19 +.16 +.13 +.10 +.07 +.06 +.06
    # -> .41 .57 .70 .80 .87 .93 .99 (next 1.05 > 1 stops); w = ceil(100 p). Summed in
    # floats, p_3 is 0.5700000000000001 and the ceiling would wrongly give 58.
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_checkpoints_ceil_is_exact_and_repeats_drop() -> None:
    # N=10: ceil(2.2, 4.1, 5.7, 7.0, 8.0, 8.7, 9.3, 9.9) = 3 5 6 7 8 9 10 10, the repeat
    # dropped (floats would give 8 for 7.0: p_4 sums to 0.7000000000000001)
    assert checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(1) == [0, 1]
    assert checkpoints(1000)[:4] == [0, 220, 410, 570]


def test_dlr_losses_by_hand() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    # sorted 3, 1, 0, -1: z_π1 - z_π3 = 3
    assert torch.allclose(dlr_loss(z, torch.tensor([0, 2])), torch.tensor([-2 / 3, 1.0]))
    # y=0, t=3: -(3 - (-1)) / (3 - (0 + -1)/2) = -4/3.5 ; y=2, t=0: -(0 - 3)/3.5
    got = dlr_targeted_loss(z, torch.tensor([0, 2]), torch.tensor([3, 0]))
    assert torch.allclose(got, torch.tensor([-8 / 7, 6 / 7]))
    # three classes: z_π4 is taken as z_π3, so the scale is z_π1 - z_π3 = 3
    z3 = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(
        dlr_targeted_loss(z3, torch.tensor([1]), torch.tensor([2])), torch.tensor([-1 / 3])
    )


def test_dlr_is_shift_and_scale_invariant_and_needs_three_classes() -> None:
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y, t = torch.arange(8) % 10, (torch.arange(8) + 3) % 10
    assert torch.allclose(dlr_loss(z, y), dlr_loss(4 * z - 2, y), atol=1e-5)
    assert torch.allclose(dlr_targeted_loss(z, y, t), dlr_targeted_loss(4 * z - 2, y, t), atol=1e-5)
    with pytest.raises(InvalidConfigError, match="at least 3 classes"):
        dlr_loss(torch.zeros(2, 2), torch.tensor([0, 1]))


# -- closed forms on a linear model -------------------------------------------------------------
def linear3(w: torch.Tensor) -> nn.Module:
    """Logits (0, w·x, -10): class 1 iff w·x > 0; class 2 never wins near the data."""
    lin = nn.Linear(len(w), 3)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
        lin.weight[1] = w
    return lin


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_succeeds_exactly_within_the_distance_to_a_hyperplane(name: str, norm: str) -> None:
    """Distance to w·x = 0 is |w·x|/||w||_1 in L∞ and |w·x|/||w||_2 in L2 (box not binding)."""
    torch.manual_seed(0)
    w = torch.randn(6)
    model = from_torch(linear3(w), input_shape=(6,))
    x = torch.rand(64, 6) * 0.4 + 0.3
    y = model.predict(x)
    dist = (x @ w).abs() / w.norm(p=1 if norm == "linf" else 2)
    eps = float(dist.median())
    r = ATTACKS.get(name)(model, x, y, threat=LpThreat(norm, eps), steps=30)
    margin = 0.03 * eps
    assert r.success[dist < eps - margin].all()
    assert not r.success[dist > eps + margin].any()


class Bump(nn.Module):
    """Logits (2, -50·||x - c||², -100): never fooled; every loss peaks at ``x = c``."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = ((x - self.c) ** 2).sum(1)
        return torch.stack([2 + 0 * d, -50 * d, -100 + 0 * d], 1)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.2)])
def test_step_halving_homes_in_on_an_interior_maximum(name: str, norm: str, eps: float) -> None:
    """With the step fixed at 2ε the iterates bounce around the peak by ~ε; halving finds it."""
    c = torch.full((1, 5), 0.5)
    x = c - 0.5 * _lp.sample_ball((16, 5), norm, eps, generator=torch.Generator().manual_seed(0))
    model = from_torch(Bump(c), input_shape=(5,))
    y = torch.zeros(16, dtype=torch.long)
    r = ATTACKS.get(name)(model, x, y, threat=LpThreat(norm, eps), steps=100)
    assert not r.success.any()
    assert (_lp.lp_norm(r.x_adv - c, norm) < 0.05 * eps).all()


# -- a small trained model, side by side with torchattacks ---------------------------------------
@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, Classifier, torch.Tensor, torch.Tensor]:
    """An MLP on scikit-learn digits (1×8×8 in [0, 1]), ~96% test accuracy, not robust."""
    d = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(d), generator=g)
    train, test = perm[:1200], perm[1200:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(d.x[train]), d.y[train]).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = from_torch(net, input_shape=(1, 8, 8))
    x, y = d.x[test], d.y[test]
    assert model.accuracy(x, y) > 0.9
    return net, model, x, y


def torchattacks_robust_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, atk) -> float:
    with torch.random.fork_rng():  # torchattacks seeds the global generator
        adv = atk(x, y)
    with torch.no_grad():
        return float((net(adv).argmax(1) == y).float().mean())


CASES = [  # robust accuracy lands between ~25% and ~75% at these radii
    ("apgd-ce", "linf", 0.07),
    ("apgd-dlr", "linf", 0.07),
    ("apgd-t", "linf", 0.07),
    ("apgd-ce", "linf", 0.1),
    ("apgd-ce", "l2", 0.5),
]


@pytest.mark.parametrize(("name", "norm", "eps"), CASES)
def test_as_strong_as_torchattacks(digits, name: str, norm: str, eps: float) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    net, model, x, y = digits
    steps = 100
    ours = ATTACKS.get(name)(model, x, y, threat=LpThreat(norm, eps), steps=steps, seed=0)
    tnorm = {"linf": "Linf", "l2": "L2"}[norm]
    if name == "apgd-t":
        atk = torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=steps, n_classes=10, seed=0)
    else:
        loss = name.removeprefix("apgd-")
        atk = torchattacks.APGD(net, norm=tnorm, eps=eps, steps=steps, loss=loss, seed=0)
    theirs = torchattacks_robust_accuracy(net, x, y, atk)
    assert 0.2 < theirs < 0.8, "the radius should leave a comparison that means something"
    assert ours.robust_accuracy <= theirs + SLACK, (ours.robust_accuracy, theirs)


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.07), ("l2", 0.5), ("l1", 2.0)])
def test_apgd_ce_at_least_as_strong_as_pgd(digits, norm: str, eps: float) -> None:
    _, model, x, y = digits
    t = LpThreat(norm, eps)
    ours = apgd_ce(model, x, y, threat=t, steps=50).robust_accuracy
    theirs = pgd(model, x, y, threat=t, steps=50).robust_accuracy
    assert ours <= theirs + SLACK
    if norm == "l1":  # the box-aware sparse step: PGD-L1 wastes steps on saturated pixels
        assert ours < theirs - 0.1, (ours, theirs)


def test_apgd_t_targeted_reaches_the_target(digits) -> None:
    _, model, x, y = digits
    x, y = x[:60], y[:60]
    target = (y + 1) % 10
    r = apgd_t(model, x, y, threat=LpThreat("linf", 0.3, targeted=True), target=target, steps=30)
    assert r.success.float().mean() > 0.9
    assert torch.equal(r.success, model.predict(r.x_adv) == target)


def test_restarts_keep_fooled_points_and_queries_count_passes(digits) -> None:
    _, model, x, y = digits
    t = LpThreat("linf", 0.05)
    one = apgd_ce(model, x, y, threat=t, steps=20, seed=0)
    three = apgd_ce(model, x, y, threat=t, steps=20, restarts=3, seed=0)
    assert bool((three.success >= one.success).all())
    # 1 clean pass + (start + 20 steps) per restart + 2 in the guard, for the unbroken points
    assert (three.queries[~three.success] == 1 + 3 * 21 + 2).all()
    assert (one.queries <= 1 + 21 + 2).all()
    r = apgd_t(model, x, y, threat=t, steps=20, n_target_classes=3)
    assert r.config["n_target_classes"] == 3
    assert (r.queries[~r.success] == 1 + 3 * 21 + 2).all()


# -- configuration errors -----------------------------------------------------------------------
def test_bad_configuration_is_rejected(digits) -> None:
    _, model, x, y = digits
    x, y = x[:4], y[:4]
    t = LpThreat("linf", 0.05)
    for kwargs in ({"steps": 0}, {"restarts": 0}, {"steps": 2.5}, {"l1_sparsity": 1.5}):
        with pytest.raises(InvalidConfigError):
            apgd_ce(model, x, y, threat=t, **kwargs)
    with pytest.raises(InvalidConfigError, match="n_target_classes"):
        apgd_t(model, x, y, threat=t, n_target_classes=0)
    targeted = LpThreat("linf", 0.05, targeted=True)
    with pytest.raises(InvalidConfigError, match="untargeted"):
        apgd_dlr(model, x, y, threat=targeted)
    with pytest.raises(InvalidConfigError, match="target"):
        apgd_t(model, x, y, threat=targeted)
    with pytest.raises(InvalidConfigError, match="targeted threat"):
        apgd_t(model, x, y, threat=t, target=y)
    with pytest.raises(DataError, match="target"):
        apgd_t(model, x, y, threat=targeted, target=y[:2])
    with pytest.raises(DataError, match="target labels"):
        apgd_t(model, x, y, threat=targeted, target=y + 10)


def test_dlr_attacks_need_three_classes() -> None:
    model = from_torch(nn.Linear(4, 2), input_shape=(4,))
    x, y = torch.rand(5, 4), torch.zeros(5, dtype=torch.long)
    for attack in (apgd_dlr, apgd_t):
        with pytest.raises(InvalidConfigError, match="at least 3 classes"):
            attack(model, x, y, threat=LpThreat("linf", 0.1))
    assert apgd_ce(model, x, y, threat=LpThreat("linf", 0.1), steps=3).x_adv.shape == x.shape
