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
