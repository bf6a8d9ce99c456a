"""The removal-robustness suite: pruning and fine-tuning helpers, extraction (or its clean
skip), the false-positive check, and the result record."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from modelshield.core.architectures import build
from modelshield.core.data import load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.results import Result
from modelshield.watermark import (
    WatermarkKey,
    WatermarkRobustnessResult,
    embed,
    magnitude_prune,
    robustness_suite,
)
from modelshield.watermark.robustness import last_layer, sparsity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_the_smallest_weights(scope: str) -> None:
    net = _net()
    original = [p.detach().clone() for p in net.parameters()]
    for amount in (0.0, 0.2, 0.5, 0.8):
        pruned = magnitude_prune(net, amount, scope=scope)
        assert sparsity(pruned) == pytest.approx(amount, abs=0.01)
        biases = [p for p in pruned.parameters() if p.ndim == 1]
        assert all(bool((b != 0).all()) for b in biases)  # biases are kept
        if scope == "layer":
            for p in pruned.parameters():
                if p.ndim >= 2:
                    assert float((p == 0).double().mean()) == pytest.approx(amount, abs=0.01)
    pruned = magnitude_prune(net, 0.5, scope="global")
    w = torch.cat([p.detach().abs().flatten() for p in net.parameters() if p.ndim >= 2])
    kept = torch.cat([p.detach().abs().flatten() for p in pruned.parameters() if p.ndim >= 2])
    assert float(w[kept == 0].max()) <= float(w[kept != 0].min())  # smallest ones went
    assert all(torch.equal(a, b) for a, b in zip(original, net.parameters(), strict=True))
    with pytest.raises(InvalidConfigError, match="amount"):
        magnitude_prune(net, 1.0)
    with pytest.raises(InvalidConfigError, match="scope"):
        magnitude_prune(net, 0.5, scope="channel")


def test_last_layer_is_the_head() -> None:
    net = _net()
    assert last_layer(net) is net[3]
    cnn = build("small_cnn", (1, 8, 8), 10)
    assert last_layer(cnn) is cnn[-1] and isinstance(cnn[-1], nn.Linear)


@pytest.fixture(scope="module")
def setting() -> tuple:
    data = load_dataset("digits")
    train, test = data.split(0.75, seed=0)
    owner, attacker = train.split(0.5, seed=1)
    key = WatermarkKey.generate(input_shape=data.input_shape, num_classes=10, n=50, seed=3)
    marked = embed(
        build("mlp", data.input_shape, 10),
        owner.x,
        owner.y,
        key,
        epochs=20,
        lr=3e-3,
        from_scratch=True,
        seed=0,
    )
    return owner, attacker, test, key, marked


def test_suite_records_every_attempt(setting: tuple) -> None:
    owner, attacker, test, key, marked = setting
    res = robustness_suite(
        marked,
        key,
        owner.x,
        owner.y,
        test_x=test.x,
        test_y=test.y,
        attacker_x=attacker.x,
        attacker_y=attacker.y,
        pool=test.x,
        fine_tune_epochs=2,
        prune_amounts=(0.2, 0.9),
        extraction_queries=300,
        extraction_epochs=3,
        independent_models=3,
        independent_epochs=5,
        independent_lr=3e-3,
    )
    assert res.marked["verified"] and res.marked["trigger_accuracy"] >= 0.9
    attacks = [a["attack"] for a in res.attempts]
    assert attacks == [
        "ftll",
        "ftal",
        "rtll",
        "rtal",
        "prune-global",
        "prune-global",
        "extraction-knockoff",
    ]
    rows = {(a["attack"], a["setting"].get("amount")): a for a in res.attempts}
    assert rows[("ftll", None)]["verified"]  # fine-tuning the head keeps the mark
    assert rows[("prune-global", 0.2)]["verified"]
    assert rows[("prune-global", 0.9)]["extra"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    for a in res.attempts:
        if a["status"] == "ok":
            assert 0 <= a["clean_accuracy"] <= 1 and 0 <= a["p_value"] <= 1
    ext = rows[("extraction-knockoff", None)]
    assert ext["status"] in ("ok", "skipped", "error")
    if ext["status"] == "ok":
        assert ext["setting"]["queries"] == 300
    fp = res.false_positives
    assert fp["n_models"] == 3 and fp["verified"] == 0 and len(fp["clean_accuracy"]) == 3
    back = Result.from_json(res.to_json())
    assert isinstance(back, WatermarkRobustnessResult) and back.attempts == res.attempts
    assert "seed" not in res.key and len(res.table()) == len(res.attempts)


def test_extraction_degrades_to_a_skip_without_the_module(
    setting: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, _, _, key, marked = setting
    monkeypatch.setitem(sys.modules, "modelshield.extraction", None)  # import fails
    res = robustness_suite(
        marked,
        key,
        owner.x,
        owner.y,
        fine_tune_variants=(),
        prune_amounts=(),
        extraction_queries=100,
        independent_models=0,
    )
    (row,) = res.attempts
    assert row["attack"] == "extraction-knockoff" and row["status"] == "skipped"
    assert row["reason"] == "extraction module unavailable"
    assert res.false_positives == {"n_models": 0}
    with pytest.raises(InvalidConfigError, match="variant"):
        robustness_suite(marked, key, owner.x, owner.y, fine_tune_variants=("ftxx",))
