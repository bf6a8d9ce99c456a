"""DP auditing end to end: a broken DP-SGD is caught, a correct one is not, and the plumbing."""

from __future__ import annotations

import pytest
import torch

from modelshield.core.data import Dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.core.results import DPAuditResult, Result
from modelshield.privacy.dp import DPConfig
from modelshield.privacy.dp_audit import (
    AuditTraining,
    audit_canaries,
    audit_one_run,
    make_canaries,
)
from tests.privacy import dp_trainers


def _blobs(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = 0.5 + 0.2 * torch.randn(3, 1, 6, 6, generator=g)
    x = (centers[y] + 0.1 * torch.randn(n, 1, 6, 6, generator=g)).clamp(0, 1)
    return Dataset(x, y, 3)


def test_one_run_audit_catches_dp_sgd_without_noise_and_passes_the_correct_one():
    data = _blobs(100)
    m = 400
    claim = dp_trainers.claimed_epsilon(100 + m // 2)  # about half the canaries go in
    assert 0.8 < claim < 1.5
    bad = audit_one_run(dp_trainers.noise_left_out, data, canaries=m, eps_claimed=claim, seed=0)
    good = audit_one_run(dp_trainers.correct, data, canaries=m, eps_claimed=claim, seed=0)
    assert bad.eps_lower > claim and bad.broken
    assert good.eps_lower < claim and not good.broken
    assert bad.bound["m"] == m and bad.labels.sum() > 0 and bad.scores.shape == (m,)


def test_canary_audit_catches_dp_sgd_without_noise_and_passes_the_correct_one():
    data = _blobs(60)
    settings = dp_trainers.MANY_RUNS
    claim = max(dp_trainers.claimed_epsilon(n, settings) for n in (60, 61))
    assert 0.5 < claim < 1.0
    # the broken run's scores separate perfectly: 40 runs and 2 thresholds certify about 1.4
    kw = {"runs": 40, "thresholds": 2, "eps_claimed": claim, "seed": 0}
    bad = audit_canaries(dp_trainers.noise_left_out_many, data, **kw)
    good = audit_canaries(dp_trainers.correct_many, data, **kw)
    assert bad.eps_lower > claim and bad.broken
    assert good.eps_lower < claim and not good.broken
    assert bad.bound["fp"] + bad.bound["fn"] == 0


def test_one_run_of_a_non_private_model_is_clearly_positive_and_dp_stays_below_claim():
    data = _blobs(150)
    common = {
        "arch": "mlp",
        "input_shape": (1, 6, 6),
        "num_classes": 3,
        "epochs": 60,
        "batch_size": 32,
    }
    plain = audit_one_run(AuditTraining(**common, lr=3e-3), data, canaries=300, seed=1)
    assert plain.eps_claimed is None and not plain.broken
    assert plain.eps_lower > 1.0
    private = AuditTraining(
        **common, dp=DPConfig(epsilon=1.0, epochs=20, batch_size=50, lr=2.0, mode="hooks")
    )
    dp_res = audit_one_run(private, data, canaries=300, seed=1)
    assert dp_res.eps_claimed == 1.0
    assert dp_res.eps_lower < 1.0 and not dp_res.broken


def test_canary_audit_resumes_from_its_progress_file(tmp_path):
    data = _blobs(30)
    progress = tmp_path / "progress.json"
    first = audit_canaries(
        dp_trainers.correct_many, data, runs=4, eps_claimed=1.0, progress=progress
    )
    assert progress.exists()

    def must_not_train(x, y, seed):
        raise AssertionError("every run was done before")

    again = audit_canaries(must_not_train, data, runs=4, eps_claimed=1.0, progress=progress)
    assert torch.equal(first.scores, again.scores)


def test_make_canaries_noise_and_mislabeled():
    data = _blobs(50)
    base, noise = make_canaries(data, 20, "noise", seed=0)
    assert base is data and len(noise) == 20
    assert float(noise.x.min()) >= float(data.x.min()) and float(noise.x.max()) <= float(
        data.x.max()
    )
    base2, mis = make_canaries(data, 10, "mislabeled", seed=0)
    assert len(base2) == 40 and len(mis) == 10
    # each canary is a real example (its row is in the data) with a label it does not have
    for xi, yi in zip(mis.x, mis.y, strict=True):
        row = (data.x == xi).flatten(1).all(1).nonzero().flatten()
        assert len(row) == 1 and int(data.y[row[0]]) != int(yi)
    with pytest.raises(InvalidConfigError, match="canary type"):
        make_canaries(data, 5, "gradient")
    with pytest.raises(InvalidConfigError, match="more than 50"):
        make_canaries(data, 50, "mislabeled")


def test_dp_audit_result_round_trips_through_json():
    res = DPAuditResult(
        method="one-run",
        eps_lower=1.5,
        eps_claimed=1.0,
        delta=1e-5,
        ci=[1.5, float("inf")],
        broken=True,
        scores=torch.tensor([0.5, -1.0], dtype=torch.float64),
        labels=torch.tensor([True, False]),
    )
    back = Result.from_json(res.to_json())
    assert isinstance(back, DPAuditResult)
    assert back.eps_lower == 1.5 and back.broken and back.margin == pytest.approx(-0.5)
    assert torch.equal(back.scores, res.scores)


def test_one_run_dp_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    data = _blobs(60)
    ckpt = tmp_path / "checkpoint.pt"
    trainer = AuditTraining(
        arch="mlp",
        input_shape=(1, 6, 6),
        num_classes=3,
        dp=DPConfig(noise_multiplier=1.0, epochs=3, batch_size=20, mode="hooks"),
        checkpoint=str(ckpt),
    )
    first = audit_one_run(trainer, data, canaries=40, seed=2)
    assert ckpt.exists()

    import modelshield.privacy.dp as dp

    def no_more_steps(*args, **kwargs):
        raise AssertionError("all epochs were checkpointed; nothing is left to train")

    monkeypatch.setattr(dp._Engine, "step", no_more_steps)
    again = audit_one_run(trainer, data, canaries=40, seed=2)
    assert torch.equal(first.scores, again.scores)
