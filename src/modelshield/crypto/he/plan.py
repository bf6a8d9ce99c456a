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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.crypto.layers import (
    SUPPORTED,
    Affine,
    Step,
    dense_affine,
    read_steps,
    refuse,
    run_steps,
    to_double,
    trim_outputs,
)

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


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
    fidelity: dict[str, Any] = field(default_factory=dict)
    """How closely the plan (with its fitted activations) follows the model on the
    calibration inputs; empty when every activation is exact (square, PolyAct)."""

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
            "fidelity": self.fidelity,
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
        fidelity=meta.get("fidelity", {}),
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


def _exact_activation(kind: str, z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0) if kind == "relu" else 1.0 / (1.0 + np.exp(-z))


SHIFT_BOUND = 2.0
"""A fitted ``a2 (z + a1/2a2)² + d`` keeps ``|a1/2a2| ≤ SHIFT_BOUND · max|z|``, so the square
works on values of the data's own magnitude (a large shift would cancel catastrophically
under CKKS's absolute noise)."""


def fit_quadratic_units(
    kind: str,
    z: np.ndarray,
    target: np.ndarray | None = None,
    *,
    grid: int = 64,
    grid_weight: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-unit least-squares quadratics ``a0 + a1 z + a2 z²`` for ReLU / sigmoid.

    ``z`` (n, units) are the pre-activations the encrypted plan computes on calibration
    data; ``target`` (default: the exact activation of ``z``) what the model computes
    there. Fitting the model's own activations on the plan's pre-activations corrects the
    drift earlier polynomial layers introduce (a calibration-based fit in the spirit of
    CryptoNets / Hesamifard et al. 2017, one polynomial per neuron rather than one per
    layer, since neurons' ranges differ by orders of magnitude). A share ``grid_weight``
    of each unit's fit goes to an even grid over its observed range, so the polynomial
    stays close to the activation between the data points. Returns (a0, a1, a2), each of
    shape (units,); ``a2`` is never 0 (a degree-2 term is what a square level computes).
    """
    z = np.asarray(z, dtype=np.float64)
    z = z.reshape(z.shape[0], -1)
    t = _exact_activation(kind, z) if target is None else np.asarray(target, np.float64)
    t = t.reshape(z.shape)
    n = z.shape[0]
    lo, hi = z.min(axis=0), z.max(axis=0)
    span = np.maximum(hi - lo, 1e-6)
    pts = lo[None, :] + span[None, :] * np.linspace(0.0, 1.0, grid)[:, None]
    xs = np.concatenate([z, pts])
    ys = np.concatenate([t, _exact_activation(kind, pts)])
    w = np.concatenate([np.full(n, (1 - grid_weight) / n), np.full(grid, grid_weight / grid)])
    # standardise per unit for a well-conditioned 3×3 system, fit, map back
    m = (w[:, None] * xs).sum(axis=0)
    sd = np.sqrt((w[:, None] * (xs - m) ** 2).sum(axis=0))
    sd = np.maximum(sd, 1e-6)
    u = (xs - m) / sd
    basis = np.stack([np.ones_like(u), u, u * u], axis=-1)  # (rows, units, 3)
    gram = np.einsum("r,ruk,rul->ukl", w, basis, basis) + 1e-10 * np.eye(3)
    rhs = np.einsum("r,ruk,ru->uk", w, basis, ys)
    c = np.linalg.solve(gram, rhs[..., None])[..., 0]
    a2 = c[:, 2] / sd**2
    a1 = c[:, 1] / sd - 2 * c[:, 2] * m / sd**2
    a0 = c[:, 0] - c[:, 1] * m / sd + c[:, 2] * m**2 / sd**2
    # keep the square's shift within SHIFT_BOUND·max|z| (refit a0, a1 with a2 raised)
    big = np.maximum(np.abs(lo), np.abs(hi)) + 1e-6
    for _ in range(4):
        need = np.abs(a1) / (2 * SHIFT_BOUND * big)
        bad = np.abs(a2) < need
        if not bad.any():
            break
        sign = np.where(a2 < 0, -1.0, 1.0)
        a2 = np.where(bad, sign * need * 1.01, a2)
        resid = ys - a2[None, :] * xs * xs
        g2 = np.einsum("r,ruk,rul->ukl", w, basis[..., :2], basis[..., :2]) + 1e-10 * np.eye(2)
        r2 = np.einsum("r,ruk,ru->uk", w, basis[..., :2], resid)
        c2 = np.linalg.solve(g2, r2[..., None])[..., 0]
        a1 = np.where(bad, c2[:, 1] / sd, a1)
        a0 = np.where(bad, c2[:, 0] - c2[:, 1] * m / sd, a0)
    return a0, a1, _bound_a2(a1, a2, big)


def _bound_a2(a1: np.ndarray, a2: np.ndarray, big: np.ndarray) -> np.ndarray:
    """Raise ``|a2|`` where needed so ``|a1/2a2| ≤ SHIFT_BOUND · big`` and ``a2 ≠ 0``."""
    need = np.abs(a1) / (2 * SHIFT_BOUND * big)
    a2 = np.where(np.abs(a2) < need, np.where(a2 < 0, -1.0, 1.0) * need, a2)
    floor = 1e-9 / big**2  # a dead unit (constant output) still needs a nonzero square
    return np.where(np.abs(a2) < floor, floor, a2)


def compile_model(
    module: nn.Module,
    input_shape: Sequence[int],
    calibration: Tensor | None = None,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    source: dict[str, Any] | None = None,
    tolerance: float = 1e-3,
    fits: Sequence[tuple[str, float]] | None = None,
    refine: bool = True,
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
    module.eval()
    steps = read_steps(module, calibration)
    with torch.no_grad():
        ref = module(calibration).double()
        seq = run_steps(steps, calibration).double()
    if seq.shape != ref.shape or not torch.allclose(
        seq, ref, rtol=tolerance, atol=tolerance * max(1.0, float(ref.abs().max()))
    ):
        raise UnsupportedModelError(
            "the model's forward is not the plain sequence of its layers (e.g. a residual "
            f"connection or a functional op in forward): supported are {SUPPORTED}, in sequence"
        )
    # float64 copies of the layers, so the collapsed maps are exact to double precision
    steps64 = [
        Step(s.kind, s.name, to_double(s.fn), s.coeffs) if s.kind == "linear" else s for s in steps
    ]
    calib64 = calibration.double()
    if not any(st.kind in ("relu", "sigmoid") for st in trim_outputs(steps64)[0]):
        return _build(steps64, shape, calib64, source or {})
    # ReLU / sigmoid are approximated: build the candidate fits, keep the one whose plan
    # agrees best with the model on the calibration inputs (then the smaller logit error)
    ref_np = ref.reshape(ref.shape[0], -1).numpy()
    best: tuple[tuple[float, float], Plan] | None = None
    tried: dict[str, float] = {}
    candidates = tuple(fits or FIT_CANDIDATES)
    maps: dict[int, tuple[Affine, tuple[int, ...]]] = {}
    for fit in candidates:
        plan = _build(list(steps64), shape, calib64, source or {}, fit, maps=maps)
        out = plan.forward(calib64.reshape(calib64.shape[0], -1).numpy())
        agree = float((predict_labels(plan, out) == predict_labels(plan, ref_np)).mean())
        mse = float(np.mean((out - ref_np) ** 2))
        tried[f"{fit[0]}/{fit[1]}"] = agree
        if best is None or (agree, -mse) > best[0]:
            best = ((agree, -mse), plan)
    assert best is not None
    fit_kind = best[1].activations[0].get("fit", "unit") if best[1].activations else "unit"
    plan, agreement = best[1], best[0][0]
    if refine:
        chosen = next(f for f in candidates if f[0] == fit_kind)
        tuned = _build(list(steps64), shape, calib64, source or {}, chosen, ref_np, maps)
        out = tuned.forward(calib64.reshape(calib64.shape[0], -1).numpy())
        tuned_agreement = float(
            (predict_labels(tuned, out) == predict_labels(tuned, ref_np)).mean()
        )
        if tuned_agreement >= agreement:
            plan, agreement = tuned, tuned_agreement
    plan.fidelity = {
        "calibration_samples": int(calib64.shape[0]),
        "calibration_agreement": agreement,
        "fit": plan.activations[0].get("fit") if plan.activations else None,
        "candidates": tried,
    }
    if agreement < FIDELITY_WARN:
        msg = (
            f"the plan's polynomial activations agree with the model's predictions on only "
            f"{agreement:.1%} of the calibration inputs: expect an accuracy cost; fine-tune "
            "with 'modelshield he finetune' (trainable quadratic activations) and compile "
            "the fine-tuned model"
        )
        plan.notes.append("WARNING: " + msg)
        plan.fidelity["warning"] = msg
        logger.warning(msg)
    return plan


FIT_CANDIDATES: tuple[tuple[str, float], ...] = (("unit", 0.1), ("layer", 0.5))
"""How ReLU / sigmoid quadratics are fitted: per neuron (grid weight 0.1) or per layer
(grid weight 0.5, the classic CryptoNets-style single polynomial); the compiler keeps the
one whose plan agrees best with the model on the calibration inputs."""

FIDELITY_WARN = 0.995
"""Warn (notes, log, reports) when the compiled plan agrees with the model on fewer
calibration inputs than this."""


@dataclass
class _Poly:
    """A degree-2 activation per unit (``a0 + a1 z + a2 z²``, each of shape (units,))."""

    a0: np.ndarray
    a1: np.ndarray
    a2: np.ndarray

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.a0 + self.a1 * z + self.a2 * z * z


def _build(
    steps: list[Step],
    shape: tuple[int, ...],
    calib: Tensor,
    source: dict[str, Any],
    fit: tuple[str, float] = ("unit", 0.1),
    target: np.ndarray | None = None,
    maps: dict[int, tuple[Affine, tuple[int, ...]]] | None = None,
) -> Plan:
    """Collapse ``steps`` into a plan; ``fit`` = (``"unit"`` | ``"layer"``, grid weight)
    says how ReLU / sigmoid quadratics are fitted: one per neuron or one per layer. With
    ``target`` (the model's outputs on ``calib``) the fits are then refined end to end.
    ``maps`` caches the dense affine maps between builds of the same steps."""
    steps, output = trim_outputs(steps)
    if any(s.kind == "softmax" for s in steps):
        i = next(i for i, s in enumerate(steps) if s.kind == "softmax")
        raise refuse(i, f"{steps[i].name}: softmax is only allowed as the last layer")
    groups: list[list[Step]] = []
    for i, s in enumerate(steps):
        if s.kind == "linear":
            if groups and groups[-1][0].kind == "linear":
                groups[-1].append(s)
            else:
                groups.append([s])
        else:
            if not groups or groups[-1][0].kind != "linear":
                raise refuse(i, f"{s.name}: an activation must follow a linear layer")
            groups.append([s])
    if not groups or groups[-1][0].kind != "linear":
        raise UnsupportedModelError("the model has no linear layer to end with")
    seq, acts, notes, ops = _fit_sequence(groups, shape, calib, fit, {} if maps is None else maps)
    if target is not None and any(a.get("fit") for a in acts):
        refined = refine_activations(
            seq, calib.reshape(calib.shape[0], -1).numpy(), target, ops=ops
        )
        if refined is not None:
            seq = refined
            notes.append(
                "the fitted quadratics were then refined to match the model's outputs on "
                "the calibration inputs (weights unchanged)"
            )
            for a in acts:
                if a.get("fit"):
                    a["refined"] = True
    layers = _fold(seq)
    x = calib.reshape(calib.shape[0], -1).numpy()
    max_abs = [float(np.abs(x).max())]
    for layer in layers:
        if isinstance(layer, Affine):  # the bias is encoded at this level too
            x = x @ layer.w.T + layer.b
            max_abs.append(max(float(np.abs(x).max()), float(np.abs(layer.b).max())))
        else:
            x = x * x
            max_abs.append(float(np.abs(x).max()))
    return Plan(
        input_shape=shape,
        layers=layers,
        activations=acts,
        output=output,
        notes=notes,
        source=source,
        max_abs=max_abs,
    )


def _fit_sequence(
    groups: list[list[Step]],
    shape: tuple[int, ...],
    calib: Tensor,
    fit: tuple[str, float],
    maps: dict[int, tuple[Affine, tuple[int, ...]]],
) -> tuple[
    list[Affine | _Poly], list[dict[str, Any]], list[str], dict[int, Callable[[Tensor], Tensor]]
]:
    """Affine maps and degree-2 activations, fitted layer by layer on calibration data.

    Also returns, per affine map (by ``id``), a function computing it with the model's own
    layers (a convolution rather than its dense unrolled matrix).

    ``h`` follows what the plan computes (earlier polynomials included) and ``h_exact``
    what the model computes; each ReLU / sigmoid is fitted to map the former onto the
    latter, so later fits absorb earlier approximation error.
    """
    seq: list[Affine | _Poly] = []
    acts: list[dict[str, Any]] = []
    notes: list[str] = []
    ops: dict[int, Callable[[Tensor], Tensor]] = {}
    cur_shape = shape
    h = calib.reshape(calib.shape[0], -1).numpy()
    h_exact = h
    for gi, g in enumerate(groups):
        if g[0].kind == "linear":
            in_shape = cur_shape
            if gi not in maps:  # the same for every fit: collapse each run once
                maps[gi] = dense_affine(g, cur_shape)
            aff, cur_shape = maps[gi]
            # the layers themselves, for cheap evaluation (refinement): no dense matrix
            ops[id(aff)] = lambda t, g=g, sh=in_shape: run_steps(g, t.reshape(-1, *sh)).reshape(  # type: ignore[misc]
                t.shape[0], -1
            )
            seq.append(aff)
            h, h_exact = h @ aff.w.T + aff.b, h_exact @ aff.w.T + aff.b
            continue
        s = g[0]
        if not seq or not isinstance(seq[-1], Affine):
            raise UnsupportedModelError(
                f"{s.name}: an activation must follow a linear or convolutional layer (not the "
                "input or another activation); put a Linear or Conv2d layer before it"
            )
        units = h.shape[1]
        info: dict[str, Any] = {"layer": s.name, "kind": s.kind}
        if s.kind in ("square", "poly"):
            c = (0.0, 0.0, 1.0) if s.kind == "square" else s.coeffs
            if c is None:
                raise UnsupportedModelError(f"{s.name}: polynomial activation without coefficients")
            poly = _Poly(
                *(np.broadcast_to(np.asarray(v, np.float64).reshape(-1), units).copy() for v in c)
            )
            info["coeffs"] = [float(np.mean(v)) for v in c]
            h_exact = poly(h_exact)
        else:
            exact = _exact_activation(s.kind, h_exact)
            if fit[0] == "unit":
                poly = _Poly(*fit_quadratic_units(s.kind, h, exact, grid_weight=fit[1]))
            else:  # one quadratic for the whole layer, broadcast to its units
                one = fit_quadratic_units(
                    s.kind, h.reshape(-1, 1), exact.reshape(-1, 1), grid_weight=fit[1]
                )
                poly = _Poly(*(np.full(units, float(v[0])) for v in one))
            lo, hi = float(h.min()), float(h.max())
            err = np.abs(poly(h) - exact)
            info.update(
                fit=fit[0],
                range=[lo, hi],
                units=units,
                fit_max_error=float(err.max()),
                fit_rms_error=float(np.sqrt(np.mean(err**2))),
            )
            notes.append(
                f"{s.name}: {s.kind} replaced by a quadratic fitted "
                f"{'per unit' if fit[0] == 'unit' else 'per layer'} ({units} units) on the "
                f"calibration data (pre-activations in [{lo:.3g}, {hi:.3g}]; fit RMS error "
                f"{info['fit_rms_error']:.3g})"
            )
            h_exact = exact
        if np.any(poly.a2 == 0):
            raise refuse(
                len(seq), f"{s.name}: a polynomial of degree < 2 (fold it into the layers)"
            )
        seq.append(poly)
        acts.append(info)
        h = poly(h)
    return seq, acts, notes, ops


def refine_activations(
    seq: list[Affine | _Poly],
    x: np.ndarray,
    target: np.ndarray,
    *,
    ops: dict[int, Callable[[Tensor], Tensor]] | None = None,
    steps: int = 150,
    batch: int = 128,
    lr: float = 0.01,
    seed: int = 0,
) -> list[Affine | _Poly] | None:
    """Tune the per-unit quadratics so the plan's outputs match the model's (``target``).

    Layer-wise fits ignore how errors compound through depth; this distils the model into
    the plan's activations only (the affine weights stay fixed), minimising the KL
    divergence between the model's and the plan's softmax outputs plus their logit MSE,
    with each coefficient moved relative to its fitted value. A quarter of ``x`` is held
    out: the refined activations are returned only if they agree with the model there at
    least as often as the fitted ones (else ``None``).
    """
    n = x.shape[0]
    if n < 32:
        return None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    hold, fit_idx = perm[: n // 4], perm[n // 4 :]
    xt = torch.from_numpy(x)
    tt = torch.from_numpy(target.reshape(n, -1).astype(np.float64))
    ops = dict(ops or {})
    for item in seq:
        if isinstance(item, Affine) and id(item) not in ops:
            w, b = torch.from_numpy(item.w), torch.from_numpy(item.b)
            ops[id(item)] = lambda t, w=w, b=b: t @ w.T + b  # type: ignore[misc]
    polys = [item for item in seq if isinstance(item, _Poly)]
    base_c = [tuple(torch.from_numpy(v) for v in (p.a0, p.a1, p.a2)) for p in polys]
    deltas = [torch.zeros(3, p.a0.shape[0], dtype=torch.float64, requires_grad=True) for p in polys]

    def coeffs(k: int, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a0, a1, a2 = base_c[k]
        return a0 + d[0] * (a1.abs() + a2.abs() + 1e-3), a1 * (1 + d[1]), a2 * (1 + d[2])

    def run(rows: Tensor, ds: list[Tensor]) -> Tensor:
        h = xt[rows]
        k = 0
        for item in seq:
            if isinstance(item, Affine):
                h = ops[id(item)](h)
            else:
                c0, c1, c2 = coeffs(k, ds[k])
                h = c0 + c1 * h + c2 * h * h
                k += 1
        return h

    def agreement(rows: Tensor, ds: list[Tensor]) -> float:
        with torch.no_grad():
            out, ref = run(rows, ds), tt[rows]
            if out.shape[1] == 1:
                return float(((out > 0) == (ref > 0)).double().mean())
            return float((out.argmax(1) == ref.argmax(1)).double().mean())

    zero = [torch.zeros_like(d) for d in deltas]
    base = agreement(hold, zero)
    opt = torch.optim.Adam(deltas, lr=lr)
    var = tt[fit_idx].var() + 1e-12
    multi = tt.shape[1] > 1
    for _ in range(steps):
        rows = fit_idx[torch.randint(len(fit_idx), (min(batch, len(fit_idx)),), generator=g)]
        out, ref = run(rows, deltas), tt[rows]
        loss = ((out - ref) ** 2).mean() / var
        if multi:
            loss = loss + torch.nn.functional.kl_div(
                out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for d in deltas:
                d[1:].clamp_(-0.9, 3.0)
    refined = agreement(hold, deltas)
    logger.debug("activation refinement: held-out agreement %.4f -> %.4f", base, refined)
    if refined < base:
        return None
    # the refined coefficients, with the square's shift kept within SHIFT_BOUND of the
    # pre-activations each unit sees (on the whole calibration set, refined path)
    out_seq: list[Affine | _Poly] = []
    k = 0
    with torch.no_grad():
        h = xt
        for item in seq:
            if isinstance(item, Affine):
                out_seq.append(item)
                h = ops[id(item)](h)
                continue
            c0, c1, c2 = (c.detach() for c in coeffs(k, deltas[k]))
            k += 1
            big = h.abs().amax(dim=0).numpy() + 1e-6
            a0, a1, a2 = (c.numpy().copy() for c in (c0, c1, c2))
            if not all(np.all(np.isfinite(a)) for a in (a0, a1, a2)):
                return None
            poly = _Poly(a0, a1, _bound_a2(a1, a2, big))
            out_seq.append(poly)
            h = torch.from_numpy(poly(h.numpy()))
    return out_seq


def _fold(seq: list[Affine | _Poly]) -> list[Affine | str]:
    """Rewrite ``affine → a0 + a1 z + a2 z² → affine`` as ``affine → square → affine``.

    ``a2 z² + a1 z + a0 = sign(a2) · (√|a2| (z + a1/2a2))² + (a0 − a1²/4a2)``: the scale
    and shift go into the affine map before the square, the sign and constant into the
    one after it, so each activation costs one multiplicative level.
    """
    layers: list[Affine | str] = []
    pending: tuple[np.ndarray, np.ndarray] | None = None
    for item in seq:
        if isinstance(item, Affine):
            aff = item
            if pending is not None:
                sign, d = pending
                aff = Affine(aff.w * sign[None, :], aff.b + aff.w @ d)
                pending = None
            layers.append(aff)
            continue
        last = layers[-1]
        assert isinstance(last, Affine)
        sc = np.sqrt(np.abs(item.a2))
        shift = item.a1 / (2 * item.a2)
        layers[-1] = Affine(last.w * sc[:, None], (last.b + shift) * sc)
        layers.append("square")
        pending = (np.sign(item.a2), item.a0 - item.a1 * item.a1 / (4 * item.a2))
    if pending is not None:
        raise UnsupportedModelError("the model ends with an activation the plan cannot absorb")
    return layers


def model_forward_np(module: nn.Module, x: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """The torch model's outputs on flat inputs ``x`` (the plaintext reference)."""
    with torch.no_grad():
        t = torch.from_numpy(x.reshape(-1, *input_shape)).float()
        return module.eval()(t).double().numpy()  # type: ignore[no-any-return]
