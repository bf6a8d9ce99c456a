"""The scan's plan and time estimate: shown before any probe runs, kept in report.json.

No test here asserts a wall-clock time: only that estimates exist, are finite and positive,
are built from the cost model's counts, and come before the work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from modelshield.evasion.ensemble import FAST
from modelshield.report import load_schema
from modelshield.scan.estimate import Cost, ScanPlan, UnitTimes, format_seconds, seconds_for
from modelshield.scan.probe.evasion import ensemble_passes
from modelshield.scan.probes import ordered_probe_names
from tests.conftest import Bundle, run_cli
from tests.scan.test_scan import scan_args


def test_seconds_are_counts_times_measured_units() -> None:
    units = UnitTimes(seconds={"forward": 0.5, "backward": 2.0, "query": None})
    assert seconds_for(Cost({"forward": 10, "backward": 3}), units) == pytest.approx(11.0)
    assert seconds_for(Cost({"query": 5}), units) is None  # a unit that could not be timed
    assert seconds_for(Cost({"query": 0, "forward": 2}), units) == pytest.approx(1.0)
    assert seconds_for(Cost(), units) == 0.0
    both = Cost({"forward": 1}, "a") + Cost({"forward": 2, "backward": 1}, "b", bound="upper")
    assert both.work == {"forward": 3, "backward": 1} and both.bound == "upper"


def test_ensemble_passes_follow_the_members() -> None:
    ce, t = FAST[0].kwargs["steps"], FAST[1].kwargs["steps"]
    targets = FAST[1].kwargs["n_target_classes"]
    bwd, fwd, text = ensemble_passes("autoattack-fast", 1.0, num_classes=10)
    assert (bwd, fwd) == (ce + targets * t, 0)
    assert "apgd-t" in text
    # APGD-T needs 3 classes and at most K-1 targets; scale_steps scales every member
    assert ensemble_passes("autoattack-fast", 1.0, num_classes=2)[0] == ce
    assert ensemble_passes("autoattack-fast", 0.5, num_classes=3)[0] == ce / 2 + 2 * t / 2
    bwd, fwd, _ = ensemble_passes("autoattack", 1.0, num_classes=10)
    assert fwd > 0  # Square spends forward passes (queries)


def test_format_seconds() -> None:
    assert format_seconds(0.4) == "0.4 s"
    assert format_seconds(200) == "3 min 20 s"
    assert format_seconds(3 * 3600 + 300) == "3 h 05 min"
    assert format_seconds(math.inf) == "unknown"


def test_plan_lines_say_run_reuse_and_skip() -> None:
    from modelshield.scan.estimate import ProbePlan

    plan = ScanPlan(
        "quick",
        [
            ProbePlan("a", "A", "run", cost=Cost({"forward": 4}, bound="upper"), seconds=2.0),
            ProbePlan("b", "B", "skip", reason="no training data given (--train-data)"),
            ProbePlan("c", "C", "reuse", seconds=0.0),
        ],
        UnitTimes(seconds={"forward": 0.5}),
    )
    lines = plan.lines()
    assert any(line.split()[:2] == ["run", "a"] and "at most 2.0 s" in line for line in lines)
    assert any(line.split()[:2] == ["skip", "b"] and "--train-data" in line for line in lines)
    assert any(line.split()[:2] == ["done", "c"] for line in lines)
    assert lines[-1] == "expected time: at most 2.0 s"
    assert plan.to_dict()["total_seconds"] == 2.0


def test_scan_shows_the_plan_before_it_starts(tmp_path: Path, bundle: Bundle) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "scan"
    r = run_cli(*scan_args(bundle, out, "--profile", "quick"))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    err = r.stderr.splitlines()
    start = err.index("plan (quick profile):")
    total = next(i for i, line in enumerate(err) if line.startswith("expected time:"))
    plan_lines = err[start + 1 : total]
    # every registered probe has a line: run with a time, or skip with its reason
    probes = {p["probe"]: p for p in report["probes"]}
    assert [line.split()[1] for line in plan_lines] == ordered_probe_names()
    for line in plan_lines:
        action, name = line.split()[:2]
        if probes[name]["status"] == "skipped":
            assert action == "skip" and line.endswith(probes[name]["reason"])
        else:
            assert action == "run" and line.endswith(" s")
    # the plan comes before the first probe's progress output
    first_work = next(i for i, line in enumerate(err) if "robustness:" in line)
    assert total < first_work
    est = report["run"]["estimate"]
    assert 0 < est["total_seconds"] < math.inf and est["complete"]
    assert f"{est['total_seconds']:.1f}" in err[total] or "min" in err[total]
    rows = {p["probe"]: p for p in est["probes"]}
    assert list(rows) == ordered_probe_names()
    for name, p in probes.items():
        row = rows[name]
        if p["status"] == "skipped":
            assert row["action"] == "skip" and row["reason"] == p["reason"]
            assert row["estimated_seconds"] is None and row["actual_seconds"] is None
        else:
            assert row["action"] == "run" and row["actual_seconds"] is not None
            assert row["estimated_seconds"] is not None and row["estimated_seconds"] >= 0
            assert row["basis"]
    # the evasion probe's work is counted from its profile, not guessed
    ev = rows["evasion-whitebox"]
    assert ev["bound"] == "upper" and ev["work"]["backward"] > 0
    assert set(est["calibration"]["unit_seconds"]) >= {"forward", "backward"}
    html = (out / "report.html").read_text()
    assert "estimated at most" in html
    for p in probes.values():
        if p["status"] == "skipped":
            assert p["reason"].split("(")[0].strip() in html


def test_rerun_plan_marks_finished_probes_done(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "scan"
    args = scan_args(bundle, out, "--profile", "quick", "--only", "model-file")
    assert run_cli(*args).returncode == 0
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:2] == ["done", "model-file"] for line in r.stderr.splitlines())
    est = json.loads((out / "report.json").read_text())["run"]["estimate"]
    assert [p["action"] for p in est["probes"]] == ["reuse"]
