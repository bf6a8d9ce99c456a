"""White-box evasion probe: robust accuracy over an eps grid under an AutoAttack-style ensemble.

The evaluation (``evasion.evaluate_robustness``) attacks each eps in turn, checkpointing
every eps into the run directory, so an interrupted scan resumes at the next eps. The
figure is the per-sample worst-case robust accuracy at the reference eps with its
Clopper–Pearson interval; the evaluation's self-checks become the probe's flags.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.results import ProbeResult, RobustnessResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import evaluate_robustness, pgd
from modelshield.evasion.ensemble import FAST, STANDARD, Member
from modelshield.evasion.evaluate import RECHECK
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import REFERENCE_EPS, grade_evasion

logger = logging.getLogger(__name__)

# Multiples of the reference eps tested per profile, sample count and the ensemble run.
PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"n": 100, "grid": (0.25, 0.5, 1.0), "attack": "autoattack-fast", "scale_steps": 0.4},
    "standard": {
        "n": 500,
        "grid": (0.125, 0.25, 0.5, 1.0, 2.0),
        "attack": "autoattack-fast",
        "scale_steps": 1.0,
    },
    "thorough": {
        "n": 2000,
        "grid": (0.125, 0.25, 0.5, 1.0, 2.0),
        "attack": "autoattack",
        "scale_steps": 1.0,
    },
}
N_EXAMPLES = 3
EXAMPLE_STEPS = 50
"""PGD steps of the adversarial examples shown in the report."""
_MEMBERS: dict[str, tuple[Member, ...]] = {"autoattack": STANDARD, "autoattack-fast": FAST}


def ensemble_passes(attack: str, scale_steps: float, num_classes: int) -> tuple[float, float, str]:
    """(backward, forward) passes per attacked point of an ensemble run, and the formula.

    APGD runs ``steps`` forward+backward passes per target class (APGD-T at most
    ``num_classes - 1`` targets, none below 3 classes); Square spends one forward pass per
    query. Counted as if every member ran on every point: members after the first only
    attack the points still standing, so this is an upper bound.
    """
    backward = forward = 0.0
    terms = []
    for m in _MEMBERS[attack]:
        steps = max(1, round(m.kwargs.get("steps", m.kwargs.get("max_queries", 0)) * scale_steps))
        if m.attack == "square":
            forward += steps
            terms.append(f"square {steps} queries")
            continue
        targets = 1
        if m.attack == "apgd-t":
            if num_classes < 3:
                continue
            targets = min(int(m.kwargs.get("n_target_classes", 1)), num_classes - 1)
        backward += targets * steps
        terms.append(
            f"{m.attack} {targets}×{steps} steps" if targets > 1 else f"{m.attack} {steps} steps"
        )
    return backward, forward, " + ".join(terms)


@register_probe
class WhiteBoxEvasionProbe(Probe):
    """White-box evasion: worst-case robust accuracy of an AutoAttack-style ensemble."""

    name = "evasion-whitebox"
    title = "Evasion (white-box attacks)"
    risk = "evasion"
    order = 10

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.classifier is None:
            if ctx.model is not None:
                return f"the model ({ctx.model.kind}) gives no gradients; white-box attacks need a torch model"
            return "no white-box model given (--model)"
        if ctx.data is None:
            return "no test data given (--data)"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """Upper bound: every clean-correct point attacked by every member at every eps."""
        model, data = ctx.classifier, ctx.data
        if model is None or data is None:
            return Cost()
        settings = PROFILE_SETTINGS[ctx.profile]
        n = min(settings["n"], len(data))
        idx = torch.randperm(len(data), generator=make_generator(ctx.seed))[:n].sort().values
        correct = int((model.predict(data.x[idx].to(model.device)).cpu() == data.y[idx]).sum())
        bwd, fwd, formula = ensemble_passes(
            settings["attack"], settings["scale_steps"], model.num_classes
        )
        k = len(settings["grid"])
        points = correct * k + min(RECHECK, correct) * (k - 1)
        return Cost(
            {
                "forward": 2 * n + points * fwd,
                "backward": points * bwd + N_EXAMPLES * EXAMPLE_STEPS,
            },
            basis=(
                f"{correct} of {n} points correct × {k} eps (+ rechecks) × ({formula}); "
                f"{N_EXAMPLES} examples × {EXAMPLE_STEPS} PGD steps"
            ),
            bound="upper",
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        started = time.perf_counter()
        model, data = ctx.classifier, ctx.data
        if model is None or data is None:
            return self.skipped("needs a white-box model and test data", ctx)
        settings = PROFILE_SETTINGS[ctx.profile]
        low, high = model.bounds
        ref = float(ctx.options.get("eps") or REFERENCE_EPS[ctx.norm] * (high - low))
        grid = [ref * m for m in settings["grid"]]
        n = min(settings["n"], len(data))
        idx = torch.randperm(len(data), generator=make_generator(ctx.seed))[:n].sort().values
        x, y = data.x[idx].to(model.device), data.y[idx].to(model.device)
        res = evaluate_robustness(
            model,
            x,
            y,
            norm=ctx.norm,
            eps_grid=grid,
            attack=settings["attack"],
            attack_kwargs={"scale_steps": settings["scale_steps"]},
            seed=ctx.seed,
            checkpoint=functools.partial(ctx.run_dir.checkpoint, self.name),
        )
        k_ref = settings["grid"].index(1.0)
        ref_acc, ref_ci = res.robust_accuracy[k_ref], res.ci[k_ref]
        grade, rule = grade_evasion(res.clean_accuracy, ref_acc)
        eps_txt = self._eps_text(ctx.norm, ref, high - low)
        meaning = (
            f"Of {n} test samples, {res.clean_accuracy:.1%} are classified correctly; an attacker "
            f"who may change each input by {eps_txt} in {ctx.norm} norm keeps only "
            f"{ref_acc:.1%} correct (95% CI {ref_ci[0]:.1%}–{ref_ci[1]:.1%})."
        )
        advice = (
            "Harden the model with adversarial training (`modelshield harden adversarial "
            f"--method pgd-at --norm {ctx.norm} --eps {ref:.4g}`) and re-scan."
            if grade not in ("A", "B")
            else "Robustness holds against the ensemble at this budget; keep it in the release "
            "checks and run the `thorough` profile (full AutoAttack with Square) before relying on it."
        )
        plots: list[dict[str, Any]] = [self._curve_plot(res)]
        examples = self._examples(ctx, model, x, y, res, ref)
        if examples:
            plots.append(
                {
                    "kind": "images",
                    "title": f"Adversarial examples at eps {ref:.4g}",
                    "images": examples,
                }
            )
        curve = [
            {"eps": e, "robust_accuracy": a, "ci": c, "fooled_by": f, "queries": q}
            for e, a, c, f, q in zip(
                res.eps, res.robust_accuracy, res.ci, res.fooled_by, res.queries, strict=True
            )
        ]
        return ProbeResult(
            probe=self.name,
            title=self.title,
            risk=self.risk,
            status="ok",
            seed=ctx.seed,
            wall_time=time.perf_counter() - started,
            config={"profile": ctx.profile, **settings, "grid": grid},
            figure={
                "name": f"robust accuracy at {ctx.norm} eps {ref:.4g}",
                "value": ref_acc,
                "ci": ref_ci,
                "confidence": 0.95,
            },
            grade=grade,
            meaning=meaning,
            recommendation=advice,
            threat={
                "norm": ctx.norm,
                "eps": ref,
                "bounds": list(model.bounds),
                "targeted": False,
                "access": "white-box (gradients)",
                "attack": settings["attack"],
                "rule": rule,
            },
            details={
                "samples": n,
                "clean_accuracy": res.clean_accuracy,
                "clean_ci": res.clean_ci,
                "curve": curve,
                "attack": settings["attack"],
                "checks": res.checks,
                "rule": rule,
            },
            plots=plots,
            flags=res.flags,
        )

    @staticmethod
    def _curve_plot(res: RobustnessResult) -> dict[str, Any]:
        return {
            "kind": "line",
            "title": f"Robust accuracy vs {res.norm} eps ({res.attack})",
            "x_label": f"eps ({res.norm})",
            "y_label": "accuracy",
            "x_scale": "linear",
            "y_scale": "linear",
            "series": [
                {"name": "clean", "x": res.eps, "y": [res.clean_accuracy] * len(res.eps)},
                {
                    "name": "robust (worst case)",
                    "x": res.eps,
                    "y": res.robust_accuracy,
                    "lo": [c[0] for c in res.ci],
                    "hi": [c[1] for c in res.ci],
                },
            ],
        }

    @staticmethod
    def _eps_text(norm: str, eps: float, width: float) -> str:
        if norm == "linf":
            return f"at most {eps:.4g} per feature (= {eps / width * 255:.3g}/255 of the range)"
        return f"a perturbation of {norm} norm {eps:.4g}"

    @staticmethod
    def _examples(
        ctx: ScanContext,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        res: RobustnessResult,
        ref: float,
    ) -> list[dict[str, Any]]:
        """Clean/adversarial pairs for the samples that fall at the smallest eps."""
        if res.robust is None or res.clean_correct is None:
            return []
        if x.ndim not in (2, 4) or (x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 != x.shape[1]):
            return []
        n_eps = res.robust.shape[1]
        fell = res.clean_correct[:, None] & ~res.robust
        first = torch.where(fell.any(1), fell.float().argmax(1), torch.full((len(x),), n_eps))
        order = torch.argsort(first, stable=True)
        picked = [int(j) for j in order if first[j] < n_eps][:N_EXAMPLES]
        if not picked:
            return []
        sel = torch.tensor(picked, device=x.device)
        threat = LpThreat(norm=ctx.norm, eps=ref, bounds=model.bounds)  # type: ignore[arg-type]
        adv = pgd(model, x[sel], y[sel], threat=threat, steps=EXAMPLE_STEPS, seed=ctx.seed)
        if adv.x_adv is None:
            return []
        adv_pred = model.predict(adv.x_adv)
        low, high = model.bounds
        images = []
        for k, j in enumerate(picked):
            pairs = (("clean", x[j], int(y[j])), ("adversarial", adv.x_adv[k], int(adv_pred[k])))
            for label, img, pred in pairs:
                arr = ((img.detach().cpu().float() - low) / (high - low)).clamp(0, 1)
                if arr.ndim == 1:
                    side = math.isqrt(arr.numel())
                    arr = arr.view(side, side)
                images.append(
                    {
                        "caption": f"sample {j} {label}: predicted {pred}",
                        "shape": list(arr.shape),
                        "data": [round(float(v), 4) for v in arr.flatten()],
                    }
                )
        return images
