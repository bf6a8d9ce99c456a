"""Jacobian-based dataset augmentation (Papernot et al. 2017): budget and progress."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelshield.core.errors import InvalidConfigError, QueryBudgetExceeded
from modelshield.core.oracle import from_classifier
from modelshield.core.threat import QueryAccess
from modelshield.extraction import jacobian_augmentation
from modelshield.extraction.jacobian import jacobian_step
from tests.extraction import blob_victim


def _seed(n: int) -> torch.Tensor:
    return torch.rand(n, 6, generator=torch.Generator().manual_seed(5))


def test_augmentation_improves_on_the_seed_only_substitute_within_the_budget() -> None:
    clf, x_eval = blob_victim()
    oracle = from_classifier(clf, QueryAccess(output="label", max_queries=512))
    _, res = jacobian_augmentation(
        oracle, _seed(16), queries=512, lam=0.2, arch="mlp", x_eval=x_eval, victim=clf
    )
    assert oracle.queries_used == res.queries_used == 512  # never more, and all of it
    assert [r["queries"] for r in res.curve] == [16, 32, 64, 128, 256, 512]
    seed_only, final = res.curve[0]["fidelity"], res.curve[-1]["fidelity"]
    assert final >= seed_only + 0.1, res.curve
    assert res.details["labelled_points"] == 512 and res.details["substitute_epochs"] == 5


def test_a_budget_that_does_not_double_is_spent_exactly_and_rounds_cap_it() -> None:
    clf, _ = blob_victim()
    oracle = from_classifier(clf, QueryAccess(output="probs", max_queries=100))
    _, res = jacobian_augmentation(oracle, _seed(16), queries=100, epochs=2)
    assert oracle.queries_used == res.queries_used == 100
    assert [r["queries"] for r in res.curve] == [16, 32, 64, 100]
    assert res.curve[0]["fidelity"] is None  # no x_eval: nothing measured
    oracle = from_classifier(clf, QueryAccess(output="label"))
    _, res = jacobian_augmentation(oracle, _seed(10), queries=1000, rounds=2, epochs=1, tau=1)
    assert oracle.queries_used == res.queries_used == 40
    assert res.config["tau"] == 1


def test_jacobian_step_moves_by_lambda_along_the_sign_and_stays_in_bounds() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]]))
    x = torch.tensor([[0.5, 0.5, 0.5], [0.95, 0.02, 0.5]])
    labels = torch.tensor([0, 0])
    new = jacobian_step(net, x, labels, 0.1, (0.0, 1.0), torch.device("cpu"))
    # d log softmax_0 / dx has the sign of w_0 - w_1 = (2, -4, 1)
    torch.testing.assert_close(new[0], torch.tensor([0.6, 0.4, 0.6]))
    torch.testing.assert_close(new[1], torch.tensor([1.0, 0.0, 0.6]))  # clipped


def test_errors_spend_nothing() -> None:
    clf, _ = blob_victim()
    oracle = from_classifier(clf, QueryAccess(output="label", max_queries=50))
    with pytest.raises(QueryBudgetExceeded):
        jacobian_augmentation(oracle, _seed(16), queries=64)
    with pytest.raises(InvalidConfigError, match="seed set"):
        jacobian_augmentation(oracle, _seed(40), queries=30)
    with pytest.raises(InvalidConfigError, match="lam"):
        jacobian_augmentation(oracle, _seed(4), queries=30, lam=0)
    assert oracle.queries_used == 0
