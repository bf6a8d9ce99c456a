"""The gateway over real HTTP on 127.0.0.1 (uvicorn in a thread), queried through HttpOracle."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from modelshield.core.errors import OracleError, QueryBudgetExceeded
from modelshield.core.oracles import HttpOracle
from modelshield.core.threat import QueryAccess
from modelshield.serve.app import create_app, load_gateway
from modelshield.serve.server import serve_in_thread
from tests.conftest import Bundle

pytestmark = pytest.mark.network

Serve = Callable[..., str]


@pytest.fixture()
def serve(bundle: Bundle) -> Iterator[Serve]:
    """``serve(*defences, **create_app kwargs)`` → base URL of a gateway on the bundle model."""
    stops: list[Callable[[], None]] = []

    def start(*defenses: str, max_batch: int = 1024, **kwargs: Any) -> str:
        gateway = load_gateway(str(bundle.model_pt2), list(defenses), max_batch=max_batch)
        url, stop = serve_in_thread(create_app(gateway, **kwargs))
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


@pytest.fixture(scope="module")
def data(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = np.load(bundle.data)
    x = torch.from_numpy(arrays["x"])
    with torch.no_grad():
        probs = torch.softmax(bundle.module(x).double(), dim=1)
    return x, probs


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def request(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _lower(exc.headers), json.loads(exc.read())


def post(url: str, payload: Any, client: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if client is not None:
        headers["X-Client-Id"] = client
    return request(url + "/predict", json.dumps(payload).encode(), headers)


def oracle(url: str, client: str = "alice", **kwargs: Any) -> HttpOracle:
    return HttpOracle(url + "/predict", headers={"X-Client-Id": client}, **kwargs)


def test_plain_gateway_answers_the_models_probabilities(serve: Serve, data: Any) -> None:
    x, probs = data
    url = serve()
    status, _, health = request(url + "/health")
    assert (status, health) == (200, {"status": "ok"})
    status, _, info = request(url + "/info")
    assert status == 200 and info["input_shape"] == [1, 6, 6] and info["num_classes"] == 3
    assert info["output"] == "probs" and info["defenses"] == []
    assert "path" not in json.dumps(info) and "sha256" not in json.dumps(info)
    out = oracle(url, batch_size=16).query(x)
    torch.testing.assert_close(out.double(), probs, atol=1e-6, rtol=0)


def test_label_only_returns_integers(serve: Serve, data: Any) -> None:
    x, probs = data
    url = serve("label-only")
    status, _, body = post(url, {"inputs": x[:5].tolist()})
    assert status == 200 and all(type(v) is int for v in body["outputs"])
    labels = oracle(url, raw_output="label", access=QueryAccess(output="label")).query(x)
    assert torch.equal(labels, probs.argmax(dim=1))
    assert request(url + "/info")[2]["output"] == "label"
    with pytest.raises(OracleError, match="must have shape"):
        oracle(url).query(x[:2])  # a client expecting probabilities sees a clean error


def test_top_k_round_and_noise(serve: Serve, data: Any) -> None:
    x, probs = data
    top1 = oracle(serve("top-k=1")).query(x).double()
    assert ((top1 > 0).sum(dim=1) == 1).all()
    torch.testing.assert_close(top1.max(dim=1).values, probs.max(dim=1).values, atol=1e-6, rtol=0)
    rounded = oracle(serve("round=2")).query(x).double().numpy()
    np.testing.assert_allclose(rounded, np.round(rounded, 2), atol=1e-7)
    assert np.abs(rounded - probs.numpy()).max() <= 0.005 + 1e-6
    noisy = oracle(serve("noise=0.05")).query(x).double()
    assert torch.equal(noisy.argmax(dim=1), probs.argmax(dim=1))
    torch.testing.assert_close(noisy.sum(dim=1), torch.ones(len(x), dtype=torch.float64))
    assert (noisy - probs).abs().max() > 1e-4


def test_rate_limit_429_then_httporacle_retries(
    serve: Serve, data: Any, caplog: pytest.LogCaptureFixture
) -> None:
    x, probs = data
    url = serve("rate=20/s,burst=20")
    assert post(url, {"inputs": x[:20].tolist()}, "bob")[0] == 200
    status, headers, body = post(url, {"inputs": x[:5].tolist()}, "bob")
    assert status == 429 and body["code"] == "rate_limited"
    assert headers["retry-after"] == "1" and 0 < body["retry_after"] <= 1
    assert post(url, {"inputs": x[:5].tolist()}, "carol")[0] == 200  # per client
    client = oracle(url, "dave", batch_size=20, max_concurrency=1, retries=4)
    with caplog.at_level(logging.WARNING, logger="modelshield.core.oracles.http"):
        out = client.query(x[:60])
    torch.testing.assert_close(out.double(), probs[:60], atol=1e-6, rtol=0)
    assert "HTTP 429" in caplog.text and "retrying in 1.00s" in caplog.text


def test_budget_403_reaches_the_client_as_query_budget_exceeded(serve: Serve, data: Any) -> None:
    x, _ = data
    url = serve("budget=50")
    client = oracle(url, "eve", batch_size=25)
    client.query(x[:40])
    with pytest.raises(QueryBudgetExceeded, match=r"HTTP 403.*query budget of 50 for this client"):
        client.query(x[:20])
    assert client.remaining is None  # the server's budget, not the client-side one
    status, headers, body = post(url, {"inputs": x[:10].tolist()}, "eve")
    assert status == 200 and headers["x-query-budget-remaining"] == "0"
    status, _, body = post(url, {"inputs": x[:1].tolist()}, "eve")
    assert status == 403 and body["code"] == "budget_exhausted" and "spent" in body["error"]
    assert post(url, {"inputs": x[:10].tolist()}, "frank")[0] == 200


def test_prada_block_over_http(serve: Serve) -> None:
    url = serve("prada=0.9,action=block,min_samples=40", stats_token="s3cret")
    g = torch.Generator().manual_seed(0)
    fresh = torch.rand(60, 1, 6, 6, generator=g)
    stream = torch.cat([fresh, fresh])[torch.randperm(120, generator=g)]  # half repeats
    client = oracle(url, "mallory", batch_size=10, max_concurrency=1)
    with pytest.raises(OracleError, match=r"HTTP 403.*model-extraction"):
        client.query(stream)
    assert request(url + "/stats")[0] == 401
    status, _, stats = request(url + "/stats", headers={"Authorization": "Bearer s3cret"})
    assert status == 200 and stats["flagged"] == ["mallory"]
    assert stats["clients"]["mallory"]["prada"]["flagged"] is True
    assert stats["defenses"] == [
        {
            "name": "prada",
            "action": "block",
            "delta": 0.9,
            "min_samples": 40,
            "outlier_z": 3.0,
            "window": 5000,
            "test_every": 1,
        }
    ]
    assert post(url, {"inputs": fresh[:1].tolist()}, "alice")[0] == 200


def test_bad_requests_get_one_line_json_errors(serve: Serve) -> None:
    url = serve(max_batch=8, max_body_bytes=20_000)
    row = [[[0.5] * 6] * 6]
    cases: list[tuple[bytes, int, str]] = [
        (b"not json", 400, "invalid_json"),
        (b'{"x": 1}', 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (json.dumps({"inputs": [[0.5] * 5]}).encode(), 422, "invalid_shape"),
        (json.dumps({"inputs": [row, [[0.5] * 6] * 5]}).encode(), 422, "invalid_inputs"),
        (
            b'{"inputs": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,'
            b" 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]}",
            422,
            "invalid_inputs",
        ),
        (json.dumps({"inputs": [[2.0] * 36]}).encode(), 422, "out_of_bounds"),
        (json.dumps({"inputs": [row] * 9}).encode(), 422, "batch_too_large"),
        (json.dumps({"inputs": [row] * 200}).encode(), 413, "body_too_large"),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 413, "body_too_large"),
    ]
    for body, status, code in cases:
        got_status, _, got = request(url + "/predict", body, {"Content-Type": "application/json"})
        assert (got_status, got["code"]) == (status, code), body[:60]
        assert isinstance(got["error"], str) and "\n" not in got["error"]
    status, _, got = request(url + "/predict", b'{"inputs": []}')
    assert status == 200 and got == {"outputs": []}
    status, _, got = request(
        url + "/predict", json.dumps({"inputs": [row]}).encode(), {"X-Client-Id": "a b"}
    )
    assert status == 400 and got["code"] == "invalid_client_id"
    assert request(url + "/nope")[0:3:2] == (404, {"error": "Not Found", "code": "http_404"})
    assert request(url + "/predict", method="GET")[0] == 405


def test_deep_nesting_is_refused_not_crashing(serve: Serve) -> None:
    url = serve()
    body = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, _, got = request(url + "/predict", body)
    assert status == 400 and got["code"] == "invalid_json"
    assert request(url + "/health")[0] == 200


def test_client_identity_defaults_to_the_peer_address(serve: Serve, data: Any) -> None:
    x, _ = data
    url = serve("budget=10")
    request(url + "/predict", json.dumps({"inputs": x[:3].tolist()}).encode())
    post(url, {"inputs": x[:4].tolist()}, "zoe")
    status, _, stats = request(url + "/stats")  # loopback, no token configured
    assert status == 200
    assert stats["clients"]["127.0.0.1"]["budget"] == {"used": 3, "remaining": 7}
    assert stats["clients"]["zoe"]["budget"] == {"used": 4, "remaining": 6}
    url2 = serve("budget=10", client_header="", expose_stats=False)
    post(url2, {"inputs": x[:4].tolist()}, "zoe")
    assert request(url2 + "/stats")[0] == 404


def test_budget_is_exact_under_concurrent_requests(serve: Serve, data: Any) -> None:
    x, _ = data
    url = serve("budget=100")
    body = {"inputs": x[:3].tolist()}
    statuses: list[int] = []

    def worker() -> None:
        for _ in range(10):
            statuses.append(post(url, body, "swarm")[0])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert statuses.count(200) == 33 and statuses.count(403) == 80 - 33
    stats = request(url + "/stats")[2]["clients"]["swarm"]
    assert stats["budget"] == {"used": 99, "remaining": 1} and stats["queries"] == 99
