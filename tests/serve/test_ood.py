"""The ``ood`` stream detector: its KS / chi-square tests against SciPy, its behaviour on
digits streams, alpha spending, blocking over HTTP, and the CLI's reference-data checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from modelshield.core.errors import InvalidConfigError, OracleError
from modelshield.serve.app import Gateway, create_app, load_gateway
from modelshield.serve.defenses import OodDefense, Rejection, parse_defense
from modelshield.serve.detector import (
    OodMonitor,
    alpha_spent,
    chi2_homogeneity,
    kolmogorov_sf,
    ks_2samp,
    ks_2samp_sf,
)
from modelshield.serve.server import serve_in_thread
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, run_cli
from tests.serve.test_app import oracle, post, request
from tests.serve.test_prada import Digits, digits  # noqa: F401  (module fixture)

# -- the statistics ------------------------------------------------------------------------


def test_ks_exact_p_value_matches_scipy_on_many_pairs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(250):
        n, m = (int(v) for v in rng.integers(1, 130, size=2))
        x = rng.normal(size=n)
        y = rng.normal(loc=rng.uniform(0.0, 1.5), scale=rng.uniform(0.5, 2.0), size=m)
        if rng.uniform() < 0.2:  # ties
            x, y = np.round(x), np.round(y)
        ours = ks_2samp(x, y)
        ref = stats.ks_2samp(x, y, method="exact")
        assert ours.exact
        assert ours.d == pytest.approx(ref.statistic, abs=1e-12)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300), (n, m)
    # the sizes the gateway sees (a client's window against a reference set), tiny p too
    for n, m, shift in ((3000, 225, 0.05), (500, 225, 0.15), (225, 225, 0.5), (60, 1000, 0.3)):
        x, y = rng.uniform(size=n), rng.uniform(size=m) ** (1 + shift)
        ours, ref = ks_2samp(x, y), stats.ks_2samp(x, y, method="exact")
        assert ours.exact and ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_ks_asymptotic_and_kolmogorov_tail() -> None:
    for lam in (0.2, 0.5, 0.8, 0.99, 1.0, 1.3, 2.0, 3.5, 5.0):
        assert kolmogorov_sf(lam) == pytest.approx(stats.kstwobign.sf(lam), rel=1e-10, abs=1e-15)
    # Stephens's corrected limit is close to the exact law for large samples
    rng = np.random.default_rng(1)
    for n, m in ((2000, 1500), (5000, 300), (400, 400)):
        x, y = rng.uniform(size=n), rng.uniform(size=m) ** 1.15
        exact = stats.ks_2samp(x, y, method="exact").pvalue
        ours = ks_2samp(x, y, exact=False)
        assert not ours.exact and ours.p_value == pytest.approx(exact, rel=0.1)
    assert ks_2samp_sf(0.0, 10, 10) == (1.0, True)
    assert ks_2samp_sf(1.0, 3, 3)[0] == pytest.approx(0.1)  # 2 / C(6, 3)


def test_chi2_homogeneity_matches_scipy() -> None:
    rng = np.random.default_rng(2)
    for _ in range(30):
        k = int(rng.integers(2, 11))
        a = rng.integers(10, 200, size=k)
        b = rng.integers(10, 200, size=k)
        stat, p, df = chi2_homogeneity(a, b)
        ref = stats.chi2_contingency(np.stack([a, b]), correction=False)
        assert df == k - 1
        assert stat == pytest.approx(ref.statistic, rel=1e-10)
        assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    # sparse categories are pooled; an empty side gives no evidence
    stat, p, df = chi2_homogeneity([500, 500, 1, 0], [50, 50, 1, 0])
    assert df == 1 and p > 0.5
    assert chi2_homogeneity([0, 0], [3, 4]) == (0.0, 1.0, 0)


def test_alpha_spending_levels_sum_to_alpha() -> None:
    levels = [alpha_spent(0.01, k) for k in range(1, 200_001)]
    assert levels[0] == pytest.approx(0.01 * 6 / math.pi**2)
    assert sum(levels) < 0.01 and sum(levels) == pytest.approx(0.01, rel=1e-4)


# -- the monitor on digits -----------------------------------------------------------------


def _feed(d: OodDefense, client: str, x: torch.Tensor, clf: Any, batch: int = 50) -> None:
    with torch.no_grad():
        probs = torch.softmax(clf(x).double(), dim=1)
    for i in range(0, len(x), batch):
        d.observe(client, x[i : i + batch], probs[i : i + batch].argmax(1), probs[i : i + batch])


def test_ood_flags_noise_and_class_skewed_streams_not_iid_digits(digits: Digits) -> None:  # noqa: F811
    ref, rest = digits.holdout_x[:300], digits.holdout_x[300:]
    d = OodDefense(1e-4, reference=ref)
    Gateway(digits.clf, [d])  # binds the reference
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        _feed(d, f"user{seed}", rest[torch.randperm(len(rest), generator=g)[:480]], digits.clf)
        assert not d.flagged(f"user{seed}"), d.client_stats(f"user{seed}")
        _feed(d, f"noise{seed}", torch.rand(300, 1, 8, 8, generator=g), digits.clf)
        stats_ = d.client_stats(f"noise{seed}")
        assert stats_ is not None and stats_["flagged"] and stats_["flagged_at"] == 100
    # natural digits of three classes only: confidences look normal, the histogram does not
    labels = digits.labels(rest)
    skewed = rest[(labels == 0) | (labels == 1) | (labels == 7)][:150]
    _feed(d, "skewed", skewed, digits.clf)
    s = d.client_stats("skewed")
    assert s is not None and s["flagged"] and s["flagged_by"] == "classes", s
    no_classes = OodDefense(1e-4, reference=ref, classes=False)
    Gateway(digits.clf, [no_classes])
    _feed(no_classes, "skewed", skewed, digits.clf)
    assert not no_classes.flagged("skewed")


class _FakeModel:
    """A cheap 4-feature, 5-class softmax model (a fixed random linear map)."""

    input_shape = (4,)
    num_classes = 5

    def __init__(self) -> None:
        self.w = 2.0 * torch.randn(4, 5, generator=torch.Generator().manual_seed(0))

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(x.double() @ self.w.double(), dim=1)
        return probs, probs.argmax(1)


def test_alpha_spending_keeps_benign_false_flags_below_alpha() -> None:
    """200 clients drawn i.i.d. from the reference distribution, tested 4 times each."""
    alpha, clients = 0.2, 200
    model = _FakeModel()
    g = torch.Generator().manual_seed(1)
    flagged = 0
    for r in range(4):  # four reference draws (the guarantee is over the reference too)
        d = OodDefense(
            alpha, reference=torch.randn(150, 4, generator=g), min_samples=50, test_every=100
        )
        d.bind(model)
        for c in range(clients // 4):
            x = torch.randn(400, 4, generator=g)
            probs, labels = model.predict(x)
            d.observe(f"c{r}-{c}", x, labels, probs)
            s = d.client_stats(f"c{r}-{c}")
            assert s is not None and s["tests"] == (4 if not s["flagged"] else s["tests"])
            flagged += d.flagged(f"c{r}-{c}")
    assert flagged <= alpha * clients, flagged
    # a shifted stream is caught at the same settings
    d = OodDefense(alpha, reference=torch.randn(150, 4, generator=g), min_samples=50)
    d.bind(model)
    x = 0.3 * torch.randn(400, 4, generator=g)
    probs, labels = model.predict(x)
    d.observe("shifted", x, labels, probs)
    assert d.flagged("shifted")


def test_ood_needs_a_reference_and_validates_its_options() -> None:
    with pytest.raises(InvalidConfigError, match="needs a reference set"):
        Gateway(_classifier(), ["ood=1e-3"])
    for spec, match in (
        ("ood=0", "ood alpha"),
        ("ood=1", "ood alpha"),
        ("ood=1e-3,action=kill", "flag or block"),
        ("ood=1e-3,min_samples=5", "min_samples"),
        ("ood=1e-3,window=50", "window"),
        ("ood=1e-3,classes=maybe", "true or false"),
        ("ood=1e-3,delta=2", "no option 'delta'"),
    ):
        with pytest.raises(InvalidConfigError, match=match):
            parse_defense(spec)
    d = OodDefense(1e-3, reference=torch.randn(5, 4))
    with pytest.raises(InvalidConfigError, match="at least 20"):
        d.bind(_FakeModel())
    d = OodDefense(1e-3, reference=torch.randn(40, 3))
    with pytest.raises(InvalidConfigError, match="shape"):
        d.bind(_FakeModel())
    with pytest.raises(InvalidConfigError, match="before the gateway bound it"):
        OodDefense(1e-3).observe("x", torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InvalidConfigError, match="labels only"):
        OodMonitor(None, torch.zeros(3, dtype=torch.long), 3, classes=False)


def _classifier() -> Any:
    from modelshield.core.classifier import from_torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 5))
    return from_torch(net, input_shape=(4,), num_classes=5)


# -- over HTTP and the CLI -----------------------------------------------------------------


@pytest.mark.network
def test_ood_block_over_http_refuses_with_a_code_and_spends_nothing(bundle: Bundle) -> None:
    x = torch.from_numpy(np.load(bundle.data)["x"])
    ood = OodDefense(1e-3, reference=x[:60], action="block", min_samples=40, test_every=20)
    gateway = load_gateway(str(bundle.model_pt2), [ood, "budget=1000"])
    url, stop = serve_in_thread(create_app(gateway))
    try:
        # one request at a time, no retries: a request that timed out under load and was
        # sent again would be counted twice and move the first test's sample
        steady = {"batch_size": 20, "max_concurrency": 1, "retries": 1, "timeout": 120.0}
        honest = oracle(url, "alice", **steady)
        honest.query(x[60:])  # 60 in-distribution queries: served
        attacker = oracle(url, "mallory", **steady)
        noise = torch.rand(200, 1, 6, 6, generator=torch.Generator().manual_seed(0))
        with pytest.raises(OracleError, match=r"HTTP 403.*extraction_suspected"):
            attacker.query(noise)
        status, _, stats1 = request(url + "/stats")
        mallory = stats1["clients"]["mallory"]
        assert mallory["ood"]["flagged"] is True and mallory["ood"]["flagged_at"] == 40
        assert mallory["ood"]["action"] == "block"
        assert stats1["flagged"] == ["mallory"]
        assert stats1["clients"]["alice"]["ood"]["flagged"] is False
        status, _, body = post(url, {"inputs": x[:1].tolist()}, client="mallory")
        assert status == 403 and body["code"] == "extraction_suspected"
        _, _, stats2 = request(url + "/stats")
        # the refused request spent nothing (budget, ood counts)
        assert stats2["clients"]["mallory"]["budget"] == mallory["budget"]
        assert stats2["clients"]["mallory"]["ood"]["queries"] == mallory["ood"]["queries"]
        ood_cfg = next(d for d in stats2["defenses"] if d["name"] == "ood")
        assert ood_cfg["reference_size"] == 60 and ood_cfg["alpha"] == 1e-3
        _, _, info = request(url + "/info")
        assert {"name": "ood"} in info["defenses"]  # no thresholds shown publicly
    finally:
        stop()


@pytest.mark.network
def test_cli_ood_needs_reference_data(bundle: Bundle) -> None:
    model = str(bundle.model_pt2)
    assert_one_line_error(
        run_cli("serve", "--model", model, "--defense", "ood=1e-4"),
        "--defense ood needs --reference-data PATH",
    )
    assert_one_line_error(
        run_cli("serve", "--model", model, "--reference-data", str(bundle.data)),
        "--reference-data is only used by --defense ood",
    )


def test_rejection_of_flagging_request_in_process(digits: Digits) -> None:  # noqa: F811
    gw = Gateway(digits.clf, [OodDefense(1e-4, reference=digits.holdout_x[:300], action="block")])
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    gw.predict("mallory", noise[:60])
    with pytest.raises(Rejection) as info:
        gw.predict("mallory", noise[60:120])  # crosses query 100: the test flags it
    assert info.value.status == 403 and info.value.code == "extraction_suspected"
    assert gw.stats()["clients"]["mallory"]["rejected"] == {"extraction_suspected": 1}
