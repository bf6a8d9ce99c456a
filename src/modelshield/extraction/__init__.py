"""Model stealing through a prediction API, and how close the stolen copy comes.

Every attack is a function registered in :data:`EXTRACTION_ATTACKS` that takes an
:class:`~modelshield.core.oracle.Oracle`, spends its query budget, and returns
``(copy, ExtractionResult)``:

* ``"equation"``: equation solving for softmax-linear models (Tramèr et al. 2016);
* ``"knockoff"``: Knockoff Nets, random or adaptive sampling of a surrogate pool
  (Orekondy et al. 2019);
* ``"jacobian"``: Jacobian-based dataset augmentation (Papernot et al. 2017).

:func:`fidelity` and :func:`transferability` measure a copy against its victim.
"""

from modelshield.extraction.base import EXTRACTION_ATTACKS, victim_top1
from modelshield.extraction.equation import equation_solving
from modelshield.extraction.jacobian import jacobian_augmentation
from modelshield.extraction.knockoff import knockoff
from modelshield.extraction.metrics import fidelity, transferability

__all__ = [
    "EXTRACTION_ATTACKS",
    "equation_solving",
    "fidelity",
    "jacobian_augmentation",
    "knockoff",
    "transferability",
    "victim_top1",
]
