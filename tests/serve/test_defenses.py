"""Gateway defences as objects: parsing, each transform, admission state, the Gateway core."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.classifier import from_torch
from modelshield.core.errors import InvalidConfigError, UnknownComponentError
from modelshield.core.registry import get_registry
from modelshield.serve.app import Gateway, to_batch
from modelshield.serve.defenses import (
    GATEWAY_DEFENSES,
    BudgetDefense,
    LabelOnlyDefense,
    NoiseDefense,
    PradaDefense,
    RateLimitDefense,
    Rejection,
    ReverseSigmoidDefense,
    RoundDefense,
    TopKDefense,
    parse_defense,
    parse_defenses,
)


def _probs(n: int = 200, c: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)


# -- parsing ------------------------------------------------------------------------------
def test_registry_lists_every_defence() -> None:
    assert get_registry("gateway-defenses") is GATEWAY_DEFENSES
    assert GATEWAY_DEFENSES.names() == sorted(
        [
            "budget",
            "label-only",
            "noise",
            "ood",
            "prada",
            "rate",
            "reverse-sigmoid",
            "round",
            "top-k",
        ]
    )
    assert all(GATEWAY_DEFENSES.describe(n) for n in GATEWAY_DEFENSES.names())


@pytest.mark.parametrize(
    ("spec", "cls", "attrs"),
    [
        ("label-only", LabelOnlyDefense, {}),
        ("top-k=1", TopKDefense, {"k": 1}),
        ("round=2", RoundDefense, {"decimals": 2}),
        ("noise=0.05", NoiseDefense, {"sigma": 0.05}),
        ("reverse-sigmoid=0.5,gamma=0.2", ReverseSigmoidDefense, {"beta": 0.5, "gamma": 0.2}),
        ("rate=10/s", RateLimitDefense, {"rate": 10.0, "burst": 10.0}),
        ("rate=600/min,burst=64", RateLimitDefense, {"rate": 10.0, "burst": 64.0}),
        ("rate=0.5", RateLimitDefense, {"rate": 0.5, "burst": 1.0}),
        ("budget=5000", BudgetDefense, {"limit": 5000}),
        ("prada=0.95,action=block", PradaDefense, {"delta": 0.95, "action": "block"}),
        (" PRADA ", PradaDefense, {"delta": 0.9, "action": "flag"}),
    ],
)
def test_parse(spec: str, cls: type, attrs: dict[str, object]) -> None:
    d = parse_defense(spec)
    assert type(d) is cls
    for k, v in attrs.items():
        assert getattr(d, k) == v


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("top-k=0", "top-k k must be an integer >= 1, got '0'"),
        ("top-k", "top-k k must be an integer"),
        ("round=x", "round decimals must be an integer >= 0 and <= 8"),
        ("round=9", "round decimals"),
        ("noise=-1", "noise sigma must be a number > 0"),
        ("rate=10/fortnight", "rate unit must be one of"),
        ("rate", "rate needs a value"),
        ("rate=10/s,burst=0.5", "rate burst must be a number >= 1"),
        ("budget=1.5", "budget must be an integer >= 1"),
        ("prada=1.5", "prada delta must be a number > 0 and <= 1"),
        ("prada=0.9,action=ban", "prada action must be flag or block"),
        ("prada=0.9,min_samples=2", "prada min_samples"),
        ("top-k=1,foo=2", "defence 'top-k' has no option 'foo'"),
        ("rate=10/s,burst", "options are written KEY=VALUE"),
        ("label-only=3", "label-only takes no value"),
        ("", "NAME"),
    ],
)
def test_parse_errors_name_the_value(spec: str, match: str) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        parse_defense(spec)


def test_unknown_defence_lists_known_ones() -> None:
    with pytest.raises(
        UnknownComponentError, match=r"did you mean 'top-k'.*known: budget, label-only"
    ):
        parse_defense("topk=1")
    with pytest.raises(InvalidConfigError, match="'round' is given more than once"):
        parse_defenses(["round=1", "round=2"])


# -- output defences ------------------------------------------------------------------------
def test_top_k_keeps_the_k_largest_and_zeros_the_rest() -> None:
    p = _probs()
    out = TopKDefense(3).apply(p)
    assert ((out > 0).sum(dim=1) == 3).all()
    top = p.topk(3, dim=1)
    assert torch.equal(out.gather(1, top.indices), top.values)
    assert torch.equal(TopKDefense(10).apply(p), p)


def test_round() -> None:
    out = RoundDefense(2).apply(_probs()).numpy()
    np.testing.assert_allclose(out, np.round(out, 2), atol=1e-12)
    assert np.abs(out - _probs().numpy()).max() <= 0.005 + 1e-12


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_noise_keeps_top1_and_sums_to_one(sigma: float) -> None:
    p = _probs(500)
    out = NoiseDefense(sigma, seed=1).apply(p)
    assert torch.equal(out.argmax(dim=1), p.argmax(dim=1))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(500, dtype=torch.float64))
    assert (out >= 0).all() and not torch.equal(out, p)
    # relative noise of about sigma (for small sigma): log-ratio has sd ~ sigma
    if sigma == 0.05:
        ratio = torch.log(out / p)
        ratio = ratio - ratio.mean(dim=1, keepdim=True)
        assert 0.03 < float(ratio.std()) < 0.07
    assert torch.equal(NoiseDefense(sigma, seed=1).apply(p), out)  # a seed reproduces
    assert not torch.equal(NoiseDefense(sigma).apply(p), out)  # else CSPRNG-seeded


def test_reverse_sigmoid_matches_art_formula() -> None:
    pp = pytest.importorskip("art.defences.postprocessor")
    p = _probs(300)
    for beta, gamma in [(0.3, 0.1), (1.0, 0.5), (0.05, 1.0)]:
        ours = ReverseSigmoidDefense(beta, gamma, keep_top1=False).apply(p).numpy()
        ref = pp.ReverseSigmoid(beta=beta, gamma=gamma)(p.numpy())
        np.testing.assert_allclose(ours, ref, atol=1e-9)
        kept = ReverseSigmoidDefense(beta, gamma).apply(p)
        assert torch.equal(kept.argmax(dim=1), p.argmax(dim=1))
        torch.testing.assert_close(kept.sum(dim=1), torch.ones(300, dtype=torch.float64))


def test_label_only() -> None:
    p = _probs()
    out = LabelOnlyDefense().apply(p)
    assert out.dtype == torch.long and torch.equal(out, p.argmax(dim=1))


# -- admission ------------------------------------------------------------------------------
def test_rate_limit_token_bucket() -> None:
    rate = RateLimitDefense(10.0, burst=10)
    assert rate.check("a", 10, 0.0) is None
    rate.commit("a", 10, 0.0)
    refusal = rate.check("a", 1, 0.0)
    assert isinstance(refusal, Rejection) and refusal.status == 429
    assert refusal.retry_after == pytest.approx(0.1)
    assert rate.check("b", 5, 0.0) is None  # per client
    assert rate.check("a", 5, 0.5) is None  # refilled 5 tokens
    rate.commit("a", 5, 0.5)
    # a batch larger than the burst waits for a full bucket, then drives it negative
    big = rate.check("a", 50, 0.6)
    assert big is not None and big.retry_after == pytest.approx(0.9)
    assert rate.check("a", 50, 1.5) is None
    rate.commit("a", 50, 1.5)
    later = rate.check("a", 1, 1.5)
    assert later is not None and later.retry_after == pytest.approx(4.1)
    # long-run rate: 100 rows over 10 s
    r2 = RateLimitDefense(10.0)
    t, served = 0.0, 0
    while t < 10.0:
        if r2.check("c", 1, t) is None:
            r2.commit("c", 1, t)
            served += 1
        t += 0.01
    assert 100 <= served <= 111


def test_budget_is_exact_under_concurrency() -> None:
    budget = BudgetDefense(1000)
    lock = threading.Lock()
    served = []

    def worker() -> None:
        for _ in range(100):
            with lock:  # the gateway's admission lock: check then commit
                if budget.check("x", 3, 0.0) is None:
                    budget.commit("x", 3, 0.0)
                    served.append(3)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(served) == 999
    refusal = budget.check("x", 3, 0.0)
    assert refusal is not None and refusal.status == 403 and refusal.code == "budget_exhausted"
    assert "1 left" in refusal.message
    assert budget.headers("x") == {"X-Query-Budget-Remaining": "1"}
    assert budget.check("y", 3, 0.0) is None


# -- the gateway core -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    return from_torch(net, input_shape=(3, 4), num_classes=5)


def test_gateway_applies_output_defences_in_fixed_order(clf) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(64, 3, 4, generator=torch.Generator().manual_seed(0))
    plain = Gateway(clf).predict("a", x).outputs
    gw = Gateway(clf, ["round=2", "top-k=2", "noise=0.1,seed=0"])
    assert [d.name for d in gw.outputs] == ["noise", "top-k", "round"]
    out = gw.predict("a", x)
    assert not out.labels and ((out.outputs > 0).sum(dim=1) <= 2).all()
    # rounding may tie, but the true top class still holds the largest answered value
    top = out.outputs.gather(1, plain.argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.equal(top, out.outputs.max(dim=1).values)
    lab = Gateway(clf, ["label-only", "top-k=1"]).predict("a", x)
    assert lab.labels and torch.equal(lab.outputs, plain.argmax(dim=1))


def test_gateway_refused_request_spends_nothing(clf) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    gw = Gateway(clf, ["budget=10", "rate=5/s"], clock=lambda: now[0])
    x = torch.rand(5, 3, 4)
    assert gw.predict("a", x).headers == {"X-Query-Budget-Remaining": "5"}
    with pytest.raises(Rejection) as exc:
        gw.predict("a", x)  # rate-limited: the budget must not be charged
    assert exc.value.status == 429
    now[0] = 1.0
    assert gw.predict("a", x).headers == {"X-Query-Budget-Remaining": "0"}
    now[0] = 10.0
    with pytest.raises(Rejection) as exc:
        gw.predict("a", x[:1])
    assert exc.value.status == 403
    stats = gw.stats()["clients"]["a"]
    assert stats["queries"] == 10 and stats["budget"] == {"used": 10, "remaining": 0}
    assert stats["rejected"] == {"rate_limited": 1, "budget_exhausted": 1}


def test_gateway_info_shows_no_secrets(clf) -> None:  # type: ignore[no-untyped-def]
    gw = Gateway(clf, ["noise=0.05,seed=1234", "prada=0.93", "budget=100"])
    info = gw.info()
    assert info["input_shape"] == [3, 4] and info["num_classes"] == 5
    assert info["defenses"] == [
        {"name": "noise", "sigma": 0.05},
        {"name": "prada"},
        {"name": "budget", "queries": 100},
    ]
    assert "1234" not in repr(info) and "0.93" not in repr(info)
    assert gw.stats()["defenses"][1]["delta"] == 0.93  # the operator sees it


def test_to_batch_validation() -> None:
    ok = to_batch([[0.1] * 12] * 2, (3, 4))
    assert ok.shape == (2, 3, 4) and ok.dtype == torch.float32
    assert to_batch([], (3, 4)).shape == (0, 3, 4)
    cases = [
        ("x", "a list of samples"),
        ([[0.1] * 11], r"expected \(N, 3, 4\) or \(N, 12\)"),
        ([[0.1] * 12, [0.1] * 11], "rectangular"),
        ([0.1] * 3, r"a batch \(N, ...\)"),
        ([[float("nan")] * 12], "NaN"),
        ([[2.0] * 12], r"must lie in \[0, 1\]"),
        ([["a"] * 12], "rectangular array of numbers"),
        ([[0.1] * 12] * 9, "exceeds the limit of 8"),
    ]
    for values, match in cases:
        with pytest.raises(Rejection, match=match) as exc:
            to_batch(values, (3, 4), bounds=(0.0, 1.0), max_batch=8)
        assert exc.value.status == 422
