"""DP-SGD step time over a plain SGD step, per Opacus per-example gradient mode.

For each model and each mode (``hooks``, ``functorch``, ``ghost``) it times one full DP-SGD
step through :func:`modelshield.privacy.dp.build_engine` (``engine.step``: forward,
per-example gradients or their norms, clipping, Gaussian noise, optimizer step) against one
plain step on a copy of the same model with the same initial weights (zero_grad, forward,
cross-entropy, backward, ``optimizer.step``; ``torch.optim.SGD``, momentum 0, as under the
DP engine), on the same batch and device.

The variants are timed in rounds, one sample of each per round in a rotating order, after
``--warmup`` untimed rounds, so that load on a shared machine hits all alike. A sample is
``k`` consecutive steps of one variant (``k`` chosen per variant from one untimed step, so
that a sample lasts at least ``--min-sample-ms``), divided by ``k``. Reported per mode: the median step time, the
median of the per-round ratios dp / plain, and the ratio of the medians. CUDA is
synchronised around every sample.

Models (random data; a network's cost does not depend on the values):

* ``mlp``: the repo's ``mlp`` architecture with one hidden layer, 784-256-10, on 1×28×28,
  batch 256;
* ``sample_convnet``: the Opacus MNIST example's ``SampleConvNet``, 1×28×28, batch 256;
* ``gn_cnn``: the repo's ``small_cnn`` (width 32, three 3×3 convolutions, global average
  pooling) on 3×32×32 with a ``GroupNorm(8, c)`` after each convolution, batch 128.

Run ``python benchmarks/dp_speed.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelshield
from modelshield.core.architectures import mlp
from modelshield.privacy.dp import GRAD_SAMPLE_MODES, DPConfig, build_engine


def sample_convnet() -> nn.Module:
    """Opacus's examples/mnist.py ``SampleConvNet``, as a Sequential."""
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


def gn_cnn(width: int = 32, channels: int = 3, classes: int = 10) -> nn.Module:
    """``small_cnn``'s layout with GroupNorm(8, c) after every convolution."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.GroupNorm(8, width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.GroupNorm(8, 2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.GroupNorm(8, 2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str]] = {
    "mlp": (lambda: mlp((1, 28, 28), 10, hidden=(256,)), (1, 28, 28), 256, "MLP 784-256-10"),
    "sample_convnet": (sample_convnet, (1, 28, 28), 256, "Opacus MNIST SampleConvNet"),
    "gn_cnn": (gn_cnn, (3, 32, 32), 128, "small_cnn width 32 + GroupNorm, 3x32x32"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_stepper(
    module: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], float]:
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.0)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


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
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "modelshield": modelshield.__version__,
    }
    try:
        from opacus.version import __version__ as opacus_version

        info["opacus"] = opacus_version
    except Exception:  # pragma: no cover - opacus is a dependency of the DP extra
        info["opacus"] = "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    factory, shape, batch, label = MODELS[name]
    if args.batch_scale != 1.0:
        batch = max(1, round(batch * args.batch_scale))
    torch.manual_seed(args.seed)
    base = factory().to(device).train()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand((batch, *shape), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    lr = 0.01
    steppers: dict[str, Callable[[], float]] = {
        "plain": plain_stepper(copy.deepcopy(base), lr, x, y)
    }
    engines = {}
    failed: dict[str, str] = {}
    for mode in args.modes:
        cfg = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=batch, lr=lr, mode=mode)
        try:
            engine = build_engine(
                copy.deepcopy(base),
                mode=mode,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=batch,
                cfg=cfg,
                noise_generator=torch.Generator(device=device).manual_seed(args.seed + 1),
            )
            engine.step(x, y)  # fail here, not inside the timed rounds
        except Exception as exc:
            failed[mode] = f"{type(exc).__name__}: {exc}"
            print(f"  {name}: mode {mode} failed: {failed[mode]}", file=sys.stderr)
            continue
        engines[mode] = engine
        steppers[mode] = lambda e=engine: e.step(x, y)

    # inner[k]: enough consecutive steps that one sample of k lasts >= --min-sample-ms
    inner: dict[str, int] = {}
    for k, stepper in steppers.items():
        sync(device)
        t0 = time.perf_counter()
        stepper()
        sync(device)
        t1 = time.perf_counter() - t0
        inner[k] = max(1, math.ceil(args.min_sample_ms / 1e3 / max(t1, 1e-6)))

    names = list(steppers)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                steppers[k]()
            sync(device)
            dt_ = (time.perf_counter() - t0) / inner[k]
            if r >= args.warmup:
                samples[k].append(dt_)
    for e in engines.values():
        e.close()

    plain = samples["plain"]
    plain_med = statistics.median(plain)
    rows = [
        {
            "variant": "plain",
            "ms_median": plain_med * 1e3,
            "ms_all": [s * 1e3 for s in plain],
        }
    ]
    for mode in args.modes:
        if mode not in engines:
            rows.append({"variant": mode, "failed": failed.get(mode, "not run")})
            continue
        s = samples[mode]
        per_round = [a / b for a, b in zip(s, plain, strict=True)]
        rows.append(
            {
                "variant": mode,
                "ms_median": statistics.median(s) * 1e3,
                "ratio_median_of_rounds": statistics.median(per_round),
                "ratio_of_medians": statistics.median(s) / plain_med,
                "ratio_range": [min(per_round), max(per_round)],
                "ms_all": [v * 1e3 for v in s],
            }
        )
    return {
        "model": name,
        "label": label,
        "input": list(shape),
        "batch": batch,
        "parameters": sum(p.numel() for p in base.parameters()),
        "steps_per_sample": inner,
        "rows": rows,
    }


def print_model(res: dict[str, Any]) -> None:
    print(
        f"\n{res['label']} (batch {res['batch']}, {res['parameters']:,} parameters; "
        "steps per sample: "
        + ", ".join(f"{k} {v}" for k, v in res["steps_per_sample"].items())
        + ")"
    )
    print(f"{'variant':<10} {'ms/step':>9} {'dp/plain':>9} {'(ratio of medians)':>19} range")
    for row in res["rows"]:
        if "failed" in row:
            print(f"{row['variant']:<10} failed: {row['failed']}")
        elif row["variant"] == "plain":
            print(f"{'plain':<10} {row['ms_median']:9.2f} {1.0:9.2f}")
        else:
            lo, hi = row["ratio_range"]
            print(
                f"{row['variant']:<10} {row['ms_median']:9.2f} "
                f"{row['ratio_median_of_rounds']:9.2f} {row['ratio_of_medians']:19.2f} "
                f"{lo:.2f}-{hi:.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=21, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES), help="comma-separated")
    p.add_argument(
        "--batch-scale", type=float, default=1.0, help="multiply every model's batch size"
    )
    p.add_argument("--min-sample-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default results/dp_speed_<device>.json")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for m in args.modes:
        if m not in GRAD_SAMPLE_MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(GRAD_SAMPLE_MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"dp_speed_{device.type}.json"
    warnings.filterwarnings("ignore", module="opacus")
    started = time.time()
    doc: dict[str, Any] = {
        "benchmark": "dp_speed",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(device),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "optimizer": "SGD lr 0.01 momentum 0 (plain and DP)",
            "seed": args.seed,
        },
        "results": [],
    }
    for name in args.models:
        res = bench_model(name, args, device)
        print_model(res)
        doc["results"].append(res)
        doc["seconds"] = time.time() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{time.time() - started:.0f} s in all; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
