"""Attribute inference (Fredrikson et al. 2014; learned, Mehnaz et al. 2022) vs a no-model baseline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.errors import DataError, InvalidConfigError, QueryBudgetExceeded
from modelshield.core.oracle import Oracle, from_classifier
from modelshield.core.results import Result
from modelshield.core.threat import QueryAccess
from modelshield.core.train import train_classifier
from modelshield.privacy.attribute import (
    AttributeInferenceResult,
    fredrikson_attribute_inference,
    learned_attribute_inference,
)

D = 9  # column 0 is the sensitive feature, values 0, 0.5, 1 with prior 0.5, 0.3, 0.2
VALUES = [0.0, 0.5, 1.0]
N_TARGETS = 300


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_table(n: int, leaky: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ``b(x)`` from the other features, shifted by the sensitive value when ``leaky``.

    Leaky: ``y = (b(x) + s) mod 3``, so a model that learned it reveals ``s`` given ``x`` and
    ``y``, while the baseline has to learn ``b`` from few auxiliary records. Not leaky:
    ``y = b(x)``, independent of ``s``; nothing beyond the prior is there to find.
    """
    x = torch.rand(n, D, generator=g)
    s = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
    x[:, 0] = s.float() / 2
    w = torch.randn(3, D - 1, generator=torch.Generator().manual_seed(7))
    b = (x[:, 1:] @ w.T).argmax(dim=1)
    return x, (b + s) % 3 if leaky else b


@dataclass
class Setup:
    model: Classifier
    x: torch.Tensor  # targets: training members
    y: torch.Tensor
    aux_x: torch.Tensor  # the attacker's population sample
    aux_y: torch.Tensor


def _setup(leaky: bool) -> Setup:
    g = torch.Generator().manual_seed(1)
    x, y = make_table(3000, leaky, g)
    aux_x, aux_y = make_table(200, leaky, g)
    net = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    train_classifier(net, x, y, epochs=40, lr=3e-3, seed=0)
    model = from_torch(net, input_shape=(D,), num_classes=3)
    assert model.accuracy(x, y) > 0.95
    return Setup(model, x[:N_TARGETS], y[:N_TARGETS], aux_x, aux_y)


@pytest.fixture(scope="module")
def leaky() -> Setup:
    return _setup(True)


@pytest.fixture(scope="module")
def harmless() -> Setup:
    return _setup(False)


def _run(attack, s: Setup, output: str = "probs", budget: int | None = None, **kw):
    oracle = from_classifier(s.model, QueryAccess(output=output, max_queries=budget))
    r = attack(oracle, s.x, s.y, sensitive=0, values=VALUES, aux_x=s.aux_x, aux_y=s.aux_y, **kw)
    return r, oracle


# measured (data seed 1; seeds 2-5 alike): leaky, fredrikson 0.99 (probs) / 0.98 (labels)
# vs baseline 0.89 and prior 0.46, advantage CI about [0.06, 0.14]; learned 0.94 / 0.93,
# CI [0.03, 0.09] / [0.02, 0.08]. Harmless: every accuracy equals the prior, advantage 0.
@pytest.mark.parametrize("output", ["probs", "label"])
def test_fredrikson_finds_the_leak(leaky: Setup, output: str) -> None:
    r, oracle = _run(fredrikson_attribute_inference, leaky, output)
    assert r.accuracy > 0.9
    assert r.advantage_ci[0] > 0.0
    assert r.advantage == pytest.approx(r.accuracy - r.baseline_accuracy)
    assert r.accuracy > r.prior_accuracy + 0.3
    extra = len(leaky.aux_x) if output == "label" else 0
    assert r.queries == N_TARGETS * len(VALUES) + extra == oracle.queries_used
    assert r.predicted is not None and r.predicted.shape == (N_TARGETS,)
    assert r.truth is not None and torch.equal(r.truth, (leaky.x[:, 0] * 2).round().long())


def test_learned_attack_finds_the_leak(leaky: Setup) -> None:
    r, oracle = _run(learned_attribute_inference, leaky)
    assert r.accuracy > 0.9
    assert r.advantage_ci[0] > 0.0
    assert r.queries == (N_TARGETS + len(leaky.aux_x)) * len(VALUES) == oracle.queries_used


def test_learned_attack_works_label_only(leaky: Setup) -> None:
    r, _ = _run(learned_attribute_inference, leaky, "label")
    assert r.accuracy > r.prior_accuracy + 0.3


@pytest.mark.parametrize("attack", [fredrikson_attribute_inference, learned_attribute_inference])
@pytest.mark.parametrize("output", ["probs", "label"])
def test_no_advantage_when_the_model_ignores_the_attribute(
    harmless: Setup, attack, output: str
) -> None:
    r, _ = _run(attack, harmless, output)
    assert abs(r.advantage) <= 0.05
    assert r.advantage_ci[0] <= 0.0 <= r.advantage_ci[1] + 1e-12
    assert abs(r.accuracy - r.prior_accuracy) <= 0.05


@pytest.mark.parametrize("attack", [fredrikson_attribute_inference, learned_attribute_inference])
def test_query_budget_is_never_exceeded(leaky: Setup, attack) -> None:
    small = 50
    with pytest.raises(QueryBudgetExceeded):
        _run(attack, leaky, budget=small)
    oracle = from_classifier(leaky.model, QueryAccess(output="probs", max_queries=small))
    with pytest.raises(QueryBudgetExceeded):
        attack(
            oracle,
            leaky.x,
            leaky.y,
            sensitive=0,
            values=VALUES,
            aux_x=leaky.aux_x,
            aux_y=leaky.aux_y,
        )
    assert oracle.queries_used == 0  # refused before spending anything
    exact = N_TARGETS * 3 if attack is fredrikson_attribute_inference else (N_TARGETS + 200) * 3
    r, oracle = _run(attack, leaky, budget=exact)
    assert oracle.queries_used == exact == r.queries


class SpyOracle(Oracle):
    """Records every input row the attack sends."""

    raw_output = "logits"

    def __init__(self, model: Classifier) -> None:
        super().__init__(QueryAccess(output="probs"), input_shape=(D,), num_classes=3)
        self.model = model
        self.seen: list[torch.Tensor] = []

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        with torch.no_grad():
            return self.model(x)


def test_true_value_never_reaches_the_model(leaky: Setup) -> None:
    spy = SpyOracle(leaky.model)
    r = fredrikson_attribute_inference(
        spy, leaky.x, leaky.y, sensitive=0, values=VALUES, aux_x=leaky.aux_x, aux_y=leaky.aux_y
    )
    sent = torch.cat(spy.seen)
    assert len(sent) == r.queries
    # every record is sent once with each candidate value, in order
    assert torch.equal(sent[:, 0], torch.tensor(VALUES).repeat(N_TARGETS))
    # scrambling the hidden values changes the score, never the guesses
    scrambled = leaky.x.clone()
    scrambled[:, 0] = scrambled[torch.randperm(N_TARGETS), 0]
    r2 = fredrikson_attribute_inference(
        SpyOracle(leaky.model),
        scrambled,
        leaky.y,
        sensitive=0,
        values=VALUES,
        aux_x=leaky.aux_x,
        aux_y=leaky.aux_y,
    )
    assert r.predicted is not None and r2.predicted is not None
    assert torch.equal(r.predicted, r2.predicted)


def test_continuous_attribute_is_binned() -> None:
    """A continuous sensitive feature, discretised into 4 bins represented by their centres."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1200, 4, generator=g)
    y = ((x[:, 0] + 0.3 * x[:, 1]) * 3).long().clamp(max=2)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    train_classifier(net, x, y, epochs=30, lr=1e-2, seed=0)
    oracle = from_classifier(from_torch(net, input_shape=(4,), num_classes=3))
    centres = [0.125, 0.375, 0.625, 0.875]
    r = fredrikson_attribute_inference(
        oracle, x[:200], y[:200], sensitive=0, values=centres, aux_x=x[1000:], aux_y=y[1000:]
    )
    assert r.truth is not None
    assert torch.equal(r.truth, (x[:200, 0] * 4).long().clamp(max=3))
    assert r.accuracy > r.prior_accuracy + 0.2


def test_result_round_trips(leaky: Setup) -> None:
    r, _ = _run(fredrikson_attribute_inference, leaky, n_boot=200)
    back = Result.from_json(r.to_json())
    assert isinstance(back, AttributeInferenceResult)
    assert back.result_type == "attribute-inference"
    assert back.accuracy == r.accuracy and back.advantage_ci == r.advantage_ci
    assert back.predicted is not None and torch.equal(back.predicted, r.predicted)
    assert "predicted" not in r.summary()
    again, _ = _run(fredrikson_attribute_inference, leaky, n_boot=200)
    assert again.advantage_ci == r.advantage_ci  # same seed, same interval


def test_bad_inputs_raise(leaky: Setup) -> None:
    oracle = from_classifier(leaky.model)
    base = dict(sensitive=0, values=VALUES, aux_x=leaky.aux_x, aux_y=leaky.aux_y)
    for change in (
        {"sensitive": D},
        {"sensitive": 1.5},
        {"values": [0.5]},
        {"values": [0.0, 0.0, 1.0]},
        {"values": [0.0, float("nan")]},
        {"confidence": 1.0},
        {"seed": -1},
    ):
        with pytest.raises(InvalidConfigError):
            fredrikson_attribute_inference(oracle, leaky.x, leaky.y, **{**base, **change})
    with pytest.raises(InvalidConfigError):
        fredrikson_attribute_inference(leaky.model, leaky.x, leaky.y, **base)  # type: ignore[arg-type]
    with pytest.raises(DataError):
        fredrikson_attribute_inference(oracle, leaky.x, leaky.y[:-1], **base)
    with pytest.raises(DataError):
        fredrikson_attribute_inference(
            oracle, leaky.x, leaky.y, **{**base, "aux_x": leaky.aux_x[:, :4]}
        )
    with pytest.raises(DataError):
        fredrikson_attribute_inference(oracle, leaky.x, leaky.y + 3, **base)
    with pytest.raises(InvalidConfigError):
        learned_attribute_inference(oracle, leaky.x, leaky.y, hidden=0, **base)
    assert oracle.queries_used == 0


def test_top_k_oracle_falls_back_to_the_prior(harmless: Setup) -> None:
    # top-1 probabilities: the known label often gets 0 for every value; guess the majority
    oracle = from_classifier(harmless.model, QueryAccess(output="probs", top_k=1))
    r = fredrikson_attribute_inference(
        oracle,
        harmless.x,
        harmless.y,
        sensitive=0,
        values=VALUES,
        aux_x=harmless.aux_x,
        aux_y=harmless.aux_y,
    )
    assert abs(r.accuracy - r.prior_accuracy) <= 0.05


def test_bootstrap_mean_ci_against_closed_forms() -> None:
    from modelshield.core.metrics import bootstrap_mean_ci

    assert bootstrap_mean_ci(torch.full((50,), 0.3)) == pytest.approx((0.3, 0.3))
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(4000, generator=g) < 0.4).double()
    lo, hi = bootstrap_mean_ci(v, n_boot=2000, generator=torch.Generator().manual_seed(1))
    half = 1.96 * float(v.std()) / 4000**0.5  # normal approximation
    assert lo == pytest.approx(float(v.mean()) - half, abs=0.004)
    assert hi == pytest.approx(float(v.mean()) + half, abs=0.004)
    with pytest.raises(InvalidConfigError):
        bootstrap_mean_ci(v, confidence=1.5)
