"""White-box model access: a differentiable ``x -> logits`` with its input contract.

Inputs live in the model's input space, inside ``bounds`` (default ``(0, 1)``);
normalisation (``mean``/``std``) belongs to the adapter, never to the attack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modelshield.core.device import select_device
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.threat import check_bounds


class Classifier:
    """A white-box classifier: callable ``x -> logits (N, C)``, differentiable in ``x``.

    The wrapped module is put in eval mode. ``mean``/``std`` (per channel, or scalars) are
    applied inside ``__call__``, so attacks work in the raw input space.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        device: str | torch.device | None = None,
        name: str = "",
    ) -> None:
        if not callable(module):
            raise UnsupportedModelError(f"module must be callable, got {type(module).__name__}")
        self.input_shape = tuple(int(s) for s in input_shape)
        if not self.input_shape or any(s <= 0 for s in self.input_shape):
            raise InvalidConfigError(f"input_shape must be positive sizes, got {input_shape!r}")
        if isinstance(num_classes, bool) or int(num_classes) < 2:
            raise InvalidConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.bounds = check_bounds(bounds)
        self.device = select_device(device)
        self.name = name or type(module).__name__
        self.module = module.to(self.device) if isinstance(module, nn.Module) else module
        if isinstance(self.module, nn.Module):
            self.module.eval()
        self._mean = self._stat(mean, "mean")
        self._std = self._stat(std, "std")
        if self._std is not None and bool((self._std <= 0).any()):
            raise InvalidConfigError(f"std must be > 0, got {std!r}")

    def _stat(self, value: Sequence[float] | float | None, name: str) -> torch.Tensor | None:
        if value is None:
            return None
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        if t.ndim == 1 and len(self.input_shape) >= 2:
            if t.numel() != self.input_shape[0]:
                raise InvalidConfigError(
                    f"{name} has {t.numel()} values but the input has {self.input_shape[0]} channels"
                )
            t = t.view(-1, *([1] * (len(self.input_shape) - 1)))
        return t

    # -- forward ---------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised as the module expects it (``(x - mean) / std``, when set)."""
        if self._mean is not None:
            x = x - self._mean.to(x.dtype)
        if self._std is not None:
            x = x / self._std.to(x.dtype)
        return x

    def trainable(self) -> nn.Module:
        """The module behind this adapter's normalisation, as one ``nn.Module`` for training.

        It shares the module's parameters, so training it trains ``self.module`` in place;
        save ``self.module`` (whose input contract is unchanged), not the wrapper.
        """
        if self._mean is None and self._std is None:
            if not isinstance(self.module, nn.Module):
                raise UnsupportedModelError(f"cannot train a {type(self.module).__name__}")
            return self.module
        return _Normalised(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``x`` of shape ``(N, *input_shape)``; differentiable."""
        out = self.module(self.preprocess(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnsupportedModelError(f"model must return logits of shape (N, C), got {shape}")
        return out

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits in batches without gradients, on the classifier's device."""
        self.check_input(x)
        outs = [self(x[i : i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
        if not outs:
            return torch.empty(0, self.num_classes, device=self.device)
        return torch.cat(outs)

    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Top-1 labels."""
        return self.logits(x, batch_size).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
        pred = self.predict(x, batch_size)
        return float((pred == y.to(pred.device)).float().mean()) if len(y) else float("nan")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` when ``x`` does not fit this model's input contract."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"inputs have shape {tuple(x.shape)} but the model expects (N, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        if not x.is_floating_point():
            raise DataError(f"inputs must be floating point, got dtype {x.dtype}")

    def to(self, device: str | torch.device) -> Classifier:
        self.device = select_device(device)
        if isinstance(self.module, nn.Module):
            self.module.to(self.device)
        if self._mean is not None:
            self._mean = self._mean.to(self.device)
        if self._std is not None:
            self._std = self._std.to(self.device)
        return self

    def __repr__(self) -> str:
        return (
            f"Classifier({self.name}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, bounds={self.bounds}, device={self.device})"
        )


def from_torch(
    module: nn.Module,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    device: str | torch.device | None = None,
    name: str = "",
) -> Classifier:
    """Wrap an ``nn.Module``; ``num_classes`` is read off one forward pass when not given."""
    if num_classes is None:
        dev = select_device(device)
        probe = module.to(dev) if isinstance(module, nn.Module) else module
        if isinstance(probe, nn.Module):
            probe.eval()
        low, high = check_bounds(bounds)
        x = torch.full((2, *input_shape), (low + high) / 2, device=dev)
        try:
            with torch.no_grad():
                out = probe(x)
        except Exception as exc:  # the module's own error, reported in one line
            raise UnsupportedModelError(
                f"model failed on an input of shape {tuple(x.shape)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnsupportedModelError(f"model must return logits of shape (N, C), got {shape}")
        num_classes = int(out.shape[1])
    return Classifier(
        module,
        input_shape=input_shape,
        num_classes=num_classes,
        bounds=bounds,
        mean=mean,
        std=std,
        device=device,
        name=name,
    )


class _Normalised(nn.Module):
    """``module((x - mean) / std)``: a classifier's module with its adapter's normalisation."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        if not isinstance(clf.module, nn.Module):
            raise UnsupportedModelError(f"cannot train a {type(clf.module).__name__}")
        self.inner = clf.module
        self._preprocess = clf.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self._preprocess(x))
