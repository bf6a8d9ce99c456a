"""The DP claim probe: read the model's privacy ledger and check it is what it says.

A ledger (``modelshield train --dp`` writes ``ledger.json`` beside the model) claims
(epsilon, delta) for DP-SGD with sample rate q, noise multiplier sigma and T steps. The
probe recomputes epsilon from (q, sigma, T, delta) with the ledger's accountant and checks
the ledger was written for this model file (its SHA-256). Either mismatch means the claim
cannot be relied on (F); otherwise the grade follows the claimed epsilon.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from modelshield.core.errors import DataError, ModelShieldError
from modelshield.core.results import ProbeResult
from modelshield.scan.context import ScanContext
from modelshield.scan.probes import Probe, register_probe

# Recomputation agrees with the ledger within this (PRV's own error bound is 0.01).
EPS_TOLERANCE = (0.01, 0.02)  # (relative, absolute)


@register_probe
class DPClaimProbe(Probe):
    """Differential-privacy claim of the model: its ledger recomputed and matched to the file."""

    name = "dp-claim"
    title = "Differential privacy claim (ledger)"
    risk = "privacy"
    order = 5

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.options.get("dp_ledger") is None:
            return "no privacy ledger (ledger.json beside the model, or --dp-ledger)"
        return None

    def run(self, ctx: ScanContext) -> ProbeResult:
        from modelshield.privacy.accounting import compute_epsilon
        from modelshield.privacy.dp import PrivacyLedger
        from modelshield.scan.dp import dp_training_probe_result

        started = time.perf_counter()
        path = Path(ctx.options["dp_ledger"])
        try:
            ledger = PrivacyLedger.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read the privacy ledger {path}: {exc}") from exc
        try:
            recomputed = compute_epsilon(
                sample_rate=ledger.sample_rate,
                noise_multiplier=ledger.noise_multiplier,
                steps=ledger.steps,
                delta=ledger.delta,
                accountant=ledger.accountant,
            )
        except ModelShieldError as exc:
            return self.skipped(f"cannot recompute the ledger's epsilon: {exc}", ctx)
        claimed = float(ledger.epsilon)
        rel, absolute = EPS_TOLERANCE
        consistent = math.isclose(recomputed, claimed, rel_tol=rel, abs_tol=absolute)
        file_sha = ctx.model.file.sha256 if ctx.model is not None else None
        matches = ledger.model_sha256 is None or file_sha is None or ledger.model_sha256 == file_sha
        res = dp_training_probe_result(ledger, None, [], seed=ctx.seed)
        res.probe, res.title = self.name, self.title
        res.wall_time = time.perf_counter() - started
        res.details["ledger_path"] = str(path)
        res.details["recomputed_epsilon"] = recomputed
        res.details["model_sha256_matches"] = matches if ledger.model_sha256 else None
        problems = []
        if not consistent:
            problems.append(
                f"the ledger claims epsilon {claimed:.4g}, but its own parameters (q {ledger.sample_rate:.4g}, "
                f"sigma {ledger.noise_multiplier:.4g}, {ledger.steps} steps, delta {ledger.delta:g}) give "
                f"{recomputed:.4g} with the {ledger.accountant} accountant"
            )
            res.flags.append("ledger-inconsistent")
        if not matches:
            problems.append("the ledger was written for another model file (SHA-256 differs)")
            res.flags.append("ledger-model-mismatch")
        if problems:
            res.grade = "F"
            res.meaning = "The privacy claim cannot be relied on: " + "; ".join(problems) + "."
            res.recommendation = (
                "Retrain with `modelshield harden dp --epsilon E` (or `modelshield train --dp`) "
                "and ship the ledger it writes with the model."
            )
            res.threat["rule"] = res.details["rule"] = (
                "a ledger that does not match its model or its own parameters: F"
            )
        elif ledger.model_sha256 is None:
            res.meaning += (
                " The ledger does not name its model file, so it could belong to another model."
            )
        return res
