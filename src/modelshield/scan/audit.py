"""``modelshield audit membership``: one membership attack with result.json and a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from modelshield.core.data import load_dataset
from modelshield.core.device import select_device
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import LoadedModel, check_fits, load_model
from modelshield.core.seeding import check_seed, seed_everything
from modelshield.exec import make_executor
from modelshield.privacy.audit import AuditConfig, audit_membership, default_spec
from modelshield.privacy.shadow import ShadowSpec
from modelshield.report import build_report, write_reports
from modelshield.scan.probe.membership import membership_probe_result
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import run_record


def _prepare(opts: dict[str, Any]) -> tuple[float, Any]:
    """Check the seed, pick the device, seed everything; returns (start time, device)."""
    started = time.time()
    check_seed(opts["seed"])
    device = select_device(opts["device"])
    seed_everything(opts["seed"])
    return started, device


def _load(opts: dict[str, Any], input_shape: tuple[int, ...], device: Any) -> LoadedModel:
    """The model named by the shared model options, for inputs of ``input_shape``."""
    return load_model(
        opts["model"],
        trust_pickle=opts["trust_pickle"],
        arch=opts["arch"],
        input_shape=input_shape,
        bounds=opts["bounds"],
        mean=opts["mean"],
        std=opts["std"],
        device=device,
    )


def run_membership_audit(**opts: Any) -> dict[str, Any]:
    """Load, audit, write ``result.json`` (``auc``, ``tpr_at_fpr``) and the reports."""
    started, device = _prepare(opts)
    members = load_dataset(opts["train_data"], bounds=opts["bounds"])
    nonmembers = load_dataset(opts["data"], bounds=opts["bounds"])
    loaded = _load(opts, tuple(members.x.shape[1:]), device)
    if loaded.classifier is None:
        raise UnsupportedModelError(
            f"audit membership needs a torch model; got a {loaded.kind} model"
        )
    check_fits(loaded, members.y, "--train-data")
    check_fits(loaded, nonmembers.y, "--data")
    spec = default_spec(tuple(members.x.shape[1:]))
    spec = ShadowSpec(arch=opts["shadow_arch"] or spec.arch, epochs=opts["shadow_epochs"])
    cfg = AuditConfig(
        attack=opts["attack"],
        n=opts["n"],
        shadow_models=opts["shadow_models"],
        spec=spec,
        seed=opts["seed"],
    )
    out = Path(opts["out"])
    kw: dict[str, Any] = {}
    if opts["executor"] == "ray":
        kw = {"address": opts["ray_address"], "num_workers": opts["workers"]}
    with make_executor(opts["executor"], **kw) as executor:
        res = audit_membership(
            loaded.classifier,
            members,
            nonmembers,
            cfg,
            executor=executor,
            cache_dir=out / "reference-models",
        )
    probe = membership_probe_result(res, seed=opts["seed"])
    summary = res.to_dict()
    summary.pop("scores", None)
    summary.update(
        scores=res.scores.tolist() if res.scores is not None else None,
        labels=res.labels.tolist() if res.labels is not None else None,
        executor=opts["executor"],
    )
    target = {
        "model": loaded.file.to_dict(),
        "data": nonmembers.describe(),
        "train_data": members.describe(),
    }
    return _write(out, probe, summary, target, opts, started, device)


def _write(
    out: Path,
    probe: Any,
    summary: dict[str, Any],
    target: dict[str, Any],
    opts: dict[str, Any],
    started: float,
    device: Any,
) -> dict[str, Any]:
    """result.json and the reports for a single-probe audit."""
    result_path = out / "result.json"
    atomic_write_json(result_path, summary)
    report = build_report(
        probes=[probe],
        run=run_record(opts["command"], opts["seed"], device, started),
        target=target,
        rubric=rubric_document(),
    )
    paths = write_reports(report, out)
    summary["paths"] = {
        "result": str(result_path),
        "html": str(paths["html"]),
        "json": str(paths["json"]),
    }
    return summary


def run_inversion_audit(**opts: Any) -> dict[str, Any]:
    """MI-Face on a white-box model; writes result.json (per-class similarity) and the reports."""
    from modelshield.privacy.inversion import mi_face
    from modelshield.scan.probe.privacy_more import inversion_probe_result

    started, device = _prepare(opts)
    data = load_dataset(opts["data"], bounds=opts["bounds"])
    loaded = _load(opts, tuple(data.x.shape[1:]), device)
    if loaded.classifier is None:
        raise UnsupportedModelError(f"model inversion needs gradients; got a {loaded.kind} model")
    check_fits(loaded, data.y)
    res = mi_face(
        loaded.classifier,
        steps=opts["steps"],
        tv_weight=opts["tv_weight"],
        reference=(data.x, data.y),
        seed=opts["seed"],
    )
    summary = res.summary()
    summary.update(
        nearest_fraction=res.nearest_fraction,
        mean_cosine=res.mean_cosine,
        mean_confidence=res.mean_confidence,
        classes=res.classes,
    )
    target = {"model": loaded.file.to_dict(), "data": data.describe(), "train_data": None}
    return _write(
        Path(opts["out"]),
        inversion_probe_result(res, seed=opts["seed"]),
        summary,
        target,
        opts,
        started,
        device,
    )


def run_attribute_audit(**opts: Any) -> dict[str, Any]:
    """Attribute inference on a tabular model (black-box); result.json holds the advantage."""
    import torch

    from modelshield.core.oracle import from_classifier
    from modelshield.core.seeding import make_generator
    from modelshield.core.threat import QueryAccess
    from modelshield.privacy.attribute import (
        fredrikson_attribute_inference,
        learned_attribute_inference,
    )
    from modelshield.scan.probe.privacy_more import attribute_probe_result, candidate_values

    started, device = _prepare(opts)
    targets = load_dataset(opts["train_data"], bounds=None, scale="none")
    aux = load_dataset(opts["data"], bounds=None, scale="none")
    if targets.x.ndim != 2 or aux.x.ndim != 2:
        raise DataError(
            "attribute inference needs tabular data (N, D): --train-data and --data are not"
        )
    col = opts["sensitive"]
    if not 0 <= col < targets.x.shape[1]:
        raise InvalidConfigError(
            f"--sensitive must be a column index in [0, {targets.x.shape[1] - 1}], got {col}"
        )
    loaded = _load(opts, tuple(targets.x.shape[1:]), device)
    oracle = (
        from_classifier(loaded.classifier, QueryAccess(output="probs"))
        if loaded.classifier is not None
        else loaded.oracle
    )
    if oracle is None:
        raise UnsupportedModelError(f"cannot query the model ({loaded.kind})")
    g = make_generator(opts["seed"])
    t_idx = torch.randperm(len(targets), generator=g)[: opts["n"]]
    values = (
        [float(v) for v in opts["values"]] if opts["values"] else candidate_values(aux.x[:, col])
    )
    attack = (
        fredrikson_attribute_inference
        if opts["attack"] == "fredrikson"
        else learned_attribute_inference
    )
    res = attack(
        oracle,
        targets.x[t_idx],
        targets.y[t_idx],
        sensitive=col,
        values=values,
        aux_x=aux.x,
        aux_y=aux.y,
        seed=opts["seed"],
    )
    summary = res.to_dict()
    for key in ("predicted", "baseline_predicted", "truth", "scores"):
        value = getattr(res, key)
        summary[key] = value.tolist() if value is not None else None
    target = {
        "model": loaded.file.to_dict(),
        "data": aux.describe(),
        "train_data": targets.describe(),
    }
    return _write(
        Path(opts["out"]),
        attribute_probe_result(res, seed=opts["seed"]),
        summary,
        target,
        opts,
        started,
        device,
    )
