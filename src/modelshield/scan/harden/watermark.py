"""``modelshield harden watermark``: embed a trigger-set watermark (Adi et al., USENIX
Security 2018; the black-box counterpart of Uchida et al. 2017's weight watermark) and
compare the model before and after with the scan's watermark probe and clean accuracy.

The new secret key verifies against the model before (it should not: the mark is not
there yet) and against the marked model loaded back from disk (it should). The key is
written last, beside its destination first as a private temporary file, as
``watermark embed`` does; every run draws a new key, so nothing is resumed.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.loading import check_fits, load_model
from modelshield.core.results import ProbeResult
from modelshield.scan.dp import _serialize, _write_blobs
from modelshield.scan.harden.common import (
    HardenOutcome,
    finish,
    hardening_result,
    load_pair,
    open_run,
    start,
    train_baseline,
)
from modelshield.scan.harden.dp import _accuracy_result
from modelshield.scan.probe.watermark import verify_with_key
from modelshield.scan.rubric import harden_command
from modelshield.scan.watermark import _check_significance, _start_module, normalised
from modelshield.watermark.embed import embed_and_evaluate
from modelshield.watermark.key import WatermarkKey, check_key_destination, staged_key_file

logger = logging.getLogger(__name__)


def harden_watermark(**opts: Any) -> HardenOutcome:
    """Verify (expect: absent), embed, save, re-load, verify again (expect: present), report."""
    significance = _check_significance(opts["significance"])
    key_path = check_key_destination(opts["key"], overwrite=opts.get("force", False))
    started, device = start(opts, profile=False)
    train, test = load_pair(opts["train_data"], opts["data"], opts["bounds"])
    module, loaded = _start_module(opts, train.input_shape, train.num_classes, device)
    num_classes = train.num_classes
    if loaded is not None and loaded.classifier is not None:
        check_fits(loaded, train.y, "--train-data")
        check_fits(loaded, test.y, "--data")
        num_classes = loaded.classifier.num_classes
    key = WatermarkKey.generate(
        input_shape=train.input_shape,
        num_classes=num_classes,
        n=opts["triggers"],
        bounds=opts["bounds"],
        kind=opts.get("trigger_kind"),
    )
    cmp = open_run(
        opts,
        device,
        {"command": "harden watermark"},
        profile="quick",
        fresh=True,  # a new key every run: earlier measurements are of another key
    )
    out = cmp.run_dir.root

    def clf_of(m: Any) -> Classifier:
        return from_torch(
            m,
            input_shape=train.input_shape,
            num_classes=num_classes,
            bounds=opts["bounds"],
            mean=opts.get("mean"),
            std=opts.get("std"),
            device=device,
        )

    if loaded is not None and loaded.classifier is not None:
        before_clf = clf_of(copy.deepcopy(module))  # the embedding fine-tunes ``module``
        before_sha: str | None = loaded.file.sha256
    else:  # from scratch: "before" is the same architecture trained without the mark
        baseline = train_baseline(
            module,
            train,
            device=device,
            through=lambda m: normalised(m, opts, train.input_shape, num_classes, device),
            epochs=opts["epochs"],
            lr=opts["lr"],
            batch_size=opts["batch_size"],
            seed=opts["seed"],
        )
        before_clf, before_sha = clf_of(baseline), None

    def side(name: str, clf: Classifier, sha: str | None) -> list[ProbeResult]:
        mark = verify_with_key(
            clf, key, significance=significance, model_sha256=sha, seed=opts["seed"]
        )
        acc = _accuracy_result("accuracy", clf, test.x, test.y, opts["seed"])
        return [cmp.keep(acc, name), cmp.keep(mark, name)]

    before = side("before", before_clf, before_sha)
    outcome = embed_and_evaluate(
        normalised(module, opts, train.input_shape, num_classes, device),
        train.x.to(device),
        train.y.to(device),
        key,
        test_x=test.x,
        test_y=test.y,
        significance=significance,
        epochs=opts["epochs"],
        lr=opts["lr"],
        batch_size=opts["batch_size"],
        from_scratch=loaded is None,
        seed=opts["seed"],
    )
    blobs = _serialize(module, train.x)  # trained in place (through the normalising wrapper)
    main_file = "model.pt2" if "model.pt2" in blobs else "model.pt"
    sha = hashlib.sha256(blobs[main_file]).hexdigest()
    key = key.with_model(sha)
    with staged_key_file(key, key_path, overwrite=opts.get("force", False)) as commit:
        paths = _write_blobs(out, blobs)
        model_path = out / main_file
        marked = load_model(
            model_path,
            arch=opts.get("arch") if main_file == "model.pt" else None,
            input_shape=train.input_shape,
            num_classes=num_classes if main_file == "model.pt" else None,
            bounds=opts["bounds"],
            mean=opts.get("mean"),
            std=opts.get("std"),
            device=device,
        )
        if marked.classifier is None:  # pragma: no cover - we wrote a torch model
            raise RuntimeError(f"{model_path} did not load back as a white-box model")
        after = side("after", marked.classifier, marked.file.sha256)
        summary = _summary(opts, key, before, after, from_scratch=loaded is None)
        results = [summary, *before, *after]
        reports = cmp.report(
            results,
            command=opts["command"],
            started=started,
            model=marked.file.to_dict(),
            data=test,
            train_data=train,
        )
        key_file = commit()
    return finish(
        out,
        summary,
        results,
        reports,
        model_path=Path(paths.get("model", paths.get("state_dict", ""))),
        paths={**paths, "key": str(key_file)},
        key_id=key.key_id,
        model_sha256=sha,
        source_model=loaded.file.to_dict() if loaded is not None else None,
        embedding=outcome.summary(),
    )


def _summary(
    opts: dict[str, Any],
    key: WatermarkKey,
    before: list[ProbeResult],
    after: list[ProbeResult],
    *,
    from_scratch: bool,
) -> ProbeResult:
    (acc_b, mark_b), (acc_a, mark_a) = before, after
    vb, va = mark_b.details["verified"], mark_a.details["verified"]
    pb, pa = mark_b.details["p_value"], mark_a.details["p_value"]
    how = "trained from scratch" if from_scratch else "fine-tuned"
    ab, aa = acc_b.figure["value"], acc_a.figure["value"]
    meaning = (
        f"The model was {how} with {key.n} secret {key.kind} trigger inputs (Adi et al. 2018). "
        f"Before: {mark_b.details['matches']}/{key.n} triggers give the key's label "
        f"(p = {pb:.3g}, {'verified' if vb else 'not verified'}); after, loaded back from disk: "
        f"{mark_a.details['matches']}/{key.n} (p = {pa:.3g}, "
        f"{'verified' if va else 'NOT verified'}) at significance {mark_a.config['significance']:g}. "
        f"Clean test accuracy {ab:.2%} → {aa:.2%}."
    )
    advice = (
        "Store the key file like a private key (off the serving machines) and check suspect "
        "models or APIs with `modelshield watermark verify`; pair the mark with a defended "
        "gateway (`modelshield harden gateway`) so that copies are costly to make."
        if va and not vb
        else "The mark did not take: train longer (--epochs), with a larger --lr, or with fewer "
        "--triggers."
        if not va
        else "The key already verified before embedding: the model answers the triggers' "
        "labels by chance too often; use more --triggers."
    )
    return hardening_result(
        title="Watermark (trigger set, Adi et al. 2018)",
        risk="watermark",
        defence=harden_command("watermark"),
        rows=[
            ("clean accuracy", ab, aa),
            (
                "trigger accuracy",
                mark_b.details["trigger_accuracy"],
                mark_a.details["trigger_accuracy"],
            ),
            ("p value", pb, pa),
            ("verified", vb, va),
        ],
        figure={"name": "p-value of the trigger matches after", "value": pa},
        grade=None,
        rule="informational: an ownership mark, not graded",
        meaning=meaning,
        recommendation=advice,
        seed=opts["seed"],
        config={
            "triggers": key.n,
            "trigger_kind": key.kind,
            "epochs": opts["epochs"],
            "significance": mark_a.config["significance"],
        },
        details={"key": key.public_dict(), "from_scratch": from_scratch},
        flags=["watermark-verified"] if va else ["watermark-not-embedded"],
    )
