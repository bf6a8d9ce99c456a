"""Point-to-point TCP links between the parties of a ring-engine run (no pickle on the wire).

Every party listens on its own ``HOST:PORT`` only, connects to each lower-numbered party
and accepts each higher-numbered one; a connection opens with a fixed hello naming the
party, so a peer that is not a modelshield ring party (another engine, a port scanner) is
refused by name. A message is an 8-byte little-endian length and raw bytes: arrays travel
as little-endian int64 and public metadata as JSON, so a receiver never runs code from a
peer (MPyC, by contrast, unpickles what peers send).

One reader thread per peer drains its socket into a queue, so two parties sending large
messages to each other at once never deadlock on full socket buffers. A peer that closes
its connection, or that neither sends nor reads before the run's deadline, ends the run
with :class:`~modelshield.crypto.mpc.engine.MPCError` (one line) instead of a hang; a
party that stops sends the others its reason first, and whoever reads it reports that
cause rather than the broken link.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from modelshield.crypto.mpc.engine import MPCError, Traffic

logger = logging.getLogger(__name__)

_HELLO = b"MSRING01"
_HEADER = struct.Struct("<Q")
_MAX_MESSAGE = 1 << 34
"""16 GiB: a length past this is a corrupt or foreign stream, not a real message."""
_POLL = 1.0
"""Seconds a socket operation waits before the deadline and the close flag are checked."""
_ABORT = 1 << 63
"""A length with this bit set carries a party's reason for stopping (UTF-8), not data."""


class _Abort(str):
    """A peer's last word: why it stopped (so every party reports the first cause)."""


class Peers:
    """Connections from party ``pid`` to every other party of ``addresses``.

    ``deadline`` (``time.monotonic()`` seconds) bounds every wait: connecting, and each
    receive. ``traffic`` counts (and, when recording, keeps) every payload sent.
    """

    def __init__(
        self,
        pid: int,
        addresses: list[tuple[str, int]],
        *,
        deadline: float,
        traffic: Traffic | None = None,
    ) -> None:
        if not 0 <= pid < len(addresses):
            raise MPCError(f"party id {pid} is not in 0..{len(addresses) - 1}")
        self.pid = pid
        self.addresses = addresses
        self.deadline = deadline
        self.traffic = traffic or Traffic()
        self.bytes_sent: dict[int, int] = {j: 0 for j in range(len(addresses)) if j != pid}
        self._socks: dict[int, socket.socket] = {}
        self._inbox: dict[int, queue.Queue[bytes | _Abort | None]] = {}
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._strays: list[str] = []

    # -- setup ---------------------------------------------------------------------------

    def connect(self) -> Peers:
        """Open every link (listen for higher ids, dial lower ids); returns ``self``."""
        host, port = self.addresses[self.pid]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as e:
            listener.close()
            raise MPCError(
                f"party {self.pid} cannot listen on {host}:{port}: {e.strerror}"
            ) from None
        listener.listen(len(self.addresses))
        try:
            for j in range(self.pid):
                self._adopt(j, self._dial(j))
            for _ in range(self.pid + 1, len(self.addresses)):
                j, sock = self._accept(listener)
                self._adopt(j, sock)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()
        return self

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            hint = (
                f"; connections from {', '.join(sorted(set(self._strays)))} were not modelshield "
                "ring-engine parties (do all parties run with the same --engine?)"
                if self._strays
                else " (a party may be unreachable or stopped)"
            )
            raise MPCError(f"the multi-party run timed out{hint}")
        return left

    def _dial(self, j: int) -> socket.socket:
        host, port = self.addresses[j]
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=min(5.0, self._remaining()))
                break
            except OSError:
                if time.monotonic() + 0.05 >= self.deadline:
                    raise MPCError(
                        f"party {j} at {host}:{port} is unreachable (nothing accepted the "
                        "connection before the timeout)"
                    ) from None
                time.sleep(0.05)
        sock.sendall(_HELLO + struct.pack("<I", self.pid))
        return sock

    def _accept(self, listener: socket.socket) -> tuple[int, socket.socket]:
        while True:
            listener.settimeout(min(1.0, self._remaining()))
            try:
                sock, addr = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(min(10.0, self._remaining()))
            try:
                hello = _read_exact(sock, len(_HELLO) + 4)
            except (OSError, EOFError):
                sock.close()
                continue
            j = struct.unpack("<I", hello[len(_HELLO) :])[0]
            if not hello.startswith(_HELLO) or not self.pid < j < len(self.addresses):
                # a scanner or a party of another engine: ignore it, keep waiting
                logger.warning("party %d: ignored a connection from %s that is not a "
                               "modelshield ring-engine party", self.pid, addr[0])  # fmt: skip
                self._strays.append(str(addr[0]))
                sock.close()
                continue
            if j in self._socks:
                sock.close()
                raise MPCError(f"two connections claim to be party {j}")
            return j, sock

    def _adopt(self, j: int, sock: socket.socket) -> None:
        sock.settimeout(_POLL)  # every wait wakes up to check the deadline and close()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socks[j] = sock
        inbox: queue.Queue[bytes | _Abort | None] = queue.Queue()
        self._inbox[j] = inbox
        t = threading.Thread(target=self._reader, args=(sock, inbox), daemon=True)
        t.start()
        self._threads.append(t)

    def _reader(self, sock: socket.socket, inbox: queue.Queue[bytes | _Abort | None]) -> None:
        try:
            while not self._closed.is_set():
                (n,) = _HEADER.unpack(self._read(sock, _HEADER.size))
                if n & _ABORT and n & ~_ABORT <= 4096:
                    inbox.put(_Abort(self._read(sock, n & ~_ABORT).decode(errors="replace")))
                    break
                if n > _MAX_MESSAGE:
                    break
                inbox.put(self._read(sock, n))
        except Exception:  # a closed link, a malformed stream, memory: the peer is gone
            pass
        finally:
            inbox.put(None)

    def _read(self, sock: socket.socket, n: int) -> bytes:
        """``n`` bytes (waiting as long as the link is open; an idle peer is not an error)."""
        return _read_exact(sock, n, keep_waiting=lambda: not self._closed.is_set())

    # -- messages ------------------------------------------------------------------------

    def send(self, j: int, payload: bytes) -> None:
        """Send ``payload`` to party ``j`` (recorded under the current traffic phase)."""
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        sock, sent = self._socks[j], 0
        while sent < len(data):
            try:
                sent += sock.send(data[sent:])
            except TimeoutError:  # j reads nothing: give up at the deadline
                if time.monotonic() >= self.deadline:
                    raise MPCError(
                        self._peer_reason() or f"party {j} stopped reading before the timeout"
                    ) from None
            except OSError:
                raise MPCError(
                    self._peer_reason() or f"party {j} disconnected before the computation finished"
                ) from None
        self.bytes_sent[j] += len(data)
        if self.traffic.record:
            self.traffic.messages.append((self.traffic.phase, j, bytes(payload)))

    def recv(self, j: int) -> bytes:
        """The next message from party ``j``; a one-line error if it left or timed out."""
        try:
            msg = self._inbox[j].get(timeout=self._remaining())
        except queue.Empty:
            raise MPCError(
                f"party {j} sent nothing before the timeout (it may be stopped or stuck)"
            ) from None
        if msg is None:
            raise MPCError(
                self._peer_reason() or f"party {j} disconnected before the computation finished"
            )
        if isinstance(msg, _Abort):
            raise MPCError(str(msg))
        return msg

    def _peer_reason(self) -> str | None:
        """The reason a peer gave for stopping, if one arrived (it names the first cause)."""
        time.sleep(0.05)  # a reason sent just before the link broke may still be in flight
        for inbox in self._inbox.values():
            for item in list(inbox.queue):
                if isinstance(item, _Abort):
                    return str(item)
        return None

    def send_tensor(self, j: int, t: torch.Tensor) -> None:
        self.send(j, t.contiguous().numpy().astype("<i8", copy=False).tobytes())

    def recv_tensor(self, j: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """An int64 tensor of ``shape`` from party ``j`` (a size mismatch is an error)."""
        raw = self.recv(j)
        want = int(np.prod(shape)) * 8
        if len(raw) != want:
            raise MPCError(
                f"party {j} sent {len(raw)} bytes where {want} were expected (parties out of "
                "step: do all of them run the same modelshield version and options?)"
            )
        return torch.from_numpy(np.frombuffer(raw, dtype="<i8").copy()).reshape(tuple(shape))

    def send_json(self, j: int, obj: Any) -> None:
        self.send(j, json.dumps(obj).encode())

    def recv_json(self, j: int) -> Any:
        raw = self.recv(j)
        try:
            return json.loads(raw)
        except ValueError:
            raise MPCError(f"party {j} sent malformed metadata") from None

    def abort(self, reason: str) -> None:
        """Tell every peer why this party stops (best effort), so they report the cause."""
        data = reason.encode()[:4096]
        for s in self._socks.values():
            with contextlib.suppress(OSError):
                s.sendall(_HEADER.pack(_ABORT | len(data)) + data)  # bounded by _POLL

    def close(self) -> None:
        """Close every link (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for s in self._socks.values():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _read_exact(
    sock: socket.socket, n: int, keep_waiting: Callable[[], bool] | None = None
) -> bytes:
    """``n`` bytes; EOFError if the socket closes first. A timed socket's timeout is
    raised, unless ``keep_waiting()`` says to go on waiting (then EOFError once it stops)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            if keep_waiting is None:
                raise
            if not keep_waiting():
                raise EOFError from None
            continue
        if k == 0:
            raise EOFError
        got += k
    return bytes(buf)
