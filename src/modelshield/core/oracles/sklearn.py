"""An :class:`~modelshield.core.oracle.Oracle` in front of a fitted scikit-learn classifier.

Only the estimator's public API is used (duck typing), so any object with ``classes_``
and ``predict`` (and optionally ``predict_proba``) works, pipelines included; this module
does not import scikit-learn itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modelshield.core.errors import InvalidConfigError, OracleError, UnsupportedModelError
from modelshield.core.oracle import Oracle
from modelshield.core.oracles import _to_raw
from modelshield.core.threat import QueryAccess

logger = logging.getLogger(__name__)


def _check_classes(estimator: Any) -> int:
    """Number of classes; ``classes_`` must be exactly ``0, 1, ..., C-1``."""
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise UnsupportedModelError(
            f"{type(estimator).__name__} has no classes_; pass a fitted classifier"
        )
    arr = np.asarray(classes)
    shown = np.array2string(arr, threshold=8)
    if arr.ndim != 1 or arr.size < 2:
        raise UnsupportedModelError(f"classes_ must be a vector of at least 2 classes, got {shown}")
    if arr.dtype.kind not in "iuf" or not np.array_equal(arr, np.arange(arr.size)):
        raise UnsupportedModelError(
            f"classes_ must be the integers 0..{arr.size - 1} in order, got {shown}; "
            "encode the training labels first (e.g. sklearn.preprocessing.LabelEncoder)"
        )
    return int(arr.size)


class SklearnOracle(Oracle):
    """Black-box access to a fitted scikit-learn classifier.

    Uses ``predict_proba`` when the estimator has it (``raw_output="probs"``), otherwise
    ``predict`` (``raw_output="label"``, so only ``QueryAccess(output="label")`` is
    allowed). Inputs are flattened to ``(N, D)`` float64 arrays; ``input_shape`` (e.g.
    ``(1, 8, 8)``) lets callers pass unflattened tensors and defaults to
    ``(n_features_in_,)``.
    """

    def __init__(
        self,
        estimator: Any,
        access: QueryAccess | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        batch_size: int = 4096,
        name: str = "",
    ) -> None:
        if not callable(getattr(estimator, "predict", None)):
            raise UnsupportedModelError(
                f"{type(estimator).__name__} has no predict(); pass a fitted classifier"
            )
        num_classes = _check_classes(estimator)
        self.raw_output = "probs" if hasattr(estimator, "predict_proba") else "label"
        n_features = getattr(estimator, "n_features_in_", None)
        if input_shape is not None:
            input_shape = tuple(int(s) for s in input_shape)
            if not input_shape or any(s <= 0 for s in input_shape):
                raise InvalidConfigError(f"input_shape must be positive sizes, got {input_shape}")
            if n_features is not None and math.prod(input_shape) != int(n_features):
                raise InvalidConfigError(
                    f"input_shape={input_shape} has {math.prod(input_shape)} features but "
                    f"the estimator was fitted on {int(n_features)}"
                )
        elif n_features is not None:
            input_shape = (int(n_features),)
        super().__init__(
            access,
            input_shape=input_shape,
            num_classes=num_classes,
            batch_size=batch_size,
            name=name or type(estimator).__name__,
        )
        self.estimator = estimator

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().cpu().reshape(x.shape[0], -1).to(torch.float64).numpy()
        method = "predict_proba" if self.raw_output == "probs" else "predict"
        try:
            out = getattr(self.estimator, method)(flat)
        except Exception as exc:  # the estimator's own errors, whatever their type
            msg = " ".join(str(exc).split())[:300]
            raise OracleError(f"{self.name}.{method} failed: {type(exc).__name__}: {msg}") from None
        return _to_raw(out, self.raw_output, x.shape[0], self.num_classes, f"{self.name}.{method}")
