"""The three-party ring engine (replicated sharing over Z_2^64) against plaintext.

Protocol pieces (comparison, truncation, AND) run as three threads over real loopback
sockets on random values across the whole ring; layers and labels against the plaintext
model; then real ``modelshield mpc`` processes: digits end to end, every party's
transcript searched for plaintext, the received shares tested for independence of the
input, and the failure paths (a foreign peer, a missing peer, a dead party).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.data import load_dataset
from modelshield.core.errors import InvalidConfigError
from modelshield.crypto.mpc.commands import free_ports
from modelshield.crypto.mpc.engine import MPCError, load_transcript, resolve_engine
from modelshield.crypto.mpc.model import compile_model
from modelshield.crypto.mpc.net import Peers
from modelshield.crypto.mpc.ring import in_threads, run_local
from modelshield.crypto.mpc.ring import labels as secure_labels
from modelshield.crypto.mpc.rss import Ring3, Shared
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import run_cli
from tests.crypto.mpc_helpers import (
    LAYERS,
    DigitsRun,
    check_labels,
    digits_run,
    kill_one_mid_run,
    layer_error,
    leaks,
    make_net,
    start_parties,
)

pytestmark = pytest.mark.network


def three_parties(fn: Callable[[Ring3], Any], frac_bits: int = 16) -> list[Any]:
    """Run ``fn(proto)`` as parties 0, 1, 2 (threads, real sockets); their return values."""
    return in_threads(lambda net: fn(Ring3(net, frac_bits)), timeout=60)


def _shared_from_0(p: Ring3, x: torch.Tensor) -> Shared:
    return p.share(0, x if p.pid == 0 else None, tuple(x.shape))


def _opened(results: list[Any]) -> torch.Tensor:
    return next(r for r in results if r is not None)


def test_sign_bit_over_the_whole_ring() -> None:
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, 4000, dtype=np.int64, endpoint=True))
    edges = [0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63), 12345, -12345]
    x = torch.cat([x, torch.tensor(edges, dtype=torch.int64)])

    def fn(p: Ring3) -> Any:
        return p.open_to(2, p.bit_to_arith(p.msb(_shared_from_0(p, x))))

    got = _opened(three_parties(fn))
    assert torch.equal(got, (x < 0).long())


def test_truncation_is_within_one_ulp() -> None:
    """SecureML-style truncation of shares: floor(x / 2^16) or one less."""
    rng = np.random.default_rng()
    x = torch.from_numpy(rng.integers(-(2**34), 2**34, 20000, dtype=np.int64))

    def fn(p: Ring3) -> Any:
        return p.open_to(0, p.truncate(_shared_from_0(p, x)))

    got = _opened(three_parties(fn))
    diff = (x >> 16) - got
    assert set(diff.unique().tolist()) <= {0, 1}, diff.unique()


def test_products_and_ands() -> None:
    rng = np.random.default_rng()
    a = torch.from_numpy(rng.integers(-(2**30), 2**30, (7, 5), dtype=np.int64))
    b = torch.from_numpy(rng.integers(-(2**30), 2**30, (5, 3), dtype=np.int64))
    u = torch.from_numpy(rng.integers(-(2**62), 2**62, 300, dtype=np.int64))
    v = torch.from_numpy(rng.integers(-(2**62), 2**62, 300, dtype=np.int64))

    def fn(p: Ring3) -> Any:
        sa, sb = _shared_from_0(p, a), p.share(2, b if p.pid == 2 else None, (5, 3))
        su, sv = _shared_from_0(p, u), p.share(1, v if p.pid == 1 else None, (300,))
        mm = p.open_to(1, p.matmul(sa, sb))
        el = p.open_to(1, p.mul(su, sv))
        # AND of boolean sharings: share the words, AND them, open by XOR of the shares
        (anded,) = p.and_many([(su, sv)])  # shares of u, v read as XOR sharings of words
        return mm, el, (anded.a, anded.b), (su.a, su.b), (sv.a, sv.b)

    res = three_parties(fn)
    mm, el = res[1][0], res[1][1]
    assert torch.equal(mm, a @ b) and torch.equal(el, u * v)
    # the XOR sharing of the AND holds (x0 ^ x1 ^ x2) & (y0 ^ y1 ^ y2)
    xor = lambda k: res[0][k][0] ^ res[1][k][0] ^ res[2][k][0]  # noqa: E731
    assert torch.equal(xor(2), xor(3) & xor(4))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_plaintext(name: str) -> None:
    err, bound, seed = layer_error(name, run_local)
    assert err <= bound, f"{name}: |MPC - plaintext| = {err:.2e} > {bound:.2e} (seed {seed})"


def test_labels_are_the_first_maximum_and_the_threshold() -> None:
    x, seed = check_labels(run_local, n=60)
    # tied classes (same weights) differ by the truncation's ulp: either may win
    tie = nn.Linear(10, 5)
    with torch.no_grad():
        tie.weight[3] = tie.weight[1]
        tie.bias[3] = tie.bias[1] = 5.0  # the largest logit, tied
    m_tie = compile_model(nn.Sequential(tie).eval(), (10,))
    assert set(run_local(m_tie, x, reveal="label").reshape(-1).tolist()) <= {1.0, 3.0}
    # values that are exactly equal on the shares: the first maximum, as argmax
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.integers(-4, 4, (300, 7), dtype=np.int64)) << 16
    got_z = _opened(three_parties(lambda p: p.open_to(1, secure_labels(p, _shared_from_0(p, z)))))
    assert torch.equal(got_z, z.argmax(1)), "ties must go to the first maximum"


def test_more_fractional_bits_less_error() -> None:
    net, shape = make_net("relu", 0)
    x = np.random.default_rng(1).random((32, 10))
    model = compile_model(net, shape)
    ref = model.forward(x)
    errs = [float(np.abs(run_local(model, x, frac_bits=f) - ref).max()) for f in (8, 12, 20)]
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-4


def test_engine_choice_and_ring_limits() -> None:
    assert resolve_engine("auto", 3) == "ring" and resolve_engine("auto", 5) == "mpyc"
    assert resolve_engine("mpyc", 3) == "mpyc"
    with pytest.raises(InvalidConfigError, match="exactly 3 parties"):
        resolve_engine("ring", 4)
    from modelshield.crypto.mpc.ring import check_bits

    with pytest.raises(InvalidConfigError, match="2·frac-bits \\+ int-bits"):
        check_bits(24, 16)


@pytest.mark.parametrize(("kind", "lr"), [("logistic", 1.0), ("linear", 0.5)])
def test_training_reproduces_the_plaintext_algorithm(kind: str, lr: float) -> None:
    """Two data parties and a compute party; every party gets the same weights."""
    from modelshield.crypto.mpc.ring_train import train
    from modelshield.crypto.mpc.train import plaintext_gd

    rng = np.random.default_rng()
    x = rng.random((150, 6))
    y = (x @ rng.normal(size=6) > 0.5 * rng.normal(size=6).sum()).astype(np.int64)
    shards = [(x[:60], y[:60]), (x[60:], y[60:])]
    roles: list[dict[str, Any]] = [
        {"role": "data", "xy": shards[0]},
        {"role": "data", "xy": shards[1]},
        {"role": "compute"},
    ]
    res = in_threads(
        lambda net: train(
            net, frac_bits=16, int_bits=16, epochs=20, lr=lr, kind=kind, **roles[net.pid]
        )
    )
    ref_w, ref_b = plaintext_gd(shards, epochs=20, lr=lr, kind=kind, link="hard")
    w, b = res[0]["weights"]["w"], res[0]["weights"]["b"][0]
    assert np.abs(w - ref_w).max() < 2e-3 and abs(b - ref_b) < 2e-3, (w, ref_w)
    assert all(np.array_equal(r["weights"]["w"], w) for r in res)
    assert res[2]["shards"] == [60, 90] and res[2]["engine"] == "ring"


# --------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------


def _dial_until_open(address: tuple[str, int]) -> socket.socket:
    for _ in range(200):
        try:
            return socket.create_connection(address, timeout=1)
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {address}")


def test_a_stray_connection_is_ignored_and_named_and_a_missing_peer_too() -> None:
    ports = free_ports(2)
    addresses = [("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])]
    out: list[Any] = []

    def listen(seconds: float) -> None:
        try:
            out.append(Peers(0, addresses, deadline=time.monotonic() + seconds).connect())
        except BaseException as e:
            out.append(e)

    # a stray client (not a ring party) first, then the real party 1: the run goes on
    t = threading.Thread(target=listen, args=(20,))
    t.start()
    stray = _dial_until_open(addresses[0])
    stray.sendall(b"GET / HTTP/1.1\r\n\r\n")
    one = Peers(1, addresses, deadline=time.monotonic() + 20).connect()
    t.join(25)
    assert isinstance(out[0], Peers), out
    one.send(0, b"hello")
    assert out[0].recv(1) == b"hello"
    one.close()
    out[0].close()
    stray.close()
    # only strays: the timeout names them
    out.clear()
    t = threading.Thread(target=listen, args=(2,))
    t.start()
    stray = _dial_until_open(addresses[0])
    stray.sendall(b"\x00" * 12)
    t.join(10)
    stray.close()
    assert isinstance(out[0], MPCError) and "were not modelshield ring-engine parties" in str(
        out[0]
    )
    t0 = time.monotonic()
    with pytest.raises(MPCError, match=r"party 0 at 127\.0\.0\.1:\d+ is unreachable"):
        Peers(1, addresses, deadline=time.monotonic() + 1.5).connect()
    assert time.monotonic() - t0 < 10


def test_a_peer_that_stops_reading_fails_the_send_at_the_deadline() -> None:
    """A stopped process keeps its link open but reads nothing: no hang past --timeout."""
    import struct

    ports = free_ports(2)
    addresses = [("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])]
    out: list[Any] = []
    t = threading.Thread(
        target=lambda: out.append(Peers(0, addresses, deadline=time.monotonic() + 3).connect())
    )
    t.start()
    frozen = _dial_until_open(addresses[0])
    frozen.sendall(b"MSRING01" + struct.pack("<I", 1))  # a real hello, then silence
    t.join(10)
    t0 = time.monotonic()
    with pytest.raises(MPCError, match="party 1 stopped reading before the timeout"):
        out[0].send(1, b"\x00" * (64 << 20))
    assert time.monotonic() - t0 < 8
    out[0].close()
    frozen.close()


def test_truncation_failures_match_the_bound_wrap_risk_uses() -> None:
    """Large values wrap as often as |x| / 2^64 predicts (the model behind wrap_risk)."""
    from modelshield.crypto.mpc.ring import wrap_risk

    rng = np.random.default_rng()
    x = torch.from_numpy(rng.integers(-(2**58), 2**58, 20000, dtype=np.int64))

    def fn(p: Ring3) -> Any:
        return p.open_to(0, p.truncate(_shared_from_0(p, x)))

    got = _opened(three_parties(fn))
    wrong = int(((x >> 16) - got).abs().gt(1).sum())
    expected = float((x.double().abs() / 2.0**64).sum())  # about 156
    assert 0.5 * expected < wrong < 1.6 * expected, (wrong, expected)
    # wrap_risk's per-value bound at the peak (2^58 at scale 2^32) covers the observed rate
    one_value = [{"kind": "affine", "in": 1, "out": 1}]
    assert wrong / len(x) <= wrap_risk(one_value, 2.0**26, 16) == 2.0**-6


def test_a_party_listens_on_its_own_address_only() -> None:
    ports = free_ports(2)
    addresses = [("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])]
    seen: list[tuple[str, int]] = []
    real_bind = socket.socket.bind

    def spy(self: socket.socket, addr: Any) -> None:
        seen.append(addr)
        real_bind(self, addr)

    socket.socket.bind = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(MPCError):
            Peers(1, addresses, deadline=time.monotonic() + 0.5).connect()
    finally:
        socket.socket.bind = real_bind  # type: ignore[method-assign]
    assert seen == [("127.0.0.1", ports[1])]


# --------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """The digits MLP, its held-out digits, and one run with the default engine (ring)."""
    return digits_run(tmp_path_factory.mktemp("ring"))


def test_digits_end_to_end_with_the_default_engine(ring_run: DigitsRun) -> None:
    r = ring_run.result
    assert r["engine"] == "ring" and "replicated secret sharing" in r["security"]
    assert 0 < r["truncation_failure_bound_per_sample"] < 1e-4
    assert r["n"] == 360 and r["roles"] == ["model", "data", "compute"]
    assert r["argmax_agreement"] >= 0.995, r
    assert abs(r["accuracy"] - r["plaintext_accuracy"]) <= 0.005
    assert r["plaintext_accuracy"] > 0.85
    assert set(r["bytes_sent"]) == {"0", "1", "2"} and min(r["bytes_sent"].values()) > 0
    assert r["latency"]["batches"] == 4 and r["latency"]["seconds_per_batch"] > 0
    files = sorted(p.name for p in ring_run.run.glob("party-*-outputs.npz"))
    assert files == ["party-1-outputs.npz"]  # only the data owner receives outputs


def test_no_plaintext_input_or_weight_is_sent(ring_run: DigitsRun) -> None:
    test = load_dataset(str(ring_run.data))
    x = test.x.double().reshape(len(test), -1).numpy()
    model = compile_model(ring_run.net, (1, 8, 8))
    secrets = [x, *(la.w for la in model.layers if la.w is not None)]
    secrets += [la.b for la in model.layers if la.b is not None]
    secrets += [p.detach().numpy() for p in ring_run.net.parameters()]
    for i in range(3):
        msgs = load_transcript(ring_run.run / f"party-{i}-transcript.bin")
        assert len(msgs) > 10
        assert not leaks([m[2] for m in msgs], secrets, 16), f"party {i} sent plaintext"
    # the biases travel at scale 2^32: not as their encoding at that scale either
    biases = [la.b * 2.0**16 for la in model.layers if la.b is not None]
    for i in range(3):
        msgs = load_transcript(ring_run.run / f"party-{i}-transcript.bin")
        assert not leaks([m[2] for m in msgs], biases, 16)


def _shares_sent(run: Path, sender: int, receiver: int) -> np.ndarray:
    """The input shares ``sender`` sent ``receiver``, as ring elements scaled to [0, 1)."""
    msgs = [b for ph, peer, b in load_transcript(run / f"party-{sender}-transcript.bin")
            if ph == "input:x" and peer == receiver]  # fmt: skip
    words = np.concatenate([np.frombuffer(m, dtype="<u8") for m in msgs])
    return words.astype(np.float64) / 2.0**64


def test_shares_do_not_depend_on_the_input(ring_run: DigitsRun, tmp_path: Path) -> None:
    """KS tests: what party 2 gets for input A vs a very different input B, and vs uniform."""
    from scipy.stats import ks_2samp, kstest

    test = load_dataset(str(ring_run.data))
    inv = test.subset(range(100))
    inv.x = 1.0 - inv.x
    inv.to_npz(tmp_path / "b.npz")
    run_b = tmp_path / "run_b"
    r = run_cli("mpc", "infer", "--model", str(ring_run.model), "--data", str(tmp_path / "b.npz"),
                "--engine", "ring", "--out", str(run_b), "--transcripts")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ua, ub = _shares_sent(ring_run.run, 1, 2), _shares_sent(run_b, 1, 2)
    ua = ua[: len(ub)]
    assert len(ua) == len(ub) == 100 * 64
    alpha = 1e-4
    assert ks_2samp(ua, ub).pvalue > alpha
    assert kstest(ua, "uniform").pvalue > alpha and kstest(ub, "uniform").pvalue > alpha
    # the same test sees plaintext: the fixed-point encodings of A and B differ
    xa = test.x[:100].double().reshape(-1).numpy()
    enc = lambda v: np.rint(v * 2**16).astype(np.int64).view(np.uint64) / 2.0**64  # noqa: E731
    assert ks_2samp(enc(xa), enc(1.0 - xa)).pvalue < 1e-10
    zeros = xa == 0  # equal inputs get distinct shares
    assert zeros.sum() > 1000 and len(set(ua[zeros].tolist())) == int(zeros.sum())


def test_parties_by_hand_and_a_dead_party(ring_run: DigitsRun, tmp_path: Path) -> None:
    """`mpc party` per process (as on three hosts); then party 2 is killed mid-run."""
    procs = start_parties(ring_run.model, ring_run.data, tmp_path / "ok", "ring", batch=100)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    rec = json.loads((tmp_path / "ok" / "p1" / "party-1.json").read_text())
    assert rec["engine"] == "ring" and rec["accuracy"] == ring_run.result["accuracy"]
    kill_one_mid_run(start_parties(ring_run.model, ring_run.data, tmp_path / "dead", "ring"))


def test_ring_refuses_other_party_counts_and_overflowing_bits(
    ring_run: DigitsRun, tmp_path: Path
) -> None:
    r = run_cli("mpc", "infer", "--model", str(ring_run.model), "--data", str(ring_run.data),
                "--parties", "4", "--engine", "ring", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(r, "exactly 3 parties", "--engine mpyc")
    r = run_cli("mpc", "infer", "--model", str(ring_run.model), "--data", str(ring_run.data),
                "--frac-bits", "24", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(r, "--frac-bits 24")
    assert not (tmp_path / "o" / "result.json").exists()


def test_a_data_party_refuses_inputs_beyond_its_range(tmp_path: Path) -> None:
    """On its own host the data owner checks its inputs against --int-bits before sharing."""
    np.savez(tmp_path / "big.npz", x=np.full((4, 3), 5000.0, dtype=np.float32), y=np.zeros(4))
    addr = ",".join(f"127.0.0.1:{p}" for p in free_ports(3))
    r = run_cli("mpc", "party", "--id", "1", "--parties", addr, "--role", "data",
                "--data", str(tmp_path / "big.npz"), "--bounds", "0,10000", "--int-bits", "12",
                "--out", str(tmp_path / "p1"), "--timeout", "20")  # fmt: skip
    assert_one_line_error(r, "--int-bits 12", "5000")
    assert not (tmp_path / "p1" / "party-1.json").exists()


def test_a_one_output_sigmoid_model_gives_its_labels(tmp_path: Path) -> None:
    """A binary model with one sigmoid output (TorchScript): label = logit > 0 on shares."""
    digits = load_dataset("digits")
    keep = [i for i in range(len(digits)) if int(digits.y[i]) in (3, 8)]
    data = digits.subset(keep)
    data.y = (data.y == 8).long()
    data.num_classes = 2
    data.to_npz(tmp_path / "bin.npz")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 1), nn.Sigmoid())
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        loss = nn.functional.binary_cross_entropy(net(data.x).squeeze(1), data.y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.jit.save(torch.jit.script(net.eval()), tmp_path / "bin.ts")
    r = run_cli("mpc", "infer", "--model", str(tmp_path / "bin.ts"), "--data",
                str(tmp_path / "bin.npz"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "result.json").read_text())
    assert res["engine"] == "ring" and res["n"] == len(data)
    assert res["argmax_agreement"] >= 0.995 and 0.6 < res["plaintext_accuracy"] < 1.0, res
    assert abs(res["accuracy"] - res["plaintext_accuracy"]) <= 0.005
