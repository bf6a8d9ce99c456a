"""What a scan knows when it plans and runs probes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from modelshield.core.classifier import Classifier
from modelshield.core.data import Dataset
from modelshield.core.loading import LoadedModel
from modelshield.core.oracle import Oracle
from modelshield.scan.rundir import RunDir

PROFILES = ("quick", "standard", "thorough")


@dataclass
class ScanContext:
    """Inputs and settings shared by every probe of one scan."""

    run_dir: RunDir
    model: LoadedModel | None = None
    data: Dataset | None = None
    train_data: Dataset | None = None
    oracle: Oracle | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    profile: str = "standard"
    norm: str = "linf"
    options: dict[str, Any] = field(default_factory=dict)
    white_box: Classifier | None = None
    """A white-box model given directly (e.g. one trained in this run), instead of ``model``."""

    @property
    def classifier(self) -> Classifier | None:
        if self.white_box is not None:
            return self.white_box
        return self.model.classifier if self.model is not None else None
