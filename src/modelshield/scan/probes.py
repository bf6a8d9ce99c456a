"""Probes: the units of a scan. Each says when it applies and measures one risk.

A probe is a class registered in :data:`PROBES`; ``applies(ctx)`` returns ``None`` when it
can run or the reason it cannot, ``run(ctx)`` returns a graded :class:`ProbeResult`, and
``cost(ctx)`` states the work ``run`` will do, from which the scan estimates its time
before starting (:mod:`modelshield.scan.estimate`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from modelshield.core.registry import Registry
from modelshield.core.results import ProbeResult
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost


class Probe(ABC):
    """One measurement of one risk."""

    name: str = ""
    title: str = ""
    risk: str = ""
    order: int = 100
    """Position in the plan: cheap checks (the model file) run before costly attacks."""

    @abstractmethod
    def applies(self, ctx: ScanContext) -> str | None:
        """``None`` if the probe can run on ``ctx``, else the reason it is skipped."""

    @abstractmethod
    def run(self, ctx: ScanContext) -> ProbeResult:
        """Measure, grade and advise."""

    def cost(self, ctx: ScanContext) -> Cost:
        """The work ``run(ctx)`` will do, in the units of :mod:`modelshield.scan.estimate`.

        Called while planning, before anything runs; the default is a probe that does no
        model passes worth timing (file checks, arithmetic).
        """
        return Cost(basis="no model passes")

    def skipped(self, reason: str, ctx: ScanContext) -> ProbeResult:
        return ProbeResult(
            probe=self.name,
            title=self.title,
            risk=self.risk,
            status="skipped",
            reason=reason,
            seed=ctx.seed,
        )


PROBES: Registry[type[Probe]] = Registry("probes")


def ordered_probe_names() -> list[str]:
    """Registered probes in plan order."""
    return sorted(PROBES.names(), key=lambda n: (PROBES.get(n).order, n))


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: register a probe under its ``name``."""
    PROBES.add(cls.name, cls, help=(cls.__doc__ or cls.title))
    return cls
