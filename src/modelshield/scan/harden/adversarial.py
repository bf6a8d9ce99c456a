"""``modelshield harden adversarial``: adversarial training (Madry et al. 2018) with a
before/after report.

The same evasion probe measures the model before and after, at the training eps, so the
two curves are comparable; the hardened model is written as a ``torch.export`` program
(and a state_dict) and measured after being loaded back from disk, as a user would.
Every step is resumable: training checkpoints each epoch, each evaluation each eps.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelshield import __version__
from modelshield.core.architectures import ARCHITECTURES, build
from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import Dataset
from modelshield.core.device import select_device
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError
from modelshield.core.io import atomic_open
from modelshield.core.loading import (
    LoadedModel,
    check_fits,
    load_given_model,
    load_model,
    save_exported,
)
from modelshield.core.results import ProbeResult
from modelshield.core.seeding import check_seed, seed_everything
from modelshield.defenses.adversarial import AdversarialTrainingConfig, adversarial_train
from modelshield.scan.context import ScanContext
from modelshield.scan.harden.common import (
    HardenOutcome,
    check_profile,
    hardening_result,
    load_pair,
    renamed,
    train_baseline,
    write_report,
)
from modelshield.scan.probe.evasion import WhiteBoxEvasionProbe
from modelshield.scan.probe.model_file import ModelFileProbe
from modelshield.scan.rubric import grade_evasion
from modelshield.scan.rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class HardenConfig:
    """What ``harden adversarial`` is given (the CLI fills it)."""

    train_data: str
    data: str
    out: str
    model: str | None = None
    arch: str | None = None
    method: str = "pgd-at"
    norm: str = "linf"
    eps: float = 8 / 255
    epochs: int = 10
    steps: int = 10
    beta: float = 6.0
    lr: float | None = None
    batch_size: int = 128
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    trust_pickle: bool = False
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: list[float] | None = None
    std: list[float] | None = None
    profile: str = "quick"
    fresh: bool = False
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _start_module(
    cfg: HardenConfig, train: Dataset, device: torch.device
) -> tuple[nn.Module, LoadedModel | None]:
    """The module to harden: the user's model, or a built-in architecture from scratch."""
    shape = tuple(train.x.shape[1:])
    if cfg.model:
        loaded = load_given_model(vars(cfg), shape, device)
        if loaded.classifier is None or not isinstance(loaded.classifier.module, nn.Module):
            raise UnsupportedModelError(
                f"cannot train a {loaded.kind} model; give a torch model (state_dict + --arch, "
                "TorchScript or torch.export) or --arch NAME to train from scratch"
            )
        check_fits(loaded, train.y, "--train-data")
        return loaded.classifier.module, loaded
    if not cfg.arch or cfg.arch not in ARCHITECTURES:
        raise InvalidConfigError(
            f"give --model PATH, or --arch with a built-in architecture ({', '.join(ARCHITECTURES.names())}) "
            "to train from scratch"
        )
    return build(cfg.arch, shape, train.num_classes).to(device), None


def harden_adversarial(cfg: HardenConfig) -> HardenOutcome:
    """Measure, adversarially train, save, re-load, measure again, and report."""
    started = time.time()
    check_seed(cfg.seed)
    check_profile(cfg.profile)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    train, test = load_pair(cfg.train_data, cfg.data, cfg.bounds)
    settings: dict[str, Any] = {
        "method": cfg.method,
        "norm": cfg.norm,
        "eps": cfg.eps,
        "steps": cfg.steps,
        "beta": cfg.beta,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "bf16": cfg.bf16,
        "bounds": cfg.bounds,
        "seed": cfg.seed,
        **cfg.extra,
    }
    if cfg.lr is not None:
        settings["lr"] = cfg.lr
    at_cfg = AdversarialTrainingConfig(**settings)
    module, loaded = _start_module(cfg, train, device)
    shape = tuple(train.x.shape[1:])
    run_dir = RunDir(
        cfg.out,
        {
            "command": "harden adversarial",
            "model_sha256": loaded.file.sha256 if loaded is not None else None,
            "arch": cfg.arch,
            "train_data_sha256": train.describe().get("sha256"),
            "data_sha256": test.describe().get("sha256"),
            "training": at_cfg.to_dict() if hasattr(at_cfg, "to_dict") else repr(at_cfg),
            "profile": cfg.profile,
            "modelshield_version": __version__,
        },
        fresh=cfg.fresh,
    )
    out = run_dir.root
    if cfg.fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)

    def classifier(m: nn.Module) -> Classifier:
        return from_torch(
            m,
            input_shape=shape,
            num_classes=train.num_classes,
            bounds=cfg.bounds,
            mean=cfg.mean,
            std=cfg.std,
            device=device,
        )

    if loaded is None:  # from scratch: the "before" model is the same recipe without attacks
        baseline = train_baseline(
            module,
            train,
            device=device,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        before_clf = classifier(baseline)
    else:
        before_clf = classifier(copy.deepcopy(module))
    options = {"bounds": cfg.bounds, "eps": cfg.eps}

    def evaluate(name: str, title: str, clf: Classifier) -> ProbeResult:
        done = run_dir.finished(name)
        if done is not None:
            logger.info("%s: finished in an earlier run, reusing its result", name)
            return done
        probe = WhiteBoxEvasionProbe()
        probe.name, probe.title = name, title  # its checkpoints go under partial/NAME
        ctx = ScanContext(
            run_dir=run_dir,
            data=test,
            seed=cfg.seed,
            device=device,
            profile=cfg.profile,
            norm=cfg.norm,
            options=options,
            white_box=clf,
        )
        result = probe.run(ctx)
        run_dir.save(result)
        return result

    before = evaluate("evasion-before", "Evasion before hardening", before_clf)
    training = adversarial_train(
        module, train.x, train.y, at_cfg, checkpoint_dir=out / "checkpoints", device=device
    )
    model_path = out / "model.pt2"
    save_exported(module, train.x.to(device), model_path)
    with atomic_open(out / "model.state_dict.pt", "wb") as fh:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, fh)
    hardened = load_model(
        model_path, input_shape=shape, bounds=cfg.bounds, mean=cfg.mean, std=cfg.std, device=device
    )
    if hardened.classifier is None:
        raise UnsupportedModelError(f"{model_path} did not load back as a white-box model")
    after = evaluate("evasion-after", "Evasion after hardening", hardened.classifier)
    file_ctx = ScanContext(run_dir=run_dir, model=hardened, seed=cfg.seed)
    file_probe = renamed(ModelFileProbe().run(file_ctx), "model-file", "Hardened model file")
    summary = _summary(cfg, before, after, training)
    results = [summary, before, after, file_probe]
    paths = write_report(
        out,
        results,
        command=cfg.command,
        seed=cfg.seed,
        device=device,
        started=started,
        profile=cfg.profile,
        target={
            "model": hardened.file.to_dict(),
            "data": test.describe(),
            "train_data": train.describe(),
        },
    )
    return HardenOutcome(out=out, model_path=model_path, reports=paths, results=results)


def _summary(
    cfg: HardenConfig, before: ProbeResult, after: ProbeResult, training: Any
) -> ProbeResult:
    """The before/after comparison: the figure is robust accuracy after, at the training eps."""
    b, a = before.details, after.details
    rb, ra = before.figure["value"], after.figure["value"]
    grade, rule = grade_evasion(a["clean_accuracy"], ra)
    eps_axis = [c["eps"] for c in a["curve"]]
    cost = b["clean_accuracy"] - a["clean_accuracy"]
    history = getattr(training, "history", [])
    meaning = (
        f"{cfg.method} training at {cfg.norm} eps {cfg.eps:g} moved robust accuracy from {rb:.1%} "
        f"to {ra:.1%} (95% CI {after.figure['ci'][0]:.1%}–{after.figure['ci'][1]:.1%}); clean "
        f"accuracy went from {b['clean_accuracy']:.1%} to {a['clean_accuracy']:.1%}"
        + (f" (a cost of {cost:.1%})." if cost > 0 else ".")
    )
    advice = (
        "Ship the hardened model (model.pt2) if the clean-accuracy cost is acceptable; "
        "confirm with `modelshield scan --profile thorough` (full AutoAttack with Square)."
        if ra > rb
        else "Training did not raise robust accuracy: try more epochs, pgd-at or trades instead "
        "of fgsm-rs (catastrophic overfitting), or a smaller eps ramp."
    )
    return hardening_result(
        title=f"Adversarial training ({cfg.method})",
        risk="evasion",
        defence=f"adversarial training ({cfg.method})",
        rows=[
            ("clean accuracy", b["clean_accuracy"], a["clean_accuracy"]),
            ("robust accuracy", rb, ra),
        ],
        figure={
            "name": f"robust accuracy after, at {cfg.norm} eps {cfg.eps:g}",
            "value": ra,
            "ci": after.figure["ci"],
            "confidence": 0.95,
        },
        grade=grade,
        rule=rule,
        meaning=meaning,
        recommendation=advice,
        seed=cfg.seed,
        wall_time=float(getattr(training, "wall_time", 0.0)),
        config={"method": cfg.method, "norm": cfg.norm, "eps": cfg.eps, "epochs": cfg.epochs},
        details={
            "clean_accuracy_cost": cost,
            "training_history": history if isinstance(history, list) else [],
            "threat": {"norm": cfg.norm, "eps": cfg.eps, "access": "white-box"},
        },
        plots=[
            {
                "kind": "line",
                "title": "Robust accuracy before vs after",
                "x_label": f"eps ({cfg.norm})",
                "y_label": "accuracy",
                "x_scale": "linear",
                "y_scale": "linear",
                "series": [
                    {
                        "name": "clean before",
                        "x": eps_axis,
                        "y": [b["clean_accuracy"]] * len(eps_axis),
                    },
                    {
                        "name": "clean after",
                        "x": eps_axis,
                        "y": [a["clean_accuracy"]] * len(eps_axis),
                    },
                    {
                        "name": "robust before",
                        "x": [c["eps"] for c in b["curve"]],
                        "y": [c["robust_accuracy"] for c in b["curve"]],
                        "lo": [c["ci"][0] for c in b["curve"]],
                        "hi": [c["ci"][1] for c in b["curve"]],
                    },
                    {
                        "name": "robust after",
                        "x": eps_axis,
                        "y": [c["robust_accuracy"] for c in a["curve"]],
                        "lo": [c["ci"][0] for c in a["curve"]],
                        "hi": [c["ci"][1] for c in a["curve"]],
                    },
                ],
            },
        ],
    )
