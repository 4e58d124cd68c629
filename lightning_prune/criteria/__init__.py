"""Scoring functions: pure torch, no Lightning. Contract: higher score = keep."""

from lightning_prune.criteria.sensitivity import connection_sensitivity, group_sum

__all__ = ["connection_sensitivity", "group_sum"]
