"""``modelshield poison`` and ``modelshield audit data`` through the real command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelshield.core.data import load_dataset
from modelshield.poisoning.attacks import train_model
from modelshield.report import validate_report
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Run, run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("poison")
    train, test = load_dataset("digits").split(0.8, seed=0)
    paths = {"train": root / "train.npz", "test": root / "test.npz", "root": root}
    train.to_npz(paths["train"])
    test.to_npz(paths["test"])
    return paths


def poison(*args: str) -> Run:
    return run_cli("poison", *args)


def test_badnets_writes_the_data_and_the_record_beside_it(files: dict[str, Path]) -> None:
    out = files["root"] / "bad.npz"
    r = poison(
        "--method", "badnets", "--rate", "0.1", "--target-class", "0",
        "--data", str(files["train"]), "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    record = files["root"] / "bad.poison.json"
    assert f"record: {record}" in r.stdout
    rec = json.loads(record.read_text())
    clean = load_dataset(str(files["train"]))
    pois = load_dataset(str(out))
    changed = (pois.y != clean.y).nonzero().flatten().tolist()
    assert rec["indices"] == changed and len(changed) == round(0.1 * len(clean))
    assert rec["method"] == "badnets" and rec["target_class"] == 0 and rec["rate"] == 0.1
    assert rec["details"]["trigger"]["kind"] == "patch"
    assert rec["details"]["n"] == len(clean)


def test_audit_data_finds_badnets_poison_with_the_truth_record(files: dict[str, Path]) -> None:
    out = files["root"] / "bad.npz"
    if not out.exists():
        test_badnets_writes_the_data_and_the_record_beside_it(files)
    audit = files["root"] / "audit"
    r = run_cli(
        "audit", "data", "--train-data", str(out), "--truth",
        str(files["root"] / "bad.poison.json"), "--out", str(audit), "--epochs", "40",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((audit / "result.json").read_text())
    assert res["precision"] >= 0.8 and res["recall"] >= 0.8
    assert set(res["detectors"]) == {"activation-clustering", "spectral"}
    clean = load_dataset(str(audit / "clean.npz"))
    assert len(clean) == res["n"] - len(res["flagged"])
    report = json.loads((audit / "report.json").read_text())
    validate_report(report)
    assert report["probes"][0]["probe"] == "data-poisoning"
    assert report["probes"][0]["grade"] == "F"


def test_audit_data_with_a_pt2_model_and_no_truth(files: dict[str, Path], tmp_path: Path) -> None:
    data = load_dataset(str(files["train"]))
    model = train_model(data, arch="small_cnn", epochs=5, seed=0)
    program = torch.export.export(
        model.module, (data.x[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=4096)},)
    )
    path = tmp_path / "m.pt2"
    torch.export.save(program, str(path))
    r = run_cli(
        "audit", "data", "--train-data", str(files["train"]), "--model", str(path),
        "--detector", "strip", "--data", str(files["test"]), "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "result.json").read_text())
    assert res["precision"] is None and set(res["detectors"]) == {"strip"}
    # a clean set at a 1% false-rejection threshold: few flags
    assert len(res["flagged"]) <= 0.05 * res["n"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "badnets", "--rate", "0.1"], ["--target-class"]),
        (["--method", "badnets", "--rate", "1.5", "--target-class", "0"], ["--rate"]),
        (["--method", "badnets", "--rate", "0.1", "--target-class", "12"], ["target class"]),
        (["--method", "label-flip", "--rate", "0.1", "--alpha", "0.3"], ["--alpha"]),
        (
            ["--method", "badnets", "--rate", "0.1", "--target-class", "0", "--eps", "0.1"],
            ["--eps"],
        ),
    ],
)
def test_bad_poison_flags_fail_in_one_line(
    files: dict[str, Path], tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    out = tmp_path / "p.npz"
    r = poison(*args, "--data", str(files["train"]), "--out", str(out))
    assert_one_line_error(r, *needles)
    assert not out.exists() and not (tmp_path / "p.poison.json").exists()


def test_poison_refuses_bad_data_and_a_non_npz_out(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "nan.npz"
    np.savez(bad, x=np.full((20, 4), np.nan, dtype=np.float32), y=np.zeros(20, dtype=np.int64))
    r = poison(
        "--method",
        "label-flip",
        "--rate",
        "0.1",
        "--data",
        str(bad),
        "--out",
        str(tmp_path / "o.npz"),
    )
    assert_one_line_error(r, "NaN")
    r = poison(
        "--method", "label-flip", "--rate", "0.1", "--data", str(files["train"]),
        "--out", str(tmp_path / "o.csv"),
    )  # fmt: skip
    assert_one_line_error(r, ".npz")
    assert not list(tmp_path.glob("o.*"))


def test_audit_data_refuses_a_truth_for_another_data_set(
    files: dict[str, Path], tmp_path: Path
) -> None:
    truth = tmp_path / "t.poison.json"
    truth.write_text(json.dumps({"result_type": "poison", "indices": [1], "details": {"n": 5}}))
    out = tmp_path / "audit"
    r = run_cli(
        "audit",
        "data",
        "--train-data",
        str(files["train"]),
        "--truth",
        str(truth),
        "--out",
        str(out),
    )
    assert_one_line_error(r, "--truth", "5 samples")
    assert not (out / "result.json").exists()
    truth.write_text(json.dumps([0, 99999]))
    r = run_cli(
        "audit",
        "data",
        "--train-data",
        str(files["train"]),
        "--truth",
        str(truth),
        "--out",
        str(out),
    )
    assert_one_line_error(r, "99999")


def test_harden_fine_prune_weakens_the_backdoor_and_writes_a_loadable_model(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from modelshield.core.loading import load_model
    from modelshield.poisoning import poison as poison_data

    train = load_dataset(str(files["train"]))
    test = load_dataset(str(files["test"]))
    p = poison_data("badnets", train, rate=0.1, target_class=0, seed=0)
    model = train_model(p.dataset, arch="small_cnn", epochs=40, seed=0)
    program = torch.export.export(
        model.module, (train.x[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=4096)},)
    )
    torch.export.save(program, str(tmp_path / "m.pt2"))
    (tmp_path / "rec.poison.json").write_text(json.dumps(p.record.to_dict()))
    tune, held = test.split(0.5, seed=1)
    tune.to_npz(tmp_path / "tune.npz")
    held.to_npz(tmp_path / "held.npz")
    out = tmp_path / "pruned"
    r = run_cli(
        "harden", "fine-prune", "--model", str(tmp_path / "m.pt2"), "--data", str(tmp_path / "tune.npz"),
        "--test-data", str(tmp_path / "held.npz"), "--poison-record", str(tmp_path / "rec.poison.json"),
        "--epochs", "20", "--lr", "1e-3", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["before"]["attack_success_rate"] > 0.9
    assert res["after"]["attack_success_rate"] < res["before"]["attack_success_rate"] - 0.1
    assert res["after"]["clean_accuracy"] >= res["before"]["clean_accuracy"] - 0.05
    assert res["fine_pruning"]["pruned"] > 0
    validate_report(json.loads((out / "report.json").read_text()))
    again = load_model(str(out / "model.pt2")).classifier
    assert again is not None
    assert again.accuracy(held.x, held.y) == pytest.approx(res["after"]["clean_accuracy"], abs=1e-6)


def test_fine_prune_needs_test_data_for_a_poison_record(
    files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "rec.json").write_text("{}")
    r = run_cli(
        "harden", "fine-prune", "--model", str(tmp_path / "missing.pt2"), "--data", str(files["test"]),
        "--poison-record", str(tmp_path / "rec.json"), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert_one_line_error(r, "--test-data")
    assert not (tmp_path / "o" / "result.json").exists()
