"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def command_line() -> str:
    """The command as typed (``modelshield …``, shell-quoted), for reports and results."""
    import shlex
    import sys

    return "modelshield " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def prep_bounds(opts: dict[str, Any]) -> dict[str, Any]:
    """Parse ``--bounds LOW,HIGH`` in place and add the command line (he / mpc commands)."""
    from modelshield.cli.main import _floats

    b = _floats(opts.get("bounds"), "--bounds", 2) or [0.0, 1.0]
    opts["bounds"] = (b[0], b[1])
    opts["command"] = command_line()
    return opts


def _stack(*options: Decorator) -> Decorator:
    """Apply ``options`` so that they show in ``--help`` in the order given."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return deco


def executor_options(where: str) -> Decorator:
    """``--executor local|ray``, ``--ray-address``, ``--workers``; ``where`` ends the help."""
    return _stack(
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help=f"Where {where}.",
        ),
        click.option(
            "--ray-address", help="Connect to this Ray cluster (default: start a local one)."
        ),
        click.option("--workers", type=click.IntRange(min=1), help="Ray workers for a local Ray."),
    )


def endpoint_options(output_help: str) -> Decorator:
    """``--oracle-output``, ``--input-field``, ``--output-field``: how to talk to an endpoint."""
    return _stack(
        click.option(
            "--oracle-output",
            type=click.Choice(["logits", "probs", "label"]),
            default="probs",
            show_default=True,
            help=output_help,
        ),
        click.option(
            "--input-field",
            default="inputs",
            show_default=True,
            help="JSON field of the endpoint's request.",
        ),
        click.option(
            "--output-field",
            default="outputs",
            show_default=True,
            help="JSON field (dotted path) of the endpoint's reply.",
        ),
    )


model_options: Decorator = _stack(
    click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed for every random choice."
    ),
    click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (cuda if available), cpu, cuda, cuda:N or mps.",
    ),
    click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a full-pickle model file (this runs code from the file).",
    ),
    click.option(
        "--arch",
        help="Architecture for a state_dict file: 'package.module:factory' or a built-in name.",
    ),
    click.option("--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH."),
    click.option(
        "--mean",
        help="Per-channel normalisation mean applied by the model adapter, e.g. 0.49,0.48,0.45.",
    ),
    click.option("--std", help="Per-channel normalisation std, e.g. 0.25,0.24,0.26."),
)
"""The options that say how to load a model, shared by every command that loads one."""


# Single options whose flag, type and default several commands share; each command says in
# ``help`` what the option means to it.


def model_option(help: str, *, required: bool = False) -> Decorator:
    """``--model PATH``: a model file."""
    return click.option(
        "--model", "model", required=required, type=click.Path(dir_okay=False), help=help
    )


def train_data_option(help: str = "Training data.") -> Decorator:
    """``--train-data PATH`` (required)."""
    return click.option("--train-data", "train_data", required=True, type=click.Path(), help=help)


def data_option(help: str, *, required: bool = True) -> Decorator:
    """``--data PATH``: the (test) data."""
    return click.option("--data", "data", required=required, type=click.Path(), help=help)


def out_option(help: str) -> Decorator:
    """``--out DIR`` (required); ``help`` says what is written there."""
    return click.option("--out", "out", required=True, type=click.Path(file_okay=False), help=help)


def epochs_option(default: int) -> Decorator:
    return click.option("--epochs", type=click.IntRange(min=1), default=default, show_default=True)


def batch_size_option(default: int, help: str | None = None) -> Decorator:
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def adam_lr_option(default: float, help: str = "Adam learning rate.") -> Decorator:
    return click.option("--lr", type=float, default=default, show_default=True, help=help)


label_column_option: Decorator = click.option("--label-column", help="CSV label column.")

poison_detector_option: Decorator = click.option(
    "--detector",
    multiple=True,
    type=click.Choice(["activation-clustering", "spectral", "strip"]),
    help="Repeatable (default: activation-clustering and spectral); flagged = their union.",
)
"""``--detector``: the poison detectors of ``audit data`` and ``harden poison-removal``."""


def harden_run_options(
    writes: str, *, profile: str = "Cost of the before/after scan probes."
) -> Decorator:
    """``--profile``, ``--out`` and ``--fresh`` of a resumable ``harden`` command; ``writes``
    is the help of ``--out``, ``profile`` that of ``--profile``."""
    return _stack(
        click.option(
            "--profile",
            type=click.Choice(["quick", "standard", "thorough"]),
            default="quick",
            show_default=True,
            help=profile,
        ),
        out_option(writes),
        click.option("--fresh", is_flag=True, help="Discard earlier progress in --out."),
    )


new_key_option: Decorator = click.option(
    "--key",
    "key",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the NEW secret key (JSON, mode 0600); an existing file is kept unless --force.",
)
"""``--key``: where ``watermark embed`` and ``harden watermark`` write the new secret key."""

force_key_option: Decorator = click.option(
    "--force", is_flag=True, help="Replace an existing key file (the old key is lost)."
)


def watermark_training_options(significance: str) -> Decorator:
    """How a trigger-set watermark is embedded (``watermark embed``, ``harden watermark``);
    ``significance`` is the help of ``--significance``."""
    return _stack(
        epochs_option(20),
        adam_lr_option(3e-3),
        batch_size_option(64),
        click.option(
            "--triggers",
            type=click.IntRange(min=1, max=100_000),
            default=100,
            show_default=True,
            help="Number of trigger inputs in the key.",
        ),
        click.option(
            "--trigger-kind",
            type=click.Choice(["noise", "patterns"]),
            default="noise",
            show_default=True,
            help="Trigger inputs: uniform noise, or abstract shapes (image inputs only).",
        ),
        click.option(
            "--significance", type=float, default=1e-6, show_default=True, help=significance
        ),
    )
