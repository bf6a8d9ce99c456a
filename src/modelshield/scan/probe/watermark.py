"""The watermark probe: does the scanned model carry the owner's trigger-set watermark?

Runs when the scan is given a key (``--watermark-key``, written by ``modelshield watermark
embed``) and a model or endpoint to query: it asks for the labels of the key's trigger
inputs and tests the matches against chance with an exact binomial p-value (Adi et al.,
USENIX Security 2018; :func:`modelshield.watermark.verify`). This is an ownership check,
not a weakness, so the probe is informational (no grade). The report shows the key's
public fingerprint, never its secret seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelshield.core.results import ProbeResult, WatermarkVerdict
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe

TITLE = "Watermark verification (trigger set, Adi et al. 2018)"


def _p(p: float) -> str:
    return "below 1e-300" if p <= 0 else f"{p:.3g}"


def verify_probe_result(
    verdict: WatermarkVerdict,
    key_public: dict[str, Any],
    *,
    model_sha256: str | None = None,
    seed: int | None = 0,
) -> ProbeResult:
    """The report section of one verification (shared by the scan and ``watermark verify``).

    ``key_public`` is :meth:`WatermarkKey.public_dict` (no seed). ``model_sha256``: the
    verified file's hash, compared with the one the key was embedded in.
    """
    v = verdict
    embedded = key_public.get("model_sha256")
    same_file = None if embedded is None or model_sha256 is None else embedded == model_sha256
    needed = v.details.get("matches_needed")
    line = (
        f"The model gives the key's secret label on {v.matches} of {v.n_triggers} trigger inputs "
        f"(chance {v.chance:.3g} each, so about {v.chance * v.n_triggers:.1f} expected); "
        f"p = {_p(v.p_value)} ({v.access} access)."
    )
    if v.verified:
        meaning = (
            f"{line} That is below the significance {v.significance:g}: the model carries the watermark "
            f"of key {key_public.get('key_id')}, strong evidence that it derives from the marked model."
        )
        advice = (
            "Keep result.json and the key as the record. Verification showed the trigger inputs to "
            "whoever runs this model: use a fresh key for a later check against the same party."
        )
    else:
        need = (
            f" (it would take {needed} matches)"
            if needed is not None
            else " (the key has too few triggers for this significance)"
        )
        meaning = (
            f"{line} Not below the significance {v.significance:g}{need}: no evidence of the watermark. "
            "Either the model was made without this key, or the mark was removed."
        )
        advice = (
            "If this model should carry your mark, check that the key belongs to it (key id, "
            "model SHA-256) and that the endpoint's labels follow the training label order; "
            "to mark a model of your own, use `modelshield harden watermark`."
        )
    if same_file is True:
        meaning += " The file is the very one the watermark was embedded in (same SHA-256)."
    lo, hi = v.details.get("trigger_accuracy_ci", [None, None])
    return ProbeResult(
        probe="watermark",
        title=TITLE,
        risk="watermark",
        status="ok",
        seed=seed,
        wall_time=v.wall_time,
        config={"significance": v.significance, "key": key_public},
        figure={"name": "p-value of the trigger matches under chance", "value": v.p_value},
        grade=None,
        meaning=meaning,
        recommendation=advice,
        threat={
            "check": "ownership (trigger-set watermark), informational: not graded",
            "test": "one-sided exact binomial test: P[Binomial(n, 1/K) >= matches]",
            "null": "the model was made without the key; its predictions are independent of the "
            "key's uniformly random labels",
            "access": v.access,
            "significance": v.significance,
        },
        details={
            "verified": v.verified,
            "p_value": v.p_value,
            "trigger_accuracy": v.trigger_accuracy,
            "matches": v.matches,
            "n_triggers": v.n_triggers,
            "chance": v.chance,
            "access": v.access,
            "key": key_public,
            "model_sha256": model_sha256,
            "same_file_as_embedded": same_file,
            **{k: val for k, val in v.details.items() if k not in ("null",)},
        },
        plots=[
            {
                "kind": "table",
                "title": "Trigger-set test",
                "columns": ["", "value"],
                "rows": [
                    ["matches", f"{v.matches} / {v.n_triggers}"],
                    ["trigger accuracy", round(v.trigger_accuracy, 4)],
                    [
                        "95% interval",
                        f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "n/a",
                    ],
                    ["chance (1/K)", round(v.chance, 6)],
                    ["p-value", _p(v.p_value)],
                    ["significance", v.significance],
                    ["verified", v.verified],
                ],
            }
        ],
        flags=["watermark-verified"] if v.verified else [],
    )


def verify_with_key(
    target: Any,
    key: Any,
    *,
    significance: float = 1e-6,
    model_sha256: str | None = None,
    seed: int | None = 0,
) -> ProbeResult:
    """What the probe measures, for a :class:`~modelshield.watermark.WatermarkKey` in memory
    (``harden watermark`` checks the model before and after, before the key is written)."""
    from modelshield.watermark import verify

    verdict = verify(target, key, significance=significance)
    return verify_probe_result(verdict, key.public_dict(), model_sha256=model_sha256, seed=seed)


@register_probe
class WatermarkProbe(Probe):
    """Ownership: verify the trigger-set watermark of --watermark-key on the model (Adi et al. 2018)."""

    name = "watermark"
    title = TITLE
    risk = "watermark"
    order = 6

    def applies(self, ctx: ScanContext) -> str | None:
        if not ctx.options.get("watermark_key"):
            return "no watermark key (--watermark-key, from `modelshield watermark embed`)"
        if (
            ctx.classifier is None
            and ctx.oracle is None
            and (ctx.model is None or ctx.model.oracle is None)
        ):
            return "no model or endpoint to query"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """One answer per trigger input of the key."""
        from modelshield.watermark import WatermarkKey

        n = WatermarkKey.load(Path(ctx.options["watermark_key"])).n
        unit = "forward" if ctx.classifier is not None else "query"
        return Cost({unit: n}, basis=f"{n} trigger inputs")

    def run(self, ctx: ScanContext) -> ProbeResult:
        from modelshield.watermark import WatermarkKey

        key = WatermarkKey.load(Path(ctx.options["watermark_key"]))
        target: Any = ctx.classifier
        if target is None:
            target = ctx.oracle if ctx.oracle is not None else ctx.model.oracle  # type: ignore[union-attr]
        significance = float(ctx.options.get("watermark_significance") or 1e-6)
        sha = ctx.model.file.sha256 if ctx.model is not None else None
        return verify_with_key(
            target, key, significance=significance, model_sha256=sha, seed=ctx.seed
        )
