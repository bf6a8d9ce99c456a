"""Does the watermark survive removal attempts, and does it ever flag innocent models?

Follows the evaluation of Adi et al. (USENIX Security 2018, §5): the attacker holds the
marked model and clean data from the same distribution and tries to remove the mark
without losing accuracy:

* **fine-tuning** (the paper's four variants): FTLL (fine-tune the last layer), FTAL
  (fine-tune all layers), RTLL (re-initialise the last layer, train it) and RTAL
  (re-initialise the last layer, train all layers), each for a few epochs at the
  attacker's learning rate;
* **magnitude pruning** of 20/40/60/80% of the weights (global or per layer), as in the
  pruning experiments that followed the paper (e.g. Uchida et al. 2017; Liu et al. 2018);
* **extraction**: Knockoff Nets (Orekondy et al. 2019) through an oracle of the marked
  model; the copy is trained only on the attacker's queries, so the mark survives only
  if the triggers' labels leak through natural inputs;

and the other side of the test, **false positives**: independently trained models (same
data, same architecture, different seeds, no watermark) must not verify.

Each attempt records the trigger accuracy, the p-value, whether the mark still verifies,
and the clean accuracy the attacker kept (a "removal" that ruins accuracy is no removal).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import InvalidConfigError, ModelShieldError, UnsupportedModelError
from modelshield.core.oracle import from_classifier
from modelshield.core.results import Result, WatermarkVerdict
from modelshield.core.seeding import check_seed, make_generator
from modelshield.core.threat import QueryAccess
from modelshield.core.train import train_classifier
from modelshield.watermark.embed import accuracy, module_device, reset_parameters
from modelshield.watermark.key import WatermarkKey
from modelshield.watermark.verify import verify

logger = logging.getLogger(__name__)

FINE_TUNE_VARIANTS: dict[str, tuple[str, bool]] = {
    # name: (layers trained, last layer re-initialised first)
    "ftll": ("last", False),
    "ftal": ("all", False),
    "rtll": ("last", True),
    "rtal": ("all", True),
}


# -- attacks ------------------------------------------------------------------------------------
def last_layer(module: nn.Module) -> nn.Module:
    """The last submodule (in registration order) that holds parameters of its own: the
    classifier head of a usual network (``nn.Sequential``'s final ``Linear``, ResNet's ``fc``)."""
    last = None
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            last = m
    if last is None:
        raise UnsupportedModelError("the module has no parameters")
    return last


def fine_tune(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    layers: str = "all",
    reinit_last: bool = False,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A fine-tuned copy of ``module`` (the original is untouched): Adam on clean ``(x, y)``.

    ``layers="last"`` trains only :func:`last_layer`; ``"all"`` every parameter.
    ``reinit_last`` re-initialises the last layer first (Adi et al.'s RTLL / RTAL).
    """
    if layers not in ("last", "all"):
        raise InvalidConfigError(f"layers must be 'last' or 'all', got {layers!r}")
    check_seed(seed)
    attacked = copy.deepcopy(module)
    head = last_layer(attacked)
    if reinit_last and reset_parameters(head, seed) == 0:
        raise UnsupportedModelError(
            f"cannot re-initialise the last layer ({type(head).__name__}: no reset_parameters)"
        )
    params = list(head.parameters()) if layers == "last" else list(attacked.parameters())
    for p in attacked.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    dev = module_device(attacked)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = make_generator(seed)
        opt = torch.optim.Adam(params, lr=lr)
        n = len(x)
        for _ in range(epochs):
            attacked.train()
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(attacked(x[idx].to(dev)), y[idx].to(dev)).backward()
                opt.step()
    for p in attacked.parameters():
        p.requires_grad_(True)
    return attacked.eval()


def magnitude_prune(module: nn.Module, amount: float, *, scope: str = "global") -> nn.Module:
    """A copy of ``module`` with the fraction ``amount`` of its weights of smallest magnitude
    set to zero (weights: parameters with two or more dimensions, i.e. linear and conv
    kernels; biases and norm parameters are kept). ``scope="global"`` ranks all weights
    together, ``"layer"`` prunes each weight tensor by ``amount``. The zeros are permanent.
    """
    if not 0.0 <= amount < 1.0:
        raise InvalidConfigError(f"amount must be in [0, 1), got {amount!r}")
    if scope not in ("global", "layer"):
        raise InvalidConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    pruned = copy.deepcopy(module)
    weights = [p for p in pruned.parameters() if p.ndim >= 2]
    if not weights:
        raise UnsupportedModelError("the module has no weight matrices or kernels to prune")
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([w.detach().abs().flatten() for w in weights])
            k = round(amount * flat.numel())
            if k > 0:
                drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
                drop[torch.argsort(flat, stable=True)[:k]] = True
                start = 0
                for w in weights:
                    m = drop[start : start + w.numel()].view_as(w)
                    w[m] = 0.0
                    start += w.numel()
        else:
            for w in weights:
                k = round(amount * w.numel())
                if k > 0:
                    idx = torch.argsort(w.detach().abs().flatten(), stable=True)[:k]
                    w.view(-1)[idx] = 0.0
    return pruned.eval()


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``x`` on which two models give the same top-1 label (fidelity)."""
    a.eval()
    b.eval()
    same = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        pa = a(xb.to(module_device(a))).argmax(1).cpu()
        pb = b(xb.to(module_device(b))).argmax(1).cpu()
        same += int((pa == pb).sum())
    return same / len(x) if len(x) else float("nan")


def sparsity(module: nn.Module) -> float:
    """Fraction of zero entries among the weights (parameters with two or more dimensions)."""
    weights = [p for p in module.parameters() if p.ndim >= 2]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def extract_knockoff(
    module: nn.Module,
    key: WatermarkKey,
    pool: torch.Tensor,
    *,
    queries: int,
    epochs: int = 30,
    seed: int = 0,
    output: str = "probs",
) -> tuple[nn.Module, Any]:
    """Steal ``module`` through an oracle by Knockoff Nets (random strategy, Orekondy et al.
    2019) with :func:`modelshield.extraction.knockoff`; returns ``(copy, ExtractionResult)``.
    Raises :class:`ImportError` when the extraction module is not installed."""
    from modelshield.extraction import knockoff

    clf = from_torch(
        module,
        input_shape=key.input_shape,
        num_classes=key.num_classes,
        bounds=key.bounds,
        device=module_device(module),
    )
    oracle = from_classifier(clf, QueryAccess(output=output))  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {
        "queries": queries,
        "num_classes": key.num_classes,
        "strategy": "random",
        "epochs": epochs,
        "seed": seed,
    }
    if "checkpoints" in inspect.signature(knockoff).parameters:
        kwargs["checkpoints"] = [queries]  # one copy, at the full budget
    stolen, res = knockoff(oracle, pool, **kwargs)
    return stolen, res


# -- false positives ----------------------------------------------------------------------------
def train_independent_models(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seeds: Sequence[int],
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
) -> list[nn.Module]:
    """Models trained like the owner's but without a watermark: one per seed (initialisation
    and batch order differ), same data and architecture."""
    models = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            net = make_model()
            models.append(
                train_classifier(net, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=s)
            )
    return models


def false_positive_check(
    models: Sequence[nn.Module | Any], key: WatermarkKey, *, significance: float = 1e-6
) -> dict[str, Any]:
    """Verify ``key`` on models made without it; none should verify.

    Returns the count that verified (should be 0: the test's false-positive rate is at most
    ``significance``), every p-value and trigger accuracy, and the share of p-values below
    0.01 (about 1% or less is expected: the p-value is exact under the null).
    """
    verdicts = [verify(m, key, significance=significance) for m in models]
    ps = [v.p_value for v in verdicts]
    return {
        "n_models": len(verdicts),
        "verified": sum(v.verified for v in verdicts),
        "p_values": ps,
        "trigger_accuracy": [v.trigger_accuracy for v in verdicts],
        "min_p_value": min(ps) if ps else None,
        "share_p_below_0.01": sum(p < 0.01 for p in ps) / len(ps) if ps else None,
        "chance": key.chance,
        "significance": significance,
    }


# -- the suite ----------------------------------------------------------------------------------
@dataclass
class RemovalAttempt:
    """One removal attack on the marked model and how the mark fared."""

    attack: str
    setting: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""
    trigger_accuracy: float | None = None
    matches: int | None = None
    p_value: float | None = None
    verified: bool | None = None
    clean_accuracy: float | None = None
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WatermarkRobustnessResult(Result):
    """The robustness suite's outcome: the marked model's own verdict, each removal attempt,
    and the false-positive check on independent models."""

    result_type: ClassVar[str] = "watermark_robustness"

    key: dict[str, Any] = field(default_factory=dict)
    significance: float = 1e-6
    marked: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    false_positives: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[list[Any]]:
        """Rows ``[attack, setting, status, trigger accuracy, p-value, verified, clean acc]``."""
        return [
            [
                a["attack"],
                ", ".join(f"{k}={v}" for k, v in a["setting"].items()),
                a["status"],
                a["trigger_accuracy"],
                a["p_value"],
                a["verified"],
                a["clean_accuracy"],
            ]
            for a in self.attempts
        ]


def _score(
    attack: str,
    setting: dict[str, Any],
    model: nn.Module,
    key: WatermarkKey,
    significance: float,
    test: tuple[torch.Tensor, torch.Tensor] | None,
    started: float,
    verdict: WatermarkVerdict | None = None,
) -> RemovalAttempt:
    v = verdict if verdict is not None else verify(model, key, significance=significance)
    return RemovalAttempt(
        attack=attack,
        setting=setting,
        trigger_accuracy=v.trigger_accuracy,
        matches=v.matches,
        p_value=v.p_value,
        verified=v.verified,
        clean_accuracy=accuracy(model, *test) if test is not None else None,
        wall_time=time.perf_counter() - started,
    )


def robustness_suite(
    marked: nn.Module,
    key: WatermarkKey,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    test_x: torch.Tensor | None = None,
    test_y: torch.Tensor | None = None,
    attacker_x: torch.Tensor | None = None,
    attacker_y: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    fine_tune_variants: Sequence[str] = ("ftll", "ftal", "rtll", "rtal"),
    fine_tune_epochs: int = 5,
    fine_tune_lr: float = 1e-3,
    prune_amounts: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    prune_scope: str = "global",
    extraction_queries: int | None = 1000,
    extraction_epochs: int = 30,
    independent_models: int = 10,
    make_model: Callable[[], nn.Module] | None = None,
    independent_epochs: int = 10,
    independent_lr: float = 1e-3,
    batch_size: int = 64,
    significance: float = 1e-6,
    seed: int = 0,
) -> WatermarkRobustnessResult:
    """Attack the marked model every way above and test innocent models (Adi et al. 2018).

    ``train_x/train_y``: the owner's training data (the independent models train on it).
    ``attacker_x/attacker_y``: the attacker's clean data for fine-tuning (default: the
    training data). ``pool``: the knockoff query pool (default: ``attacker_x``); at most
    ``extraction_queries`` are spent (``None`` skips extraction). ``make_model``: a fresh
    model of the owner's architecture (default: a re-initialised copy of ``marked``).
    ``test_x/test_y``: clean accuracy after each attack. Attempts that cannot run are
    recorded as ``skipped`` (e.g. ``"extraction module unavailable"``) or ``error``.
    """
    check_seed(seed)
    started_all = time.perf_counter()
    test = (test_x, test_y) if test_x is not None and test_y is not None else None
    ax = attacker_x if attacker_x is not None else train_x
    ay = attacker_y if attacker_y is not None else train_y
    base = verify(marked, key, significance=significance)
    marked_row = _score(
        "none (the marked model)", {}, marked, key, significance, test, started_all, base
    )
    attempts: list[RemovalAttempt] = []

    for name in fine_tune_variants:
        if name not in FINE_TUNE_VARIANTS:
            raise InvalidConfigError(
                f"unknown fine-tuning variant {name!r}; known: {', '.join(FINE_TUNE_VARIANTS)}"
            )
        layers, reinit = FINE_TUNE_VARIANTS[name]
        t0 = time.perf_counter()
        setting: dict[str, Any] = {"epochs": fine_tune_epochs, "lr": fine_tune_lr, "n": len(ax)}
        try:
            attacked = fine_tune(
                marked,
                ax,
                ay,
                layers=layers,
                reinit_last=reinit,
                epochs=fine_tune_epochs,
                lr=fine_tune_lr,
                batch_size=batch_size,
                seed=seed,
            )
        except ModelShieldError as exc:
            attempts.append(RemovalAttempt(name, setting, status="error", reason=str(exc)))
            continue
        attempts.append(_score(name, setting, attacked, key, significance, test, t0))

    for amount in prune_amounts:
        t0 = time.perf_counter()
        attacked = magnitude_prune(marked, amount, scope=prune_scope)
        row = _score(
            f"prune-{prune_scope}",
            {"amount": amount},
            attacked,
            key,
            significance,
            test,
            t0,
        )
        row.extra["sparsity"] = sparsity(attacked)
        attempts.append(row)

    if extraction_queries is not None:
        t0 = time.perf_counter()
        qpool = pool if pool is not None else ax
        n_queries = min(extraction_queries, len(qpool))
        setting = {
            "queries": n_queries,
            "epochs": extraction_epochs,
            "strategy": "random",
            "output": "probs",
        }
        try:
            stolen, res = extract_knockoff(
                marked,
                key,
                qpool,
                queries=n_queries,
                epochs=extraction_epochs,
                seed=seed,
            )
        except ImportError as exc:
            logger.warning("extraction skipped: %s", exc)
            attempts.append(
                RemovalAttempt(
                    "extraction-knockoff",
                    setting,
                    status="skipped",
                    reason="extraction module unavailable",
                )
            )
        except Exception as exc:  # another engineer's module: record, do not sink the suite
            logger.warning("extraction failed: %s: %s", type(exc).__name__, exc)
            attempts.append(
                RemovalAttempt(
                    "extraction-knockoff",
                    setting,
                    status="error",
                    reason=f"{type(exc).__name__}: {exc}".splitlines()[0],
                )
            )
        else:
            row = _score("extraction-knockoff", setting, stolen, key, significance, test, t0)
            if test is not None:  # top-1 agreement of the copy with the marked model
                row.extra["fidelity"] = agreement(stolen, marked, test[0])
            row.extra["queries_used"] = getattr(res, "queries_used", None)
            attempts.append(row)

    fp: dict[str, Any] = {"n_models": 0}
    if independent_models > 0:
        factory = make_model
        if factory is None:

            def factory() -> nn.Module:
                fresh = copy.deepcopy(marked)
                if reset_parameters(fresh, int(torch.randint(0, 2**31, ()).item())) == 0:
                    raise UnsupportedModelError(
                        "cannot re-initialise the marked model; pass make_model"
                    )
                return fresh

        t0 = time.perf_counter()
        models = train_independent_models(
            factory,
            train_x,
            train_y,
            seeds=[seed + 1000 + i for i in range(independent_models)],
            epochs=independent_epochs,
            lr=independent_lr,
            batch_size=batch_size,
        )
        fp = false_positive_check(models, key, significance=significance)
        if test is not None:
            fp["clean_accuracy"] = [accuracy(m, *test) for m in models]
        fp["wall_time"] = time.perf_counter() - t0

    return WatermarkRobustnessResult(
        config={
            "fine_tune_epochs": fine_tune_epochs,
            "fine_tune_lr": fine_tune_lr,
            "prune_scope": prune_scope,
            "extraction_queries": extraction_queries,
            "extraction_epochs": extraction_epochs,
            "independent_models": independent_models,
            "independent_epochs": independent_epochs,
            "batch_size": batch_size,
        },
        seed=seed,
        wall_time=time.perf_counter() - started_all,
        key=key.public_dict(),
        significance=significance,
        marked=marked_row.to_dict(),
        attempts=[a.to_dict() for a in attempts],
        false_positives=fp,
    )
