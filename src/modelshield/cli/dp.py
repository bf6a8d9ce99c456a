"""``modelshield train`` and ``modelshield audit dp``: DP-SGD training and its empirical audit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from modelshield.cli.options import executor_options


def dp_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The DP-SGD settings (shared by ``train``, ``audit dp`` and ``harden dp``)."""
    options = [
        click.option(
            "--epsilon", type=float, help="Target epsilon (with --dp); the noise is set to meet it."
        ),
        click.option(
            "--noise-multiplier",
            type=float,
            help="Noise multiplier (with --dp), instead of --epsilon.",
        ),
        click.option(
            "--delta",
            type=float,
            default=1e-5,
            show_default=True,
            help="The delta of (epsilon, delta)-DP.",
        ),
        click.option(
            "--max-grad-norm",
            type=float,
            default=1.0,
            show_default=True,
            help="Per-example clipping norm C.",
        ),
        click.option(
            "--optimizer",
            type=click.Choice(["sgd", "adam"]),
            default="sgd",
            show_default=True,
            help="With --dp.",
        ),
        click.option(
            "--momentum",
            type=float,
            default=0.0,
            show_default=True,
            help="SGD momentum (with --dp).",
        ),
        click.option(
            "--accountant",
            type=click.Choice(["prv", "rdp"]),
            default="prv",
            show_default=True,
            help="Privacy accountant.",
        ),
        click.option(
            "--mode",
            type=click.Choice(["auto", "hooks", "functorch", "ghost"]),
            default="auto",
            show_default=True,
            help="Opacus per-example gradient mode; auto times the correct ones and picks the fastest.",
        ),
        click.option(
            "--secure-rng",
            is_flag=True,
            help="Draw noise and batches from the OS CSPRNG (not reproducible).",
        ),
        click.option(
            "--max-epsilon",
            type=float,
            help="Refuse to train past this epsilon (default: the target).",
        ),
        click.option(
            "--no-poisson",
            is_flag=True,
            help="Shuffled fixed-size batches (the epsilon is then not proven).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What to train and how (shared by ``train`` and ``audit dp``)."""
    options = [
        click.option(
            "--train-data", "train_data", required=True, type=click.Path(), help="Training data."
        ),
        click.option(
            "--arch",
            default="mlp",
            show_default=True,
            help="Architecture: mlp, cnn, small_cnn, resnet18 or package.module:factory.",
        ),
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Batch size (with --dp: the expected size of a Poisson-sampled batch).",
        ),
        click.option(
            "--lr",
            type=float,
            help="Learning rate (default: 0.1 for DP-SGD, 1e-3 for Adam without DP).",
        ),
        click.option(
            "--dp/--no-dp",
            default=None,
            help="Train with DP-SGD (Opacus); implied by --epsilon or --noise-multiplier.",
        ),
        click.option(
            "--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH."
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
        ),
        click.option("--fresh", is_flag=True, help="Discard earlier progress in --out."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return dp_options(fn)


def _parse(opts: dict[str, Any]) -> dict[str, Any]:
    from modelshield.cli.main import _parse_model_opts

    opts.setdefault("mean", None)
    opts.setdefault("std", None)
    return _parse_model_opts(opts)


@click.command("train")
@training_options
@click.option(
    "--data", "data", type=click.Path(), help="Test data: accuracy per epoch and at the end."
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Writes model.pt2, model.pt, ledger.json (with --dp), result.json, report.html; re-running resumes.",
)
def train_cmd(**opts: Any) -> None:
    """Train a model, with DP-SGD when --dp is given (Abadi et al. 2016).

    \b
    Example:
      modelshield train --dp --epsilon 3 --delta 1e-5 --train-data train.npz --epochs 10 --out dp-model
    """
    from modelshield.scan.dp import run_training

    s = run_training(**_parse(opts))
    acc = "" if s["accuracy"] is None else f", test accuracy {s['accuracy']:.4f}"
    if s["private"]:
        click.echo(
            f"dp-sgd: epsilon {s['epsilon']:.3f} at delta {s['delta']:g} ({s['accountant']}), noise multiplier "
            f"{s['noise_multiplier']:.4g}, {s['steps']} steps, mode {s['grad_sample_mode']}{acc}"
        )
        click.echo(f"ledger: {s['paths']['ledger']}")
    else:
        click.echo(f"trained without differential privacy{acc}")
    click.echo(f"model: {s['paths'].get('model', s['paths']['state_dict'])}")
    click.echo(f"report: {s['paths']['html']}")


@click.command("dp")
@click.option(
    "--method",
    type=click.Choice(["one-run", "canaries"]),
    default="one-run",
    show_default=True,
    help="one-run: m canaries in one training (Steinke et al. 2023); canaries: many runs (Jagielski et al. 2020).",
)
@training_options
@click.option(
    "--canaries",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Canaries in the one-run audit.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=4),
    default=64,
    show_default=True,
    help="Training runs in the canaries audit (even).",
)
@click.option(
    "--canary-type",
    type=click.Choice(["noise", "mislabeled"]),
    default="noise",
    show_default=True,
    help="noise: random inputs with random labels; mislabeled: training examples with a wrong label.",
)
@click.option(
    "--confidence",
    type=float,
    default=0.95,
    show_default=True,
    help="Confidence of the lower bound.",
)
@click.option(
    "--trainer",
    help="Audit your own training code: package.module:function taking (x, y, seed), returning the model.",
)
@click.option("--claimed-epsilon", type=float, help="The epsilon your --trainer claims.")
@executor_options("the canaries audit's training runs go")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Writes result.json (eps_lower, eps_claimed), report.html, report.json; re-running resumes.",
)
def audit_dp_cmd(**opts: Any) -> None:
    """Empirical lower bound on the epsilon of a training procedure, against its claim.

    \b
    Example:
      modelshield audit dp --method one-run --dp --epsilon 2 --train-data train.npz --out audit
    """
    from modelshield.scan.dp import run_dp_audit

    if not 0 < opts["confidence"] < 1:
        raise click.BadParameter(
            f"must be in (0, 1), got {opts['confidence']}", param_hint="--confidence"
        )
    s = run_dp_audit(**_parse(opts))
    claim = "none (not private)" if s["eps_claimed"] is None else f"{s['eps_claimed']:.3f}"
    verdict = (
        "BROKEN: lower bound above the claim"
        if s["broken"]
        else ("no DP claim to test" if s["eps_claimed"] is None else "consistent with the claim")
    )
    click.echo(
        f"{s['method']}: eps_lower {s['eps_lower']:.3f} ({s['confidence']:.0%}), eps_claimed {claim}: {verdict}"
    )
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"report: {s['paths']['html']}")
