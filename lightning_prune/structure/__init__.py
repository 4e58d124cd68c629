"""Dependency-aware channel groups and physical channel removal.

A *channel group* is a set of channels that must be removed together: the output channels of a
convolution, the norm layer behind it, every layer that reads them, and every other producer coupled to
them through residual additions or concatenations. :class:`ChannelGraph` finds the groups of a model by
tracing one forward pass and removes chosen channels from every layer of a group at once.

The package is laid out along what it does:

- ``types``: the value types (:class:`ParamSlice`, :class:`ChannelGroup`, :class:`Removal`);
- ``layers``: per-layer-type knowledge (which tensors, dimensions and roles) and layer selection;
- ``_engine``: the adapter over Torch-Pruning's ``DependencyGraph`` (the only module importing it),
  with the corrections for the operations it misreads, its time budget and its errors;
- ``graph``: :class:`ChannelGraph`, the groups and their transactional, verified surgery;
- ``plan``: which channels go (global ranking, node weights), pure functions;
- ``latency``: channel counts moved to the fast side of measured latency steps;
- ``fold``: :func:`fold_batchnorm`, BatchNorm layers folded into the layers that feed them (deployment);
- ``shrink``: :func:`shrink` and its :class:`ShrinkReport`.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import ChannelGraph
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    >>> [(g.name, g.size, g.prunable) for g in graph.groups]
    [('0', 8, True), ('3', 4, False)]
    >>> _ = graph.prune({"0": [1, 5]})
    >>> model[0].out_channels, model[1].num_features, model[3].in_channels
    (6, 6, 6)
"""

from lightning_prune.structure.fold import FoldPlan, fold_batchnorm, fold_plan
from lightning_prune.structure.graph import DEFAULT_TIME_BUDGET, ChannelGraph, prune_or_refuse
from lightning_prune.structure.latency import latency_aware_kept
from lightning_prune.structure.layers import ROOT_TYPES, select_layers
from lightning_prune.structure.plan import (
    auto_round_to,
    channel_multiple,
    lowest_channels,
    node_weights,
    round_kept,
)
from lightning_prune.structure.shrink import ShrinkReport, shrink
from lightning_prune.structure.types import ChannelGroup, ParamSlice, Removal

__all__ = [
    "DEFAULT_TIME_BUDGET",
    "ROOT_TYPES",
    "ChannelGraph",
    "ChannelGroup",
    "FoldPlan",
    "ParamSlice",
    "Removal",
    "ShrinkReport",
    "auto_round_to",
    "channel_multiple",
    "fold_batchnorm",
    "fold_plan",
    "latency_aware_kept",
    "lowest_channels",
    "node_weights",
    "prune_or_refuse",
    "round_kept",
    "select_layers",
    "shrink",
]
