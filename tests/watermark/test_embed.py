"""Embedding on the bundled digits (MLP): the mark takes, clean accuracy stays, independent
models do not verify, fine-tuning does not remove it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from modelshield.core.architectures import build
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.train import train_classifier
from modelshield.watermark import (
    WatermarkKey,
    embed,
    embed_and_evaluate,
    false_positive_check,
    fine_tune,
    train_independent_models,
    verify,
)
from modelshield.watermark.embed import accuracy

EPOCHS, LR = 15, 3e-3


@dataclass
class Digits:
    train: Dataset
    test: Dataset
    key: WatermarkKey
    baseline: nn.Module
    baseline_accuracy: float


@pytest.fixture(scope="module")
def digits() -> Digits:
    data = load_dataset("digits")
    train, test = data.split(0.75, seed=0)
    key = WatermarkKey.generate(input_shape=data.input_shape, num_classes=10, seed=2024)
    base = train_classifier(
        build("mlp", data.input_shape, 10), train.x, train.y, epochs=EPOCHS, lr=LR, seed=0
    )
    return Digits(train, test, key, base, accuracy(base, test.x, test.y))


@pytest.fixture(scope="module")
def marked(digits: Digits) -> nn.Module:
    out = embed_and_evaluate(
        build("mlp", digits.train.input_shape, 10),
        digits.train.x,
        digits.train.y,
        digits.key,
        test_x=digits.test.x,
        test_y=digits.test.y,
        epochs=EPOCHS,
        lr=LR,
        batch_size=64,
        from_scratch=True,
        seed=0,
    )
    assert out.clean_accuracy_before is None  # from scratch: no "before"
    assert out.verdict.trigger_accuracy >= 0.95 and out.verdict.p_value < 1e-6
    assert out.verdict.verified and out.verdict.access == "white-box"
    assert abs(out.clean_accuracy_after - digits.baseline_accuracy) <= 0.03
    assert len(out.history) == EPOCHS and out.history[-1]["trigger_accuracy"] >= 0.95
    return out.module


def test_embedding_from_scratch_marks_and_keeps_accuracy(digits: Digits, marked: nn.Module) -> None:
    v = verify(marked, digits.key)
    assert v.verified and v.matches >= 95
    assert verify(digits.baseline, digits.key).p_value > 1e-3  # the same recipe, unmarked


def test_fine_tuning_an_existing_model_marks_it(digits: Digits) -> None:
    out = embed_and_evaluate(
        copy.deepcopy(digits.baseline),
        digits.train.x,
        digits.train.y,
        digits.key,
        test_x=digits.test.x,
        test_y=digits.test.y,
        epochs=10,
        lr=LR,
        from_scratch=False,
        seed=1,
    )
    assert out.clean_accuracy_before == pytest.approx(digits.baseline_accuracy)
    assert out.verdict.verified and out.verdict.trigger_accuracy >= 0.9
    assert out.clean_accuracy_after >= out.clean_accuracy_before - 0.03
    assert out.summary()["clean_accuracy_change"] == pytest.approx(
        out.clean_accuracy_after - out.clean_accuracy_before
    )


def test_independent_models_do_not_verify(digits: Digits) -> None:
    models = train_independent_models(
        lambda: build("mlp", digits.train.input_shape, 10),
        digits.train.x,
        digits.train.y,
        seeds=range(100, 110),
        epochs=EPOCHS,
        lr=LR,
    )
    fp = false_positive_check(models, digits.key)
    assert fp["n_models"] == 10 and fp["verified"] == 0
    assert fp["min_p_value"] > 1e-4
    assert sum(p > 0.01 for p in fp["p_values"]) >= 9


def test_fine_tuning_the_last_layer_keeps_the_mark(digits: Digits, marked: nn.Module) -> None:
    before = [p.detach().clone() for p in marked.parameters()]
    for layers in ("last", "all"):
        attacked = fine_tune(
            marked, digits.test.x, digits.test.y, layers=layers, epochs=5, lr=1e-3, seed=0
        )
        assert verify(attacked, digits.key).verified, layers
    assert all(torch.equal(a, b) for a, b in zip(before, marked.parameters(), strict=True))


def test_same_seed_same_weights_and_global_rng_untouched(digits: Digits) -> None:
    x, y = digits.train.x[:256], digits.train.y[:256]
    net = build("mlp", x.shape[1:], 10)
    state = torch.get_rng_state()
    a = embed(net, x, y, digits.key, epochs=2, from_scratch=True, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = embed(build("mlp", x.shape[1:], 10), x, y, digits.key, epochs=2, from_scratch=True, seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = embed(build("mlp", x.shape[1:], 10), x, y, digits.key, epochs=2, from_scratch=True, seed=6)
    assert not torch.equal(next(iter(a.parameters())), next(iter(c.parameters())))


def test_embed_refuses_what_does_not_fit(digits: Digits) -> None:
    x, y = digits.train.x[:64], digits.train.y[:64]
    wrong_shape = WatermarkKey.generate(input_shape=(1, 6, 6), num_classes=10, seed=1)
    with pytest.raises(DataError, match="shape"):
        embed(build("mlp", x.shape[1:], 10), x, y, wrong_shape, epochs=1)
    three = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=3, seed=1)
    with pytest.raises(DataError, match="labels"):
        embed(build("mlp", x.shape[1:], 10), x, y, three, epochs=1)
    twelve = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=12, seed=1)
    with pytest.raises(UnsupportedModelError, match="12-class"):
        embed(build("mlp", x.shape[1:], 10), x, y, twelve, epochs=1)
    with pytest.raises(InvalidConfigError, match="epochs"):
        embed(build("mlp", x.shape[1:], 10), x, y, digits.key, epochs=0)
    with pytest.raises(InvalidConfigError, match="triggers_per_batch"):
        embed(build("mlp", x.shape[1:], 10), x, y, digits.key, triggers_per_batch=0)
