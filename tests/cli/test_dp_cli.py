"""``modelshield train --dp`` and ``modelshield audit dp`` through the real command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from modelshield.core.loading import load_model
from modelshield.report import validate_report
from tests.conftest import Bundle, run_cli
from tests.privacy import dp_trainers

LEDGER_KEYS = {
    "mechanism",
    "sample_rate",
    "noise_multiplier",
    "steps",
    "accountant",
    "epsilon",
    "delta",
}


def test_train_dp_writes_model_ledger_and_report(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "dp"
    r = run_cli(
        "train", "--dp", "--epsilon", "2", "--delta", "1e-5", "--train-data", str(bundle.train),
        "--data", str(bundle.data), "--arch", "mlp", "--epochs", "4", "--batch-size", "20",
        "--lr", "0.5", "--mode", "hooks", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "dp-sgd: epsilon" in r.stdout and "secure RNG off" in r.stderr
    ledger = json.loads((out / "ledger.json").read_text())
    assert set(ledger) >= LEDGER_KEYS
    assert ledger["epsilon"] <= 2.0 * 1.001 and ledger["accountant"] == "prv"
    assert ledger["grad_sample_mode"] == "hooks" and len(ledger["per_epoch"]) == 4
    result = json.loads((out / "result.json").read_text())
    assert result["private"] and result["accuracy"] is not None
    assert not (out / "checkpoint.pt").exists()
    # the model file is a normal model for every other command
    loaded = load_model(out / "model.pt2")
    x = torch.from_numpy(np.load(bundle.data)["x"]).float()
    assert loaded.classifier is not None and loaded.classifier(x).shape == (len(x), 3)
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    probe = report["probes"][0]
    assert probe["probe"] == "dp-training" and "insecure-rng" in probe["flags"]
    # a scan of the model finds the ledger beside it and checks it belongs to this file
    r = run_cli(
        "scan", "--model", str(out / "model.pt2"), "--data", str(bundle.data),
        "--only", "dp-claim", "--out", str(tmp_path / "scan"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    claim = json.loads((tmp_path / "scan" / "report.json").read_text())["probes"][0]
    assert claim["probe"] == "dp-claim" and claim["grade"] in "AB"
    assert claim["details"]["model_sha256_matches"] is True


def test_train_dp_reports_the_batchnorm_fix(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "bn"
    r = run_cli(
        "train", "--dp", "--noise-multiplier", "1.0", "--train-data", str(bundle.train),
        "--arch", "tests.privacy.dp_trainers:bn_net", "--epochs", "1", "--batch-size", "20",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "BatchNorm2d -> GroupNorm" in r.stderr
    assert json.loads((out / "result.json").read_text())["module_fixes"] == [
        "1: BatchNorm2d -> GroupNorm"
    ]


def test_train_refuses_a_budget_it_would_exceed_and_writes_nothing(
    tmp_path: Path, bundle: Bundle
) -> None:
    out = tmp_path / "over"
    r = run_cli(
        "train", "--dp", "--noise-multiplier", "0.3", "--max-epsilon", "0.5",
        "--train-data", str(bundle.train), "--epochs", "5", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("modelshield: error: refusing to train")
    assert "over the budget 0.5" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_train_option_errors_are_one_line(tmp_path: Path, bundle: Bundle) -> None:
    cases = [
        (["--dp"], "--dp needs --epsilon"),
        (["--no-dp", "--epsilon", "1"], "--epsilon contradicts --no-dp"),
        (["--max-epsilon", "1"], "--max-epsilon needs --epsilon"),
        (["--dp", "--epsilon", "-1"], "epsilon must be a positive number"),
        (["--dp", "--epsilon", "1", "--delta", "2"], "delta must be in (0, 1)"),
    ]
    for extra, message in cases:
        r = run_cli(
            "train", "--train-data", str(bundle.train), "--out", str(tmp_path / "x"), *extra
        )
        assert r.returncode == 2, (extra, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    bad = tmp_path / "nan.npz"
    x = np.random.rand(20, 1, 6, 6).astype(np.float32)
    x[3, 0, 0, 0] = np.nan
    np.savez(bad, x=x, y=np.arange(20) % 3)
    r = run_cli(
        "train", "--dp", "--epsilon", "1", "--train-data", str(bad), "--out", str(tmp_path / "y")
    )
    assert r.returncode == 2 and "NaN" in r.stderr and "Traceback" not in r.stderr


def _blobs_npz(path: Path, n: int) -> Path:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    centers = 0.5 + 0.2 * torch.randn(3, 1, 6, 6, generator=g)
    x = (centers[y] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


def test_audit_dp_flags_a_broken_trainer(tmp_path: Path) -> None:
    data = _blobs_npz(tmp_path / "train.npz", 100)
    claim = dp_trainers.claimed_epsilon(300)
    out = tmp_path / "audit"
    r = run_cli(
        "audit", "dp", "--method", "one-run", "--trainer", "tests.privacy.dp_trainers:noise_left_out",
        "--claimed-epsilon", f"{claim}", "--train-data", str(data), "--canaries", "400",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "BROKEN" in r.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["eps_lower"] > result["eps_claimed"] == claim
    assert result["broken"] and result["method"] == "one-run"
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    probe = report["probes"][0]
    assert probe["grade"] == "F" and "broken-dp" in probe["flags"]
    assert "BROKEN DP" in (out / "report.html").read_text()


def test_audit_dp_non_private_and_canaries(tmp_path: Path) -> None:
    data = _blobs_npz(tmp_path / "train.npz", 100)
    r = run_cli(
        "audit", "dp", "--method", "one-run", "--no-dp", "--train-data", str(data), "--canaries", "300",
        "--epochs", "60", "--batch-size", "32", "--out", str(tmp_path / "plain"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plain = json.loads((tmp_path / "plain" / "result.json").read_text())
    assert plain["eps_claimed"] is None and plain["eps_lower"] > 0.5 and not plain["broken"]
    r = run_cli(
        "audit", "dp", "--method", "canaries", "--epsilon", "1", "--train-data", str(data),
        "--runs", "6", "--epochs", "2", "--batch-size", "20", "--out", str(tmp_path / "many"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    many = json.loads((tmp_path / "many" / "result.json").read_text())
    assert many["runs"] == 6 and many["eps_claimed"] == 1.0 and len(many["scores"]) == 6
    assert many["eps_lower"] <= 1.0 and not (tmp_path / "many" / "progress.json").exists()


def test_audit_dp_errors(tmp_path: Path) -> None:
    data = _blobs_npz(tmp_path / "train.npz", 40)
    cases = [
        (["--trainer", "nope.module:fn"], "cannot import"),
        (
            ["--trainer", "tests.privacy.dp_trainers:correct", "--dp", "--epsilon", "1"],
            "--claimed-epsilon",
        ),
        (["--confidence", "1.5"], "must be in (0, 1)"),
        (["--method", "canaries", "--runs", "5"], "even number"),
    ]
    for extra, message in cases:
        r = run_cli("audit", "dp", "--train-data", str(data), "--out", str(tmp_path / "o"), *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
