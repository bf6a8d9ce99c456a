"""Attribute inference against tabular models, black-box, measured against a no-model baseline.

The attacker knows a record's other features and its label, may query the model through an
:class:`~modelshield.core.oracle.Oracle`, holds auxiliary data from the same population
(with the sensitive value) and infers the record's sensitive feature, which takes one of
``values`` (a categorical feature, or a continuous one discretised into bins represented by
these values: the truth is the nearest value).

Two attacks:

* :func:`fredrikson_attribute_inference`, the model-inversion attack of Fredrikson et al.,
  "Privacy in Pharmacogenetics: An End-to-End Case Study of Personalized Warfarin Dosing"
  (USENIX Security 2014): query the model with each candidate value and pick the value that
  maximises ``P(known label | record with that value) * prior(value)``. With probabilities
  the model's answer is used directly; with labels only, the model's error is modelled by
  its confusion matrix ``P(true label | predicted label)`` estimated on the auxiliary data,
  as in the paper.
* :func:`learned_attribute_inference`, a learned attack in the style of Mehnaz et al., "Are
  Your Sensitive Attributes Private? Novel Model Inversion Attribute Inference Attacks on
  Classification Models" (USENIX Security 2022): the model's answers for every candidate
  value, with the known features and label, feed a classifier trained on the auxiliary data.

Both report against a baseline with no model access (the same classifier on the known
features and label only, trained on the same auxiliary data; Jayaraman & Evans, "Are
Attribute Inference Attacks Just Imputation?", CCS 2022) and the majority prior, so a leak
is shown beyond what the population already reveals.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from modelshield.core.errors import DataError, InvalidConfigError, QueryBudgetExceeded
from modelshield.core.metrics import accuracy_with_ci, bootstrap_mean_ci
from modelshield.core.oracle import Oracle
from modelshield.core.results import Result
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.train import train_classifier

logger = logging.getLogger(__name__)

__all__ = [
    "AttributeInferenceResult",
    "fredrikson_attribute_inference",
    "learned_attribute_inference",
]


@dataclass
class AttributeInferenceResult(Result):
    """Outcome of an attribute-inference attack on ``N`` target records.

    ``predicted[i]`` / ``baseline_predicted[i]`` / ``truth[i]``: indices into ``values``
    (the attack's guess, the no-model baseline's guess, the true bin). ``advantage`` is
    ``accuracy - baseline_accuracy`` with a paired percentile-bootstrap interval
    ``advantage_ci``; a lower bound above 0 shows the model leaks the attribute beyond what
    the known features and label reveal. ``queries`` counts the oracle queries this attack
    spent (auxiliary data included).
    """

    result_type: ClassVar[str] = "attribute-inference"

    attack: str = ""
    sensitive: int = 0
    values: list[float] = field(default_factory=list)
    output: str = ""
    accuracy: float = float("nan")
    accuracy_ci: list[float] = field(default_factory=list)
    baseline_accuracy: float = float("nan")
    baseline_ci: list[float] = field(default_factory=list)
    prior_accuracy: float = float("nan")
    prior: list[float] = field(default_factory=list)
    advantage: float = float("nan")
    advantage_ci: list[float] = field(default_factory=list)
    confidence: float = 0.95
    predicted: torch.Tensor | None = None
    baseline_predicted: torch.Tensor | None = None
    truth: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    queries: int = 0
    queries_used: int = 0

    def summary(self) -> dict[str, Any]:
        """The headline numbers without per-record tensors."""
        d = self.to_dict()
        for key in ("predicted", "baseline_predicted", "truth", "scores"):
            d.pop(key, None)
        return d


# -- validation ---------------------------------------------------------------------------------
def _check_table(x: Any, y: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(
            f"{name}: x and y must be torch tensors, got {type(x).__name__}, {type(y).__name__}"
        )
    if x.ndim != 2 or not x.is_floating_point():
        raise DataError(f"{name}: x must be a float tensor (N, D), got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{name}: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{name}: y must hold integer class indices, got {y.dtype}")
    if x.shape[0] == 0:
        raise DataError(f"{name}: no records")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name}: x contains NaN or infinite values")
    if int(y.min()) < 0:
        raise DataError(f"{name}: labels must be >= 0, got {int(y.min())}")
    return x, y.long()


def _check_values(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    try:
        v = torch.as_tensor(values, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise InvalidConfigError(f"values must be a sequence of numbers, got {values!r}") from None
    if v.numel() < 2 or not bool(torch.isfinite(v).all()):
        raise InvalidConfigError(f"values must hold at least 2 finite numbers, got {values!r}")
    if int(torch.unique(v).numel()) != int(v.numel()):
        raise InvalidConfigError(f"values must be distinct, got {v.tolist()}")
    return v


def _check_common(
    oracle: Oracle,
    x: Any,
    y: Any,
    aux_x: Any,
    aux_y: Any,
    sensitive: int,
    values: Sequence[float] | torch.Tensor,
    confidence: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(oracle, Oracle):
        raise InvalidConfigError(f"oracle must be an Oracle, got {type(oracle).__name__}")
    x, y = _check_table(x, y, "targets")
    aux_x, aux_y = _check_table(aux_x, aux_y, "auxiliary data")
    # tabular and small: the attack models run on the CPU; the oracle moves inputs itself
    x, y, aux_x, aux_y = x.detach().cpu(), y.cpu(), aux_x.detach().cpu(), aux_y.cpu()
    if aux_x.shape[1] != x.shape[1]:
        raise DataError(
            f"auxiliary data has {aux_x.shape[1]} features but the targets have {x.shape[1]}"
        )
    d = int(x.shape[1])
    if isinstance(sensitive, bool) or not isinstance(sensitive, int) or not -d <= sensitive < d:
        raise InvalidConfigError(f"sensitive must be a column index in [0, {d}), got {sensitive!r}")
    if not 0.0 < confidence < 1.0:
        raise InvalidConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    check_seed(seed)
    v = _check_values(values)
    if oracle.num_classes is not None:
        top = int(max(int(y.max()), int(aux_y.max())))
        if top >= oracle.num_classes:
            raise DataError(f"label {top} is outside [0, {oracle.num_classes}) of the oracle")
    return x, y, aux_x, aux_y, v


def _bin_index(column: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest candidate value (exact for categorical features)."""
    return (column.float().unsqueeze(1) - values.unsqueeze(0)).abs().argmin(dim=1)


def _num_classes(oracle: Oracle, *ys: torch.Tensor) -> int:
    if oracle.num_classes is not None:
        return int(oracle.num_classes)
    return max(int(y.max()) for y in ys) + 1


def _reserve(oracle: Oracle, needed: int) -> None:
    """Refuse up front when the attack would run past the oracle's budget."""
    left = oracle.remaining
    if left is not None and needed > left:
        raise QueryBudgetExceeded(
            f"attribute inference needs {needed} queries but the oracle has {left} left "
            f"(max_queries={oracle.access.max_queries}); give fewer targets, fewer values "
            "or less auxiliary data"
        )


def _query_candidates(
    oracle: Oracle, x: torch.Tensor, sensitive: int, values: torch.Tensor
) -> torch.Tensor:
    """The oracle's answers for every record with every candidate value: ``(N, K, ...)``.

    The sensitive column of ``x`` is overwritten before any query, so its true value never
    reaches the model.
    """
    n, k = int(x.shape[0]), int(values.numel())
    grid = x.unsqueeze(1).repeat(1, k, 1)
    grid[:, :, sensitive] = values.to(x.dtype).unsqueeze(0)
    out = oracle.query(grid.reshape(n * k, -1))
    return out.reshape(n, k, *out.shape[1:])


def _known(x: torch.Tensor, y: torch.Tensor, sensitive: int, num_classes: int) -> torch.Tensor:
    """What the attacker knows without the model: other features and the one-hot label."""
    keep = [j for j in range(x.shape[1]) if j != sensitive % x.shape[1]]
    onehot = nn.functional.one_hot(y.clamp(max=num_classes - 1), num_classes).to(x.dtype)
    return torch.cat([x[:, keep], onehot], dim=1)


def _mlp_probs(
    feats_train: torch.Tensor,
    target: torch.Tensor,
    feats_test: torch.Tensor,
    num_values: int,
    *,
    hidden: int,
    epochs: int,
    seed: int,
) -> torch.Tensor:
    """A small MLP (standardised inputs) trained on ``feats_train``; class probabilities."""
    mean = feats_train.mean(dim=0)
    std = feats_train.std(dim=0).nan_to_num(1.0).clamp_min(1e-6)
    a = ((feats_train - mean) / std).float()
    b = ((feats_test - mean) / std).float()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(a.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_values))
    train_classifier(
        net, a, target, epochs=epochs, lr=1e-2, batch_size=64, weight_decay=1e-4, seed=seed
    )
    with torch.no_grad():
        return torch.softmax(net(b), dim=1)


def _fit_predict(
    feats_train: torch.Tensor,
    target: torch.Tensor,
    feats_test: torch.Tensor,
    num_values: int,
    *,
    hidden: int,
    epochs: int,
    seed: int,
) -> torch.Tensor:
    """Class probabilities from an MLP, or from the prior when the MLP does not beat it.

    Four-fold cross-validation on the auxiliary records decides: unless the MLP beats the
    majority value out of fold by more than one standard deviation of McNemar's statistic
    (``wins - losses > sqrt(wins + losses)`` over the records where exactly one is right),
    it only fits noise and the prior is returned; otherwise the MLP is refitted on all
    records. An overfitted baseline would
    otherwise fall below the prior and make a harmless model look leaky.
    """
    prior = torch.bincount(target, minlength=num_values).float()
    prior = prior / prior.sum()
    m = int(feats_train.shape[0])
    folds = 4
    if m >= 2 * folds:
        perm = torch.randperm(m, generator=make_generator(seed))
        wins = losses = 0
        for f in range(folds):
            held = perm[f::folds]
            fit = torch.cat([perm[j::folds] for j in range(folds) if j != f])
            probs = _mlp_probs(
                feats_train[fit],
                target[fit],
                feats_train[held],
                num_values,
                hidden=hidden,
                epochs=epochs,
                seed=seed + f,
            )
            majority = int(torch.bincount(target[fit], minlength=num_values).argmax())
            mlp_right = probs.argmax(dim=1) == target[held]
            prior_right = target[held] == majority
            wins += int((mlp_right & ~prior_right).sum())
            losses += int((~mlp_right & prior_right).sum())
        if wins - losses <= math.sqrt(wins + losses):
            logger.debug(
                "MLP beats the prior on %d, loses on %d of %d records: using the prior",
                wins,
                losses,
                m,
            )
            return prior.unsqueeze(0).expand(feats_test.shape[0], -1).clone()
    return _mlp_probs(
        feats_train, target, feats_test, num_values, hidden=hidden, epochs=epochs, seed=seed
    )


def _finish(
    *,
    attack: str,
    oracle: Oracle,
    sensitive: int,
    values: torch.Tensor,
    predicted: torch.Tensor,
    scores: torch.Tensor,
    truth: torch.Tensor,
    baseline: torch.Tensor,
    prior: torch.Tensor,
    queries: int,
    confidence: float,
    n_boot: int,
    seed: int,
    config: dict[str, Any],
    start: float,
) -> AttributeInferenceResult:
    correct = predicted == truth
    base_correct = baseline == truth
    prior_correct = truth == int(prior.argmax())
    acc, acc_ci = accuracy_with_ci(correct, confidence)
    base, base_ci = accuracy_with_ci(base_correct, confidence)
    diff = correct.double() - base_correct.double()
    adv_ci = bootstrap_mean_ci(
        diff, confidence=confidence, n_boot=n_boot, generator=make_generator(seed)
    )
    result = AttributeInferenceResult(
        config=config,
        seed=seed,
        wall_time=time.perf_counter() - start,
        attack=attack,
        sensitive=sensitive,
        values=values.tolist(),
        output=oracle.access.output,
        accuracy=acc,
        accuracy_ci=list(acc_ci),
        baseline_accuracy=base,
        baseline_ci=list(base_ci),
        prior_accuracy=float(prior_correct.double().mean()),
        prior=prior.tolist(),
        advantage=acc - base,
        advantage_ci=list(adv_ci),
        confidence=confidence,
        predicted=predicted,
        baseline_predicted=baseline,
        truth=truth,
        scores=scores,
        queries=queries,
        queries_used=oracle.queries_used,
    )
    logger.info(
        "%s: accuracy %.3f, baseline %.3f, prior %.3f, advantage %.3f [%.3f, %.3f], %d queries",
        attack,
        acc,
        base,
        result.prior_accuracy,
        result.advantage,
        adv_ci[0],
        adv_ci[1],
        queries,
    )
    return result


def _baseline_and_prior(
    x: torch.Tensor,
    y: torch.Tensor,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    aux_truth: torch.Tensor,
    sensitive: int,
    k: int,
    num_classes: int,
    hidden: int,
    epochs: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    prior = torch.bincount(aux_truth, minlength=k).double()
    prior = prior / prior.sum()
    probs = _fit_predict(
        _known(aux_x, aux_y, sensitive, num_classes),
        aux_truth,
        _known(x, y, sensitive, num_classes),
        k,
        hidden=hidden,
        epochs=epochs,
        seed=seed,
    )
    return probs.argmax(dim=1), prior


# -- attacks ------------------------------------------------------------------------------------
def fredrikson_attribute_inference(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sensitive: int,
    values: Sequence[float] | torch.Tensor,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    confidence: float = 0.95,
    n_boot: int = 2000,
    baseline_hidden: int = 32,
    baseline_epochs: int = 60,
    seed: int = 0,
) -> AttributeInferenceResult:
    """Fredrikson et al. (USENIX Security 2014) attribute inference, black-box.

    For each target (row of ``x`` with known label ``y``) and each candidate ``values[k]`` of
    column ``sensitive``, query the oracle and score ``P(y | x with value k) * prior(k)``;
    the guess is the best-scoring value. ``prior`` is the value's marginal in the auxiliary
    data. With a label-only oracle, ``P(y | x_k)`` is the paper's error model
    ``P(true label = y | predicted label)``, a confusion matrix estimated (Laplace-smoothed)
    by querying the oracle on ``aux_x``. The targets' sensitive column is read only to score
    the attack; it is overwritten before any query.

    Queries: ``len(x) * len(values)``, plus ``len(aux_x)`` for a label-only oracle. The
    attack refuses up front (:class:`QueryBudgetExceeded`) when that exceeds the budget.
    """
    start = time.perf_counter()
    x, y, aux_x, aux_y, v = _check_common(
        oracle, x, y, aux_x, aux_y, sensitive, values, confidence, seed
    )
    sensitive = sensitive % x.shape[1]
    n, k = int(x.shape[0]), int(v.numel())
    nc = _num_classes(oracle, y, aux_y)
    label_only = oracle.access.output == "label"
    needed = n * k + (int(aux_x.shape[0]) if label_only else 0)
    _reserve(oracle, needed)
    truth = _bin_index(x[:, sensitive], v)
    aux_truth = _bin_index(aux_x[:, sensitive], v)
    baseline, prior = _baseline_and_prior(
        x, y, aux_x, aux_y, aux_truth, sensitive, k, nc, baseline_hidden, baseline_epochs, seed
    )
    used_before = oracle.queries_used
    if label_only:
        aux_pred = oracle.query(aux_x).long().cpu()
        # error model pi(y_true | y_pred), Laplace-smoothed (Fredrikson et al. 2014, §4)
        counts = torch.ones(nc, nc, dtype=torch.float64)
        counts.index_put_(
            (aux_pred, aux_y.cpu()), torch.ones(len(aux_y), dtype=torch.float64), accumulate=True
        )
        error_model = counts / counts.sum(dim=1, keepdim=True)
        preds = _query_candidates(oracle, x, sensitive, v).long().cpu()  # (N, K)
        likelihood = error_model[preds, y.cpu().unsqueeze(1).expand(n, k)]
    else:
        answers = _query_candidates(oracle, x, sensitive, v).double().cpu()  # (N, K, C)
        if oracle.access.output == "logits":
            answers = torch.softmax(answers, dim=2)
        likelihood = answers.gather(2, y.cpu().view(n, 1, 1).expand(n, k, 1)).squeeze(2)
    scores = likelihood * prior.unsqueeze(0)
    predicted = scores.argmax(dim=1)
    # a top-k oracle may give the known label probability 0 for every value: use the prior
    predicted[scores.amax(dim=1) <= 0] = int(prior.argmax())
    queries = oracle.queries_used - used_before
    config = {
        "sensitive": sensitive,
        "values": v.tolist(),
        "n_targets": n,
        "n_aux": int(aux_x.shape[0]),
        "output": oracle.access.output,
        "confidence": confidence,
        "n_boot": n_boot,
        "baseline_hidden": baseline_hidden,
        "baseline_epochs": baseline_epochs,
    }
    return _finish(
        attack="fredrikson",
        oracle=oracle,
        sensitive=sensitive,
        values=v,
        predicted=predicted,
        scores=scores.float(),
        truth=truth,
        baseline=baseline,
        prior=prior,
        queries=queries,
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
        config=config,
        start=start,
    )


def learned_attribute_inference(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sensitive: int,
    values: Sequence[float] | torch.Tensor,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    confidence: float = 0.95,
    n_boot: int = 2000,
    hidden: int = 32,
    epochs: int = 60,
    seed: int = 0,
) -> AttributeInferenceResult:
    """Learned attribute inference (after Mehnaz et al., USENIX Security 2022), black-box.

    Every record (auxiliary and target) is queried once per candidate value; the answers
    (probability vectors, or one-hot labels for a label-only oracle), the known features and
    the one-hot label form the input of a small MLP trained on the auxiliary records to
    predict the sensitive value. The baseline is the same MLP without the model's answers.

    Queries: ``(len(aux_x) + len(x)) * len(values)``, refused up front past the budget.
    """
    start = time.perf_counter()
    x, y, aux_x, aux_y, v = _check_common(
        oracle, x, y, aux_x, aux_y, sensitive, values, confidence, seed
    )
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise InvalidConfigError(f"hidden must be a positive integer, got {hidden!r}")
    sensitive = sensitive % x.shape[1]
    n, k, m = int(x.shape[0]), int(v.numel()), int(aux_x.shape[0])
    nc = _num_classes(oracle, y, aux_y)
    _reserve(oracle, (n + m) * k)
    truth = _bin_index(x[:, sensitive], v)
    aux_truth = _bin_index(aux_x[:, sensitive], v)
    baseline, prior = _baseline_and_prior(
        x, y, aux_x, aux_y, aux_truth, sensitive, k, nc, hidden, epochs, seed
    )
    used_before = oracle.queries_used

    def answers(rows: torch.Tensor) -> torch.Tensor:
        out = _query_candidates(oracle, rows, sensitive, v).cpu()
        if oracle.access.output == "label":
            out = nn.functional.one_hot(out.long().clamp(max=nc - 1), nc)
        elif oracle.access.output == "logits":
            out = torch.softmax(out.float(), dim=2)
        return out.float().reshape(rows.shape[0], -1)

    aux_feats = torch.cat([_known(aux_x, aux_y, sensitive, nc).cpu(), answers(aux_x)], dim=1)
    tgt_feats = torch.cat([_known(x, y, sensitive, nc).cpu(), answers(x)], dim=1)
    scores = _fit_predict(
        aux_feats, aux_truth.cpu(), tgt_feats, k, hidden=hidden, epochs=epochs, seed=seed
    )
    predicted = scores.argmax(dim=1)
    queries = oracle.queries_used - used_before
    config = {
        "sensitive": sensitive,
        "values": v.tolist(),
        "n_targets": n,
        "n_aux": m,
        "output": oracle.access.output,
        "confidence": confidence,
        "n_boot": n_boot,
        "hidden": hidden,
        "epochs": epochs,
    }
    if not math.isfinite(float(scores.sum())):
        raise DataError("the attack model produced non-finite scores")
    return _finish(
        attack="learned",
        oracle=oracle,
        sensitive=sensitive,
        values=v,
        predicted=predicted,
        scores=scores,
        truth=truth.cpu(),
        baseline=baseline.cpu(),
        prior=prior,
        queries=queries,
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
        config=config,
        start=start,
    )
