"""The scan's extraction probe: applies, runs Knockoff within its budget, grades fidelity."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelshield.core.oracle import from_classifier
from modelshield.core.results import ExtractionResult
from modelshield.core.threat import QueryAccess
from modelshield.report import build_report, render_html
from modelshield.scan.context import ScanContext
from modelshield.scan.probe.extraction import ExtractionProbe, extraction_probe_result
from modelshield.scan.probes import PROBES
from modelshield.scan.rubric import EXTRACTION_THRESHOLDS, grade_extraction, rubric_document
from modelshield.scan.rundir import RunDir, run_record
from tests.extraction import digits_victim


def _report(result: object) -> dict:
    return build_report(
        probes=[result],  # type: ignore[list-item]
        run=run_record("test", 0, "cpu", 0.0),
        target={"model": {"path": None, "sha256": None, "format": None}, "data": {}},
        rubric=rubric_document(),
    )


@pytest.mark.parametrize(
    ("fid", "grade"), [(0.1, "A"), (0.5, "A"), (0.65, "B"), (0.8, "C"), (0.85, "D"), (0.95, "F")]
)
def test_grades(fid: float, grade: str) -> None:
    assert grade_extraction(fid)[0] == grade
    assert [g for g, _ in EXTRACTION_THRESHOLDS] == ["A", "B", "C", "D"]


def test_probe_on_a_white_box_model_and_on_a_label_only_oracle(tmp_path: Path) -> None:
    clf, _, held = digits_victim()
    probe = PROBES.get("extraction")()
    assert isinstance(probe, ExtractionProbe) and probe.risk == "extraction"
    ctx = ScanContext(run_dir=RunDir(tmp_path / "a", {}), data=held, profile="quick", white_box=clf)
    assert probe.applies(ctx) is None
    res = probe.run(ctx)
    assert res.status == "ok" and res.grade in "ABCDEF"
    # quick: 500 queries, capped by the pool (half of the 360 test samples)
    assert res.figure["name"] == "fidelity at 180 queries" and res.details["queries_used"] == 180
    assert res.figure["value"] > 0.7 and len(res.figure["ci"]) == 2
    assert "180" in res.meaning and "PRADA" in res.recommendation
    assert res.plots[0]["kind"] == "line" and res.plots[0]["series"][0]["x"][-1] == 180
    html = render_html(_report(res))
    assert "Extraction" in html

    oracle = from_classifier(clf, QueryAccess(output="label"))
    ctx = ScanContext(run_dir=RunDir(tmp_path / "b", {}), data=held, profile="quick", oracle=oracle)
    res = probe.run(ctx)
    assert res.status == "ok" and res.threat["access"] == "label"
    assert oracle.queries_used == 180 and oracle.access.output == "label"

    assert probe.applies(ScanContext(run_dir=RunDir(tmp_path / "c", {}))) is not None
    small = held.subset(list(range(10)))
    ctx = ScanContext(run_dir=RunDir(tmp_path / "d", {}), data=small, white_box=clf)
    assert "at least" in (probe.applies(ctx) or "")


def test_an_unmeasured_result_is_not_graded() -> None:
    res = ExtractionResult(method="knockoff", queries_used=10, curve=[{"queries": 10}])
    probe = extraction_probe_result(res)
    assert probe.grade is None and probe.figure["value"] is None and probe.plots == []
    _report(probe)
