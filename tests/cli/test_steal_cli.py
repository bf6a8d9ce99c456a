"""``modelshield steal`` through the real command: files, figures, one-line errors."""

from __future__ import annotations

import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.cli.steal import steal_cmd
from modelshield.core.errors import (
    InvalidConfigError,
    OracleError,
    UnsafeModelFileError,
)
from modelshield.core.loading import load_model
from modelshield.report import validate_report
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, Run, run_cli


def steal(*args: str) -> Run:
    """``modelshield steal ARGS`` through the real command."""
    return run_cli("steal", *args)


def steal_here(*args: str) -> None:
    """The command in this process (no interpreter start-up): errors propagate as raised."""
    steal_cmd.main(list(args), standalone_mode=False)


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def test_equation_steals_a_sklearn_logistic_regression_exactly(tmp_path: Path) -> None:
    lm = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.random((300, 10))
    y = (x[:, 0] * 3 + x[:, 1] * 2 > 2.5).astype(int) + (x[:, 2] > 0.7).astype(int)
    est = lm.LogisticRegression(max_iter=1000).fit(x, y)
    path = tmp_path / "logreg.pkl"
    path.write_bytes(pickle.dumps(est))
    out = tmp_path / "eq"
    r = steal("--oracle", str(path), "--trust-pickle", "--method", "equation", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "equation: fidelity 1.0000 after 11 queries" in r.stdout
    res = _result(out)
    assert res["fidelity"] == 1.0 and res["queries_used"] == 11
    assert res["details"]["max_prob_diff"] < 1e-5 and res["details"]["n_eval"] == 2000
    copy = load_model(out / "model.pt2", input_shape=(10,))
    assert copy.classifier is not None
    probe = torch.tensor(rng.random((64, 10)), dtype=torch.float32)
    got = torch.softmax(copy.classifier(probe), 1).double().detach().numpy()
    np.testing.assert_allclose(got, est.predict_proba(probe.double().numpy()), atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["probes"][0]["risk"] == "extraction" and report["probes"][0]["grade"] == "F"
    # without --trust-pickle the pickle is refused
    with pytest.raises(UnsafeModelFileError, match="--trust-pickle"):
        steal_here("--oracle", str(path), "--method", "equation", "--out", str(tmp_path / "no"))


def test_equation_on_a_torch_export_with_too_few_queries_or_labels_only(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (torch.rand(2, 1, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / "linear.pt2"
    torch.export.save(prog, path)
    out = tmp_path / "eq"
    r = steal(
        "--oracle", str(path), "--method", "equation", "--oracle-output", "logits",
        "--transfer-eps", "0.2", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = _result(out)
    assert res["fidelity"] == 1.0 and res["queries_used"] == 9
    assert 0.0 <= res["transfer"]["transfer_rate"] <= 1.0
    with pytest.raises(InvalidConfigError, match=r"d \+ 1 = 9"):
        steal_here(
            "--oracle", str(path), "--method", "equation", "--queries", "5", "--out", str(out)
        )
    r = steal(
        "--oracle", str(path), "--method", "equation", "--oracle-output", "label", "--out", str(out)
    )  # fmt: skip
    assert_one_line_error(r, "label")


def test_knockoff_steals_the_bundle_model(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "ko"
    r = steal(
        "--oracle", str(bundle.model_pt2), "--method", "knockoff", "--queries", "100",
        "--pool", str(bundle.train), "--data", str(bundle.data), "--epochs", "20",
        "--transfer-eps", "0.1", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "knockoff: fidelity" in r.stdout and "transfer:" in r.stdout
    res = _result(out)
    assert res["queries_used"] == 100 and res["method"] == "knockoff"
    assert res["fidelity"] >= 0.8 and res["accuracy"] is not None
    assert res["curve"][-1]["queries"] == 100 and res["details"]["eval_source"] == "--data"
    assert set(res["transfer"]) >= {"transfer_rate", "success_on_copy", "n_both_correct"}
    copy = load_model(out / "model.pt2")
    x = torch.from_numpy(np.load(bundle.data)["x"]).float()
    assert copy.classifier is not None and copy.classifier(x).shape == (len(x), 3)
    validate_report(json.loads((out / "report.json").read_text()))
    assert (out / "report.html").is_file()
    # more queries than the pool holds, and a method without its pool
    with pytest.raises(InvalidConfigError, match="exceeds the pool"):
        steal_here(
            "--oracle", str(bundle.model_pt2), "--method", "knockoff", "--queries", "1000",
            "--pool", str(bundle.train), "--out", str(tmp_path / "x"),
        )  # fmt: skip
    with pytest.raises(InvalidConfigError, match="--pool"):
        steal_here(
            "--oracle", str(bundle.model_pt2), "--method", "jacobian", "--queries", "10",
            "--out", str(tmp_path / "x"),
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_jacobian_augmentation_with_label_only_access(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "jac"
    r = steal(
        "--oracle", str(bundle.model_pt2), "--method", "jacobian", "--queries", "70",
        "--seed-size", "10", "--pool", str(bundle.train), "--oracle-output", "label",
        "--epochs", "5", "--arch", "mlp", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = _result(out)
    assert res["queries_used"] == 70 and res["config"]["seed_size"] == 10
    assert [row["queries"] for row in res["curve"]] == [10, 20, 40, 70]
    assert res["config"]["access"]["output"] == "label" and res["accuracy"] is None
    assert (out / "model.pt2").is_file()


@pytest.mark.network
def test_knockoff_over_http_and_an_unreachable_endpoint(tmp_path: Path, bundle: Bundle) -> None:
    net = bundle.module
    seen = {"rows": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            x = torch.tensor(body["inputs"], dtype=torch.float32)
            seen["rows"] += len(x)
            with torch.no_grad():
                blob = json.dumps({"outputs": torch.softmax(net(x), dim=1).tolist()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "http"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        r = steal(
            "--oracle", url, "--method", "knockoff", "--queries", "80", "--pool", str(bundle.train),
            "--strategy", "adaptive", "--epochs", "10", "--out", str(out),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        server.shutdown()
        server.server_close()
    res = _result(out)
    assert res["queries_used"] == 80 and res["details"]["strategy"] == "adaptive"
    # the endpoint saw the attack's queries plus the held-out pool's evaluation labels
    assert seen["rows"] == 80 + res["details"]["eval_queries"]
    assert res["details"]["eval_source"].endswith("held out (never queried by the attack)")
    assert res["fidelity"] > 0.5
    with pytest.raises(OracleError, match=r"127\.0\.0\.1:9"):
        steal_here(
            "--oracle", "http://127.0.0.1:9/predict", "--method", "knockoff", "--queries", "10",
            "--pool", str(bundle.train), "--out", str(tmp_path / "dead"),
        )  # fmt: skip
