"""Finding poison in training data, and backdoored inputs at inference time.

- ``spectral`` (Tran et al. 2018, "Spectral Signatures in Backdoor Attacks"): per class,
  the squared projection of each sample's centred penultimate activations on the top
  singular vector; the paper removes the ``1.5 ε n_c`` highest scores of every class,
  where ``ε`` is the expected poison fraction (``expected_rate``). Without it, the top
  scores form a candidate group (the 1-D two-means split of the scores) that is flagged
  only when the verdict below says it is poison.
- ``activation-clustering`` (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering"): per class, activations reduced to 10 dimensions
  by ICA (PCA, whitening, FastICA with the log-cosh contrast; Hyvärinen 1999), then cut
  in two. Chen et al. cut with two-means on all ten components; we also try the cut along
  the most bimodal component (most negative kurtosis: a poison cluster as large as the
  clean part, as at 10% BadNets poison of a 10-class set) and along the component with
  the most separated cut (a small, distant cluster), judge every cluster of every cut,
  and flag the purest poison cluster among those the verdict condemns.
- The verdict on a split. Chen et al. judge clusters by relative size, silhouette or
  exclusionary reclassification (is the cluster classified as its label by a model
  trained without it?). Relative size fails once the poison is half the class, and a
  retraining per class is costly, so we use a cheap stand-in for exclusionary
  reclassification: the label consistency of each cluster's members among their ``k``
  nearest neighbours in input space (self excluded). A poison cluster is made of
  inputs of other classes, so its members' neighbours mostly carry other labels; a
  cluster is flagged when its consistency is below the other cluster's by
  ``margin`` or more. This judges input-space neighbourhoods, so it suits data where
  nearby inputs share a class (digits, MNIST, tabular); it is reported per class so a
  reviewer can see why each cluster was or was not flagged.
- ``strip`` (Gao et al. 2019, "STRIP"): at inference time, superimpose each input with
  ``n_overlays`` random clean inputs and average the prediction entropy; a trigger keeps
  the prediction fixed, so backdoored inputs have low entropy. The threshold is the
  ``frr`` quantile of a normal fitted to the entropies of clean reference inputs (the
  paper's rule); when the reference may hold poison (the training set itself), the fit
  uses the median and MAD.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from modelshield.core.classifier import Classifier
from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.metrics import norm_ppf, precision_recall
from modelshield.core.registry import Registry
from modelshield.core.results import PoisonResult
from modelshield.core.seeding import make_generator

logger = logging.getLogger(__name__)

POISON_DETECTORS: Registry[Callable[..., PoisonResult]] = Registry("poison-detectors")

ICA_COMPONENTS = 10
KNN_K = 10
MARGIN = 0.2
MIN_CLASS = 10
"""Classes with fewer samples are not analysed (too few to split)."""


# -- small numerical pieces -------------------------------------------------------------------
def two_means_1d(v: Tensor) -> tuple[Tensor, float]:
    """The optimal two-cluster split of a 1-D sample (exact: every cut of the sorted
    values is tried). Returns the mask of the cluster above the cut and the separation
    ratio between-cluster / within-cluster sum of squares."""
    n = len(v)
    s, order = v.double().sort()
    c1, c2 = s.cumsum(0), (s * s).cumsum(0)
    k = torch.arange(1, n, dtype=torch.float64)  # left sizes 1..n-1
    left_ss = c2[:-1] - c1[:-1] ** 2 / k
    right_n = n - k
    right_sum = c1[-1] - c1[:-1]
    right_ss = (c2[-1] - c2[:-1]) - right_sum**2 / right_n
    within = left_ss + right_ss
    cut = int(within.argmin())
    total = float(c2[-1] - c1[-1] ** 2 / n)
    w = float(within[cut])
    ratio = (total - w) / w if w > 1e-12 else float("inf")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[cut + 1 :]] = True
    return mask, ratio


def whiten_pca(f: Tensor, dims: int) -> Tensor:
    """Centred features projected on their top ``dims`` principal axes, unit variance."""
    f = f.double() - f.double().mean(0)
    _, s, vt = torch.linalg.svd(f, full_matrices=False)
    d = int(min(dims, int((s > s[0] * 1e-6).sum()) if len(s) else 0))
    if d == 0:
        return f.new_zeros((len(f), 1))
    return (f @ vt[:d].T) / (s[:d] / math.sqrt(max(len(f) - 1, 1)))


def fastica(z: Tensor, *, iters: int = 200, tol: float = 1e-6, seed: int = 0) -> Tensor:
    """Independent components of whitened ``z`` (symmetric FastICA, log-cosh contrast)."""
    n, d = z.shape
    g = make_generator(seed)
    w = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].to(z.dtype)
    for _ in range(iters):
        wx = z @ w.T
        gw = torch.tanh(wx)
        w_new = (gw.T @ z) / n - (1 - gw**2).mean(0)[:, None] * w
        u, _, vt = torch.linalg.svd(w_new)
        w_new = u @ vt  # symmetric decorrelation
        done = float((((w_new * w).sum(1)).abs() - 1).abs().max()) < tol
        w = w_new
        if done:
            break
    return z @ w.T


def kmeans2(z: Tensor, *, restarts: int = 5, iters: int = 100, seed: int = 0) -> Tensor:
    """Two-means (Lloyd's algorithm, k-means++ seeding, best of ``restarts``): the mask
    of the samples in the second cluster."""
    g = make_generator(seed)
    best: tuple[float, Tensor] | None = None
    for _ in range(restarts):
        first = z[int(torch.randint(len(z), (1,), generator=g))]
        d2 = ((z - first) ** 2).sum(1)
        second = (
            z[int(torch.multinomial(d2 / d2.sum(), 1, generator=g))]
            if float(d2.sum()) > 0
            else first
        )
        centres = torch.stack([first, second])
        assign = torch.zeros(len(z), dtype=torch.bool)
        for _ in range(iters):
            new = torch.cdist(z, centres).argmin(1).bool()
            if bool((new == assign).all()) and _ > 0:
                break
            assign = new
            for j, m in enumerate((~assign, assign)):
                if bool(m.any()):
                    centres[j] = z[m].mean(0)
        inertia = float(((z - centres[assign.long()]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign.clone())
    assert best is not None
    return best[1]


def _kurtosis(v: Tensor) -> float:
    c = v - v.mean()
    var = float((c**2).mean())
    return float((c**4).mean()) / var**2 - 3 if var > 0 else 0.0


def candidate_splits(ica: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Ways to cut one class in two: Chen et al.'s two-means on all independent
    components; the component with the most negative kurtosis (a bimodal direction: a
    poison cluster about as large as the clean part); the component whose 1-D two-means
    split is the most separated (a small, distant cluster)."""
    out = {"kmeans": kmeans2(ica, seed=seed)}
    kurt = [_kurtosis(ica[:, j]) for j in range(ica.shape[1])]
    out["bimodal-component"] = two_means_1d(ica[:, int(torch.tensor(kurt).argmin())])[0]
    seps = [two_means_1d(ica[:, j]) for j in range(ica.shape[1])]
    out["separated-component"] = max(seps, key=lambda t: t[1])[0]
    return out


def knn_label_consistency(
    x: Tensor, y: Tensor, idx: Tensor, k: int = KNN_K, exclude: Tensor | None = None
) -> Tensor:
    """For each sample in ``idx``: the share of its ``k`` nearest neighbours (L2 in input
    space, over the whole set, itself and the indices ``exclude`` left out) that carry its
    label."""
    flat = x.flatten(1).float()
    k = min(k, len(x) - 1 - (0 if exclude is None else len(exclude)))
    if k < 1:
        return torch.ones(len(idx))
    out = []
    for i in range(0, len(idx), 512):
        part = idx[i : i + 512]
        d = torch.cdist(flat[part], flat)
        d[torch.arange(len(part)), part] = float("inf")
        if exclude is not None:
            d[:, exclude] = float("inf")
        nn_idx = d.topk(k, largest=False).indices
        out.append((y[nn_idx] == y[part][:, None]).float().mean(1))
    return torch.cat(out) if out else torch.empty(0)


KNN_DIMS = 64
"""Inputs with more features are compared in their top principal components (neighbour
search in a PCA projection, standard practice; it keeps the audit of MNIST-sized sets in
minutes)."""


def knn_space(x: Tensor, dims: int = KNN_DIMS, seed: int = 0) -> Tensor:
    """Flattened inputs, projected on their top ``dims`` principal components when wider."""
    flat = x.flatten(1).float()
    if flat.shape[1] <= dims:
        return flat
    torch.manual_seed(seed)
    centred = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=dims, center=False, niter=4)
    return centred @ v


def _verdict(
    xr: Tensor, y: Tensor, idx: Tensor, group: Tensor, margin: float, cons: Tensor
) -> tuple[bool, dict[str, Any]]:
    """Is ``idx[group]`` poison? Two neighbour-label tests on its members.

    ``cons``: the neighbour-label consistency of every sample of ``idx`` (over all of the
    inputs ``xr``). The group's must be below the rest of the class's by ``margin``; and
    outside the group itself, fewer than half of its members' neighbours may carry their
    label: the group is a cohesive island of inputs that look like other classes. (An
    odd-looking but genuine sub-cluster still has its class around it.)
    """
    if bool(group.all()) or not bool(group.any()):
        return False, {"reason": "no split"}
    inside, outside = float(cons[group].mean()), float(cons[~group].mean())
    if inside > outside - margin:
        return False, {"consistency_suspect": inside, "consistency_rest": outside}
    alone = float(knn_label_consistency(xr, y, idx[group], exclude=idx[group]).mean())
    return alone < 0.5, {
        "consistency_suspect": inside,
        "consistency_rest": outside,
        "consistency_outside_group": alone,
    }


def _check_inputs(features: Tensor, labels: Tensor, x: Tensor | None) -> None:
    if features.ndim != 2 or len(features) != len(labels):
        raise DataError(
            f"features must be (N, D) with N = {len(labels)} labels, got {tuple(features.shape)}"
        )
    if not bool(torch.isfinite(features).all()):
        raise DataError("the model's activations contain NaN or infinite values")
    if x is not None and len(x) != len(labels):
        raise DataError(f"inputs ({len(x)}) and labels ({len(labels)}) differ in length")


def _score(flagged: list[int], truth: list[int] | None, n: int, res: PoisonResult) -> PoisonResult:
    res.indices = sorted(flagged)
    if truth is not None:
        res.precision, res.recall = precision_recall(res.indices, truth, n)
    return res


# -- detectors ------------------------------------------------------------------------------
@POISON_DETECTORS.register("spectral")
def spectral_signatures(
    features: Tensor,
    labels: Tensor,
    *,
    x: Tensor | None = None,
    expected_rate: float | None = None,
    margin: float = MARGIN,
    truth: list[int] | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonResult:
    """Spectral signatures (Tran et al. 2018) on penultimate ``features``.

    With ``expected_rate`` (ε) the paper's rule flags the ``1.5 ε n_c`` top scores of each
    class. Otherwise each class's high-score group is flagged when the inputs ``x`` show
    it is poison (see the module docstring); ``x`` is then required.
    """
    started = time.perf_counter()
    _check_inputs(features, labels, x)
    if expected_rate is None and x is None:
        raise InvalidConfigError("spectral signatures need expected_rate or the inputs x")
    if expected_rate is not None and not (0 < expected_rate < 1):
        raise InvalidConfigError(f"expected_rate must be in (0, 1), got {expected_rate!r}")
    flagged: list[int] = []
    per_class: dict[str, Any] = {}
    scores = torch.zeros(len(labels), dtype=torch.float64)
    xr = knn_space(x, seed=seed) if x is not None and expected_rate is None else None
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < MIN_CLASS:
            per_class[str(c)] = {"n": len(idx), "flagged": 0, "reason": "too few samples"}
            continue
        f = features[idx].double()
        f = f - f.mean(0)
        _, _, vt = torch.linalg.svd(f, full_matrices=False)
        s = (f @ vt[0]) ** 2
        scores[idx] = s
        info: dict[str, Any] = {"n": len(idx)}
        if expected_rate is not None:
            k = min(len(idx), math.ceil(1.5 * expected_rate * len(idx) - 1e-9))
            top = s.topk(k).indices
            flagged += idx[top].tolist()
            info.update(flagged=k, rule="top 1.5·ε·n scores")
        else:
            assert xr is not None
            high, ratio = two_means_1d(s)
            cons = knn_label_consistency(xr, labels, idx)
            poison, why = _verdict(xr, labels, idx, high, margin, cons)
            info.update(why, separation=ratio, candidates=int(high.sum()))
            info["flagged"] = int(high.sum()) if poison else 0
            if poison:
                flagged += idx[high].tolist()
        per_class[str(c)] = info
    res = PoisonResult(
        method="spectral",
        seed=seed,
        config={"expected_rate": expected_rate, "margin": margin},
        details={"per_class": per_class, "scores": scores.float().tolist()},
    )
    res.wall_time = time.perf_counter() - started
    return _score(flagged, truth, len(labels), res)


@POISON_DETECTORS.register("activation-clustering")
def activation_clustering(
    features: Tensor,
    labels: Tensor,
    *,
    x: Tensor,
    components: int = ICA_COMPONENTS,
    margin: float = MARGIN,
    truth: list[int] | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonResult:
    """Activation clustering (Chen et al. 2018) with ICA to ``components`` dimensions and
    the neighbour-label verdict on each class's two clusters."""
    started = time.perf_counter()
    _check_inputs(features, labels, x)
    flagged: list[int] = []
    per_class: dict[str, Any] = {}
    xr = knn_space(x, seed=seed)
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < MIN_CLASS:
            per_class[str(c)] = {"n": len(idx), "flagged": 0, "reason": "too few samples"}
            continue
        z = whiten_pca(features[idx], components)
        ica = fastica(z, seed=seed)
        cons = knn_label_consistency(xr, labels, idx)
        info: dict[str, Any] = {"n": len(idx), "splits": {}}
        hit: Tensor | None = None
        hit_cons = float("inf")
        for split_name, mask in candidate_splits(ica, seed=seed).items():
            small = mask if int(mask.sum()) <= len(mask) // 2 else ~mask
            verdicts = {}
            # judge both clusters: the poison may be the larger one
            for side, group in (("smaller", small), ("larger", ~small)):
                poison, why = _verdict(xr, labels, idx, group, margin, cons)
                verdicts[side] = {"size": int(group.sum()), "poison": poison, **why}
                if poison and why["consistency_suspect"] < hit_cons:
                    hit, hit_cons = group, why["consistency_suspect"]
            info["splits"][split_name] = verdicts
        info["flagged"] = int(hit.sum()) if hit is not None else 0
        if hit is not None:
            flagged += idx[hit].tolist()
        per_class[str(c)] = info
    res = PoisonResult(
        method="activation-clustering",
        seed=seed,
        config={"components": components, "margin": margin, "k": KNN_K},
        details={"per_class": per_class},
    )
    res.wall_time = time.perf_counter() - started
    return _score(flagged, truth, len(labels), res)


def _entropy(logits: Tensor) -> Tensor:
    p = logits.softmax(1)
    return -(p * p.clamp_min(1e-12).log()).sum(1)


@torch.no_grad()
def strip_entropy(
    model: Classifier,
    x: Tensor,
    pool: Tensor,
    *,
    n_overlays: int = 20,
    seed: int = 0,
    batch_size: int = 512,
) -> Tensor:
    """Mean prediction entropy of each input superimposed with ``n_overlays`` random
    inputs of the clean ``pool`` (Gao et al. 2019 add the two images, saturating at the
    bounds: a trigger keeps its strength, the content of both images stays visible)."""
    if n_overlays < 1:
        raise InvalidConfigError(f"n_overlays must be >= 1, got {n_overlays}")
    if len(pool) == 0:
        raise DataError("STRIP needs clean inputs to superimpose; the pool is empty")
    g = make_generator(seed)
    out = torch.zeros(len(x))
    for i in range(0, len(x), max(1, batch_size // n_overlays)):
        xb = x[i : i + max(1, batch_size // n_overlays)]
        pick = torch.randint(len(pool), (len(xb), n_overlays), generator=g)
        low, high = model.bounds
        mixed = (xb[:, None] + pool[pick] - low).clamp(low, high)
        logits = model.logits(mixed.flatten(0, 1).to(model.device)).cpu()
        out[i : i + len(xb)] = _entropy(logits).view(len(xb), n_overlays).mean(1)
    return out


def strip_threshold(reference: Tensor, frr: float, robust: bool) -> float:
    """The entropy below which an input is flagged: the ``frr`` quantile of a normal
    fitted to the clean reference entropies (median/MAD when ``robust``)."""
    if not 0 < frr < 0.5:
        raise InvalidConfigError(f"frr must be in (0, 0.5), got {frr!r}")
    if robust:
        med = float(reference.median())
        spread = 1.4826 * float((reference - med).abs().median())
        return med + norm_ppf(frr) * spread
    return float(reference.mean()) + norm_ppf(frr) * float(reference.std())


@POISON_DETECTORS.register("strip")
def strip(
    model: Classifier,
    x: Tensor,
    *,
    pool: Tensor,
    reference: Tensor | None = None,
    n_overlays: int = 20,
    frr: float = 0.01,
    truth: list[int] | None = None,
    seed: int = 0,
    **_: Any,
) -> PoisonResult:
    """STRIP (Gao et al. 2019): flag inputs of ``x`` whose superimposed predictions have
    low entropy. ``reference``: clean inputs that set the threshold at false rejection
    rate ``frr`` (default: ``x`` itself, with a robust fit)."""
    started = time.perf_counter()
    ent = strip_entropy(model, x, pool, n_overlays=n_overlays, seed=seed)
    if reference is not None:
        ref_ent = strip_entropy(model, reference, pool, n_overlays=n_overlays, seed=seed + 1)
        threshold = strip_threshold(ref_ent, frr, robust=False)
    else:
        threshold = strip_threshold(ent, frr, robust=True)
    flagged = (ent < threshold).nonzero().flatten().tolist()
    res = PoisonResult(
        method="strip",
        seed=seed,
        config={"n_overlays": n_overlays, "frr": frr, "reference": reference is not None},
        details={"threshold": threshold, "entropy": ent.tolist()},
    )
    res.wall_time = time.perf_counter() - started
    return _score(flagged, truth, len(x), res)
