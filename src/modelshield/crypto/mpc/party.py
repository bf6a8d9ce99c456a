"""One MPC party as its own process: ``modelshield mpc party --id I --parties ... --role ...``.

A party reads only its own file (the model owner its model, a data owner its data), runs
the shared program over TCP with the other parties, and writes ``OUT/party-I.json`` (and,
for the party that receives them, ``OUT/party-I-outputs.npz``). With ``transcript=True``
it also writes every message it sent, tagged by phase, to ``OUT/party-I-transcript.bin``
so an auditor can check that no plaintext input or weight left the party.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelshield.core.errors import InvalidConfigError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.crypto.mpc.engine import (
    DEFAULT_FRAC_BITS,
    DEFAULT_INT_BITS,
    Traffic,
    infer_program,
    make_runtime,
    parse_parties,
    require_mpyc,
    resolve_engine,
    run_program,
)

logger = logging.getLogger(__name__)

ROLES = ("model", "data", "compute")
TASKS = ("infer", "train")


def _read_data(
    path: str, bounds: tuple[float, float], limit: int | None, int_bits: int
) -> tuple[Any, np.ndarray, np.ndarray]:
    """This data party's rows, checked against the fixed-point range before any sharing."""
    from modelshield.core.data import load_dataset

    data = load_dataset(path, bounds=bounds)
    n = len(data) if limit is None else min(int(limit), len(data))
    x = data.x[:n].double().reshape(n, -1).numpy()
    top = float(np.abs(x).max()) if x.size else 0.0
    if not np.isfinite(top) or top >= 2 ** (int_bits - 1):
        raise InvalidConfigError(
            f"--int-bits {int_bits} holds values below {2 ** (int_bits - 1)}, but the "
            f"inputs in {path} reach {top:.4g}: use more --int-bits or scale the data"
        )
    return data, x, data.y[:n].numpy().astype(np.int64)


def _run_mpyc(
    pid: int,
    addresses: list[tuple[str, int]],
    program: Any,
    traffic: Traffic,
    timeout: float,
    log_level: str,
) -> dict[str, Any]:
    rt = make_runtime(pid, addresses, traffic=traffic, log_level=log_level)
    return dict(run_program(rt, program, timeout=timeout))


def run_party(
    *,
    id: int,
    parties: str | list[str],
    role: str,
    out: str,
    task: str = "infer",
    model: str | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    data: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    limit: int | None = None,
    frac_bits: int = DEFAULT_FRAC_BITS,
    int_bits: int = DEFAULT_INT_BITS,
    batch_size: int = 100,
    reveal: str = "label",
    epochs: int = 30,
    lr: float = 1.0,
    kind: str = "logistic",
    transcript: bool = False,
    timeout: float = 600.0,
    log_level: str = "warning",
    engine: str = "auto",
) -> dict[str, Any]:
    """Run party ``id`` of ``parties`` (``HOST:PORT,...``) in ``role``; write its results."""
    if role not in ROLES:
        raise InvalidConfigError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    if task not in TASKS:
        raise InvalidConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    addresses = parse_parties(parties)
    if len(addresses) < 2:
        raise InvalidConfigError("--parties needs at least two HOST:PORT entries")
    if not 0 <= id < len(addresses):
        raise InvalidConfigError(f"--id must be in 0..{len(addresses) - 1}, got {id}")
    engine = resolve_engine(engine, len(addresses))
    if engine == "mpyc":
        require_mpyc()
    if role == "model" and task == "train":
        raise InvalidConfigError("joint training has data and compute parties, no model party")
    if role == "model" and not model:
        raise InvalidConfigError("--role model needs --model (the model owner's file)")
    if role == "data" and not data:
        raise InvalidConfigError("--role data needs --data (the data owner's file)")
    if role != "model" and model:
        raise InvalidConfigError(f"--model is read by the model party only, not a {role} party")
    if role != "data" and data:
        raise InvalidConfigError(f"--data is read by a data party only, not a {role} party")
    if reveal not in ("label", "logits"):
        raise InvalidConfigError(f"--reveal must be label or logits, got {reveal!r}")
    if batch_size < 1:
        raise InvalidConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)

    traffic = Traffic(record=transcript)
    labels: np.ndarray | None = None
    started = time.time()
    if task == "infer":
        mpc_model = x = None
        if role == "data" and data:  # checked above: a data party has --data
            _, x, labels = _read_data(data, bounds, limit, int_bits)
        if role == "model" and model:  # and a model party --model
            from modelshield.crypto.mpc.model import load_mpc_model

            mpc_model, _ = load_mpc_model(model, input_shape, arch=arch, trust_pickle=trust_pickle)
            probe = np.random.default_rng(0).uniform(*bounds, (256, mpc_model.input_dim))
            peak = mpc_model.max_abs(probe)  # the model owner's own check; nothing is sent
            if peak >= 2 ** (int_bits - 2):
                logger.warning(
                    "on random inputs in %s the model's values reach %.4g, near the fixed-point "
                    "limit %d of --int-bits %d: wrong results if real inputs go beyond it",
                    bounds, peak, 2 ** (int_bits - 1), int_bits,
                )  # fmt: skip
        settings: dict[str, Any] = dict(
            role=role,
            frac_bits=frac_bits,
            int_bits=int_bits,
            batch_size=batch_size,
            reveal=reveal,
            model=mpc_model,
            x=x,
        )
        if engine == "ring":
            from modelshield.crypto.mpc import ring

            ring.check_bits(frac_bits, int_bits)
            result = ring.run_party(id, addresses, timeout=timeout, traffic=traffic, **settings)
        else:
            program = infer_program(**settings, traffic=traffic)
            result = _run_mpyc(id, addresses, program, traffic, timeout, log_level)
    else:
        from modelshield.crypto.mpc.train import train_program

        xy = None
        if role == "data" and data:  # checked above: a data party has --data
            _, xs, labels = _read_data(data, bounds, limit, int_bits)
            xy = (xs, labels)
        train_settings: dict[str, Any] = dict(
            role=role, frac_bits=frac_bits, int_bits=int_bits, epochs=epochs, lr=lr, kind=kind,
            xy=xy,
        )  # fmt: skip
        if engine == "ring":
            from modelshield.crypto.mpc import ring
            from modelshield.crypto.mpc.ring_train import train

            result = ring.run_party(
                id, addresses, timeout=timeout, traffic=traffic, program=train, **train_settings
            )
        else:
            program = train_program(**train_settings, traffic=traffic)
            result = _run_mpyc(id, addresses, program, traffic, timeout, log_level)
    result["wall_time"] = time.time() - started
    result["task"] = task
    outputs = result.pop("outputs", None)
    if outputs is not None:
        with atomic_open(outdir / f"party-{id}-outputs.npz", "wb") as fh:
            np.savez(fh, outputs=outputs)
        if labels is not None and task == "infer" and reveal == "label":
            pred = np.rint(outputs.reshape(-1)).astype(np.int64)
            result["accuracy"] = float((pred == labels).mean()) if len(labels) else float("nan")
    weights = result.pop("weights", None)
    if weights is not None:
        with atomic_open(outdir / f"party-{id}-weights.npz", "wb") as fh:
            np.savez(fh, **weights)
    if transcript:
        traffic.save(outdir / f"party-{id}-transcript.bin")
        result["transcript"] = str(outdir / f"party-{id}-transcript.bin")
    atomic_write_json(outdir / f"party-{id}.json", result)  # last: marks the party finished
    return result
