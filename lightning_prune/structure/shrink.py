"""`shrink`: remove every dead channel of a model, exactly, and report what it gained."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune._inputs import ExampleInputs, check_inputs, check_module
from lightning_prune.stats import ModelStats, model_stats, stats_and_outputs
from lightning_prune.structure.graph import DEFAULT_TIME_BUDGET, ChannelGraph, prune_or_refuse
from lightning_prune.structure.plan import spare_one_per_layer
from lightning_prune.structure.types import Removal


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink` removed and what it gained.

    Attributes:
        before: Model statistics before shrinking (None when ``stats=False``).
        after: Model statistics after shrinking (None when ``stats=False``).
        removed: Group name → channels removed (counting every tied copy).
        kept_dead: Group name → dead channels kept (one per tie) because all of the group was dead
            and removing it would empty its layers.
        skipped: Group name → why its dead channels were left in place.
        removals: The surgery, parameter by parameter (replayable on optimizer state).
    """

    before: ModelStats | None
    after: ModelStats | None
    removed: dict[str, int]
    kept_dead: dict[str, int]
    skipped: dict[str, str]
    removals: list[Removal] = field(repr=False)

    @property
    def channels_removed(self) -> int:
        """Total channels removed."""
        return sum(self.removed.values())

    def __str__(self) -> str:
        lines = [f"shrink: removed {self.channels_removed} channels in {len(self.removed)} groups"]
        if self.before is not None and self.after is not None:
            b, a = self.before, self.after
            lines += [
                f"  params {b.params:,} -> {a.params:,} ({a.params / max(b.params, 1):.1%})",
                f"  MACs   {b.macs:,} -> {a.macs:,} ({a.macs / max(b.macs, 1):.1%})",
            ]
        lines += [
            f"  kept {n} dead channel(s) in {g}: the whole group is dead and a layer cannot be empty"
            for g, n in self.kept_dead.items()
        ]
        lines += [f"  left dead channels in {g}: {why}" for g, why in self.skipped.items()]
        return "\n".join(lines)


def shrink(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    frozen: Sequence[str] = (),
    verify: bool = True,
    stats: bool = True,
    time_budget: float | None = DEFAULT_TIME_BUDGET,
) -> ShrinkReport:
    """Physically remove dead channels (all producing parameters exactly zero), in place.

    Every channel group (see :class:`ChannelGraph`) whose channels are dead in *all* of its coupled
    producers loses those channels in every layer it touches: conv/linear output rows and bias, the
    norm layers' parameters and running statistics, the input slices of every consumer (flatten →
    linear included), depthwise and grouped convolutions. Channels coupled through a residual addition
    go only when dead in every branch. A group that is dead as a whole keeps one channel, so no layer is
    emptied. In eval mode the shrunk model computes the same function as before.

    With ``verify=True`` (or ``stats=True``) the shrunk model is run once more: it must still run and
    keep its output shapes, and with ``verify=True`` give the same outputs; otherwise the surgery is
    undone, the groups responsible are found by bisection, left in place and listed in
    ``report.skipped`` with the reason, while the others are shrunk. A model is thus shrunk (exactly,
    when verified) or left as it was, never left broken. With both off, no forward pass follows the
    surgery: the fastest path, which trusts the engine's checks alone (surgery that raises is still
    undone).

    Cost: one forward pass (the trace, which also gives the reference outputs and, with ``stats``,
    the statistics before), plus one after the surgery unless ``verify`` and ``stats`` are both off.

    Args:
        model: The model to shrink, in place.
        example_inputs: Inputs for one forward pass (tensor, tuple of positional arguments, or dict).
        frozen: Layers whose output channels must be kept (model outputs are always kept).
        verify: Compare the output values before and after (eval mode), as described above.
        stats: Measure params and MACs before and after (from the forward passes above).
        time_budget: Seconds the channel engine may spend on the graph (see :class:`ChannelGraph`).

    Returns:
        The :class:`ShrinkReport`.

    Raises:
        PruningError: If the model is not a module, cannot run on ``example_inputs``, cannot be traced
            within the time budget or has nothing to prune (raised before the model is modified).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune import shrink
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[:3] = 0
        ...     net[0].bias[:3] = 0
        >>> report = shrink(net, torch.randn(5, 4))
        >>> net[0].out_features, net[2].in_features, report.removed
        (5, 5, {'0': 3})
    """
    check_module(model, "shrink")
    check_inputs(example_inputs, "shrink")
    # One forward pass traces the model, counts its MACs and gives the reference outputs; one more
    # checks the shrunk model and counts its MACs.
    graph = ChannelGraph(model, example_inputs, frozen=frozen, time_budget=time_budget, measure=stats)
    before = graph.traced_stats
    measured: list[ModelStats] = []

    def run(model: nn.Module, inputs: ExampleInputs) -> list[torch.Tensor]:
        after, outputs = stats_and_outputs(model, inputs)
        measured.append(after)
        return outputs

    plan, kept_dead, skipped = {}, {}, {}
    groups = {g.name: g for g in graph.groups}
    for name, dead in graph.dead_channels().items():
        group = groups[name]
        if not dead:
            continue
        if not group.exact:
            skipped[name] = "a LayerNorm/GroupNorm normalizes across these channels"
        else:
            dead, kept = spare_one_per_layer(group, dead, graph._shapes())
            if kept:
                kept_dead[name] = kept * group.ties
            if dead:
                plan[name] = dead
    # Dead channels are zero already: the reference is the model's own output. Without `verify`, the
    # statistics' forward pass still checks that the shrunk model runs and keeps its output shapes.
    removals, refused = prune_or_refuse(
        graph,
        plan,
        verify=graph.example_inputs if verify or stats else None,
        compare=verify,
        reference=graph.traced_outputs if verify else None,
        run=run if stats else None,
    )
    skipped |= {n: f"removing them would change the model: {why}" for n, why in refused.items()}
    done = {n: c for n, c in plan.items() if n not in skipped}
    after = None
    if stats:  # the last forward pass measured the model as it is, unless a refused attempt came after
        after = before if not removals else measured[-1] if measured and not refused else None
        after = after or model_stats(model, example_inputs)
    return ShrinkReport(
        before=before,
        after=after,
        removed={n: len(c) * groups[n].ties for n, c in done.items()},
        kept_dead={n: k for n, k in kept_dead.items() if n not in skipped},
        skipped=skipped,
        removals=removals,
    )
