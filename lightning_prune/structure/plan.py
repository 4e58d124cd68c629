"""Planning which channels go: pure functions over a graph's groups and scores, no surgery."""

from __future__ import annotations

import math
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
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    amount: float,
    round_to: int = 1,
    floor: float = 0.0,
) -> dict[str, list[int]]:
    """Plan the removal of the lowest-scoring channels in ONE global ranking over the scored groups.

    Channels are removed in ascending score order (ties broken by model order) until ``amount`` of the
    scored groups' nodes (conv/linear output channels; a channel shared by several producers counts once
    per producer, see :func:`node_weights`) are gone. A channel is skipped when removing it would empty a
    layer, so every group and every layer keeps at least one channel; with ``floor``, a channel is also
    skipped when its layer would keep fewer than ``ceil(floor · n)`` of the ``n`` channels it has in the
    group (Torch-Pruning's per-layer ``max_pruning_ratio`` is ``1 - floor``). When the floors make
    ``amount`` unreachable, the plan removes what they allow.

    Args:
        graph: The channel graph the scores refer to.
        scores: Group name → 1-D scores, one per channel (higher = keep).
        amount: Fraction of the scored nodes to remove, in [0, 1).
        round_to: Make the kept channel count of every group that loses channels a multiple of this
            (see :func:`round_kept`); 1 leaves the plan as ranked. Rounding to the nearest multiple may
            take a layer below its floor by less than one multiple.
        floor: Fraction of each layer's channels always kept, in [0, 1); 0: at least one channel.

    Returns:
        Group name → channel indices to remove, for :meth:`ChannelGraph.prune`.

    Examples:
        >>> import torch
        >>> from lightning_prune import ChannelGraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
        >>> graph = ChannelGraph(net, torch.randn(1, 4))
        >>> scores = {"0": torch.arange(10.0)}
        >>> len(lowest_channels(graph, scores, 0.95)["0"])  # one channel left
        9
        >>> len(lowest_channels(graph, scores, 0.95, floor=0.3)["0"])  # 3 of 10 kept
        7
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
    least: dict[str, list[int]] = {}  # channels each layer keeps at least
    for name in scores:
        slices = groups[name].slices
        covers[name] = {}
        remaining[name] = []
        least[name] = []
        for i, s in enumerate(slices):
            unique = s.channels.unique().tolist()
            remaining[name].append(len(unique))
            least[name].append(max(1, math.ceil(floor * len(unique) - 1e-9)))
            for c in unique:
                covers[name].setdefault(c, []).append(i)

    target = round(amount * total)
    plan: dict[str, list[int]] = {}
    removed = 0
    for _, _, name, channel in entries:
        if removed >= target:
            break
        layers = covers[name].get(channel, [])
        if any(remaining[name][i] <= least[name][i] for i in layers):
            continue
        for i in layers:
            remaining[name][i] -= 1
        plan.setdefault(name, []).append(channel)
        removed += node_weights(graph, groups[name])
    plan = {name: sorted(chs) for name, chs in plan.items()}
    return round_kept(graph, scores, plan, round_to) if round_to > 1 else plan


def round_kept(
    graph: ChannelGraph, scores: Mapping[str, torch.Tensor], plan: Mapping[str, list[int]], round_to: int
) -> dict[str, list[int]]:
    """Adjust ``plan`` so that every group it cuts keeps a multiple of ``round_to`` channels.

    Counted in the layers' own channels: a channel of a group with ``ties`` (a grouped convolution's
    repeats, an attention head's dimension) is ``ties`` of them, so the group keeps a multiple of
    ``round_to / gcd(round_to, ties)`` of its channels. Each cut group's kept count goes to the nearest
    multiple (at least one multiple, at most the group's size): extra channels go lowest score first,
    channels come back highest score first. Groups the plan does not cut are left alone, and so is a
    group smaller than one multiple or one whose rounded cut would empty a layer. Over many groups the
    roundings up and down roughly cancel; the sparsity reached is what callers report.

    Returns:
        The adjusted plan (group name → channels to remove).

    Examples:
        >>> import torch
        >>> from lightning_prune import ChannelGraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        >>> graph = ChannelGraph(net, torch.randn(1, 4))
        >>> plan = round_kept(graph, {"0": torch.arange(32.0)}, {"0": list(range(13))}, round_to=8)
        >>> 32 - len(plan["0"])  # 19 kept -> 16
        16
    """
    groups = {g.name: g for g in graph.groups}
    shapes = graph._shapes()
    out: dict[str, list[int]] = {}
    for name, gone in plan.items():
        group = groups[name]
        unit = round_to // math.gcd(round_to, group.ties)
        kept = group.size - len(gone)
        if unit <= 1 or group.size < unit or not gone:
            out[name] = list(gone)
            continue
        wanted = min(group.size // unit * unit, max(unit, round(kept / unit) * unit))
        values, planned = scores[name].tolist(), set(gone)
        order = sorted(range(group.size), key=lambda c: (values[c], c))  # lowest score first
        removed = [c for c in order if c in planned]
        if wanted < kept:
            removed += [c for c in order if c not in planned][: kept - wanted]
        else:
            removed = removed[: len(removed) - (wanted - kept)]
        rounded = sorted(removed)
        out[name] = list(gone) if emptied_by(group, rounded, shapes) else rounded
    return {name: chs for name, chs in out.items() if chs}


def channel_multiple(model: torch.nn.Module, round_to: int | str) -> int:
    """``round_to`` for ``model``: an int as it is, ``"auto"`` resolved for the model's device and dtype."""
    if round_to != "auto":
        return int(round_to)
    param = next(model.parameters(), None)
    if param is None:
        return auto_round_to("cpu", torch.float32)
    return auto_round_to(param.device, param.dtype)


def auto_round_to(device: torch.device | str, dtype: torch.dtype) -> int:
    """The channel multiple ``round_to="auto"`` picks for ``device`` and ``dtype``.

    - CUDA: 8 for float16/bfloat16 and 4 for float32 (TF32), the multiples NVIDIA's "Matrix Multiplication
      Background" and "Convolutional Layers" performance guides give for Tensor Core use; 16 for int8.
    - CPU: the float32 lanes of the widest vector unit PyTorch dispatches to
      (``torch.backends.cpu.get_cpu_capability()``): 16 with AVX-512, 8 with AVX2, 4 otherwise (NEON, SSE).

    Examples:
        >>> auto_round_to("cuda", torch.float16)
        8
    """
    device = torch.device(device)
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16):
            return 8
        return 16 if dtype == torch.int8 else 4
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    if "AVX512" in capability:
        return 16
    return 8 if "AVX2" in capability else 4
