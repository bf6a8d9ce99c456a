"""The issue's correctness checks on the bundled digits: BadNets at 10% poison plants a
backdoor (ASR >= 95%, clean accuracy within 2 pp of clean training), activation clustering
finds the poison (precision and recall >= 0.8), and retraining without the flagged samples
removes it (ASR < 10%). Fine-pruning is checked against the poisoned model it starts from.
"""

from __future__ import annotations

import pytest
import torch

from modelshield.core.classifier import Classifier
from modelshield.core.data import Dataset, load_dataset
from modelshield.poisoning import (
    PoisonedData,
    activation_clustering,
    audit_training_data,
    evaluate_poisoning,
    fine_prune,
    poison,
    retrain_without,
    spectral_signatures,
)
from modelshield.poisoning.attacks import train_model
from modelshield.poisoning.features import penultimate_features

EPOCHS = 60


@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return load_dataset("digits").split(0.8, seed=0)


@pytest.fixture(scope="module")
def poisoned(split: tuple[Dataset, Dataset]) -> PoisonedData:
    return poison("badnets", split[0], rate=0.1, target_class=0, seed=0)


@pytest.fixture(scope="module")
def backdoored(poisoned: PoisonedData) -> Classifier:
    return train_model(poisoned.dataset, arch="small_cnn", epochs=EPOCHS, seed=0)


def test_badnets_plants_a_backdoor_at_no_visible_cost(
    split: tuple[Dataset, Dataset], poisoned: PoisonedData, backdoored: Classifier
) -> None:
    train, test = split
    clean = train_model(train, arch="small_cnn", epochs=EPOCHS, seed=0)
    clean_acc = clean.accuracy(test.x, test.y)
    ev = evaluate_poisoning(backdoored, test.x, test.y, poisoned.record)
    assert ev["attack_success_rate"]["value"] >= 0.95
    assert abs(ev["clean_accuracy"]["value"] - clean_acc) <= 0.02
    # the clean model is not fooled by the trigger: the ASR is the backdoor's doing
    assert (
        evaluate_poisoning(clean, test.x, test.y, poisoned.record)["attack_success_rate"]["value"]
        < 0.2
    )


def test_activation_clustering_finds_the_poison(
    poisoned: PoisonedData, backdoored: Classifier
) -> None:
    data = poisoned.dataset
    feats = penultimate_features(backdoored, data.x)
    res = activation_clustering(feats, data.y, x=data.x, truth=poisoned.record.indices)
    assert res.precision is not None and res.recall is not None
    assert res.precision >= 0.8 and res.recall >= 0.8
    flagged_classes = {c for c, v in res.details["per_class"].items() if v["flagged"]}
    assert flagged_classes == {"0"}


def test_retraining_without_the_flagged_samples_removes_the_backdoor(
    split: tuple[Dataset, Dataset], poisoned: PoisonedData, backdoored: Classifier
) -> None:
    audit = audit_training_data(
        backdoored, poisoned.dataset, detectors=["activation-clustering"], seed=0
    )
    model = retrain_without(poisoned.dataset, audit.indices, arch="small_cnn", epochs=EPOCHS)
    ev = evaluate_poisoning(model, split[1].x, split[1].y, poisoned.record)
    assert ev["attack_success_rate"]["value"] < 0.10
    assert ev["clean_accuracy"]["value"] > 0.9


def test_detectors_flag_nothing_on_clean_data(split: tuple[Dataset, Dataset]) -> None:
    train = split[0]
    model = train_model(train, arch="small_cnn", epochs=30, seed=0)
    res = audit_training_data(model, train, seed=0)
    assert len(res.indices) <= 0.01 * len(train)


def test_spectral_scores_are_the_squared_top_singular_projection() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 1, 1, 1, 1, 1])
    labels = torch.zeros(200, dtype=torch.long)
    res = spectral_signatures(feats, labels, expected_rate=0.1)
    import numpy as np

    f = feats.double().numpy()
    f = f - f.mean(0)
    v = np.linalg.svd(f, full_matrices=False)[2][0]
    want = (f @ v) ** 2
    assert np.allclose(res.details["scores"], want, rtol=1e-4)
    # Tran et al.'s rule: the ceil(1.5 * eps * n) largest scores
    assert sorted(res.indices) == sorted(np.argsort(-want)[:30].tolist())


def test_fine_pruning_weakens_the_backdoor(
    split: tuple[Dataset, Dataset], poisoned: PoisonedData, backdoored: Classifier
) -> None:
    test = split[1]
    tune, held = test.split(0.5, seed=1)
    before = evaluate_poisoning(backdoored, held.x, held.y, poisoned.record)
    model, info = fine_prune(backdoored, tune, epochs=20, lr=1e-3, seed=0)
    after = evaluate_poisoning(model, held.x, held.y, poisoned.record)
    assert info["pruned"] > 0
    assert after["attack_success_rate"]["value"] < before["attack_success_rate"]["value"] - 0.1
    assert after["clean_accuracy"]["value"] >= before["clean_accuracy"]["value"] - 0.05
    # the original model is left as it was
    again = evaluate_poisoning(backdoored, held.x, held.y, poisoned.record)
    assert again["attack_success_rate"]["value"] == before["attack_success_rate"]["value"]
