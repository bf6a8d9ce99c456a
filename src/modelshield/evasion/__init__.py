"""Evasion attacks on white-box classifiers and black-box oracles, and their evaluation.

Every attack is a function registered in :data:`ATTACKS` and returns an
:class:`~modelshield.core.results.AttackResult` checked by one shared guard.
"""

from modelshield.evasion.apgd import apgd_ce, apgd_dlr, apgd_t
from modelshield.evasion.base import ATTACKS
from modelshield.evasion.cw import cw
from modelshield.evasion.ensemble import autoattack, autoattack_fast, run_ensemble
from modelshield.evasion.evaluate import evaluate_robustness
from modelshield.evasion.fgsm import fgsm
from modelshield.evasion.hopskipjump import hopskipjump
from modelshield.evasion.pgd import pgd
from modelshield.evasion.square import square

__all__ = [
    "ATTACKS",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
    "autoattack",
    "autoattack_fast",
    "cw",
    "evaluate_robustness",
    "fgsm",
    "hopskipjump",
    "pgd",
    "run_ensemble",
    "square",
]
