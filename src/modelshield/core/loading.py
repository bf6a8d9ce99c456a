"""Safe model loading: detect the file format by content and refuse to run pickled code.

:func:`load_model` turns a model file into a white-box :class:`Classifier` (TorchScript,
``torch.export`` ``.pt2``, state_dict + architecture, trusted full pickles) or a black-box
:class:`Oracle` (ONNX, trusted scikit-learn pickles), together with a
:class:`ModelFileReport` (hash, format, and the globals any embedded pickle imports).

Pickle safety follows one rule: a pickle is only unpickled by ``torch.load(...,
weights_only=True)`` (PyTorch's restricted unpickler) unless the caller passes
``trust_pickle=True``. Before that, :func:`~modelshield.core.pickle_scan.inspect_pickle`
lists the file's globals without executing it; a file that imports dangerous globals is
refused before any unpickler sees it (defence in depth against unpickler bugs), and a
file the restricted unpickler rejects is refused with the list of offending globals.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.device import select_device
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    ModelLoadError,
    ModelShieldError,
    UnsafeModelFileError,
    UnsupportedModelError,
)
from modelshield.core.io import atomic_open, sha256_file
from modelshield.core.oracle import Oracle
from modelshield.core.pickle_scan import LEGACY_TORCH_MAGIC, ZIP_MAGIC, PickleReport, inspect_pickle
from modelshield.core.threat import QueryAccess

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelFileReport", "load_model"]

ModelKind = Literal["torchscript", "export", "state_dict", "pickle", "onnx", "sklearn"]

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile
_TRUST_HINT = "pass --trust-pickle to load it anyway (this executes code from the file)"
_ARCH_HINT = "pass --arch package.module:factory (a function returning the nn.Module)"
# ModelProto field tags that can follow ir_version (field 1) at the start of an ONNX file.
_ONNX_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x52, 0x72, 0x7A}


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------


@dataclass
class ModelFileReport:
    """What was loaded: the file's identity, detected format and pickle findings.

    ``format`` is the container detected from the content: ``"torchscript"``,
    ``"torch-export"``, ``"torch-zip"`` (``torch.save``), ``"torch-legacy"`` (pre-1.6
    ``torch.save``), ``"pickle"`` (plain pickle or joblib) or ``"onnx"``.
    ``trusted_pickle`` is True when the file was unpickled without restrictions.
    """

    path: str
    size: int
    sha256: str
    format: str
    pickle: PickleReport | None = None
    trusted_pickle: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "format": self.format,
            "pickle": self.pickle.to_dict() if self.pickle is not None else None,
            "trusted_pickle": self.trusted_pickle,
            "notes": list(self.notes),
        }


@dataclass
class LoadedModel:
    """A loaded model: white-box ``classifier`` or black-box ``oracle``, and its file report.

    ``obj`` is the underlying object: the ``nn.Module`` (for ``.pt2`` files, the exported
    program's module in its re-batching wrapper) or the scikit-learn estimator; ``None``
    for ONNX.
    """

    kind: ModelKind
    classifier: Classifier | None
    oracle: Oracle | None
    file: ModelFileReport
    obj: Any = field(default=None, repr=False)

    @property
    def white_box(self) -> bool:
        return self.classifier is not None

    def to_dict(self) -> dict[str, Any]:
        clf = self.classifier
        orc = self.oracle
        return {
            "kind": self.kind,
            "white_box": self.white_box,
            "input_shape": list(clf.input_shape)
            if clf is not None
            else (list(orc.input_shape) if orc is not None and orc.input_shape else None),
            "num_classes": clf.num_classes
            if clf is not None
            else (orc.num_classes if orc is not None else None),
            "file": self.file.to_dict(),
        }


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """First line of an exception's message (or its type), trimmed to 300 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        line = "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    return line[:300] + ("..." if len(line) > 300 else "")


def _corrupt(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"model file {path} is truncated or corrupt: {reason}")


def _short_list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with ir_version (field 1, a small varint)."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _ONNX_TAGS


def _is_sklearn(report: PickleReport | None, obj: Any = None) -> bool:
    if obj is not None:
        return type(obj).__module__.split(".")[0] == "sklearn" or (
            callable(getattr(obj, "predict", None)) and hasattr(obj, "classes_")
        )
    return report is not None and any(g.startswith("sklearn.") for g in report.globals)


def _unsafe(
    path: Path, report: PickleReport, what: str, fallback: str = ""
) -> UnsafeModelFileError:
    """The one-line refusal naming what the pickle would import."""
    if report.dangerous:
        detail = f"imports dangerous globals: {_short_list(report.dangerous)}"
    elif report.unknown:
        detail = (
            f"imports {len(report.unknown)} non-allowlisted globals: {_short_list(report.unknown)}"
        )
    else:
        detail = fallback or "cannot be loaded without running it"
        if report.globals:
            detail += f" (it imports only allowlisted globals: {_short_list(report.globals, 4)})"
    return UnsafeModelFileError(f"refusing to load {path}: {what} {detail}; {_TRUST_HINT}")


def _describe(report: PickleReport) -> str:
    if _is_sklearn(report):
        return "this scikit-learn pickle"
    if report.format == "torch-export":
        return "this torch.export archive (torch.export.load unpickles its embedded pickles)"
    if report.format == "torchscript":
        return "this TorchScript archive"
    return "this pickle"


def _warn_trusted(path: Path, report: PickleReport) -> None:
    if report.dangerous:
        logger.warning(
            "loading %s with trust_pickle=True although it imports dangerous globals: %s",
            path,
            ", ".join(report.dangerous),
        )
    else:
        logger.info("loading %s with trust_pickle=True (unrestricted unpickling)", path)


# --------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------


class _ExportedModule(nn.Module):
    """Runs an exported program; batches are split and padded to a static batch size.

    A program exported without a dynamic batch dimension only accepts that exact batch
    size ("Guard failed: input.size()[0] == 2"); inputs of any other size are fed in
    slices of ``batch_size``, the last one padded by repeating its final row, and the
    padding rows are dropped from the output. Gradients flow through unchanged.
    """

    def __init__(self, program: nn.Module, batch_size: int | None) -> None:
        super().__init__()
        self.program = program
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> _ExportedModule:
        # Exported graphs refuse train()/eval(); their mode was fixed at export time.
        self.training = mode
        return self

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.program(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        if b is None or x.shape[0] == b:
            return self._run(x)
        n = int(x.shape[0])
        outs = []
        for i in range(0, max(n, 1), b):
            chunk = x[i : i + b]
            k = int(chunk.shape[0])
            if k < b:
                fill = chunk[-1:] if k else x.new_zeros((1, *x.shape[1:]))
                chunk = torch.cat([chunk, fill.expand(b - k, *x.shape[1:])])
            outs.append(self._run(chunk)[:k])
        return torch.cat(outs)


def _export_input_spec(program: Any, path: Path) -> tuple[int | None, tuple[int | None, ...]]:
    """(static batch size or None, per-sample dims) of an exported program's one input."""
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise UnsupportedModelError(
            f"exported program {path} takes {len(user_inputs)} inputs; a classifier takes one"
        )
    node = next(
        (n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]),
        None,
    )
    val = node.meta.get("val") if node is not None else None
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) < 1:
        return None, ()

    def static(d: Any) -> int | None:
        return int(d) if isinstance(d, int) and not isinstance(d, bool) else None

    return static(shape[0]), tuple(static(d) for d in shape[1:])


def _load_export(path: Path) -> tuple[nn.Module, int | None, tuple[int | None, ...]]:
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except ModelShieldError:
        raise
    except Exception as exc:
        raise _corrupt(path, f"torch.export.load failed: {_one_line(exc)}") from exc
    batch, dims = _export_input_spec(program, path)
    return _ExportedModule(module, batch), batch, dims


# --------------------------------------------------------------------------------------
# state_dict + architecture
# --------------------------------------------------------------------------------------


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _extract_state_dict(obj: Any) -> tuple[Mapping[str, torch.Tensor], str | None] | None:
    """The state_dict in ``obj`` (top level or under a usual key) and where it was."""
    if _is_tensor_mapping(obj):
        return obj, None
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _is_tensor_mapping(inner):
                return inner, key
    return None


def _infer_num_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    """Output width of the last 2-D weight (the classifier head, for the built-ins)."""
    last = None
    for k, v in sd.items():
        if k.endswith("weight") and v.ndim == 2:
            last = int(v.shape[0])
    return last


def import_object(spec: str, what: str, form: str = "package.module:name") -> Any:
    """The callable named ``package.module:attr`` (``what`` names the option in errors)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise InvalidConfigError(f"{what} must look like {form}, got {spec!r}")
    try:
        target: Any = importlib.import_module(mod_name)
    except Exception as exc:
        raise InvalidConfigError(
            f"{what} {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InvalidConfigError(f"{what} {spec!r}: {mod_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InvalidConfigError(f"{what} {spec!r}: {attr!r} is not callable")
    return target


def _build_arch(
    arch: str,
    *,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    sd: Mapping[str, torch.Tensor],
) -> nn.Module:
    """Build the module ``arch`` names: ``package.module:factory`` or a registered name."""
    if ":" in arch:
        target = import_object(arch, "arch", "package.module:factory")
        attr = arch.partition(":")[2]
        try:
            net = target()
        except Exception as exc:
            raise InvalidConfigError(
                f"arch {arch!r}: calling {attr}() failed ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
    else:
        if importlib.util.find_spec("modelshield.core.architectures") is None:
            raise InvalidConfigError(f"arch must look like package.module:factory, got {arch!r}")
        archs = importlib.import_module("modelshield.core.architectures")
        registry = archs.ARCHITECTURES
        if arch not in registry:
            known = ", ".join(registry.names()) or "(none)"
            raise InvalidConfigError(f"unknown arch {arch!r}; built-in: {known}; or {_ARCH_HINT}")
        if input_shape is None:
            raise InvalidConfigError(
                f"arch {arch!r} needs input_shape (the per-sample shape, e.g. (3, 32, 32))"
            )
        n_cls = num_classes if num_classes is not None else _infer_num_classes(sd)
        if n_cls is None:
            raise InvalidConfigError(f"arch {arch!r} needs num_classes; pass it explicitly")
        net = archs.build(arch, input_shape, n_cls)
    if not isinstance(net, nn.Module):
        raise InvalidConfigError(
            f"arch {arch!r} returned a {type(net).__name__}, not a torch.nn.Module"
        )
    return net


def build_arch(arch: str, *, input_shape: Sequence[int] | None, num_classes: int) -> nn.Module:
    """A fresh module for ``arch``: a built-in name (``modelshield list architectures``) or
    ``package.module:factory`` (called with no arguments)."""
    return _build_arch(arch, input_shape=input_shape, num_classes=num_classes, sd={})


def _fit_state_dict(
    net: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str, notes: list[str]
) -> None:
    """``load_state_dict(strict=True)`` with one-line errors naming the mismatched keys."""
    want = net.state_dict()
    if not any(k in want for k in sd):
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                notes.append(f"stripped the {prefix!r} prefix from state_dict keys")
                break
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k} {tuple(sd[k].shape)} in file vs {tuple(want[k].shape)} in model"
        for k in want
        if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing, 6)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected, 6)}")
    if shapes:
        problems.append(f"shape mismatch: {_short_list(shapes, 3)}")
    if problems:
        raise ModelLoadError(
            f"state_dict in {path} does not fit arch {arch!r}: {'; '.join(problems)}"
        )
    try:
        net.load_state_dict(sd, strict=True)
    except Exception as exc:
        raise ModelLoadError(
            f"state_dict in {path} does not fit arch {arch!r}: {_one_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------------------
# Pickle-based files
# --------------------------------------------------------------------------------------


def _torch_load(path: Path, *, weights_only: bool, map_location: torch.device) -> Any:
    return torch.load(str(path), map_location=map_location, weights_only=weights_only)


def _is_weights_only_rejection(exc: BaseException) -> bool:
    return "weights only" in str(exc).lower() or isinstance(exc, pickle.UnpicklingError)


def _unpickle_trusted(path: Path, fmt: str, report: PickleReport, dev: torch.device) -> Any:
    """Unrestricted load (runs code from the file): only with ``trust_pickle=True``."""
    _warn_trusted(path, report)
    try:
        if fmt in ("torch-zip", "torch-legacy"):
            return _torch_load(path, weights_only=False, map_location=dev)
        if any(g.startswith("joblib.") for g in report.globals) or any(
            "compressed" in n for n in report.notes
        ):
            try:
                import joblib
            except ImportError as exc:
                raise UnsupportedModelError(
                    f"{path} is a joblib file; install joblib (pip install joblib) to load it"
                ) from exc
            return joblib.load(path)
        with open(path, "rb") as fh:
            return pickle.load(fh)  # the caller opted in with trust_pickle
    except ModelShieldError:
        raise
    except Exception as exc:
        raise _corrupt(path, f"unpickling failed: {type(exc).__name__}: {_one_line(exc)}") from exc


def _load_pickled(
    path: Path, fmt: str, report: PickleReport, trust: bool, dev: torch.device, notes: list[str]
) -> tuple[Any, bool]:
    """Unpickle a torch.save / plain pickle file safely; returns (object, trusted)."""
    if report.dangerous and not trust:
        raise _unsafe(path, report, _describe(report))
    if report.errors and not trust:
        raise _corrupt(path, report.errors[0])
    torch_file = fmt in ("torch-zip", "torch-legacy")
    fallback = "is a plain pickle, which can only be loaded by running it"
    if torch_file and not report.dangerous:
        try:
            return _torch_load(path, weights_only=True, map_location=dev), False
        except Exception as exc:
            if not _is_weights_only_rejection(exc):
                raise _corrupt(path, _one_line(exc)) from exc
            logger.debug("weights-only load of %s failed: %s", path, exc)
            fallback = "holds Python objects that the weights-only unpickler rejects"
    if not trust:
        raise _unsafe(path, report, _describe(report), fallback)
    notes.append("unpickled without restrictions (trust_pickle=True)")
    return _unpickle_trusted(path, fmt, report, dev), True


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _check_path(path: Path) -> int:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(
            f"model path {path} is a directory; pass the model file itself "
            "(.pt2, .pt/.pth, .onnx, .pkl/.joblib)"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise _corrupt(path, "the file is empty")
    return size


def _white_box(
    module: nn.Module,
    *,
    kind: ModelKind,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    bounds: tuple[float, float],
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    device: str | torch.device | None,
    name: str,
) -> Classifier:
    if input_shape is None:
        raise InvalidConfigError(
            f"input_shape is required for a {kind} model (the per-sample shape without the "
            "batch dimension, e.g. (3, 32, 32)); got None"
        )
    try:
        return from_torch(
            module,
            input_shape=tuple(int(s) for s in input_shape),
            num_classes=num_classes,
            bounds=bounds,
            mean=mean,
            std=std,
            device=device,
            name=name,
        )
    except ModelShieldError:
        raise
    except Exception as exc:  # e.g. a module that cannot move to the device
        raise UnsupportedModelError(
            f"cannot use the {kind} model as a classifier: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def load_model(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a model file safely and wrap it as a Classifier (white-box) or Oracle.

    Formats are detected from the content (the extension is only a hint): TorchScript,
    ``torch.export`` ``.pt2``, ``torch.save`` state_dicts (need ``arch``, either
    ``"package.module:factory"`` called with no arguments or a built-in architecture
    name), full pickles and scikit-learn pickles/joblib files (need ``trust_pickle``),
    and ONNX (black-box, via onnxruntime). White-box kinds need ``input_shape`` (read
    from the program for ``.pt2`` files with static per-sample dims). Raises
    :class:`ModelLoadError` for missing/corrupt files, :class:`UnsafeModelFileError`
    for pickles that would run code, :class:`InvalidConfigError` for bad arguments.
    """
    if not isinstance(trust_pickle, bool):
        raise InvalidConfigError(f"trust_pickle must be a bool, got {trust_pickle!r}")
    p = Path(path)
    size = _check_path(p)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
        digest = sha256_file(p)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {p}: {exc.strerror or exc}") from exc
    dev = select_device(device)
    notes: list[str] = []
    common: dict[str, Any] = {
        "input_shape": input_shape,
        "num_classes": num_classes,
        "bounds": bounds,
        "mean": mean,
        "std": std,
        "device": dev,
        "name": p.name,
    }

    # -- ONNX: protobuf, never a pickle ----------------------------------------------------
    if not head.startswith(ZIP_MAGIC) and (
        _looks_like_onnx(head) or (p.suffix.lower() == ".onnx" and head[:1] != b"\x80")
    ):
        report = ModelFileReport(str(p), size, digest, "onnx", notes=notes)
        return _load_onnx(p, report, input_shape=input_shape, num_classes=num_classes)

    # -- everything else is pickle-based: inspect it first -----------------------------------
    scan = inspect_pickle(p)
    fmt: str = scan.format
    if fmt == "pickle" and head.startswith(LEGACY_TORCH_MAGIC):
        fmt = "torch-legacy"
    report = ModelFileReport(str(p), size, digest, fmt, pickle=scan, notes=notes)
    if fmt == "not-pickle":
        if head.startswith(ZIP_MAGIC):
            raise UnsupportedModelError(
                f"model file {p} is a zip archive but not a torch.save, TorchScript or "
                "torch.export file"
            )
        raise _corrupt(
            p,
            "not a TorchScript, torch.export, torch.save, pickle or ONNX file "
            f"(starts with {head[:8].hex()})",
        )
    if scan.errors and fmt in ("torchscript", "torch-export"):
        raise _corrupt(p, scan.errors[0])

    if fmt == "torchscript":
        if scan.dangerous and not trust_pickle:
            raise _unsafe(p, scan, _describe(scan))
        try:
            module = torch.jit.load(str(p), map_location=dev)
        except Exception as exc:
            raise _corrupt(p, f"torch.jit.load failed: {_one_line(exc)}") from exc
        notes.append("TorchScript code runs in the TorchScript interpreter, not Python")
        clf = _white_box(module, kind="torchscript", **common)
        return LoadedModel("torchscript", clf, None, report, obj=module)

    if fmt == "torch-export":
        if (scan.dangerous or scan.unknown) and not trust_pickle:
            raise _unsafe(p, scan, _describe(scan))
        if scan.dangerous or scan.unknown:
            report.trusted_pickle = True
            _warn_trusted(p, scan)
        module, batch, dims = _load_export(p)
        if batch is not None:
            notes.append(f"exported with a static batch size of {batch}; inputs are re-batched")
        if input_shape is None and dims and all(d is not None for d in dims):
            common["input_shape"] = tuple(int(d) for d in dims if d is not None)
            notes.append(f"input_shape {common['input_shape']} read from the exported program")
        clf = _white_box(module, kind="export", **common)
        return LoadedModel("export", clf, None, report, obj=module)

    # -- torch.save / legacy torch.save / plain pickle / joblib --------------------------------
    obj, trusted = _load_pickled(p, fmt, scan, trust_pickle, dev, notes)
    report.trusted_pickle = trusted
    if isinstance(obj, nn.Module):
        clf = _white_box(obj, kind="pickle", **common)
        return LoadedModel("pickle", clf, None, report, obj=obj)
    found = _extract_state_dict(obj)
    if found is not None:
        sd, key = found
        if key is not None:
            notes.append(f"state_dict read from the checkpoint's {key!r} entry")
        if arch is None:
            raise InvalidConfigError(
                f"{p} holds a state_dict (weights only) and no architecture; {_ARCH_HINT}"
                " or a built-in architecture name"
            )
        net = _build_arch(arch, input_shape=input_shape, num_classes=num_classes, sd=sd)
        _fit_state_dict(net, sd, p, arch, notes)
        clf = _white_box(net, kind="state_dict", **common)
        return LoadedModel("state_dict", clf, None, report, obj=net)
    if _is_sklearn(None, obj):
        oracle = _sklearn_oracle(obj, p, input_shape)
        if mean is not None or std is not None:
            notes.append("mean/std are ignored for black-box models")
        return LoadedModel("sklearn", None, oracle, report, obj=obj)
    if isinstance(obj, Mapping):
        keys = _short_list([str(k) for k in obj], 6)
        raise UnsupportedModelError(
            f"{p} holds a dict (keys: {keys}) with no state_dict of tensors at the top level "
            f"or under {', '.join(repr(k) for k in _STATE_DICT_KEYS)}"
        )
    raise UnsupportedModelError(
        f"{p} holds a {type(obj).__module__}.{type(obj).__qualname__}, not an nn.Module, a "
        "state_dict or a fitted scikit-learn classifier"
    )


def _sklearn_oracle(estimator: Any, path: Path, input_shape: Sequence[int] | None) -> Oracle:
    try:
        from modelshield.core.oracles.sklearn import SklearnOracle
    except ImportError as exc:  # pragma: no cover - the module ships with modelshield
        raise UnsupportedModelError(f"scikit-learn models are not supported here: {exc}") from exc
    output: Literal["probs", "label"] = (
        "probs" if callable(getattr(estimator, "predict_proba", None)) else "label"
    )
    kwargs: dict[str, Any] = {}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(int(s) for s in input_shape)
    oracle: Oracle = SklearnOracle(estimator, access=QueryAccess(output=output), **kwargs)
    return oracle


def _load_onnx(
    path: Path,
    report: ModelFileReport,
    *,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
) -> LoadedModel:
    try:
        from modelshield.core.oracles.onnx import OnnxOracle
    except ImportError as exc:
        raise UnsupportedModelError(
            f"ONNX support is not available ({_one_line(exc)}); pip install 'modelshield[onnx]'"
        ) from exc
    kwargs: dict[str, Any] = {}
    if input_shape is not None:
        kwargs["input_shape"] = tuple(int(s) for s in input_shape)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        oracle = OnnxOracle(path, access=QueryAccess(output="logits"), **kwargs)
    except ModelShieldError:
        raise
    except Exception as exc:
        raise _corrupt(path, f"onnxruntime could not open it: {_one_line(exc)}") from exc
    return LoadedModel("onnx", None, oracle, report, obj=None)


def load_given_model(
    opts: dict[str, Any], input_shape: tuple[int, ...], device: Any
) -> LoadedModel:
    """``--model``, loaded as the shared model options say (``--trust-pickle``, ``--arch``,
    ``--bounds``, ``--mean``, ``--std``)."""
    return load_model(
        opts["model"],
        trust_pickle=opts["trust_pickle"],
        arch=opts.get("arch"),
        input_shape=input_shape,
        bounds=opts["bounds"],
        mean=opts.get("mean"),
        std=opts.get("std"),
        device=device,
    )


def check_fits(model: LoadedModel, labels: torch.Tensor, flag: str = "--data") -> None:
    """Raise :class:`DataError` when ``labels`` name classes the model cannot predict."""
    head = model.classifier or model.oracle
    num_classes = getattr(head, "num_classes", None)
    if num_classes is not None and len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"{flag} has labels up to {int(labels.max())} but the model predicts "
            f"{num_classes} classes (0..{num_classes - 1})"
        )


def save_exported(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``module`` (a trained or hardened model) as a torch.export program with a
    dynamic batch dimension, atomically; a model torch.export cannot trace is refused."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        try:
            program = torch.export.export(module, (example[:2],), dynamic_shapes=({0: batch},))
        except Exception:  # e.g. a re-exported graph keeps its own batch range: infer it
            program = torch.export.export(
                module, (example[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)
            )
    except Exception as exc:  # torch's own error, in one line
        raise UnsupportedModelError(
            f"the hardened model could not be exported with torch.export: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    with atomic_open(path, "wb") as fh:
        torch.export.save(program, fh)
