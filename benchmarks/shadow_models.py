"""Reference (shadow) model training scaled out on Ray: time per model and the speed-up.

Trains the same ``--k`` reference models (LiRA online masks, Carlini et al. 2022) on the
bundled digits three ways and checks the weights are bit-identical each time:

* ``local``: :class:`~modelshield.exec.LocalExecutor`, one model after another;
* ``ray-1``: :class:`~modelshield.exec.RayExecutor` with ``num_workers=1``;
* ``ray-2``: the same with ``num_workers=2``.

Every model trains with one torch thread (in every executor). Ray start-up and worker
warm-up (importing torch in each worker) are timed separately and left out of the
training wall time; the speed-up is ``wall(ray-1) / wall(ray-2)``, median over
``--rounds`` rounds. Ray starts a local cluster: run inside a loopback-only namespace::

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' \
        .venv/bin/python benchmarks/shadow_models.py --json benchmarks/results/shadow.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from modelshield.core.data import load_dataset
from modelshield.exec import Executor, LocalExecutor, RayExecutor
from modelshield.privacy.shadow import ReferenceModels, ShadowSpec, train_reference_models


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _spin(n: int) -> float:
    """Fixed single-threaded CPU work (for the calibration row)."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a)
    return time.perf_counter() - t0


def _calibrate(n: int) -> dict[str, float]:
    """How parallel the machine is right now: 2 processes of fixed work vs 1, no Ray.

    The ratio ``2 * t(1 process) / t(2 processes)`` is the best speed-up two workers can
    reach under the current load (2.0 on two idle cores).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_spin, [10, 10])  # start both processes
        t0 = time.perf_counter()
        pool.map(_spin, [n], chunksize=1)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - t0
    return {"one_job_s": one, "two_jobs_s": two, "available_speedup": 2 * one / two}


def _same(a: ReferenceModels, b: ReferenceModels) -> bool:
    return all(
        all(torch.equal(sa[key], sb[key]) for key in sa)
        for sa, sb in zip(a.states, b.states, strict=True)
    )


def _run(ex: Executor, args: argparse.Namespace, spec: ShadowSpec) -> tuple[float, ReferenceModels]:
    d = load_dataset("digits")
    t0 = time.perf_counter()
    refs = train_reference_models(d.x, d.y, 10, args.k, spec, seed=args.seed, executor=ex)
    return time.perf_counter() - t0, refs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=8, help="number of reference models")
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of each row")
    p.add_argument("--no-local", action="store_true", help="skip the LocalExecutor row")
    p.add_argument(
        "--calibrate",
        type=int,
        default=2000,
        help="iterations of the no-Ray 1-vs-2-process calibration (0: skip)",
    )
    p.add_argument("--json", help="write the figures here as JSON")
    args = p.parse_args(argv)
    spec = ShadowSpec(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size)

    record: dict[str, Any] = {
        "benchmark": "shadow_models",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": " ".join([sys.executable, *sys.argv]),
        "config": {**vars(args), "spec": spec.to_dict(), "data": "digits 1797x1x8x8"},
        "loadavg_start": _loadavg(),
        "rows": {},
    }
    try:
        import ray

        record["machine"]["ray"] = ray.__version__
    except ImportError:
        pass
    if args.calibrate:
        record["calibration"] = _calibrate(args.calibrate)
    rows: dict[str, dict[str, Any]] = record["rows"]
    reference: ReferenceModels | None = None

    if not args.no_local:
        times = []
        for _ in range(args.rounds):
            t, refs = _run(LocalExecutor(), args, spec)
            times.append(t)
            reference = reference or refs
        rows["local"] = {"wall_s": times}

    for workers in (1, 2):
        t0 = time.perf_counter()
        ex = RayExecutor(num_workers=workers)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        ex.warm_up()
        warm = time.perf_counter() - t0
        times = []
        identical = True
        try:
            for _ in range(args.rounds):
                t, refs = _run(ex, args, spec)
                times.append(t)
                if reference is None:
                    reference = refs
                identical = identical and _same(reference, refs)
        finally:
            ex.close()
        rows[f"ray-{workers}"] = {
            "wall_s": times,
            "ray_start_s": start,
            "warm_up_s": warm,
            "identical_to_first_row": identical,
        }

    for row in rows.values():
        row["median_s"] = statistics.median(row["wall_s"])
        row["per_model_s"] = row["median_s"] / args.k
    speedups = [
        a / b for a, b in zip(rows["ray-1"]["wall_s"], rows["ray-2"]["wall_s"], strict=True)
    ]
    record["speedup_1_to_2_workers"] = statistics.median(speedups)
    record["speedup_per_round"] = speedups
    record["target_speedup"] = 1.8
    record["target_met"] = record["speedup_1_to_2_workers"] >= 1.8
    record["loadavg_end"] = _loadavg()

    print(f"{args.k} x {args.arch} ({args.epochs} epochs) on digits, rounds={args.rounds}")
    print(f"loadavg start {record['loadavg_start']} end {record['loadavg_end']}")
    if "calibration" in record:
        c = record["calibration"]
        print(
            f"calibration (no Ray, 2 processes of fixed work vs 1): best reachable "
            f"speed-up {c['available_speedup']:.2f}x"
        )
    print(f"{'row':8} {'median wall s':>14} {'per model s':>12}  notes")
    for name, row in rows.items():
        notes = ""
        if "ray_start_s" in row:
            notes = (
                f"ray start {row['ray_start_s']:.1f} s, warm-up {row['warm_up_s']:.1f} s, "
                f"identical={row['identical_to_first_row']}"
            )
        print(f"{name:8} {row['median_s']:14.2f} {row['per_model_s']:12.3f}  {notes}")
    print(
        f"speed-up 1 -> 2 Ray workers: {record['speedup_1_to_2_workers']:.2f}x "
        f"(target 1.8x {'met' if record['target_met'] else 'NOT met'})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
