"""The grading rubric: thresholds as documented, and near-chance models capped."""

from __future__ import annotations

import pytest

from modelshield.scan.rubric import (
    RUBRIC_VERSION,
    grade_evasion,
    grade_supply_chain,
    rubric_document,
)


@pytest.mark.parametrize(
    ("clean", "robust", "grade"),
    [
        (0.9, 0.85, "A"),
        (0.9, 0.6, "B"),
        (0.9, 0.4, "C"),
        (0.9, 0.2, "D"),
        (0.9, 0.1, "F"),
        (0.14, 0.11, "D"),
        (0.3, 0.01, "F"),
        (0.0, 0.0, "F"),
    ],
)
def test_evasion_grades(clean: float, robust: float, grade: str) -> None:
    assert grade_evasion(clean, robust)[0] == grade


def test_supply_chain_grades() -> None:
    assert grade_supply_chain(False, [], [])[0] == "A"
    assert grade_supply_chain(True, [], [])[0] == "C"
    assert grade_supply_chain(True, [], ["mypkg.Net"])[0] == "D"
    assert grade_supply_chain(True, ["os.system"], [])[0] == "F"


def test_document_names_its_version() -> None:
    doc = rubric_document()
    assert doc["version"] == RUBRIC_VERSION and "capped at D" in doc["text"]


def test_every_graded_risk_names_its_harden_command() -> None:
    from modelshield.scan.rubric import HARDEN_COMMANDS, harden_command

    doc = rubric_document()["text"]
    for risk in ("evasion", "privacy", "extraction", "poisoning", "watermark"):
        cmd = harden_command(risk)
        assert cmd.startswith("modelshield harden ") and cmd in doc
    assert set(HARDEN_COMMANDS.values()) == {
        f"modelshield harden {n}"
        for n in ("adversarial", "dp", "gateway", "watermark", "poison-removal")
    }


def test_remedies_point_at_harden_commands() -> None:
    from modelshield.core.results import ExtractionResult, MembershipResult, PoisonResult
    from modelshield.scan.probe.extraction import extraction_probe_result
    from modelshield.scan.probe.membership import membership_probe_result
    from modelshield.scan.probe.poisoning import detection_probe_result

    leak = MembershipResult(attack="loss", auc=0.9, tpr_at_fpr={"0.01": 0.5, "0.001": 0.2})
    assert "modelshield harden dp" in membership_probe_result(leak).recommendation
    copy = ExtractionResult(method="knockoff", fidelity=0.95, queries_used=100)
    copy.details = {"n_eval": 100, "agree": 95}
    assert "modelshield harden gateway" in extraction_probe_result(copy).recommendation
    poison = PoisonResult(method="spectral", indices=[1, 2], details={"n": 10})
    assert "modelshield harden poison-removal" in detection_probe_result(poison).recommendation
