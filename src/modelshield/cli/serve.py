"""``modelshield serve``: a model behind switchable anti-extraction defences, over HTTP."""

from __future__ import annotations

import os
from typing import Any

import click

STATS_TOKEN_ENV = "MODELSHIELD_STATS_TOKEN"


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(
            f"expected positive integers like 1,28,28, got {text!r}", param_hint=name
        )
    return values


def _floats(text: str | None, name: str, count: int | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count):
        want = f"{count} " if count else ""
        raise click.BadParameter(
            f"expected {want}comma-separated numbers, got {text!r}", param_hint=name
        )
    return values


def _apply_config(opts: dict[str, Any]) -> None:
    """Fill options not given on the command line from ``--config`` (``harden gateway``'s
    gateway.json); the model file must still have the SHA-256 the config names."""
    import hashlib
    import json
    from pathlib import Path

    path = Path(opts["config"])
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    if not isinstance(doc, dict) or doc.get("format") != "modelshield-gateway":
        raise click.BadParameter(
            f"{path} is not a gateway config (written by 'modelshield harden gateway')",
            param_hint="--config",
        )
    model = doc.get("model") or {}
    if opts["model"] is None:
        opts["model"] = model.get("path")
        want = model.get("sha256")
        if want and Path(str(opts["model"])).is_file():
            got = hashlib.sha256(Path(str(opts["model"])).read_bytes()).hexdigest()
            if got != want:
                raise click.BadParameter(
                    f"{opts['model']} has changed since {path} was written (SHA-256 differs); "
                    "re-run 'modelshield harden gateway'",
                    param_hint="--config",
                )
    if not opts["defenses"]:
        opts["defenses"] = tuple(doc.get("defenses") or ())
    for key in ("reference_data", "arch"):
        if opts.get(key) is None and doc.get(key) is not None:
            opts[key] = doc[key]
    for key in ("bounds", "mean", "std"):
        if opts.get(key) is None and doc.get(key) is not None:
            opts[key] = ",".join(str(v) for v in doc[key])
    source = click.get_current_context().get_parameter_source("max_batch")
    if doc.get("max_batch") and source == click.core.ParameterSource.DEFAULT:
        opts["max_batch"] = int(doc["max_batch"])


@click.command("serve")
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    help="A gateway.json from 'modelshield harden gateway': model, defences and their data "
    "(options given here take precedence).",
)
@click.option(
    "--model",
    "model",
    type=click.Path(dir_okay=False),
    help="Model file: torch.export .pt2, TorchScript, state_dict (+ --arch), ONNX, or a pickle (needs --trust-pickle).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the model to the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port (0: a free one, printed on start).",
)
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    metavar="SPEC",
    help="Repeatable: label-only, top-k=K, round=DECIMALS, noise=SIGMA, "
    "reverse-sigmoid=BETA[,gamma=G], rate=N/s[,burst=B], budget=N, prada=DELTA[,action=block], "
    "ood=ALPHA[,action=block,min_samples=N,test_every=N] (needs --reference-data); "
    "see 'modelshield list gateway-defenses'.",
)
@click.option(
    "--reference-data",
    metavar="PATH",
    help="Benign inputs for --defense ood (e.g. the owner's validation data): .npz, CSV, IDX, "
    "image folder or 'digits'; their confidences and classes are what clients are tested "
    "against.",
)
@click.option(
    "--prada-action",
    type=click.Choice(["flag", "block"]),
    help="With --defense prada: only flag suspected extraction (log, /stats) or also refuse the client (403).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Largest batch (rows) one request may send.",
)
@click.option(
    "--client-header",
    default="X-Client-Id",
    show_default=True,
    help="Header naming the client (budgets, rates, detectors are per client); '' to key by peer "
    "address. Trust it only behind an authenticating proxy.",
)
@click.option(
    "--stats/--no-stats",
    "stats",
    default=True,
    show_default=True,
    help=f"Serve GET /stats (per-client state) for the operator; ${STATS_TOKEN_ENV} requires a bearer token.",
)
@click.option(
    "--trust-pickle", is_flag=True, help="Allow a full-pickle model file (runs its code)."
)
@click.option(
    "--arch", help="Architecture of a state_dict: a built-in name or package.module:factory."
)
@click.option(
    "--input-shape", help="Per-sample input shape, e.g. 1,28,28 (when the file lacks it)."
)
@click.option("--num-classes", type=click.IntRange(min=2), help="Number of classes (state_dicts).")
@click.option(
    "--bounds",
    help="Input value range LOW,HIGH; requests outside are refused (default: 0,1 for torch "
    "models, unchecked for ONNX and scikit-learn).",
)
@click.option("--mean", help="Per-channel normalisation mean applied by the model adapter.")
@click.option("--std", help="Per-channel normalisation std.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def serve_cmd(**opts: Any) -> None:
    """Serve a model over HTTP behind anti-extraction defences (POST /predict, GET /info, /health, /stats).

    \b
    Example:
      modelshield serve --model model.pt2 --port 8000 --defense top-k=1 \\
          --defense rate=10/s --defense budget=5000 --defense prada=0.9 --prada-action block
      modelshield serve --model model.pt2 --defense ood=1e-4,action=block \\
          --reference-data validation.npz
      modelshield serve --config hardened/gateway.json   # from 'modelshield harden gateway'
    Query it with HttpOracle("http://127.0.0.1:8000/predict"), or
      curl -s localhost:8000/predict -d '{"inputs": [[...]]}' -H 'X-Client-Id: alice'
    """
    from modelshield.core.data import load_dataset
    from modelshield.serve.app import create_app, load_gateway
    from modelshield.serve.defenses import OodDefense, PradaDefense, parse_defense
    from modelshield.serve.server import is_loopback, run

    if opts["config"] is not None:
        _apply_config(opts)
    if opts["model"] is None:
        raise click.UsageError("give --model PATH or --config gateway.json")
    defenses = [parse_defense(spec) for spec in opts["defenses"]]
    if opts["prada_action"] is not None:
        prada = [d for d in defenses if isinstance(d, PradaDefense)]
        if not prada:
            raise click.UsageError("--prada-action needs --defense prada=DELTA")
        prada[0].action = opts["prada_action"]
    ood = [d for d in defenses if isinstance(d, OodDefense)]
    if ood and opts["reference_data"] is None:
        raise click.UsageError(
            "--defense ood needs --reference-data PATH (benign inputs, e.g. the owner's "
            "validation data)"
        )
    if opts["reference_data"] is not None and not ood:
        raise click.UsageError("--reference-data is only used by --defense ood=ALPHA")
    input_shape = _ints(opts["input_shape"], "--input-shape")
    if ood:
        reference = load_dataset(opts["reference_data"], input_shape=input_shape)
        ood[0].reference = reference.x
    bounds = _floats(opts["bounds"], "--bounds", 2)
    mean = _floats(opts["mean"], "--mean")
    std = _floats(opts["std"], "--std")
    gateway = load_gateway(
        opts["model"],
        defenses,
        trust_pickle=opts["trust_pickle"],
        arch=opts["arch"],
        input_shape=input_shape,
        num_classes=opts["num_classes"],
        bounds=(bounds[0], bounds[1]) if bounds is not None else None,
        mean=mean,
        std=std,
        device=None if opts["device"] == "auto" else opts["device"],
        max_batch=opts["max_batch"],
    )
    host = opts["host"]
    token = os.environ.get(STATS_TOKEN_ENV) or None
    expose = opts["stats"]
    if not is_loopback(host):
        click.echo(
            f"modelshield: WARNING: listening on {host}, not loopback: the model is reachable "
            "from other machines",
            err=True,
        )
        if expose and token is None:
            click.echo(
                f"modelshield: WARNING: GET /stats disabled (set ${STATS_TOKEN_ENV} to serve it "
                "behind a bearer token)",
                err=True,
            )
            expose = False
    app = create_app(
        gateway, client_header=opts["client_header"], stats_token=token, expose_stats=expose
    )
    active = ", ".join(d.name for d in gateway.defenses) or "none"
    output = "labels" if gateway.labels_only else "probabilities"

    def ready(url: str) -> None:
        click.echo(f"modelshield serve: listening on {url} (answers {output}; defences: {active})")
        click.echo(f"predict: POST {url}/predict", nl=True)

    run(app, host, opts["port"], on_ready=ready)
    click.echo("modelshield serve: stopped")
