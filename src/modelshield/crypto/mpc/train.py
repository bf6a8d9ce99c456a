"""Joint training of a linear or logistic model on horizontally split data, in MPC.

Each data party secret-shares its own rows (features and labels); the parties then run
full-batch gradient descent on the shares, SecureML-style (Mohassel and Zhang, S&P 2017):
the gradient ``Xᵀ(f(Xw + b) − y) / n`` is summed over the shards without pooling them,
and the logistic link is the MPC-friendly "hard sigmoid" ``clamp(z/4 + 1/2, 0, 1)``
(two secure comparisons; slope 1/4 at 0 like the sigmoid). Only the final weights are
revealed, to every party. :func:`plaintext_gd` runs the same algorithm in float64 as the
reference the shares must reproduce.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from modelshield.core.errors import InvalidConfigError
from modelshield.crypto.mpc.engine import (
    MPCError,
    Traffic,
    exchange_meta,
    secfxp_type,
    settle,
    share,
)

KINDS = ("logistic", "linear")


def hard_sigmoid(z: np.ndarray) -> np.ndarray:
    """``clamp(z/4 + 1/2, 0, 1)``: the link the MPC training uses."""
    return np.clip(z / 4 + 0.5, 0.0, 1.0)


def plaintext_gd(
    shards: list[tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    lr: float,
    kind: str,
    link: str = "hard",
    peaks: dict[str, float] | None = None,
) -> tuple[np.ndarray, float]:
    """Full-batch gradient descent on the pooled shards (``link``: hard or exact sigmoid).

    ``peaks``, when given, receives the largest |z| and |Xᵀe| of the run (the values the
    secure run truncates), for :func:`ring_wrap_risk`.
    """
    x = np.concatenate([s[0] for s in shards])
    y = np.concatenate([s[1] for s in shards]).astype(np.float64)
    w, b = np.zeros(x.shape[1]), 0.0
    top_z = top_g = 0.0
    for _ in range(epochs):
        z = x @ w + b
        if kind == "logistic":
            p = hard_sigmoid(z) if link == "hard" else 1 / (1 + np.exp(-z))
        else:
            p = z
        e = p - y
        g = x.T @ e
        top_z = max(top_z, float(np.abs(z).max(initial=0.0)))
        top_g = max(top_g, float(np.abs(g).max(initial=0.0)), abs(float(e.sum())))
        w = w - lr / len(y) * g
        b = b - lr / len(y) * float(e.sum())
    if peaks is not None:
        peaks.update(z=top_z, gradient=top_g)
    return w, b


def ring_wrap_risk(
    n: int, d: int, epochs: int, lr: float, peaks: dict[str, float], frac_bits: int
) -> float:
    """Bound on the chance that a truncation of the ring engine's training wraps around.

    Per epoch it truncates ``n`` values ``z`` and ``d`` gradients at scale ``2^2f``, and
    ``d + 1`` steps ``lr/n · gradient`` at scale ``2^(f+24)``; each wraps with probability
    ``|value|/2^64`` (a wrong run then shows in ``max_weight_error``).
    """
    scale2 = 2.0 ** (2 * frac_bits)
    per_epoch = n * peaks["z"] * scale2 + d * peaks["gradient"] * scale2
    per_epoch += (d + 1) * peaks["gradient"] * lr / n * 2.0 ** (frac_bits + 24)
    return min(1.0, epochs * per_epoch / 2.0**64)


def predict(w: np.ndarray, b: float, x: np.ndarray, kind: str) -> np.ndarray:
    """Labels of the trained model: ``z > 0`` (logistic) or ``z > 1/2`` (linear on 0/1)."""
    z = x @ w + b
    return (z > (0.0 if kind == "logistic" else 0.5)).astype(np.int64)


def check_settings(kind: str, epochs: int, lr: float) -> None:
    if kind not in KINDS:
        raise InvalidConfigError(f"--model must be logistic or linear, got {kind!r}")
    if epochs < 1 or lr <= 0:
        raise InvalidConfigError(f"--epochs must be ≥ 1 and --lr > 0, got {epochs}, {lr}")


def train_meta(
    role: str, xy: tuple[np.ndarray, np.ndarray] | None, hyper: dict[str, Any]
) -> dict[str, Any]:
    """What a party tells the others before training: its role, the settings, its shard's size."""
    mine: dict[str, Any] = {"role": role, "hyper": hyper}
    if role == "data":
        if xy is None:
            raise MPCError("a data party has no training shard to share")
        labels = set(np.unique(xy[1]).tolist())
        if not labels <= {0, 1}:
            raise InvalidConfigError(
                f"joint training fits a binary model: labels must be 0/1, got {sorted(labels)}"
            )
        mine["n"], mine["d"] = int(xy[0].shape[0]), int(xy[0].shape[1])
    return mine


def check_train_metas(metas: list[dict[str, Any]], hyper: dict[str, Any]) -> tuple[list[int], int]:
    """The data parties' ids and the feature count; the parties must agree on the settings."""
    try:
        if any(m["hyper"] != hyper for m in metas):
            raise MPCError(
                f"parties disagree on the training settings: {[m['hyper'] for m in metas]}"
            )
        holders = [i for i, m in enumerate(metas) if m["role"] == "data"]
        if not holders:
            raise MPCError("joint training needs at least one data party")
        dims = {int(metas[i]["d"]) for i in holders}
    except (KeyError, TypeError, ValueError):
        raise MPCError(f"a party sent malformed training metadata: {metas}") from None
    if len(dims) != 1:
        raise MPCError(f"data parties have different feature counts: {sorted(dims)}")
    return holders, dims.pop()


def train_program(
    *,
    role: str,
    frac_bits: int,
    int_bits: int,
    epochs: int,
    lr: float,
    kind: str,
    xy: tuple[np.ndarray, np.ndarray] | None = None,
    traffic: Traffic | None = None,
) -> Any:
    """The training program of one party (a data party holding a shard, or a compute party)."""
    check_settings(kind, epochs, lr)
    tr = traffic or Traffic()
    hyper = {"epochs": epochs, "lr": lr, "kind": kind, "frac_bits": frac_bits, "int_bits": int_bits}

    async def program(rt: Any) -> dict[str, Any]:
        with tr.during("meta"):
            metas = await exchange_meta(rt, train_meta(role, xy, hyper))
        holders, d = check_train_metas(metas, hyper)
        secfxp = secfxp_type(rt, frac_bits, int_bits)
        t0 = time.perf_counter()
        shards = []
        with tr.during("input:x"):
            for i in holders:
                n_i = int(metas[i]["n"])
                mx = xy[0] if rt.pid == i and xy is not None else None
                my = (
                    xy[1].astype(np.float64).reshape(-1, 1)
                    if rt.pid == i and xy is not None
                    else None
                )
                shards.append(
                    (share(rt, secfxp, mx, (n_i, d), i), share(rt, secfxp, my, (n_i, 1), i))
                )
            await settle(rt, [a for sh in shards for a in sh])
        n = sum(int(metas[i]["n"]) for i in holders)
        w = secfxp.array(np.zeros((d, 1)), integral=False)
        b = secfxp.array(np.zeros((1,)), integral=False)
        step = lr / n
        with tr.during("compute"):
            for _ in range(epochs):
                gw: Any = None
                gb: Any = None
                for xs, ys in shards:
                    z = xs @ w + b
                    p = (
                        rt.np_minimum(rt.np_maximum(z * 0.25 + 0.5, 0), 1)
                        if kind == "logistic"
                        else z
                    )
                    e = p - ys
                    g = xs.T @ e
                    s = rt.np_sum(e, axis=0)
                    gw = g if gw is None else gw + g
                    gb = s if gb is None else gb + s
                w = w - gw * step
                b = b - gb * step
            await settle(rt, [w, b])
        with tr.during("output"):
            wv = np.asarray(await rt.output(w), dtype=np.float64).reshape(-1)
            bv = float(np.asarray(await rt.output(b), dtype=np.float64).reshape(-1)[0])
        return {
            "role": role,
            "pid": rt.pid,
            "roles": [m["role"] for m in metas],
            "n": n,
            "shards": [int(metas[i]["n"]) for i in holders],
            "features": d,
            **hyper,
            "seconds": time.perf_counter() - t0,
            "weights": {"w": wv, "b": np.array([bv])},
        }

    return program
