"""All Lp norm maths for attacks: norms, projections, steepest ascent, ball sampling.

This is the only module that knows about norms; attacks call these per-batch functions
and stay norm-agnostic. Inputs are batches ``(N, ...)``; norms are taken per sample.

- L∞ steepest ascent is the sign of the gradient (FGSM, Goodfellow et al. 2015).
- L2 steepest ascent is the normalised gradient.
- L1 steepest ascent is sparse: the sign of the top-q fraction of coordinates by
  magnitude, normalised to unit L1 norm (SLIDE, Tramèr & Boneh 2019).
- L1 projection is the exact Euclidean projection onto the L1 ball (Duchi et al. 2008).
- Uniform sampling in the L2 ball: Gaussian direction, radius ``eps · U^(1/d)``; in the L1
  ball: exponential coordinates with random signs, normalised with a slack coordinate
  (Barthe et al. 2005), which is uniform in the ball.
"""

from __future__ import annotations

import torch

from modelshield.core.errors import InvalidConfigError
from modelshield.core.threat import NORMS

_TINY = 1e-12


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _check(norm: str) -> None:
    if norm not in NORMS:
        raise InvalidConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of a batch, shape ``(N,)``."""
    _check(norm)
    flat = _flat(delta)
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return flat.abs().sum(dim=1)


def _eps_tensor(eps: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    e = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    return e.expand(like.shape[0]) if e.ndim == 0 else e


def _project_l1(flat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the L1 ball of radius ``eps`` (Duchi et al.)."""
    abs_v = flat.abs()
    inside = abs_v.sum(dim=1) <= eps
    if bool(inside.all()):
        return flat
    mu, _ = abs_v.sort(dim=1, descending=True)
    cums = mu.cumsum(dim=1)
    ks = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    cond = mu - (cums - eps[:, None]) / ks > 0
    rho = cond.to(flat.dtype).mul(ks).argmax(dim=1)  # last index where cond holds
    theta = (cums.gather(1, rho[:, None]).squeeze(1) - eps) / (rho.to(flat.dtype) + 1)
    theta = theta.clamp_min(0)
    proj = flat.sign() * (abs_v - theta[:, None]).clamp_min(0)
    return torch.where(inside[:, None], flat, proj)


def project(delta: torch.Tensor, norm: str, eps: float | torch.Tensor) -> torch.Tensor:
    """Project each perturbation onto the Lp ball of radius ``eps`` (scalar or per sample)."""
    _check(norm)
    if not isinstance(eps, torch.Tensor):  # scalar: no tensor made, no host-device copy
        e_f = float(eps)
        if norm == "linf":
            return delta.clamp(-e_f, e_f)
        if norm == "l2":
            n = _flat(delta).norm(p=2, dim=1)
            factor = (e_f / n.clamp_min(_TINY)).clamp_max(1.0)
            return delta * _bcast(factor, delta)
    e = _eps_tensor(eps, delta)
    if norm == "linf":
        b = _bcast(e, delta)
        return torch.maximum(torch.minimum(delta, b), -b)
    flat = _flat(delta)
    if norm == "l2":
        n = flat.norm(p=2, dim=1)
        factor = torch.where(n > e, e / n.clamp_min(_TINY), torch.ones_like(n))
        return delta * _bcast(factor, delta)
    return _project_l1(flat, e).reshape(delta.shape)


def steepest_ascent(grad: torch.Tensor, norm: str, *, l1_sparsity: float = 0.99) -> torch.Tensor:
    """Unit-norm direction maximising ``<grad, d>`` in the given norm (per sample).

    For L1 the direction spreads over the top ``1 - l1_sparsity`` fraction of coordinates
    (at least one), as in SLIDE; ``l1_sparsity=1`` gives the pure single-coordinate step.
    """
    _check(norm)
    if norm == "linf":
        return grad.sign()
    flat = _flat(grad)
    if norm == "l2":
        return grad / _bcast(flat.norm(p=2, dim=1).clamp_min(_TINY), grad)
    if not 0.0 <= l1_sparsity <= 1.0:
        raise InvalidConfigError(f"l1_sparsity must be in [0, 1], got {l1_sparsity}")
    d = flat.shape[1]
    k = max(1, round((1.0 - l1_sparsity) * d))
    abs_g = flat.abs()
    thresh = abs_g.topk(k, dim=1).values[:, -1:]
    mask = (abs_g >= thresh) & (abs_g > 0)
    direction = flat.sign() * mask
    direction = direction / direction.abs().sum(dim=1, keepdim=True).clamp_min(_TINY)
    return direction.reshape(grad.shape)


def sample_ball(
    shape: tuple[int, ...] | torch.Size,
    norm: str,
    eps: float | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    radius: str = "volume",
) -> torch.Tensor:
    """Random points in the Lp ball of radius ``eps``, one per sample.

    ``radius="volume"`` samples uniformly from the ball (for L2/L1 in d dimensions almost
    all the mass lies near the sphere). ``radius="uniform"`` keeps the direction uniform
    on the sphere but draws the radius uniformly in ``[0, eps]``, so starts spread over
    every distance from ``x`` (the usual L2 PGD start, e.g. torchattacks'). L∞ ignores it.
    """
    _check(norm)
    if radius not in ("volume", "uniform"):
        raise InvalidConfigError(f"radius must be 'volume' or 'uniform', got {radius!r}")
    n = shape[0]
    d = 1
    for s in shape[1:]:
        d *= int(s)
    e = _eps_tensor(eps, torch.empty(n, dtype=dtype, device=device))
    if norm == "linf":
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return (2 * u - 1) * _bcast(e, u)
    if norm == "l2":
        g = torch.randn((n, d), generator=generator, device=device, dtype=dtype)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(_TINY)
        r = torch.rand(n, generator=generator, device=device, dtype=dtype)
        if radius == "volume":
            r = r ** (1.0 / d)
        return (g * (r * e)[:, None]).reshape(shape)
    expo = torch.empty((n, d + 1), device=device, dtype=dtype).exponential_(generator=generator)
    signs = torch.randint(0, 2, (n, d), generator=generator, device=device).to(dtype) * 2 - 1
    if radius == "volume":
        point = expo[:, :d] / expo.sum(dim=1, keepdim=True)
    else:
        u = torch.rand(n, 1, generator=generator, device=device, dtype=dtype)
        point = expo[:, :d] / expo[:, :d].sum(dim=1, keepdim=True) * u
    return (signs * point * e[:, None]).reshape(shape)


def clip_to_bounds(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return x.clamp(bounds[0], bounds[1])


def project_to_threat(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    norm: str,
    eps: float | torch.Tensor,
    bounds: tuple[float, float],
) -> torch.Tensor:
    """Nearest point (per the norm's projection) of ``x_adv`` in the ball around ``x``, in bounds.

    Clipping to the box after projecting cannot leave the ball: with ``x`` inside the box,
    clipping only shrinks each coordinate of the perturbation towards zero.
    """
    delta = project(x_adv - x, norm, eps)
    return clip_to_bounds(x + delta, bounds)
