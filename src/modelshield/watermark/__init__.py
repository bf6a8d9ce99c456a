"""Trigger-set watermarking (Adi et al., USENIX Security 2018, "Turning Your Weakness Into a
Strength: Watermarking Deep Neural Networks by Backdooring").

The owner of a model generates a secret :class:`WatermarkKey`, trains the model to give
the key's random labels on the key's out-of-distribution trigger inputs (:func:`embed`),
and later checks a suspect model or prediction API for those labels (:func:`verify`,
an exact binomial test). :func:`robustness_suite` measures whether the mark survives
fine-tuning, pruning and extraction, and that independent models do not verify::

    key = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=10)
    marked = embed(model, x, y, key, epochs=20, lr=3e-3, batch_size=64, from_scratch=True, seed=0)
    key.with_model(None).save("key.json")
    verify(suspect_oracle, key).verified
"""

from modelshield.watermark.embed import EmbedOutcome, embed, embed_and_evaluate
from modelshield.watermark.key import TRIGGER_KINDS, WatermarkKey, staged_key_file
from modelshield.watermark.robustness import (
    RemovalAttempt,
    WatermarkRobustnessResult,
    false_positive_check,
    fine_tune,
    magnitude_prune,
    robustness_suite,
    train_independent_models,
)
from modelshield.watermark.verify import binomial_p_value, matches_needed, verify

__all__ = [
    "TRIGGER_KINDS",
    "EmbedOutcome",
    "RemovalAttempt",
    "WatermarkKey",
    "WatermarkRobustnessResult",
    "binomial_p_value",
    "embed",
    "embed_and_evaluate",
    "false_positive_check",
    "fine_tune",
    "magnitude_prune",
    "matches_needed",
    "robustness_suite",
    "staged_key_file",
    "train_independent_models",
    "verify",
]
