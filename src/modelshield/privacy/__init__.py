"""Privacy attacks (DESIGN.md ``privacy/``).

Membership inference (loss, shadow, LiRA, RMIA, label-only) over model outputs, the
membership audit that builds reference models (locally or on Ray), attribute inference
for tabular models and MI-Face model inversion for image models.
"""

from modelshield.privacy.attribute import (
    AttributeInferenceResult,
    fredrikson_attribute_inference,
    learned_attribute_inference,
)
from modelshield.privacy.inversion import InversionResult, mi_face
from modelshield.privacy.membership import (
    evaluate_scores,
    label_only_scores,
    lira_scores,
    logit_confidence,
    loss_scores,
    rmia_scores,
    shadow_attack_scores,
)
from modelshield.privacy.shadow import ShadowSpec, reference_masks, train_reference_models

__all__ = [
    "AttributeInferenceResult",
    "InversionResult",
    "ShadowSpec",
    "evaluate_scores",
    "fredrikson_attribute_inference",
    "label_only_scores",
    "learned_attribute_inference",
    "lira_scores",
    "logit_confidence",
    "loss_scores",
    "mi_face",
    "reference_masks",
    "rmia_scores",
    "shadow_attack_scores",
    "train_reference_models",
]
