"""Running a federation on Flower's simulation engine (Ray), all on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from modelshield.core.errors import FederatedError, InvalidConfigError
from modelshield.federated.task import FLConfig

logger = logging.getLogger(__name__)


def backend_config(num_cpus: int | None = None) -> dict[str, Any]:
    """Ray on loopback without a dashboard; one CPU per client actor."""
    cpus = num_cpus or max(1, os.cpu_count() or 1)
    return {
        "init_args": {
            "include_dashboard": False,
            "num_cpus": cpus,
            "_node_ip_address": "127.0.0.1",
            "log_to_driver": False,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }


def quiet_flower() -> None:
    """Flower logs every message at INFO; keep its errors only, unless we log at DEBUG."""
    if not logging.getLogger("modelshield").isEnabledFor(logging.DEBUG):
        logging.getLogger("flwr").setLevel(logging.ERROR)


def simulate(cfg: FLConfig, *, num_cpus: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; returns the server's rounds.

    The server app writes ``rounds.json`` into ``cfg.out`` after every round; the result
    read back from it is returned.
    """
    cfg.validate()
    from flwr.simulation import run_simulation

    from modelshield.exec.ray_executor import warn_if_not_loopback_only
    from modelshield.federated.apps import make_apps

    rounds_file = fresh_rounds_file(cfg)
    if cfg.secagg:
        from modelshield.federated.secagg import make_secagg_apps

        server, client = make_secagg_apps(cfg, os.environ.get("MODELSHIELD_SECAGG_DEBUG", ""))
    else:
        server, client = make_apps(cfg)
    quiet_flower()
    warn_if_not_loopback_only()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=cfg.num_clients,
        backend_config=backend_config(num_cpus),  # type: ignore[arg-type]
    )
    return read_rounds(rounds_file, cfg, "the simulation", "see the log above")


def fresh_rounds_file(cfg: FLConfig) -> Path:
    """``OUT/rounds.json``, where the server app writes each round; none from an earlier run."""
    if not cfg.out:
        raise InvalidConfigError(
            "the run needs an out directory (where the server writes rounds.json)"
        )
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rounds_file = out / "rounds.json"
    if rounds_file.exists():
        rounds_file.unlink()
    return rounds_file


def read_rounds(rounds_file: Path, cfg: FLConfig, what: str, where: str) -> dict[str, Any]:
    """The server's rounds after a run, or a one-line error if the run did not complete."""
    if not rounds_file.exists():
        raise FederatedError(f"{what} ended without a result ({where})")
    doc = json.loads(rounds_file.read_text())
    if len(doc["rounds"]) != cfg.rounds + 1:  # round 0 is the initial model
        raise FederatedError(
            f"{what} stopped after {len(doc['rounds']) - 1} of {cfg.rounds} rounds ({where})"
        )
    failed = [r["round"] for r in doc["rounds"] if r.get("aggregated") == 0.0]
    if failed:
        raise FederatedError(
            f"secure aggregation produced no aggregate in round(s) {failed} ({where})"
        )
    return doc  # type: ignore[no-any-return]
