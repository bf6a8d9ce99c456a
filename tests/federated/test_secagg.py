"""SecAgg+ through a real simulation: the server sees only masked vectors, and the
aggregate it unmasks is FedAvg of the clients' parameters up to quantisation error."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

pytest.importorskip("flwr")
pytest.importorskip("ray")


def test_secagg_server_sees_masked_vectors_and_gets_fedavg(tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    debug.mkdir()
    os.environ["MODELSHIELD_SECAGG_DEBUG"] = str(debug)
    try:
        r = run_cli(
            "fl", "simulate", "--clients", "5", "--rounds", "2", "--secagg", "--cpus", "2",
            "--out", str(tmp_path / "out"), timeout=600,
        )  # fmt: skip
    finally:
        del os.environ["MODELSHIELD_SECAGG_DEBUG"]
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert all(row["secagg"] == 1.0 for row in res["rounds"])
    assert res["accuracy"][-1] > res["accuracy"][0]  # it trained

    clients = [pickle.loads((debug / f"client-{i}-round-1.pkl").read_bytes()) for i in range(5)]
    weights = np.array([c["n"] for c in clients], dtype=float)
    glob = pickle.loads((debug / "global-round-1.pkl").read_bytes())
    for j, g in enumerate(glob):
        fedavg = sum(c["arrays"][j] * c["n"] for c in clients) / weights.sum()
        # quantisation: 2 * clipping range 8 / 2**22 per client, averaged
        assert np.abs(fedavg - g).max() < 1e-4

    received = pickle.loads((debug / "server-received.pkl").read_bytes())
    n_params = len(clients[0]["arrays"])
    masked = [v for v in received if len(v) == n_params + 1]
    assert len(masked) == 5 * 2  # one masked vector per client and round
    assert all(len(v) == 0 or len(v) != n_params for v in received)  # no plaintext arrays
    flat_clients = [np.concatenate([a.ravel() for a in c["arrays"]]) for c in clients]
    for v in masked:
        flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in v[1:]])
        assert flat.shape == flat_clients[0].shape
        for fc in flat_clients:
            assert abs(np.corrcoef(flat, fc)[0, 1]) < 0.1  # masks make it look random
        assert flat.max() > 1e6  # integers spread over the modulus, not parameters
