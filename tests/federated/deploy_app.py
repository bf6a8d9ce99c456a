"""A tiny Flower app for the deployment tests (imported by Flower's own processes).

The "model" is two numbers. Each ClientApp adds ``partition-id + 1`` to them and reports
``partition-id + 1`` examples, so with two nodes one FedAvg round adds
``(1*1 + 2*2) / 3 = 5/3``: the final arrays show that both nodes took part, that each got
its own node config and that FedAvg weighted them. The ServerApp writes the final arrays
to the JSON file named by the run config ``out``; ``fail`` makes it raise and
``sleep`` makes it wait first (for the timeout test).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

INITIAL = np.array([0.0, 1.0], dtype=np.float64)

client_app = ClientApp()
server_app = ServerApp()


def expected_arrays(num_nodes: int, num_rounds: int) -> np.ndarray:
    """What ``num_rounds`` of FedAvg over ``num_nodes`` of these clients give."""
    weights = np.arange(1, num_nodes + 1, dtype=np.float64)
    step = float((weights * weights).sum() / weights.sum())
    return INITIAL + num_rounds * step


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Add ``partition-id + 1`` to every array; report as many examples."""
    step = int(context.node_config["partition-id"]) + 1
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = ArrayRecord([a + step for a in arrays])
    metrics = MetricRecord({"num-examples": step})
    return Message(RecordDict({"arrays": updated, "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report a dummy loss (the tests switch federated evaluation off)."""
    del context
    metrics = MetricRecord({"num-examples": 1, "loss": 0.0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for ``num-rounds`` and write the final arrays to ``out``."""
    cfg = context.run_config
    if float(cfg.get("sleep", 0.0)) > 0:
        time.sleep(float(cfg["sleep"]))
    if bool(cfg.get("fail", False)):
        raise RuntimeError("deploy_app asked to fail")
    num_nodes = int(cfg["num-nodes"])
    strategy = FedAvg(
        fraction_evaluate=0.0,
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
        min_evaluate_nodes=0,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([INITIAL.copy()]),
        num_rounds=int(cfg["num-rounds"]),
        timeout=60,
    )
    final = [a.tolist() for a in result.arrays.to_numpy_ndarrays()]
    Path(str(cfg["out"])).write_text(json.dumps({"arrays": final}), encoding="utf-8")
