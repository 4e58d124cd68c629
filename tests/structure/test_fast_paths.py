"""The engine's fast paths give exactly what the general paths they stand in for give.

Groups cut as listed (no group built again) with removals taken from the group's slices; index mappings
kept from the trace for the first listing; dead channels found through NumPy with a first-entry probe;
attention modules looked for among modules with a projection child; layer rows cached by type: each is
compared with the general way, on models chosen to reach it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from lightning_prune import ChannelGraph
from lightning_prune._params import canonical_names
from lightning_prune.structure import _engine
from lightning_prune.structure import graph as graph_module
from lightning_prune.structure.graph import emptied_by
from tests.helpers.nets import TiedLM, TinyDenseNet
from tests.helpers.zoo import zoo_model


class Ties(nn.Module):
    """conv → GroupNorm(2) → grouped conv (groups=2) → BN → conv: channels tied in pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8)
        self.b, self.bn = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.c, self.head = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.b(torch.relu(self.gn(self.a(x))))))
        return self.head(self.c(x).mean((2, 3)))


class FreeScale(nn.Module):
    """conv → a free per-channel scale → grouped conv (groups=2) → conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x) * self.scale)))).mean((2, 3))


class Vgg(nn.Module):
    """VGG's shape: convolutions, 7×7 average pooling, flatten → linear → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(12 * 49, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _small_densenet() -> nn.Module:
    return torchvision.models.DenseNet(8, (2, 2), num_init_features=16, bn_size=2, num_classes=5)


def _images(size: int):
    return lambda model: (
        model().eval(),
        torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),
    )


# model -> (model and input, how its groups are cut: all as listed, "mixed", or all "built" again)
MODELS = {
    "ties": (lambda: _images(8)(Ties), "listed"),
    "tied_lm": (lambda: (TiedLM().eval(), torch.randint(0, 20, (2, 6))), "listed"),
    "free": (lambda: _images(8)(FreeScale), "mixed"),  # the scale's group is built again
    "concat": (lambda: _images(8)(TinyDenseNet), "built"),  # concatenation offsets
    "vgg": (lambda: _images(28)(Vgg), "listed"),
    "resnet18": (lambda: zoo_model("resnet18"), "listed"),
    "mobilenet_v2": (lambda: zoo_model("mobilenet_v2"), "listed"),
    "regnet_x_400mf": (lambda: zoo_model("regnet_x_400mf"), "listed"),  # grouped convolutions
    # torchvision's DenseNet: bottleneck groups cut as listed, concatenated ones built again
    "densenet_small": (lambda: _images(32)(_small_densenet), "mixed"),
    "densenet121": (lambda: zoo_model("densenet121"), "mixed"),
}
SLOW = {"densenet121"}  # 10 s on the shared 2-core machine


def _every_third(graph: ChannelGraph) -> dict[str, list[int]]:
    """Every third channel from the last of every prunable group that keeps one in each of its layers."""
    plan, shapes = {}, graph._shapes()
    for g in graph.groups:
        idx = sorted(range(g.size - 1, 0, -3))
        if g.prunable and idx and emptied_by(g, idx, shapes) is None:
            plan[g.name] = idx
    return plan


def _pruned(model, x, plan, monkeypatch, *, general: bool):
    """Prune a copy of ``model`` by ``plan``: its removals, and how many groups were cut as listed."""
    model = copy.deepcopy(model)
    cut = []
    with monkeypatch.context() as patch:
        real = _engine.Engine.cut_listed
        patch.setattr(_engine.Engine, "cut_listed", lambda self, *a: (cut.append(a[0]), real(self, *a))[1])
        if general:
            patch.setattr(_engine.Engine, "reusable", lambda self, root: False)
        removals = ChannelGraph(model, x).prune(plan, verify=x)  # outputs as with the channels zeroed
    return model, removals, len(cut)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in MODELS]
)
def test_groups_cut_as_listed_give_the_removals_of_groups_built_again(name, monkeypatch):
    build, how = MODELS[name]
    torch.manual_seed(0)
    model, x = build()
    plan = _every_third(ChannelGraph(copy.deepcopy(model), x))
    assert plan
    fast, fast_removals, listed = _pruned(model, x, plan, monkeypatch, general=False)
    slow, slow_removals, none = _pruned(model, x, plan, monkeypatch, general=True)
    assert none == 0
    assert how == ("listed" if listed == len(plan) else "built" if listed == 0 else "mixed")

    def steps(removals):
        return [(r.param, r.dim, r.index.tolist()) for r in removals]

    assert steps(fast_removals) == steps(slow_removals)
    after = fast.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in slow.state_dict().items()}
    for key, tensor in after.items():
        assert torch.equal(tensor, slow.state_dict()[key]), key
    # Either way's removals, replayed in order on the original state dict (every name of a tied
    # tensor), give the pruned model's tensors.
    aliases = canonical_names(model, buffers=True)
    for removals in (fast_removals, slow_removals):
        replayed = model.state_dict()
        for r in removals:
            for key in [k for k in replayed if aliases.get(k, k) == r.param]:
                replayed[key] = r.apply(replayed[key])
        assert replayed.keys() == after.keys()
        for key, tensor in after.items():
            assert replayed[key].shape == tensor.shape and torch.equal(replayed[key], tensor), key


def test_a_flatten_into_a_linear_layer_lists_and_prunes_exactly_also_after_a_first_prune():
    torch.manual_seed(0)
    model, x = Vgg().eval(), torch.randn(2, 3, 28, 28)
    graph = ChannelGraph(model, x)
    group = graph.group("features.4")
    lin = [s for s in group.slices if s.param == "classifier.0.weight"]
    assert len(lin) == 1 and lin[0].dim == 1 and len(lin[0].positions) == 12 * 49
    assert lin[0].channels.tolist() == [c for c in range(12) for _ in range(49)]
    # The first listing (index mappings as traced) is the listing after a full refresh.
    refreshed = ChannelGraph(copy.deepcopy(model), x)
    refreshed._engine._fresh = False
    assert _slices(graph.groups) == _slices(refreshed.groups)
    for removals in (
        {"features.4": [0, 5, 11], "features.0": [2]},
        {"features.4": [1, 8], "classifier.0": [3]},
    ):
        graph.prune(removals, verify=x)  # outputs as with the removed channels zeroed
        # The listing after a prune is the listing of a graph traced afresh from the pruned model.
        assert _slices(graph.groups) == _slices(ChannelGraph(copy.deepcopy(model), x).groups)
    assert model.classifier[0].in_features == 7 * 49 and model.classifier[0].out_features == 15


def _slices(groups) -> list:
    return [
        (
            g.name,
            g.size,
            g.prunable,
            [(s.param, s.dim, s.positions.tolist(), s.channels.tolist()) for s in g.slices],
        )
        for g in groups
    ]


def _row_and_a_live_one(case: str, dtype: torch.dtype) -> torch.Tensor:
    """Row 0 as ``case`` says, row 1 plainly live."""
    t = torch.zeros(2, 3, dtype=dtype)
    t[1] = 1
    info = torch.finfo(dtype)
    value, at = {
        "nan first": (float("nan"), 0),
        "nan later": (float("nan"), 2),
        "inf later": (float("-inf"), 1),
        "largest later": (info.max, 2),
        "subnormal later": (info.tiny * info.eps, 2),
        "negative zero": (-0.0, 0),
    }[case]
    t[0, at] = value
    return t


@pytest.mark.parametrize(
    "case", ["nan first", "nan later", "inf later", "largest later", "subnormal later", "negative zero"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "columns", "columns in place", "vector"])
def test_nonzero_at_reads_nan_inf_and_signed_zeros_as_the_plain_definition(case, dtype, layout):
    t, dim = _row_and_a_live_one(case, dtype), 0
    if layout.startswith("columns"):  # along dim 1: the rows of the transpose
        t, dim = (t.T if layout == "columns in place" else t.T.contiguous()), 1
    elif layout == "vector":
        t = t[0]
    expected = (t.movedim(dim, 0).reshape(t.shape[dim], -1) != 0).any(1).numpy()
    for positions in (np.arange(t.shape[dim]), np.arange(t.shape[dim])[::-1].copy(), np.array([0])):
        found = graph_module._nonzero_at(t, dim, positions)
        assert found.dtype == bool and found.tolist() == expected[positions].tolist()


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_nonzero_at_reads_non_contiguous_kernels_as_the_plain_definition(layout):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=g)
    w[[1, 4]] = 0
    w[2].view(-1)[0] = 0  # alive, but not by its first entry
    w[5].view(-1)[:-1] = 0  # alive by its last entry alone
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        w = w.transpose(2, 3)
    else:
        w = torch.stack([w, w], 1)[:, 0]
    positions = np.array([5, 1, 2, 4])
    found = graph_module._nonzero_at(w, 0, positions)
    assert found.tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    "name", ["bert", "gpt2", "llama", "vit", "swin", "t5-encoder", "timm-vit", "timm-levit"]
)
def test_attention_modules_and_layer_rows_are_found_as_by_a_look_at_every_module(name):
    # find_heads skips modules without a projection child; layer_type caches rows by type.
    from lightning_prune.structure import attention, layers

    if name.startswith("timm-"):
        timm = pytest.importorskip("timm")
        arch = {"timm-vit": "vit_tiny_patch16_224", "timm-levit": "levit_128s"}[name]
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    else:
        hf = pytest.importorskip("transformers")
        from tests.helpers.zoo_hf import MODELS as HF

        model_cls, config_cls, kwargs, _ = HF[name]
        with torch.device("meta"):
            model = getattr(hf, model_cls)(getattr(hf, config_cls)(**kwargs))
    everywhere = []  # every recogniser tried on every module
    for n, m in model.named_modules():
        if isinstance(m, attention._CONTAINERS):
            continue
        head = next((h for layout in attention.LAYOUTS if (h := layout(n, m)) is not None), None)
        everywhere += [head] if head is not None else []
    assert attention.find_heads(model) == everywhere
    assert name in ("t5-encoder", "timm-levit") or everywhere  # T5's and LeViT's layouts are not ours
    for m in model.modules():
        assert layers.layer_type(m) is next((r for r in layers.LAYERS if r.matches(m)), None)
