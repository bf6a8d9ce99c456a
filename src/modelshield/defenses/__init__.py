"""Defences that harden a model against the attacks in :mod:`modelshield.evasion`.

Adversarial training (:func:`adversarial_train`): PGD-AT (Madry et al. 2018), TRADES
(Zhang et al. 2019) and FGSM-RS (Wong et al. 2020), resumable from a checkpoint.
Randomized smoothing (Cohen et al. 2019): :class:`SmoothedClassifier` and
:func:`gaussian_augmentation_train` in :mod:`modelshield.defenses.smoothing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelshield.core.registry import Registry
from modelshield.defenses.adversarial import (
    METHODS,
    AdversarialTrainingConfig,
    AdversarialTrainingResult,
    adversarial_train,
)
from modelshield.defenses.smoothing import SmoothedClassifier, gaussian_augmentation_train

#: Registered defences, by name (DESIGN.md "Registries").
DEFENSES: Registry[Callable[..., Any]] = Registry("defenses", singular="defence")
DEFENSES.add("adversarial-training", adversarial_train)
DEFENSES.add("randomized-smoothing", SmoothedClassifier)
DEFENSES.add("gaussian-augmentation", gaussian_augmentation_train)

__all__ = [
    "DEFENSES",
    "METHODS",
    "AdversarialTrainingConfig",
    "AdversarialTrainingResult",
    "SmoothedClassifier",
    "adversarial_train",
    "gaussian_augmentation_train",
]
