"""Privacy attacks (DESIGN.md ``privacy/``).

Membership inference (loss, shadow, LiRA, RMIA, label-only) over model outputs, the
membership audit that builds reference models (locally or on Ray), attribute inference
for tabular models and MI-Face model inversion for image models; DP-SGD training with a
privacy ledger (Opacus), its accounting, and empirical audits of the DP claim.
"""

from modelshield.privacy.accounting import compute_epsilon, find_noise_multiplier
from modelshield.privacy.attribute import (
    AttributeInferenceResult,
    fredrikson_attribute_inference,
    learned_attribute_inference,
)
from modelshield.privacy.dp import DPConfig, DPTrainingResult, PrivacyLedger, train_dp
from modelshield.privacy.dp_audit import AuditTraining, audit_canaries, audit_one_run
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
    "AuditTraining",
    "DPConfig",
    "DPTrainingResult",
    "InversionResult",
    "PrivacyLedger",
    "ShadowSpec",
    "audit_canaries",
    "audit_one_run",
    "compute_epsilon",
    "evaluate_scores",
    "find_noise_multiplier",
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
    "train_dp",
    "train_reference_models",
]
