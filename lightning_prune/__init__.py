"""lightning-prune: prune PyTorch Lightning models with callbacks and physically shrink them."""

from importlib.metadata import PackageNotFoundError, version

from lightning_prune.callbacks import (
    AdversarialEvaluation,
    GroupHoyerSquareCallback,
    HoyerSquareCallback,
    IterativeSNIPCallback,
    L0Callback,
    PruningCallback,
    SensitivityPruner,
    ShrinkOnFitEnd,
    SlimmingL1Callback,
    SNAPit,
    SNIPCallback,
    SNIPit,
)
from lightning_prune.checkpoint import load_pruned_checkpoint, load_pruned_state_dict
from lightning_prune.criteria import list_criteria
from lightning_prune.errors import PruningError
from lightning_prune.models import create_model, list_models, register_model
from lightning_prune.prune import PruneResult, prune_channels
from lightning_prune.stats import ModelStats, measure_latency, model_stats
from lightning_prune.structure import (
    ChannelGraph,
    ChannelGroup,
    ParamSlice,
    Removal,
    ShrinkReport,
    fold_batchnorm,
    shrink,
)

try:
    __version__ = version("lightning-prune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "AdversarialEvaluation",
    "ChannelGraph",
    "ChannelGroup",
    "GroupHoyerSquareCallback",
    "HoyerSquareCallback",
    "IterativeSNIPCallback",
    "L0Callback",
    "ModelStats",
    "ParamSlice",
    "PruneResult",
    "PruningCallback",
    "PruningError",
    "Removal",
    "SNAPit",
    "SNIPCallback",
    "SNIPit",
    "SensitivityPruner",
    "ShrinkOnFitEnd",
    "ShrinkReport",
    "SlimmingL1Callback",
    "__version__",
    "create_model",
    "fold_batchnorm",
    "list_criteria",
    "list_models",
    "load_pruned_checkpoint",
    "load_pruned_state_dict",
    "measure_latency",
    "model_stats",
    "prune_channels",
    "register_model",
    "shrink",
]
