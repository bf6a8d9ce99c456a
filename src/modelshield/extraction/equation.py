"""Equation-solving extraction of softmax-linear models (Tramèr et al., USENIX Security 2016,
"Stealing Machine Learning Models via Prediction APIs", Section 4.1.1).

A multinomial logistic regression answers ``p_k(x) = softmax(W x + b)_k``, so for every
class ``k`` the log-odds against class 0 are linear in ``x``:
``log(p_k / p_0) = (w_k - w_0) · x + (b_k - b_0)``. With ``d`` features there are ``d + 1``
unknowns per class; ``d + 1`` queries at random points (in general position with
probability one) give an exactly determined linear system per class, solved here in
float64. Fixing ``w_0 = 0, b_0 = 0`` (softmax is invariant to a shared shift) yields a
linear model whose softmax equals the victim's. Binary logistic regression is the
``K = 2`` case (e.g. scikit-learn's ``predict_proba`` with two columns).

The method needs the scores themselves: label-only, top-k or rounded answers do not
reveal the log-odds, and :class:`UnsupportedModelError` says so. A victim that is not
softmax-linear (an MLP) still yields a linear model fitting the ``d + 1`` answers exactly,
but it disagrees with the victim elsewhere: ``fidelity`` on held-out inputs shows it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.oracle import Oracle
from modelshield.core.results import ExtractionResult
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import check_bounds
from modelshield.extraction.base import (
    EXTRACTION_ATTACKS,
    Evaluation,
    Victim,
    check_budget,
    check_positive_int,
    copy_logits,
)

logger = logging.getLogger(__name__)

EXACT_PROB_TOL = 1e-5
"""Largest |probability difference| on the evaluation inputs for ``details["exact"]``."""


def _check_access(oracle: Oracle) -> None:
    access = oracle.access
    if access.output not in ("probs", "logits"):
        raise UnsupportedModelError(
            f"equation solving needs probabilities or logits; the oracle's access is "
            f"output={access.output!r} (use knockoff or jacobian with label-only access)"
        )
    if access.top_k is not None and (
        oracle.num_classes is None or access.top_k < oracle.num_classes
    ):
        raise UnsupportedModelError(
            f"equation solving needs every class's score; the oracle's access is "
            f"top_k={access.top_k} (use knockoff)"
        )
    if access.decimals is not None:
        raise UnsupportedModelError(
            f"equation solving needs exact scores; the oracle's access rounds them to "
            f"decimals={access.decimals} (use knockoff)"
        )


def _input_shape(oracle: Oracle, input_dim: int | None) -> tuple[int, ...]:
    if input_dim is not None:
        check_positive_int(input_dim, "input_dim")
    shape = oracle.input_shape
    if shape is not None:
        d = math.prod(shape)
        if input_dim is not None and input_dim != d:
            raise InvalidConfigError(
                f"input_dim={input_dim} but the oracle takes inputs of shape {shape} ({d} features)"
            )
        return tuple(shape)
    if input_dim is None:
        raise InvalidConfigError(
            "the oracle does not say its input shape; pass input_dim (the number of features)"
        )
    return (int(input_dim),)


def _log_odds(answer: Tensor, output: str) -> Tensor:
    """``z[:, k] = log(p_k / p_0)`` for ``k = 1..K-1`` in float64."""
    a = answer.double()
    if output == "logits":
        return a[:, 1:] - a[:, :1]
    if bool((a <= 0).any()):
        raise UnsupportedModelError(
            "a probability answered is 0 (underflow or a hard 0/1 output), so its log-odds "
            "are unobservable; equation solving needs strictly positive probabilities or logits"
        )
    logp = a.log()
    return logp[:, 1:] - logp[:, :1]


@EXTRACTION_ATTACKS.register("equation")
def equation_solving(
    oracle: Oracle,
    *,
    input_dim: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    x_eval: Tensor | None = None,
    y_eval: Tensor | None = None,
    victim: Victim | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    n_eval: int = 2000,
) -> tuple[nn.Module, ExtractionResult]:
    """Equation-solving extraction of a softmax-linear model from ``d + 1`` queries
    (Tramèr et al. 2016).

    Queries ``d + 1`` points drawn uniformly in ``bounds`` and solves, in float64, the
    linear system of log-odds per class. Returns ``nn.Linear(d, K)`` (wrapped as
    ``Sequential(Flatten, Linear)`` when the inputs are not flat) and an
    :class:`ExtractionResult`. Evaluation (``fidelity``, ``details["max_prob_diff"]``)
    runs on ``x_eval`` or, when not given, on ``n_eval`` uniform points in ``bounds``,
    labelled by ``victim`` (default: the oracle's back-end, uncharged; see
    :mod:`modelshield.extraction.base`).
    """
    started = time.perf_counter()
    check_seed(seed)
    low, high = check_bounds(bounds)
    _check_access(oracle)
    shape = _input_shape(oracle, input_dim)
    d = math.prod(shape)
    check_positive_int(n_eval, "n_eval")
    if num_classes is not None:
        check_positive_int(num_classes, "num_classes", 2)
    gen = make_generator(seed)
    eval_given = x_eval is not None
    if x_eval is None:
        eval_gen = make_generator(seed + 1)
        x_eval = low + (high - low) * torch.rand((n_eval, *shape), generator=eval_gen)
    ev = Evaluation(x_eval, y_eval, victim if victim is not None else oracle, shape)

    n = d + 1
    check_budget(oracle, n)
    x = low + (high - low) * torch.rand((n, d), generator=gen)  # float32, as sent
    before = oracle.queries_used
    answer = oracle.query(x.reshape(n, *shape))
    used = oracle.queries_used - before
    if answer.ndim != 2:
        raise UnsupportedModelError("equation solving needs scores (N, C); the oracle gave labels")
    k = int(answer.shape[1])
    if num_classes is not None and num_classes != k:
        raise InvalidConfigError(f"num_classes={num_classes} but the oracle answered {k} scores")
    z = _log_odds(answer, oracle.access.output)  # (n, K-1)
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)  # (n, d+1)
    cond = float(torch.linalg.cond(a))
    solution = torch.linalg.lstsq(a, z).solution  # exactly determined: the unique solution
    weight = torch.zeros(k, d, dtype=torch.float64)
    bias = torch.zeros(k, dtype=torch.float64)
    weight[1:] = solution[:d].T
    bias[1:] = solution[d]
    linear = nn.Linear(d, k)
    with torch.no_grad():
        linear.weight.copy_(weight.float())
        linear.bias.copy_(bias.float())
    copy: nn.Module = linear if len(shape) == 1 else nn.Sequential(nn.Flatten(), linear)
    copy.eval()

    row = ev.measure(copy, used)
    max_diff: float | None = None
    if ev.scores is not None and ev.kind != "label" and ev.x is not None:
        victim_p = ev.scores if ev.kind == "probs" else torch.softmax(ev.scores, dim=1)
        if victim_p.shape[1] == k:
            mine = torch.softmax(copy_logits(copy, ev.x).double(), dim=1)
            max_diff = float((mine - victim_p.double()).abs().max())
    fid = row["fidelity"]
    if fid is not None and fid < 1.0:
        logger.info(
            "equation solving: fidelity %.4f < 1 on held-out inputs: the victim is not "
            "softmax-linear, the method's assumption does not hold",
            fid,
        )
    result = ExtractionResult(
        config={
            "input_dim": d,
            "input_shape": list(shape),
            "bounds": [low, high],
            "n_eval": len(ev.x) if ev.x is not None else 0,
            "access": oracle.access.to_dict(),
        },
        seed=seed,
        wall_time=time.perf_counter() - started,
        method="equation",
        queries_used=used,
        fidelity=float("nan") if fid is None else fid,
        accuracy=row["accuracy"],
        victim_accuracy=ev.victim_accuracy,
        curve=[{"queries": used, "fidelity": fid, "accuracy": row["accuracy"]}],
        details={
            "num_classes": k,
            "unknowns_per_class": n,
            "condition_number": cond,
            "max_prob_diff": max_diff,
            "exact": bool(fid == 1.0 and max_diff is not None and max_diff < EXACT_PROB_TOL),
            "exact_tolerance": EXACT_PROB_TOL,
            "eval_inputs": "given" if eval_given else f"{len(x_eval)} uniform points in bounds",
            "agree": row.get("agree"),
            "assumption": "softmax-linear victim (multinomial logistic regression)",
            **ev.details(),
        },
    )
    return copy, result


def equation_query_count(input_shape: Sequence[int]) -> int:
    """Queries equation solving spends on inputs of ``input_shape``: ``d + 1``."""
    return math.prod(tuple(input_shape)) + 1
