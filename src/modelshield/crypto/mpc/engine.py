"""The MPyC runtime of one party, and the secret-shared programs every party runs.

MPyC (Schoenmakers, https://github.com/lschoe/mpyc) implements Shamir secret sharing over
a prime field with threshold ``t = (m-1)//2``: passive (semi-honest) security against any
``t`` colluding parties, i.e. an honest majority. Fixed-point numbers (``SecFxp(l, f)``)
carry ``f`` fractional bits; a product is truncated back to ``f`` bits by MPyC's
probabilistic truncation (Catrina and Saxena, FC 2010); comparisons (ReLU, argmax) use
its bitwise secure comparison.

Every party runs the same program; secret inputs enter through ``rt.input(..., senders=i)``
and the other parties build their placeholder arrays with ``integral=False`` (else the
parties disagree on the share type and desynchronise). Public metadata (roles, shapes,
the architecture) is exchanged with ``rt.transfer`` and is all that travels in the clear.

This module imports :mod:`mpyc` only inside functions, so ``import modelshield`` works
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelshield.core.errors import InvalidConfigError, ModelShieldError

logger = logging.getLogger(__name__)

DEFAULT_FRAC_BITS = 16
DEFAULT_INT_BITS = 16
ENGINES = ("auto", "ring", "mpyc")
"""``ring``: three-party replicated sharing over Z_2^64 (:mod:`.rss`); ``mpyc``: Shamir
over a prime field with MPyC, any number of parties; ``auto``: ring for three parties,
MPyC otherwise."""
WEIGHTED = ("affine", "conv")
"""Layer kinds whose weights the model owner secret-shares."""


class MPCError(ModelShieldError):
    """A multi-party run failed: a party died, disconnected or timed out."""


@contextlib.contextmanager
def _mpyc_argv(argv: Sequence[str] = ()) -> Iterator[None]:
    """MPyC parses ``sys.argv`` when imported and in ``setup()``: show it only ``argv``."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "modelshield", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def resolve_engine(engine: str | None, parties: int) -> str:
    """The engine a run uses: ``ring`` or ``mpyc`` (see :data:`ENGINES`)."""
    engine = engine or "auto"
    if engine not in ENGINES:
        raise InvalidConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "ring" if parties == 3 else "mpyc"
    if engine == "ring" and parties != 3:
        raise InvalidConfigError(
            f"the ring engine runs exactly 3 parties, got {parties} (use --engine mpyc for more)"
        )
    return engine


def require_mpyc() -> None:
    """Import MPyC (without letting it read our command line); a one-line error if absent."""
    try:
        with _mpyc_argv():
            import mpyc.runtime  # noqa: F401
    except ImportError:
        raise InvalidConfigError(
            "secure multi-party computation needs MPyC: pip install 'modelshield[mpc]'"
        ) from None


def parse_parties(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``HOST:PORT,HOST:PORT,...`` as ``[(host, port), ...]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[tuple[str, int]] = []
    for item in (i.strip() for i in items):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidConfigError(f"--parties entries must be HOST:PORT, got {item!r}")
        out.append((host, int(port)))
    if not out:
        raise InvalidConfigError("--parties is empty")
    return out


# --------------------------------------------------------------------------------------
# Transcript: what this party sends, tagged by phase (for audits and the privacy tests)
# --------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Bytes sent to each peer and, when recording, every payload with its phase."""

    record: bool = False
    phase: str = "control"
    messages: list[tuple[str, int, bytes]] = field(default_factory=list)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        prev, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = prev

    def save(self, path: str | Path) -> None:
        """Write the transcript: per message, phase, peer and payload, length-prefixed.

        A plain binary format (no pickle), so an auditor can read another party's
        transcript without running code from it.
        """
        from modelshield.core.io import atomic_open

        with atomic_open(path, "wb") as fh:
            fh.write(_MAGIC)
            for phase, peer, payload in self.messages:
                tag = phase.encode()
                fh.write(struct.pack("<HHI", len(tag), peer, len(payload)))
                fh.write(tag)
                fh.write(payload)


_MAGIC = b"MSMPCTR1"


def load_transcript(path: str | Path) -> list[tuple[str, int, bytes]]:
    """Read a transcript written by :meth:`Traffic.save`: ``[(phase, peer, payload), ...]``."""
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise InvalidConfigError(f"{path} is not an MPC transcript")
    out, pos = [], len(_MAGIC)
    while pos < len(data):
        n_tag, peer, n_payload = struct.unpack_from("<HHI", data, pos)
        pos += 8
        tag = data[pos : pos + n_tag].decode()
        pos += n_tag
        out.append((tag, int(peer), data[pos : pos + n_payload]))
        pos += n_payload
    return out


# --------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------


def make_runtime(
    pid: int | None = None,
    parties: list[tuple[str, int]] | None = None,
    *,
    traffic: Traffic | None = None,
    log_level: str = "warning",
) -> Any:
    """An MPyC runtime for party ``pid`` of ``parties``; in-process (one party) if None.

    The party listens on its own ``HOST:PORT`` only (MPyC itself binds every interface).
    """
    argv = (
        ["--log-level", log_level, "--no-log"]
        if log_level == "warning"
        else ["--log-level", log_level]
    )
    if parties is not None:
        if pid is None or not 0 <= pid < len(parties):
            raise InvalidConfigError(f"--id must be in 0..{len(parties) - 1}, got {pid}")
        for host, port in parties:
            argv += ["-P", f"{host}:{port}"]
        argv += ["-I", str(pid)]
    require_mpyc()
    with _mpyc_argv(argv):
        import mpyc.runtime as mr

        rt = mr.setup()
    if parties is not None and len(parties) > 1:
        _bind_to(rt, parties[pid or 0][0])
    if traffic is not None:
        _count_traffic(rt, traffic)
    return rt


def _bind_to(rt: Any, host: str) -> None:
    loop = rt._loop
    create_server = loop.create_server

    async def bound(factory: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["host"] = host
        return await create_server(factory, *args, **kwargs)

    loop.create_server = bound


def _count_traffic(rt: Any, traffic: Traffic) -> None:
    from mpyc import asyncoro

    rt._modelshield_traffic = traffic
    send = asyncoro.MessageExchanger.send
    if getattr(send, "_modelshield", False):
        return

    def recording_send(self: Any, pc: int, payload: bytes) -> None:
        t = getattr(self.runtime, "_modelshield_traffic", None)
        if t is not None and t.record:
            t.messages.append((t.phase, int(self.peer_pid), bytes(payload)))
        send(self, pc, payload)

    recording_send._modelshield = True  # type: ignore[attr-defined]
    asyncoro.MessageExchanger.send = recording_send


def bytes_sent(rt: Any) -> dict[str, int]:
    """Bytes this party has sent to each peer (MPyC's per-connection counters)."""
    return {
        str(p.pid): int(p.protocol.nbytes_sent)
        for p in rt.parties
        if p.pid != rt.pid and p.protocol is not None and hasattr(p.protocol, "nbytes_sent")
    }


def run_program(rt: Any, program: Any, *, timeout: float) -> Any:
    """Start the runtime, run ``program(rt)`` and shut down; fail fast on a lost peer.

    A peer whose connection drops before shutdown, or a run longer than ``timeout``
    seconds, ends this party with :class:`MPCError` instead of waiting forever.
    """
    from mpyc import asyncoro

    state: dict[str, Any] = {"closing": False, "lost": None, "task": None}
    unset = rt.unset_protocol

    def on_lost(peer_pid: int) -> None:
        if not state["closing"] and state["lost"] is None:
            state["lost"] = peer_pid
            if state["task"] is not None:
                state["task"].cancel()
        unset(peer_pid)

    rt.unset_protocol = on_lost

    def connection_lost(self: Any, exc: Exception | None) -> None:
        if self.peer_pid is not None:
            self.runtime.unset_protocol(self.peer_pid)

    asyncoro.MessageExchanger.connection_lost = connection_lost

    async def main() -> Any:
        await rt.start()
        result = await program(rt)
        state["closing"] = True
        result["bytes_sent"] = bytes_sent(rt)
        await rt.shutdown()
        return result

    async def guarded() -> Any:
        task = asyncio.ensure_future(main())
        state["task"] = task
        try:
            return await asyncio.wait_for(task, timeout)
        except asyncio.CancelledError:
            if state["lost"] is not None:
                raise MPCError(
                    f"party {state['lost']} disconnected before the computation finished"
                ) from None
            raise
        except asyncio.TimeoutError:
            raise MPCError(
                f"the multi-party run did not finish within {timeout:g} s (a party may be "
                "unreachable or stopped)"
            ) from None

    if len(rt.parties) == 1:
        return rt.run(main())
    return rt._loop.run_until_complete(guarded())


# --------------------------------------------------------------------------------------
# Fixed point
# --------------------------------------------------------------------------------------


def secfxp_type(rt: Any, frac_bits: int, int_bits: int = DEFAULT_INT_BITS) -> Any:
    """``SecFxp(l, f)`` with ``f = frac_bits`` and ``l = f + int_bits`` (sign included)."""
    if not 4 <= frac_bits <= 40:
        raise InvalidConfigError(f"--frac-bits must be in 4..40, got {frac_bits}")
    if not 4 <= int_bits <= 40:
        raise InvalidConfigError(f"--int-bits must be in 4..40, got {int_bits}")
    return rt.SecFxp(frac_bits + int_bits, frac_bits)


def share(
    rt: Any, secfxp: Any, value: np.ndarray | None, shape: tuple[int, ...], sender: int
) -> Any:
    """Secret-share ``value`` (held by party ``sender``) as a fixed-point array."""
    if rt.pid == sender:
        if value is None or tuple(value.shape) != tuple(shape):
            got = None if value is None else tuple(value.shape)
            raise MPCError(f"party {sender} must share an array of shape {tuple(shape)}, got {got}")
        a = secfxp.array(np.asarray(value, dtype=np.float64), integral=False)
    else:
        a = secfxp.array(np.zeros(shape), integral=False)
    return rt.input(a, senders=sender)


# --------------------------------------------------------------------------------------
# Secret-shared inference
# --------------------------------------------------------------------------------------


async def settle(rt: Any, arrays: list[Any]) -> None:
    """Wait until the shares of ``arrays`` exist here (so a phase's messages are all sent)."""
    for a in arrays:
        await rt.gather(a)


async def exchange_meta(rt: Any, mine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every party's public metadata (role, shapes), sent to everyone in the clear."""
    return list(await rt.transfer(mine))


def public_meta(
    role: str,
    x: np.ndarray | None,
    frac_bits: int,
    int_bits: int,
    batch_size: int,
    reveal: str,
) -> dict[str, Any]:
    """What a party tells every other one before inference (in the clear).

    The data owner's settings (sizes, fixed point, batch size, what is revealed) hold
    for every party; the others send only their role.
    """
    mine: dict[str, Any] = {"role": role}
    if role == "data":
        if x is None:
            raise MPCError("the data party has no inputs to share")
        mine.update(n=int(x.shape[0]), input_dim=int(x.shape[1]), frac_bits=frac_bits,
                    int_bits=int_bits, batch_size=batch_size, reveal=reveal)  # fmt: skip
    return mine


def model_and_data_party(metas: list[dict[str, Any]]) -> tuple[int, int]:
    """The ids of the model owner and the data owner (exactly one of each)."""
    roles = [m.get("role") for m in metas]
    if roles.count("model") != 1 or roles.count("data") != 1:
        raise MPCError(f"inference needs one model party and one data party; roles are {roles}")
    return roles.index("model"), roles.index("data")


def input_mismatch(model: Any, data_meta: dict[str, Any]) -> str | None:
    """Why the model owner's model cannot take the data owner's inputs, or None."""
    if int(model.input_dim) != int(data_meta["input_dim"]):
        return (
            f"the model takes {model.input_dim} inputs; the data owner has "
            f"{data_meta['input_dim']} features"
        )
    return None


def infer_program(
    *,
    role: str,
    frac_bits: int,
    int_bits: int,
    batch_size: int,
    reveal: str,
    model: Any = None,
    x: np.ndarray | None = None,
    traffic: Traffic | None = None,
) -> Any:
    """The inference program of one party (model owner, data owner or compute party).

    The model owner inputs the weights, the data owner the inputs; every party computes;
    only the data owner receives the result (labels or logits).
    """
    tr = traffic or Traffic()

    async def program(rt: Any) -> dict[str, Any]:
        with tr.during("meta"):
            mine = public_meta(role, x, frac_bits, int_bits, batch_size, reveal)
            metas = await exchange_meta(rt, mine)
        roles = [m["role"] for m in metas]
        mp, dp = model_and_data_party(metas)
        dmeta = metas[dp]
        with tr.during("meta"):
            arch = None
            if rt.pid == mp:
                problem = input_mismatch(model, dmeta)
                if problem:
                    raise MPCError(problem)
                arch = model.architecture.to_dict()
            arch = await rt.transfer(arch, senders=mp)
        fb, bs, rv = int(dmeta["frac_bits"]), int(dmeta["batch_size"]), str(dmeta["reveal"])
        ib = int(dmeta["int_bits"])  # the data owner's settings hold for every party
        secfxp = secfxp_type(rt, fb, ib)
        t0 = time.perf_counter()
        weights = []
        with tr.during("input:weights"):
            own = [la for la in (model.layers if rt.pid == mp else []) if la.w is not None]
            affines = [s for s in arch["layers"] if s["kind"] in WEIGHTED]
            for i, s in enumerate(affines):
                w = share(rt, secfxp, own[i].w if own else None, (s["in"], s["out"]), mp)
                b = share(rt, secfxp, own[i].b if own else None, (s["out"],), mp)
                weights.append((w, b))
            await settle(rt, [a for wb in weights for a in wb])
        outputs: list[np.ndarray] = []
        batch_seconds: list[float] = []
        n = int(dmeta["n"])
        for start in range(0, n, bs):
            tb = time.perf_counter()
            rows = min(bs, n - start)
            with tr.during("input:x"):
                mine_x = x[start : start + rows] if x is not None and rt.pid == dp else None
                xb = share(rt, secfxp, mine_x, (rows, int(dmeta["input_dim"])), dp)
                await settle(rt, [xb])
            if start == 0:
                logger.info("party %d: secret inputs shared; computing on shares", rt.pid)
            with tr.during("compute"):
                h = forward(rt, arch["layers"], weights, xb)
                if rv == "label":
                    h = secure_labels(rt, h)
                await settle(rt, [h])
            with tr.during("output"):
                out = await rt.output(h, receivers=[dp])
            if rt.pid == dp:
                outputs.append(np.asarray(out, dtype=np.float64).reshape(rows, -1))
            batch_seconds.append(time.perf_counter() - tb)
        result: dict[str, Any] = {
            "role": role,
            "pid": rt.pid,
            "roles": roles,
            "n": n,
            "batch_size": bs,
            "frac_bits": fb,
            "int_bits": ib,
            "field_modulus": str(secfxp.field.modulus),
            "reveal": rv,
            "seconds": time.perf_counter() - t0,
            "batch_seconds": batch_seconds,
            "architecture": arch,
        }
        if rt.pid == dp:
            result["outputs"] = np.concatenate(outputs) if outputs else np.zeros((0, 1))
        return result

    return program


def forward(rt: Any, layers: list[dict[str, Any]], weights: list[tuple[Any, Any]], h: Any) -> Any:
    """Evaluate the public layer list on the shared batch ``h`` (n × d) with shared weights.

    Affine: one secure matrix product (one resharing and one truncation per output);
    ReLU: ``max(h, 0)`` by secure comparison; poly: ``a0 + a1 h + a2 h²``.
    """
    k = 0
    for spec in layers:
        kind = spec["kind"]
        if kind == "affine":
            w, b = weights[k]
            k += 1
            h = h @ w + b
        elif kind == "conv":
            w, b = weights[k]
            k += 1
            h = _conv(rt, h, w, b, spec)
        elif kind == "relu":
            h = rt.np_maximum(h, 0)
        elif kind == "poly":
            a0, a1, a2 = (float(c) for c in spec["coeffs"])
            out = h * h if a2 == 1.0 else (h * h) * a2
            if a1:
                out = out + h * a1
            h = out + a0 if a0 else out
        else:
            raise MPCError(f"unknown layer kind {kind!r} in the architecture")
    return h


def _conv(rt: Any, h: Any, w: Any, b: Any, spec: dict[str, Any]) -> Any:
    """Conv2d on shares: im2col (a public gather, zero padding appended) times the kernel."""
    from modelshield.crypto.mpc.model import im2col_index

    idx, pad = im2col_index(spec)
    n = h.shape[0]
    if pad:
        zeros = type(h).sectype.array(np.zeros((n, 1)), integral=False)
        h = rt.np_concatenate((h, zeros), axis=1)
    patches = h[:, idx].reshape(n * idx.shape[0], idx.shape[1])
    out = (patches @ w + b).reshape(n, idx.shape[0], int(spec["out"]))
    return out.transpose(0, 2, 1).reshape(n, -1)


def secure_labels(rt: Any, logits: Any) -> Any:
    """Class labels of shared logits: secure argmax, or ``logit > 0`` for one output."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0
    return rt.np_argmax(logits, axis=1)


def run_local(
    model: Any,
    x: np.ndarray,
    *,
    frac_bits: int = DEFAULT_FRAC_BITS,
    int_bits: int = DEFAULT_INT_BITS,
    reveal: str = "logits",
) -> np.ndarray:
    """The same secure program with one in-process party (no network, no privacy).

    For checking the fixed-point arithmetic, comparisons and argmax against plaintext
    quickly; the multi-party runs go through :func:`infer_program` and real processes.
    """
    rt = make_runtime()
    arch = model.architecture.to_dict()
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    async def program(rt: Any) -> dict[str, Any]:
        secfxp = secfxp_type(rt, frac_bits, int_bits)
        weights = [
            (share(rt, secfxp, la.w, la.w.shape, 0), share(rt, secfxp, la.b, la.b.shape, 0))
            for la in model.layers
            if la.w is not None
        ]
        h = forward(rt, arch["layers"], weights, share(rt, secfxp, a, a.shape, 0))
        if reveal == "label":
            h = secure_labels(rt, h)
        return {"out": np.asarray(await rt.output(h), dtype=np.float64).reshape(len(a), -1)}

    return np.asarray(run_program(rt, program, timeout=600)["out"])
