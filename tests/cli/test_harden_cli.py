"""``modelshield harden dp|watermark|poison-removal|gateway`` through the real command, on
the bundled digits: each writes its model (or gateway config) and a before/after report
measured by the same probes, and the after figure moves the way the defence promises."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from modelshield.core.data import load_dataset
from modelshield.core.loading import load_model
from modelshield.report import validate_report
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits split 70/30 and an MLP trained on the 70% without privacy."""
    root = tmp_path_factory.mktemp("harden")
    train, test = load_dataset("digits").split(0.7, seed=0)
    paths = {"root": root, "train": root / "train.npz", "test": root / "test.npz"}
    train.to_npz(paths["train"])
    test.to_npz(paths["test"])
    r = run_cli(
        "train", "--arch", "mlp", "--train-data", str(paths["train"]), "--data",
        str(paths["test"]), "--epochs", "30", "--out", str(root / "plain"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    paths["model"] = root / "plain" / "model.pt2"
    return paths


def _report(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    return {p["probe"]: p for p in report["probes"]}


def _sides(probes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    d = probes["hardening"]["details"]
    return d["before"], d["after"]


def test_harden_dp_spends_at_most_epsilon_and_does_not_leak_more(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "dp"
    r = run_cli(
        "harden", "dp", "--model", str(digits["model"]), "--arch", "mlp",
        "--train-data", str(digits["train"]), "--data", str(digits["test"]),
        "--epsilon", "4", "--delta", "1e-5", "--epochs", "5", "--mode", "hooks", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in ("model.pt2", "ledger.json", "result.json", "report.html"):
        assert (out / name).is_file(), name
    ledger = json.loads((out / "ledger.json").read_text())
    assert 0 < ledger["epsilon"] <= 4 + 1e-9 and ledger["delta"] == 1e-5
    probes = _report(out)
    before, after = _sides(probes)
    assert before["claimed_epsilon"] is None and after["claimed_epsilon"] == ledger["epsilon"]
    # the same membership probe on both sides; DP must not make the leak worse beyond noise
    assert probes["membership-before"]["config"] == probes["membership-after"]["config"]
    assert after["membership_AUC"] <= before["membership_AUC"] + 0.05
    assert after["membership_TPR_at_1%_FPR"] <= before["membership_TPR_at_1%_FPR"] + 0.03
    # the DP claim probe checked the written ledger against the written model
    assert probes["dp-claim-before"]["grade"] == "F"
    assert probes["dp-claim-after"]["grade"] in ("A", "B", "C")
    assert probes["dp-claim-after"]["details"]["model_sha256_matches"] is True
    assert after["test_accuracy"] > 0.2  # better than chance (0.1), at a cost
    assert load_model(str(out / "model.pt2")).classifier is not None


def test_harden_dp_bad_input(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    common = [
        "harden", "dp", "--train-data", str(digits["train"]), "--data", str(digits["test"]),
        "--out", str(out),
    ]  # fmt: skip
    assert_one_line_error(run_cli(*common, "--arch", "mlp"), "--epsilon")
    assert_one_line_error(
        run_cli(*common, "--model", str(digits["model"]), "--epsilon", "2"), "--arch"
    )
    assert not out.exists()


def test_harden_watermark_verifies_only_after(digits: dict[str, Path], tmp_path: Path) -> None:
    out, key = tmp_path / "wm", tmp_path / "owner-key.json"
    args = [
        "harden", "watermark", "--model", str(digits["model"]), "--train-data",
        str(digits["train"]), "--data", str(digits["test"]), "--key", str(key),
        "--epochs", "10", "--out", str(out),
    ]  # fmt: skip
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert key.is_file() and (out / "model.pt2").is_file() and (out / "result.json").is_file()
    probes = _report(out)
    before, after = _sides(probes)
    assert before["verified"] is False and after["verified"] is True
    assert after["p_value"] < 1e-6 < before["p_value"]
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.05
    assert probes["watermark-after"]["details"]["same_file_as_embedded"] is True
    # the written key verifies the written model through the ordinary command
    v = run_cli(
        "watermark", "verify", "--model", str(out / "model.pt2"), "--key", str(key),
        "--out", str(tmp_path / "v"),
    )  # fmt: skip
    assert v.returncode == 0 and "VERIFIED" in v.stdout, v.stderr
    # an existing key is never overwritten without --force, and nothing is written
    again = tmp_path / "again"
    assert_one_line_error(run_cli(*args[:-1], str(again)), "already exists")
    assert not again.exists()


@pytest.fixture(scope="module")
def poisoned(digits: dict[str, Path]) -> dict[str, Path]:
    root = digits["root"]
    bad = root / "bad.npz"
    r = run_cli(
        "poison", "--method", "badnets", "--rate", "0.1", "--target-class", "0",
        "--data", str(digits["train"]), "--out", str(bad),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train", "--arch", "mlp", "--train-data", str(bad), "--data", str(digits["test"]),
        "--epochs", "30", "--out", str(root / "badm"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"data": bad, "record": root / "bad.poison.json", "model": root / "badm" / "model.pt2"}


def test_harden_poison_removal_drops_the_backdoor(
    digits: dict[str, Path], poisoned: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "pr"
    r = run_cli(
        "harden", "poison-removal", "--model", str(poisoned["model"]),
        "--train-data", str(poisoned["data"]), "--data", str(digits["test"]),
        "--poison-record", str(poisoned["record"]), "--epochs", "30", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "model.pt2").is_file() and (out / "clean.npz").is_file()
    before, after = _sides(_report(out))
    assert before["attack_success_rate"] > 0.9
    assert after["attack_success_rate"] < before["attack_success_rate"] - 0.5
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.05
    assert after["share_flagged"] < before["share_flagged"]
    res = json.loads((out / "result.json").read_text())
    clean = load_dataset(str(out / "clean.npz"))
    assert len(clean) == res["n"] - len(res["flagged"])


def test_harden_poison_removal_bad_input(
    digits: dict[str, Path], poisoned: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    r = run_cli(
        "harden", "poison-removal", "--model", str(poisoned["model"]),
        "--train-data", str(poisoned["data"]), "--data", str(digits["test"]),
        "--poison-record", str(tmp_path / "missing.json"), "--out", str(out),
    )  # fmt: skip
    assert_one_line_error(r, "--poison-record")
    assert not out.exists()


def test_harden_gateway_cuts_the_stolen_copy_and_serves_its_config(
    digits: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "gw"
    r = run_cli(
        "harden", "gateway", "--model", str(digits["model"]), "--data", str(digits["test"]),
        "--defense", "label-only", "--defense", "budget=60", "--queries", "250",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "gateway.json").read_text())
    assert config["defenses"] == ["label-only", "budget=60"]
    probes = _report(out)
    before, after = _sides(probes)
    assert before["queries_answered"] == 250 and after["queries_answered"] <= 60
    assert after["fidelity"] < before["fidelity"] - 0.1
    assert "refused" in probes["extraction-after"]["flags"]
    # a Sybil attacker with 5 API keys gets 5 x 60 answers: the per-client budget no longer
    # holds the copy back, and the report says how many identities it took
    sybil = tmp_path / "sybil"
    r = run_cli(
        "harden", "gateway", "--model", str(digits["model"]), "--data", str(digits["test"]),
        "--defense", "label-only", "--defense", "budget=60", "--queries", "250",
        "--identities", "5", "--out", str(sybil),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s_probes = _report(sybil)
    _, s_after = _sides(s_probes)
    assert s_after["queries_answered"] == 250 and s_after["identities_used"] == 5
    assert s_after["fidelity"] > after["fidelity"]
    assert "5 client identities" in s_probes["hardening"]["meaning"]


@pytest.mark.network
def test_serve_loads_the_gateway_config(digits: dict[str, Path], tmp_path: Path) -> None:
    from tests.serve.test_serve_cli import _start

    out = tmp_path / "gw"
    r = run_cli(
        "harden", "gateway", "--model", str(digits["model"]), "--data", str(digits["test"]),
        "--defense", "label-only", "--defense", "budget=60", "--queries", "100",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    server = _start("--config", str(out / "gateway.json"))
    try:
        with urllib.request.urlopen(server.url + "/info", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["output"] == "label"
        assert [d["name"] for d in info["defenses"]] == ["label-only", "budget"]
    finally:
        server.proc.kill()
        server.proc.wait(timeout=10)


def test_harden_gateway_bad_input(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run_cli(
        "harden", "gateway", "--model", str(digits["model"]), "--data", str(digits["test"]),
        "--defense", "nope", "--out", str(out),
    )  # fmt: skip
    assert_one_line_error(r, "nope")
    assert not out.exists()
    (tmp_path / "bad.json").write_text("{}")
    assert_one_line_error(run_cli("serve", "--config", str(tmp_path / "bad.json")), "--config")
