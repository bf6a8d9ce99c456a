"""Device selection: ``auto`` means CUDA when available, else CPU."""

from __future__ import annotations

import torch

from modelshield.core.errors import InvalidConfigError


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` to an available device."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidConfigError(
            f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidConfigError(f"device {name!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InvalidConfigError(f"device {name!r} requested but MPS is not available here")
    elif dev.type != "cpu":
        raise InvalidConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return dev
