"""The scan pipeline: load → plan → probes (resumable) → reports (DESIGN.md "Main job")."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import modelshield.scan.probe  # noqa: F401  (registers the built-in probes)
from modelshield import __version__
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.device import select_device
from modelshield.core.errors import DataError, InvalidConfigError, ModelShieldError
from modelshield.core.io import sha256_file
from modelshield.core.loading import LoadedModel, check_fits, load_model
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import check_seed, seed_everything
from modelshield.core.threat import NORMS, LpThreat, QueryAccess, check_bounds
from modelshield.report import build_report, write_reports
from modelshield.scan.context import PROFILES, ScanContext
from modelshield.scan.estimate import ScanPlan, estimate_plan
from modelshield.scan.probes import PROBES, Probe, ordered_probe_names
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import RunDir, run_record

logger = logging.getLogger(__name__)


@dataclass
class ScanConfig:
    """Everything a scan is given; the CLI fills it from its flags."""

    model: str | None = None
    oracle: str | None = None
    """URL of an HTTP prediction endpoint to scan black-box (JSON ``inputs`` → ``outputs``)."""
    oracle_output: str = "probs"
    data: str | None = None
    train_data: str | None = None
    out: str = "modelshield-scan"
    seed: int = 0
    device: str = "auto"
    trust_pickle: bool = False
    arch: str | None = None
    profile: str = "standard"
    norm: str = "linf"
    eps: float | None = None
    sensitive_feature: int | None = None
    dp_ledger: str | None = None
    """Privacy ledger of the model (default: ``ledger.json`` beside the model file, if any)."""
    watermark_key: str | None = None
    """Secret key of a trigger-set watermark to verify on the model (``watermark embed``)."""
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    label_column: str | None = None
    only: list[str] = field(default_factory=list)
    fresh: bool = False
    command: str = ""

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise InvalidConfigError(
                f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}"
            )
        if self.norm not in NORMS:
            raise InvalidConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        check_seed(self.seed)
        self.bounds = check_bounds(self.bounds)
        if self.eps is not None:
            LpThreat(norm=self.norm, eps=self.eps, bounds=self.bounds)  # type: ignore[arg-type]
            if self.eps == 0:
                raise InvalidConfigError("eps must be > 0")
        for name in self.only:
            PROBES.get(name)


@dataclass
class ScanOutcome:
    out: Path
    reports: dict[str, Path]
    results: list[ProbeResult]
    reused: list[str]
    plan: ScanPlan | None = None


def _describe(ds: Dataset | None) -> dict[str, Any] | None:
    return ds.describe() if ds is not None else None


def _load_inputs(
    cfg: ScanConfig, device: torch.device
) -> tuple[LoadedModel | None, Dataset | None, Dataset | None]:
    data = (
        load_dataset(cfg.data, label_column=cfg.label_column, bounds=cfg.bounds)
        if cfg.data
        else None
    )
    train = (
        load_dataset(cfg.train_data, label_column=cfg.label_column, bounds=cfg.bounds)
        if cfg.train_data
        else None
    )
    if data is not None and train is not None and data.x.shape[1:] != train.x.shape[1:]:
        raise DataError(
            f"--data samples have shape {tuple(data.x.shape[1:])} but --train-data samples "
            f"have {tuple(train.x.shape[1:])}"
        )
    model = None
    if cfg.model:
        ref = data if data is not None else train
        model = load_model(
            cfg.model,
            trust_pickle=cfg.trust_pickle,
            arch=cfg.arch,
            input_shape=tuple(ref.x.shape[1:]) if ref is not None else None,
            num_classes=None,
            bounds=cfg.bounds,
            mean=cfg.mean,
            std=cfg.std,
            device=device,
        )
        for ds, flag in ((data, "--data"), (train, "--train-data")):
            if ds is not None:
                check_fits(model, ds.y, flag)
    return model, data, train


def _fingerprint(
    cfg: ScanConfig, model: LoadedModel | None, data: Dataset | None, train: Dataset | None
) -> dict[str, Any]:
    def sha(ds: Dataset | None) -> str | None:
        return ds.describe().get("sha256") if ds is not None else None

    return {
        "model_sha256": model.file.sha256 if model is not None else None,
        "data_sha256": sha(data),
        "train_data_sha256": sha(train),
        "seed": cfg.seed,
        "profile": cfg.profile,
        "norm": cfg.norm,
        "eps": cfg.eps,
        "sensitive_feature": cfg.sensitive_feature,
        "bounds": list(cfg.bounds),
        "mean": cfg.mean,
        "std": cfg.std,
        "arch": cfg.arch,
        "modelshield_version": __version__,
    }


def _run_probe(probe: Probe, ctx: ScanContext) -> ProbeResult:
    try:
        return probe.run(ctx)
    except ModelShieldError as exc:
        logger.warning("%s failed: %s", probe.name, exc)
        reason = str(exc)
    except Exception as exc:  # a bug or a model that breaks: record it, keep scanning
        logger.error("%s crashed: %s: %s", probe.name, type(exc).__name__, exc)
        logger.debug("%s", traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return ProbeResult(
        probe=probe.name,
        title=probe.title,
        risk=probe.risk,
        status="error",
        reason=reason,
        seed=ctx.seed,
    )


def _ledger_path(cfg: ScanConfig) -> Path | None:
    """The privacy ledger to check: ``--dp-ledger``, else ``ledger.json`` beside the model."""
    if cfg.dp_ledger:
        path = Path(cfg.dp_ledger)
        if not path.is_file():
            raise DataError(f"--dp-ledger {cfg.dp_ledger}: no such file")
        return path
    if cfg.model:
        beside = Path(cfg.model).parent / "ledger.json"
        if beside.is_file():
            return beside
    return None


def run_scan(cfg: ScanConfig, on_plan: Callable[[ScanPlan], None] | None = None) -> ScanOutcome:
    """Run (or resume) a scan and write its reports; returns where they are.

    Before any probe runs, the plan (each probe to run with its estimated time, each
    skipped probe with its reason, the total) goes to ``on_plan``, or to the log.
    """
    cfg.validate()
    if not (cfg.model or cfg.oracle or cfg.data or cfg.train_data):
        raise InvalidConfigError(
            "nothing to scan: give --model (or --oracle) and --data, or use --demo"
        )
    started = time.time()
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    model, data, train = _load_inputs(cfg, device)
    oracle = None
    if cfg.oracle:
        if model is not None:
            raise InvalidConfigError("give --model or --oracle, not both")
        if data is None:
            raise InvalidConfigError("--oracle needs --data (the inputs to query it with)")
        from modelshield.core.oracles.http import HttpOracle

        oracle = HttpOracle(
            cfg.oracle,
            QueryAccess(output="label" if cfg.oracle_output == "label" else cfg.oracle_output),  # type: ignore[arg-type]
            raw_output=cfg.oracle_output,
            input_shape=tuple(data.x.shape[1:]),
        )
    fingerprint = _fingerprint(cfg, model, data, train)
    fingerprint["oracle"] = cfg.oracle
    ledger = _ledger_path(cfg)
    fingerprint["dp_ledger_sha256"] = sha256_file(ledger) if ledger is not None else None
    if cfg.watermark_key is not None and not Path(cfg.watermark_key).is_file():
        raise DataError(f"--watermark-key {cfg.watermark_key}: no such file")
    fingerprint["watermark_key_sha256"] = (
        sha256_file(Path(cfg.watermark_key)) if cfg.watermark_key is not None else None
    )
    run_dir = RunDir(cfg.out, fingerprint, fresh=cfg.fresh)
    ctx = ScanContext(
        run_dir=run_dir,
        model=model,
        oracle=oracle,
        data=data,
        train_data=train,
        seed=cfg.seed,
        device=device,
        profile=cfg.profile,
        norm=cfg.norm,
        options={
            "bounds": cfg.bounds,
            "eps": cfg.eps,
            "sensitive_feature": cfg.sensitive_feature,
            "dp_ledger": ledger,
            "watermark_key": cfg.watermark_key,
        },
    )
    names = [n for n in ordered_probe_names() if not cfg.only or n in cfg.only]
    plan: list[tuple[Probe, str | None, ProbeResult | None]] = []
    for name in names:
        probe = PROBES.get(name)()
        reason = probe.applies(ctx)
        plan.append((probe, reason, run_dir.finished(probe.name) if reason is None else None))
    estimate = estimate_plan([(p, r, d is not None) for p, r, d in plan], ctx, cfg.profile)
    if on_plan is not None:
        on_plan(estimate)
    else:
        for line in estimate.lines():
            logger.info("%s", line)
    seed_everything(cfg.seed)  # the calibration drew random numbers
    results: list[ProbeResult] = []
    reused: list[str] = []
    for (probe, reason, done), row in tqdm(
        list(zip(plan, estimate.probes, strict=True)), desc="probes", unit="probe", disable=None
    ):
        if reason is not None:
            results.append(probe.skipped(reason, ctx))
            continue
        if done is not None:
            logger.info("%s: finished in an earlier run, reusing its result", probe.name)
            reused.append(probe.name)
            results.append(done)
            continue
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        result = _run_probe(probe, ctx)
        row.actual_seconds = time.perf_counter() - t0
        row.status = result.status
        if result.status == "ok":
            run_dir.save(result)
        results.append(result)
    report = build_report(
        probes=results,
        run=run_record(
            cfg.command,
            cfg.seed,
            device,
            started,
            profile=cfg.profile,
            resumed_probes=reused,
            estimate=estimate.to_dict(),
        ),
        target={
            "model": (
                model.file.to_dict()
                if model is not None
                else {
                    "path": cfg.oracle,
                    "sha256": None,
                    "format": "http-endpoint" if cfg.oracle else None,
                }
            ),
            "data": _describe(data) or {"path": None, "sha256": None, "format": None},
            "train_data": _describe(train),
        },
        rubric=rubric_document(),
    )
    paths = write_reports(report, run_dir.root)
    return ScanOutcome(
        out=run_dir.root, reports=paths, results=results, reused=reused, plan=estimate
    )
