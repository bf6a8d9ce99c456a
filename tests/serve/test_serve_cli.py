"""``modelshield serve`` as a real process on 127.0.0.1, queried through HttpOracle."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from modelshield.core.errors import QueryBudgetExceeded
from modelshield.core.oracles import HttpOracle
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import CLI, Bundle, run_cli


def _registered() -> bool:
    from modelshield.cli.main import cli

    return "serve" in cli.commands


pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not _registered(), reason="'serve' is not registered in cli/main.py yet"),
]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    first_lines: list[str]


def _start(*args: str) -> Server:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [*CLI, "--threads", "1", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=60)
    except queue.Empty:
        proc.kill()
        raise AssertionError("modelshield serve printed nothing within 60 s") from None
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
    if match is None:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"unexpected first line {first!r}; stderr: {err}")
    server = Server(proc, match.group(1), [first])
    server.first_lines.append(lines.get(timeout=10))
    return server


@pytest.fixture()
def served(bundle: Bundle) -> Iterator[Server]:
    server = _start(
        "--model", str(bundle.model_pt2), "--defense", "top-k=1", "--defense", "budget=30"
    )
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


def test_serve_process_answers_httporacle_and_stops_on_ctrl_c(
    served: Server, bundle: Bundle
) -> None:
    assert "defences: top-k, budget" in served.first_lines[0]
    assert served.first_lines[1].strip() == f"predict: POST {served.url}/predict"
    x = torch.from_numpy(np.load(bundle.data)["x"])
    with torch.no_grad():
        probs = torch.softmax(bundle.module(x[:20]), dim=1)
    client = HttpOracle(served.url + "/predict", headers={"X-Client-Id": "t"}, batch_size=8)
    out = client.query(x[:20])
    assert ((out > 0).sum(dim=1) == 1).all()
    torch.testing.assert_close(out.max(dim=1).values, probs.max(dim=1).values, atol=1e-6, rtol=0)
    with pytest.raises(QueryBudgetExceeded, match=r"HTTP 403.*query budget of 30"):
        client.query(x[:20])
    served.proc.send_signal(signal.SIGINT)
    _, err = served.proc.communicate(timeout=30)
    assert served.proc.returncode == 0, err
    assert "Traceback" not in err and "server on" in err and "stopped" in err


def test_serve_usage_errors_are_one_line(bundle: Bundle) -> None:
    model = str(bundle.model_pt2)
    assert_one_line_error(
        run_cli("serve", "--model", model, "--defense", "topk=1"),
        "unknown gateway defence 'topk'",
        "did you mean 'top-k'",
    )
    assert_one_line_error(
        run_cli("serve", "--model", model, "--defense", "rate=fast"), "rate must be a number"
    )
    assert_one_line_error(
        run_cli("serve", "--model", model, "--prada-action", "block"),
        "--prada-action needs --defense prada",
    )
    assert_one_line_error(run_cli("serve", "--model", str(bundle.data) + ".missing"))


def test_help_lists_the_defences() -> None:
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    for word in ("--defense", "label-only", "top-k=K", "rate=N/s", "prada=DELTA", "--prada-action"):
        assert word in r.stdout
    if sys.platform.startswith("linux"):
        assert "127.0.0.1" in r.stdout
