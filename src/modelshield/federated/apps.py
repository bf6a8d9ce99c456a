"""Flower apps (Message API) for a modelshield task, in simulation and in deployment.

:func:`make_apps` builds a ``ServerApp`` and a ``ClientApp`` for an :class:`FLConfig`;
with ``None`` they read the configuration from Flower's run config instead, which is how
the module-level ``server_app`` / ``client_app`` run under ``flwr run`` (deployment). A
client's partition is ``context.node_config["partition-id"]`` (set by the simulation
engine, or by ``--node-config`` on a SuperNode).

The server evaluates the global model centrally after every round (accuracy on the test
set and, under a backdoor attack, the attack success rate on triggered non-target test
inputs) and writes ``rounds.json`` into the run's ``out`` directory after each round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from modelshield.core.io import atomic_write_json
from modelshield.core.seeding import make_generator
from modelshield.federated import attacks
from modelshield.federated.strategies import UpdateStrategy, make_strategy
from modelshield.federated.task import (
    FLConfig,
    accuracy,
    build_model,
    client_data,
    flatten,
    float_keys,
    local_train,
    malicious_ids,
    train_test,
    unflatten,
)
from modelshield.poisoning.attacks import badnets
from modelshield.poisoning.triggers import Trigger, apply_trigger

logger = logging.getLogger(__name__)

BACKDOOR_TRIGGER = Trigger(kind="patch")
"""The trigger backdoor clients stamp and the server measures the ASR with."""
LIE_SHARDS = 5
"""Honest updates a little-is-enough client computes (on disjoint shards of its data)."""


def _config(fixed: FLConfig | None, context: Context) -> FLConfig:
    return fixed if fixed is not None else FLConfig.from_run_config(dict(context.run_config))


# -- client ---------------------------------------------------------------------------------
def client_update(
    cfg: FLConfig, pid: int, state: dict[str, Tensor], server_round: int
) -> tuple[dict[str, Tensor], int, dict[str, Any]]:
    """One client's round: the state it sends back, its example count, its metrics."""
    data = client_data(cfg, pid)
    x, y = data.x, data.y
    bad = pid in malicious_ids(cfg)
    seed = cfg.seed * 100_003 + server_round * 1009 + pid
    if bad and cfg.attack == "label-flip":
        y = attacks.flip_labels(y, data.num_classes)
    if bad and cfg.attack == "backdoor":
        # poison up to poison_fraction of the local data, from the samples not already of
        # the target class (a non-IID client may have few of those)
        others = int((data.y != cfg.target_class).sum())
        rate = min(cfg.poison_fraction, others / len(data))
        if round(rate * len(data)) >= 1:
            poisoned = badnets(
                data,
                rate=rate,
                target_class=cfg.target_class,
                trigger=BACKDOOR_TRIGGER,
                bounds=cfg.bounds,
                seed=seed,
            )
            x, y = poisoned.dataset.x, poisoned.dataset.y
    keys = float_keys(state)
    base = flatten(state, keys)
    model = build_model(cfg, data.input_shape, data.num_classes)
    model.load_state_dict(state)

    def honest(xs: Tensor, ys: Tensor, s: int) -> Tensor:
        model.load_state_dict(state)
        local_train(model, xs, ys, cfg, s)
        return flatten(model.state_dict(), keys) - base

    if bad and cfg.attack == "little-is-enough":
        shards = torch.tensor_split(
            torch.randperm(len(x), generator=make_generator(seed)), LIE_SHARDS
        )
        est = torch.stack([honest(x[s], y[s], seed + i) for i, s in enumerate(shards) if len(s)])
        per_round = max(1, int(cfg.fraction * cfg.num_clients))
        update = attacks.little_is_enough(est, per_round, max(1, cfg.n_malicious))
    else:
        update = honest(x, y, seed)
    if bad and cfg.attack == "sign-flip":
        update = attacks.sign_flip(update, cfg.sign_scale)
    elif bad and cfg.attack == "gaussian":
        update = attacks.gaussian_update(update, cfg.gaussian_sigma, make_generator(seed))
    elif bad and cfg.attack == "backdoor":
        per_round = max(1, int(cfg.fraction * cfg.num_clients))
        gamma = cfg.boost or per_round / max(1, cfg.n_malicious)
        update = attacks.boost(update, gamma)
    metrics = {
        "num-examples": float(len(x)),
        "malicious": float(bad),
        "update-norm": float(update.norm()),
    }
    if cfg.dp == "local":
        # the Gaussian mechanism on the client's own update (local DP)
        norm = float(update.norm())
        update = update * min(1.0, cfg.clip / max(norm, 1e-12))
        noise = torch.randn(update.shape, generator=make_generator(seed + 1), dtype=update.dtype)
        update = update + cfg.noise_multiplier * cfg.clip * noise
    return unflatten(base + update, state, keys), len(x), metrics


def make_client_app(fixed: FLConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        cfg = _config(fixed, context)
        pid = int(context.node_config["partition-id"])
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        server_round = int(msg.content.config_records["config"].get("server-round", 0))  # type: ignore[arg-type]
        new_state, _, metrics = client_update(cfg, pid, state, server_round)
        content = RecordDict(
            {"arrays": ArrayRecord(torch_state_dict=new_state), "metrics": MetricRecord(metrics)}
        )
        return Message(content=content, reply_to=msg)

    return app


# -- server ---------------------------------------------------------------------------------
def make_evaluator(cfg: FLConfig) -> Any:
    """``evaluate_fn(round, arrays)``: accuracy on the test set, and the attack success rate
    of the backdoor trigger (triggered non-target test inputs classified as the target;
    without a backdoor attack it is the baseline a clean model gives)."""
    train, test = train_test(cfg)
    x_eval, y_eval = test.x, test.y
    if cfg.aggregator == "fltrust":
        x_eval, y_eval = test.x[cfg.root_size :], test.y[cfg.root_size :]
    model = build_model(cfg, train.input_shape, train.num_classes)
    keep = y_eval != cfg.target_class
    x_trig = apply_trigger(x_eval[keep], BACKDOOR_TRIGGER, cfg.bounds)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        out: dict[str, Any] = {"accuracy": accuracy(model, x_eval, y_eval)}
        with torch.no_grad():
            pred = torch.cat(
                [model(x_trig[i : i + 512]).argmax(1) for i in range(0, len(x_trig), 512)]
            )
        out["asr"] = float((pred == cfg.target_class).float().mean())
        return MetricRecord(out)

    return evaluate


def make_server_update(cfg: FLConfig) -> Any:
    """FLTrust's reference: one client round on the server's root set (the first
    ``root_size`` test samples, kept out of the evaluation)."""
    train, test = train_test(cfg)
    root = test.subset(torch.arange(min(cfg.root_size, len(test))))

    def server_update(state: dict[str, Tensor]) -> dict[str, Tensor]:
        model = build_model(cfg, train.input_shape, train.num_classes)
        model.load_state_dict(state)
        local_train(model, root.x, root.y, cfg, cfg.seed)
        return model.state_dict()

    return server_update


def local_epsilon(cfg: FLConfig, rounds: int, accountant: str = "prv") -> float:
    """Local DP: each client's releases are Gaussian mechanisms of sensitivity ``C`` and
    noise ``σC``; a client sampled every round composes ``rounds`` of them (no sampling
    amplification is claimed: the client knows it was sampled)."""
    from modelshield.privacy.accounting import compute_epsilon

    return compute_epsilon(
        sample_rate=1.0, noise_multiplier=cfg.noise_multiplier, steps=rounds, delta=cfg.delta
    )


def run_server(grid: Grid, cfg: FLConfig) -> dict[str, Any]:
    """The server's whole run: strategy, rounds, central evaluation, ``rounds.json``."""
    train, _ = train_test(cfg)
    model = build_model(cfg, train.input_shape, train.num_classes)
    strategy = make_strategy(cfg, make_server_update(cfg) if cfg.aggregator == "fltrust" else None)
    evaluate = make_evaluator(cfg)
    out = Path(cfg.out) if cfg.out else None
    rounds: list[dict[str, Any]] = []
    started = time.time()

    def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate(server_round, arrays)
        row: dict[str, Any] = {
            "round": server_round,
            **dict(metrics),
            "seconds": time.time() - started,
        }
        if (
            isinstance(strategy, UpdateStrategy)
            and strategy.history
            and strategy.history[-1].get("round") == server_round
        ):
            row.update({k: v for k, v in strategy.history[-1].items() if k != "round"})
        rounds.append(row)
        logger.info("round %d: %s", server_round, {k: v for k, v in row.items() if k != "round"})
        if out is not None:
            atomic_write_json(
                out / "rounds.json", {"config": cfg.to_run_config(), "rounds": rounds}
            )
        return metrics

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(torch_state_dict=model.state_dict()),
        num_rounds=cfg.rounds,
        evaluate_fn=evaluate_and_record,
    )
    return {"rounds": rounds}


def make_server_app(fixed: FLConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        cfg = _config(fixed, context).validate()
        run_server(grid, cfg)

    return app


def make_apps(cfg: FLConfig | None = None) -> tuple[ServerApp, ClientApp]:
    return make_server_app(cfg), make_client_app(cfg)


server_app, client_app = make_apps()
"""For ``flwr run`` (deployment): configured by the run config."""
