"""White-box evasion probe: robust accuracy over an eps grid (FGSM + PGD, worst case).

Per eps, a sample counts as robust only if it is classified correctly on the clean input
and under every attack run (per-sample worst case). Each eps is checkpointed, so an
interrupted scan resumes at the next eps. The figure is the worst-case robust accuracy at
the reference eps with its Clopper–Pearson interval.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import make_generator
from modelshield.core.threat import LpThreat
from modelshield.evasion import fgsm, pgd
from modelshield.scan.context import ScanContext
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import REFERENCE_EPS, grade_evasion

logger = logging.getLogger(__name__)

# Multiples of the reference eps tested per profile, with sample count and PGD settings.
PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    "quick": {"n": 100, "grid": (0.25, 0.5, 1.0), "steps": 10, "restarts": 1},
    "standard": {"n": 500, "grid": (0.125, 0.25, 0.5, 1.0, 2.0), "steps": 20, "restarts": 1},
    "thorough": {"n": 2000, "grid": (0.125, 0.25, 0.5, 1.0, 2.0), "steps": 50, "restarts": 3},
}
BATCH = 256
N_EXAMPLES = 6


def _batched(
    fn: Any, model: Classifier, x: torch.Tensor, y: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """Success mask of an attack run over batches."""
    out = [
        fn(model, x[i : i + BATCH], y[i : i + BATCH], **kw).success for i in range(0, len(x), BATCH)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def _validity_flags(
    model: Classifier, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[str], dict[str, Any]]:
    """AutoAttack-style self-checks: probabilities as outputs, zero gradients, randomness."""
    flags: list[str] = []
    xb = x[:BATCH].clone().requires_grad_(True)
    logits = model(xb)
    with torch.no_grad():
        again = model(xb.detach())
    rows = logits.detach()
    if bool(((rows >= 0) & (rows <= 1)).all()) and bool(
        torch.allclose(rows.sum(dim=1), torch.ones(len(rows), device=rows.device), atol=1e-3)
    ):
        flags.append(
            "model outputs look like probabilities, not logits: cross-entropy attacks "
            "may be weakened (gradient masking)"
        )
    if not torch.allclose(rows, again, atol=1e-5):
        flags.append(
            "model is randomised (two forward passes differ): use EOT-style attacks "
            "before trusting robust accuracy"
        )
    loss = torch.nn.functional.cross_entropy(logits, y[:BATCH].to(logits.device), reduction="sum")
    (grad,) = torch.autograd.grad(loss, xb)
    gnorm = grad.flatten(1).abs().amax(dim=1)
    zero_frac = float((gnorm == 0).float().mean())
    nan_frac = float((~torch.isfinite(gnorm)).float().mean())
    if zero_frac > 0.1:
        flags.append(f"zero input gradients for {zero_frac:.0%} of samples (gradient masking?)")
    if nan_frac > 0:
        flags.append(f"NaN gradients for {nan_frac:.0%} of samples")
    return flags, {"zero_gradient_fraction": zero_frac, "nan_gradient_fraction": nan_frac}


@register_probe
class WhiteBoxEvasionProbe(Probe):
    """White-box evasion: worst-case robust accuracy of FGSM and PGD over an eps grid."""

    name = "evasion-whitebox"
    title = "Evasion (white-box gradient attacks)"
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

    def run(self, ctx: ScanContext) -> ProbeResult:
        started = time.perf_counter()
        model, data = ctx.classifier, ctx.data
        if model is None or data is None:
            return self.skipped("needs a white-box model and test data", ctx)
        settings = PROFILE_SETTINGS[ctx.profile]
        low, high = model.bounds
        ref = REFERENCE_EPS[ctx.norm] * (high - low)
        grid = [ref * m for m in settings["grid"]]
        g = make_generator(ctx.seed)
        n = min(settings["n"], len(data))
        idx = torch.randperm(len(data), generator=g)[:n].sort().values
        x, y = data.x[idx].to(model.device), data.y[idx].to(model.device)
        clean_correct = (model.predict(x) == y).cpu()
        clean_acc, clean_ci = accuracy_with_ci(clean_correct)
        flags, checks = _validity_flags(model, x, y)

        def at_eps(i: int, eps: float) -> dict[str, Any]:
            threat = LpThreat(norm=ctx.norm, eps=eps, bounds=model.bounds)  # type: ignore[arg-type]
            logger.info("evasion: eps %.4g (%d/%d) on %d samples", eps, i + 1, len(grid), n)
            t0 = time.perf_counter()
            f_succ = _batched(fgsm, model, x, y, threat=threat, seed=ctx.seed + i)
            p_succ = _batched(
                pgd,
                model,
                x,
                y,
                threat=threat,
                steps=settings["steps"],
                restarts=settings["restarts"],
                seed=ctx.seed + i,
            )
            robust = clean_correct & ~f_succ & ~p_succ
            return {
                "eps": eps,
                "fgsm_robust": (clean_correct & ~f_succ).tolist(),
                "pgd_robust": (clean_correct & ~p_succ).tolist(),
                "robust": robust.tolist(),
                "seconds": time.perf_counter() - t0,
            }

        rows = [
            ctx.run_dir.checkpoint(
                self.name, f"{ctx.norm}-eps{i}-{eps:.6g}", functools.partial(at_eps, i, eps)
            )
            for i, eps in enumerate(grid)
        ]
        curve = []
        # An example found at a smaller eps also lies in every larger ball, so the
        # per-sample worst case at eps_k is the AND over all eps_j <= eps_k.
        still = clean_correct.clone()
        for row in rows:
            attained = torch.tensor(row["robust"])
            still &= attained
            acc, ci = accuracy_with_ci(still)
            curve.append(
                {
                    "eps": row["eps"],
                    "robust_accuracy": acc,
                    "ci": list(ci),
                    "attack_robust_accuracy": accuracy_with_ci(attained)[0],
                    "fgsm_robust_accuracy": accuracy_with_ci(torch.tensor(row["fgsm_robust"]))[0],
                    "pgd_robust_accuracy": accuracy_with_ci(torch.tensor(row["pgd_robust"]))[0],
                }
            )
        ref_row = curve[settings["grid"].index(1.0)]
        grade, rule = grade_evasion(clean_acc, ref_row["robust_accuracy"])
        flags += self._curve_flags(curve)
        examples = self._examples(ctx, model, x, y, clean_correct, rows, ref)
        eps_txt = self._eps_text(ctx.norm, ref, high - low)
        meaning = (
            f"Of {n} test samples, {clean_acc:.1%} are classified correctly; an attacker who may "
            f"change each input by {eps_txt} in {ctx.norm} norm keeps only "
            f"{ref_row['robust_accuracy']:.1%} correct (95% CI {ref_row['ci'][0]:.1%}–{ref_row['ci'][1]:.1%})."
        )
        advice = (
            "Harden the model with adversarial training (`modelshield harden adversarial "
            f"--method pgd-at --norm {ctx.norm} --eps {ref:.4g}`) and re-scan; this probe is a "
            "lower bound on the attacker's success (FGSM and PGD only)."
            if grade not in ("A", "B")
            else "Robustness holds against FGSM and PGD at this budget; confirm with the full "
            "ensemble (`modelshield attack autoattack`) before relying on it."
        )
        x_axis = [row["eps"] for row in curve]
        plots: list[dict[str, Any]] = [
            {
                "kind": "line",
                "title": f"Robust accuracy vs {ctx.norm} eps",
                "x_label": f"eps ({ctx.norm})",
                "y_label": "accuracy",
                "x_scale": "linear",
                "y_scale": "linear",
                "series": [
                    {"name": "clean", "x": x_axis, "y": [clean_acc] * len(x_axis)},
                    {"name": "FGSM", "x": x_axis, "y": [r["fgsm_robust_accuracy"] for r in curve]},
                    {"name": "PGD", "x": x_axis, "y": [r["pgd_robust_accuracy"] for r in curve]},
                    {
                        "name": "worst case",
                        "x": x_axis,
                        "y": [r["robust_accuracy"] for r in curve],
                        "lo": [r["ci"][0] for r in curve],
                        "hi": [r["ci"][1] for r in curve],
                    },
                ],
            }
        ]
        if examples:
            plots.append(
                {
                    "kind": "images",
                    "title": f"Adversarial examples at eps {ref:.4g}",
                    "images": examples,
                }
            )
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
                "bounds": list(model.bounds),
                "targeted": False,
                "access": "white-box (gradients)",
                "rule": rule,
            },
            details={
                "samples": n,
                "clean_accuracy": clean_acc,
                "clean_ci": list(clean_ci),
                "curve": curve,
                "attacks": ["fgsm", f"pgd-{settings['steps']}x{settings['restarts']}"],
                "checks": checks,
                "rule": rule,
            },
            plots=plots,
            flags=flags,
        )

    @staticmethod
    def _eps_text(norm: str, eps: float, width: float) -> str:
        if norm == "linf":
            return f"at most {eps:.4g} per feature (= {eps / width * 255:.3g}/255 of the range)"
        return f"a perturbation of {norm} norm {eps:.4g}"

    @staticmethod
    def _curve_flags(curve: list[dict[str, Any]]) -> list[str]:
        flags = []
        for a, b in itertools.pairwise(curve):
            if b["attack_robust_accuracy"] > a["attack_robust_accuracy"] + 0.01:
                flags.append(
                    f"the attacks' robust accuracy rises from {a['attack_robust_accuracy']:.1%} to "
                    f"{b['attack_robust_accuracy']:.1%} as eps grows ({a['eps']:.4g} → {b['eps']:.4g}): "
                    "the attacks are not converging"
                )
        for r in curve:
            if r["pgd_robust_accuracy"] > r["fgsm_robust_accuracy"] + 0.02:
                flags.append(
                    f"FGSM beats PGD at eps {r['eps']:.4g} ({r['fgsm_robust_accuracy']:.1%} vs "
                    f"{r['pgd_robust_accuracy']:.1%}): a sign of gradient masking"
                )
        return flags

    @staticmethod
    def _examples(
        ctx: ScanContext,
        model: Classifier,
        x: torch.Tensor,
        y: torch.Tensor,
        clean_correct: torch.Tensor,
        rows: list[dict[str, Any]],
        ref: float,
    ) -> list[dict[str, Any]]:
        """Clean/adversarial pairs for the samples that fall at the smallest eps."""
        if x.ndim not in (2, 4) or (x.ndim == 2 and math.isqrt(x.shape[1]) ** 2 != x.shape[1]):
            return []
        first_fall = torch.full((len(x),), len(rows))
        for i in reversed(range(len(rows))):
            fell = clean_correct & ~torch.tensor(rows[i]["robust"])
            first_fall[fell] = i
        order = torch.argsort(first_fall, stable=True)
        picked = [int(j) for j in order if first_fall[j] < len(rows)][: N_EXAMPLES // 2]
        if not picked:
            return []
        threat = LpThreat(norm=ctx.norm, eps=ref, bounds=model.bounds)  # type: ignore[arg-type]
        sel = torch.tensor(picked)
        res = pgd(model, x[sel], y[sel], threat=threat, steps=20, seed=ctx.seed)
        if res.x_adv is None:
            return []
        adv_pred = model.predict(res.x_adv)
        low, high = model.bounds
        images = []
        for k, j in enumerate(picked):
            for label, img, pred in (
                ("clean", x[j], int(y[j])),
                ("adversarial", res.x_adv[k], int(adv_pred[k])),
            ):
                arr = ((img.detach().cpu().float() - low) / (high - low)).clamp(0, 1)
                if arr.ndim == 1:
                    side = math.isqrt(arr.numel())
                    arr = arr.view(side, side)
                images.append(
                    {
                        "caption": f"#{int(j)} {label}: predicted {pred}",
                        "shape": list(arr.shape),
                        "data": [round(float(v), 4) for v in arr.flatten()],
                    }
                )
        return images
