"""ONNX and scikit-learn oracle back-ends, checked against the models they wrap."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    ModelLoadError,
    OracleError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.threat import QueryAccess

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("sklearn")

from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from modelshield.core.oracles import OnnxOracle, SklearnOracle

D, C = 6, 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)).eval()


def _export(model: nn.Module, path: Path, *, dynamic: bool = True, batch: int = 2) -> Path:
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and says so
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(batch, D),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=axes,
            dynamo=False,
        )
    return path


class _Probs(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class _Labels(_Probs):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).argmax(dim=1)


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return _mlp()


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def dynamic_onnx(mlp: nn.Module, onnx_dir: Path) -> Path:
    return _export(mlp, onnx_dir / "mlp.onnx")


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(37, D, generator=torch.Generator().manual_seed(1))


# -- ONNX ----------------------------------------------------------------------------------
def test_onnx_logits_and_probs_match_torch(
    mlp: nn.Module, dynamic_onnx: Path, x: torch.Tensor
) -> None:
    with torch.no_grad():
        logits = mlp(x)
    oracle = OnnxOracle(dynamic_onnx, QueryAccess(output="logits"), batch_size=10)
    assert oracle.input_shape == (D,)
    assert oracle.num_classes == C
    assert oracle.fixed_batch is None
    torch.testing.assert_close(oracle.query(x), logits, atol=1e-5, rtol=1e-5)
    assert oracle.queries_used == 37
    assert oracle.calls == 4

    probs = OnnxOracle(dynamic_onnx, QueryAccess(output="probs")).query(x)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1), atol=1e-6, rtol=1e-5)
    labels = OnnxOracle(dynamic_onnx, QueryAccess(output="label")).query(x)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, logits.argmax(dim=1))


def test_onnx_static_batch_is_split_and_padded(
    mlp: nn.Module, onnx_dir: Path, x: torch.Tensor
) -> None:
    path = _export(mlp, onnx_dir / "static.onnx", dynamic=False, batch=8)
    oracle = OnnxOracle(path, QueryAccess(output="logits"))
    assert oracle.fixed_batch == 8
    assert oracle.input_shape == (D,)
    assert oracle.num_classes == C
    with torch.no_grad():
        expected = mlp(x)
    out = oracle.query(x)  # 37 rows: four full slices of 8, one padded slice of 5
    assert out.shape == (37, C)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oracle.query(x[:3]), expected[:3], atol=1e-5, rtol=1e-5)


def test_onnx_probs_and_label_graphs(mlp: nn.Module, onnx_dir: Path, x: torch.Tensor) -> None:
    with torch.no_grad():
        logits = mlp(x)
    probs_path = _export(_Probs(mlp).eval(), onnx_dir / "probs.onnx")
    oracle = OnnxOracle(probs_path, QueryAccess(output="probs"), raw_output="probs")
    torch.testing.assert_close(oracle.query(x), torch.softmax(logits, 1), atol=1e-6, rtol=1e-5)
    with pytest.raises(UnsupportedModelError, match="logits"):
        OnnxOracle(probs_path, QueryAccess(output="logits"), raw_output="probs")

    label_path = _export(_Labels(mlp).eval(), onnx_dir / "labels.onnx")
    oracle = OnnxOracle(label_path, QueryAccess(output="label"), raw_output="label")
    assert torch.equal(oracle.query(x), logits.argmax(dim=1))
    with pytest.raises(UnsupportedModelError, match="probs"):
        OnnxOracle(label_path, QueryAccess(output="probs"), raw_output="label")


def test_onnx_wrong_raw_output_is_caught(dynamic_onnx: Path, x: torch.Tensor) -> None:
    # logits declared as probs: values outside [0, 1] are reported, not passed on
    oracle = OnnxOracle(dynamic_onnx, QueryAccess(output="probs"), raw_output="probs")
    with pytest.raises(OracleError, match=r"outside \[0, 1\]"):
        oracle.query(x * 50)
    with pytest.raises(InvalidConfigError, match="raw_output"):
        OnnxOracle(dynamic_onnx, raw_output="scores")


def test_onnx_budget_and_input_checks(dynamic_onnx: Path, x: torch.Tensor) -> None:
    oracle = OnnxOracle(dynamic_onnx, QueryAccess(output="label", max_queries=40))
    oracle.query(x)
    with pytest.raises(QueryBudgetExceeded):
        oracle.query(x[:4])
    assert oracle.queries_used == 37
    with pytest.raises(DataError, match="expects"):
        oracle.query(torch.zeros(2, D + 1))


def test_onnx_names_are_validated(dynamic_onnx: Path) -> None:
    oracle = OnnxOracle(dynamic_onnx, input_name="x", output_name="y")
    assert (oracle.input_name, oracle.output_name) == ("x", "y")
    with pytest.raises(InvalidConfigError, match="inputs: x"):
        OnnxOracle(dynamic_onnx, input_name="image")
    with pytest.raises(InvalidConfigError, match="outputs: y"):
        OnnxOracle(dynamic_onnx, output_name="probs")


def test_onnx_bad_files_raise_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxOracle(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(ModelLoadError, match="cannot load ONNX file") as info:
        OnnxOracle(garbage)
    assert "\n" not in str(info.value)


def test_onnx_without_onnxruntime(dynamic_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UnsupportedModelError, match=r"pip install 'modelshield\[onnx\]'"):
        OnnxOracle(dynamic_onnx)


# -- scikit-learn --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return make_classification(
        n_samples=200, n_features=8, n_informative=5, n_classes=3, random_state=0
    )


def test_sklearn_probs_match_predict_proba(data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = data
    est = LogisticRegression(max_iter=500).fit(X, y)
    xt = torch.from_numpy(X[:50]).float()
    oracle = SklearnOracle(est, QueryAccess(output="probs"), batch_size=16)
    assert oracle.raw_output == "probs"
    assert (oracle.input_shape, oracle.num_classes) == ((8,), 3)
    expected = est.predict_proba(xt.double().numpy())
    np.testing.assert_allclose(oracle.query(xt).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert oracle.calls == 4

    labels = SklearnOracle(est, QueryAccess(output="label")).query(xt)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy(), est.predict(xt.double().numpy()))

    top1 = SklearnOracle(est, QueryAccess(output="probs", top_k=1, decimals=2)).query(xt)
    assert int((top1 > 0).sum(dim=1).max()) == 1
    with pytest.raises(UnsupportedModelError, match="logits"):
        SklearnOracle(est, QueryAccess(output="logits"))


def test_sklearn_flattens_image_shaped_inputs(data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = data
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    oracle = SklearnOracle(est, QueryAccess(output="probs"), input_shape=(2, 2, 2))
    xt = torch.from_numpy(X[:10]).float()
    out = oracle.query(xt.reshape(10, 2, 2, 2))
    np.testing.assert_allclose(out.numpy(), est.predict_proba(xt.double().numpy()), rtol=1e-5)
    with pytest.raises(InvalidConfigError, match="fitted on 8"):
        SklearnOracle(est, input_shape=(3, 3))


def test_sklearn_label_only_estimator(data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = data
    est = LinearSVC().fit(X, y)
    oracle = SklearnOracle(est, QueryAccess(output="label", max_queries=20))
    assert oracle.raw_output == "label"
    xt = torch.from_numpy(X[:20]).float()
    np.testing.assert_array_equal(oracle.query(xt).numpy(), est.predict(xt.double().numpy()))
    with pytest.raises(QueryBudgetExceeded):
        oracle.query(xt[:1])
    with pytest.raises(UnsupportedModelError, match="cannot serve output='probs'"):
        SklearnOracle(est, QueryAccess(output="probs"))
    with pytest.raises(UnsupportedModelError):
        SklearnOracle(est)  # the default access asks for probs


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array(["cat", "dog", "emu"]), "integers 0..2"),
        (np.array([1, 2, 3]), "integers 0..2"),
        (np.array([0, 2, 5]), "integers 0..2"),
    ],
)
def test_sklearn_classes_must_be_0_to_c_minus_1(
    data: tuple[np.ndarray, np.ndarray], labels: np.ndarray, match: str
) -> None:
    X, y = data
    est = LogisticRegression(max_iter=200).fit(X, labels[y])
    with pytest.raises(UnsupportedModelError, match=match):
        SklearnOracle(est, QueryAccess(output="label"))


def test_sklearn_rejects_unfitted_and_non_estimators() -> None:
    with pytest.raises(UnsupportedModelError, match="fitted"):
        SklearnOracle(LogisticRegression())
    with pytest.raises(UnsupportedModelError, match="predict"):
        SklearnOracle(object())


def test_sklearn_estimator_errors_become_oracle_errors(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    X, y = data
    est = LogisticRegression(max_iter=200).fit(X, y)
    del est.n_features_in_  # no declared shape: the wrong width reaches the estimator
    oracle = SklearnOracle(est, QueryAccess(output="label"))
    assert oracle.input_shape is None
    with pytest.raises(OracleError, match=r"LogisticRegression\.predict_proba failed"):
        oracle.query(torch.zeros(2, 5))
