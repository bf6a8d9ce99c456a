"""Trigger-set watermarking (Adi et al., USENIX Security 2018) on the bundled digits.

For each of ``--repeats`` keys (5 by default; 100 triggers by default, 10 classes, chance 0.1):

1. **baseline**: ``--arch`` (default ``small_cnn``) trained without a mark, the owner's
   recipe (Adam, ``--epochs``, ``--lr``, batch 64): the clean accuracy a mark may cost;
2. **from scratch**: the same recipe with the trigger set mixed into every batch
   (:func:`modelshield.watermark.embed`, ``from_scratch=True``);
3. **fine-tuning**: the baseline fine-tuned with the trigger set for ``--ft-epochs``;
4. **removal attempts** on the from-scratch model (:func:`robustness_suite`): FTLL, FTAL,
   RTLL, RTAL for ``--attack-epochs`` at each ``--attack-lrs`` (the attacker holds a random
   half of the training data), global magnitude pruning at ``--prune``, and Knockoff Nets
   extraction through a probability oracle with ``--extraction-queries`` queries from the
   attacker's half (the copy is ``small_cnn``, trained ``--extraction-epochs``);

and once: **false positives**, ``--independent`` models of the same architecture trained on
the same data with other seeds and no mark, each verified against every key (none may
verify at 1e-6; their p-values should look like draws from a valid null, mostly > 0.01).
The predicted-class share on the triggers shows how skewed unrelated models are on
out-of-distribution inputs, which the exact test tolerates (labels carry the randomness).

Data: the bundled 1797 8×8 digits, a stratified 75/25 split (seed 0). Key seeds are fixed
(``--key-seed`` + repeat index) for a reproducible benchmark only; ``watermark embed``
draws them from the OS.

Run ``.venv/bin/python benchmarks/watermark.py --json benchmarks/results/watermark_cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import modelshield
from modelshield.core.architectures import build
from modelshield.core.data import load_dataset
from modelshield.core.train import train_classifier
from modelshield.watermark import (
    WatermarkKey,
    embed_and_evaluate,
    robustness_suite,
    train_independent_models,
    verify,
)
from modelshield.watermark.embed import accuracy


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "modelshield": modelshield.__version__,
    }


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def one_key(args: argparse.Namespace, r: int, data: tuple) -> dict[str, Any]:
    train, test, attacker = data
    shape = train.input_shape
    key = WatermarkKey.generate(
        input_shape=shape, num_classes=10, n=args.triggers, kind=args.kind, seed=args.key_seed + r
    )
    seed = args.seed + r
    t0 = time.perf_counter()
    base = train_classifier(
        build(args.arch, shape, 10), train.x, train.y, epochs=args.epochs, lr=args.lr, seed=seed
    )
    base_acc = accuracy(base, test.x, test.y)
    base_time = time.perf_counter() - t0
    scratch = embed_and_evaluate(
        build(args.arch, shape, 10),
        train.x,
        train.y,
        key,
        test_x=test.x,
        test_y=test.y,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=64,
        from_scratch=True,
        seed=seed,
    )
    ft = embed_and_evaluate(
        base,
        train.x,
        train.y,
        key,
        test_x=test.x,
        test_y=test.y,
        epochs=args.ft_epochs,
        lr=args.ft_lr,
        batch_size=64,
        from_scratch=False,
        seed=seed,
    )
    attempts: list[dict[str, Any]] = []
    for i, attack_lr in enumerate(args.attack_lrs):
        res = robustness_suite(
            scratch.module,
            key,
            train.x,
            train.y,
            test_x=test.x,
            test_y=test.y,
            attacker_x=attacker.x,
            attacker_y=attacker.y,
            pool=attacker.x,
            fine_tune_epochs=args.attack_epochs,
            fine_tune_lr=attack_lr,
            prune_amounts=args.prune if i == 0 else (),
            extraction_queries=args.extraction_queries if i == 0 else None,
            extraction_epochs=args.extraction_epochs,
            independent_models=0,
            seed=seed,
        )
        attempts += res.attempts
    return {
        "key_id": key.key_id,
        "baseline": {"clean_accuracy": base_acc, "seconds": base_time},
        "from_scratch": scratch.summary() | {"history": None},
        "fine_tuning": ft.summary() | {"history": None},
        "attempts": attempts,
        "_key": key,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--epochs", type=int, default=30, help="Owner's training epochs.")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft-epochs", type=int, default=15, help="Embedding by fine-tuning.")
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--triggers", type=int, default=100)
    p.add_argument("--kind", default="noise", choices=["noise", "patterns"])
    p.add_argument("--attack-epochs", type=int, default=5)
    p.add_argument("--attack-lrs", type=_floats, default=[1e-3, 1e-2])
    p.add_argument("--prune", type=_floats, default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--extraction-queries", type=int, default=674)
    p.add_argument("--extraction-epochs", type=int, default=30)
    p.add_argument("--independent", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="Keys (and training seeds).")
    p.add_argument("--key-seed", type=int, default=2018)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()

    data = load_dataset("digits")
    train, test = data.split(0.75, seed=0)
    attacker, _ = train.split(0.5, seed=1)
    runs = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        runs.append(one_key(args, r, (train, test, attacker)))
        print(
            f"key {r + 1}/{args.repeats} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )

    t0 = time.perf_counter()
    innocents = train_independent_models(
        lambda: build(args.arch, train.input_shape, 10),
        train.x,
        train.y,
        seeds=[10_000 + i for i in range(args.independent)],
        epochs=args.epochs,
        lr=args.lr,
    )
    fp_rows = []
    for m_i, m in enumerate(innocents):
        for run in runs:
            v = verify(m, run["_key"])
            fp_rows.append(
                {
                    "model": m_i,
                    "key_id": run["key_id"],
                    "p_value": v.p_value,
                    "trigger_accuracy": v.trigger_accuracy,
                    "verified": v.verified,
                    "most_frequent_class_share": v.details["most_frequent_class_share"],
                }
            )
    ps = [row["p_value"] for row in fp_rows]
    fp = {
        "models": args.independent,
        "tests": len(fp_rows),
        "verified": sum(row["verified"] for row in fp_rows),
        "min_p_value": min(ps) if ps else None,
        "median_p_value": statistics.median(ps) if ps else None,
        "share_p_below_0.01": sum(p < 0.01 for p in ps) / len(ps) if ps else None,
        "median_most_frequent_class_share": statistics.median(
            row["most_frequent_class_share"] for row in fp_rows
        )
        if fp_rows
        else None,
        "clean_accuracy": [accuracy(m, test.x, test.y) for m in innocents],
        "seconds": time.perf_counter() - t0,
        "rows": fp_rows,
    }
    for run in runs:
        run.pop("_key")

    doc = {
        "benchmark": "watermark",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "runs": runs,
        "false_positives": fp,
        "seconds": time.time() - started,
    }

    print(f"\nwatermark on digits, {args.arch}, {args.triggers} {args.kind} triggers, chance 0.1")
    print(
        f"{'key':<18}{'baseline':>9}{'scratch':>9}{'trig':>6}{'ft before':>10}{'ft after':>9}{'trig':>6}"
    )
    for run in runs:
        s, f = run["from_scratch"], run["fine_tuning"]
        print(
            f"{run['key_id']:<18}{run['baseline']['clean_accuracy']:9.4f}{s['clean_accuracy_after']:9.4f}"
            f"{s['trigger_accuracy']:6.2f}{f['clean_accuracy_before']:10.4f}{f['clean_accuracy_after']:9.4f}"
            f"{f['trigger_accuracy']:6.2f}"
        )
    print(
        f"\n{'attack':<22}{'setting':<28}{'trigger acc':>12}{'p (max)':>10}{'verified':>9}{'clean acc':>10}"
    )
    keys = list(
        dict.fromkeys(
            (a["attack"], json.dumps(a["setting"], sort_keys=True)) for a in runs[0]["attempts"]
        )
    )
    for attack, setting in keys:
        rows = [
            a
            for run in runs
            for a in run["attempts"]
            if a["attack"] == attack and json.dumps(a["setting"], sort_keys=True) == setting
        ]
        ok = [a for a in rows if a["status"] == "ok"]
        if not ok:
            print(f"{attack:<22}{rows[0]['status']}: {rows[0]['reason']}")
            continue
        s = json.loads(setting)
        label = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("lr", "amount", "queries"))
        print(
            f"{attack:<22}{label:<28}{statistics.mean(a['trigger_accuracy'] for a in ok):12.2f}"
            f"{max(a['p_value'] for a in ok):10.2g}{sum(a['verified'] for a in ok):>6}/{len(ok)}"
            f"{statistics.mean(a['clean_accuracy'] for a in ok):10.4f}"
        )
    print(
        f"\nfalse positives: {fp['verified']}/{fp['tests']} verified at 1e-6 "
        f"({args.independent} independent models x {len(runs)} keys); min p {fp['min_p_value']:.3g}, "
        f"median p {fp['median_p_value']:.3g}, share p < 0.01 {fp['share_p_below_0.01']:.2f}; "
        f"median top-class share on triggers {fp['median_most_frequent_class_share']:.2f}"
    )
    print(f"{time.time() - started:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
