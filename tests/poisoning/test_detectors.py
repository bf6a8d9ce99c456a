"""Detector building blocks against independent references, STRIP's mechanics, and the
feature tap on torch.export files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.architectures import small_cnn
from modelshield.core.classifier import from_torch
from modelshield.core.errors import DataError
from modelshield.core.loading import load_model
from modelshield.core.metrics import precision_recall
from modelshield.poisoning.detectors import (
    fastica,
    knn_label_consistency,
    strip,
    strip_threshold,
    two_means_1d,
    whiten_pca,
)
from modelshield.poisoning.features import final_linear_weight, penultimate_features
from modelshield.poisoning.triggers import Trigger, trigger_mask


def test_two_means_split_is_the_brute_force_optimum() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(40, generator=g), 3 + torch.randn(25, generator=g)])
    mask, ratio = two_means_1d(v)
    s = v.double().sort().values
    best = min(
        float(((s[:k] - s[:k].mean()) ** 2).sum() + ((s[k:] - s[k:].mean()) ** 2).sum())
        for k in range(1, len(s))
    )
    within = float(
        ((v[mask] - v[mask].mean()) ** 2).sum() + ((v[~mask] - v[~mask].mean()) ** 2).sum()
    )
    assert math.isclose(within, best, rel_tol=1e-6)  # float32 sums on our side
    assert bool(v[mask].min() > v[~mask].max())
    total = float(((v - v.mean()) ** 2).sum())
    assert math.isclose(ratio, (total - within) / within, rel_tol=1e-6)


def test_fastica_recovers_the_sources_that_sklearn_recovers() -> None:
    sklearn = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(0)
    n = 2000
    sources = np.stack(
        [np.sign(rng.standard_normal(n)), rng.uniform(-1, 1, n), rng.laplace(size=n)], 1
    )
    mixed = sources @ rng.standard_normal((3, 3)).T
    ours = fastica(whiten_pca(torch.from_numpy(mixed), 3), seed=0).numpy()
    theirs = sklearn.FastICA(n_components=3, random_state=0, whiten="unit-variance").fit_transform(
        mixed
    )
    for est in (ours, theirs):
        corr = np.abs(np.corrcoef(est.T, sources.T)[:3, 3:])
        assert corr.max(axis=0).min() > 0.95  # every source found by one component
    corr = np.abs(np.corrcoef(ours.T, theirs.T)[:3, 3:])
    assert corr.max(axis=1).min() > 0.95  # the same components, up to order and sign


def test_knn_consistency_counts_neighbours_with_the_same_label() -> None:
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    cons = knn_label_consistency(x, y, torch.arange(6), k=2)
    assert cons.tolist() == pytest.approx([0.5, 0.5, 0.0, 1.0, 1.0, 1.0])
    alone = knn_label_consistency(x, y, torch.tensor([3]), k=2, exclude=torch.tensor([4, 5]))
    assert alone.tolist() == pytest.approx([0.5])  # neighbours 2 (label 1) and 1 (label 0)


def test_precision_recall() -> None:
    assert precision_recall([1, 2, 3, 4], [3, 4, 5], 10) == (0.5, 2 / 3)
    assert precision_recall([], [1], 10) == (1.0, 0.0)


class _Backdoored(nn.Module):
    """A model with an exact backdoor: the patch region's mean above 0.7 means class 0."""

    def __init__(self, base: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.base, self.mask = base, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        hit = x[:, self.mask].mean(1) > 0.7
        forced = torch.full_like(logits, -20.0)
        forced[:, 0] = 20.0
        return torch.where(hit[:, None], forced, logits)


def test_strip_flags_inputs_whose_prediction_survives_superimposition() -> None:
    g = torch.Generator().manual_seed(0)
    trig = Trigger(kind="patch", size=3)
    mask = trigger_mask(trig, (1, 12, 12))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    model = from_torch(_Backdoored(base, mask), input_shape=(1, 12, 12), num_classes=10)
    # the patch is all ones and stays so when a clean input (values <= 0.3) is added to it;
    # two clean inputs added stay below 0.7
    clean = torch.rand(300, 1, 12, 12, generator=g) * 0.3
    x = clean[:200].clone()
    x[:20, :, -3:, -3:] = 1.0
    res = strip(model, x, pool=clean[200:], reference=clean[200:], truth=list(range(20)))
    assert res.recall == 1.0 and res.precision is not None and res.precision >= 0.8


def test_strip_threshold_is_the_normal_quantile() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    want = 3.0 - 2.3263478740408408 * float(ref.std())
    assert strip_threshold(ref, 0.01, robust=False) == pytest.approx(want, rel=1e-6)


def test_features_of_a_pt2_file_equal_the_module_s(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = small_cnn((1, 8, 8), 10).eval()
    clf = from_torch(module, input_shape=(1, 8, 8), num_classes=10)
    x = torch.rand(7, 1, 8, 8)
    for dynamic in (True, False):
        shapes = ({0: torch.export.Dim("b", min=1, max=64)},) if dynamic else None
        program = torch.export.export(module, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=shapes)
        path = tmp_path / f"m{dynamic}.pt2"
        torch.export.save(program, str(path))
        loaded = load_model(str(path)).classifier
        assert loaded is not None
        assert torch.allclose(
            penultimate_features(loaded, x), penultimate_features(clf, x), atol=1e-6
        )
        assert final_linear_weight(loaded).shape == (10, 64)


def test_features_refuse_nan_activations() -> None:
    from modelshield.poisoning.detectors import activation_clustering

    with pytest.raises(DataError, match="NaN"):
        activation_clustering(
            torch.full((20, 3), float("nan")),
            torch.zeros(20, dtype=torch.long),
            x=torch.zeros(20, 2),
        )
