"""Keys kept apart: the client makes the context and keeps the secret key.

``KEY_DIR/secret.ctx`` (mode 0600) is the full TenSEAL context; ``KEY_DIR/public.ctx``
is the same context serialised with ``save_secret_key=False`` (public, relinearisation
and, for the latency packing, Galois keys): the only key material the server ever
receives. The server refuses a context that holds a secret key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from modelshield.core.errors import InvalidConfigError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.crypto.he.params import CKKSParams

logger = logging.getLogger(__name__)


def make_context(params: CKKSParams, *, galois: bool = True) -> Any:
    """A fresh CKKS context with secret, public and relinearisation (and Galois) keys."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2.0**params.scale_bits
    if galois:
        ctx.generate_galois_keys()
    return ctx


def public_bytes(ctx: Any) -> bytes:
    """The context without its secret key (what the server receives)."""
    data: bytes = ctx.serialize(save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
    return data


def load_public(data: bytes) -> Any:
    """Read a public context; refuse one that carries a secret key."""
    import tenseal as ts

    try:
        ctx = ts.context_from(data)
    except Exception as exc:
        raise InvalidConfigError(f"not a TenSEAL context: {exc}") from exc
    if ctx.is_private():
        raise InvalidConfigError(
            "refusing a context that holds the secret key: send the public context only"
        )
    return ctx


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_keys(out: str | Path, ctx: Any, params: CKKSParams, plan_id: str) -> dict[str, Any]:
    """Write ``secret.ctx`` (0600), ``public.ctx`` and ``keys.json`` into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    secret = ctx.serialize(save_secret_key=True)
    with atomic_open(d / "secret.ctx", "wb") as fh:
        fh.write(secret)
    os.chmod(d / "secret.ctx", 0o600)
    pub = public_bytes(ctx)
    with atomic_open(d / "public.ctx", "wb") as fh:
        fh.write(pub)
    meta = {
        "params": params.to_dict(),
        "plan": plan_id,
        "public_context": {"path": str(d / "public.ctx"), "sha256_16": fingerprint(pub)},
        "galois_keys": bool(ctx.has_galois_keys()),
        "secret_key": "secret.ctx (keep on the client; never send it)",
    }
    atomic_write_json(d / "keys.json", meta)  # last: marks the key directory complete
    return meta


def read_keys(path: str | Path) -> tuple[Any, bytes, dict[str, Any]]:
    """(secret context, public context bytes, keys.json) from a key directory."""
    import tenseal as ts

    d = Path(path)
    if not (d / "keys.json").is_file():
        raise InvalidConfigError(
            f"--keys {d} is not a key directory (no keys.json); make one with 'modelshield he keygen'"
        )
    meta = json.loads((d / "keys.json").read_text())
    ctx = ts.context_from((d / "secret.ctx").read_bytes())
    return ctx, (d / "public.ctx").read_bytes(), meta
