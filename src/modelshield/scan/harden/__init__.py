"""``modelshield harden``: apply a defence, write the new model, and compare the model
before and after it with the same scan probes.

- ``adversarial``: adversarial training (Madry et al. 2018; TRADES, FGSM-RS).
- ``dp``: retrain with DP-SGD (Abadi et al. 2016).
- ``watermark``: embed a trigger-set watermark (Adi et al. 2018).
- ``poison-removal``: detect poison and retrain without it (Tran et al. 2018; Chen et al. 2018).
- ``gateway``: anti-extraction defences in front of the model (PRADA, Juuti et al. 2019).
- ``fine-prune`` (in :mod:`modelshield.scan.poison`): Liu et al. 2018.
"""

from __future__ import annotations

from modelshield.scan.harden.adversarial import HardenConfig, harden_adversarial
from modelshield.scan.harden.common import HardenOutcome

__all__ = ["HardenConfig", "HardenOutcome", "harden_adversarial"]
