"""Black-box evasion: Square Attack (scores) and HopSkipJump (labels) on an Oracle.

References: white-box PGD-50 on the same model, torchattacks' Square and ART's
HopSkipJump at the same budget, and the closed-form distance to a linear boundary.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.oracle import ClassifierOracle, from_classifier
from modelshield.core.threat import LpThreat, QueryAccess
from modelshield.evasion import ATTACKS, _lp, hopskipjump, pgd, square
from modelshield.evasion.square import p_schedule


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and spares a loaded machine oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- models ----------------------------------------------------------------------------------
class Digits:
    """A small CNN trained on the bundled 8×8 digits, and held-out points it gets right."""

    def __init__(self) -> None:
        data = load_dataset("digits")
        perm = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(0))
        train, test = perm[:1300], perm[1300:]
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 16, 10),
        )
        opt = torch.optim.Adam(self.net.parameters(), lr=0.01)
        for _ in range(100):  # full batch, ~2 s on a CPU
            opt.zero_grad()
            nn.functional.cross_entropy(self.net(data.x[train]), data.y[train]).backward()
            opt.step()
        self.net.eval()
        self.clf = from_torch(self.net, input_shape=(1, 8, 8), num_classes=10)
        x, y = data.x[test], data.y[test]
        right = self.clf.predict(x) == y
        self.x, self.y = x[right][:200], y[right][:200]

    def oracle(self, output: str = "logits", max_queries: int | None = None) -> ClassifierOracle:
        return from_classifier(self.clf, QueryAccess(output=output, max_queries=max_queries))


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def linear_binary(w: torch.Tensor, b: float) -> Classifier:
    """Logits (0, w·x + b): class 1 iff w·x + b > 0."""
    lin = nn.Linear(len(w), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = w
        lin.bias[1] = b
    return from_torch(lin, input_shape=(len(w),))


def flat_mlp() -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """An MLP on flat (N, 64) digits, with points it gets right."""
    data = load_dataset("digits")
    x, y = data.x.reshape(len(data.x), -1), data.y
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:1300]), y[:1300]).backward()
        opt.step()
    clf = from_torch(net.eval(), input_shape=(64,), num_classes=10)
    xt, yt = x[1300:1400], y[1300:1400]
    right = clf.predict(xt) == yt
    return clf, xt[right], yt[right]


def verified(model: Classifier, r: Any, x: torch.Tensor, goal: torch.Tensor, threat: LpThreat):
    """The result keeps the threat set and its success is the model's own verdict."""
    assert r.x_adv.shape == x.shape and r.x_adv.dtype == x.dtype
    assert (_lp.lp_norm(r.x_adv - x, threat.norm) <= threat.eps * (1 + 1e-5) + 1e-6).all()
    assert r.x_adv.min() >= threat.bounds[0] and r.x_adv.max() <= threat.bounds[1]
    pred = model.predict(r.x_adv)
    expected = pred == goal if threat.targeted else pred != goal
    assert torch.equal(r.success, expected)


# -- Square Attack: strength against white-box PGD and against torchattacks --------------------
def test_p_schedule_is_the_papers_rescaled() -> None:
    assert p_schedule(0.8, 0, 10_000) == 0.8
    assert p_schedule(0.8, 10, 10_000) == 0.8
    assert p_schedule(0.8, 11, 10_000) == 0.4
    assert p_schedule(0.8, 500, 10_000) == 0.1
    assert p_schedule(0.8, 9000, 10_000) == 0.8 / 512
    # rescaled to the budget: iteration 100 of 1000 is iteration 1000 of 10 000
    assert p_schedule(0.8, 100, 1000) == p_schedule(0.8, 1000, 10_000) == 0.05


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_square_close_to_white_box_pgd(digits: Digits, norm: str, eps: float) -> None:
    threat = LpThreat(norm, eps)
    oracle = digits.oracle("logits")
    r = square(oracle, digits.x, digits.y, threat=threat, max_queries=1000)
    verified(digits.clf, r, digits.x, digits.y, threat)
    white = pgd(digits.clf, digits.x, digits.y, threat=threat, steps=50)
    assert 0.0 < white.robust_accuracy < 0.6  # a moderate eps: neither trivial nor hopeless
    assert r.robust_accuracy <= white.robust_accuracy + 0.05
    assert (r.queries <= 1000).all()
    assert int(r.queries.sum()) == oracle.queries_used
    # fooled points stop early: the attack does not spend its budget on them
    assert float(r.queries[r.success].float().median()) < 200


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.75)])
def test_square_at_least_as_strong_as_torchattacks(digits: Digits, norm: str, eps: float) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    threat = LpThreat(norm, eps)
    ours = square(digits.oracle("logits"), digits.x, digits.y, threat=threat, max_queries=1000)
    peer = torchattacks.Square(
        digits.net, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=1000, seed=0
    )
    x_peer = peer(digits.x, digits.y)
    theirs = float((digits.clf.predict(x_peer) == digits.y).float().mean())
    assert len(digits.x) >= 180
    assert ours.robust_accuracy <= theirs + 0.02


def test_square_on_probabilities_and_targeted(digits: Digits) -> None:
    x, y = digits.x[:60], digits.y[:60]
    threat = LpThreat("linf", 0.1)
    on_probs = square(digits.oracle("probs"), x, y, threat=threat, max_queries=500)
    on_logits = square(digits.oracle("logits"), x, y, threat=threat, max_queries=500)
    verified(digits.clf, on_probs, x, y, threat)
    # log-probabilities give the logit margin: the same search, nearly the same outcome
    assert abs(on_probs.robust_accuracy - on_logits.robust_accuracy) <= 0.05

    target = (y + 1) % 10
    targeted = LpThreat("linf", 0.2, targeted=True)
    r = square(digits.oracle("probs"), x, y, threat=targeted, target=target, max_queries=500)
    verified(digits.clf, r, x, target, targeted)
    assert r.success_rate > 0.3
    with pytest.raises(InvalidConfigError, match="target"):
        square(digits.oracle(), x, y, threat=targeted)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_on_flat_and_three_dim_inputs(norm: str) -> None:
    clf, x, y = flat_mlp()
    threat = LpThreat(norm, 0.15 if norm == "linf" else 1.5)
    oracle = from_classifier(clf, QueryAccess(output="logits"))
    r = square(oracle, x, y, threat=threat, max_queries=300)
    verified(clf, r, x, y, threat)
    assert r.success_rate > 0.5  # contiguous windows on (N, D) still search well

    net3 = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    clf3 = from_torch(net3, input_shape=(8, 8), num_classes=10)
    x3 = x.reshape(-1, 8, 8)
    y3 = clf3.predict(x3)
    r3 = square(
        from_classifier(clf3, QueryAccess(output="logits")), x3, y3, threat=threat, max_queries=50
    )
    verified(clf3, r3, x3, y3, threat)


def test_square_is_deterministic(digits: Digits) -> None:
    x, y = digits.x[:40], digits.y[:40]
    for norm, eps in (("linf", 0.08), ("l2", 0.6)):
        threat = LpThreat(norm, eps)
        a = square(digits.oracle(), x, y, threat=threat, max_queries=200, seed=5)
        b = square(digits.oracle(), x, y, threat=threat, max_queries=200, seed=5)
        c = square(digits.oracle(), x, y, threat=threat, max_queries=200, seed=6)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


# -- HopSkipJump ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hopskipjump_reaches_the_closed_form_distance_of_a_linear_model(norm: str) -> None:
    """Minimal distance to the hyperplane w·x + b = 0: |w·x + b| / ||w||_dual."""
    torch.manual_seed(0)
    w = torch.randn(20)
    b = float(-0.5 * w.sum())  # the boundary crosses the box, so random noise finds both sides
    model = linear_binary(w, b)
    x = torch.rand(64, 20) * 0.4 + 0.3
    y = model.predict(x)
    dual = w.norm() if norm == "l2" else w.abs().sum()
    closed = (x @ w + b).abs() / dual
    assert float(closed.max()) < 0.3  # the minimal points stay inside the box
    oracle = from_classifier(model, QueryAccess(output="label"))
    r = hopskipjump(oracle, x, y, threat=LpThreat(norm, 100.0), max_queries=2000)
    assert r.success.all()
    ratio = r.distance / closed
    assert float(ratio.min()) >= 1 - 1e-4  # nothing beats the true minimum
    assert float(ratio.max()) <= 1.10
    assert float(ratio.median()) <= 1.03


def test_hopskipjump_distance_falls_with_queries(digits: Digits) -> None:
    x, y = digits.x[:50], digits.y[:50]
    far = LpThreat("l2", 100.0)
    few = hopskipjump(digits.oracle("label"), x, y, threat=far, max_queries=300)
    many = hopskipjump(digits.oracle("label"), x, y, threat=far, max_queries=2000)
    assert few.success.all() and many.success.all()
    assert float(many.distance.median()) < 0.9 * float(few.distance.median())
    assert (many.queries <= 2000).all()

    threat = LpThreat("l2", 1.0)
    r = hopskipjump(digits.oracle("label"), x, y, threat=threat, max_queries=1000)
    verified(digits.clf, r, x, y, threat)
    white = pgd(digits.clf, x, y, threat=threat, steps=50)
    assert r.success_rate >= 0.5
    assert r.success_rate >= white.success_rate - 0.25
    # points beyond eps come back clean, not projected
    out = ~r.success
    assert torch.equal(r.x_adv[out], x[out]) and (r.distance[out] == 0).all()


def test_hopskipjump_matches_art(digits: Digits) -> None:
    """Same algorithm in ART, same queries per sample: our median distance is no worse."""
    art = pytest.importorskip("art")
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import PyTorchClassifier

    class Counting(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net, self.rows = net, 0

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            self.rows += int(t.shape[0])
            return self.net(t.float())

    assert art.__version__
    x, y = digits.x[:20], digits.y[:20]
    counting = Counting(digits.net)
    estimator = PyTorchClassifier(
        counting,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    np.random.seed(0)
    peer = HopSkipJump(estimator, norm=2, max_iter=8, max_eval=10_000, init_eval=100, verbose=False)
    x_peer = torch.tensor(peer.generate(x.numpy()))
    per_sample = counting.rows // len(x)
    fooled = digits.clf.predict(x_peer) != y
    theirs = torch.where(fooled, _lp.lp_norm(x_peer - x, "l2"), torch.tensor(float("inf")))
    ours = hopskipjump(
        digits.oracle("label"), x, y, threat=LpThreat("l2", 100.0), max_queries=per_sample
    )
    assert ours.success.all()
    assert float(ours.distance.median()) <= 1.1 * float(theirs.median())


def test_hopskipjump_targeted_from_starting_points(digits: Digits) -> None:
    x, y = digits.x[:20], digits.y[:20]
    target = (y + 3) % 10
    pool = digits.x[20:]
    pool_pred = digits.clf.predict(pool)
    starts = torch.stack([pool[pool_pred == t][0] for t in target.tolist()])
    threat = LpThreat("l2", 100.0, targeted=True)
    r = hopskipjump(
        digits.oracle("label"),
        x,
        y,
        threat=threat,
        target=target,
        starting_points=starts,
        max_queries=800,
    )
    verified(digits.clf, r, x, target, threat)
    assert r.success.all()
    assert (r.distance < _lp.lp_norm(starts - x, "l2")).all()  # it moved towards x


def test_hopskipjump_is_deterministic(digits: Digits) -> None:
    x, y = digits.x[:20], digits.y[:20]
    for norm in ("l2", "linf"):
        threat = LpThreat(norm, 100.0)
        a = hopskipjump(digits.oracle("label"), x, y, threat=threat, max_queries=400, seed=3)
        b = hopskipjump(digits.oracle("label"), x, y, threat=threat, max_queries=400, seed=3)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


# -- access: labels only ---------------------------------------------------------------------
class Recording(ClassifierOracle):
    """Keeps every answer the attack was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[torch.Tensor] = []

    def query(self, x: torch.Tensor) -> torch.Tensor:
        out = super().query(x)
        self.answers.append(out)
        return out


def test_label_only_oracle(digits: Digits) -> None:
    x, y = digits.x[:30], digits.y[:30]
    labels_only = Recording(digits.clf, QueryAccess(output="label"))
    with pytest.raises(UnsupportedModelError, match="square needs scores"):
        square(labels_only, x, y, threat=LpThreat("linf", 0.1))
    assert labels_only.queries_used == 0

    r = hopskipjump(labels_only, x, y, threat=LpThreat("l2", 1.5), max_queries=500)
    verified(digits.clf, r, x, y, LpThreat("l2", 1.5))
    assert r.success_rate > 0.5
    assert labels_only.answers
    assert all(a.dtype == torch.int64 and a.ndim == 1 for a in labels_only.answers)
    assert sum(len(a) for a in labels_only.answers) == labels_only.queries_used


def test_classifier_is_refused_with_a_hint(digits: Digits) -> None:
    for attack in (square, hopskipjump):
        with pytest.raises(UnsupportedModelError, match="from_classifier"):
            attack(digits.clf, digits.x[:2], digits.y[:2], threat=LpThreat("l2", 1.0))


def test_registry_entries() -> None:
    sq, hsj = ATTACKS.get("square"), ATTACKS.get("hopskipjump")
    assert (sq.access, sq.norms, sq.minimal) == ("scores", ("linf", "l2"), False)
    assert (hsj.access, hsj.norms, hsj.minimal) == ("label", ("l2", "linf"), True)


# -- the query budget -----------------------------------------------------------------------
class Shared(ClassifierOracle):
    """An oracle whose budget others spend too: ``remaining`` cannot be known in advance."""

    @property
    def remaining(self) -> int | None:
        return None


@pytest.mark.parametrize("budget", [0, 5, 37, 400, 2345])
@pytest.mark.parametrize("name", ["square", "hopskipjump"])
def test_budget_is_exact_and_never_escapes(digits: Digits, name: str, budget: int) -> None:
    x, y = digits.x[:40], digits.y[:40]
    output = "label" if name == "hopskipjump" else "probs"
    threat = LpThreat("l2", 1.0)
    attack = ATTACKS.get(name)
    for cls in (ClassifierOracle, Shared):
        oracle = cls(digits.clf, QueryAccess(output=output, max_queries=budget))
        r = attack(oracle, x, y, threat=threat, max_queries=300)
        assert oracle.queries_used <= budget
        assert int(r.queries.sum()) <= oracle.queries_used
        assert (r.queries <= 300).all()
        verified(digits.clf, r, x, y, threat)
        if budget == 0:
            assert not r.success.any() and torch.equal(r.x_adv, x)
        if cls is ClassifierOracle:
            # a known budget is used up to the last query, never past it
            assert int(r.queries.sum()) == oracle.queries_used
            if budget <= len(x):
                assert oracle.queries_used == budget


def test_invalid_parameters(digits: Digits) -> None:
    x, y = digits.x[:4], digits.y[:4]
    oracle = digits.oracle()
    t = LpThreat("linf", 0.1)
    bad_square = [
        {"max_queries": 0},
        {"max_queries": 2.5},
        {"p_init": 0},
        {"p_init": 1.5},
        {"loss": "hinge"},
    ]
    for kwargs in bad_square:
        with pytest.raises(InvalidConfigError):
            square(oracle, x, y, threat=t, **kwargs)
    bad_hsj = [
        {"steps": 0},
        {"init_evals": 0},
        {"max_evals": -1},
        {"gamma": 0.0},
        {"gamma": float("inf")},
    ]
    for kwargs in bad_hsj:
        with pytest.raises(InvalidConfigError):
            hopskipjump(oracle, x, y, threat=t, **kwargs)
    for attack in (square, hopskipjump):
        with pytest.raises(InvalidConfigError, match="norm"):
            attack(oracle, x, y, threat=LpThreat("l1", 1.0))
        with pytest.raises(DataError, match="outside bounds"):
            attack(oracle, x + 2, y, threat=t)
    with pytest.raises(DataError, match="starting_points"):
        hopskipjump(oracle, x, y, threat=t, starting_points=x[:2])
    assert oracle.queries_used == 0


# -- a real HTTP endpoint ----------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with torch.no_grad():
            probs = torch.softmax(self.server.net(torch.tensor(body["inputs"])), dim=1)
        reply = json.dumps({"outputs": probs.tolist()}).encode()
        with self.server.lock:
            self.server.requests += 1
            self.server.rows += len(body["inputs"])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture()
def endpoint(
    digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], ThreadingHTTPServer]]:
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.net, httpd.lock, httpd.requests, httpd.rows = digits.net, threading.Lock(), 0, 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield lambda: httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.mark.network
def test_square_over_http_respects_the_budget(
    digits: Digits, endpoint: Callable[[], ThreadingHTTPServer]
) -> None:
    from modelshield.core.oracles.http import HttpOracle

    server = endpoint()
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    x, y = digits.x[:12], digits.y[:12]
    oracle = HttpOracle(
        url,
        QueryAccess(output="probs", max_queries=150),
        input_shape=(1, 8, 8),
        num_classes=10,
        batch_size=8,
    )
    threat = LpThreat("linf", 0.15)
    r = square(oracle, x, y, threat=threat, max_queries=20)
    assert oracle.queries_used <= 150
    assert server.rows == oracle.queries_used  # type: ignore[attr-defined]
    assert int(r.queries.sum()) == oracle.queries_used
    assert int(r.queries.max()) > 2  # it ran iterations, not only the start
    verified(digits.clf, r, x, y, threat)
