"""Shared by the MPC tests of both engines: nets, a trained digits MLP, the leak search."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelshield.core.data import load_dataset
from modelshield.crypto.he.train import PolyAct
from modelshield.crypto.mpc.commands import free_ports
from modelshield.crypto.mpc.model import compile_model


def train_mlp(seed: int = 0) -> tuple[nn.Module, object]:
    digits = load_dataset("digits")
    train, test = digits.subset(range(1437)), digits.subset(range(1437, 1797))
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(400):
        idx = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), test


@dataclass
class DigitsRun:
    """The digits MLP (.pt2), its 360 held-out digits and one 3-party ``mpc infer`` run."""

    root: Path
    model: Path
    data: Path
    net: nn.Module
    run: Path
    result: dict[str, Any]


def digits_run(d: Path, *extra: str) -> DigitsRun:
    """Train and export the MLP in ``d`` and run ``mpc infer`` on it with ``extra`` options."""
    from tests.conftest import run_cli

    net, test = train_mlp()
    test.to_npz(d / "test.npz")  # type: ignore[attr-defined]
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (test.x[:2],), dynamic_shapes=({0: batch},))  # type: ignore[attr-defined]
    torch.export.save(prog, d / "model.pt2")
    run = d / "run"
    r = run_cli("mpc", "infer", "--model", str(d / "model.pt2"), "--data", str(d / "test.npz"),
                "--parties", "3", "--out", str(run), "--transcripts", *extra)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads((run / "result.json").read_text())
    return DigitsRun(d, d / "model.pt2", d / "test.npz", net, run, result)


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def fixed_point_bound(model_out: np.ndarray, frac_bits: int, terms: int) -> float:
    """Error budget: a few ulps (2^-f) per accumulated product, scaled by the output range."""
    return terms * 2.0**-frac_bits * max(1.0, float(np.abs(model_out).max()))


LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(12, 5)), (12,)),
    "conv2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Flatten()),
        (2, 6, 6),
    ),
    "avgpool": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
        (1, 6, 6),
    ),
    "batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 4)
        ),
        (1, 6, 6),
    ),
    "relu": (lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)), (10,)),
    "square": (lambda: nn.Sequential(nn.Linear(10, 8), Square(), nn.Linear(8, 3)), (10,)),
    "polyact": (lambda: nn.Sequential(nn.Linear(10, 8), PolyAct(), nn.Linear(8, 3)), (10,)),
}


def make_net(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = LAYERS[name]
    torch.manual_seed(seed)
    net = factory()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval(), shape


def leaks(payloads: list[bytes], secrets: list[np.ndarray], frac_bits: int) -> list[str]:
    """Encodings of ``secrets`` found in ``payloads``: float64/32 (both byte orders) and
    fixed-point int64/32, as runs of consecutive values (as a raw array carries them) and,
    for high-entropy float64 values, one by one (as a pickled list of floats carries them)."""
    pats: dict[bytes, list[tuple[bytes, int, str]]] = {}

    def add(full: bytes, label: str) -> None:
        j = max(range(len(full) - 7), key=lambda i: 8 - full[i : i + 8].count(0))
        if full[j : j + 8].count(0) <= 4:  # a key of mostly zeros says nothing about a secret
            pats.setdefault(full[j : j + 8], []).append((full, j, label))

    for k, a in enumerate(secrets):
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        fixed = np.rint(a * 2**frac_bits)
        for dtype, vals in (
            ("<f8", a), (">f8", a), ("<f4", a), (">f4", a), ("<i8", fixed), ("<i4", fixed),
        ):  # fmt: skip
            flat = np.ascontiguousarray(vals, dtype=dtype)
            width = 4 if flat.itemsize == 4 else 3
            step = max(1, (len(flat) - width) // 20)  # a sample of positions keeps it fast
            for i in range(0, len(flat) - width + 1, step):
                add(flat[i : i + width].tobytes(), f"secret {k} as {dtype}")
                if dtype.endswith("f8"):
                    add(flat[i : i + 1].tobytes(), f"secret {k} as single {dtype} values")
    keys = np.frombuffer(b"".join(pats), dtype="<u8")
    blob = b"".join(payloads)
    found: set[str] = set()
    for off in range(8):
        view = np.frombuffer(blob, dtype="<u8", offset=off, count=(len(blob) - off) // 8)
        for h in np.nonzero(np.isin(view, keys))[0][:10000]:
            pos = off + 8 * int(h)
            for full, j, label in pats[blob[pos : pos + 8]]:
                if blob[pos - j : pos - j + len(full)] == full:
                    found.add(label)
    return sorted(found)


def layer_error(name: str, run_local: Callable[..., np.ndarray]) -> tuple[float, float, int]:
    """|secure - torch| of net ``name`` on 16 fresh random inputs, its bound, and the seed."""
    seed = int(np.random.SeedSequence().entropy % 2**31)  # fresh inputs each run
    net, shape = make_net(name, seed)
    x = torch.rand((16, *shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = net(x).double().reshape(16, -1).numpy()
    model = compile_model(net, shape)
    out = run_local(model, x.double().reshape(16, -1).numpy(), frac_bits=16)
    fan_in = max(la.w.shape[0] for la in model.layers if la.w is not None)
    return float(np.abs(out - ref).max()), fixed_point_bound(ref, 16, fan_in), seed


def start_parties(
    model: Path, data: Path, out: Path, engine: str, batch: int = 1
) -> list[subprocess.Popen[bytes]]:
    """`modelshield -v mpc party` for parties 0 (model), 1 (data), 2 (compute)."""
    from tests.conftest import CLI

    addr = ",".join(f"127.0.0.1:{p}" for p in free_ports(3))
    roles = [
        ["--role", "model", "--model", str(model), "--input-shape", "1,8,8"],
        ["--role", "data", "--data", str(data), "--batch-size", str(batch)],
        ["--role", "compute"],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return [
        subprocess.Popen(
            [*CLI, "-v", "mpc", "party", "--id", str(i), "--parties", addr, "--engine", engine,
             "--out", str(out / f"p{i}"), "--timeout", "120", *roles[i]],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
        )
        for i in range(3)
    ]  # fmt: skip


def kill_one_mid_run(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill party 2 once it computes on shares; the others must stop, naming it, quickly."""
    try:
        assert procs[2].stderr is not None
        deadline = time.monotonic() + 60
        for line in procs[2].stderr:  # wait until the computation is under way
            if b"secret inputs shared" in line or time.monotonic() > deadline:
                break
        time.sleep(0.2)
        procs[2].kill()
        t0 = time.monotonic()
        for p in procs[:2]:
            _, err = p.communicate(timeout=30)
            assert p.returncode == 2, err.decode()
            assert "party 2 disconnected" in err.decode(), err.decode()
        assert time.monotonic() - t0 < 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def check_labels(run_local: Callable[..., np.ndarray], n: int = 40) -> tuple[np.ndarray, int]:
    """Secure labels of a ReLU net vs its argmax (where the margin beats fixed point), and
    ``logit > 0`` for one output; returns the random inputs and the seed."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    net, shape = make_net("relu", seed)
    x = np.random.default_rng(seed).random((n, 10))
    model = compile_model(net, shape)
    ref = model.forward(x)
    labels = run_local(model, x, reveal="label").reshape(-1)
    margin = np.sort(ref, axis=1)[:, -1] - np.sort(ref, axis=1)[:, -2]
    clear = margin > 1e-3  # ties closer than the fixed-point error may go either way
    assert clear.sum() > n // 2 and (labels[clear] == ref.argmax(1)[clear]).all(), seed
    torch.manual_seed(seed)
    one = compile_model(nn.Sequential(nn.Linear(10, 1)).eval(), (10,))
    z = one.forward(x)[:, 0]
    got = run_local(one, x, reveal="label").reshape(-1)
    ok = np.abs(z) > 1e-3
    assert (got[ok] == (z[ok] > 0)).all(), seed
    return x, seed
