"""Built-in scan probes (importing this package registers them)."""

from modelshield.scan.probe import evasion, model_file

__all__ = ["evasion", "model_file"]
