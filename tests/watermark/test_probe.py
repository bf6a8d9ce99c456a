"""The scan's watermark probe (`scan --watermark-key`): informational, schema-valid, no seed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import modelshield.scan.probe.watermark  # noqa: F401  (registers the probe)
from modelshield.report import load_schema
from modelshield.scan.probes import PROBES
from modelshield.scan.runner import ScanConfig, run_scan
from modelshield.watermark import WatermarkKey, embed
from tests.conftest import Bundle


@pytest.fixture(scope="module")
def marked_file(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wm-probe")
    train = np.load(bundle.train)
    x, y = torch.from_numpy(train["x"]).float(), torch.from_numpy(train["y"]).long()
    key = WatermarkKey.generate(input_shape=(1, 6, 6), num_classes=3, n=60, seed=11)
    net = embed(copy.deepcopy(bundle.module), x, y, key, epochs=40, lr=1e-2, seed=0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(prog, root / "marked.pt2")
    return root / "marked.pt2", key.save(root / "key.json")


def test_probe_is_registered_and_informational() -> None:
    probe = PROBES.get("watermark")
    assert probe.risk == "watermark" and probe.name == "watermark"


@pytest.mark.parametrize("which", ["marked", "unmarked"])
def test_scan_verifies_the_key(
    which: str, marked_file: tuple[Path, Path], bundle: Bundle, tmp_path: Path
) -> None:
    model, key_path = marked_file
    target = model if which == "marked" else bundle.model_pt2
    cfg = ScanConfig(
        model=str(target),
        data=str(bundle.data),
        out=str(tmp_path / "scan"),
        watermark_key=str(key_path),
        only=["watermark", "model-file"],
    )
    outcome = run_scan(cfg)
    res = {r.probe: r for r in outcome.results}["watermark"]
    assert res.status == "ok" and res.grade is None and res.risk == "watermark"
    assert res.details["verified"] is (which == "marked")
    assert res.details["n_triggers"] == 60 and res.details["access"] == "white-box"
    report = json.loads((tmp_path / "scan" / "report.json").read_text())
    pytest.importorskip("jsonschema").validate(report, load_schema())
    seed_hex = f"{WatermarkKey.load(key_path).seed:032x}"
    for name in ("report.json", "report.html", "report.md"):
        assert seed_hex not in (tmp_path / "scan" / name).read_text()
    assert "Watermark" in (tmp_path / "scan" / "report.html").read_text()


def test_probe_skips_without_a_key(bundle: Bundle, tmp_path: Path) -> None:
    cfg = ScanConfig(
        model=str(bundle.model_pt2),
        data=str(bundle.data),
        out=str(tmp_path / "s"),
        only=["watermark"],
    )
    (res,) = run_scan(cfg).results
    assert res.status == "skipped" and "watermark-key" in res.reason


def test_wrong_key_is_an_error_entry_not_a_crash(bundle: Bundle, tmp_path: Path) -> None:
    key = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=10, seed=1).save(
        tmp_path / "k.json"
    )
    cfg = ScanConfig(
        model=str(bundle.model_pt2),
        data=str(bundle.data),
        out=str(tmp_path / "s"),
        watermark_key=str(key),
        only=["watermark"],
    )
    (res,) = run_scan(cfg).results
    assert res.status == "error" and "shape" in res.reason
