"""Fidelity and transferability of a stolen copy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.core.oracle import from_classifier
from modelshield.core.threat import QueryAccess
from modelshield.extraction import fidelity, knockoff, transferability
from tests.extraction import digits_victim


def test_fidelity_is_top1_agreement() -> None:
    net = nn.Linear(4, 3)
    x = torch.rand(20, 4)
    labels = net(x).argmax(1)
    assert fidelity(net, labels, x) == 1.0
    flipped = labels.clone()
    flipped[:5] = (flipped[:5] + 1) % 3
    assert fidelity(net, flipped, x) == pytest.approx(0.75)
    with pytest.raises(DataError):
        fidelity(net, labels[:3], x)


def test_transfer_from_a_copy_to_the_victim() -> None:
    clf, pool, held = digits_victim()
    oracle = from_classifier(clf, QueryAccess(output="probs", max_queries=300))
    copy, _ = knockoff(oracle, pool.x, queries=300, arch="mlp", checkpoints=[])
    x, y = held.x[:150], held.y[:150]
    out = transferability(copy, oracle, x, y, eps=0.15, steps=10)
    assert oracle.queries_used == 300  # the transfer check spends no attack budget
    assert out["attack"] == "pgd" and out["n"] == 150 and 0 < out["n_both_correct"] <= 150
    for key in ("success_on_copy", "transfer_rate", "transfer_given_copy_success"):
        assert 0.0 <= out[key] <= 1.0
    assert out["success_on_copy"] > 0.5  # white-box PGD on the copy itself
    assert out["transfer_rate"] <= out["success_on_copy"] + 0.2
    # the victim's own module is a perfect copy: everything that fools it transfers
    self_copy = transferability(clf.module, clf, x, y, eps=0.15, steps=10)
    assert self_copy["transfer_rate"] == pytest.approx(self_copy["success_on_copy"])
    assert self_copy["transfer_given_copy_success"] == 1.0


def test_transfer_rates_are_nan_without_common_correct_points_and_eps_must_be_positive() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(6, 1, 2, 2)
    wrong = 1 - net(x).argmax(1)
    out = transferability(net, net, x, wrong, eps=0.1, steps=2)
    assert out["n_both_correct"] == 0 and math.isnan(out["transfer_rate"])
    with pytest.raises(InvalidConfigError):
        transferability(net, net, x, wrong, eps=0.0)
