"""Norm maths against closed forms."""

from __future__ import annotations

import pytest
import torch

from modelshield.core.seeding import make_generator
from modelshield.evasion import _lp


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_lands_in_ball_and_is_idempotent(norm: str) -> None:
    g = make_generator(0)
    d = torch.randn(16, 3, 5, 5, generator=g) * 3
    p = _lp.project(d, norm, 0.7)
    assert (_lp.lp_norm(p, norm) <= 0.7 + 1e-5).all()
    assert torch.allclose(_lp.project(p, norm, 0.7), p, atol=1e-6)
    small = d * 1e-4
    assert torch.allclose(_lp.project(small, norm, 0.7), small)


def test_l1_projection_is_the_euclidean_projection() -> None:
    """Compare with a brute-force solution: the projection minimises ||p - v||_2 on the ball."""
    g = make_generator(1)
    v = torch.randn(8, 6, generator=g, dtype=torch.float64) * 2
    p = _lp.project(v, "l1", 1.0)
    for _ in range(200):  # no random feasible point is closer than p
        q = _lp.sample_ball((8, 6), "l1", 1.0, generator=g, dtype=torch.float64)
        assert ((v - q).norm(dim=1) >= (v - p).norm(dim=1) - 1e-9).all()
    # closed form for one vector: v = (3, 1), eps = 1 → theta = 1 → (1, 0)
    assert torch.allclose(
        _lp.project(torch.tensor([[3.0, 1.0]]), "l1", 1.0), torch.tensor([[1.0, 0.0]])
    )


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_steepest_ascent_has_unit_norm_and_maximises(norm: str) -> None:
    g = make_generator(2)
    grad = torch.randn(32, 20, generator=g)
    d = _lp.steepest_ascent(grad, norm, l1_sparsity=1.0)
    assert torch.allclose(_lp.lp_norm(d, norm), torch.ones(32), atol=1e-5)
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}[norm]
    # <grad, d> equals the dual norm of grad: the steepest direction attains it
    assert torch.allclose((grad * d).sum(1), _lp.lp_norm(grad, dual), atol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_sample_ball_inside_and_reproducible(norm: str) -> None:
    s1 = _lp.sample_ball((500, 4), norm, 0.3, generator=make_generator(5))
    s2 = _lp.sample_ball((500, 4), norm, 0.3, generator=make_generator(5))
    assert torch.equal(s1, s2)
    r = _lp.lp_norm(s1, norm)
    assert (r <= 0.3 + 1e-6).all()
    # uniform in a 4-d ball: P(r <= eps/2) = 2^-4 for l1/l2 and for linf
    frac = float((r <= 0.15).float().mean())
    assert frac == pytest.approx(1 / 16, abs=0.04)


def test_project_to_threat_respects_bounds() -> None:
    x = torch.full((4, 10), 0.95)
    adv = x + 0.5
    out = _lp.project_to_threat(adv, x, "linf", 0.1, (0.0, 1.0))
    assert out.max() <= 1.0 and (out - x).abs().max() <= 0.1 + 1e-7


def test_uniform_radius_start_spreads_over_distances() -> None:
    s = _lp.sample_ball((4000, 64), "l2", 1.0, generator=make_generator(0), radius="uniform")
    r = _lp.lp_norm(s, "l2")
    assert (r <= 1 + 1e-6).all() and float(r.mean()) == pytest.approx(0.5, abs=0.02)
    v = _lp.sample_ball((4000, 64), "l2", 1.0, generator=make_generator(0))
    assert float(_lp.lp_norm(v, "l2").min()) > 0.8  # volume-uniform: near the sphere in 64-d
    s1 = _lp.sample_ball((4000, 16), "l1", 1.0, generator=make_generator(0), radius="uniform")
    assert float(_lp.lp_norm(s1, "l1").mean()) == pytest.approx(0.5, abs=0.02)
