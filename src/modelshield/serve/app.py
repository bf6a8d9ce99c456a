"""The defended prediction gateway: a model behind switchable defences, served over HTTP.

:class:`Gateway` is the framework-free core: it validates a batch, applies the admission
defences of the requesting client (budget, rate limit, detector block), runs the model,
feeds the detectors (PRADA, ``ood``) and passes the probabilities through the output defences.
:func:`create_app` puts it behind FastAPI:

* ``POST /predict`` with ``{"inputs": [[...], ...]}`` (a batch ``(N, *input_shape)`` as
  nested lists, or flattened rows) answers ``{"outputs": ...}``: probabilities ``(N, C)``
  or, under ``label-only``, integer labels ``(N,)`` — the format
  :class:`~modelshield.core.oracles.HttpOracle` reads (``raw_output="probs"`` or
  ``"label"``).
* ``GET /health``, ``GET /info`` (input shape, classes, output kind, active defences and
  their public parameters), ``GET /stats`` (per-client counters and detector state —
  PRADA, ``ood`` — for the operator; optionally behind a bearer token).

Errors are one-line JSON objects ``{"error": "...", "code": "..."}``: 400 (malformed
request or client id), 413 (body too large), 422 (wrong shape, NaN, out of bounds, batch
over the limit), 429 (rate limit, with ``Retry-After``), 403 (budget spent or client
blocked), 500 (the model failed). The client is identified by the ``X-Client-Id`` header
(configurable) or, without it, by the peer address. That header is only as trustworthy as
whatever sets it: behind an authenticating proxy it is the account; exposed directly, a
client can rotate ids to reset its budget, rate and detector history (a Sybil attack, the
limitation Juuti et al. 2019 note for any per-client defence).
"""

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modelshield import __version__
from modelshield.core.classifier import Classifier
from modelshield.core.errors import InvalidConfigError, ModelShieldError
from modelshield.core.oracle import Oracle
from modelshield.core.threat import QueryAccess, check_bounds
from modelshield.serve.defenses import (
    AdmissionDefense,
    DetectorDefense,
    GatewayDefense,
    OutputDefense,
    Rejection,
    parse_defense,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from modelshield.core.loading import LoadedModel

logger = logging.getLogger(__name__)

__all__ = ["Answer", "Backend", "Gateway", "create_app", "load_gateway", "to_batch"]

DEFAULT_MAX_BATCH = 1024
DEFAULT_CLIENT_HEADER = "X-Client-Id"
_MAX_CLIENT_ID = 128


# -----------------------------------------------------------------------------------------
# The model behind the gateway
# -----------------------------------------------------------------------------------------


class Backend:
    """The served model: a white-box :class:`Classifier` or a black-box :class:`Oracle`.

    ``predict(x)`` returns ``(probs, labels)``: probabilities ``(N, C)`` (``None`` when the
    model only gives labels) and top-1 labels ``(N,)``.
    """

    def __init__(
        self,
        model: Classifier | Oracle,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> None:
        self.model = model
        if isinstance(model, Classifier):
            self.input_shape: tuple[int, ...] | None = tuple(input_shape or model.input_shape)
            self.num_classes: int | None = num_classes or model.num_classes
            self.bounds: tuple[float, float] | None = check_bounds(bounds or model.bounds)
            self.scores = True
        elif isinstance(model, Oracle):
            shape = input_shape or model.input_shape
            self.input_shape = tuple(int(s) for s in shape) if shape else None
            self.num_classes = num_classes or model.num_classes
            self.bounds = check_bounds(bounds) if bounds is not None else None
            self.scores = model.raw_output in ("logits", "probs")
            # Unlimited, unrestricted access from the gateway; the defences restrict it.
            model.access = QueryAccess(output="probs" if self.scores else "label")
        else:
            raise InvalidConfigError(
                f"the gateway serves a Classifier or an Oracle, got {type(model).__name__}"
            )

    @classmethod
    def from_loaded(cls, loaded: "LoadedModel", **kwargs: Any) -> "Backend":
        model = loaded.classifier if loaded.classifier is not None else loaded.oracle
        if model is None:
            raise InvalidConfigError("the loaded model has neither a classifier nor an oracle")
        return cls(model, **kwargs)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if isinstance(self.model, Classifier):
            logits = self.model(x.to(self.model.device)).detach().cpu()
            probs = torch.softmax(logits.double(), dim=1)
            return probs, probs.argmax(dim=1)
        out = self.model.query(x)
        if out.ndim == 1:
            return None, out.long()
        probs = out.double()
        return probs, probs.argmax(dim=1)


def to_batch(
    values: Any,
    input_shape: Sequence[int] | None,
    *,
    bounds: tuple[float, float] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> torch.Tensor:
    """Check a request's ``inputs`` (nested lists) and return a float32 batch.

    Raises :class:`Rejection` 422 for anything that is not a finite numeric batch
    ``(N, *input_shape)`` (flattened rows ``(N, prod(input_shape))`` are reshaped) within
    ``bounds``, or larger than ``max_batch`` rows.
    """
    if not isinstance(values, list):
        raise Rejection(422, "inputs must be a list of samples (a batch)", "invalid_inputs")
    if len(values) > max_batch:
        raise Rejection(
            422,
            f"batch of {len(values)} samples exceeds the limit of {max_batch}; send smaller batches",
            "batch_too_large",
        )
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise Rejection(
            422, "inputs must be a rectangular array of numbers", "invalid_inputs"
        ) from None
    shape = tuple(input_shape) if input_shape is not None else None
    if arr.size == 0 and len(values) == 0:
        return torch.empty((0, *(shape or ())), dtype=torch.float32)
    if arr.ndim < 2:
        raise Rejection(
            422, f"inputs must be a batch (N, ...), got shape {arr.shape}", "invalid_shape"
        )
    if shape is not None and arr.shape[1:] != shape:
        if arr.ndim == 2 and arr.shape[1] == math.prod(shape):
            arr = arr.reshape((arr.shape[0], *shape))
        else:
            want = ", ".join(map(str, shape))
            raise Rejection(
                422,
                f"inputs have shape {arr.shape}; expected (N, {want}) or (N, {math.prod(shape)})",
                "invalid_shape",
            )
    if not np.isfinite(arr).all():
        raise Rejection(422, "inputs contain NaN or infinite values", "invalid_inputs")
    if bounds is not None and arr.size:
        low, high = bounds
        tol = 1e-6 * max(1.0, high - low)
        if float(arr.min()) < low - tol or float(arr.max()) > high + tol:
            raise Rejection(
                422,
                f"inputs must lie in [{low:g}, {high:g}], got values in "
                f"[{float(arr.min()):.4g}, {float(arr.max()):.4g}]",
                "out_of_bounds",
            )
    return torch.from_numpy(np.ascontiguousarray(arr))


# -----------------------------------------------------------------------------------------
# The gateway
# -----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What ``/predict`` returns: scores ``(N, C)`` or labels ``(N,)``, and extra headers."""

    outputs: torch.Tensor
    labels: bool
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _ClientCounters:
    requests: int = 0
    served: int = 0  # rows answered
    rejected: dict[str, int] = field(default_factory=dict)
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


class Gateway:
    """A model behind defences (see :mod:`modelshield.serve.defenses`); thread-safe.

    ``defenses`` are objects or specs like ``"rate=10/s"``. Output defences run in their
    fixed order (perturbation, top-k, rounding, label-only). ``clock`` is the monotonic
    clock of the rate limiter (tests pass a fake one).
    """

    def __init__(
        self,
        backend: Backend | Classifier | Oracle,
        defenses: Sequence[GatewayDefense | str] = (),
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend if isinstance(backend, Backend) else Backend(backend)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.max_batch = max_batch
        self.defenses: list[GatewayDefense] = [
            d if isinstance(d, GatewayDefense) else parse_defense(d) for d in defenses
        ]
        names = [d.name for d in self.defenses]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidConfigError(f"defence {twice[0]!r} is given more than once")
        outputs = [d for d in self.defenses if isinstance(d, OutputDefense)]
        self.outputs = sorted(outputs, key=lambda d: d.order)
        self.detectors = [d for d in self.defenses if isinstance(d, DetectorDefense)]
        self.admission = [
            d
            for d in self.defenses
            if isinstance(d, AdmissionDefense) and not isinstance(d, DetectorDefense)
        ]
        # Blocks first (permanent refusals), then budget (permanent), then rate (retry).
        self.admission.sort(key=lambda d: {"budget": 0, "rate": 1}.get(d.name, 2))
        self.labels_only = (not self.backend.scores) or any(d.labels for d in self.outputs)
        if not self.backend.scores and outputs:
            logger.warning(
                "the model answers labels only; output defences %s have no effect",
                ", ".join(d.name for d in outputs),
            )
            self.outputs = []
        elif self.labels_only and len(self.outputs) > 1:
            logger.info(
                "label-only is active: %s only change scores that are not answered",
                ", ".join(d.name for d in self.outputs if not d.labels),
            )
        for d in self.defenses:
            d.bind(self.backend)
        self.clock = clock
        self._admit_lock = threading.Lock()
        self._counters: dict[str, _ClientCounters] = {}
        self._counters_lock = threading.Lock()
        self.started = time.time()

    # -- bookkeeping -----------------------------------------------------------------------
    def _count(self, client: str, *, served: int = 0, rejected: str | None = None) -> None:
        with self._counters_lock:
            c = self._counters.get(client)
            if c is None:
                c = self._counters[client] = _ClientCounters()
            c.requests += 1
            c.served += served
            c.last_seen = time.time()
            if rejected is not None:
                c.rejected[rejected] = c.rejected.get(rejected, 0) + 1

    # -- one request -----------------------------------------------------------------------
    def parse(self, values: Any) -> torch.Tensor:
        """The request's ``inputs`` as a checked batch (:class:`Rejection` 422 otherwise)."""
        return to_batch(
            values, self.backend.input_shape, bounds=self.backend.bounds, max_batch=self.max_batch
        )

    def predict(self, client: str, x: torch.Tensor) -> Answer:
        """Answer ``x`` for ``client`` through the defences; raises :class:`Rejection`."""
        n = int(x.shape[0])
        if n > self.max_batch:
            raise Rejection(
                422, f"batch of {n} exceeds the limit of {self.max_batch}", "batch_too_large"
            )
        if n == 0:
            empty = torch.empty((0,) if self.labels_only else (0, self.backend.num_classes or 0))
            return Answer(empty.long() if self.labels_only else empty, self.labels_only)
        everyone = [*self.detectors, *self.admission]
        with self._admit_lock:
            now = self.clock()
            for d in everyone:
                refusal = d.check(client, n, now)
                if refusal is not None:
                    self._count(client, rejected=refusal.code)
                    raise refusal
            for d in everyone:
                d.commit(client, n, now)
        probs, labels = self.backend.predict(x)
        for det in self.detectors:
            refusal = det.observe(client, x, labels, probs)
            if refusal is not None:
                self._count(client, rejected=refusal.code)
                raise refusal
        headers: dict[str, str] = {}
        for d in self.admission:
            headers.update(d.headers(client))
        self._count(client, served=n)
        if probs is None:
            return Answer(labels, True, headers)
        out = probs
        for od in self.outputs:
            out = od.apply(out)
        return Answer(out, self.labels_only, headers)

    # -- reports ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Public facts for ``GET /info``: no secrets, no detector thresholds."""
        b = self.backend
        return {
            "service": "modelshield gateway",
            "version": __version__,
            "input_shape": list(b.input_shape) if b.input_shape is not None else None,
            "num_classes": b.num_classes,
            "classes": list(range(b.num_classes)) if b.num_classes else None,
            "bounds": list(b.bounds) if b.bounds is not None else None,
            "output": "label" if self.labels_only else "probs",
            "max_batch": self.max_batch,
            "defenses": [{"name": d.name, **d.public()} for d in self.defenses],
        }

    def flagged(self) -> list[str]:
        with self._counters_lock:
            clients = list(self._counters)
        return sorted(c for c in clients if any(det.flagged(c) for det in self.detectors))

    def stats(self) -> dict[str, Any]:
        """Per-client counters and defence state for the operator (``GET /stats``)."""
        with self._counters_lock:
            counters = {
                k: (v.requests, v.served, dict(v.rejected), v.first_seen, v.last_seen)
                for k, v in self._counters.items()
            }
        clients: dict[str, Any] = {}
        for client, (requests, served, rejected, first, last) in sorted(counters.items()):
            entry: dict[str, Any] = {
                "requests": requests,
                "queries": served,
                "rejected": rejected,
                "first_seen": first,
                "last_seen": last,
            }
            for d in self.defenses:
                s = d.client_stats(client)
                if s is not None:
                    entry[d.name] = s
            clients[client] = entry
        return {
            "uptime_s": round(time.time() - self.started, 3),
            "clients": clients,
            "flagged": self.flagged(),
            "totals": {
                "clients": len(clients),
                "requests": sum(c["requests"] for c in clients.values()),
                "queries": sum(c["queries"] for c in clients.values()),
                "rejected": sum(sum(c["rejected"].values()) for c in clients.values()),
            },
            "defenses": [
                {"name": d.name, **(d.config() if hasattr(d, "config") else d.public())}
                for d in self.defenses
            ],
        }


def load_gateway(
    model: str,
    defenses: Sequence[GatewayDefense | str] = (),
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Gateway:
    """Load a model file safely (:func:`~modelshield.core.loading.load_model`) behind
    ``defenses``. Requests outside ``bounds`` are refused; without ``bounds``, a torch
    model's own (default ``(0, 1)``) apply and a black-box model's inputs are unchecked."""
    from modelshield.core.loading import load_model

    loaded = load_model(
        model,
        trust_pickle=trust_pickle,
        arch=arch,
        input_shape=input_shape,
        num_classes=num_classes,
        bounds=bounds if bounds is not None else (0.0, 1.0),
        mean=mean,
        std=std,
        device=device,
    )
    backend = Backend.from_loaded(
        loaded, input_shape=input_shape, num_classes=num_classes, bounds=bounds
    )
    logger.info(
        "serving %s (%s, sha256 %s...), input shape %s, %s classes",
        loaded.file.path,
        loaded.kind,
        loaded.file.sha256[:12],
        backend.input_shape,
        backend.num_classes,
    )
    return Gateway(backend, defenses, max_batch=max_batch)


# -----------------------------------------------------------------------------------------
# HTTP
# -----------------------------------------------------------------------------------------


def _client_id(raw: str | None, peer: str | None) -> str:
    if raw is None or raw == "":
        return peer or "unknown"
    if len(raw) > _MAX_CLIENT_ID or not all(0x21 <= ord(ch) <= 0x7E for ch in raw):
        raise Rejection(
            400,
            f"client id must be 1 to {_MAX_CLIENT_ID} printable ASCII characters without spaces",
            "invalid_client_id",
        )
    return raw


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def create_app(
    gateway: Gateway,
    *,
    client_header: str | None = DEFAULT_CLIENT_HEADER,
    max_body_bytes: int | None = None,
    stats_token: str | None = None,
    expose_stats: bool = True,
) -> "FastAPI":
    """The FastAPI application in front of ``gateway``.

    ``client_header``: the header naming the client (``None`` or ``""``: the peer address
    only). ``max_body_bytes``: largest request body (default: room for ``max_batch`` rows
    of 24 characters per value). ``stats_token``: when set, ``GET /stats`` needs
    ``Authorization: Bearer <token>``; ``expose_stats=False`` removes ``/stats``.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_body_bytes is None:
        per_row = 24 * math.prod(gateway.backend.input_shape or (4096,)) + 16
        max_body_bytes = max(1 << 20, gateway.max_batch * per_row)
    limit = int(max_body_bytes)
    header = client_header or None

    app = FastAPI(
        title="modelshield gateway",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.gateway = gateway

    def error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)

    def refusal(r: Rejection) -> Any:
        headers = None
        if r.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(r.retry_after)))}
        body: dict[str, Any] = {"error": r.message, "code": r.code}
        if r.retry_after is not None:
            body["retry_after"] = round(r.retry_after, 3)
        return JSONResponse(body, status_code=r.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error(exc.status_code, str(exc.detail), f"http_{exc.status_code}")

    def answer(client: str, body: bytes) -> Any:
        started = time.perf_counter()
        try:
            try:
                payload = json.loads(body, parse_constant=_reject_constant)
            except RecursionError:
                raise Rejection(400, "request body is nested too deeply", "invalid_json") from None
            except ValueError as exc:
                if "is not allowed" in str(exc):
                    raise Rejection(
                        422, "inputs contain NaN or infinite values", "invalid_inputs"
                    ) from None
                raise Rejection(400, "request body is not valid JSON", "invalid_json") from None
            if not isinstance(payload, dict) or "inputs" not in payload:
                raise Rejection(
                    400, 'request body must be a JSON object {"inputs": [...]}', "invalid_request"
                )
            x = gateway.parse(payload["inputs"])
            result = gateway.predict(client, x)
        except Rejection as r:
            logger.debug("client %r: refused %s (%d)", client, r.code, r.status)
            return refusal(r)
        except ModelShieldError as exc:  # the back-end rejected the inputs
            logger.debug("client %r: back-end refused the inputs: %s", client, exc)
            return error(422, str(exc).splitlines()[0], "invalid_inputs")
        except Exception:
            logger.exception("client %r: prediction failed", client)
            return error(500, "the model failed on this request", "internal_error")
        content = json.dumps({"outputs": result.outputs.tolist()}, allow_nan=False)
        logger.debug(
            "client %r: %d row(s) answered in %.1f ms",
            client,
            int(result.outputs.shape[0]),
            1000 * (time.perf_counter() - started),
        )
        return Response(content, media_type="application/json", headers=result.headers)

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        try:
            peer = request.client.host if request.client is not None else None
            client = _client_id(request.headers.get(header) if header else None, peer)
        except Rejection as r:
            return refusal(r)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error(413, f"request body larger than {limit} bytes", "body_too_large")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return error(413, f"request body larger than {limit} bytes", "body_too_large")
            chunks.append(chunk)
        return await run_in_threadpool(answer, client, b"".join(chunks))

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> Any:
        return gateway.info()

    if expose_stats:

        @app.get("/stats")
        async def stats(request: Request) -> Any:
            if stats_token:
                given = request.headers.get("authorization", "")
                expected = f"Bearer {stats_token}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    return error(
                        401, "GET /stats needs the operator's bearer token", "unauthorized"
                    )
            return await run_in_threadpool(gateway.stats)

    return app
