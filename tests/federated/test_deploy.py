"""Deployment mode: a real SuperLink and SuperNodes over HTTP on 127.0.0.1.

Run inside a loopback-only namespace: ``scripts/loopback.sh .venv/bin/python -m pytest
tests/federated/test_deploy.py`` (``make pytest`` runs the whole suite that way).
"""

from __future__ import annotations

import _thread
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelshield.core.errors import FederatedError, InvalidConfigError
from modelshield.federated.deploy import (
    COMPONENTS_MODULE,
    find_tagged_processes,
    run_deployment,
    write_app_dir,
)
from tests.federated import deploy_app

pytest.importorskip("flwr")

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
DEFAULTS = {"num-rounds": 2, "num-nodes": 2, "out": "", "fail": False, "sleep": 0.0}


def _app(tmp_path: Path) -> Path:
    return write_app_dir(
        tmp_path / "app",
        server_app="tests.federated.deploy_app:server_app",
        client_app="tests.federated.deploy_app:client_app",
        run_config_defaults=DEFAULTS,
    )


def _flower_processes(marker: str) -> list[str]:
    """Live processes whose command line or environment mentions ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = Path("/proc", entry)
        try:
            stat = (base / "stat").read_bytes()
            cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (base / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(b")", 1)[-1].split()[0] == b"Z":
            continue
        if marker in cmdline or marker in environ:
            found.append(f"{entry}: {cmdline}")
    return found


def test_two_supernodes_run_fedavg_over_loopback(tmp_path: Path) -> None:
    out = tmp_path / "final.json"
    result = run_deployment(
        _app(tmp_path),
        num_supernodes=2,
        run_config={"out": str(out), "num-nodes": 2},
        timeout=240,
        log_dir=tmp_path / "logs",
        env=ENV,
    )
    assert result.ok and result.status == "finished:completed"
    assert result.run_id > 0 and result.returncode == 0
    assert all(p.is_file() for p in result.logs.values())
    assert "SuperNode ID" in result.logs["supernode-1"].read_text()
    final = np.array(json.loads(out.read_text())["arrays"][0])
    np.testing.assert_allclose(final, deploy_app.expected_arrays(num_nodes=2, num_rounds=2))
    np.testing.assert_allclose(final, [10 / 3, 13 / 3])
    # nothing is left: not the SuperLink, the SuperNodes nor what Flower spawned
    assert _flower_processes(str(tmp_path)) == []
    for port in (result.superlink_port, *result.supernode_ports):
        assert _flower_processes(f"127.0.0.1:{port}") == []
    assert not any((tmp_path / "logs").glob("flwr-home-*"))


def test_failing_serverapp_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FederatedError, match=r"status finished:failed.*asked to fail"):
        run_deployment(
            _app(tmp_path),
            num_supernodes=1,
            run_config={"fail": True, "num-nodes": 1},
            timeout=120,
            log_dir=tmp_path / "logs",
            env=ENV,
        )
    assert "asked to fail" in (tmp_path / "logs" / "flwr-run.log").read_text()
    assert _flower_processes(str(tmp_path)) == []


def test_keyboard_interrupt_stops_everything(tmp_path: Path) -> None:
    logs = tmp_path / "logs"

    def interrupt_once_submitted() -> None:
        deadline = time.monotonic() + 60
        while not (logs / "flwr-run.log").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_submitted, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_deployment(
            _app(tmp_path),
            num_supernodes=1,
            run_config={"sleep": 300.0, "num-nodes": 1},
            timeout=120,
            log_dir=logs,
            env=ENV,
        )
    assert _flower_processes(str(tmp_path)) == []


def test_timeout_stops_a_running_serverapp(tmp_path: Path) -> None:
    # the timeout normally hits while the ServerApp sleeps; on a very busy machine it may
    # hit during start-up instead, which ends the same way
    with pytest.raises(FederatedError, match=r"within the 10 s timeout"):
        run_deployment(
            _app(tmp_path),
            num_supernodes=1,
            run_config={"sleep": 300.0, "num-nodes": 1},
            timeout=10,
            log_dir=tmp_path / "logs",
            env=ENV,
            grace=5,
        )
    assert _flower_processes(str(tmp_path)) == []


def test_superlink_that_dies_gives_a_clear_error(tmp_path: Path) -> None:
    # a PYTHONPATH entry that shadows flwr makes every Flower process die at import
    shadow = tmp_path / "shadow" / "flwr"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('shadowed for the test')\n")
    with pytest.raises(
        FederatedError, match=r"flower-superlink exited with code 1 before listening"
    ):
        run_deployment(
            _app(tmp_path),
            num_supernodes=1,
            timeout=60,
            log_dir=tmp_path / "logs",
            env={"PYTHONPATH": str(shadow.parent)},
        )
    assert _flower_processes(str(tmp_path)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_supernodes": 0}, "num_supernodes must be at least 1, got 0"),
        ({"num_supernodes": True}, "num_supernodes must be an int"),
        ({"num_supernodes": 2, "node_configs": [{"a": 1}]}, "one entry per SuperNode"),
        ({"num_supernodes": 1, "node_configs": ["a=1"]}, r"node_configs\[0\] must be a mapping"),
        ({"num_supernodes": 1, "timeout": 0}, "timeout must be a positive"),
        ({"num_supernodes": 1, "run_config": {"nope": 1}}, r"keys \['nope'\] are not in"),
        ({"num_supernodes": 1, "run_config": {"out": [1]}}, "must be str, int, float or bool"),
        (
            {"num_supernodes": 1, "node_configs": [{"name": 'a"b'}]},
            "must not contain quotes",
        ),
    ],
)
def test_bad_settings_are_rejected_before_starting(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        run_deployment(_app(tmp_path), log_dir=tmp_path / "logs", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "logs").exists()


def test_app_dir_must_exist(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="Flower app directory"):
        run_deployment(tmp_path / "missing", num_supernodes=1)


def test_write_app_dir_re_exports_the_apps(tmp_path: Path) -> None:
    app = _app(tmp_path)
    text = (app / "pyproject.toml").read_text()
    assert f'serverapp = "{COMPONENTS_MODULE}:server_app"' in text
    assert '"num-rounds" = 2' in text and '"fail" = false' in text
    spec = importlib.util.spec_from_file_location("shim", app / f"{COMPONENTS_MODULE}.py")
    assert spec is not None and spec.loader is not None
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    assert shim.server_app is deploy_app.server_app
    assert shim.client_app is deploy_app.client_app
    write_app_dir(app, server_app="a.b:c", client_app="a.b:d")  # ours: may be rewritten


def test_write_app_dir_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match=r"server_app must be 'package\.module:attribute'"):
        write_app_dir(tmp_path / "a", server_app="no_colon", client_app="m:c")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pyproject.toml").write_text("[project]\nname = 'mine'\n")
    with pytest.raises(InvalidConfigError, match="was not written by write_app_dir"):
        write_app_dir(tmp_path / "b", server_app="m:s", client_app="m:c")


def test_find_tagged_processes_sees_none_for_an_unknown_token() -> None:
    assert find_tagged_processes("no-such-deployment") == []
