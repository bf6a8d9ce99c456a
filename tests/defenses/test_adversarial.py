"""Adversarial training (PGD-AT, TRADES, FGSM-RS): robustness gained, closed forms, resuming.

The robustness tests measure with the library's own evaluator, ``evasion.pgd`` (20 steps,
random start), on held-out bundled digits: an undefended MLP is broken at L∞ eps 0.15 and
every recipe must raise its PGD-robust accuracy by at least 20 percentage points. The inner
maximisations are checked against the closed-form worst case of a linear two-class model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelshield.core.architectures import ARCHITECTURES, build, mlp
from modelshield.core.classifier import from_torch
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.results import Result
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.core.train import train_classifier
from modelshield.defenses import DEFENSES
from modelshield.defenses.adversarial import (
    CHECKPOINT_NAME,
    AdversarialTrainingConfig,
    AdversarialTrainingResult,
    _fgsm_rs_examples,
    _pgd_examples,
    _trades_examples,
    adversarial_train,
    learning_rate_at,
)
from modelshield.evasion import _lp, pgd

EPS = 0.15  # L∞, on digits scaled to [0, 1]
THREAT = LpThreat("linf", EPS)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and spares a loaded machine oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_dataset("digits").split(0.75, seed=0)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(SHAPE, 10)


def _measure(module: nn.Module, test: Dataset) -> tuple[float, float]:
    """Clean and 20-step PGD-robust accuracy with the library's evaluator."""
    clf = from_torch(module, input_shape=SHAPE, num_classes=10)
    res = pgd(clf, test.x, test.y, threat=THREAT, steps=20, seed=0)
    return clf.accuracy(test.x, test.y), res.robust_accuracy


@pytest.fixture(scope="module")
def undefended(digits: tuple[Dataset, Dataset]) -> tuple[float, float]:
    train, test = digits
    module = train_classifier(_mlp(), train.x, train.y, epochs=10, lr=3e-3, seed=0)
    return _measure(module, test)


def test_undefended_model_is_broken_at_the_test_eps(undefended: tuple[float, float]) -> None:
    clean, robust = undefended
    print(f"\nundefended: clean {clean:.3f}, PGD-20 robust {robust:.3f} at linf eps {EPS}")
    assert clean > 0.93
    assert robust < 0.15


@pytest.mark.parametrize(
    ("method", "extra"),
    [("pgd-at", {"steps": 5}), ("fgsm-rs", {}), ("trades", {"steps": 5})],
)
def test_adversarial_training_raises_robust_accuracy(
    digits: tuple[Dataset, Dataset],
    undefended: tuple[float, float],
    method: str,
    extra: dict[str, Any],
    record_property: Any,
) -> None:
    train, test = digits
    cfg = AdversarialTrainingConfig(
        method=method, eps=EPS, epochs=10, batch_size=64, optimizer="adam", lr=3e-3, **extra
    )
    module = _mlp()
    result = adversarial_train(module, train.x, train.y, cfg)
    clean, robust = _measure(module, test)
    base_clean, base_robust = undefended
    line = (
        f"{method}: clean {base_clean:.3f} -> {clean:.3f} (cost {base_clean - clean:+.3f}), "
        f"PGD-20 robust {base_robust:.3f} -> {robust:.3f} at linf eps {EPS}, "
        f"{result.wall_time:.2f}s"
    )
    print("\n" + line)
    record_property("figures", line)
    assert robust >= base_robust + 0.20, line
    assert clean > 0.75, line  # robust, not merely constant
    assert result.epochs_completed == 10 and len(result.history) == 10
    assert result.history[-1]["adv_accuracy"] > result.history[0]["adv_accuracy"]
    assert not module.training


# -- the inner maximisations against closed forms ------------------------------------------------
def _linear_two_class() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear 2-class model on 1×4×4 inputs, and points inside the box away from its edges.

    For logits ``Wx + b`` the cross-entropy of class ``y`` grows as the margin
    ``(w_y − w_o)·x`` falls, so the L∞ worst case is the corner ``x − eps·sign(w_y − w_o)``.
    """
    g = make_generator(3)
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 16, generator=g))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.3 + 0.4 * torch.rand(32, 1, 4, 4, generator=g)
    y = torch.arange(32) % 2
    return model, x, y


def _corner(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    w = model[1].weight.detach()
    direction = (w[y] - w[1 - y]).sign().view_as(x)
    return x - eps * direction


def test_pgd_inner_loop_reaches_the_closed_form_worst_case() -> None:
    model, x, y = _linear_two_class()
    got = _pgd_examples(
        model,
        x,
        y,
        norm="linf",
        eps=0.1,
        step_size=0.025,
        steps=10,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert torch.allclose(got, _corner(model, x, y, 0.1), atol=1e-6)


def test_fgsm_rs_step_of_two_eps_reaches_the_corner_from_any_start() -> None:
    model, x, y = _linear_two_class()
    got = _fgsm_rs_examples(
        model,
        x,
        y,
        norm="linf",
        eps=0.1,
        alpha=0.2,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert torch.allclose(got, _corner(model, x, y, 0.1), atol=1e-6)


def test_fgsm_rs_start_is_not_clipped_so_pixels_at_the_edge_keep_their_randomness() -> None:
    # Black pixels (x = 0) with a loss gradient pointing up: a start clipped to [0, 1] would
    # put every pixel on eps after the step (plain FGSM); Wong et al.'s unclipped start puts
    # the pixels whose start fell below 0 anywhere in [alpha - eps, eps] = [0.075, 0.3].
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(64), torch.ones(64)]))
        model[1].bias.zero_()
    x = torch.zeros(50, 1, 8, 8)
    y = torch.zeros(50, dtype=torch.long)  # the loss of class 0 grows with every pixel
    got = _fgsm_rs_examples(
        model,
        x,
        y,
        norm="linf",
        eps=0.3,
        alpha=0.375,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert float(got.min()) >= 0.075 - 1e-6 and float(got.max()) <= 0.3 + 1e-6
    assert 0.3 < float((got < 0.3 - 1e-6).float().mean()) < 0.7  # about half moved less


def test_fgsm_rs_default_step_stays_in_the_threat_set_and_raises_the_loss() -> None:
    model, x, y = _linear_two_class()
    got = _fgsm_rs_examples(
        model,
        x,
        y,
        norm="l2",
        eps=0.5,
        alpha=0.625,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert bool((_lp.lp_norm(got - x, "l2") <= 0.5 + 1e-5).all())
    assert F.cross_entropy(model(got), y) > F.cross_entropy(model(x), y)


def test_trades_inner_loop_raises_the_kl_and_stays_in_the_ball() -> None:
    model, x, _ = _linear_two_class()
    got = _trades_examples(
        model,
        x,
        norm="linf",
        eps=0.1,
        step_size=0.025,
        steps=10,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert float((got - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
        kl = F.kl_div(F.log_softmax(model(got), dim=1), p, reduction="batchmean")
    assert float(kl) > 0.05


def test_pgd_inner_loop_is_at_least_as_strong_as_the_evaluator(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, test = digits
    module = train_classifier(_mlp(), train.x, train.y, epochs=10, lr=3e-3, seed=0).eval()
    x_adv = _pgd_examples(
        module,
        test.x,
        test.y,
        norm="linf",
        eps=EPS,
        step_size=2.5 * EPS / 20,
        steps=20,
        bounds=(0.0, 1.0),
        generator=make_generator(0),
    )
    assert float((x_adv - test.x).abs().max()) <= EPS + 1e-6
    inner = float((module(x_adv).argmax(1) == test.y).float().mean())
    _, robust = _measure(module, test)
    assert inner <= robust + 0.03  # last iterate vs evasion.pgd's first success


# -- config -------------------------------------------------------------------------------------
def test_defaults_are_resolved() -> None:
    pgd_cfg = AdversarialTrainingConfig(eps=0.1, steps=4)
    assert pgd_cfg.step_size == pytest.approx(2.5 * 0.1 / 4)
    assert pgd_cfg.schedule == "multistep" and pgd_cfg.lr == 0.1
    assert pgd_cfg.weight_decay == 5e-4 and pgd_cfg.momentum == 0.9
    fast = AdversarialTrainingConfig(method="fgsm-rs", eps=0.3)
    assert fast.step_size == pytest.approx(0.375) and fast.schedule == "cyclic"
    assert fast.keep_best and not pgd_cfg.keep_best
    adam = AdversarialTrainingConfig(optimizer="adam")
    assert adam.lr == 1e-3 and adam.weight_decay == 0.0
    assert AdversarialTrainingConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(AttributeError):
        fast.eps = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "pgd"},
        {"method": "fgsm-rs", "schedule": "cosine"},
        {"norm": "l3"},
        {"eps": 0.0},
        {"eps": float("nan")},
        {"eps": "0.1"},
        {"steps": 0},
        {"steps": 2.5},
        {"steps": True},
        {"step_size": -0.1},
        {"beta": -1.0},
        {"epochs": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"optimizer": "rmsprop"},
        {"momentum": 1.0},
        {"weight_decay": -1e-4},
        {"bf16": 1},
        {"bounds": (1.0, 0.0)},
        {"seed": -1},
        {"eps_warmup_epochs": -1},
        {"eps_warmup_epochs": 11},
        {"attack_mode": "test"},
        {"keep_best": "yes"},
    ],
)
def test_bad_configs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidConfigError) as info:
        AdversarialTrainingConfig(**bad)
    assert list(bad)[-1] in str(info.value)  # the message names the parameter


def test_unknown_options_are_refused_by_name() -> None:
    with pytest.raises(InvalidConfigError, match="alpha"):
        AdversarialTrainingConfig.from_dict({"alpha": 0.1})


def test_cyclic_schedule_is_a_triangle_over_all_iterations() -> None:
    cfg = AdversarialTrainingConfig(method="fgsm-rs", epochs=4, lr=0.2)
    per_epoch = 5
    lrs = [learning_rate_at(cfg, i, per_epoch) for i in range(20)]
    # lr·(1 − |2(i + ½)/20 − 1|): 0.01, 0.03, ..., 0.19, 0.19, ..., 0.01 (times lr)
    expected = [0.2 * (1 - abs((2 * i + 1) / 20 - 1)) for i in range(20)]
    assert lrs == pytest.approx(expected)
    assert max(lrs) == pytest.approx(0.19) and lrs[0] == pytest.approx(0.01)
    assert lrs[:10] == sorted(lrs[:10]) and lrs[10:] == sorted(lrs[10:], reverse=True)


def test_multistep_and_constant_schedules() -> None:
    cfg = AdversarialTrainingConfig(epochs=8, lr=0.1)  # milestones at epochs 4 and 6
    got = [learning_rate_at(cfg, e * 3, 3) for e in range(8)]
    assert got == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    flat = AdversarialTrainingConfig(epochs=8, lr=0.1, schedule="constant")
    assert {learning_rate_at(flat, i, 3) for i in range(24)} == {0.1}


# -- resuming -------------------------------------------------------------------------------------
def _resumable_net() -> nn.Module:
    """BatchNorm (buffers), dropout (the global RNG) and SGD momentum all have state to keep."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(256, 10),
    )


def _small(digits: tuple[Dataset, Dataset]) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = digits
    return train.x[:256], train.y[:256]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _strip_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def test_training_continues_from_2_to_4_epochs_with_identical_weights(
    digits: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    x, y = _small(digits)
    cfg4 = AdversarialTrainingConfig(
        method="pgd-at", eps=EPS, steps=2, epochs=4, batch_size=64, lr=0.05, schedule="constant"
    )
    cfg2 = AdversarialTrainingConfig(**{**cfg4.to_dict(), "epochs": 2, "bounds": (0.0, 1.0)})
    first = _resumable_net()
    r2 = adversarial_train(first, x, y, cfg2, checkpoint_dir=tmp_path)
    assert r2.epochs_completed == 2 and r2.resumed_from_epoch == 0
    resumed = _resumable_net()  # fresh weights: everything must come from the checkpoint
    r4 = adversarial_train(resumed, x, y, cfg4, checkpoint_dir=tmp_path)
    assert r4.resumed_from_epoch == 2 and r4.epochs_completed == 4
    straight = _resumable_net()
    ref = adversarial_train(straight, x, y, cfg4)
    assert _same_weights(resumed, straight)
    assert _strip_times(r4.history) == _strip_times(ref.history)


def test_a_killed_run_resumes_where_it_stopped(
    digits: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=3, batch_size=64, lr=0.1)
    seen: list[int] = []

    def kill_after_first(record: dict[str, Any]) -> None:
        seen.append(record["epoch"])
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adversarial_train(
            _resumable_net(), x, y, cfg, checkpoint_dir=tmp_path, callback=kill_after_first
        )
    assert seen == [1]
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1 and len(saved["history"]) == 1
    resumed = _resumable_net()
    result = adversarial_train(
        resumed, x, y, cfg, checkpoint_dir=tmp_path, callback=kill_after_first
    )
    assert seen == [1, 2, 3]
    assert result.resumed_from_epoch == 1 and [h["epoch"] for h in result.history] == [1, 2, 3]
    straight = _resumable_net()
    adversarial_train(straight, x, y, cfg)
    assert _same_weights(resumed, straight)


def _plain_types_only(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain_types_only(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain_types_only(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str))


def test_checkpoint_holds_plain_types_and_loads_with_weights_only(
    digits: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(
        method="trades", eps=EPS, steps=2, epochs=1, batch_size=128, optimizer="adam"
    )
    module = _resumable_net()
    adversarial_train(module, x, y, cfg, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert _plain_types_only(state)
    assert state["config"] == cfg.to_dict() and state["epoch"] == 1
    assert set(state["rng"]) >= {"global", "shuffle", "attack"}
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state["model"].items())
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left


def test_a_checkpoint_from_another_config_or_data_is_refused(
    digits: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=1, batch_size=64)
    adversarial_train(_resumable_net(), x, y, cfg, checkpoint_dir=tmp_path)
    other = AdversarialTrainingConfig(method="fgsm-rs", eps=0.1, epochs=2, batch_size=64)
    with pytest.raises(InvalidConfigError, match=r"eps: checkpoint 0\.15, now 0\.1"):
        adversarial_train(_resumable_net(), x, y, other, checkpoint_dir=tmp_path)
    with pytest.raises(InvalidConfigError, match="other training data"):
        adversarial_train(_resumable_net(), x[:200], y[:200], cfg, checkpoint_dir=tmp_path)
    with pytest.raises(InvalidConfigError, match="does not fit this model"):
        adversarial_train(_mlp(), x, y, cfg, checkpoint_dir=tmp_path)


# -- keep_best: the catastrophic-overfitting guard ---------------------------------------------
@pytest.mark.parametrize(
    ("guard", "selected"),
    [
        ([0.5, 0.9, 0.2], 2),  # collapse in epoch 3: back to epoch 2
        ([0.5, 0.9, 0.86], 3),  # within 5 points of the best: sampling noise, keep the last
        ([0.9, 0.3, 0.84], 1),  # more than 5 points below epoch 1
    ],
)
def test_keep_best_restores_the_best_epoch_when_the_last_collapsed(
    digits: tuple[Dataset, Dataset],
    monkeypatch: pytest.MonkeyPatch,
    guard: list[float],
    selected: int,
) -> None:
    import modelshield.defenses.adversarial as adversarial

    scripted = iter(guard)
    monkeypatch.setattr(adversarial, "_guard_accuracy", lambda *_a, **_k: next(scripted))
    x, y = _small(digits)
    module = _mlp()
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(_record: dict[str, Any]) -> None:
        snapshots.append({k: v.clone() for k, v in module.state_dict().items()})

    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=3, batch_size=64)
    result = adversarial_train(module, x, y, cfg, callback=snapshot)
    assert result.selected_epoch == selected and result.epochs_completed == 3
    assert [h["guard_robust_accuracy"] for h in result.history] == guard
    for epoch, snap in enumerate(snapshots, start=1):
        same = all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())
        assert same == (epoch == selected)


def test_the_guard_measures_pgd_accuracy_on_training_points(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, _ = digits
    cfg = AdversarialTrainingConfig(
        method="pgd-at", eps=EPS, steps=1, epochs=1, lr=1e-9, optimizer="adam", keep_best=True
    )
    module = train_classifier(_mlp(), train.x, train.y, epochs=10, lr=3e-3, seed=0)
    result = adversarial_train(module, train.x, train.y, cfg)  # lr 1e-9: weights stay put
    record = result.history[0]
    assert record["clean_accuracy"] > 0.95  # the undefended model, on training points
    assert record["guard_robust_accuracy"] < 0.2  # broken by PGD, as on the test split
    assert result.selected_epoch == 1


# -- precision, data sources, evaluation ---------------------------------------------------------
def test_bf16_autocasts_every_forward_pass_including_the_attack(
    digits: tuple[Dataset, Dataset],
) -> None:
    x, y = _small(digits)
    module = _mlp()
    dtypes: list[torch.dtype] = []
    module[-1].register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    cfg = AdversarialTrainingConfig(
        method="pgd-at", eps=EPS, steps=2, epochs=1, batch_size=64, bf16=True, optimizer="adam"
    )
    result = adversarial_train(module, x, y, cfg)
    batches = math.ceil(len(x) / 64)
    # one input check, then per batch 2 attack steps + 1 update; the clean-accuracy probe
    # after the epoch runs in float32
    assert dtypes.count(torch.bfloat16) == 1 + batches * 3
    assert dtypes.count(torch.float32) == 1
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert math.isfinite(result.history[0]["loss"])


def test_a_dataloader_trains_deterministically_and_leaves_the_callers_rng_alone(
    digits: tuple[Dataset, Dataset],
) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=2, optimizer="adam")
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    a, b = _mlp(), _mlp()
    rng_before = torch.get_rng_state()
    ra = adversarial_train(a, loader, config=cfg)
    assert torch.equal(torch.get_rng_state(), rng_before)
    adversarial_train(b, loader, config=cfg)
    assert _same_weights(a, b)
    assert ra.history[-1]["clean_accuracy"] is not None  # probed from the loader's dataset


def test_eval_data_is_measured_with_the_library_pgd(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    cfg = AdversarialTrainingConfig(
        method="fgsm-rs", eps=EPS, epochs=2, batch_size=64, optimizer="adam", lr=3e-3
    )
    module = _mlp()
    result = adversarial_train(module, train.x, train.y, cfg, eval_data=test)
    last = result.history[-1]
    clf = from_torch(module, input_shape=SHAPE, num_classes=10)
    ref = pgd(clf, test.x, test.y, threat=THREAT, steps=10, seed=0)
    assert last["eval_clean_accuracy"] == pytest.approx(clf.accuracy(test.x, test.y))
    assert last["eval_robust_accuracy"] == pytest.approx(ref.robust_accuracy, abs=0.01)


def test_eps_warmup_ramps_eps_per_iteration(digits: tuple[Dataset, Dataset]) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(
        method="fgsm-rs", eps=EPS, epochs=3, batch_size=64, eps_warmup_epochs=2
    )
    result = adversarial_train(_mlp(), x, y, cfg)
    # 4 batches an epoch: eps at the last batch of epoch 1 is 4/8 of the full eps
    assert [h["eps"] for h in result.history] == pytest.approx([EPS / 2, EPS, EPS])


def test_the_result_round_trips_through_json(digits: tuple[Dataset, Dataset]) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=1, batch_size=128)
    result = adversarial_train(_mlp(), x, y, cfg)
    back = Result.from_json(result.to_json())
    assert isinstance(back, AdversarialTrainingResult)
    assert back == result and back.to_dict()["result_type"] == "adversarial-training"
    assert back.final == result.history[-1] and back.threat["eps"] == EPS


def test_bad_inputs_are_refused(digits: tuple[Dataset, Dataset]) -> None:
    x, y = _small(digits)
    cfg = AdversarialTrainingConfig(method="fgsm-rs", eps=EPS, epochs=1)
    with pytest.raises(DataError, match="outside bounds"):
        adversarial_train(_mlp(), x * 2, y, cfg)
    with pytest.raises(DataError, match="labels must lie in"):
        adversarial_train(_mlp(), x, y + 5, cfg)
    with pytest.raises(DataError, match="labels must be integers"):
        adversarial_train(_mlp(), x, y.float(), cfg)
    with pytest.raises(InvalidConfigError, match="labels y are required"):
        adversarial_train(_mlp(), x, None, cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with pytest.raises(InvalidConfigError, match="not with a DataLoader"):
        adversarial_train(_mlp(), loader, y, cfg)
    with pytest.raises(UnsupportedModelError):
        adversarial_train(lambda t: t, x, y, cfg)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="config must be"):
        adversarial_train(_mlp(), x, y, {"eps": 0.1})  # type: ignore[arg-type]


def test_adversarial_training_is_a_registered_defence() -> None:
    assert DEFENSES.get("adversarial-training") is adversarial_train


# -- ResNet-18 ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "classes"), [((3, 32, 32), 10), ((1, 8, 8), 7)])
def test_resnet18_forward_shapes(shape: tuple[int, int, int], classes: int) -> None:
    net = build("resnet18", shape, classes).eval()
    with torch.no_grad():
        out = net(torch.rand(2, *shape))
    assert out.shape == (2, classes)


def test_resnet18_is_the_cifar_network() -> None:
    assert "resnet18" in ARCHITECTURES
    net = build("resnet18", (3, 32, 32), 10)
    # the CIFAR ResNet-18 of Madry et al. / Rice et al. (kuangliu/pytorch-cifar): 11,173,962
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    with pytest.raises(InvalidConfigError, match="resnet18 needs image inputs"):
        build("resnet18", (64,), 10)


@pytest.mark.parametrize(("attack_mode", "bn_updates_per_batch"), [("eval", 1), ("train", 3)])
def test_batchnorm_statistics_see_the_attack_only_in_train_attack_mode(
    attack_mode: str, bn_updates_per_batch: int
) -> None:
    g = make_generator(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    y = torch.arange(16) % 2
    torch.manual_seed(0)
    net = ARCHITECTURES.get("resnet18")((1, 8, 8), 2, width=4)
    cfg = AdversarialTrainingConfig(
        method="pgd-at", eps=0.05, steps=2, epochs=1, batch_size=8, attack_mode=attack_mode
    )
    result = adversarial_train(net, x, y, cfg)
    assert result.epochs_completed == 1 and math.isfinite(result.history[0]["loss"])
    # 2 batches; eval mode: only the update's forward pass moves the running statistics,
    # train mode: the 2 attack steps' passes too
    assert int(net.stem[1].num_batches_tracked) == 2 * bn_updates_per_batch
