"""DP-SGD training on Opacus with honest accounting and a privacy ledger.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): every step samples a
batch by Poisson sampling (each example independently with probability ``q``), clips each
per-example gradient to norm ``C``, sums them, adds Gaussian noise ``N(0, (sigma C)^2)`` and
divides by the expected batch size. The privacy spent by ``T`` such steps is computed by an
accountant (PRV: Gopi, Lee & Wutschitz 2021; RDP: Mironov 2017) from ``(q, sigma, T, delta)``
alone, which is why the ledger records exactly those.

Opacus supplies the per-example gradient engines (hooks, functorch, ghost clipping) and
the clipping/noising optimizer; this module does the sampling, the accounting, the mode
choice, secure noise on request, checkpoints and the ledger.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield import __version__
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    PrivacyBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.privacy.accounting import (
    ACCOUNTANTS,
    check_dp_parameters,
    compute_epsilon,
    find_noise_multiplier,
)

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
"""Opacus per-example gradient engines we drive: forward/backward hooks with per-layer
formulas; ``torch.func`` vmap over per-example losses; ghost clipping (Li et al. 2022,
Bu et al. 2023), which computes per-example gradient norms without materialising them and
takes a second backward pass with the clipping weights."""

MECHANISM = "poisson_subsampled_gaussian"
LEDGER_VERSION = 1
RNG_NOTE_OFF = (
    "secure RNG off: noise and batch sampling use PyTorch's seeded pseudo-random generator, "
    "fine for experiments and reproducible, but not a cryptographic guarantee; retrain with "
    "--secure-rng before release"
)
RNG_NOTE_ON = (
    "secure RNG on: noise and Poisson sampling draw from the operating system's CSPRNG "
    "(os.urandom), Gaussian noise as the sum of 4 samples scaled by 1/2 against "
    "floating-point attacks (Holohan & Braghin 2021); the run is not reproducible"
)


# -- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings. Give exactly one of ``epsilon`` (target) or ``noise_multiplier``.

    ``batch_size`` is the *expected* batch size: the sample rate is ``batch_size / N``.
    ``max_epsilon`` is a hard budget: training refuses to start (or continue) if the planned
    steps would spend more; with a target ``epsilon`` it defaults to that target.
    """

    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    accountant: str = "prv"
    mode: str = "auto"
    poisson: bool = True
    secure_rng: bool = False
    max_epsilon: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise InvalidConfigError(
                "give exactly one of epsilon (a target) or noise_multiplier, got "
                f"epsilon={self.epsilon}, noise_multiplier={self.noise_multiplier}"
            )
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise InvalidConfigError(f"epsilon must be a positive number, got {self.epsilon}")
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise InvalidConfigError(
                f"noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}"
            )
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise InvalidConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InvalidConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidConfigError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidConfigError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise InvalidConfigError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise InvalidConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.accountant not in ACCOUNTANTS:
            raise InvalidConfigError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.mode not in ("auto", *GRAD_SAMPLE_MODES):
            raise InvalidConfigError(
                f"mode must be auto or one of {', '.join(GRAD_SAMPLE_MODES)}, got {self.mode!r}"
            )
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise InvalidConfigError(f"max_epsilon must be > 0, got {self.max_epsilon}")

    @property
    def budget(self) -> float | None:
        """The epsilon training may not exceed (``max_epsilon``, else the target)."""
        return self.max_epsilon if self.max_epsilon is not None else self.epsilon

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrivacyLedger:
    """What was spent, in the terms an accountant needs: ``(q, sigma, steps, delta)``.

    Saved as JSON beside the model; anyone can recompute ``epsilon`` from it with any
    accountant (``modelshield.privacy.accounting.compute_epsilon``).
    """

    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    accountant: str
    epsilon: float
    delta: float
    max_grad_norm: float
    expected_batch_size: int
    dataset_size: int
    epochs: int
    sampling: str
    grad_sample_mode: str
    secure_rng: bool
    rng_note: str
    target_epsilon: float | None = None
    budget: float | None = None
    epsilon_other: dict[str, float] = field(default_factory=dict)
    per_epoch: list[dict[str, Any]] = field(default_factory=list)
    module_fixes: list[str] = field(default_factory=list)
    mode_choice: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    opacus_version: str = ""
    modelshield_version: str = __version__
    ledger_version: int = LEDGER_VERSION
    model_sha256: str | None = None
    """SHA-256 of the model file the ledger was written for (set by ``modelshield train``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("epsilon", "budget", "target_epsilon"):
            v = d.get(k)
            if isinstance(v, float) and math.isinf(v):
                d[k] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        """Read a ledger back (e.g. ``json.load`` of ``ledger.json``), checking its fields."""
        names = {f.name: f for f in fields(cls)}
        required = [
            n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [n for n in required if n not in d]
        if missing:
            raise DataError(f"privacy ledger lacks {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("epsilon", "budget", "target_epsilon"):
            if kw.get(k) == "inf":
                kw[k] = math.inf
        try:
            led = cls(**kw)
            q, sigma, steps, delta = (
                float(led.sample_rate),
                float(led.noise_multiplier),
                int(led.steps),
                float(led.delta),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"privacy ledger has a malformed field: {exc}") from exc
        check_dp_parameters(sample_rate=q, noise_multiplier=sigma, steps=steps, delta=delta)
        return led

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ledger as JSON (atomically); returns the path."""
        atomic_write_json(Path(path), self.to_dict())
        return Path(path)


@dataclass
class DPTrainingResult:
    """The trained (plain, unwrapped) module, its ledger and the per-epoch history."""

    module: nn.Module
    ledger: PrivacyLedger
    history: list[dict[str, Any]]
    wall_time: float
    resumed_from_epoch: int = 0


# -- module preparation -----------------------------------------------------------------------
def fix_module(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """Make ``module`` trainable with DP-SGD; returns (module, what changed, one line each).

    BatchNorm mixes examples in a batch, so per-example gradients do not exist: Opacus's
    ``ModuleValidator.fix`` swaps it for GroupNorm (and fixes other unsupported layers).
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(module, strict=False)
    if not errors:
        return module, []
    before = {name: type(m).__name__ for name, m in module.named_modules()}
    fixed = ModuleValidator.fix(module)
    after = {name: type(m).__name__ for name, m in fixed.named_modules()}
    changes = [
        f"{name or '<root>'}: {kind} -> {after[name]}"
        for name, kind in before.items()
        if name in after and after[name] != kind
    ]
    changes += [f"{name}: removed ({kind})" for name, kind in before.items() if name not in after]
    left = ModuleValidator.validate(fixed, strict=False)
    if left:
        raise UnsupportedModelError(
            "the model cannot be trained with DP-SGD even after Opacus's fixes: "
            + "; ".join(str(e) for e in left[:3])
        )
    if not changes:
        changes = [str(e) for e in errors]
    for line in changes:
        logger.warning("DP-SGD: changed the model: %s", line)
    return fixed, changes


def _strip_dp_attributes(module: nn.Module) -> nn.Module:
    """Drop what Opacus left on parameters so the module is a plain one again."""
    for p in module.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    return module


# -- randomness -------------------------------------------------------------------------------
def _urandom_uniform(n: int) -> Tensor:
    """``n`` float64 uniforms in (0, 1) from 53 random bits each of ``os.urandom``."""
    raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
    bits = torch.bitwise_right_shift(raw, 11) & ((1 << 53) - 1)
    return (bits.double() + 0.5) / float(1 << 53)


def secure_normal(shape: torch.Size | tuple[int, ...], std: float) -> Tensor:
    """Gaussian noise ``N(0, std^2)`` from the OS CSPRNG (Box-Muller on ``os.urandom``).

    Returned as the sum of four independent draws times 1/2, the floating-point hardening
    of Holohan & Braghin 2021 ("Secure Random Sampling in Differential Privacy") that Opacus
    also applies in its secure mode.
    """
    n = math.prod(shape)
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(4):
        u1, u2 = _urandom_uniform(n), _urandom_uniform(n)
        total += torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (total * (std / 2.0)).reshape(shape)


class PoissonBatches:
    """Poisson sampling: each step includes every example independently with probability q.

    ``steps`` batches per epoch (Opacus's convention, ``round(1 / q)``); batch sizes vary
    and can be empty. The secure variant draws the inclusion coins from ``os.urandom``.
    """

    def __init__(
        self, n: int, sample_rate: float, steps: int, *, generator: torch.Generator | None
    ) -> None:
        self.n, self.q, self.steps, self.generator = n, sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.steps):
            if self.generator is None:
                u = _urandom_uniform(self.n)
            else:
                u = torch.rand(self.n, generator=self.generator, dtype=torch.float64)
            yield torch.nonzero(u < self.q).flatten()


class ShuffledBatches:
    """Fixed-size batches of a random permutation (no Poisson guarantee; see the ledger)."""

    def __init__(self, n: int, batch_size: int, *, generator: torch.Generator | None) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        if self.generator is None:
            order = torch.argsort(_urandom_uniform(self.n))
        else:
            order = torch.randperm(self.n, generator=self.generator)
        yield from order.split(self.batch_size)


# -- the Opacus engine ------------------------------------------------------------------------
@dataclass
class _Engine:
    model: nn.Module  # the GradSampleModule wrapper
    optimizer: Any  # opacus DPOptimizer
    loss_fn: Callable[[Tensor, Tensor], Any]
    mode: str

    def step(self, xb: Tensor, yb: Tensor) -> float:
        """One DP-SGD step on a (possibly empty) Poisson batch; returns the batch loss."""
        with warnings.catch_warnings():
            # Opacus's ghost clipping backpropagates to module outputs only: torch warns
            # about it on every step, harmlessly.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return self._step(xb, yb)

    def _step(self, xb: Tensor, yb: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if xb.shape[0] == 0:
            # An empty Poisson batch still releases a noisy update (noise only).
            for p in self.optimizer.params:
                if self.mode == "ghost":  # ghost clipping reads the clipped sum from p.grad
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            self.optimizer.step()
            return math.nan
        out = self.model(xb)
        loss = self.loss_fn(out, yb)
        loss.backward()
        self.optimizer.step()
        per_sample = loss.loss_per_sample if hasattr(loss, "loss_per_sample") else loss
        return float(per_sample.detach().mean())

    def close(self) -> nn.Module:
        """Remove Opacus's hooks; return the plain trained module."""
        inner = getattr(self.model, "_module", self.model)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"Opacus wrapped a {type(inner).__name__}, not a module")
        remove = getattr(self.model, "remove_hooks", None)
        if callable(remove):
            try:
                remove()
            except Exception as exc:  # already removed, or an Opacus version difference
                logger.debug("remove_hooks: %s", exc)
        return _strip_dp_attributes(inner)


def _base_optimizer(module: nn.Module, cfg: DPConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def _secure_add_noise(optimizer: Any) -> Callable[[], None]:
    """An ``add_noise`` for an Opacus optimizer that draws from :func:`secure_normal`."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_normal(tuple(p.summed_grad.shape), std)
            p.grad = (p.summed_grad + noise.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    return add_noise


def build_engine(
    module: nn.Module,
    *,
    mode: str,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    cfg: DPConfig,
    noise_generator: torch.Generator | None,
) -> _Engine:
    """Wrap ``module`` for per-example gradients and build the clipping/noising optimizer."""
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import get_optimizer_class

    if mode not in GRAD_SAMPLE_MODES:
        raise InvalidConfigError(
            f"mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {mode!r}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra: dict[str, Any] = {}
        if mode == "ghost":  # the ghost module clips itself: it must know C (default 1.0)
            extra["max_grad_norm"] = max_grad_norm
        wrapped = prepare_module(
            module, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **extra
        )
    optim_cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    optimizer = optim_cls(
        optimizer=_base_optimizer(module, cfg),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=False,
    )
    if cfg.secure_rng:
        optimizer.add_noise = _secure_add_noise(optimizer)
    loss_fn: Callable[[Tensor, Tensor], Any]
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        loss_fn = DPLossFastGradientClipping(wrapped, optimizer, nn.CrossEntropyLoss(), "mean")
    else:
        loss_fn = F.cross_entropy
    return _Engine(wrapped, optimizer, loss_fn, mode)


def choose_mode(
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    *,
    device: torch.device,
    repeats: int = 5,
) -> dict[str, Any]:
    """Pick the fastest Opacus mode whose clipped gradient is correct for this model.

    Each mode takes one noiseless step from the same weights on the same random batch;
    a mode whose update differs from functorch's (the general ``torch.func`` path; hooks'
    when functorch fails) is rejected. The rest are timed round-robin (median of
    ``repeats`` steps each), so load on the machine hits every mode alike. Random inputs and a copy of the model: no
    private data is touched and no privacy budget is spent.
    """
    probe_cfg = DPConfig(noise_multiplier=0.0, batch_size=batch_size, lr=1.0, mode="hooks")
    b = max(1, min(batch_size, 512))
    g = torch.Generator().manual_seed(0)
    x = torch.rand((b, *input_shape), generator=g).to(device)
    y = torch.randint(0, num_classes, (b,), generator=g).to(device)
    engines: dict[str, _Engine] = {}
    updates: dict[str, list[Tensor]] = {}
    failed: dict[str, str] = {}
    for mode in ("functorch", *[m for m in GRAD_SAMPLE_MODES if m != "functorch"]):
        try:
            copy_ = copy.deepcopy(module).to(device).train()
            before = [p.detach().clone() for p in copy_.parameters() if p.requires_grad]
            engine = build_engine(
                copy_,
                mode=mode,
                noise_multiplier=0.0,
                max_grad_norm=1.0,
                expected_batch_size=b,
                cfg=probe_cfg,
                noise_generator=None,
            )
            engine.step(x, y)
            after = [p.detach() for p in copy_.parameters() if p.requires_grad]
            updates[mode] = [b0 - a0 for b0, a0 in zip(before, after, strict=True)]
            engines[mode] = engine
        except Exception as exc:
            failed[mode] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.info("DP-SGD mode %s does not work for this model: %s", mode, failed[mode])
    ref_mode = next((m for m in ("functorch", "hooks") if m in updates), None)
    reference = updates.get(ref_mode) if ref_mode is not None else None
    if reference is not None:
        for mode, upd in updates.items():
            diff = torch.cat([(u - r).flatten() for u, r in zip(upd, reference, strict=True)])
            ref = torch.cat([r.flatten() for r in reference])
            err = float(diff.norm() / ref.norm().clamp_min(1e-12))
            if err > 1e-3:
                failed[mode] = (
                    f"clipped gradient differs from {ref_mode}'s (relative error {err:.2g})"
                )
                logger.warning("DP-SGD mode %s rejected: %s", mode, failed[mode])
                engines.pop(mode).close()
    if not engines:
        raise UnsupportedModelError(
            "no Opacus per-example gradient mode works for this model: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    samples: dict[str, list[float]] = {m: [] for m in engines}
    for _ in range(repeats):
        for mode, engine in engines.items():
            _sync(device)
            t0 = time.perf_counter()
            engine.step(x, y)
            _sync(device)
            samples[mode].append(time.perf_counter() - t0)
    for engine in engines.values():
        engine.close()
    timings = {m: sorted(v)[len(v) // 2] for m, v in samples.items()}
    best = min(timings, key=lambda k: timings[k])
    logger.info(
        "DP-SGD mode: %s (%s)",
        best,
        ", ".join(f"{k} {v * 1e3:.1f} ms/step" for k, v in sorted(timings.items())),
    )
    return {"mode": best, "seconds_per_step": timings, "failed": failed, "batch": b}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- training ---------------------------------------------------------------------------------
def _opacus_version() -> str:
    try:
        from opacus.version import __version__ as v

        return str(v)
    except Exception:
        return "unknown"


def plan_steps(cfg: DPConfig, n: int) -> tuple[float, int]:
    """``(sample rate, total steps)`` of a run on ``n`` examples.

    Poisson sampling takes ``round(1 / q)`` steps per epoch (Opacus's convention);
    shuffled batches take ``ceil(n / batch_size)``.
    """
    q = min(1.0, cfg.batch_size / n)
    per_epoch = max(1, round(1 / q)) if cfg.poisson else math.ceil(n / cfg.batch_size)
    return q, per_epoch * cfg.epochs


def plan_noise(cfg: DPConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier: given, or the smallest one meeting the target epsilon."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    assert cfg.epsilon is not None
    return find_noise_multiplier(
        target_epsilon=cfg.epsilon,
        delta=cfg.delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=cfg.accountant,
    )


def _check_budget(cfg: DPConfig, q: float, sigma: float, steps: int, when: str) -> float:
    eps = compute_epsilon(
        sample_rate=q,
        noise_multiplier=sigma,
        steps=steps,
        delta=cfg.delta,
        accountant=cfg.accountant,
    )
    budget = cfg.budget
    if budget is not None and eps > budget * (1 + 1e-3):
        raise PrivacyBudgetExceeded(
            f"{when}: {steps} steps at sample rate {q:.4g} and noise multiplier {sigma:.4g} spend "
            f"epsilon {eps:.4g} (delta {cfg.delta:g}, {cfg.accountant}), over the budget {budget:g}"
        )
    return eps


def _evaluate(module: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    module.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1024):
            correct += int(
                (module(x[i : i + 1024].to(device)).argmax(1).cpu() == y[i : i + 1024]).sum()
            )
    return correct / max(len(x), 1)


def train_dp(
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: DPConfig,
    *,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    validation: tuple[Tensor, Tensor] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    account_epochs: bool = True,
) -> DPTrainingResult:
    """Train ``module`` on ``(x, y)`` with DP-SGD (Abadi et al. 2016) and account for it.

    Refuses (``PrivacyBudgetExceeded``) before the first step if the planned steps would
    spend more than ``cfg.budget``. With ``checkpoint``, the state after every epoch is
    saved there and a later call with the same data and config resumes from it.
    ``account_epochs=False`` skips the per-epoch epsilon and the second accountant (an
    audit trains many models and needs only the final figure).
    """
    started = time.time()
    device = torch.device(device)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise InvalidConfigError(
            f"x must be (N, ...) and y (N,) with N >= 1, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = len(x)
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if not bool(torch.isfinite(x).all()):
        raise DataError("training inputs contain NaN or infinite values")
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise DataError(
            f"labels must be class indices in [0, {k}), got [{int(y.min())}, {int(y.max())}]"
        )
    q, total_steps = plan_steps(cfg, n)
    steps_per_epoch = total_steps // cfg.epochs
    sigma = plan_noise(cfg, q, total_steps)
    check_dp_parameters(sample_rate=q, noise_multiplier=sigma, steps=total_steps, delta=cfg.delta)
    planned_eps = _check_budget(cfg, q, sigma, total_steps, "refusing to train")
    notes: list[str] = []
    if not cfg.poisson:
        notes.append(
            "batches are shuffled, not Poisson-sampled: the accountant's epsilon assumes Poisson "
            "sampling and is not a proven bound for this run"
        )
        logger.warning(notes[-1])
    rng_note = RNG_NOTE_ON if cfg.secure_rng else RNG_NOTE_OFF
    if cfg.secure_rng:
        logger.info(rng_note)
    else:
        logger.warning(rng_note)

    module, fixes = fix_module(module)
    module = module.to(device).train()
    if cfg.mode == "auto":
        choice = choose_mode(module, tuple(x.shape[1:]), k, cfg.batch_size, device=device)
        mode = choice["mode"]
    else:
        choice = {"mode": cfg.mode, "seconds_per_step": {}, "failed": {}, "requested": True}
        mode = cfg.mode

    torch.manual_seed(cfg.seed)
    gen = None if cfg.secure_rng else torch.Generator().manual_seed(cfg.seed)
    noise_gen = None if cfg.secure_rng else torch.Generator(device=device).manual_seed(cfg.seed + 1)
    sampler: PoissonBatches | ShuffledBatches = (
        PoissonBatches(n, q, steps_per_epoch, generator=gen)
        if cfg.poisson
        else ShuffledBatches(n, cfg.batch_size, generator=gen)
    )
    engine = build_engine(
        module,
        mode=mode,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=max(1, round(q * n)),
        cfg=cfg,
        noise_generator=noise_gen,
    )
    history: list[dict[str, Any]] = []
    steps_done, start_epoch = 0, 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        start_epoch, steps_done, history = _load_checkpoint(
            ckpt, engine, module, gen, noise_gen, cfg, n
        )
        logger.info("DP-SGD: resuming after epoch %d (%d steps spent)", start_epoch, steps_done)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        module.train()
        losses: list[float] = []
        sizes: list[int] = []
        for idx in sampler:
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = engine.step(xb, yb)
            steps_done += 1
            sizes.append(len(idx))
            if not math.isnan(loss):
                losses.append(loss)
        eps = (
            compute_epsilon(
                sample_rate=q,
                noise_multiplier=sigma,
                steps=steps_done,
                delta=cfg.delta,
                accountant=cfg.accountant,
            )
            if account_epochs or epoch + 1 == cfg.epochs
            else math.nan
        )
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": steps_done,
            "epsilon": eps,
            "loss": sum(losses) / len(losses) if losses else math.nan,
            "mean_batch": sum(sizes) / max(len(sizes), 1),
            "seconds": time.time() - t0,
        }
        if validation is not None:
            row["val_accuracy"] = _evaluate(engine.model, validation[0], validation[1], device)
        history.append(row)
        logger.info(
            "DP-SGD epoch %d/%d: loss %.4f, epsilon %.3f (delta %g)%s",
            epoch + 1,
            cfg.epochs,
            row["loss"],
            eps,
            cfg.delta,
            f", val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else "",
        )
        if ckpt is not None:
            _save_checkpoint(
                ckpt, engine, module, gen, noise_gen, cfg, n, epoch + 1, steps_done, history
            )
        if on_epoch is not None:
            on_epoch(row)

    trained = engine.close().eval()
    last = history[-1]["epsilon"] if history else math.nan
    final_eps = (
        last
        if not math.isnan(last)
        else compute_epsilon(
            sample_rate=q,
            noise_multiplier=sigma,
            steps=steps_done,
            delta=cfg.delta,
            accountant=cfg.accountant,
        )
    )
    if abs(final_eps - planned_eps) > 1e-6 * max(1.0, planned_eps):
        logger.debug("final epsilon %.6f differs from planned %.6f", final_eps, planned_eps)
    other = {
        name: compute_epsilon(
            sample_rate=q,
            noise_multiplier=sigma,
            steps=steps_done,
            delta=cfg.delta,
            accountant=name,
        )
        for name in ACCOUNTANTS
        if name != cfg.accountant and account_epochs
    }
    ledger = PrivacyLedger(
        mechanism=MECHANISM,
        sample_rate=q,
        noise_multiplier=sigma,
        steps=steps_done,
        accountant=cfg.accountant,
        epsilon=final_eps,
        delta=cfg.delta,
        max_grad_norm=cfg.max_grad_norm,
        expected_batch_size=max(1, round(q * n)),
        dataset_size=n,
        epochs=cfg.epochs,
        sampling="poisson" if cfg.poisson else "shuffle",
        grad_sample_mode=mode,
        secure_rng=cfg.secure_rng,
        rng_note=rng_note,
        target_epsilon=cfg.epsilon,
        budget=cfg.budget,
        epsilon_other=other,
        per_epoch=[
            {"epoch": r["epoch"], "steps": r["steps"], "epsilon": r["epsilon"]}
            for r in history
            if not math.isnan(r["epsilon"])
        ],
        module_fixes=fixes,
        mode_choice=choice,
        notes=notes,
        opacus_version=_opacus_version(),
    )
    return DPTrainingResult(
        module=trained,
        ledger=ledger,
        history=history,
        wall_time=time.time() - started,
        resumed_from_epoch=start_epoch,
    )


# -- checkpoints ------------------------------------------------------------------------------
def _fingerprint(cfg: DPConfig, n: int) -> dict[str, Any]:
    d = cfg.to_dict()
    d["dataset_size"] = n
    return d


def _save_checkpoint(
    path: Path,
    engine: _Engine,
    module: nn.Module,
    gen: torch.Generator | None,
    noise_gen: torch.Generator | None,
    cfg: DPConfig,
    n: int,
    epoch: int,
    steps: int,
    history: list[dict[str, Any]],
) -> None:
    state = {
        "fingerprint": _fingerprint(cfg, n),
        "epoch": epoch,
        "steps": steps,
        "history": history,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": engine.optimizer.original_optimizer.state_dict(),
        "sampler_rng": gen.get_state() if gen is not None else None,
        "noise_rng": noise_gen.get_state() if noise_gen is not None else None,
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def _load_checkpoint(
    path: Path,
    engine: _Engine,
    module: nn.Module,
    gen: torch.Generator | None,
    noise_gen: torch.Generator | None,
    cfg: DPConfig,
    n: int,
) -> tuple[int, int, list[dict[str, Any]]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != _fingerprint(cfg, n):
        raise InvalidConfigError(
            f"{path} was written by a run with other settings or data; delete it or start fresh"
        )
    module.load_state_dict(state["model"])
    engine.optimizer.original_optimizer.load_state_dict(state["optimizer"])
    if gen is not None and state["sampler_rng"] is not None:
        gen.set_state(state["sampler_rng"])
    if noise_gen is not None and state["noise_rng"] is not None:
        noise_gen.set_state(state["noise_rng"])
    return int(state["epoch"]), int(state["steps"]), list(state["history"])
