"""DP-SGD training: clipping and noise against a naive reference, sampling, ledger, budget."""

from __future__ import annotations

import copy
import math

import pytest
import scipy.stats
import torch
from torch import nn

from modelshield.core.errors import DataError, InvalidConfigError, PrivacyBudgetExceeded
from modelshield.privacy.accounting import compute_epsilon
from modelshield.privacy.dp import (
    GRAD_SAMPLE_MODES,
    DPConfig,
    PoissonBatches,
    build_engine,
    choose_mode,
    fix_module,
    secure_normal,
    train_dp,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _gn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 1 * 2, 3)
    )


def _naive_clipped_mean(net: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float, b: int):
    """Per-example gradients one at a time, clipped to norm c, summed, divided by b."""
    total = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(len(x)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        g = [p.grad.clone() for p in net.parameters()]
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        f = min(1.0, c / (float(norm) + 1e-6))
        total = [a + f * t for a, t in zip(total, g, strict=True)]
    return [a / b for a in total]


def _one_step_update(
    net: nn.Module, mode: str, x, y, *, sigma: float, c: float, b: int, secure=False, seed=0
):
    before = [p.detach().clone() for p in net.parameters()]
    cfg = DPConfig(noise_multiplier=sigma, lr=1.0, secure_rng=secure)
    gen = None if secure else torch.Generator().manual_seed(seed)
    eng = build_engine(
        net,
        mode=mode,
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=b,
        cfg=cfg,
        noise_generator=gen,
    )
    eng.step(x, y)
    eng.close()
    return [b0 - p.detach() for b0, p in zip(before, net.parameters(), strict=True)]


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("factory", [_mlp, _gn_cnn], ids=["mlp", "groupnorm-cnn"])
def test_clipped_gradient_matches_naive_per_example_loop(mode, factory):
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(24, 1, 3, 4, generator=g)  # large inputs: most examples get clipped
    y = torch.randint(0, 3, (24,), generator=g)
    c, b = 0.5, 32  # expected batch size differs from the actual one on purpose
    ref = _naive_clipped_mean(factory(), x, y, c, b)
    got = _one_step_update(factory(), mode, x, y, sigma=0.0, c=c, b=b)
    diff = torch.cat([(u - r).flatten() for u, r in zip(got, ref, strict=True)])
    scale = torch.cat([r.flatten() for r in ref])
    assert float(diff.norm() / scale.norm()) < 1e-4


@pytest.mark.parametrize("secure", [False, True], ids=["torch-rng", "secure-rng"])
def test_noise_has_std_sigma_c_over_expected_batch(secure):
    """Update with noise minus update without = N(0, (sigma C / B)^2) per coordinate."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(12, 400), nn.ReLU(), nn.Linear(400, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 3, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    sigma, c, b = 2.0, 0.7, 16
    clean = _one_step_update(copy.deepcopy(wide), "hooks", x, y, sigma=0.0, c=c, b=b)
    noisy = _one_step_update(
        copy.deepcopy(wide), "hooks", x, y, sigma=sigma, c=c, b=b, secure=secure
    )
    noise = torch.cat([(n - k).flatten() for n, k in zip(noisy, clean, strict=True)]).double()
    assert noise.numel() > 6000
    std = sigma * c / b
    assert float(noise.std()) == pytest.approx(std, rel=0.05)
    assert scipy.stats.kstest((noise / std).numpy(), "norm").pvalue > 1e-3


def test_secure_normal_is_standard_normal_and_not_reproducible():
    z = secure_normal((20_000,), 1.5)
    assert scipy.stats.kstest((z / 1.5).numpy(), "norm").pvalue > 1e-3
    assert not torch.equal(z[:100], secure_normal((100,), 1.5))


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_batches_include_each_example_with_probability_q(secure):
    n, q, steps = 2000, 0.05, 200
    gen = None if secure else torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    sizes = []
    for idx in PoissonBatches(n, q, steps, generator=gen):
        counts[idx] += 1
        sizes.append(len(idx))
    # batch sizes ~ Binomial(n, q): mean qn, variance nq(1-q)
    mean = sum(sizes) / steps
    assert abs(mean - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert len(set(sizes)) > 5  # sizes vary: Poisson sampling, not fixed batches
    # each example's inclusion count ~ Binomial(steps, q)
    assert float(counts.mean()) == pytest.approx(steps * q, rel=0.02)


def test_poisson_batches_are_reproducible_with_a_seed():
    a = list(PoissonBatches(100, 0.1, 5, generator=torch.Generator().manual_seed(3)))
    b = list(PoissonBatches(100, 0.1, 5, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_fix_module_replaces_batchnorm_and_says_so():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    )
    fixed, changes = fix_module(net)
    assert changes == ["1: BatchNorm2d -> GroupNorm"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    _, none = fix_module(_mlp())
    assert none == []


def test_choose_mode_picks_a_working_mode_and_times_it():
    choice = choose_mode(_mlp(), (1, 3, 4), 3, 64, device=torch.device("cpu"), repeats=2)
    assert choice["mode"] in GRAD_SAMPLE_MODES
    assert set(choice["seconds_per_step"]) | set(choice["failed"]) == set(GRAD_SAMPLE_MODES)
    assert all(t > 0 for t in choice["seconds_per_step"].values())


def _blobs(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.randn(3, 12, generator=g)
    x = centers[y] + 0.3 * torch.randn(n, 12, generator=g)
    return x, y


def test_train_dp_learns_and_writes_an_honest_ledger(tmp_path):
    x, y = _blobs()
    cfg = DPConfig(epsilon=3.0, delta=1e-5, epochs=4, batch_size=60, lr=0.5, mode="hooks")
    res = train_dp(
        nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), x, y, cfg, validation=(x, y)
    )
    led = res.ledger
    assert res.history[-1]["val_accuracy"] > 0.8
    assert led.steps == 4 * round(1 / led.sample_rate) == 40
    assert led.sample_rate == pytest.approx(60 / 600)
    # the ledger's epsilon is what an accountant says for its own (q, sigma, steps, delta)
    again = compute_epsilon(
        sample_rate=led.sample_rate,
        noise_multiplier=led.noise_multiplier,
        steps=led.steps,
        delta=led.delta,
    )
    assert led.epsilon == pytest.approx(again, rel=1e-9)
    assert led.epsilon <= 3.0 * 1.001
    assert led.epsilon > 2.5  # the noise was chosen to spend (close to) the target, not far less
    eps = [r["epsilon"] for r in led.per_epoch]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(led.epsilon)
    d = led.to_dict()
    for key in (
        "mechanism",
        "sample_rate",
        "noise_multiplier",
        "steps",
        "accountant",
        "epsilon",
        "delta",
    ):
        assert key in d
    assert (
        d["grad_sample_mode"] == "hooks"
        and d["secure_rng"] is False
        and "secure RNG off" in d["rng_note"]
    )
    assert "rdp" in d["epsilon_other"] and d["epsilon_other"]["rdp"] >= led.epsilon
    path = led.save(tmp_path / "ledger.json")
    assert path.exists()


def test_train_dp_refuses_to_exceed_the_budget_before_training():
    x, y = _blobs()
    net = nn.Sequential(nn.Linear(12, 3))
    before = copy.deepcopy(net.state_dict())
    cfg = DPConfig(noise_multiplier=0.5, max_epsilon=0.5, epochs=5, batch_size=60)
    with pytest.raises(PrivacyBudgetExceeded, match=r"over the budget 0\.5"):
        train_dp(net, x, y, cfg)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_train_dp_is_reproducible_and_resumes_from_a_checkpoint(tmp_path):
    x, y = _blobs(300)
    cfg = DPConfig(noise_multiplier=1.0, epochs=3, batch_size=30, lr=0.3, mode="hooks", seed=5)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    full = train_dp(fresh(), x, y, cfg).module.state_dict()
    again = train_dp(fresh(), x, y, cfg).module.state_dict()
    assert all(torch.equal(full[k], again[k]) for k in full)

    class Stop(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Stop

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Stop):
        train_dp(fresh(), x, y, cfg, checkpoint=ckpt, on_epoch=stop_after_two)
    resumed = train_dp(fresh(), x, y, cfg, checkpoint=ckpt)
    assert resumed.resumed_from_epoch == 2
    assert resumed.ledger.steps == 30
    for k in full:
        assert torch.allclose(full[k], resumed.module.state_dict()[k], atol=1e-6)


def test_secure_rng_and_shuffled_batches_are_recorded():
    x, y = _blobs(200)
    res = train_dp(
        nn.Sequential(nn.Linear(12, 3)),
        x,
        y,
        DPConfig(
            noise_multiplier=1.0,
            epochs=1,
            batch_size=20,
            secure_rng=True,
            poisson=False,
            mode="hooks",
        ),
    )
    assert res.ledger.secure_rng and "secure RNG on" in res.ledger.rng_note
    assert res.ledger.sampling == "shuffle" and any("not Poisson" in n for n in res.ledger.notes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"epsilon": 1.0, "noise_multiplier": 1.0},
        {"epsilon": -1.0},
        {"epsilon": float("nan")},
        {"noise_multiplier": 1.0, "delta": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 0.0},
        {"noise_multiplier": 1.0, "mode": "fast"},
        {"noise_multiplier": 1.0, "accountant": "moments"},
    ],
)
def test_dp_config_rejects_bad_settings(kwargs):
    with pytest.raises(InvalidConfigError):
        DPConfig(**kwargs)


def test_train_dp_rejects_nan_inputs_and_labels_out_of_range():
    x, y = _blobs(60)
    bad = x.clone()
    bad[3, 2] = float("nan")
    cfg = DPConfig(noise_multiplier=1.0, epochs=1, batch_size=10, mode="hooks")
    with pytest.raises(DataError, match="NaN"):
        train_dp(nn.Linear(12, 3), bad, y, cfg)
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        train_dp(nn.Linear(12, 3), x, y + 1, cfg, num_classes=3)
