"""The scan's cost model: what each planned probe will cost, in counted work and in seconds.

Each probe states its work in counted units (:class:`Cost`) from its profile settings:
attack steps × target classes × samples × eps-grid points, reference models × epochs ×
samples, queries, and so on. The units are:

``forward``
    one sample through the scanned model without gradients;
``backward``
    one sample through the scanned model forward and backward;
``query``
    one row answered by the black-box model (ONNX session or HTTP endpoint);
``train:ARCH``
    one sample of a training step of a freshly built ``ARCH`` model (reference models,
    extraction copies);
``forward:ARCH``
    one sample through such a model without gradients.

At the start of a scan, :func:`measure_units` times the units the plan needs on the
actual model and a small batch of the actual data (warm-up calls, then the fastest of a
few timed calls: see :data:`CALIBRATION_REPEATS`), and :func:`estimate_plan` multiplies. Attacks that stop early on points
they have already broken are estimated as if nothing broke early: their figure is an
upper bound (``bound="upper"``), the others are expected values (``bound="expected"``).
The report keeps the estimate beside the measured time of every probe.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from modelshield.core.classifier import Classifier
    from modelshield.core.oracle import Oracle
    from modelshield.scan.context import ScanContext
    from modelshield.scan.probes import Probe

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 32
"""Samples per timed call (fewer if the data has fewer)."""
CALIBRATION_QUERY_ROWS = 8
"""Rows per timed call of a black-box model: every row is a real, counted query."""
CALIBRATION_WARMUP = 2
"""Untimed calls first: they pay for allocation, graph specialisation, connections."""
CALIBRATION_REPEATS = 5
"""Timed calls per unit at least (and exactly, for a black-box model: they are queries)."""
CALIBRATION_MAX_CALLS = 50
CALIBRATION_BUDGET = 0.25
"""Seconds of timed calls per unit after which no more than :data:`CALIBRATION_REPEATS`
are made; fast units get up to :data:`CALIBRATION_MAX_CALLS` calls.

The fastest call is kept. A JIT-compiled model (TorchScript) is slow for its first calls
while it profiles and optimises, and on a shared machine a call can wait for a core far
longer than it computes (OpenMP threads spinning at a barrier while another process holds
the core): the fastest call is the model's own cost, and the load average recorded
beside it says how far a busy machine may stretch it."""

Bound = Literal["expected", "upper"]


@dataclass(frozen=True)
class Cost:
    """The work of one probe in counted units (see the module docstring), before timing.

    ``basis`` says in words how the counts follow from the profile, so the estimate can
    be checked by hand.
    """

    work: dict[str, float] = field(default_factory=dict)
    basis: str = ""
    bound: Bound = "expected"

    def __add__(self, other: Cost) -> Cost:
        work = dict(self.work)
        for unit, n in other.work.items():
            work[unit] = work.get(unit, 0.0) + n
        basis = "; ".join(b for b in (self.basis, other.basis) if b)
        bound: Bound = "upper" if "upper" in (self.bound, other.bound) else "expected"
        return Cost(work, basis, bound)


@dataclass
class UnitTimes:
    """Measured seconds per unit; a unit that could not be timed maps to ``None``."""

    seconds: dict[str, float | None] = field(default_factory=dict)
    batch: int = 0
    queries_spent: int = 0
    """Rows the calibration asked a black-box model (counted like any other query)."""
    wall_time: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    load_average: float | None = None
    """The machine's 1-minute load average when the units were timed (None where the OS
    has none): above the number of cores, probes will take longer than estimated."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit_seconds": dict(self.seconds),
            "batch": self.batch,
            "repeats": CALIBRATION_REPEATS,
            "statistic": "min",
            "load_average": self.load_average,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "queries": self.queries_spent,
            "wall_time": self.wall_time,
            "errors": dict(self.errors),
        }


@dataclass
class ProbePlan:
    """One line of the plan: run (with its cost and estimate), reuse, or skip (with why)."""

    name: str
    title: str
    action: Literal["run", "reuse", "skip"]
    reason: str | None = None
    cost: Cost | None = None
    seconds: float | None = None
    actual_seconds: float | None = None
    status: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"probe": self.name, "action": self.action}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.cost is not None:
            out["work"] = dict(self.cost.work)
            out["basis"] = self.cost.basis
            out["bound"] = self.cost.bound
        out["estimated_seconds"] = self.seconds
        out["actual_seconds"] = self.actual_seconds
        if self.status is not None:
            out["status"] = self.status
        return out


@dataclass
class ScanPlan:
    """The whole plan with its time estimate, shown before any probe runs."""

    profile: str
    probes: list[ProbePlan]
    units: UnitTimes

    @property
    def total_seconds(self) -> float:
        """Sum of the estimates of the probes that will run (unknown ones count as 0)."""
        return float(sum(p.seconds or 0.0 for p in self.probes if p.action == "run"))

    @property
    def complete(self) -> bool:
        """True when every probe that will run has an estimate."""
        return all(p.seconds is not None for p in self.probes if p.action == "run")

    @property
    def bound(self) -> Bound:
        """``upper`` when any probe that will run is estimated as an upper bound."""
        costs = [p.cost for p in self.probes if p.action == "run" and p.cost is not None]
        return "upper" if any(c.bound == "upper" for c in costs) else "expected"

    def to_dict(self) -> dict[str, Any]:
        """The report's ``run.estimate`` block: estimate and measured time per probe."""
        ran = [p for p in self.probes if p.action == "run" and p.actual_seconds is not None]
        return {
            "profile": self.profile,
            "total_seconds": self.total_seconds,
            "complete": self.complete,
            "bound": self.bound,
            "actual_seconds": float(sum(p.actual_seconds or 0.0 for p in ran)) if ran else None,
            "calibration": self.units.to_dict(),
            "probes": [p.to_dict() for p in self.probes],
        }

    def lines(self) -> list[str]:
        """The plan as text: one line per probe, then the total."""
        out = [f"plan ({self.profile} profile):"]
        for p in self.probes:
            if p.action == "skip":
                out.append(f"  skip  {p.name:<20} {p.reason}")
            elif p.action == "reuse":
                out.append(f"  done  {p.name:<20} reused from an earlier run")
            else:
                when = "time unknown" if p.seconds is None else format_seconds(p.seconds)
                if p.cost is not None and p.cost.bound == "upper" and p.seconds is not None:
                    when = f"at most {when}"
                out.append(f"  run   {p.name:<20} {when}")
        total = format_seconds(self.total_seconds)
        note = "" if self.complete else " (some probes could not be estimated)"
        bound = " at most" if self.bound == "upper" else ""
        out.append(f"expected time:{bound} {total}{note}")
        load, cores = self.units.load_average, os.cpu_count()
        if load is not None and cores and load > cores:
            out.append(
                f"  (load average {load:.1f} on {cores} cores: other work shares the machine, "
                "so expect longer)"
            )
        return out


def format_seconds(s: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 20 s``, ``1 h 05 min``."""
    if not math.isfinite(s):
        return "unknown"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


# ----------------------------------------------------------------------------- timing


def _best_time(fn: Callable[[], Any], max_calls: int = CALIBRATION_MAX_CALLS) -> float:
    for _ in range(CALIBRATION_WARMUP):
        fn()
    times: list[float] = []
    while len(times) < max_calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= CALIBRATION_REPEATS and sum(times) > CALIBRATION_BUDGET:
            break
    return min(times)


def _calibration_batch(ctx: ScanContext, n: int) -> torch.Tensor | None:
    ds = ctx.data if ctx.data is not None else ctx.train_data
    if ds is None or len(ds) == 0:
        return None
    return ds.x[: min(n, len(ds))]


def _time_forward(clf: Classifier, x: torch.Tensor) -> float:
    xb = x.to(clf.device)

    def step() -> None:
        with torch.no_grad():
            clf(xb)

    return _best_time(step) / len(xb)


def _time_backward(clf: Classifier, x: torch.Tensor) -> float:
    y = torch.zeros(len(x), dtype=torch.long, device=clf.device)

    def step() -> None:
        xb = x.to(clf.device).clone().requires_grad_(True)
        nn.functional.cross_entropy(clf(xb), y).backward()
        if isinstance(clf.module, nn.Module):
            clf.module.zero_grad(set_to_none=True)

    return _best_time(step) / len(x)


def _time_query(oracle: Oracle, x: torch.Tensor, units: UnitTimes) -> float:
    xb = x[:CALIBRATION_QUERY_ROWS]

    def step() -> None:
        oracle.query(xb)
        units.queries_spent += len(xb)

    return _best_time(step, max_calls=CALIBRATION_REPEATS) / len(xb)


def _oracle(ctx: ScanContext) -> Oracle | None:
    if ctx.oracle is not None:
        return ctx.oracle
    return ctx.model.oracle if ctx.model is not None else None


def _time_arch(arch: str, ctx: ScanContext, x: torch.Tensor, *, train: bool) -> float:
    from modelshield.core.architectures import build

    num_classes = _num_classes(ctx)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(arch, tuple(x.shape[1:]), num_classes).to(ctx.device)
    net.train(train)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xb = x.to(ctx.device)
    y = torch.randint(num_classes, (len(x),), generator=g).to(ctx.device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(xb), y).backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            net(xb)

    return _best_time(step if train else infer) / len(x)


def _num_classes(ctx: ScanContext) -> int:
    clf = ctx.classifier
    if clf is not None:
        return clf.num_classes
    oracle = _oracle(ctx)
    if oracle is not None and oracle.num_classes:
        return int(oracle.num_classes)
    ds = ctx.data if ctx.data is not None else ctx.train_data
    return max(2, ds.num_classes) if ds is not None else 2


def measure_units(ctx: ScanContext, needed: Sequence[str]) -> UnitTimes:
    """Time each unit in ``needed`` on the scan's model and data (see the module docstring).

    A unit that cannot be timed (no data, a model that fails) is recorded as ``None`` with
    the error; the probe that needs it is then shown with an unknown time.
    """
    started = time.perf_counter()
    units = UnitTimes()
    try:
        units.load_average = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every OS
        units.load_average = None
    x = _calibration_batch(ctx, CALIBRATION_BATCH)
    units.batch = 0 if x is None else len(x)
    for unit in sorted(set(needed)):
        if x is None:
            units.seconds[unit] = None
            units.errors[unit] = "no data to time the model on"
            continue
        clf, oracle = ctx.classifier, _oracle(ctx)
        try:
            if unit in ("forward", "backward") and clf is not None:
                value = (_time_forward if unit == "forward" else _time_backward)(clf, x)
            elif unit == "query" and oracle is not None:
                value = _time_query(oracle, x, units)
            elif unit.startswith(("train:", "forward:")):
                kind, arch = unit.split(":", 1)
                value = _time_arch(arch, ctx, x, train=kind == "train")
            else:
                raise ValueError(f"no model to time the unit {unit!r} on")
        except Exception as exc:  # an estimate must never stop a scan
            logger.debug("could not time %s: %s", unit, exc)
            units.seconds[unit] = None
            units.errors[unit] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        units.seconds[unit] = value
    units.wall_time = time.perf_counter() - started
    return units


def seconds_for(cost: Cost, units: UnitTimes) -> float | None:
    """``cost`` in seconds with the measured ``units``; ``None`` if a needed unit is unknown."""
    total = 0.0
    for unit, n in cost.work.items():
        if n == 0:
            continue
        per = units.seconds.get(unit)
        if per is None:
            return None
        total += n * per
    return total


def estimate_plan(
    entries: Sequence[tuple[Probe, str | None, bool]], ctx: ScanContext, profile: str
) -> ScanPlan:
    """Cost every probe that will run, time the units they need, and build the plan.

    ``entries``: ``(probe, skip reason or None, finished in an earlier run)`` in plan order.
    A probe whose ``cost`` fails is planned with an unknown time rather than stopping the scan.
    """
    rows: list[ProbePlan] = []
    for probe, reason, done in entries:
        if reason is not None:
            rows.append(ProbePlan(probe.name, probe.title, "skip", reason=reason))
        elif done:
            rows.append(ProbePlan(probe.name, probe.title, "reuse", seconds=0.0))
        else:
            try:
                cost: Cost | None = probe.cost(ctx)
            except Exception as exc:  # an estimate must never stop a scan
                logger.debug("%s: no cost estimate (%s)", probe.name, exc)
                cost = None
            rows.append(ProbePlan(probe.name, probe.title, "run", cost=cost))
    needed = {u for r in rows if r.cost is not None for u, n in r.cost.work.items() if n}
    units = measure_units(ctx, sorted(needed))
    for r in rows:
        if r.action == "run" and r.cost is not None:
            r.seconds = seconds_for(r.cost, units)
    return ScanPlan(profile=profile, probes=rows, units=units)
