"""An :class:`~modelshield.core.oracle.Oracle` in front of an HTTP prediction endpoint.

Standard library only. Each request is a JSON ``POST`` of ``{input_field: batch}`` (the
batch as nested lists); the reply is a JSON object whose ``output_field`` (a dotted path,
e.g. ``"result.probs"``) holds scores ``(N, C)`` or labels ``(N,)``. The batches of one
query are sent in parallel by up to ``max_concurrency`` threads and reassembled in order.
Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
(``Retry-After`` honoured, capped); other 4xx replies and redirects fail at once.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

from modelshield.core.errors import InvalidConfigError, OracleError, QueryBudgetExceeded
from modelshield.core.oracle import Oracle
from modelshield.core.oracles import _check_raw_output, _to_raw
from modelshield.core.threat import QueryAccess

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib would replay a POST as a body-less GET (and could carry
    auth headers to another host); the 3xx surfaces as an error instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Unavailable(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, message: str, *, connection: bool, retry_after: float | None = None):
        super().__init__(message)
        self.connection = connection
        self.retry_after = retry_after


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _describe(exc: BaseException) -> str:
    """Short, human wording for a network error (``Connection refused``, ``timed out``)."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    if isinstance(reason, BaseException):
        return _one_line(f"{type(reason).__name__}: {reason}".rstrip(": "))
    return _one_line(str(reason))


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _lookup(reply: object, path: Sequence[str], dotted: str) -> object:
    """Follow a dotted path (dict keys; integer indices into lists) through a reply."""
    node = reply
    for depth, key in enumerate(path):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            where = ".".join(path[:depth]) or "the reply"
            keys = ""
            if isinstance(node, dict):
                keys = f" (keys: {', '.join(map(str, list(node)[:10]))})"
            raise OracleError(f"reply has no field {dotted!r}: {where} has no {key!r}{keys}")
    return node


def _positive(value: object, name: str, *, integer: bool, allow_zero: bool = False) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok and not integer:
        ok = math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        ok = value >= 0 if allow_zero else value > 0  # type: ignore[operator]
    if not ok:
        kind = "an integer" if integer else "a finite number"
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidConfigError(f"{name} must be {kind} {bound}, got {value!r}")
    return value


class HttpOracle(Oracle):
    """Black-box access to a classifier served over HTTP(S) with a JSON API.

    ``raw_output`` says what the endpoint returns (``"probs"``, ``"logits"`` or
    ``"label"``). ``batch_size`` is the number of rows per request; the batches of one
    ``query`` run in parallel on ``max_concurrency`` threads. ``retries`` is the number
    of attempts per request (1 = no retry); between attempts the wait is
    ``backoff * 2**k`` seconds, or the server's ``Retry-After`` capped at
    ``max_retry_after``. ``num_classes``, when not given, is learnt from the first reply.

    The whole query is charged to the budget by the base class before any request is
    sent; a query that fails part-way stays charged (the server may have answered).
    """

    def __init__(
        self,
        url: str,
        access: QueryAccess | None = None,
        *,
        input_field: str = "inputs",
        output_field: str = "outputs",
        raw_output: str = "probs",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 4,
        batch_size: int = 64,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        max_retry_after: float = 30.0,
        name: str = "",
    ) -> None:
        self.raw_output = _check_raw_output(raw_output)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # raises ValueError on a malformed port
        except (TypeError, ValueError, AttributeError):
            parts, port = None, None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise InvalidConfigError(f"url must be an http:// or https:// URL, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise InvalidConfigError(
                "url must not carry credentials (user:password@); "
                "pass them in headers, e.g. {'Authorization': ...}"
            )
        if not isinstance(input_field, str) or not input_field:
            raise InvalidConfigError(f"input_field must be a non-empty string, got {input_field!r}")
        path = output_field.split(".") if isinstance(output_field, str) else [""]
        if not all(path):
            raise InvalidConfigError(
                f"output_field must be a field name or dotted path like 'result.probs', "
                f"got {output_field!r}"
            )
        if headers is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise InvalidConfigError("headers must map header names (str) to values (str)")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise InvalidConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.url = url
        # For messages and logs: no credentials, no query string (it may hold an API key).
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = host + (f":{port}" if port is not None else "")
        self.display_url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path, "..." if parts.query else "", "")
        )
        self.input_field = input_field
        self.output_field = output_field
        self._output_path = path
        self.timeout = float(_positive(timeout, "timeout", integer=False))
        self.retries: int = _positive(retries, "retries", integer=True)
        self.backoff = float(_positive(backoff, "backoff", integer=False, allow_zero=True))
        self.max_retry_after = float(
            _positive(max_retry_after, "max_retry_after", integer=False, allow_zero=True)
        )
        self.max_concurrency: int = _positive(max_concurrency, "max_concurrency", integer=True)
        #: Rows per HTTP request.
        self.request_batch_size: int = _positive(batch_size, "batch_size", integer=True)
        self._headers = {"Accept": "application/json", **(headers or {})}
        self._headers["Content-Type"] = "application/json"
        # Honours the usual *_proxy / no_proxy environment; never follows redirects.
        self._opener = urllib.request.build_opener(_NoRedirect)
        # The base class chunks a query by ``batch_size`` and calls ``_forward`` once per
        # chunk, sequentially. Handing it the whole query as one chunk lets ``_forward``
        # fan the request batches out in parallel while the budget stays with the base.
        super().__init__(
            access,
            input_shape=input_shape,
            num_classes=num_classes,
            batch_size=sys.maxsize,
            name=name or self.display_url,
        )

    # -- one request ---------------------------------------------------------------------
    def _attempt(self, payload: bytes) -> bytes:
        request = urllib.request.Request(
            self.url, data=payload, headers=self._headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as exc:
            try:
                detail = _one_line(exc.read().decode("utf-8", "replace"))
            except Exception:  # the error body is a courtesy; never fail on it
                detail = ""
            finally:
                exc.close()
            text = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            if exc.code in _RETRY_STATUS or exc.code >= 500:
                retry_after = _parse_retry_after(exc.headers.get("Retry-After"))
                raise _Unavailable(text, connection=False, retry_after=retry_after) from None
            if exc.code == 403 and '"budget_exhausted"' in detail:
                # the server's own per-client budget (modelshield serve --defense budget=N)
                raise QueryBudgetExceeded(
                    f"endpoint {self.display_url} refused: its query budget is spent ({text})"
                ) from None
            raise OracleError(f"endpoint {self.display_url} rejected the request: {text}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _Unavailable(_describe(exc), connection=True) from None

    def _send(self, payload: bytes, abort: threading.Event) -> bytes:
        """POST ``payload`` with retries; :class:`OracleError` once attempts run out."""
        error = _Unavailable("no attempt made", connection=True)
        attempt = 0
        while attempt < self.retries and not abort.is_set():
            attempt += 1
            try:
                return self._attempt(payload)
            except _Unavailable as exc:
                error = exc
            if attempt == self.retries:
                break
            delay = self.backoff * 2 ** (attempt - 1)
            if error.retry_after is not None:
                delay = min(error.retry_after, self.max_retry_after)
            logger.warning(
                "endpoint %s: attempt %d/%d failed (%s); retrying in %.2fs",
                self.display_url,
                attempt,
                self.retries,
                error,
                delay,
            )
            if abort.wait(delay):
                break
        verb = "unreachable" if error.connection else "failed"
        raise OracleError(
            f"endpoint {self.display_url} {verb} after {_plural(attempt, 'attempt')}: {error}"
        )

    def _post(self, batch: torch.Tensor, abort: threading.Event) -> torch.Tensor:
        """Send one batch and check the reply."""
        n = int(batch.shape[0])
        payload = json.dumps({self.input_field: batch.tolist()}).encode("utf-8")
        logger.debug("endpoint %s: sending %d row(s), %d bytes", self.display_url, n, len(payload))
        body = self._send(payload, abort)
        source = f"endpoint {self.display_url}"
        try:
            reply = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            snippet = _one_line(body[:200].decode("utf-8", "replace"), 80)
            raise OracleError(f"{source} did not reply with JSON: {snippet!r}") from None
        try:
            values = _lookup(reply, self._output_path, self.output_field)
        except OracleError as exc:
            raise OracleError(f"{source}: {exc}") from None
        raw = _to_raw(values, self.raw_output, n, self.num_classes, source)
        if raw.ndim == 2:
            with self._lock:
                if self.num_classes is None:
                    self.num_classes = int(raw.shape[1])
                    logger.debug("endpoint %s: %d classes", self.display_url, self.num_classes)
                elif raw.shape[1] != self.num_classes:
                    raise OracleError(
                        f"{source}: expected {self.num_classes} score columns, got {raw.shape[1]}"
                    )
        return raw

    # -- one query -----------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()
        size = self.request_batch_size
        batches = [x[i : i + size] for i in range(0, int(x.shape[0]), size)]
        abort = threading.Event()
        if len(batches) <= 1:
            return self._post(x, abort)
        with self._lock:  # ``calls`` counts requests (the base counted this one)
            self._calls += len(batches) - 1
        pool = ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(batches)),
            thread_name_prefix="modelshield-http",
        )
        try:
            futures: list[Future[torch.Tensor]] = [
                pool.submit(self._post, batch, abort) for batch in batches
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                error = future.exception() if future.done() else None
                if error is not None:
                    abort.set()  # stop the other batches' retries
                    raise error
            return torch.cat([future.result() for future in futures])
        finally:
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
