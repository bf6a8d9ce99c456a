"""Black-box evasion probe: when the model gives no gradients, attack it through its answers.

Square (Andriushchenko et al. 2020) when the oracle returns scores, HopSkipJump (Chen et al.
2020) when it returns labels only; per-sample query budgets from the profile. Each eps is
checkpointed. Robust accuracy here is an upper bound: a white-box attacker would do
better, so the grade reads the figure as the attacker with API access would see it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.oracle import Oracle
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat, QueryAccess
from modelshield.evasion.run import run_attack
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import REFERENCE_EPS, grade_evasion

logger = logging.getLogger(__name__)

PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"n": 50, "grid": (0.5, 1.0), "queries": 300},
    "standard": {"n": 200, "grid": (0.25, 0.5, 1.0, 2.0), "queries": 1000},
    "thorough": {"n": 500, "grid": (0.125, 0.25, 0.5, 1.0, 2.0), "queries": 5000},
}


def _oracle(ctx: ScanContext) -> Oracle | None:
    if ctx.oracle is not None:
        return ctx.oracle
    return ctx.model.oracle if ctx.model is not None else None


@register_probe
class BlackBoxEvasionProbe(Probe):
    """Black-box evasion: Square (scores) or HopSkipJump (labels) over an eps grid."""

    name = "evasion-blackbox"
    title = "Evasion (black-box, query access only)"
    risk = "evasion"
    order = 11

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.classifier is not None:
            return (
                "a white-box model is available; the white-box probe measures the stronger attacker"
            )
        if _oracle(ctx) is None:
            return "no black-box model given (--oracle URL, or --model with an ONNX or scikit-learn file)"
        if ctx.data is None:
            return "no test data given (--data)"
        if ctx.norm not in ("linf", "l2"):
            return f"black-box attacks support linf and l2, not {ctx.norm}"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Upper bound: every point spends its whole query budget at every eps."""
        if ctx.data is None:
            return Cost()
        settings = PROFILE_SETTINGS[ctx.profile]
        n, k, q = min(settings["n"], len(ctx.data)), len(settings["grid"]), settings["queries"]
        return Cost(
            {"query": n + n * k * q},
            basis=f"{n} points × {k} eps × at most {q} queries, + {n} clean queries",
            bound="upper",
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        started = time.perf_counter()
        base, data = _oracle(ctx), ctx.data
        if base is None or data is None:
            return self.skipped("needs an oracle and test data", ctx)
        settings = PROFILE_SETTINGS[ctx.profile]
        before = base.queries_used  # the oracle may have answered others (the time calibration)
        label_only = base.raw_output == "label" or base.access.output == "label"
        attack = "hopskipjump" if label_only else "square"
        low, high = ctx.options.get("bounds", (0.0, 1.0))
        ref = float(ctx.options.get("eps") or REFERENCE_EPS[ctx.norm] * (high - low))
        grid = [ref * m for m in settings["grid"]]
        n = min(settings["n"], len(data))
        idx = torch.randperm(len(data), generator=make_generator(ctx.seed))[:n].sort().values
        x, y = data.x[idx], data.y[idx]
        base.access = QueryAccess(output="label" if label_only else base.access.output)
        clean_correct = (base.predict(x).cpu() == y).cpu()
        still = clean_correct.clone()
        curve = []
        for k, eps in enumerate(grid):
            threat = LpThreat(norm=ctx.norm, eps=eps, bounds=(low, high))  # type: ignore[arg-type]

            def compute(
                k: int = k, threat: LpThreat = threat, prev: torch.Tensor = still
            ) -> dict[str, Any]:
                todo = prev.nonzero().squeeze(1)
                logger.info(
                    "black-box evasion: %s eps %.4g on %d points", attack, threat.eps, len(todo)
                )
                robust = prev.clone()
                queries = 0
                if len(todo):
                    res = run_attack(
                        attack,
                        base,
                        x[todo],
                        y[todo],
                        threat=threat,
                        seed=ctx.seed + k,
                        max_queries=settings["queries"],
                    )
                    if res.success is not None:
                        robust[todo[res.success.cpu()]] = False
                    queries = int(res.queries.sum()) if res.queries is not None else 0
                return {"eps": threat.eps, "robust": robust.tolist(), "queries": queries}

            row = ctx.run_dir.checkpoint(
                self.name, f"{attack}-{ctx.norm}-eps{k}-{eps:.6g}", compute
            )
            still = torch.tensor(row["robust"], dtype=torch.bool)
            acc, ci = accuracy_with_ci(still)
            curve.append(
                {"eps": eps, "robust_accuracy": acc, "ci": list(ci), "queries": row["queries"]}
            )
        clean_acc, clean_ci = accuracy_with_ci(clean_correct)
        ref_row = curve[settings["grid"].index(1.0)]
        grade, rule = grade_evasion(clean_acc, ref_row["robust_accuracy"])
        meaning = (
            f"With query access only ({attack}, at most {settings['queries']} queries per input), "
            f"an attacker who may change each input by {ref:.4g} in {ctx.norm} norm keeps "
            f"{ref_row['robust_accuracy']:.1%} of {n} inputs correct (clean {clean_acc:.1%}). "
            "A white-box attacker would do at least as well."
        )
        advice = (
            "Adversarial training (`modelshield harden adversarial`) on the source model; "
            "restricting the API to labels slows score-based attacks but does not stop "
            "label-only ones."
            if grade not in ("A", "B")
            else "Resists this query budget; scan the source model white-box before relying on it."
        )
        return ProbeResult(
            probe=self.name,
            title=self.title,
            risk=self.risk,
            status="ok",
            seed=ctx.seed,
            wall_time=time.perf_counter() - started,
            config={"profile": ctx.profile, **settings, "attack": attack, "grid": grid},
            figure={
                "name": f"robust accuracy at {ctx.norm} eps {ref:.4g} (black-box)",
                "value": ref_row["robust_accuracy"],
                "ci": ref_row["ci"],
                "confidence": 0.95,
            },
            grade=grade,
            meaning=meaning,
            recommendation=advice,
            threat={
                "norm": ctx.norm,
                "eps": ref,
                "bounds": [low, high],
                "access": base.access.output,
                "attack": attack,
                "queries_per_input": settings["queries"],
                "rule": rule,
            },
            details={
                "samples": n,
                "clean_accuracy": clean_acc,
                "clean_ci": list(clean_ci),
                "curve": curve,
                "queries_used": base.queries_used - before,
                "rule": rule,
            },
            plots=[
                {
                    "kind": "line",
                    "title": f"Robust accuracy vs {ctx.norm} eps ({attack})",
                    "x_label": f"eps ({ctx.norm})",
                    "y_label": "accuracy",
                    "x_scale": "linear",
                    "y_scale": "linear",
                    "series": [
                        {"name": "clean", "x": grid, "y": [clean_acc] * len(grid)},
                        {
                            "name": "robust",
                            "x": grid,
                            "y": [c["robust_accuracy"] for c in curve],
                            "lo": [c["ci"][0] for c in curve],
                            "hi": [c["ci"][1] for c in curve],
                        },
                    ],
                }
            ],
        )
