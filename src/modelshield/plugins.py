"""Import every built-in package that registers components, so registries are complete."""

from __future__ import annotations

import importlib

BUILTIN_MODULES = (
    "modelshield.core.architectures",
    "modelshield.defenses",
    "modelshield.evasion",
    "modelshield.exec",
    "modelshield.federated.task",
    "modelshield.extraction",
    "modelshield.poisoning",
    "modelshield.privacy.audit",
    "modelshield.privacy.dp_audit",
    "modelshield.scan.probe",
    "modelshield.serve.defenses",
)


def load_all() -> None:
    for name in BUILTIN_MODULES:
        importlib.import_module(name)
