"""Poisoning probes: is there poison in the training data, and how easily is it planted?

- ``data-poisoning``: activation clustering and spectral signatures on the model's
  penultimate activations of its training data; the figure is the share flagged.
- ``susceptibility``: a fresh copy of the model's architecture retrained on the training
  data with a small BadNets poison (1% by default); the figure is the attack success rate
  it reaches, the answer to "would a few poisoned samples plant a backdoor?".
"""

from __future__ import annotations

from typing import Any

import torch

from modelshield.core.data import Dataset
from modelshield.core.results import PoisonResult, ProbeResult
from modelshield.core.seeding import make_generator
from modelshield.poisoning.audit import audit_training_data, backdoor_susceptibility
from modelshield.scan.context import ScanContext
from modelshield.scan.estimate import Cost
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import grade_poison_flagged, grade_susceptibility

DETECT_MAX = {"quick": 5000, "standard": 20000, "thorough": None}
"""Training samples the detectors read (a seeded random subset above this)."""
SUSCEPTIBILITY: dict[str, dict[str, Any]] = {
    "quick": {"rates": [0.01], "epochs": 10, "max_train": 5000},
    "standard": {"rates": [0.01], "epochs": 15, "max_train": 20000},
    "thorough": {"rates": [0.005, 0.01, 0.05], "epochs": 20, "max_train": None},
}
HOLDOUT = 0.2


def _subset(ds: Dataset, limit: int | None, seed: int) -> tuple[Dataset, torch.Tensor]:
    if limit is None or len(ds) <= limit:
        return ds, torch.arange(len(ds))
    g = make_generator(seed)
    idx = torch.randperm(len(ds), generator=g)[:limit].sort().values
    return ds.subset(idx), idx


def detection_probe_result(
    res: PoisonResult, *, seed: int = 0, name: str = "data-poisoning", note: str = ""
) -> ProbeResult:
    """Grade and explain a training-data audit (shared by the scan and `audit data`)."""
    n = int(res.details.get("n", 0))
    frac = len(res.indices) / n if n else 0.0
    grade, rule = grade_poison_flagged(frac)
    rows = []
    classes: dict[str, int] = {}
    for det, d in res.details.get("detectors", {}).items():
        pr = "" if d.get("precision") is None else f"{d['precision']:.3f} / {d['recall']:.3f}"
        rows.append([det, str(len(d.get("indices", []))), pr])
        for c, info in d.get("details", {}).get("per_class", {}).items():
            if info.get("flagged"):
                classes[c] = max(classes.get(c, 0), int(info["flagged"]))
    truth = (
        f" Against the known poison: precision {res.precision:.3f}, recall {res.recall:.3f}."
        if res.precision is not None
        else ""
    )
    where = (
        "in class" + ("es " if len(classes) > 1 else " ") + ", ".join(sorted(classes))
        if classes
        else ""
    )
    meaning = (
        f"The detectors ({res.method}) flag {len(res.indices)} of {n} training samples "
        f"({frac:.2%}){' ' + where if where else ''}.{truth} {note}".strip()
    )
    advice = (
        "No cluster of suspect samples found at this strength; keep auditing new data."
        if not res.indices
        else "Inspect the flagged samples (result.json lists them) and retrain without them: "
        "`modelshield harden poison-removal --model MODEL --train-data TRAIN --data TEST "
        "--out DIR` writes the retrained model, clean.npz and this probe before and after."
    )
    plots: list[dict[str, Any]] = [
        {
            "kind": "table",
            "title": "Detectors",
            "columns": ["detector", "flagged", "precision / recall"],
            "rows": rows,
        }
    ]
    if classes:
        plots.append(
            {
                "kind": "bar",
                "title": "Flagged samples per class",
                "labels": sorted(classes),
                "values": [classes[c] for c in sorted(classes)],
                "y_label": "samples flagged",
            }
        )
    return ProbeResult(
        probe=name,
        title="Poison in the training data",
        risk="poisoning",
        status="ok",
        seed=seed,
        wall_time=res.wall_time,
        config=res.config,
        figure={"name": "share of training data flagged", "value": frac},
        grade=grade,
        meaning=meaning,
        recommendation=advice,
        threat={
            "attacker": "slipped mislabelled or triggered samples into the training data",
            "attack": "backdoor or label poisoning",
            "access": "training data",
            "rule": rule,
        },
        details={
            "flagged": res.indices,
            "n": n,
            "precision": res.precision,
            "recall": res.recall,
            "detectors": res.details.get("detectors", {}),
            "rule": rule,
        },
        plots=plots,
    )


def susceptibility_probe_result(runs: list[dict[str, Any]], *, seed: int = 0) -> ProbeResult:
    """Grade the ASR reached by the small poison rate (the run at 1%, else the first)."""
    main = next((r for r in runs if abs(r["rate"] - 0.01) < 1e-12), runs[0])
    asr = main["attack_success_rate"]["value"]
    grade, rule = grade_susceptibility(asr)
    meaning = (
        f"Retrained with {main['poisoned']} BadNets-poisoned samples ({main['rate']:.1%} of "
        f"{main['n_train']}), a copy of the model's architecture classifies {asr:.1%} of "
        f"triggered test inputs as the target class, at clean accuracy "
        f"{main['clean_accuracy']['value']:.3f}."
    )
    advice = (
        "A backdoor did not take at this poison rate; larger rates may still succeed."
        if grade in ("A", "B")
        else "A handful of poisoned samples plants a backdoor: vet the data's provenance, "
        "audit it (`modelshield audit data`) before every training run, and remove what it "
        "finds (`modelshield harden poison-removal`, or `modelshield harden fine-prune` "
        "when only clean data is at hand)."
    )
    plots = []
    if len(runs) > 1:
        plots.append(
            {
                "kind": "line",
                "title": "Attack success rate against poison rate",
                "x_label": "poison rate",
                "y_label": "attack success rate",
                "series": [
                    {
                        "name": "BadNets",
                        "x": [r["rate"] for r in runs],
                        "y": [r["attack_success_rate"]["value"] for r in runs],
                        "lo": [r["attack_success_rate"]["ci"][0] for r in runs],
                        "hi": [r["attack_success_rate"]["ci"][1] for r in runs],
                    }
                ],
            }
        )
    return ProbeResult(
        probe="susceptibility",
        title="Susceptibility to a backdoor",
        risk="poisoning",
        status="ok",
        seed=seed,
        wall_time=sum(r["wall_time"] for r in runs),
        config={"rates": [r["rate"] for r in runs], "epochs": main["epochs"]},
        figure={
            "name": f"attack success rate at {main['rate']:.1%} poison",
            "value": asr,
            "ci": main["attack_success_rate"]["ci"],
            "confidence": 0.95,
        },
        grade=grade,
        meaning=meaning,
        recommendation=advice,
        threat={
            "attacker": "poisons a small share of the training data with a patch trigger",
            "attack": "BadNets (Gu et al. 2017)",
            "access": "training data",
            "rule": rule,
        },
        details={"runs": runs, "rule": rule},
        plots=plots,
    )


@register_probe
class DataPoisoningProbe(Probe):
    """Poison detection in the training data (activation clustering, spectral signatures)."""

    name = "data-poisoning"
    title = "Poison in the training data"
    risk = "poisoning"
    order = 35

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.train_data is None:
            return "no training data given (--train-data)"
        if ctx.classifier is None:
            return "needs a white-box torch model to read its activations"
        if isinstance(ctx.classifier.module, torch.jit.ScriptModule):
            return (
                "the detectors read the last linear layer's input through a forward hook, which "
                "a TorchScript module does not take; scan the model as torch.export (.pt2) or "
                "state_dict + --arch for this probe"
            )
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """One pass over the examined training data; the detectors' clustering is not timed."""
        if ctx.train_data is None:
            return Cost()
        limit = DETECT_MAX[ctx.profile]
        n = len(ctx.train_data) if limit is None else min(limit, len(ctx.train_data))
        return Cost(
            {"forward": n},
            basis=f"activations of {n} training samples (clustering and SVD not counted)",
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        if ctx.train_data is None or ctx.classifier is None:
            return self.skipped("needs training data and a white-box torch model", ctx)
        data, idx = _subset(ctx.train_data, DETECT_MAX[ctx.profile], ctx.seed)
        res = audit_training_data(ctx.classifier, data, seed=ctx.seed)
        res.indices = [int(idx[i]) for i in res.indices]
        note = (
            f"A random {len(data)} of the {len(ctx.train_data)} training samples were examined."
            if len(data) < len(ctx.train_data)
            else ""
        )
        res.details["n"] = len(data)
        return detection_probe_result(res, seed=ctx.seed, name=self.name, note=note)


@register_probe
class SusceptibilityProbe(Probe):
    """How easily a backdoor is planted: ASR of a quick retrain with 1% BadNets poison."""

    name = "susceptibility"
    title = "Susceptibility to a backdoor"
    risk = "poisoning"
    order = 36

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.train_data is None:
            return "no training data given (--train-data)"
        if ctx.classifier is None or not isinstance(ctx.classifier.module, torch.nn.Module):
            return "needs a white-box torch model whose architecture can be retrained"
        return None

    def cost(self, ctx: ScanContext) -> Cost:
        """A retrain of the architecture per poison rate, then clean and triggered tests."""
        if ctx.train_data is None:
            return Cost()
        s = SUSCEPTIBILITY[ctx.profile]
        limit = s["max_train"]
        n = len(ctx.train_data) if limit is None else min(limit, len(ctx.train_data))
        n_test = len(ctx.data) if ctx.data is not None else round(n * HOLDOUT)
        n_train = n if ctx.data is not None else n - n_test
        runs = len(s["rates"])
        return Cost(
            {"backward": runs * s["epochs"] * n_train, "forward": runs * 2 * n_test},
            basis=(
                f"{runs} retrain(s) × {s['epochs']} epochs × {n_train} samples; "
                f"clean and triggered tests on {n_test}"
            ),
        )

    def run(self, ctx: ScanContext) -> ProbeResult:
        if ctx.train_data is None or ctx.classifier is None:
            return self.skipped("needs training data and a white-box torch model", ctx)
        s = SUSCEPTIBILITY[ctx.profile]
        train, _ = _subset(ctx.train_data, s["max_train"], ctx.seed)
        if ctx.data is not None:
            test = ctx.data
        else:
            test, train = train.split(HOLDOUT, seed=ctx.seed)
        runs = [
            backdoor_susceptibility(
                ctx.classifier, train, test, rate=r, epochs=s["epochs"], seed=ctx.seed
            )
            for r in s["rates"]
        ]
        return susceptibility_probe_result(runs, seed=ctx.seed)
