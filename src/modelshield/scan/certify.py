"""``modelshield certify``: certified L2 accuracy by randomized smoothing, with a report.

Inputs are certified in chunks, each checkpointed, so an interrupted run resumes. The
figure is the certified accuracy at the reference L2 radius (0.5 times the width of the
bounds); the curve gives it at every radius.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelshield import __version__
from modelshield.core.data import load_dataset
from modelshield.core.device import select_device
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import check_fits, load_model
from modelshield.core.metrics import accuracy_with_ci
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import check_seed, make_generator, seed_everything
from modelshield.defenses.smoothing import SmoothedClassifier
from modelshield.report import build_report, write_reports
from modelshield.scan.rubric import REFERENCE_EPS, grade_evasion, rubric_document
from modelshield.scan.rundir import RunDir, run_record

logger = logging.getLogger(__name__)

CHUNK = 50


@dataclass
class CertifyConfig:
    model: str
    data: str
    sigma: float
    out: str
    n: int = 10_000
    n0: int = 100
    alpha: float = 0.001
    max_samples: int = 500
    seed: int = 0
    device: str = "auto"
    trust_pickle: bool = False
    arch: str | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    command: str = ""


@dataclass
class CertifyOutcome:
    radii: list[float]
    accuracy: list[float]
    result_path: Path
    reports: dict[str, Path]


def certify_model(cfg: CertifyConfig) -> CertifyOutcome:
    """Certify up to ``max_samples`` inputs and write ``result.json`` and the reports."""
    started = time.time()
    check_seed(cfg.seed)
    if not cfg.sigma > 0:
        raise InvalidConfigError(f"sigma must be > 0, got {cfg.sigma}")
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data, bounds=cfg.bounds)
    loaded = load_model(
        cfg.model,
        trust_pickle=cfg.trust_pickle,
        arch=cfg.arch,
        input_shape=tuple(data.x.shape[1:]),
        bounds=cfg.bounds,
        mean=cfg.mean,
        std=cfg.std,
        device=device,
    )
    if loaded.classifier is None:
        raise UnsupportedModelError(
            f"certify needs a torch model to sample; {loaded.kind} models are not supported"
        )
    check_fits(loaded, data.y)
    smoothed = SmoothedClassifier(loaded.classifier, cfg.sigma)
    n = min(cfg.max_samples, len(data))
    idx = torch.randperm(len(data), generator=make_generator(cfg.seed))[:n].sort().values
    x, y = data.x[idx], data.y[idx]
    run_dir = RunDir(
        cfg.out,
        {
            "command": "certify",
            "model_sha256": loaded.file.sha256,
            "data_sha256": data.describe().get("sha256"),
            "sigma": cfg.sigma,
            "n": cfg.n,
            "n0": cfg.n0,
            "alpha": cfg.alpha,
            "max_samples": cfg.max_samples,
            "seed": cfg.seed,
            "modelshield_version": __version__,
        },
    )
    prediction, radius = [], []
    for k in range(0, n, CHUNK):

        def compute(k: int = k) -> dict[str, Any]:
            logger.info("certify: inputs %d-%d of %d", k, min(k + CHUNK, n), n)
            res = smoothed.certify(
                x[k : k + CHUNK], n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, seed=cfg.seed + k
            )
            if res.prediction is None or res.radius is None:
                raise RuntimeError("certify returned no predictions")
            return {"prediction": res.prediction.tolist(), "radius": res.radius.tolist()}

        row = run_dir.checkpoint("certify", f"chunk{k}", compute)
        prediction += row["prediction"]
        radius += row["radius"]
    pred = torch.tensor(prediction)
    rad = torch.tensor(radius, dtype=torch.float64)
    correct = pred == y
    max_r = float(rad[correct].max()) if bool(correct.any()) else 0.0
    grid = sorted({round(v, 6) for v in [0.0, *torch.linspace(0, max(max_r, 1e-6), 25).tolist()]})
    width = cfg.bounds[1] - cfg.bounds[0]
    ref = REFERENCE_EPS["l2"] * width
    grid = sorted({*grid, ref})
    accuracy = [float((correct & (rad >= r)).float().mean()) for r in grid]
    abstain = float((pred < 0).float().mean())
    ref_ok = correct & (rad >= ref)
    ref_acc, ref_ci = accuracy_with_ci(ref_ok)
    clean_acc, clean_ci = accuracy_with_ci(correct)
    result_path = run_dir.root / "result.json"
    atomic_write_json(
        result_path,
        {
            "sigma": cfg.sigma,
            "n": cfg.n,
            "n0": cfg.n0,
            "alpha": cfg.alpha,
            "samples": n,
            "radii": grid,
            "certified_accuracy": accuracy,
            "abstain_rate": abstain,
            "smoothed_accuracy": clean_acc,
            "prediction": prediction,
            "radius": radius,
            "labels": y.tolist(),
            "indices": idx.tolist(),
            "seed": cfg.seed,
            "version": __version__,
        },
    )
    grade, rule = grade_evasion(clean_acc, ref_acc)
    probe = ProbeResult(
        probe="certified-robustness",
        title=f"Certified L2 robustness (randomized smoothing, σ={cfg.sigma:g})",
        risk="evasion",
        status="ok",
        seed=cfg.seed,
        wall_time=time.time() - started,
        config={"sigma": cfg.sigma, "n": cfg.n, "n0": cfg.n0, "alpha": cfg.alpha},
        figure={
            "name": f"certified accuracy at L2 radius {ref:g}",
            "value": ref_acc,
            "ci": list(ref_ci),
            "confidence": 0.95,
        },
        grade=grade,
        meaning=(
            f"The smoothed classifier is correct on {clean_acc:.1%} of {n} inputs ({abstain:.1%} "
            f"abstained); {ref_acc:.1%} are correct with a certificate that no L2 perturbation up "
            f"to {ref:g} can change the prediction (each certificate fails with probability ≤ {cfg.alpha:g})."
        ),
        recommendation=(
            "Certificates hold for the smoothed classifier (predict with noise, σ as here), not the "
            "base model. Train the base model with Gaussian noise of this σ to raise them."
        ),
        threat={
            "norm": "l2",
            "eps": ref,
            "bounds": list(cfg.bounds),
            "access": "any (certified)",
            "rule": rule,
        },
        details={
            "samples": n,
            "abstain_rate": abstain,
            "smoothed_accuracy": clean_acc,
            "smoothed_ci": list(clean_ci),
            "rule": rule,
        },
        plots=[
            {
                "kind": "line",
                "title": "Certified accuracy vs L2 radius",
                "x_label": "radius (L2)",
                "y_label": "certified accuracy",
                "x_scale": "linear",
                "y_scale": "linear",
                "series": [{"name": f"σ = {cfg.sigma:g}", "x": grid, "y": accuracy}],
            }
        ],
    )
    report = build_report(
        probes=[probe],
        run=run_record(cfg.command, cfg.seed, device, started),
        target={"model": loaded.file.to_dict(), "data": data.describe(), "train_data": None},
        rubric=rubric_document(),
    )
    paths = write_reports(report, run_dir.root)
    return CertifyOutcome(radii=grid, accuracy=accuracy, result_path=result_path, reports=paths)
