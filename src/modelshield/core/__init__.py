"""modelshield.core."""
