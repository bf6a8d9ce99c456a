"""Executors for independent jobs: ``local`` (default, in-process) and ``ray`` (optional).

>>> from modelshield.exec import make_executor
>>> with make_executor("local") as ex:
...     ex.map(abs, [-1, 2, -3])
[1, 2, 3]
"""

from __future__ import annotations

import inspect
from typing import Any

from modelshield.core.errors import InvalidConfigError
from modelshield.core.registry import Registry
from modelshield.exec.local import Executor, LocalExecutor
from modelshield.exec.ray_executor import RayExecutor, RayNotInstalledError

EXECUTORS: Registry[type[Executor]] = Registry("executors")
EXECUTORS.add("local", LocalExecutor, help="Run jobs one after another in this process.")
EXECUTORS.add("ray", RayExecutor, help="Run jobs as Ray tasks, one CPU each (modelshield[ray]).")


def make_executor(name: str = "local", **kwargs: Any) -> Executor:
    """Build a registered executor by name, e.g. ``make_executor("ray", num_workers=2)``."""
    cls = EXECUTORS.get(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise InvalidConfigError(f"executor {name!r}: {e}") from None
    return cls(**kwargs)


__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "RayNotInstalledError",
    "make_executor",
]
