"""``modelshield poison`` and ``modelshield audit data``: poison a data set; audit one.

``poison`` writes the poisoned ``.npz`` and, beside it, ``<name>.poison.json``: the
:class:`PoisonResult` record of the changed indices, their original labels and the
trigger, written last (its presence means the poisoned file is complete).

``audit data`` reads a model's penultimate activations of its training data (a model
given with ``--model``, else one trained here), runs the detectors, and writes
``result.json`` (``flagged``, and ``precision``/``recall`` given ``--truth``),
``clean.npz`` (the data without the flagged samples) and the reports.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from modelshield.core.data import Dataset, load_dataset
from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_write_json, sha256_file
from modelshield.core.loading import check_fits
from modelshield.core.results import PoisonResult, ProbeResult
from modelshield.poisoning.attacks import POISON_ATTACKS, poison, train_model
from modelshield.poisoning.audit import audit_training_data
from modelshield.poisoning.detectors import POISON_DETECTORS
from modelshield.poisoning.triggers import Trigger
from modelshield.report import build_report, write_reports
from modelshield.scan.audit import _load, _prepare
from modelshield.scan.probe.poisoning import detection_probe_result
from modelshield.scan.rubric import rubric_document
from modelshield.scan.rundir import run_record

logger = logging.getLogger(__name__)

TRIGGER_METHODS = ("badnets", "blended", "clean-label")


def record_path(out: Path) -> Path:
    """``data.npz`` → ``data.poison.json`` (beside it)."""
    return out.with_name(out.name[: -len(".npz")] + ".poison.json")


def _trigger(opts: dict[str, Any]) -> Trigger | None:
    method = opts["method"]
    if method not in TRIGGER_METHODS:
        for flag in ("trigger_size", "alpha", "corners"):
            if opts.get(flag) is not None:
                raise InvalidConfigError(
                    f"--{flag.replace('_', '-')} applies to {', '.join(TRIGGER_METHODS)}"
                )
        return None
    if method == "blended":
        if opts.get("trigger_size") is not None or opts.get("corners") is not None:
            raise InvalidConfigError("--trigger-size and --corners apply to patch triggers")
        return Trigger(
            kind="blend",
            alpha=opts["alpha"] if opts.get("alpha") is not None else 0.2,
            seed=opts["seed"],
        )
    if opts.get("alpha") is not None:
        raise InvalidConfigError("--alpha applies to --method blended")
    corners = opts.get("corners") or (4 if method == "clean-label" else 1)
    return Trigger(kind="patch", size=opts.get("trigger_size"), corners=corners)


def run_poison(**opts: Any) -> dict[str, Any]:
    """Poison ``--data``; write ``--out`` (.npz) and its ``.poison.json`` record."""
    _, device = _prepare(opts)
    method = opts["method"]
    POISON_ATTACKS.get(method)
    out = Path(opts["out"])
    if not out.name.lower().endswith(".npz") or out.name.lower() == ".npz":
        raise InvalidConfigError(f"--out must be a .npz file name, got {opts['out']!r}")
    if out.exists() and out.is_dir():
        raise InvalidConfigError(f"--out {out} is a directory")
    if method != "label-flip" and opts.get("target_class") is None:
        raise InvalidConfigError(f"--method {method} needs --target-class")
    if method not in ("label-flip", "badnets", "blended") and opts.get("source_class") is not None:
        raise InvalidConfigError("--source-class applies to label-flip, badnets and blended")
    clean_only = ("eps", "steps", "surrogate", "robust_surrogate")
    if method != "clean-label":
        for flag in clean_only:
            if opts.get(flag) is not None:
                raise InvalidConfigError(f"--{flag} applies to --method clean-label")
    trigger = _trigger(opts)
    data = load_dataset(opts["data"], bounds=opts["bounds"], label_column=opts.get("label_column"))
    kw: dict[str, Any] = {
        "rate": opts["rate"],
        "target_class": opts.get("target_class"),
        "seed": opts["seed"],
        "bounds": opts["bounds"],
    }
    if opts.get("source_class") is not None:
        kw["source_class"] = opts["source_class"]
    if trigger is not None:
        kw["trigger"] = trigger
    if method == "clean-label":
        kw.update(device=device, arch=opts.get("arch"))
        if opts.get("eps") is not None:
            kw["eps"] = opts["eps"]
        if opts.get("steps") is not None:
            kw["steps"] = opts["steps"]
        if opts.get("robust_surrogate"):
            if opts.get("surrogate"):
                raise InvalidConfigError("--robust-surrogate trains a surrogate; drop --surrogate")
            kw["robust_surrogate"] = True
        if opts.get("surrogate"):
            loaded = _load(
                {**opts, "model": opts["surrogate"], "arch": opts.get("surrogate_arch")},
                data.input_shape,
                device,
            )
            if loaded.classifier is None:
                raise UnsupportedModelError("--surrogate must be a white-box torch model")
            check_fits(loaded, data.y, "--data")
            kw["surrogate"] = loaded.classifier
    result = poison(method, data, **kw)
    result.dataset.to_npz(out)
    rec = result.record
    rec.details["data"] = data.describe()
    rec.details["output"] = {"path": str(out), "sha256": sha256_file(out)}
    rec.config["command"] = opts.get("command", "")
    rpath = record_path(out)
    atomic_write_json(rpath, rec.to_dict())  # last: its presence means the poisoning finished
    summary = rec.to_dict()
    summary["paths"] = {"data": str(out), "record": str(rpath)}
    return summary


AUDIT_STEPS = 2000
"""Optimizer steps (batches of 64) of the model ``audit data`` trains when none is given."""


def default_epochs(n: int) -> int:
    """Epochs that make about :data:`AUDIT_STEPS` steps of 64 over ``n`` samples, in [3, 30]."""
    return int(min(30, max(3, math.ceil(AUDIT_STEPS * 64 / max(n, 1)))))


def load_truth(path: str, n: int) -> list[int]:
    """Poisoned indices from a ``.poison.json`` record, ``{"indices": [...]}`` or a list."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"--truth {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"--truth {path}: not a JSON file ({exc})") from None
    if isinstance(doc, dict):
        if doc.get("result_type") == "poison":
            rec = PoisonResult.from_dict(doc)
            want = rec.details.get("n")
            if isinstance(want, int) and want != n:
                raise DataError(
                    f"--truth {path} records a poisoning of {want} samples but --train-data has {n}"
                )
            items: Any = rec.indices
        else:
            items = doc.get("indices")
    else:
        items = doc
    if not isinstance(items, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in items
    ):
        raise DataError(f"--truth {path}: expected a list of sample indices")
    bad = [i for i in items if not 0 <= i < n]
    if bad:
        raise DataError(f"--truth {path}: index {bad[0]} is outside [0, {n})")
    return sorted(set(items))


def run_audit_data(**opts: Any) -> dict[str, Any]:
    """Detect poison in ``--train-data``; write result.json, clean.npz and the reports."""
    started, device = _prepare(opts)
    detectors = list(opts.get("detector") or ()) or ["activation-clustering", "spectral"]
    for name in detectors:
        POISON_DETECTORS.get(name)
    if opts.get("expected_rate") is not None and not 0 < opts["expected_rate"] < 1:
        raise InvalidConfigError(f"--expected-rate must be in (0, 1), got {opts['expected_rate']}")
    train = load_dataset(
        opts["train_data"], bounds=opts["bounds"], label_column=opts.get("label_column")
    )
    reference: Dataset | None = None
    if opts.get("data"):
        reference = load_dataset(
            opts["data"], bounds=opts["bounds"], label_column=opts.get("label_column")
        )
        if reference.input_shape != train.input_shape:
            raise DataError(
                f"--data samples have shape {reference.input_shape} but --train-data samples "
                f"have {train.input_shape}"
            )
    truth = load_truth(opts["truth"], len(train)) if opts.get("truth") else None
    if opts.get("model"):
        loaded = _load(opts, train.input_shape, device)
        if loaded.classifier is None:
            raise UnsupportedModelError(
                f"audit data reads a model's activations: it needs a torch model, got a {loaded.kind} model"
            )
        check_fits(loaded, train.y, "--train-data")
        model = loaded.classifier
        model_desc = loaded.file.to_dict()
        model_note = ""
    else:
        opts["epochs"] = opts.get("epochs") or default_epochs(len(train))
        model = train_model(
            train,
            arch=opts.get("arch"),
            epochs=opts["epochs"],
            seed=opts["seed"],
            bounds=opts["bounds"],
            device=device,
        )
        model_desc = {"path": None, "sha256": None, "format": "trained by the audit"}
        model_note = (
            f"No --model given: a {opts.get('arch') or 'default'} model was trained on the data "
            f"for {opts['epochs']} epochs to read activations from."
        )
    res = audit_training_data(
        model,
        train,
        detectors=detectors,
        truth=truth,
        reference=reference,
        expected_rate=opts.get("expected_rate"),
        seed=opts["seed"],
    )
    probe = detection_probe_result(res, seed=opts["seed"], note=model_note)
    report = build_report(
        probes=[probe],
        run=run_record(
            opts.get("command", "modelshield audit data"), opts["seed"], device, started
        ),
        target={
            "model": model_desc,
            "data": reference.describe()
            if reference is not None
            else {"path": None, "sha256": None, "format": None},
            "train_data": train.describe(),
        },
        rubric=rubric_document(),
    )  # validated before any file is written
    out = Path(opts["out"])
    keep = sorted(set(range(len(train))) - set(res.indices))
    clean_path = train.subset(keep).to_npz(out / "clean.npz")
    written = write_reports(report, out)
    summary: dict[str, Any] = {
        "flagged": res.indices,
        "n": len(train),
        "flagged_fraction": res.details["flagged_fraction"],
        "precision": res.precision,
        "recall": res.recall,
        "truth": opts.get("truth"),
        "detectors": res.details["detectors"],
        "model": model_desc,
        "model_note": model_note or None,
        "seed": opts["seed"],
        "wall_time": res.wall_time,
    }
    result_path = out / "result.json"
    summary["paths"] = {
        "result": str(result_path),
        "clean": str(clean_path),
        "html": str(written["html"]),
        "json": str(written["json"]),
    }
    atomic_write_json(result_path, summary)  # last: its presence means the audit finished
    return summary


def load_poison_record(path: str) -> PoisonResult:
    """A ``NAME.poison.json`` record (``--poison-record``), with one-line errors."""
    try:
        return PoisonResult.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise DataError(f"--poison-record {path}: no such file") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"--poison-record {path}: not a poison record ({exc})") from None


def fine_prune_probe_result(
    info: dict[str, Any], before: dict[str, Any], after: dict[str, Any], *, seed: int
) -> ProbeResult:
    """The report section of a fine-pruning: units pruned, accuracy and ASR before/after."""
    asr_b, asr_a = before.get("attack_success_rate"), after.get("attack_success_rate")
    rows = [["clean accuracy", f"{before['clean_accuracy']:.4f}", f"{after['clean_accuracy']:.4f}"]]
    if asr_b is not None and asr_a is not None:
        rows.append(["attack success rate", f"{asr_b:.4f}", f"{asr_a:.4f}"])
    asr_text = (
        f"; the backdoor's attack success rate went from {asr_b:.1%} to {asr_a:.1%}"
        if asr_b is not None and asr_a is not None
        else " (no --poison-record: the attack success rate was not measured)"
    )
    return ProbeResult(
        probe="fine-pruning",
        title="Backdoor removal by fine-pruning",
        risk="poisoning",
        status="ok",
        seed=seed,
        wall_time=info["wall_time"],
        config={k: info[k] for k in ("units", "pruned", "fine_tune_epochs")},
        figure={
            "name": "attack success rate after" if asr_a is not None else "clean accuracy after",
            "value": asr_a if asr_a is not None else after["clean_accuracy"],
        },
        grade=None,
        meaning=(
            f"Pruned {info['pruned']} of {info['units']} penultimate units (least active on clean "
            f"data first) and fine-tuned for {info['fine_tune_epochs']} epochs: clean accuracy "
            f"{before['clean_accuracy']:.4f} → {after['clean_accuracy']:.4f}{asr_text}."
        ),
        recommendation="Re-scan the pruned model; if a backdoor is suspected in the data, "
        "retrain without the samples `modelshield audit data` flags.",
        threat={
            "attacker": "planted a backdoor through the training data",
            "attack": "any trigger backdoor",
            "access": "training data",
            "rule": "informational: a defence's effect",
        },
        details={"fine_pruning": info, "before": before, "after": after},
        plots=[
            {
                "kind": "table",
                "title": "Before and after",
                "columns": ["", "before", "after"],
                "rows": rows,
            }
        ],
    )


def run_fine_prune(**opts: Any) -> dict[str, Any]:
    """Fine-prune ``--model`` with clean ``--data``; write model.pt2, result.json, reports."""
    from modelshield.poisoning.metrics import evaluate_poisoning
    from modelshield.poisoning.removal import fine_prune
    from modelshield.scan.dp import _serialize, _write_blobs

    started, device = _prepare(opts)
    clean = load_dataset(opts["data"], bounds=opts["bounds"], label_column=opts.get("label_column"))
    test = (
        load_dataset(
            opts["test_data"], bounds=opts["bounds"], label_column=opts.get("label_column")
        )
        if opts.get("test_data")
        else None
    )
    record = None
    if opts.get("poison_record"):
        if test is None:
            raise InvalidConfigError(
                "--poison-record needs --test-data (where the ASR is measured)"
            )
        record = load_poison_record(opts["poison_record"])
    loaded = _load(opts, clean.input_shape, device)
    if loaded.classifier is None:
        raise UnsupportedModelError(f"fine-pruning needs a torch model, got a {loaded.kind} model")
    check_fits(loaded, clean.y, "--data")
    if test is not None:
        check_fits(loaded, test.y, "--test-data")
    model = loaded.classifier
    evaluation = test if test is not None else clean

    def measure(m: Any) -> dict[str, Any]:
        if record is not None and test is not None:
            ev = evaluate_poisoning(m, test.x, test.y, record)
            asr = ev["attack_success_rate"]
            return {
                "clean_accuracy": ev["clean_accuracy"]["value"],
                "attack_success_rate": None if asr is None else asr["value"],
            }
        return {
            "clean_accuracy": m.accuracy(evaluation.x, evaluation.y),
            "attack_success_rate": None,
        }

    before = measure(model)
    pruned, info = fine_prune(
        model,
        clean,
        max_accuracy_drop=opts["max_accuracy_drop"],
        epochs=opts["epochs"],
        lr=opts["lr"],
        seed=opts["seed"],
    )
    after = measure(pruned)
    probe = fine_prune_probe_result(info, before, after, seed=opts["seed"])
    report = build_report(
        probes=[probe],
        run=run_record(
            opts.get("command", "modelshield harden fine-prune"), opts["seed"], device, started
        ),
        target={
            "model": loaded.file.to_dict(),
            "data": (test or clean).describe(),
            "train_data": clean.describe(),
        },
        rubric=rubric_document(),
    )
    blobs = _serialize(pruned.module, clean.x)  # type: ignore[arg-type]
    out = Path(opts["out"])
    paths = _write_blobs(out, blobs)
    written = write_reports(report, out)
    summary = {"fine_pruning": info, "before": before, "after": after, "seed": opts["seed"]}
    result_path = out / "result.json"
    summary["paths"] = {
        **paths,
        "result": str(result_path),
        "html": str(written["html"]),
        "json": str(written["json"]),
    }
    atomic_write_json(result_path, summary)
    return summary
