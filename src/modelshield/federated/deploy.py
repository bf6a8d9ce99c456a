"""Deployment mode: run a Flower app on a real SuperLink and SuperNodes on 127.0.0.1.

:func:`run_deployment` starts ``flower-superlink`` and one ``flower-supernode`` per
client as separate processes that talk to each other over 127.0.0.1 only, submits the
app with ``flwr run`` and waits for the run to finish. Every process is stopped
afterwards (SIGTERM to its process group, SIGKILL after a grace period), also when
anything fails, on KeyboardInterrupt and at interpreter exit, including the
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` processes Flower spawns.

How Flower 1.42 is driven (read off its installed source):

* The SuperLink serves its Fleet, Control and Runtime APIs over HTTP on one
  ``--host``/``--port``; a SuperNode connects with ``--superlink HOST:PORT`` and serves
  its own Runtime API on its own ``--host``/``--port``. Both use ``--insecure`` and the
  default ``--isolation subprocess`` (each starts a ``flower-superexec`` that launches
  ``flwr-serverapp``/``flwr-clientapp``), and runtime dependency installation
  (``uv sync``, which needs the network) is switched off.
* ``flwr run APP CONNECTION`` finds the SuperLink through a named *SuperLink connection*
  in ``$FLWR_HOME/config.toml`` (``[superlink.NAME] address = ..., insecure = true``),
  not through ``[tool.flwr.federations]`` in the app's ``pyproject.toml`` (Flower
  migrates that legacy table out of the file and comments it out). Every process gets a
  private ``FLWR_HOME`` under the log directory, so nothing is written to ``~/.flwr``.
* Flower imports ``[tool.flwr.app.components]`` from the installed app bundle's
  directory, and ``flwr run`` checks statically that the attribute is *assigned* in that
  module; :func:`write_app_dir` therefore writes a small module that re-exports apps
  living in installed packages (``modelshield.federated.apps:server_app``).

Run anything that calls :func:`run_deployment` inside a loopback-only network namespace
(``scripts/loopback.sh``); all addresses given to Flower are 127.0.0.1 regardless.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import json
import keyword
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelshield.core.errors import FederatedError, InvalidConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: flwr depends on tomli
    import tomli as tomllib

logger = logging.getLogger(__name__)

ConfigValue = str | int | float | bool
"""A value Flower accepts in a run config or a node config."""

HOST = "127.0.0.1"
"""The only address any Flower process binds to or connects to."""

CONNECTION = "modelshield"
"""Name of the SuperLink connection written to the private ``FLWR_HOME``."""

COMPONENTS_MODULE = "modelshield_flwr_components"
"""Module :func:`write_app_dir` writes into the app directory to re-export the apps."""

MARKER_ENV = "MODELSHIELD_FLWR_DEPLOYMENT"
"""Environment variable that tags every process of one deployment (children inherit it)."""

COMPLETED = "finished:completed"
"""Status of a Flower run that ended without error."""

_HEADER = "# Written by modelshield.federated.deploy.write_app_dir."
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
_CONFIG_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_POLL_S = 0.2


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DeploymentResult:
    """What a finished deployment left behind.

    ``status`` is Flower's final run status (``"finished:completed"`` on success);
    ``returncode`` is the exit code of ``flwr run``; ``logs`` maps ``"superlink"``,
    ``"supernode-0"``, ..., ``"flwr-run"`` to their log files in ``log_dir``.
    """

    run_id: int
    status: str
    status_details: str
    returncode: int
    log_dir: Path
    logs: Mapping[str, Path]
    superlink_port: int
    supernode_ports: tuple[int, ...]
    duration_s: float

    @property
    def ok(self) -> bool:
        """Whether the run finished without error."""
        return self.status == COMPLETED

    @property
    def run_log(self) -> Path:
        """The ``flwr run --stream`` output: the ServerApp's log."""
        return self.logs["flwr-run"]


# --------------------------------------------------------------------------- app dir


def write_app_dir(
    app_dir: Path | str,
    *,
    server_app: str,
    client_app: str,
    run_config_defaults: Mapping[str, ConfigValue] | None = None,
    name: str = "modelshield-app",
    version: str = "1.0.0",
    publisher: str = "modelshield",
) -> Path:
    """Write a minimal Flower app project whose ServerApp and ClientApp live elsewhere.

    ``server_app``/``client_app`` are ``"package.module:attribute"`` references to
    objects importable by Flower's processes (installed packages, or modules on the
    ``PYTHONPATH`` given to :func:`run_deployment`). The directory gets a
    ``pyproject.toml`` with ``[tool.flwr.app.components]`` pointing at a re-export
    module and ``[tool.flwr.app.config]`` holding ``run_config_defaults``: only keys
    listed there can be set per run. A ``pyproject.toml`` not written by this function
    is never overwritten. Returns the directory.
    """
    app_dir = Path(app_dir)
    for label, ref in (("server_app", server_app), ("client_app", client_app)):
        _check_ref(label, ref)
    if not _NAME.match(name) or len(name) > 41:
        raise InvalidConfigError(
            f"name must start with a letter and contain only letters, digits and "
            f"hyphens (at most 41 characters), got {name!r}"
        )
    if not _NAME.match(publisher):
        raise InvalidConfigError(
            f"publisher must start with a letter and contain only letters, digits and "
            f"hyphens, got {publisher!r}"
        )
    config = _toml_lines(run_config_defaults or {}, "run_config_defaults")

    pyproject = app_dir / "pyproject.toml"
    if pyproject.exists() and not pyproject.read_text(encoding="utf-8").startswith(_HEADER):
        raise InvalidConfigError(
            f"{pyproject} exists and was not written by write_app_dir; pick an empty directory"
        )
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject.write_text(
        "\n".join(
            [
                _HEADER,
                "",
                "[build-system]",
                'requires = ["hatchling"]',
                'build-backend = "hatchling.build"',
                "",
                "[project]",
                f'name = "{name}"',
                f"version = {json.dumps(version)}",
                'description = "A Flower app run by modelshield"',
                'license = "Apache-2.0"',
                "dependencies = []",
                "",
                "[tool.flwr.app]",
                f'publisher = "{publisher}"',
                "",
                "[tool.flwr.app.components]",
                f'serverapp = "{COMPONENTS_MODULE}:server_app"',
                f'clientapp = "{COMPONENTS_MODULE}:client_app"',
                "",
                "[tool.flwr.app.config]",
                *config,
                "",
            ]
        ),
        encoding="utf-8",
    )
    (app_dir / f"{COMPONENTS_MODULE}.py").write_text(
        '"""Re-exports the apps for Flower (written by modelshield; do not edit)."""\n\n'
        "import importlib\n\n"
        f"server_app = {_import_expr(server_app)}\n"
        f"client_app = {_import_expr(client_app)}\n",
        encoding="utf-8",
    )
    logger.debug("wrote Flower app %s (%s, %s)", app_dir, server_app, client_app)
    return app_dir


def _check_ref(label: str, ref: str) -> None:
    module, sep, attr = ref.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise InvalidConfigError(f"{label} must be 'package.module:attribute', got {ref!r}")


def _import_expr(ref: str) -> str:
    module, _, attr = ref.partition(":")
    return f"importlib.import_module({module!r}).{attr}"


# --------------------------------------------------------------------------- TOML values


def _toml_value(value: object, where: str) -> str:
    """Render one run/node config value as TOML (``bool`` before ``int``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise InvalidConfigError(f"{where} must be str, int, float or bool, got {type(value).__name__}")


def _check_key(key: object, what: str) -> str:
    if not isinstance(key, str) or not _CONFIG_KEY.match(key):
        raise InvalidConfigError(
            f"{what} keys must be letters, digits, '-', '_' and '.', got {key!r}"
        )
    return key


def _toml_lines(config: Mapping[str, object], what: str) -> list[str]:
    return [
        f"{json.dumps(_check_key(k, what))} = {_toml_value(v, f'{what}[{k!r}]')}"
        for k, v in config.items()
    ]


def _node_config_arg(config: Mapping[str, object], index: int) -> str:
    """Render a node config as ``flower-supernode --node-config`` wants it."""
    what = f"node_configs[{index}]"
    items = []
    for key, value in config.items():
        _check_key(key, what)
        text = _toml_value(value, f"{what}[{key!r}]")
        if isinstance(value, str) and ('"' in value or "\\" in value or "\n" in value):
            raise InvalidConfigError(
                f"{what}[{key!r}] must not contain quotes, backslashes or newlines, got {value!r}"
            )
        items.append(f"{key}={text}")
    return " ".join(items)


def _app_config_keys(app_dir: Path) -> set[str]:
    """The flattened keys of ``[tool.flwr.app.config]`` in the app's pyproject."""
    pyproject = app_dir / "pyproject.toml"
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidConfigError(f"cannot read {pyproject}: {e}") from None
    table = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})

    def flatten(d: Mapping[str, Any], prefix: str) -> Iterable[str]:
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flatten(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    return set(flatten(table, "")) if isinstance(table, dict) else set()


# --------------------------------------------------------------------------- processes


def _child_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` for every Flower process (Linux; plain libc calls only).

    It resets SIGINT and SIGTERM to their defaults (a shell's background job inherits
    SIGINT ignored, and Flower's processes stop on their parent's death by raising
    SIGINT in themselves), and asks the kernel to SIGTERM the child if this process dies
    without cleaning up (SIGKILL, say).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl, set_handler = libc.prctl, libc.signal
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    set_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
    set_handler.restype = ctypes.c_void_p
    pr_set_pdeathsig, sig_dfl = 1, None
    sigint, sigterm = int(signal.SIGINT), int(signal.SIGTERM)

    def preexec() -> None:
        set_handler(sigint, sig_dfl)
        set_handler(sigterm, sig_dfl)
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


_PREEXEC = _child_preexec()


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``"Z"`` for a zombie), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].split()[0].decode()


def find_tagged_processes(token: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose environment carries ``token``.

    Every process a deployment starts, and every process those start, inherits
    ``MODELSHIELD_FLWR_DEPLOYMENT=<token>``; this finds them even after they were
    re-parented or moved to a session of their own. Linux only (empty elsewhere).
    """
    needle = f"{MARKER_ENV}={token}".encode()
    me = os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and _proc_state(int(entry)) not in (None, "Z"):
            found.append(int(entry))
    return sorted(found)


_WATCHDOG = """
import os, signal, sys, time
needle = sys.argv[1].encode()  # MARKER_ENV=token, as in /proc/PID/environ
sys.stdin.buffer.read()  # EOF: the deploying process closed its end of the pipe, or died

def tagged():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] != b"Z":
                    found.append(int(entry))
        except OSError:
            pass
    return found

for sig in (signal.SIGTERM, signal.SIGKILL):
    pids = tagged()
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), sig)
        except OSError:
            pass
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = tagged()
    if not pids:
        break
"""
"""Run by a separate ``python -I -c``: when the deploying process goes away without
stopping its deployment (SIGKILL, say), it stops every process carrying the token."""


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class _Deployment:
    """The processes of one deployment and how to stop all of them."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.token = uuid.uuid4().hex
        self.env = {**env, MARKER_ENV: self.token}
        self.cwd = cwd
        self.procs: list[_Proc] = []
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pipe: int | None = None

    def start_watchdog(self) -> None:
        """Start the process that cleans up if this one dies without calling :meth:`stop`.

        It reads a pipe whose only writer is this process (the descriptor is not
        inheritable), so it wakes up when this process closes it or dies.
        """
        if not sys.platform.startswith("linux"):
            return
        read_end, self._watchdog_pipe = os.pipe()
        env = {k: v for k, v in self.env.items() if k != MARKER_ENV}
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-c", _WATCHDOG, f"{MARKER_ENV}={self.token}"],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            os.close(read_end)

    def start(self, name: str, cmd: Sequence[str], log: Path, home: Path) -> _Proc:
        """Start ``cmd`` in a session of its own, output to ``log``."""
        with self._lock:
            if self._closed:
                raise FederatedError(
                    f"the deployment was stopped (at interpreter exit?) before {name} started"
                )
            home.mkdir(parents=True, exist_ok=True)
            logger.debug("starting %s: %s", name, " ".join(cmd))
            with log.open("ab") as out:
                popen = subprocess.Popen(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**self.env, "FLWR_HOME": str(home)},
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_PREEXEC,
                )
            proc = _Proc(name, popen, log)
            self.procs.append(proc)
            return proc

    def _signal(self, pids: Iterable[int], sig: signal.Signals) -> None:
        own_group = os.getpgrp()
        groups: set[int] = set()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                if pgid != own_group and pgid not in groups:
                    groups.add(pgid)
                    os.killpg(pgid, sig)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _alive(self) -> list[int]:
        own = [p.popen.pid for p in self.procs if p.popen.poll() is None]
        return sorted(set(own) | set(find_tagged_processes(self.token)))

    def stop(self, grace: float) -> list[int]:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds.

        Returns the PIDs still alive afterwards (empty when all went away).
        """
        with self._lock:
            if self._closed:
                return []
            self._closed = True
        try:
            return self._terminate(grace)
        finally:
            self._stop_watchdog()

    def _terminate(self, grace: float) -> list[int]:
        alive = self._alive()
        if not alive:
            return []
        logger.debug("stopping %d Flower processes: %s", len(alive), alive)
        self._signal(alive, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = self._alive()
        if alive:
            logger.warning(
                "%d Flower processes ignored SIGTERM for %.0f s; killing %s",
                len(alive),
                grace,
                alive,
            )
            self._signal(alive, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                alive = self._alive()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1.0)
        return self._alive()

    def _stop_watchdog(self) -> None:
        """Let the watchdog go: it finds nothing left and exits."""
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)
            self._watchdog_pipe = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None


_ACTIVE: set[_Deployment] = set()
_ACTIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop deployments still running when the interpreter exits."""
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
        _ACTIVE.clear()
    for deployment in active:
        left = deployment.stop(grace=3.0)
        if left:
            logger.error("Flower processes %s survived SIGKILL at exit", left)


# --------------------------------------------------------------------------- helpers


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _last_line(path: Path, limit: int = 200) -> str:
    """The last non-empty line of a log, without colour codes, for one-line errors."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(_ANSI.sub("", text).split())


def _find_executables(path: str) -> dict[str, str]:
    found = {}
    for exe in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        where = shutil.which(exe, path=path)
        if where is None:
            raise FederatedError(
                f"{exe} not found next to {sys.executable} or on PATH; install Flower "
                "with: pip install 'modelshield[fl]'"
            )
        found[exe] = where
    return found


def _process_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of every Flower process: no telemetry, update checks or installs."""
    env = dict(os.environ)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    env.update(extra or {})
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    no_proxy = ",".join(p for p in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if p)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    return env


# --------------------------------------------------------------------------- deployment


def run_deployment(
    app_dir: Path | str,
    *,
    num_supernodes: int,
    run_config: Mapping[str, ConfigValue] | None = None,
    node_configs: Sequence[Mapping[str, ConfigValue]] | None = None,
    timeout: float = 600.0,
    log_dir: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    grace: float = 10.0,
) -> DeploymentResult:
    """Run the Flower app in ``app_dir`` on a local SuperLink and ``num_supernodes``.

    Node ``i`` gets ``node_configs[i]`` (default: ``partition-id=i`` and
    ``num-partitions=num_supernodes``); ``run_config`` overrides keys of the app's
    ``[tool.flwr.app.config]``. ``timeout`` bounds the whole deployment in seconds,
    start-up included. Logs go to ``log_dir`` (default: a new temporary directory that
    is kept). ``env`` adds environment variables for every Flower process (e.g.
    ``PYTHONPATH``). With ``check`` a run that does not finish as
    ``"finished:completed"`` raises :class:`FederatedError`; without it the result
    carries the status. Every process is stopped before this returns or raises.
    """
    app_dir = Path(app_dir).expanduser().resolve()
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise InvalidConfigError(
            f"num_supernodes must be an int, got {type(num_supernodes).__name__}"
        )
    if num_supernodes < 1:
        raise InvalidConfigError(f"num_supernodes must be at least 1, got {num_supernodes}")
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise InvalidConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(grace, (int, float)) and grace >= 0):
        raise InvalidConfigError(f"grace must be a non-negative number of seconds, got {grace!r}")
    if not (app_dir / "pyproject.toml").is_file():
        raise InvalidConfigError(
            f"app_dir must be a Flower app directory with a pyproject.toml, got {app_dir}"
        )
    if node_configs is None:
        node_configs = [
            {"partition-id": i, "num-partitions": num_supernodes} for i in range(num_supernodes)
        ]
    if len(node_configs) != num_supernodes:
        raise InvalidConfigError(
            f"node_configs must have one entry per SuperNode ({num_supernodes}), "
            f"got {len(node_configs)}"
        )
    for i, c in enumerate(node_configs):
        if not isinstance(c, Mapping):
            raise InvalidConfigError(
                f"node_configs[{i}] must be a mapping of key to value, got {type(c).__name__}"
            )
    node_args = [_node_config_arg(c, i) for i, c in enumerate(node_configs)]
    run_config = dict(run_config or {})
    overrides = _toml_lines(run_config, "run_config")
    unknown = sorted(set(run_config) - _app_config_keys(app_dir))
    if unknown:
        raise InvalidConfigError(
            f"run_config keys {unknown} are not in [tool.flwr.app.config] of "
            f"{app_dir / 'pyproject.toml'}; only keys with a default there can be set"
        )

    proc_env = _process_env(env)
    exes = _find_executables(proc_env["PATH"])
    log_path = (
        Path(tempfile.mkdtemp(prefix="modelshield-flwr-"))
        if log_dir is None
        else Path(log_dir).expanduser().resolve()
    )
    log_path.mkdir(parents=True, exist_ok=True)
    homes = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=log_path))
    deployment = _Deployment(proc_env, cwd=homes)
    with _ACTIVE_LOCK:
        _ACTIVE.add(deployment)
    started = time.monotonic()
    failed = True
    try:
        deployment.start_watchdog()
        result = _deploy(
            deployment,
            exes,
            app_dir,
            node_args,
            overrides,
            log_path,
            homes,
            deadline=started + timeout,
            timeout=timeout,
        )
        failed = False
    finally:
        left = deployment.stop(grace)
        with _ACTIVE_LOCK:
            _ACTIVE.discard(deployment)
        shutil.rmtree(homes, ignore_errors=True)
        if left and failed:  # the error on its way out says more; do not mask it
            logger.error("Flower processes %s survived SIGKILL", left)
    if left:
        raise FederatedError(f"Flower processes {left} survived SIGKILL; see {log_path}")
    result = dataclasses.replace(result, duration_s=time.monotonic() - started)
    logger.info(
        "Flower run %d on %d SuperNodes: %s in %.1f s (logs in %s)",
        result.run_id,
        num_supernodes,
        result.status,
        result.duration_s,
        log_path,
    )
    if check and not result.ok:
        details = f": {result.status_details}" if result.status_details else ""
        raise FederatedError(
            f"Flower run {result.run_id} ended with status {result.status}{details}; "
            f"see {result.run_log}"
        )
    return result


def _deploy(
    deployment: _Deployment,
    exes: Mapping[str, str],
    app_dir: Path,
    node_args: Sequence[str],
    overrides: Sequence[str],
    log_dir: Path,
    homes: Path,
    *,
    deadline: float,
    timeout: float,
) -> DeploymentResult:
    """Start the SuperLink, the SuperNodes and the run; wait for its end (not stopping)."""
    link_port, *node_ports = _free_ports(1 + len(node_args))
    link_address = f"{HOST}:{link_port}"
    logs = {"superlink": log_dir / "superlink.log"}
    logs.update({f"supernode-{i}": log_dir / f"supernode-{i}.log" for i in range(len(node_args))})
    logs["flwr-run"] = log_dir / "flwr-run.log"
    for log in logs.values():
        log.unlink(missing_ok=True)

    cli_home = homes / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{link_address}"\ninsecure = true\n',
        encoding="utf-8",
    )
    overrides_file = log_dir / "run-config.toml"
    overrides_file.write_text("".join(f"{line}\n" for line in overrides), encoding="utf-8")

    def remaining() -> float:
        return deadline - time.monotonic()

    superlink = deployment.start(
        "flower-superlink",
        [
            exes["flower-superlink"],
            "--insecure",
            "--host",
            HOST,
            "--port",
            str(link_port),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ],
        logs["superlink"],
        homes / "superlink",
    )
    _wait_listening(superlink, link_port, deadline, timeout)
    logger.info("flower-superlink listening on %s", link_address)

    nodes = [
        deployment.start(
            f"flower-supernode {i}",
            [
                exes["flower-supernode"],
                "--insecure",
                "--superlink",
                link_address,
                "--host",
                HOST,
                "--port",
                str(port),
                "--isolation",
                "subprocess",
                "--node-config",
                node_arg,
            ],
            logs[f"supernode-{i}"],
            homes / f"supernode-{i}",
        )
        for i, (port, node_arg) in enumerate(zip(node_ports, node_args, strict=True))
    ]
    servers = [superlink, *nodes]
    for node, port in zip(nodes, node_ports, strict=True):
        _wait_listening(node, port, deadline, timeout, servers)
    _wait_nodes_online(deployment, exes["flwr"], len(nodes), servers, log_dir, deadline, timeout)
    logger.info("%d SuperNodes online; submitting %s", len(nodes), app_dir)

    run = deployment.start(
        "flwr run",
        [
            exes["flwr"],
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(overrides_file),
            "--stream",
        ],
        logs["flwr-run"],
        cli_home,
    )
    while run.popen.poll() is None:
        _check_alive(servers, "during the run")
        if remaining() <= 0:
            match = _STARTED_RUN.search(logs["flwr-run"].read_text(errors="replace"))
            which = f"Flower run {match.group(1)}" if match else "flwr run"
            raise FederatedError(
                f"{which} did not finish within the {timeout:g} s timeout; see {logs['flwr-run']}"
            )
        time.sleep(_POLL_S)
    returncode = run.popen.returncode

    while True:
        runs = _flwr_json(deployment, exes["flwr"], ["ls"], "runs", log_dir, deadline, timeout)
        if not runs:
            raise FederatedError(
                f"flwr run exited with code {returncode} without starting a run: "
                f"{_last_line(logs['flwr-run'])}; see {logs['flwr-run']}"
            )
        info = runs[0]
        status = str(info.get("status", ""))
        if status.startswith("finished"):
            break
        if remaining() <= 0:
            raise FederatedError(
                f"Flower run {info.get('run-id')} did not finish within the {timeout:g} s "
                f"timeout (status {status}); see {logs['flwr-run']}"
            )
        time.sleep(1.0)
    details = _one_line(str(info.get("status-details", "")))
    return DeploymentResult(
        run_id=int(info["run-id"]),
        status=status,
        status_details="" if details == "N/A" else details,
        returncode=returncode,
        log_dir=log_dir,
        logs=logs,
        superlink_port=link_port,
        supernode_ports=tuple(node_ports),
        duration_s=0.0,
    )


def _check_alive(servers: Sequence[_Proc], when: str) -> None:
    for proc in servers:
        code = proc.popen.poll()
        if code is not None:
            raise FederatedError(f"{proc.name} exited with code {code} {when}; see {proc.log}")


def _wait_listening(
    proc: _Proc,
    port: int,
    deadline: float,
    timeout: float,
    servers: Sequence[_Proc] = (),
) -> None:
    """Wait until ``proc`` accepts connections on ``port``."""
    while not _listening(port):
        code = proc.popen.poll()
        if code is not None:
            raise FederatedError(
                f"{proc.name} exited with code {code} before listening on {HOST}:{port}; "
                f"see {proc.log}"
            )
        _check_alive(servers, "while the SuperNodes started")
        if time.monotonic() >= deadline:
            raise FederatedError(
                f"{proc.name} did not listen on {HOST}:{port} within the {timeout:g} s "
                f"timeout; see {proc.log}"
            )
        time.sleep(_POLL_S)


def _wait_nodes_online(
    deployment: _Deployment,
    flwr: str,
    count: int,
    servers: Sequence[_Proc],
    log_dir: Path,
    deadline: float,
    timeout: float,
) -> None:
    """Wait until the SuperLink lists ``count`` online SuperNodes."""
    while True:
        nodes = _flwr_json(
            deployment, flwr, ["supernode", "list"], "nodes", log_dir, deadline, timeout
        )
        online = sum(1 for n in nodes if n.get("status") == "online")
        if online >= count:
            return
        _check_alive(servers, "while registering with the SuperLink")
        if time.monotonic() >= deadline:
            raise FederatedError(
                f"only {online} of {count} SuperNodes registered with the SuperLink within "
                f"the {timeout:g} s timeout; see {log_dir}"
            )
        time.sleep(0.5)


def _flwr_json(
    deployment: _Deployment,
    flwr: str,
    command: Sequence[str],
    key: str,
    log_dir: Path,
    deadline: float,
    timeout: float,
) -> list[dict[str, Any]]:
    """Run ``flwr COMMAND CONNECTION --format json`` and return its ``key`` list."""
    name = "flwr " + " ".join(command)
    log = log_dir / f"flwr-{'-'.join(command)}.log"
    log.unlink(missing_ok=True)
    proc = deployment.start(
        name, [flwr, *command, CONNECTION, "--format", "json"], log, deployment.cwd / "cli"
    )
    try:
        proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        raise FederatedError(
            f"{name} did not answer within the {timeout:g} s timeout; see {log}"
        ) from None
    text = log.read_text(encoding="utf-8", errors="replace")
    start = text.find("{")
    try:
        data = json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if proc.popen.returncode != 0 or not isinstance(data, dict) or not data.get("success"):
        raise FederatedError(
            f"{name} failed with code {proc.popen.returncode}: {_last_line(log)}; see {log}"
        )
    items = data.get(key, [])
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
