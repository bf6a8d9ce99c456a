"""PGD speed (Madry et al. 2018): modelshield against a floor and against peer libraries.

On one model, one batch and one eps, it times

* ``floor``: ``steps`` × (forward + backward w.r.t. the input) in fp32, nothing else: no
  attack can take fewer passes;
* ``modelshield pgd``: random start, one restart, at ``--eps`` (it stops working on points
  already fooled, so its time depends on the model);
* ``modelshield pgd, full steps``: the same at eps = 1e-6, where no point gets fooled, so
  every step runs on every point: its ratio to the floor is the per-step overhead;
* ``torchattacks PGD`` and ``ART ProjectedGradientDescentPyTorch`` at ``--eps`` (both run
  every step on every point), when installed; rows for missing peers are skipped.

A ratio of whole runs mixes the per-step cost with constant costs (our input checks and
the guard's extra forward passes). Unless ``--no-slope``, the floor and the full-steps row
are also timed at ``2·steps``, in the same rounds, and the per-step cost is the slope
``[t(2N) − t(N)] / N`` of each; the per-step overhead is our slope over the floor's, per
round (median and range over the rounds), and the constant overhead is what is left,
``t(N) − N·slope`` beyond the floor's, also in units of one no-grad forward pass of the
batch (timed as its own row).

Each figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones, the
rows timed in rounds (one run of each per round) so that drift in the machine's load hits
all alike, with ``torch.cuda.synchronize()`` around every run on CUDA. Labels are the model's own
predictions on the synthetic batch, so clean accuracy is 100% and robust accuracy is the
fraction of points no attack moved across a boundary.

Run ``python benchmarks/evasion.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import modelshield
from modelshield.core.architectures import mlp, small_cnn
from modelshield.core.classifier import from_torch
from modelshield.core.threat import LpThreat
from modelshield.evasion import pgd

TINY_EPS = 1e-6


@dataclass
class Row:
    name: str
    seconds: float | None = None
    ratio_to_floor: float | None = None
    robust_accuracy: float | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)
    steps: int | None = None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input must look like 3x32x32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"--input sizes must be positive, got {text!r}")
    return shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--input", type=parse_shape, default=(3, 32, 32), help="e.g. 3x32x32")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--eps", type=float, default=None, help="default 8/255 (linf) or 0.5 (l2)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-slope",
        dest="slope",
        action="store_false",
        help="skip the 2x-steps rows and the per-step (slope) figures",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.model == "cnn" and len(args.input) != 3:
        p.error(f"--model cnn needs a CxHxW input, got {args.input}")
    for name in ("batch", "steps", "repeats", "classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.eps is None:
        args.eps = 8 / 255 if args.norm == "linf" else 0.5
    return args


def build_model(kind: str, shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = small_cnn(shape, classes) if kind == "cnn" else mlp(shape, classes)
    return net.eval()


@dataclass
class Task:
    """One timed row: ``run`` does the work, ``accuracy`` reads its last output."""

    name: str
    run: Callable[[], Any]
    accuracy: Callable[[Any], float | None]
    note: str = ""
    steps: int | None = None
    """Steps the row runs; its ratio is taken to the floor row of the same steps."""


def time_round_robin(
    tasks: list[Task], *, repeats: int, warmup: int, cuda: bool
) -> list[tuple[list[float], Any]]:
    """Warm every task up, then time them in rounds (one run of each per round), so drift
    in the machine's load hits every row alike. Returns each task's times and last output."""
    outs: list[Any] = [None] * len(tasks)
    for i, task in enumerate(tasks):
        for _ in range(warmup):
            outs[i] = task.run()
    times: list[list[float]] = [[] for _ in tasks]
    for _ in range(repeats):
        for i, task in enumerate(tasks):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs[i] = task.run()
            if cuda:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    return list(zip(times, outs, strict=True))


def floor_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    """``steps`` forward + input-gradient passes on the same batch: the cost of any PGD."""

    def run() -> None:
        xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(net(xa), y)
            torch.autograd.grad(loss, xa)
            xa = xa.detach()

    return run


def forward_fn(net: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One no-grad forward pass of the batch: the unit of the constant overhead."""

    def run() -> None:
        with torch.no_grad():
            net(x)

    return run


def robust(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x_adv`` still classified as ``y``."""
    with torch.no_grad():
        return float((net(x_adv).argmax(dim=1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape: tuple[int, ...] = args.input
    net = build_model(args.model, shape, args.classes, args.seed).to(device)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.rand(args.batch, *shape, generator=g).to(device)
    with torch.no_grad():
        y = net(x).argmax(dim=1)
    model = from_torch(net, input_shape=shape, num_classes=args.classes, device=device)
    alpha = 2.5 * args.eps / args.steps
    n = args.steps
    tasks = [Task("floor: steps x (fwd + bwd wrt input)", floor_fn(net, x, y, n), no_acc, steps=n)]
    pgd_rows = [
        ("modelshield pgd", args.eps, n, "stops on fooled points"),
        ("modelshield pgd, full steps", TINY_EPS, n, "eps=1e-6: every step on every point"),
    ]
    if args.slope:
        tasks.append(
            Task(FLOOR_2N, floor_fn(net, x, y, 2 * n), no_acc, f"{2 * n} steps", steps=2 * n)
        )
        pgd_rows.append((FULL_2N, TINY_EPS, 2 * n, f"{2 * n} steps, eps=1e-6"))
    for name, eps, steps, note in pgd_rows:
        run = partial(
            pgd,
            model,
            x,
            y,
            threat=LpThreat(args.norm, eps),
            steps=steps,
            step_size=2.5 * eps / steps,
            seed=args.seed,
        )
        tasks.append(Task(name, run, attrgetter("robust_accuracy"), note, steps=steps))
    if args.slope:
        tasks.append(Task(FORWARD, forward_fn(net, x), no_acc, "unit of the constant overhead"))
    skipped: list[Row] = []
    if importlib.util.find_spec("torchattacks") is None:
        skipped.append(Row("torchattacks PGD", note="skipped: torchattacks not installed"))
    else:
        import torchattacks

        cls: Any = torchattacks.PGD if args.norm == "linf" else torchattacks.PGDL2
        atk = cls(net, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)
        torch.manual_seed(args.seed)
        tasks.append(
            Task("torchattacks PGD", partial(atk, x, y), partial(robust, net, y=y), steps=n)
        )
    if importlib.util.find_spec("art") is None:
        skipped.append(Row("ART PGD", note="skipped: adversarial-robustness-toolbox not installed"))
    else:
        art = art_task(args, net, x, y, alpha)
        if isinstance(art, Row):
            skipped.append(art)
        else:
            tasks.append(art)

    measured = time_round_robin(tasks, repeats=args.repeats, warmup=args.warmup, cuda=cuda)
    floors = {
        task.steps: statistics.median(times)
        for task, (times, _) in zip(tasks, measured, strict=True)
        if task.name.startswith("floor")
    }
    rows: list[Row] = []
    for task, (times, out) in zip(tasks, measured, strict=True):
        seconds = statistics.median(times)
        acc = task.accuracy(out)
        note = task.note
        if "full steps" in task.name and acc is not None and acc < 1.0:
            note += f" (WARNING: {1 - acc:.1%} fooled)"
        ratio = seconds / floors[task.steps] if task.steps in floors else None
        rows.append(Row(task.name, seconds, ratio, acc, note, times, task.steps))
    rows += skipped
    print_table(args, rows)
    per_step = per_step_figures(rows, n) if args.slope else None
    if per_step is not None:
        print_per_step(per_step)
    if args.json:
        write_json(args, rows, per_step)
    return 0


FLOOR_2N = "floor, 2 x steps"
FULL_2N = "modelshield pgd, full steps, 2 x steps"
FORWARD = "forward pass (no grad), batch"


def per_step_figures(rows: list[Row], n: int) -> dict[str, Any]:
    """Slope method: per-step cost ``[t(2N) − t(N)] / N`` and what is left as constant.

    Figures are taken per round (each round ran every row once, back to back), then the
    median and range over the rounds are reported, so slow drift in the machine's load
    cancels within a round.
    """
    by = {r.name: r.times for r in rows}
    f1, f2 = by["floor: steps x (fwd + bwd wrt input)"], by[FLOOR_2N]
    p1, p2 = by["modelshield pgd, full steps"], by[FULL_2N]
    fwd = by[FORWARD]
    floor_slope = [(b - a) / n for a, b in zip(f1, f2, strict=True)]
    ours_slope = [(b - a) / n for a, b in zip(p1, p2, strict=True)]
    ratio = [o / f for o, f in zip(ours_slope, floor_slope, strict=True)]
    floor_const = [a - n * s for a, s in zip(f1, floor_slope, strict=True)]
    ours_const = [a - n * s for a, s in zip(p1, ours_slope, strict=True)]
    extra = [o - f for o, f in zip(ours_const, floor_const, strict=True)]
    extra_fwd = [e / t for e, t in zip(extra, fwd, strict=True)]
    med = statistics.median
    lo, hi = bootstrap_ratio(ours_slope, floor_slope)
    return {
        "method": "slope: [t(2N) - t(N)] / N per round; median (min, max) over rounds",
        "N": n,
        "floor_per_step_s": med(floor_slope),
        "ours_per_step_s": med(ours_slope),
        "per_step_overhead": med(ratio),
        "per_step_overhead_range": [min(ratio), max(ratio)],
        "per_step_overhead_of_medians": med(ours_slope) / med(floor_slope),
        "per_step_overhead_of_medians_ci90": [lo, hi],
        "floor_constant_s": med(floor_const),
        "ours_constant_s": med(ours_const),
        "constant_overhead_s": med(extra),
        "forward_s": med(fwd),
        "constant_overhead_forwards": med(extra_fwd),
        "constant_overhead_forwards_range": [min(extra_fwd), max(extra_fwd)],
        "per_round": {
            "floor_per_step_s": floor_slope,
            "ours_per_step_s": ours_slope,
            "per_step_overhead": ratio,
            "constant_overhead_s": extra,
        },
    }


def bootstrap_ratio(
    num: list[float], den: list[float], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """90% bootstrap interval of ``median(num) / median(den)``, resampling whole rounds."""
    import random

    rng = random.Random(seed)
    k = len(num)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(k) for _ in range(k)]
        d = statistics.median(den[i] for i in idx)
        if d > 0:
            stats.append(statistics.median(num[i] for i in idx) / d)
    stats.sort()
    if not stats:
        return math.nan, math.nan
    return stats[int(0.05 * (len(stats) - 1))], stats[int(0.95 * (len(stats) - 1))]


def print_per_step(ps: dict[str, Any]) -> None:
    lo, hi = ps["per_step_overhead_range"]
    flo, fhi = ps["constant_overhead_forwards_range"]
    print(f"per-step cost, slope [t({2 * ps['N']}) - t({ps['N']})] / {ps['N']}, median over rounds")
    print(f"  floor per step                 {ps['floor_per_step_s'] * 1e3:9.3f} ms")
    print(f"  modelshield pgd per step       {ps['ours_per_step_s'] * 1e3:9.3f} ms")
    print(
        f"  per-step overhead              {ps['per_step_overhead']:9.3f} x floor "
        f"(rounds {lo:.3f}..{hi:.3f}); ratio of medians "
        f"{ps['per_step_overhead_of_medians']:.3f}, 90% bootstrap CI "
        f"{ps['per_step_overhead_of_medians_ci90'][0]:.3f}..{ps['per_step_overhead_of_medians_ci90'][1]:.3f}"
    )
    print(
        f"  constant overhead (forwards)   {ps['constant_overhead_s'] * 1e3:9.2f} ms = "
        f"{ps['constant_overhead_forwards']:.1f} no-grad forwards of "
        f"{ps['forward_s'] * 1e3:.2f} ms (rounds {flo:.1f}..{fhi:.1f}); "
        f"floor's own constant {ps['floor_constant_s'] * 1e3:.2f} ms"
    )


def no_acc(_: Any) -> None:
    return None


def art_task(
    args: argparse.Namespace, net: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float
) -> Task | Row:
    """ART's PGD on the same batch (numpy in and out), or a skipped row if ART won't load."""
    try:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:  # e.g. ART present but one of its own dependencies missing
        return Row("ART PGD", note=f"skipped: {exc}")
    logging.getLogger("art").setLevel(logging.ERROR)
    clf = PyTorchClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=args.classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    atk = ProjectedGradientDescentPyTorch(
        clf,
        norm=np.inf if args.norm == "linf" else 2,
        eps=args.eps,
        eps_step=alpha,
        max_iter=args.steps,
        num_random_init=1,
        batch_size=len(x),
        verbose=False,
    )
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
    np.random.seed(args.seed)

    def accuracy(adv: Any) -> float:
        return robust(net, torch.from_numpy(adv).to(x.device), y)

    return Task(
        "ART PGD", partial(atk.generate, x_np, y=y_np), accuracy, "numpy in/out", steps=args.steps
    )


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "modelshield": modelshield.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    for peer in ("torchattacks", "art"):
        if importlib.util.find_spec(peer) is not None:
            try:
                info[peer] = __import__(peer).__version__
            except Exception as exc:  # a broken peer install must not stop the benchmark
                info[peer] = f"unavailable ({type(exc).__name__})"
    return info


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "model": args.model,
        "input": list(args.input),
        "classes": args.classes,
        "batch": args.batch,
        "steps": args.steps,
        "norm": args.norm,
        "eps": args.eps,
        "step_size": 2.5 * args.eps / args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "slope": args.slope,
    }


def print_table(args: argparse.Namespace, rows: list[Row]) -> None:
    cfg = config(args)
    print(
        f"PGD {cfg['norm']} eps={cfg['eps']:.4g}, {cfg['steps']} steps, batch {cfg['batch']}, "
        f"{cfg['model']} on {'x'.join(map(str, cfg['input']))}, {cfg['device']}, "
        f"median of {cfg['repeats']} (torch threads {torch.get_num_threads()})"
    )
    head = f"{'attack':<38} {'time ms':>9} {'x floor':>8} {'robust acc':>10}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = f"{r.seconds * 1e3:9.1f}" if r.seconds is not None else f"{'-':>9}"
        ratio = f"{r.ratio_to_floor:8.2f}" if r.ratio_to_floor is not None else f"{'-':>8}"
        acc = f"{r.robust_accuracy:10.3f}" if r.robust_accuracy is not None else f"{'-':>10}"
        print(f"{r.name:<38} {ms} {ratio} {acc}  {r.note}")


def write_json(
    args: argparse.Namespace, rows: list[Row], per_step: dict[str, Any] | None = None
) -> None:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc = {
        "benchmark": "evasion.pgd_speed",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config(args),
        "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in rows],
        "per_step": per_step,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
