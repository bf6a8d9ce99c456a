"""Option groups shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def executor_options(where: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--executor local|ray``, ``--ray-address``, ``--workers``; ``where`` ends the help."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        options = [
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
            click.option(
                "--workers", type=click.IntRange(min=1), help="Ray workers for a local Ray."
            ),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return deco


def endpoint_options(output_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--oracle-output``, ``--input-field``, ``--output-field``: how to talk to an endpoint."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        options = [
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
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return deco


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say how to load a model, shared by every command that loads one."""
    options = [
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
        click.option(
            "--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH."
        ),
        click.option(
            "--mean",
            help="Per-channel normalisation mean applied by the model adapter, e.g. 0.49,0.48,0.45.",
        ),
        click.option("--std", help="Per-channel normalisation std, e.g. 0.25,0.24,0.26."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
