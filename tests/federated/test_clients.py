"""Attacking clients, local DP and our strategies' aggregation, without the engine."""

from __future__ import annotations

import math

import pytest
import torch

from modelshield.federated.attacks import lie_z
from modelshield.federated.task import (
    FLConfig,
    build_model,
    flatten,
    float_keys,
    malicious_ids,
    train_test,
)

pytest.importorskip("flwr")

from modelshield.federated.apps import client_update
from modelshield.federated.strategies import CentralDP, FLTrust, NormBound


def _setup(**kw: object) -> tuple[FLConfig, dict[str, torch.Tensor], int]:
    kw.setdefault("malicious", 0.2 if kw.get("attack") else 0.0)
    cfg = FLConfig(data="digits", num_clients=5, **kw)  # type: ignore[arg-type]
    train, _ = train_test(cfg)
    state = build_model(cfg, train.input_shape, train.num_classes).state_dict()
    ids = malicious_ids(cfg)
    return cfg, state, ids[0] if ids else 0


def _update(cfg: FLConfig, pid: int, state: dict[str, torch.Tensor]) -> torch.Tensor:
    new, _, _ = client_update(cfg, pid, state, server_round=1)
    keys = float_keys(state)
    return flatten(new, keys) - flatten(state, keys)


def test_malicious_clients_are_the_configured_share() -> None:
    cfg = FLConfig(num_clients=10, malicious=0.2, attack="backdoor")
    assert len(malicious_ids(cfg)) == 2 and malicious_ids(cfg) == malicious_ids(cfg)
    assert FLConfig(num_clients=10, malicious=0.0).n_malicious == 0


def test_sign_flip_sends_the_reversed_honest_update() -> None:
    cfg, state, pid = _setup(attack="sign-flip", sign_scale=3.0)
    honest = _update(FLConfig(**{**cfg.__dict__, "malicious": 0.0, "attack": ""}), pid, state)
    assert torch.allclose(_update(cfg, pid, state), -3.0 * honest)


def test_backdoor_update_is_boosted_for_model_replacement() -> None:
    cfg, state, pid = _setup(attack="backdoor", boost=0.0)
    raw = _update(FLConfig(**{**cfg.__dict__, "boost": 1.0}), pid, state)
    boosted = _update(cfg, pid, state)
    assert torch.allclose(boosted, raw * (5 / 1))  # clients per round / malicious


def test_gaussian_attack_sends_noise_of_the_given_scale() -> None:
    cfg, state, pid = _setup(attack="gaussian", gaussian_sigma=0.5)
    u = _update(cfg, pid, state)
    assert abs(float(u.std()) - 0.5) < 0.01 and abs(float(u.mean())) < 0.01


def test_label_flip_and_little_is_enough_differ_from_honest() -> None:
    for attack in ("label-flip", "little-is-enough"):
        cfg, state, pid = _setup(attack=attack)
        honest = _update(FLConfig(**{**cfg.__dict__, "malicious": 0.0, "attack": ""}), pid, state)
        bad = _update(cfg, pid, state)
        cos = float(torch.nn.functional.cosine_similarity(bad, honest, dim=0))
        assert cos < 0.95, attack
    # Baruch et al.: n = 5, m = 1 gives s = floor(3.5) - 1 = 2 and z = Phi^-1(3/5)
    assert lie_z(5, 1) == pytest.approx(0.2533471031357997, rel=1e-6)


def test_local_dp_clips_and_adds_noise_of_sigma_c() -> None:
    cfg, state, pid = _setup(attack="", dp="local", noise_multiplier=2.0, clip=0.1)
    u = _update(cfg, pid, state)
    honest = _update(FLConfig(**{**cfg.__dict__, "dp": ""}), pid, state)
    clipped = honest * min(1.0, 0.1 / float(honest.norm()))
    noise = u - clipped
    assert abs(float(noise.std()) - 2.0 * 0.1) < 0.01


def _updates(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_norm_bound_uses_the_median_norm_by_default() -> None:
    s = NormBound()
    u = _updates(5, 4)
    u[0] *= 100
    out = s.combine(u, torch.ones(5, dtype=torch.float64), 1)
    bound = float(u.norm(dim=1).median())
    scaled = u * torch.clamp(bound / u.norm(dim=1), max=1.0)[:, None]
    assert torch.allclose(out, scaled.mean(0))
    assert s.history[-1]["clipped"] == 2


def test_fltrust_uses_the_server_update() -> None:
    state = {"w": torch.zeros(3)}
    s = FLTrust(server_update=lambda st: {"w": st["w"] + torch.tensor([1.0, 0.0, 0.0])})
    s.global_state = state
    u = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    out = s.combine(u, torch.ones(2, dtype=torch.float64), 1)
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_central_dp_noise_and_fixed_denominator() -> None:
    s = CentralDP(
        num_clients=10, sample_rate=0.5, noise_multiplier=2.0, clip=1.0, delta=1e-5, seed=0
    )
    d = 20000
    s.global_state = {"w": torch.zeros(d)}
    u = _updates(4, d) * 10  # every update gets clipped to norm 1
    out = s.combine(u, torch.ones(4, dtype=torch.float64), 1)
    clipped_sum = (u / u.norm(dim=1, keepdim=True)).sum(0)
    noise = out * (0.5 * 10) - clipped_sum
    assert abs(float(noise.std()) - 2.0) < 0.05  # sigma * C on the sum
    assert s.history[-1]["clipped"] == 4
    assert s.history[-1]["epsilon"] == pytest.approx(s.epsilon(1))
    assert math.isfinite(s.epsilon(1)) and s.epsilon(2) > s.epsilon(1)


def test_plan_runs_crosses_attacks_and_aggregators() -> None:
    from modelshield.federated.run import BASELINE, plan_runs

    cfg = FLConfig(num_clients=10, malicious=0.2, attack="backdoor")
    assert list(plan_runs(cfg, [])) == ["fedavg"]
    one = plan_runs(cfg, ["fedavg", "median"])
    assert list(one) == [BASELINE, "fedavg", "median"]
    assert one[BASELINE].attack == "" and one[BASELINE].malicious == 0.0
    many = plan_runs(cfg, ["fedavg", "median"], ["backdoor", "sign-flip"])
    assert list(many) == [
        BASELINE,
        "fedavg@backdoor",
        "median@backdoor",
        "fedavg@sign-flip",
        "median@sign-flip",
    ]
    assert (
        many["median@sign-flip"].aggregator == "median"
        and many["median@sign-flip"].attack == "sign-flip"
    )
