"""Compile a trained torch model into an encrypted-inference plan.

The plan is the model rewritten as ``affine → square → affine → … → affine`` on flat
vectors, the form CKKS evaluates with the least depth (one level per affine layer, one
per square). Every run of linear layers between two activations (Conv2d, Linear, average
pooling, flatten, BatchNorm in eval mode, dropout) is collapsed into one dense affine map
read off the layers themselves (``W = f(I) - f(0)``, ``b = f(0)``): BatchNorm is thereby
folded into its neighbours and a convolution becomes its unrolled (im2col / Toeplitz)
matrix, as in the TenSEAL encrypted-MNIST tutorial and CryptoNets (Gilad-Bachrach et al.
2016). Activations are degree-2 polynomials: square is exact; ReLU and sigmoid are
replaced by the least-squares quadratic over the observed input range (as in
CryptoNets / Hesamifard et al. 2017), and a trainable :class:`~.train.PolyAct` keeps its
learnt coefficients. ``a2·z² + a1·z + a0`` is folded into the layers around a pure square
(``a2 (z + a1/2a2)² + const``), so each activation costs one level.

Trailing sigmoid / softmax / ReLU are monotone (or argmax-neutral) output maps: the
client applies them after decryption. Anything else is refused with the layer named.
"""

from __future__ import annotations

import json
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_open, atomic_write_json

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
MAX_AFFINE_ENTRIES = 8_000_000
"""Refuse a collapsed affine map larger than this (memory, and HE cost grows with it)."""

SUPPORTED = (
    "Linear, Conv2d (im2col), AvgPool2d / AdaptiveAvgPool2d, Flatten/view, BatchNorm "
    "(eval mode, folded), Dropout, and square / ReLU / sigmoid / PolyAct activations"
)

_HINTS = {
    "max_pool": "replace max pooling by average pooling and retrain",
    "maxpool": "replace max pooling by average pooling and retrain",
    "tanh": "replace tanh by ReLU or a PolyAct (see 'modelshield.crypto.he.train') and retrain",
    "gelu": "replace GELU by a PolyAct (see 'modelshield.crypto.he.train') and fine-tune",
    "add": "residual connections are not supported: use a plain sequential model",
    "cat": "concatenations are not supported: use a plain sequential model",
    "layer_norm": "layer normalisation divides by a data-dependent norm; use BatchNorm",
    "batch_norm": "export the model in eval mode so BatchNorm uses its running statistics",
}


def _refuse(index: int, name: str) -> UnsupportedModelError:
    hint = next((h for k, h in _HINTS.items() if k in name.lower()), None)
    hint = hint or f"supported layers are {SUPPORTED}"
    return UnsupportedModelError(
        f"layer {index} ({name}) is not supported in encrypted inference: {hint}"
    )


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class Affine:
    """``y = W x + b`` on flat vectors (``W``: out × in)."""

    w: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.w.shape[0]), int(self.w.shape[1])


@dataclass
class Plan:
    """Encrypted-inference plan: ``layers`` alternate Affine and the string ``"square"``.

    ``activations`` records what each square stands for (kind, fitted coefficients and
    range); ``output`` is the map the client applies after decryption (``"identity"``,
    ``"sigmoid"``, ``"softmax"``, ``"relu"``).
    """

    input_shape: tuple[int, ...]
    layers: list[Affine | str]
    activations: list[dict[str, Any]] = field(default_factory=list)
    output: str = "identity"
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    max_abs: list[float] = field(default_factory=list)
    """Largest |value| seen after each layer on the calibration data (for the scale)."""

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_outputs(self) -> int:
        return self.affines[-1].shape[0]

    @property
    def affines(self) -> list[Affine]:
        return [layer for layer in self.layers if isinstance(layer, Affine)]

    @property
    def depth(self) -> int:
        """Multiplicative depth: one level per affine layer and per square."""
        return len(self.layers)

    def check_input(self, x: np.ndarray | Tensor) -> np.ndarray:
        """``x`` as a float64 (n, input_dim) array; wrong shapes raise :class:`DataError`."""
        a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if a.ndim >= 1 and tuple(a.shape[1:]) == self.input_shape:
            a = a.reshape(a.shape[0], -1)
        elif not (a.ndim == 2 and a.shape[1] == self.input_dim):
            raise DataError(
                f"inputs have shape {tuple(a.shape)}; this plan takes (n, "
                f"{', '.join(map(str, self.input_shape))}) or (n, {self.input_dim})"
            )
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise DataError("inputs contain NaN or infinite values")
        return a

    def forward(self, x: np.ndarray | Tensor) -> np.ndarray:
        """Plaintext evaluation of the plan (the reference the ciphertexts must match)."""
        h = self.check_input(x)
        for layer in self.layers:
            h = h @ layer.w.T + layer.b if isinstance(layer, Affine) else h * h
        return h

    def summary(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "input_shape": list(self.input_shape),
            "layers": [
                {"type": "affine", "in": layer.shape[1], "out": layer.shape[0]}
                if isinstance(layer, Affine)
                else {"type": "square"}
                for layer in self.layers
            ],
            "depth": self.depth,
            "num_outputs": self.num_outputs,
            "activations": self.activations,
            "output": self.output,
            "notes": self.notes,
            "source": self.source,
            "max_abs": self.max_abs,
        }

    def save(self, out: str | Path) -> Path:
        """Write ``plan.json`` and ``weights.npz`` (no pickle) into ``out``."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.affines):
            arrays[f"w{i}"], arrays[f"b{i}"] = layer.w, layer.b
        with atomic_open(d / "weights.npz", "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        atomic_write_json(d / "plan.json", self.summary())  # last: marks the plan complete
        return d


def load_plan(path: str | Path) -> Plan:
    """Read a plan directory written by :meth:`Plan.save`."""
    d = Path(path)
    if not (d / "plan.json").is_file() or not (d / "weights.npz").is_file():
        raise InvalidConfigError(
            f"--plan {d} is not a plan directory (no plan.json and weights.npz); "
            "make one with 'modelshield he compile'"
        )
    try:
        meta = json.loads((d / "plan.json").read_text())
        with np.load(d / "weights.npz", allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InvalidConfigError(f"plan {d} is unreadable: {exc}") from exc
    if meta.get("version") != PLAN_VERSION:
        raise InvalidConfigError(f"plan {d} has version {meta.get('version')}; want {PLAN_VERSION}")
    layers: list[Affine | str] = []
    k = 0
    for spec in meta["layers"]:
        if spec["type"] == "affine":
            layers.append(Affine(weights[f"w{k}"], weights[f"b{k}"]))
            k += 1
        else:
            layers.append("square")
    return Plan(
        input_shape=tuple(meta["input_shape"]),
        layers=layers,
        activations=meta.get("activations", []),
        output=meta.get("output", "identity"),
        notes=meta.get("notes", []),
        source=meta.get("source", {}),
        max_abs=meta.get("max_abs", []),
    )


def apply_output(plan: Plan, logits: np.ndarray) -> np.ndarray:
    """The output map the client applies after decryption."""
    if plan.output == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))
    if plan.output == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    if plan.output == "relu":
        return np.maximum(logits, 0.0)
    return logits


def predict_labels(plan: Plan, logits: np.ndarray) -> np.ndarray:
    """Class labels: argmax, or a threshold for a single-output (logistic) model."""
    if logits.shape[1] == 1:
        thresh = 0.5 if plan.output == "sigmoid" else 0.0
        return (apply_output(plan, logits)[:, 0] > thresh).astype(np.int64)
    return np.asarray(apply_output(plan, logits).argmax(axis=1))


# --------------------------------------------------------------------------------------
# Reading a model as a sequence of steps
# --------------------------------------------------------------------------------------


@dataclass
class _Step:
    kind: str  # "linear" | "square" | "relu" | "sigmoid" | "poly" | "softmax"
    name: str
    fn: Callable[[Tensor], Tensor]
    coeffs: tuple[float, float, float] | None = None


_LINEAR_MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Identity,
)
_LINEAR_NAMES = {t.__name__ for t in _LINEAR_MODULES}


def _module_step(i: int, m: Any, name: str) -> _Step:
    tname = getattr(m, "original_name", None) or type(m).__name__
    if tname in ("BatchNorm1d", "BatchNorm2d") and getattr(m, "training", False):
        raise _refuse(i, f"{tname} in training mode (batch_norm)")
    if tname in _LINEAR_NAMES:
        return _Step("linear", f"{name} ({tname})", m)
    if tname == "ReLU":
        return _Step("relu", f"{name} (ReLU)", torch.relu)
    if tname == "Sigmoid":
        return _Step("sigmoid", f"{name} (Sigmoid)", torch.sigmoid)
    if tname in ("Softmax", "LogSoftmax"):
        return _Step("softmax", f"{name} ({tname})", m)
    if tname == "Square":
        return _Step("square", f"{name} (Square)", lambda t: t * t)
    if tname == "PolyAct":
        c = [float(v) for v in m.coeffs.detach().cpu().reshape(-1)]
        if len(c) != 3:
            raise _refuse(i, f"{name} (PolyAct of degree {len(c) - 1}; degree 2 only)")
        return _Step("poly", f"{name} (PolyAct)", m, (c[0], c[1], c[2]))
    raise _refuse(i, f"{name} ({tname})")


def _children_steps(module: Any) -> list[_Step]:
    """Leaf modules in registration order (a Sequential, possibly nested; TorchScript too)."""
    leaves: list[tuple[str, Any]] = []

    def walk(m: Any, prefix: str) -> None:
        kids = list(m.named_children())
        tname = getattr(m, "original_name", None) or type(m).__name__
        if not kids or tname in ("PolyAct", "Square") or tname in _LINEAR_NAMES:
            leaves.append((prefix or tname, m))
            return
        for n, c in kids:
            walk(c, f"{prefix}.{n}" if prefix else n)

    walk(module, "")
    return [_module_step(i, m, n) for i, (n, m) in enumerate(leaves)]


_ATEN_LINEAR = {
    "aten.linear.default",
    "aten.conv2d.default",
    "aten.convolution.default",
    "aten.avg_pool2d.default",
    "aten.adaptive_avg_pool2d.default",
    "aten._adaptive_avg_pool2d.default",
    "aten.mean.dim",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.batch_norm.default",
    "aten.dropout.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.alias.default",
    "aten.detach.default",
}
_ATEN_RESHAPE = {
    "aten.flatten.using_ints",
    "aten.view.default",
    "aten.reshape.default",
    "aten._unsafe_view.default",
}


def _graph_steps(gm: torch.fx.GraphModule, example: Tensor) -> list[_Step]:
    """The data path of an exported (aten) graph as steps; weights are read as constants."""
    env: dict[torch.fx.Node, Any] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            env[n] = out
            return out

    with torch.no_grad():
        _Rec(gm).run(example)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model takes {len(placeholders)} inputs; want one")
    chain: set[torch.fx.Node] = {placeholders[0]}
    steps: list[_Step] = []
    cur = placeholders[0]
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            continue
        if n.op == "output":
            break
        deps = [a for a in n.all_input_nodes if a in chain]
        if not deps or not n.users:
            continue  # a weight transform (t, expand...), or a guard / assert nobody reads
        name = str(n.target)
        if name.startswith(("aten.sym_size", "aten.sym_numel", "aten.sym_stride")):
            continue  # a shape read: reshapes are replayed from the recorded shapes
        if n.target is operator.getitem:
            if n.args[0] is cur and isinstance(env[cur], (tuple, list)):
                idx = int(n.args[1])
                steps.append(_Step("linear", "getitem", lambda t, idx=idx: t[idx]))  # type: ignore[misc]
                chain.add(n)
                cur = n
                continue
            raise _refuse(len(steps), name)
        if deps != [cur] and not (name == "aten.mul.Tensor" and n.args[0] is n.args[1] is cur):
            raise _refuse(len(steps), f"{name}: it combines several tensors (e.g. a residual add)")
        chain.add(n)
        cur = n
        idx = len(steps)
        if name in ("aten.relu.default", "aten.relu_.default"):
            steps.append(_Step("relu", name, torch.relu))
        elif name == "aten.sigmoid.default":
            steps.append(_Step("sigmoid", name, torch.sigmoid))
        elif name in ("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int",
                      "aten._log_softmax.default"):  # fmt: skip
            steps.append(_Step("softmax", name, lambda t: torch.softmax(t, dim=-1)))
        elif (name == "aten.mul.Tensor" and n.args[0] is n.args[1]) or (
            name in ("aten.pow.Tensor_Scalar", "aten.square.default")
            and (name == "aten.square.default" or n.args[1] == 2)
        ):
            steps.append(_Step("square", name, lambda t: t * t))
        elif name in _ATEN_RESHAPE:
            tail = tuple(int(s) for s in env[n].shape[1:])
            steps.append(_Step("linear", name, lambda t, tail=tail: t.reshape(t.shape[0], *tail)))  # type: ignore[misc]
        elif name in _ATEN_LINEAR:
            fn = _aten_call(n.target, n.args, dict(n.kwargs), chain, env)
            if name == "aten.dropout.default" and len(n.args) > 2 and n.args[2]:
                raise _refuse(idx, "dropout in training mode: export the model in eval mode")
            steps.append(_Step("linear", name, fn))
        else:
            raise _refuse(idx, name)
    return steps


def _aten_call(
    target: Any, args: Any, kwargs: dict[str, Any], chain: set[Any], env: dict[Any, Any]
) -> Callable[[Tensor], Tensor]:
    """``target(*args)`` with the data-path argument replaced by the step's input."""

    def fn(t: Tensor) -> Any:
        def sub(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                if a in chain:
                    return t
                v = env[a]  # weights follow the data's dtype (float64 when collapsing)
                return v.to(t.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            if isinstance(a, (list, tuple)):
                return type(a)(sub(v) for v in a)
            return a

        return target(*sub(args), **{k: sub(v) for k, v in kwargs.items()})

    return fn


def _steps(module: nn.Module, example: Tensor) -> list[_Step]:
    from modelshield.core.loading import _ExportedModule

    if isinstance(module, _ExportedModule):
        module = module.program
    if isinstance(module, torch.fx.GraphModule):
        return _graph_steps(module, example)
    if isinstance(module, torch.jit.ScriptModule):
        return _children_steps(module)
    if isinstance(module, nn.Sequential) or not list(module.children()):
        return _children_steps(module)
    try:
        ep = torch.export.export(module.eval(), (example,))
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot read the model's layers ({type(exc).__name__}); "
            "give an nn.Sequential, a TorchScript Sequential or a torch.export .pt2 file"
        ) from exc
    return _graph_steps(ep.module(), example)  # type: ignore[arg-type]


def _run_steps(steps: Sequence[_Step], x: Tensor) -> Tensor:
    h: Any = x
    for s in steps:
        h = s.fn(h)
    return h  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------


def fit_quadratic(
    kind: str, z: np.ndarray, grid: int = 256
) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """Least-squares quadratic for ReLU / sigmoid over the observed range of ``z``.

    The fit weighs the observed values and an even grid over ``[min z, max z]`` equally,
    so it is accurate where the data is and bounded over the whole range (CryptoNets-style
    polynomial replacement, Hesamifard et al. 2017). Returns ((a0, a1, a2), (lo, hi)).
    """
    z = z.reshape(-1).astype(np.float64)
    if z.size > 20000:
        z = np.random.default_rng(0).choice(z, 20000, replace=False)
    lo, hi = float(z.min()), float(z.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    pts = np.linspace(lo, hi, grid)
    wts = np.concatenate([np.full(z.size, 0.5 / z.size), np.full(grid, 0.5 / grid)])
    xs = np.concatenate([z, pts])
    ys = np.maximum(xs, 0.0) if kind == "relu" else 1.0 / (1.0 + np.exp(-xs))
    a = np.stack([np.ones_like(xs), xs, xs * xs], axis=1) * np.sqrt(wts)[:, None]
    coef, *_ = np.linalg.lstsq(a, ys * np.sqrt(wts), rcond=None)
    return (float(coef[0]), float(coef[1]), float(coef[2])), (lo, hi)


def _affine_of(steps: Sequence[_Step], in_shape: tuple[int, ...]) -> tuple[Affine, tuple[int, ...]]:
    """The dense affine map of a run of linear steps (``W = f(I) - f(0)``, ``b = f(0)``)."""
    d = int(np.prod(in_shape))
    with torch.no_grad():
        zero = _run_steps(steps, torch.zeros((1, *in_shape), dtype=torch.float64))
        out_shape = tuple(int(s) for s in zero.shape[1:])
        out_dim = int(np.prod(out_shape))
        if out_dim * d > MAX_AFFINE_ENTRIES:
            raise UnsupportedModelError(
                f"the layers {', '.join(s.name for s in steps)} collapse to a {out_dim}×{d} "
                f"matrix (over {MAX_AFFINE_ENTRIES:,} entries): use a smaller model or put "
                "convolutions first, where the input is small"
            )
        cols = []
        for start in range(0, d, 1024):
            eye = torch.eye(d, dtype=torch.float64)[start : start + 1024]
            cols.append(_run_steps(steps, eye.reshape(-1, *in_shape)).reshape(eye.shape[0], -1))
        w = (torch.cat(cols) - zero.reshape(1, -1)).T.numpy()
    return Affine(np.ascontiguousarray(w), zero.reshape(-1).numpy().copy()), out_shape


def compile_model(
    module: nn.Module,
    input_shape: Sequence[int],
    calibration: Tensor | None = None,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    source: dict[str, Any] | None = None,
    tolerance: float = 1e-3,
) -> Plan:
    """Compile ``module`` (eval mode) into a :class:`Plan`.

    ``calibration`` (a batch of typical inputs) sets the range each ReLU / sigmoid is
    fitted over and the value range the CKKS scale must hold; without it, uniform random
    inputs in ``bounds`` are used. The plan, run with exact activations, is checked to
    reproduce the model's outputs (relative error ≤ ``tolerance``) before it is returned.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise InvalidConfigError(f"input_shape must be positive dims, got {input_shape}")
    if calibration is None:
        g = torch.Generator().manual_seed(0)
        lo, hi = bounds
        calibration = lo + (hi - lo) * torch.rand((256, *shape), generator=g)
    calibration = calibration.detach().cpu().float()
    if tuple(calibration.shape[1:]) != shape:
        raise DataError(
            f"calibration inputs have shape {tuple(calibration.shape[1:])}; want {shape}"
        )
    from modelshield.core.loading import _ExportedModule

    module.eval()
    batch: int | None = None
    if isinstance(module, _ExportedModule) and module.batch_size:
        batch = int(module.batch_size)
    if batch is None:
        example = calibration[:2]
    elif len(calibration) >= batch:
        example = calibration[:batch]
    else:
        example = calibration[:1].expand(batch, *shape).clone()
    steps = _steps(module, example)
    with torch.no_grad():
        ref = module(calibration).double()
        seq = _run_steps(steps, calibration).double()
    if seq.shape != ref.shape or not torch.allclose(
        seq, ref, rtol=tolerance, atol=tolerance * max(1.0, float(ref.abs().max()))
    ):
        raise UnsupportedModelError(
            "the model's forward is not the plain sequence of its layers (e.g. a residual "
            f"connection or a functional op in forward): supported are {SUPPORTED}, in sequence"
        )
    # float64 copies of the layers, so the collapsed maps are exact to double precision
    steps64 = [
        _Step(s.kind, s.name, _to_double(s.fn), s.coeffs) if s.kind == "linear" else s
        for s in steps
    ]
    return _build(steps64, shape, calibration.double(), source or {})


def _to_double(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if isinstance(fn, nn.Module) and not isinstance(fn, torch.jit.ScriptModule):
        import copy

        m = copy.deepcopy(fn).double()
        return m  # type: ignore[no-any-return]

    def run(t: Tensor) -> Tensor:
        if isinstance(fn, torch.jit.ScriptModule):
            return fn(t.float()).double()  # type: ignore[no-any-return]
        try:
            return fn(t)
        except RuntimeError:  # float32 weights in an aten call: run in float32
            return fn(t.float()).double()

    return run


def _build(
    steps: list[_Step], shape: tuple[int, ...], calib: Tensor, source: dict[str, Any]
) -> Plan:
    # trailing output maps (applied by the client after decryption)
    output = "identity"
    while steps and steps[-1].kind in ("sigmoid", "softmax", "relu") and output == "identity":
        output = {"sigmoid": "sigmoid", "softmax": "softmax", "relu": "relu"}[steps[-1].kind]
        steps = steps[:-1]
    if any(s.kind == "softmax" for s in steps):
        i = next(i for i, s in enumerate(steps) if s.kind == "softmax")
        raise _refuse(i, f"{steps[i].name}: softmax is only allowed as the last layer")
    groups: list[list[_Step]] = []
    for i, s in enumerate(steps):
        if s.kind == "linear":
            if groups and groups[-1][0].kind == "linear":
                groups[-1].append(s)
            else:
                groups.append([s])
        else:
            if not groups or groups[-1][0].kind != "linear":
                raise _refuse(i, f"{s.name}: an activation must follow a linear layer")
            groups.append([s])
    if not groups or groups[-1][0].kind != "linear":
        raise UnsupportedModelError("the model has no linear layer to end with")
    layers: list[Affine | str] = []
    acts: list[dict[str, Any]] = []
    notes: list[str] = []
    max_abs: list[float] = [float(calib.abs().max())]
    cur_shape = shape
    h = calib
    pending: tuple[float, float] | None = None  # activation to fold into next affine
    for g in groups:
        if g[0].kind == "linear":
            aff, cur_shape = _affine_of(g, cur_shape)
            if pending is not None:  # next layer absorbs sign·u + d of the previous square
                sign, d = pending[0], pending[1]
                aff = Affine(aff.w * sign, aff.b + d * aff.w.sum(axis=1))
                pending = None
            h = h.reshape(h.shape[0], -1)
            layers.append(aff)
            z = h.numpy() @ aff.w.T + aff.b
            h = torch.from_numpy(z)
            max_abs.append(float(np.abs(z).max()))
            continue
        s = g[0]
        last = layers[-1] if layers else None
        if not isinstance(last, Affine):
            raise UnsupportedModelError(
                f"{s.name}: an activation must follow a linear or convolutional layer (not the "
                "input or another activation); put a Linear or Conv2d layer before it"
            )
        z = h.numpy()
        info: dict[str, Any] = {"layer": s.name, "kind": s.kind}
        if s.kind == "square":
            a0, a1, a2 = 0.0, 0.0, 1.0
        elif s.kind == "poly":
            assert s.coeffs is not None
            a0, a1, a2 = s.coeffs
        else:
            (a0, a1, a2), (lo, hi) = fit_quadratic(s.kind, z)
            info["range"] = [lo, hi]
            exact = np.maximum(z, 0) if s.kind == "relu" else 1 / (1 + np.exp(-z))
            info["fit_max_error"] = float(np.abs(a0 + a1 * z + a2 * z * z - exact).max())
            notes.append(
                f"{s.name}: {s.kind} replaced by the fitted polynomial "
                f"{a0:.4g} + {a1:.4g}·x + {a2:.4g}·x² over the observed range [{lo:.3g}, {hi:.3g}]"
            )
        info["coeffs"] = [a0, a1, a2]
        acts.append(info)
        if abs(a2) < 1e-12:
            raise _refuse(
                len(layers), f"{s.name}: a polynomial of degree < 2 (fold it into the layers)"
            )
        sc = math.sqrt(abs(a2))
        shift = a1 / (2 * a2)
        layers[-1] = Affine(last.w * sc, (last.b + shift) * sc)
        layers.append("square")
        pending = (math.copysign(1.0, a2), a0 - a1 * a1 / (4 * a2))
        u = (z + shift) * sc
        h = torch.from_numpy(u * u)
        max_abs[-1] = float(np.abs(u).max())
        max_abs.append(float(np.abs(u * u).max()))
    if pending is not None:
        raise UnsupportedModelError("the model ends with an activation the plan cannot absorb")
    return Plan(
        input_shape=shape,
        layers=layers,
        activations=acts,
        output=output,
        notes=notes,
        source=source,
        max_abs=max_abs,
    )


def model_forward_np(module: nn.Module, x: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """The torch model's outputs on flat inputs ``x`` (the plaintext reference)."""
    with torch.no_grad():
        t = torch.from_numpy(x.reshape(-1, *input_shape)).float()
        return module.eval()(t).double().numpy()  # type: ignore[no-any-return]
