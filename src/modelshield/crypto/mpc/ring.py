"""Secret-shared inference on the three-party ring engine (:mod:`~.rss`), party by party.

The program mirrors the MPyC one (:func:`~.engine.infer_program`): the parties swap
their public metadata (roles, shapes, the architecture), the model owner shares the
weights, the data owner each batch of inputs, every party evaluates the layers on
shares, and only the data owner receives the result. Labels come from an all-pairs
argmax: the ``C(C-1)/2`` comparisons of a batch run at once (8 rounds), then each class's
wins are ANDed (``⌈log2(C-1)⌉`` rounds), so a label costs about 14 rounds however many
classes there are (a tournament would take 11 rounds per level).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from modelshield.core.errors import InvalidConfigError
from modelshield.crypto.mpc.engine import (
    WEIGHTED,
    MPCError,
    Traffic,
    input_mismatch,
    model_and_data_party,
    public_meta,
)
from modelshield.crypto.mpc.net import Peers
from modelshield.crypto.mpc.rss import PARTIES, Ring3, Shared, cat, decode, encode

logger = logging.getLogger(__name__)

RING_HEADROOM = 63
"""A product is held at scale ``2^2f`` in a signed 64-bit ring: ``2f + int_bits ≤ 63``."""


def check_bits(frac_bits: int, int_bits: int) -> None:
    """Refuse fixed-point settings whose products overflow the 64-bit ring."""
    if not 4 <= frac_bits <= 28:
        raise InvalidConfigError(
            f"--frac-bits must be in 4..28 for the ring engine, got {frac_bits}"
        )
    if 2 * frac_bits + int_bits > RING_HEADROOM:
        raise InvalidConfigError(
            f"the ring engine holds products at 2·frac-bits + int-bits ≤ {RING_HEADROOM} bits; "
            f"--frac-bits {frac_bits} with --int-bits {int_bits} needs {2 * frac_bits + int_bits}"
        )


def truncations_per_sample(layers: list[dict[str, Any]]) -> int:
    """How many values one sample's forward pass truncates (affine/conv outputs, squares)."""
    total = width = 0
    for spec in layers:
        if spec["kind"] in WEIGHTED:
            conv = spec["kind"] == "conv"
            width = int(np.prod(spec["out_shape"])) if conv else int(spec["out"])
            total += width
        elif spec["kind"] == "poly":
            total += width if list(spec["coeffs"]) == [0.0, 0.0, 1.0] else 2 * width
    return total


def wrap_risk(layers: list[dict[str, Any]], peak: float, frac_bits: int) -> float:
    """Bound on the chance that some truncation of one sample fails (SecureML's Lemma).

    A value ``v`` truncated from scale ``2^2f`` is off by ``2^(64-f)`` when its two
    halves wrap around, with probability about ``|v|·2^2f / 2^64``; ``peak`` bounds |v|.
    """
    per_value = min(1.0, float(peak) * 2.0 ** (2 * frac_bits) / 2.0**64)
    return min(1.0, truncations_per_sample(layers) * per_value)


# --------------------------------------------------------------------------------------
# Layers on shares
# --------------------------------------------------------------------------------------


def forward(
    proto: Ring3, layers: list[dict[str, Any]], weights: list[tuple[Shared, Shared]], h: Shared
) -> Shared:
    """Evaluate the public layer list on the shared batch ``h`` (n × d, scale ``2^f``).

    Weights are at scale ``2^f`` and biases at ``2^2f``: an affine map is one matrix
    product, the bias added at full precision, and one truncation (2 rounds).
    """
    k = 0
    for spec in layers:
        kind = spec["kind"]
        if kind in WEIGHTED:
            w, b = weights[k]
            k += 1
            h = _conv(proto, h, w, b, spec) if kind == "conv" else _affine(proto, h, w, b)
        elif kind == "relu":
            h = proto.relu(h)
        elif kind == "poly":
            h = _poly(proto, h, [float(c) for c in spec["coeffs"]])
        else:
            raise MPCError(f"unknown layer kind {kind!r} in the architecture")
    return h


def _affine(proto: Ring3, h: Shared, w: Shared, b: Shared) -> Shared:
    return proto.truncate(proto.matmul(h, w) + b)


def _conv(proto: Ring3, h: Shared, w: Shared, b: Shared, spec: dict[str, Any]) -> Shared:
    """Conv2d: im2col (a public gather; a zero column for the padding) times the kernel."""
    from modelshield.crypto.mpc.model import im2col_index

    idx_np, pad = im2col_index(spec)
    idx = torch.from_numpy(idx_np)
    n = h.shape[0]
    if pad:
        h = h.map(lambda t: torch.cat([t, torch.zeros(n, 1, dtype=t.dtype)], dim=1))
    patches = h.map(lambda t: t[:, idx].reshape(n * idx.shape[0], idx.shape[1]))
    out = _affine(proto, patches, w, b)
    p, c = idx.shape[0], int(spec["out"])
    return out.map(lambda t: t.reshape(n, p, c).transpose(1, 2).reshape(n, -1))


def _poly(proto: Ring3, h: Shared, coeffs: list[float]) -> Shared:
    """``a0 + a1·h + a2·h²``: the square (2 rounds), then the public combination (1 round)."""
    a0, a1, a2 = coeffs
    sq = proto.mul_fixed(h, h)
    if (a0, a1, a2) == (0.0, 0.0, 1.0):
        return sq
    f = proto.f
    acc = sq.scale(int(encode(np.array(a2), f))) + h.scale(int(encode(np.array(a1), f)))
    acc = proto.add_public(acc, int(encode(np.array(a0), 2 * f)))
    return proto.truncate(acc)


def labels(proto: Ring3, logits: Shared) -> Shared:
    """Arithmetic shares of each row's label (an integer, not fixed point).

    One output: ``logit > 0``. Several: class ``k`` wins when it is ≥ every later class
    and > every earlier one (the first maximum, as ``argmax``); its win bits are ANDed
    and the label is ``Σ_k k · win_k``.
    """
    c = logits.shape[1]
    if c == 1:
        return proto.bit_to_arith(proto.msb(-logits)).map(lambda t: t[:, 0])
    ii, jj = np.triu_indices(c, k=1)
    left, right = torch.from_numpy(ii), torch.from_numpy(jj)
    less = proto.msb(logits.map(lambda t: t[:, left] - t[:, right]))  # [x_i < x_j] per pair
    pair_of = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(ii, jj, strict=True))}
    gather = np.zeros((c, c - 1), dtype=np.int64)
    flip = np.zeros((c, c - 1), dtype=np.int64)
    for k in range(c):
        others = [j for j in range(c) if j != k]
        for m, j in enumerate(others):
            gather[k, m] = pair_of[(min(k, j), max(k, j))]
            flip[k, m] = int(j > k)  # k before j wins when NOT [x_k < x_j]
    g = torch.from_numpy(gather)
    wins = proto.xor_public(less.map(lambda t: t[:, g]), torch.from_numpy(flip))
    while wins.shape[-1] > 1:
        half = wins.shape[-1] // 2
        lo = wins.map(lambda t, h=half: t[..., :h])
        hi = wins.map(lambda t, h=half: t[..., h : 2 * h])
        rest = wins.map(lambda t, h=half: t[..., 2 * h :])
        (both,) = proto.and_many([(lo, hi)])
        wins = cat([both, rest], dim=-1)
    onehot = proto.bit_to_arith(wins.map(lambda t: t[..., 0]))
    return onehot.scale(torch.arange(c, dtype=torch.int64)).map(lambda t: t.sum(dim=1))


# --------------------------------------------------------------------------------------
# The party program
# --------------------------------------------------------------------------------------


def exchange(net: Peers, mine: Any) -> list[Any]:
    """Every party's public metadata, in party order (sent to all, in the clear)."""
    for j in range(len(net.addresses)):
        if j != net.pid:
            net.send_json(j, mine)
    return [mine if j == net.pid else net.recv_json(j) for j in range(len(net.addresses))]


def _from(net: Peers, sender: int, value: Any) -> Any:
    """``value`` of party ``sender``, sent to every other party (public metadata)."""
    if net.pid == sender:
        for j in range(len(net.addresses)):
            if j != sender:
                net.send_json(j, value)
        return value
    return net.recv_json(sender)


def infer(
    net: Peers,
    *,
    role: str,
    frac_bits: int,
    int_bits: int,
    batch_size: int,
    reveal: str,
    model: Any = None,
    x: np.ndarray | None = None,
) -> dict[str, Any]:
    """The inference program of party ``net.pid``: the same keys as the MPyC program's."""
    tr = net.traffic
    with tr.during("meta"):
        mine = public_meta(role, x, frac_bits, int_bits, batch_size, reveal)
        metas = exchange(net, {**mine, "engine": "ring"})
    mp, dp = model_and_data_party(metas)
    dmeta = metas[dp]
    with tr.during("meta"):
        arch = None
        if net.pid == mp:
            problem = input_mismatch(model, dmeta)
            arch = {"error": problem} if problem else model.architecture.to_dict()
        arch = _from(net, mp, arch)
    if "error" in arch:
        raise MPCError(arch["error"])
    roles = [m.get("role") for m in metas]
    try:  # the data owner's settings hold for every party
        fb, ib, bs = int(dmeta["frac_bits"]), int(dmeta["int_bits"]), int(dmeta["batch_size"])
        n, dim, rv = int(dmeta["n"]), int(dmeta["input_dim"]), str(dmeta["reveal"])
    except (KeyError, TypeError, ValueError):
        raise MPCError(f"party {dp} (data) sent malformed settings: {dmeta}") from None
    check_bits(fb, ib)
    t0 = time.perf_counter()
    with tr.during("keys"):
        proto = Ring3(net, fb)
    weights: list[tuple[Shared, Shared]] = []
    with tr.during("input:weights"):
        own = [la for la in (model.layers if net.pid == mp else []) if la.w is not None]
        specs = [s for s in arch["layers"] if s["kind"] in WEIGHTED]
        for i, s in enumerate(specs):
            w = encode(own[i].w, fb) if own else None
            b = encode(own[i].b, 2 * fb) if own else None
            weights.append(
                (proto.share(mp, w, (s["in"], s["out"])), proto.share(mp, b, (s["out"],)))
            )
    outputs: list[np.ndarray] = []
    batch_seconds: list[float] = []
    for start in range(0, n, bs):
        tb = time.perf_counter()
        rows = min(bs, n - start)
        with tr.during("input:x"):
            mine_x = (
                encode(x[start : start + rows], fb) if x is not None and net.pid == dp else None
            )
            xb = proto.share(dp, mine_x, (rows, dim))
        if start == 0:
            logger.info("party %d: secret inputs shared; computing on shares", net.pid)
        with tr.during("compute"):
            h = forward(proto, arch["layers"], weights, xb)
            if rv == "label":
                h = labels(proto, h)
        with tr.during("output"):
            out = proto.open_to(dp, h)
        if out is not None:
            vals = out.double().numpy() if rv == "label" else decode(out, fb)
            outputs.append(np.asarray(vals, dtype=np.float64).reshape(rows, -1))
        batch_seconds.append(time.perf_counter() - tb)
    seconds = time.perf_counter() - t0
    with tr.during("control"):
        exchange(net, "done")  # nobody closes a link another party still reads from
    result: dict[str, Any] = {
        "role": role,
        "pid": net.pid,
        "roles": roles,
        "engine": "ring",
        "n": n,
        "batch_size": bs,
        "frac_bits": fb,
        "int_bits": ib,
        "ring_bits": 64,
        "reveal": rv,
        "seconds": seconds,
        "batch_seconds": batch_seconds,
        "architecture": arch,
        "bytes_sent": {str(j): int(v) for j, v in net.bytes_sent.items()},
    }
    if net.pid == dp:
        result["outputs"] = np.concatenate(outputs) if outputs else np.zeros((0, 1))
    return result


def run_party(
    pid: int,
    addresses: list[tuple[str, int]],
    *,
    timeout: float,
    traffic: Traffic | None = None,
    program: Callable[..., dict[str, Any]] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Connect party ``pid`` to the others, run ``program`` (default :func:`infer`) with
    ``settings``, close the links."""
    if len(addresses) != PARTIES:
        raise InvalidConfigError(
            f"the ring engine runs exactly {PARTIES} parties, got {len(addresses)} in --parties "
            "(use --engine mpyc for more)"
        )
    net = Peers(pid, addresses, deadline=time.monotonic() + timeout, traffic=traffic)
    try:
        net.connect()
        return (program or infer)(net, **settings)
    except MPCError as e:
        net.abort(str(e))
        raise
    except BaseException as e:
        net.abort(f"party {pid} failed: {e}")
        raise
    finally:
        net.close()


def run_local(
    model: Any,
    x: np.ndarray,
    *,
    frac_bits: int = 16,
    int_bits: int = 16,
    reveal: str = "logits",
    batch_size: int = 100,
    timeout: float = 120.0,
) -> np.ndarray:
    """Three parties as threads of this process over real loopback sockets.

    For checking the protocol against plaintext quickly; ``mpc infer`` runs each party
    as its own process.
    """
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    common: dict[str, Any] = dict(
        frac_bits=frac_bits, int_bits=int_bits, batch_size=batch_size, reveal=reveal
    )
    roles: list[dict[str, Any]] = [
        {"role": "model", "model": model},
        {"role": "data", "x": a},
        {"role": "compute"},
    ]
    results = in_threads(lambda net: infer(net, **common, **roles[net.pid]), timeout=timeout)
    return np.asarray(results[1]["outputs"])


def in_threads(fn: Callable[[Peers], Any], *, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(links)`` as parties 0, 1, 2 in threads over real loopback sockets.

    Returns the three results; the first party's error is raised (after all stopped).
    """
    from modelshield.crypto.mpc.commands import free_ports

    addresses = [("127.0.0.1", p) for p in free_ports(PARTIES)]
    results: list[Any] = [None] * PARTIES

    def go(i: int) -> None:
        try:
            results[i] = run_party(i, addresses, timeout=timeout, program=fn)
        except BaseException as e:  # handed to the caller below
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(PARTIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise MPCError(f"parties {stuck} did not finish within {timeout:g} s")
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
