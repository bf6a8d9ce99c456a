"""``modelshield fl simulate`` and ``modelshield fl run`` (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from modelshield.federated.attacks import ATTACKS
from modelshield.federated.task import AGGREGATORS


def fl_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a federated run, shared by ``simulate`` and ``run``."""
    options = [
        click.option(
            "--data",
            "data",
            default="digits",
            show_default=True,
            help="Data the clients share out (.npz, CSV, IDX, image folder, or 'digits').",
        ),
        click.option(
            "--test-data",
            "test_data",
            help="The server's test set (default: 20% of --data held out).",
        ),
        click.option(
            "--clients", "num_clients", type=click.IntRange(min=2), default=10, show_default=True
        ),
        click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True),
        click.option(
            "--fraction",
            type=float,
            default=1.0,
            show_default=True,
            help="Share of clients sampled per round (central DP: the Poisson rate q).",
        ),
        click.option(
            "--partition", type=click.Choice(["iid", "dirichlet"]), default="iid", show_default=True
        ),
        click.option(
            "--alpha",
            type=float,
            default=0.5,
            show_default=True,
            help="Dirichlet concentration (non-IID; smaller is more skewed).",
        ),
        click.option(
            "--arch",
            help="mlp, small_cnn, ... (default: mlp up to 1,024 input features, small_cnn above).",
        ),
        click.option("--local-epochs", type=click.IntRange(min=1), default=2, show_default=True),
        click.option(
            "--lr",
            type=float,
            default=0.05,
            show_default=True,
            help="Client SGD learning rate (momentum 0.9).",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option(
            "--malicious",
            type=float,
            default=0.0,
            show_default=True,
            help="Fraction of malicious clients.",
        ),
        click.option(
            "--attack",
            help=f"What the malicious clients do: {', '.join(ATTACKS)}; several, comma-separated, "
            "to compare (with --compare: every attack under every aggregator).",
        ),
        click.option(
            "--target-class",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Backdoor target.",
        ),
        click.option(
            "--boost",
            type=float,
            default=0.0,
            help="Backdoor update scale (default: clients per round / malicious: model replacement).",
        ),
        click.option(
            "--aggregator",
            type=click.Choice(list(AGGREGATORS)),
            default="fedavg",
            show_default=True,
        ),
        click.option(
            "--compare",
            help="Comma-separated aggregators to run under the same attack (plus a no-attack baseline).",
        ),
        click.option(
            "--assume-malicious",
            "num_malicious_assumed",
            type=int,
            default=-1,
            help="f of Krum/Bulyan (default: the actual count).",
        ),
        click.option("--trim-beta", type=float, default=0.2, show_default=True),
        click.option(
            "--norm-bound",
            type=float,
            default=0.0,
            help="norm-bound's clipping norm (default: the round's median update norm).",
        ),
        click.option(
            "--dp",
            type=click.Choice(["central", "local"]),
            help="Client-level central DP (DP-FedAvg) or local DP.",
        ),
        click.option(
            "--noise-multiplier", type=float, default=0.0, help="DP noise multiplier sigma."
        ),
        click.option(
            "--clip",
            type=float,
            default=1.0,
            show_default=True,
            help="DP clipping norm C of each update.",
        ),
        click.option("--delta", type=float, default=1e-5, show_default=True),
        click.option(
            "--max-epsilon",
            type=float,
            default=0.0,
            help="Refuse a round that would spend more (central DP).",
        ),
        click.option(
            "--secagg",
            is_flag=True,
            help="Secure aggregation (Flower's SecAgg+): the server sees masked updates only.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--out",
            "out",
            required=True,
            type=click.Path(file_okay=False),
            help="Writes result.json, report.html/json; runs/ keeps each run (re-running resumes).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(opts: dict[str, Any]) -> tuple[Any, list[str], list[str]]:
    from modelshield.core.errors import InvalidConfigError
    from modelshield.federated.task import FLConfig

    compare = [c.strip() for c in (opts.pop("compare") or "").split(",") if c.strip()]
    for c in compare:
        if c not in AGGREGATORS:
            raise InvalidConfigError(
                f"--compare: unknown aggregator {c!r}; known: {', '.join(AGGREGATORS)}"
            )
    attacks = [a.strip() for a in (opts.get("attack") or "").split(",") if a.strip()]
    for a in attacks:
        if a not in ATTACKS:
            raise InvalidConfigError(f"--attack: unknown attack {a!r}; known: {', '.join(ATTACKS)}")
    opts["attack"] = attacks[0] if attacks else ""
    opts["dp"] = opts.get("dp") or ""
    opts["arch"] = opts.get("arch") or ""
    opts["test_data"] = opts.get("test_data") or ""
    return FLConfig(**opts).validate(), compare, attacks


def _echo(s: dict[str, Any]) -> None:
    for name, run in s["runs"].items():
        last = run["rounds"][-1]
        eps = f", epsilon {last['epsilon']:.3f}" if last.get("epsilon") is not None else ""
        click.echo(
            f"{name:<14} accuracy {last['accuracy']:.4f}  backdoor ASR {last['asr']:.4f}{eps}"
        )
    click.echo(f"result: {s['paths']['result']}")
    click.echo(f"report: {s['paths']['html']}")


def _run(opts: dict[str, Any], runner: Callable[[Any], dict[str, Any]], mode: str) -> None:
    """Plan, run (or reuse) and report; the runner makes one run (simulated or deployed)."""
    from modelshield.cli.main import _parse_model_opts
    from modelshield.federated.run import run_federated

    command = _parse_model_opts({"bounds": "0,1", "mean": None, "std": None})["command"]
    cfg, compare, attacks = _config(opts)
    s = run_federated(
        cfg, compare=compare, attacks=attacks, runner=runner, command=command, mode=mode
    )
    _echo(s)


@click.group("fl")
def fl_group() -> None:
    """Federated learning on Flower: attacks, robust aggregation, DP-FL, secure aggregation."""


@fl_group.command("simulate")
@fl_options
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs Ray may use (default: all).")
def simulate_cmd(**opts: Any) -> None:
    """Simulate a federation on Flower's simulation engine (Ray, loopback only).

    \b
    Example:
      modelshield fl simulate --clients 10 --rounds 10 --malicious 0.2 --attack backdoor \\
          --compare fedavg,multi-krum,median,fltrust --out fl-run
    """
    from modelshield.federated.simulate import simulate

    cpus = opts.pop("cpus")
    _run(opts, lambda c: simulate(c, num_cpus=cpus), "simulation")


@fl_group.command("run")
@fl_options
@click.option(
    "--timeout", type=float, help="Seconds the deployment may take (default: 60 + 120 per round)."
)
def run_cmd(**opts: Any) -> None:
    """Run a federation for real: a SuperLink and one SuperNode per client, as separate
    processes talking gRPC on 127.0.0.1, stopped on exit and on failure.

    \b
    Example:
      modelshield fl run --clients 3 --rounds 2 --malicious 0.34 --attack sign-flip \\
          --aggregator median --out fl-deploy
    """
    from modelshield.federated.deployment import deploy

    timeout = opts.pop("timeout")
    _run(opts, lambda c: deploy(c, timeout=timeout), "deployment")
