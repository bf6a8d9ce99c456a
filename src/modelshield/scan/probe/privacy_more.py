"""Model-inversion and attribute-inference probes.

Model inversion (MI-Face, Fredrikson et al. 2015) runs on white-box image models: one
representative per class, compared with the real class means. Attribute inference
(Fredrikson et al. 2014) runs on tabular models when the scan names a sensitive column
(``--sensitive-feature``): the attack's accuracy against a baseline without model access.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modelshield.core.oracle import from_classifier
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import QueryAccess
from modelshield.privacy.attribute import AttributeInferenceResult, fredrikson_attribute_inference
from modelshield.privacy.inversion import InversionResult, mi_face
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import grade_attribute, grade_inversion

INVERSION_STEPS = {"quick": 100, "standard": 300, "thorough": 1000}
TARGETS, AUX = 300, 500
"""Attribute inference: records attacked, and auxiliary records the attacker holds."""


def inversion_probe_result(res: InversionResult, *, seed: int = 0) -> ProbeResult:
    """Grade and explain an MI-Face result (shared by the scan and `audit inversion`)."""
    grade, rule = grade_inversion(res.nearest_fraction)
    images: list[dict[str, Any]] = []
    if res.images is not None:
        for k, c in enumerate(res.classes[:16]):
            img = res.images[k].detach().cpu().float()
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else img * 0
            if img.ndim == 3 and img.shape[0] not in (1, 3):
                continue
            conf = float(res.confidence[k]) if res.confidence is not None else math.nan
            images.append(
                {
                    "caption": f"class {c} (confidence {conf:.2f})",
                    "shape": list(img.shape),
                    "data": [round(float(v), 4) for v in img.flatten()],
                }
            )
    return ProbeResult(
        probe="model-inversion",
        title="Model inversion (MI-Face)",
        risk="privacy",
        status="ok",
        seed=seed,
        wall_time=res.wall_time,
        config=res.config,
        figure={
            "name": "classes whose representative is nearest its class mean",
            "value": res.nearest_fraction,
        },
        grade=grade,
        meaning=(
            f"Gradient inversion recovered one input per class; {res.nearest_fraction:.0%} of them lie "
            f"nearest their own class's mean image (chance {1 / max(len(res.classes), 1):.0%}), "
            f"mean cosine similarity {res.mean_cosine:.2f}. This matters when a class is a person."
        ),
        recommendation=(
            "If classes identify people, retrain with differential privacy (`modelshield harden "
            "dp`) and expose only labels (`modelshield harden gateway --defense label-only`); "
            "otherwise this is expected of an accurate model."
        ),
        threat={"attacker": "white-box access, reconstructs class representatives", "rule": rule},
        details={
            "mean_confidence": res.mean_confidence,
            "mean_cosine": res.mean_cosine,
            "mean_mse": res.mean_mse,
            "classes": res.classes,
            "rule": rule,
        },
        plots=[{"kind": "images", "title": "Class representatives", "images": images}]
        if images
        else [],
    )


@register_probe
class InversionProbe(Probe):
    """Model inversion: class representatives reconstructed from a white-box image model."""

    name = "model-inversion"
    title = "Model inversion (MI-Face)"
    risk = "privacy"
    order = 31

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.classifier is None:
            return "needs a white-box torch model"
        if ctx.data is None:
            return "no test data given (--data) to compare representatives with"
        if len(ctx.classifier.input_shape) != 3:
            return "inputs are not images (C, H, W); class representatives mean little there"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Gradient steps on one input per class."""
        if ctx.classifier is None:
            return Cost()
        k, steps = ctx.classifier.num_classes, INVERSION_STEPS[ctx.profile]
        return Cost({"backward": k * steps}, basis=f"{k} classes × {steps} steps")

    def run(self, ctx: ScanContext) -> ProbeResult:
        if ctx.classifier is None or ctx.data is None:
            return self.skipped("needs a white-box model and data", ctx)
        res = mi_face(
            ctx.classifier,
            steps=INVERSION_STEPS[ctx.profile],
            tv_weight=0.01,
            reference=(ctx.data.x, ctx.data.y),
            seed=ctx.seed,
        )
        result = inversion_probe_result(res, seed=ctx.seed)
        # A scan cannot tell whether a class is a person; graded, an accurate digit or object
        # classifier would look like a leak. The figure stays; `audit inversion` grades it.
        result.details["grade_if_classes_are_people"] = result.grade
        result.grade = None
        result.threat["rule"] = "informational in a scan: graded by `modelshield audit inversion`"
        return result


def candidate_values(column: torch.Tensor, max_values: int = 10) -> list[float]:
    """The sensitive column's distinct values, or quantile bin centres when there are many."""
    distinct = torch.unique(column)
    if len(distinct) <= max_values:
        return [float(v) for v in distinct]
    qs = torch.linspace(0.5 / 5, 1 - 0.5 / 5, 5, dtype=torch.float64)
    return sorted({float(v) for v in torch.quantile(column.double(), qs)})


def attribute_probe_result(res: AttributeInferenceResult, *, seed: int = 0) -> ProbeResult:
    """Grade and explain an attribute-inference result."""
    lower = res.advantage_ci[0] if res.advantage_ci else res.advantage
    grade, rule = grade_attribute(lower)
    return ProbeResult(
        probe="attribute-inference",
        title=f"Attribute inference (column {res.sensitive})",
        risk="privacy",
        status="ok",
        seed=seed,
        wall_time=res.wall_time,
        config=res.config,
        figure={
            "name": "accuracy advantage over a baseline without model access",
            "value": res.advantage,
            "ci": list(res.advantage_ci),
            "confidence": res.confidence,
        },
        grade=grade,
        meaning=(
            f"Querying the model, the attacker guesses feature {res.sensitive} right {res.accuracy:.1%} of the "
            f"time; without the model, {res.baseline_accuracy:.1%} (prior alone {res.prior_accuracy:.1%})."
        ),
        recommendation=(
            "The model reveals the sensitive feature beyond what the other features do: drop or "
            "decorrelate it, expose labels only (`modelshield harden gateway --defense "
            "label-only`), or retrain with differential privacy (`modelshield harden dp`)."
            if grade not in ("A", "B")
            else "No leak beyond the baseline at this strength."
        ),
        threat={
            "attacker": "knows a record's other features and label, queries the model",
            "attack": res.attack,
            "queries": res.queries,
            "rule": rule,
        },
        details={
            "accuracy": res.accuracy,
            "baseline_accuracy": res.baseline_accuracy,
            "prior_accuracy": res.prior_accuracy,
            "values": res.values,
            "rule": rule,
        },
    )


@register_probe
class AttributeProbe(Probe):
    """Attribute inference of the column named by --sensitive-feature (tabular models)."""

    name = "attribute-inference"
    title = "Attribute inference"
    risk = "privacy"
    order = 32

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.options.get("sensitive_feature") is None:
            return "no sensitive column named (--sensitive-feature INDEX)"
        if ctx.data is None:
            return "no data given (--data)"
        if ctx.data.x.ndim != 2:
            return "attribute inference is for tabular data (N, D)"
        if ctx.classifier is None and (ctx.model is None or ctx.model.oracle is None):
            return "no model to query"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Each target queried once per candidate value, plus the auxiliary records."""
        data = ctx.data
        if data is None or data.x.ndim != 2:
            return Cost()
        col = int(ctx.options["sensitive_feature"])
        targets = ctx.train_data if ctx.train_data is not None else data
        n, n_aux = min(TARGETS, len(targets)), min(AUX, len(data))
        v = len(candidate_values(data.x[:, col]))
        unit = "forward" if ctx.classifier is not None else "query"
        return Cost(
            {unit: n * v + n_aux},
            basis=f"{n} targets × {v} candidate values + {n_aux} auxiliary records (baseline MLP not counted)",
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        data, col = ctx.data, int(ctx.options["sensitive_feature"])
        if data is None:
            return self.skipped("no data", ctx)
        oracle = (
            from_classifier(ctx.classifier, QueryAccess(output="probs"))
            if ctx.classifier is not None
            else ctx.model.oracle
            if ctx.model is not None
            else None
        )
        if oracle is None:
            return self.skipped("no model to query", ctx)
        targets = ctx.train_data if ctx.train_data is not None else data
        n = min(TARGETS, len(targets))
        g = make_generator(ctx.seed)
        t_idx = torch.randperm(len(targets), generator=g)[:n]
        a_idx = torch.randperm(len(data), generator=g)[: min(AUX, len(data))]
        res = fredrikson_attribute_inference(
            oracle,
            targets.x[t_idx],
            targets.y[t_idx],
            sensitive=col,
            values=candidate_values(data.x[:, col]),
            aux_x=data.x[a_idx],
            aux_y=data.y[a_idx],
            seed=ctx.seed,
        )
        return attribute_probe_result(res, seed=ctx.seed)
