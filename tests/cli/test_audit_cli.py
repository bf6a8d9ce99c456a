"""`modelshield audit membership` and the scan's membership probe, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelshield.core.architectures import build
from modelshield.core.data import load_dataset
from modelshield.core.train import train_classifier
from modelshield.report import load_schema
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """An MLP trained to memorise 300 noisy digits: it leaks membership."""
    root = tmp_path_factory.mktemp("mia")
    full = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    full.x = (full.x + 0.3 * torch.randn(full.x.shape, generator=g)).clamp(0, 1)
    train, test = full.split(300 / len(full), seed=0)
    torch.manual_seed(0)
    net = build("mlp", (1, 8, 8), 10)
    train_classifier(net, train.x, train.y, epochs=150, seed=0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(net.eval(), (train.x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, root / "model.pt2")
    train.to_npz(root / "train.npz")
    test.to_npz(root / "test.npz")
    return root / "model.pt2", root / "train.npz", root / "test.npz"


def test_audit_membership_loss_and_lira(tmp_path: Path, overfit: tuple[Path, Path, Path]) -> None:
    model, train, test = overfit
    figures = {}
    for attack in ("loss", "lira"):
        out = tmp_path / attack
        r = run_cli(
            "audit",
            "membership",
            "--model",
            str(model),
            "--train-data",
            str(train),
            "--data",
            str(test),
            "--attack",
            attack,
            "--shadow-models",
            "4",
            "--shadow-epochs",
            "60",
            "--n",
            "300",
            "--out",
            str(out),
        )
        assert r.returncode == 0, r.stderr
        res = json.loads((out / "result.json").read_text())
        assert set(res["tpr_at_fpr"]) >= {"0.001", "0.01"}
        assert 0 <= res["auc"] <= 1 and res["n_members"] == res["n_nonmembers"] == 300
        report = json.loads((out / "report.json").read_text())
        pytest.importorskip("jsonschema").validate(report, load_schema())
        figures[attack] = res
    assert figures["loss"]["auc"] > 0.6  # the memorising model leaks
    assert figures["lira"]["tpr_at_fpr"]["0.01"] >= figures["loss"]["tpr_at_fpr"]["0.01"]
    # reference models are cached: a second LiRA run trains nothing
    again = run_cli(
        "audit",
        "membership",
        "--model",
        str(model),
        "--train-data",
        str(train),
        "--data",
        str(test),
        "--attack",
        "lira",
        "--shadow-models",
        "4",
        "--shadow-epochs",
        "60",
        "--n",
        "300",
        "--out",
        str(tmp_path / "lira"),
    )
    assert again.returncode == 0
    assert json.loads((tmp_path / "lira" / "result.json").read_text())["config"]["trained"] == 0


def test_scan_runs_membership_when_train_data_is_given(
    tmp_path: Path, overfit: tuple[Path, Path, Path]
) -> None:
    model, train, test = overfit
    out = tmp_path / "scan"
    r = run_cli(
        "scan",
        "--model",
        str(model),
        "--data",
        str(test),
        "--train-data",
        str(train),
        "--profile",
        "quick",
        "--only",
        "membership",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    (probe,) = json.loads((out / "report.json").read_text())["probes"]
    assert probe["status"] == "ok" and probe["grade"] in "ABCDF"
    assert probe["plots"][0]["x_scale"] == "log"
    skip = run_cli(
        "scan",
        "--model",
        str(model),
        "--data",
        str(test),
        "--only",
        "membership",
        "--out",
        str(tmp_path / "scan2"),
    )
    assert skip.returncode == 0
    (probe,) = json.loads((tmp_path / "scan2" / "report.json").read_text())["probes"]
    assert probe["status"] == "skipped" and "--train-data" in probe["reason"]


def test_audit_errors(tmp_path: Path, overfit: tuple[Path, Path, Path]) -> None:
    model, train, test = overfit
    common = [
        "audit",
        "membership",
        "--model",
        str(model),
        "--train-data",
        str(train),
        "--data",
        str(test),
    ]
    assert_one_line_error(
        run_cli(*common, "--attack", "nope", "--out", str(tmp_path / "a")), "nope"
    )
    assert_one_line_error(
        run_cli(*common, "--shadow-models", "3", "--out", str(tmp_path / "b")), "even"
    )
    assert_one_line_error(
        run_cli(*common, "--shadow-arch", "vgg", "--out", str(tmp_path / "c")), "vgg"
    )
