"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020), switched on by ``--secagg``.

Flower runs SecAgg+ in its workflow API: the server's ``DefaultWorkflow`` with a
``SecAggPlusWorkflow`` fit stage around a (legacy) ``FedAvg``, and clients wrapped by
``secaggplus_mod``. Each client quantises ``[n, n·w]`` (its example count and weighted
parameters) and masks it with pairwise and self masks; the server only ever receives
masked vectors, unmasks their sum with Shamir shares, and hands the strategy the
aggregate: FedAvg up to quantisation error (``2·clipping_range / quantization_range`` per
coordinate and client). Robust aggregation and central DP need individual updates, so
they are refused with ``--secagg`` (see :meth:`FLConfig.validate`).

``secagg_debug_dir`` (tests only): clients write the parameters they mask and the server
writes everything it receives and each round's aggregate there, so a test can check that
the server never saw a client's parameters in the clear.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from modelshield.core.io import atomic_write_json
from modelshield.federated.task import FLConfig, build_model, client_data, train_test

logger = logging.getLogger(__name__)

CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 1 << 22
MAX_NEIGHBOURS = 20


def _to_state(arrays: list[np.ndarray], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: torch.from_numpy(np.asarray(a)).to(v.dtype).view_as(v)
        for (k, v), a in zip(like.items(), arrays, strict=True)
    }


def _to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in state.values()]


class _Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, cfg: FLConfig, pid: int, debug: str) -> None:
        self.cfg, self.pid, self.debug = cfg, pid, debug

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        from modelshield.federated.apps import client_update

        train, _ = train_test(self.cfg)
        like = build_model(self.cfg, train.input_shape, train.num_classes).state_dict()
        server_round = int(config.get("server-round", 0))
        new, n, metrics = client_update(
            self.cfg, self.pid, _to_state(parameters, like), server_round
        )
        arrays = _to_arrays(new)
        if self.debug:
            path = Path(self.debug) / f"client-{self.pid}-round-{server_round}.pkl"
            path.write_bytes(pickle.dumps({"arrays": arrays, "n": n}))
        return arrays, n, {k: float(v) for k, v in metrics.items()}


def make_secagg_apps(
    cfg: FLConfig | None = None, debug_dir: str = ""
) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp running ``cfg`` with SecAgg+ (``None``: the run config)."""

    def conf(context: Context) -> FLConfig:
        return cfg if cfg is not None else FLConfig.from_run_config(dict(context.run_config))

    def client_fn(context: Context) -> Any:
        return _Client(
            conf(context), int(context.node_config["partition-id"]), debug_dir
        ).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    server = ServerApp()

    @server.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        run_secagg_server(grid, context, conf(context).validate(), debug_dir)

    return server, client


def _decode(blob: bytes) -> np.ndarray:
    try:
        return np.asarray(bytes_to_ndarray(blob))
    except Exception:  # keys and ciphertexts are not arrays
        return np.frombuffer(blob, dtype=np.uint8)


class _RecordingGrid:
    """The server's grid, keeping a copy of every message content it receives (tests)."""

    def __init__(self, grid: Grid, sink: list[Any]) -> None:
        self._grid, self._sink = grid, sink

    def send_and_receive(self, *args: Any, **kw: Any) -> Any:
        replies = list(self._grid.send_and_receive(*args, **kw))
        for msg in replies:
            if msg.has_content():
                self._sink.append(msg.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def run_secagg_server(grid: Grid, context: Context, cfg: FLConfig, debug_dir: str = "") -> None:
    from modelshield.federated.apps import make_evaluator

    train, _ = train_test(cfg)
    model = build_model(cfg, train.input_shape, train.num_classes)
    like = model.state_dict()
    evaluate = make_evaluator(cfg)
    rounds: list[dict[str, Any]] = []
    out = Path(cfg.out) if cfg.out else None
    previous: list[list[np.ndarray]] = [_to_arrays(like)]

    def evaluate_fn(
        server_round: int, arrays: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        from flwr.app import ArrayRecord

        state = _to_state(arrays, like)
        metrics = dict(evaluate(server_round, ArrayRecord(torch_state_dict=state)))
        moved = server_round == 0 or any(
            not np.array_equal(a, b) for a, b in zip(arrays, previous[0], strict=True)
        )
        previous[0] = [np.array(a, copy=True) for a in arrays]
        rounds.append({"round": server_round, **metrics, "secagg": 1.0, "aggregated": float(moved)})
        if debug_dir:
            Path(debug_dir, f"global-round-{server_round}.pkl").write_bytes(pickle.dumps(arrays))
        if out is not None:
            atomic_write_json(
                out / "rounds.json", {"config": cfg.to_run_config(), "rounds": rounds}
            )
        return 0.0, metrics

    per_round = max(2, int(cfg.fraction * cfg.num_clients))
    largest = max(len(client_data(cfg, i)) for i in range(cfg.num_clients))
    strategy = LegacyFedAvg(
        fraction_fit=cfg.fraction,
        fraction_evaluate=0.0,
        min_fit_clients=per_round,
        min_evaluate_clients=0,
        min_available_clients=cfg.num_clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server-round": r},
        initial_parameters=ndarrays_to_parameters(_to_arrays(like)),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            # every sampled client a neighbour up to 20 of them, else about 20 neighbours
            # (Flower rounds a fraction to an odd share count); two thirds reconstruct
            num_shares=1.0 if per_round <= MAX_NEIGHBOURS else MAX_NEIGHBOURS / per_round,
            reconstruction_threshold=2 / 3,
            max_weight=float(largest + 1),
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
        )
    )
    seen: list[Any] = []
    workflow(_RecordingGrid(grid, seen) if debug_dir else grid, legacy)  # type: ignore[arg-type]
    if debug_dir:
        received = []
        for content in seen:
            for rec in content.array_records.values():
                received.append([np.asarray(a.numpy()) for a in rec.values()])
            for rec in content.config_records.values():
                for value in rec.values():
                    if isinstance(value, list) and value and isinstance(value[0], bytes):
                        received.append([_decode(b) for b in value])
        Path(debug_dir, "server-received.pkl").write_bytes(pickle.dumps(received))


secagg_server_app, secagg_client_app = make_secagg_apps()
"""For ``flwr run`` (deployment) with ``--secagg``: configured by the run config."""
