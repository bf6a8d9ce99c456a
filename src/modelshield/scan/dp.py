"""``modelshield train`` (``--dp``) and ``modelshield audit dp``: files, reports, results.

Training writes the model (``model.pt2``, ``model.pt``), the privacy ledger
(``ledger.json``), ``result.json`` and a report; an interrupted run resumes from
``checkpoint.pt``. The audit writes ``result.json`` (``eps_lower``, ``eps_claimed``) and a
report that flags a bound above the claim as a broken DP implementation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.core.loading import build_arch
from modelshield.core.results import DPAuditResult, ProbeResult
from modelshield.core.train import train_classifier
from modelshield.privacy.dp import DPConfig, PrivacyLedger, train_dp
from modelshield.report import build_report, write_reports
from modelshield.scan.audit import _prepare
from modelshield.scan.rubric import grade_dp_audit, grade_dp_claim, rubric_document
from modelshield.scan.rundir import run_record

logger = logging.getLogger(__name__)


# -- shared -----------------------------------------------------------------------------------
def dp_config(opts: dict[str, Any]) -> DPConfig | None:
    """The DP-SGD settings named by the command's options (``None`` when not private).

    ``--epsilon`` or ``--noise-multiplier`` imply ``--dp``; ``--no-dp`` with either is an error.
    """
    named = [f for f in ("epsilon", "noise_multiplier", "max_epsilon") if opts.get(f) is not None]
    if opts.get("dp") is False:
        if named:
            flag = named[0].replace("_", "-")
            raise InvalidConfigError(
                f"--{flag} contradicts --no-dp (a non-private run spends no budget)"
            )
        return None
    if opts.get("epsilon") is None and opts.get("noise_multiplier") is None:
        if opts.get("dp"):
            raise InvalidConfigError("--dp needs --epsilon (a target) or --noise-multiplier")
        if named:
            raise InvalidConfigError("--max-epsilon needs --epsilon or --noise-multiplier")
        return None
    return DPConfig(
        epsilon=opts.get("epsilon"),
        noise_multiplier=opts.get("noise_multiplier"),
        delta=opts["delta"],
        max_grad_norm=opts["max_grad_norm"],
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"] if opts.get("lr") is not None else 0.1,
        optimizer=opts["optimizer"],
        momentum=opts["momentum"],
        accountant=opts["accountant"],
        mode=opts["mode"],
        poisson=not opts.get("no_poisson", False),
        secure_rng=opts.get("secure_rng", False),
        max_epsilon=opts.get("max_epsilon"),
        seed=opts["seed"],
    )


def _load_train(opts: dict[str, Any]) -> tuple[Dataset, Dataset | None]:
    train = load_dataset(opts["train_data"], bounds=opts["bounds"])
    test = load_dataset(opts["data"], bounds=opts["bounds"]) if opts.get("data") else None
    if test is not None and test.input_shape != train.input_shape:
        raise DataError(
            f"--data samples have shape {test.input_shape}, --train-data {train.input_shape}"
        )
    if test is not None and int(test.y.max()) >= train.num_classes:
        raise DataError(
            f"--data has label {int(test.y.max())}, but --train-data has {train.num_classes} classes"
        )
    return train, test


def _accuracy(module: nn.Module, data: Dataset | None, device: torch.device) -> float | None:
    if data is None:
        return None
    module.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), 1024):
            pred = module(data.x[i : i + 1024].to(device)).argmax(1).cpu()
            correct += int((pred == data.y[i : i + 1024]).sum())
    return correct / len(data)


def _serialize(module: nn.Module, example: torch.Tensor) -> dict[str, bytes]:
    """``model.pt`` (weights) and ``model.pt2`` (torch.export, any batch size) as bytes.

    A model loaded from a ``.pt2`` file keeps its program's batch range, which an explicit
    ``Dim("batch", max=2**20)`` can violate; ``Dim.DYNAMIC`` lets torch infer the range.
    """
    module = module.cpu().eval()
    blobs: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    blobs["model.pt"] = buf.getvalue()
    errors = []
    for batch in (torch.export.Dim("batch", min=1, max=1 << 20), torch.export.Dim.DYNAMIC):
        try:
            program = torch.export.export(
                module, (example[:2].cpu(),), dynamic_shapes=({0: batch},)
            )
            buf = io.BytesIO()
            torch.export.save(program, buf)
        except Exception as exc:  # an architecture torch.export cannot trace
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        blobs["model.pt2"] = buf.getvalue()
        return blobs
    logger.warning("could not export model.pt2 (%s); the weights go to model.pt", errors[-1])
    return blobs


def _write_blobs(out: Path, blobs: dict[str, bytes]) -> dict[str, str]:
    paths = {}
    for name, data in blobs.items():
        with atomic_open(out / name, "wb") as fh:
            fh.write(data)
        paths["model" if name == "model.pt2" else "state_dict"] = str(out / name)
    return paths


def _build(
    probe: ProbeResult, target: dict[str, Any], opts: dict[str, Any], started: float, device: Any
) -> dict[str, Any]:
    """The report document, validated against the schema (nothing is written yet)."""
    return build_report(
        probes=[probe],
        run=run_record(opts["command"], opts["seed"], device, started),
        target=target,
        rubric=rubric_document(),
    )


def _write_report(report: dict[str, Any], out: Path) -> dict[str, str]:
    paths = write_reports(report, out)
    return {"html": str(paths["html"]), "json": str(paths["json"])}


# -- train ------------------------------------------------------------------------------------
def dp_training_probe_result(
    ledger: PrivacyLedger | None,
    accuracy: float | None,
    history: list[dict[str, Any]],
    *,
    seed: int,
) -> ProbeResult:
    """The report section of a training run: its privacy claim, per epoch."""
    acc = "" if accuracy is None else f" Test accuracy {accuracy:.2%}."
    if ledger is None:
        grade, rule = grade_dp_claim(None)
        return ProbeResult(
            probe="dp-training",
            title="Differential privacy of the training",
            risk="privacy",
            seed=seed,
            figure={"name": "claimed epsilon", "value": None},
            grade=grade,
            meaning="The model was trained without differential privacy: nothing bounds what it reveals "
            f"about any training record.{acc}",
            recommendation="If the training data is sensitive, retrain with DP-SGD: "
            "`modelshield harden dp --epsilon E` (before/after report) or "
            "`modelshield train --dp --epsilon E`.",
            threat={"rule": rule},
            details={"accuracy": accuracy, "history": history, "rule": rule},
        )
    grade, rule = grade_dp_claim(ledger.epsilon)
    fixes = f" Changed for DP-SGD: {'; '.join(ledger.module_fixes)}." if ledger.module_fixes else ""
    return ProbeResult(
        probe="dp-training",
        title="Differential privacy of the training (DP-SGD)",
        risk="privacy",
        seed=seed,
        config={"ledger": ledger.to_dict()},
        figure={"name": "claimed epsilon", "value": ledger.epsilon, "delta": ledger.delta},
        grade=grade,
        meaning=(
            f"DP-SGD with noise multiplier {ledger.noise_multiplier:.4g}, clipping norm "
            f"{ledger.max_grad_norm:g}, sample rate {ledger.sample_rate:.4g} over {ledger.steps} steps "
            f"spent epsilon {ledger.epsilon:.3f} at delta {ledger.delta:g} ({ledger.accountant} "
            f"accountant; {', '.join(f'{k} {v:.3f}' for k, v in ledger.epsilon_other.items())}). "
            f"Per-example gradients: Opacus {ledger.grad_sample_mode} mode.{fixes}{acc} {ledger.rng_note}."
        ),
        recommendation=(
            "Check the claim empirically with `modelshield audit dp`; keep the ledger with the model."
            if ledger.secure_rng
            else "Retrain with --secure-rng before release; check the claim with `modelshield audit dp`."
        ),
        threat={"rule": rule, "accountant": ledger.accountant},
        details={
            "ledger": ledger.to_dict(),
            "accuracy": accuracy,
            "history": history,
            "rule": rule,
        },
        plots=[
            {
                "kind": "line",
                "title": "Privacy spent per epoch",
                "x_label": "epoch",
                "y_label": "epsilon",
                "x_scale": "linear",
                "y_scale": "linear",
                "series": [
                    {
                        "name": f"epsilon ({ledger.accountant}, delta {ledger.delta:g})",
                        "x": [r["epoch"] for r in ledger.per_epoch],
                        "y": [r["epsilon"] for r in ledger.per_epoch],
                    }
                ],
            }
        ],
        flags=[] if ledger.secure_rng else ["insecure-rng"],
    )


def run_training(**opts: Any) -> dict[str, Any]:
    """Train ``--arch`` on ``--train-data`` (DP-SGD with ``--dp``); write model, ledger, report."""
    started, device = _prepare(opts)
    cfg = dp_config(opts)  # checks the DP options before any data is read
    train, test = _load_train(opts)
    out = Path(opts["out"])
    ckpt = out / "checkpoint.pt"
    if opts.get("fresh") and ckpt.exists():
        ckpt.unlink()
    module = build_arch(opts["arch"], input_shape=train.input_shape, num_classes=train.num_classes)
    ledger: PrivacyLedger | None = None
    history: list[dict[str, Any]] = []
    if cfg is not None:
        res = train_dp(
            module,
            train.x,
            train.y,
            cfg,
            num_classes=train.num_classes,
            device=device,
            validation=(test.x, test.y) if test is not None else None,
            checkpoint=ckpt,
        )
        module, ledger, history = res.module, res.ledger, res.history
    else:
        train_classifier(
            module,
            train.x,
            train.y,
            epochs=opts["epochs"],
            lr=opts["lr"] if opts.get("lr") is not None else 1e-3,
            batch_size=opts["batch_size"],
            seed=opts["seed"],
            device=device,
        )
    accuracy = _accuracy(module, test, device)
    blobs = _serialize(module, train.x)
    main_file = "model.pt2" if "model.pt2" in blobs else "model.pt"
    summary: dict[str, Any] = {
        "private": ledger is not None,
        "epsilon": ledger.epsilon if ledger is not None else None,
        "delta": ledger.delta if ledger is not None else None,
        "accuracy": accuracy,
        "arch": opts["arch"],
        "epochs": opts["epochs"],
        "history": history,
    }
    if ledger is not None:
        summary.update(
            noise_multiplier=ledger.noise_multiplier,
            sample_rate=ledger.sample_rate,
            steps=ledger.steps,
            accountant=ledger.accountant,
            grad_sample_mode=ledger.grad_sample_mode,
            module_fixes=ledger.module_fixes,
            secure_rng=ledger.secure_rng,
        )
    probe = dp_training_probe_result(ledger, accuracy, history, seed=opts["seed"])
    target = {
        "model": {
            "path": str(out / main_file),
            "sha256": hashlib.sha256(blobs[main_file]).hexdigest(),
            "format": "torch-export" if main_file == "model.pt2" else "torch-zip",
            "name": opts["arch"],
        },
        "data": test.describe()
        if test is not None
        else {"path": None, "sha256": None, "format": None},
        "train_data": train.describe(),
    }
    if ledger is not None:
        ledger.model_sha256 = target["model"]["sha256"]
    report = _build(probe, target, opts, started, device)  # validated before any file is written
    paths = _write_blobs(out, blobs)
    if ledger is not None:
        paths["ledger"] = str(ledger.save(out / "ledger.json"))
    paths.update(_write_report(report, out))
    result_path = out / "result.json"
    summary["paths"] = {**paths, "result": str(result_path)}
    atomic_write_json(result_path, summary)  # written last: its presence means the run finished
    if ckpt.exists():
        ckpt.unlink()  # the run is complete: a rerun trains afresh
    return summary


# -- audit ------------------------------------------------------------------------------------
def dp_audit_probe_result(res: DPAuditResult) -> ProbeResult:
    """The report section of a DP audit; a bound above the claim is flagged broken."""
    grade, rule = grade_dp_audit(res.eps_lower, res.eps_claimed)
    claim = (
        "no claim (trained without DP)"
        if res.eps_claimed is None
        else f"claimed epsilon {res.eps_claimed:.3f}"
    )
    how = (
        f"one training run with {res.canaries} {res.canary_type} canaries, each included with probability 1/2"
        if res.method == "one-run"
        else f"{res.runs} training runs, half of them with one {res.canary_type} canary"
    )
    if res.broken:
        meaning = (
            f"BROKEN DP: the audit proves epsilon >= {res.eps_lower:.3f} at {res.confidence:.0%} confidence, "
            f"above the {claim}. The training does not deliver the privacy it reports ({how})."
        )
        advice = "Do not rely on the claimed epsilon. Check that noise is added and per-example gradients are clipped."
    elif res.eps_claimed is None:
        meaning = (
            f"Without DP, the audit shows epsilon >= {res.eps_lower:.3f} at {res.confidence:.0%} confidence ({how}): "
            "an attacker can tell whether single records were trained on."
        )
        advice = (
            "Retrain with DP-SGD (`modelshield harden dp --epsilon E`, or `modelshield train "
            "--dp`) if single records must stay private."
        )
    else:
        meaning = (
            f"The empirical lower bound epsilon >= {res.eps_lower:.3f} ({res.confidence:.0%} confidence; {how}) "
            f"is below the {claim}: no evidence against the claim. An audit can refute a claim, not prove it."
        )
        advice = "Keep the ledger with the model; re-audit after changes to the training code."
    return ProbeResult(
        probe="dp-audit",
        title=f"DP audit ({res.method})",
        risk="privacy",
        seed=res.seed,
        wall_time=res.wall_time,
        config=res.config,
        figure={
            "name": "epsilon lower bound",
            "value": res.eps_lower,
            "claimed": res.eps_claimed,
            "confidence": res.confidence,
        },
        grade=grade,
        meaning=meaning,
        recommendation=advice,
        threat={"rule": rule, "method": res.method, "delta": res.delta},
        details={
            "eps_lower": res.eps_lower,
            "eps_claimed": res.eps_claimed,
            "broken": res.broken,
            "bound": res.bound,
            "training": res.training,
            "rule": rule,
        },
        plots=[
            {
                "kind": "table",
                "title": "Claim and evidence",
                "columns": ["", "epsilon"],
                "rows": [
                    ["claimed", "none" if res.eps_claimed is None else round(res.eps_claimed, 4)],
                    [f"lower bound ({res.confidence:.0%})", round(res.eps_lower, 4)],
                ],
            }
        ],
        flags=["broken-dp"] if res.broken else [],
    )


def run_dp_audit(**opts: Any) -> dict[str, Any]:
    """Audit a training procedure's DP claim; write result.json and a report."""
    from modelshield.exec import make_executor
    from modelshield.privacy.dp_audit import DP_AUDITS, AuditTraining, NamedTrainer, resolve_trainer

    started, device = _prepare(opts)
    cfg = dp_config(opts)
    data = load_dataset(opts["train_data"], bounds=opts["bounds"])
    out = Path(opts["out"])
    trainer: Any
    claimed = opts.get("claimed_epsilon")
    if opts.get("trainer"):
        resolve_trainer(opts["trainer"])  # fail now, not in the first run
        trainer = NamedTrainer(opts["trainer"])
        if cfg is not None:
            raise InvalidConfigError(
                "--trainer audits your own training code: give --claimed-epsilon, not --dp"
            )
    else:
        trainer = AuditTraining(
            arch=opts["arch"],
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            dp=cfg,
            epochs=opts["epochs"],
            lr=opts["lr"] if opts.get("lr") is not None else 1e-3,
            batch_size=opts["batch_size"],
            device=str(device),
        )
    ckpt = out / "checkpoint.pt"
    if opts.get("fresh"):
        ckpt.unlink(missing_ok=True)
    if opts["method"] == "one-run" and isinstance(trainer, AuditTraining):
        trainer = replace(trainer, checkpoint=str(ckpt))  # one long run: resumable
    if claimed is not None and not (math.isfinite(claimed) and claimed > 0):
        raise InvalidConfigError(f"--claimed-epsilon must be > 0, got {claimed}")
    delta = cfg.delta if cfg is not None else opts["delta"]
    if opts.get("fresh"):
        (out / "progress.json").unlink(missing_ok=True)
    kw: dict[str, Any] = {}
    if opts["executor"] == "ray":
        kw = {"address": opts.get("ray_address"), "num_workers": opts.get("workers")}
    with make_executor(opts["executor"], **kw) as executor:
        res = DP_AUDITS.get(opts["method"])(
            trainer,
            data,
            canaries=opts["canaries"],
            runs=opts["runs"],
            canary_type=opts["canary_type"],
            eps_claimed=claimed,
            delta=delta,
            confidence=opts["confidence"],
            seed=opts["seed"],
            device=device,
            executor=executor,
            progress=out / "progress.json",
        )
    probe = dp_audit_probe_result(res)
    summary = res.to_dict()
    summary.update(
        scores=res.scores.tolist() if res.scores is not None else None,
        labels=res.labels.tolist() if res.labels is not None else None,
        private=res.eps_claimed is not None,
    )
    for key in ("eps_lower", "eps_claimed"):
        v = summary.get(key)
        if isinstance(v, float) and math.isinf(v):
            summary[key] = "inf"
    target = {
        "model": {
            "path": opts.get("trainer") or f"built-in: {opts['arch']}",
            "sha256": None,
            "format": "training-procedure",
            "name": opts.get("trainer") or opts["arch"],
        },
        "data": data.describe(),
        "train_data": data.describe(),
    }
    report = _build(probe, target, opts, started, device)
    paths = _write_report(report, out)
    result_path = out / "result.json"
    summary["paths"] = {**paths, "result": str(result_path)}
    atomic_write_json(result_path, summary)
    summary["paths"]["result"] = str(result_path)
    (out / "progress.json").unlink(missing_ok=True)
    ckpt.unlink(missing_ok=True)
    return summary
