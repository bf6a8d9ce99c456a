"""The ``modelshield`` command.

Every user error ends as one line on stderr and exit code 2, never a traceback;
``--debug`` shows tracebacks for reporting bugs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from modelshield import __version__
from modelshield.cli.dp import audit_dp_cmd, train_cmd
from modelshield.cli.fl import fl_group
from modelshield.cli.harden import (
    echo_outcome,
    harden_dp_cmd,
    harden_gateway_cmd,
    harden_poison_removal_cmd,
    harden_watermark_cmd,
)
from modelshield.cli.he import he_group
from modelshield.cli.mpc import mpc_group
from modelshield.cli.options import (
    batch_size_option,
    command_line,
    data_option,
    endpoint_options,
    epochs_option,
    executor_options,
    harden_run_options,
    model_option,
    model_options,
    out_option,
    train_data_option,
)
from modelshield.cli.poison import audit_data_cmd, fine_prune_cmd, poison_cmd
from modelshield.cli.serve import serve_cmd
from modelshield.cli.steal import steal_cmd
from modelshield.cli.watermark import watermark_group
from modelshield.core.errors import ModelShieldError

logger = logging.getLogger("modelshield")

EXIT_USAGE = 2


def _fail(message: str) -> NoReturn:
    click.echo(f"modelshield: error: {message}", err=True)
    raise SystemExit(EXIT_USAGE)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s"))
    root = logging.getLogger("modelshield")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _floats(text: str | None, name: str, count: int | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {text!r}", param_hint=name
        ) from None
    if not values or (count is not None and len(values) != count):
        want = f"{count} " if count else ""
        raise click.BadParameter(
            f"expected {want}comma-separated numbers, got {text!r}", param_hint=name
        )
    return values


def _parse_model_opts(opts: dict[str, Any]) -> dict[str, Any]:
    """Parse the shared ``--bounds/--mean/--std`` texts in place; add the command line."""
    bounds = _floats(opts["bounds"], "--bounds", 2) or [0.0, 1.0]
    opts["bounds"] = (bounds[0], bounds[1])
    opts["mean"] = _floats(opts["mean"], "--mean")
    opts["std"] = _floats(opts["std"], "--std")
    opts["command"] = command_line()
    return opts


def _echo_results(results: list[Any]) -> None:
    """One line per probe: name, grade (or status), and the figure (or the reason)."""
    for r in results:
        value = r.figure.get("value")
        fig = f"{r.figure.get('name')}: {value:.3g}" if isinstance(value, (int, float)) else ""
        state = (r.grade or "info") if r.status == "ok" else r.status
        click.echo(f"{r.probe:<20} {state!s:<8} {fig or r.reason}")


def _echo_plan(plan: Any) -> None:
    """The scan's plan on stderr before it starts: probes, estimated times, skip reasons."""
    for line in plan.lines():
        click.echo(line, err=True)


class _Group(click.Group):
    """Turns click's multi-line usage errors into our one-line form."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **kw: Any
    ) -> Any:
        debug = "--debug" in (sys.argv[1:] if args is None else list(args))
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **kw)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=False)
            raise SystemExit(0) from None
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{hint}")
        except click.exceptions.Abort:  # click's form of Ctrl-C
            click.echo("modelshield: interrupted; re-run the same command to resume", err=True)
            raise SystemExit(130) from None
        except click.ClickException as exc:
            _fail(exc.format_message())
        except ModelShieldError as exc:
            if debug:
                raise
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            click.echo("modelshield: interrupted; re-run the same command to resume", err=True)
            raise SystemExit(130) from None
        except OSError as exc:
            if debug:
                raise
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "--version", prog_name="modelshield", message="%(prog)s %(version)s"
)
@click.option("-v", "--verbose", count=True, help="More log output (debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks (for bug reports).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for torch (default: torch's choice; --demo uses 1, fastest for its tiny model).",
)
def cli(verbose: int, quiet: bool, debug: bool, threads: int | None) -> None:
    """modelshield: attack, audit and harden machine-learning models.

    \b
    Start with the demo (a small model trained on the spot, then scanned):
      modelshield scan --demo --out demo-scan
    Scan your own model:
      modelshield scan --model model.pt2 --data test.npz --out my-scan
    """
    _setup_logging(verbose, quiet)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    click.get_current_context().obj = {"threads": threads}


@cli.command("scan")
@click.option(
    "--oracle",
    "oracle",
    help="Scan an HTTP prediction endpoint instead of a model file (black-box probes only).",
)
@click.option(
    "--oracle-output",
    type=click.Choice(["logits", "probs", "label"]),
    default="probs",
    show_default=True,
    help="What the endpoint returns.",
)
@click.option(
    "--model",
    "model",
    type=click.Path(dir_okay=False),
    help="Model file: torch.export .pt2, TorchScript, state_dict (+ --arch), ONNX, or a pickle (needs --trust-pickle).",
)
@click.option(
    "--data",
    "data",
    type=click.Path(),
    help="Test data: .npz (x, y), CSV, IDX, or an image folder.",
)
@click.option(
    "--train-data",
    "train_data",
    type=click.Path(),
    help="Training data (enables membership-inference and poisoning probes).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    default="modelshield-scan",
    show_default=True,
    help="Run directory; re-running on it resumes.",
)
@click.option("--demo", is_flag=True, help="Train a small model on bundled digits and scan it.")
@click.option(
    "--profile",
    type=click.Choice(["quick", "standard", "thorough"]),
    default=None,
    help="Cost of the scan: quick, standard (the default) or thorough (full AutoAttack "
    "with Square). --demo defaults to quick.",
)
@click.option(
    "--norm",
    type=click.Choice(["linf", "l2", "l1"]),
    default="linf",
    show_default=True,
    help="Threat norm of the evasion probes.",
)
@click.option(
    "--sensitive-feature",
    type=click.IntRange(min=0),
    help="Column index of a sensitive feature (tabular data): runs the attribute-inference probe.",
)
@click.option(
    "--eps",
    type=float,
    help="Reference eps of the evasion probes (default: L∞ 8/255, L2 0.5, L1 10, times the width of --bounds).",
)
@click.option("--label-column", help="CSV label column (default: 'label', else the last column).")
@click.option(
    "--watermark-key",
    type=click.Path(dir_okay=False),
    help="Secret watermark key (from 'watermark embed'): verify the model carries the mark.",
)
@click.option(
    "--dp-ledger",
    type=click.Path(dir_okay=False),
    help="Privacy ledger of the model (default: ledger.json beside the model, if present).",
)
@click.option(
    "--only", multiple=True, help="Run only this probe (repeatable); see 'modelshield list probes'."
)
@click.option("--fresh", is_flag=True, help="Discard finished probes in --out and start over.")
@model_options
def scan_cmd(**opts: Any) -> None:
    """Scan a model for evasion, stealing, poisoning and privacy risks; write report.html/json."""
    from modelshield.scan.runner import ScanConfig, run_scan

    if opts["demo"]:
        if opts["model"] or opts["data"] or opts["train_data"]:
            raise click.UsageError(
                "--demo trains its own model and data; drop --model/--data/--train-data"
            )
        from modelshield.scan.demo import prepare_demo

        if (click.get_current_context().obj or {}).get("threads") is None:
            import torch

            torch.set_num_threads(1)  # tiny model: thread hand-offs cost more than they save

        model, train, test = prepare_demo(Path(opts["out"]) / "demo-inputs", seed=opts["seed"])
        opts.update(model=str(model), data=str(test), train_data=str(train))
    elif not opts["model"] and not opts["oracle"] and not opts["data"]:
        raise click.UsageError("give --model (or --oracle) and --data, or --demo")
    _parse_model_opts(opts)
    cfg = ScanConfig(
        model=opts["model"],
        oracle=opts["oracle"],
        oracle_output=opts["oracle_output"],
        data=opts["data"],
        train_data=opts["train_data"],
        out=opts["out"],
        seed=opts["seed"],
        device=opts["device"],
        trust_pickle=opts["trust_pickle"],
        arch=opts["arch"],
        profile=opts["profile"] or ("quick" if opts["demo"] else "standard"),
        eps=opts["eps"],
        sensitive_feature=opts["sensitive_feature"],
        dp_ledger=opts["dp_ledger"],
        watermark_key=opts["watermark_key"],
        norm=opts["norm"],
        bounds=opts["bounds"],
        mean=opts["mean"],
        std=opts["std"],
        label_column=opts["label_column"],
        only=list(opts["only"]),
        fresh=opts["fresh"],
        command=opts["command"],
    )
    outcome = run_scan(cfg, on_plan=_echo_plan)
    _echo_results(outcome.results)
    click.echo(f"report: {outcome.reports['html']}")
    click.echo(f"report: {outcome.reports['json']}")


@cli.command("attack")
@click.argument("name")
@click.option("--model", "model", type=click.Path(dir_okay=False), help="Model file (as for scan).")
@click.option(
    "--oracle",
    "oracle_url",
    help="Attack an HTTP prediction endpoint instead (black-box attacks only).",
)
@endpoint_options("What the endpoint returns.")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(),
    help="Data to attack (.npz, CSV, IDX, image folder).",
)
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True)
@click.option("--eps", type=float, required=True, help="Perturbation budget in the input space.")
@click.option("--steps", type=int, help="Iterations (attacks with steps).")
@click.option(
    "--targeted",
    is_flag=True,
    help="Targeted attack: random target class per sample (or --target-class).",
)
@click.option(
    "--target-class", type=int, help="With --targeted: one target class for every sample."
)
@click.option(
    "--max-queries",
    type=int,
    help="Query budget per sample for black-box attacks (the oracle enforces N times it).",
)
@click.option("--n", "n", type=int, help="Attack only the first N samples.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False),
    required=True,
    help="Writes result.json and adversarial.npz here.",
)
@model_options
def attack_cmd(**opts: Any) -> None:
    """Run attack NAME on a model (or endpoint) and data; see 'modelshield list attacks'."""
    from modelshield.cli.attack import run_attack_command

    _parse_model_opts(opts).pop("command")
    summary = run_attack_command(**opts)
    click.echo(
        f"{summary['attack']}: clean accuracy {summary['clean_accuracy']:.3f}, robust accuracy "
        f"{summary['robust_accuracy']:.3f} at {summary['threat']['norm']} eps {summary['threat']['eps']:g}"
    )
    click.echo(f"result: {summary['paths']['result']}")
    click.echo(f"adversarial: {summary['paths']['adversarial']}")


@cli.group("harden")
def harden_group() -> None:
    """Apply a defence and measure the model before and after it."""


@harden_group.command("adversarial")
@model_option("Model to harden (omit to train --arch from scratch).")
@train_data_option()
@data_option("Test data for the before/after evaluation.")
@click.option(
    "--method",
    type=click.Choice(["pgd-at", "trades", "fgsm-rs"]),
    default="pgd-at",
    show_default=True,
    help="PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019) or FGSM-RS (Wong et al. 2020).",
)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", type=float, required=True, help="Training and evaluation eps.")
@epochs_option(10)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Inner attack steps (pgd-at, trades).",
)
@click.option("--beta", type=float, default=6.0, show_default=True, help="TRADES trade-off.")
@click.option("--lr", type=float, help="Learning rate (default: the method's).")
@batch_size_option(128)
@click.option("--bf16", is_flag=True, help="bf16 autocast for forward passes.")
@harden_run_options(
    "Writes model.pt2, report.html, report.json here; re-running resumes.",
    profile="Cost of the before/after evaluation.",
)
@model_options
def harden_adversarial_cmd(**opts: Any) -> None:
    """Adversarially train a model; write it and a before/after report."""
    from modelshield.scan.harden import HardenConfig, harden_adversarial

    outcome = harden_adversarial(HardenConfig(**_parse_model_opts(opts)))
    echo_outcome(outcome, f"model: {outcome.model_path}", rows=False)


@cli.command("certify")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(dir_okay=False),
    help="Base classifier (ideally trained with Gaussian noise).",
)
@click.option("--data", "data", required=True, type=click.Path(), help="Data to certify.")
@click.option("--sigma", type=float, required=True, help="Noise level of the smoothed classifier.")
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Monte Carlo samples for the bound.",
)
@click.option(
    "--n0",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Samples to pick the top class.",
)
@click.option(
    "--alpha",
    type=float,
    default=0.001,
    show_default=True,
    help="Failure probability of each certificate.",
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Certify at most this many inputs.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Writes result.json, report.html, report.json here.",
)
@model_options
def certify_cmd(**opts: Any) -> None:
    """Certified L2 robustness by randomized smoothing (Cohen et al. 2019)."""
    from modelshield.scan.certify import CertifyConfig, certify_model

    outcome = certify_model(CertifyConfig(**_parse_model_opts(opts)))
    for radius, acc in zip(outcome.radii, outcome.accuracy, strict=True):
        click.echo(f"radius {radius:<8.3g} certified accuracy {acc:.3f}")
    click.echo(f"result: {outcome.result_path}")
    click.echo(f"report: {outcome.reports['html']}")


@cli.group("audit")
def audit_group() -> None:
    """Audit a model for privacy leaks, or its training data for poison."""


@audit_group.command("membership")
@model_option("The model to audit.", required=True)
@train_data_option("Its training data (the members).")
@data_option("Held-out data from the same distribution (the non-members).")
@click.option(
    "--attack",
    type=click.Choice(["loss", "shadow", "lira", "lira-offline", "rmia", "label-only"]),
    default="lira",
    show_default=True,
)
@click.option(
    "--shadow-models",
    type=click.IntRange(min=2),
    default=8,
    show_default=True,
    help="Reference/shadow models (even).",
)
@click.option(
    "--shadow-arch",
    help="Architecture of the reference models (default: small_cnn for images, mlp otherwise).",
)
@click.option("--shadow-epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=10),
    default=500,
    show_default=True,
    help="Members (and as many non-members) audited.",
)
@executor_options("reference models train")
@out_option("Writes result.json, report.html, report.json; reference models are cached here.")
@model_options
def audit_membership_cmd(**opts: Any) -> None:
    """Membership inference: can an attacker tell training records from others?"""
    from modelshield.scan.audit import run_membership_audit

    summary = run_membership_audit(**_parse_model_opts(opts))
    click.echo(
        f"{summary['attack']}: AUC {summary['auc']:.3f}, TPR at 0.1% FPR "
        f"{summary['tpr_at_fpr']['0.001']:.3f}, at 1% FPR {summary['tpr_at_fpr']['0.01']:.3f}"
    )
    click.echo(f"result: {summary['paths']['result']}")
    click.echo(f"report: {summary['paths']['html']}")


@audit_group.command("inversion")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(dir_okay=False),
    help="A white-box image model.",
)
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(),
    help="Data whose class means the representatives are compared with.",
)
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option(
    "--tv-weight", type=float, default=0.01, show_default=True, help="Total-variation regulariser."
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@model_options
def audit_inversion_cmd(**opts: Any) -> None:
    """Model inversion (MI-Face): reconstruct a representative of every class."""
    from modelshield.scan.audit import run_inversion_audit

    summary = run_inversion_audit(**_parse_model_opts(opts))
    click.echo(
        f"mi-face: {summary['nearest_fraction']:.0%} of representatives nearest their class mean"
    )
    click.echo(f"result: {summary['paths']['result']}")
    click.echo(f"report: {summary['paths']['html']}")


@audit_group.command("attribute")
@click.option(
    "--model", "model", required=True, type=click.Path(dir_okay=False), help="A tabular model."
)
@click.option(
    "--train-data",
    "train_data",
    required=True,
    type=click.Path(),
    help="Records whose sensitive value is inferred (the targets).",
)
@click.option(
    "--data", "data", required=True, type=click.Path(), help="Auxiliary records the attacker holds."
)
@click.option(
    "--sensitive",
    type=click.IntRange(min=0),
    required=True,
    help="Column index of the sensitive feature.",
)
@click.option(
    "--values",
    "values",
    multiple=True,
    type=float,
    help="Candidate values (repeatable; default: the column's values or 5 quantile bins).",
)
@click.option(
    "--attack",
    type=click.Choice(["fredrikson", "learned"]),
    default="fredrikson",
    show_default=True,
)
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=300, show_default=True, help="Targets attacked."
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@model_options
def audit_attribute_cmd(**opts: Any) -> None:
    """Attribute inference: does querying the model reveal a sensitive feature?"""
    from modelshield.scan.audit import run_attribute_audit

    summary = run_attribute_audit(**_parse_model_opts(opts))
    click.echo(
        f"{summary['attack']}: accuracy {summary['accuracy']:.3f}, baseline {summary['baseline_accuracy']:.3f}, "
        f"advantage {summary['advantage']:.3f}"
    )
    click.echo(f"result: {summary['paths']['result']}")
    click.echo(f"report: {summary['paths']['html']}")


cli.add_command(train_cmd)
cli.add_command(serve_cmd)
cli.add_command(steal_cmd)
cli.add_command(watermark_group)
audit_group.add_command(audit_dp_cmd)
cli.add_command(poison_cmd)
cli.add_command(fl_group)
cli.add_command(he_group)
cli.add_command(mpc_group)
harden_group.add_command(fine_prune_cmd)
harden_group.add_command(harden_dp_cmd)
harden_group.add_command(harden_watermark_cmd)
harden_group.add_command(harden_poison_removal_cmd)
harden_group.add_command(harden_gateway_cmd)
audit_group.add_command(audit_data_cmd)


@cli.command("list")
@click.argument("kind", required=False)
def list_cmd(kind: str | None) -> None:
    """List registered components (attacks, probes, architectures); all kinds if KIND is omitted."""
    from modelshield.core.registry import get_registry, registry_kinds
    from modelshield.plugins import load_all

    load_all()
    kinds = [kind] if kind else registry_kinds()
    for k in kinds:
        reg = get_registry(k)
        for name in reg.names():
            click.echo(name if kind else f"{k}\t{name}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="modelshield")


if __name__ == "__main__":  # pragma: no cover
    main()
