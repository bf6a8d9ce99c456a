"""``modelshield mpc``: real parties as OS processes over TCP on 127.0.0.1.

End-to-end inference on the bundled digits, joint training on split data, what each party
sends (no plaintext input or weight; shares independent of the input), and failures
(a dead party gives a one-line error, not a hang).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

if importlib.util.find_spec("mpyc") is None:  # not importorskip: MPyC parses sys.argv on import
    pytest.skip("MPyC is not installed", allow_module_level=True)

from modelshield.core.data import load_dataset
from modelshield.crypto.mpc.engine import load_transcript, require_mpyc
from modelshield.crypto.mpc.model import compile_model
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import CLI, run_cli
from tests.crypto.mpc_helpers import (
    DigitsRun,
    digits_run,
    kill_one_mid_run,
    leaks,
    start_parties,
)

pytestmark = pytest.mark.network
require_mpyc()  # the transcripts are pickles of MPyC field arrays


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """A 64-32-10 ReLU MLP on digits (.pt2), the 360 held-out digits, and one 3-party run."""
    return digits_run(tmp_path_factory.mktemp("mpc"), "--engine", "mpyc")


def test_infer_agrees_with_plaintext(files: DigitsRun) -> None:
    r = files.result
    assert r["n"] == 360 and r["parties"] == 3
    assert r["roles"] == ["model", "data", "compute"]
    assert r["argmax_agreement"] >= 0.995, r
    assert abs(r["accuracy"] - r["plaintext_accuracy"]) <= 0.005
    assert r["plaintext_accuracy"] > 0.85  # a trained model, so agreement is not trivial
    assert set(r["bytes_sent"]) == {"0", "1", "2"} and min(r["bytes_sent"].values()) > 0
    assert r["latency"]["seconds_per_batch"] > 0 and r["latency"]["batches"] == 4
    assert "honest majority" in r["security"] and r["engine"] == "mpyc"
    # each party is its own process with its own record; only the data owner got outputs
    parties = [json.loads((files.run / f"party-{i}.json").read_text()) for i in range(3)]
    assert [p["pid"] for p in parties] == [0, 1, 2]
    assert sorted(p.name for p in files.run.glob("party-*-outputs.npz")) == ["party-1-outputs.npz"]
    assert "accuracy" in parties[1] and "accuracy" not in parties[0]


def test_no_plaintext_input_or_weight_is_sent(files: DigitsRun) -> None:
    test = load_dataset(str(files.data))
    x = test.x.double().reshape(len(test), -1).numpy()
    model = compile_model(files.net, (1, 8, 8))
    weights = [la.w for la in model.layers if la.w is not None]
    weights += [la.b for la in model.layers if la.b is not None]
    torch_w = [p.detach().numpy() for p in files.net.parameters()]
    secrets = [x, *weights, *torch_w]
    payloads = {i: load_transcript(files.run / f"party-{i}-transcript.bin") for i in range(3)}
    assert all(len(t) > 10 for t in payloads.values())
    for i, msgs in payloads.items():
        found = leaks([m[2] for m in msgs], secrets, 16)
        assert not found, f"party {i} sent {found}"
    # the shares of the input are not its fixed-point encoding either (elementwise)
    sent = [pickle.loads(b) for ph, peer, b in payloads[1] if ph == "input:x" and peer == 2]
    p = int(json.loads((files.run / "party-1.json").read_text())["field_modulus"])
    enc = np.array([int(v) % p for v in np.rint(x[:100].reshape(-1) * 2**16)], dtype=object)
    got = np.array([int(v) for v in sent[0]], dtype=object)
    assert len(got) == enc.size and np.mean(got == enc) < 0.01
    # and the check itself can fail: a raw float32 weight array in a message is found
    w0 = torch_w[0]
    assert leaks([b"\x00header" + w0.astype("<f4").tobytes()], [w0], 16)
    assert leaks([pickle.dumps([float(v) for v in w0[0]])], [w0], 16)
    # (float64 digits k/16 are mostly zero bytes: the elementwise check above covers them)
    assert leaks([b"\x01" + x.astype("<f4").tobytes()], [x], 16)


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b).pvalue)


def _received_shares(run: Path) -> tuple[np.ndarray, int]:
    """What party 2 received from the data owner for its input, scaled to [0, 1)."""
    p = int(json.loads((run / "party-1.json").read_text())["field_modulus"])
    msgs = [b for ph, peer, b in load_transcript(run / "party-1-transcript.bin")
            if ph == "input:x" and peer == 2]  # fmt: skip
    vals = np.concatenate([np.array([int(v) for v in pickle.loads(m)], dtype=object) for m in msgs])
    return np.array([float(v) / p for v in vals]), p


def test_shares_do_not_depend_on_the_input(files: DigitsRun, tmp_path: Path) -> None:
    """Two-sample KS test: party 2's shares of input A vs a very different input B."""
    test = load_dataset(str(files.data))
    inv = test.subset(range(100))
    inv.x = 1.0 - inv.x  # input B: the negatives of A's first 100 digits
    inv.to_npz(tmp_path / "b.npz")
    run_b = tmp_path / "run_b"
    r = run_cli("mpc", "infer", "--model", str(files.model), "--data", str(tmp_path / "b.npz"),
                "--engine", "mpyc", "--out", str(run_b), "--transcripts")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ua, p = _received_shares(files.run)
    ub, _ = _received_shares(run_b)
    ua = ua[: len(ub)]
    assert len(ua) == len(ub) == 100 * 64
    alpha = 1e-4  # a false alarm once in 10^4 runs
    assert _ks_two_sample(ua, ub) > alpha
    from scipy.stats import kstest

    assert kstest(ua, "uniform").pvalue > alpha and kstest(ub, "uniform").pvalue > alpha
    # the same test does see the dependence when plaintext is sent instead of shares
    xa = test.x[:100].double().reshape(-1).numpy()
    xb = inv.x.double().reshape(-1).numpy()
    plain_a = np.array([float(int(v) % p) / p for v in np.rint(xa * 2**16)])
    plain_b = np.array([float(int(v) % p) / p for v in np.rint(xb * 2**16)])
    assert _ks_two_sample(plain_a, plain_b) < 1e-10
    # fresh randomness for every element: equal inputs (the many zero pixels) get
    # distinct shares, which a deterministic encoding would not
    zeros = xa == 0
    assert zeros.sum() > 1000
    assert len(set(ua[zeros].tolist())) == int(zeros.sum())
    assert len(set(plain_a[zeros].tolist())) == 1


def test_broken_model_file_fails_fast_with_one_line(files: DigitsRun, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(files.model.read_bytes()[:200])
    t0 = time.monotonic()
    r = run_cli("mpc", "infer", "--model", str(bad), "--data", str(files.data), "--out",
                str(tmp_path / "o"), "--timeout", "60")  # fmt: skip
    assert_one_line_error(r, "broken.pt2")
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "o" / "result.json").exists()


def test_model_party_crash_mid_launch_is_reported(files: DigitsRun, tmp_path: Path) -> None:
    """The launcher reads the model fine, but the model party cannot (file gone)."""
    from modelshield.crypto.mpc.commands import PartySpec, launch
    from modelshield.crypto.mpc.engine import MPCError

    specs = [
        PartySpec("model", ["--model", str(tmp_path / "missing.pt2")]),
        PartySpec("data", ["--data", str(files.data), "--limit", "5"]),
        PartySpec("compute", []),
    ]
    t0 = time.monotonic()
    with pytest.raises(MPCError, match=r"party 0 \(model\) failed: .*missing\.pt2"):
        launch(specs, tmp_path / "o", common=[], timeout=60)
    assert time.monotonic() - t0 < 30
    assert not _processes_with(str(tmp_path / "o")), "parties left running after a failure"


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State")
            )
        except (OSError, StopIteration):
            continue
        if text in cmd and "zombie" not in state:
            found.append(int(d.name))
    return found


def test_a_party_that_dies_mid_run_ends_the_others(files: DigitsRun, tmp_path: Path) -> None:
    """Parties started by hand (as on three hosts); party 2 is killed during the run."""
    kill_one_mid_run(start_parties(files.model, files.data, tmp_path, "mpyc"))


def test_two_parties_and_too_few_integer_bits_are_refused(files: DigitsRun, tmp_path: Path) -> None:
    r = run_cli("mpc", "infer", "--model", str(files.model), "--data", str(files.data),
                "--parties", "2", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(r, "--parties", "honest majority")
    r = run_cli("mpc", "infer", "--model", str(files.model), "--data", str(files.data),
                "--int-bits", "4", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(r, "--int-bits 4", "use --int-bits")
    assert files.result["max_abs_value"] < 2**15


def _shards(tmp_path: Path) -> tuple[list[Path], Path]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))  # public preprocessing: features in [0, 1]
    idx = np.random.default_rng(0).permutation(len(y))
    x, y = x[idx].astype(np.float32), y[idx].astype(np.int64)
    paths = []
    for k, sl in enumerate((slice(0, 200), slice(200, 455))):
        np.savez(tmp_path / f"shard{k}.npz", x=x[sl], y=y[sl])
        paths.append(tmp_path / f"shard{k}.npz")
    np.savez(tmp_path / "heldout.npz", x=x[455:], y=y[455:])
    return paths, tmp_path / "heldout.npz"


@pytest.mark.parametrize("engine", ["ring", "mpyc"])
def test_joint_training_matches_pooled_plaintext(tmp_path: Path, engine: str) -> None:
    paths, heldout = _shards(tmp_path)
    out = tmp_path / "train"
    r = run_cli("mpc", "train", "--data", ",".join(map(str, paths)), "--model", "logistic",
                "--parties", "3", "--epochs", "10", "--test", str(heldout), "--out", str(out),
                "--engine", engine, "--transcripts")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["roles"] == ["data", "data", "compute"] and res["shards"] == [200, 255]
    assert res["engine"] == engine
    if engine == "ring":
        assert 0 < res["truncation_failure_bound"] < 1e-2
    # the shares reproduce the same algorithm run in plaintext on the pooled data ...
    assert res["max_weight_error"] < 0.02, res
    assert res["accuracy"] == pytest.approx(res["plaintext_same_algorithm_accuracy"], abs=0.02)
    # ... and the model is about as good as plaintext logistic regression on pooled data
    assert res["accuracy"] >= res["plaintext_accuracy"] - 0.05 and res["accuracy"] > 0.85
    with np.load(out / "model.npz") as z:
        assert z["w"].shape == (30,)
    # neither shard's rows travel in the clear
    for k, pth in enumerate(paths):
        with np.load(pth) as z:
            xk = z["x"]
        msgs = load_transcript(out / f"party-{k}-transcript.bin")
        assert not leaks([m[2] for m in msgs], [xk], 16)


def test_cnn_logits_over_real_processes(files: DigitsRun, tmp_path: Path) -> None:
    """Conv2d + BatchNorm + ReLU + AvgPool + Linear, 3 processes, logits vs plaintext."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "cnn.ts")
    out = tmp_path / "cnn"
    r = run_cli("mpc", "infer", "--model", str(tmp_path / "cnn.ts"), "--data", str(files.data),
                "--limit", "20", "--reveal", "logits", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    x = load_dataset(str(files.data)).x[:20]
    with torch.no_grad():
        ref = net(x).double().numpy()
    with np.load(out / "party-1-outputs.npz") as z:
        got = z["outputs"]
    assert got.shape == (20, 10)
    assert np.abs(got - ref).max() < 64 * 2.0**-16 * max(1.0, float(np.abs(ref).max()))
    assert res["max_abs_error"] < 1e-2 and res["reveal"] == "logits"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_stopping_the_launcher_stops_every_party(
    files: DigitsRun, tmp_path: Path, sig: str
) -> None:
    """Ctrl-C, SIGTERM or even SIGKILL of `mpc infer` leaves no party process behind."""
    import signal

    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*CLI, "mpc", "infer", "--model", str(files.model), "--data", str(files.data),
           "--batch-size", "1", "--out", str(out)]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while len(_processes_with(str(out))) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # the launcher and its three parties
        assert len(_processes_with(str(out))) == 4
        time.sleep(1.0)
        launcher.send_signal(getattr(signal, sig))
        _, err = launcher.communicate(timeout=30)
        if sig == "SIGINT":
            assert launcher.returncode == 130, err.decode()
        elif sig == "SIGTERM":
            assert launcher.returncode == 2 and "SIGTERM" in err.decode(), err.decode()
        deadline = time.monotonic() + 10
        while _processes_with(str(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_with(str(out)), "parties outlived the launcher"
        assert not (out / "result.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in _processes_with(str(out)):
            os.kill(pid, 9)
