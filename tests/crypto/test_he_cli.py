"""``modelshield he``: compile, keygen, serve and infer as separate processes over HTTP; eval."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tenseal")

from modelshield.core.data import load_dataset
from modelshield.crypto.he.plan import load_plan, predict_labels
from modelshield.report import validate_report
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import CLI, run_cli


@dataclass
class Files:
    model: Path
    data: Path
    plan: Path
    keys: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A small ReLU MLP trained on bundled digits, exported as .pt2; compiled; keys made."""
    d = tmp_path_factory.mktemp("he")
    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    test.subset(range(200)).to_npz(d / "test.npz")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (test.x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(prog, d / "model.pt2")
    r = run_cli("he", "compile", "--model", str(d / "model.pt2"), "--data", str(d / "test.npz"),
                "--out", str(d / "plan"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "relu replaced by a quadratic fitted" in r.stdout and "128-bit" in r.stdout
    r = run_cli("he", "keygen", "--plan", str(d / "plan"), "--out", str(d / "keys"))
    assert r.returncode == 0, r.stderr
    return Files(d / "model.pt2", d / "test.npz", d / "plan", d / "keys")


def test_keys_are_kept_apart(files: Files) -> None:
    import tenseal as ts

    meta = json.loads((files.keys / "keys.json").read_text())
    assert meta["params"]["poly_modulus_degree"] == 8192
    pub = ts.context_from((files.keys / "public.ctx").read_bytes())
    assert not pub.is_private()
    assert ts.context_from((files.keys / "secret.ctx").read_bytes()).is_private()
    assert (files.keys / "secret.ctx").stat().st_mode & 0o077 == 0


def test_eval_encrypted_matches_plaintext(files: Files, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    r = run_cli("he", "eval", "--model", str(files.model), "--data", str(files.data),
                "--out", str(out), "--latency-samples", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["mode"] == "throughput" and res["n"] == 200
    assert res["within_tolerance"] and res["max_abs_error"] <= res["tolerance"]
    assert res["argmax_agreement_with_plan"] >= 0.995
    assert res["encrypted_accuracy"] == res["plan_plaintext_accuracy"]
    assert abs(res["plaintext_accuracy"] - res["encrypted_accuracy"]) <= 0.05  # ReLU → quadratic
    assert res["latency_seconds_per_sample"] > 0 and res["throughput_samples_per_second"] > 0
    assert any("quadratic fitted" in n for n in res["notes"])
    assert "evaluated samples themselves" in res["calibration"]  # all 200 evaluated
    assert isinstance(res["warnings"], list)
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["probes"][0]["probe"] == "he-eval" and (out / "report.html").is_file()


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str


@pytest.fixture()
def server(files: Files) -> Iterator[Server]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*CLI, "he", "serve", "--plan", str(files.plan), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=60)
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        yield Server(proc, match.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_client_and_server_over_http(files: Files, server: Server, tmp_path: Path) -> None:
    data = load_dataset(str(files.data))
    plan = load_plan(files.plan)
    want = predict_labels(plan, plan.forward(data.x[:64]))
    want_acc = float((want == data.y[:64].numpy()).mean())
    for mode, limit in (("throughput", 64), ("latency", 1), ("auto", 1)):
        out = tmp_path / mode
        r = run_cli("he", "infer", "--server", server.url, "--keys", str(files.keys),
                    "--data", str(files.data), "--out", str(out), "--mode", mode,
                    "--limit", str(limit))  # fmt: skip
        assert r.returncode == 0, r.stderr
        res = json.loads((out / "result.json").read_text())
        assert res["mode"] == (mode if mode != "auto" else "latency") and res["n"] == limit
        assert res["latency_seconds_per_sample"] > 0 and res["throughput_samples_per_second"] > 0
        expected = want_acc if limit == 64 else float(want[0] == data.y[0])
        assert res["accuracy"] == pytest.approx(expected)
    # the server refuses a context that holds the secret key
    req = urllib.request.Request(
        f"{server.url}/v1/contexts", data=(files.keys / "secret.ctx").read_bytes(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=60)
    assert exc.value.code == 400 and b"secret key" in exc.value.read()


def test_user_errors_are_one_line(files: Files, tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 10))
    scripted = torch.jit.script(net)
    scripted.save(str(tmp_path / "maxpool.pt"))
    r = run_cli("he", "compile", "--model", str(tmp_path / "maxpool.pt"), "--data",
                str(files.data), "--out", str(tmp_path / "p"))  # fmt: skip
    assert_one_line_error(r, "MaxPool2d", "average pooling")
    assert not (tmp_path / "p" / "plan.json").exists()
    r = run_cli("he", "keygen", "--plan", str(tmp_path), "--out", str(tmp_path / "k"))
    assert_one_line_error(r, "not a plan directory")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 5), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    r = run_cli("he", "eval", "--model", str(files.model), "--data", str(wrong),
                "--out", str(tmp_path / "e"))  # fmt: skip
    assert_one_line_error(r, "shape")
    assert not (tmp_path / "e" / "result.json").exists()


def test_finetune_writes_a_compilable_he_friendly_model(files: Files, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    r = run_cli("he", "finetune", "--model", str(files.model), "--train-data", str(files.data),
                "--data", str(files.data), "--epochs", "1", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["replaced"] and res["evaluated_on"] == "test"
    assert res["accuracy_cost_pp"] == pytest.approx(
        100 * (res["accuracy_relu"] - res["accuracy_finetuned"])
    )
    r = run_cli("he", "compile", "--model", str(out / "model.pt2"), "--data", str(files.data),
                "--out", str(tmp_path / "plan"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [a["kind"] for a in plan["activations"]] == ["poly"]  # exact: nothing fitted
    assert "WARNING" not in r.stdout
    r = run_cli("he", "finetune", "--model", str(files.model), "--train-data", str(files.data),
                "--epochs", "-1", "--out", str(tmp_path / "bad"))  # fmt: skip
    assert r.returncode == 2 and not (tmp_path / "bad" / "result.json").exists()


def test_eval_fits_activations_on_samples_it_does_not_evaluate(
    files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "ev"
    r = run_cli("he", "eval", "--model", str(files.model), "--data", str(files.data),
                "--limit", "100", "--latency-samples", "0", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["n"] == 100 and "after the first 100 (not evaluated)" in res["calibration"]
    assert "activations fitted on the 100 --data samples after the first 100" in r.stdout
    cal = tmp_path / "cal.npz"
    load_dataset(str(files.data)).subset(range(150, 200)).to_npz(cal)
    r = run_cli("he", "eval", "--model", str(files.model), "--data", str(files.data),
                "--calibration-data", str(cal), "--limit", "20", "--latency-samples", "0",
                "--out", str(tmp_path / "ev2"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev2" / "result.json").read_text())
    assert (
        res["calibration"].startswith("--calibration-data") and "50 samples" in res["calibration"]
    )
