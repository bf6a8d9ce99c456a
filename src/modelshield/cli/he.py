"""``modelshield he``: encrypted inference (CKKS via TenSEAL), issue 10."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from modelshield.cli.options import prep_bounds


def _load_opts(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--model",
            "model",
            required=True,
            type=click.Path(dir_okay=False),
            help="Model file: torch.export .pt2, TorchScript, or state_dict (+ --arch).",
        ),
        click.option("--arch", help="Architecture of a state_dict: 'pkg.mod:factory' or built-in."),
        click.option("--trust-pickle", is_flag=True, help="Allow a full-pickle model file."),
        click.option(
            "--input-shape", help="Per-sample input shape, e.g. 1,28,28 (default: from --data)."
        ),
        click.option("--bounds", default="0,1", show_default=True, help="Input range LOW,HIGH."),
        click.option("--label-column", help="CSV label column."),
        click.option(
            "--min-scale-bits",
            type=click.IntRange(25, 40),
            default=26,
            show_default=True,
            help="Precision floor: CKKS scale bits per level.",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_prep = prep_bounds


_MODE = click.option(
    "--mode",
    type=click.Choice(["auto", "latency", "throughput"]),
    default="auto",
    show_default=True,
    help="latency: one sample per ciphertext; throughput: SIMD across samples (no rotations).",
)


@click.group("he")
def he_group() -> None:
    """Encrypted inference: the server computes on CKKS ciphertexts, the client keeps the key.

    \b
    Client and server, step by step:
      modelshield he compile --model model.pt2 --data calib.npz --out plan
      modelshield he keygen --plan plan --out keys          # client; keys/secret.ctx stays here
      modelshield he serve --plan plan --port 8080          # server; sees public keys only
      modelshield he infer --server http://127.0.0.1:8080 --keys keys --data test.npz --out run
    Encrypted vs plaintext on one machine:
      modelshield he eval --model model.pt2 --data test.npz --out eval
    A deep ReLU model first made HE-friendly (trainable quadratics, fine-tuned):
      modelshield he finetune --model model.pt2 --train-data train.npz --data test.npz --out ft
    """


@he_group.command("compile")
@_load_opts
@click.option(
    "--data", "data", type=click.Path(), help="Calibration inputs (ReLU/sigmoid fit range)."
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="PLAN_DIR.")
def compile_cmd(**opts: Any) -> None:
    """Compile a trained model into an encrypted-inference plan and CKKS parameters."""
    from modelshield.crypto.he.commands import run_compile

    s = run_compile(**_prep(opts))
    p, plan = s["params"], s["plan"]
    layers = " → ".join(
        f"affine {la['in']}→{la['out']}" if la["type"] == "affine" else "square"
        for la in plan["layers"]
    )
    click.echo(f"plan: {layers} (depth {plan['depth']}, output {plan['output']})")
    for note in plan["notes"]:
        click.echo(f"note: {note}")
    click.echo(
        f"CKKS: N={p['poly_modulus_degree']}, coeff modulus {p['coeff_mod_bit_sizes']}, "
        f"scale 2^{p['scale_bits']}; security: {p['security']}"
    )
    click.echo(f"plan: {s['path']}")


@he_group.command("finetune")
@_load_opts
@click.option("--train-data", "train_data", required=True, type=click.Path(), help="Training data.")
@click.option("--data", "data", type=click.Path(), help="Test data (accuracy before/after).")
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
def finetune_cmd(**opts: Any) -> None:
    """Make a ReLU model HE-friendly: trainable quadratic activations, fine-tuned.

    Writes DIR/model.pt2 (compile it with 'he compile') and DIR/result.json with the
    accuracy of the original, swapped and fine-tuned model.
    """
    from modelshield.crypto.he.commands import run_finetune

    r = run_finetune(**_prep(opts))
    click.echo(
        f"accuracy: ReLU model {r['accuracy_relu']:.4f}, quadratic swap "
        f"{r['accuracy_swapped']:.4f}, fine-tuned {r['accuracy_finetuned']:.4f} "
        f"(cost {r['accuracy_cost_pp']:+.2f} pp, on {r['evaluated_on']} data)"
    )
    click.echo(f"model: {r['model']}")
    click.echo(f"result: {opts['out']}/result.json")


@he_group.command("keygen")
@click.option("--plan", "plan", required=True, type=click.Path(file_okay=False), help="PLAN_DIR.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="KEY_DIR.")
@click.option(
    "--mode",
    type=click.Choice(["both", "throughput", "latency"]),
    default="both",
    show_default=True,
    help="Packings to make keys for (latency needs Galois keys: a larger public context).",
)
def keygen_cmd(**opts: Any) -> None:
    """Client side: make the CKKS context; the secret key stays in KEY_DIR/secret.ctx."""
    from modelshield.crypto.he.commands import run_keygen

    meta = run_keygen(**opts)
    click.echo(f"secret key: {opts['out']}/secret.ctx (keep it here)")
    click.echo(f"public context: {meta['public_context']['path']} (send this to the server)")


@he_group.command("serve")
@click.option("--plan", "plan", required=True, type=click.Path(file_okay=False), help="PLAN_DIR.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
def serve_cmd(plan: str, host: str, port: int) -> None:
    """Server side: answer encrypted requests for a plan over HTTP (no secret key)."""
    from modelshield.crypto.he.commands import plan_and_params
    from modelshield.crypto.he.server import create_app
    from modelshield.serve.server import run

    p, params = plan_and_params(plan)
    app = create_app(p, params)

    def ready(url: str) -> None:
        click.echo(f"listening on {url}", nl=True)
        click.echo(f"plan: depth {p.depth}, N={params.poly_modulus_degree}", nl=True)

    run(app, host=host, port=port, on_ready=ready)


@he_group.command("infer")
@click.option("--server", required=True, help="URL of 'modelshield he serve'.")
@click.option("--keys", "keys", required=True, type=click.Path(file_okay=False), help="KEY_DIR.")
@click.option("--data", "data", required=True, type=click.Path(), help="Inputs (with labels).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")
@click.option("--bounds", default="0,1", show_default=True, help="Input range LOW,HIGH.")
@click.option("--label-column", help="CSV label column.")
@_MODE
def infer_cmd(**opts: Any) -> None:
    """Client side: encrypt --data, send it, decrypt the answers; writes DIR/result.json."""
    from modelshield.crypto.he.commands import run_infer

    r = run_infer(**_prep(opts))
    click.echo(
        f"{r['mode']}: accuracy {r['accuracy']:.4f} on {r['n']} samples, "
        f"{r['throughput_samples_per_second']:.1f} samples/s"
    )
    click.echo(f"result: {opts['out']}/result.json")


@he_group.command("eval")
@_load_opts
@click.option("--data", "data", required=True, type=click.Path(), help="Test data with labels.")
@click.option(
    "--calibration-data",
    "calibration_data",
    type=click.Path(),
    help="Inputs to fit ReLU/sigmoid stand-ins on (default: the --data samples beyond "
    "--limit, else --data itself).",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")
@click.option(
    "--latency-samples",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Also time this many samples in the latency packing.",
)
@_MODE
def eval_cmd(**opts: Any) -> None:
    """Encrypted vs plaintext on one machine: accuracy, agreement, latency, throughput."""
    from modelshield.crypto.he.commands import run_eval

    r = run_eval(**_prep(opts))
    click.echo(
        f"encrypted accuracy {r['encrypted_accuracy']:.4f} vs plaintext "
        f"{r['plaintext_accuracy']:.4f} on {r['n']} samples ({r['mode']} mode); "
        f"max |error| {r['max_abs_error']:.2e}"
    )
    if r.get("latency_seconds_per_sample") is not None:
        click.echo(f"latency: {r['latency_seconds_per_sample']:.3f} s/sample")
    if r.get("throughput_samples_per_second") is not None:
        click.echo(f"throughput: {r['throughput_samples_per_second']:.1f} samples/s")
    for note in r["notes"]:
        click.echo(f"note: {note}")
    if any(a.get("fit") for a in r["plan"]["activations"]):
        click.echo(f"note: activations fitted on {r['calibration']}")
    for warning in r.get("warnings", []):
        click.echo(f"WARNING: {warning}")
    click.echo(f"result: {opts['out']}/result.json")
