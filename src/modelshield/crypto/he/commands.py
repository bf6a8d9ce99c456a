"""The ``modelshield he`` commands: compile, keygen, serve, infer, eval.

Each writes its files atomically and ``result.json`` (or ``plan.json`` / ``keys.json``)
last, so a present result means a finished run. User errors raise
:class:`~modelshield.core.errors.ModelShieldError` before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import (
    DataError,
    InvalidConfigError,
    OracleError,
    UnsupportedModelError,
)
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import load_model
from modelshield.crypto.he.keys import (
    load_public,
    make_context,
    public_bytes,
    read_keys,
    write_keys,
)
from modelshield.crypto.he.params import CKKSParams, choose_params
from modelshield.crypto.he.plan import (
    FIDELITY_WARN,
    Plan,
    compile_model,
    load_plan,
    model_forward_np,
    predict_labels,
)
from modelshield.crypto.he.runtime import (
    MODES,
    choose_mode,
    decrypt,
    encrypt,
    pack_blobs,
    run_local,
    unpack_blobs,
)

logger = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 1024
DEFAULT_TOLERANCE = 1e-3
"""Stated bound on |decrypted − plaintext| logits, relative to max(1, max |logit|)."""


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InvalidConfigError(f"--input-shape must be like 1,28,28, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise InvalidConfigError(f"--input-shape must be positive dims, got {text!r}")
    return dims


def _data(opts: dict[str, Any], key: str = "data") -> Dataset | None:
    if not opts.get(key):
        return None
    return load_dataset(opts[key], bounds=opts["bounds"], label_column=opts.get("label_column"))


def _required_data(opts: dict[str, Any]) -> Dataset:
    data = _data(opts)
    if data is None:
        raise InvalidConfigError("--data is required (labelled inputs)")
    return data


def _compile(
    opts: dict[str, Any], data: Dataset | None, calibration: Dataset | None = None
) -> tuple[Plan, CKKSParams, Any]:
    """Load the model and compile it; ReLU/sigmoid are fitted on ``calibration`` (default:
    ``data``), up to :data:`CALIBRATION_SAMPLES` of its inputs."""
    shape = _shape(opts.get("input_shape"))
    if data is not None:
        if shape is not None and shape != data.input_shape:
            raise DataError(f"--input-shape {shape} but --data samples have {data.input_shape}")
        shape = data.input_shape
    loaded = load_model(
        opts["model"],
        trust_pickle=opts.get("trust_pickle", False),
        arch=opts.get("arch"),
        input_shape=shape,
        bounds=opts["bounds"],
        device="cpu",
    )
    if loaded.classifier is None or not isinstance(loaded.obj, torch.nn.Module):
        raise UnsupportedModelError(
            f"encrypted inference compiles a torch model; got a {loaded.kind} model"
        )
    shape = tuple(loaded.classifier.input_shape)
    calib = None
    source = calibration if calibration is not None else data
    if source is not None:
        if source.input_shape != tuple(shape):
            raise DataError(
                f"calibration samples have shape {source.input_shape}; the model takes {shape}"
            )
        g = torch.Generator().manual_seed(opts.get("seed", 0))
        idx = torch.randperm(len(source), generator=g)[:CALIBRATION_SAMPLES]
        calib = source.x[idx]
    plan = compile_model(
        loaded.obj,
        shape,
        calib,
        bounds=opts["bounds"],
        source={"model": loaded.file.to_dict(), "calibration": data.describe() if data else None},
    )
    params = choose_params(
        plan.depth, max(plan.max_abs), min_scale_bits=opts.get("min_scale_bits") or 26
    )
    return plan, params, loaded.obj


def run_compile(**opts: Any) -> dict[str, Any]:
    """``he compile``: model → ``PLAN_DIR/{weights.npz, params.json, plan.json}``."""
    data = _data(opts)
    plan, params, _ = _compile(opts, data)
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "params.json", params.to_dict())
    plan.save(out)
    summary = {"plan": plan.summary(), "params": params.to_dict(), "path": str(out)}
    return summary


def run_finetune(**opts: Any) -> dict[str, Any]:
    """``he finetune``: ReLU → trainable quadratic, fine-tuned; writes ``DIR/model.pt2``.

    The result reports the accuracy of the original model, of the plain swap and of the
    fine-tuned model on ``--data`` (else the training data), so the cost is measured.
    """
    from modelshield.core.loading import save_exported
    from modelshield.crypto.he.train import make_he_friendly

    started = time.time()
    train = load_dataset(
        opts["train_data"], bounds=opts["bounds"], label_column=opts.get("label_column")
    )
    test = _data(opts)
    if test is not None and test.input_shape != train.input_shape:
        raise DataError(
            f"--data samples have shape {test.input_shape}; --train-data {train.input_shape}"
        )
    loaded = load_model(
        opts["model"],
        trust_pickle=opts.get("trust_pickle", False),
        arch=opts.get("arch"),
        input_shape=train.input_shape,
        bounds=opts["bounds"],
        device="cpu",
    )
    if not isinstance(loaded.obj, torch.nn.Module) or isinstance(
        loaded.obj, torch.jit.ScriptModule
    ):
        raise UnsupportedModelError(
            f"he finetune edits a torch model's layers; a {loaded.kind} model cannot be edited "
            "(give a torch.export .pt2, or a state_dict + --arch)"
        )
    model, report = make_he_friendly(
        loaded.obj,
        train,
        test,
        epochs=opts["epochs"],
        lr=opts["lr"],
        batch_size=opts["batch_size"],
        seed=opts.get("seed", 0),
    )
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_exported(model, train.x[:2].float(), out / "model.pt2")
    result = {
        **report,
        "model": str(out / "model.pt2"),
        "source": loaded.file.to_dict(),
        "command": opts.get("command", "modelshield he finetune"),
        "seed": opts.get("seed", 0),
        "wall_time": time.time() - started,
    }
    atomic_write_json(out / "result.json", result)  # last: its presence means the run finished
    return result


def plan_and_params(path: str | Path) -> tuple[Plan, CKKSParams]:
    plan = load_plan(path)
    try:
        params = CKKSParams.from_dict(json.loads((Path(path) / "params.json").read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidConfigError(f"plan {path} has no readable params.json: {exc}") from exc
    return plan, params


def plan_id(path: str | Path) -> str:
    from modelshield.core.io import sha256_file

    return sha256_file(Path(path) / "weights.npz")[:16]


def run_keygen(**opts: Any) -> dict[str, Any]:
    """``he keygen``: the client's context for a plan (secret key kept in ``KEY_DIR``)."""
    _, params = plan_and_params(opts["plan"])
    galois = opts.get("mode", "both") in ("both", "latency")
    ctx = make_context(params, galois=galois)
    return write_keys(opts["out"], ctx, params, plan_id(opts["plan"]))


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean()) if len(y) else float("nan")


def _metrics(
    plan: Plan, enc_logits: np.ndarray, x: np.ndarray, y: np.ndarray, model: Any | None
) -> dict[str, Any]:
    ref = plan.forward(x)
    err = float(np.abs(enc_logits - ref).max())
    bound = DEFAULT_TOLERANCE * max(1.0, float(np.abs(ref).max()))
    enc_pred, plan_pred = predict_labels(plan, enc_logits), predict_labels(plan, ref)
    out: dict[str, Any] = {
        "n": len(y),
        "encrypted_accuracy": _accuracy(enc_pred, y),
        "plan_plaintext_accuracy": _accuracy(plan_pred, y),
        "argmax_agreement_with_plan": float((enc_pred == plan_pred).mean()),
        "max_abs_error": err,
        "tolerance": bound,
        "within_tolerance": err <= bound,
    }
    if model is not None:
        model_logits = model_forward_np(model, x, plan.input_shape)
        model_pred = (
            predict_labels(plan, model_logits)
            if model_logits.shape[1] > 1 or plan.output != "sigmoid"
            else (model_logits[:, 0] > 0.5).astype(np.int64)
        )
        out["plaintext_accuracy"] = _accuracy(model_pred, y)
        out["argmax_agreement_with_model"] = float((enc_pred == model_pred).mean())
        out["accuracy_cost_pp"] = 100 * (out["plaintext_accuracy"] - out["encrypted_accuracy"])
    return out


ACCURACY_COST_WARN_PP = 0.5
"""Warn when encrypted accuracy is more than this many points below the model's."""


def _fidelity_warnings(r: dict[str, Any]) -> list[str]:
    """Loud, specific warnings when the encrypted result does not stand for the model."""
    out = []
    agree = r.get("argmax_agreement_with_model")
    if agree is not None and agree < FIDELITY_WARN:
        out.append(
            f"encrypted predictions agree with the model's on only {agree:.1%} of the "
            f"{r['n']} samples (polynomial stand-ins for ReLU/sigmoid): fine-tune with "
            "'modelshield he finetune' and compile the fine-tuned model"
        )
    cost = r.get("accuracy_cost_pp")
    if cost is not None and cost > ACCURACY_COST_WARN_PP + 1e-9:  # 1 in 200 is 0.5 exactly
        out.append(
            f"encryption costs {cost:.2f} accuracy points (over {ACCURACY_COST_WARN_PP}): "
            "the encrypted model is not the model you trained"
        )
    if not r.get("within_tolerance", True):
        out.append(
            f"decrypted outputs differ from the plan's plaintext outputs by "
            f"{r['max_abs_error']:.2e}, over the tolerance {r['tolerance']:.2e}: raise "
            "--min-scale-bits"
        )
    return out


def _limit(data: Dataset, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(data) if limit is None else min(limit, len(data))
    return data.x[:n].double().numpy(), data.y[:n].numpy().astype(np.int64)


MIN_HELD_OUT_CALIBRATION = 64
"""Calibrate on the --data samples beyond --limit when at least this many are left."""


def _eval_calibration(opts: dict[str, Any], data: Dataset) -> tuple[Dataset, str]:
    """The inputs ReLU/sigmoid stand-ins are fitted on, kept apart from those evaluated
    where possible (fitting on the evaluated samples flatters the agreement)."""
    if opts.get("calibration_data"):
        cal = load_dataset(
            opts["calibration_data"], bounds=opts["bounds"], label_column=opts.get("label_column")
        )
        return cal, f"--calibration-data {opts['calibration_data']} ({len(cal)} samples)"
    n = len(data) if opts.get("limit") is None else min(int(opts["limit"]), len(data))
    if len(data) - n >= MIN_HELD_OUT_CALIBRATION:
        rest = data.subset(range(n, len(data)))
        return rest, f"the {len(rest)} --data samples after the first {n} (not evaluated)"
    return data, (
        "the evaluated samples themselves (no --calibration-data, and --limit leaves fewer "
        f"than {MIN_HELD_OUT_CALIBRATION} others): agreement figures are optimistic"
    )


def run_eval(**opts: Any) -> dict[str, Any]:
    """``he eval``: compile, encrypt, run and decrypt locally; encrypted vs plaintext."""
    started = time.time()
    data = _required_data(opts)
    calibration, calib_note = _eval_calibration(opts, data)
    plan, params, model = _compile(opts, data, calibration)
    x, y = _limit(data, opts.get("limit"))
    if opts.get("plan_out"):
        plan.save(opts["plan_out"])
    mode = opts.get("mode") or "auto"
    chosen = choose_mode(plan, params, len(y)) if mode == "auto" else mode
    ctx = make_context(params, galois=chosen == "latency" or opts.get("latency_samples", 0) > 0)
    public = load_public(public_bytes(ctx))
    logits, timing = run_local(ctx, public, plan, x, chosen)
    result: dict[str, Any] = {"mode": chosen, "mode_requested": mode}
    result.update(_metrics(plan, logits, x, y, model))
    result[chosen] = {
        **timing,
        "samples": len(y),
        "seconds_per_sample": timing["seconds"] / max(1, len(y)),
        "samples_per_second": len(y) / timing["seconds"],
    }
    k = int(opts.get("latency_samples") or 0)
    if chosen != "latency" and k > 0:
        # one warm-up request first: it encodes the plan's diagonals once per context
        _, first = run_local(ctx, public, plan, x[-1:], "latency")
        _, lat = run_local(ctx, public, plan, x[:k], "latency")
        result["latency"] = {
            **lat,
            "samples": k,
            "seconds_per_sample": lat["seconds"] / k,
            "first_request_seconds": first["seconds"],
        }
    result["latency_seconds_per_sample"] = (result.get("latency") or {}).get("seconds_per_sample")
    result["throughput_samples_per_second"] = (result.get("throughput") or {}).get(
        "samples_per_second"
    )
    result["calibration"] = calib_note
    result["warnings"] = _fidelity_warnings(result)
    for w in result["warnings"]:
        logger.warning(w)
    result.update(
        params=params.to_dict(),
        plan=plan.summary(),
        notes=plan.notes,
        command=opts.get("command", "modelshield he eval"),
        seed=opts.get("seed", 0),
        wall_time=time.time() - started,
    )
    report = _eval_report(result, opts, data, started)  # validated before anything is written
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    from modelshield.report import write_reports

    written = write_reports(report, out)
    result["paths"] = {
        "result": str(out / "result.json"),
        **{k: str(v) for k, v in written.items()},
    }
    atomic_write_json(out / "result.json", result)  # last: its presence means the run finished
    return result


def _eval_report(
    r: dict[str, Any], opts: dict[str, Any], data: Dataset, started: float
) -> dict[str, Any]:
    """The report (JSON + HTML) of an ``he eval`` run: one informational probe."""
    from modelshield.core.results import ProbeResult
    from modelshield.report import build_report
    from modelshield.scan.rubric import rubric_document
    from modelshield.scan.rundir import run_record

    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    rows = [
        ["plaintext accuracy (model)", fmt(r.get("plaintext_accuracy"), ".4f")],
        ["encrypted accuracy", fmt(r["encrypted_accuracy"], ".4f")],
        ["argmax agreement with the plan", fmt(r["argmax_agreement_with_plan"], ".4f")],
        [
            "max |decrypted − plaintext|",
            f"{r['max_abs_error']:.2e} (tolerance {r['tolerance']:.2e})",
        ],
        ["latency (s/sample)", fmt(r.get("latency_seconds_per_sample"), ".3f")],
        ["throughput (samples/s)", fmt(r.get("throughput_samples_per_second"), ".1f")],
        ["CKKS", r["params"]["security"]],
        ["ReLU/sigmoid fitted on", r.get("calibration", "—")],
    ]
    rows += [["WARNING", w] for w in r.get("warnings", [])]
    probe = ProbeResult(
        probe="he-eval",
        title="Encrypted inference (CKKS)",
        risk="privacy",
        status="ok",
        seed=int(opts.get("seed", 0)),
        wall_time=time.time() - started,
        config={"mode": r["mode"], "n": r["n"], "params": r["params"]},
        figure={"name": "encrypted accuracy", "value": r["encrypted_accuracy"]},
        grade=None,
        meaning=(
            f"The server computed on CKKS ciphertexts only ({r['mode']} packing); decrypted "
            f"outputs agree with plaintext on {r['argmax_agreement_with_plan']:.2%} of "
            f"{r['n']} samples. " + " ".join(r["notes"])
        ),
        recommendation=(" ".join(r["warnings"]) + " " if r.get("warnings") else "")
        + "Keep KEY_DIR/secret.ctx on the client; if a ReLU was replaced, fine-tune with "
        "'modelshield he finetune' when the accuracy cost matters.",
        threat={
            "attacker": "an honest-but-curious server",
            "attack": "reading the client's inputs",
            "access": "public context and ciphertexts",
            "rule": "informational: the cost of encryption",
        },
        details={k: v for k, v in r.items() if k not in ("plan", "params")},
        plots=[
            {
                "kind": "table",
                "title": "Encrypted vs plaintext",
                "columns": ["", "value"],
                "rows": rows,
            }
        ],
    )
    return build_report(
        probes=[probe],
        run=run_record(r["command"], int(opts.get("seed", 0)), "cpu", started),
        target={
            "model": r["plan"]["source"].get("model") or {"path": opts["model"]},
            "data": data.describe(),
        },
        rubric=rubric_document(),
    )


# --------------------------------------------------------------------------------------
# Client over HTTP
# --------------------------------------------------------------------------------------


def _http(
    method: str, url: str, body: bytes | None = None, timeout: float = 600
) -> tuple[bytes, dict[str, str]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        raise OracleError(f"server {url} answered {exc.code}: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise OracleError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def run_infer(**opts: Any) -> dict[str, Any]:
    """``he infer``: encrypt ``--data`` with the client's keys, send, decrypt, score."""
    started = time.time()
    server = opts["server"].rstrip("/")
    ctx, pub, meta = read_keys(opts["keys"])
    info = json.loads(_http("GET", f"{server}/v1/plan")[0])
    from modelshield.crypto.layers import Affine

    plan_meta = info["plan"]
    if list(meta["params"]["coeff_mod_bit_sizes"]) != list(info["params"]["coeff_mod_bit_sizes"]):
        raise InvalidConfigError("--keys were made for another plan's parameters: run 'he keygen'")
    data = _required_data(opts)
    if list(data.input_shape) != plan_meta["input_shape"] and [int(np.prod(data.input_shape))] != [
        int(np.prod(plan_meta["input_shape"]))
    ]:
        raise DataError(
            f"--data samples have shape {data.input_shape}; the served plan takes "
            f"{tuple(plan_meta['input_shape'])}"
        )
    # a shape-only stand-in plan for encryption (the client never needs the weights)
    n_out = plan_meta["num_outputs"]
    stub = Plan(
        input_shape=tuple(plan_meta["input_shape"]),
        layers=[Affine(np.zeros((n_out, 1)), np.zeros(n_out))],
        output=plan_meta["output"],
    )
    x, y = _limit(data, opts.get("limit"))
    params = CKKSParams.from_dict(meta["params"])
    mode = opts.get("mode") or "auto"
    if mode == "auto":  # the cost model on the served layer shapes (weights unknown here)
        shapes = Plan(
            input_shape=stub.input_shape,
            layers=[
                Affine(np.ones((la["out"], la["in"])), np.zeros(la["out"]))
                if la["type"] == "affine"
                else "square"
                for la in plan_meta["layers"]
            ],
        )
        chosen = choose_mode(shapes, params, len(y))
        if chosen == "latency" and not meta.get("galois_keys"):
            chosen = "throughput"
    else:
        chosen = mode
    if chosen == "latency" and not meta.get("galois_keys"):
        raise InvalidConfigError(
            "--mode latency needs keys made with 'he keygen --mode both|latency'"
        )
    cid = json.loads(_http("POST", f"{server}/v1/contexts", pub)[0])["context_id"]
    step = 1 if chosen == "latency" else params.slots
    outs, server_s, t0 = [], 0.0, time.perf_counter()
    sent = received = 0
    for i in range(0, len(y), step):
        chunk = x[i : i + step]
        body = pack_blobs(encrypt(ctx, stub, chunk, chosen))
        reply, headers = _http("POST", f"{server}/v1/infer/{cid}?mode={chosen}", body)
        sent, received = sent + len(body), received + len(reply)
        server_s += float(headers.get("X-HE-Server-Seconds", headers.get("x-he-server-seconds", 0)))
        outs.append(decrypt(ctx, unpack_blobs(reply), len(chunk), chosen, n_out))
    total = time.perf_counter() - t0
    logits = np.concatenate(outs)
    pred = predict_labels(stub, logits)
    result: dict[str, Any] = {
        "mode": chosen,
        "mode_requested": mode,
        "n": len(y),
        "accuracy": _accuracy(pred, y),
        "encrypted_accuracy": _accuracy(pred, y),
        "latency_seconds_per_sample": total / len(y) if chosen == "latency" else total,
        "latency_note": "per sample (one request each)"
        if chosen == "latency"
        else "per request: the whole batch shares one round trip",
        "throughput_samples_per_second": len(y) / total,
        "seconds": total,
        "server_seconds": server_s,
        "bytes_sent": sent,
        "bytes_received": received,
        "server": server,
        "context_id": cid,
        "params": meta["params"],
        "notes": plan_meta.get("notes", []),
        "command": opts.get("command", "modelshield he infer"),
        "wall_time": time.time() - started,
    }
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", result)
    return result


def check_mode(mode: str) -> None:
    if mode not in (*MODES, "auto"):
        raise InvalidConfigError(f"--mode must be auto, latency or throughput, got {mode!r}")
