"""Auditing training data for poison, and measuring how easily a pipeline takes a backdoor.

:func:`audit_training_data` runs the detectors on a model's view of its training data and
joins their findings. :func:`backdoor_susceptibility` retrains a fresh copy of the model's
architecture on the training data with a small BadNets poison and measures the attack
success rate it reaches: the question a team asks before trusting scraped data.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelshield.core.classifier import Classifier
from modelshield.core.data import Dataset
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.metrics import precision_recall
from modelshield.core.results import PoisonResult
from modelshield.core.train import train_classifier
from modelshield.poisoning.attacks import poison
from modelshield.poisoning.detectors import POISON_DETECTORS
from modelshield.poisoning.features import clone_module, penultimate_features
from modelshield.poisoning.metrics import evaluate_poisoning

logger = logging.getLogger(__name__)

FEATURE_DETECTORS = ("activation-clustering", "spectral")
DEFAULT_DETECTORS = FEATURE_DETECTORS


def _slim(res: PoisonResult) -> dict[str, Any]:
    """A detector's result without its per-sample arrays (kept for the report)."""
    d = res.to_dict()
    d["details"] = {k: v for k, v in res.details.items() if k not in ("scores", "entropy")}
    return d


def audit_training_data(
    model: Classifier,
    data: Dataset,
    *,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    truth: list[int] | None = None,
    reference: Dataset | None = None,
    expected_rate: float | None = None,
    seed: int = 0,
) -> PoisonResult:
    """Run ``detectors`` on ``data`` as ``model`` sees it; flag the union of their findings.

    ``reference``: clean held-out data (STRIP's overlays and threshold; default: ``data``).
    ``truth``: the poisoned indices, when known, for precision and recall.
    """
    started = time.perf_counter()
    if not detectors:
        raise InvalidConfigError("give at least one detector")
    for name in detectors:
        POISON_DETECTORS.get(name)
    results: dict[str, PoisonResult] = {}
    feats = None
    if any(d in FEATURE_DETECTORS for d in detectors):
        feats = penultimate_features(model, data.x)
    for name in detectors:
        fn = POISON_DETECTORS.get(name)
        if name == "strip":
            pool = reference.x if reference is not None else data.x
            results[name] = fn(
                model,
                data.x,
                pool=pool,
                reference=reference.x if reference is not None else None,
                truth=truth,
                seed=seed,
            )
        else:
            assert feats is not None
            results[name] = fn(
                feats, data.y, x=data.x, expected_rate=expected_rate, truth=truth, seed=seed
            )
        r = results[name]
        logger.info("%s: flagged %d of %d samples", name, len(r.indices), len(data))
    flagged = sorted(set().union(*(set(r.indices) for r in results.values())))
    out = PoisonResult(
        method="+".join(detectors),
        indices=flagged,
        seed=seed,
        config={"detectors": list(detectors), "expected_rate": expected_rate},
        details={
            "n": len(data),
            "flagged_fraction": len(flagged) / max(len(data), 1),
            "detectors": {k: _slim(v) for k, v in results.items()},
        },
    )
    if truth is not None:
        out.precision, out.recall = precision_recall(flagged, truth, len(data))
    out.wall_time = time.perf_counter() - started
    return out


_NORM_OPS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")


def _graph_norm_targets(module: nn.Module) -> dict[str, float]:
    """In an exported graph, the attributes its batch-norm nodes read and their fresh
    values: weight 1, bias 0, running mean 0, running variance 1 (PyTorch's defaults)."""
    inner = getattr(module, "program", module)
    if not isinstance(inner, torch.fx.GraphModule):
        return {}
    out: dict[str, float] = {}
    for node in inner.graph.nodes:
        if node.op == "call_function" and str(node.target) in _NORM_OPS:
            for arg, value in zip(node.args[1:5], (1.0, 0.0, 0.0, 1.0), strict=False):
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    prefix = "program." if inner is not module else ""
                    out[prefix + str(arg.target)] = value
    return out


def fresh_copy(module: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with new random weights (PyTorch's default initialisation).

    Modules re-initialise through their ``reset_parameters``; a graph without submodules
    (a ``torch.export`` program) gets Kaiming-uniform weights and fan-in-uniform biases,
    PyTorch's defaults for linear and convolutional layers, and its batch-norm layers get
    weight 1, bias 0, mean 0, variance 1. (An exported graph runs batch norm in inference
    mode, so the copy trains without batch statistics.)
    """
    torch.manual_seed(seed)
    clone = clone_module(module)
    reset = False
    for m in clone.modules():
        fn = getattr(m, "reset_parameters", None)
        if m is not clone and callable(fn):
            fn()
            reset = True
    if not reset:
        params = list(clone.named_parameters())
        if not params:
            raise UnsupportedModelError("the model has no parameters to retrain")
        norms = _graph_norm_targets(clone)
        with torch.no_grad():
            fan_in = 1
            for name, p in params:
                if name in norms:
                    p.fill_(norms[name])
                elif p.ndim >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    fan_in = int(p[0].numel())
                else:
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(p, -bound, bound)
            for name, b in clone.named_buffers():
                if name in norms:
                    b.fill_(norms[name])
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def backdoor_susceptibility(
    model: Classifier,
    train: Dataset,
    test: Dataset,
    *,
    rate: float = 0.01,
    target_class: int = 0,
    epochs: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a fresh copy of ``model``'s architecture on ``train`` with a BadNets poison at
    ``rate``; its clean accuracy and attack success rate on ``test``."""
    started = time.perf_counter()
    poisoned = poison(
        "badnets", train, rate=rate, target_class=target_class, bounds=model.bounds, seed=seed
    )
    module = model.module
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError("the susceptibility probe needs a torch model to copy")
    copy_module = fresh_copy(module, seed=seed)
    train_classifier(
        copy_module,
        poisoned.dataset.x,
        poisoned.dataset.y,
        epochs=epochs,
        seed=seed,
        device=model.device,
    )
    clf = copy.copy(model)
    clf.module = copy_module  # type: ignore[assignment]
    copy_module.eval()
    ev = evaluate_poisoning(clf, test.x, test.y, poisoned.record)
    return {
        "rate": rate,
        "poisoned": len(poisoned.record.indices),
        "target_class": target_class,
        "epochs": epochs,
        "n_train": len(train),
        "clean_accuracy": ev["clean_accuracy"],
        "attack_success_rate": ev["attack_success_rate"],
        "trigger": poisoned.record.details["trigger"],
        "wall_time": time.perf_counter() - started,
    }
