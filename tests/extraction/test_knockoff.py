"""Knockoff Nets (Orekondy et al. 2019) against a digits MLP: fidelity, budget, access."""

from __future__ import annotations

import pytest
import torch

from modelshield.core.errors import InvalidConfigError, QueryBudgetExceeded
from modelshield.core.oracle import Oracle, from_classifier
from modelshield.core.results import ExtractionResult
from modelshield.core.threat import QueryAccess
from modelshield.extraction import EXTRACTION_ATTACKS, knockoff
from modelshield.extraction.knockoff import AdaptiveSampler, kmeans
from tests.extraction import digits_victim

CHANCE = 0.1  # ten classes


def _oracle(output: str = "probs", budget: int | None = None) -> Oracle:
    clf, _, _ = digits_victim()
    return from_classifier(clf, QueryAccess(output=output, max_queries=budget))  # type: ignore[arg-type]


def test_random_knockoff_with_probabilities_copies_the_model() -> None:
    clf, pool, held = digits_victim()
    oracle = _oracle(budget=400)
    copy, res = knockoff(
        oracle, pool.x, queries=400, arch="mlp", x_eval=held.x, y_eval=held.y, victim=clf
    )
    assert oracle.queries_used == res.queries_used == 400  # exactly the budget
    assert [r["queries"] for r in res.curve] == [25, 50, 100, 200, 400]
    fids = [r["fidelity"] for r in res.curve]
    assert fids[-1] >= 0.85 and fids[-1] > 8 * CHANCE
    assert fids[-1] >= fids[0] + 0.1  # more queries, a closer copy (not asserted step by step)
    assert res.details["soft_labels"] is True and res.victim_accuracy is not None
    assert res.accuracy is not None and abs(res.accuracy - res.victim_accuracy) < 0.1
    agree = (copy(held.x).argmax(1) == clf.predict(held.x)).float().mean()
    assert float(agree) == pytest.approx(res.fidelity)
    back = ExtractionResult.from_json(res.to_json())
    assert back.fidelity == res.fidelity and back.curve == res.curve


def test_label_only_access_trains_on_hard_labels() -> None:
    clf, pool, held = digits_victim()
    oracle = _oracle("label", budget=300)
    _, res = knockoff(
        oracle, pool.x, queries=300, arch="mlp", checkpoints=[100], x_eval=held.x, victim=clf
    )
    assert oracle.queries_used == res.queries_used == 300
    assert [r["queries"] for r in res.curve] == [100, 300]
    assert res.details["soft_labels"] is False and res.fidelity >= 0.75
    assert res.accuracy is None  # no y_eval


@pytest.mark.parametrize("use_labels", [True, False])
def test_adaptive_strategy_spends_exactly_the_budget(use_labels: bool) -> None:
    clf, pool, held = digits_victim()
    oracle = _oracle(budget=250)
    _, res = knockoff(
        oracle,
        pool.x,
        queries=250,
        strategy="adaptive",
        pool_labels=pool.y if use_labels else None,
        n_actions=6,
        arch="mlp",
        checkpoints=[90],
        x_eval=held.x,
        victim=clf,
        seed=1,
    )
    assert oracle.queries_used == res.queries_used == 250
    bandit = res.details["bandit"]
    assert sum(bandit["counts"]) == 250
    assert len(bandit["actions"]) == (10 if use_labels else 6)
    assert res.details["action_source"].startswith("pool labels" if use_labels else "k-means")
    assert sum(bandit["policy"]) == pytest.approx(1.0, abs=1e-4)
    assert res.fidelity > 5 * CHANCE


def test_gradient_bandit_moves_towards_the_rewarding_action() -> None:
    # two actions; answers from action 1 are always confident (certainty reward 1), from
    # action 0 always uniform (0): the preference of action 1 must grow
    actions = torch.tensor([0] * 50 + [1] * 50)
    sampler = AdaptiveSampler(
        actions, reward="certainty", generator=torch.Generator().manual_seed(0)
    )
    for _ in range(6):
        _, acts = sampler.draw(8)
        answers = torch.stack(
            [torch.tensor([1.0, 0.0]) if a == 1 else torch.tensor([0.5, 0.5]) for a in acts]
        )
        sampler.update(acts, answers, torch.full((len(acts), 2), 0.5))
    pi = sampler.policy()
    assert float(pi[1]) > 0.6 and float(sampler.h[1]) > float(sampler.h[0])
    left = [i for bucket in sampler.buckets for i in bucket]
    assert len(set(left)) == len(left) == 100 - 48  # drawn without replacement


def test_kmeans_separates_obvious_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 2, generator=g) + 10, torch.randn(30, 2, generator=g) - 10])
    labels = kmeans(x, 2, torch.Generator().manual_seed(1))
    assert len(set(labels[:30].tolist())) == 1 and labels[0] != labels[-1]


def test_same_seed_same_copy_and_evaluation_is_not_charged() -> None:
    _, pool, held = digits_victim()
    runs = []
    for _ in range(2):
        oracle = _oracle(budget=60)
        # the attacked oracle itself labels the evaluation set, outside the budget
        copy, res = knockoff(
            oracle, pool.x, queries=60, arch="mlp", epochs=2, x_eval=held.x, victim=oracle
        )
        assert oracle.queries_used == res.queries_used == 60
        assert res.details["eval_queries"] == len(held.x)
        runs.append((copy.state_dict(), res.curve))
    for k, v in runs[0][0].items():
        torch.testing.assert_close(v, runs[1][0][k], rtol=0, atol=0)
    assert runs[0][1] == runs[1][1]


def test_budget_and_argument_errors_spend_nothing() -> None:
    _, pool, _ = digits_victim()
    oracle = _oracle(budget=50)
    with pytest.raises(QueryBudgetExceeded, match="50"):
        knockoff(oracle, pool.x, queries=100)
    assert oracle.queries_used == 0
    oracle = _oracle()
    with pytest.raises(InvalidConfigError, match="exceeds the pool"):
        knockoff(oracle, pool.x[:10], queries=11)
    with pytest.raises(InvalidConfigError, match="strategy"):
        knockoff(oracle, pool.x, queries=10, strategy="greedy")
    with pytest.raises(InvalidConfigError, match="checkpoints"):
        knockoff(oracle, pool.x, queries=10, checkpoints=[20])
    with pytest.raises(InvalidConfigError, match="queries"):
        knockoff(oracle, pool.x, queries=0)
    assert oracle.queries_used == 0


def test_label_only_oracle_of_unknown_width_needs_num_classes() -> None:
    clf, pool, held = digits_victim()

    class Labels(Oracle):
        raw_output = "label"

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            return clf.predict(x)

    oracle = Labels(QueryAccess(output="label"), input_shape=(1, 8, 8))
    with pytest.raises(InvalidConfigError, match="num_classes"):
        knockoff(oracle, pool.x, queries=20)
    _, res = knockoff(
        oracle, pool.x, queries=40, num_classes=10, epochs=1, checkpoints=[], x_eval=held.x
    )
    assert res.queries_used == 40 and res.details["num_classes"] == 10
    assert EXTRACTION_ATTACKS.get("knockoff") is knockoff
    assert EXTRACTION_ATTACKS.kind == "extraction-attacks"
    assert EXTRACTION_ATTACKS.names() == ["equation", "jacobian", "knockoff"]
