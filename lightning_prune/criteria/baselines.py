"""Data-free baselines: random, global magnitude (IMP), per-layer L1 filter norm (EfficientConvNets)."""

from __future__ import annotations

import torch

from lightning_prune.criteria.registry import Criterion, ScoringInputs, register_criterion
from lightning_prune.criteria.sensitivity import group_sum, producer_weights


@register_criterion
class Random(Criterion):
    """Uniform random scores from the seeded generator (the seeds' Structured/UnstructuredRandom)."""

    name = "random"
    needs_data = False
    weights = nodes = True

    def weight_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        return {n: torch.rand(w.shape, generator=inputs.generator) for n, w in inputs.weights.items()}

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        gen = inputs.generator
        return {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in inputs.groups}


@register_criterion
class Magnitude(Criterion):
    """Weight magnitude ``|w|`` in one global ranking: iterative magnitude pruning (IMP, arXiv:1803.03635)."""

    name = "magnitude"
    needs_data = False
    weights = True

    def weight_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        return {n: w.detach().abs().float() for n, w in inputs.weights.items()}


@register_criterion
class L1Norm(Criterion):
    """Per-layer L1 norm of filters (Li et al., "Pruning Filters for Efficient ConvNets", arXiv:1608.08710).

    A channel's norm sums ``|w|`` of its producing filters over the group's producers. The paper prunes
    the same fraction of every layer, so the score is the channel's rank within its group, scaled to
    (0, 1]: one global ranking then removes about the same fraction from each group.
    """

    name = "l1_norm"
    needs_data = False
    nodes = True

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        norms = {n: w.detach().abs() for n, w in producer_weights(inputs.module, inputs.groups).items()}
        scores = {}
        for g in inputs.groups:
            ranks = torch.argsort(torch.argsort(group_sum(g, norms), stable=True), stable=True)
            scores[g.name] = (ranks.double() + 1) / g.size
        return scores
