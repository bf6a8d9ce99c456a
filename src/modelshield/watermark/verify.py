"""Verifying a trigger-set watermark with an exact p-value (Adi et al., USENIX Security 2018).

Query the suspect model on the key's trigger inputs (labels are enough: a white-box module,
a :class:`~modelshield.core.classifier.Classifier` or any
:class:`~modelshield.core.oracle.Oracle`), count how many predictions equal the key's
secret labels, and test that count against chance.

**The null hypothesis and why 1/K is exact.** H0: the suspect model was made without
knowledge of the key. The key's labels are drawn uniformly over the K classes, independently
of each other and of the trigger inputs (a separate cryptographic stream of the secret
seed, see :mod:`modelshield.watermark.key`). Under H0 the model's prediction on trigger i
is some class c_i that depends on the trigger input and on the model, but not on the label
L_i. Whatever c_i is, P[L_i = c_i] = 1/K, and the matches are independent across triggers,
so the number of matches is exactly Binomial(n, 1/K), and

    p = P[Binomial(n, 1/K) >= matches] = I_{1/K}(matches, n - matches + 1)

(the regularised incomplete beta function; :func:`modelshield.core.metrics.betainc`).

This holds however skewed the model's predictions on the triggers are: an unrelated model
often sends all out-of-distribution inputs to one or two classes, and a test against that
class's frequency would be wrong, but the randomness the test relies on is in the labels,
not in the model. It is what makes the labels' independence from the inputs matter: labels
chosen *from* the inputs (e.g. "the class a reference model does not predict") would break
it. "Chance = the model's most frequent class" is not a valid null either (it is fitted to
the data being tested). The test's false-positive rate is at most ``significance`` for any
model made without the key (the binomial is discrete, so usually below it), which
:func:`modelshield.watermark.robustness.false_positive_check` checks empirically on
independently trained models. It says nothing when the key leaked (a model trained on
the revealed trigger set "carries" the mark): verification shows the trigger inputs to the
suspect, so a key should be considered spent once used against a party that could keep the
queries (the paper's private-verification caveat).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from modelshield.core.classifier import Classifier
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    ModelShieldError,
    UnsupportedModelError,
)
from modelshield.core.metrics import betainc, clopper_pearson
from modelshield.core.oracle import Oracle
from modelshield.core.results import WatermarkVerdict
from modelshield.watermark.key import WatermarkKey

logger = logging.getLogger(__name__)


def binomial_p_value(matches: int, n: int, chance: float) -> float:
    """P[Binomial(n, chance) >= matches], exactly: ``I_chance(matches, n - matches + 1)``.

    1 for ``matches <= 0``; ``chance**n`` for ``matches == n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidConfigError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(matches, bool) or not isinstance(matches, int) or not 0 <= matches <= n:
        raise InvalidConfigError(f"matches must be an integer in [0, {n}], got {matches!r}")
    if not (isinstance(chance, (int, float)) and 0.0 < chance < 1.0):
        raise InvalidConfigError(f"chance must be in (0, 1), got {chance!r}")
    if matches == 0:
        return 1.0
    return min(1.0, max(0.0, betainc(float(matches), float(n - matches + 1), float(chance))))


def matches_needed(n: int, chance: float, significance: float) -> int | None:
    """The fewest matches out of ``n`` whose p-value is below ``significance`` (``None``
    when even ``n`` of ``n`` is not enough: too few triggers for that significance)."""
    if binomial_p_value(n, n, chance) >= significance:
        return None
    lo, hi = 0, n  # p(lo) >= significance > p(hi); p falls as matches grow
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if binomial_p_value(mid, n, chance) < significance:
            hi = mid
        else:
            lo = mid
    return hi


def _check_significance(significance: float) -> float:
    if (
        isinstance(significance, bool)
        or not isinstance(significance, (int, float))
        or not 0.0 < significance < 1.0
    ):
        raise InvalidConfigError(f"significance must be in (0, 1), got {significance!r}")
    return float(significance)


def _model_failed(key: WatermarkKey, exc: BaseException) -> UnsupportedModelError:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return UnsupportedModelError(
        f"the model does not accept the key's trigger inputs of shape {key.input_shape} "
        f"(is this the key for this model?): {type(exc).__name__}: {text}"[:400]
    )


def _check_classes(num_classes: int | None, key: WatermarkKey) -> None:
    if num_classes is not None and int(num_classes) != key.num_classes:
        raise InvalidConfigError(
            f"the key is for a {key.num_classes}-class model; this model has {num_classes} classes "
            "(is this the key for this model?)"
        )


def _check_shape(shape: tuple[int, ...] | None, key: WatermarkKey) -> None:
    if shape is not None and tuple(shape) != key.input_shape:
        raise DataError(
            f"the key is for inputs of shape {key.input_shape}; the model expects {tuple(shape)} "
            "(is this the key for this model?)"
        )


def predict_triggers(
    model: nn.Module | Classifier | Oracle | Any, key: WatermarkKey, *, batch_size: int = 256
) -> tuple[torch.Tensor, str]:
    """Top-1 labels of ``model`` on the key's triggers, and the access used.

    ``model``: an ``nn.Module`` returning logits, a :class:`Classifier`, an
    :class:`Oracle` (spends ``key.n`` queries; labels suffice) or anything with a
    ``predict(x) -> labels`` method.
    """
    x = key.triggers()
    try:
        if isinstance(model, Oracle):
            _check_shape(model.input_shape, key)
            _check_classes(model.num_classes, key)
            access = (
                "label-only"
                if model.access.output == "label"
                else f"black-box ({model.access.output})"
            )
            pred = model.predict(x)
        elif isinstance(model, Classifier):
            _check_shape(model.input_shape, key)
            _check_classes(model.num_classes, key)
            access = "white-box"
            pred = model.predict(x.to(model.device), batch_size=batch_size)
        elif isinstance(model, nn.Module):
            access = "white-box"
            p = next(model.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")
            model.eval()
            outs = []
            with torch.no_grad():
                for i in range(0, len(x), batch_size):
                    out = model(x[i : i + batch_size].to(dev))
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    if not isinstance(out, torch.Tensor) or out.ndim != 2:
                        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                        raise UnsupportedModelError(
                            f"the model must return logits (N, C), got {shape}"
                        )
                    _check_classes(int(out.shape[1]), key)
                    outs.append(out.argmax(1).cpu())
            pred = torch.cat(outs)
        elif callable(getattr(model, "predict", None)):
            access = "label-only"
            pred = torch.as_tensor(model.predict(x))
        else:
            raise UnsupportedModelError(
                f"cannot query a {type(model).__name__}: give an nn.Module, a Classifier or an Oracle"
            )
    except ModelShieldError:
        raise
    except Exception as exc:  # the model's own failure on the triggers, in one line
        raise _model_failed(key, exc) from exc
    pred = pred.reshape(-1).long().cpu()
    if len(pred) != key.n:
        raise DataError(f"the model answered {len(pred)} labels for {key.n} triggers")
    return pred, access


def verify(
    model_or_oracle: nn.Module | Classifier | Oracle | Any,
    key: WatermarkKey,
    *,
    significance: float = 1e-6,
    batch_size: int = 256,
) -> WatermarkVerdict:
    """Does the model carry the watermark of ``key``? (Adi et al. 2018)

    Counts the triggers whose predicted label equals the key's label and returns a
    :class:`WatermarkVerdict` with the exact binomial p-value ``P[Binomial(n, 1/K) >=
    matches]`` and ``verified = p_value < significance``. Valid for any model made without
    the key, however its predictions on the triggers are distributed (module docstring).
    ``details`` holds the key's public fingerprint (never its seed), the fewest matches that
    verify, a 95% Clopper-Pearson interval on the trigger accuracy and the predicted-label
    histogram.
    """
    significance = _check_significance(significance)
    if not isinstance(key, WatermarkKey):
        raise InvalidConfigError(f"key must be a WatermarkKey, got {type(key).__name__}")
    started = time.perf_counter()
    pred, access = predict_triggers(model_or_oracle, key, batch_size=batch_size)
    labels = key.labels()
    hit = pred == labels
    matches = int(hit.sum())
    chance = key.chance
    p = binomial_p_value(matches, key.n, chance)
    in_range = pred[(pred >= 0) & (pred < key.num_classes)]
    histogram = torch.bincount(in_range, minlength=key.num_classes).tolist()
    lo, hi = clopper_pearson(matches, key.n, 0.95)
    verified = p < significance
    logger.info(
        "watermark %s: %d/%d triggers match (chance %.3g), p = %.3g: %s",
        key.key_id,
        matches,
        key.n,
        chance,
        p,
        "verified" if verified else "not verified",
    )
    return WatermarkVerdict(
        config={"significance": significance, "key": key.public_dict()},
        seed=None,
        wall_time=time.perf_counter() - started,
        trigger_accuracy=matches / key.n,
        matches=matches,
        n_triggers=key.n,
        chance=chance,
        p_value=p,
        significance=significance,
        verified=verified,
        access=access,
        details={
            "key_id": key.key_id,
            "kind": key.kind,
            "matches_needed": matches_needed(key.n, chance, significance),
            "trigger_accuracy_ci": [lo, hi],
            "ci_confidence": 0.95,
            "predicted_histogram": histogram,
            "most_frequent_class_share": max(histogram) / key.n if histogram else 0.0,
            "out_of_range_predictions": int(key.n - len(in_range)),
            "null": "predictions independent of the key's uniformly random labels: "
            "matches ~ Binomial(n, 1/K) exactly",
        },
    )
