"""A trained torch model as the layer list the MPC parties evaluate.

The model owner's process reads its model file (with the project's safe loader) and
rewrites it as ``linear → activation → linear → … → linear`` with the HE plan's layer
reader (:mod:`modelshield.crypto.he.plan`). A Conv2d stays a convolution (its kernel,
evaluated on im2col patches, with a following BatchNorm folded in); every other run of
linear layers between two activations (Linear, average pooling, flatten, BatchNorm in
eval mode, dropout, convolutions im2col cannot read such as grouped ones) collapses into
one affine map read off the layers themselves (``W = f(I) - f(0)``), as in the HE plan.

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

from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

SUPPORTED = (
    "Linear, Conv2d (im2col), AvgPool2d / AdaptiveAvgPool2d, Flatten/view, BatchNorm "
    "(eval mode, folded), Dropout, ReLU (secure comparison), square / PolyAct polynomials"
)


@dataclass
class Layer:
    """One step: ``affine`` (``w``: in × out, ``b``: out), ``conv``, ``relu`` or ``poly``.

    A ``conv`` layer keeps the kernel as ``w`` (in_channels·kh·kw × out_channels) and its
    geometry in ``conv`` (``in_shape``, ``kernel``, ``stride``, ``padding``, ``dilation``,
    ``out_shape``): it is evaluated as im2col patches (a public rearrangement) times the
    shared kernel, so only the kernel is shared, not the unrolled matrix.
    """

    kind: str
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    coeffs: tuple[float, float, float] | None = None
    conv: dict[str, list[int]] | None = None

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(w, b) of an affine or conv layer; a layer without them is malformed."""
        if self.w is None or self.b is None:
            raise UnsupportedModelError(f"a {self.kind} layer without weights and bias")
        return self.w, self.b

    def spec(self) -> dict[str, Any]:
        """The public description of this layer (kind and shape, or the polynomial)."""
        if self.kind in ("affine", "conv"):
            w, _ = self.weights()
            d = {"kind": self.kind, "in": int(w.shape[0]), "out": int(w.shape[1])}
            return {**d, **(self.conv or {})}
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
        last = next(s for s in reversed(self.layers) if s["kind"] in ("affine", "conv"))
        return int(np.prod(last["out_shape"])) if last["kind"] == "conv" else int(last["out"])

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
                w, b = la.weights()
                h = h @ w + b
            elif la.kind == "conv":
                w, b = la.weights()
                if la.conv is None:
                    raise UnsupportedModelError("a conv layer without its geometry")
                idx, pad = im2col_index(la.conv)
                n = len(h)
                hp = np.concatenate([h, np.zeros((n, 1))], axis=1) if pad else h
                cols = hp[:, idx].reshape(n * idx.shape[0], -1) @ w + b
                h = cols.reshape(n, idx.shape[0], -1).transpose(0, 2, 1).reshape(n, -1)
            elif la.kind == "relu":
                h = np.maximum(h, 0.0)
            else:
                a0, a1, a2 = la.coeffs or (0.0, 0.0, 1.0)
                peak = max(peak, float(np.abs(h * h).max()) if h.size else 0.0)
                h = a0 + a1 * h + a2 * h * h
            peak = max(peak, float(np.abs(h).max()) if h.size else 0.0)
        return h, peak


def im2col_index(geom: dict[str, list[int]]) -> tuple[np.ndarray, bool]:
    """Flat input indices of every patch: ``(out_h·out_w, c·kh·kw)``, channel-major.

    Positions in the zero padding point at index ``c·h·w`` (one zero column appended to
    the input); the second value says whether any does.
    """
    c, h, w = geom["in_shape"]
    kh, kw = geom["kernel"]
    sh, sw = geom["stride"]
    ph, pw = geom["padding"]
    dh, dw = geom["dilation"]
    _, oh, ow = geom["out_shape"]
    cg, kig, kjg = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
    ci, ki, kj = cg.reshape(1, -1), kig.reshape(1, -1), kjg.reshape(1, -1)
    oig, ojg = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    rows = oig.reshape(-1, 1) * sh - ph + ki * dh
    cols = ojg.reshape(-1, 1) * sw - pw + kj * dw
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    idx = ci * h * w + np.clip(rows, 0, h - 1) * w + np.clip(cols, 0, w - 1)
    idx = np.where(inside, idx, c * h * w)
    return idx.astype(np.int64), bool((~inside).any())


def _conv_params(step: Any) -> dict[str, Any] | None:
    """Weight, bias and geometry of a Conv2d step (module, TorchScript or aten), else None."""
    fn = step.fn
    tname = getattr(fn, "original_name", None) or type(fn).__name__
    try:
        if tname == "Conv2d":
            w, b = fn.weight, fn.bias
            stride, padding, dilation = fn.stride, fn.padding, fn.dilation
            groups = fn.groups
            if getattr(fn, "padding_mode", "zeros") != "zeros":
                return None
        elif step.name in ("aten.conv2d.default", "aten.convolution.default") and fn.__closure__:
            names, cells = fn.__code__.co_freevars, fn.__closure__
            free = {n: c.cell_contents for n, c in zip(names, cells, strict=True)}
            args, env = free["args"], free["env"]
            vals = [env[a] if isinstance(a, torch.fx.Node) else a for a in args]
            w, b = vals[1], vals[2] if len(vals) > 2 else None
            stride, padding, dilation = (
                vals[3 + i] if len(vals) > 3 + i else d for i, d in enumerate((1, 0, 1))
            )
            if step.name == "aten.convolution.default":
                if vals[6]:  # transposed
                    return None
                groups = vals[8]
            else:
                groups = vals[6] if len(vals) > 6 else 1
        else:
            return None
        if groups != 1 or isinstance(padding, str) or not isinstance(w, torch.Tensor):
            return None

        def pair(v: Any) -> list[int]:
            t = list(v) if isinstance(v, (list, tuple)) else [v]
            return [int(t[0]), int(t[-1])]

        return {
            "w": w.detach().double(),
            "b": None if b is None else b.detach().double(),
            "stride": pair(stride),
            "padding": pair(padding),
            "dilation": pair(dilation),
        }
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return None


def compile_model(
    module: nn.Module, input_shape: Sequence[int], *, tolerance: float = 1e-3, seed: int = 0
) -> MPCModel:
    """Rewrite ``module`` (eval mode) as an :class:`MPCModel`.

    The layer list, evaluated in float64, is checked against the module's own outputs on
    random inputs (relative error ≤ ``tolerance``) before it is returned.
    """
    from modelshield.crypto.layers import read_steps, trim_outputs

    shape = tuple(int(s) for s in input_shape)
    g = torch.Generator().manual_seed(seed)
    probe = torch.rand((64, *shape), generator=g)
    module.eval()
    steps, output = trim_outputs(read_steps(module, probe))
    if output != "identity":
        notes = [f"trailing {output} dropped: it does not change the argmax"]
    else:
        notes = []
    with torch.no_grad():
        ref = module(probe).double().reshape(len(probe), -1)

    def agrees(model: MPCModel) -> bool:
        with torch.no_grad():
            mine = torch.from_numpy(model.forward(probe.double().numpy()))
        if output == "sigmoid":
            mine = torch.sigmoid(mine)
        elif output == "softmax":
            mine = torch.softmax(mine, 1)
        elif output == "relu":
            mine = mine.clamp_min(0)
        bound = tolerance * max(1.0, float(ref.abs().max()))
        return mine.shape == ref.shape and torch.allclose(mine, ref, rtol=tolerance, atol=bound)

    model = MPCModel(shape, _layers(steps, shape, convolutions=True), output, notes)
    if not agrees(model) and any(la.kind == "conv" for la in model.layers):
        logger.debug("im2col reading of the convolutions disagrees; using unrolled matrices")
        model = MPCModel(shape, _layers(steps, shape, convolutions=False), output, notes)
    if not agrees(model):
        raise UnsupportedModelError(
            "the model's forward is not the plain sequence of its layers (e.g. a residual "
            f"connection or a functional op in forward): supported are {SUPPORTED}, in sequence"
        )
    return model


def _layers(steps: list[Any], shape: tuple[int, ...], *, convolutions: bool) -> list[Layer]:
    """Group the steps into layers: linear runs become conv (+ folded per-channel affine
    maps such as BatchNorm) and/or one dense affine map; activations stay."""
    from modelshield.crypto.layers import Step, dense_affine, to_double

    layers: list[Layer] = []
    run: list[Any] = []
    cur: tuple[int, ...] = shape

    def double(steps: list[Any]) -> list[Any]:
        return [Step(s.kind, s.name, to_double(s.fn)) for s in steps]

    def flush() -> None:
        nonlocal cur, run
        rest = run
        params = _conv_params(run[0]) if convolutions and run and len(cur) == 3 else None
        if params is not None:
            conv, cur = _conv_layer(params, cur)
            rest = run[1:]
            while rest and _fold_channel_affine(conv, double(rest[:1]), cur):
                rest = rest[1:]
            layers.append(conv)
        if rest:
            aff, cur = dense_affine(double(rest), cur)
            d = aff.w.shape[1]
            if not (aff.w.shape[0] == d and np.array_equal(aff.w, np.eye(d)) and not aff.b.any()):
                layers.append(Layer("affine", np.ascontiguousarray(aff.w.T), aff.b))
        run = []

    for i, s in enumerate(steps):
        if s.kind == "linear":
            run.append(s)
            continue
        flush()
        if not layers or layers[-1].kind not in ("affine", "conv"):
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
    if not layers or layers[-1].kind not in ("affine", "conv"):
        raise UnsupportedModelError("the model must end with a Linear or Conv2d layer")
    return layers


def _conv_layer(params: dict[str, Any], in_shape: tuple[int, ...]) -> tuple[Layer, tuple[int, ...]]:
    w = params["w"]
    out_c, in_c, kh, kw = (int(v) for v in w.shape)
    c, h, wd = in_shape
    if in_c != c:
        raise UnsupportedModelError(f"a Conv2d expects {in_c} channels, the input has {c}")
    (sh, sw), (ph, pw), (dh, dw) = params["stride"], params["padding"], params["dilation"]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    geom = {
        "in_shape": [c, h, wd], "kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw],
        "dilation": [dh, dw], "out_shape": [out_c, oh, ow],
    }  # fmt: skip
    b = params["b"]
    bias = np.zeros(out_c) if b is None else b.numpy().astype(np.float64)
    kernel = np.ascontiguousarray(w.reshape(out_c, -1).numpy().T.astype(np.float64))
    return Layer("conv", kernel, bias.copy(), conv=geom), (out_c, oh, ow)


def _fold_channel_affine(conv: Layer, steps: list[Any], shape: tuple[int, ...]) -> bool:
    """Fold a per-channel affine step (BatchNorm in eval mode, dropout) into ``conv``."""
    from modelshield.crypto.layers import run_steps

    c = shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *shape), generator=g, dtype=torch.float64)
    try:
        with torch.no_grad():
            zero = run_steps(steps, torch.zeros((1, *shape), dtype=torch.float64))
            one = run_steps(steps, torch.ones((1, *shape), dtype=torch.float64))
            y = run_steps(steps, x)
    except Exception:
        return False
    if tuple(y.shape) != tuple(x.shape):
        return False
    b = zero[0, :, 0, 0]
    a = one[0, :, 0, 0] - b
    tol = 1e-6 * max(1.0, float(y.abs().max()))  # float32 steps (TorchScript) are exact to ~1e-7
    if not torch.allclose(y, x * a.view(1, c, 1, 1) + b.view(1, c, 1, 1), atol=tol, rtol=1e-6):
        return False
    w, bias = conv.weights()
    av, bv = a.numpy(), b.numpy()
    conv.w = w * av.reshape(1, c)
    conv.b = bias * av + bv
    return True


def load_mpc_model(
    path: str,
    input_shape: Sequence[int] | None,
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> tuple[MPCModel, nn.Module]:
    """Load a model file with the project's safe loader and compile it for MPC."""
    from modelshield.core.loading import load_model

    opts: dict[str, Any] = dict(
        trust_pickle=trust_pickle,
        arch=arch,
        input_shape=tuple(input_shape) if input_shape else None,
        device="cpu",
    )
    try:
        loaded = load_model(path, **opts)
    except InvalidConfigError as e:
        # one output (a logit, or a sigmoid MPC drops): the classifier wrapper wants two
        # classes, while the layer reader below takes the model's real output size
        if arch or not str(e).endswith("num_classes must be an integer >= 2, got 1"):
            raise
        loaded = load_model(path, num_classes=2, **opts)
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
