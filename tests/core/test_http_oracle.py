"""HttpOracle against a real HTTP server on 127.0.0.1 serving a small torch model."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from torch import nn

from modelshield.core.errors import (
    InvalidConfigError,
    OracleError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.oracles import HttpOracle
from modelshield.core.oracles.http import _parse_retry_after
from modelshield.core.threat import QueryAccess

D, C = 5, 4
network = pytest.mark.network

# A responder gets (request number starting at 1, decoded JSON body) and returns
# (status, extra headers, body). ``None`` as body means "the model's answer".
Reply = tuple[int, dict[str, str], bytes]
Responder = Callable[[int, Any], Reply]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, C)).eval()


MODEL = _model()


def probs_of(rows: Any) -> list[list[float]]:
    with torch.no_grad():
        return torch.softmax(MODEL(torch.tensor(rows, dtype=torch.float32)), dim=1).tolist()


def ok(payload: object) -> Reply:
    return 200, {}, json.dumps(payload).encode()


def serve_probs(_: int, body: Any) -> Reply:
    return ok({"outputs": probs_of(body["inputs"])})


@dataclass
class Server:
    """Counts requests and the most requests being handled at once."""

    responder: Responder
    delay: float = 0.0
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


class Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        state: Server = self.server.state
        with state.lock:
            state.requests += 1
            number = state.requests
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
            state.headers.append(dict(self.headers))
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(state.delay)
            status, headers, body = state.responder(number, json.loads(raw))
        finally:
            # leave "in flight" before answering: the client cannot send its next
            # request before reading this answer, so the count never over-counts
            with state.lock:
                state.in_flight -= 1
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    """Start servers on ephemeral loopback ports; all are shut down at teardown."""
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(responder: Responder = serve_probs, *, delay: float = 0.0) -> Server:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        state = Server(responder, delay=delay)
        httpd.state = state  # type: ignore[attr-defined]
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        running.append((httpd, thread))
        state.url = f"http://127.0.0.1:{httpd.server_address[1]}/predict"
        return state

    yield start
    for httpd, thread in running:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, D, generator=torch.Generator().manual_seed(seed))


@network
def test_outputs_match_local_model(serve: Callable[..., Server]) -> None:
    server = serve()
    oracle = HttpOracle(server.url, QueryAccess(output="probs"), batch_size=8)
    x = inputs(30)
    out = oracle.query(x)
    with torch.no_grad():
        expected = torch.softmax(MODEL(x), dim=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert server.requests == 4
    assert oracle.calls == 4
    assert oracle.queries_used == 30
    assert oracle.num_classes == C  # learnt from the first reply
    assert oracle.query(x[:0]).shape == (0, C)
    assert server.headers[0]["Content-Type"] == "application/json"


@network
def test_budget_is_checked_before_any_request(serve: Callable[..., Server]) -> None:
    server = serve()
    oracle = HttpOracle(server.url, QueryAccess(max_queries=10))
    with pytest.raises(QueryBudgetExceeded):
        oracle.query(inputs(11))
    assert server.requests == 0
    assert oracle.queries_used == 0
    oracle.query(inputs(10))
    assert server.requests == 1
    with pytest.raises(QueryBudgetExceeded):
        oracle.query(inputs(1))
    assert server.requests == 1
    assert oracle.remaining == 0


@network
def test_label_only_access_never_returns_scores(serve: Callable[..., Server]) -> None:
    server = serve()
    x = inputs(20)
    oracle = HttpOracle(server.url, QueryAccess(output="label"), batch_size=6)
    labels = oracle.query(x)
    assert labels.shape == (20,)
    assert labels.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(labels, MODEL(x).argmax(dim=1))
    assert oracle.predict(x[:3]).shape == (3,)
    assert oracle.query(x[:0]).dtype == torch.int64


@network
def test_label_endpoint(serve: Callable[..., Server]) -> None:
    def labels(_: int, body: Any) -> Reply:
        return ok({"outputs": torch.tensor(probs_of(body["inputs"])).argmax(1).tolist()})

    server = serve(labels)
    x = inputs(9)
    oracle = HttpOracle(server.url, QueryAccess(output="label"), raw_output="label")
    with torch.no_grad():
        assert torch.equal(oracle.query(x), MODEL(x).argmax(dim=1))
    with pytest.raises(UnsupportedModelError, match="cannot serve output='probs'"):
        HttpOracle(server.url, QueryAccess(output="probs"), raw_output="label")


@network
def test_transient_503_is_retried(serve: Callable[..., Server]) -> None:
    def flaky(number: int, body: Any) -> Reply:
        if number <= 2:
            return 503, {}, b'{"error": "warming up"}'
        return serve_probs(number, body)

    server = serve(flaky)
    out = HttpOracle(server.url, retries=3, backoff=0.01).query(inputs(4))
    assert server.requests == 3
    torch.testing.assert_close(out, torch.tensor(probs_of(inputs(4).tolist())))

    server = serve(flaky)
    with pytest.raises(OracleError, match=r"failed after 2 attempts: HTTP 503"):
        HttpOracle(server.url, retries=2, backoff=0.01).query(inputs(4))
    assert server.requests == 2


@network
def test_retry_after_is_honoured_and_capped(
    serve: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    def throttled(number: int, body: Any) -> Reply:
        if number == 1:
            return 429, {"Retry-After": "0"}, b""
        if number == 2:
            return 429, {"Retry-After": "3600"}, b""
        return serve_probs(number, body)

    server = serve(throttled)
    oracle = HttpOracle(server.url, retries=3, backoff=60.0, max_retry_after=0.05)
    with caplog.at_level(logging.WARNING, logger="modelshield.core.oracles.http"):
        oracle.query(inputs(2))
    assert server.requests == 3
    waits = [r.getMessage().rsplit("retrying in ", 1)[1] for r in caplog.records]
    assert waits == ["0.00s", "0.05s"]  # not the 60 s backoff, not the hour asked for


def test_parse_retry_after() -> None:
    assert _parse_retry_after("7") == 7.0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
    later = _parse_retry_after(formatdate(time.time() + 120, usegmt=True))
    assert later is not None and 100 < later <= 120


@network
def test_server_error_gives_up_after_retries(serve: Callable[..., Server]) -> None:
    server = serve(lambda n, b: (500, {}, b"boom"))
    oracle = HttpOracle(server.url, retries=4, backoff=0.001)
    with pytest.raises(OracleError) as info:
        oracle.query(inputs(3))
    assert server.requests == 4
    message = str(info.value)
    assert message.startswith(f"endpoint {server.url} failed after 4 attempts: HTTP 500")
    assert "boom" in message
    assert "\n" not in message


@network
@pytest.mark.parametrize("status", [400, 404, 422, 302])
def test_client_errors_are_not_retried(serve: Callable[..., Server], status: int) -> None:
    server = serve(lambda n, b: (status, {"Location": "http://127.0.0.1:1/"}, b'{"e": 1}'))
    with pytest.raises(OracleError, match=f"rejected the request: HTTP {status}"):
        HttpOracle(server.url, retries=3, backoff=0.001).query(inputs(2))
    assert server.requests == 1


@network
def test_unreachable_endpoint_fails_quickly() -> None:
    url = f"http://127.0.0.1:{closed_port()}/predict"
    oracle = HttpOracle(url, retries=3, backoff=0.001, timeout=2.0)
    with pytest.raises(OracleError) as info:
        oracle.query(inputs(2))
    assert str(info.value) == f"endpoint {url} unreachable after 3 attempts: Connection refused"


@network
def test_timeout_is_retried_then_reported(serve: Callable[..., Server]) -> None:
    server = serve(delay=0.5)
    with pytest.raises(OracleError, match="unreachable after 2 attempts: timed out"):
        HttpOracle(server.url, retries=2, backoff=0.001, timeout=0.1).query(inputs(2))
    assert server.requests == 2


@network
@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_and_order(serve: Callable[..., Server], limit: int) -> None:
    server = serve(delay=0.02)
    oracle = HttpOracle(server.url, max_concurrency=limit, batch_size=2)
    x = inputs(40, seed=3)
    out = oracle.query(x)
    assert server.requests == 20
    assert server.max_in_flight <= limit
    if limit > 1:
        assert server.max_in_flight >= 2  # the batches really went out in parallel
    with torch.no_grad():
        torch.testing.assert_close(out, torch.softmax(MODEL(x), dim=1), atol=1e-6, rtol=1e-5)


@network
def test_failed_batch_fails_the_query(serve: Callable[..., Server]) -> None:
    def one_bad(number: int, body: Any) -> Reply:
        return (400, {}, b"bad row") if number == 3 else serve_probs(number, body)

    server = serve(one_bad, delay=0.01)
    oracle = HttpOracle(server.url, QueryAccess(max_queries=100), batch_size=2)
    with pytest.raises(OracleError, match="HTTP 400"):
        oracle.query(inputs(20))
    assert oracle.queries_used == 20  # charged up front, as the base class does


@network
def test_custom_fields_dotted_path_and_headers(serve: Callable[..., Server]) -> None:
    def nested(_: int, body: Any) -> Reply:
        return ok({"result": {"probs": probs_of(body["instances"]), "model": "v1"}})

    server = serve(nested)
    oracle = HttpOracle(
        server.url,
        input_field="instances",
        output_field="result.probs",
        headers={"Authorization": "Bearer t0ken"},
        num_classes=C,
    )
    x = inputs(5)
    torch.testing.assert_close(oracle.query(x), torch.tensor(probs_of(x.tolist())))
    assert server.headers[0]["Authorization"] == "Bearer t0ken"

    wrong = HttpOracle(server.url, input_field="instances", output_field="result.scores")
    with pytest.raises(OracleError, match=r"no field 'result.scores'.*keys: probs, model"):
        wrong.query(x)


@network
@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (b"<html>oops</html>", "did not reply with JSON"),
        (b'{"other": []}', "no field 'outputs'"),
        (b'{"outputs": [[0.5, 0.5]]}', r"answered 1 row\(s\) for 3 input\(s\)"),
        (b'{"outputs": [[0.5, NaN], [0.5, 0.5], [0.5, 0.5]]}', "NaN"),
        (b'{"outputs": [[0.5, 0.5], [1.0], [0.5, 0.5]]}', "not a rectangular numeric array"),
        (b'{"outputs": [[2.0, -1.0], [0.5, 0.5], [0.5, 0.5]]}', r"outside \[0, 1\]"),
        (b'{"outputs": [0.5, 0.5, 0.5]}', r"shape \(N, C\)"),
    ],
)
def test_malformed_replies(serve: Callable[..., Server], reply: bytes, match: str) -> None:
    server = serve(lambda n, b: (200, {}, reply))
    with pytest.raises(OracleError, match=match) as info:
        HttpOracle(server.url, retries=1).query(inputs(3))
    assert str(info.value).startswith(f"endpoint {server.url}")
    assert "\n" not in str(info.value)


@network
def test_secrets_in_url_are_not_echoed() -> None:
    url = f"http://127.0.0.1:{closed_port()}/predict?api_key=s3cret"
    with pytest.raises(OracleError) as info:
        HttpOracle(url, retries=1).query(inputs(1))
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "ftp://example.com/predict"}, "http:// or https://"),
        ({"url": "localhost:8000/predict"}, "http:// or https://"),
        ({"url": "http://"}, "http:// or https://"),
        ({"url": "http://host:port/"}, "http:// or https://"),
        ({"url": "http://me:s3cret@127.0.0.1:1/predict"}, "credentials"),
        ({"output_field": "result..probs"}, "output_field"),
        ({"input_field": ""}, "input_field"),
        ({"retries": 0}, "retries"),
        ({"timeout": -1}, "timeout"),
        ({"backoff": float("nan")}, "backoff"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"raw_output": "scores"}, "raw_output"),
        ({"headers": {"X-Token": 5}}, "headers"),
    ],
)
def test_invalid_config(kwargs: dict[str, Any], match: str) -> None:
    kwargs = {"url": "http://127.0.0.1:1/predict", **kwargs}
    with pytest.raises(InvalidConfigError, match=match) as info:
        HttpOracle(**kwargs)
    assert "s3cret" not in str(info.value)
