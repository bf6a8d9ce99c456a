"""HopSkipJump (Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient
Decision-Based Attack", IEEE S&P 2020), L2 and L∞, from labels only.

A minimum-norm attack that sees only the oracle's top-1 label ``φ(x') = 1`` iff ``x'`` is
adversarial. Per sample, in lockstep over the batch:

1. **Start** from an adversarial point: ``starting_points`` when given and adversarial,
   else uniform noise in ``bounds`` (redrawn up to 100 times), blended towards ``x`` by a
   binary search on the blend weight (to 1e-3).
2. **Binary search** to the boundary between ``x`` and that point: for L2 on the blend
   weight ``α`` of ``(1−α)·x + α·x̃``, to ``θ = γ/d^{3/2}``; for L∞ on the radius ``α`` of
   the box ``[x−α, x+α]`` the point is clipped to, to ``min(θ·dist, θ)`` with ``θ = γ/d²``.
3. **Gradient direction** at the boundary point ``x_t``: ``B_t = min(init_evals·√t,
   max_evals)`` sign queries at ``x_t + δ_t·u_b`` with ``u_b`` random unit vectors
   (Gaussian for L2, uniform in the cube for L∞, both L2-normalised; clipped to bounds),
   ``δ_1 = 0.1·(hi−lo)``, then ``δ_t = √d·θ·d_{t−1}`` (L2) or ``d·θ·d_{t−1}`` (L∞);
   the estimate ``Σ (φ_b − mean φ)·u_b`` (the baseline dropped when all answers agree)
   gives the update direction ``v_t``: its normalisation (L2) or its sign (L∞).
4. **Geometric step**: ``ξ = d_t/√t``, halved (at most 30 times) until ``x_t + ξ·v_t``
   (clipped) is adversarial; then back to 2. The loop runs ``steps`` times or until the
   sample's budget cannot pay a gradient estimate plus a binary search.

Every point kept is one the oracle labelled adversarial, so the attack always holds a
verified adversarial point per sample and keeps the closest one seen. The returned point
is that closest point when its distance is ≤ ``threat.eps``, else the clean input with
success False (the guard's projection would otherwise move an unverified point). Points
the oracle already gets wrong are returned as they are (distance 0, success). To read off
plain minimal distances, pass an eps no point can exceed, e.g. ``(hi−lo)·√d`` for L2.

Queries: ``max_queries`` per sample, including its clean query; each oracle call asks
for no more rows than ``oracle.remaining``, and when the oracle's budget is spent the
attack stops and reports the verified points it holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from modelshield.core.errors import DataError, InvalidConfigError
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

_NORMS = ("l2", "linf")
_INIT_TRIES = 100  # noise draws per sample for a random adversarial start
_INIT_TOL = 1e-3  # blend-weight precision of the first binary search
_MAX_HALVINGS = 30  # geometric step-size search
_MAX_ROUNDS = 64  # binary-search rounds (a guard; the thresholds stop it much earlier)
_MAX_ELEMENTS = 1 << 24  # floats per gradient-estimation query (memory cap)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class _Search:
    """What the lockstep phases share: inputs, goal, oracle ledger, generator."""

    def __init__(
        self,
        x: torch.Tensor,
        goal: torch.Tensor,
        threat: LpThreat,
        ledger: QueryLedger,
        g: torch.Generator,
    ) -> None:
        self.x, self.goal, self.threat, self.ledger, self.g = x, goal, threat, ledger, g

    def adversarial(self, rows: torch.Tensor, owners: torch.Tensor) -> torch.Tensor | None:
        """The oracle's verdict on ``rows`` (labels only), or None once out of budget."""
        out = self.ledger.query(rows, owners)
        if out is None:
            return None
        labels = out if out.ndim == 1 else out.argmax(dim=1)
        return is_success(labels, self.goal[owners], self.threat.targeted)

    def affordable(self, idx: torch.Tensor, rows: int = 1) -> torch.Tensor:
        """The samples of ``idx`` that may send ``rows`` rows each now (oracle budget first come)."""
        want = torch.full_like(idx, rows)
        return idx[self.ledger.fit(idx, want) >= rows]

    def bisect(
        self,
        idx: torch.Tensor,
        base: torch.Tensor,
        project: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        high: torch.Tensor,
        tol: torch.Tensor,
    ) -> torch.Tensor:
        """Binary search on ``α ∈ [0, high]`` for the adversarial ``project(x, base, α)``
        closest to ``x``; ``base`` (= α at ``high``) is adversarial. Returns, per sample,
        the last point the oracle labelled adversarial."""
        x = self.x[idx]
        low = torch.zeros_like(high)
        out = base.clone()
        for _ in range(_MAX_ROUNDS):
            live = ((high - low) > tol).nonzero().squeeze(1)
            live = live[self.ledger.fit(idx[live], torch.ones_like(live)) > 0]
            if not len(live):
                break
            mid = (high[live] + low[live]) / 2
            pts = _lp.clip_to_bounds(project(x[live], base[live], mid), self.threat.bounds)
            adv = self.adversarial(pts, idx[live])
            if adv is None:
                break
            high[live] = torch.where(adv, mid, high[live])
            low[live] = torch.where(adv, low[live], mid)
            out[live[adv]] = pts[adv]
        return out


def _blend(x: torch.Tensor, base: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    a = _bcast(alpha, x)
    return (1 - a) * x + a * base


def _box(x: torch.Tensor, base: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x + _lp.project(base - x, "linf", alpha)


@register_attack("hopskipjump", access="label", norms=_NORMS, minimal=True)
def hopskipjump(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threat: LpThreat,
    max_queries: int = 5000,
    steps: int = 64,
    init_evals: int = 100,
    max_evals: int = 10_000,
    gamma: float = 1.0,
    seed: int | None = 0,
    target: torch.Tensor | None = None,
    starting_points: torch.Tensor | None = None,
) -> AttackResult:
    """HopSkipJump, decision-based minimum-norm attack (Chen, Jordan & Wainwright, S&P 2020).

    ``max_queries`` per sample (clean query included); ``steps`` iterations at most;
    gradient estimates use ``min(init_evals·√t, max_evals)`` queries; ``gamma`` sets the
    binary-search precision. ``starting_points`` (adversarial inputs, e.g. images of the
    target class) seed a targeted attack, where random noise rarely hits the target.
    """
    started = time.perf_counter()
    oracle = require_oracle(oracle, "hopskipjump")
    check_norm("hopskipjump", threat, _NORMS)
    check_count(max_queries, "max_queries")
    check_count(steps, "steps")
    check_count(init_evals, "init_evals")
    check_count(max_evals, "max_evals")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise InvalidConfigError(f"gamma must be a number > 0, got {gamma!r}")
    if not math.isfinite(gamma):
        raise InvalidConfigError(f"gamma must be finite, got {gamma!r}")
    x, y = check_batch(oracle, x, y, threat)
    goal = resolve_goal(y, target, threat, oracle.num_classes)
    if starting_points is not None:
        if not isinstance(starting_points, torch.Tensor) or starting_points.shape != x.shape:
            shape = (
                tuple(starting_points.shape)
                if isinstance(starting_points, torch.Tensor)
                else type(starting_points).__name__
            )
            raise DataError(f"starting_points must have shape {tuple(x.shape)}, got {shape}")
        starting_points = _lp.clip_to_bounds(
            starting_points.to(device=x.device, dtype=x.dtype), threat.bounds
        )
    norm, bounds = threat.norm, threat.bounds
    n = len(x)
    d = x[0].numel() if n else 1
    theta = gamma / (d * math.sqrt(d)) if norm == "l2" else gamma / d**2
    project = _blend if norm == "l2" else _box
    g = make_generator(seed, x.device)
    ledger = QueryLedger(oracle, n, max_queries, x.device)
    search = _Search(x, goal, threat, ledger, g)

    best = x.clone()
    best_dist = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
    have = torch.zeros(n, dtype=torch.bool, device=x.device)  # holds a verified point
    cur = x.clone()  # current boundary point (verified adversarial where ``have``)

    def keep(idx: torch.Tensor, pts: torch.Tensor) -> None:
        """Make ``pts`` the current points of ``idx`` and remember the closest."""
        cur[idx] = pts
        have[idx] = True
        dist = _lp.lp_norm(pts - x[idx], norm)
        closer = dist < best_dist[idx]
        best[idx[closer]] = pts[closer]
        best_dist[idx[closer]] = dist[closer]

    def to_boundary(idx: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        """Step 2: binary search from verified adversarial ``pts`` towards ``x``."""
        if norm == "l2":
            high = torch.ones(len(idx), dtype=x.dtype, device=x.device)
            tol = torch.full_like(high, theta)
        else:
            high = _lp.lp_norm(pts - x[idx], "linf")
            tol = (high * theta).clamp_max(theta)
        return search.bisect(idx, pts, project, high, tol)

    # clean inputs: points the oracle already gets wrong are done (distance 0)
    todo = search.affordable(torch.arange(n, device=x.device))
    adv = search.adversarial(x[todo], todo) if len(todo) else None
    fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
    if adv is not None:
        fooled[todo[adv]] = True
        best_dist[todo[adv]] = 0.0
        todo = todo[~adv]
    else:
        todo = todo[:0]

    # step 1: a verified adversarial start
    if len(todo) and starting_points is not None:
        idx = search.affordable(todo)
        ok = search.adversarial(starting_points[idx], idx) if len(idx) else None
        if ok is not None:
            cur[idx[ok]] = starting_points[idx[ok]]
            have[idx[ok]] = True
    for _ in range(_INIT_TRIES):
        idx = search.affordable(todo[~have[todo]])
        if not len(idx):
            break
        noise = bounds[0] + (bounds[1] - bounds[0]) * torch.rand(
            (len(idx), *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype
        )
        ok = search.adversarial(noise, idx)
        if ok is None:
            break
        cur[idx[ok]] = noise[ok]
        have[idx[ok]] = True
    todo = todo[have[todo]]
    if len(todo):
        ones = torch.ones(len(todo), dtype=x.dtype, device=x.device)
        pts = search.bisect(todo, cur[todo], _blend, ones, torch.full_like(ones, _INIT_TOL))
        keep(todo, to_boundary(todo, pts))

    # steps 3-4, then 2 again
    span = bounds[1] - bounds[0]
    bisect_cost = math.ceil(math.log2(max(1.0, span) / theta)) + 2
    for t in range(1, steps + 1):
        if not len(todo) or ledger.exhausted:
            break
        evals = min(int(init_evals * math.sqrt(t)), max_evals)
        dist = _lp.lp_norm(cur[todo] - x[todo], norm)
        if t == 1:
            delta = torch.full_like(dist, 0.1 * span)
        else:
            delta = (math.sqrt(d) if norm == "l2" else d) * theta * dist
        own = torch.minimum(
            torch.full_like(todo, evals), ledger.left(todo) - bisect_cost
        ).clamp_min(0)
        counts = ledger.fit(todo, own)
        go = counts > 0
        idx, counts, delta, dist = todo[go], counts[go], delta[go], dist[go]
        if not len(idx):
            break
        grad = _estimate_gradient(search, idx, cur[idx], counts, delta)
        if grad is None:
            break
        update = _lp.steepest_ascent(grad, norm)
        # geometric step-size search from ξ = d_t/√t
        xi = dist / math.sqrt(t)
        stepped = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
        moved = cur[idx].clone()
        for _ in range(_MAX_HALVINGS):
            live = (~stepped).nonzero().squeeze(1)
            live = live[ledger.fit(idx[live], torch.ones_like(live)) > 0]
            if not len(live):
                break
            cand = _lp.clip_to_bounds(
                cur[idx[live]] + _bcast(xi[live], update) * update[live], bounds
            )
            ok = search.adversarial(cand, idx[live])
            if ok is None:
                break
            stepped[live[ok]] = True
            moved[live[ok]] = cand[ok]
            xi[live[~ok]] /= 2
        if bool(stepped.any()):
            sidx = idx[stepped]
            keep(sidx, to_boundary(sidx, moved[stepped]))

    success = fooled | (have & (best_dist <= threat.eps))
    x_adv = torch.where(_bcast(success & ~fooled, x), best, x)
    logger.info(
        "hopskipjump: %d/%d within eps=%g, median distance %.4g, %d queries",
        int(success.sum()),
        n,
        threat.eps,
        float(best_dist[have].median()) if bool(have.any()) else math.nan,
        int(ledger.used.sum()),
    )
    config = {
        "max_queries": max_queries,
        "steps": steps,
        "init_evals": init_evals,
        "max_evals": max_evals,
        "gamma": gamma,
        "starting_points": starting_points is not None,
    }
    return finalize_oracle(
        oracle,
        x,
        goal,
        x_adv,
        success,
        threat,
        attack="hopskipjump",
        queries=ledger.used,
        config=config,
        seed=seed,
        started=started,
    )


def _estimate_gradient(
    search: _Search,
    idx: torch.Tensor,
    points: torch.Tensor,
    counts: torch.Tensor,
    delta: torch.Tensor,
) -> torch.Tensor | None:
    """Monte Carlo estimate of the boundary normal at ``points`` from ``counts[i]`` sign
    queries each, with baseline subtraction (paper Eq. 9). Queries go out in chunks."""
    x, threat = search.x, search.threat
    owner = torch.repeat_interleave(torch.arange(len(idx), device=x.device), counts)
    shape = points.shape[1:]
    d = points[0].numel()
    chunk = max(1, _MAX_ELEMENTS // d)
    sum_fu = torch.zeros_like(points)
    sum_u = torch.zeros_like(points)
    sum_f = torch.zeros(len(idx), dtype=x.dtype, device=x.device)
    for start in range(0, len(owner), chunk):
        who = owner[start : start + chunk]
        if threat.norm == "l2":
            u = torch.randn((len(who), *shape), generator=search.g, device=x.device, dtype=x.dtype)
        else:
            u = (
                2
                * torch.rand((len(who), *shape), generator=search.g, device=x.device, dtype=x.dtype)
                - 1
            )
        u = u / _bcast(_lp.lp_norm(u, "l2").clamp_min(1e-12), u)
        dl = _bcast(delta[who], u)
        probe = _lp.clip_to_bounds(points[who] + dl * u, threat.bounds)
        u = (probe - points[who]) / dl
        adv = search.adversarial(probe, idx[who])
        if adv is None:
            return None
        f = adv.to(x.dtype) * 2 - 1
        sum_fu.index_add_(0, who, _bcast(f, u) * u)
        sum_u.index_add_(0, who, u)
        sum_f.index_add_(0, who, f)
    k = counts.to(x.dtype)
    mean_f = sum_f / k
    agree = mean_f.abs() == 1
    # all answers equal: the mean direction itself (towards adversarial, or away)
    grad = torch.where(
        _bcast(agree, points),
        _bcast(mean_f, points) * sum_u,
        sum_fu - _bcast(mean_f, points) * sum_u,
    ) / _bcast(k, points)
    return _lp.steepest_ascent(grad, "l2")
