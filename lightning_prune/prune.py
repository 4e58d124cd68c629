"""One-shot structured pruning outside a Trainer: score channels, remove the lowest, physically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune._inputs import ExampleInputs
from lightning_prune._validate import boolean, fraction
from lightning_prune._validate import round_to as check_round_to
from lightning_prune.criteria import ScoringInputs, get_criterion
from lightning_prune.errors import PruningError
from lightning_prune.stats import ModelStats, stats_and_outputs
from lightning_prune.structure import (
    ChannelGraph,
    Removal,
    channel_multiple,
    latency_aware_kept,
    lowest_channels,
    node_weights,
)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune_channels` removed and what it gained.

    Attributes:
        before: Params and MACs before (MACs of one call with the example inputs).
        after: Params and MACs after.
        removed: Group name → channels removed (in the layers' own channels).
        node_sparsity: Fraction of the scored groups' nodes removed: what was reached, after rounding.
        round_to: The channel multiple used (``"auto"`` resolved).
        removals: The surgery, parameter by parameter (see :class:`~lightning_prune.Removal`).
    """

    before: ModelStats
    after: ModelStats
    removed: dict[str, int]
    node_sparsity: float
    round_to: int
    removals: list[Removal]


def prune_channels(
    model: nn.Module,
    example_inputs: ExampleInputs,
    amount: float,
    *,
    scores: str | Mapping[str, torch.Tensor] = "l1_norm",
    round_to: int | str = 1,
    frozen: Sequence[str] = (),
    latency_aware: bool = False,
) -> PruneResult:
    """Remove the lowest-scoring ``amount`` of a model's channels in one global ranking, in place.

    The same planner as the structured callbacks (:func:`~lightning_prune.structure.lowest_channels`),
    without a Trainer: channels are ranked over every prunable group, the lowest go until ``amount`` of the
    groups' nodes are gone, no layer is emptied, and with ``round_to`` every group cut keeps a multiple of
    ``round_to`` channels (:func:`~lightning_prune.structure.round_kept`). The surgery is physical and
    transactional; afterwards the model must still run and keep its output shapes (else it is restored and
    this raises). Removing live channels changes the outputs: fine-tune afterwards.

    Args:
        model: The model, pruned in place (eval mode is used for tracing; modes are restored).
        example_inputs: Inputs for one forward pass (tensor, tuple of positional arguments, or dict).
        amount: Fraction of the prunable groups' nodes to remove, in [0, 1).
        scores: A criterion that needs no data (``"l1_norm"``: the L1 norm of each channel's producing
            weights; ``"random"``), or your own scores: group name → 1-D tensor, one score per channel,
            higher = keep (see :attr:`ChannelGraph.groups`); groups you leave out are kept whole.
        round_to: Channel multiple of every group cut (an int >= 1), or ``"auto"`` for the model's device
            and dtype (:func:`~lightning_prune.structure.auto_round_to`).
        frozen: Layers whose output channels must be kept.
        latency_aware: After rounding, time the layers each cut touches at a few counts around the plan
            (on the model's device and dtype, with the example inputs' shapes) and move counts to the fast
            side of latency steps, trading units between groups so that the nodes kept stay within one
            unit of the plan's (:func:`~lightning_prune.structure.latency_aware_kept`). Costs a few
            seconds of timing.

    Returns:
        The :class:`PruneResult`.

    Raises:
        PruningError: For invalid arguments, a criterion that needs training data, scores that do not fit
            the groups, or a model that cannot be traced or pruned (nothing is modified then).

    Examples:
        >>> import torch, torchvision
        >>> from lightning_prune import prune_channels
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> result = prune_channels(net, torch.randn(1, 3, 64, 64), 0.5, round_to=8)
        >>> all(m.out_channels % 8 == 0 for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        True
        >>> result.after.params < result.before.params
        True
    """
    owner = "prune_channels"
    amount = fraction(owner, "amount", amount)
    rounding = check_round_to(owner, round_to)
    graph = ChannelGraph(model, example_inputs, frozen=frozen, measure=True)
    groups = [g for g in graph.groups if g.prunable and g.size > 1]
    if not groups:
        raise PruningError(
            f"`{owner}`: {type(model).__name__} has no prunable channel group ({graph.refusals()})."
        )
    if isinstance(scores, str):
        criterion = get_criterion(scores, structured=True, owner=owner)
        if criterion.needs_data:
            raise PruningError(
                f"`{owner}(scores={scores!r})` is invalid: {scores!r} needs training batches; use a pruning "
                "callback in a Trainer, or pass your own scores (group name → tensor)."
            )
        scores = criterion.node_scores(ScoringInputs(model, {}, lambda: iter(()), groups))
    sizes = {g.name: g.size for g in groups}
    for name, values in scores.items():
        ok = isinstance(values, torch.Tensor) and name in sizes and tuple(values.shape) == (sizes[name],)
        if not ok or not bool(torch.isfinite(values).all()):
            want = (
                f"a finite tensor of shape ({sizes[name]},)" if name in sizes else f"one of {sorted(sizes)}"
            )
            raise PruningError(f"`{owner}(scores=...)`: scores for {name!r} must be {want}.")
    scores = {n: v.detach().float().cpu() for n, v in scores.items()}
    multiple = channel_multiple(model, rounding)
    plan = lowest_channels(graph, scores, amount, multiple)
    if boolean(owner, "latency_aware", latency_aware):
        plan = latency_aware_kept(graph, scores, plan, multiple, example_inputs)
    by_name = {g.name: g for g in groups}
    measured: list[ModelStats] = []

    def run(model: nn.Module, inputs: ExampleInputs) -> list[torch.Tensor]:  # checks and counts at once
        stats, outputs = stats_and_outputs(model, inputs)
        measured.append(stats)
        return outputs

    removals = graph.prune(plan, verify=example_inputs, compare=False, run=run)
    weights = {n: node_weights(graph, by_name[n]) for n in scores}
    total = sum(weights[n] * by_name[n].size for n in scores)
    gone = sum(weights[n] * len(c) for n, c in plan.items())
    return PruneResult(
        before=graph.traced_stats,
        after=measured[-1] if measured else graph.traced_stats,
        removed={n: len(c) * by_name[n].ties for n, c in plan.items()},
        node_sparsity=gone / max(total, 1),
        round_to=multiple,
        removals=removals,
    )
