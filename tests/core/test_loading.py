"""load_model: every format loads by content; pickles that would run code are refused."""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import io
import json
import logging
import operator
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.errors import (
    InvalidConfigError,
    ModelLoadError,
    UnsafeModelFileError,
    UnsupportedModelError,
)
from modelshield.core.loading import LoadedModel, load_model

INPUT_SHAPE = (1, 3, 4)
ARCH = "tests.core.test_loading:make_net"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_net() -> nn.Module:
    """Factory for ``--arch tests.core.test_loading:make_net`` (1×3×4 inputs, 3 classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


class TinyNet(nn.Module):
    """A user-defined class: its full pickle imports a non-allowlisted global."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 2.0


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, expression: str) -> None:
        self.expression = expression

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.eval, (self.expression,))


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return make_net().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(5, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


def _assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _export(net: nn.Module, path: Path, batch: int, dynamic: bool) -> None:
    example = (torch.rand(batch, *INPUT_SHAPE),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    torch.export.save(torch.export.export(net, example, dynamic_shapes=shapes), path)


# -- white-box formats -----------------------------------------------------------------------


def test_state_dict_with_arch(tmp_path: Path, net: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model(path, arch=ARCH, input_shape=INPUT_SHAPE, device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "state_dict" and loaded.oracle is None
    assert loaded.classifier is not None and loaded.classifier.num_classes == 3
    torch.testing.assert_close(loaded.classifier.logits(x), net(x))
    f = loaded.file
    assert f.format == "torch-zip" and not f.trusted_pickle
    assert f.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert f.size == path.stat().st_size
    assert f.pickle is not None and f.pickle.clean
    d = loaded.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_state_dict_nested_in_checkpoint_and_wrapped_keys(
    tmp_path: Path, net: nn.Module, x: torch.Tensor
) -> None:
    path = tmp_path / "ckpt.pth"
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # DataParallel-style keys
    torch.save({"model_state_dict": sd, "epoch": 7, "best_acc": 0.9}, path)
    loaded = load_model(path, arch=ARCH, input_shape=INPUT_SHAPE, device="cpu")
    assert loaded.classifier is not None
    torch.testing.assert_close(loaded.classifier.logits(x), net(x))
    assert any("model_state_dict" in n for n in loaded.file.notes)
    assert any("module." in n for n in loaded.file.notes)


@pytest.mark.skipif(
    importlib.util.find_spec("modelshield.core.architectures") is None,
    reason="architectures registry not available",
)
def test_state_dict_with_registered_arch(tmp_path: Path, x: torch.Tensor) -> None:
    from modelshield.core.architectures import build

    torch.manual_seed(0)
    mlp = build("mlp", INPUT_SHAPE, 3).eval()
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    loaded = load_model(path, arch="mlp", input_shape=INPUT_SHAPE, device="cpu")
    assert loaded.classifier is not None and loaded.classifier.num_classes == 3
    torch.testing.assert_close(loaded.classifier.logits(x), mlp(x))
    with pytest.raises(InvalidConfigError, match=r"unknown arch 'nope'.*mlp"):
        load_model(path, arch="nope", input_shape=INPUT_SHAPE)


def test_state_dict_without_arch(tmp_path: Path, net: nn.Module) -> None:
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(InvalidConfigError) as exc:
        load_model(path, input_shape=INPUT_SHAPE)
    assert "--arch package.module:factory" in _assert_one_line(exc)


def test_state_dict_wrong_keys_one_line(tmp_path: Path, net: nn.Module) -> None:
    sd = dict(net.state_dict())
    sd["extra.weight"] = sd.pop("3.weight")
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, arch=ARCH, input_shape=INPUT_SHAPE)
    msg = _assert_one_line(exc)
    assert "missing keys: 3.weight" in msg and "unexpected keys: extra.weight" in msg


def test_state_dict_shape_mismatch_one_line(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    path = tmp_path / "weights.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, arch=ARCH, input_shape=INPUT_SHAPE)
    assert "shape mismatch: 1.weight (5, 12) in file vs (8, 12) in model" in _assert_one_line(exc)


@pytest.mark.parametrize(
    ("arch", "needle"),
    [
        ("no_such_pkg_xyz.models:make", "cannot import 'no_such_pkg_xyz.models'"),
        ("tests.core.test_loading:nope", "has no attribute 'nope'"),
        ("tests.core.test_loading:INPUT_SHAPE", "not callable"),
        ("tests.core.test_loading:", "package.module:factory"),
    ],
)
def test_bad_arch(tmp_path: Path, net: nn.Module, arch: str, needle: str) -> None:
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(InvalidConfigError) as exc:
        load_model(path, arch=arch, input_shape=INPUT_SHAPE)
    assert needle in _assert_one_line(exc)


def test_white_box_needs_input_shape(tmp_path: Path, net: nn.Module) -> None:
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(InvalidConfigError, match="input_shape"):
        load_model(path, arch=ARCH)


def test_torchscript(tmp_path: Path, net: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "model.onnx"  # misleading extension: the content decides
    torch.jit.save(torch.jit.script(net), path)
    loaded = load_model(path, input_shape=INPUT_SHAPE, device="cpu")
    assert loaded.kind == "torchscript" and loaded.file.format == "torchscript"
    assert loaded.classifier is not None
    torch.testing.assert_close(loaded.classifier.logits(x), net(x))


def test_export_dynamic_batch(tmp_path: Path, net: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "model.pt2"
    _export(net, path, batch=2, dynamic=True)
    loaded = load_model(path, device="cpu")  # input_shape read from the program
    assert loaded.kind == "export" and loaded.file.format == "torch-export"
    clf = loaded.classifier
    assert clf is not None and clf.input_shape == INPUT_SHAPE and clf.num_classes == 3
    torch.testing.assert_close(clf.logits(x), net(x))
    assert loaded.file.pickle is not None and loaded.file.pickle.clean


def test_export_static_batch_is_rebatched(tmp_path: Path, net: nn.Module) -> None:
    path = tmp_path / "static.pt2"
    _export(net, path, batch=3, dynamic=False)
    # the trap: the raw exported module only accepts the batch size it was exported with
    with pytest.raises(Exception, match="Guard failed"):
        torch.export.load(path).module()(torch.rand(5, *INPUT_SHAPE))
    loaded = load_model(path, input_shape=INPUT_SHAPE, device="cpu")
    clf = loaded.classifier
    assert clf is not None
    assert any("static batch size of 3" in n for n in loaded.file.notes)
    for n in (0, 1, 3, 5, 7):
        xb = torch.rand(n, *INPUT_SHAPE)
        torch.testing.assert_close(clf(xb), net(xb))
    # gradients flow through the split/padded batches
    xb = torch.rand(5, *INPUT_SHAPE, requires_grad=True)
    clf(xb).sum().backward()
    ref = xb.detach().clone().requires_grad_(True)
    net(ref).sum().backward()
    assert xb.grad is not None and ref.grad is not None
    torch.testing.assert_close(xb.grad, ref.grad)


def test_trusted_full_pickle(tmp_path: Path, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeModelFileError) as exc:
        load_model(path, input_shape=INPUT_SHAPE)
    msg = _assert_one_line(exc)
    assert "non-allowlisted globals" in msg and "tests.core.test_loading.TinyNet" in msg
    assert "pass --trust-pickle to load it anyway (this executes code from the file)" in msg
    loaded = load_model(path, trust_pickle=True, input_shape=INPUT_SHAPE, device="cpu")
    assert loaded.kind == "pickle" and loaded.file.trusted_pickle
    assert loaded.classifier is not None
    torch.testing.assert_close(loaded.classifier.logits(x), model(x))


def test_full_pickle_of_standard_layers_still_needs_trust(tmp_path: Path, net: nn.Module) -> None:
    path = tmp_path / "full.pt"
    torch.save(net, path)
    with pytest.raises(UnsafeModelFileError) as exc:
        load_model(path, input_shape=INPUT_SHAPE)
    assert "--trust-pickle" in _assert_one_line(exc)
    loaded = load_model(path, trust_pickle=True, input_shape=INPUT_SHAPE, device="cpu")
    assert loaded.kind == "pickle"


def test_trusted_load_with_dangerous_global_warns(
    tmp_path: Path, net: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ckpt.pt"
    # operator.attrgetter is on the dangerous list but harmless to construct here
    torch.save({"state_dict": net.state_dict(), "getter": operator.attrgetter("x")}, path)
    with pytest.raises(UnsafeModelFileError, match=r"dangerous globals: operator\.attrgetter"):
        load_model(path, arch=ARCH, input_shape=INPUT_SHAPE)
    with caplog.at_level(logging.WARNING, logger="modelshield.core.loading"):
        loaded = load_model(path, arch=ARCH, input_shape=INPUT_SHAPE, trust_pickle=True)
    assert loaded.kind == "state_dict" and loaded.file.trusted_pickle
    assert any("operator.attrgetter" in r.getMessage() for r in caplog.records)


# -- malicious files are refused without running -------------------------------------------------


def _evil_reduce_proto2(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_System(f"touch {marker}"), protocol=2))


def _evil_eval(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Eval(f"open({str(marker)!r}, 'w').close()"), protocol=4))


def _evil_stack_global(path: Path, marker: Path) -> None:
    data = pickle.dumps(_System(f"touch {marker}"), protocol=4)
    assert b"\x93" in data  # STACK_GLOBAL
    path.write_bytes(data)


def _evil_torch_zip(path: Path, marker: Path) -> None:
    torch.save({"w": torch.zeros(3), "payload": _System(f"touch {marker}")}, path)


def _evil_legacy_torch(path: Path, marker: Path) -> None:
    torch.save(_System(f"touch {marker}"), path, _use_new_zipfile_serialization=False)


def _evil_joblib(path: Path, marker: Path) -> None:
    joblib = pytest.importorskip("joblib")
    joblib.dump([np.zeros(100), _System(f"touch {marker}")], path, compress=3)


def _evil_export(path: Path, marker: Path) -> None:
    torch.manual_seed(0)
    good = path.with_suffix(".good.pt2")
    _export(make_net().eval(), good, batch=2, dynamic=False)
    buf = io.BytesIO()
    torch.save((_System(f"touch {marker}"),), buf)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = buf.getvalue()
            dst.writestr(info, data)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (_evil_reduce_proto2, "system"),
        (_evil_eval, "builtins.eval"),
        (_evil_stack_global, "system"),
        (_evil_torch_zip, "system"),
        (_evil_legacy_torch, "system"),
        (_evil_joblib, "system"),
        (_evil_export, "system"),
    ],
    ids=["reduce-proto2", "eval", "stack-global-proto4", "torch-zip", "legacy", "joblib", "pt2"],
)
def test_malicious_file_is_refused_without_running(
    tmp_path: Path, build: Callable[[Path, Path], None], needle: str
) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    build(path, marker)
    assert not marker.exists()
    with pytest.raises(UnsafeModelFileError) as exc:
        load_model(path, arch=ARCH, input_shape=INPUT_SHAPE)
    msg = _assert_one_line(exc)
    assert "dangerous globals" in msg and needle in msg and "--trust-pickle" in msg
    assert not marker.exists()


# -- black-box formats ---------------------------------------------------------------------------


def _fit_sklearn() -> tuple[object, np.ndarray]:
    linear = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(60, 12))
    y = (xs[:, 0] > 0).astype(int) + (xs[:, 1] > 0.5).astype(int)
    return linear.LogisticRegression(max_iter=500).fit(xs, y), xs


@pytest.mark.parametrize("writer", ["pickle", "joblib", "joblib-zlib"])
def test_sklearn_pickle(tmp_path: Path, writer: str) -> None:
    est, xs = _fit_sklearn()
    path = tmp_path / "model.skl"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(est))
    else:
        joblib = pytest.importorskip("joblib")
        joblib.dump(est, path, compress=3 if writer == "joblib-zlib" else 0)
    with pytest.raises(UnsafeModelFileError) as exc:
        load_model(path)
    msg = _assert_one_line(exc)
    assert "scikit-learn" in msg and "sklearn.linear_model" in msg and "--trust-pickle" in msg
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "sklearn" and loaded.classifier is None and loaded.oracle is not None
    pred = loaded.oracle.predict(torch.as_tensor(xs[:10], dtype=torch.float32))
    assert pred.tolist() == est.predict(xs[:10].astype(np.float32)).tolist()  # type: ignore[attr-defined]


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx/onnxruntime not installed",
)
def test_onnx(tmp_path: Path) -> None:
    pytest.importorskip("modelshield.core.oracles.onnx")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "model.bin"  # no .onnx extension: detected from the content
    onnx.save(model, path)
    loaded = load_model(path)
    assert loaded.kind == "onnx" and loaded.file.format == "onnx" and loaded.oracle is not None
    assert loaded.file.pickle is None
    xs = rng.random((5, 4)).astype(np.float32)
    out = loaded.oracle.query(torch.from_numpy(xs))
    np.testing.assert_allclose(out.numpy(), xs @ w + b, rtol=1e-5, atol=1e-5)


# -- broken files --------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["state_dict", "legacy", "torchscript", "pt2", "pickle"])
def test_truncated_file(tmp_path: Path, net: nn.Module, fmt: str) -> None:
    path = tmp_path / "model.pt"
    if fmt == "state_dict":
        torch.save(net.state_dict(), path)
    elif fmt == "legacy":
        torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.script(net), path)
    elif fmt == "pt2":
        _export(net, path, batch=2, dynamic=True)
    else:
        path.write_bytes(pickle.dumps({"w": list(range(200)), "name": "x" * 100}, protocol=4))
    _truncate(path)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path, arch=ARCH, input_shape=INPUT_SHAPE, trust_pickle=False)
    msg = _assert_one_line(exc)
    assert msg.startswith(f"model file {path} is truncated or corrupt: ")
    assert not isinstance(exc.value, UnsafeModelFileError)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is truncated or corrupt: the file is empty"):
        load_model(path, input_shape=INPUT_SHAPE)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(ModelLoadError, match="truncated or corrupt: not a TorchScript"):
        load_model(path, input_shape=INPUT_SHAPE)


def test_zip_without_model(tmp_path: Path) -> None:
    path = tmp_path / "stuff.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(UnsupportedModelError, match="zip archive"):
        load_model(path, input_shape=INPUT_SHAPE)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    assert str(exc.value) == f"model file not found: {path}"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a directory"):
        load_model(tmp_path)


def test_non_model_object(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UnsupportedModelError, match=r"torch\.Tensor"):
        load_model(path, input_shape=INPUT_SHAPE)


# -- accelerator -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "pt2-static", "pickle"])
def test_loads_onto_cuda(tmp_path: Path, net: nn.Module, x: torch.Tensor, fmt: str) -> None:
    path = tmp_path / "model.pt"
    kwargs: dict[str, object] = {}
    if fmt == "state_dict":
        torch.save(net.state_dict(), path)
        kwargs["arch"] = ARCH
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.script(net), path)
    elif fmt == "pt2-static":
        _export(net, path, batch=3, dynamic=False)
    else:
        torch.save(net, path)
        kwargs["trust_pickle"] = True
    loaded = load_model(path, input_shape=INPUT_SHAPE, device="cuda", **kwargs)  # type: ignore[arg-type]
    clf = loaded.classifier
    assert clf is not None and clf.device.type == "cuda"
    xc = x.cuda().requires_grad_(True)
    out = clf(xc)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.detach().cpu(), net(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert xc.grad is not None and xc.grad.device.type == "cuda"
