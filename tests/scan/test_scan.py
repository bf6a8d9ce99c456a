"""The scan pipeline end to end: plan, probes, resumable run directory, reports."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from modelshield.report import load_schema
from tests.conftest import CLI, Bundle, run_cli

jsonschema = pytest.importorskip("jsonschema")


def scan_args(bundle: Bundle, out: Path, *extra: str) -> list[str]:
    return [
        "scan",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--train-data",
        str(bundle.train),
        "--out",
        str(out),
        *extra,
    ]


def test_scan_writes_valid_reports(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "scan"
    r = run_cli(*scan_args(bundle, out, "--profile", "quick"))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    probes = {p["probe"]: p for p in report["probes"]}
    assert probes["model-file"]["grade"] == "A"
    ev = probes["evasion-whitebox"]
    assert ev["status"] == "ok" and ev["grade"] in "ABCDF"
    curve = ev["details"]["curve"]
    assert len(curve) == 3 and all(0 <= c["robust_accuracy"] <= 1 for c in curve)
    lo, hi = ev["figure"]["ci"]
    assert lo <= ev["figure"]["value"] <= hi
    html = (out / "report.html").read_text()
    assert 'id="probe-model-file"' in html and 'id="probe-evasion-whitebox"' in html
    assert str(out / "report.html") in r.stdout
    # the reproducibility manifest: versions, seed, command, hashes, device
    env = report["run"]["environment"]
    import numpy
    import torch

    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    assert env["packages"]["numpy"] == numpy.__version__ and env["python"]
    assert report["run"]["seed"] == 0 and report["run"]["device"] and report["run"]["command"]
    assert len(report["target"]["model"]["sha256"]) == 64
    assert len(report["target"]["data"]["sha256"]) == 64
    md = (out / "report.md").read_text()
    assert f"torch {env['packages']['torch']}" in md and "Environment" in html


def test_robust_accuracy_is_monotone_and_below_clean(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "scan"
    assert (
        run_cli(
            *scan_args(bundle, out, "--profile", "standard", "--only", "evasion-whitebox")
        ).returncode
        == 0
    )
    ev = json.loads((out / "probes" / "evasion-whitebox.json").read_text())
    clean = ev["details"]["clean_accuracy"]
    accs = [c["robust_accuracy"] for c in ev["details"]["curve"]]
    assert clean > 0.9  # the fixture model separates its blobs
    assert accs[-1] < clean  # the attack does something at the largest eps
    assert all(b <= a + 0.01 for a, b in itertools.pairwise(accs))


def test_rerun_reuses_finished_probes(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "scan"
    assert run_cli(*scan_args(bundle, out, "--profile", "quick")).returncode == 0
    done = out / "probes" / "model-file.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    (out / "probes" / "evasion-whitebox.json").unlink()  # as if killed before it finished
    r = run_cli(*scan_args(bundle, out, "--profile", "quick"))
    assert r.returncode == 0, r.stderr
    assert "model-file: finished in an earlier run" in r.stderr
    assert "reusing checkpoint" in r.stderr  # the evasion probe's eps steps were kept
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before
    report = json.loads((out / "report.json").read_text())
    assert "model-file" in report["run"]["resumed_probes"]


def test_kill_mid_scan_then_resume(tmp_path: Path, bundle: Bundle) -> None:
    """SIGKILL after the first probe and an eps checkpoint; the rerun recomputes neither."""
    out = tmp_path / "scan"
    args = scan_args(bundle, out, "--profile", "standard")
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )
    partial = out / "partial" / "evasion-whitebox"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (
            (out / "probes" / "model-file.json").exists()
            and partial.exists()
            and any(partial.glob("*.json"))
        ):
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("scan finished before it could be interrupted; make the fixture slower")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()

    def state(path: Path) -> tuple[bytes, int]:
        return path.read_bytes(), path.stat().st_mtime_ns

    kept = {p.name: state(p) for p in partial.glob("*.json")}
    finished = {p.name: state(p) for p in (out / "probes").glob("*.json")}
    assert "model-file.json" in finished
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    # nothing finished was recomputed: the files are untouched (content and mtime), the
    # finished probes were not run again and the stored eps steps were not attacked again
    for name, before in finished.items():
        assert state(out / "probes" / name) == before
        assert f"{name[:-5]}: finished in an earlier run" in r.stderr
    for name, before in kept.items():
        assert state(partial / name) == before
    assert r.stderr.count("reusing checkpoint") >= len(kept)
    steps = sorted(int(n.split("-eps")[1].split("-")[0]) for n in kept)
    attacked = [ln for ln in r.stderr.splitlines() if "robustness:" in ln]
    for k in steps:
        assert not any(f"({k + 1}/" in ln for ln in attacked), (k, attacked)
    report = json.loads((out / "report.json").read_text())
    assert set(report["run"]["resumed_probes"]) == {n[:-5] for n in finished}
    plan = {p["probe"]: p for p in report["run"]["estimate"]["probes"]}
    assert all(plan[n[:-5]]["action"] == "reuse" for n in finished)


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(tmp_path: Path, bundle: Bundle) -> None:
    """SIGINT (Ctrl-C) mid-scan: exit 130 with one line and no traceback, no report
    written as if complete; the finished probes are reused by the rerun."""
    out = tmp_path / "scan"
    args = scan_args(bundle, out, "--profile", "standard")
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "probes" / "model-file.json").exists():
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("scan finished before it could be interrupted; make the fixture slower")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; re-run the same command to resume" in err
    assert "Traceback" not in err
    assert not (out / "report.json").exists() and not (out / "report.html").exists()
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "model-file: finished in an earlier run" in r.stderr


def test_other_inputs_refuse_the_same_out(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "scan"
    assert (
        run_cli(*scan_args(bundle, out, "--profile", "quick", "--only", "model-file")).returncode
        == 0
    )
    r = run_cli(
        *scan_args(bundle, out, "--profile", "quick", "--only", "model-file", "--seed", "5")
    )
    assert r.returncode == 2 and "seed" in r.stderr and "--fresh" in r.stderr
    r = run_cli(
        *scan_args(
            bundle, out, "--profile", "quick", "--only", "model-file", "--seed", "5", "--fresh"
        )
    )
    assert r.returncode == 0, r.stderr


def test_onnx_model_skips_white_box_with_reason(tmp_path: Path, bundle: Bundle) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        bundle.module,
        (torch.zeros(1, 1, 6, 6),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}},
    )
    out = tmp_path / "scan"
    r = run_cli(
        "scan",
        "--model",
        str(path),
        "--data",
        str(bundle.data),
        "--out",
        str(out),
        "--profile",
        "quick",
    )
    assert r.returncode == 0, r.stderr
    probes = {p["probe"]: p for p in json.loads((out / "report.json").read_text())["probes"]}
    assert probes["model-file"]["grade"] == "A"
    assert probes["evasion-whitebox"]["status"] == "skipped"
    assert "gradients" in probes["evasion-whitebox"]["reason"]
    bb = probes["evasion-blackbox"]
    assert bb["status"] == "ok" and bb["threat"]["attack"] == "square"
    assert bb["details"]["curve"][-1]["robust_accuracy"] <= bb["details"]["clean_accuracy"]
    # per-input budget: never more than queries_per_input per attacked point (+1 clean query)
    per_input = bb["threat"]["queries_per_input"]
    n = bb["details"]["samples"]
    assert bb["details"]["queries_used"] <= n * (1 + per_input * len(bb["details"]["curve"]))
