"""The executor interface and the default, in-process :class:`LocalExecutor`.

An executor runs independent jobs (shadow/reference models, sweeps): ``map(fn, items)``
returns ``[fn(item) for item in items]`` in the order of ``items``, whatever order the
jobs actually finished in. Functions sent to a remote executor must be picklable
top-level functions (or :func:`functools.partial` of one).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Executor(ABC):
    """Runs ``fn`` over a list of items and returns the results in order.

    Use as a context manager (``with make_executor("ray") as ex: ...``) or call
    :meth:`close` when done.
    """

    #: Registry name of the executor kind.
    name: str = "executor"

    @property
    @abstractmethod
    def num_workers(self) -> int:
        """How many jobs may run at the same time."""

    @abstractmethod
    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]``, in the order of ``items``."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release workers and connections; the executor cannot be used afterwards."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs every job sequentially in this process (the default executor)."""

    name = "local"

    @property
    def num_workers(self) -> int:
        return 1

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        items = list(items)
        logger.debug("local executor: %d job(s)", len(items))
        return [fn(item) for item in items]

    def __repr__(self) -> str:
        return "LocalExecutor()"
