"""``modelshield audit membership``: one membership attack with result.json and a report."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelshield.core.data import load_dataset
from modelshield.core.device import select_device
from modelshield.core.errors import UnsupportedModelError
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import check_fits, load_model
from modelshield.core.seeding import check_seed, seed_everything
from modelshield.exec import make_executor
from modelshield.privacy.audit import AuditConfig, audit_membership, default_spec
from modelshield.privacy.shadow import ShadowSpec
from modelshield.report import build_report, write_reports
from modelshield.scan.probe.membership import membership_probe_result
from modelshield.scan.rubric import rubric_document


def run_membership_audit(**opts: Any) -> dict[str, Any]:
    """Load, audit, write ``result.json`` (``auc``, ``tpr_at_fpr``) and the reports."""
    started = time.time()
    check_seed(opts["seed"])
    device = select_device(opts["device"])
    seed_everything(opts["seed"])
    members = load_dataset(opts["train_data"], bounds=opts["bounds"])
    nonmembers = load_dataset(opts["data"], bounds=opts["bounds"])
    loaded = load_model(
        opts["model"],
        trust_pickle=opts["trust_pickle"],
        arch=opts["arch"],
        input_shape=tuple(members.x.shape[1:]),
        bounds=opts["bounds"],
        mean=opts["mean"],
        std=opts["std"],
        device=device,
    )
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
    result_path = out / "result.json"
    atomic_write_json(result_path, summary)
    report = build_report(
        probes=[probe],
        run={
            "id": uuid.uuid4().hex[:12],
            "command": opts["command"],
            "seed": opts["seed"],
            "device": str(device),
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
        },
        target={
            "model": loaded.file.to_dict(),
            "data": nonmembers.describe(),
            "train_data": members.describe(),
        },
        rubric=rubric_document(),
    )
    paths = write_reports(report, out)
    summary["paths"] = {
        "result": str(result_path),
        "html": str(paths["html"]),
        "json": str(paths["json"]),
    }
    return summary
