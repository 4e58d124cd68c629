"""Planning which channels go: pure functions over a graph's groups and scores, no surgery."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_prune.errors import PruningError
from lightning_prune.structure.graph import ChannelGraph, emptied_by
from lightning_prune.structure.layers import is_root
from lightning_prune.structure.types import ChannelGroup


def node_weights(graph: ChannelGraph, group: ChannelGroup) -> int:
    """Conv/linear output channels (nodes) one channel of ``group`` stands for.

    The rows of conv/linear weights the channel owns, over every producer: ties × producing layers in a
    channel group, the rows of a head in each projection for attention heads.
    """
    rows = sum(
        len(s.positions)
        for s in group.slices
        if s.role == "out"
        and s.param.endswith(".weight")
        and is_root(graph.model.get_submodule(s.param.removesuffix(".weight")))
    )
    return max(round(rows / group.size), 1)


def spare_one_per_layer(
    group: ChannelGroup, dead: list[int], shapes: Mapping[str, torch.Size]
) -> tuple[list[int], int]:
    """Drop channels from ``dead`` until no layer would be emptied; return them and how many."""
    dead, kept = list(dead), 0
    while (param := emptied_by(group, dead, shapes)) is not None:
        slc = next(s for s in group.slices if s.param == param)
        dead.remove(min(int(c) for c in slc.channels if int(c) in dead))
        kept += 1
    return dead, kept


def lowest_channels(
    graph: ChannelGraph, scores: Mapping[str, torch.Tensor], amount: float
) -> dict[str, list[int]]:
    """Plan the removal of the lowest-scoring channels in ONE global ranking over the scored groups.

    Channels are removed in ascending score order (ties broken by model order) until ``amount`` of the
    scored groups' nodes (conv/linear output channels; a channel shared by several producers counts once
    per producer, see :func:`node_weights`) are gone. A channel is skipped when removing it would empty a
    layer, so every group and every layer keeps at least one channel.

    Args:
        graph: The channel graph the scores refer to.
        scores: Group name → 1-D scores, one per channel (higher = keep).
        amount: Fraction of the scored nodes to remove, in [0, 1).

    Returns:
        Group name → channel indices to remove, for :meth:`ChannelGraph.prune`.
    """
    groups = {g.name: g for g in graph.groups}
    entries = []  # (score, order, group name, channel)
    total = 0
    for order, (name, values) in enumerate(scores.items()):
        group = groups[name]
        if values.shape != (group.size,):
            raise PruningError(
                f"Scores for group {name!r} must have shape ({group.size},); got {tuple(values.shape)}."
            )
        weight = node_weights(graph, group)
        total += weight * group.size
        entries += [(float(v), order, name, c) for c, v in enumerate(values.tolist())]
    entries.sort(key=lambda e: (e[0], e[1], e[3]))

    # For each group: which layers (slices) each channel is part of, and how many channels each still has.
    covers: dict[str, dict[int, list[int]]] = {}
    remaining: dict[str, list[int]] = {}
    for name in scores:
        slices = groups[name].slices
        covers[name] = {}
        remaining[name] = []
        for i, s in enumerate(slices):
            unique = s.channels.unique().tolist()
            remaining[name].append(len(unique))
            for c in unique:
                covers[name].setdefault(c, []).append(i)

    target = round(amount * total)
    plan: dict[str, list[int]] = {}
    removed = 0
    for _, _, name, channel in entries:
        if removed >= target:
            break
        layers = covers[name].get(channel, [])
        if any(remaining[name][i] <= 1 for i in layers):
            continue
        for i in layers:
            remaining[name][i] -= 1
        plan.setdefault(name, []).append(channel)
        removed += node_weights(graph, groups[name])
    return {name: sorted(chs) for name, chs in plan.items()}
