"""Lightning callbacks that prune and shrink."""

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.iterative import IterativeSNIPCallback, SNAPit, SNIPit
from lightning_prune.callbacks.sensitivity import SensitivityPruner
from lightning_prune.callbacks.shrink import ShrinkOnFitEnd
from lightning_prune.callbacks.slimming import SlimmingL1Callback
from lightning_prune.callbacks.snip import SNIPCallback

__all__ = [
    "IterativeSNIPCallback",
    "PruningCallback",
    "SNAPit",
    "SNIPCallback",
    "SNIPit",
    "SensitivityPruner",
    "ShrinkOnFitEnd",
    "SlimmingL1Callback",
]
