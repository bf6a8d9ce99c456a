"""Poisoning attacks: what each changes, and nothing else; the record; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.results import PoisonResult
from modelshield.poisoning import POISON_ATTACKS, Trigger, apply_trigger, poison
from modelshield.poisoning.triggers import default_patch_size, trigger_mask


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def test_registry_lists_the_four_attacks() -> None:
    assert set(POISON_ATTACKS.names()) == {"label-flip", "badnets", "blended", "clean-label"}


def test_patch_defaults_scale_with_the_image() -> None:
    assert default_patch_size((1, 8, 8)) == 2
    assert default_patch_size((1, 28, 28)) == 3
    assert default_patch_size((3, 32, 32)) == 4
    assert default_patch_size((100,)) == 5


def test_patch_sits_in_the_bottom_right_corner_as_a_checkerboard() -> None:
    x = torch.full((3, 1, 8, 8), 0.5)
    out = apply_trigger(x, Trigger(kind="patch", size=2))
    mask = trigger_mask(Trigger(kind="patch", size=2), (1, 8, 8))
    assert mask.sum() == 4 and bool(mask[0, 6:, 6:].all())
    assert torch.equal(out[:, ~mask], x[:, ~mask])  # nothing else moves
    patch = out[0, 0, 6:, 6:]
    assert patch[1, 1] == 1.0 and patch[0, 1] == 0.0 and patch[1, 0] == 0.0 and patch[0, 0] == 1.0
    four = trigger_mask(Trigger(kind="patch", size=2, corners=4), (1, 8, 8))
    assert four.sum() == 16 and bool(four[0, :2, :2].all()) and bool(four[0, 6:, :2].all())


def test_blend_is_the_convex_mix_with_a_seeded_key() -> None:
    x = torch.rand(4, 3, 5, 5)
    t = Trigger(kind="blend", alpha=0.25, seed=3)
    out = apply_trigger(x, t)
    key = (out - 0.75 * x) / 0.25
    assert torch.allclose(key[0], key[1], atol=1e-5)  # one key for every input
    assert torch.allclose(apply_trigger(x, t), out)
    assert not torch.allclose(apply_trigger(x, Trigger(kind="blend", alpha=0.25, seed=4)), out)


def test_flat_inputs_carry_the_patch_in_their_last_features() -> None:
    x = torch.zeros(2, 20)
    out = apply_trigger(x, Trigger(kind="patch"), bounds=(-1.0, 1.0))
    assert torch.equal(out[:, :-1].abs().sum(1) > 0, torch.tensor([False, False]))
    assert out[0, -1] == 1.0


@pytest.mark.parametrize(
    "kw",
    [{"kind": "star"}, {"size": 0}, {"corners": 2}, {"alpha": 0.0}, {"alpha": 1.5}],
)
def test_bad_trigger_settings_are_refused(kw: dict) -> None:
    with pytest.raises(InvalidConfigError):
        Trigger(**kw)


def test_random_label_flip_changes_exactly_the_recorded_labels(digits: Dataset) -> None:
    p = poison("label-flip", digits, rate=0.1, seed=1)
    idx = p.indices
    assert len(idx) == round(0.1 * len(digits))
    changed = (p.dataset.y != digits.y).nonzero().flatten()
    assert torch.equal(changed, idx)
    assert p.record.details["original_labels"] == digits.y[idx].tolist()
    assert torch.equal(p.dataset.x, digits.x)
    # the other classes are hit uniformly: every class appears among the new labels
    assert set(p.dataset.y[idx].tolist()) == set(range(10))


def test_targeted_label_flip_moves_the_source_class_to_the_target(digits: Dataset) -> None:
    p = poison("label-flip", digits, rate=0.05, target_class=7, source_class=1, seed=0)
    idx = p.indices
    assert bool((digits.y[idx] == 1).all()) and bool((p.dataset.y[idx] == 7).all())
    assert p.record.details["mode"] == "targeted"


def test_badnets_stamps_and_relabels_non_target_samples_only(digits: Dataset) -> None:
    p = poison("badnets", digits, rate=0.1, target_class=3, seed=0)
    idx = p.indices
    assert bool((digits.y[idx] != 3).all()) and bool((p.dataset.y[idx] == 3).all())
    mask = trigger_mask(p.trigger, digits.input_shape)  # type: ignore[arg-type]
    others = torch.ones(len(digits), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(p.dataset.x[others], digits.x[others])
    assert torch.equal(p.dataset.x[idx][:, ~mask], digits.x[idx][:, ~mask])
    assert torch.equal(p.dataset.x[idx], apply_trigger(digits.x[idx], p.trigger))  # type: ignore[arg-type]


def test_blended_relabels_and_blends(digits: Dataset) -> None:
    p = poison("blended", digits, rate=0.05, target_class=0, seed=2)
    idx = p.indices
    assert bool((p.dataset.y[idx] == 0).all())
    assert p.trigger is not None and p.trigger.kind == "blend" and p.trigger.alpha == 0.2


def test_clean_label_keeps_labels_and_bounds_the_perturbation(digits: Dataset) -> None:
    small = digits.subset(torch.arange(600))
    p = poison("clean-label", small, rate=0.05, target_class=2, seed=0, eps=0.1, steps=5)
    idx = p.indices
    assert torch.equal(p.dataset.y, small.y)
    assert bool((small.y[idx] == 2).all())
    trig = p.trigger
    assert trig is not None and trig.corners == 4
    mask = trigger_mask(trig, small.input_shape)
    delta = (p.dataset.x[idx] - small.x[idx])[:, ~mask]
    assert float(delta.abs().max()) <= 0.1 + 1e-6
    assert float(delta.abs().max()) > 0.05  # PGD moved the pixels
    assert torch.equal(p.dataset.x[idx][:, mask], apply_trigger(p.dataset.x[idx], trig)[:, mask])


def test_record_round_trips_through_json(digits: Dataset) -> None:
    p = poison("badnets", digits, rate=0.02, target_class=1, seed=0)
    back = PoisonResult.from_dict(json.loads(json.dumps(p.record.to_dict())))
    assert back.indices == p.record.indices and back.target_class == 1
    assert Trigger.from_dict(back.details["trigger"]) == p.trigger


def test_same_seed_same_poison_other_seed_other(digits: Dataset) -> None:
    a = poison("badnets", digits, rate=0.05, target_class=0, seed=5)
    b = poison("badnets", digits, rate=0.05, target_class=0, seed=5)
    c = poison("badnets", digits, rate=0.05, target_class=0, seed=6)
    assert a.record.indices == b.record.indices != c.record.indices


@pytest.mark.parametrize(
    ("method", "kw", "words"),
    [
        ("badnets", {"rate": 0.0, "target_class": 0}, "rate"),
        ("badnets", {"rate": 1.0, "target_class": 0}, "rate"),
        ("badnets", {"rate": float("nan"), "target_class": 0}, "rate"),
        ("badnets", {"rate": 0.1, "target_class": 10}, "target class"),
        ("badnets", {"rate": 0.95, "target_class": 0}, "only"),
        ("clean-label", {"rate": 0.2, "target_class": 0}, "target class 0"),
        ("label-flip", {"rate": 0.1, "source_class": 2}, "source class"),
        ("label-flip", {"rate": 0.0001}, "poisons none"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(
    digits: Dataset, method: str, kw: dict, words: str
) -> None:
    with pytest.raises(InvalidConfigError, match=words):
        poison(method, digits, **kw)
