"""Model extraction on the bundled digits: fidelity against queries, and exact recovery.

* Knockoff Nets (Orekondy et al. 2019), ``random`` and ``adaptive`` sampling, against a
  ``small_cnn`` victim trained here on one half of the digits; the attacker's pool is 70%
  of the other half, fidelity and accuracy are measured on the remaining 30% (never
  queried). Probability and label-only access; a few seeds each; one curve per setting
  (median fidelity per checkpoint, min and max across seeds). Copies: ``small_cnn``,
  Adam at lr 3e-3 (the library default 1e-3 trains this CNN too slowly for the small
  transfer sets), 30 epochs and at least 200 steps per checkpoint.
* Jacobian-based augmentation (Papernot et al. 2017) from a 100-point seed set of the same
  pool, label-only, for comparison.
* Equation solving (Tramèr et al. 2016) against a multinomial logistic regression on the
  digits (scikit-learn, 64 features, 10 classes): queries used (d + 1 = 65), fidelity on
  the held-out digits and on uniform random inputs, largest probability difference.

One torch thread throughout. Run::

    .venv/bin/python benchmarks/extraction.py --json benchmarks/results/extraction_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

from modelshield.core.architectures import build
from modelshield.core.classifier import from_torch
from modelshield.core.data import load_dataset
from modelshield.core.oracle import from_classifier
from modelshield.core.threat import QueryAccess
from modelshield.core.train import train_classifier
from modelshield.extraction import equation_solving, jacobian_augmentation, knockoff

CHECKPOINTS = [25, 50, 100, 200, 400, 600]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _summarise(runs: list[list[dict[str, Any]]], key: str = "fidelity") -> dict[str, Any]:
    """Median, min and max of ``key`` per checkpoint across seeds."""
    queries = [r["queries"] for r in runs[0]]
    cols = [[run[i][key] for run in runs] for i in range(len(queries))]
    return {
        "queries": queries,
        "median": [statistics.median(c) for c in cols],
        "min": [min(c) for c in cols],
        "max": [max(c) for c in cols],
    }


def bench_knockoff(seeds: list[int], epochs: int, lr: float) -> dict[str, Any]:
    data = load_dataset("digits")
    train, rest = data.split(0.5, seed=0)
    pool, held = rest.split(0.7, seed=1)
    t0 = time.perf_counter()
    torch.manual_seed(0)  # train_classifier seeds after the module is built: seed its init
    net = train_classifier(
        build("small_cnn", (1, 8, 8), 10), train.x, train.y, epochs=40, lr=3e-3, seed=0
    )
    victim_time = time.perf_counter() - t0
    clf = from_torch(net, input_shape=(1, 8, 8), num_classes=10)
    victim_acc = clf.accuracy(held.x, held.y)
    out: dict[str, Any] = {
        "victim": {
            "arch": "small_cnn",
            "train_size": len(train),
            "test_accuracy": victim_acc,
            "train_seconds": victim_time,
        },
        "pool_size": len(pool),
        "eval_size": len(held),
        "copy_arch": "small_cnn",
        "epochs": epochs,
        "lr": lr,
        "seeds": seeds,
        "curves": {},
    }
    for output in ("probs", "label"):
        for strategy in ("random", "adaptive"):
            runs, secs = [], []
            for seed in seeds:
                oracle = from_classifier(clf, QueryAccess(output=output))  # type: ignore[arg-type]
                t0 = time.perf_counter()
                _, res = knockoff(
                    oracle,
                    pool.x,
                    queries=CHECKPOINTS[-1],
                    strategy=strategy,
                    checkpoints=CHECKPOINTS,
                    epochs=epochs,
                    lr=lr,
                    seed=seed,
                    x_eval=held.x,
                    y_eval=held.y,
                    victim=clf,
                )
                secs.append(time.perf_counter() - t0)
                if res.queries_used != CHECKPOINTS[-1]:
                    raise RuntimeError(f"spent {res.queries_used} queries, not {CHECKPOINTS[-1]}")
                runs.append(res.curve)
            name = f"knockoff-{strategy}-{output}"
            out["curves"][name] = {
                "fidelity": _summarise(runs),
                "accuracy": _summarise(runs, "accuracy"),
                "seconds_per_run": statistics.median(secs),
            }
            print(
                name, [round(v, 3) for v in out["curves"][name]["fidelity"]["median"]], flush=True
            )
    runs, secs = [], []
    for seed in seeds:
        oracle = from_classifier(clf, QueryAccess(output="label"))
        gen = torch.Generator().manual_seed(seed)
        seed_x = pool.x[torch.randperm(len(pool), generator=gen)[:100]]
        t0 = time.perf_counter()
        _, res = jacobian_augmentation(
            oracle,
            seed_x,
            queries=CHECKPOINTS[-1],
            epochs=epochs,
            lr=lr,
            seed=seed,
            x_eval=held.x,
            y_eval=held.y,
            victim=clf,
        )
        secs.append(time.perf_counter() - t0)
        runs.append(res.curve)
    out["curves"]["jacobian-label"] = {
        "fidelity": _summarise(runs),
        "accuracy": _summarise(runs, "accuracy"),
        "seconds_per_run": statistics.median(secs),
        "seed_size": 100,
        "lam": 0.1,
    }
    print(
        "jacobian-label",
        [round(v, 3) for v in out["curves"]["jacobian-label"]["fidelity"]["median"]],
    )
    return out


def bench_equation() -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from modelshield.core.oracles.sklearn import SklearnOracle

    data = load_dataset("digits")
    train, held = data.split(0.5, seed=0)
    est = LogisticRegression(max_iter=2000).fit(
        train.x.reshape(len(train), -1).numpy(), train.y.numpy()
    )
    flat = held.x.reshape(len(held), -1)
    rows = {}
    for name, x_eval in (("held-out digits", flat), ("uniform inputs", None)):
        oracle = SklearnOracle(est)
        t0 = time.perf_counter()
        _, res = equation_solving(oracle, x_eval=x_eval, seed=0)
        rows[name] = {
            "queries_used": res.queries_used,
            "oracle_queries": oracle.queries_used,
            "fidelity": res.fidelity,
            "max_prob_diff": res.details["max_prob_diff"],
            "condition_number": res.details["condition_number"],
            "n_eval": res.details["n_eval"],
            "seconds": time.perf_counter() - t0,
        }
        print("equation", name, rows[name], flush=True)
    return {
        "victim": "sklearn LogisticRegression (multinomial, lbfgs), 64 features, 10 classes",
        "victim_test_accuracy": float(est.score(flat.numpy(), held.y.numpy())),
        "d_plus_1": 65,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3, help="the copies' Adam learning rate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = {
        "benchmark": "extraction",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "equation": bench_equation(),
        "knockoff": bench_knockoff(list(range(args.seeds)), args.epochs, args.lr),
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(f"total {result['wall_seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
