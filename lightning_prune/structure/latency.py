"""Latency-aware channel counts: move rounded counts to the fast side of the steps the hardware has.

Convolution and matrix kernels run in tiles, so latency against channel count is a staircase, not a line:
one channel past a step can cost as much as a whole tile. :func:`latency_aware_kept` measures, on the
model's device and dtype, each layer a planned cut touches at a few channel counts around the plan (a
fresh layer of the same kind on an input of the traced shape; cached per process), then trades units of
channels between groups: one group gives up a unit where that saves the most time per node, another takes
one back where that costs the least, as long as the exchange saves time. The number of nodes kept stays
within one unit of the plan's, and every count stays a multiple of ``round_to`` within ``window`` units of
the plan's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune._inputs import ExampleInputs, call_model
from lightning_prune.stats import _eval_mode, latency_samples
from lightning_prune.structure.graph import ChannelGraph, emptied_by
from lightning_prune.structure.layers import is_root
from lightning_prune.structure.plan import node_weights
from lightning_prune.structure.types import ChannelGroup

_CACHE: dict[tuple, float] = {}  # layer configuration, input shape, device, dtype, threads -> seconds


@dataclass
class _Dims:
    """A conv/linear layer's channel counts under the plan, and its input's traced shape."""

    layer: nn.Module
    out: int
    inp: int
    shape: tuple[int, ...]


def latency_aware_kept(
    graph: ChannelGraph,
    scores: Mapping[str, torch.Tensor],
    plan: Mapping[str, list[int]],
    round_to: int,
    example_inputs: ExampleInputs,
    *,
    window: int = 2,
    repeats: int = 7,
) -> dict[str, list[int]]:
    """Move the kept counts of a rounded ``plan`` to measured fast sides of latency steps.

    Args:
        graph: The channel graph ``plan`` refers to (not modified).
        scores: Group name → channel scores (higher = keep): a group giving up a unit loses its lowest
            kept channels, a group taking one back gets its highest removed ones.
        plan: Group name → channels to remove, already rounded (see
            :func:`~lightning_prune.structure.round_kept`); only the groups it cuts are adjusted.
        round_to: The channel multiple (the unit traded).
        example_inputs: Inputs of one forward pass: they give every layer's input shape (batch included).
        window: How many units a group's count may move from the plan's.
        repeats: Timed calls per measurement (the fastest is used: other load only adds time).

    Returns:
        The adjusted plan.

    Examples:
        >>> import torch
        >>> from lightning_prune import ChannelGraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        >>> x = torch.randn(1, 64)
        >>> graph, scores = ChannelGraph(net, x), {"0": torch.arange(64.0)}
        >>> plan = latency_aware_kept(graph, scores, {"0": list(range(24))}, 8, x)
        >>> (64 - len(plan["0"])) % 8  # a multiple of 8, still
        0
    """
    groups = {g.name: g for g in graph.groups}
    cut = [name for name in plan if plan[name] and name in scores]
    dims = _planned_dims(graph, plan, example_inputs, [groups[n] for n in cut])
    units, counts, bounds, cost = {}, {}, {}, {}
    for name in cut:
        group = groups[name]
        unit = max(round_to // math.gcd(round_to, group.ties), 1)
        kept = group.size - len(plan[name])
        units[name], counts[name] = unit, kept
        bounds[name] = (max(unit, kept - window * unit), min(group.size // unit * unit, kept + window * unit))
        cost[name] = _group_cost(graph, group, len(plan[name]), dims, repeats)
    weights = {n: node_weights(graph, groups[n]) for n in cut}

    def rate(name: str, step: int) -> float | None:  # seconds per node of moving one unit (+1 up, -1 down)
        new = counts[name] + step * units[name]
        low, high = bounds[name]
        if not low <= new <= high:
            return None
        change = cost[name](groups[name].size - new) - cost[name](groups[name].size - counts[name])
        return change / (weights[name] * units[name])

    lowered: set[str] = set()
    raised: set[str] = set()
    balance = 0  # nodes kept minus the plan's
    for _ in range(4 * window * max(len(cut), 1)):
        downs = [(r, n) for n in cut if n not in raised and (r := rate(n, -1)) is not None]
        ups = [(r, n) for n in cut if n not in lowered and (r := rate(n, +1)) is not None]
        if not downs or not ups:
            break
        saving, down = min(downs)  # most negative: removing a unit saves the most time per node
        others = [(r, n) for r, n in ups if n != down]
        if not others:
            break
        extra, up = min(others)  # least time added per node kept
        if -saving <= 1.05 * extra:  # the exchange must save time beyond 5% noise
            break
        step_down, step_up = weights[down] * units[down], weights[up] * units[up]
        if abs(balance - step_down + step_up) > max(step_down, step_up):
            break
        counts[down] -= units[down]
        counts[up] += units[up]
        lowered.add(down)
        raised.add(up)
        balance += step_up - step_down

    shapes = graph._shapes()
    out = {name: list(chs) for name, chs in plan.items()}
    for name in cut:
        group, kept = groups[name], counts[name]
        order = sorted(range(group.size), key=lambda c: (float(scores[name][c]), c))  # lowest first
        removed = sorted(order[: group.size - kept])
        if kept != group.size - len(plan[name]) and emptied_by(group, removed, shapes) is None:
            out[name] = removed
    return out


def _planned_dims(
    graph: ChannelGraph,
    plan: Mapping[str, list[int]],
    example_inputs: ExampleInputs,
    groups: list[ChannelGroup],
) -> dict[str, _Dims]:
    """Channel counts under ``plan`` and traced input shapes of the root layers ``groups`` touch."""
    model = graph.model
    names = {s.param.removesuffix(".weight") for g in groups for s in _weight_slices(graph, g)}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        with _eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    dims = {}
    for n in names & set(shapes):
        layer = model.get_submodule(n)
        out, inp = _channels(layer)
        dims[n] = _Dims(layer, out, inp, shapes[n])
    by_name = {g.name: g for g in graph.groups}
    for name, channels in plan.items():  # every planned cut, also of groups not adjusted, sets the dims
        gone = torch.zeros(by_name[name].size, dtype=torch.bool)
        gone[list(channels)] = True
        for s in _weight_slices(graph, by_name[name]):
            d = dims.get(s.param.removesuffix(".weight"))
            if d is not None:
                removed = int(gone[s.channels].sum())
                d.out, d.inp = (d.out - removed, d.inp) if s.role == "out" else (d.out, d.inp - removed)
    return dims


def _weight_slices(graph: ChannelGraph, group: ChannelGroup) -> list:
    """The group's slices of conv/linear weights (``out``: rows it produces, ``in``: columns it feeds)."""
    found = []
    for s in group.slices:
        if s.role not in ("out", "in") or not s.param.endswith(".weight"):
            continue
        layer = graph.model.get_submodule(s.param.removesuffix(".weight"))
        if is_root(layer) and isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            found.append(s)
    return found


def _channels(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels


def _group_cost(
    graph: ChannelGraph, group: ChannelGroup, planned: int, dims: Mapping[str, _Dims], repeats: int
):
    """Seconds of the layers ``group`` touches as a function of how many of its channels are removed."""
    slices = [(s, dims[s.param.removesuffix(".weight")]) for s in _weight_slices(graph, group)]
    slices = [(s, d) for s, d in slices if d is not None]

    def cost(removed: int) -> float:
        total = 0.0
        for s, d in slices:
            per_channel = len(s.positions) / group.size
            delta = round((removed - planned) * per_channel)  # positions beyond the plan's removal
            out, inp = (d.out - delta, d.inp) if s.role == "out" else (d.out, d.inp - delta)
            total += _layer_seconds(d, out, inp, repeats)
        return total

    return cost


def _layer_seconds(d: _Dims, out: int, inp: int, repeats: int) -> float:
    """Fastest seconds of a fresh layer like ``d.layer``, ``out``/``inp`` channels, on ``d.shape`` input."""
    layer = d.layer
    weight = layer.weight
    depthwise = not isinstance(layer, nn.Linear) and layer.groups == layer.in_channels == layer.out_channels
    if depthwise:
        inp = out = min(out, inp)
    groups = inp if depthwise else getattr(layer, "groups", 1)
    if out < 1 or inp < 1 or inp % groups or out % groups:
        return 0.0  # a grouped conv whose groups no longer divide: not timed (the plan keeps it valid)
    shape = (d.shape[0], inp, *d.shape[2:]) if not isinstance(layer, nn.Linear) else (*d.shape[:-1], inp)
    key = (type(layer).__name__, out, inp, groups, shape, _config(layer), weight.device, weight.dtype)
    key += (torch.get_num_threads(),)
    if key in _CACHE:
        return _CACHE[key]
    with torch.device(weight.device):
        if isinstance(layer, nn.Linear):
            fresh = nn.Linear(inp, out, bias=layer.bias is not None)
        else:
            config = dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding)
            config |= dict(dilation=layer.dilation, groups=groups, bias=layer.bias is not None)
            fresh = type(layer)(inp, out, **config)
        fresh = fresh.to(weight.dtype).eval()
        x = torch.randn(shape, dtype=weight.dtype)
    if layer.weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        fresh = fresh.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = latency_samples(fresh, x, warmup=2, repeats=repeats)
    _CACHE[key] = min(times)  # contention only ever adds time: the fastest call is the least noisy
    return _CACHE[key]


def _config(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return ()
    return (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
