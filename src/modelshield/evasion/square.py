"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), L∞ and L2.

A score-based random search. Every iteration proposes one random change of the current
best perturbation inside a square window and keeps it only if it lowers the loss on the
oracle's scores (the margin ``z_y − max_{j≠y} z_j``; targeted: ``max_{j≠t} z_j − z_t``).

- **L∞** (paper Alg. 2): start from vertical stripes (one random ``±eps`` per column and
  channel); an update sets a random ``s×s`` square to ``±eps``, one sign per channel
  (signs are redrawn while the proposal would not change the image).
- **L2** (paper Alg. 3): start from a 5×5 grid of tiles, each holding the "meta" pattern
  (two halves of opposite sign, each a centre-heavy stack of concentric rectangular
  rings weighted ``Σ 1/(k+1)²``) with a random sign per channel, scaled to norm eps. An
  update picks two windows W1 and W2 of side ``s``: the perturbation mass of W1 ∪ W2 (plus
  any budget left below eps) is moved into W1 as a fresh random pattern added to W1's
  normalised old content, W2 is zeroed, and the whole perturbation is rescaled to eps.
- The side ``s`` follows the paper's schedule: the covered fraction ``p`` starts at
  ``p_init`` and halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
  of 10 000, rescaled to ``max_queries``; ``s = round(sqrt(p · H · W))`` (L2: at least 3,
  odd), at most ``min(H, W)``.

Shapes: ``(N, C, H, W)`` images as they are; ``(N, H, W)`` as one channel; anything else
is flattened to ``(N, 1, 1, D)``, where a "square" becomes a contiguous window of
``round(p · D)`` coordinates (the same fraction of the input as the paper's square) and
the L2 start uses 25 such windows.

Queries: each sample first has its clean input queried (points the oracle already gets
wrong are returned as they are, successful), then the starting point, then one proposal
per iteration, until it is fooled or has spent ``max_queries``. One ``oracle.query`` per
iteration covers all still-robust samples. Never more rows are asked for than
``oracle.remaining``: when the oracle's budget runs short the samples closest to success
go first, and when it is spent the attack stops and reports what it found. Reported
success is exactly the oracle's verdict (argmax of the scores it returned) on the
returned point.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch

from modelshield.core.errors import (
    InvalidConfigError,
    UnsupportedModelError,
)
from modelshield.core.oracle import Oracle
from modelshield.core.results import AttackResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import _lp
from modelshield.evasion.base import (
    QueryLedger,
    check_batch,
    check_count,
    check_norm,
    finalize_oracle,
    is_success,
    register_attack,
    require_oracle,
    resolve_goal,
)

logger = logging.getLogger(__name__)

_NORMS = ("linf", "l2")
# (last iteration out of 10 000, divisor of p_init) — the paper's piecewise schedule.
_SCHEDULE = (
    (10, 1),
    (50, 2),
    (200, 4),
    (500, 8),
    (1000, 16),
    (2000, 32),
    (4000, 64),
    (6000, 128),
    (8000, 256),
)
_DRAWS = 8  # sign patterns drawn at once per redraw round
_MAX_REDRAWS = 32  # L∞: sign redraws for a proposal that would not change the image
_NEG = -1e30  # stands in for -inf scores (top-k oracles) so margins stay finite


# -- Square Attack --------------------------------------------------------------------------
def p_schedule(p_init: float, iteration: int, n_iters: int) -> float:
    """Fraction of the input the square covers at ``iteration`` (paper's schedule, rescaled)."""
    t = int(iteration / n_iters * 10_000)
    for last, divisor in _SCHEDULE:
        if t <= last:
            return p_init / divisor
    return p_init / 512


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """View a batch as ``(N, C, H, W)`` (see the module docstring)."""
    if x.ndim == 4:
        return x
    if x.ndim == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], 1, 1, -1)


def _window(p: float, h: int, w: int, *, smallest: int, odd: bool) -> tuple[int, int]:
    """Window (rows, cols) covering about a fraction ``p`` of an ``h×w`` plane."""
    if h == 1:  # flat input: a run of about p·w coordinates
        size = max(round(p * w), smallest)
        if odd and size % 2 == 0:
            size += 1
        return 1, min(size, w)
    side = max(round(math.sqrt(p * h * w)), smallest)
    if odd and side % 2 == 0:
        side += 1
    side = min(side, h, w)
    return side, side


def _rings(rows: int, cols: int) -> torch.Tensor:
    """Concentric rectangular rings around the centre, ring k adding ``1/(k+1)²`` to all
    cells within it (centre-heavy), unit L2 norm (the paper's pseudo-Gaussian)."""
    out = torch.zeros(rows, cols, dtype=torch.float64)
    if rows == 0 or cols == 0:
        return out
    r0, c0 = rows // 2, cols // 2
    for k in range(max(r0, c0) + 1):
        out[max(r0 - k, 0) : min(r0 + k + 1, rows), max(c0 - k, 0) : min(c0 + k + 1, cols)] += (
            1.0 / (k + 1) ** 2
        )
    return out / _lp.lp_norm(out.reshape(1, -1), "l2")


@functools.lru_cache(maxsize=64)
def _meta(rows: int, cols: int) -> torch.Tensor:
    """The L2 update pattern: two ring stacks of opposite sign side by side, unit L2 norm.

    Square windows split into a top and bottom half (callers transpose half the time);
    one-row windows split into a left and right half. Cached: never modify the result.
    """
    if rows == 1:
        out = torch.cat([_rings(1, cols // 2), -_rings(1, cols - cols // 2)], dim=1)
    else:
        out = torch.cat([_rings(rows // 2, cols), -_rings(rows - rows // 2, cols)], dim=0)
    return out / _lp.lp_norm(out.reshape(1, -1), "l2")


def _patterns(n: int, rows: int, cols: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``n`` meta patterns ``(n, rows, cols)``; square ones transposed with probability 1/2."""
    base = _meta(rows, cols).to(device=like.device, dtype=like.dtype)
    out = base.expand(n, rows, cols)
    if rows == cols and rows > 1:
        flip = torch.rand(n, generator=g, device=like.device) < 0.5
        out = torch.where(flip[:, None, None], base.T.expand(n, rows, cols), out)
    return out


def _signs(shape: tuple[int, ...], g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g, device=like.device).to(like.dtype) * 2 - 1


def _corners(
    n: int, rows: int, cols: int, h: int, w: int, g: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-left corners of ``rows×cols`` windows inside an ``h×w`` plane."""
    r = torch.randint(0, h - rows + 1, (n,), generator=g, device=device)
    c = torch.randint(0, w - cols + 1, (n,), generator=g, device=device)
    return r, c


def _mask(r: torch.Tensor, c: torch.Tensor, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """Boolean ``(n, 1, h, w)`` masks of the windows with corners ``(r, c)``."""
    ar = torch.arange(h, device=r.device)[None]
    ac = torch.arange(w, device=c.device)[None]
    in_r = (ar >= r[:, None]) & (ar < r[:, None] + rows)
    in_c = (ac >= c[:, None]) & (ac < c[:, None] + cols)
    return (in_r[:, :, None] & in_c[:, None, :])[:, None]


def _place(pattern: torch.Tensor, r: torch.Tensor, c: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Put per-sample patterns ``(n, rows, cols)`` at corners ``(r, c)`` of a zero ``(n, 1, h, w)``."""
    n, rows, cols = pattern.shape
    rr = torch.arange(h, device=r.device)[None] - r[:, None]
    cc = torch.arange(w, device=c.device)[None] - c[:, None]
    inside = ((rr >= 0) & (rr < rows))[:, :, None] & ((cc >= 0) & (cc < cols))[:, None, :]
    b = torch.arange(n, device=r.device)[:, None, None]
    vals = pattern[b, rr.clamp(0, rows - 1)[:, :, None], cc.clamp(0, cols - 1)[:, None, :]]
    return (vals * inside).unsqueeze(1)


def _channel_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each channel of ``(n, C, H, W)``, shaped ``(n, C, 1, 1)``."""
    n, ch = t.shape[:2]
    return _lp.lp_norm(t.reshape(n * ch, -1), "l2").reshape(n, ch, 1, 1)


def _scale_to(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rescale each perturbation to L2 norm ``eps``."""
    norms = _lp.lp_norm(delta, "l2").clamp_min(1e-12)
    return delta * (eps / norms).reshape(-1, *([1] * (delta.ndim - 1)))


def _linf_init(xi: torch.Tensor, eps: float, g: torch.Generator) -> torch.Tensor:
    """Vertical stripes: one random ``±eps`` per column and channel."""
    n, ch, _, w = xi.shape
    return eps * _signs((n, ch, 1, w), g, xi).expand_as(xi)


def _l2_init(xi: torch.Tensor, eps: float, g: torch.Generator) -> torch.Tensor:
    """A grid of meta patterns (5×5 tiles; 25 runs for flat inputs), random sign per
    channel and tile, scaled to norm eps."""
    n, ch, h, w = xi.shape
    if h == 1:
        th, tw = 1, max(w // 25, 1)
    else:
        th = tw = max(min(h, w) // 5, 1)
    nh, nw = h // th, w // tw
    oh, ow = (h - th * nh) // 2, (w - tw * nw) // 2
    delta = torch.zeros_like(xi)
    for i in range(nh):
        for j in range(nw):
            pat = _patterns(n, th, tw, g, xi)[:, None]
            r0, c0 = oh + i * th, ow + j * tw
            delta[:, :, r0 : r0 + th, c0 : c0 + tw] += pat * _signs((n, ch, 1, 1), g, xi)
    return _scale_to(delta, eps)


def _linf_step(
    xi: torch.Tensor,
    best: torch.Tensor,
    eps: float,
    p: float,
    bounds: tuple[float, float],
    g: torch.Generator,
) -> torch.Tensor:
    """Alg. 2 proposal: a random square of the perturbation set to ``±eps`` per channel.

    Signs are redrawn (per row) while the proposal would not change the image, as in the
    paper's code; the check runs on per-channel booleans, not on images: a channel's
    window equals the current one for sign +1 (or -1) or it does not.
    """
    n, ch, h, w = xi.shape
    rows, cols = _window(p, h, w, smallest=1, odd=False)
    r, c = _corners(n, rows, cols, h, w, g, xi.device)
    mask = _mask(r, c, rows, cols, h, w)
    plus = _lp.clip_to_bounds(xi + eps, bounds)
    minus = _lp.clip_to_bounds(xi - eps, bounds)
    outside = ~mask
    same_plus = (((plus - best).abs() < 1e-7) | outside).flatten(2).all(dim=2)  # (n, ch)
    same_minus = (((minus - best).abs() < 1e-7) | outside).flatten(2).all(dim=2)
    can_change = ~(same_plus & same_minus).all(dim=1)
    signs = _signs((n, ch), g, xi)
    same = torch.where(signs > 0, same_plus, same_minus).all(dim=1) & can_change
    for _ in range(_MAX_REDRAWS // _DRAWS):
        if not bool(same.any()):
            break
        # rejection sampling, _DRAWS candidates at once: the first that changes the image
        # is uniform over the sign patterns that do
        draws = _signs((n, _DRAWS, ch), g, xi)
        ok = ~torch.where(draws > 0, same_plus[:, None], same_minus[:, None]).all(dim=2)
        pick = draws[torch.arange(n, device=xi.device), ok.to(torch.int8).argmax(dim=1)]
        found = same & ok.any(dim=1)
        signs = torch.where(found[:, None], pick, signs)
        same &= ~found
    signs = signs[:, :, None, None]
    return torch.where(mask, torch.where(signs > 0, plus, minus), best)


def _l2_step(
    xi: torch.Tensor,
    best: torch.Tensor,
    eps: float,
    p: float,
    bounds: tuple[float, float],
    g: torch.Generator,
) -> torch.Tensor:
    """Alg. 3 proposal: move the mass of windows W1 ∪ W2 into W1 as a fresh pattern."""
    n, ch, h, w = xi.shape
    rows, cols = _window(p, h, w, smallest=3, odd=True)
    r1, c1 = _corners(n, rows, cols, h, w, g, xi.device)
    r2, c2 = _corners(n, rows, cols, h, w, g, xi.device)
    m1 = _mask(r1, c1, rows, cols, h, w)
    both = m1 | _mask(r2, c2, rows, cols, h, w)
    delta = best - xi
    norm_w1 = _channel_norms(delta * m1)
    norm_both = _channel_norms(delta * both)
    norm_all = _lp.lp_norm(delta, "l2").reshape(n, 1, 1, 1)
    fresh = _place(_patterns(n, rows, cols, g, xi), r1, c1, h, w) * _signs((n, ch, 1, 1), g, xi)
    new_w1 = fresh + delta * m1 / (norm_w1 + 1e-10)
    mass = ((eps**2 - norm_all**2).clamp_min(0) / ch + norm_both**2).sqrt()
    new_w1 = new_w1 / _channel_norms(new_w1).clamp_min(1e-12) * mass
    delta = torch.where(both, torch.zeros_like(delta), delta) + new_w1
    return _lp.clip_to_bounds(xi + _scale_to(delta, eps), bounds)


def _margin_and_loss(
    scores: torch.Tensor, goal: torch.Tensor, *, targeted: bool, loss: str, probs: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (margin, loss to minimise) from oracle scores.

    Probabilities are turned into log-probabilities (the margin is then the logit margin).
    ``margin``: untargeted ``z_y − max_{j≠y} z_j``, targeted ``max_{j≠t} z_j − z_t``.
    ``ce``: untargeted ``log p_y``, targeted ``−log p_t`` (log-softmax of the scores).
    """
    z = scores.double()
    if probs:
        z = z.clamp_min(1e-30).log()
    z = torch.nan_to_num(z, neginf=_NEG, posinf=-_NEG)
    true = z.gather(1, goal[:, None]).squeeze(1)
    other = z.scatter(1, goal[:, None], _NEG * 10).amax(dim=1)
    margin = other - true if targeted else true - other
    if loss == "margin":
        return margin, margin
    logp = torch.log_softmax(z, dim=1).gather(1, goal[:, None]).squeeze(1)
    return margin, (-logp if targeted else logp)


@register_attack("square", access="scores", norms=_NORMS)
def square(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    max_queries: int = 5000,
    p_init: float = 0.8,
    seed: int | None = 0,
    target: torch.Tensor | None = None,
    loss: str = "margin",
) -> AttackResult:
    """Square Attack, score-based random search (Andriushchenko et al., ECCV 2020).

    ``max_queries`` is the budget per sample, counting its clean query and its starting
    point; ``p_init`` the fraction of the input the first squares cover; ``loss`` is
    ``"margin"`` or ``"ce"``. Needs an oracle answering with scores (logits or probs).
    """
    started = time.perf_counter()
    oracle = require_oracle(oracle, "square")
    check_norm("square", threat, _NORMS)
    check_count(max_queries, "max_queries")
    if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
        raise InvalidConfigError(f"p_init must be a number in (0, 1], got {p_init!r}")
    if loss not in ("margin", "ce"):
        raise InvalidConfigError(f"loss must be 'margin' or 'ce', got {loss!r}")
    if oracle.access.output == "label":
        raise UnsupportedModelError(
            "square needs scores, but the oracle answers with labels only "
            "(QueryAccess(output='label')); give it output='logits' or 'probs', "
            "or use the label-only attack 'hopskipjump'"
        )
    x, y = check_batch(oracle, x, y, threat)
    goal = resolve_goal(y, target, threat, oracle.num_classes)
    probs = oracle.access.output == "probs"
    g = make_generator(seed, x.device)
    eps, bounds, targeted = threat.eps, threat.bounds, threat.targeted
    n = len(x)
    xi = _as_image(x)
    best = xi.clone()
    ledger = QueryLedger(oracle, n, max_queries, x.device)
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    margin_best = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
    loss_best = margin_best.clone()

    def ask(idx: torch.Tensor, cand: torch.Tensor, *, force: bool = False) -> bool:
        """Query ``cand`` for samples ``idx``; keep improvements (all of them when ``force``).
        False once out of budget."""
        scores = ledger.query(cand.reshape(len(idx), *x.shape[1:]), idx)
        if scores is None:
            return False
        margin, value = _margin_and_loss(
            scores, goal[idx], targeted=targeted, loss=loss, probs=probs
        )
        hit = is_success(scores.argmax(dim=1), goal[idx], targeted)
        keep = (value < loss_best[idx]) | hit | force
        kept = idx[keep]
        best[kept] = cand[keep]
        margin_best[kept] = margin[keep]
        loss_best[kept] = value[keep]
        success[idx[hit]] = True
        return True

    # clean inputs: points the oracle already gets wrong are done
    todo = torch.arange(n, device=x.device)
    todo = todo[ledger.fit(todo, torch.ones_like(todo)) > 0]
    if len(todo) and ask(todo, xi[todo]):
        todo = todo[~success[todo]]
        todo = todo[ledger.fit(todo, torch.ones_like(todo)) > 0]
        if len(todo) and eps > 0:
            init = _linf_init if threat.norm == "linf" else _l2_init
            start = _lp.clip_to_bounds(xi[todo] + init(xi[todo], eps, g), bounds)
            start = _lp.project_to_threat(start, xi[todo], threat.norm, eps, bounds)
            ok = ask(todo, start, force=True)  # the paper always starts from it
            step = _linf_step if threat.norm == "linf" else _l2_step
            for it in range(max_queries):
                if not ok:
                    break
                active = todo[~success[todo] & (ledger.left(todo) > 0)]
                remaining = oracle.remaining
                if remaining is not None and remaining < len(active):
                    order = margin_best[active].argsort(stable=True)[: max(remaining, 0)]
                    active = active[order.sort().values]
                if not len(active):
                    break
                p = p_schedule(p_init, it, max_queries)
                cand = step(xi[active], best[active], eps, p, bounds, g)
                cand = _lp.project_to_threat(cand, xi[active], threat.norm, eps, bounds)
                ok = ask(active, cand)
    logger.info("square: %d/%d fooled, %d queries", int(success.sum()), n, int(ledger.used.sum()))
    config = {"max_queries": max_queries, "p_init": p_init, "loss": loss}
    return finalize_oracle(
        oracle,
        x,
        goal,
        best.reshape(x.shape),
        success,
        threat,
        attack="square",
        queries=ledger.used,
        config=config,
        seed=seed,
        started=started,
    )
