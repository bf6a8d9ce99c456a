"""Evasion attacks on white-box classifiers (and, later, black-box oracles).

Every attack is a function registered in :data:`ATTACKS` and returns an
:class:`~modelshield.core.results.AttackResult` checked by one shared guard.
"""

from modelshield.evasion.base import ATTACKS
from modelshield.evasion.fgsm import fgsm
from modelshield.evasion.pgd import pgd

__all__ = ["ATTACKS", "fgsm", "pgd"]
