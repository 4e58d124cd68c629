"""Connection sensitivity (SNIP, arXiv:1810.02340) and its channel-group aggregation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_prune.structure import ChannelGroup


def connection_sensitivity(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """SNIP's saliency of every weight: ``|∂L/∂w ⊙ w|`` (same shape as ``weight``; higher = keep).

    Normalising by the global sum, as the paper writes it, does not change a global ranking, so it is left
    to the caller.

    Example:
        >>> import torch
        >>> connection_sensitivity(torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, 0.5, 3.0]))
        tensor([0.5000, 1.0000, 0.0000])
    """
    return (grad * weight).abs()


def group_sum(
    group: ChannelGroup, scores: Mapping[str, torch.Tensor], roles: tuple[str, ...] = ("out",)
) -> torch.Tensor:
    """Aggregate per-entry scores into one score per channel of ``group`` (a 1-D tensor of ``group.size``).

    Every entry of every slice of ``group`` with a role in ``roles`` whose parameter has scores adds its
    score to its channel: for SNIP's structured variant, the summed saliency of each channel's producing
    weights, over every coupled producer.

    Args:
        group: The channel group.
        scores: Parameter name → per-entry scores shaped like the parameter.
        roles: Slice roles to aggregate (see :class:`~lightning_prune.ParamSlice`).
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if s.role not in roles or s.param not in scores:
            continue
        values = scores[s.param]
        part = values.index_select(s.dim, s.positions.to(values.device))
        per_position = part.movedim(s.dim, 0).reshape(len(s.positions), -1).sum(1)
        total.index_add_(0, s.channels, per_position.detach().to("cpu", torch.float64))
    return total
