"""``modelshield mpc``: secure multi-party computation (ring engine or MPyC), issue 11."""

from __future__ import annotations

from typing import Any

import click

from modelshield.cli.options import prep_bounds

_prep = prep_bounds


_FRAC = click.option(
    "--frac-bits",
    type=click.IntRange(4, 40),
    default=16,
    show_default=True,
    help="Fixed-point fractional bits (precision).",
)
_INT = click.option(
    "--int-bits",
    type=click.IntRange(4, 40),
    default=16,
    show_default=True,
    help="Fixed-point integer bits (range, sign included).",
)
_BOUNDS = click.option("--bounds", default="0,1", show_default=True, help="Input range LOW,HIGH.")
_TIMEOUT = click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="Fail (rather than wait) when the run takes longer than this many seconds.",
)
_ENGINE = click.option(
    "--engine",
    type=click.Choice(["auto", "ring", "mpyc"]),
    default="auto",
    show_default=True,
    help="ring: 3-party replicated sharing over Z_2^64 (fast); mpyc: Shamir (MPyC), any "
    "number of parties; auto: ring for 3 parties, else mpyc. All parties must agree.",
)
_TRANSCRIPT = click.option(
    "--transcripts",
    "transcripts",
    is_flag=True,
    help="Each party also writes every message it sends to DIR/party-I-transcript.bin (audit).",
)


@click.group("mpc")
def mpc_group() -> None:
    """Secure multi-party computation: parties exchange only secret shares.

    \b
    Engines: ring (3 parties, replicated sharing over Z_2^64; the default for 3) and
    mpyc (Shamir with MPyC, any number of parties).
    Security: honest majority (3 or more parties, at most (m-1)//2 colluding), passive
    (semi-honest) adversaries. Revealed: the outputs to the data owner; shapes and the
    architecture to every party.
    \b
    One machine, every party a local process on 127.0.0.1:
      modelshield mpc infer --model model.pt2 --data test.npz --parties 3 --out run
      modelshield mpc train --data a.npz,b.npz --model logistic --parties 3 --out run
    One party per host (same --parties list everywhere):
      modelshield mpc party --id 0 --role model --model model.pt2 --input-shape 1,8,8 \\
          --parties hostA:11365,hostB:11365,hostC:11365 --out party0
    """


@mpc_group.command("party", short_help="Run one party (a process; can be on its own host).")
@click.option("--id", "id", type=click.IntRange(min=0), required=True, help="This party's index.")
@click.option("--parties", required=True, help="HOST:PORT of every party, in index order.")
@click.option("--role", type=click.Choice(["model", "data", "compute"]), required=True)
@click.option("--task", type=click.Choice(["infer", "train"]), default="infer", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--model", "model", type=click.Path(dir_okay=False), help="Model file (model party).")
@click.option("--arch", help="Architecture of a state_dict: 'pkg.mod:factory' or built-in.")
@click.option("--trust-pickle", is_flag=True, help="Allow a full-pickle model file.")
@click.option("--input-shape", help="Per-sample input shape, e.g. 1,8,8 (model party).")
@click.option("--data", "data", type=click.Path(), help="This data party's file.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")
@_BOUNDS
@_FRAC
@_INT
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--reveal", type=click.Choice(["label", "logits"]), default="label", show_default=True,
              help="What the data owner receives.")  # fmt: skip
@click.option("--kind", type=click.Choice(["logistic", "linear"]), default="logistic",
              show_default=True, help="Model trained by --task train.")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option(
    "--transcript", is_flag=True, help="Write every message sent to OUT/party-I-transcript.bin."
)
@_ENGINE
@_TIMEOUT
def party_cmd(**opts: Any) -> None:
    """Run one party of an MPC computation (one process; can be on its own host)."""
    import logging

    from modelshield.crypto.he.commands import _shape
    from modelshield.crypto.mpc.party import run_party

    opts = _prep(opts)
    opts.pop("command")
    opts["input_shape"] = _shape(opts.get("input_shape"))
    verbose = logging.getLogger("modelshield").getEffectiveLevel() <= logging.DEBUG
    r = run_party(**opts, log_level="info" if verbose else "warning")
    click.echo(f"party {r['pid']} ({r['role']}): done in {r['wall_time']:.2f} s")


@mpc_group.command("infer", short_help="Secret-shared inference, parties as local processes.")
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False),
              help="Model file: torch.export .pt2, TorchScript, or state_dict (+ --arch).")  # fmt: skip
@click.option("--arch", help="Architecture of a state_dict: 'pkg.mod:factory' or built-in.")
@click.option("--trust-pickle", is_flag=True, help="Allow a full-pickle model file.")
@click.option("--data", "data", required=True, type=click.Path(), help="Test data with labels.")
@click.option("--parties", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--reveal", type=click.Choice(["label", "logits"]), default="label", show_default=True,
              help="What the data owner receives: the argmax only, or the logits.")  # fmt: skip
@_BOUNDS
@_FRAC
@_INT
@_ENGINE
@_TRANSCRIPT
@_TIMEOUT
def infer_cmd(**opts: Any) -> None:
    """Secret-shared inference with all parties as local processes; writes DIR/result.json."""
    from modelshield.crypto.mpc.commands import run_infer

    r = run_infer(**_prep(opts))
    lat = r["latency"]
    click.echo(
        f"MPC accuracy {r['accuracy']:.4f} vs plaintext {r['plaintext_accuracy']:.4f} on {r['n']} "
        f"samples; argmax agreement {r['argmax_agreement']:.4f}"
    )
    click.echo(
        f"latency {lat['seconds_per_batch']:.3f} s per batch of {lat['batch_size']}, "
        f"{lat['seconds_per_sample'] * 1000:.1f} ms per sample; bytes sent per party: "
        + ", ".join(f"{k}: {v / 1e6:.2f} MB" for k, v in r["bytes_sent"].items())
    )
    click.echo(f"result: {opts['out']}/result.json")


@mpc_group.command("train", short_help="Joint training on horizontally split data.")
@click.option("--data", "data", required=True, help="One file per data party: PATH1,PATH2,...")
@click.option("--model", "model", type=click.Choice(["logistic", "linear"]), default="logistic",
              show_default=True)  # fmt: skip
@click.option("--parties", type=click.IntRange(min=1), default=3, show_default=True,
              help="Parties in all (data parties first; the rest compute).")  # fmt: skip
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--test", "test", type=click.Path(), help="Held-out data to score the model on.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@_BOUNDS
@_FRAC
@_INT
@_ENGINE
@_TRANSCRIPT
@_TIMEOUT
def train_cmd(**opts: Any) -> None:
    """Joint training on horizontally split data; only the final weights are revealed."""
    from modelshield.crypto.mpc.commands import run_train

    r = run_train(**_prep(opts))
    click.echo(
        f"{r['model']}: MPC accuracy {r['accuracy']:.4f} vs pooled plaintext "
        f"{r['plaintext_accuracy']:.4f} ({r['evaluated_on']}); trained in "
        f"{r['training_seconds']:.2f} s on shards {r['shards']}"
    )
    click.echo(f"result: {opts['out']}/result.json")
