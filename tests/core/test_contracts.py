"""Core contracts: threat models, registries, results, seeding, device, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from modelshield.core.device import select_device
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    ModelShieldError,
    QueryBudgetExceeded,
    UnknownComponentError,
)
from modelshield.core.metrics import betainc, clopper_pearson
from modelshield.core.registry import Registry, get_registry
from modelshield.core.results import AttackResult, ProbeResult, Result
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat, QueryAccess


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "l3"},
        {"eps": -0.1},
        {"eps": float("nan")},
        {"eps": "big"},
        {"bounds": (1.0, 0.0)},
        {"bounds": (0.0, float("inf"))},
        {"targeted": "yes"},
    ],
)
def test_lp_threat_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InvalidConfigError):
        LpThreat(**kwargs)


def test_lp_threat_is_frozen_and_round_trips() -> None:
    t = LpThreat("l2", 0.5, (0, 255), targeted=True)
    assert t.bounds == (0.0, 255.0)
    with pytest.raises(AttributeError):
        t.eps = 1.0  # type: ignore[misc]
    assert LpThreat.from_dict(json.loads(json.dumps(t.to_dict()))) == t


@pytest.mark.parametrize(
    "kwargs",
    [
        {"output": "scores"},
        {"max_queries": -1},
        {"max_queries": 1.5},
        {"decimals": 20},
        {"top_k": 0},
    ],
)
def test_query_access_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InvalidConfigError):
        QueryAccess(**kwargs)


def test_error_hierarchy() -> None:
    assert issubclass(InvalidConfigError, ValueError)
    assert issubclass(DataError, ModelShieldError)
    assert issubclass(QueryBudgetExceeded, ModelShieldError)
    assert issubclass(UnknownComponentError, InvalidConfigError)


def test_registry_unknown_name_lists_known_ones() -> None:
    reg: Registry[int] = Registry("test-things")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(UnknownComponentError) as err:
        reg.get("alpah")
    msg = str(err.value)
    assert "alpha, beta" in msg and "did you mean 'alpha'" in msg
    with pytest.raises(InvalidConfigError):
        reg.add("alpha", 3)
    assert get_registry("test-things") is reg
    assert reg.names() == ["alpha", "beta"]


def test_attack_result_json_round_trip() -> None:
    r = AttackResult(
        config={"steps": 10},
        seed=3,
        wall_time=0.5,
        attack="pgd",
        threat=LpThreat().to_dict(),
        x_adv=torch.rand(2, 3),
        success=torch.tensor([True, False]),
        distance=torch.tensor([0.1, 0.2]),
        queries=torch.tensor([5, 11]),
    )
    back = Result.from_json(r.to_json())
    assert isinstance(back, AttackResult)
    assert torch.equal(back.x_adv, r.x_adv) and back.x_adv.dtype == torch.float32
    assert torch.equal(back.success, r.success) and back.success.dtype == torch.bool
    assert back.robust_accuracy == 0.5 and back.seed == 3 and back.config == {"steps": 10}


def test_probe_result_round_trip_and_wrong_type() -> None:
    p = ProbeResult(probe="x", status="skipped", reason="no data", figure={"value": None})
    assert ProbeResult.from_dict(json.loads(p.to_json())) == p
    with pytest.raises(DataError):
        AttackResult.from_dict(p.to_dict())


def test_generators_are_reproducible() -> None:
    a = torch.rand(5, generator=make_generator(7))
    b = torch.rand(5, generator=make_generator(7))
    assert torch.equal(a, b)
    with pytest.raises(InvalidConfigError):
        make_generator(-1)


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidConfigError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfigError, match="CUDA is not available"):
            select_device("cuda")


def test_clopper_pearson_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (47, 100), (999, 1000), (5, 2000)]:
        lo, hi = clopper_pearson(k, n, 0.95)
        ref_lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
        ref_hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
        assert lo == pytest.approx(ref_lo, abs=1e-9)
        assert hi == pytest.approx(ref_hi, abs=1e-9)
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (2, 7, 0.1), (50, 3, 0.95)]:
        assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), abs=1e-12)
