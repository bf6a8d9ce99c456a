"""What every evasion attack shares: the registry, input checks, losses, and the final guard.

The guard (:func:`finalize`) is the Foolbox habit: never trust an attack's output. It
projects the returned inputs into the threat set and recomputes success and distance from
the model itself, so no attack can report a perturbation it did not make.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from modelshield.core.classifier import Classifier
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.oracle import Oracle
from modelshield.core.registry import Registry
from modelshield.core.results import AttackResult
from modelshield.core.threat import LpThreat
from modelshield.evasion import _lp

logger = logging.getLogger(__name__)

Access = Literal["white-box", "scores", "label"]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: the function and what it needs.

    ``access``: ``white-box`` attacks take a :class:`Classifier` (gradients); ``scores``
    and ``label`` attacks take an :class:`Oracle` answering with scores or labels only.
    White-box attacks are called ``fn(model, x, y, *, threat, seed, ...)``; black-box ones
    ``fn(oracle, x, y, *, threat, seed, ...)`` and spend the oracle's query budget.
    """

    name: str
    fn: Callable[..., AttackResult]
    access: Access
    norms: tuple[str, ...]
    targeted: bool = True
    minimal: bool = False
    """True for minimum-norm attacks (C&W): ``threat.eps`` caps the distance they report."""

    def __call__(self, *args: Any, **kwargs: Any) -> AttackResult:
        return self.fn(*args, **kwargs)


ATTACKS: Registry[AttackSpec] = Registry("attacks")


def register_attack(
    name: str,
    *,
    access: Access = "white-box",
    norms: tuple[str, ...] = ("linf", "l2", "l1"),
    targeted: bool = True,
    minimal: bool = False,
) -> Callable[[Callable[..., AttackResult]], Callable[..., AttackResult]]:
    """Decorator registering an attack function with what it needs."""

    def deco(fn: Callable[..., AttackResult]) -> Callable[..., AttackResult]:
        ATTACKS.add(
            name,
            AttackSpec(name, fn, access, norms, targeted, minimal),
            help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return deco


def check_norm(spec_name: str, threat: LpThreat, norms: tuple[str, ...]) -> None:
    if threat.norm not in norms:
        raise InvalidConfigError(
            f"{spec_name} supports norm {', '.join(norms)}; got norm={threat.norm!r}"
        )


def check_batch(
    model: Classifier | Oracle, x: torch.Tensor, y: torch.Tensor, threat: LpThreat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch; for a Classifier move it to the model's device (dtype kept)."""
    if isinstance(model, Classifier):
        model.check_input(x)
    else:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise DataError("inputs must be a floating-point batch tensor (N, ...)")
        if model.input_shape is not None and tuple(x.shape[1:]) != tuple(model.input_shape):
            raise DataError(
                f"inputs have shape {tuple(x.shape)} but the oracle expects (N, "
                f"{', '.join(map(str, model.input_shape))})"
            )
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"labels must be a vector of length {len(x)}, got {shape}")
    if y.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    num_classes = model.num_classes
    if len(y) and int(y.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(y.min())}")
    if len(y) and num_classes is not None and int(y.max()) >= num_classes:
        raise DataError(
            f"labels must lie in [0, {num_classes - 1}], got [{int(y.min())}, {int(y.max())}]"
        )
    if not bool(torch.isfinite(x).all()):
        raise DataError("inputs contain NaN or infinite values")
    low, high = threat.bounds
    tol = 1e-6 * max(1.0, high - low)
    if len(x) and (float(x.min()) < low - tol or float(x.max()) > high + tol):
        raise DataError(
            f"inputs lie in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside bounds {threat.bounds}"
        )
    if isinstance(model, Classifier):
        return x.to(model.device), y.to(model.device).long()
    return x, y.long()


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss to *maximise* (untargeted) or whose negative to maximise (targeted).

    ``ce``: cross-entropy. ``margin``: the C&W margin ``max_{j≠y} z_j − z_y``.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return other - true
    raise InvalidConfigError(f"loss must be 'ce' or 'margin', got {loss!r}")


def is_success(pred: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    return pred == y if targeted else pred != y


def finalize(
    model: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    threat: LpThreat,
    *,
    attack: str,
    queries: torch.Tensor,
    config: dict[str, Any],
    seed: int | None,
    started: float,
    out_device: torch.device,
    out_dtype: torch.dtype,
) -> AttackResult:
    """Project into the threat set, recompute success from the model, package the result."""
    with torch.no_grad():
        x_adv = _lp.project_to_threat(x_adv.detach(), x, threat.norm, threat.eps, threat.bounds)
        pred_adv = model.logits(x_adv).argmax(dim=1)
        pred_clean = model.logits(x).argmax(dim=1)
        success = is_success(pred_adv, y, threat.targeted)
        distance = _lp.lp_norm(x_adv - x, threat.norm)
    return AttackResult(
        config=config,
        seed=seed,
        wall_time=time.perf_counter() - started,
        attack=attack,
        threat=threat.to_dict(),
        x_adv=x_adv.to(device=out_device, dtype=out_dtype),
        success=success.cpu(),
        distance=distance.float().cpu(),
        queries=(queries + 2).cpu(),
        clean_correct=(pred_clean == y).cpu() if not threat.targeted else None,
    )


def finalize_oracle(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    success: torch.Tensor,
    threat: LpThreat,
    *,
    attack: str,
    queries: torch.Tensor,
    config: dict[str, Any],
    seed: int | None,
    started: float,
) -> AttackResult:
    """The guard for black-box attacks, which must not spend queries to re-check.

    The inputs are projected into the threat set; a point the projection moves (beyond
    float rounding) loses its success, since the oracle never judged the projected point.
    """
    with torch.no_grad():
        projected = _lp.project_to_threat(x_adv.detach(), x, threat.norm, threat.eps, threat.bounds)
        moved = (projected - x_adv).flatten(1).abs().amax(dim=1) > 1e-6
        success = success.bool() & ~moved.to(success.device)
        distance = _lp.lp_norm(projected - x, threat.norm)
    return AttackResult(
        config=config,
        seed=seed,
        wall_time=time.perf_counter() - started,
        attack=attack,
        threat=threat.to_dict(),
        x_adv=projected,
        success=success.cpu(),
        distance=distance.float().cpu(),
        queries=queries.cpu(),
        clean_correct=None,
    )


# -- shared by the black-box attacks -------------------------------------------------------
def require_oracle(model: object, attack: str) -> Oracle:
    """The model as an :class:`Oracle`, or :class:`UnsupportedModelError` saying how to get one."""
    if isinstance(model, Oracle):
        return model
    if isinstance(model, Classifier):
        raise UnsupportedModelError(
            f"{attack} is a black-box attack and needs an Oracle; wrap the classifier with "
            "modelshield.core.oracle.from_classifier(model, QueryAccess(...))"
        )
    raise UnsupportedModelError(f"{attack} needs an Oracle, got {type(model).__name__}")


def check_count(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def resolve_goal(
    y: torch.Tensor, target: torch.Tensor | None, threat: LpThreat, num_classes: int | None
) -> torch.Tensor:
    """The labels success is judged against: ``y`` (untargeted) or ``target`` (targeted)."""
    if not threat.targeted:
        return y
    if target is None:
        raise InvalidConfigError("a targeted threat needs target labels (target=...)")
    if not isinstance(target, torch.Tensor) or target.shape != y.shape:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise DataError(f"target must have shape {tuple(y.shape)}, got {shape}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise DataError(f"target must hold integer labels, got dtype {target.dtype}")
    goal = target.to(y.device).long()
    if len(goal) and (
        int(goal.min()) < 0 or (num_classes is not None and int(goal.max()) >= num_classes)
    ):
        raise DataError(f"target labels must lie in [0, {num_classes}), got {goal.tolist()}")
    return goal


class QueryLedger:
    """Per-sample query accounting in front of an oracle; never asks past either budget.

    ``per_sample`` caps each sample's queries; the oracle's ``remaining`` caps the total.
    A :class:`QueryBudgetExceeded` raised anyway (another user spent the budget) marks
    the ledger ``exhausted`` instead of escaping, and the query answers ``None``.
    """

    def __init__(self, oracle: Oracle, n: int, per_sample: int, device: torch.device) -> None:
        self.oracle = oracle
        self.per_sample = per_sample
        self.used = torch.zeros(n, dtype=torch.long, device=device)
        self.exhausted = False

    def left(self, idx: torch.Tensor) -> torch.Tensor:
        """Queries each sample in ``idx`` may still spend (its own budget only)."""
        return (self.per_sample - self.used[idx]).clamp_min(0)

    def fit(self, idx: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        """Rows each sample of ``idx`` may send now: ``want`` within its own budget, then,
        in the order given, within what the oracle has left."""
        allowed = torch.minimum(want, self.left(idx))
        if self.exhausted:
            return torch.zeros_like(allowed)
        remaining = self.oracle.remaining
        if remaining is not None:
            before = allowed.cumsum(0) - allowed
            allowed = torch.minimum(allowed, (remaining - before).clamp_min(0))
        return allowed

    def query(self, rows: torch.Tensor, owners: torch.Tensor) -> torch.Tensor | None:
        """Ask the oracle about ``rows`` (row ``i`` spent by sample ``owners[i]``)."""
        if self.exhausted or len(rows) == 0:
            return None
        try:
            out = self.oracle.query(rows)
        except QueryBudgetExceeded:
            logger.warning("oracle budget ran out under the attack; stopping with what it found")
            self.exhausted = True
            return None
        self.used.index_add_(0, owners, torch.ones_like(owners))
        return out
