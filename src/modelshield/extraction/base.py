"""What the extraction attacks share: the registry, victim evaluation, copy training.

Evaluation never spends the attack's budget. The victim's labels on the evaluation
inputs are read once, before the attack starts, from ``victim``: a callable ``x -> scores
or labels`` (an ``nn.Module``, a :class:`~modelshield.core.classifier.Classifier`, a
function) or an :class:`~modelshield.core.oracle.Oracle`. An Oracle victim is asked through
its back-end directly (``Oracle._forward``), bypassing its counter and budget, so passing
the attacked oracle itself as ``victim`` is fine: ``queries_used`` then still counts
exactly the attack's queries. The number of evaluation rows is reported separately
(``details["eval_queries"]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.loading import build_arch
from modelshield.core.oracle import Oracle
from modelshield.core.registry import Registry
from modelshield.core.results import ExtractionResult

logger = logging.getLogger(__name__)

Victim: TypeAlias = Callable[[Tensor], Tensor] | Oracle
"""Who answers evaluation queries: a callable returning scores/labels, or an Oracle."""

ArchSpec: TypeAlias = str | Callable[[], nn.Module] | None

EXTRACTION_ATTACKS: Registry[Callable[..., tuple[nn.Module, ExtractionResult]]] = Registry(
    "extraction-attacks"
)

MIN_TRAIN_STEPS = 200
"""Every copy gets at least this many optimiser steps, so that the copies trained on the
small transfer sets of early checkpoints are not under-trained merely for lack of batches."""

_EVAL_BATCH = 1024


# -- argument checks ---------------------------------------------------------------------------
def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else :class:`InvalidConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise InvalidConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_inputs(x: Any, name: str, input_shape: Sequence[int] | None = None) -> Tensor:
    """A floating batch ``(N, ...)`` without NaN/inf, of ``input_shape`` when given."""
    if not isinstance(x, Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{name} must be floating point, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{name} contains NaN or infinite values")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(
            f"{name} has samples of shape {tuple(x.shape[1:])}; the oracle expects "
            f"{tuple(input_shape)}"
        )
    return x


def check_budget(oracle: Oracle, queries: int) -> None:
    """Refuse up front when the oracle's remaining budget cannot cover ``queries``."""
    left = oracle.remaining
    if left is not None and left < queries:
        raise QueryBudgetExceeded(
            f"queries={queries} exceeds what the oracle has left ({left} of "
            f"max_queries={oracle.access.max_queries})"
        )


def soft_outputs(oracle: Oracle) -> bool:
    """True when the oracle answers with scores (probabilities or logits), not labels."""
    return oracle.access.output in ("probs", "logits")


def as_targets(answer: Tensor, output: str) -> Tensor:
    """The training target for an oracle answer: a probability vector per row (scores)
    or an int64 label vector (label-only access)."""
    if output == "label" or answer.ndim == 1:
        return answer.reshape(-1).long()
    scores = answer.float()
    if output == "logits":
        finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -1e9))
        return torch.softmax(finite, dim=1)
    probs = scores.clamp_min(0)
    total = probs.sum(dim=1, keepdim=True)
    # top-k / rounded answers need not sum to one; an all-zero row falls back to uniform
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    return torch.where(total > 0, probs / total.clamp_min(1e-12), uniform)


# -- victim evaluation -------------------------------------------------------------------------
def _raw_oracle(oracle: Oracle, x: Tensor) -> tuple[Tensor, str]:
    """The oracle back-end's raw answer (uncounted, unrestricted) and its kind."""
    outs = []
    step = oracle.batch_size if oracle.batch_size < (1 << 30) else len(x)
    for i in range(0, len(x), max(step, 1)):
        outs.append(oracle._forward(x[i : i + step]).cpu())
    return torch.cat(outs), oracle.raw_output


def _device_of(victim: object) -> torch.device | None:
    """Where a callable victim wants its inputs: a Classifier's device, a module's
    parameters' device, else ``None`` (inputs are passed as they are)."""
    dev = getattr(victim, "device", None)
    if isinstance(dev, torch.device):
        return dev
    if isinstance(victim, nn.Module):
        return next((p.device for p in victim.parameters()), None)
    return None


def victim_scores(victim: Victim, x: Tensor) -> tuple[Tensor, str]:
    """The victim's answer on ``x`` without spending any attack budget, and its kind
    (``"logits"``, ``"probs"`` or ``"label"``; a callable's scores are read as logits
    unless every row is a probability vector)."""
    if isinstance(victim, Oracle):
        return _raw_oracle(victim, x)
    if not callable(victim):
        raise InvalidConfigError(
            f"victim must be an Oracle or a callable x -> scores, got {type(victim).__name__}"
        )
    outs = []
    dev = _device_of(victim)
    with torch.no_grad():
        for i in range(0, len(x), _EVAL_BATCH):
            chunk = x[i : i + _EVAL_BATCH]
            out = victim(chunk if dev is None else chunk.to(dev))
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, Tensor):
                raise UnsupportedModelError(
                    f"victim must return a tensor, got {type(out).__name__}"
                )
            outs.append(out.detach().cpu())
    scores = torch.cat(outs)
    if scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
        return scores.reshape(-1).long(), "label"
    if scores.ndim != 2:
        raise UnsupportedModelError(
            f"victim must return scores (N, C) or labels (N,), got shape {tuple(scores.shape)}"
        )
    scores = scores.double() if scores.dtype == torch.float64 else scores.float()
    sums = scores.double().sum(1)
    is_probs = bool((scores >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4))
    return scores, "probs" if is_probs else "logits"


def victim_top1(victim: Victim, x: Tensor) -> Tensor:
    """The victim's top-1 labels on ``x`` (int64, CPU), never charged to a budget."""
    scores, kind = victim_scores(victim, x)
    return scores if kind == "label" else scores.argmax(dim=1)


@torch.no_grad()
def copy_logits(copy: nn.Module, x: Tensor) -> Tensor:
    """The copy's logits on ``x`` in batches (CPU), in eval mode."""
    was_training = copy.training
    copy.eval()
    try:
        dev = next((p.device for p in copy.parameters()), x.device)
        outs = [copy(x[i : i + _EVAL_BATCH].to(dev)).cpu() for i in range(0, len(x), _EVAL_BATCH)]
    finally:
        copy.train(was_training)
    return torch.cat(outs)


def copy_top1(copy: nn.Module, x: Tensor) -> Tensor:
    return copy_logits(copy, x).argmax(dim=1)


class Evaluation:
    """The held-out inputs a copy is measured on, with the victim's labels read once."""

    def __init__(
        self,
        x: Tensor | None,
        y: Tensor | None,
        victim: Victim | None,
        input_shape: Sequence[int] | None,
    ) -> None:
        self.x = None if x is None else check_inputs(x, "x_eval", input_shape)
        self.y: Tensor | None = None
        self.ref: Tensor | None = None
        self.scores: Tensor | None = None
        self.kind = "label"
        self.victim_accuracy: float | None = None
        self.queries = 0
        if y is not None:
            if self.x is None:
                raise InvalidConfigError("y_eval needs x_eval")
            if not isinstance(y, Tensor) or y.ndim != 1 or len(y) != len(self.x):
                raise DataError(f"y_eval must be labels (N,) matching x_eval ({len(self.x)} rows)")
            self.y = y.detach().cpu().long()
        if self.x is not None:
            if victim is None:
                raise InvalidConfigError("x_eval needs a victim to label it")
            self.scores, self.kind = victim_scores(victim, self.x)
            self.ref = self.scores if self.kind == "label" else self.scores.argmax(dim=1)
            self.queries = len(self.x)
            if self.y is not None:
                self.victim_accuracy = float((self.ref == self.y).float().mean())

    @property
    def active(self) -> bool:
        return self.ref is not None

    def measure(self, copy: nn.Module, queries: int) -> dict[str, Any]:
        """One curve row: ``{"queries", "fidelity", "accuracy"}`` (``None`` when unknown)."""
        row: dict[str, Any] = {"queries": int(queries), "fidelity": None, "accuracy": None}
        if self.x is None or self.ref is None:
            return row
        pred = copy_top1(copy, self.x)
        row["fidelity"] = float((pred == self.ref).float().mean())
        row["agree"] = int((pred == self.ref).sum())
        if self.y is not None:
            row["accuracy"] = float((pred == self.y).float().mean())
        return row

    def details(self) -> dict[str, Any]:
        return {"n_eval": 0 if self.x is None else len(self.x), "eval_queries": self.queries}


# -- the copy ----------------------------------------------------------------------------------
def arch_label(arch: Any, input_shape: Sequence[int]) -> str:
    """The copy's architecture as results record it (a name, or ``"callable"``)."""
    if isinstance(arch, str):
        return arch
    return default_arch(input_shape) if arch is None else "callable"


def default_arch(input_shape: Sequence[int]) -> str:
    """``small_cnn`` for images ``(C, H, W)``, ``mlp`` for everything else."""
    return "small_cnn" if len(tuple(input_shape)) == 3 else "mlp"


def copy_factory(
    arch: ArchSpec, input_shape: Sequence[int], num_classes: int
) -> Callable[[], nn.Module]:
    """A function building a fresh, untrained copy."""
    if arch is None:
        arch = default_arch(input_shape)
    if isinstance(arch, str):
        name = arch
        build_arch(name, input_shape=input_shape, num_classes=num_classes)  # fail early

        def make() -> nn.Module:
            return build_arch(name, input_shape=input_shape, num_classes=num_classes)

        return make
    if callable(arch):
        factory = arch

        def make_user() -> nn.Module:
            net = factory()
            if not isinstance(net, nn.Module):
                raise InvalidConfigError(
                    f"arch() returned a {type(net).__name__}, not a torch.nn.Module"
                )
            return net

        return make_user
    raise InvalidConfigError(
        f"arch must be an architecture name, a factory or None, got {type(arch).__name__}"
    )


def train_copy(
    make: Callable[[], nn.Module],
    x: Tensor,
    targets: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> nn.Module:
    """Train a fresh copy from scratch with Adam on the transfer set ``(x, targets)``.

    ``targets`` are probability rows (soft labels: cross-entropy to the victim's
    distribution, i.e. KL up to a constant) or int64 labels (hard labels). The same seed
    gives the same weights; the caller's global RNG state is left as it was.
    """
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(epochs * steps_per_epoch, MIN_TRAIN_STEPS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make().to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        soft = targets.ndim == 2
        net.train()
        step = 0
        while step < total:
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                xb, tb = x[idx].to(device), targets[idx].to(device)
                out = net(xb)
                if soft:
                    loss = -(tb * F.log_softmax(out, dim=1)).sum(dim=1).mean()
                else:
                    loss = F.cross_entropy(out, tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step >= total:
                    break
    net.eval()
    return net


def default_checkpoints(queries: int, count: int = 5) -> list[int]:
    """``count`` budgets spaced by factors of two up to ``queries`` (e.g. 31, 62, 125, 250, 500)."""
    points = {max(1, round(queries / 2**k)) for k in range(count)}
    return sorted(points)


def check_checkpoints(checkpoints: Sequence[int] | None, queries: int) -> list[int]:
    """Sorted, unique budgets in ``[1, queries]``; ``queries`` itself is always the last."""
    if checkpoints is None:
        return default_checkpoints(queries)
    try:
        values = [int(c) for c in checkpoints]
    except (TypeError, ValueError):
        raise InvalidConfigError(f"checkpoints must be integers, got {checkpoints!r}") from None
    bad = [c for c in values if not 1 <= c <= queries]
    if bad:
        raise InvalidConfigError(f"checkpoints must lie in [1, queries={queries}], got {bad}")
    return sorted({*values, queries})


def resolve_num_classes(oracle: Oracle, num_classes: int | None) -> int | None:
    """``num_classes`` if given (checked against the oracle's), else the oracle's."""
    if num_classes is not None:
        check_positive_int(num_classes, "num_classes", 2)
        if oracle.num_classes is not None and oracle.num_classes != num_classes:
            raise InvalidConfigError(
                f"num_classes={num_classes} but the oracle answers {oracle.num_classes} classes"
            )
        return int(num_classes)
    return oracle.num_classes


def curve_plot_rows(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve as stored in a result (``agree`` counts dropped)."""
    return [{k: v for k, v in row.items() if k != "agree"} for row in curve]
