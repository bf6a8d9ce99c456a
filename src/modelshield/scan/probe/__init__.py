"""Built-in scan probes (importing this package registers them)."""

from modelshield.scan.probe import (
    dp_claim,
    evasion,
    evasion_blackbox,
    extraction,
    membership,
    model_file,
    poisoning,
    privacy_more,
    watermark,
)

__all__ = [
    "dp_claim",
    "evasion",
    "evasion_blackbox",
    "extraction",
    "membership",
    "model_file",
    "poisoning",
    "privacy_more",
    "watermark",
]
