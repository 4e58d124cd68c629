"""Tiny models shared by the tests, and a builder for randomly structured CNNs."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune import ChannelGraph


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every state-dict entry, to compare against after a refused or undone surgery."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k


class TinyCNN(nn.Module):
    """conv-bn-relu ×2, pooling, flatten → linear head (8×8 inputs)."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 16), nn.ReLU(), nn.Linear(16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyResNet(nn.Module):
    """A stem and two residual blocks sharing one channel space, then a linear head."""

    def __init__(self, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.BatchNorm2d(width),
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


class TinyDenseNet(nn.Module):
    """A stem and two pre-activation dense layers (BN-ReLU-conv, outputs concatenated), then BN and a head."""

    def __init__(self, width: int = 8, growth: int = 4, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(width + i * growth),
                nn.ReLU(),
                nn.Conv2d(width + i * growth, growth, 3, padding=1),
            )
            for i in range(2)
        )
        self.norm = nn.BatchNorm2d(width + 2 * growth)
        self.head = nn.Linear(width + 2 * growth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return self.head(torch.relu(self.norm(x)).mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding -> MLP with a residual -> LM head sharing the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 12)
        self.lm_head = nn.Linear(12, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.fc2(torch.relu(self.fc1(h))))


class RandomCNN(nn.Module):
    """A CNN assembled from a list of block specs (see ``tests/engine/test_shrink_property.py``).

    Specs: ``("conv", out, kernel, groups)``, ``("dw",)``, ``("res",)``, ``("cat", out)``,
    ``("pool",)``, ``("act", name)``; the head is ``flatten → Linear`` or ``mean → Linear``.
    """

    ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}

    def __init__(self, specs, in_channels: int, size: int, flatten_head: bool, classes: int):
        super().__init__()
        self.specs = list(specs)
        self.blocks = nn.ModuleList()
        c = in_channels
        for spec in self.specs:
            kind = spec[0]
            if kind == "conv":
                _, out, k, groups = spec
                block = nn.Sequential(
                    nn.Conv2d(c, out, k, padding=k // 2, groups=groups), nn.BatchNorm2d(out)
                )
                c = out
            elif kind == "dw":
                block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
            elif kind == "res":
                block = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1),
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                    nn.Conv2d(c, c, 1),
                    nn.BatchNorm2d(c),
                )
            elif kind == "cat":
                block = nn.Sequential(nn.Conv2d(c, spec[1], 3, padding=1), nn.BatchNorm2d(spec[1]))
                c = c + spec[1]
            elif kind == "pool":
                block = nn.MaxPool2d(2)
                size //= 2
            else:
                block = self.ACTS[spec[1]]()
            self.blocks.append(block)
        self.flatten_head = flatten_head
        self.head = nn.Linear(c * size * size if flatten_head else c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for spec, block in zip(self.specs, self.blocks, strict=True):
            if spec[0] == "res":
                x = x + block(x)
            elif spec[0] == "cat":
                x = torch.cat([x, block(x)], dim=1)
            else:
                x = block(x)
        x = x.flatten(1) if self.flatten_head else x.mean((2, 3))
        return self.head(x)


def kill_channels(
    model: nn.Module, example_inputs, fraction: float, seed: int = 0, graph: ChannelGraph | None = None
) -> int:
    """Zero every producing parameter of a random ``fraction`` of channels in each group, in place.

    Only groups that shrink exactly (``prunable and exact``) are touched, so that
    :func:`lightning_prune.shrink` may remove every killed channel: in each, the out/norm slices of the
    chosen channels are zeroed in every coupled layer (norms without an affine shift keep their running
    mean in a "norm" slice, a buffer).

    Returns:
        The number of channels killed, counting every tied copy (as ``ShrinkReport.channels_removed``).
    """
    graph = graph if graph is not None else ChannelGraph(model, example_inputs)
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    killed = 0
    with torch.no_grad():
        for group in graph.groups:
            n = int(group.size * fraction)
            if not (group.prunable and group.exact) or n == 0:
                continue
            dead = torch.randperm(group.size, generator=gen)[:n]
            for s in group.slices:
                if s.role in ("out", "norm"):
                    tensor = tensors[s.param]
                    tensor.index_fill_(s.dim, s.positions[torch.isin(s.channels, dead)].to(tensor.device), 0)
            killed += n * group.ties
    return killed


def eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs in eval mode without gradients (the model's mode is left in eval)."""
    model.eval()
    with torch.no_grad():
        return model(x)
