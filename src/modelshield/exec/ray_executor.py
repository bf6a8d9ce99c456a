"""Scale independent jobs out on Ray (optional: ``pip install 'modelshield[ray]'``).

Ray binds its servers to every interface; run anything that starts a local Ray inside a
loopback-only network namespace (see ENVIRONMENT.md)::

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' python script.py
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.exec.local import Executor

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

INSTALL_HINT = "pip install 'modelshield[ray]'"


class RayNotInstalledError(UnsupportedModelError, ImportError):
    """The ``ray`` executor was asked for but Ray is not installed."""


def import_ray() -> ModuleType:
    """Import Ray lazily, with an install hint when it is missing."""
    try:
        import ray
    except ImportError as e:
        raise RayNotInstalledError(
            f"executor 'ray' needs the Ray package, which is not installed ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return ray


def _run_in_worker(fn: Callable[[Any], Any], item: Any) -> Any:
    """Body of every Ray task: one torch thread (one CPU per task), then ``fn(item)``."""
    import torch

    torch.set_num_threads(1)
    return fn(item)


def warn_if_not_loopback_only() -> None:
    """Warn when a local Ray would be reachable from other machines."""
    import socket

    try:
        others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    except OSError:
        return
    if others:
        logger.warning(
            "starting a local Ray while network interfaces %s exist: Ray binds every "
            "interface; run inside a loopback-only namespace (unshare -n) to keep it local",
            others,
        )


def _warm_up(_: object) -> int:
    """A no-op job that makes a worker import torch (used to start workers up front)."""
    import torch

    return torch.get_num_threads()


class RayExecutor(Executor):
    """Runs jobs as Ray tasks, one CPU each, and returns results in input order.

    ``address=None`` starts a private local Ray with ``num_workers`` CPUs (default: all),
    bound to 127.0.0.1 and without the dashboard; it is shut down by :meth:`close`.
    Otherwise connects to the cluster at ``address`` (e.g. ``"auto"`` or
    ``"ray://host:10001"``) and leaves it running on close. If Ray is already
    initialised in this process it is reused as is and left running.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None) -> None:
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1
        ):
            raise InvalidConfigError(
                f"num_workers must be a positive integer or None, got {num_workers!r}"
            )
        if address is not None and not isinstance(address, str):
            raise InvalidConfigError(f"address must be a string or None, got {address!r}")
        ray = import_ray()
        self._ray = ray
        self._closed = False
        t0 = time.perf_counter()
        if ray.is_initialized():
            self._owns = False
            logger.info("reusing the Ray runtime already initialised in this process")
        elif address is None:
            warn_if_not_loopback_only()
            ray.init(
                num_cpus=num_workers,
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._owns = True
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            self._owns = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if num_workers is not None and address is None and not self._owns and cpus != num_workers:
            logger.warning(
                "Ray was already running with %d CPUs; num_workers=%d is not applied",
                cpus,
                num_workers,
            )
        self._num_workers = cpus if num_workers is None else min(num_workers, cpus)
        self._task = ray.remote(num_cpus=1, max_retries=0)(_run_in_worker)
        logger.info(
            "Ray executor ready: %d worker CPU(s) in %.1f s",
            self._num_workers,
            time.perf_counter() - t0,
        )

    @property
    def num_workers(self) -> int:
        return self._num_workers

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if self._closed:
            raise InvalidConfigError("this RayExecutor is closed; create a new one")
        items = list(items)
        if not items:
            return []
        ray = self._ray
        fn_ref = ray.put(fn)  # shipped once, shared by every task (e.g. bound training data)
        refs = [self._task.remote(fn_ref, item) for item in items]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            raise cause from None

    def warm_up(self) -> None:
        """Start every worker process and import torch there, so timings exclude it."""
        self.map(_warm_up, list(range(2 * self._num_workers)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()

    def __repr__(self) -> str:
        return f"RayExecutor(num_workers={self._num_workers}, owns_runtime={self._owns})"
