"""``modelshield steal``: extract a copy of a model through its query interface.

Opens the victim as a black box (a model file through :func:`load_model`, or an HTTP
endpoint through :class:`HttpOracle`), gives the attack exactly ``--queries`` queries (the
oracle enforces the budget), evaluates the copy on ``--data`` (or on a held-out part of
the pool, or, for equation solving, on uniform random inputs), and writes ``model.pt2``
(the copy, ``torch.export`` with a dynamic batch), ``result.json``
(:class:`ExtractionResult`) and a one-probe report. Evaluation answers are read from the
victim without charging the attack's budget (see :mod:`modelshield.extraction.base`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_open, atomic_write_json
from modelshield.core.loading import load_model
from modelshield.core.oracle import Oracle, from_classifier
from modelshield.core.results import ExtractionResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import QueryAccess
from modelshield.extraction import (
    equation_solving,
    jacobian_augmentation,
    knockoff,
    transferability,
    victim_top1,
)
from modelshield.extraction.base import Victim
from modelshield.report import build_report, write_reports
from modelshield.scan.audit import _prepare
from modelshield.scan.probe.extraction import extraction_probe_result
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import run_record

logger = logging.getLogger(__name__)

METHODS = ("equation", "knockoff", "jacobian")
POOL_EVAL_FRACTION = 0.2
"""Share of --pool held out for evaluation when no --data is given (never queried by the attack)."""
EQUATION_EVAL = 2000
"""Uniform random inputs equation solving is evaluated on without --data."""
TRANSFER_MAX = 500
"""Inputs the transfer attack is run on (the first of the evaluation set)."""
_DERIVABLE = {
    "logits": ("logits", "probs", "label"),
    "probs": ("probs", "label"),
    "label": ("label",),
}


def _is_url(target: str) -> bool:
    return target.lower().startswith(("http://", "https://"))


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise InvalidConfigError(f"--input-shape must look like 1,8,8, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise InvalidConfigError(f"--input-shape must be positive sizes, got {text!r}")
    return dims


def _load_pool(
    path: str, bounds: tuple[float, float]
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """The attacker's pool: any data set ``load_dataset`` reads, or a ``.npz`` holding only
    ``x`` (unlabelled). Returns inputs, labels (or ``None``) and a description."""
    p = Path(path)
    if p.suffix.lower() == ".npz" and p.is_file():
        try:
            with np.load(p, allow_pickle=False) as archive:
                keys = set(archive.files)
                x_arr = archive["x"] if "x" in keys and "y" not in keys else None
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: cannot read the .npz ({exc})") from None
        if x_arr is not None:
            x = torch.from_numpy(np.asarray(x_arr, dtype=np.float32))
            if x.ndim < 2 or len(x) == 0:
                raise DataError(f"{p}: x must be a non-empty batch (N, ...), got {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"{p}: x contains NaN or infinite values")
            lo, hi = bounds
            if float(x.max()) > hi and float(x.max()) <= 255 and bool((x == x.round()).all()):
                x = x / 255.0  # whole numbers in [0, 255]: pixels, as load_dataset's "auto"
            if float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6:
                raise DataError(
                    f"{p}: values span [{float(x.min()):g}, {float(x.max()):g}], outside "
                    f"--bounds [{lo:g}, {hi:g}]"
                )
            desc = {"path": str(p), "sha256": None, "format": "npz (unlabelled)", "n": len(x)}
            return x, None, desc
    ds = load_dataset(path, bounds=bounds)
    return ds.x, ds.y, ds.describe()


def _access(output: str, raw: str) -> QueryAccess:
    if output not in _DERIVABLE[raw]:
        raise UnsupportedModelError(
            f"the model gives {raw}; it cannot answer --oracle-output {output} "
            f"(allowed: {', '.join(_DERIVABLE[raw])})"
        )
    return QueryAccess(output=output)  # type: ignore[arg-type]


def _open_oracle(
    opts: dict[str, Any], input_shape: tuple[int, ...] | None, num_classes: int | None, device: Any
) -> tuple[Oracle, Victim, dict[str, Any]]:
    """The attacked oracle, the evaluation victim, and the report's description of it."""
    target, output = opts["oracle"], opts["oracle_output"]
    if _is_url(target):
        from modelshield.core.oracles.http import HttpOracle

        oracle: Oracle = HttpOracle(
            target,
            QueryAccess(output=output),
            input_field=opts.get("input_field") or "inputs",
            output_field=opts.get("output_field") or "outputs",
            raw_output=output,
            input_shape=input_shape,
            num_classes=num_classes,
        )
        desc = {
            "path": getattr(oracle, "display_url", target),
            "sha256": None,
            "format": "http-endpoint",
        }
        return oracle, oracle, desc
    loaded = load_model(
        target,
        trust_pickle=opts["trust_pickle"],
        arch=opts.get("oracle_arch"),
        input_shape=input_shape,
        num_classes=num_classes,
        bounds=opts["bounds"],
        device=device,
    )
    desc = loaded.file.to_dict()
    if loaded.classifier is not None:
        oracle = from_classifier(loaded.classifier, _access(output, "logits"))
        return oracle, loaded.classifier, desc
    if loaded.oracle is None:  # pragma: no cover - load_model returns one or the other
        raise UnsupportedModelError(f"cannot query the model ({loaded.kind})")
    oracle = loaded.oracle
    oracle.access = _access(output, oracle.raw_output)
    return oracle, oracle, desc


def _export(copy: nn.Module, example: Tensor) -> dict[str, bytes]:
    """``model.pt2`` (``torch.export``, any batch size) as bytes; ``model.pt`` (weights)
    when the copy cannot be exported."""
    copy = copy.cpu().eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        sample = example[:2].cpu()
        if len(sample) < 2:
            sample = torch.cat([sample, sample])
        program = torch.export.export(copy, (sample,), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return {"model.pt2": buf.getvalue()}
    except Exception as exc:  # a user architecture torch.export cannot trace
        logger.warning(
            "could not export model.pt2 (%s); writing model.pt", str(exc).splitlines()[0]
        )
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in copy.state_dict().items()}, buf)
        return {"model.pt": buf.getvalue()}


def _check_labels(y: Tensor | None, num_classes: int | None, flag: str) -> None:
    if y is not None and num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise DataError(
            f"{flag} has labels up to {int(y.max())} but the model predicts {num_classes} classes"
        )


def run_steal(**opts: Any) -> dict[str, Any]:
    """Steal a copy of ``--oracle`` with ``--method``; write model.pt2, result.json, reports."""
    started, device = _prepare(opts)
    method, bounds, queries = opts["method"], opts["bounds"], opts.get("queries")
    if method not in METHODS:
        raise InvalidConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "equation" and queries is None:
        raise InvalidConfigError(f"--method {method} needs --queries (the query budget)")
    if method != "equation" and not opts.get("pool"):
        raise InvalidConfigError(
            f"--method {method} needs --pool (the inputs the attacker queries the model with)"
        )
    if opts.get("strategy", "random") != "random" and method != "knockoff":
        raise InvalidConfigError("--strategy applies to --method knockoff only")
    pool_x, pool_y, pool_desc = (
        _load_pool(opts["pool"], bounds) if opts.get("pool") else (None, None, None)
    )
    data: Dataset | None = load_dataset(opts["data"], bounds=bounds) if opts.get("data") else None
    shape = _parse_shape(opts.get("input_shape"))
    for name, x in (("--pool", pool_x), ("--data", None if data is None else data.x)):
        if x is None:
            continue
        if shape is None:
            shape = tuple(int(s) for s in x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise DataError(f"{name} samples have shape {tuple(x.shape[1:])}, expected {shape}")
    if method == "equation" and shape is None and _is_url(opts["oracle"]):
        raise InvalidConfigError("equation solving over HTTP needs --input-shape (or --data)")
    num_classes = opts.get("num_classes")
    oracle, victim, model_desc = _open_oracle(opts, shape, num_classes, device)
    if shape is None and oracle.input_shape is not None:
        shape = tuple(oracle.input_shape)
    if shape is None:
        raise InvalidConfigError("the model does not say its input shape; pass --input-shape")
    k = num_classes or oracle.num_classes or (data.num_classes if data is not None else None)
    _check_labels(None if data is None else data.y, oracle.num_classes, "--data")

    # -- evaluation inputs: --data, else part of the pool, else uniform (equation) -----------
    gen = make_generator(opts["seed"])
    x_eval: Tensor
    y_eval: Tensor | None = None
    if data is not None:
        x_eval, y_eval, eval_source = data.x, data.y, "--data"
    elif method == "equation" or pool_x is None:
        low, high = bounds
        x_eval = low + (high - low) * torch.rand((EQUATION_EVAL, *shape), generator=gen)
        eval_source = f"{EQUATION_EVAL} uniform random inputs in --bounds"
    else:
        perm = torch.randperm(len(pool_x), generator=gen)
        n_eval = max(1, round(POOL_EVAL_FRACTION * len(pool_x)))
        if len(pool_x) - n_eval < 1:
            raise DataError(f"--pool has {len(pool_x)} inputs: too few to hold some out")
        held, kept = perm[:n_eval].sort().values, perm[n_eval:].sort().values
        x_eval = pool_x[held]
        pool_x = pool_x[kept]
        pool_y = None if pool_y is None else pool_y[kept]
        eval_source = f"{n_eval} inputs of --pool held out (never queried by the attack)"

    # -- budget: the oracle itself refuses to go past it ------------------------------------
    d_plus_1 = math.prod(shape) + 1
    budget = queries if queries is not None else d_plus_1
    if method == "equation" and budget < d_plus_1:
        raise InvalidConfigError(
            f"equation solving needs d + 1 = {d_plus_1} queries for {math.prod(shape)} "
            f"features; --queries {budget} is too few"
        )
    oracle.access = replace(oracle.access, max_queries=budget)
    common: dict[str, Any] = {
        "seed": opts["seed"],
        "x_eval": x_eval,
        "y_eval": y_eval,
        "victim": victim,
    }
    copy: nn.Module
    res: ExtractionResult
    if method == "equation":
        # the scores' width is the truth here; --data's labels may not cover every class
        width = num_classes or oracle.num_classes
        copy, res = equation_solving(oracle, num_classes=width, bounds=bounds, **common)
    else:
        if pool_x is None:  # pragma: no cover - checked above
            raise InvalidConfigError(f"--method {method} needs --pool")
        train_kw: dict[str, Any] = {
            "num_classes": k,
            "arch": opts.get("arch"),
            "epochs": opts["epochs"],
            "batch_size": opts["batch_size"],
            "lr": opts["lr"],
            "device": device,
        }
        if method == "knockoff":
            adaptive = opts.get("strategy") == "adaptive"
            copy, res = knockoff(
                oracle,
                pool_x,
                queries=budget,
                strategy=opts.get("strategy") or "random",
                pool_labels=pool_y if adaptive else None,
                **train_kw,
                **common,
            )
        else:
            size = opts.get("seed_size") or min(100, max(1, budget // 4), len(pool_x))
            if size > len(pool_x):
                raise InvalidConfigError(
                    f"--seed-size {size} exceeds the pool ({len(pool_x)} inputs)"
                )
            pick = torch.randperm(len(pool_x), generator=gen)[:size].sort().values
            copy, res = jacobian_augmentation(
                oracle,
                pool_x[pick],
                queries=budget,
                lam=opts.get("lam") or 0.1,
                rounds=opts.get("rounds"),
                bounds=bounds,
                **train_kw,
                **common,
            )
    res.details["eval_source"] = eval_source

    if opts.get("transfer_eps") is not None:
        xt = x_eval[:TRANSFER_MAX]
        yt = y_eval[:TRANSFER_MAX] if y_eval is not None else victim_top1(victim, xt)
        res.transfer = transferability(
            copy,
            victim,
            xt,
            yt,
            eps=opts["transfer_eps"],
            norm=opts.get("transfer_norm") or "linf",
            bounds=bounds,
            seed=opts["seed"],
        )
        res.transfer["labels"] = "--data labels" if y_eval is not None else "victim labels"

    blobs = _export(copy, x_eval)
    main_file = next(iter(blobs))
    out = Path(opts["out"])
    probe = extraction_probe_result(res, seed=opts["seed"], note=f"Evaluated on {eval_source}.")
    target = {
        "model": model_desc,
        "data": data.describe()
        if data is not None
        else {"path": None, "sha256": None, "format": None},
        "train_data": pool_desc,
    }
    report = build_report(
        probes=[probe],
        run=run_record(opts.get("command", "modelshield steal"), opts["seed"], device, started),
        target=target,
        rubric=rubric_document(),
    )  # validated before any file is written
    with atomic_open(out / main_file, "wb") as fh:
        fh.write(blobs[main_file])
    paths = {"model": str(out / main_file)}
    written = write_reports(report, out)
    paths.update(html=str(written["html"]), json=str(written["json"]))
    summary = res.to_dict()
    summary["copy"] = {
        "path": str(out / main_file),
        "sha256": hashlib.sha256(blobs[main_file]).hexdigest(),
        "format": "torch-export" if main_file == "model.pt2" else "torch-zip",
    }
    result_path = out / "result.json"
    summary["paths"] = {**paths, "result": str(result_path)}
    atomic_write_json(result_path, summary)  # written last: its presence means the run finished
    return summary
