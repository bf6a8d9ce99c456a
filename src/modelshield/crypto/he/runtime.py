"""Encrypted execution of a plan, in two packings.

- **latency** (one sample per ciphertext): the sample is tiled over the slots and each
  affine layer is a diagonal matrix-vector product with baby-step/giant-step rotations
  (Halevi-Shoup 2014; about 2√P rotations for a P-wide input instead of TenSEAL ``mm``'s
  P), on TenSEAL's SEAL bindings with the encoded diagonals cached. The bias is a
  plaintext added where we control the slot layout; TenSEAL's ``mm`` + plain bias chain,
  which breaks the layout the next ``mm`` relies on (TenSEAL issue #462), is not used.
- **throughput** (SIMD across samples, CryptoNets-style, Gilad-Bachrach et al. 2016):
  ciphertext *j* holds feature *j* of up to N/2 samples, so an affine layer is a sum of
  ciphertext × scalar products with no rotations. It runs on TenSEAL's SEAL bindings
  (``tenseal.sealapi``): weights are encoded at the value of the prime the next rescale
  drops, so the scale stays put, and a layer's products are summed before one rescale.

TenSEAL is imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.crypto.he.params import CKKSParams
from modelshield.crypto.he.plan import Plan
from modelshield.crypto.layers import Affine

logger = logging.getLogger(__name__)

MODES = ("latency", "throughput")

LATENCY_SECONDS_PER_ROTATION = 2.5e-3
"""Rough cost of one rotation (key switch) at N=8192."""
THROUGHPUT_SECONDS_PER_WEIGHT = 2.5e-4
"""Rough cost of one ciphertext × scalar product and add at N=8192."""


def choose_mode(plan: Plan, params: CKKSParams, n: int) -> str:
    """The cheaper packing for ``n`` samples, from the two cost models above."""
    batches = -(-n // params.slots)
    nnz = sum(int(np.count_nonzero(a.w)) for a in plan.affines)
    t_thr = batches * nnz * THROUGHPUT_SECONDS_PER_WEIGHT
    per_sample = 0.0
    for a in plan.affines:
        p = _pow2(a.shape[1])
        rotations = 2 * math.isqrt(p) + math.log2(max(2, params.slots // p))
        per_sample += (
            rotations * LATENCY_SECONDS_PER_ROTATION + p * THROUGHPUT_SECONDS_PER_WEIGHT / 2
        )
    t_lat = n * per_sample
    return "latency" if t_lat <= t_thr else "throughput"


# --------------------------------------------------------------------------------------
# Wire format: a count and length-prefixed blobs
# --------------------------------------------------------------------------------------


def pack_blobs(blobs: Sequence[bytes]) -> bytes:
    """``count (u32) | len (u64) blob | ...``: the body of every encrypted message."""
    parts = [struct.pack("<I", len(blobs))]
    for b in blobs:
        parts += [struct.pack("<Q", len(b)), b]
    return b"".join(parts)


def unpack_blobs(data: bytes) -> list[bytes]:
    """Inverse of :func:`pack_blobs`; malformed input raises :class:`DataError`."""
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        off, out = 4, []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", data, off)
            off += 8
            if off + n > len(data):
                raise DataError("truncated ciphertext message")
            out.append(data[off : off + n])
            off += n
    except struct.error as exc:
        raise DataError(f"malformed ciphertext message: {exc}") from exc
    if off != len(data):
        raise DataError("malformed ciphertext message: trailing bytes")
    return out


def _ct_bytes(ct: Any) -> bytes:
    fd, path = tempfile.mkstemp(prefix="ms-ct-")
    os.close(fd)
    try:
        ct.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def _ct_load(ctx: Any, blob: bytes) -> Any:
    from tenseal import sealapi

    fd, path = tempfile.mkstemp(prefix="ms-ct-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        ct = sealapi.Ciphertext()
        try:
            ct.load(ctx.seal_context().data, path)
        except Exception as exc:
            raise DataError(f"not a ciphertext for this context: {exc}") from exc
        return ct
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------


def encrypt(ctx: Any, plan: Plan, x: np.ndarray, mode: str) -> list[bytes]:
    """Encrypt flat inputs ``x`` (n, d) for ``mode``: the request body's blobs."""
    from tenseal import sealapi

    x = plan.check_input(x)
    sc = ctx.seal_context().data
    enc = sealapi.CKKSEncoder(sc)
    encryptor = sealapi.Encryptor(sc, ctx.public_key().data)
    if mode == "latency":
        slots = enc.slot_count()
        period = _pow2(x.shape[1])
        blobs = []
        for row in x:
            tiled = np.tile(np.pad(row, (0, period - row.size)), slots // period)
            pt = sealapi.Plaintext()
            enc.encode(tiled.tolist(), ctx.global_scale, pt)
            ct = sealapi.Ciphertext()
            encryptor.encrypt(pt, ct)
            blobs.append(_ct_bytes(ct))
        return blobs
    if mode != "throughput":
        raise InvalidConfigError(f"mode must be one of {MODES}, got {mode!r}")
    slots = ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
    if x.shape[0] > slots:
        raise DataError(f"a throughput request holds at most {slots} samples, got {x.shape[0]}")
    blobs = []
    for j in range(x.shape[1]):
        pt = sealapi.Plaintext()
        enc.encode(x[:, j].tolist(), ctx.global_scale, pt)
        ct = sealapi.Ciphertext()
        encryptor.encrypt(pt, ct)
        blobs.append(_ct_bytes(ct))
    return blobs


def decrypt(ctx: Any, blobs: Sequence[bytes], n: int, mode: str, n_out: int) -> np.ndarray:
    """Decrypt a reply into (n, n_out) logits; needs the secret key."""
    from tenseal import sealapi

    if not ctx.is_private():
        raise InvalidConfigError("decryption needs the client's secret key context")
    sc = ctx.seal_context().data
    enc = sealapi.CKKSEncoder(sc)
    dec = sealapi.Decryptor(sc, ctx.secret_key().data)
    if mode == "latency":
        rows = []
        for b in blobs:
            pt = sealapi.Plaintext()
            dec.decrypt(_ct_load(ctx, b), pt)
            rows.append(np.asarray(enc.decode_double(pt))[:n_out])
        return np.asarray(rows, dtype=np.float64).reshape(len(blobs), n_out)
    cols = []
    for b in blobs:
        pt = sealapi.Plaintext()
        dec.decrypt(_ct_load(ctx, b), pt)
        cols.append(np.asarray(enc.decode_double(pt))[:n])
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------


@dataclass
class EvalStats:
    seconds: float
    mode: str
    n_ciphertexts_in: int
    n_ciphertexts_out: int


def evaluate(
    ctx: Any, plan: Plan, blobs: Sequence[bytes], mode: str
) -> tuple[list[bytes], EvalStats]:
    """Run ``plan`` on encrypted inputs with a public context; returns encrypted outputs."""
    t0 = time.perf_counter()
    if mode not in MODES:
        raise InvalidConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "latency" and not ctx.has_galois_keys():
        raise InvalidConfigError("the latency packing needs Galois keys in the context")
    if mode == "throughput" and len(blobs) != plan.input_dim:
        raise DataError(
            f"a throughput request holds one ciphertext per input feature: want "
            f"{plan.input_dim}, got {len(blobs)}"
        )
    try:
        if mode == "latency":
            engine = _latency_engine(ctx, plan)
            out = [_ct_bytes(engine.run(_ct_load(ctx, b))) for b in blobs]
        else:
            out = _eval_throughput(ctx, plan, [_ct_load(ctx, b) for b in blobs])
    except ValueError as exc:  # SEAL: "encoded value is too large", scale out of bounds
        if "too large" not in str(exc) and "scale" not in str(exc):
            raise
        raise DataError(
            f"a value left the range the CKKS parameters were chosen for ({exc}; the plan "
            f"expects |values| up to {max(plan.max_abs):.3g}, from its calibration data): "
            "compile on calibration data like these inputs, or check their scale (--bounds)"
        ) from exc
    return out, EvalStats(time.perf_counter() - t0, mode, len(blobs), len(out))


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_ENGINES: dict[tuple[int, int], Any] = {}


def _latency_engine(ctx: Any, plan: Plan) -> _LatencyEngine:
    key = (id(ctx), id(plan))
    if key not in _ENGINES:
        while len(_ENGINES) >= 2:
            _ENGINES.pop(next(iter(_ENGINES)))
        _ENGINES[key] = _LatencyEngine(ctx, plan)
    return _ENGINES[key]  # type: ignore[no-any-return]


class _LatencyEngine:
    """One sample per ciphertext: diagonal matrix-vector products with baby-step/giant-step.

    The input is tiled with period P (the next power of two of the layer's width) over
    all N/2 slots, so ``rot(x, i)[k] = x[(k + i) mod P]``; ``W x`` is the sum of P
    "diagonals" ``d_i[k] = W[k, (k+i) mod P]`` times ``rot(x, i)`` (Halevi and Shoup 2014),
    grouped as ``Σ_g rot(Σ_b rot(d_{gB+b}, -gB) ⊙ rot(x, b), gB)`` so a layer costs about
    2√P rotations instead of P (the giant steps are summed Horner-style, each a rotation by
    B). Outputs land in slots 0..out-1 with zeros after them; the next layer re-tiles them
    with log2(N/2P) rotations. Encoded diagonals are cached per (context, plan).
    """

    def __init__(self, ctx: Any, plan: Plan) -> None:
        from tenseal import sealapi

        self.sealapi = sealapi
        self.ctx = ctx  # held so the (id(ctx), id(plan)) cache key cannot be reused
        self.sc = ctx.seal_context().data
        self.ev = sealapi.Evaluator(self.sc)
        self.enc = sealapi.CKKSEncoder(self.sc)
        self.gk = ctx.galois_keys().data
        self.rk = ctx.relin_keys().data if ctx.has_relin_keys() else None
        self.plan = plan
        self.slots = self.enc.slot_count()
        self.cache: dict[tuple[int, int, int], Any] = {}
        self.diags = [self._diagonals(a) if isinstance(a, Affine) else None for a in plan.layers]

    def _diagonals(self, a: Affine) -> tuple[int, int, dict[tuple[int, int], np.ndarray]]:
        out, d = a.shape
        p = _pow2(d)
        if out + p > self.slots or self.slots % p:
            raise InvalidConfigError(
                f"an affine layer {d}→{out} does not fit the latency packing at "
                f"{self.slots} slots: use the throughput packing"
            )
        baby = 1 << ((p.bit_length() - 1 + 1) // 2)
        w = np.zeros((out, p))
        w[:, :d] = a.w
        rows = np.arange(out)
        diags: dict[tuple[int, int], np.ndarray] = {}
        for i in range(p):
            col = w[rows, (rows + i) % p]
            if not np.any(col):
                continue
            g, b = divmod(i, baby)
            v = np.zeros(self.slots)
            v[:out] = col
            diags[(g, b)] = np.roll(v, g * baby)
        return p, baby, diags

    def _plain(self, key: tuple[int, int, int], values: np.ndarray, pid: Any, scale: float) -> Any:
        pt = self.cache.get(key)
        if pt is None:
            pt = self.sealapi.Plaintext()
            self.enc.encode(values.tolist(), pid, scale, pt)
            self.cache[key] = pt
        return pt

    def _rot(self, ct: Any, steps: int) -> Any:
        out = self.sealapi.Ciphertext()
        self.ev.rotate_vector(ct, steps, self.gk, out)
        return out

    def run(self, ct: Any) -> Any:
        ev = self.ev
        for li, layer in enumerate(self.plan.layers):
            if not isinstance(layer, Affine):
                if self.rk is None:
                    raise InvalidConfigError("the public context has no relinearisation keys")
                ev.square_inplace(ct)
                ev.relinearize_inplace(ct, self.rk)
                ev.rescale_to_next_inplace(ct)
                continue
            p, baby, diags = self.diags[li]  # type: ignore[misc]
            if li > 0:  # re-tile the previous outputs (slots 0..in-1, zeros after)
                t = p
                while t < self.slots:
                    ev.add_inplace(ct, self._rot(ct, -t))
                    t *= 2
            data = self.sc.get_context_data(ct.parms_id())
            if data.chain_index() == 0:
                raise InvalidConfigError("the CKKS parameters are too shallow for this plan")
            q = float(data.parms().coeff_modulus()[-1].value())
            pid, scale = ct.parms_id(), ct.scale
            rots = [ct]
            for _ in range(1, baby):
                rots.append(self._rot(rots[-1], 1))
            acc = None
            for g in range(p // baby - 1, -1, -1):
                inner = None
                for b in range(baby):
                    v = diags.get((g, b))
                    if v is None:
                        continue
                    prod = self.sealapi.Ciphertext()
                    ev.multiply_plain(rots[b], self._plain((li, g, b), v, pid, q), prod)
                    if inner is None:
                        inner = prod
                    else:
                        ev.add_inplace(inner, prod)
                if acc is not None:
                    acc = self._rot(acc, baby)
                    if inner is not None:
                        ev.add_inplace(acc, inner)
                else:
                    acc = inner
            if acc is None:
                raise InvalidConfigError(f"layer {li} has an all-zero weight matrix")
            ev.rescale_to_next_inplace(acc)
            acc.scale = scale
            if np.any(layer.b):
                bias = np.zeros(self.slots)
                bias[: layer.shape[0]] = layer.b
                ev.add_plain_inplace(acc, self._plain((li, -1, 0), bias, acc.parms_id(), scale))
            ct = acc
        return ct


def _eval_throughput(ctx: Any, plan: Plan, cts: list[Any]) -> list[bytes]:
    from tenseal import sealapi

    sc = ctx.seal_context().data
    ev = sealapi.Evaluator(sc)
    enc = sealapi.CKKSEncoder(sc)
    relin = ctx.relin_keys().data if ctx.has_relin_keys() else None
    for layer in plan.layers:
        if not isinstance(layer, Affine):
            if relin is None:
                raise InvalidConfigError("the public context has no relinearisation keys")
            for c in cts:
                ev.square_inplace(c)
                ev.relinearize_inplace(c, relin)
                ev.rescale_to_next_inplace(c)
            continue
        pid = cts[0].parms_id()
        data = sc.get_context_data(pid)
        if data.chain_index() == 0:
            raise InvalidConfigError("the CKKS parameters are too shallow for this plan")
        q = float(data.parms().coeff_modulus()[-1].value())
        floor = 1.0 / q  # smallest weight that still encodes to a non-zero integer
        scale = cts[0].scale
        out = []
        pt = sealapi.Plaintext()
        prod = sealapi.Ciphertext()
        for k in range(layer.w.shape[0]):
            row = layer.w[k]
            idx = np.flatnonzero(np.abs(row) * q >= 0.5)
            acc = None
            if idx.size == 0:  # an all-zero row: a vanishing multiple of x0, plus the bias
                idx, row = np.array([0]), np.array([floor])
            for j in idx:
                enc.encode(float(row[j]), pid, q, pt)
                if acc is None:
                    acc = sealapi.Ciphertext()
                    ev.multiply_plain(cts[j], pt, acc)
                else:
                    ev.multiply_plain(cts[j], pt, prod)
                    ev.add_inplace(acc, prod)
            assert acc is not None
            ev.rescale_to_next_inplace(acc)
            acc.scale = scale  # (scale·q)/q up to float rounding
            if layer.b[k] != 0.0:
                enc.encode(float(layer.b[k]), acc.parms_id(), scale, pt)
                ev.add_plain_inplace(acc, pt)
            out.append(acc)
        cts = out
    return [_ct_bytes(c) for c in cts]


def run_local(
    ctx: Any, public_ctx: Any, plan: Plan, x: np.ndarray, mode: str
) -> tuple[np.ndarray, dict[str, float]]:
    """Encrypt with ``ctx``, evaluate with ``public_ctx``, decrypt: (logits, timings)."""
    x = plan.check_input(x)
    slots = ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
    t0 = time.perf_counter()
    outs, t_enc, t_eval, t_dec = [], 0.0, 0.0, 0.0
    step = 1 if mode == "latency" else slots
    for i in range(0, x.shape[0], step):
        chunk = x[i : i + step]
        a = time.perf_counter()
        blobs = encrypt(ctx, plan, chunk, mode)
        b = time.perf_counter()
        res, _ = evaluate(public_ctx, plan, blobs, mode)
        c = time.perf_counter()
        outs.append(decrypt(ctx, res, chunk.shape[0], mode, plan.num_outputs))
        t_enc, t_eval, t_dec = t_enc + b - a, t_eval + c - b, t_dec + time.perf_counter() - c
    total = time.perf_counter() - t0
    return np.concatenate(outs), {
        "seconds": total,
        "encrypt_seconds": t_enc,
        "server_seconds": t_eval,
        "decrypt_seconds": t_dec,
    }
