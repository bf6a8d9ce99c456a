"""Full robust-accuracy evaluation (AutoAttack, Croce & Hein 2020): modelshield against peers.

On one small CNN trained on the spot (``small_cnn`` on the bundled 8×8 digits, seeded, a
few seconds on a CPU) and ``--n`` held-out test points, at one L∞ ``--eps``, it times

* ``modelshield autoattack``: APGD-CE (100 steps) → APGD-T (9 targets × 100 steps) →
  Square (5000 queries), each member on the points every earlier one failed on;
* ``modelshield autoattack-fast``: APGD-CE (50) → APGD-T (3 targets × 50);
* ``torchattacks AutoAttack``: ``AutoAttack(model, norm='Linf', eps, version='standard',
  n_classes=C, seed=0)``, as shipped (APGD-CE → APGD-T → FAB-T → Square 5000; torchattacks'
  APGD, APGD-T and FAB default to 10 steps, not the paper's 100);
* ``ART AutoAttack``: ``art.attacks.evasion.AutoAttack`` with its default attack list
  (APGD-CE and APGD-DLR with 5 random starts each, DeepFool, Square 5000 with 5 restarts),
  ``eps_step = eps`` so that APGD's first step is the paper's 2·eps; numpy in and out.
  ``--art-attacks light`` swaps in APGD-CE + APGD-DLR + Square (1 start each).

Every row but ART's is timed ``--rounds`` times, in rounds (one run of each row per round,
back to back, so drift in the machine's load hits all alike), after one shared untimed
warm-up pass of the model; the table shows the median, and the ratio to torchattacks is
the median of the per-round ratios. ART's list runs once, after the rounds. On CUDA
``torch.cuda.synchronize()`` brackets every run. Robust accuracy is recomputed here from
each library's returned inputs with the same model (a point counts as robust when its
returned input is still classified correctly), after checking every returned input lies
within eps and the box. Rows for peers that are not installed are skipped with a note.

Run ``python benchmarks/evaluation.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import io
import json
import logging
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evasion import machine
from modelshield.core.architectures import small_cnn
from modelshield.core.classifier import from_torch
from modelshield.core.data import load_dataset
from modelshield.core.threat import LpThreat
from modelshield.evasion.base import ATTACKS


@dataclass
class Row:
    name: str
    seconds: float | None = None
    ratio_to_torchattacks: float | None = None
    ratio_to_art: float | None = None
    robust_accuracy: float | None = None
    max_linf: float | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--n", type=int, default=500, help="test points evaluated")
    p.add_argument("--eps", type=float, default=0.08, help="L-inf radius (inputs in [0, 1])")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timed runs of every row but ART's, in rounds (median shown); ART runs once",
    )
    p.add_argument(
        "--art-attacks",
        choices=["default", "light"],
        default="default",
        help="ART's default list, or APGD-CE + APGD-DLR + Square with one start each",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of rows: ours,fast,torchattacks,art (default: all)",
    )
    p.add_argument(
        "--ta-steps",
        type=int,
        default=None,
        help="add a row: torchattacks' AutoAttack with its APGD, APGD-T and FAB at this many "
        "steps (100 is the paper's; as shipped they run 10)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each member of ours and of torchattacks' ensemble on its own",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    if args.n < 1 or args.epochs < 1 or args.rounds < 1:
        p.error("--n, --epochs and --rounds must be >= 1")
    if not 0 < args.eps < 1:
        p.error("--eps must lie in (0, 1)")
    known = {"ours", "fast", "torchattacks", "art"}
    args.only = set(args.only.split(",")) if args.only else known
    if args.only - known:
        p.error(f"--only takes {', '.join(sorted(known))}; got {', '.join(args.only - known)}")
    return args


# -- the model -------------------------------------------------------------------------------
def train_model(
    device: torch.device, n_test: int, epochs: int, seed: int
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, int]:
    """``small_cnn`` on the bundled digits, seeded; returns (net, x_test, y_test, train s, C)."""
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    n_test = min(n_test, len(data) // 2)
    test, train = order[:n_test], order[n_test:]
    torch.manual_seed(seed)
    net = small_cnn(data.input_shape, data.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = data.x[train].to(device), data.y[train].to(device)
    started = time.perf_counter()
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g).to(device)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return (
        net,
        data.x[test].to(device),
        data.y[test].to(device),
        time.perf_counter() - started,
        data.num_classes,
    )


def correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x).argmax(dim=1) == y


# -- the rows --------------------------------------------------------------------------------
@dataclass
class Entry:
    key: str
    name: str
    run: Callable[[], torch.Tensor]  # returns x_adv on the device
    note: str = ""


def ours(
    key: str,
    attack: str,
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    classes: int,
    seed: int,
) -> Entry:
    model = from_torch(net, input_shape=tuple(x.shape[1:]), num_classes=classes, device=x.device)
    spec = ATTACKS.get(attack)

    def run() -> torch.Tensor:
        res = spec(model, x, y, threat=LpThreat("linf", eps), seed=seed)
        run.config = res.config  # type: ignore[attr-defined]
        assert res.x_adv is not None
        return res.x_adv

    return Entry(key, f"modelshield {attack}", run)


def make_torchattacks(
    torchattacks: Any, net: nn.Module, eps: float, classes: int, seed: int, device: torch.device
) -> Any:
    """torchattacks' standard AutoAttack, as the issue names it, on ``device``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # "Failed to set device automatically" goes here
        atk = torchattacks.AutoAttack(
            net, norm="Linf", eps=eps, version="standard", n_classes=classes, seed=seed
        )
    atk.set_device(device)
    for sub in atk._autoattack.attacks:  # the members print the same warning; same fix
        sub.set_device(device)
    return atk


def breakdown(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    classes: int,
    seed: int,
    cuda: bool,
) -> list[dict[str, Any]]:
    """Each member of our ``autoattack`` and of torchattacks' standard AutoAttack timed on
    its own, in the ensemble's order, each on the points every earlier member left robust,
    as the ensembles themselves do (ours starts from the correctly classified points, with
    member k seeded ``seed + k``; torchattacks' MultiAttack starts from all points)."""
    from modelshield.core.oracle import from_classifier
    from modelshield.core.threat import QueryAccess
    from modelshield.evasion.ensemble import STANDARD

    out: list[dict[str, Any]] = []
    model = from_torch(net, input_shape=tuple(x.shape[1:]), num_classes=classes, device=x.device)
    threat = LpThreat("linf", eps)
    robust = correct(net, x, y)
    for k, member in enumerate(STANDARD):
        idx = robust.nonzero().squeeze(1)
        spec = ATTACKS.get(member.attack)
        target: Any = model
        if spec.access != "white-box":
            target = from_classifier(model, QueryAccess(output="logits"))
        seconds, res = timed(
            partial(spec, target, x[idx], y[idx], threat=threat, seed=seed + k, **member.kwargs),
            cuda,
        )
        hit = res.success.to(x.device)
        robust[idx[hit]] = False
        out.append(
            {
                "library": "modelshield",
                "member": member.attack,
                "settings": member.kwargs,
                "points": len(idx),
                "broke": int(hit.sum()),
                "seconds": seconds,
            }
        )
    if importlib.util.find_spec("torchattacks") is None:
        return out
    import torchattacks

    atk = make_torchattacks(torchattacks, net, eps, classes, seed, x.device)
    robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for sub in atk._autoattack.attacks:
        idx = robust.nonzero().squeeze(1)
        seconds, adv = timed(partial(sub, x[idx], y[idx]), cuda)
        hit = ~correct(net, adv, y[idx])
        robust[idx[hit]] = False
        out.append(
            {
                "library": "torchattacks",
                "member": type(sub).__name__,
                "settings": {
                    "steps": getattr(sub, "steps", None),
                    "n_queries": getattr(sub, "n_queries", None),
                },
                "points": len(idx),
                "broke": int(hit.sum()),
                "seconds": seconds,
            }
        )
    return out


def print_breakdown(parts: list[dict[str, Any]]) -> None:
    print("breakdown: each member on the points still robust, in order, timed on its own")
    head = (
        f"{'library':<13} {'member':<9} {'settings':<34} {'points':>6} {'broke':>5} {'seconds':>8}"
    )
    print(head)
    print("-" * len(head))
    for p in parts:
        sets = ", ".join(f"{k} {v}" for k, v in p["settings"].items() if v is not None)
        print(
            f"{p['library']:<13} {p['member']:<9} {sets:<34} {p['points']:>6} {p['broke']:>5} "
            f"{p['seconds']:8.2f}"
        )


def torchattacks_entry(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, classes: int, seed: int
) -> Entry | Row:
    name = "torchattacks AutoAttack"
    try:
        import torchattacks
    except ImportError as exc:
        return Row(name, note=f"skipped: {exc}")
    atk = make_torchattacks(torchattacks, net, eps, classes, seed, x.device)
    steps = {
        type(a).__name__: getattr(a, "steps", getattr(a, "n_queries", None))
        for a in atk._autoattack.attacks
    }
    note = "standard as shipped: " + ", ".join(f"{k} {v}" for k, v in steps.items())

    def run() -> torch.Tensor:
        return atk(x, y)

    return Entry("torchattacks", name, run, note)


def torchattacks_steps_entry(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    classes: int,
    args: argparse.Namespace,
) -> Entry:
    """torchattacks' standard AutoAttack with its gradient members at ``--ta-steps`` steps."""
    import torchattacks

    atk = make_torchattacks(torchattacks, net, eps, classes, args.seed, x.device)
    for sub in atk._autoattack.attacks:
        if hasattr(sub, "steps"):
            sub.steps = args.ta_steps

    def run() -> torch.Tensor:
        return atk(x, y)

    name = f"torchattacks AA, {args.ta_steps} steps"
    note = f"APGD, APGDT, FAB at {args.ta_steps} steps (not as shipped); Square 5000"
    return Entry("torchattacks-steps", name, run, note)


def art_entry(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    classes: int,
    seed: int,
    which: str,
) -> Entry | Row:
    name = "ART AutoAttack"
    try:
        import numpy as np
        from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        return Row(name, note=f"skipped: {exc}")
    if "multiprocess" not in sys.modules and importlib.util.find_spec("multiprocess") is None:
        # ART's AutoAttack.generate imports ``multiprocess`` (not among ART's declared
        # dependencies) on every call, but uses it only with parallel_pool_size > 0; this
        # benchmark runs it serially, so an empty placeholder module is enough.
        sys.modules.setdefault("multiprocess", types.ModuleType("multiprocess"))
    logging.getLogger("art").setLevel(logging.ERROR)
    clf = PyTorchClassifier(
        model=net,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    batch = len(x)
    attacks = None
    note = "default list: APGD-CE x5 starts, APGD-DLR x5, DeepFool, Square 5000 x5 restarts"
    if which == "light":
        kw: dict[str, Any] = {
            "norm": np.inf,
            "eps": eps,
            "eps_step": eps,
            "batch_size": batch,
            "max_iter": 100,
            "nb_random_init": 1,
            "verbose": False,
        }
        attacks = [
            AutoProjectedGradientDescent(clf, loss_type="cross_entropy", **kw),
            AutoProjectedGradientDescent(clf, loss_type="difference_logits_ratio", **kw),
            SquareAttack(
                clf,
                norm=np.inf,
                eps=eps,
                max_iter=5000,
                p_init=0.8,
                nb_restarts=1,
                batch_size=batch,
                verbose=False,
            ),
        ]
        note = "light list: APGD-CE, APGD-DLR (100 steps, 1 start), Square 5000 (1 restart)"
    atk = AutoAttack(clf, norm=np.inf, eps=eps, eps_step=eps, attacks=attacks, batch_size=batch)
    if attacks is None:  # the default members print progress bars; silence them
        for a in atk.attacks:
            if hasattr(a, "verbose"):
                a.set_params(verbose=False)
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()

    def run() -> torch.Tensor:
        np.random.seed(seed)
        return torch.from_numpy(atk.generate(x_np, y=y_np)).to(x.device)

    return Entry("art", name, run, note + "; numpy in/out")


# -- main ------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], cuda: bool) -> tuple[float, Any]:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    net, x, y, train_s, classes = train_model(device, args.n, args.epochs, args.seed)
    clean = correct(net, x, y)
    # one untimed forward-backward pass so first-call costs (allocator, cuDNN) hit no row
    xw = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(net(xw), y), xw)
    if cuda:
        torch.cuda.synchronize()

    entries: list[Entry] = []
    rows_skipped: list[Row] = []
    if "ours" in args.only:
        entries.append(ours("ours", "autoattack", net, x, y, args.eps, classes, args.seed))
    if "fast" in args.only:
        entries.append(ours("fast", "autoattack-fast", net, x, y, args.eps, classes, args.seed))
    for key, make in (
        ("torchattacks", lambda: torchattacks_entry(net, x, y, args.eps, classes, args.seed)),
        ("art", lambda: art_entry(net, x, y, args.eps, classes, args.seed, args.art_attacks)),
    ):
        if key not in args.only:
            continue
        mod = "torchattacks" if key == "torchattacks" else "art"
        if importlib.util.find_spec(mod) is None:
            pkg = "torchattacks" if key == "torchattacks" else "adversarial-robustness-toolbox"
            name = "torchattacks AutoAttack" if key == "torchattacks" else "ART AutoAttack"
            rows_skipped.append(Row(name, note=f"skipped: {pkg} not installed"))
            continue
        got = make()
        (rows_skipped if isinstance(got, Row) else entries).append(got)  # type: ignore[arg-type]
        if key == "torchattacks" and args.ta_steps and isinstance(got, Entry):
            entries.append(torchattacks_steps_entry(net, x, y, args.eps, classes, args))

    info = {
        "clean_accuracy": float(clean.float().mean()),
        "train_seconds": train_s,
        "classes": classes,
        "input": list(x.shape[1:]),
        "n": len(x),
    }
    rows: dict[str, Row] = {}
    # ART's list takes minutes: it runs once, after the rounds of the other rows
    plan = [e for _ in range(args.rounds) for e in entries if e.key != "art"]
    plan += [e for e in entries if e.key == "art"]
    for e in plan:
        # a start line per run: if a run is cut short, the row in flight has a lower bound
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
        print(f"  {stamp} starting {e.name}", file=sys.stderr, flush=True)
        seconds, x_adv = timed(e.run, cuda)
        x_adv = x_adv.detach().to(device, x.dtype)
        dist = float((x_adv - x).abs().flatten(1).amax(dim=1).max())
        in_box = bool(((x_adv >= 0) & (x_adv <= 1)).all())
        acc = float(correct(net, x_adv, y).float().mean())
        note = e.note
        cfg = getattr(e.run, "config", None)
        if cfg and "fooled_by" in cfg:
            note = "fooled first by " + ", ".join(f"{k} {v}" for k, v in cfg["fooled_by"].items())
        if dist > args.eps + 1e-5 or not in_box:
            note += f" (WARNING: outside the threat set: max L-inf {dist:.4g}, in box {in_box})"
        row = rows.setdefault(e.key, Row(e.name, note=note))
        row.times.append(seconds)
        row.accuracies.append(acc)
        row.seconds = statistics.median(row.times)
        row.robust_accuracy = max(row.accuracies)  # the weakest of its runs, if they differ
        row.max_linf = max(dist, row.max_linf or 0.0)
        if "WARNING" in note and "WARNING" not in row.note:
            row.note += note[note.index(" (WARNING") :]
        if len(set(row.accuracies)) > 1 and "runs differ" not in row.note:
            row.note += " (robust accuracy of the runs differ; the highest is shown)"
        print(f"  {e.name}: {seconds:.2f} s, robust accuracy {acc:.3f}", file=sys.stderr)
        if args.json:  # after every run, so a run cut short still leaves what it measured
            write_json(args, info, with_ratios(rows) + rows_skipped, quiet=True)
    out = with_ratios(rows) + rows_skipped
    print_table(args, info, out)
    parts = None
    if args.breakdown:
        parts = breakdown(net, x, y, args.eps, classes, args.seed, cuda)
        print_breakdown(parts)
    if args.json:
        write_json(args, info, out, parts=parts)
    return 0


def with_ratios(rows: dict[str, Row]) -> list[Row]:
    """The rows with their ratios to the peers' times filled in, where measured.

    To torchattacks: the median over rounds of the time ratio within each round (both rows
    ran in every round, back to back, so drift in the machine's load largely cancels); a
    row with fewer runs uses the ratio of medians. To ART (one run): ratio of medians.
    """
    ta, art = rows.get("torchattacks"), rows.get("art")
    for r in rows.values():
        if ta is not None and ta.times:
            k = min(len(r.times), len(ta.times))
            if r is not art and k == len(r.times) == len(ta.times):
                pairs = [a / b for a, b in zip(r.times[:k], ta.times[:k], strict=True)]
                r.ratio_to_torchattacks = statistics.median(pairs)
            else:
                r.ratio_to_torchattacks = r.seconds / ta.seconds  # type: ignore[operator]
        if art is not None and art.times:
            r.ratio_to_art = r.seconds / art.seconds  # type: ignore[operator]
    return list(rows.values())


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": args.device,
        "n": args.n,
        "norm": "linf",
        "eps": args.eps,
        "epochs": args.epochs,
        "seed": args.seed,
        "rounds": args.rounds,
        "ta_steps": args.ta_steps,
        "art_attacks": args.art_attacks,
        "only": sorted(args.only),
    }


def print_table(args: argparse.Namespace, info: dict[str, Any], rows: list[Row]) -> None:
    print(
        f"AutoAttack L-inf eps={args.eps:.4g} on {info['n']} digits test points "
        f"(small_cnn on {'x'.join(map(str, info['input']))}, clean accuracy "
        f"{info['clean_accuracy']:.3f}, trained in {info['train_seconds']:.1f} s), "
        f"{args.device}, median of {args.rounds} round(s), ART once "
        f"(torch threads {torch.get_num_threads()})"
    )
    head = (
        f"{'evaluation':<30} {'seconds':>8} {'x torchattacks':>14} {'x ART':>7} "
        f"{'robust acc':>10}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        sec = f"{r.seconds:8.2f}" if r.seconds is not None else f"{'-':>8}"
        rt = (
            f"{r.ratio_to_torchattacks:14.2f}"
            if r.ratio_to_torchattacks is not None
            else f"{'-':>14}"
        )
        ra = f"{r.ratio_to_art:7.3f}" if r.ratio_to_art is not None else f"{'-':>7}"
        acc = f"{r.robust_accuracy:10.3f}" if r.robust_accuracy is not None else f"{'-':>10}"
        print(f"{r.name:<30} {sec} {rt} {ra} {acc}  {r.note}")


def write_json(
    args: argparse.Namespace,
    info: dict[str, Any],
    rows: list[Row],
    *,
    quiet: bool = False,
    parts: list[dict[str, Any]] | None = None,
) -> None:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc = {
        "benchmark": "evasion.autoattack_evaluation",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": config(args),
        "model": info,
        "rows": [{k: clean(v) for k, v in asdict(r).items()} for r in rows],
        "breakdown": parts,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if not quiet:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
