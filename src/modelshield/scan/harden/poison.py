"""``modelshield harden poison-removal``: find poison in the training data and retrain
without it (spectral signatures, Tran et al. 2018; activation clustering, Chen et al. 2018),
with a before/after report.

The scan's data-poisoning probe (the detectors on the model's penultimate activations)
runs on the given model and its training data, then on the retrained model and the
cleaned data; clean accuracy, and with ``--poison-record`` the backdoor's attack success
rate, are measured on the test data for both models. The retrained model is a fresh
initialisation of the given model's architecture trained on ``clean.npz``.
"""

from __future__ import annotations

import logging
from typing import Any

from modelshield.core.classifier import Classifier
from modelshield.core.errors import UnsupportedModelError
from modelshield.core.loading import check_fits, load_given_model, load_model
from modelshield.core.results import PoisonResult, ProbeResult
from modelshield.poisoning.audit import audit_training_data
from modelshield.poisoning.detectors import POISON_DETECTORS
from modelshield.poisoning.metrics import evaluate_poisoning
from modelshield.poisoning.removal import retrain_without
from modelshield.scan.dp import _serialize, _write_blobs
from modelshield.scan.harden.common import (
    HardenOutcome,
    finish,
    hardening_result,
    load_pair,
    open_run,
    start,
)
from modelshield.scan.poison import load_poison_record, load_truth
from modelshield.scan.probe.poisoning import detection_probe_result
from modelshield.scan.rubric import grade_poison_flagged, harden_command

logger = logging.getLogger(__name__)

DEFAULT_DETECTORS = ("activation-clustering", "spectral")


def _backdoor(clf: Classifier, test: Any, record: PoisonResult | None, seed: int) -> ProbeResult:
    """Clean accuracy, and the backdoor's attack success rate when its record is known."""
    if record is not None:
        ev = evaluate_poisoning(clf, test.x, test.y, record)
        acc = ev["clean_accuracy"]["value"]
        asr = None if ev["attack_success_rate"] is None else ev["attack_success_rate"]["value"]
    else:
        acc, asr = clf.accuracy(test.x, test.y), None
    text = f"Clean test accuracy {acc:.2%}" + (
        f"; {asr:.2%} of triggered test inputs reach the backdoor's target class."
        if asr is not None
        else " (no --poison-record: the attack success rate was not measured)."
    )
    return ProbeResult(
        probe="backdoor",
        title="Clean accuracy and backdoor success",
        risk="poisoning",
        seed=seed,
        figure={
            "name": "attack success rate" if asr is not None else "clean accuracy",
            "value": asr if asr is not None else acc,
        },
        meaning=text,
        threat={"rule": "informational: a defence's effect"},
        details={"clean_accuracy": acc, "attack_success_rate": asr},
    )


def harden_poison_removal(**opts: Any) -> HardenOutcome:
    """Detect, remove, retrain, save, re-load, measure both models, report."""
    started, device = start(opts)
    detectors = list(opts.get("detector") or ()) or list(DEFAULT_DETECTORS)
    for name in detectors:
        POISON_DETECTORS.get(name)
    train, test = load_pair(
        opts["train_data"], opts["data"], opts["bounds"], opts.get("label_column")
    )
    record = load_poison_record(opts["poison_record"]) if opts.get("poison_record") else None
    truth = load_truth(opts["poison_record"], len(train)) if record is not None else None
    loaded = load_given_model(opts, train.input_shape, device)
    if loaded.classifier is None:
        raise UnsupportedModelError(
            f"poison removal reads a model's activations and retrains it: it needs a torch "
            f"model, got a {loaded.kind} model"
        )
    check_fits(loaded, train.y, "--train-data")
    check_fits(loaded, test.y, "--data")
    model = loaded.classifier
    cmp = open_run(
        opts,
        device,
        {
            "command": "harden poison-removal",
            "model_sha256": loaded.file.sha256,
            "train_data_sha256": train.describe().get("sha256"),
            "data_sha256": test.describe().get("sha256"),
            "detectors": detectors,
            "expected_rate": opts.get("expected_rate"),
            "epochs": opts["epochs"],
            "seed": opts["seed"],
        },
    )
    out = cmp.run_dir.root

    def detect(clf: Classifier, data: Any, known: list[int] | None, note: str) -> ProbeResult:
        res = audit_training_data(
            clf,
            data,
            detectors=detectors,
            truth=known,
            reference=test,
            expected_rate=opts.get("expected_rate"),
            seed=opts["seed"],
        )
        return detection_probe_result(res, seed=opts["seed"], note=note)

    det_before = cmp.finished("data-poisoning", "before") or cmp.keep(
        detect(model, train, truth, "Detectors run on the given model and --train-data."),
        "before",
    )
    bd_before = cmp.finished("backdoor", "before") or cmp.keep(
        _backdoor(model, test, record, opts["seed"]), "before"
    )
    flagged = [int(i) for i in det_before.details["flagged"]]
    keep = sorted(set(range(len(train))) - set(flagged))
    clean = train.subset(keep)
    retrained = retrain_without(
        train,
        flagged,
        epochs=opts["epochs"],
        lr=opts["lr"],
        batch_size=opts["batch_size"],
        seed=opts["seed"],
        bounds=opts["bounds"],
        device=device,
        like=model,
    )
    clean_path = clean.to_npz(out / "clean.npz")
    blobs = _serialize(retrained.module, train.x)  # type: ignore[arg-type]
    paths = _write_blobs(out, blobs)
    main_file = "model.pt2" if "model.pt2" in blobs else "model.pt"
    model_path = out / main_file
    if main_file == "model.pt2":
        again = load_model(
            model_path, input_shape=train.input_shape, bounds=opts["bounds"], device=device
        )
        after_clf = again.classifier if again.classifier is not None else retrained
        after_file = again.file.to_dict()
    else:  # pragma: no cover - an architecture torch.export cannot trace
        after_clf, after_file = retrained, {"path": str(model_path), "sha256": None}
    # the remaining poison, if any: indices of the truth that survived the removal
    where = {old: new for new, old in enumerate(keep)}
    truth_after = None if truth is None else [where[i] for i in truth if i in where]
    det_after = cmp.finished("data-poisoning", "after") or cmp.keep(
        detect(
            after_clf, clean, truth_after, "Detectors run on the retrained model and clean.npz."
        ),
        "after",
    )
    bd_after = cmp.finished("backdoor", "after") or cmp.keep(
        _backdoor(after_clf, test, record, opts["seed"]), "after"
    )
    summary = _summary(opts, len(train), flagged, truth, det_before, det_after, bd_before, bd_after)
    results = [summary, det_before, bd_before, det_after, bd_after]
    reports = cmp.report(
        results,
        command=opts["command"],
        started=started,
        model=after_file,
        data=test,
        train_data=train,
    )
    return finish(
        out,
        summary,
        results,
        reports,
        model_path=model_path,
        paths={**paths, "clean": str(clean_path)},
        flagged=flagged,
        n=len(train),
        detectors=detectors,
    )


def _summary(
    opts: dict[str, Any],
    n: int,
    flagged: list[int],
    truth: list[int] | None,
    det_b: ProbeResult,
    det_a: ProbeResult,
    bd_b: ProbeResult,
    bd_a: ProbeResult,
) -> ProbeResult:
    fb, fa = det_b.figure["value"], det_a.figure["value"]
    ab, aa = bd_b.details["clean_accuracy"], bd_a.details["clean_accuracy"]
    sb, sa = bd_b.details["attack_success_rate"], bd_a.details["attack_success_rate"]
    grade, rule = grade_poison_flagged(fa)
    pr = ""
    if truth is not None:
        caught = len(set(flagged) & set(truth))
        pr = f" Of the {len(truth)} known poisoned samples, {caught} were removed."
    asr = (
        f" The backdoor's attack success rate went from {sb:.1%} to {sa:.1%}."
        if sb is not None and sa is not None
        else ""
    )
    meaning = (
        f"The detectors ({det_b.config.get('detectors')}) flagged {len(flagged)} of {n} training "
        f"samples ({fb:.2%}); the model's architecture was retrained from scratch on the other "
        f"{n - len(flagged)} (clean.npz).{pr}{asr} Clean test accuracy {ab:.2%} → {aa:.2%}; on "
        f"the cleaned data the detectors flag {fa:.2%}."
    )
    worked = sa is None or sb is None or sa < sb
    advice = (
        "Ship the retrained model (model.pt2) and keep training on clean.npz; audit new data "
        "before it joins the set (`modelshield audit data`)."
        if worked
        else "Removal did not weaken the backdoor: try STRIP (--detector strip) or --expected-rate, "
        "or repair the model with clean data (`modelshield harden fine-prune`)."
    )
    rows: list[tuple[str, Any, Any]] = [
        ("clean accuracy", ab, aa),
        ("share flagged", fb, fa),
    ]
    if sb is not None:
        rows.append(("attack success rate", sb, sa))
    return hardening_result(
        title="Poison removal (detect, then retrain without; Tran et al. 2018, Chen et al. 2018)",
        risk="poisoning",
        defence=harden_command("poisoning"),
        rows=rows,
        figure={
            "name": "attack success rate after" if sa is not None else "share flagged after",
            "value": sa if sa is not None else fa,
        },
        grade=grade,
        rule=rule,
        meaning=meaning,
        recommendation=advice,
        seed=opts["seed"],
        config={"epochs": opts["epochs"], "lr": opts["lr"], "batch_size": opts["batch_size"]},
        details={
            "removed": len(flagged),
            "n": n,
            "known_poison": None if truth is None else len(truth),
        },
    )
