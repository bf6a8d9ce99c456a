"""The dp-claim probe: a privacy ledger is recomputed and matched to its model file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelshield.core.io import sha256_file
from modelshield.privacy.accounting import compute_epsilon
from modelshield.scan.runner import ScanConfig, run_scan
from tests.conftest import Bundle, run_cli


def _ledger(model: Path | None, **override: object) -> dict[str, object]:
    q, sigma, steps, delta = 0.1, 1.2, 50, 1e-5
    d: dict[str, object] = {
        "mechanism": "poisson_subsampled_gaussian",
        "sample_rate": q,
        "noise_multiplier": sigma,
        "steps": steps,
        "accountant": "prv",
        "epsilon": compute_epsilon(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta),
        "delta": delta,
        "max_grad_norm": 1.0,
        "expected_batch_size": 12,
        "dataset_size": 120,
        "epochs": 5,
        "sampling": "poisson",
        "grad_sample_mode": "hooks",
        "secure_rng": True,
        "rng_note": "secure RNG on",
        "model_sha256": sha256_file(model) if model is not None else None,
    }
    d.update(override)
    return d


def _scan(tmp_path: Path, bundle: Bundle, ledger: dict[str, object] | None, name: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    model = folder / "model.pt2"
    shutil.copy(bundle.model_pt2, model)
    if ledger is not None:
        (folder / "ledger.json").write_text(json.dumps(ledger))
    outcome = run_scan(
        ScanConfig(
            model=str(model), data=str(bundle.data), out=str(folder / "scan"), only=["dp-claim"]
        )
    )
    return outcome.results[0].to_dict()


def test_a_consistent_ledger_beside_the_model_is_graded_by_its_epsilon(tmp_path, bundle):
    res = _scan(tmp_path, bundle, _ledger(bundle.model_pt2), "ok")
    eps = res["figure"]["value"]
    assert res["status"] == "ok" and res["flags"] == []
    assert res["grade"] == ("A" if eps <= 1 else "B" if eps <= 3 else "C")
    assert res["details"]["model_sha256_matches"] is True
    assert res["details"]["recomputed_epsilon"] == pytest.approx(eps)


def test_a_ledger_whose_epsilon_does_not_follow_from_its_parameters_fails(tmp_path, bundle):
    res = _scan(tmp_path, bundle, _ledger(bundle.model_pt2, epsilon=0.1), "low")
    assert res["grade"] == "F" and "ledger-inconsistent" in res["flags"]
    assert "give" in res["meaning"]


def test_a_ledger_for_another_model_fails(tmp_path, bundle):
    res = _scan(tmp_path, bundle, _ledger(None, model_sha256="0" * 64), "other")
    assert res["grade"] == "F" and res["flags"] == ["ledger-model-mismatch"]


def test_no_ledger_skips_with_a_reason_and_a_broken_one_is_an_error(tmp_path, bundle):
    res = _scan(tmp_path, bundle, None, "none")
    assert res["status"] == "skipped" and "ledger" in res["reason"]
    res = _scan(tmp_path, bundle, {"epsilon": 1.0}, "broken")
    assert res["status"] == "error" and "lacks" in res["reason"]


def test_scan_dp_ledger_flag_must_name_a_file(tmp_path, bundle):
    r = run_cli(
        "scan", "--model", str(bundle.model_pt2), "--data", str(bundle.data),
        "--dp-ledger", str(tmp_path / "missing.json"), "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert r.returncode == 2 and "--dp-ledger" in r.stderr and "Traceback" not in r.stderr
