"""Embedding a trigger-set watermark by training (Adi et al., USENIX Security 2018).

The paper's two settings: **from scratch** (train a fresh model on the training data with
the trigger set mixed in) and **fine-tuning** (continue training an existing model on the
training data plus the trigger set). In both, every batch holds some trigger inputs with
their secret labels next to the clean samples (the trigger set is oversampled: 100
triggers would otherwise be a handful of samples per epoch among thousands), and the loss
is the usual cross-entropy over the whole batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.results import WatermarkVerdict
from modelshield.core.seeding import check_seed, make_generator
from modelshield.watermark.key import WatermarkKey
from modelshield.watermark.verify import verify

logger = logging.getLogger(__name__)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def reset_parameters(module: nn.Module, seed: int) -> int:
    """Re-initialise every submodule that has ``reset_parameters`` (seeded; the global
    torch RNG is left as it was); returns how many were reset."""
    count = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                count += 1
    return count


@torch.no_grad()
def accuracy(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``module`` (in eval mode) on ``(x, y)``."""
    if len(x) == 0:
        return float("nan")
    module.eval()
    dev = module_device(module)
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = module(x[i : i + batch_size].to(dev)).argmax(1).cpu()
        correct += int((pred == y[i : i + batch_size].cpu()).sum())
    return correct / len(x)


def _check_inputs(
    module: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, key: WatermarkKey
) -> None:
    if not isinstance(module, nn.Module):
        raise UnsupportedModelError(
            f"embed needs a trainable torch.nn.Module, got {type(module).__name__}"
        )
    if not any(p.requires_grad for p in module.parameters()):
        raise UnsupportedModelError("the module has no trainable parameters")
    if not isinstance(train_x, torch.Tensor) or not isinstance(train_y, torch.Tensor):
        raise DataError("train_x and train_y must be tensors")
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise DataError(
            f"train_x and train_y must be non-empty and of equal length, got {len(train_x)} and {len(train_y)}"
        )
    if tuple(train_x.shape[1:]) != key.input_shape:
        raise DataError(
            f"the key is for inputs of shape {key.input_shape}, the training data has "
            f"{tuple(train_x.shape[1:])}"
        )
    if int(train_y.min()) < 0 or int(train_y.max()) >= key.num_classes:
        raise DataError(
            f"training labels must lie in [0, {key.num_classes}) (the key's num_classes), got "
            f"[{int(train_y.min())}, {int(train_y.max())}]"
        )


def embed(
    module: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    key: WatermarkKey,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    from_scratch: bool = False,
    seed: int = 0,
    triggers_per_batch: int | None = None,
    weight_decay: float = 0.0,
    history: list[dict[str, Any]] | None = None,
) -> nn.Module:
    """Embed the trigger-set watermark of ``key`` into ``module`` (Adi et al. 2018).

    ``from_scratch=True`` re-initialises the parameters (seeded by ``seed``) and trains on
    the training data with the triggers mixed in; ``False`` fine-tunes the module as it is.
    Adam, cross-entropy; each step draws ``batch_size`` clean samples and
    ``triggers_per_batch`` triggers (default ``max(2, batch_size // 8)``, cycling through
    the trigger set in a shuffled order so every trigger is seen equally often). The module
    is trained in place on its own device and returned in eval mode. ``history``, when
    given, receives one row per epoch (loss, trigger accuracy). The same seed gives the
    same weights; the global RNG state is restored afterwards.
    """
    _check_inputs(module, train_x, train_y, key)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidConfigError(f"lr must be a number > 0, got {lr!r}")
    check_seed(seed)
    per_batch = max(2, batch_size // 8) if triggers_per_batch is None else triggers_per_batch
    if isinstance(per_batch, bool) or not isinstance(per_batch, int) or per_batch < 1:
        raise InvalidConfigError(f"triggers_per_batch must be an integer >= 1, got {per_batch!r}")
    dev = module_device(module)
    t_x, t_y = key.triggers().to(dev), key.labels().to(dev)
    with torch.no_grad():
        module.eval()
        try:
            out = module(t_x[:2])
        except Exception as exc:
            raise UnsupportedModelError(
                f"the model does not accept the key's trigger inputs of shape {key.input_shape}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != key.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModelError(
            f"the key is for a {key.num_classes}-class model; the model's output has shape {shape}"
        )
    if from_scratch and reset_parameters(module, seed) == 0:
        raise UnsupportedModelError(
            "from_scratch: no layer of the module can be re-initialised (no reset_parameters)"
        )
    started = time.perf_counter()
    n = len(train_x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and the like
        g = make_generator(seed)
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        t_order = torch.randperm(key.n, generator=g)
        t_pos = 0
        for epoch in range(epochs):
            module.train()
            order = torch.randperm(n, generator=g)
            total, count = 0.0, 0
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                picks: list[torch.Tensor] = []
                while len(picks) < per_batch:
                    if t_pos == key.n:
                        t_order, t_pos = torch.randperm(key.n, generator=g), 0
                    take = min(per_batch - len(picks), key.n - t_pos)
                    picks.append(t_order[t_pos : t_pos + take])
                    t_pos += take
                tidx = torch.cat(picks).to(dev)
                xb = torch.cat([train_x[idx].to(dev), t_x[tidx]])
                yb = torch.cat([train_y[idx].to(dev), t_y[tidx]])
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(module(xb), yb)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
            module.eval()
            row = {
                "epoch": epoch + 1,
                "loss": total / max(count, 1),
                "trigger_accuracy": accuracy(module, t_x, t_y),
            }
            logger.debug(
                "watermark epoch %d/%d: loss %.4f, trigger accuracy %.3f",
                epoch + 1,
                epochs,
                row["loss"],
                row["trigger_accuracy"],
            )
            if history is not None:
                history.append(row)
    module.eval()
    logger.info(
        "embedded %d triggers in %.1fs (%s)",
        key.n,
        time.perf_counter() - started,
        "from scratch" if from_scratch else "fine-tuning",
    )
    return module


@dataclass
class EmbedOutcome:
    """What :func:`embed_and_evaluate` measured around one embedding."""

    module: nn.Module
    verdict: WatermarkVerdict
    clean_accuracy_before: float | None = None
    clean_accuracy_after: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no seed of the key)."""
        before, after = self.clean_accuracy_before, self.clean_accuracy_after
        return {
            "clean_accuracy_before": before,
            "clean_accuracy_after": after,
            "clean_accuracy_change": None if before is None or after is None else after - before,
            "trigger_accuracy": self.verdict.trigger_accuracy,
            "matches": self.verdict.matches,
            "n_triggers": self.verdict.n_triggers,
            "chance": self.verdict.chance,
            "p_value": self.verdict.p_value,
            "significance": self.verdict.significance,
            "verified": self.verdict.verified,
            "history": self.history,
            "config": self.config,
            "wall_time": self.wall_time,
        }


def embed_and_evaluate(
    module: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    key: WatermarkKey,
    *,
    test_x: torch.Tensor | None = None,
    test_y: torch.Tensor | None = None,
    significance: float = 1e-6,
    **kwargs: Any,
) -> EmbedOutcome:
    """:func:`embed` with clean accuracy on ``(test_x, test_y)`` before (fine-tuning only:
    a model trained from scratch has no "before") and after, and a white-box verification
    of the marked model. ``kwargs`` go to :func:`embed`."""
    started = time.perf_counter()
    from_scratch = bool(kwargs.get("from_scratch", False))
    before = None
    if test_x is not None and test_y is not None and not from_scratch:
        before = accuracy(module, test_x, test_y)
    history: list[dict[str, Any]] = []
    module = embed(module, train_x, train_y, key, history=history, **kwargs)
    after = None
    if test_x is not None and test_y is not None:
        after = accuracy(module, test_x, test_y)
    verdict = verify(module, key, significance=significance)
    config: dict[str, Any] = {
        k: kwargs.get(k)
        for k in ("epochs", "lr", "batch_size", "from_scratch", "seed", "triggers_per_batch")
        if k in kwargs
    }
    config["method"] = "trigger-set watermark (Adi et al. 2018)"
    return EmbedOutcome(
        module=module,
        verdict=verdict,
        clean_accuracy_before=before,
        clean_accuracy_after=after,
        history=history,
        config=config,
        wall_time=time.perf_counter() - started,
    )
