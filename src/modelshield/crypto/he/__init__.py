"""Encrypted inference with CKKS (TenSEAL / Microsoft SEAL).

A trained torch model is compiled into a :class:`~modelshield.crypto.he.plan.Plan`
(affine layers and squares only), CKKS parameters are chosen from its depth
(:mod:`.params`), the client keeps the secret key (:mod:`.keys`) and the server computes
on ciphertexts in latency or throughput packing (:mod:`.runtime`, :mod:`.server`).
TenSEAL is imported lazily, so ``import modelshield`` works without it.
"""

from modelshield.crypto.he.params import CKKSParams, choose_params
from modelshield.crypto.he.plan import Plan, compile_model, load_plan

__all__ = ["CKKSParams", "Plan", "choose_params", "compile_model", "load_plan"]
