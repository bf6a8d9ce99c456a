"""Result types: one per family, JSON-serialisable, carrying config, seed, version, time.

Every result is a dataclass deriving from :class:`Result`. ``to_dict()`` gives plain JSON
types (tensors become ``{"dtype", "shape", "data"}`` records), ``from_dict()`` restores the
same object, so a result written to disk reads back equal.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from modelshield import __version__
from modelshield.core.errors import DataError

R = TypeVar("R", bound="Result")

_RESULT_TYPES: dict[str, type[Result]] = {}


def encode(value: Any) -> Any:
    """Turn tensors, tuples and dataclasses into JSON-compatible values."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {
            "__tensor__": True,
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "data": t.flatten().tolist(),
        }
    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else encode(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def decode(value: Any) -> Any:
    """Inverse of :func:`encode` for tensors and nested results."""
    if isinstance(value, dict):
        if value.get("__tensor__"):
            dtype = getattr(torch, value["dtype"])
            return torch.tensor(value["data"], dtype=dtype).reshape(value["shape"])
        if "result_type" in value and value["result_type"] in _RESULT_TYPES:
            return _RESULT_TYPES[value["result_type"]].from_dict(value)
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


@dataclass
class Result:
    """Base of every result: what ran, with which seed, which version, how long."""

    result_type: ClassVar[str] = "result"

    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    wall_time: float = 0.0
    version: str = __version__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "result_type" in cls.__dict__:
            _RESULT_TYPES[cls.result_type] = cls

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result_type": self.result_type}
        for f in dataclasses.fields(self):
            out[f.name] = encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        kind = d.get("result_type", cls.result_type)
        target = _RESULT_TYPES.get(kind, cls)
        if not issubclass(target, cls):
            raise DataError(f"result_type {kind!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        kwargs = {k: decode(v) for k, v in d.items() if k in names}
        return target(**kwargs)  # type: ignore[return-value]

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))


@dataclass
class AttackResult(Result):
    """Outcome of an evasion attack on a batch.

    ``success[i]``: the model's prediction on ``x_adv[i]`` meets the goal (untargeted: differs
    from the true label, which includes points misclassified already; targeted: equals the
    target). ``distance[i]``: the perturbation's size in the threat model's norm.
    ``queries[i]``: model queries spent on sample ``i`` (forward passes for white-box attacks).
    """

    result_type: ClassVar[str] = "attack"

    attack: str = ""
    threat: dict[str, Any] = field(default_factory=dict)
    x_adv: torch.Tensor | None = None
    success: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    clean_correct: torch.Tensor | None = None

    @property
    def success_rate(self) -> float:
        if self.success is None or self.success.numel() == 0:
            return float("nan")
        return float(self.success.float().mean())

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples still classified correctly after the attack (untargeted)."""
        if self.success is None or self.success.numel() == 0:
            return float("nan")
        return float((~self.success.bool()).float().mean())

    def summary(self, include_inputs: bool = False) -> dict[str, Any]:
        """A compact dict without the adversarial inputs (those go to ``.npz``)."""
        d = self.to_dict()
        if not include_inputs:
            d.pop("x_adv", None)
        d["robust_accuracy"] = self.robust_accuracy
        d["success_rate"] = self.success_rate
        return d


@dataclass
class ProbeResult(Result):
    """What one scan probe measured, graded by the rubric, with its advice.

    ``status``: ``ok`` (ran), ``skipped`` (not applicable; ``reason`` says why) or
    ``error`` (failed; ``reason`` holds the one-line error).
    """

    result_type: ClassVar[str] = "probe"

    probe: str = ""
    title: str = ""
    risk: str = ""
    status: str = "ok"
    reason: str = ""
    figure: dict[str, Any] = field(default_factory=dict)
    grade: str | None = None
    meaning: str = ""
    recommendation: str = ""
    threat: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


@dataclass
class RobustnessResult(Result):
    """Robust accuracy over an eps grid, per sample (``robust[i, k]``: sample i survives eps k).

    Curves are per-sample worst cases: an example found at a smaller eps lies in every
    larger ball, so ``robust[:, k]`` implies ``robust[:, k - 1]``.
    """

    result_type: ClassVar[str] = "robustness"

    attack: str = ""
    norm: str = "linf"
    bounds: list[float] = field(default_factory=lambda: [0.0, 1.0])
    eps: list[float] = field(default_factory=list)
    clean_correct: torch.Tensor | None = None
    robust: torch.Tensor | None = None
    robust_accuracy: list[float] = field(default_factory=list)
    ci: list[list[float]] = field(default_factory=list)
    clean_accuracy: float = float("nan")
    clean_ci: list[float] = field(default_factory=list)
    fooled_by: list[dict[str, int]] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass
class MembershipResult(Result):
    """Outcome of a membership-inference attack: per-sample scores and the ROC behind them.

    ``scores[i]``: higher means "more likely a member"; ``labels[i]``: ``True`` for a member.
    ``tpr_at_fpr`` maps FPR levels (``"0.001"``, ``"0.01"``) to the best TPR at that FPR
    (Carlini et al., S&P 2022); ``auc_ci`` / ``tpr_ci`` are stratified bootstrap intervals;
    ``roc`` holds a downsampled curve (``fpr``, ``tpr`` lists of <= 500 points) for reports.
    """

    result_type: ClassVar[str] = "membership"

    attack: str = ""
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    auc: float = float("nan")
    auc_ci: list[float] = field(default_factory=list)
    tpr_at_fpr: dict[str, float] = field(default_factory=dict)
    tpr_ci: dict[str, list[float]] = field(default_factory=dict)
    roc: dict[str, list[float]] = field(default_factory=dict)
    n_members: int = 0
    n_nonmembers: int = 0

    @classmethod
    def from_scores(
        cls,
        attack: str,
        scores: torch.Tensor,
        labels: torch.Tensor,
        *,
        seed: int | None = 0,
        config: dict[str, Any] | None = None,
        n_boot: int = 200,
        fprs: tuple[float, ...] = (0.001, 0.01),
        wall_time: float = 0.0,
        max_roc_points: int = 500,
    ) -> MembershipResult:
        """Compute AUC, TPR at each FPR in ``fprs`` and their bootstrap intervals."""
        from modelshield.core import metrics  # core-internal; metrics never imports results

        s, lab = metrics._check_scores_labels(scores, labels)
        boot_seed = 0 if seed is None else int(seed)
        auc = metrics.roc_auc(s, lab)
        auc_ci = list(metrics.bootstrap_ci(metrics.roc_auc, s, lab, n_boot=n_boot, seed=boot_seed))
        tprs: dict[str, float] = {}
        tpr_ci: dict[str, list[float]] = {}
        for f in fprs:
            key = repr(float(f))
            tprs[key] = metrics.tpr_at_fpr(s, lab, f)

            def at(sc: torch.Tensor, lb: torch.Tensor, _f: float = f) -> float:
                return metrics.tpr_at_fpr(sc, lb, _f)

            tpr_ci[key] = list(metrics.bootstrap_ci(at, s, lab, n_boot=n_boot, seed=boot_seed))
        fpr, tpr, _ = metrics.roc_curve(s, lab)
        keep = _roc_points(fpr, max_roc_points)
        return cls(
            config=dict(config or {}),
            seed=seed,
            wall_time=wall_time,
            attack=attack,
            scores=scores.detach().cpu().float(),
            labels=lab,
            auc=auc,
            auc_ci=auc_ci,
            tpr_at_fpr=tprs,
            tpr_ci=tpr_ci,
            roc={"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
            n_members=int(lab.sum()),
            n_nonmembers=int((~lab).sum()),
        )


def _roc_points(fpr: torch.Tensor, max_points: int) -> torch.Tensor:
    """Indices of at most ``max_points`` ROC points: half evenly spaced along the curve,
    half at log-spaced FPRs (so the low-FPR region stays visible), first and last kept."""
    n = int(fpr.numel())
    if n <= max_points:
        return torch.arange(n)
    half = max_points // 2
    lin = torch.linspace(0, n - 1, half).round().long()
    grid = torch.logspace(-6, 0, max_points - half - 2, dtype=torch.float64)
    log_idx = (torch.searchsorted(fpr, grid, right=True) - 1).clamp(0, n - 1)
    idx = torch.unique(torch.cat([lin, log_idx, torch.tensor([0, n - 1])]))
    return idx[:max_points] if idx.numel() > max_points else idx


@dataclass
class DPAuditResult(Result):
    """An empirical lower bound on a training procedure's epsilon, against its claim.

    ``eps_lower`` holds with probability ``confidence`` whatever the training does
    (Jagielski et al. 2020; Steinke, Nasr & Jagielski 2023); ``ci`` is that one-sided
    interval ``[eps_lower, inf]``. ``eps_claimed`` is ``None`` for a non-private
    procedure. ``broken`` is true when the bound exceeds the claim: the implementation
    does not deliver the epsilon it reports. ``scores``/``labels`` are the distinguisher's
    scores for each canary (one-run) or each training run (canaries), ``labels`` true where
    the canary was included.
    """

    result_type: ClassVar[str] = "dp_audit"

    method: str = ""
    eps_lower: float = 0.0
    eps_claimed: float | None = None
    delta: float = 0.0
    confidence: float = 0.95
    ci: list[float] = field(default_factory=list)
    broken: bool = False
    canaries: int = 0
    runs: int = 0
    canary_type: str = ""
    bound: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        """``eps_claimed - eps_lower``: how far below the claim the evidence sits."""
        return None if self.eps_claimed is None else self.eps_claimed - self.eps_lower


@dataclass
class ExtractionResult(Result):
    """A model-stealing run through an Oracle: how close the copy came, for how many queries.

    ``fidelity``: top-1 agreement of the copy with the victim on held-out inputs;
    ``accuracy``: the copy's accuracy on held-out labelled data (``None`` without labels).
    ``curve``: one row per checkpoint, ``{"queries", "fidelity", "accuracy"}``.
    ``transfer``: adversarial examples crafted on the copy and tried on the victim
    (e.g. ``{"attack", "eps", "n", "success_on_copy", "transfer_rate"}``).
    """

    result_type: ClassVar[str] = "extraction"

    method: str = ""
    queries_used: int = 0
    fidelity: float = float("nan")
    accuracy: float | None = None
    victim_accuracy: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    transfer: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class WatermarkVerdict(Result):
    """Does a suspect model carry a trigger-set watermark (Adi et al. 2018)?

    ``matches`` of ``n_triggers`` trigger inputs got their assigned label; ``p_value`` is
    the binomial probability of at least that many by chance (each match with probability
    ``chance``); ``verified`` is ``p_value < significance``.
    """

    result_type: ClassVar[str] = "watermark"

    trigger_accuracy: float = 0.0
    matches: int = 0
    n_triggers: int = 0
    chance: float = 0.0
    p_value: float = 1.0
    significance: float = 1e-6
    verified: bool = False
    access: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PoisonResult(Result):
    """A poisoning attack on a data set, or a detector's verdict on one.

    ``indices``: the samples the attack changed (attack) or flagged (detector).
    ``clean_accuracy`` / ``attack_success_rate``: a model trained on the data, on clean test
    inputs and on triggered test inputs of non-target classes (ASR). ``precision`` /
    ``recall``: of the flagged indices against the attack's record, when it is known.
    """

    result_type: ClassVar[str] = "poison"

    method: str = ""
    target_class: int | None = None
    rate: float = 0.0
    indices: list[int] = field(default_factory=list)
    clean_accuracy: float | None = None
    attack_success_rate: float | None = None
    precision: float | None = None
    recall: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
