"""Lightning callbacks that prune and shrink."""

from lightning_prune.callbacks.adversarial import AdversarialEvaluation, AdversarialReport
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.hoyer import GroupHoyerSquareCallback, HoyerSquareCallback
from lightning_prune.callbacks.iterative import IterativeSNIPCallback, SNAPit, SNIPit
from lightning_prune.callbacks.l0 import L0Callback
from lightning_prune.callbacks.sensitivity import SensitivityPruner
from lightning_prune.callbacks.shrink import ShrinkOnFitEnd
from lightning_prune.callbacks.slimming import SlimmingL1Callback
from lightning_prune.callbacks.snip import SNIPCallback

__all__ = [
    "AdversarialEvaluation",
    "AdversarialReport",
    "GroupHoyerSquareCallback",
    "HoyerSquareCallback",
    "IterativeSNIPCallback",
    "L0Callback",
    "PruningCallback",
    "SNAPit",
    "SNIPCallback",
    "SNIPit",
    "SensitivityPruner",
    "ShrinkOnFitEnd",
    "SlimmingL1Callback",
]
