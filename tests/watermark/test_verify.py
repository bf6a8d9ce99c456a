"""Verification: the exact binomial p-value, white-box and label-only access, and a valid
null however skewed the model's predictions on the triggers are."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.oracle import from_classifier
from modelshield.core.threat import QueryAccess
from modelshield.watermark import WatermarkKey, binomial_p_value, matches_needed, verify


class _Constant(nn.Module):
    """Predicts one class whatever the input: the most skewed model there is."""

    def __init__(self, num_classes: int, cls: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.logits[cls] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class _KeyLookup(nn.Module):
    """A 'marked' model: answers the key's label for each trigger (by exact lookup)."""

    def __init__(self, key: WatermarkKey, agree: int) -> None:
        super().__init__()
        self.key = key
        self.x, self.y = key.trigger_set()
        self.agree = agree
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), self.key.num_classes)
        for i, row in enumerate(x):
            j = int((self.x.flatten(1) == row.flatten()).all(1).nonzero()[0])
            label = (
                int(self.y[j]) if j < self.agree else (int(self.y[j]) + 1) % self.key.num_classes
            )
            out[i, label] = 1.0
        return out + self.w


def _key(**kw: object) -> WatermarkKey:
    args: dict = {"seed": 99, "n": 100, "input_shape": (1, 4, 4), "num_classes": 10}
    args.update(kw)
    return WatermarkKey(**args)


@pytest.mark.parametrize(("n", "k"), [(1, 2), (10, 2), (20, 10), (100, 10), (100, 100), (500, 3)])
def test_p_value_is_the_exact_binomial_tail(n: int, k: int) -> None:
    from scipy.stats import binom

    for m in range(n + 1):
        ours = binomial_p_value(m, n, 1 / k)
        ref = float(binom.sf(m - 1, n, 1 / k))
        assert math.isclose(ours, ref, rel_tol=1e-9, abs_tol=1e-300), (m, n, k, ours, ref)
    assert binomial_p_value(0, n, 1 / k) == 1.0
    assert math.isclose(binomial_p_value(n, n, 1 / k), (1 / k) ** n, rel_tol=1e-9)


def test_matches_needed_is_the_threshold() -> None:
    for n, k, alpha in [(100, 10, 1e-6), (50, 2, 1e-3), (20, 100, 1e-6)]:
        m = matches_needed(n, 1 / k, alpha)
        assert m is not None
        assert binomial_p_value(m, n, 1 / k) < alpha <= binomial_p_value(m - 1, n, 1 / k)
    assert matches_needed(10, 0.5, 1e-6) is None  # 0.5**10 ~ 1e-3: too few triggers


def test_a_constant_model_is_not_a_false_positive_more_often_than_alpha() -> None:
    """The randomness is in the key's labels: even a model that sends every trigger to one
    class matches ~ Binomial(n, 1/K), so P[p <= alpha] <= alpha over random keys."""
    model = _Constant(10, 3)
    ps = torch.tensor([verify(model, _key(seed=s, n=20)).p_value for s in range(2000)])
    for alpha in (0.01, 0.05, 0.2):
        rate = float((ps <= alpha).double().mean())
        assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(ps)), (alpha, rate)
    assert float((ps <= 0.5).double().mean()) > 0.2  # and the test is not vacuous
    assert not any(verify(model, _key(seed=s)).verified for s in range(200))


def test_marked_model_verifies_by_every_kind_of_access() -> None:
    key = _key()
    marked = _KeyLookup(key, agree=60)
    clf = from_torch(marked, input_shape=key.input_shape, num_classes=10)
    label_only = from_classifier(clf, QueryAccess(output="label"))
    probs = from_classifier(clf, QueryAccess(output="probs", decimals=2))
    verdicts = [verify(marked, key), verify(clf, key), verify(label_only, key), verify(probs, key)]
    assert {v.matches for v in verdicts} == {60}
    assert {v.p_value for v in verdicts} == {binomial_p_value(60, 100, 0.1)}
    assert all(v.verified and v.trigger_accuracy == 0.6 and v.chance == 0.1 for v in verdicts)
    assert [v.access for v in verdicts] == [
        "white-box",
        "white-box",
        "label-only",
        "black-box (probs)",
    ]
    assert label_only.queries_used == key.n
    weak = verify(_KeyLookup(key, agree=15), key)
    assert not weak.verified and weak.matches == 15 and 0.01 < weak.p_value < 0.2
    assert weak.details["matches_needed"] == matches_needed(100, 0.1, 1e-6)
    lo, hi = verify(marked, key).details["trigger_accuracy_ci"]
    assert lo < 0.6 < hi


def test_significance_is_the_threshold() -> None:
    key = _key()
    v = verify(_KeyLookup(key, agree=25), key, significance=1e-3)
    assert v.verified == (v.p_value < 1e-3) and v.significance == 1e-3
    for bad in (0.0, 1.0, -1e-3, 2):
        with pytest.raises(InvalidConfigError, match="significance"):
            verify(_Constant(10, 0), key, significance=bad)


def test_label_only_budget_is_respected() -> None:
    key = _key()
    clf = from_torch(_Constant(10, 0), input_shape=key.input_shape, num_classes=10)
    oracle = from_classifier(clf, QueryAccess(output="label", max_queries=key.n - 1))
    with pytest.raises(QueryBudgetExceeded):
        verify(oracle, key)
    assert oracle.queries_used == 0


def test_a_key_for_another_model_is_refused() -> None:
    key = _key()
    other = from_torch(
        nn.Sequential(nn.Flatten(), nn.Linear(36, 10)), input_shape=(1, 6, 6), num_classes=10
    )
    with pytest.raises(DataError, match=r"shape \(1, 4, 4\)"):
        verify(other, key)
    with pytest.raises(UnsupportedModelError, match="does not accept"):
        verify(other.module, key)  # the bare module fails on the triggers
    with pytest.raises(InvalidConfigError, match="10-class"):
        verify(_Constant(3, 0), key)
    with pytest.raises(InvalidConfigError, match="10-class"):
        verify(from_classifier(from_torch(_Constant(3, 0), input_shape=(1, 4, 4))), key)
    with pytest.raises(UnsupportedModelError, match="cannot query"):
        verify(object(), key)


def test_verdict_round_trips_and_hides_the_seed() -> None:
    from modelshield.core.results import Result, WatermarkVerdict

    key = _key(seed=2**100 + 7)
    v = verify(_KeyLookup(key, agree=100), key)
    text = v.to_json()
    assert f"{key.seed:032x}" not in text and str(key.seed) not in text
    back = Result.from_json(text)
    assert isinstance(back, WatermarkVerdict) and back.p_value == v.p_value and back.verified
