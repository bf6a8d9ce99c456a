"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): closed forms, abstention, training.

References are independent of the code under test: the smoothed linear classifier's
``p_A = Φ(|w·x + b| / (σ‖w‖))`` in closed form, SciPy's normal and beta quantiles and
binomial test, and plain-Python recomputations of the certified accuracy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from scipy import stats
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.metrics import norm_ppf
from modelshield.core.results import Result
from modelshield.core.train import train_classifier
from modelshield.defenses.smoothing import (
    ABSTAIN,
    CertifyResult,
    SmoothedClassifier,
    binomial_test_two_sided,
    gaussian_augmentation_train,
    pa_lower_bound,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linear_binary(w: torch.Tensor, b: float = 0.0) -> nn.Module:
    """Logits (0, w·x + b): class 1 iff w·x + b > 0."""
    lin = nn.Linear(len(w), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = w
        lin.bias[1] = b
    return lin


class TiedThree(nn.Module):
    """Three classes on R²: logits (x0, -x0, |x1| - 1). At the origin under isotropic noise
    classes 0 and 1 are equally likely (symmetry in x0) and class 2 takes the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0], -x[:, 0], x[:, 1].abs() - 1.0], dim=1)


class BelowZero(nn.Module):
    """Class 1 iff some coordinate is negative: tells clamped from unclamped noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neg = (x < 0).any(dim=1).float()
        return torch.stack([1.0 - neg, neg], dim=1)


def phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


# -- the normal quantile and the binomial statistics ---------------------------------------------
def test_norm_ppf_matches_scipy_including_tails() -> None:
    grid = [5e-324, 1e-310, 1e-300, 1e-100, 1e-20, 1e-9, 1e-5, 0.001, 0.02425, 0.0243]
    grid += [i / 200 for i in range(1, 200)]
    grid += [0.97575, 0.999, 1 - 1e-9, 1 - 1e-15, 1 - 2**-53]
    grid += [10.0**-e for e in range(1, 320, 7)]
    for p in grid:
        ref = float(stats.norm.ppf(p))
        got = norm_ppf(p)
        assert abs(got - ref) <= 1e-9 * max(1.0, abs(ref)), (p, got, ref)
    assert norm_ppf(0.5) == 0.0
    assert norm_ppf(0.0) == -math.inf
    assert norm_ppf(1.0) == math.inf
    for bad in (-0.1, 1.1, float("nan"), True, "0.5"):
        with pytest.raises(InvalidConfigError):
            norm_ppf(bad)  # type: ignore[arg-type]


def test_statistics_match_scipy() -> None:
    for k, n, alpha in [(1, 10, 0.05), (51, 100, 0.001), (990, 1000, 0.001), (1000, 1000, 0.01)]:
        ref = float(stats.beta.ppf(alpha, k, n - k + 1))
        assert pa_lower_bound(k, n, alpha) == pytest.approx(ref, abs=1e-12)
    assert pa_lower_bound(0, 100, 0.001) == 0.0
    for n_a, n_b in [(60, 40), (40, 60), (55, 45), (900, 80), (7, 0), (1, 0)]:
        ref = stats.binomtest(n_a, n_a + n_b, 0.5).pvalue
        assert binomial_test_two_sided(n_a, n_b) == pytest.approx(ref, rel=1e-9, abs=1e-300)
    assert binomial_test_two_sided(50, 50) == 1.0
    assert binomial_test_two_sided(0, 0) == 1.0


# -- the closed form: a smoothed linear classifier ------------------------------------------------
def test_certified_radius_is_a_tight_lower_bound_on_a_linear_model() -> None:
    sigma, n, alpha, d = 0.5, 100_000, 0.001, 5
    g = torch.Generator().manual_seed(1)
    w = torch.randn(d, generator=g)
    b = 0.3
    wn = float(w.norm())
    p_true = [0.5, 0.501, 0.55, 0.6, 0.7, 0.8, 0.9, 0.99, 0.999]
    dist = [sigma * float(stats.norm.ppf(p)) for p in p_true]  # true radius
    signed = [t * s for t in dist for s in (1.0, -1.0)]
    z = torch.rand(len(signed), d, generator=g)
    z = z - ((z @ w + b) / wn**2)[:, None] * w  # onto the decision boundary
    x = z + torch.tensor(signed)[:, None] * (w / wn)
    model = from_torch(linear_binary(w, b), input_shape=(d,), num_classes=2)
    smoothed = SmoothedClassifier(model, sigma, batch_size=20_000)
    r = smoothed.certify(x, n0=1000, n=n, alpha=alpha, seed=0)
    assert r.radius is not None and r.prediction is not None and r.p_a_lower is not None

    margin = (x.double() @ w.double() + b) / wn  # signed distance to the boundary
    for i in range(len(x)):
        true_radius = abs(float(margin[i]))
        p_a = phi(true_radius / sigma)
        cp = float(stats.beta.ppf(alpha, p_a * n, n - p_a * n + 1))
        expected = sigma * float(stats.norm.ppf(cp)) if cp > 0.5 else 0.0
        gap = true_radius - expected
        got = float(r.radius[i])
        assert got <= true_radius + 1e-6, (i, got, true_radius)
        assert got >= true_radius - 3 * gap - 1e-3, (i, got, true_radius, gap)
        if expected > 0:
            assert int(r.prediction[i]) == int(margin[i] > 0), i
        else:  # p_A within Monte Carlo error of 1/2: the certificate must abstain
            assert int(r.prediction[i]) == ABSTAIN, (i, float(r.p_a_lower[i]))
            assert got == 0.0
    # p_A = 0.5 exactly (on the boundary) and the near-ties abstain
    assert r.prediction[:4].tolist() == [ABSTAIN] * 4


# -- abstention -------------------------------------------------------------------------------
def test_point_on_the_boundary_abstains() -> None:
    w = torch.tensor([1.0, -2.0, 0.5])
    model = from_torch(linear_binary(w), input_shape=(3,), num_classes=2)
    smoothed = SmoothedClassifier(model, 0.25)
    x = torch.zeros(8, 3)  # w·x + b = 0: p_A = 1/2 exactly
    r = smoothed.certify(x, n0=100, n=20_000, seed=3)
    assert r.prediction is not None and r.radius is not None and r.p_a_lower is not None
    assert r.prediction.tolist() == [ABSTAIN] * 8
    assert r.radius.tolist() == [0.0] * 8
    assert bool((r.p_a_lower <= 0.5).all())
    assert r.abstain_rate == 1.0
    assert smoothed.predict(x, n=2000, seed=3).tolist() == [ABSTAIN] * 8
    # one step off the boundary (distance 2σ, p_A ≈ 0.977) it answers
    far = (2 * 0.25) * (w / w.norm())
    assert smoothed.predict(far[None], n=2000).tolist() == [1]


def test_two_tied_classes_of_three_abstain_in_predict() -> None:
    model = from_torch(TiedThree(), input_shape=(2,), num_classes=3)
    smoothed = SmoothedClassifier(model, 1.0)
    x = torch.zeros(20, 2)
    counts = smoothed.sample_counts(x, 1000, torch.Generator().manual_seed(0))
    assert counts.sum(dim=1).tolist() == [1000] * 20
    assert bool((counts[:, 2] > 0).all())  # a real third class
    assert smoothed.predict(x, n=1000, alpha=0.001, seed=0).tolist() == [ABSTAIN] * 20
    # the same model away from the tie answers, so the abstentions above are earned
    away = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 5.0]])
    assert smoothed.predict(away, n=1000, seed=0).tolist() == [0, 1, 2]


def test_noise_is_not_clamped_to_bounds() -> None:
    model = from_torch(BelowZero(), input_shape=(4,), num_classes=2)
    smoothed = SmoothedClassifier(model, 0.5)
    x = torch.zeros(3, 4)  # at the lower bound: unclamped noise goes below it 15/16 of the time
    counts = smoothed.sample_counts(x, 4000, torch.Generator().manual_seed(0))
    frac = counts[:, 1].double() / 4000
    assert bool(((frac - 15 / 16).abs() < 0.02).all()), frac


# -- training on digits and the certified-accuracy curve --------------------------------------------
@dataclass
class DigitsRun:
    y: torch.Tensor
    base_correct: torch.Tensor
    gauss: CertifyResult
    plain: CertifyResult
    gauss_model: Classifier


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def digits_run() -> DigitsRun:
    sigma = 0.25
    train, test = load_dataset("digits").split(0.8, seed=0)
    test = test.subset(range(200))
    kw = {"epochs": 10, "lr": 3e-3, "batch_size": 64, "seed": 0}
    gauss = gaussian_augmentation_train(_mlp(0), train.x, train.y, sigma, **kw)
    plain = train_classifier(_mlp(0), train.x, train.y, **kw)
    results = []
    clfs = []
    for module in (gauss, plain):
        clf = from_torch(module, input_shape=(1, 8, 8), num_classes=10)
        sc = SmoothedClassifier(clf, sigma)
        results.append(sc.certify(test.x, n0=100, n=1000, alpha=0.001, seed=0, labels=test.y))
        clfs.append(clf)
    base_correct = clfs[0].predict(test.x) == test.y
    return DigitsRun(test.y, base_correct, results[0], results[1], clfs[0])


def test_gaussian_training_certifies_most_correct_points(digits_run: DigitsRun) -> None:
    r = digits_run.gauss
    assert r.radius is not None and r.prediction is not None
    ok = digits_run.base_correct
    assert float(ok.float().mean()) > 0.85
    certified = (r.radius > 0) & (r.prediction == digits_run.y)
    assert float(certified[ok].float().mean()) > 0.9
    # Noise training is what buys the radius: at r = 2σ it beats the same MLP trained
    # without noise, smoothed with the same σ, by a clear margin.
    (g_acc,) = r.certified_accuracy([0.5])
    (p_acc,) = digits_run.plain.certified_accuracy([0.5])
    assert g_acc > p_acc + 0.05, (g_acc, p_acc)


def test_certified_accuracy_curve(digits_run: DigitsRun) -> None:
    r = digits_run.gauss
    assert r.prediction is not None and r.radius is not None
    curve = r.curve(points=25)
    radii, acc = curve["radius"], curve["certified_accuracy"]
    assert len(radii) == len(acc) == 25
    assert radii[0] == 0.0
    assert radii[-1] == pytest.approx(0.25 * float(stats.norm.ppf(0.001 ** (1 / 1000))))
    assert all(a >= b for a, b in itertools.pairwise(acc))
    # at r = 0: the certified prediction's accuracy, abstentions counted wrong
    pred, y = r.prediction.tolist(), digits_run.y.tolist()
    assert acc[0] == pytest.approx(sum(p == t for p, t in zip(pred, y, strict=True)) / len(y))
    answered = [p != ABSTAIN for p in pred]
    assert acc[0] <= sum(answered) / len(y)
    assert 0 < acc[-1] < acc[0]
    # plain-Python reference on a few radii, y passed explicitly
    rad = r.radius.tolist()
    for q in (0.1, 0.33, 0.6):
        ref = sum(p == t and rr >= q for p, t, rr in zip(pred, y, rad, strict=True)) / len(y)
        assert r.certified_accuracy([q], digits_run.y) == [pytest.approx(ref)]


def test_certify_result_round_trips_through_json(digits_run: DigitsRun) -> None:
    r = digits_run.gauss
    back = Result.from_json(r.to_json())
    assert isinstance(back, CertifyResult)
    assert back.to_dict()["result_type"] == "certification"
    assert (back.sigma, back.n0, back.n, back.alpha) == (0.25, 100, 1000, 0.001)
    for name in ("prediction", "radius", "p_a_lower", "count_a", "labels"):
        assert torch.equal(getattr(back, name), getattr(r, name)), name
    assert back.certified_accuracy([0.2]) == r.certified_accuracy([0.2])


# -- determinism and validation -----------------------------------------------------------------
def test_same_seed_same_numbers(digits_run: DigitsRun) -> None:
    sc = SmoothedClassifier(digits_run.gauss_model, 0.25, batch_size=333)
    x = load_dataset("digits").x[:16]
    a = sc.certify(x, n0=50, n=500, seed=7)
    b = sc.certify(x, n0=50, n=500, seed=7)
    c = sc.certify(x, n0=50, n=500, seed=8)
    assert torch.equal(a.count_a, b.count_a) and torch.equal(a.radius, b.radius)
    assert not torch.equal(a.count_a, c.count_a)
    assert torch.equal(sc.predict(x, n=300, seed=5), sc.predict(x, n=300, seed=5))
    train = load_dataset("digits").subset(range(300))
    w1 = gaussian_augmentation_train(_mlp(1), train.x, train.y, 0.5, epochs=2, seed=3)
    w2 = gaussian_augmentation_train(_mlp(1), train.x, train.y, 0.5, epochs=2, seed=3)
    for p1, p2 in zip(w1.parameters(), w2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_gaussian_training_through_a_classifier_adds_noise_before_normalisation() -> None:
    train = load_dataset("digits").subset(range(300))
    clf = from_torch(_mlp(2), input_shape=(1, 8, 8), num_classes=10, mean=0.3, std=0.4)
    net = gaussian_augmentation_train(clf, train.x, train.y, 0.25, epochs=3, lr=3e-3)
    assert net is clf.module and not net.training
    assert clf.accuracy(train.x, train.y) > 0.8


@pytest.mark.parametrize("sigma", [0, -0.5, float("nan"), float("inf"), True, "0.25"])
def test_bad_sigma(sigma: object) -> None:
    model = from_torch(linear_binary(torch.ones(3)), input_shape=(3,), num_classes=2)
    with pytest.raises(InvalidConfigError, match="sigma"):
        SmoothedClassifier(model, sigma)  # type: ignore[arg-type]


def test_bad_arguments_raise_invalid_config() -> None:
    model = from_torch(linear_binary(torch.ones(3)), input_shape=(3,), num_classes=2)
    sc = SmoothedClassifier(model, 0.5)
    x = torch.zeros(2, 3)
    with pytest.raises(InvalidConfigError, match="batch_size"):
        SmoothedClassifier(model, 0.5, batch_size=0)
    for kwargs in ({"n": 0}, {"n": 1.5}, {"n": True}, {"alpha": 0.0}, {"alpha": 1.0}):
        with pytest.raises(InvalidConfigError):
            sc.predict(x, **kwargs)  # type: ignore[arg-type]
    for kwargs in ({"n0": 0}, {"n": -1}, {"alpha": 1.5}, {"alpha": -0.1}, {"seed": -1}):
        with pytest.raises(InvalidConfigError):
            sc.certify(x, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError):
        SmoothedClassifier(linear_binary(torch.ones(3)), 0.5)  # type: ignore[arg-type]
    with pytest.raises(DataError):
        sc.certify(torch.zeros(2, 4), n=10)
    with pytest.raises(DataError):
        sc.certify(x, n=10, labels=torch.tensor([0, 1, 1]))
    r = sc.certify(x, n0=10, n=10)
    with pytest.raises(DataError, match="labels"):
        r.certified_accuracy([0.0])
    with pytest.raises(InvalidConfigError):
        r.certified_accuracy([-1.0], torch.tensor([0, 1]))
    with pytest.raises(InvalidConfigError, match="points"):
        r.curve(torch.tensor([0, 1]), points=1)
    with pytest.raises(InvalidConfigError, match="sigma"):
        gaussian_augmentation_train(linear_binary(torch.ones(3)), x, torch.tensor([0, 1]), -1.0)
    with pytest.raises(InvalidConfigError, match="epochs"):
        gaussian_augmentation_train(
            linear_binary(torch.ones(3)), x, torch.tensor([0, 1]), 0.1, epochs=0
        )
