"""PRADA (Juuti et al. 2019) on a small digits model: benign streams pass, synthetic ones are flagged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from modelshield.core.architectures import build
from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.train import train_classifier
from modelshield.serve.app import Gateway
from modelshield.serve.defenses import PradaDefense, Rejection
from modelshield.serve.detector import PradaMonitor


@dataclass
class Digits:
    clf: Classifier
    holdout_x: torch.Tensor
    holdout_y: torch.Tensor

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.clf(x).argmax(dim=1)


@pytest.fixture(scope="module")
def digits() -> Digits:
    data = load_dataset("digits")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    train, hold = perm[:900], perm[900:]
    net = train_classifier(build("mlp", (1, 8, 8), 10), data.x[train], data.y[train], epochs=30)
    clf = from_torch(net, input_shape=(1, 8, 8), num_classes=10)
    return Digits(clf, data.x[hold], data.y[hold])


def jacobian_stream(
    d: Digits, seed: int, rounds: int = 3, lam: float = 0.1, per_class: int = 10
) -> torch.Tensor:
    """Papernot et al. (2017) Jacobian-based dataset augmentation, as an attacker's queries:
    a few real seeds, then each round ``x + lam * sign(grad of the substitute's score)``."""
    order = torch.randperm(len(d.holdout_x), generator=torch.Generator().manual_seed(seed))
    xs, ys = d.holdout_x[order], d.holdout_y[order]
    x = torch.cat([xs[ys == c][:per_class] for c in range(10)])
    stream = [x]
    for r in range(rounds):
        y = d.labels(x)
        sub = train_classifier(build("mlp", (1, 8, 8), 10), x, y, epochs=20, seed=seed + r)
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(sub(xr).gather(1, y[:, None]).sum(), xr)
        new = (x + lam * grad.sign()).clamp(0, 1).detach()
        stream.append(new)
        x = torch.cat([x, new])
    return torch.cat(stream)


def feed(
    mon: PradaMonitor,
    stream: torch.Tensor,
    labels: Callable[[torch.Tensor], torch.Tensor],
    batch: int = 20,
) -> PradaMonitor:
    for i in range(0, len(stream), batch):
        mon.update(stream[i : i + batch], labels(stream[i : i + batch]))
    return mon


def test_benign_iid_streams_are_not_flagged(digits: Digits) -> None:
    flagged = 0
    for seed in range(8):
        idx = torch.randperm(len(digits.holdout_x), generator=torch.Generator().manual_seed(seed))
        mon = feed(PradaMonitor(0.9), digits.holdout_x[idx[:500]], digits.labels)
        assert mon.queries == 500 and mon.last is not None
        assert len(mon.distances) == 500 - 10  # the first query of each class adds no distance
        flagged += mon.flagged
    assert flagged == 0


def test_jacobian_streams_are_flagged_early(digits: Digits) -> None:
    for seed in range(3):
        stream = jacobian_stream(digits, seed)
        mon = feed(PradaMonitor(0.9), stream, digits.labels)
        assert mon.flagged, mon.stats()
        # within the first synthetic round (queries 101-200)
        assert mon.flagged_at is not None and mon.flagged_at <= 200
        assert mon.last is not None and mon.last.w < 0.9


def test_flag_is_sticky_and_per_client(digits: Digits) -> None:
    prada = PradaDefense(0.9)
    stream = jacobian_stream(digits, 7, rounds=1)
    assert prada.observe("mallory", stream, digits.labels(stream)) is None  # action=flag
    assert prada.flagged("mallory") and not prada.flagged("alice")
    benign = digits.holdout_x[:150]
    prada.observe("mallory", benign, digits.labels(benign))
    assert prada.flagged("mallory")
    stats = prada.client_stats("mallory")
    assert stats is not None and stats["flagged"] and stats["queries"] == len(stream) + 150


def test_block_action_refuses_the_flagging_request_and_later_ones(
    digits: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    gw = Gateway(digits.clf, ["prada=0.9,action=block"])
    stream = jacobian_stream(digits, 3, rounds=2)
    refused_at = None
    with caplog.at_level("WARNING", logger="modelshield.serve.defenses"):
        for i in range(0, len(stream), 25):
            try:
                gw.predict("mallory", stream[i : i + 25])
            except Rejection as r:
                assert r.status == 403 and r.code == "extraction_suspected"
                refused_at = i
                break
    assert refused_at is not None and refused_at < 200
    assert "PRADA flagged client 'mallory'" in caplog.text and "blocking" in caplog.text
    with pytest.raises(Rejection, match="flagged as a model-extraction attack"):
        gw.predict("mallory", digits.holdout_x[:1])
    gw.predict("alice", digits.holdout_x[:300])  # others are served
    stats = gw.stats()
    assert stats["flagged"] == ["mallory"]
    assert stats["clients"]["mallory"]["rejected"] == {"extraction_suspected": 2}
    assert stats["clients"]["mallory"]["prada"]["flagged"] is True


def test_monitor_parameters_are_validated() -> None:
    for kwargs in (
        {"delta": 0.0},
        {"delta": 1.0},
        {"min_samples": 2},
        {"window": 6000},
        {"test_every": 0},
        {"outlier_z": 0.0},
    ):
        with pytest.raises(InvalidConfigError, match="PRADA"):
            PradaMonitor(**kwargs)  # type: ignore[arg-type]


def test_duplicate_queries_are_flagged() -> None:
    """A stream that repeats queries (distance 0) beside fresh ones is far from normal."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 16, generator=g)
    stream = torch.cat([x[:100], x[:100]])[torch.randperm(200, generator=g)]
    mon = PradaMonitor(0.9, min_samples=50)
    mon.update(stream, torch.zeros(200, dtype=torch.long))
    assert mon.flagged
