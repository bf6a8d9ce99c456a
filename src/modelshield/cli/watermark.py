"""``modelshield watermark embed`` and ``watermark verify``: trigger-set watermarking
(Adi et al., USENIX Security 2018)."""

from __future__ import annotations

from typing import Any

import click

from modelshield.cli.options import (
    data_option,
    endpoint_options,
    force_key_option,
    model_option,
    new_key_option,
    out_option,
    train_data_option,
    watermark_training_options,
)


def _parse(opts: dict[str, Any]) -> dict[str, Any]:
    from modelshield.cli.main import _parse_model_opts

    opts.setdefault("bounds", "0,1")
    opts.setdefault("mean", None)
    opts.setdefault("std", None)
    return _parse_model_opts(opts)


def _p(p: float) -> str:
    return "< 1e-300" if p <= 0 else f"{p:.3g}"


@click.group("watermark")
def watermark_group() -> None:
    """Mark a model as yours, and later check a suspect model or API for the mark."""


@watermark_group.command(
    "embed", short_help="Embed a new secret trigger-set watermark into a model."
)
@model_option("Model to mark by fine-tuning (omit to train --arch from scratch with the mark).")
@train_data_option()
@data_option("Test data: clean accuracy before and after.", required=False)
@new_key_option
@out_option("Writes model.pt2, model.pt, result.json, report.html, report.json here.")
@click.option(
    "--arch",
    help="Architecture: for a state_dict --model, or to train from scratch without --model "
    "(mlp, cnn, small_cnn, resnet18 or package.module:factory).",
)
@watermark_training_options("Significance of the verification run on the marked model.")
@click.option("--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH.")
@click.option(
    "--mean",
    help="Per-channel normalisation mean the model expects (applied to data and triggers), "
    "e.g. 0.49,0.48,0.45.",
)
@click.option("--std", help="Per-channel normalisation std, e.g. 0.25,0.24,0.26.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the training (the key's secret is always drawn from the OS).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading a full-pickle model file (this runs code from the file).",
)
@force_key_option
def embed_cmd(**opts: Any) -> None:
    """Embed a new secret trigger-set watermark (Adi et al. 2018) into a model.

    \b
    Example:
      modelshield watermark embed --arch small_cnn --train-data train.npz --data test.npz \\
          --key owner-key.json --out marked
    """
    from modelshield.scan.watermark import run_watermark_embed

    s = run_watermark_embed(**_parse(opts))
    before, after = s["clean_accuracy_before"], s["clean_accuracy_after"]
    acc = ""
    if after is not None:
        acc = f"; clean accuracy {after:.4f}" + (
            f" (before {before:.4f})" if before is not None else ""
        )
    click.echo(
        f"watermark: {s['matches']}/{s['n_triggers']} triggers, p = {_p(s['p_value'])}, "
        f"{'verified' if s['verified'] else 'NOT verified'}{acc}"
    )
    click.echo(f"key: {s['paths']['key']} (secret; id {s['key_id']})")
    click.echo(f"model: {s['paths'].get('model', s['paths'].get('state_dict'))}")
    click.echo(f"report: {s['paths']['html']}")


@watermark_group.command(
    "verify", short_help="Check a suspect model or API for the watermark of a key."
)
@model_option("Suspect model file (as for scan).")
@click.option("--oracle", "oracle", help="Suspect HTTP prediction endpoint instead of a file.")
@endpoint_options("What the endpoint returns (only the top label is used).")
@click.option(
    "--key",
    "key",
    required=True,
    type=click.Path(dir_okay=False),
    help="The secret key written by 'watermark embed'.",
)
@out_option("Writes result.json (p_value, verified), report.html, report.json here.")
@click.option(
    "--significance",
    type=float,
    default=1e-6,
    show_default=True,
    help="Verified when the p-value is below this.",
)
@click.option("--arch", help="Architecture for a state_dict --model.")
@click.option(
    "--mean",
    help="Per-channel normalisation mean the model expects (applied to the triggers), "
    "e.g. 0.49,0.48,0.45.",
)
@click.option("--std", help="Per-channel normalisation std, e.g. 0.25,0.24,0.26.")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading a full-pickle model file (this runs code from the file).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def verify_cmd(**opts: Any) -> None:
    """Check a suspect model or API for the watermark of KEY (exact binomial test).

    \b
    Example:
      modelshield watermark verify --oracle http://host/predict --key owner-key.json --out check
    """
    from modelshield.scan.watermark import run_watermark_verify

    s = run_watermark_verify(**_parse(opts))
    click.echo(
        f"watermark {s['key_id']}: {s['matches']}/{s['n_triggers']} triggers match "
        f"(chance {s['chance']:.3g}), p = {_p(s['p_value'])}: "
        f"{'VERIFIED' if s['verified'] else 'not verified'} at {s['significance']:g}"
    )
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"report: {s['paths']['html']}")
