"""Membership-inference scores over precomputed model outputs (higher = more likely a member).

Every function here is pure: it takes the target model's logits (and, where the attack
needs them, the logits of shadow / reference models trained elsewhere, e.g. by
``modelshield.privacy.shadow``) and returns one score per queried example. Turn scores into
an ROC, AUC and TPR at low FPR with :func:`evaluate_scores`.

- :func:`loss_scores`: Yeom et al., "Privacy Risk in Machine Learning" (CSF 2018).
- :func:`shadow_attack_scores`: Shokri et al., "Membership Inference Attacks Against Machine
  Learning Models" (S&P 2017).
- :func:`lira_scores`: Carlini et al., "Membership Inference Attacks From First Principles"
  (S&P 2022).
- :func:`rmia_scores`: Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks"
  (ICML 2024).
- :func:`label_only_scores`: Choquette-Choo et al., "Label-Only Membership Inference
  Attacks" (ICML 2021).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.oracle import Oracle
from modelshield.core.results import MembershipResult
from modelshield.core.threat import LpThreat, QueryAccess

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate_scores",
    "label_only_scores",
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "rmia_scores",
    "shadow_attack_scores",
]


# -- validation ------------------------------------------------------------------------------


def _check_logits(logits: Any, labels: Any, name: str = "logits") -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise DataError(
            f"{name} and labels must be torch.Tensor, got "
            f"{type(logits).__name__} and {type(labels).__name__}"
        )
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name} must be (N, C) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise DataError(f"{name} must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got {labels.dtype}")
    c = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise DataError(
            f"labels must lie in [0, {c - 1}], got [{int(labels.min())}, {int(labels.max())}]"
        )
    return logits, labels.long()


def _check_refs(ref_logits: Any, n: int, c: int, name: str = "ref_logits") -> Tensor:
    if not isinstance(ref_logits, Tensor) or ref_logits.ndim != 3:
        shape = (
            tuple(ref_logits.shape) if isinstance(ref_logits, Tensor) else type(ref_logits).__name__
        )
        raise DataError(f"{name} must be a (K, N, C) tensor, got {shape}")
    if ref_logits.shape[1] != n or ref_logits.shape[2] != c or ref_logits.shape[0] < 1:
        raise DataError(
            f"{name} must have shape (K>=1, {n}, {c}) to match the target, got {tuple(ref_logits.shape)}"
        )
    if not ref_logits.is_floating_point():
        raise DataError(f"{name} must be floating point, got {ref_logits.dtype}")
    return ref_logits


def _check_mask(mask: Any, shape: tuple[int, ...], name: str) -> Tensor:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise DataError(f"{name} must be a boolean tensor of shape {shape}, got {got}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
            raise DataError(f"{name} must be boolean (True = trained on), got {mask.dtype}")
        mask = mask.bool()
    return mask


# -- signals ---------------------------------------------------------------------------------


def loss_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """Negative cross-entropy of the true class (Yeom et al., CSF 2018): members have low loss."""
    logits, labels = _check_logits(logits, labels)
    # float64: a member's loss is often below float32's resolution near 1 (p_y ≈ 1 − 1e-9),
    # and ties there would hide exactly the signal the attack reads.
    loss = F.cross_entropy(logits.double(), labels.to(logits.device), reduction="none")
    return -loss.to(logits.dtype if logits.dtype == torch.float64 else torch.float32)


def logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """``φ = log(p_y / (1 − p_y))`` of the true class, computed stably from logits.

    ``φ = z_y − logsumexp_{j≠y} z_j`` (Carlini et al. 2022, §IV-C); works on ``(..., C)``
    logits with matching ``(...)`` labels.
    """
    z = logits.double()
    y = labels.long().unsqueeze(-1)
    zy = z.gather(-1, y).squeeze(-1)
    others = z.scatter(-1, y, float("-inf"))
    return (zy - torch.logsumexp(others, dim=-1)).to(logits.dtype)


def _true_prob(logits: Tensor, labels: Tensor) -> Tensor:
    return (
        torch.softmax(logits.double(), dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    )


# -- Shokri et al. shadow-model attack -------------------------------------------------------


def _features(logits: Tensor, labels: Tensor) -> Tensor:
    """Attack-model inputs: the sorted softmax vector and the true-class log-probability."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    sorted_p = logp.exp().sort(dim=-1, descending=True).values
    true_logp = logp.gather(-1, labels.long().unsqueeze(-1)).clamp_min(-30.0)
    return torch.cat([sorted_p, true_logp], dim=-1)


def _fit_attack_model(x: Tensor, y: Tensor, *, hidden: int, epochs: int, seed: int) -> nn.Module:
    """A one-hidden-layer MLP (standardised inputs), full-batch Adam, seeded."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    lin1, lin2 = nn.Linear(x.shape[1], hidden), nn.Linear(hidden, 1)
    with torch.no_grad():
        for lin in (lin1, lin2):
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
            lin.bias.copy_(torch.rand(lin.bias.shape, generator=g) * 2 * bound - bound)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    xs = (x - mean) / std
    target = y.float()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(xs).squeeze(-1), target)
        loss.backward()
        opt.step()

    class _Scaled(nn.Module):
        def forward(self, inp: Tensor) -> Tensor:
            return model((inp - mean) / std).squeeze(-1)

    return _Scaled().eval()


def shadow_attack_scores(
    target_logits: Tensor,
    labels: Tensor,
    shadow_logits: Tensor,
    shadow_labels: Tensor,
    shadow_in: Tensor,
    *,
    per_class: bool = True,
    hidden: int = 32,
    epochs: int = 300,
    min_class_points: int = 20,
    seed: int = 0,
) -> Tensor:
    """Shadow-model attack (Shokri et al., S&P 2017).

    ``shadow_logits (K, M, C)`` are K shadow models' outputs on M points with labels
    ``shadow_labels`` (``(K, M)`` or ``(M,)``); ``shadow_in (K, M)`` marks the points each
    shadow model was trained on. An attack model (a small MLP over the sorted softmax vector
    and the true-class log-probability) learns in/out from the shadow outputs, one per class
    as in the paper when ``per_class``; classes with fewer than ``min_class_points`` shadow
    points (or only one of in/out) fall back to a model over all classes. Returns the attack
    model's logit of "member" for each target point.
    """
    target_logits, labels = _check_logits(target_logits, labels, "target_logits")
    n, c = target_logits.shape
    if (
        not isinstance(shadow_logits, Tensor)
        or shadow_logits.ndim != 3
        or shadow_logits.shape[2] != c
    ):
        got = (
            tuple(shadow_logits.shape)
            if isinstance(shadow_logits, Tensor)
            else type(shadow_logits).__name__
        )
        raise DataError(f"shadow_logits must be (K, M, {c}), got {got}")
    k, m, _ = shadow_logits.shape
    if not isinstance(shadow_labels, Tensor) or tuple(shadow_labels.shape) not in ((k, m), (m,)):
        got = (
            tuple(shadow_labels.shape)
            if isinstance(shadow_labels, Tensor)
            else type(shadow_labels).__name__
        )
        raise DataError(f"shadow_labels must be ({k}, {m}) or ({m},), got {got}")
    for name, v in (("hidden", hidden), ("epochs", epochs), ("min_class_points", min_class_points)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidConfigError(f"{name} must be an integer >= 1, got {v!r}")
    s_in = _check_mask(shadow_in, (k, m), "shadow_in")
    s_lab = shadow_labels.expand(k, m) if shadow_labels.ndim == 1 else shadow_labels
    flat_logits = shadow_logits.reshape(k * m, c).detach().cpu()
    flat_lab = s_lab.reshape(-1).long().cpu()
    if int(flat_lab.min()) < 0 or int(flat_lab.max()) >= c:
        raise DataError(f"shadow_labels must lie in [0, {c - 1}]")
    flat_in = s_in.reshape(-1).cpu()
    if bool(flat_in.all()) or not bool(flat_in.any()):
        raise DataError("shadow_in must mark both in and out points")
    x_all = _features(flat_logits, flat_lab)
    x_t = _features(target_logits.detach().cpu(), labels.cpu())
    with torch.enable_grad():
        fallback = _fit_attack_model(x_all, flat_in, hidden=hidden, epochs=epochs, seed=seed)
        out = torch.empty(n)
        with torch.no_grad():
            out[:] = fallback(x_t)
        if per_class:
            for cls_ in range(c):
                sel_t = labels.cpu() == cls_
                if not bool(sel_t.any()):
                    continue
                sel = flat_lab == cls_
                ins = flat_in[sel]
                if int(sel.sum()) < min_class_points or bool(ins.all()) or not bool(ins.any()):
                    continue
                model = _fit_attack_model(
                    x_all[sel], ins, hidden=hidden, epochs=epochs, seed=seed + 1 + cls_
                )
                with torch.no_grad():
                    out[sel_t] = model(x_t[sel_t])
    return out.to(target_logits.device)


# -- LiRA ------------------------------------------------------------------------------------


def _masked_stats(phi: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column count, mean and (population) variance of ``phi`` where ``mask`` holds."""
    w = mask.to(phi.dtype)
    cnt = w.sum(0)
    mean = (phi * w).sum(0) / cnt.clamp_min(1)
    var = (((phi - mean) ** 2) * w).sum(0) / cnt.clamp_min(1)
    return cnt, mean, var


def lira_scores(
    target_logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    ref_in: Tensor,
    *,
    online: bool = True,
    fixed_variance: bool = False,
    min_std: float = 1e-4,
) -> Tensor:
    """Likelihood-ratio attack, LiRA (Carlini et al., S&P 2022).

    ``φ = log(p_y / (1 − p_y))`` from logits; per example, Gaussians are fitted to the
    reference models' φ where the example was in (``ref_in``) and where it was out.
    Online: ``log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)``. Offline: the one-sided
    ``log Φ((φ − μ_out) / σ_out)`` against the out distribution only. ``fixed_variance``
    uses one pooled (within-example) σ for all examples, as the paper recommends with few
    references; an example with fewer than two in (out) references uses the pooled σ, and
    one with none uses ``μ_out`` (``μ_in``) shifted by the average in–out gap.
    """
    target_logits, labels = _check_logits(target_logits, labels, "target_logits")
    n, c = target_logits.shape
    ref_logits = _check_refs(ref_logits, n, c)
    k = ref_logits.shape[0]
    mask_in = _check_mask(ref_in, (k, n), "ref_in").to(ref_logits.device)
    if not isinstance(min_std, (int, float)) or not min_std > 0:
        raise InvalidConfigError(f"min_std must be a number > 0, got {min_std!r}")
    phi_t = logit_confidence(target_logits.double(), labels)
    phi_r = logit_confidence(ref_logits.double(), labels.to(ref_logits.device).expand(k, n))
    phi_t = phi_t.to(phi_r.device)
    mask_out = ~mask_in
    if not bool(mask_out.any()):
        raise DataError("ref_in marks every reference as 'in': LiRA needs out references")
    cnt_o, mu_o, var_o = _masked_stats(phi_r, mask_out)
    cnt_i, mu_i, var_i = _masked_stats(phi_r, mask_in)

    def pooled(cnt: Tensor, var: Tensor) -> Tensor:
        ok = cnt >= 2
        if not bool(ok.any()):
            return torch.tensor(1.0, dtype=var.dtype, device=var.device)
        return ((var[ok] * cnt[ok]).sum() / cnt[ok].sum()).sqrt()

    sd_o_pool = pooled(cnt_o, var_o)
    sd_o = (
        sd_o_pool.expand(n) if fixed_variance else torch.where(cnt_o >= 2, var_o.sqrt(), sd_o_pool)
    )
    sd_o = sd_o.clamp_min(min_std)
    have_o, have_i = cnt_o > 0, cnt_i > 0
    both = have_o & have_i
    gap = (
        (mu_i[both] - mu_o[both]).mean()
        if bool(both.any())
        else phi_r[mask_in].mean() - phi_r[mask_out].mean()
    )
    if not bool(torch.isfinite(gap)):
        gap = torch.zeros((), dtype=phi_r.dtype, device=phi_r.device)
    if not online:
        mu_o = torch.where(
            have_o, mu_o, phi_r[mask_out].mean() if not bool(have_i.any()) else mu_i - gap
        )
        return torch.special.log_ndtr((phi_t - mu_o) / sd_o).float().to(target_logits.device)
    if not bool(mask_in.any()):
        raise DataError("ref_in marks no reference as 'in': online LiRA needs in references")
    sd_i_pool = pooled(cnt_i, var_i)
    sd_i = (
        sd_i_pool.expand(n) if fixed_variance else torch.where(cnt_i >= 2, var_i.sqrt(), sd_i_pool)
    )
    sd_i = sd_i.clamp_min(min_std)
    mu_i = torch.where(have_i, mu_i, mu_o + gap)
    mu_o = torch.where(have_o, mu_o, mu_i - gap)

    def logpdf(x: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
        return -0.5 * ((x - mu) / sd) ** 2 - sd.log()

    score = logpdf(phi_t, mu_i, sd_i) - logpdf(phi_t, mu_o, sd_o)
    return score.float().to(target_logits.device)


# -- RMIA ------------------------------------------------------------------------------------


def rmia_scores(
    target_logits: Tensor,
    labels: Tensor,
    ref_logits: Tensor,
    ref_in: Tensor | None,
    pop_target_logits: Tensor,
    pop_labels: Tensor,
    pop_ref_logits: Tensor,
    *,
    gamma: float = 1.0,
    offline_a: float = 0.3,
    online: bool = True,
) -> Tensor:
    """Robust membership inference, RMIA (Zarifzadeh et al., ICML 2024).

    ``LR(x) = Pr(x|θ) / Pr(x)`` with ``Pr(x|θ)`` the target's true-class probability and
    ``Pr(x)`` its mean over reference models; the score is the fraction of population points
    ``z`` with ``LR(x) / LR(z) >= gamma``. Online (``ref_in`` given and ``online``): ``Pr(x)``
    averages all references. Offline (``ref_in`` is ``None``, meaning no reference saw x, or
    ``online=False``): ``Pr(x)`` averages the out references and is corrected linearly,
    ``½((1 + a)·Pr_out(x) + (1 − a))`` with ``a = offline_a``, and ``Pr(z)`` likewise
    (z is out of every reference model).
    """
    target_logits, labels = _check_logits(target_logits, labels, "target_logits")
    n, c = target_logits.shape
    ref_logits = _check_refs(ref_logits, n, c)
    k = ref_logits.shape[0]
    pop_target_logits, pop_labels = _check_logits(
        pop_target_logits, pop_labels, "pop_target_logits"
    )
    if pop_target_logits.shape[1] != c:
        raise DataError(
            f"pop_target_logits must have {c} classes, got {pop_target_logits.shape[1]}"
        )
    z = pop_target_logits.shape[0]
    if z < 1:
        raise DataError("rmia_scores needs at least one population point")
    pop_ref_logits = _check_refs(pop_ref_logits, z, c, "pop_ref_logits")
    if pop_ref_logits.shape[0] != k:
        raise DataError(
            f"pop_ref_logits must come from the same {k} reference models, got {pop_ref_logits.shape[0]}"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise InvalidConfigError(f"gamma must be a number > 0, got {gamma!r}")
    if (
        isinstance(offline_a, bool)
        or not isinstance(offline_a, (int, float))
        or not 0 <= offline_a <= 1
    ):
        raise InvalidConfigError(f"offline_a must be a number in [0, 1], got {offline_a!r}")
    dev = ref_logits.device
    p_x = _true_prob(target_logits, labels).to(dev)
    p_z = _true_prob(pop_target_logits, pop_labels).to(dev)
    ref_px = _true_prob(ref_logits, labels.to(dev).expand(k, n))
    ref_pz = _true_prob(pop_ref_logits.to(dev), pop_labels.to(dev).expand(k, z))
    a = float(offline_a)
    if ref_in is not None and online:
        _check_mask(ref_in, (k, n), "ref_in")
        pr_x = ref_px.mean(0)
        pr_z = ref_pz.mean(0)
    else:
        if ref_in is None:
            out = torch.ones(k, n, dtype=torch.bool, device=dev)
        else:
            out = ~_check_mask(ref_in, (k, n), "ref_in").to(dev)
        cnt = out.sum(0)
        none = cnt == 0
        if bool(none.any()):
            logger.warning(
                "rmia_scores: %d examples have no out reference; using all references for them",
                int(none.sum()),
            )
            out = out | none.unsqueeze(0)
            cnt = out.sum(0)
        pr_out = (ref_px * out).sum(0) / cnt
        pr_x = 0.5 * ((1 + a) * pr_out + (1 - a))
        pr_z = 0.5 * ((1 + a) * ref_pz.mean(0) + (1 - a))
    tiny = 1e-300
    lr_x = p_x / pr_x.clamp_min(tiny)
    lr_z = (p_z / pr_z.clamp_min(tiny)).sort().values
    count = torch.searchsorted(lr_z, lr_x / gamma, right=True)
    return (count.double() / z).float().to(target_logits.device)


# -- label-only ------------------------------------------------------------------------------


class _LabelOracle(Oracle):
    """Wraps a ``predict(x) -> labels`` callable as a label-only oracle."""

    raw_output = "label"

    def __init__(
        self, fn: Callable[[Tensor], Tensor], input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(
            QueryAccess(output="label"), input_shape=input_shape, num_classes=num_classes
        )
        self._fn = fn

    @torch.no_grad()
    def _forward(self, x: Tensor) -> Tensor:
        return self._fn(x).reshape(-1).long()


def _augment(
    x: Tensor, g: torch.Generator, noise_std: float, bounds: tuple[float, float]
) -> Tensor:
    """One random augmentation per row: images get ±1-pixel shifts and horizontal flips,
    flat inputs Gaussian noise."""
    n = x.shape[0]
    if x.ndim == 4:
        shifts = torch.randint(-1, 2, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        padded = F.pad(x, (1, 1, 1, 1))
        h, w = x.shape[2], x.shape[3]
        out = torch.empty_like(x)
        for i in range(n):
            dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
            out[i] = padded[i, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        out[flips] = out[flips].flip(-1)
        return out
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return (x + noise_std * noise).clamp(*bounds)


def label_only_scores(
    model_predict: Callable[[Tensor], Tensor] | Oracle,
    x: Tensor,
    y: Tensor,
    *,
    method: str = "augmentation",
    n_aug: int = 10,
    noise_std: float = 0.05,
    bounds: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    max_queries: int = 1000,
    seed: int = 0,
) -> Tensor:
    """Label-only membership scores (Choquette-Choo et al., ICML 2021).

    ``model_predict`` returns labels (a callable or an :class:`Oracle`).
    ``method="augmentation"``: the fraction of ``n_aug`` augmented copies (random ±1-pixel
    translations and flips for ``(N, C, H, W)`` images; Gaussian noise of ``noise_std`` for
    other inputs) still classified as ``y``. ``method="boundary"``: the L2 distance to the
    decision boundary found by HopSkipJump (``max_queries`` per point) for correctly
    classified points, 0 for misclassified ones; a point whose search found no boundary
    gets the largest distance possible in ``bounds``.
    """
    if (
        not isinstance(x, Tensor)
        or not isinstance(y, Tensor)
        or x.ndim < 2
        or y.ndim != 1
        or len(x) != len(y)
    ):
        raise DataError("x must be a batch (N, ...) and y labels (N,) of the same length")
    if method not in ("augmentation", "boundary"):
        raise InvalidConfigError(f"method must be 'augmentation' or 'boundary', got {method!r}")
    if isinstance(n_aug, bool) or not isinstance(n_aug, int) or n_aug < 1:
        raise InvalidConfigError(f"n_aug must be an integer >= 1, got {n_aug!r}")
    predict = model_predict.predict if isinstance(model_predict, Oracle) else model_predict
    y = y.long()
    if method == "augmentation":
        g = torch.Generator().manual_seed(int(seed))
        hits = torch.zeros(len(x), dtype=torch.float64)
        for _ in range(n_aug):
            pred = predict(_augment(x, g, float(noise_std), bounds)).reshape(-1)
            hits += (pred.cpu().long() == y.cpu()).double()
        return (hits / n_aug).float()
    from modelshield.evasion.hopskipjump import hopskipjump

    if isinstance(model_predict, Oracle):
        oracle: Oracle = model_predict
    else:
        nc = num_classes if num_classes is not None else int(y.max()) + 1
        oracle = _LabelOracle(model_predict, tuple(x.shape[1:]), max(int(nc), 2))
    lo, hi = bounds
    big = (hi - lo) * math.sqrt(x[0].numel())
    result = hopskipjump(
        oracle,
        x,
        y,
        threat=LpThreat(norm="l2", eps=big, bounds=bounds),
        max_queries=max_queries,
        seed=seed,
    )
    if result.distance is None or result.success is None:
        raise DataError("hopskipjump returned no distances")
    correct = result.clean_correct
    if correct is None:
        correct = predict(x).reshape(-1).cpu().long() == y.cpu()
    dist = torch.where(
        result.success.bool(),
        result.distance.float(),
        torch.full_like(result.distance.float(), big),
    )
    return torch.where(correct.bool().cpu(), dist.cpu(), torch.zeros_like(dist.cpu()))


# -- evaluation ------------------------------------------------------------------------------


def evaluate_scores(
    attack: str,
    scores: Tensor,
    labels: Tensor,
    *,
    seed: int | None = 0,
    config: dict[str, Any] | None = None,
    n_boot: int = 200,
    started: float | None = None,
) -> MembershipResult:
    """Package membership scores into a :class:`MembershipResult` (ROC, AUC, TPR at 0.1% and
    1% FPR with stratified bootstrap intervals; Carlini et al. 2022's reporting)."""
    wall = 0.0 if started is None else time.perf_counter() - started
    try:
        return MembershipResult.from_scores(
            attack, scores, labels, seed=seed, config=config, n_boot=n_boot, wall_time=wall
        )
    except InvalidConfigError as e:
        raise DataError(str(e)) from None
