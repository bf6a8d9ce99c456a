"""``modelshield harden dp``: retrain with DP-SGD (Abadi et al. 2016), before/after report.

The private model is trained from a fresh initialisation of the given model's
architecture (or ``--arch``): starting DP-SGD from weights already fitted to the same
data would void the guarantee. "Before" is the given model, or, with only ``--arch``, the
same architecture trained the same way without privacy. Both are measured by the same
scan probes: test accuracy, membership inference (:mod:`~modelshield.scan.probe.membership`)
and the DP claim probe, which recomputes the ledger's epsilon and checks it names the
written model file.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.loading import build_arch, check_fits, load_given_model, load_model
from modelshield.core.results import ProbeResult
from modelshield.poisoning.audit import fresh_copy
from modelshield.privacy.dp import _check_budget, plan_noise, plan_steps, train_dp
from modelshield.scan.context import ScanContext
from modelshield.scan.dp import _serialize, _write_blobs, dp_config, dp_training_probe_result
from modelshield.scan.harden.common import (
    HardenOutcome,
    finish,
    hardening_result,
    load_pair,
    open_run,
    start,
    train_baseline,
)
from modelshield.scan.probe.dp_claim import DPClaimProbe
from modelshield.scan.probe.membership import MembershipProbe
from modelshield.scan.rubric import grade_dp_claim, harden_command

logger = logging.getLogger(__name__)

COMPILED = ("export", "torchscript")
"""Model kinds whose layers Opacus cannot hook: ``--arch`` names the architecture instead."""


def _accuracy_result(name: str, clf: Classifier, x: Any, y: Any, seed: int) -> ProbeResult:
    acc = clf.accuracy(x, y)
    return ProbeResult(
        probe=name,
        title="Clean test accuracy",
        risk="utility",
        seed=seed,
        figure={"name": "test accuracy", "value": acc},
        meaning=f"The model classifies {acc:.2%} of the {len(y)} test samples correctly.",
        threat={"rule": "informational: the utility a defence costs"},
        details={"accuracy": acc, "n": len(y)},
    )


def harden_dp(**opts: Any) -> HardenOutcome:
    """Measure, retrain with DP-SGD, save model and ledger, re-load, measure, report."""
    started, device = start(opts)
    if opts.get("dp") is False:
        raise InvalidConfigError("harden dp always trains with DP-SGD; drop --no-dp")
    cfg = dp_config({**opts, "dp": True})
    if cfg is None:  # pragma: no cover - dp=True always gives a config or an error
        raise InvalidConfigError("--epsilon (or --noise-multiplier) is required")
    train, test = load_pair(opts["train_data"], opts["data"], opts["bounds"])
    shape = train.input_shape
    loaded = None
    if opts.get("model"):
        loaded = load_given_model(opts, shape, device)
        if loaded.classifier is None or not isinstance(loaded.classifier.module, nn.Module):
            raise UnsupportedModelError(
                f"cannot retrain a {loaded.kind} model; give a torch model (torch.export, "
                "TorchScript, state_dict + --arch) or --arch NAME"
            )
        check_fits(loaded, train.y, "--train-data")
        check_fits(loaded, test.y, "--data")
        if loaded.kind in COMPILED:
            if not opts.get("arch"):
                raise InvalidConfigError(
                    f"{opts['model']} is a compiled {loaded.kind} program, which DP-SGD cannot "
                    "retrain (Opacus needs the layers); name its architecture with --arch "
                    "(e.g. mlp, small_cnn or package.module:factory)"
                )
            module = build_arch(opts["arch"], input_shape=shape, num_classes=train.num_classes)
        else:
            module = fresh_copy(loaded.classifier.module, seed=opts["seed"])
    else:
        if not opts.get("arch"):
            raise InvalidConfigError("give --model PATH (retrain its architecture) or --arch NAME")
        module = build_arch(opts["arch"], input_shape=shape, num_classes=train.num_classes)
    # refuse an impossible budget before anything is written
    q, steps = plan_steps(cfg, len(train))
    _check_budget(cfg, q, plan_noise(cfg, q, steps), steps, "refusing to train")
    ledger_before = None
    if loaded is not None and (Path(opts["model"]).parent / "ledger.json").is_file():
        ledger_before = str(Path(opts["model"]).parent / "ledger.json")

    cmp = open_run(
        opts,
        device,
        {
            "command": "harden dp",
            "model_sha256": loaded.file.sha256 if loaded is not None else None,
            "arch": opts.get("arch"),
            "train_data_sha256": train.describe().get("sha256"),
            "data_sha256": test.describe().get("sha256"),
            "dp": cfg.to_dict(),
            "profile": opts["profile"],
            "seed": opts["seed"],
        },
    )
    out = cmp.run_dir.root
    ckpt = out / "checkpoint.pt"
    if opts.get("fresh"):
        ckpt.unlink(missing_ok=True)
        shutil.rmtree(out / "reference-models", ignore_errors=True)

    def classifier(m: nn.Module) -> Classifier:
        return from_torch(
            m,
            input_shape=shape,
            num_classes=train.num_classes,
            bounds=opts["bounds"],
            mean=opts.get("mean"),
            std=opts.get("std"),
            device=device,
        )

    if loaded is not None and loaded.classifier is not None:
        before_clf = loaded.classifier
    else:  # the same architecture and epochs, without privacy (as `train` does without --dp)
        baseline = train_baseline(
            module,
            train,
            device=device,
            epochs=opts["epochs"],
            batch_size=opts["batch_size"],
            seed=opts["seed"],
        )
        before_clf = classifier(baseline)

    def no_ledger(ctx: ScanContext, reason: str) -> ProbeResult:
        clf = ctx.classifier
        acc = clf.accuracy(test.x, test.y) if clf is not None else None
        return dp_training_probe_result(None, acc, [], seed=opts["seed"])

    def side(name: str, clf: Classifier, model: Any, ledger: str | None) -> list[ProbeResult]:
        acc = cmp.finished("accuracy", name) or cmp.keep(
            _accuracy_result("accuracy", clf, test.x, test.y, opts["seed"]), name
        )
        claim = cmp.measure(
            DPClaimProbe(),
            name,
            fallback=no_ledger,
            model=model,
            white_box=clf,
            options={"dp_ledger": ledger},
        )
        member = cmp.measure(
            MembershipProbe(), name, white_box=clf, data=test, train_data=train, model=model
        )
        return [acc, claim, member]

    before = side("before", before_clf, loaded, ledger_before)
    res = train_dp(
        module,
        train.x,
        train.y,
        cfg,
        num_classes=train.num_classes,
        device=device,
        validation=(test.x, test.y),
        checkpoint=ckpt,
    )
    blobs = _serialize(res.module, train.x)
    main_file = "model.pt2" if "model.pt2" in blobs else "model.pt"
    res.ledger.model_sha256 = hashlib.sha256(blobs[main_file]).hexdigest()
    paths = _write_blobs(out, blobs)
    ledger_path = res.ledger.save(out / "ledger.json")
    model_path = out / main_file
    hardened = load_model(
        model_path,
        arch=opts.get("arch") if main_file == "model.pt" else None,
        input_shape=shape,
        num_classes=train.num_classes if main_file == "model.pt" else None,
        bounds=opts["bounds"],
        mean=opts.get("mean"),
        std=opts.get("std"),
        device=device,
    )
    if hardened.classifier is None:  # pragma: no cover - we wrote a torch model
        raise UnsupportedModelError(f"{model_path} did not load back as a white-box model")
    after = side("after", hardened.classifier, hardened, str(ledger_path))
    summary = _summary(opts, res.ledger, before, after)
    results = [summary, *before, *after]
    reports = cmp.report(
        results,
        command=opts["command"],
        started=started,
        model=hardened.file.to_dict(),
        data=test,
        train_data=train,
    )
    outcome = finish(
        out,
        summary,
        results,
        reports,
        model_path=model_path,
        paths={**paths, "ledger": str(ledger_path)},
        ledger=res.ledger.to_dict(),
    )
    ckpt.unlink(missing_ok=True)
    return outcome


def _summary(
    opts: dict[str, Any], ledger: Any, before: list[ProbeResult], after: list[ProbeResult]
) -> ProbeResult:
    """Accuracy, membership leakage and the claimed epsilon, before and after DP-SGD."""
    (acc_b, claim_b, mem_b), (acc_a, claim_a, mem_a) = before, after
    eps_b = claim_b.figure.get("value")
    eps = float(ledger.epsilon)
    grade, rule = grade_dp_claim(eps)
    if claim_a.grade == "F":  # the ledger check failed: the claim is not to be relied on
        grade, rule = "F", claim_a.details.get("rule", rule)
    tb, ta = mem_b.figure["value"], mem_a.figure["value"]
    ab, aa = mem_b.details["auc"], mem_a.details["auc"]
    accb, acca = acc_b.figure["value"], acc_a.figure["value"]
    meaning = (
        f"DP-SGD (Abadi et al. 2016) with noise multiplier {ledger.noise_multiplier:.4g}, "
        f"clipping norm {ledger.max_grad_norm:g} and sample rate {ledger.sample_rate:.4g} over "
        f"{ledger.steps} steps spent epsilon {eps:.3f} at delta {ledger.delta:g} "
        f"({ledger.accountant}). The {mem_a.config.get('attack', 'membership')} membership attack's "
        f"TPR at 1% FPR went from {tb:.1%} to {ta:.1%} (AUC {ab:.3f} → {aa:.3f}); test accuracy "
        f"from {accb:.2%} to {acca:.2%}."
    )
    advice = (
        "Ship model.pt2 with ledger.json beside it; check the claim empirically with "
        "`modelshield audit dp`"
        + ("." if ledger.secure_rng else ", and retrain with --secure-rng before release.")
        if grade != "F"
        else "The written ledger does not check out: do not rely on the claim; retrain."
    )
    return hardening_result(
        title="Differential privacy (DP-SGD, Abadi et al. 2016)",
        risk="privacy",
        defence=harden_command("privacy"),
        rows=[
            ("test accuracy", accb, acca),
            ("membership TPR at 1% FPR", tb, ta),
            ("membership AUC", ab, aa),
            ("claimed epsilon", eps_b, eps),
        ],
        figure={"name": "claimed epsilon after", "value": eps, "delta": ledger.delta},
        grade=grade,
        rule=rule,
        meaning=meaning,
        recommendation=advice,
        seed=opts["seed"],
        config={
            "epsilon": opts.get("epsilon"),
            "delta": ledger.delta,
            "epochs": opts["epochs"],
            "batch_size": opts["batch_size"],
            "max_grad_norm": ledger.max_grad_norm,
            "accountant": ledger.accountant,
        },
        details={
            "epsilon": eps,
            "target_epsilon": opts.get("epsilon"),
            "delta": ledger.delta,
            "membership_attack": mem_a.config.get("attack"),
            "accuracy_cost": accb - acca,
        },
        flags=[] if ledger.secure_rng else ["insecure-rng"],
    )
