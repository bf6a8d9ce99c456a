"""``modelshield harden dp|watermark|poison-removal|gateway``: apply a defence, write the
new model (or gateway config) and a before/after report from the same scan probes.

``harden adversarial`` lives in :mod:`modelshield.cli.main`, ``harden fine-prune`` in
:mod:`modelshield.cli.poison`.
"""

from __future__ import annotations

from typing import Any

import click

from modelshield.cli.dp import dp_options
from modelshield.cli.options import (
    adam_lr_option,
    batch_size_option,
    data_option,
    epochs_option,
    force_key_option,
    harden_run_options,
    label_column_option,
    model_option,
    model_options,
    new_key_option,
    out_option,
    poison_detector_option,
    train_data_option,
    watermark_training_options,
)


def _parse(opts: dict[str, Any]) -> dict[str, Any]:
    from modelshield.cli.main import _parse_model_opts

    return _parse_model_opts(opts)


def echo_outcome(outcome: Any, *lines: str, rows: bool = True) -> None:
    """What every ``harden`` command prints: a line per probe, (with ``rows``) the
    before/after figures, ``lines``, and the reports' paths."""
    from modelshield.cli.main import _echo_results

    _echo_results(outcome.results)
    for line in [*(_rows(outcome) if rows else []), *lines]:
        click.echo(line)
    click.echo(f"report: {outcome.reports['html']}")
    click.echo(f"report: {outcome.reports['json']}")


def _rows(outcome: Any) -> list[str]:
    d = outcome.results[0].details
    lines = []
    for k, b in d["before"].items():
        a = d["after"].get(k)
        fb = f"{b:.4g}" if isinstance(b, float) else str(b)
        fa = f"{a:.4g}" if isinstance(a, float) else str(a)
        lines.append(f"{k.replace('_', ' ')}: {fb} -> {fa}")
    return lines


@click.command("dp", short_help="Retrain with DP-SGD; before/after report.")
@model_option(
    "Model whose architecture is retrained privately (omit to train --arch; the "
    "'before' model is then the same architecture trained without DP)."
)
@train_data_option()
@data_option("Held-out test data: accuracy, and the non-members of the membership probe.")
@epochs_option(10)
@batch_size_option(64, "Expected size of a Poisson-sampled batch.")
@click.option("--lr", type=float, help="DP-SGD learning rate (default 0.1).")
@dp_options
@harden_run_options(
    "Writes model.pt2, model.pt, ledger.json, result.json, report.html/json; re-running resumes."
)
@model_options
def harden_dp_cmd(**opts: Any) -> None:
    """Retrain with DP-SGD (Abadi et al. 2016); write the model, its ledger and a before/after report.

    \b
    Example:
      modelshield harden dp --model model.pt2 --train-data train.npz --data test.npz \\
          --epsilon 3 --delta 1e-5 --epochs 10 --out dp-model
    """
    from modelshield.scan.harden.dp import harden_dp

    outcome = harden_dp(**_parse(opts))
    s = outcome.summary
    echo_outcome(
        outcome,
        f"ledger: {s['paths']['ledger']} (epsilon {s['epsilon']:.3f}, delta {s['delta']:g})",
        f"model: {outcome.model_path}",
    )


@click.command("watermark", short_help="Embed a trigger-set watermark; before/after report.")
@model_option("Model to mark by fine-tuning (omit to train --arch from scratch with the mark).")
@train_data_option()
@data_option("Test data: clean accuracy.")
@new_key_option
@watermark_training_options("Verified when the p-value is below this.")
@force_key_option
@out_option("Writes model.pt2, model.pt, result.json, report.html/json here.")
@model_options
def harden_watermark_cmd(**opts: Any) -> None:
    """Embed a trigger-set watermark (Adi et al. 2018); write the marked model and a before/after report.

    \b
    Example:
      modelshield harden watermark --model model.pt2 --train-data train.npz --data test.npz \\
          --key owner-key.json --out marked
    """
    from modelshield.scan.harden.watermark import harden_watermark

    outcome = harden_watermark(**_parse(opts))
    s = outcome.summary
    echo_outcome(
        outcome,
        f"key: {s['paths']['key']} (secret; id {s['key_id']})",
        f"model: {outcome.model_path}",
    )


@click.command(
    "poison-removal", short_help="Remove flagged poison and retrain; before/after report."
)
@model_option(
    "The model trained on --train-data (its activations feed the detectors; its "
    "architecture is retrained).",
    required=True,
)
@train_data_option("The suspect training data.")
@data_option("Clean test data.")
@poison_detector_option
@click.option(
    "--expected-rate",
    type=float,
    help="spectral: the expected poison fraction of Tran et al.'s rule.",
)
@click.option(
    "--poison-record",
    type=click.Path(dir_okay=False),
    help="A NAME.poison.json record of --train-data: adds the backdoor's attack success rate "
    "before and after, and the detectors' precision and recall.",
)
@epochs_option(30)
@adam_lr_option(1e-3)
@batch_size_option(64)
@label_column_option
@harden_run_options(
    "Writes model.pt2, model.pt, clean.npz, result.json, report.html/json; re-running resumes."
)
@model_options
def harden_poison_removal_cmd(**opts: Any) -> None:
    """Detect poison in the training data and retrain without it (Tran et al. 2018; Chen et al. 2018).

    \b
    Example:
      modelshield harden poison-removal --model model.pt2 --train-data train.npz \\
          --data test.npz --poison-record train.poison.json --out cleaned
    """
    from modelshield.scan.harden.poison import harden_poison_removal

    if not opts["lr"] > 0:
        raise click.BadParameter(f"must be > 0, got {opts['lr']}", param_hint="--lr")
    if opts["expected_rate"] is not None and not 0 < opts["expected_rate"] < 1:
        raise click.BadParameter(
            f"must be in (0, 1), got {opts['expected_rate']}", param_hint="--expected-rate"
        )
    outcome = harden_poison_removal(**_parse(opts))
    s = outcome.summary
    echo_outcome(
        outcome,
        f"removed {len(s['flagged'])} of {s['n']} training samples",
        f"clean data: {s['paths']['clean']}",
        f"model: {outcome.model_path}",
    )


@click.command("gateway", short_help="Anti-extraction gateway config; before/after report.")
@model_option("The model to serve.", required=True)
@data_option(
    "Data like the attacker's: half is the extraction probe's query pool, half measures fidelity."
)
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    metavar="SPEC",
    help="Repeatable, as for 'modelshield serve' (default: label-only, rate=10/s, "
    "prada=0.9,action=block); see 'modelshield list gateway-defenses'.",
)
@click.option(
    "--reference-data",
    metavar="PATH",
    help="Benign inputs for --defense ood (as for 'modelshield serve').",
)
@click.option(
    "--queries",
    type=click.IntRange(min=1),
    help="The attacker's query budget (default: the profile's, capped at half of --data).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Largest batch one request may send (written to the config).",
)
@click.option(
    "--identities",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Client identities (API keys) the simulated attacker holds: when one is refused it "
    "goes on with the next (a Sybil attacker), which per-client budgets and detectors "
    "only slow down.",
)
@harden_run_options(
    "Writes gateway.json (for 'modelshield serve --config'), result.json, report.html/json."
)
@model_options
def harden_gateway_cmd(**opts: Any) -> None:
    """Anti-extraction gateway defences (PRADA, Juuti et al. 2019): write a serve config and a
    before/after report of the extraction probe against the undefended and defended API.

    \b
    Example:
      modelshield harden gateway --model model.pt2 --data test.npz --defense label-only \\
          --defense budget=200 --defense prada=0.9,action=block --out gateway
      modelshield serve --config gateway/gateway.json --port 8000
    """
    from modelshield.scan.harden.gateway import harden_gateway

    outcome = harden_gateway(**_parse(opts))
    echo_outcome(outcome, f"gateway config: {outcome.model_path}")
