"""Equation solving (Tramèr et al. 2016) recovers softmax-linear models from d+1 queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import QueryBudgetExceeded, UnsupportedModelError
from modelshield.core.oracle import from_classifier
from modelshield.core.oracles.sklearn import SklearnOracle
from modelshield.core.threat import QueryAccess
from modelshield.extraction import EXTRACTION_ATTACKS, equation_solving

sklearn_lm = pytest.importorskip("sklearn.linear_model")

PROB_TOL = 1e-5
"""Probabilities travel as float32 through the oracle; log-odds solved in float64."""


def _sklearn_logreg(classes: int, d: int = 10) -> object:
    rng = np.random.default_rng(0)
    x = rng.random((400, d))
    score = x[:, 0] * 3 + x[:, 1] * 2 - x[:, 4]
    y = np.digitize(score, np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1]))
    return sklearn_lm.LogisticRegression(max_iter=2000, C=10.0).fit(x, y)


@pytest.mark.parametrize("classes", [3, 2])
def test_recovers_sklearn_logistic_regression_exactly(classes: int) -> None:
    est = _sklearn_logreg(classes)
    oracle = SklearnOracle(est)
    copy, res = equation_solving(oracle, seed=3)
    assert oracle.queries_used == res.queries_used == 11  # d + 1, not one more
    assert res.method == "equation" and res.details["n_eval"] == 2000
    assert res.fidelity == 1.0 and res.details["max_prob_diff"] < PROB_TOL
    assert res.details["exact"] is True
    # against the reference: the estimator's own parameters, relative to class 0
    coef = np.asarray(est.coef_, dtype=np.float64)
    intercept = np.asarray(est.intercept_, dtype=np.float64)
    if classes == 2:  # sklearn stores one row: the log-odds of class 1 against class 0
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    assert isinstance(copy, nn.Linear) and copy.weight.shape == (classes, 10)
    w = copy.weight.detach().double().numpy()
    b = copy.bias.detach().double().numpy()
    np.testing.assert_allclose(w, coef - coef[0], atol=5e-3)
    np.testing.assert_allclose(b, intercept - intercept[0], atol=5e-3)
    # held-out points of the caller's choosing, labelled by a plain function
    x = torch.rand(2000, 10, generator=torch.Generator().manual_seed(9))
    victim = lambda t: torch.from_numpy(est.predict_proba(t.double().numpy()))  # noqa: E731
    _, res2 = equation_solving(SklearnOracle(est), x_eval=x, victim=victim)
    assert res2.fidelity == 1.0 and res2.details["max_prob_diff"] < PROB_TOL


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_recovers_a_torch_linear_softmax_model_on_image_shaped_inputs(output: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        net[1].weight.mul_(4)
    clf = from_torch(net, input_shape=(1, 3, 4))
    oracle = from_classifier(clf, QueryAccess(output=output, max_queries=13))  # type: ignore[arg-type]
    copy, res = equation_solving(oracle, victim=clf)
    assert oracle.queries_used == res.queries_used == 13
    assert res.fidelity == 1.0 and res.details["max_prob_diff"] < PROB_TOL
    x = torch.rand(50, 1, 3, 4)
    torch.testing.assert_close(
        torch.softmax(copy(x), 1), torch.softmax(net(x), 1), atol=PROB_TOL, rtol=0
    )
    assert EXTRACTION_ATTACKS.get("equation") is equation_solving


def test_an_mlp_breaks_the_assumption_and_the_result_says_so() -> None:
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        for p in mlp.parameters():
            p.mul_(4)
    oracle = from_classifier(from_torch(mlp, input_shape=(10,)), QueryAccess(output="probs"))
    _, res = equation_solving(oracle)
    assert res.queries_used == 11
    assert res.fidelity < 0.9 and res.details["exact"] is False
    assert res.details["max_prob_diff"] > 0.1


@pytest.mark.parametrize(
    ("access", "word"),
    [
        (QueryAccess(output="label"), "label"),
        (QueryAccess(output="probs", top_k=1), "top_k"),
        (QueryAccess(output="probs", decimals=2), "decimals"),
    ],
)
def test_refuses_access_that_hides_the_log_odds(access: QueryAccess, word: str) -> None:
    oracle = SklearnOracle(_sklearn_logreg(3), access)
    with pytest.raises(UnsupportedModelError, match=word):
        equation_solving(oracle)
    assert oracle.queries_used == 0


def test_a_budget_below_d_plus_one_spends_nothing() -> None:
    oracle = SklearnOracle(_sklearn_logreg(3), QueryAccess(output="probs", max_queries=10))
    with pytest.raises(QueryBudgetExceeded, match="11"):
        equation_solving(oracle)
    assert oracle.queries_used == 0
