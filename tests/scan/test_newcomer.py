"""The newcomer's path (issue 12): a model of one's own, scanned in the README's forms.

A small MLP trained here on scikit-learn's bundled digits stands in for "your model". It is
saved as TorchScript and as ONNX, and served over HTTP by the real `modelshield serve`
process; each is scanned with the README's command line (``--model M --data D --train-data
T --out DIR``, quick profile). Every report must validate against the shipped schema, run
the probes that apply to what it was given, and say why it skipped the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from modelshield.core.data import load_dataset
from modelshield.report import load_schema
from tests.conftest import run_cli
from tests.serve.test_serve_cli import _start

jsonschema = pytest.importorskip("jsonschema")

ALL_PROBES = {
    "model-file",
    "dp-claim",
    "watermark",
    "evasion-whitebox",
    "evasion-blackbox",
    "membership",
    "model-inversion",
    "attribute-inference",
    "data-poisoning",
    "susceptibility",
    "extraction",
}


@dataclass
class Own:
    torchscript: Path
    onnx: Path
    data: Path
    train: Path


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Own:
    """An MLP on digits (test accuracy ~95%), saved as TorchScript and ONNX, with its data."""
    root = tmp_path_factory.mktemp("own")
    train, test = load_dataset("digits").split(0.7, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(train.x), train.y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(test.x).argmax(1) == test.y).float().mean() > 0.9
    own = Own(root / "model.ts", root / "model.onnx", root / "test.npz", root / "train.npz")
    torch.jit.save(torch.jit.trace(net, train.x[:2]), str(own.torchscript))
    torch.onnx.export(
        net,
        (train.x[:1],),
        str(own.onnx),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "n"}},
    )
    train.to_npz(own.train)
    test.to_npz(own.data)
    return own


def _scan(target: list[str], own: Own, out: Path) -> tuple[dict[str, Any], str]:
    r = run_cli(
        "scan",
        *target,
        "--data",
        str(own.data),
        "--train-data",
        str(own.train),
        "--profile",
        "quick",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    return report, r.stderr


def _check(report: dict[str, Any], stderr: str, ran: set[str], skipped: dict[str, str]) -> None:
    """``ran`` ran (ok); each of ``skipped`` was skipped with a reason containing its text."""
    probes = {p["probe"]: p for p in report["probes"]}
    assert set(probes) == ALL_PROBES
    assert ran | set(skipped) == ALL_PROBES
    for name in ran:
        assert probes[name]["status"] == "ok", (name, probes[name]["reason"])
    plan = {p["probe"]: p for p in report["run"]["estimate"]["probes"]}
    for name, why in skipped.items():
        p = probes[name]
        assert p["status"] == "skipped" and why in p["reason"], (name, p["reason"])
        assert plan[name]["action"] == "skip" and plan[name]["reason"] == p["reason"]
        assert f"skip  {name:<20} {p['reason']}" in stderr  # the plan said so before starting
    est = report["run"]["estimate"]
    assert est["total_seconds"] > 0 and math.isfinite(est["total_seconds"])
    # the grades the newcomer reads: every risk class that ran is graded
    assert report["summary"]["risks"]["evasion"] in tuple("ABCDEF")
    assert report["summary"]["risks"]["extraction"] in tuple("ABCDEF")


COMMON_SKIPS = {
    "dp-claim": "no privacy ledger",
    "watermark": "no watermark key",
    "attribute-inference": "--sensitive-feature",
}


def test_own_torchscript_model(own: Own, tmp_path: Path) -> None:
    report, stderr = _scan(["--model", str(own.torchscript)], own, tmp_path / "ts")
    _check(
        report,
        stderr,
        ran={
            "model-file",
            "evasion-whitebox",
            "membership",
            "model-inversion",
            "susceptibility",
            "extraction",
        },
        skipped={
            **COMMON_SKIPS,
            "evasion-blackbox": "white-box model is available",
            "data-poisoning": "TorchScript module",
        },
    )
    assert report["target"]["model"]["format"] == "torchscript"
    assert report["summary"]["risks"]["privacy"] in tuple("ABCDEF")
    assert report["summary"]["risks"]["poisoning"] in tuple("ABCDEF")
    html = (tmp_path / "ts" / "report.html").read_text()
    for reason in COMMON_SKIPS.values():
        assert reason in html


def test_own_onnx_model(own: Own, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    report, stderr = _scan(["--model", str(own.onnx)], own, tmp_path / "onnx")
    needs_torch = "torch model"
    _check(
        report,
        stderr,
        ran={"model-file", "evasion-blackbox", "extraction"},
        skipped={
            **COMMON_SKIPS,
            "evasion-whitebox": "gives no gradients",
            "membership": needs_torch,
            "model-inversion": needs_torch,
            "data-poisoning": needs_torch,
            "susceptibility": needs_torch,
        },
    )
    assert report["target"]["model"]["format"] == "onnx"


@pytest.mark.network
def test_own_model_behind_modelshield_serve(own: Own, tmp_path: Path) -> None:
    # a TorchScript file does not record its input shape; the server must be told it
    server = _start("--model", str(own.torchscript), "--input-shape", "1,8,8")
    try:
        report, stderr = _scan(["--oracle", f"{server.url}/predict"], own, tmp_path / "http")
    finally:
        server.proc.kill()
        server.proc.wait(timeout=10)
    _check(
        report,
        stderr,
        ran={"evasion-blackbox", "extraction"},
        skipped={
            **COMMON_SKIPS,
            "model-file": "no model file",
            "evasion-whitebox": "no white-box model",
            "membership": "torch model",
            "model-inversion": "white-box",
            "data-poisoning": "white-box",
            "susceptibility": "white-box",
        },
    )
    assert report["target"]["model"]["format"] == "http-endpoint"
    # the calibration's queries are real and counted, and the report says how many
    assert report["run"]["estimate"]["calibration"]["queries"] > 0
