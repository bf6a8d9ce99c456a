"""Empirical DP auditing: train with canaries, guess membership, bound epsilon from below.

Two protocols, both valid at a stated confidence whatever the training code does:

* ``canaries`` (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021): many training runs, half
  with one canary example and half without; the canary's score in each trained model
  separates the two worlds, and Clopper-Pearson bounds on the false-positive and
  false-negative rates give ``eps_lower`` (:func:`~modelshield.privacy.dp_bounds.canary_eps_lower`).
* ``one-run`` (Steinke, Nasr & Jagielski 2023): one training run with ``m`` canaries, each
  included independently with probability 1/2; guesses from the canaries' scores bound
  epsilon (:func:`~modelshield.privacy.dp_bounds.one_run_from_scores`).

A bound above the claimed epsilon proves the implementation does not deliver its claim.
A bound below it is consistent with the claim (it cannot prove it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modelshield.core.data import Dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.io import atomic_write_json
from modelshield.core.registry import Registry
from modelshield.core.results import DPAuditResult
from modelshield.core.seeding import make_generator, seed_everything
from modelshield.core.train import train_classifier
from modelshield.exec import Executor, LocalExecutor
from modelshield.privacy.accounting import compute_epsilon
from modelshield.privacy.dp import DPConfig, choose_mode, train_dp
from modelshield.privacy.dp_bounds import canary_eps_lower, one_run_from_scores
from modelshield.privacy.membership import logit_confidence

logger = logging.getLogger(__name__)

TrainFn = Callable[[Tensor, Tensor, int], nn.Module]
"""A training procedure under audit: ``(x, y, seed) -> trained module``."""

CANARY_TYPES = ("noise", "mislabeled")
DP_AUDITS: Registry[Callable[..., DPAuditResult]] = Registry("dp-audits", "dp audit")


# -- what is audited --------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditTraining:
    """A built-in training procedure: ``arch`` trained with DP-SGD (``dp``) or plainly.

    Picklable, so runs can go to a Ray executor. ``claim(n)`` is the epsilon this
    procedure claims on a training set of ``n`` examples (``None`` when not private).
    ``init_seed`` fixes the weight initialisation across runs (the seed passed to each call
    still drives batch sampling and noise). ``checkpoint``: a DP training saves its state
    there after every epoch and resumes from it (for a single long run, not for many).
    """

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    dp: DPConfig | None = None
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    device: str = "cpu"
    init_seed: int | None = None
    checkpoint: str | None = None

    def claim(self, n: int) -> float | None:
        if self.dp is None:
            return None
        if self.dp.epsilon is not None:
            return self.dp.epsilon
        from modelshield.privacy.dp import plan_steps

        q, steps = plan_steps(self.dp, n)
        assert self.dp.noise_multiplier is not None
        return compute_epsilon(
            sample_rate=q,
            noise_multiplier=self.dp.noise_multiplier,
            steps=steps,
            delta=self.dp.delta,
            accountant=self.dp.accountant,
        )

    def __call__(self, x: Tensor, y: Tensor, seed: int) -> nn.Module:
        from modelshield.core.loading import build_arch

        # A fixed initialisation (init_seed) is the auditor's choice: DP must hold for any
        # initialisation, and fixing it removes run-to-run variance that hides the canary.
        seed_everything(seed if self.init_seed is None else self.init_seed)
        module = build_arch(self.arch, input_shape=self.input_shape, num_classes=self.num_classes)
        if self.dp is None:
            return train_classifier(
                module,
                x,
                y,
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch_size,
                seed=seed,
                device=self.device,
            )
        with _quiet("modelshield.privacy.dp"):
            res = train_dp(
                module,
                x,
                y,
                replace(self.dp, seed=seed),
                num_classes=self.num_classes,
                device=self.device,
                account_epochs=False,
                checkpoint=self.checkpoint,
            )
        return res.module

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dp"] = self.dp.to_dict() if self.dp is not None else None
        return d


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence one logger's per-run chatter (the audit runs it many times)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def resolve_trainer(spec: str) -> TrainFn:
    """Import ``package.module:function``, a training procedure ``(x, y, seed) -> module``."""
    from modelshield.core.loading import import_object

    return import_object(spec, "trainer", "package.module:function")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class NamedTrainer:
    """A user's trainer referred to by import path, so it pickles for remote workers."""

    spec: str

    def __call__(self, x: Tensor, y: Tensor, seed: int) -> nn.Module:
        return resolve_trainer(self.spec)(x, y, seed)


def prepare_trainer(trainer: TrainFn, n: int, seed: int = 0) -> TrainFn:
    """Settle, once for all runs, what every run would otherwise work out again.

    The weight initialisation (``init_seed``, from ``seed`` unless set), the Opacus mode
    (``auto`` times every mode) and the noise multiplier meeting a target epsilon on ``n``
    examples (runs on ``n + 1`` examples spend slightly less with it).
    """
    if not isinstance(trainer, AuditTraining):
        return trainer
    if trainer.init_seed is None:
        trainer = replace(trainer, init_seed=seed)
    if trainer.dp is None:
        return trainer
    from modelshield.core.loading import build_arch
    from modelshield.privacy.dp import fix_module, plan_noise, plan_steps

    dp = trainer.dp
    if dp.epsilon is not None:
        q, steps = plan_steps(dp, n)
        sigma = plan_noise(dp, q, steps)
        dp = replace(dp, epsilon=None, noise_multiplier=sigma, max_epsilon=dp.budget)
    if dp.mode == "auto":
        module = build_arch(
            trainer.arch, input_shape=trainer.input_shape, num_classes=trainer.num_classes
        )
        module, _ = fix_module(module)
        with _quiet("modelshield.privacy.dp"):
            choice = choose_mode(
                module,
                trainer.input_shape,
                trainer.num_classes,
                dp.batch_size,
                device=torch.device(trainer.device),
            )
        dp = replace(dp, mode=choice["mode"])
    return replace(trainer, dp=dp)


# -- canaries ---------------------------------------------------------------------------------
@dataclass
class Canaries:
    """Canary examples (``x``, ``y``) and how they were made."""

    x: Tensor
    y: Tensor
    kind: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def make_canaries(
    data: Dataset, m: int, kind: str = "noise", *, seed: int = 0
) -> tuple[Dataset, Canaries]:
    """``m`` canaries and the training set to add them to.

    ``noise``: inputs drawn uniformly within the data's value range, random labels (an
    out-of-distribution example a model can only fit by memorising it). ``mislabeled``: ``m``
    real examples taken out of the training set, each relabelled to another class
    (Jagielski et al. 2020's input-space canary).
    """
    if kind not in CANARY_TYPES:
        raise InvalidConfigError(
            f"canary type must be one of {', '.join(CANARY_TYPES)}, got {kind!r}"
        )
    if m < 1:
        raise InvalidConfigError(f"number of canaries must be >= 1, got {m}")
    if data.num_classes < 2:
        raise InvalidConfigError(f"canaries need at least 2 classes, got {data.num_classes}")
    g = make_generator(seed)
    if kind == "noise":
        lo, hi = float(data.x.min()), float(data.x.max())
        x = lo + (hi - lo) * torch.rand((m, *data.x.shape[1:]), generator=g)
        y = torch.randint(0, data.num_classes, (m,), generator=g)
        return data, Canaries(x.to(data.x.dtype), y, kind)
    if m >= len(data):
        raise InvalidConfigError(
            f"mislabeled canaries are taken from the training set: {m} canaries need more than {m} examples, got {len(data)}"
        )
    order = torch.randperm(len(data), generator=g)
    pick, rest = order[:m], order[m:]
    shift = torch.randint(1, data.num_classes, (m,), generator=g)
    y = (data.y[pick] + shift) % data.num_classes
    return data.subset(rest), Canaries(data.x[pick].clone(), y, kind)


def canary_scores(
    module: nn.Module, canaries: Canaries, device: torch.device | str = "cpu"
) -> Tensor:
    """The distinguisher: the model's logit-scaled confidence in each canary's label."""
    module.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(canaries), 1024):
            logits = module(canaries.x[i : i + 1024].to(device)).double().cpu()
            out.append(logit_confidence(logits, canaries.y[i : i + 1024]))
    return torch.cat(out)


# -- one run ----------------------------------------------------------------------------------
@DP_AUDITS.register("one-run", help="Steinke, Nasr & Jagielski 2023: m canaries, one training run")
def audit_one_run(
    trainer: TrainFn,
    data: Dataset,
    *,
    canaries: int = 1000,
    canary_type: str = "noise",
    eps_claimed: float | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **_: Any,
) -> DPAuditResult:
    """One training run with ``canaries`` canaries, each included with probability 1/2."""
    started = time.time()
    base, can = make_canaries(data, canaries, canary_type, seed=seed)
    g = make_generator(seed + 7919)
    included = torch.rand(len(can), generator=g) < 0.5
    x = torch.cat([base.x, can.x[included]])
    y = torch.cat([base.y, can.y[included]])
    if eps_claimed is None and isinstance(trainer, AuditTraining):
        eps_claimed = trainer.claim(len(x))
    trainer = prepare_trainer(trainer, len(x), seed)
    logger.info(
        "one-run audit: training on %d examples with %d of %d %s canaries",
        len(x),
        int(included.sum()),
        len(can),
        canary_type,
    )
    model = trainer(x, y, seed)
    scores = canary_scores(model, can, device)
    bound = one_run_from_scores(scores, included, delta=delta, confidence=confidence)
    return _result(
        "one-run",
        bound.eps_lower,
        eps_claimed,
        delta,
        confidence,
        bound.to_dict(),
        scores,
        included,
        canaries=len(can),
        runs=1,
        canary_type=canary_type,
        trainer=trainer,
        seed=seed,
        started=started,
    )


# -- many runs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    index: int
    include: bool
    seed: int


def _canary_run(
    job: _Job, *, trainer: TrainFn, base: Dataset, canary: Canaries, device: str
) -> float:
    """Train once (with or without the canary) and score the canary. A top-level function."""
    x, y = base.x, base.y
    if job.include:
        x, y = torch.cat([x, canary.x]), torch.cat([y, canary.y])
    model = trainer(x, y, job.seed)
    return float(canary_scores(model, canary, device)[0])


@DP_AUDITS.register("canaries", help="Jagielski et al. 2020: many runs with and without one canary")
def audit_canaries(
    trainer: TrainFn,
    data: Dataset,
    *,
    runs: int = 64,
    canary_type: str = "mislabeled",
    eps_claimed: float | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
    executor: Executor | None = None,
    progress: str | Path | None = None,
    thresholds: int = 8,
    **_: Any,
) -> DPAuditResult:
    """``runs`` training runs, alternately with and without one canary; a bound from their scores.

    ``thresholds`` candidate thresholds share the confidence (Bonferroni): few suit few runs.
    With ``progress``, each finished run's score is saved there and a rerun skips it.
    """
    started = time.time()
    if runs < 4 or runs % 2:
        raise InvalidConfigError(f"runs must be an even number >= 4, got {runs}")
    base, can = make_canaries(data, 1, canary_type, seed=seed)
    if eps_claimed is None and isinstance(trainer, AuditTraining):
        eps_claimed = (
            max(
                c for c in (trainer.claim(len(base)), trainer.claim(len(base) + 1)) if c is not None
            )
            if trainer.dp
            else None
        )
    trainer = prepare_trainer(trainer, len(base), seed)
    jobs = [_Job(i, i % 2 == 0, seed * 100_003 + i) for i in range(runs)]
    done = _read_progress(progress, runs, seed)
    todo = [j for j in jobs if j.index not in done]
    executor = executor or LocalExecutor()
    fn = functools.partial(_canary_run, trainer=trainer, base=base, canary=can, device=str(device))
    chunk = max(2, 2 * executor.num_workers)
    logger.info("canary audit: %d runs (%d done earlier) on %s", runs, runs - len(todo), executor)
    for i in range(0, len(todo), chunk):
        part = todo[i : i + chunk]
        for job, score in zip(part, executor.map(fn, part), strict=True):
            done[job.index] = score
        if progress is not None:
            _write_progress(progress, runs, seed, done)
        logger.info("canary audit: %d/%d runs", len(done), runs)
    scores = torch.tensor([done[j.index] for j in jobs], dtype=torch.float64)
    labels = torch.tensor([j.include for j in jobs])
    bound = canary_eps_lower(
        scores[labels],
        scores[~labels],
        delta=delta,
        confidence=confidence,
        max_thresholds=thresholds,
    )
    return _result(
        "canaries",
        bound.eps_lower,
        eps_claimed,
        delta,
        confidence,
        bound.to_dict(),
        scores,
        labels,
        canaries=1,
        runs=runs,
        canary_type=canary_type,
        trainer=trainer,
        seed=seed,
        started=started,
    )


def _read_progress(path: str | Path | None, runs: int, seed: int) -> dict[int, float]:
    if path is None or not Path(path).exists():
        return {}
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable audit progress file %s", path)
        return {}
    if state.get("runs") != runs or state.get("seed") != seed:
        logger.info("audit progress in %s is for other settings; starting over", path)
        return {}
    return {int(k): float(v) for k, v in state.get("scores", {}).items()}


def _write_progress(path: str | Path, runs: int, seed: int, done: dict[int, float]) -> None:
    atomic_write_json(
        Path(path), {"runs": runs, "seed": seed, "scores": {str(k): v for k, v in done.items()}}
    )


# -- the result -------------------------------------------------------------------------------
def _result(
    method: str,
    eps_lower: float,
    eps_claimed: float | None,
    delta: float,
    confidence: float,
    bound: dict[str, Any],
    scores: Tensor,
    labels: Tensor,
    *,
    canaries: int,
    runs: int,
    canary_type: str,
    trainer: TrainFn,
    seed: int,
    started: float,
) -> DPAuditResult:
    broken = eps_claimed is not None and eps_lower > eps_claimed
    if broken:
        logger.warning(
            "DP audit: epsilon lower bound %.3f exceeds the claimed %.3f: the training does not deliver its claim",
            eps_lower,
            eps_claimed,
        )
    training = (
        trainer.describe()
        if isinstance(trainer, AuditTraining)
        else {"trainer": getattr(trainer, "spec", repr(trainer))}
    )
    return DPAuditResult(
        config={"method": method, "canary_type": canary_type, "canaries": canaries, "runs": runs},
        seed=seed,
        wall_time=time.time() - started,
        method=method,
        eps_lower=eps_lower,
        eps_claimed=eps_claimed,
        delta=delta,
        confidence=confidence,
        ci=[eps_lower, math.inf],
        broken=broken,
        canaries=canaries,
        runs=runs,
        canary_type=canary_type,
        bound=bound,
        scores=scores.detach().cpu().double(),
        labels=labels.detach().cpu(),
        training=training,
    )
