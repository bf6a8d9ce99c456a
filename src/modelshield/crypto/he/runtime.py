"""Encrypted execution of a plan, in two packings.

- **latency** (one sample per ciphertext): the sample, with a constant-1 feature
  appended, is one TenSEAL ``CKKSVector``; each affine layer is ``mm`` with the bias
  folded into the matrix as the row of that constant feature (which the next matrix
  carries forward, and a square keeps at 1). Adding a plain bias after ``mm`` breaks the
  slot layout the next ``mm`` relies on (TenSEAL issue #462), so we never do.
- **throughput** (SIMD across samples, CryptoNets-style, Gilad-Bachrach et al. 2016):
  ciphertext *j* holds feature *j* of up to N/2 samples, so an affine layer is a sum of
  ciphertext × scalar products with no rotations. It runs on TenSEAL's SEAL bindings
  (``tenseal.sealapi``): weights are encoded at the value of the prime the next rescale
  drops, so the scale stays put, and a layer's products are summed before one rescale.

TenSEAL is imported inside the functions.
"""

from __future__ import annotations

import logging
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
from modelshield.crypto.he.plan import Affine, Plan

logger = logging.getLogger(__name__)

MODES = ("latency", "throughput")

LATENCY_SECONDS_PER_INPUT = 1.0e-3
"""Rough cost of one ``mm`` input dimension (a rotation and an encode) at N=8192."""
THROUGHPUT_SECONDS_PER_WEIGHT = 2.5e-4
"""Rough cost of one ciphertext × scalar product and add at N=8192."""


def choose_mode(plan: Plan, params: CKKSParams, n: int) -> str:
    """The cheaper packing for ``n`` samples, from the two cost models above."""
    batches = -(-n // params.slots)
    nnz = sum(int(np.count_nonzero(a.w)) for a in plan.affines)
    t_thr = batches * nnz * THROUGHPUT_SECONDS_PER_WEIGHT
    t_lat = n * sum(a.shape[1] + 1 for a in plan.affines) * LATENCY_SECONDS_PER_INPUT
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
    import tenseal as ts
    from tenseal import sealapi

    x = plan.check_input(x)
    if mode == "latency":
        ones = np.ones((x.shape[0], 1))
        return [ts.ckks_vector(ctx, row.tolist()).serialize() for row in np.hstack([x, ones])]
    if mode != "throughput":
        raise InvalidConfigError(f"mode must be one of {MODES}, got {mode!r}")
    slots = ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
    if x.shape[0] > slots:
        raise DataError(f"a throughput request holds at most {slots} samples, got {x.shape[0]}")
    sc = ctx.seal_context().data
    enc = sealapi.CKKSEncoder(sc)
    encryptor = sealapi.Encryptor(sc, ctx.public_key().data)
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
    import tenseal as ts
    from tenseal import sealapi

    if not ctx.is_private():
        raise InvalidConfigError("decryption needs the client's secret key context")
    if mode == "latency":
        rows = [ts.ckks_vector_from(ctx, b).decrypt()[:n_out] for b in blobs]
        return np.asarray(rows, dtype=np.float64).reshape(len(blobs), n_out)
    sc = ctx.seal_context().data
    enc = sealapi.CKKSEncoder(sc)
    dec = sealapi.Decryptor(sc, ctx.secret_key().data)
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
    if mode == "latency":
        out = [_eval_latency(ctx, plan, b) for b in blobs]
    elif mode == "throughput":
        if len(blobs) != plan.input_dim:
            raise DataError(
                f"a throughput request holds one ciphertext per input feature: want "
                f"{plan.input_dim}, got {len(blobs)}"
            )
        out = _eval_throughput(ctx, plan, [_ct_load(ctx, b) for b in blobs])
    else:
        raise InvalidConfigError(f"mode must be one of {MODES}, got {mode!r}")
    return out, EvalStats(time.perf_counter() - t0, mode, len(blobs), len(out))


def augmented(plan: Plan) -> list[np.ndarray | str]:
    """Latency-mode matrices (in+1 × out+1): bias as the row of the constant-1 input."""
    mats: list[np.ndarray | str] = []
    affines = plan.affines
    for layer in plan.layers:
        if not isinstance(layer, Affine):
            mats.append("square")
            continue
        last = layer is affines[-1]
        out, d = layer.shape
        m = np.zeros((d + 1, out + (0 if last else 1)))
        m[:d, :out] = layer.w.T
        m[d, :out] = layer.b
        if not last:
            m[d, out] = 1.0
        mats.append(m)
    return mats


def _eval_latency(ctx: Any, plan: Plan, blob: bytes) -> bytes:
    import tenseal as ts

    try:
        v = ts.ckks_vector_from(ctx, blob)
    except Exception as exc:
        raise DataError(f"not a CKKS vector for this context: {exc}") from exc
    if v.size() != plan.input_dim + 1:
        raise DataError(
            f"encrypted sample has {v.size() - 1} features; this plan takes {plan.input_dim}"
        )
    for m in augmented(plan):
        if isinstance(m, str):
            v.square_()
        else:
            v = v.mm(m.tolist())
    return v.serialize()  # type: ignore[no-any-return]


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
