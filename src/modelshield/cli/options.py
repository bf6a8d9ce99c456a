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
