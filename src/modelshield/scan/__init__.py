"""modelshield.scan."""
