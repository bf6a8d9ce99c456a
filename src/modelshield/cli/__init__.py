"""modelshield.cli."""
