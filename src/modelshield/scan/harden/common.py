"""The before/after scaffolding every ``modelshield harden`` command shares.

A hardening run measures the model with scan probes, applies one defence, writes the new
model (or gateway config), measures it again with the *same* probes, and writes a report
whose first section is the side-by-side comparison. This module holds the parts that do
not depend on the defence: the resumable per-side measurement (:class:`Comparison`), the
comparison section (:func:`hardening_result`), the start of a run (:func:`start`,
:func:`load_pair`; the model through
:func:`~modelshield.core.loading.load_given_model`), the report and ``result.json``
(:func:`write_report`, :func:`finish`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelshield import __version__
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.io import atomic_write_json
from modelshield.core.results import ProbeResult
from modelshield.core.train import train_classifier
from modelshield.report import build_report, write_reports
from modelshield.scan.audit import _prepare
from modelshield.scan.context import PROFILES, ScanContext
from modelshield.scan.probes import Probe
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import RunDir, run_record

logger = logging.getLogger(__name__)

SIDES = ("before", "after")


@dataclass
class HardenOutcome:
    """What a ``harden`` command wrote and measured."""

    out: Path
    model_path: Path
    reports: dict[str, Path]
    results: list[ProbeResult]
    summary: dict[str, Any] = field(default_factory=dict)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise InvalidConfigError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    return profile


def start(opts: dict[str, Any], *, profile: bool = True) -> tuple[float, Any]:
    """Check the seed (and, with ``profile``, ``--profile``), pick the device and seed
    everything; returns (start time, device)."""
    started, device = _prepare(opts)
    if profile:
        check_profile(opts["profile"])
    return started, device


def load_pair(
    train_data: str, data: str, bounds: tuple[float, float], label_column: str | None = None
) -> tuple[Dataset, Dataset]:
    """``--train-data`` and ``--data``, checked to have the same sample shape and classes."""
    train = load_dataset(train_data, bounds=bounds, label_column=label_column)
    test = load_dataset(data, bounds=bounds, label_column=label_column)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(
            f"--train-data samples have shape {tuple(train.x.shape[1:])} but --data samples "
            f"have {tuple(test.x.shape[1:])}"
        )
    if len(test) and int(test.y.max()) >= train.num_classes:
        raise DataError(
            f"--data has label {int(test.y.max())}, but --train-data has {train.num_classes} classes"
        )
    return train, test


def renamed(result: ProbeResult, name: str, title: str) -> ProbeResult:
    """``result`` under another probe name and title (``NAME-before``, ``NAME-after``)."""
    result.probe, result.title = name, title
    return result


class Comparison:
    """Runs scan probes on one side (``before`` or ``after``) of a hardening, resumably.

    Each measurement is stored as ``probes/NAME-SIDE.json`` in the run directory; a
    re-run of the same command reuses it instead of measuring again.
    """

    def __init__(
        self,
        run_dir: RunDir,
        *,
        seed: int,
        device: torch.device,
        profile: str,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.seed = seed
        self.device = device
        self.profile = profile
        self.options = dict(options or {})

    def context(self, **kwargs: Any) -> ScanContext:
        options = {**self.options, **kwargs.pop("options", {})}
        return ScanContext(
            run_dir=self.run_dir,
            seed=self.seed,
            device=self.device,
            profile=self.profile,
            options=options,
            **kwargs,
        )

    def measure(
        self,
        probe: Probe,
        side: str,
        *,
        fallback: Callable[[ScanContext, str], ProbeResult] | None = None,
        **ctx: Any,
    ) -> ProbeResult:
        """``probe`` on this side's model (``ctx``: :class:`ScanContext` fields).

        When the probe does not apply (e.g. no ledger before DP training), ``fallback``
        builds the result from the reason; without one the reason is an error.
        """
        if side not in SIDES:
            raise InvalidConfigError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        name, title = f"{probe.name}-{side}", f"{probe.title} ({side} hardening)"
        done = self.run_dir.finished(name)
        if done is not None:
            logger.info("%s: finished in an earlier run, reusing its result", name)
            return done
        probe.name, probe.title = name, title  # its checkpoints go under partial/NAME
        context = self.context(**ctx)
        reason = probe.applies(context)
        if reason is not None:
            if fallback is None:
                raise InvalidConfigError(f"{name}: cannot measure: {reason}")
            result = fallback(context, reason)
        else:
            result = probe.run(context)
        renamed(result, name, title)
        self.run_dir.save(result)
        return result

    def keep(self, result: ProbeResult, side: str) -> ProbeResult:
        """Store a measurement made outside a probe class under ``NAME-SIDE``."""
        renamed(result, f"{result.probe}-{side}", f"{result.title} ({side} hardening)")
        self.run_dir.save(result)
        return result

    def finished(self, name: str, side: str) -> ProbeResult | None:
        return self.run_dir.finished(f"{name}-{side}")

    def report(
        self,
        results: list[ProbeResult],
        *,
        command: str,
        started: float,
        model: dict[str, Any],
        data: Dataset,
        train_data: Dataset | None,
    ) -> dict[str, Path]:
        """:func:`write_report` into the run directory, with this comparison's seed, device
        and profile; the target is ``model`` (its file record) and the data sets."""
        return write_report(
            self.run_dir.root,
            results,
            command=command,
            seed=self.seed,
            device=self.device,
            started=started,
            profile=self.profile,
            target={
                "model": model,
                "data": data.describe(),
                "train_data": train_data.describe() if train_data is not None else None,
            },
        )


def open_run(
    opts: dict[str, Any],
    device: torch.device,
    fingerprint: dict[str, Any],
    *,
    profile: str | None = None,
    fresh: bool | None = None,
) -> Comparison:
    """The run directory ``--out`` of a ``harden`` command and its :class:`Comparison`.

    ``fingerprint`` (``command`` first) is what a re-run must match to resume; the
    modelshield version is added. ``profile`` and ``fresh`` default to ``--profile`` and
    ``--fresh``."""
    run_dir = RunDir(
        opts["out"],
        {**fingerprint, "modelshield_version": __version__},
        fresh=opts.get("fresh", False) if fresh is None else fresh,
    )
    return Comparison(
        run_dir,
        seed=opts["seed"],
        device=device,
        profile=opts["profile"] if profile is None else profile,
    )


def train_baseline(
    module: nn.Module,
    train: Dataset,
    *,
    device: Any,
    through: Callable[[nn.Module], nn.Module] | None = None,
    **settings: Any,
) -> nn.Module:
    """A copy of ``module`` trained on ``train`` without the defence (``settings``: those
    of :func:`train_classifier`): the "before" model of a run that trains from scratch.

    ``through`` wraps the copy for training (e.g. behind ``--mean/--std``); the copy
    itself is returned.
    """
    baseline = copy.deepcopy(module)
    trained = through(baseline) if through is not None else baseline
    train_classifier(trained, train.x, train.y, device=device, **settings)
    return baseline


def _fmt(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def hardening_result(
    *,
    title: str,
    risk: str,
    defence: str,
    rows: Sequence[tuple[str, Any, Any]],
    figure: dict[str, Any],
    grade: str | None,
    rule: str,
    meaning: str,
    recommendation: str,
    seed: int,
    config: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    wall_time: float = 0.0,
    plots: Sequence[dict[str, Any]] = (),
    flags: Sequence[str] = (),
) -> ProbeResult:
    """The report's comparison section (probe ``hardening``): one row per figure, before
    and after, both measured by the same probes; ``details`` gets ``before``/``after``
    dictionaries keyed by the rows' names."""
    key = [r[0].replace(" ", "_") for r in rows]
    before = {k: r[1] for k, r in zip(key, rows, strict=True)}
    after = {k: r[2] for k, r in zip(key, rows, strict=True)}
    table = {
        "kind": "table",
        "title": "Before and after",
        "columns": ["", "before", "after"],
        "rows": [[name, _fmt(b), _fmt(a)] for name, b, a in rows],
    }
    return ProbeResult(
        probe="hardening",
        title=title,
        risk=risk,
        status="ok",
        seed=seed,
        wall_time=wall_time,
        config={"defence": defence, **(config or {})},
        figure=figure,
        grade=grade,
        meaning=meaning,
        recommendation=recommendation,
        threat={"defence": defence, "rule": rule},
        details={"before": before, "after": after, "rule": rule, **(details or {})},
        plots=[*plots, table],
        flags=list(flags),
    )


def write_report(
    out: Path,
    results: list[ProbeResult],
    *,
    command: str,
    seed: int,
    device: Any,
    started: float,
    profile: str,
    target: dict[str, Any],
) -> dict[str, Path]:
    """Build (schema-validated) and write report.json/html/md beside the new model."""
    report = build_report(
        probes=results,
        run=run_record(command, seed, device, started, profile=profile),
        target=target,
        rubric=rubric_document(),
    )
    return write_reports(report, out)


def finish(
    out: Path,
    summary: ProbeResult,
    results: list[ProbeResult],
    reports: dict[str, Path],
    *,
    model_path: Path,
    paths: dict[str, str],
    **extra: Any,
) -> HardenOutcome:
    """Write ``result.json`` (the summary's details, ``extra``, and ``paths`` with the
    reports' and its own) and return the outcome. Call it last: the file's presence means
    the run finished."""
    result = {
        **summary.details,
        **extra,
        "paths": {
            **paths,
            "html": str(reports["html"]),
            "json": str(reports["json"]),
            "result": str(out / "result.json"),
        },
    }
    atomic_write_json(out / "result.json", result)
    return HardenOutcome(
        out=out, model_path=model_path, reports=reports, results=results, summary=result
    )
