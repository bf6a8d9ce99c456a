"""``modelshield steal``: model extraction through a prediction API (issue 7)."""

from __future__ import annotations

import math
from typing import Any

import click

from modelshield.cli.options import endpoint_options


@click.command("steal")
@click.option(
    "--oracle",
    "oracle",
    required=True,
    help="The victim: a model file (.pt2, TorchScript, ONNX, scikit-learn pickle) or an http(s):// endpoint.",
)
@click.option(
    "--method",
    type=click.Choice(["equation", "knockoff", "jacobian"]),
    required=True,
    help="equation: exact for softmax-linear models, d+1 queries (Tramèr et al. 2016); knockoff: "
    "train on a pool's answers (Orekondy et al. 2019); jacobian: Jacobian-based augmentation (Papernot et al. 2017).",
)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    help="Query budget, enforced by the oracle (required for knockoff and jacobian; equation needs d+1).",
)
@click.option(
    "--pool",
    "pool",
    type=click.Path(),
    help="Inputs the attacker queries with (.npz with x, optionally y; CSV; IDX; image folder).",
)
@click.option(
    "--data",
    "data",
    type=click.Path(),
    help="Held-out labelled data for fidelity, accuracy and transfer (default: 20% of --pool held out).",
)
@click.option(
    "--arch",
    help="Architecture of the copy: mlp, small_cnn, ... or package.module:factory (default: small_cnn for images, mlp otherwise).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--strategy",
    type=click.Choice(["random", "adaptive"]),
    default="random",
    show_default=True,
    help="Knockoff sampling: uniform, or the paper's gradient bandit over pool classes/clusters.",
)
@endpoint_options("What the endpoint returns; for a model file, what the attacker is shown.")
@click.option(
    "--input-shape", help="Per-sample input shape, e.g. 1,8,8 (when no data or model says it)."
)
@click.option("--num-classes", type=click.IntRange(min=2), help="Classes of a label-only endpoint.")
@click.option(
    "--oracle-arch", help="Architecture of a state_dict victim file (package.module:factory)."
)
@click.option(
    "--seed-size",
    type=click.IntRange(min=1),
    help="jacobian: pool inputs in the seed set (default: min(100, queries/4)).",
)
@click.option(
    "--lam", type=float, default=0.1, show_default=True, help="jacobian: step size lambda."
)
@click.option(
    "--rounds", type=click.IntRange(min=1), help="jacobian: at most this many augmentations."
)
@click.option(
    "--transfer-eps",
    type=float,
    help="Also craft PGD examples on the copy at this eps and report how many fool the victim.",
)
@click.option(
    "--transfer-norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True
)
@click.option("--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading a pickled victim (scikit-learn); this runs code from the file.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Writes model.pt2 (the copy), result.json, report.html, report.json.",
)
def steal_cmd(**opts: Any) -> None:
    """Steal a copy of a model through its prediction API and measure its fidelity.

    \b
    Examples:
      modelshield steal --oracle model.pt2 --method knockoff --queries 2000 --pool pool.npz --data test.npz --out stolen
      modelshield steal --oracle logreg.pkl --trust-pickle --method equation --out stolen
      modelshield steal --oracle http://127.0.0.1:8000/predict --method knockoff --queries 1000 --pool pool.npz --out stolen
    """
    from modelshield.cli.main import _parse_model_opts
    from modelshield.scan.steal import run_steal

    opts.setdefault("mean", None)
    opts.setdefault("std", None)
    if opts["transfer_eps"] is not None and not (
        math.isfinite(opts["transfer_eps"]) and opts["transfer_eps"] > 0
    ):
        raise click.BadParameter(
            f"must be > 0, got {opts['transfer_eps']}", param_hint="--transfer-eps"
        )
    s = run_steal(**_parse_model_opts(opts))
    fid = s.get("fidelity")
    fid_text = "not measured" if fid is None else f"{fid:.4f}"
    acc = "" if s.get("accuracy") is None else f", accuracy {s['accuracy']:.4f}"
    click.echo(f"{s['method']}: fidelity {fid_text} after {s['queries_used']} queries{acc}")
    transfer = s.get("transfer") or {}
    if transfer:
        rate = transfer.get("transfer_rate")
        click.echo(
            f"transfer: {'n/a' if rate is None else f'{rate:.3f}'} of PGD examples crafted on the copy "
            f"fool the victim ({transfer['norm']} eps {transfer['eps']:g})"
        )
    click.echo(f"model: {s['paths']['model']}")
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"report: {s['paths']['html']}")
