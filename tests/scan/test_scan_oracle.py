"""`modelshield scan --oracle URL`: a black-box scan of a real endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from modelshield.report import load_schema
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, run_cli


@pytest.mark.network
def test_scan_an_http_endpoint(tmp_path: Path, bundle: Bundle) -> None:
    seen = {"rows": 0}
    net = bundle.module

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
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        out = tmp_path / "scan"
        r = run_cli(
            "scan",
            "--oracle",
            url,
            "--data",
            str(bundle.data),
            "--profile",
            "quick",
            "--eps",
            "0.1",
            "--out",
            str(out),
        )
        assert r.returncode == 0, r.stderr
    finally:
        server.shutdown()
        server.server_close()
    report = json.loads((out / "report.json").read_text())
    pytest.importorskip("jsonschema").validate(report, load_schema())
    probes = {p["probe"]: p for p in report["probes"]}
    bb = probes["evasion-blackbox"]
    assert bb["status"] == "ok" and bb["threat"]["attack"] == "square"
    ex = probes["extraction"]
    assert ex["status"] == "ok" and ex["details"]["queries_used"] > 0
    # every query of both probes and of the time calibration reached the server, and
    # nothing else did
    spent = (
        bb["details"]["queries_used"]
        + ex["details"]["queries_used"]
        + ex["details"]["eval_queries"]
        + report["run"]["estimate"]["calibration"]["queries"]
    )
    assert spent == seen["rows"]
    assert probes["model-file"]["status"] == "skipped"
    assert probes["evasion-whitebox"]["status"] == "skipped"
    both = run_cli(
        "scan",
        "--oracle",
        "http://127.0.0.1:9/p",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--out",
        str(tmp_path / "x"),
    )
    assert_one_line_error(both, "not both")
