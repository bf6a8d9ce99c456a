"""``modelshield poison`` and ``modelshield audit data`` (issue 8)."""

from __future__ import annotations

from typing import Any

import click

from modelshield.cli.options import (
    adam_lr_option,
    data_option,
    label_column_option,
    model_option,
    model_options,
    out_option,
    poison_detector_option,
    train_data_option,
)


def _unit_interval(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 < value < 1:
        raise click.BadParameter(f"must be in (0, 1), got {value}")
    return value


@click.command("poison")
@click.option(
    "--method",
    type=click.Choice(["label-flip", "badnets", "blended", "clean-label"]),
    required=True,
    help="label-flip (random, or targeted with --target-class); badnets: corner patch "
    "(Gu et al. 2017); blended: noise key at --alpha (Chen et al. 2017); clean-label: "
    "PGD-perturbed target-class samples with a four-corner patch (Turner et al. 2019).",
)
@click.option(
    "--rate",
    type=float,
    required=True,
    callback=_unit_interval,
    help="Fraction of the data set to poison, in (0, 1).",
)
@click.option(
    "--target-class",
    type=click.IntRange(min=0),
    help="The class the backdoor (or targeted flip) aims at.",
)
@click.option(
    "--source-class",
    type=click.IntRange(min=0),
    help="Poison only samples of this class (default: every non-target class).",
)
@click.option("--data", "data", required=True, type=click.Path(), help="The clean data set.")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The poisoned data set (.npz); the record goes beside it as NAME.poison.json.",
)
@click.option(
    "--trigger-size",
    type=click.IntRange(min=1),
    help="Patch side in pixels (default: about a ninth of the image side, at least 2).",
)
@click.option(
    "--corners", type=click.Choice(["1", "4"]), help="Patch in 1 or all 4 corners (clean-label: 4)."
)
@click.option(
    "--alpha", type=float, callback=_unit_interval, help="blended: weight of the key (0.2)."
)
@click.option(
    "--eps", type=float, help="clean-label: L∞ bound of the perturbation (16/255 of the range)."
)
@click.option("--steps", type=click.IntRange(min=1), help="clean-label: PGD steps (20).")
@click.option(
    "--surrogate",
    type=click.Path(dir_okay=False),
    help="clean-label: model the perturbation is crafted on (default: one trained on --data).",
)
@click.option("--surrogate-arch", help="Architecture of a state_dict --surrogate.")
@click.option(
    "--robust-surrogate",
    is_flag=True,
    default=None,
    help="clean-label: adversarially train the surrogate (PGD-AT at --eps), as Turner et al.",
)
@click.option("--arch", help="clean-label: architecture of the surrogate trained on --data.")
@click.option("--label-column", help="CSV label column.")
@click.option("--bounds", default="0,1", show_default=True, help="Input value range LOW,HIGH.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--trust-pickle", is_flag=True, help="Allow a full-pickle --surrogate.")
def poison_cmd(**opts: Any) -> None:
    """Poison a data set for red-teaming: writes the poisoned .npz and its record.

    \b
    Examples:
      modelshield poison --method badnets --rate 0.1 --target-class 0 --data train.npz --out poisoned.npz
      modelshield poison --method label-flip --rate 0.05 --data train.npz --out flipped.npz
    """
    from modelshield.cli.main import _parse_model_opts
    from modelshield.scan.poison import run_poison

    opts.update(mean=None, std=None, model=None)
    if opts["corners"] is not None:
        opts["corners"] = int(opts["corners"])
    s = run_poison(**_parse_model_opts(opts))
    target = "" if s["target_class"] is None else f" (target class {s['target_class']})"
    click.echo(
        f"{s['method']}: poisoned {len(s['indices'])} of {s['details']['n']} samples{target}"
    )
    click.echo(f"data: {s['paths']['data']}")
    click.echo(f"record: {s['paths']['record']}")


@click.command("data")
@train_data_option("The data to audit.")
@model_option("A model trained on it (default: one is trained here to read activations from).")
@click.option(
    "--truth",
    type=click.Path(dir_okay=False),
    help="The poison record (NAME.poison.json) or a JSON list of indices: adds precision and recall.",
)
@data_option("Clean held-out data (STRIP's overlays and threshold).", required=False)
@poison_detector_option
@click.option(
    "--expected-rate",
    type=float,
    help="spectral: the expected poison fraction ε of Tran et al.'s rule (flag 1.5·ε·n per class).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Training epochs when no --model is given (default: about 2,000 steps of 64, "
    "between 3 and 30 epochs).",
)
@label_column_option
@out_option("Writes result.json, clean.npz (without the flagged samples), report.html/json.")
@model_options
def audit_data_cmd(**opts: Any) -> None:
    """Find poisoned samples in training data (activation clustering, spectral signatures, STRIP).

    \b
    Example:
      modelshield audit data --train-data poisoned.npz --model model.pt2 --truth poisoned.poison.json --out audit
    """
    from modelshield.cli.main import _parse_model_opts
    from modelshield.scan.poison import run_audit_data

    s = run_audit_data(**_parse_model_opts(opts))
    pr = (
        f", precision {s['precision']:.3f}, recall {s['recall']:.3f}"
        if s["precision"] is not None
        else ""
    )
    click.echo(f"flagged {len(s['flagged'])} of {s['n']} samples{pr}")
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"clean data: {s['paths']['clean']}")
    click.echo(f"report: {s['paths']['html']}")


@click.command("fine-prune")
@model_option("The model to repair.", required=True)
@data_option(
    "Clean data the defender trusts (pruning order, fine-tuning; 20% held out for the accuracy check)."
)
@click.option(
    "--test-data",
    "test_data",
    type=click.Path(),
    help="Test data for the before/after figures (default: --data).",
)
@click.option(
    "--poison-record",
    type=click.Path(dir_okay=False),
    help="A NAME.poison.json record: measure the backdoor's attack success rate before and after.",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=0.04,
    show_default=True,
    callback=_unit_interval,
    help="Prune while the held-out clean accuracy drops by at most this much.",
)
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True)
@adam_lr_option(1e-4, "Fine-tuning Adam rate.")
@label_column_option
@out_option("Writes model.pt2 (and model.pt), result.json, report.html/json.")
@model_options
def fine_prune_cmd(**opts: Any) -> None:
    """Fine-pruning (Liu et al. 2018): remove a backdoor from a trained model with clean data.

    \b
    Example:
      modelshield harden fine-prune --model model.pt2 --data clean.npz --test-data test.npz \\
          --poison-record poisoned.poison.json --out pruned
    """
    from modelshield.cli.main import _parse_model_opts
    from modelshield.scan.poison import run_fine_prune

    if not opts["lr"] > 0:
        raise click.BadParameter(f"must be > 0, got {opts['lr']}", param_hint="--lr")
    s = run_fine_prune(**_parse_model_opts(opts))
    info, b, a = s["fine_pruning"], s["before"], s["after"]
    click.echo(
        f"pruned {info['pruned']} of {info['units']} units; clean accuracy "
        f"{b['clean_accuracy']:.4f} -> {a['clean_accuracy']:.4f}"
    )
    if a["attack_success_rate"] is not None:
        click.echo(
            f"attack success rate {b['attack_success_rate']:.4f} -> {a['attack_success_rate']:.4f}"
        )
    click.echo(f"model: {s['paths'].get('model') or s['paths'].get('state_dict')}")
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"report: {s['paths']['html']}")
