"""Building a graph, and surgery that fails, leave the model exactly as it was.

Each test gives the model something the engine's own restores must not miss: a list attribute that
surgery edits in place, norm statistics written during the trace from elsewhere than the norm layer, a
``train()`` with side effects, frozen parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

from lightning_prune import ChannelGraph, PruningError, model_stats
from lightning_prune.structure import _engine
from tests.helpers.nets import assert_unchanged, state

X = torch.randn(2, 3, 8, 8)


class Chain(nn.Module):
    """conv-bn-relu → conv → conv → mean, with a list and a dict attribute of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.b, self.c = (
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 3),
            nn.Conv2d(8, 2, 1),
        )
        self.act = nn.ReLU()
        self.widths = [8, 8]
        self.notes = {"pruned": False}

    def forward(self, x):
        return self.c(self.b(self.act(self.bn(self.a(x))))).mean((2, 3))


def test_failed_surgery_restores_attributes_edited_in_place_and_tables_it_filled(monkeypatch):
    model = Chain().eval()
    graph = ChannelGraph(model, X)
    before, widths, notes = state(model), model.widths, model.notes
    calls = []

    def edit_then_fail(real):  # a surgery step that edits the model in ways the engine's own do not
        def cut(self, root, channels):
            calls.append(root)
            model.widths[0] -= len(channels)
            model.notes["pruned"] = True
            model.act.register_buffer("scratch", torch.zeros(1))  # a table that was empty
            model.a.register_parameter("gain", nn.Parameter(torch.ones(1)))
            if len(calls) == 2:
                raise ZeroDivisionError("engine bug")
            return real(self, root, channels)

        return cut

    for method in ("prune", "cut_listed"):
        monkeypatch.setattr(_engine.Engine, method, edit_then_fail(getattr(_engine.Engine, method)))
    with pytest.raises(PruningError, match="undone"):
        graph.prune({"a": [1, 2], "b": [0]})
    assert model.widths is widths and widths == [8, 8]
    assert model.notes is notes and notes == {"pruned": False}
    assert not hasattr(model.act, "scratch") and not hasattr(model.a, "gain")
    assert_unchanged(model, before)


class StatsFromOutside(nn.Module):
    """A norm layer whose running statistics another module's code writes (test-time adaptation)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x):
        bn = self.bn
        y = F.batch_norm(self.a(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.5, bn.eps)
        return self.head(y.mean((2, 3)))


def _touch_stats(module, args, output):
    with torch.no_grad():
        module.running_mean.add_(1.0)
        module.num_batches_tracked.add_(1)


@pytest.mark.parametrize("where", ["functional", "own hook", "hook elsewhere"])
def test_tracing_and_counting_give_written_norm_statistics_back(where):
    if where == "functional":
        model = StatsFromOutside().eval()
    else:
        model = Chain().eval()
        hooked = model.bn if where == "own hook" else model.a
        hooked.register_forward_hook(lambda m, a, o: _touch_stats(model.bn, a, o))
    before = state(model)
    ChannelGraph(model, X)
    assert_unchanged(model, before)
    model_stats(model, X)
    assert_unchanged(model, before)


class Flagged(nn.Module):
    """A model whose ``train()`` also sets an attribute of its own (as caches and kernels do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Chain()
        self.mode_name = "train"

    def train(self, mode: bool = True):
        super().train(mode)
        self.mode_name = "train" if mode else "eval"
        return self

    def forward(self, x):
        return self.body(x)


def test_a_train_method_with_side_effects_sees_its_mode_given_back():
    model = Flagged().train()
    model.body.bn.eval()  # a mixed state: kept as it was
    graph = ChannelGraph(model, X)
    assert model.training and model.mode_name == "train" and not model.body.bn.training
    graph.prune({"body.a": [0]}, verify=X)
    assert model.training and model.mode_name == "train" and not model.body.bn.training


class Scaled(nn.Module):
    """conv → free per-channel scale → conv → conv: the scale's group is cut by a group built again."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        x = torch.relu(self.a(x) * self.scale)
        return self.c(torch.relu(self.bn(self.b(x)))).mean((2, 3))


def test_frozen_parameters_stay_frozen_through_tracing_and_both_ways_of_cutting(monkeypatch):
    model = Scaled().eval()
    for p in (model.scale, model.a.weight, model.b.bias, *model.bn.parameters()):
        p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = ChannelGraph(model, X)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    cut = []
    for method in ("prune", "cut_listed"):
        real = getattr(_engine.Engine, method)
        monkeypatch.setattr(
            _engine.Engine, method, lambda self, *a, m=method, real=real: (cut.append(m), real(self, *a))[1]
        )
    graph.prune({"a": [1], "b": [2, 3]}, verify=X)
    assert sorted(cut) == ["cut_listed", "prune"]  # the scale's group is built again, b's is cut as listed
    assert model.scale.shape == (1, 7, 1, 1) and model.bn.num_features == 6
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


class Buffers(nn.Module):
    """A conv with buffers of every kind the copy groups: float and int vectors, scalars, a matrix."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("vec", torch.arange(4.0))
        self.register_buffer("other", torch.tensor([float("nan"), 1.0]))  # NaN never equals itself
        self.register_buffer("count", torch.tensor(3))
        self.register_buffer("ints", torch.arange(3))
        self.register_buffer("grid", torch.ones(2, 2))
        self.write = write

    def forward(self, x):
        with torch.no_grad():
            if self.write == "in place":
                self.vec.add_(1)
                self.count.add_(1)
                self.ints.mul_(2)
                self.grid.zero_()
            elif self.write == "replaced":
                self.vec = torch.zeros(4)
                self.count = torch.tensor(0)
            elif self.write == "resized":
                self.vec.resize_(2)
                self.count.resize_(1)
        return self.conv(x)


@pytest.mark.parametrize("write", ["none", "in place", "replaced", "resized"])
def test_tracing_gives_every_kind_of_buffer_back(write):
    model = Buffers(write)
    tensors = {k: v for k, v in model.named_buffers()}
    before = {k: v.clone() for k, v in tensors.items()}
    ChannelGraph(model, X)
    for name, buf in model.named_buffers():
        assert buf is tensors[name], name
        if write != "resized" or name not in ("vec", "count"):  # resized in place: the tensor, not its size
            torch.testing.assert_close(buf, before[name], equal_nan=True, msg=name)


def test_a_plain_layer_with_a_tensor_of_its_own_is_refused_by_name():
    # torch.nn.utils.prune keeps the class nn.Conv2d and adds `weight_orig` / `weight_mask`: the surgery
    # would leave them unresized, so the group is refused; its plain siblings are not.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
    groups = {g.name: g for g in ChannelGraph(model, X).groups}
    assert not groups["2"].prunable and "weight_orig" in groups["2"].reason
    assert not groups["0"].prunable and "weight_orig" in groups["0"].reason  # 2 consumes 0's channels
    assert groups["0"].reason.count("has tensors that would not be resized") == 1
