"""Joint training in MPC (issue 11): logistic and linear models on split breast-cancer data.

scikit-learn's breast-cancer set (569 × 30), features min-max scaled to [0, 1] (public
preprocessing), shuffled with seed 0 and split into two data parties' shards (200 and
255 rows) and a held-out set (114). ``modelshield mpc train`` runs 3 parties (two data
parties and one compute party) as local processes; the secure model is compared with
plaintext gradient descent on the pooled shards (same epochs and learning rate; exact
sigmoid for ``plaintext_accuracy``, the MPC's hard sigmoid for the same-algorithm check).

    scripts/loopback.sh .venv/bin/python benchmarks/mpc_training.py \\
        --out benchmarks/results/mpc_training.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from modelshield.crypto.mpc.commands import run_train

logger = logging.getLogger("benchmarks.mpc_training")


def shards(d: Path) -> tuple[list[Path], Path]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    idx = np.random.default_rng(0).permutation(len(y))
    x, y = x[idx].astype(np.float32), y[idx].astype(np.int64)
    paths = []
    for k, sl in enumerate((slice(0, 200), slice(200, 455))):
        np.savez(d / f"shard{k}.npz", x=x[sl], y=y[sl])
        paths.append(d / f"shard{k}.npz")
    np.savez(d / "heldout.npz", x=x[455:], y=y[455:])
    return paths, d / "heldout.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "mpc_training.json"
    )
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--engines", default="ring,mpyc", help="engines to run, comma-separated")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict[str, Any] = {
        "benchmark": "mpc_training",
        "date": date.today().isoformat(),
        "command": "scripts/loopback.sh .venv/bin/python benchmarks/mpc_training.py "
        + " ".join(sys.argv[1:]),
        "runs": {},
    }
    keep = (
        "accuracy", "plaintext_accuracy", "plaintext_same_algorithm_accuracy",
        "max_weight_error", "training_seconds", "plaintext_training_seconds", "bytes_sent",
        "shards", "epochs", "lr", "frac_bits", "parties", "roles", "engine",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths, heldout = shards(d)
        for engine in args.engines.split(","):
            for kind, lr in (("logistic", 1.0), ("linear", 0.5)):
                r = run_train(
                    data=",".join(map(str, paths)), model=kind, parties=3, epochs=args.epochs,
                    lr=lr, test=str(heldout), out=str(d / f"{engine}-{kind}"), engine=engine,
                )  # fmt: skip
                results["runs"][f"{engine}/{kind}"] = {k: r[k] for k in keep}
                logger.info(
                    "%s/%s: %s", engine, kind, json.dumps(results["runs"][f"{engine}/{kind}"])
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
