"""Membership-inference probe: does the model reveal which records it was trained on?

Runs when training data is given (members) beside the test data (non-members). The attack
grows with the profile: the loss threshold (quick), RMIA with 4 reference models
(standard), LiRA online with 16 (thorough). The figure is the TPR at 1% FPR, with AUC and
TPR at 0.1% FPR beside it; the report draws the ROC on log–log axes.
"""

from __future__ import annotations

from typing import Any

from modelshield.core.results import MembershipResult, ProbeResult
from modelshield.privacy.audit import AuditConfig, audit_membership, default_spec
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import grade_membership

PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"attack": "loss", "n": 500, "shadow_models": 2},
    "standard": {"attack": "rmia", "n": 500, "shadow_models": 4},
    "thorough": {"attack": "lira", "n": 1000, "shadow_models": 16},
}


def membership_probe_result(
    res: MembershipResult, *, name: str = "membership", seed: int = 0
) -> ProbeResult:
    """Grade and explain a membership result (shared by the scan and `audit membership`)."""
    t1 = res.tpr_at_fpr.get("0.01", float("nan"))
    t01 = res.tpr_at_fpr.get("0.001", float("nan"))
    grade, rule = grade_membership(t1)
    fpr = [max(v, 1e-5) for v in res.roc.get("fpr", [])]
    tpr = [max(v, 1e-5) for v in res.roc.get("tpr", [])]
    meaning = (
        f"The {res.attack} attack tells members from non-members with AUC {res.auc:.3f}; at 1% "
        f"false positives it finds {t1:.1%} of the members (random guessing: 1%), at 0.1% it "
        f"finds {t01:.1%} ({res.n_members} members, {res.n_nonmembers} non-members)."
    )
    advice = (
        "Little leakage at this attack strength; confirm with LiRA and more reference models "
        "(`modelshield audit membership --attack lira --shadow-models 16`)."
        if grade in ("A", "B")
        else "Retrain with differential privacy: `modelshield harden dp --epsilon 8 "
        "--train-data TRAIN --data TEST --model MODEL --out DIR` (DP-SGD, Abadi et al. 2016) "
        "writes the private model and this probe before and after; or regularise (weight "
        "decay, early stopping, data augmentation) and re-audit."
    )
    return ProbeResult(
        probe=name,
        title=f"Membership inference ({res.attack})",
        risk="privacy",
        status="ok",
        seed=seed,
        wall_time=res.wall_time,
        config=res.config,
        figure={
            "name": "TPR at 1% FPR",
            "value": t1,
            "ci": res.tpr_ci.get("0.01", []),
            "confidence": 0.95,
        },
        grade=grade,
        meaning=meaning,
        recommendation=advice,
        threat={
            "attacker": "queries the model on a record and decides whether it was trained on",
            "attack": res.attack,
            "access": "model outputs",
            "rule": rule,
        },
        details={
            "auc": res.auc,
            "auc_ci": res.auc_ci,
            "tpr_at_fpr": res.tpr_at_fpr,
            "tpr_ci": res.tpr_ci,
            "n_members": res.n_members,
            "n_nonmembers": res.n_nonmembers,
            "rule": rule,
        },
        plots=[
            {
                "kind": "line",
                "title": "ROC (log–log)",
                "x_label": "false positive rate",
                "y_label": "true positive rate",
                "x_scale": "log",
                "y_scale": "log",
                "series": [
                    {"name": res.attack, "x": fpr, "y": tpr},
                    {"name": "random guess", "x": [1e-5, 1.0], "y": [1e-5, 1.0]},
                ],
            }
        ],
    )


@register_probe
class MembershipProbe(Probe):
    """Membership inference: members (--train-data) against non-members (--data)."""

    name = "membership"
    title = "Membership inference"
    risk = "privacy"
    order = 30

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.train_data is None:
            return "no training data given (--train-data): membership needs known members"
        if ctx.data is None:
            return "no test data given (--data): membership needs known non-members"
        if ctx.classifier is None:
            return "needs a torch model (white-box file) to compute its outputs"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Target outputs on the audit pool; for RMIA/LiRA, the reference models' training."""
        if ctx.classifier is None or ctx.train_data is None or ctx.data is None:
            return Cost()
        s = PROFILE_SETTINGS[ctx.profile]
        n = min(s["n"], len(ctx.train_data), len(ctx.data))
        if s["attack"] == "loss":
            return Cost({"forward": 2 * n}, basis=f"{n} members + {n} non-members, one pass")
        spec = default_spec(tuple(ctx.classifier.input_shape))
        k, rest = s["shadow_models"], len(ctx.data) - n
        population = min(4 * 2 * n, rest) if s["attack"] == "rmia" and rest >= 50 else 0
        return Cost(
            {
                "forward": 2 * n + population,
                f"train:{spec.arch}": k * spec.epochs * n,
                f"forward:{spec.arch}": k * (2 * n + population),
            },
            basis=(
                f"{k} reference {spec.arch} models × {spec.epochs} epochs × {n} samples "
                f"(half of {2 * n}); their outputs on {2 * n + population} points"
            ),
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        if ctx.classifier is None or ctx.train_data is None or ctx.data is None:
            return self.skipped("needs a torch model, training data and test data", ctx)
        settings = PROFILE_SETTINGS[ctx.profile]
        cfg = AuditConfig(
            attack=settings["attack"],
            n=settings["n"],
            shadow_models=settings["shadow_models"],
            seed=ctx.seed,
        )
        res = audit_membership(
            ctx.classifier,
            ctx.train_data,
            ctx.data,
            cfg,
            cache_dir=ctx.run_dir.root / "reference-models",
        )
        return membership_probe_result(res, name=self.name, seed=ctx.seed)
