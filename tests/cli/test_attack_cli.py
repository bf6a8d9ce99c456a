"""`modelshield attack NAME ...`: results on disk, budgets, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelshield.core.classifier import from_torch
from modelshield.core.threat import LpThreat
from modelshield.evasion import pgd
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, run_cli


def test_pgd_writes_result_and_adversarial(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "a"
    r = run_cli(
        "attack",
        "pgd",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--eps",
        "0.0627",
        "--steps",
        "20",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "success", "queries", "distance", "threat"):
        assert key in res
    with np.load(out / "adversarial.npz") as z:
        x_adv, y, success = z["x"], z["y"], z["success"]
    with np.load(bundle.data) as d:
        x = d["x"]
    assert x_adv.shape == x.shape and len(res["success"]) == len(y)
    assert np.abs(x_adv - x).max() <= 0.0627 + 1e-6
    # the recorded success is the model's verdict on the saved inputs
    pred = bundle.module(torch.from_numpy(x_adv)).argmax(1).numpy()
    assert (success == (pred != y)).all()
    robust = [c and not s for c, s in zip(res["clean_correct"], res["success"], strict=True)]
    assert res["robust_accuracy"] == pytest.approx(sum(robust) / len(robust))
    # same numbers as the Python API
    clf = from_torch(bundle.module, input_shape=(1, 6, 6))
    api = pgd(
        clf,
        torch.from_numpy(x),
        torch.from_numpy(y),
        threat=LpThreat("linf", 0.0627),
        steps=20,
        seed=0,
    )
    assert api.robust_accuracy == pytest.approx(1 - float(np.mean(success)), abs=1e-9)


def test_targeted_attack(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "t"
    r = run_cli(
        "attack",
        "pgd",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--eps",
        "0.5",
        "--targeted",
        "--target-class",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    with np.load(out / "adversarial.npz") as z:
        assert (z["target"] == 2).all()
        pred = bundle.module(torch.from_numpy(z["x"])).argmax(1).numpy()
        assert ((pred == 2) == z["success"]).all()
        assert z["success"].mean() > 0.9


def test_attack_errors(tmp_path: Path, bundle: Bundle) -> None:
    common = [
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--out",
        str(tmp_path / "o"),
    ]
    assert_one_line_error(
        run_cli("attack", "pgdd", *common, "--eps", "0.1"), "unknown attack 'pgdd'", "pgd"
    )
    assert_one_line_error(run_cli("attack", "cw", *common, "--eps", "0.1"), "cw supports norm l2")
    assert_one_line_error(run_cli("attack", "pgd", *common, "--eps", "-1"), "eps")
    assert_one_line_error(
        run_cli("attack", "pgd", *common, "--eps", "0.1", "--target-class", "1"), "--targeted"
    )
    assert not (tmp_path / "o" / "result.json").exists()


def test_cw_minimal_l2(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "cw"
    r = run_cli(
        "attack",
        "cw",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--norm",
        "l2",
        "--eps",
        "1.0",
        "--steps",
        "50",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    with np.load(out / "adversarial.npz") as z, np.load(bundle.data) as d:
        dist = np.sqrt(((z["x"] - d["x"]) ** 2).reshape(len(d["x"]), -1).sum(1))
    assert (dist <= 1.0 + 1e-5).all()
    assert res["success_rate"] > 0.5


def test_square_on_a_model_file_respects_the_budget(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "sq"
    r = run_cli(
        "attack",
        "square",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--eps",
        "0.1",
        "--max-queries",
        "50",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    n = res["n"]
    assert res["queries_used"] <= n * 50 + n
    assert max(res["queries"]) <= 50
    assert res["access"] == "scores"


@pytest.mark.network
def test_black_box_attacks_against_a_real_endpoint(tmp_path: Path, bundle: Bundle) -> None:
    """Square and HopSkipJump through `--oracle URL` against a server on 127.0.0.1."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"rows": 0}
    net = bundle.module

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            x = torch.tensor(body["inputs"], dtype=torch.float32)
            seen["rows"] += len(x)
            with torch.no_grad():
                probs = torch.softmax(net(x), dim=1).tolist()
            blob = json.dumps({"outputs": probs}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        for name, norm in (("square", "linf"), ("hopskipjump", "l2")):
            out = tmp_path / name
            before = seen["rows"]
            r = run_cli(
                "attack",
                name,
                "--oracle",
                url,
                "--data",
                str(bundle.data),
                "--norm",
                norm,
                "--eps",
                "0.5" if norm == "l2" else "0.1",
                "--max-queries",
                "40",
                "--n",
                "20",
                "--out",
                str(out),
            )
            assert r.returncode == 0, r.stderr
            res = json.loads((out / "result.json").read_text())
            assert res["queries_used"] == seen["rows"] - before  # the server saw every query
            assert res["queries_used"] <= 20 * 40 + 20
            assert 0 <= res["robust_accuracy"] <= res["clean_accuracy"]
    finally:
        server.shutdown()
        server.server_close()
    unreachable = run_cli(
        "attack",
        "square",
        "--oracle",
        "http://127.0.0.1:9/predict",
        "--data",
        str(bundle.data),
        "--eps",
        "0.1",
        "--out",
        str(tmp_path / "u"),
    )
    assert_one_line_error(unreachable, "127.0.0.1:9")
