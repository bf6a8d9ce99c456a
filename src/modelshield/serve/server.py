"""Run an ASGI app with uvicorn: in a background thread (tests, benchmarks) or blocking (CLI).

Both bind the listening socket themselves before uvicorn starts, so ``port=0`` picks a
free port and the caller learns it; the default host is 127.0.0.1 (ENVIRONMENT.md: servers
the project starts talk over loopback only). uvicorn's own logging configuration and access
log are switched off: the gateway logs each request at debug level, without data.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from modelshield.core.errors import InvalidConfigError

logger = logging.getLogger(__name__)

__all__ = ["bind", "is_loopback", "run", "serve_in_thread", "url_for"]

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidConfigError(f"port must be an integer in [0, 65535], got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise InvalidConfigError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InvalidConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_for(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: Any, **kwargs: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        **kwargs,
    )
    return uvicorn.Server(config)


def serve_in_thread(
    app: Any, host: str = LOOPBACK, port: int = 0, *, timeout: float = 30.0
) -> tuple[str, Callable[[], None]]:
    """Start ``app`` on ``host:port`` in a daemon thread; return ``(base_url, stop)``.

    Waits until uvicorn accepts connections (``TimeoutError`` after ``timeout`` s).
    ``stop()`` shuts the server down gracefully and joins the thread; calling it twice is
    harmless.
    """
    sock = bind(host, port)
    url = url_for(sock)
    server = _server(app)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit from a failed startup, too
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"modelshield-serve-{url}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            sock.close()
            reason = repr(failure[0]) if failure else "it exited"
            raise RuntimeError(f"the server on {url} failed to start: {reason}")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            sock.close()
            raise TimeoutError(f"the server on {url} did not start within {timeout:g} s")
        time.sleep(0.01)
    logger.debug("serving on %s (thread)", url)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        logger.debug("stopped %s", url)

    return url, stop


def run(
    app: Any,
    host: str = LOOPBACK,
    port: int = 8000,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM (blocking; uvicorn shuts down gracefully).

    ``on_ready(url)`` is called once the socket is bound (with the real port when
    ``port=0``), before requests are accepted.
    """
    if not is_loopback(host):
        logger.warning(
            "binding to %s: the gateway will be reachable from other machines; it has no "
            "authentication of its own and trusts the client-id header — put it behind an "
            "authenticating proxy",
            host,
        )
    sock = bind(host, port)
    url = url_for(sock)
    if on_ready is not None:
        on_ready(url)
    logger.info("serving on %s (Ctrl-C to stop)", url)
    server = _server(app)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled after shutting down
        pass
    finally:
        sock.close()
    logger.info("server on %s stopped", url)
