"""The real ``modelshield`` command: errors are one line with exit code 2, never a traceback."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from modelshield import __version__
from tests.conftest import Bundle, run_cli


def assert_one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("modelshield: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"modelshield {__version__}"
    r = run_cli("scan", "--help")
    assert r.returncode == 0
    for flag in (
        "--model",
        "--data",
        "--train-data",
        "--out",
        "--seed",
        "--device",
        "--trust-pickle",
        "--demo",
    ):
        assert flag in r.stdout


def test_list() -> None:
    r = run_cli("list", "attacks")
    assert r.returncode == 0
    assert {"fgsm", "pgd"} <= set(r.stdout.split())
    r = run_cli("list")
    kinds = {line.split("\t")[0] for line in r.stdout.splitlines()}
    assert {"attacks", "probes", "architectures"} <= kinds
    assert_one_line_error(run_cli("list", "atacks"), "unknown component kind 'atacks'", "attacks")


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("scan"), "--model")
    assert_one_line_error(run_cli("scan", "--profile", "huge", "--demo"), "huge")
    assert_one_line_error(run_cli("frobnicate"), "frobnicate")


def test_missing_model_file(tmp_path: Path, bundle: Bundle) -> None:
    r = run_cli(
        "scan",
        "--model",
        str(tmp_path / "nope.pt"),
        "--data",
        str(bundle.data),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(r, "not found", "nope.pt")
    assert not (tmp_path / "o" / "report.json").exists()


def test_truncated_model_file(tmp_path: Path, bundle: Bundle) -> None:
    cut = tmp_path / "cut.pt2"
    blob = bundle.model_pt2.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    r = run_cli(
        "scan", "--model", str(cut), "--data", str(bundle.data), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(r, "cut.pt2")
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("nan", "NaN"),
        ("labels", "label"),
        ("shape", "shape"),
        ("lengths", "length"),
        ("garbage", "test.npz"),
    ],
)
def test_malformed_data(tmp_path: Path, bundle: Bundle, case: str, needle: str) -> None:
    with np.load(bundle.data) as d:
        x, y = d["x"].copy(), d["y"].copy()
    path = tmp_path / "test.npz"
    if case == "nan":
        x[3, 0, 1, 1] = np.nan
    elif case == "labels":
        y[0] = 7
    elif case == "shape":
        x = x[:, :, :4, :4]
    elif case == "lengths":
        y = y[:-3]
    if case == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
    else:
        np.savez(path, x=x, y=y)
    r = run_cli(
        "scan", "--model", str(bundle.model_pt2), "--data", str(path), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(r, needle)
    assert not (tmp_path / "o" / "report.json").exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, bundle: Bundle) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    r = run_cli(
        "scan", "--model", str(evil), "--data", str(bundle.data), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(r, "--trust-pickle")
    assert "system" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "o" / "report.json").exists()


def test_full_pickle_needs_trust_then_scans(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "o"
    r = run_cli(
        "scan",
        "--model",
        str(bundle.pickle),
        "--data",
        str(bundle.data),
        "--out",
        str(out),
        "--only",
        "model-file",
    )
    assert_one_line_error(r, "--trust-pickle")
    r = run_cli(
        "scan",
        "--model",
        str(bundle.pickle),
        "--data",
        str(bundle.data),
        "--out",
        str(out),
        "--trust-pickle",
        "--only",
        "model-file",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    (probe,) = report["probes"]
    assert probe["probe"] == "model-file" and probe["grade"] in ("C", "D")


def test_state_dict_with_arch(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "o"
    r = run_cli(
        "scan",
        "--model",
        str(bundle.state_dict),
        "--data",
        str(bundle.data),
        "--out",
        str(out),
        "--only",
        "model-file",
    )
    assert_one_line_error(r, "--arch")
    r = run_cli(
        "scan",
        "--model",
        str(bundle.state_dict),
        "--arch",
        "tests.conftest:tiny_net",
        "--data",
        str(bundle.data),
        "--out",
        str(out),
        "--only",
        "model-file",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "report.json").read_text())["probes"][0]["grade"] == "A"


def test_unknown_probe_and_bad_bounds(tmp_path: Path, bundle: Bundle) -> None:
    common = [
        "scan",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--out",
        str(tmp_path / "o"),
    ]
    assert_one_line_error(
        run_cli(*common, "--only", "evasion"), "unknown probe 'evasion'", "evasion-whitebox"
    )
    assert_one_line_error(run_cli(*common, "--bounds", "1,0"), "bounds")
    assert_one_line_error(run_cli(*common, "--bounds", "a,b"), "--bounds")
