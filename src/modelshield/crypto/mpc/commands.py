"""The one-machine ``modelshield mpc infer`` / ``mpc train`` runs: launch, watch, collect.

The launcher starts every party as its own ``modelshield mpc party`` process on
127.0.0.1 (free ports), passes the model path only to the model party and a data path
only to its data party, and waits. A party that exits with an error ends the run at once:
the others are killed and its last error line is raised as :class:`MPCError` (one line,
exit code 2 on the command line); so does a run past its timeout or a Ctrl-C. The
launcher itself reads both files only to score the run against plaintext (it stands for
the two owners on one machine); across hosts, run ``mpc party`` on each.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelshield.core.errors import InvalidConfigError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.crypto.mpc.engine import (
    DEFAULT_FRAC_BITS,
    DEFAULT_INT_BITS,
    MPCError,
    require_mpyc,
    resolve_engine,
)

logger = logging.getLogger(__name__)

MIN_PARTIES = 3
"""Shamir with threshold ``(m-1)//2`` hides inputs from one party only when ``m ≥ 3``."""
WRAP_RISK_WARN = 1e-4
"""Warn when a ring-engine truncation may spoil more than one sample in 10^4."""
TRAIN_WRAP_RISK_WARN = 1e-3
"""Warn when a ring-engine training run may go wrong once in 10^3 (it shows in
``max_weight_error``, which compares with the same algorithm in float64)."""
SECURITY = {
    "mpyc": "Shamir secret sharing (MPyC), threshold {t} of {m}: passive (semi-honest) "
    "adversary, honest majority",
    "ring": "replicated secret sharing over Z_2^64 (ABY3-style, modelshield ring engine), "
    "3 parties, any 1 corrupted: passive (semi-honest) adversary, honest majority",
}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free on ``host`` right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class PartySpec:
    """One party to launch: its role and the role-specific arguments."""

    role: str
    args: list[str]


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    for ln in reversed(lines):
        if ln.startswith("modelshield: error:"):
            return ln.removeprefix("modelshield: error:").strip()
    return lines[-1] if lines else "no output"


def launch(
    specs: list[PartySpec],
    out: Path,
    *,
    common: list[str],
    timeout: float,
    host: str = "127.0.0.1",
) -> list[dict[str, Any]]:
    """Run every party as a process on ``host``; return their ``party-I.json`` records."""
    import json

    ports = free_ports(len(specs), host)
    addresses = ",".join(f"{host}:{p}" for p in ports)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)  # a present result means a finished run
    for i in range(len(specs)):
        (out / f"party-{i}.json").unlink(missing_ok=True)
    started = time.monotonic()
    previous = _on_sigterm()
    try:
        for i, spec in enumerate(specs):
            cmd = [
                sys.executable, "-m", "modelshield.cli", "-q", "mpc", "party",
                "--id", str(i), "--parties", addresses, "--role", spec.role,
                "--out", str(out), "--timeout", str(timeout), *common, *spec.args,
            ]  # fmt: skip
            log = out / f"party-{i}.log"
            logs.append(log)
            logger.debug("party %d: %s", i, shlex.join(cmd))
            with open(log, "wb") as fh:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                    )
                )  # fmt: skip
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # the cause is the party that did not fail because another one left
                first = min(failed, key=lambda i: (_echoed(_last_error(logs[i])), _mtime(logs[i])))
                raise MPCError(
                    f"party {first} ({specs[first].role}) failed: {_last_error(logs[first])}"
                )
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - started > timeout + 30:
                raise MPCError(f"the parties did not finish within {timeout:g} s")
            time.sleep(0.05)
    finally:
        _stop(procs)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [json.loads((out / f"party-{i}.json").read_text()) for i in range(len(specs))]


def _echoed(error: str) -> bool:
    """Does this party's error only pass on another party's ("party 2 disconnected ...",
    "party 0 failed: ...")? The launcher reports the party where the failure began."""
    return "disconnected" in error or re.match(r"party \d+ failed: ", error) is not None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the party gets SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _on_sigterm() -> Any:
    """Turn SIGTERM into an error (so the parties are stopped); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise MPCError("the launcher was terminated (SIGTERM); the parties were stopped")

    return signal.signal(signal.SIGTERM, handler)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return float("inf")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every party still running (then kill the ones that do not stop)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + 3
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _command() -> str:
    from modelshield.cli.options import command_line

    return command_line()


def _bytes(records: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    total = {str(r["pid"]): int(sum(r["bytes_sent"].values())) for r in records}
    per_peer = {str(r["pid"]): {k: int(v) for k, v in r["bytes_sent"].items()} for r in records}
    return total, per_peer


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------


def run_infer(**opts: Any) -> dict[str, Any]:
    """``mpc infer``: secret-shared inference with ``parties`` local processes."""
    import torch

    from modelshield.core.data import load_dataset
    from modelshield.crypto.mpc.model import load_mpc_model

    m = int(opts.get("parties") or MIN_PARTIES)
    if m < MIN_PARTIES:
        raise InvalidConfigError(
            f"--parties must be ≥ {MIN_PARTIES} (Shamir secret sharing with an honest majority "
            f"hides inputs from a single party only with 3 or more), got {m}"
        )
    engine = resolve_engine(opts.get("engine"), m)
    frac = int(opts.get("frac_bits") or DEFAULT_FRAC_BITS)
    int_bits = int(opts.get("int_bits") or DEFAULT_INT_BITS)
    if engine == "mpyc":
        require_mpyc()
    else:
        from modelshield.crypto.mpc.ring import check_bits

        check_bits(frac, int_bits)
    bounds = opts.get("bounds") or (0.0, 1.0)
    data = load_dataset(opts["data"], bounds=bounds)
    limit = opts.get("limit")
    n = len(data) if limit is None else min(int(limit), len(data))
    x, y = data.x[:n].double().reshape(n, -1).numpy(), data.y[:n].numpy().astype(np.int64)
    shape = ",".join(map(str, data.input_shape))
    mpc_model, module = load_mpc_model(
        opts["model"],
        data.input_shape,
        arch=opts.get("arch"),
        trust_pickle=bool(opts.get("trust_pickle")),
    )
    peak = mpc_model.max_abs(x)
    if peak >= 2 ** (int_bits - 1):
        need = int(np.ceil(np.log2(peak + 1))) + 2
        raise InvalidConfigError(
            f"--int-bits {int_bits} holds values below {2 ** (int_bits - 1)}, but the model's "
            f"inputs or layer outputs on --data reach {peak:.4g}: use --int-bits {need} or more"
        )
    risk = None
    if engine == "ring":
        from modelshield.crypto.mpc.ring import wrap_risk

        risk = wrap_risk(mpc_model.architecture.layers, peak, frac)
        if risk > WRAP_RISK_WARN:
            logger.warning(
                "with --frac-bits %d and values up to %.4g, a sample's result is wrong with "
                "probability up to %.2g (a truncation wraps around): use fewer --frac-bits",
                frac, peak, risk,
            )  # fmt: skip
    reveal = opts.get("reveal") or "label"
    common = [
        "--frac-bits", str(frac), "--int-bits", str(int_bits),
        "--batch-size", str(int(opts.get("batch_size") or 100)), "--reveal", reveal,
        "--bounds", f"{bounds[0]},{bounds[1]}", "--engine", engine,
    ]  # fmt: skip
    if opts.get("transcripts"):
        common.append("--transcript")
    model_args = ["--model", str(opts["model"]), "--input-shape", shape]
    if opts.get("arch"):
        model_args += ["--arch", str(opts["arch"])]
    if opts.get("trust_pickle"):
        model_args.append("--trust-pickle")
    data_args = ["--data", str(opts["data"])] + (["--limit", str(n)] if limit is not None else [])
    specs = [PartySpec("model", model_args), PartySpec("data", data_args)]
    specs += [PartySpec("compute", []) for _ in range(m - 2)]
    out = Path(opts["out"])
    started = time.time()
    records = launch(specs, out, common=common, timeout=float(opts.get("timeout") or 600))
    wall = time.time() - started
    with np.load(out / "party-1-outputs.npz", allow_pickle=False) as z:
        outputs = z["outputs"]
    with torch.no_grad():
        torch_logits = module.eval()(torch.from_numpy(x).float().reshape(n, *data.input_shape))
        torch_logits = torch_logits.double().reshape(n, -1).numpy()
    ref = mpc_model.forward(x)
    plain_pred = _labels(torch_logits, mpc_model.output)
    if reveal == "label":
        pred = np.rint(outputs.reshape(-1)).astype(np.int64)
    else:
        pred = _labels(outputs, "identity")
    dp = records[1]
    total, per_peer = _bytes(records)
    result: dict[str, Any] = {
        "n": n,
        "parties": m,
        "engine": engine,
        "roles": [s.role for s in specs],
        "frac_bits": frac,
        "int_bits": dp["int_bits"],
        "max_abs_value": peak,
        "reveal": reveal,
        "accuracy": _acc(pred, y),
        "plaintext_accuracy": _acc(plain_pred, y),
        "argmax_agreement": float((pred == plain_pred).mean()) if n else float("nan"),
        "latency": {
            "batch_size": dp["batch_size"],
            "batches": len(dp["batch_seconds"]),
            "seconds_per_batch": float(np.mean(dp["batch_seconds"]))
            if dp["batch_seconds"]
            else None,
            "seconds_per_sample": dp["seconds"] / max(1, n),
            "secure_seconds": dp["seconds"],
            "weight_sharing_seconds": dp["seconds"] - float(np.sum(dp["batch_seconds"])),
        },
        "plaintext_seconds_per_sample": _plain_time(module, x, data.input_shape),
        "bytes_sent": total,
        "bytes_sent_per_peer": per_peer,
        "bytes_sent_per_sample": {k: v / max(1, n) for k, v in total.items()},
        "architecture": dp["architecture"],
        "notes": mpc_model.notes,
        "security": SECURITY[engine].format(t=(m - 1) // 2, m=m),
        "revealed": "outputs to the data owner (party 1); input and weight shapes and the "
        "architecture to every party",
        "wall_time": wall,
        "command": opts.get("command") or _command(),
    }
    if risk is not None:
        result["truncation_failure_bound_per_sample"] = risk
    if reveal == "logits":
        result["max_abs_error"] = float(np.abs(outputs - ref).max()) if n else 0.0
    if opts.get("transcripts"):
        result["transcripts"] = [r.get("transcript") for r in records]
    atomic_write_json(out / "result.json", result)  # last: its presence means the run finished
    return result


def _labels(logits: np.ndarray, output: str) -> np.ndarray:
    if logits.shape[1] == 1:
        return (logits[:, 0] > (0.5 if output == "sigmoid" else 0.0)).astype(np.int64)
    return np.asarray(logits.argmax(axis=1), dtype=np.int64)


def _acc(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean()) if len(y) else float("nan")


def _plain_time(module: Any, x: np.ndarray, shape: tuple[int, ...]) -> float:
    import torch

    t = torch.from_numpy(x).float().reshape(len(x), *shape)
    with torch.no_grad():
        module(t[:1])
        t0 = time.perf_counter()
        module(t)
    return (time.perf_counter() - t0) / max(1, len(x))


# --------------------------------------------------------------------------------------
# Joint training
# --------------------------------------------------------------------------------------


def run_train(**opts: Any) -> dict[str, Any]:
    """``mpc train``: each data file is one party's horizontal shard; train in MPC."""
    from modelshield.core.data import load_dataset
    from modelshield.crypto.mpc.train import KINDS, plaintext_gd, predict, ring_wrap_risk

    paths = [p for p in str(opts["data"]).split(",") if p.strip()]
    if not paths:
        raise InvalidConfigError("--data needs at least one file (one per data party)")
    kind = opts.get("model") or "logistic"
    if kind not in KINDS:
        raise InvalidConfigError(f"--model must be logistic or linear, got {kind!r}")
    m = max(int(opts.get("parties") or MIN_PARTIES), len(paths))
    if m < MIN_PARTIES:
        raise InvalidConfigError(f"--parties must be ≥ {MIN_PARTIES}, got {m}")
    engine = resolve_engine(opts.get("engine"), m)
    if engine == "mpyc":
        require_mpyc()
    bounds = opts.get("bounds") or (0.0, 1.0)
    shards = []
    for p in paths:
        d = load_dataset(p, bounds=bounds)
        shards.append((d.x.double().reshape(len(d), -1).numpy(), d.y.numpy().astype(np.int64)))
        labels = sorted(set(shards[-1][1].tolist()))
        if not set(labels) <= {0, 1}:
            raise InvalidConfigError(
                f"joint training fits a binary model: labels in {p} must be 0/1, got {labels}"
            )
    epochs, lr = int(opts.get("epochs") or 30), float(opts.get("lr") or 1.0)
    frac = int(opts.get("frac_bits") or DEFAULT_FRAC_BITS)
    common = [
        "--task", "train", "--kind", kind, "--epochs", str(epochs), "--lr", repr(lr),
        "--frac-bits", str(frac), "--int-bits", str(int(opts.get("int_bits") or DEFAULT_INT_BITS)),
        "--bounds", f"{bounds[0]},{bounds[1]}", "--engine", engine,
    ]  # fmt: skip
    if opts.get("transcripts"):
        common.append("--transcript")
    specs = [PartySpec("data", ["--data", p]) for p in paths]
    specs += [PartySpec("compute", []) for _ in range(m - len(paths))]
    out = Path(opts["out"])
    started = time.time()
    records = launch(specs, out, common=common, timeout=float(opts.get("timeout") or 600))
    wall = time.time() - started
    with np.load(out / "party-0-weights.npz", allow_pickle=False) as z:
        w, b = z["w"], float(z["b"][0])
    if opts.get("test"):
        t = load_dataset(opts["test"], bounds=bounds)
        xe, ye = t.x.double().reshape(len(t), -1).numpy(), t.y.numpy().astype(np.int64)
        evaluated_on = str(opts["test"])
    else:
        xe, ye = np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])
        evaluated_on = "the pooled training data"
    peaks: dict[str, float] = {}
    same_w, same_b = plaintext_gd(shards, epochs=epochs, lr=lr, kind=kind, link="hard", peaks=peaks)
    pool_w, pool_b = plaintext_gd(shards, epochs=epochs, lr=lr, kind=kind, link="exact")
    t0 = time.perf_counter()
    plaintext_gd(shards, epochs=epochs, lr=lr, kind=kind, link="hard")
    plain_s = time.perf_counter() - t0
    total, per_peer = _bytes(records)
    with atomic_open(out / "model.npz", "wb") as fh:
        np.savez(fh, w=w, b=np.array([b]))
    result: dict[str, Any] = {
        "model": kind,
        "parties": m,
        "engine": engine,
        "roles": [s.role for s in specs],
        "shards": [len(s[1]) for s in shards],
        "epochs": epochs,
        "lr": lr,
        "frac_bits": frac,
        "accuracy": _acc(predict(w, b, xe, kind), ye),
        "plaintext_accuracy": _acc(predict(pool_w, pool_b, xe, kind), ye),
        "plaintext_same_algorithm_accuracy": _acc(predict(same_w, same_b, xe, kind), ye),
        "max_weight_error": float(max(np.abs(w - same_w).max(), abs(b - same_b))),
        "evaluated_on": evaluated_on,
        "training_seconds": max(r["seconds"] for r in records),
        "plaintext_training_seconds": plain_s,
        "bytes_sent": total,
        "bytes_sent_per_peer": per_peer,
        "link": "hard sigmoid clamp(z/4 + 1/2, 0, 1) in MPC; the plaintext_accuracy model "
        "uses the exact sigmoid"
        if kind == "logistic"
        else "identity (least squares)",
        "security": SECURITY[engine].format(t=(m - 1) // 2, m=m),
        "revealed": "the final weights to every party; shard sizes and the feature count",
        "weights": str(out / "model.npz"),
        "wall_time": wall,
        "command": opts.get("command") or _command(),
    }
    if engine == "ring":
        n_all, n_features = sum(len(s[1]) for s in shards), int(shards[0][0].shape[1])
        risk = ring_wrap_risk(n_all, n_features, epochs, lr, peaks, frac)
        result["truncation_failure_bound"] = risk
        if risk > TRAIN_WRAP_RISK_WARN:
            logger.warning(
                "the training's truncations may wrap around (probability up to %.2g): check "
                "max_weight_error, or use fewer --frac-bits", risk,
            )  # fmt: skip
    if opts.get("transcripts"):
        result["transcripts"] = [r.get("transcript") for r in records]
    atomic_write_json(out / "result.json", result)
    return result
