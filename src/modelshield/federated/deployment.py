"""``modelshield fl run``: a federated run on a real SuperLink and SuperNodes (gRPC on
127.0.0.1), started, submitted to with ``flwr run`` and stopped by
:func:`modelshield.federated.deploy.run_deployment`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from modelshield.federated.deploy import run_deployment, write_app_dir
from modelshield.federated.simulate import fresh_rounds_file, read_rounds
from modelshield.federated.task import FLConfig

logger = logging.getLogger(__name__)

APPS = {
    False: ("modelshield.federated.apps:server_app", "modelshield.federated.apps:client_app"),
    True: (
        "modelshield.federated.secagg:secagg_server_app",
        "modelshield.federated.secagg:secagg_client_app",
    ),
}
ROUND_SECONDS = 120.0
"""Time allowed per round on top of the start-up (a SuperNode polls every 3 s)."""


def deploy(cfg: FLConfig, *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.num_clients`` SuperNode processes; returns the server's rounds."""
    cfg.validate()
    rounds_file = fresh_rounds_file(cfg)
    out = rounds_file.parent
    run_config = {**cfg.to_run_config(), "out": str(out)}
    if cfg.data != "digits" and not cfg.data.startswith("bundled:"):
        run_config["data"] = str(Path(cfg.data).resolve())
    if cfg.test_data:
        run_config["test-data"] = str(Path(cfg.test_data).resolve())
    server_app, client_app = APPS[cfg.secagg]
    app_dir = write_app_dir(
        out / "app",
        server_app=server_app,
        client_app=client_app,
        run_config_defaults=run_config,
    )
    result = run_deployment(
        app_dir,
        num_supernodes=cfg.num_clients,
        run_config=run_config,
        timeout=timeout or 60.0 + ROUND_SECONDS * cfg.rounds,
        log_dir=out / "logs",
    )
    logger.info("deployment run %s: %s in %.0f s", result.run_id, result.status, result.duration_s)
    doc = read_rounds(rounds_file, cfg, "the deployment", f"see {result.log_dir}")
    doc["deployment"] = {
        "run_id": result.run_id,
        "status": result.status,
        "seconds": result.duration_s,
        "superlink_port": result.superlink_port,
        "supernode_ports": list(result.supernode_ports),
        "logs": str(result.log_dir),
    }
    return doc  # type: ignore[no-any-return]
