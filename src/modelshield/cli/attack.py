"""``modelshield attack NAME``: one attack on a model file or an HTTP endpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelshield.core.classifier import Classifier
from modelshield.core.data import load_dataset
from modelshield.core.device import select_device
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.core.loading import load_model
from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.oracle import Oracle, from_classifier
from modelshield.core.seeding import make_generator, seed_everything
from modelshield.core.threat import LpThreat, QueryAccess
from modelshield.evasion import ATTACKS
from modelshield.evasion.run import run_attack

logger = logging.getLogger(__name__)


def _targets(
    y: torch.Tensor, num_classes: int, target_class: int | None, seed: int
) -> torch.Tensor:
    if target_class is not None:
        if not 0 <= target_class < num_classes:
            raise InvalidConfigError(
                f"--target-class must be in [0, {num_classes - 1}], got {target_class}"
            )
        return torch.full_like(y, target_class)
    g = make_generator(seed)
    shift = torch.randint(1, num_classes, y.shape, generator=g)
    return (y.cpu() + shift) % num_classes


def _victim(
    opts: dict[str, Any], data_shape: tuple[int, ...], access: str, n: int
) -> tuple[Classifier | Oracle, Oracle | None]:
    """The attacked model as the attack needs it, and the oracle whose budget applies."""
    per_sample = opts["max_queries"]
    budget = None if per_sample is None else per_sample * n + n  # + the clean-accuracy query
    output = "logits" if access != "label" else "label"
    if opts["oracle_url"]:
        if access == "white-box":
            raise UnsupportedModelError(
                "an HTTP endpoint gives no gradients; pick a black-box attack (square, hopskipjump)"
            )
        from modelshield.core.oracles.http import HttpOracle

        raw = opts["oracle_output"]
        want = "label" if access == "label" or raw == "label" else raw
        oracle: Oracle = HttpOracle(
            opts["oracle_url"],
            QueryAccess(output=want, max_queries=budget),  # type: ignore[arg-type]
            input_field=opts["input_field"],
            output_field=opts["output_field"],
            raw_output=raw,
            input_shape=data_shape,
        )
        return oracle, oracle
    if not opts["model"]:
        raise InvalidConfigError("give --model PATH or --oracle URL")
    loaded = load_model(
        opts["model"],
        trust_pickle=opts["trust_pickle"],
        arch=opts["arch"],
        input_shape=data_shape,
        bounds=opts["bounds"],
        mean=opts["mean"],
        std=opts["std"],
        device=select_device(opts["device"]),
    )
    if access == "white-box":
        if loaded.classifier is None:
            raise UnsupportedModelError(
                f"the model ({loaded.kind}) gives no gradients; pick a black-box attack (square, hopskipjump)"
            )
        return loaded.classifier, None
    if loaded.classifier is not None:
        oracle = from_classifier(loaded.classifier, QueryAccess(output=output, max_queries=budget))  # type: ignore[arg-type]
        return oracle, oracle
    if loaded.oracle is None:
        raise UnsupportedModelError(f"cannot query the model ({loaded.kind})")
    want = (
        "label"
        if access == "label"
        else ("logits" if loaded.oracle.raw_output == "logits" else "probs")
    )
    loaded.oracle.access = QueryAccess(output=want, max_queries=budget)  # type: ignore[arg-type]
    return loaded.oracle, loaded.oracle


def run_attack_command(**opts: Any) -> dict[str, Any]:
    """Load, attack, write ``result.json`` and ``adversarial.npz`` atomically; return the summary."""
    spec = ATTACKS.get(opts["name"])
    seed_everything(opts["seed"])
    data = load_dataset(opts["data"], bounds=opts["bounds"])
    n = len(data) if opts["n"] is None else min(max(opts["n"], 1), len(data))
    x, y = data.x[:n], data.y[:n]
    victim, oracle = _victim(opts, tuple(data.x.shape[1:]), spec.access, n)
    num_classes = victim.num_classes
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise InvalidConfigError(
            f"--data has labels up to {int(y.max())} but the model predicts {num_classes} classes"
        )
    threat = LpThreat(
        norm=opts["norm"], eps=opts["eps"], bounds=opts["bounds"], targeted=opts["targeted"]
    )
    target = None
    if opts["targeted"]:
        if num_classes is None:
            raise InvalidConfigError(
                "--targeted needs the number of classes; the endpoint did not say it"
            )
        target = _targets(y, num_classes, opts["target_class"], opts["seed"])
    elif opts["target_class"] is not None:
        raise InvalidConfigError("--target-class needs --targeted")
    kwargs: dict[str, Any] = {}
    if opts["steps"] is not None:
        kwargs["steps"] = opts["steps"]
    if opts["max_queries"] is not None and spec.access != "white-box":
        kwargs["max_queries"] = opts["max_queries"]
    pred = (
        victim.predict(x.to(victim.device)) if isinstance(victim, Classifier) else victim.predict(x)
    )
    clean_correct = (pred.cpu() == y).cpu()
    res = run_attack(
        opts["name"],
        victim,
        x,
        y,
        threat=threat,
        target=target,
        seed=opts["seed"],
        batch_size=opts["batch_size"],
        **kwargs,
    )
    if res.success is None or res.x_adv is None:
        raise RuntimeError(f"{opts['name']} returned no adversarial inputs")
    success = res.success.cpu()
    robust = clean_correct & ~success if not threat.targeted else ~success
    acc, ci = accuracy_with_ci(clean_correct)
    racc, rci = accuracy_with_ci(robust)
    out = Path(opts["out"])
    adv_path, result_path = out / "adversarial.npz", out / "result.json"
    with atomic_open(adv_path, "wb") as fh:
        arrays = {"x": res.x_adv.detach().cpu().numpy(), "y": y.numpy(), "success": success.numpy()}
        if target is not None:
            arrays["target"] = target.numpy()
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
    summary = res.summary()
    summary.update(
        n=n,
        clean_accuracy=acc,
        clean_ci=list(ci),
        robust_accuracy=racc,
        robust_ci=list(rci),
        success_rate=float(success.float().mean()),
        success=success.tolist(),
        clean_correct=clean_correct.tolist(),
        queries=res.queries.tolist() if res.queries is not None else None,
        distance=res.distance.tolist() if res.distance is not None else None,
        queries_used=oracle.queries_used if oracle is not None else None,
        access=spec.access,
        data=data.describe(),
        model=opts["model"] or opts["oracle_url"],
    )
    atomic_write_json(result_path, summary)
    summary["paths"] = {"result": str(result_path), "adversarial": str(adv_path)}
    return summary
