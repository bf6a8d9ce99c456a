"""``modelshield watermark embed`` and ``watermark verify``: files, reports, results.

Embedding (Adi et al., USENIX Security 2018) trains the trigger set into a model (the
user's, by fine-tuning, or a built-in architecture from scratch) and writes the marked
model (``model.pt2``, ``model.pt``), ``result.json``, a report, and the new secret key.
Everything is computed, and the report validated and rendered, before the first file is
written; the key goes to a private temporary file beside its destination and is moved
into place after the model and report, just before ``result.json`` (whose presence means
the run finished). Verification queries a model file or an HTTP endpoint on the key's
triggers and writes ``result.json`` (``p_value``, ``verified``) and a report.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from modelshield.core.classifier import from_torch
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import (
    LoadedModel,
    build_arch,
    check_fits,
    load_given_model,
    load_model,
)
from modelshield.core.results import ProbeResult
from modelshield.core.threat import QueryAccess
from modelshield.report import build_report, write_reports
from modelshield.scan.audit import _prepare
from modelshield.scan.dp import _load_train, _serialize, _write_blobs
from modelshield.scan.probe.watermark import verify_probe_result
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import run_record
from modelshield.watermark.embed import EmbedOutcome, embed_and_evaluate
from modelshield.watermark.key import WatermarkKey, check_key_destination, staged_key_file
from modelshield.watermark.verify import verify

logger = logging.getLogger(__name__)

DEFAULT_SIGNIFICANCE = 1e-6


def _check_significance(value: float) -> float:
    if not 0.0 < value < 1.0:
        raise InvalidConfigError(f"--significance must be in (0, 1), got {value}")
    return float(value)


def _report(
    probe: ProbeResult, target: dict[str, Any], opts: dict[str, Any], started: float, device: Any
) -> dict[str, Any]:
    """The report document, validated and test-rendered: nothing is written yet."""
    from modelshield.report.html import render_html
    from modelshield.report.markdown import render_markdown

    report = build_report(
        probes=[probe],
        run=run_record(opts["command"], opts["seed"], device, started),
        target=target,
        rubric=rubric_document(),
    )
    render_html(report)
    render_markdown(report)
    return report


# -- embed ------------------------------------------------------------------------------------
def embed_probe_result(
    outcome: EmbedOutcome, key: WatermarkKey, *, from_scratch: bool, seed: int
) -> ProbeResult:
    """The report section of an embedding: the mark's strength and its cost in accuracy."""
    v = outcome.verdict
    before, after = outcome.clean_accuracy_before, outcome.clean_accuracy_after
    how = "trained from scratch" if from_scratch else "fine-tuned"
    if after is None:
        acc = " No test data (--data) was given, so clean accuracy was not measured."
    elif before is None:
        acc = f" Clean test accuracy of the marked model: {after:.2%}."
    else:
        acc = (
            f" Clean test accuracy {before:.2%} before, {after:.2%} after ({after - before:+.2%})."
        )
    p_text = "below 1e-300" if v.p_value <= 0 else f"{v.p_value:.3g}"
    meaning = (
        f"The model was {how} with {key.n} secret {key.kind} trigger inputs mixed into every batch "
        f"(Adi et al. 2018). It now gives the key's random label on {v.matches} of {v.n_triggers} "
        f"(chance {v.chance:.3g}): p = {p_text}, "
        f"{'verified' if v.verified else 'NOT verified'} at {v.significance:g}.{acc}"
    )
    advice = (
        "Store the key file like a private key (mode 0600, off the serving machines). Check a suspect "
        "model or API with `modelshield watermark verify`; measure removal robustness with "
        "benchmarks/watermark.py."
        if v.verified
        else "The mark did not take: train longer (--epochs), with a larger --lr, or with fewer triggers."
    )
    rows: list[list[Any]] = [
        ["trigger accuracy", round(v.trigger_accuracy, 4)],
        ["p-value", p_text],
        ["clean accuracy before", None if before is None else round(before, 4)],
        ["clean accuracy after", None if after is None else round(after, 4)],
    ]
    plots: list[dict[str, Any]] = [
        {"kind": "table", "title": "Embedding", "columns": ["", "value"], "rows": rows}
    ]
    if outcome.history:
        plots.append(
            {
                "kind": "line",
                "title": "Trigger accuracy per epoch",
                "x_label": "epoch",
                "y_label": "trigger accuracy",
                "x_scale": "linear",
                "y_scale": "linear",
                "series": [
                    {
                        "name": "trigger accuracy",
                        "x": [r["epoch"] for r in outcome.history],
                        "y": [r["trigger_accuracy"] for r in outcome.history],
                    }
                ],
            }
        )
    return ProbeResult(
        probe="watermark-embed",
        title="Watermark embedding (trigger set, Adi et al. 2018)",
        risk="watermark",
        seed=seed,
        wall_time=outcome.wall_time,
        config=outcome.config,
        figure={"name": "trigger accuracy of the marked model", "value": v.trigger_accuracy},
        grade=None,
        meaning=meaning,
        recommendation=advice,
        threat={"check": "ownership (trigger-set watermark), informational: not graded"},
        details={**outcome.summary(), "key": key.public_dict()},
        plots=plots,
        flags=[] if v.verified else ["watermark-not-embedded"],
    )


def _start_module(
    opts: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, device: Any
) -> tuple[Any, LoadedModel | None]:
    """The module to mark: the user's model (fine-tuning) or ``--arch`` from scratch."""
    if opts.get("model"):
        loaded = load_given_model(opts, input_shape, device)
        if loaded.classifier is None or not hasattr(loaded.classifier.module, "parameters"):
            raise UnsupportedModelError(
                f"cannot train a {loaded.kind} model; give a torch model (torch.export, TorchScript, "
                "state_dict + --arch) or --arch NAME to train from scratch"
            )
        return loaded.classifier.module, loaded
    if not opts.get("arch"):
        raise InvalidConfigError(
            "give --model PATH (fine-tune it with the watermark) or --arch NAME (train from scratch)"
        )
    module = build_arch(opts["arch"], input_shape=input_shape, num_classes=num_classes)
    return module.to(device), None


def normalised(
    module: Any, opts: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, device: Any
) -> Any:
    """``module`` behind ``--mean/--std`` (when given) for training on raw inputs.

    The trigger set and the data are in input space; a model that expects normalised
    inputs must see them normalised, as every classifier of this project does. The
    wrapper shares ``module``'s parameters: save ``module`` itself afterwards.
    """
    if opts.get("mean") is None and opts.get("std") is None:
        return module
    clf = from_torch(
        module,
        input_shape=input_shape,
        num_classes=num_classes,
        bounds=opts["bounds"],
        mean=opts.get("mean"),
        std=opts.get("std"),
        device=device,
    )
    return clf.trainable()


def run_watermark_embed(**opts: Any) -> dict[str, Any]:
    """Embed a new secret watermark; write the marked model, report, result.json and key."""
    significance = _check_significance(opts.get("significance", DEFAULT_SIGNIFICANCE))
    key_path = check_key_destination(opts["key"], overwrite=opts.get("force", False))
    started, device = _prepare(opts)
    train, test = _load_train(opts)
    module, loaded = _start_module(opts, train.input_shape, train.num_classes, device)
    num_classes = train.num_classes
    if loaded is not None:
        assert loaded.classifier is not None
        check_fits(loaded, train.y, "--train-data")
        if test is not None:
            check_fits(loaded, test.y, "--data")
        num_classes = loaded.classifier.num_classes
    from_scratch = loaded is None
    key = WatermarkKey.generate(
        input_shape=train.input_shape,
        num_classes=num_classes,
        n=opts["triggers"],
        bounds=opts["bounds"],
        kind=opts.get("trigger_kind"),
    )
    outcome = embed_and_evaluate(
        normalised(module, opts, train.input_shape, num_classes, device),
        train.x.to(device),
        train.y.to(device),
        key,
        test_x=test.x if test is not None else None,
        test_y=test.y if test is not None else None,
        significance=significance,
        epochs=opts["epochs"],
        lr=opts["lr"],
        batch_size=opts["batch_size"],
        from_scratch=from_scratch,
        seed=opts["seed"],
    )
    out = Path(opts["out"])
    blobs = _serialize(module, train.x)  # trained in place (through the normalising wrapper)
    main_file = "model.pt2" if "model.pt2" in blobs else "model.pt"
    sha = hashlib.sha256(blobs[main_file]).hexdigest()
    key = key.with_model(sha)
    probe = embed_probe_result(outcome, key, from_scratch=from_scratch, seed=opts["seed"])
    target = {
        "model": {
            "path": str(out / main_file),
            "sha256": sha,
            "format": "torch-export" if main_file == "model.pt2" else "torch-zip",
            "name": opts.get("arch") or (Path(opts["model"]).name if opts.get("model") else None),
        },
        "data": test.describe()
        if test is not None
        else {"path": None, "sha256": None, "format": None},
        "train_data": train.describe(),
    }
    report = _report(probe, target, opts, started, device)
    summary: dict[str, Any] = {
        **outcome.summary(),
        "key_id": key.key_id,
        "trigger_kind": key.kind,
        "num_classes": key.num_classes,
        "input_shape": list(key.input_shape),
        "from_scratch": from_scratch,
        "source_model": loaded.file.to_dict() if loaded is not None else None,
        "model_sha256": sha,
    }
    with staged_key_file(key, key_path, overwrite=opts.get("force", False)) as commit:
        paths = _write_blobs(out, blobs)
        written = write_reports(report, out)
        paths.update({"html": str(written["html"]), "json": str(written["json"])})
        paths["key"] = str(commit())
    result_path = out / "result.json"
    summary["paths"] = {**paths, "result": str(result_path)}
    atomic_write_json(result_path, summary)  # last: its presence means the run finished
    return summary


# -- verify -----------------------------------------------------------------------------------
def run_watermark_verify(**opts: Any) -> dict[str, Any]:
    """Verify the key's watermark on a model file or an HTTP endpoint; write result.json
    (``p_value``, ``verified``) and a report."""
    significance = _check_significance(opts.get("significance", DEFAULT_SIGNIFICANCE))
    if bool(opts.get("model")) == bool(opts.get("oracle")):
        raise InvalidConfigError("give --model PATH or --oracle URL (exactly one)")
    started, device = _prepare(opts)
    key = WatermarkKey.load(opts["key"])
    target_obj: Any
    model_sha = None
    if opts.get("model"):
        try:
            loaded = load_model(
                opts["model"],
                trust_pickle=opts["trust_pickle"],
                arch=opts.get("arch"),
                input_shape=key.input_shape,
                num_classes=key.num_classes if opts.get("arch") else None,
                bounds=key.bounds,
                mean=opts.get("mean"),
                std=opts.get("std"),
                device=device,
            )
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(
                f"the key is for inputs of shape {key.input_shape}, which the model does not "
                f"accept (is this the key for this model?): {exc}"
            ) from exc
        target_obj = loaded.classifier if loaded.classifier is not None else loaded.oracle
        model_sha = loaded.file.sha256
        model_target = loaded.file.to_dict()
    else:
        from modelshield.core.oracles.http import HttpOracle

        oracle = HttpOracle(
            opts["oracle"],
            QueryAccess(output="label"),  # labels are all verification needs
            raw_output=opts["oracle_output"],
            input_field=opts.get("input_field") or "inputs",
            output_field=opts.get("output_field") or "outputs",
            input_shape=key.input_shape,
        )
        target_obj = oracle
        model_target = {"path": oracle.display_url, "sha256": None, "format": "http-endpoint"}
    verdict = verify(target_obj, key, significance=significance)
    probe = verify_probe_result(
        verdict, key.public_dict(), model_sha256=model_sha, seed=opts["seed"]
    )
    target = {
        "model": model_target,
        "data": {"path": None, "sha256": None, "format": "watermark-triggers", "n": key.n},
        "train_data": None,
    }
    report = _report(probe, target, opts, started, device)
    out = Path(opts["out"])
    summary = verdict.to_dict()
    summary.update(
        key_id=key.key_id,
        model_sha256=model_sha,
        same_file_as_embedded=probe.details.get("same_file_as_embedded"),
        matches_needed=verdict.details.get("matches_needed"),
    )
    written = write_reports(report, out)
    result_path = out / "result.json"
    summary["paths"] = {
        "result": str(result_path),
        "html": str(written["html"]),
        "json": str(written["json"]),
    }
    atomic_write_json(result_path, summary)
    return summary
