"""Data poisoning: attacks for red-teaming, detection in training data, backdoor removal."""

from modelshield.poisoning.attacks import (
    POISON_ATTACKS,
    PoisonedData,
    badnets,
    blended,
    clean_label,
    label_flip,
    poison,
)
from modelshield.poisoning.audit import audit_training_data, backdoor_susceptibility
from modelshield.poisoning.detectors import (
    POISON_DETECTORS,
    activation_clustering,
    spectral_signatures,
    strip,
)
from modelshield.poisoning.metrics import attack_success_rate, evaluate_poisoning
from modelshield.poisoning.removal import fine_prune, retrain_without
from modelshield.poisoning.triggers import Trigger, apply_trigger

__all__ = [
    "POISON_ATTACKS",
    "POISON_DETECTORS",
    "PoisonedData",
    "Trigger",
    "activation_clustering",
    "apply_trigger",
    "attack_success_rate",
    "audit_training_data",
    "backdoor_susceptibility",
    "badnets",
    "blended",
    "clean_label",
    "evaluate_poisoning",
    "fine_prune",
    "label_flip",
    "poison",
    "retrain_without",
    "spectral_signatures",
    "strip",
]
