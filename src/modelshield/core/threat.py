"""Threat models as frozen, validated dataclasses (DESIGN.md "Core contracts")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from modelshield.core.errors import InvalidConfigError

Norm = Literal["linf", "l2", "l1"]
NORMS: tuple[str, ...] = ("linf", "l2", "l1")
OutputKind = Literal["logits", "probs", "label"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probs", "label")


def check_bounds(bounds: tuple[float, float], name: str = "bounds") -> tuple[float, float]:
    """Validate an input-space box ``(low, high)`` and return it as floats."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"{name} must be a pair (low, high), got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise InvalidConfigError(f"{name} must be finite with low < high, got ({low}, {high})")
    return low, high


@dataclass(frozen=True)
class LpThreat:
    """An Lp-bounded perturbation threat model.

    ``eps`` is measured in the model's input space (the space ``bounds`` describe), before
    any normalisation the adapter applies.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    bounds: tuple[float, float] = (0.0, 1.0)
    targeted: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise InvalidConfigError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"eps must be a number, got {self.eps!r}") from None
        if not math.isfinite(eps) or eps < 0:
            raise InvalidConfigError(f"eps must be finite and >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", check_bounds(self.bounds))
        if not isinstance(self.targeted, bool):
            raise InvalidConfigError(f"targeted must be a bool, got {self.targeted!r}")

    def to_dict(self) -> dict[str, object]:
        return {
            "norm": self.norm,
            "eps": self.eps,
            "bounds": list(self.bounds),
            "targeted": self.targeted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LpThreat:
        b = d.get("bounds", (0.0, 1.0))
        return cls(
            norm=d.get("norm", "linf"),  # type: ignore[arg-type]
            eps=float(d.get("eps", 8 / 255)),  # type: ignore[arg-type]
            bounds=tuple(b),  # type: ignore[arg-type]
            targeted=bool(d.get("targeted", False)),
        )


@dataclass(frozen=True)
class QueryAccess:
    """What a black-box caller may see and how much.

    ``output``: ``"logits"``, ``"probs"`` (softmax) or ``"label"`` (top-1 only).
    ``max_queries``: budget in samples (one input row is one query); ``None`` = unlimited.
    ``decimals``: round scores to this many decimals (ignored for labels).
    ``top_k``: only the k largest scores are returned, the rest are zero (``None`` = all).
    """

    output: OutputKind = "probs"
    max_queries: int | None = None
    decimals: int | None = None
    top_k: int | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_KINDS:
            raise InvalidConfigError(
                f"output must be one of {', '.join(OUTPUT_KINDS)}, got {self.output!r}"
            )
        for name in ("max_queries", "decimals", "top_k"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"{name} must be an integer or None, got {value!r}")
        if self.max_queries is not None and self.max_queries < 0:
            raise InvalidConfigError(f"max_queries must be >= 0, got {self.max_queries}")
        if self.decimals is not None and not 0 <= self.decimals <= 12:
            raise InvalidConfigError(f"decimals must be in [0, 12], got {self.decimals}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidConfigError(f"top_k must be >= 1, got {self.top_k}")

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.output,
            "max_queries": self.max_queries,
            "decimals": self.decimals,
            "top_k": self.top_k,
        }
