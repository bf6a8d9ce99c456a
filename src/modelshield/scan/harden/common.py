"""The before/after scaffolding every ``modelshield harden`` command shares.

A hardening run measures the model with scan probes, applies one defence, writes the new
model (or gateway config), measures it again with the *same* probes, and writes a report
whose first section is the side-by-side comparison. This module holds the parts that do
not depend on the defence: the resumable per-side measurement (:class:`Comparison`), the
comparison section (:func:`hardening_result`), loading the train/test pair, and the
report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.results import ProbeResult
from modelshield.report import build_report, write_reports
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
