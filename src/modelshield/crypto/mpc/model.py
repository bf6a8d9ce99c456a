"""A trained torch model as the layer list the MPC parties evaluate.

The model owner's process reads its model file (with the project's safe loader) and
rewrites it as ``affine → activation → affine → … → affine``: every run of linear layers
between two activations (Linear, Conv2d, average pooling, flatten, BatchNorm in eval
mode, dropout) collapses into one affine map read off the layers themselves — the same
layer reading and collapse as the HE plan (:mod:`modelshield.crypto.he.plan`), so a
convolution becomes its unrolled (im2col / Toeplitz) matrix and BatchNorm is folded in.

Unlike CKKS, secret sharing evaluates ReLU exactly (a secure comparison), so activations
stay what they are: ``relu`` or a polynomial (``square`` / a trainable ``PolyAct``). A
trailing sigmoid / softmax / ReLU is monotone, so the argmax the data owner receives does
not need it. Anything else is refused with the layer named.

Only :class:`Architecture` (layer kinds and shapes) is public; the weights stay with the
model owner until secret-shared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from modelshield.core.errors import DataError, UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED = (
    "Linear, Conv2d (im2col), AvgPool2d / AdaptiveAvgPool2d, Flatten/view, BatchNorm "
    "(eval mode, folded), Dropout, ReLU (secure comparison), square / PolyAct polynomials"
)


@dataclass
class Layer:
    """One step: ``affine`` (``w``: in × out, ``b``: out), ``relu`` or ``poly`` (a0, a1, a2)."""

    kind: str
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    coeffs: tuple[float, float, float] | None = None

    def spec(self) -> dict[str, Any]:
        """The public description of this layer (kind and shape, or the polynomial)."""
        if self.kind == "affine":
            assert self.w is not None
            return {"kind": "affine", "in": int(self.w.shape[0]), "out": int(self.w.shape[1])}
        if self.kind == "poly":
            # the activation's form is part of the architecture (like "ReLU"), not a weight
            return {"kind": "poly", "coeffs": list(self.coeffs or (0.0, 0.0, 1.0))}
        return {"kind": self.kind}


@dataclass
class Architecture:
    """What every party knows: input size, layer kinds and shapes, number of outputs."""

    input_dim: int
    layers: list[dict[str, Any]]
    output: str = "identity"

    @property
    def num_outputs(self) -> int:
        return int(next(s["out"] for s in reversed(self.layers) if s["kind"] == "affine"))

    def to_dict(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "layers": self.layers, "output": self.output}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Architecture:
        return cls(int(d["input_dim"]), list(d["layers"]), str(d.get("output", "identity")))


@dataclass
class MPCModel:
    """The model owner's private layer list (weights in float64) and its public architecture."""

    input_shape: tuple[int, ...]
    layers: list[Layer]
    output: str = "identity"
    notes: list[str] = field(default_factory=list)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.input_dim, [la.spec() for la in self.layers], self.output)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plaintext evaluation of the layer list (the reference the MPC run must match)."""
        return self._run(x)[0]

    def max_abs(self, x: np.ndarray) -> float:
        """Largest |value| of the inputs and of every layer's output on ``x``.

        Fixed point with ``int_bits`` integer bits (sign included) holds values below
        ``2**(int_bits - 1)``; beyond it, secure comparisons and truncations go wrong.
        """
        return self._run(x)[1]

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        h = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        peak = float(np.abs(h).max()) if h.size else 0.0
        if h.shape[1] != self.input_dim:
            raise DataError(f"inputs have {h.shape[1]} features; the model takes {self.input_dim}")
        for la in self.layers:
            if la.kind == "affine":
                assert la.w is not None and la.b is not None
                h = h @ la.w + la.b
            elif la.kind == "relu":
                h = np.maximum(h, 0.0)
            else:
                a0, a1, a2 = la.coeffs or (0.0, 0.0, 1.0)
                peak = max(peak, float(np.abs(h * h).max()) if h.size else 0.0)
                h = a0 + a1 * h + a2 * h * h
            peak = max(peak, float(np.abs(h).max()) if h.size else 0.0)
        return h, peak


def compile_model(
    module: nn.Module, input_shape: Sequence[int], *, tolerance: float = 1e-3, seed: int = 0
) -> MPCModel:
    """Rewrite ``module`` (eval mode) as an :class:`MPCModel`.

    The layer list, evaluated in float64, is checked against the module's own outputs on
    random inputs (relative error ≤ ``tolerance``) before it is returned.
    """
    from modelshield.core.loading import _ExportedModule
    from modelshield.crypto.he.plan import _affine_of, _Step, _steps, _to_double

    shape = tuple(int(s) for s in input_shape)
    g = torch.Generator().manual_seed(seed)
    probe = torch.rand((64, *shape), generator=g)
    module.eval()
    batch = (
        int(module.batch_size)
        if isinstance(module, _ExportedModule) and module.batch_size
        else None
    )
    example = probe[:2] if batch is None else probe[:1].expand(batch, *shape).clone()
    try:
        steps = _steps(module, example)
    except UnsupportedModelError as exc:  # the HE reader's wording, for this engine
        raise UnsupportedModelError(
            str(exc).replace("in encrypted inference", "in MPC inference")
        ) from exc
    output = "identity"
    while steps and steps[-1].kind in ("sigmoid", "softmax", "relu") and output == "identity":
        output = steps[-1].kind
        steps = steps[:-1]
    layers: list[Layer] = []
    run: list[_Step] = []
    cur: tuple[int, ...] = shape
    notes: list[str] = []

    def flush() -> None:
        nonlocal cur, run
        if run:
            aff, cur = _affine_of([_Step(s.kind, s.name, _to_double(s.fn)) for s in run], cur)
            layers.append(Layer("affine", np.ascontiguousarray(aff.w.T), aff.b))
            run = []

    for i, s in enumerate(steps):
        if s.kind == "linear":
            run.append(s)
            continue
        flush()
        if not layers or layers[-1].kind != "affine":
            raise UnsupportedModelError(
                f"layer {i} ({s.name}): an activation must follow a Linear or Conv2d layer"
            )
        if s.kind == "relu":
            layers.append(Layer("relu"))
        elif s.kind == "square":
            layers.append(Layer("poly", coeffs=(0.0, 0.0, 1.0)))
        elif s.kind == "poly":
            layers.append(Layer("poly", coeffs=s.coeffs))
        else:
            raise UnsupportedModelError(
                f"layer {i} ({s.name}) is not supported in MPC inference "
                f"(only as the last layer); supported are {SUPPORTED}"
            )
    flush()
    if not layers or layers[-1].kind != "affine":
        raise UnsupportedModelError("the model must end with a Linear or Conv2d layer")
    if output != "identity":
        notes.append(f"trailing {output} dropped: it does not change the argmax")
    model = MPCModel(shape, layers, output, notes)
    with torch.no_grad():
        ref = module(probe).double().reshape(len(probe), -1)
        mine = torch.from_numpy(model.forward(probe.double().numpy()))
        if output == "sigmoid":
            mine = torch.sigmoid(mine)
        elif output == "softmax":
            mine = torch.softmax(mine, 1)
        elif output == "relu":
            mine = mine.clamp_min(0)
    bound = tolerance * max(1.0, float(ref.abs().max()))
    if mine.shape != ref.shape or not torch.allclose(mine, ref, rtol=tolerance, atol=bound):
        raise UnsupportedModelError(
            "the model's forward is not the plain sequence of its layers (e.g. a residual "
            f"connection or a functional op in forward): supported are {SUPPORTED}, in sequence"
        )
    return model


def load_mpc_model(
    path: str,
    input_shape: Sequence[int] | None,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> tuple[MPCModel, nn.Module]:
    """Load a model file with the project's safe loader and compile it for MPC."""
    from modelshield.core.loading import load_model

    loaded = load_model(
        path,
        trust_pickle=trust_pickle,
        arch=arch,
        input_shape=tuple(input_shape) if input_shape else None,
        device="cpu",
    )
    if loaded.classifier is None or not isinstance(loaded.obj, nn.Module):
        raise UnsupportedModelError(
            f"MPC inference evaluates a torch model; got a {loaded.kind} model"
        )
    shape = tuple(loaded.classifier.input_shape)
    if input_shape and int(np.prod(shape)) != int(np.prod(input_shape)):
        raise DataError(
            f"the model takes inputs of shape {shape}; the data has {tuple(input_shape)}"
        )
    return compile_model(loaded.obj, shape), loaded.obj
