"""MI-Face model inversion (Fredrikson et al., CCS 2015) on scikit-learn digits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.oracle import from_classifier
from modelshield.core.results import Result
from modelshield.core.train import train_classifier
from modelshield.privacy.inversion import InversionResult, class_means, mi_face


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_dataset("digits").split(0.7, seed=0)


@pytest.fixture(scope="module")
def trained(digits: tuple[Dataset, Dataset]) -> Classifier:
    train, test = digits
    net = train_classifier(_mlp(), train.x, train.y, epochs=30, lr=3e-3, seed=0)
    clf = from_torch(net, input_shape=(1, 8, 8), num_classes=10)
    assert clf.accuracy(test.x, test.y) > 0.9
    return clf


@pytest.fixture(scope="module")
def untrained() -> Classifier:
    torch.manual_seed(1)
    return from_torch(_mlp(), input_shape=(1, 8, 8), num_classes=10)


# measured (MLP 64-64-10, 200 steps, tv 0.01, from zeros): trained nearest 0.8, conf 0.99,
# cosine 0.79; untrained nearest 0.1, conf 0.16. Thresholds keep a wide margin.
def test_trained_model_representatives_resemble_their_class(
    trained: Classifier, digits: tuple[Dataset, Dataset]
) -> None:
    _, test = digits
    r = mi_face(trained, steps=200, tv_weight=0.01, reference=(test.x, test.y))
    assert r.images is not None and r.images.shape == (10, 1, 8, 8)
    assert float(r.images.min()) >= 0.0 and float(r.images.max()) <= 1.0
    assert r.confidence is not None and float(r.confidence.min()) > 0.8
    assert r.mean_confidence > 0.9
    assert r.nearest_correct is not None and int(r.nearest_correct.sum()) >= 6
    assert r.mean_cosine > 0.6
    assert r.queries == 10 * 201


def test_untrained_model_scores_clearly_lower(
    trained: Classifier, untrained: Classifier, digits: tuple[Dataset, Dataset]
) -> None:
    _, test = digits
    good = mi_face(trained, steps=200, tv_weight=0.01, reference=(test.x, test.y))
    bad = mi_face(untrained, steps=200, tv_weight=0.01, reference=(test.x, test.y))
    assert bad.nearest_correct is not None and int(bad.nearest_correct.sum()) <= 3
    assert good.nearest_fraction - bad.nearest_fraction >= 0.4
    assert bad.mean_confidence < 0.5
    assert good.mean_mse < bad.mean_mse


def test_mean_init_and_paper_objective(
    trained: Classifier, digits: tuple[Dataset, Dataset]
) -> None:
    _, test = digits
    r = mi_face(
        trained,
        classes=[3, 7],
        steps=150,
        objective="prob",
        init="mean",
        reference=(test.x, test.y),
    )
    assert r.classes == [3, 7]
    assert r.confidence is not None and float(r.confidence.min()) > 0.8
    assert r.nearest is not None and r.nearest.shape == (2,)


def test_deterministic_and_round_trips(trained: Classifier) -> None:
    a = mi_face(trained, classes=[0, 1], steps=20, init="random", seed=3)
    b = mi_face(trained, classes=[0, 1], steps=20, init="random", seed=3)
    assert a.images is not None and b.images is not None
    assert torch.equal(a.images, b.images)
    assert a.cosine is None and a.nearest_fraction != a.nearest_fraction  # no reference: NaN
    back = Result.from_json(a.to_json())
    assert isinstance(back, InversionResult)
    assert back.images is not None and torch.allclose(back.images, a.images)
    assert "images" not in a.summary()


def test_class_means_match_a_loop(digits: tuple[Dataset, Dataset]) -> None:
    _, test = digits
    means = class_means(test.x, test.y, 10)
    for c in range(10):
        assert torch.allclose(means[c], test.x[test.y == c].mean(dim=0), atol=1e-6)
    assert torch.isnan(class_means(test.x[:5], torch.zeros(5, dtype=torch.long), 3)[1]).all()


def test_bad_inputs_raise(trained: Classifier, digits: tuple[Dataset, Dataset]) -> None:
    _, test = digits
    with pytest.raises(UnsupportedModelError):
        mi_face(from_classifier(trained))  # type: ignore[arg-type]
    for kwargs in (
        {"classes": [10]},
        {"classes": []},
        {"steps": 0},
        {"lr": 0.0},
        {"tv_weight": -1.0},
        {"objective": "hinge"},
        {"init": "ones"},
        {"init": "mean"},  # needs reference
    ):
        with pytest.raises(InvalidConfigError):
            mi_face(trained, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(DataError):
        mi_face(trained, init=torch.zeros(64))
    with pytest.raises(DataError):
        mi_face(trained, reference=(test.x, test.y[:-1]))
