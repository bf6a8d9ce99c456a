"""Reference models: LiRA masks, determinism, on-disk cache reuse, logits."""

from __future__ import annotations

import pytest
import torch

from modelshield.core.data import load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnknownComponentError
from modelshield.privacy.shadow import (
    ShadowSpec,
    derive_seed,
    reference_masks,
    train_reference_models,
)

SPEC = ShadowSpec(arch="mlp", epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits")
    return d.x[:300], d.y[:300]


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_masks_each_point_in_exactly_half(k: int) -> None:
    m = reference_masks(500, k, seed=0)
    assert m.dtype == torch.bool and m.shape == (k, 500)
    assert torch.all(m.sum(0) == k // 2)
    # every model gets roughly half the points, and the rows differ
    assert torch.all((m.sum(1) - 250).abs() < 60)
    assert len({tuple(r.tolist()) for r in m}) == k


def test_masks_deterministic_and_odd_k() -> None:
    assert torch.equal(reference_masks(100, 8, 5), reference_masks(100, 8, 5))
    assert not torch.equal(reference_masks(100, 8, 5), reference_masks(100, 8, 6))
    odd = reference_masks(1000, 5, 0).sum(0)
    assert set(odd.unique().tolist()) == {2, 3}
    with pytest.raises(InvalidConfigError, match="k must be"):
        reference_masks(10, 1, 0)
    with pytest.raises(InvalidConfigError, match="n_points"):
        reference_masks(0, 4, 0)


def test_spec_validation() -> None:
    with pytest.raises(UnknownComponentError, match="known:"):
        ShadowSpec(arch="nope")
    with pytest.raises(InvalidConfigError, match="epochs"):
        ShadowSpec(epochs=0)
    with pytest.raises(InvalidConfigError, match="lr"):
        ShadowSpec(lr=-1.0)
    assert ShadowSpec().to_dict()["arch"] == "mlp"


def test_seeds_derived_per_model() -> None:
    seeds = {derive_seed(0, i) for i in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 0) != derive_seed(0, 1)


def test_train_deterministic_and_logits(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    threads = torch.get_num_threads()
    a = train_reference_models(x, y, 10, 2, SPEC, seed=7)
    b = train_reference_models(x, y, 10, 2, SPEC, seed=7)
    assert torch.get_num_threads() == threads  # restored
    assert a.trained == [0, 1] and a.cached == []
    la, lb = a.logits(x), b.logits(x)
    assert la.shape == (2, len(x), 10)
    assert torch.equal(la, lb)
    assert torch.equal(a.masks, reference_masks(len(x), 2, 7))
    # model i really is the i-th model
    with torch.no_grad():
        assert torch.equal(a.model(1)(x), la[1])
    c = train_reference_models(x, y, 10, 2, SPEC, seed=8)
    assert not torch.equal(c.logits(x), la)


def test_cache_reused(digits: tuple[torch.Tensor, torch.Tensor], tmp_path) -> None:
    x, y = digits
    first = train_reference_models(x, y, 10, 4, SPEC, seed=1, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.pt"))
    assert [f.stem for f in files] == sorted(first.keys) and len(files) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    second = train_reference_models(x, y, 10, 4, SPEC, seed=1, cache_dir=tmp_path)
    assert second.trained == [] and second.cached == [0, 1, 2, 3]
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert torch.equal(first.logits(x), second.logits(x))

    # a different spec, seed or data is a different key; a corrupt file is retrained
    other = train_reference_models(x, y, 10, 4, ShadowSpec(epochs=1), seed=1, cache_dir=tmp_path)
    assert other.trained == [0, 1, 2, 3]
    files[0].write_bytes(b"not a torch file")
    third = train_reference_models(x, y, 10, 4, SPEC, seed=1, cache_dir=tmp_path)
    assert len(third.trained) == 1 and len(third.cached) == 3
    assert torch.equal(third.logits(x), first.logits(x))
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.5
    fourth = train_reference_models(x2, y, 10, 4, SPEC, seed=1, cache_dir=tmp_path)
    assert fourth.trained == [0, 1, 2, 3]


def test_input_errors(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    with pytest.raises(DataError, match="labels must lie"):
        train_reference_models(x, y, 5, 2, SPEC, seed=0)
    with pytest.raises(DataError, match="one label per row"):
        train_reference_models(x, y[:-1], 10, 2, SPEC, seed=0)
    with pytest.raises(InvalidConfigError, match="masks must be"):
        train_reference_models(x, y, 10, 2, SPEC, seed=0, masks=torch.ones(3, len(x)))
    with pytest.raises(InvalidConfigError, match="seed"):
        train_reference_models(x, y, 10, 2, SPEC, seed=-1)
    refs = train_reference_models(x[:50], y[:50], 10, 2, ShadowSpec(epochs=1), seed=0)
    with pytest.raises(DataError, match="input shape"):
        refs.logits(torch.zeros(3, 64))
