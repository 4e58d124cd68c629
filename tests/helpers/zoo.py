"""Model-zoo helpers: kill channels at random; a small valid input for each torchvision model."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn

# Input side length per model family; everything else uses DEFAULT_SIZE (AlexNet needs > 32). ViT
# (fixed positional embedding) and MaxViT (fixed partitions) need 224; Swin runs at any size but at
# 64 its windows cover whole feature maps and are never shifted, so it gets 224 too. Inception v3
# needs at least 75.
DEFAULT_SIZE = 64
SIZES = {
    "vit_": 224,
    "swin_": 224,
    "maxvit_": 224,
    "inception_v3": 96,
}


def zoo_size(name: str) -> int:
    """Side length of a small square input that ``torchvision.models.get_model(name)`` accepts."""
    for prefix, size in SIZES.items():
        if name.startswith(prefix):
            return size
    return DEFAULT_SIZE


def zoo_input(name: str, batch: int = 2, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """A reproducible random image batch, ``size`` square (default: ``zoo_size(name)``)."""
    size = zoo_size(name) if size is None else size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def calibrate_norms(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``x``, in place; returns ``model``.

    Randomly initialized networks keep BatchNorm's initial statistics (mean 0, variance 1), so their
    activations grow layer after layer (Inception v3 reaches 1e9 at 96x96), and float32 rounding alone
    then breaks a 1e-4 comparison. Calibrated statistics keep activations near unit scale, as in a
    trained network. Only the norm layers run in training mode, so auxiliary heads stay off.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
        m.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m, (momentum, training) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.train(training)
    return model


def zoo_model(name: str, size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """``torchvision.models.get_model(name)`` (no weights, 10 classes) in eval mode, and its input.

    Layers initialized to all zeros (ViT's head) get small random weights, so outputs are not
    trivially zero, and the BatchNorm statistics are calibrated on a separate batch of 8 images
    (see :func:`calibrate_norms`); the returned input is a batch of 2.
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    with torch.no_grad():
        for module in model.modules():  # ViT's head starts at zero: every output would be 0
            if isinstance(module, nn.Linear | nn.Conv2d) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
    calibrate_norms(model, zoo_input(name, batch=8, seed=1, size=size))
    return model, zoo_input(name, size=size)


@contextlib.contextmanager
def address_space_limit(gigabytes: float) -> Iterator[None]:
    """Let this process grow by at most ``gigabytes`` of address space while the block runs.

    Torch-Pruning's index mapping can grow without bound on reshapes it misreads (Swin: tens of GB);
    under the limit that surfaces as a ``MemoryError`` instead of the kernel killing the process.
    Linux only; elsewhere this does nothing.
    """
    status = Path("/proc/self/status")
    if not status.exists():
        yield
        return
    sizes = [line.split() for line in status.read_text().splitlines()]
    used = next(int(words[1]) * 1024 for words in sizes if words[:1] == ["VmSize:"])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + int(gigabytes * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
