"""Latency-aware channel counts: the exchange between groups, on staircase costs and on real timings."""

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_prune.structure.latency as latency
from lightning_prune import ChannelGraph, PruningError, prune_channels
from lightning_prune.structure import latency_aware_kept


def two_branches() -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 64)
            self.b = nn.Linear(8, 64)
            self.head = nn.Linear(128, 2)

        def forward(self, x):
            return self.head(torch.cat([self.a(x).relu(), self.b(x).relu()], 1))

    return Net()


def staircase(monkeypatch, net: nn.Module, step_at: dict[str, int]) -> None:
    """Layer time: 1 per 8 output channels, plus 10 once layer ``name`` has more than ``step_at[name]``."""
    names = {id(m): n for n, m in net.named_modules()}

    def fake(d, out, inp, repeats):
        name = names[id(d.layer)]
        return 0.0 if name == "head" else out / 8 + (10.0 if out > step_at.get(name, 10**6) else 0.0)

    monkeypatch.setattr(latency, "_layer_seconds", fake)


def test_a_unit_moves_from_the_group_above_a_step_to_a_group_with_a_flat_cost(monkeypatch):
    net = two_branches()
    staircase(monkeypatch, net, {"a": 32})  # a: 40 kept costs 5 + 10; at 32 only 4
    x = torch.randn(1, 8)
    graph = ChannelGraph(net, x)
    scores = {"a": torch.arange(64.0), "b": torch.arange(64.0)}
    plan = {"a": list(range(24)), "b": list(range(40))}  # a keeps 40, b keeps 24 (multiples of 8)
    out = latency_aware_kept(graph, scores, plan, 8, x)
    assert 64 - len(out["a"]) == 32  # below the step
    assert 64 - len(out["b"]) == 32  # the unit went to b, whose cost is flat per channel
    assert out["a"] == list(range(32))  # a loses its lowest-scoring kept channels
    assert out["b"] == list(range(32))  # b gets back its highest-scoring removed ones


def test_nothing_moves_when_every_cost_is_linear(monkeypatch):
    net = two_branches()
    staircase(monkeypatch, net, {})
    x = torch.randn(1, 8)
    graph = ChannelGraph(net, x)
    plan = {"a": list(range(24)), "b": list(range(40))}
    scores = {"a": torch.arange(64.0), "b": torch.arange(64.0)}
    assert latency_aware_kept(graph, scores, plan, 8, x) == plan


@settings(max_examples=15, deadline=None)
@given(kept_a=st.integers(1, 8), kept_b=st.integers(1, 8), window=st.integers(0, 3), data=st.data())
def test_real_timings_keep_multiples_within_the_window_and_the_node_budget(kept_a, kept_b, window, data):
    net = two_branches()
    x = torch.randn(1, 8)
    graph = ChannelGraph(net, x)
    scores = {n: torch.tensor(data.draw(st.permutations(range(64))), dtype=torch.float32) for n in "ab"}
    plan = {
        n: sorted(torch.argsort(scores[n])[: 64 - 8 * k].tolist()) for n, k in (("a", kept_a), ("b", kept_b))
    }
    plan = {n: c for n, c in plan.items() if c}
    out = latency_aware_kept(graph, scores, plan, 8, x, window=window, repeats=2)
    balance = 0
    for name, removed in out.items():
        before = 64 - len(plan.get(name, []))
        kept = 64 - len(removed)
        assert kept % 8 == 0 and kept >= 8
        assert abs(kept - before) <= 8 * window
        balance += kept - before
    assert abs(balance) <= 8  # the nodes kept stay within one unit of the plan's
    assert set(out) == set(plan)


def test_prune_channels_latency_aware_gives_a_running_model_with_rounded_counts():
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    result = prune_channels(net, x, 0.5, round_to=8, latency_aware=True)
    assert all(
        m.out_channels % 8 == 0 for m in net.modules() if isinstance(m, nn.Conv2d) and m.out_channels != 1280
    )
    assert net.eval()(x).shape == (1, 10)
    assert abs(result.node_sparsity - 0.5) < 0.05
    with pytest.raises(PruningError, match=r"`latency_aware` must be a bool"):
        prune_channels(net, x, 0.5, latency_aware="yes")
