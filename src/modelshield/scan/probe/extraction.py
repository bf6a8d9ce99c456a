"""Extraction probe: how much of the model can an attacker with query access copy?

Runs Knockoff Nets (Orekondy et al., CVPR 2019) through the model's query interface with
half of the test data as the attacker's pool and the other half to measure fidelity (top-1
agreement of copy and model). The budget comes from the profile (``quick`` 500,
``standard`` 2000, ``thorough`` 10000 queries) unless ``options["extraction_queries"]``
sets it (``harden gateway --queries``), capped by the pool's size; the grade reads the
fidelity reached at that budget.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from modelshield.core.metrics import clopper_pearson
from modelshield.core.oracle import Oracle, from_classifier
from modelshield.core.results import ExtractionResult, ProbeResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import QueryAccess
from modelshield.extraction import knockoff
from modelshield.extraction.base import MIN_TRAIN_STEPS, default_arch, default_checkpoints
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import grade_extraction

logger = logging.getLogger(__name__)

PROFILE_BUDGETS = {"quick": 500, "standard": 2000, "thorough": 10000}
"""Knockoff queries per profile (capped by the pool: half of the test data)."""
PROFILE_EPOCHS = {"quick": 20, "standard": 30, "thorough": 30}
COPY_BATCH = 64
"""Batch size of the copies' training (knockoff's default)."""
COPY_LR = 3e-3
"""Adam learning rate of the copies: a stronger attacker than the library default 1e-3 on
the small transfer sets of a scan (the built-in small_cnn learns slowly at 1e-3)."""
MIN_DATA = 20
"""Fewer test samples than this leave too small a pool and evaluation set to say anything."""

# Fidelity of the copy at the profile's budget. Temporary home: the lead moves these into
# scan/rubric.py (with the rubric text and a RUBRIC_VERSION bump).
_METHOD_TITLES = {
    "knockoff": "Knockoff Nets",
    "equation": "equation solving",
    "jacobian": "Jacobian-based augmentation",
}


def extraction_probe_result(
    res: ExtractionResult, *, seed: int = 0, note: str = "", probe: str = "extraction"
) -> ProbeResult:
    """Grade and explain an extraction result (shared by the scan and ``modelshield steal``)."""
    n_eval = int(res.details.get("n_eval") or 0)
    agree = res.details.get("agree")
    fid = res.fidelity
    have_fid = fid is not None and not math.isnan(fid) and n_eval > 0
    figure: dict[str, Any] = {
        "name": f"fidelity at {res.queries_used} queries",
        "value": fid if have_fid else None,
    }
    grade: str | None = None
    rule = "no held-out inputs to measure fidelity on: not graded"
    if have_fid:
        grade, rule = grade_extraction(fid)
        if isinstance(agree, int):
            figure["ci"] = list(clopper_pearson(agree, n_eval))
            figure["confidence"] = 0.95
    method = _METHOD_TITLES.get(res.method, res.method)
    access = (res.config.get("access") or {}).get("output", "?")
    acc = ""
    if res.accuracy is not None:
        acc = f" Its accuracy is {res.accuracy:.1%}"
        acc += (
            f" (the model's: {res.victim_accuracy:.1%})."
            if res.victim_accuracy is not None
            else "."
        )
    meaning = (
        f"With {res.queries_used} queries answered with {access}, {method} built a copy that "
        f"agrees with the model on {fid:.1%} of {n_eval} held-out inputs.{acc} "
        "An attacker can use such a copy instead of paying for the API, or to craft "
        "adversarial examples that transfer to the model."
        if have_fid
        else f"{method} spent {res.queries_used} queries; fidelity was not measured."
    )
    if note:
        meaning += f" {note}"
    recommendation = (
        "Put the model behind a defended gateway: `modelshield harden gateway --defense "
        "label-only --defense budget=N --defense prada=0.9,action=block` measures this probe "
        "against the undefended and the defended API and writes gateway.json for "
        "`modelshield serve --config` (labels only, per-client budgets and rates, the PRADA "
        "detector of Juuti et al. 2019). Watermark the model (`modelshield harden watermark`) "
        "to prove ownership of a copy."
        if grade not in ("A", "B")
        else "The copy stays far from the model at this budget; keep per-client query limits."
    )
    series: list[dict[str, Any]] = [
        {
            "name": "fidelity",
            "x": [r["queries"] for r in res.curve],
            "y": [r.get("fidelity") for r in res.curve],
        }
    ]
    if any(r.get("accuracy") is not None for r in res.curve):
        series.append(
            {
                "name": "copy accuracy",
                "x": [r["queries"] for r in res.curve],
                "y": [r.get("accuracy") for r in res.curve],
            }
        )
    plots: list[dict[str, Any]] = []
    if have_fid and len(res.curve) > 0:
        plots.append(
            {
                "kind": "line",
                "title": f"Copy fidelity vs queries ({method})",
                "x_label": "queries",
                "y_label": "fidelity",
                "x_scale": "log" if len(res.curve) > 1 else "linear",
                "y_scale": "linear",
                "series": series,
            }
        )
    return ProbeResult(
        probe=probe,
        title=f"Extraction ({method})",
        risk="extraction",
        status="ok",
        seed=seed,
        wall_time=res.wall_time,
        config=res.config,
        figure=figure,
        grade=grade,
        meaning=meaning,
        recommendation=recommendation,
        threat={
            "attacker": "queries the model's API and trains a copy on the answers",
            "method": res.method,
            "access": access,
            "queries": res.queries_used,
            "rule": rule,
        },
        details={
            **res.details,
            "fidelity": fid if have_fid else None,
            "accuracy": res.accuracy,
            "victim_accuracy": res.victim_accuracy,
            "queries_used": res.queries_used,
            "curve": res.curve,
            "transfer": res.transfer,
            "rule": rule,
        },
        plots=plots,
        flags=["extractable"] if grade in ("D", "F") else [],
    )


def _oracle(ctx: ScanContext) -> Oracle | None:
    if ctx.oracle is not None:
        return ctx.oracle
    if ctx.model is not None and ctx.model.oracle is not None:
        return ctx.model.oracle
    if ctx.classifier is not None:
        return from_classifier(ctx.classifier, QueryAccess(output="probs"))
    return None


@register_probe
class ExtractionProbe(Probe):
    """Model stealing: Knockoff Nets with half the test data as the attacker's pool."""

    name = "extraction"
    title = "Extraction (Knockoff Nets)"
    risk = "extraction"
    order = 40

    def applies(self, ctx: ScanContext) -> str | None:
        if _oracle(ctx) is None:
            return "no model to query (--model or --oracle)"
        if ctx.data is None:
            return "no test data given (--data): the attacker's pool and the evaluation set come from it"
        if len(ctx.data) < MIN_DATA:
            return f"--data has {len(ctx.data)} samples; the probe needs at least {MIN_DATA}"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Queries, then one copy trained from scratch at each of Knockoff's checkpoints."""
        if ctx.data is None:
            return Cost()
        half = len(ctx.data) // 2
        budget = int(ctx.options.get("extraction_queries") or PROFILE_BUDGETS[ctx.profile])
        queries = min(budget, half)
        stops = default_checkpoints(queries)
        epochs = PROFILE_EPOCHS[ctx.profile]
        arch = default_arch(tuple(ctx.data.x.shape[1:]))
        n_eval = len(ctx.data) - half
        black_box = ctx.oracle is not None or (ctx.model is not None and ctx.model.oracle)
        answer = "query" if black_box else "forward"
        trained = 0.0  # samples through the copies' training steps
        for n in stops:
            per_epoch = math.ceil(n / COPY_BATCH)
            # train_copy runs at least MIN_TRAIN_STEPS steps, however small the set
            trained += max(epochs * per_epoch, MIN_TRAIN_STEPS) * n / per_epoch
        return Cost(
            {
                answer: queries + n_eval,
                f"train:{arch}": trained,
                f"forward:{arch}": n_eval * len(stops),
            },
            basis=(
                f"{queries} queries + {n_eval} evaluation labels; a {arch} copy trained "
                f"{epochs} epochs (at least {MIN_TRAIN_STEPS} steps of {COPY_BATCH}) at each of "
                f"{len(stops)} budgets ({', '.join(map(str, stops))})"
            ),
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        started = time.perf_counter()
        base, data = _oracle(ctx), ctx.data
        if base is None or data is None:
            return self.skipped("needs a model to query and test data", ctx)
        perm = torch.randperm(len(data), generator=make_generator(ctx.seed))
        half = len(data) // 2
        pool_idx, eval_idx = perm[:half].sort().values, perm[half:].sort().values
        budget = int(ctx.options.get("extraction_queries") or PROFILE_BUDGETS[ctx.profile])
        queries = min(budget, half)
        scores = base.raw_output != "label" and base.access.output != "label"
        saved = base.access
        # The attacker sees what the API gives; evaluation labels come from the back-end,
        # uncharged (or from the white-box model when there is one).
        base.access = QueryAccess(output=("probs" if scores else "label"))
        victim = ctx.classifier if ctx.classifier is not None else base
        try:
            _, res = knockoff(
                base,
                data.x[pool_idx],
                queries=queries,
                num_classes=base.num_classes or data.num_classes,
                strategy="random",
                epochs=PROFILE_EPOCHS[ctx.profile],
                batch_size=COPY_BATCH,
                lr=COPY_LR,
                seed=ctx.seed,
                x_eval=data.x[eval_idx],
                y_eval=data.y[eval_idx],
                victim=victim,
                device=ctx.device,
            )
        finally:
            base.access = saved
        note = (
            f"The budget of {budget} queries was capped at the pool's "
            f"size ({half}: half of --data)."
            if queries < budget
            else ""
        )
        result = extraction_probe_result(res, seed=ctx.seed, note=note, probe=self.name)
        result.title = self.title
        result.config = {**res.config, "profile": ctx.profile, "budget": budget}
        result.wall_time = time.perf_counter() - started
        return result
