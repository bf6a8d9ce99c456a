"""Black-box model access (DESIGN.md "Two kinds of model access").

An :class:`Oracle` answers ``query(x)`` with only what its :class:`QueryAccess` allows
(logits, probabilities or labels; optionally top-k and rounded), counts every query (one
input row is one query) and raises :class:`QueryBudgetExceeded` *before* spending past
``max_queries``. Back-ends implement :meth:`Oracle._forward`, which returns raw scores of
the kind named by ``raw_output``.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    QueryBudgetExceeded,
    UnsupportedModelError,
)
from modelshield.core.threat import QueryAccess

logger = logging.getLogger(__name__)

# What each raw output kind can be turned into.
_DERIVABLE = {
    "logits": {"logits", "probs", "label"},
    "probs": {"probs", "label"},
    "label": {"label"},
}


def restrict_output(
    raw: torch.Tensor, raw_kind: str, access: QueryAccess, num_classes: int | None = None
) -> torch.Tensor:
    """Turn raw back-end output into exactly what ``access`` allows.

    Labels come back as an ``int64`` vector ``(N,)``; scores as ``(N, C)`` floats.
    """
    if access.output not in _DERIVABLE[raw_kind]:
        raise UnsupportedModelError(
            f"the model only gives {raw_kind}; cannot answer with {access.output}"
        )
    if access.output == "label":
        if raw_kind == "label":
            return raw.reshape(-1).long()
        return raw.argmax(dim=1)
    scores = raw.float()
    if access.output == "probs" and raw_kind == "logits":
        scores = torch.softmax(scores, dim=1)
    if access.top_k is not None and access.top_k < scores.shape[1]:
        fill = 0.0 if access.output == "probs" else float("-inf")
        top = scores.topk(access.top_k, dim=1).indices
        kept = torch.full_like(scores, fill)
        scores = kept.scatter(1, top, scores.gather(1, top))
    if access.decimals is not None:
        scores = torch.round(scores, decimals=access.decimals)
    return scores


class Oracle(ABC):
    """A black-box classifier that counts and limits queries."""

    raw_output: str = "logits"

    def __init__(
        self,
        access: QueryAccess | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        batch_size: int = 256,
        name: str = "",
    ) -> None:
        self.access = access if access is not None else QueryAccess()
        if self.access.output not in _DERIVABLE[self.raw_output]:
            raise UnsupportedModelError(
                f"{type(self).__name__} gives {self.raw_output}; it cannot serve "
                f"output={self.access.output!r} (allowed: {', '.join(sorted(_DERIVABLE[self.raw_output]))})"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.name = name or type(self).__name__
        self._used = 0
        self._calls = 0
        self._lock = threading.Lock()

    # -- accounting ------------------------------------------------------------------------
    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def calls(self) -> int:
        """Number of back-end calls (batches) made."""
        return self._calls

    @property
    def remaining(self) -> int | None:
        if self.access.max_queries is None:
            return None
        return self.access.max_queries - self._used

    def _reserve(self, n: int) -> None:
        with self._lock:
            budget = self.access.max_queries
            if budget is not None and self._used + n > budget:
                raise QueryBudgetExceeded(
                    f"query of {n} sample(s) would exceed max_queries={budget} "
                    f"({self._used} used, {budget - self._used} left)"
                )
            self._used += n

    # -- querying --------------------------------------------------------------------------
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Answer a batch; returns labels ``(N,)`` or scores ``(N, C)`` per the access.

        The whole batch is charged before any back-end call, so a query either fits the
        budget entirely or raises :class:`QueryBudgetExceeded` having spent nothing.
        """
        x = self._check(x)
        n = int(x.shape[0])
        self._reserve(n)
        outs = []
        for i in range(0, n, self.batch_size):
            chunk = x[i : i + self.batch_size]
            self._calls += 1
            raw = self._forward(chunk)
            outs.append(restrict_output(raw, self.raw_output, self.access, self.num_classes))
        if not outs:
            shape = (0,) if self.access.output == "label" else (0, self.num_classes or 0)
            dtype = torch.long if self.access.output == "label" else torch.float32
            return torch.empty(shape, dtype=dtype, device=x.device)
        out = torch.cat(outs).to(x.device)
        if out.shape[0] != n:
            raise DataError(f"oracle answered {out.shape[0]} rows for {n} inputs")
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (spends queries like :meth:`query`)."""
        out = self.query(x)
        return out if out.ndim == 1 else out.argmax(dim=1)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise DataError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise DataError(f"inputs must be a batch (N, ...), got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"inputs have shape {tuple(x.shape)} but the oracle expects (N, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise DataError("inputs contain NaN or infinite values")
        return x

    @abstractmethod
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw output for one batch, of the kind ``raw_output`` names."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, access={self.access}, used={self._used})"


class ClassifierOracle(Oracle):
    """An oracle in front of a white-box :class:`Classifier` (gradients are never exposed)."""

    raw_output = "logits"

    def __init__(
        self, classifier: Classifier, access: QueryAccess | None = None, **kwargs: object
    ) -> None:
        kwargs.setdefault("input_shape", classifier.input_shape)
        kwargs.setdefault("num_classes", classifier.num_classes)
        kwargs.setdefault("name", classifier.name)
        super().__init__(access, **kwargs)  # type: ignore[arg-type]
        self.classifier = classifier

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.to(self.classifier.device)).detach().cpu()


def from_classifier(
    classifier: Classifier, access: QueryAccess | None = None, **kwargs: object
) -> ClassifierOracle:
    """Black-box view of a white-box classifier."""
    return ClassifierOracle(classifier, access, **kwargs)
