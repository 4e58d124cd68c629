"""Scoring functions: pure torch, no Lightning. Contract: higher score = keep (see :mod:`.registry`)."""

from lightning_prune.criteria import baselines as _baselines  # noqa: F401  (registers the baselines)
from lightning_prune.criteria.registry import (
    Criterion,
    ScoringInputs,
    get_criterion,
    list_criteria,
    register_criterion,
)
from lightning_prune.criteria.sensitivity import connection_sensitivity, group_sum

__all__ = [
    "Criterion",
    "ScoringInputs",
    "connection_sensitivity",
    "get_criterion",
    "group_sum",
    "list_criteria",
    "register_criterion",
]
