"""inspect_pickle: finds every global a pickle would import, and never runs or imports it."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.errors import ModelLoadError
from modelshield.core.pickle_scan import PickleReport, classify_global, inspect_pickle


class _System:
    """Pickles to ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _Eval:
    """Pickles to ``builtins.eval(expression)``."""

    def __init__(self, expression: str) -> None:
        self.expression = expression

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.eval, (self.expression,))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _stack_global_pickle(module: str, name: str, arg: str = "true") -> bytes:
    """Protocol 4 ``module.name(arg)`` whose STACK_GLOBAL operands come from the memo."""

    def ustr(s: str) -> bytes:
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE

    return (
        b"\x80\x04"  # PROTO 4
        + ustr(module)
        + b"\x94"  # MEMOIZE -> 0
        + b"0"  # POP
        + ustr("decoy")
        + b"\x94"  # MEMOIZE -> 1
        + ustr(name)
        + b"r\x05\x00\x00\x00"  # LONG_BINPUT 5
        + b"0"  # POP
        + b"0"  # POP
        + b"h\x00"  # BINGET 0   (module)
        + b"j\x05\x00\x00\x00"  # LONG_BINGET 5 (name)
        + b"\x93"  # STACK_GLOBAL
        + ustr(arg)
        + b"\x85"  # TUPLE1
        + b"R"  # REDUCE
        + b"."  # STOP
    )


# -- malicious pickles are flagged -----------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_os_system_reduce_is_dangerous_every_protocol(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    data = pickle.dumps(_System(f"touch {marker}"), protocol=protocol)
    report = inspect_pickle(data)
    assert report.format == "pickle"
    assert any(g.endswith(".system") for g in report.dangerous), report
    assert not report.safe and not report.errors
    assert not marker.exists()


def test_builtins_eval_is_dangerous(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "eval.pkl"
    expression = f"open({str(marker)!r}, 'w').close()"
    path.write_bytes(pickle.dumps(_Eval(expression), protocol=4))
    report = inspect_pickle(path)
    assert report.dangerous == ["builtins.eval"]
    assert report.globals == ["builtins.eval"]
    # protocols < 3 spell the module the Python 2 way
    assert inspect_pickle(pickle.dumps(_Eval(expression), protocol=2)).dangerous == [
        "__builtin__.eval"
    ]
    assert not marker.exists()


def test_stack_global_operands_tracked_through_memo() -> None:
    report = inspect_pickle(_stack_global_pickle("os", "system"))
    assert report.globals == ["os.system"]
    assert report.dangerous == ["os.system"]
    assert not report.errors


def test_stack_global_protocol4_from_real_pickler() -> None:
    data = pickle.dumps([_System("true"), _System("true")], protocol=4)
    assert b"\x93" in data  # STACK_GLOBAL is used
    report = inspect_pickle(data)
    assert [g for g in report.globals if g.endswith(".system")] == report.dangerous
    assert len(report.dangerous) == 1  # deduplicated


def test_protocol0_put_get_and_inst() -> None:
    # INST (protocol 0) imports and calls ``subprocess.Popen`` with the marked arguments.
    data = b"(S'true'\np0\ng0\nisubprocess\nPopen\np1\n."
    report = inspect_pickle(data)
    assert report.dangerous == ["subprocess.Popen"]


def test_dotted_attribute_walk_is_dangerous() -> None:
    # Protocol >= 4 resolves dotted names by attribute access: posixpath.os.system.
    report = inspect_pickle(_stack_global_pickle("posixpath", "os.system"))
    assert report.dangerous == ["posixpath.os.system"]


def test_non_constant_stack_global_is_flagged() -> None:
    # operands produced by a call (not literal strings) cannot be resolved statically
    data = b"\x80\x04cbuiltins\nstr\n)R\x8c\x06system\x93."
    report = inspect_pickle(data)
    assert any("STACK_GLOBAL" in g for g in report.dangerous)


def test_torch_save_zip_with_reduce_payload(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _System(f"touch {marker}")}, path)
    report = inspect_pickle(path)
    assert report.format == "torch-zip"
    assert any(g.endswith(".system") for g in report.dangerous)
    assert "torch._utils._rebuild_tensor_v2" in report.safe
    assert report.members == ["evil/data.pkl"]
    assert not marker.exists()


def test_torch_export_archive_with_poisoned_sample_inputs(tmp_path: Path) -> None:
    """torch.export.load unpickles sample inputs with weights_only=False on fallback."""
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_net().eval(), (torch.rand(2, 1, 3, 4),)), good)
    evil_inputs = io.BytesIO()
    torch.save((_System("true"),), evil_inputs)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = evil_inputs.getvalue()
            dst.writestr(info, data)
    clean = inspect_pickle(good)
    assert clean.format == "torch-export" and clean.clean
    report = inspect_pickle(evil)
    assert report.format == "torch-export"
    assert any(g.endswith(".system") for g in report.dangerous)


def test_joblib_payload_after_numpy_array_is_found(tmp_path: Path) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "model.joblib"
    # the array's raw bytes sit inside the pickle stream; the payload comes after them
    joblib.dump([np.arange(1000, dtype=np.float64), np.array(["ab", "c"]), _System("true")], path)
    report = inspect_pickle(path)
    assert not report.errors, report.errors
    assert "joblib.numpy_pickle.NumpyArrayWrapper" in report.safe
    assert any(g.endswith(".system") for g in report.dangerous)


@pytest.mark.parametrize("compress", ["zlib", "gzip", "bz2", "xz", "lzma"])
def test_compressed_joblib_is_inspected(tmp_path: Path, compress: str) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "model.joblib"
    joblib.dump({"w": np.ones((3, 4)), "f": _Eval("1")}, path, compress=(compress, 3))
    report = inspect_pickle(path)
    assert report.dangerous == ["builtins.eval"]
    assert any(compress in note for note in report.notes)


def test_pickled_torch_module_nested_payload_is_inspected() -> None:
    # plain pickle of tensors nests a torch.save stream inside _load_from_bytes(bytes)
    report = inspect_pickle(pickle.dumps(_net()))
    assert "torch.storage._load_from_bytes" in report.dangerous
    assert "torch.FloatStorage" in report.safe  # found inside the nested stream


# -- benign files --------------------------------------------------------------------------------


def test_state_dict_has_only_safe_globals(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_net().state_dict(), path)
    report = inspect_pickle(path)
    assert report.format == "torch-zip"
    assert report.clean
    assert report.globals == report.safe
    assert "collections.OrderedDict" in report.safe


def test_legacy_torch_save_format(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(_net().state_dict(), path, _use_new_zipfile_serialization=False)
    report = inspect_pickle(path)
    assert report.format == "pickle"
    assert report.clean, report
    assert any("legacy" in n for n in report.notes)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path: Path) -> None:
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(_net()), path)
    report = inspect_pickle(path)
    assert report.format == "torchscript"
    assert not report.dangerous and not report.errors
    assert any(m.endswith("constants.pkl") for m in report.members)


def test_full_module_of_standard_layers_is_safe_but_listed(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(_net(), path)
    report = inspect_pickle(path)
    assert "torch.nn.modules.container.Sequential" in report.safe
    assert "torch.nn.modules.linear.Linear" in report.safe
    assert not report.dangerous


def test_user_class_is_unknown_and_never_imported() -> None:
    data = b"\x80\x02cnot_a_real_module_xyz\nNet\nq\x00)\x81q\x01."
    report = inspect_pickle(data)
    assert report.unknown == ["not_a_real_module_xyz.Net"]
    assert "not_a_real_module_xyz" not in sys.modules


def test_sklearn_pickle_globals(tmp_path: Path) -> None:
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    x = np.random.default_rng(0).normal(size=(20, 3))
    est = sklearn_linear.LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    report = inspect_pickle(pickle.dumps(est))
    assert any(g.startswith("sklearn.") for g in report.unknown)
    assert not report.dangerous


# -- broken input --------------------------------------------------------------------------------


def test_truncated_raw_pickle_reports_error(tmp_path: Path) -> None:
    data = pickle.dumps({"a": list(range(100)), "b": "x" * 50}, protocol=4)
    report = inspect_pickle(data[: len(data) // 2])
    assert report.format == "pickle"
    assert report.errors and "truncated" in report.errors[0]


def test_truncated_zip_reports_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(_net().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = inspect_pickle(path)
    assert report.errors and "zip" in report.errors[0]


def test_forged_length_does_not_allocate(tmp_path: Path) -> None:
    data = b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"xx"  # BINBYTES8 of 2**60 bytes
    path = tmp_path / "forged.pkl"
    path.write_bytes(data)
    for source in (data, path):
        report = inspect_pickle(source)
        assert report.errors and "truncated" in report.errors[0]


@pytest.mark.parametrize("payload", [b"hello world\n", b"\x08\x07\x12\x04onnx", b""])
def test_not_a_pickle(payload: bytes) -> None:
    report = inspect_pickle(payload)
    assert report.format == "not-pickle"
    assert not report.globals


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        inspect_pickle(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="directory"):
        inspect_pickle(tmp_path)


def test_report_is_json_serialisable(tmp_path: Path) -> None:
    report = inspect_pickle(pickle.dumps(_System("true")))
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"format", "globals", "dangerous", "unknown", "safe", "errors"}
    assert isinstance(PickleReport().to_dict()["globals"], list)


# -- classification table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "name", "verdict"),
    [
        ("os", "system", "dangerous"),
        ("posix", "system", "dangerous"),
        ("nt", "system", "dangerous"),
        ("subprocess", "Popen", "dangerous"),
        ("builtins", "eval", "dangerous"),
        ("__builtin__", "exec", "dangerous"),
        ("builtins", "getattr", "dangerous"),
        ("operator", "attrgetter", "dangerous"),
        ("functools", "partial", "dangerous"),
        ("torch", "load", "dangerous"),
        ("torch.storage", "_load_from_bytes", "dangerous"),
        ("torch.hub", "load", "dangerous"),
        ("torch.jit", "load", "dangerous"),
        ("numpy", "load", "dangerous"),
        ("importlib", "import_module", "dangerous"),
        ("code", "interact", "dangerous"),
        ("runpy", "run_path", "dangerous"),
        ("webbrowser", "open", "dangerous"),
        ("collections", "OrderedDict.__init__.__globals__", "dangerous"),
        ("codecs", "lookup", "unknown"),  # "codecs" is not "code"
        ("builtins", "set", "safe"),
        ("__builtin__", "frozenset", "safe"),
        ("collections", "OrderedDict", "safe"),
        ("torch._utils", "_rebuild_tensor_v2", "safe"),
        ("torch._utils", "_rebuild_parameter", "safe"),
        ("torch", "FloatStorage", "safe"),
        ("torch", "float32", "safe"),
        ("torch", "Size", "safe"),
        ("torch.nn.modules.conv", "Conv2d", "safe"),
        ("torch.nn.parameter", "Parameter", "safe"),
        ("numpy.core.multiarray", "_reconstruct", "safe"),
        ("numpy._core.multiarray", "_reconstruct", "safe"),
        ("numpy", "dtype", "safe"),
        ("_codecs", "encode", "safe"),
        ("torch.nn.modules.module", "register_module_forward_hook", "unknown"),
        ("torch.nn.modules.linear", "Linear.forward", "unknown"),
        ("mypackage.models", "ResNet", "unknown"),
        ("__main__", "Net", "unknown"),
    ],
)
def test_classify_global(module: str, name: str, verdict: str) -> None:
    assert classify_global(module, name) == verdict
