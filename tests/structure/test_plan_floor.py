"""`lowest_channels(floor=...)`: each layer keeps ceil(floor · its channels); the plan is otherwise global."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_prune import ChannelGraph
from lightning_prune.structure import lowest_channels

NET = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 2))
GRAPH = ChannelGraph(NET, torch.randn(1, 3))


@given(
    amount=st.floats(0.0, 0.99),
    floor=st.floats(0.0, 0.99),
    seed=st.integers(0, 1000),
)
def test_every_layer_keeps_its_floor_and_the_lowest_go_first(amount, floor, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = {"0": torch.rand(10, generator=gen), "2": torch.rand(7, generator=gen)}
    plan = lowest_channels(GRAPH, scores, amount, floor=floor)
    sizes = {"0": 10, "2": 7}
    for name, size in sizes.items():
        kept = size - len(plan.get(name, []))
        assert kept >= max(1, math.ceil(floor * size - 1e-9))
    removed = sum(len(c) for c in plan.values())
    assert removed <= round(amount * 17)
    unconstrained = lowest_channels(GRAPH, scores, amount)
    if floor == 0.0:
        assert plan == unconstrained
    # within a layer, what goes is always the lowest-scoring part of it
    for name, gone in plan.items():
        rest = [float(s) for c, s in enumerate(scores[name]) if c not in gone]
        assert max(float(scores[name][c]) for c in gone) <= min(rest)
