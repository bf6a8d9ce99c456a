"""`modelshield certify` and `modelshield harden adversarial` end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from modelshield.core.data import load_dataset
from modelshield.report import load_schema
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, run_cli


def test_certify_writes_curve_and_report(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "c"
    args = [
        "certify",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--sigma",
        "0.1",
        "--n",
        "500",
        "--max-samples",
        "60",
        "--out",
        str(out),
    ]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    acc = res["certified_accuracy"]
    assert res["radii"][0] == 0.0 and all(b <= a for a, b in itertools.pairwise(acc))
    assert acc[0] > 0.5  # the fixture model is accurate under sigma=0.1 noise
    # radius = sigma * Phi^-1(p_lower) <= sigma * Phi^-1(alpha^(1/n)): the most n samples can certify
    from modelshield.core.metrics import norm_ppf

    cap = 0.1 * norm_ppf(0.001 ** (1 / 500))
    assert max(res["radius"]) <= cap + 1e-9
    report = json.loads((out / "report.json").read_text())
    pytest.importorskip("jsonschema").validate(report, load_schema())
    assert report["probes"][0]["probe"] == "certified-robustness"
    again = run_cli(*args)  # resumes from the chunk checkpoints, same numbers
    assert again.returncode == 0 and "reusing checkpoint" in again.stderr
    assert json.loads((out / "result.json").read_text())["radius"] == res["radius"]
    assert_one_line_error(
        run_cli(*args[:-2], "--sigma", "0", "--out", str(tmp_path / "z")), "sigma"
    )


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    full = load_dataset("digits")
    train, test = full.split(0.7, seed=0)
    train.to_npz(root / "train.npz")
    test.to_npz(root / "test.npz")
    return root / "train.npz", root / "test.npz"


def test_harden_adversarial_raises_robust_accuracy(
    tmp_path: Path, digits_split: tuple[Path, Path]
) -> None:
    train, test = digits_split
    out = tmp_path / "h"
    args = [
        "harden",
        "adversarial",
        "--arch",
        "mlp",
        "--train-data",
        str(train),
        "--data",
        str(test),
        "--method",
        "pgd-at",
        "--eps",
        "0.15",
        "--steps",
        "5",
        "--epochs",
        "15",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "--out",
        str(out),
    ]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    pytest.importorskip("jsonschema").validate(report, load_schema())
    probes = {p["probe"]: p for p in report["probes"]}
    d = probes["hardening"]["details"]
    assert d["before"]["robust_accuracy"] < 0.3
    assert d["after"]["robust_accuracy"] >= d["before"]["robust_accuracy"] + 0.2
    assert d["after"]["clean_accuracy"] > 0.7
    assert probes["model-file"]["grade"] == "A"
    # the hardened model is a loadable file that scans like any other
    s = run_cli(
        "scan",
        "--model",
        str(out / "model.pt2"),
        "--data",
        str(test),
        "--eps",
        "0.15",
        "--profile",
        "quick",
        "--only",
        "evasion-whitebox",
        "--out",
        str(tmp_path / "scan"),
    )
    assert s.returncode == 0, s.stderr
    after = json.loads((tmp_path / "scan" / "report.json").read_text())["probes"][0]["figure"][
        "value"
    ]
    assert after == pytest.approx(d["after"]["robust_accuracy"])
    # a re-run resumes: nothing is measured or trained again
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished in an earlier run") == 2
    with np.load(test) as z:
        assert len(z["y"]) > 0


def test_harden_errors(tmp_path: Path, digits_split: tuple[Path, Path], bundle: Bundle) -> None:
    train, test = digits_split
    common = [
        "harden",
        "adversarial",
        "--train-data",
        str(train),
        "--data",
        str(test),
        "--eps",
        "0.1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert_one_line_error(run_cli(*common), "--arch")
    assert_one_line_error(run_cli(*common, "--arch", "nope"), "--arch")
    assert_one_line_error(run_cli(*common, "--model", str(bundle.model_pt2)), "shape")
