"""Joint training on the three-party ring engine: the MPyC program's algorithm on Z_2^64.

Each data party secret-shares its rows; the shards' shares are stacked (shares only:
no party sees another's rows) and the parties run full-batch gradient descent,
SecureML-style (Mohassel and Zhang, S&P 2017): ``z = Xw + b``, the hard sigmoid
``clamp(z/4 + 1/2, 0, 1) = relu(u) - relu(u - 1)`` with ``u = z/4 + 1/2`` (both ReLUs in
one comparison batch), ``e = p - y``, and ``w -= lr/n · Xᵀe``, ``b -= lr/n · Σe`` with
the step carried at 24 fractional bits. Only the final weights are opened, to every
party. :func:`~.train.plaintext_gd` is the float64 reference.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from modelshield.crypto.mpc.net import Peers
from modelshield.crypto.mpc.ring import check_bits, exchange
from modelshield.crypto.mpc.rss import Ring3, Shared, cat, decode, encode
from modelshield.crypto.mpc.train import check_settings, check_train_metas, train_meta


def train(
    net: Peers,
    *,
    role: str,
    frac_bits: int,
    int_bits: int,
    epochs: int,
    lr: float,
    kind: str,
    xy: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The training program of party ``net.pid`` (a data party with a shard, or compute)."""
    check_settings(kind, epochs, lr)
    hyper = {"epochs": epochs, "lr": lr, "kind": kind, "frac_bits": frac_bits, "int_bits": int_bits}
    tr = net.traffic
    with tr.during("meta"):
        metas = exchange(net, train_meta(role, xy, hyper))
    holders, d = check_train_metas(metas, hyper)
    check_bits(frac_bits, int_bits)
    f = frac_bits
    t0 = time.perf_counter()
    with tr.during("keys"):
        proto = Ring3(net, f)
    xs, ys = [], []
    with tr.during("input:x"):
        for i in holders:
            n_i = int(metas[i]["n"])
            mine = net.pid == i and xy is not None
            mx = encode(xy[0], f) if mine and xy is not None else None
            my = encode(xy[1].reshape(-1, 1), f) if mine and xy is not None else None
            xs.append(proto.share(i, mx, (n_i, d)))
            ys.append(proto.share(i, my, (n_i, 1)))
    x, y = cat(xs), cat(ys)
    xt = x.map(lambda t: t.T.contiguous())
    n = int(x.shape[0])
    w = Shared(torch.zeros(d, 1, dtype=torch.int64), torch.zeros(d, 1, dtype=torch.int64))
    b = Shared(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    half, one = int(encode(np.array(0.5), f)), int(encode(np.array(1.0), f))
    with tr.during("compute"):
        for _ in range(epochs):
            z = proto.truncate(proto.matmul(x, w)) + b
            if kind == "logistic":
                u = proto.add_public(proto.truncate(z, 2), half)  # z/4 + 1/2
                both = proto.relu(cat([u, proto.add_public(u, -one)]))
                p = both.map(lambda t: t[:n]) - both.map(lambda t: t[n:])
            else:
                p = z
            e = p - y
            g = proto.truncate(proto.matmul(xt, e))  # Xᵀe, (d, 1)
            s = e.map(lambda t: t.sum(0))  # Σe, (1,)
            step = proto.mul_public(cat([g.map(torch.flatten), s]), lr / n)
            w = w - step.map(lambda t: t[:d].reshape(d, 1))
            b = b - step.map(lambda t: t[d:])
    with tr.during("output"):
        wv = decode(proto.open_all(w), f).reshape(-1)
        bv = decode(proto.open_all(b), f).reshape(-1)
    seconds = time.perf_counter() - t0
    with tr.during("control"):
        exchange(net, "done")
    return {
        "role": role,
        "pid": net.pid,
        "roles": [m["role"] for m in metas],
        "engine": "ring",
        "n": n,
        "shards": [int(metas[i]["n"]) for i in holders],
        "features": d,
        **hyper,
        "seconds": seconds,
        "weights": {"w": wv, "b": bv},
        "bytes_sent": {str(j): int(v) for j, v in net.bytes_sent.items()},
    }
