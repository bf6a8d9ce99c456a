"""Black-box back-ends: ONNX files, scikit-learn estimators, HTTP endpoints.

Each back-end is an :class:`~modelshield.core.oracle.Oracle`; the base class does the
budget accounting and output restriction, a back-end only answers one batch. Back-ends
are imported lazily so that ``onnxruntime`` or ``scikit-learn`` are only needed when used::

    from modelshield.core.oracles import OnnxOracle, SklearnOracle, HttpOracle
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modelshield.core.errors import InvalidConfigError, OracleError
from modelshield.core.threat import OUTPUT_KINDS

if TYPE_CHECKING:
    from modelshield.core.oracles.http import HttpOracle
    from modelshield.core.oracles.onnx import OnnxOracle
    from modelshield.core.oracles.sklearn import SklearnOracle

__all__ = ["HttpOracle", "OnnxOracle", "SklearnOracle"]

_LAZY = {
    "HttpOracle": "modelshield.core.oracles.http",
    "OnnxOracle": "modelshield.core.oracles.onnx",
    "SklearnOracle": "modelshield.core.oracles.sklearn",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


# -- helpers shared by the back-ends --------------------------------------------------------
def _check_raw_output(raw_output: object) -> str:
    """Validate a back-end's ``raw_output`` (what the model itself emits)."""
    if raw_output not in OUTPUT_KINDS:
        raise InvalidConfigError(
            f"raw_output must be one of {', '.join(OUTPUT_KINDS)}, got {raw_output!r}"
        )
    return str(raw_output)


def _to_raw(
    values: object, kind: str, n: int, num_classes: int | None, source: str
) -> torch.Tensor:
    """Check a back-end's answer for ``n`` inputs and return it as a tensor.

    ``kind`` is the raw output kind: labels become an ``int64`` vector ``(N,)`` (a
    ``(N, 1)`` column is accepted), scores a ``float32`` matrix ``(N, C)``. Anything
    else raises :class:`OracleError` naming ``source`` and what was wrong.
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise OracleError(f"{source}: output is not a rectangular numeric array") from None
    if kind == "label":
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            raise OracleError(f"{source}: labels must have shape (N,), got {arr.shape}")
    elif arr.ndim != 2:
        raise OracleError(f"{source}: {kind} must have shape (N, C), got {arr.shape}")
    if arr.shape[0] != n:
        raise OracleError(f"{source}: answered {arr.shape[0]} row(s) for {n} input(s)")
    if not np.isfinite(arr).all():
        raise OracleError(f"{source}: output contains NaN or infinite values")
    if kind == "label":
        if arr.size and (not np.array_equal(arr, np.round(arr)) or arr.min() < 0):
            raise OracleError(f"{source}: labels must be non-negative integers")
        if num_classes is not None and arr.size and arr.max() >= num_classes:
            raise OracleError(
                f"{source}: label {int(arr.max())} out of range for {num_classes} classes"
            )
        return torch.from_numpy(arr.astype(np.int64))
    if num_classes is not None and arr.shape[1] != num_classes:
        raise OracleError(f"{source}: expected {num_classes} score columns, got {arr.shape[1]}")
    if arr.shape[1] < 2:
        raise OracleError(f"{source}: {kind} need at least 2 columns, got {arr.shape[1]}")
    if kind == "probs" and arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise OracleError(
            f"{source}: probs outside [0, 1] (min {arr.min():.4g}, max {arr.max():.4g}); "
            "if the model emits logits, use raw_output='logits'"
        )
    return torch.from_numpy(arr.astype(np.float32))
