"""Adversarial training: PGD-AT, TRADES and FGSM-RS, resumable from a per-epoch checkpoint.

Three recipes, one loop (:func:`adversarial_train`), one config
(:class:`AdversarialTrainingConfig`):

* ``"pgd-at"`` — Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018: minimise the cross-entropy on PGD examples
  (random start in the ball, ``steps`` steepest-ascent steps of ``step_size``, projection
  after each). Every step runs on every point: unlike :func:`modelshield.evasion.pgd`,
  which stops on fooled points, the inner maximisation here keeps pushing the loss up, as
  in the paper, and spends no extra forward passes on checking success.
* ``"trades"`` — Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled
  Trade-off between Robustness and Accuracy", ICML 2019: minimise
  ``CE(f(x), y) + beta · KL(f(x) ‖ f(x'))`` where ``x'`` maximises the KL term, found by
  PGD started at ``x + 0.001·N(0, I)`` as in the paper's code.
* ``"fgsm-rs"`` — Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial
  training", ICLR 2020: a uniform random start in the ball (not clipped to the input
  bounds, as in their MNIST code; only the result is), one steepest-ascent step of
  ``alpha = 1.25·eps`` (``step_size``), projection, then the update; with a cyclic
  (triangular one-cycle) learning rate. About twice the cost of a clean epoch. FGSM-RS
  can overfit catastrophically (Wong et al.; Andriushchenko & Flammarion 2020): by
  default (``keep_best``) PGD accuracy on a fixed sample of training points is measured
  after every epoch, and the best epoch's weights are restored at the end when the last
  epoch's accuracy has collapsed.

All norm maths (projection, steepest ascent, ball sampling) comes from
:mod:`modelshield.evasion._lp`, so every recipe works for L∞, L2 and L1.

**Model mode during the attack.** With ``attack_mode="eval"`` (default) the adversarial
examples are generated with the model in eval mode and the update runs in train mode, as
in the TRADES reference code: BatchNorm then normalises with its running statistics (which
attack passes do not update) and dropout is off, so the attack sees the model it will face
at test time. For models without BatchNorm or dropout eval and train mode compute the same
function, so the choice does not matter there. ``attack_mode="train"`` keeps the model in
train mode throughout, as Wong et al.'s code does (BatchNorm statistics then also move
with every attack pass).

**Mixed precision.** ``bf16=True`` runs every forward pass — the attack's and the update's
— under ``torch.autocast(device_type, dtype=torch.bfloat16)``; weights, gradients and the
losses stay in float32. No loss scaling is needed for bfloat16.

**Checkpoints and resuming.** With ``checkpoint_dir`` every completed epoch is written
atomically to ``checkpoint_dir/last.pt``: model and optimizer state, the schedule's
position, every random generator's state (as tensors), the config and the history. The
file holds only tensors, dicts, lists, numbers and strings, so it loads with
``torch.load(..., weights_only=True)``. A run started again with the same directory and
config continues after the last completed epoch; on CPU the resumed weights equal those of
an uninterrupted run bit for bit (on CUDA, up to the non-determinism of its kernels). A
checkpoint made with a different config (other than a larger ``epochs``, which extends
training) or on different data is refused with :class:`InvalidConfigError`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modelshield import __version__
from modelshield.core.classifier import from_torch
from modelshield.core.device import select_device
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    ModelLoadError,
    UnsupportedModelError,
)
from modelshield.core.io import atomic_open
from modelshield.core.results import Result
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import NORMS, LpThreat, check_bounds
from modelshield.evasion import _lp
from modelshield.evasion.pgd import pgd

logger = logging.getLogger(__name__)

__all__ = [
    "ATTACK_MODES",
    "METHODS",
    "OPTIMIZERS",
    "SCHEDULES",
    "AdversarialTrainingConfig",
    "AdversarialTrainingResult",
    "adversarial_train",
    "learning_rate_at",
]

METHODS: tuple[str, ...] = ("pgd-at", "trades", "fgsm-rs")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("cyclic", "multistep", "constant")
ATTACK_MODES: tuple[str, ...] = ("eval", "train")

CHECKPOINT_NAME = "last.pt"
_CHECKPOINT_FORMAT = "modelshield.adversarial-training/1"
_PROBE_POINTS = 1024  # training points on which clean accuracy is measured after each epoch
_EVAL_BATCH = 512
_L1_SPARSITY = 0.95  # the L1 steepest-ascent sparsity evasion.pgd uses by default
_TRADES_INIT_STD = 0.001  # Zhang et al.'s start: x + 0.001·N(0, I)
_ATTACK_SEED_OFFSET = 0x9E3779B97F4A7C15 % 2**63  # a second stream from the same seed
_GUARD_SEED_STEP = 0x2545F4914F6CDD1D  # the keep_best guard's generator, per epoch
# keep_best restores the best epoch only when the last one is this much worse: a collapse
# is tens of points; on 1,024 points the sampling noise is below 1.6 points (one s.e.)
_GUARD_TOLERANCE = 0.05


# -- config ------------------------------------------------------------------------------------
def _number(value: object, name: str, *, minimum: float, strict: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if math.isfinite(v) and (v > minimum if strict else v >= minimum):
            return v
    allowed = f"> {minimum:g}" if strict else f">= {minimum:g}"
    raise InvalidConfigError(f"{name} must be a finite number {allowed}, got {value!r}")


def _integer(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class AdversarialTrainingConfig:
    """How to train adversarially; validated at construction, defaults resolved there.

    ``method``: ``"pgd-at"`` (Madry et al. 2018), ``"trades"`` (Zhang et al. 2019) or
    ``"fgsm-rs"`` (Wong et al. 2020). ``norm``/``eps``/``bounds``: the threat trained
    against (``eps`` in the model's input space). ``steps``: PGD-AT and TRADES inner steps
    (FGSM-RS takes one step whatever ``steps`` says). ``step_size``: the inner step,
    default ``2.5·eps/steps`` for PGD-AT and TRADES and ``alpha = 1.25·eps`` for FGSM-RS.
    ``beta``: the TRADES weight of the KL term. ``lr``: the learning rate (the peak of the
    cyclic schedule), default 0.1 for SGD and 1e-3 for Adam. ``optimizer``: ``"sgd"``
    (momentum ``momentum``, Nesterov off) or ``"adam"``; ``weight_decay`` defaults to 5e-4
    for SGD and 0 for Adam. ``schedule``: ``"cyclic"`` (default for FGSM-RS: triangular
    one-cycle over all iterations, from 0 up to ``lr`` half-way and back down to 0, as in
    Wong et al.), ``"multistep"`` (default otherwise: ``lr`` divided by 10 at 50% and again
    at 75% of the epochs, as in Madry et al. and Rice et al. 2020) or ``"constant"``.
    ``bf16``: forward passes under bfloat16 autocast. ``eps_warmup_epochs``: ramp eps (and
    the step size with it) linearly from 0 to ``eps`` over that many epochs, per iteration
    (0: no ramp). ``attack_mode``: the model's mode while the attack runs (see the module
    docstring). ``keep_best``: after each epoch measure PGD accuracy (10 steps, full eps)
    on a fixed sample of up to 1,024 training points; when training ends, if the last
    epoch's is more than 5 points below the best epoch's, restore the best epoch's
    weights — the guard against catastrophic overfitting of Wong et al. 2020 (PGD accuracy
    collapses to near 0 within an epoch while FGSM accuracy keeps rising), in the
    keep-the-best form of Rice et al. 2020; default on for FGSM-RS.
    """

    method: str = "pgd-at"
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    beta: float = 6.0
    epochs: int = 10
    lr: float | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str | None = None
    bf16: bool = False
    bounds: tuple[float, float] = (0.0, 1.0)
    seed: int = 0
    eps_warmup_epochs: int = 0
    attack_mode: str = "eval"
    keep_best: bool | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _choice(self.method, "method", METHODS)
        if self.norm not in NORMS:
            raise InvalidConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        eps = _number(self.eps, "eps", minimum=0.0, strict=True)
        put("eps", eps)
        steps = _integer(self.steps, "steps", 1)
        if self.step_size is None:
            put("step_size", 1.25 * eps if self.method == "fgsm-rs" else 2.5 * eps / steps)
        else:
            put("step_size", _number(self.step_size, "step_size", minimum=0.0, strict=True))
        put("beta", _number(self.beta, "beta", minimum=0.0, strict=False))
        _integer(self.epochs, "epochs", 1)
        _choice(self.optimizer, "optimizer", OPTIMIZERS)
        if self.lr is None:
            put("lr", 0.1 if self.optimizer == "sgd" else 1e-3)
        else:
            put("lr", _number(self.lr, "lr", minimum=0.0, strict=True))
        _integer(self.batch_size, "batch_size", 1)
        momentum = _number(self.momentum, "momentum", minimum=0.0, strict=False)
        if momentum >= 1.0:
            raise InvalidConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        put("momentum", momentum)
        if self.weight_decay is None:
            put("weight_decay", 5e-4 if self.optimizer == "sgd" else 0.0)
        else:
            put(
                "weight_decay",
                _number(self.weight_decay, "weight_decay", minimum=0.0, strict=False),
            )
        if self.schedule is None:
            put("schedule", "cyclic" if self.method == "fgsm-rs" else "multistep")
        else:
            _choice(self.schedule, "schedule", SCHEDULES)
        if not isinstance(self.bf16, bool):
            raise InvalidConfigError(f"bf16 must be a bool, got {self.bf16!r}")
        put("bounds", check_bounds(self.bounds))
        check_seed(self.seed)
        warm = _integer(self.eps_warmup_epochs, "eps_warmup_epochs", 0)
        if warm > self.epochs:
            raise InvalidConfigError(
                f"eps_warmup_epochs must be <= epochs ({self.epochs}), got {warm}"
            )
        _choice(self.attack_mode, "attack_mode", ATTACK_MODES)
        if self.keep_best is None:
            put("keep_best", self.method == "fgsm-rs")
        elif not isinstance(self.keep_best, bool):
            raise InvalidConfigError(f"keep_best must be a bool or None, got {self.keep_best!r}")

    @property
    def threat(self) -> LpThreat:
        """The threat model trained against."""
        return LpThreat(norm=self.norm, eps=self.eps, bounds=self.bounds)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, defaults resolved."""
        d = dataclasses.asdict(self)
        d["bounds"] = list(self.bounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdversarialTrainingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidConfigError(
                f"unknown adversarial training option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(names))}"
            )
        kwargs = dict(d)
        if "bounds" in kwargs:
            kwargs["bounds"] = tuple(kwargs["bounds"])
        return cls(**kwargs)


# -- result ------------------------------------------------------------------------------------
@dataclass
class AdversarialTrainingResult(Result):
    """What :func:`adversarial_train` did; the module itself is trained in place.

    ``history`` holds one record per completed epoch (including epochs run before a
    resume): ``epoch`` (1-based), ``loss`` (mean training loss), ``adv_accuracy`` (running
    accuracy on the epoch's adversarial training inputs, in the mode of the update),
    ``clean_accuracy`` (on a fixed sample of up to 1,024 training points after the epoch,
    eval mode, fp32), ``lr`` (at the epoch's last iteration), ``eps`` (likewise; below the
    config's during an eps warm-up), ``seconds`` (the epoch's training time, without the
    measurements) and ``eval_seconds``; with ``eval_data`` also ``eval_clean_accuracy`` and
    ``eval_robust_accuracy`` (:func:`modelshield.evasion.pgd`, 10 steps, at the full eps).
    With ``keep_best`` also ``guard_robust_accuracy`` (10-step PGD on the same fixed sample
    of training points). ``resumed_from_epoch``: epochs found in the checkpoint (0 for a
    fresh run). ``selected_epoch``: the epoch whose weights the module holds at the end
    (the last, or with ``keep_best`` the best by ``guard_robust_accuracy`` when the last
    epoch's fell more than 5 points below it).
    """

    result_type: ClassVar[str] = "adversarial-training"

    method: str = ""
    threat: dict[str, Any] = field(default_factory=dict)
    epochs_completed: int = 0
    resumed_from_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    checkpoint: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty when no epoch ran)."""
        return dict(self.history[-1]) if self.history else {}


# -- schedules -----------------------------------------------------------------------------------
def _milestones(epochs: int) -> list[int]:
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 0 < m < epochs})


def learning_rate_at(config: AdversarialTrainingConfig, iteration: int, per_epoch: int) -> float:
    """The learning rate at 0-based ``iteration`` with ``per_epoch`` iterations an epoch.

    ``cyclic``: triangular one-cycle (Wong et al. 2020) over ``epochs · per_epoch``
    iterations, ``lr · (1 − |2(i + ½)/T − 1|)``: from near 0 up to ``lr`` half-way, back down
    to near 0 at the end. ``multistep``: ``lr``, ×0.1 from 50% of the epochs, ×0.01 from 75%.
    """
    lr = float(config.lr)  # type: ignore[arg-type]
    if config.schedule == "constant":
        return lr
    if config.schedule == "cyclic":
        total = config.epochs * per_epoch
        return lr * max(0.0, 1.0 - abs(2.0 * (iteration + 0.5) / total - 1.0))
    epoch = iteration // per_epoch
    return lr * 0.1 ** sum(1 for m in _milestones(config.epochs) if epoch >= m)


def _eps_at(config: AdversarialTrainingConfig, iteration: int, per_epoch: int) -> float:
    if config.eps_warmup_epochs == 0:
        return config.eps
    return config.eps * min(1.0, (iteration + 1) / (config.eps_warmup_epochs * per_epoch))


# -- the inner maximisations ---------------------------------------------------------------------
Forward = Callable[[torch.Tensor], torch.Tensor]


def _pgd_examples(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """PGD on the cross-entropy, every step on every point (Madry et al. 2018)."""
    noise = _lp.sample_ball(
        x.shape, norm, eps, generator=generator, device=x.device, dtype=x.dtype, radius="uniform"
    )
    x_adv = _lp.clip_to_bounds(x + noise, bounds)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(forward(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            step = _lp.steepest_ascent(grad, norm, l1_sparsity=_L1_SPARSITY)
            x_adv = _lp.project_to_threat(x_adv + step_size * step, x, norm, eps, bounds)
    return x_adv.detach()


def _fgsm_rs_examples(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    alpha: float,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Uniform start in the ball, one step of ``alpha``, projection (Wong et al. 2020).

    The start is *not* clipped to ``bounds`` (only the result is), as in Wong et al.'s
    MNIST code: on data whose pixels sit mostly at the edge of the box (MNIST's black
    background), clipping the start removes its randomness there, every example lands on
    the FGSM corner again, and training overfits catastrophically (PGD accuracy 0%).
    """
    noise = _lp.sample_ball(
        x.shape, norm, eps, generator=generator, device=x.device, dtype=x.dtype, radius="uniform"
    )
    start = (x + noise).requires_grad_(True)
    loss = F.cross_entropy(forward(start), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, start)
    with torch.no_grad():
        step = _lp.steepest_ascent(grad, norm, l1_sparsity=_L1_SPARSITY)
        return _lp.project_to_threat(start + alpha * step, x, norm, eps, bounds)


def _trades_examples(
    forward: Forward,
    x: torch.Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    bounds: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``x'`` maximising ``KL(f(x) ‖ f(x'))`` from ``x + 0.001·N(0, I)`` (Zhang et al. 2019)."""
    with torch.no_grad():
        p_clean = F.softmax(forward(x), dim=1)
    start = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = x + _TRADES_INIT_STD * start
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(forward(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        with torch.no_grad():
            step = _lp.steepest_ascent(grad, norm, l1_sparsity=_L1_SPARSITY)
            x_adv = _lp.project_to_threat(x_adv + step_size * step, x, norm, eps, bounds)
    return x_adv.detach()


# -- data ----------------------------------------------------------------------------------------
def _check_xy(x: object, y: object, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        desc = f"dtype {x.dtype}, shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else ""
        raise DataError(
            f"{where}: inputs must be a floating-point tensor (N, ...), got "
            f"{desc or type(x).__name__}"
        )
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise DataError(f"{where}: labels must be a vector of length {len(x)}, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    return x, y


def _check_values(
    x: torch.Tensor, y: torch.Tensor, bounds: tuple[float, float], where: str
) -> None:
    if not len(x):
        raise DataError(f"{where}: no samples")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{where}: inputs contain NaN or infinite values")
    low, high = bounds
    tol = 1e-6 * max(1.0, high - low)
    lo, hi = float(x.min()), float(x.max())
    if lo < low - tol or hi > high + tol:
        raise DataError(
            f"{where}: inputs lie in [{lo:.4g}, {hi:.4g}], outside bounds {bounds}; rescale "
            "the data or set the config's bounds"
        )
    if int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, got {int(y.min())}")


class _Source:
    """Training batches from tensors (shuffled with our own generator) or a DataLoader."""

    def __init__(
        self,
        x: torch.Tensor | DataLoader[Any],
        y: torch.Tensor | None,
        config: AdversarialTrainingConfig,
    ) -> None:
        self.loader: DataLoader[Any] | None = None
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.batch_size = config.batch_size
        if isinstance(x, DataLoader):
            if y is not None:
                raise InvalidConfigError("give labels y with tensors only, not with a DataLoader")
            self.loader = x
            try:
                self.per_epoch = len(x)
            except TypeError:
                raise DataError("the DataLoader must have a length (a map-style dataset)") from None
            if self.per_epoch < 1:
                raise DataError("the DataLoader yields no batches")
            if x.batch_size is not None and x.batch_size != config.batch_size:
                logger.info(
                    "batches come from the DataLoader (batch size %s); config.batch_size=%d "
                    "is not used",
                    x.batch_size,
                    config.batch_size,
                )
            try:
                n: int | None = len(x.dataset)  # type: ignore[arg-type]
            except TypeError:
                n = None
            self.fingerprint: dict[str, Any] = {
                "kind": "dataloader",
                "batches": self.per_epoch,
                "samples": n,
            }
        else:
            if y is None:
                raise InvalidConfigError("labels y are required when x is a tensor")
            x, y = _check_xy(x, y, "training data")
            _check_values(x, y, config.bounds, "training data")
            self.x, self.y = x, y.long()
            self.per_epoch = math.ceil(len(x) / config.batch_size)
            self.fingerprint = {
                "kind": "tensors",
                "samples": len(x),
                "input_shape": list(x.shape[1:]),
            }

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is not None:
            for batch in self.loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise DataError(
                        "the DataLoader must yield (inputs, labels) pairs, got "
                        f"{type(batch).__name__}"
                    )
                yield _check_xy(batch[0], batch[1], "DataLoader batch")
            return
        x, y = self._tensors()
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield x[idx], y[idx]

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.x is None or self.y is None:
            raise RuntimeError("this training source reads a DataLoader, not tensors")
        return self.x, self.y

    def probe(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Up to 1,024 evenly spaced training points, fixed for the whole run."""
        if self.loader is None:
            x, y = self._tensors()
            n = len(x)
            idx = torch.linspace(0, n - 1, min(n, _PROBE_POINTS)).round().long()
            return x[idx.to(x.device)], y[idx.to(y.device)]
        try:
            data = self.loader.dataset
            n = len(data)  # type: ignore[arg-type]
            picks = torch.linspace(0, n - 1, min(n, _PROBE_POINTS)).round().long().tolist()
            collate = self.loader.collate_fn
            batch = collate([data[i] for i in picks])  # type: ignore[arg-type]
            x, y = _check_xy(batch[0], batch[1], "DataLoader dataset")
        except (TypeError, NotImplementedError, IndexError, KeyError, DataError) as exc:
            logger.info("no clean-accuracy probe from this DataLoader's dataset (%s)", exc)
            return None
        return x, y

    def rng_states(self) -> dict[str, torch.Tensor]:
        states: dict[str, torch.Tensor] = {}
        if self.loader is not None:
            for name, owner in (("loader", self.loader), ("sampler", self.loader.sampler)):
                gen = getattr(owner, "generator", None)
                if isinstance(gen, torch.Generator):
                    states[name] = gen.get_state()
        return states

    def set_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        if self.loader is None:
            return
        for name, owner in (("loader", self.loader), ("sampler", self.loader.sampler)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and name in states:
                gen.set_state(states[name])


def _eval_tensors(eval_data: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    if eval_data is None:
        return None
    if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2:
        x, y = eval_data
    elif hasattr(eval_data, "x") and hasattr(eval_data, "y"):
        x, y = eval_data.x, eval_data.y
    else:
        raise InvalidConfigError(
            f"eval_data must be a pair (x, y) of tensors or a Dataset, got {type(eval_data).__name__}"
        )
    return _check_xy(x, y, "eval_data")


# -- checkpoints ---------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _load_checkpoint(
    path: Path, config: AdversarialTrainingConfig, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a damaged or foreign file
        raise ModelLoadError(
            f"{path}: cannot read the adversarial-training checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to start afresh"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise InvalidConfigError(
            f"{path} is not an adversarial-training checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
            f"expected {_CHECKPOINT_FORMAT!r})"
        )
    saved, now = state["config"], config.to_dict()
    diffs = [k for k in now if k != "epochs" and saved.get(k) != now[k]]
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in diffs)
        raise InvalidConfigError(
            f"{path} was written with a different config ({detail}); use another "
            "checkpoint_dir or delete the checkpoint to start afresh"
        )
    if state["data"] != fingerprint:
        raise InvalidConfigError(
            f"{path} was written for other training data ({state['data']}), now "
            f"{fingerprint}; use another checkpoint_dir"
        )
    if saved["epochs"] != config.epochs and config.schedule != "constant":
        logger.warning(
            "resuming a %d-epoch run as a %d-epoch run: the %s learning-rate schedule depends "
            "on the number of epochs, so the remaining epochs follow the new schedule",
            saved["epochs"],
            config.epochs,
            config.schedule,
        )
    return state


# -- the loop ------------------------------------------------------------------------------------
def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _evaluate(
    module: nn.Module,
    probe: tuple[torch.Tensor, torch.Tensor] | None,
    eval_set: tuple[torch.Tensor, torch.Tensor] | None,
    config: AdversarialTrainingConfig,
    device: torch.device,
    epoch: int,
) -> dict[str, Any]:
    """Clean (and with ``keep_best`` PGD) accuracy on the training probe; clean and
    PGD-robust accuracy on eval_data."""
    out: dict[str, Any] = {"clean_accuracy": None}
    module.eval()
    with torch.no_grad():
        if probe is not None:
            px, py = probe
            correct = 0
            for i in range(0, len(px), _EVAL_BATCH):
                xb = px[i : i + _EVAL_BATCH].to(device)
                correct += int(
                    (_logits(module(xb)).argmax(1) == py[i : i + _EVAL_BATCH].to(device)).sum()
                )
            out["clean_accuracy"] = correct / len(px)
    if probe is not None and config.keep_best:
        out["guard_robust_accuracy"] = _guard_accuracy(module, probe, config, device, epoch)
    if eval_set is not None:
        ex, ey = eval_set
        clf = from_torch(
            module, input_shape=tuple(ex.shape[1:]), bounds=config.bounds, device=device
        )
        clean = robust = 0
        for i in range(0, len(ex), _EVAL_BATCH):
            xb, yb = ex[i : i + _EVAL_BATCH], ey[i : i + _EVAL_BATCH]
            res = pgd(clf, xb, yb, threat=config.threat, steps=10, seed=config.seed)
            if res.clean_correct is None or res.success is None:  # set for untargeted attacks
                raise RuntimeError("evasion.pgd returned no per-sample outcomes")
            clean += int(res.clean_correct.sum())
            robust += int((~res.success).sum())
        out["eval_clean_accuracy"] = clean / len(ex)
        out["eval_robust_accuracy"] = robust / len(ex)
    return out


def _guard_accuracy(
    module: nn.Module,
    probe: tuple[torch.Tensor, torch.Tensor],
    config: AdversarialTrainingConfig,
    device: torch.device,
    epoch: int,
) -> float:
    """10-step PGD accuracy on the probe, fp32, eval mode, its own seeded generator (so it
    draws nothing from the training's random streams)."""
    gen = make_generator((config.seed + _GUARD_SEED_STEP * (epoch + 1)) % 2**63, device)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return _logits(module(inp)).float()

    px, py = probe
    correct = 0
    for i in range(0, len(px), _EVAL_BATCH):
        xb, yb = px[i : i + _EVAL_BATCH].to(device), py[i : i + _EVAL_BATCH].to(device).long()
        x_adv = _pgd_examples(
            forward,
            xb,
            yb,
            norm=config.norm,
            eps=config.eps,
            step_size=2.5 * config.eps / 10,
            steps=10,
            bounds=config.bounds,
            generator=gen,
        )
        with torch.no_grad():
            correct += int((forward(x_adv).argmax(1) == yb).sum())
    return correct / len(px)


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModelError(f"model must return logits of shape (N, C), got {shape}")
    return out


def adversarial_train(
    module: nn.Module,
    x: torch.Tensor | DataLoader[Any],
    y: torch.Tensor | None = None,
    config: AdversarialTrainingConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    eval_data: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> AdversarialTrainingResult:
    """Train ``module`` in place with PGD-AT, TRADES or FGSM-RS (see the module docstring).

    Data: tensors ``x`` (inputs in ``config.bounds``) and ``y`` (class indices), shuffled
    each epoch with a generator seeded by ``config.seed``; or a ``DataLoader`` yielding
    ``(inputs, labels)`` as ``x`` (``y`` omitted; its batch size applies). ``device``:
    where to train, default the device the module's parameters are on. ``eval_data``: a
    pair ``(x, y)`` or a :class:`~modelshield.core.data.Dataset`, evaluated after each
    epoch (clean and 10-step PGD accuracy). ``callback(record)`` is called after each
    epoch's checkpoint is written, with that epoch's history record. The global torch RNG
    (dropout, DataLoader shuffling) is seeded with ``config.seed`` inside a fork, so the
    caller's RNG state is left as it was. The module is left in eval mode.

    Madry et al. 2018 (PGD-AT), Zhang et al. 2019 (TRADES), Wong et al. 2020 (FGSM-RS).
    """
    started = time.perf_counter()
    if config is None:
        config = AdversarialTrainingConfig()
    if not isinstance(config, AdversarialTrainingConfig):
        raise InvalidConfigError(
            f"config must be an AdversarialTrainingConfig, got {type(config).__name__}"
        )
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(
            f"adversarial training needs a torch nn.Module, got {type(module).__name__}"
        )
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UnsupportedModelError("the module has no trainable parameters")
    dev = _module_device(module) if device is None else select_device(device)
    module.to(dev)
    source = _Source(x, y, config)
    eval_set = _eval_tensors(eval_data)
    if eval_set is not None:
        _check_values(*eval_set, config.bounds, "eval_data")
    probe = source.probe()
    if probe is None and config.keep_best:
        logger.warning(
            "keep_best needs a fixed sample of training points (a DataLoader over an indexable "
            "dataset); this DataLoader has none, so the catastrophic-overfitting guard is off"
        )

    if config.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=float(config.lr),  # type: ignore[arg-type]
            momentum=config.momentum,
            weight_decay=float(config.weight_decay),  # type: ignore[arg-type]
        )
    else:
        opt = torch.optim.Adam(
            params,
            lr=float(config.lr),  # type: ignore[arg-type]
            weight_decay=float(config.weight_decay),  # type: ignore[arg-type]
        )
    shuffle_gen = make_generator(config.seed)
    attack_gen = make_generator((config.seed + _ATTACK_SEED_OFFSET) % 2**63, dev)
    per_epoch = source.per_epoch
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    fork_devices = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if (dev.type == "cuda")
        else []
    )

    def forward(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=config.bf16):
            out = _logits(module(inp))
        return out.float()

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}  # keep_best: {"epoch", "guard_robust_accuracy", "model"}
    start_epoch = 0
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        if ckpt is not None and ckpt.exists():
            state = _load_checkpoint(ckpt, config, source.fingerprint)
            try:
                module.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise InvalidConfigError(
                    f"{ckpt} does not fit this model: {str(exc).splitlines()[0]}"
                ) from exc
            start_epoch = int(state["epoch"])
            history = list(state["history"])
            best = dict(state["best"])
            rng = state["rng"]
            _set_rng_state(rng["global"], dev)
            shuffle_gen.set_state(rng["shuffle"])
            attack_gen.set_state(rng["attack"])
            source.set_rng_states(rng["data"])
            logger.info("resuming from %s after epoch %d", ckpt, start_epoch)
        if start_epoch >= config.epochs:
            logger.info("checkpoint has %d epochs already; nothing to train", start_epoch)
        state_checked = False
        bar = tqdm(
            total=config.epochs,
            initial=min(start_epoch, config.epochs),
            desc=f"{config.method} epochs",
            disable=None,
        )
        try:
            for epoch in range(start_epoch, config.epochs):
                t0 = time.perf_counter()
                record = _train_epoch(
                    module,
                    forward,
                    opt,
                    source.batches(shuffle_gen),
                    config,
                    epoch,
                    per_epoch,
                    attack_gen,
                    dev,
                    check=not state_checked,
                    all_labels=source.y,
                )
                state_checked = True
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - t0
                t1 = time.perf_counter()
                record.update(_evaluate(module, probe, eval_set, config, dev, epoch))
                record.update(seconds=seconds, eval_seconds=time.perf_counter() - t1)
                history.append(record)
                guard = record.get("guard_robust_accuracy")
                if guard is not None and (not best or guard >= best["guard_robust_accuracy"]):
                    best = {
                        "epoch": epoch + 1,
                        "guard_robust_accuracy": guard,
                        "model": {
                            k: v.detach().cpu().clone() for k, v in module.state_dict().items()
                        },
                    }
                if ckpt is not None:
                    _save_checkpoint(
                        ckpt,
                        module,
                        opt,
                        config,
                        history,
                        best,
                        source,
                        {"shuffle": shuffle_gen, "attack": attack_gen},
                        dev,
                    )
                logger.info(
                    "%s epoch %d/%d: loss %.4f, adversarial accuracy %.3f, clean accuracy %s%s, "
                    "lr %.4g, %.1fs",
                    config.method,
                    epoch + 1,
                    config.epochs,
                    record["loss"],
                    record["adv_accuracy"],
                    _fmt(record["clean_accuracy"]),
                    "" if guard is None else f", PGD accuracy {guard:.3f}",
                    record["lr"],
                    seconds,
                )
                bar.update(1)
                if callback is not None:
                    callback(dict(record))
        finally:
            bar.close()
            module.eval()
        selected = len(history)
        last_guard = history[-1].get("guard_robust_accuracy") if history else None
        if (
            best
            and last_guard is not None
            and last_guard < best["guard_robust_accuracy"] - _GUARD_TOLERANCE
        ):
            try:
                module.load_state_dict(best["model"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise InvalidConfigError(
                    f"{ckpt} does not fit this model: {str(exc).splitlines()[0]}"
                ) from exc
            selected = int(best["epoch"])
            logger.warning(
                "keep_best: PGD accuracy on the guard sample fell from %.3f (epoch %d) to %.3f "
                "(epoch %d), catastrophic overfitting; restored the weights of epoch %d",
                best["guard_robust_accuracy"],
                selected,
                last_guard,
                len(history),
                selected,
            )
    return AdversarialTrainingResult(
        config=config.to_dict(),
        seed=config.seed,
        wall_time=time.perf_counter() - started,
        method=config.method,
        threat=config.threat.to_dict(),
        epochs_completed=len(history),
        resumed_from_epoch=start_epoch,
        history=history,
        selected_epoch=selected,
        checkpoint=str(ckpt) if ckpt is not None else None,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _train_epoch(
    module: nn.Module,
    forward: Forward,
    opt: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    config: AdversarialTrainingConfig,
    epoch: int,
    per_epoch: int,
    attack_gen: torch.Generator,
    device: torch.device,
    *,
    check: bool,
    all_labels: torch.Tensor | None,
) -> dict[str, Any]:
    """One epoch of training; with ``check`` the first batch (and ``all_labels``, the whole
    label tensor when known) is validated before any update."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    iteration = epoch * per_epoch
    lr_t = eps_t = 0.0
    progress = tqdm(batches, total=per_epoch, desc=f"epoch {epoch + 1}", leave=False, disable=None)
    for xb, yb in progress:
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True).long()
        if check:
            _check_first_batch(module, xb, yb, config, forward, all_labels)
            check = False
        lr_t = learning_rate_at(config, iteration, per_epoch)
        for group in opt.param_groups:
            group["lr"] = lr_t
        eps_t = _eps_at(config, iteration, per_epoch)
        step_t = float(config.step_size) * eps_t / config.eps  # type: ignore[arg-type]
        loss, logits = _step(module, forward, xb, yb, config, eps_t, step_t, attack_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(dim=1) == yb).sum()
        seen += len(yb)
        iteration += 1
    return {
        "epoch": epoch + 1,
        "loss": float(loss_sum) / max(seen, 1),
        "adv_accuracy": int(correct) / max(seen, 1),
        "lr": lr_t,
        "eps": eps_t,
    }


def _step(
    module: nn.Module,
    forward: Forward,
    xb: torch.Tensor,
    yb: torch.Tensor,
    config: AdversarialTrainingConfig,
    eps: float,
    step_size: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's training loss and the logits on its adversarial inputs (train mode)."""
    module.train(config.attack_mode == "train")
    if config.method == "trades":
        x_adv = _trades_examples(
            forward,
            xb,
            norm=config.norm,
            eps=eps,
            step_size=step_size,
            steps=config.steps,
            bounds=config.bounds,
            generator=generator,
        )
        module.train()
        logits_clean = forward(xb)
        logits = forward(x_adv)
        kl = F.kl_div(
            F.log_softmax(logits, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean"
        )
        return F.cross_entropy(logits_clean, yb) + config.beta * kl, logits
    if config.method == "pgd-at":
        x_adv = _pgd_examples(
            forward,
            xb,
            yb,
            norm=config.norm,
            eps=eps,
            step_size=step_size,
            steps=config.steps,
            bounds=config.bounds,
            generator=generator,
        )
    else:
        x_adv = _fgsm_rs_examples(
            forward,
            xb,
            yb,
            norm=config.norm,
            eps=eps,
            alpha=step_size,
            bounds=config.bounds,
            generator=generator,
        )
    module.train()
    logits = forward(x_adv)
    return F.cross_entropy(logits, yb), logits


def _check_first_batch(
    module: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    config: AdversarialTrainingConfig,
    forward: Forward,
    all_labels: torch.Tensor | None,
) -> None:
    """Bounds, finiteness and label range of the first batch (and of all labels given as a
    tensor), against the number of outputs of one eval-mode forward pass."""
    _check_values(xb, yb, config.bounds, "training data")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            num_classes = forward(xb[:2]).shape[1]
    except UnsupportedModelError:
        raise
    except Exception as exc:  # the module's own error, reported in one line
        raise UnsupportedModelError(
            f"model failed on a training batch of shape {tuple(xb.shape)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        module.train(was_training)
    if num_classes < 2:
        raise UnsupportedModelError(f"model must return at least 2 logits, got {num_classes}")
    top = int((all_labels if all_labels is not None else yb).max())
    if top >= num_classes:
        raise DataError(
            f"training data: labels must lie in [0, {num_classes - 1}] (the model has "
            f"{num_classes} outputs), got {top}"
        )


def _save_checkpoint(
    path: Path,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    config: AdversarialTrainingConfig,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    source: _Source,
    generators: dict[str, torch.Generator],
    device: torch.device,
) -> None:
    """Write ``last.pt`` atomically; only weights_only-loadable types inside."""
    epoch = len(history)
    state = {
        "format": _CHECKPOINT_FORMAT,
        "version": __version__,
        "config": config.to_dict(),
        "data": source.fingerprint,
        "epoch": epoch,
        "scheduler": {"schedule": config.schedule, "iteration": epoch * source.per_epoch},
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": opt.state_dict(),
        "rng": {
            "global": _rng_state(device),
            **{name: g.get_state() for name, g in generators.items()},
            "data": source.rng_states(),
        },
        "history": history,
        "best": best,
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
