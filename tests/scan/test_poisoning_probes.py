"""The scan's poisoning probes on a backdoored digits model and on a clean one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelshield.core.data import load_dataset
from modelshield.poisoning import poison
from modelshield.poisoning.attacks import train_model
from modelshield.report import validate_report
from modelshield.scan.runner import ScanConfig, run_scan


def _save(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    program = torch.export.export(
        model, (example[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=4096)},)
    )
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("poison-scan")
    train, test = load_dataset("digits").split(0.8, seed=0)
    test.to_npz(root / "test.npz")
    bad = poison("badnets", train, rate=0.1, target_class=0, seed=0).dataset
    out: dict[str, dict] = {}
    for name, data in (("backdoored", bad), ("clean", train)):
        data.to_npz(root / f"{name}.npz")
        model = train_model(data, arch="small_cnn", epochs=30, seed=0)
        path = _save(model.module, data.x, root / f"{name}.pt2")
        cfg = ScanConfig(
            model=str(path),
            data=str(root / "test.npz"),
            train_data=str(root / f"{name}.npz"),
            out=str(root / f"scan-{name}"),
            profile="quick",
            only=["data-poisoning", "susceptibility"],
        )
        run_scan(cfg)
        out[name] = json.loads((root / f"scan-{name}" / "report.json").read_text())
    return out


def _probe(report: dict, name: str) -> dict:
    return next(p for p in report["probes"] if p["probe"] == name)


def test_reports_are_valid_and_carry_both_probes(scans: dict[str, dict]) -> None:
    for report in scans.values():
        validate_report(report)
        for name in ("data-poisoning", "susceptibility"):
            assert _probe(report, name)["status"] == "ok"


def test_detection_grades_the_poisoned_data_worse_than_the_clean(scans: dict[str, dict]) -> None:
    bad = _probe(scans["backdoored"], "data-poisoning")
    clean = _probe(scans["clean"], "data-poisoning")
    assert bad["figure"]["value"] > 0.08 and bad["grade"] == "F"
    assert clean["figure"]["value"] <= 0.01 and clean["grade"] in ("A", "B")


def test_susceptibility_retrains_the_architecture_and_measures_asr(scans: dict[str, dict]) -> None:
    sus = _probe(scans["clean"], "susceptibility")
    run = sus["details"]["runs"][0]
    assert run["rate"] == 0.01 and run["poisoned"] == round(0.01 * run["n_train"])
    assert run["clean_accuracy"]["value"] > 0.8  # the copy learned the task
    assert 0.0 <= sus["figure"]["value"] <= 1.0
    assert sus["grade"] in "ABCDF"
