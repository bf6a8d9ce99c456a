"""Built-in scan probes (importing this package registers them)."""

from modelshield.scan.probe import (
    dp_claim,
    evasion,
    evasion_blackbox,
    membership,
    model_file,
    privacy_more,
)

__all__ = ["dp_claim", "evasion", "evasion_blackbox", "membership", "model_file", "privacy_more"]
