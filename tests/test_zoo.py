"""`shrink` over the torchvision model zoo: dead channels go, outputs stay.

Each model (``weights=None``, ``num_classes=10``, eval mode, BatchNorm statistics calibrated) gets 30%
of the channels of every prunable, exact group killed; reference outputs are computed before
shrinking, the model is shrunk without shrink's own verification, and the outputs are compared
independently.

The default suite runs a fast subset covering each architecture family; ``-m slow`` runs every
classification model torchvision registers, with the known failures listed in ``UNSUPPORTED`` as
strict xfails so the list stays honest (``docs/supported-architectures.md`` has the full table,
``benchmarks/zoo_coverage.py`` regenerates it).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from lightning_prune import shrink
from tests.helpers.nets import kill_channels
from tests.helpers.zoo import address_space_limit, zoo_model

FRACTION = 0.3

# One model per family: ResNet, VGG-BN, MobileNet V2/V3, DenseNet, EfficientNet, ConvNeXt, RegNet,
# ShuffleNetV2
# (about 45 s on 2 CPU cores, most of it Torch-Pruning's graph work).
FAST = [
    "resnet18",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
]

ALL = torchvision.models.list_models(module=torchvision.models)

# A blow-up in the engine's index mapping raises MemoryError under this limit instead of taking the
# machine down; the largest model that works (vit_h_14) peaks at about 9 GB.
MEMORY_GB = 16

# name -> (exception raised, why). Each is a strict xfail: a model that starts to work fails the
# suite, so this list stays honest. Empty since the engine checks shape operations itself: ShuffleNetV2
# (channel shuffle), Swin (window partitions, patch merging) and MaxViT, which used to fail, now shrink
# exactly, their attention-head reshapes refused group by group (tests/structure/).
UNSUPPORTED: dict[str, tuple[type[Exception], str]] = {}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_shrinks_exactly(name: str, size: int | None = None) -> None:
    model, x = zoo_model(name, size=size)
    killed = kill_channels(model, x, FRACTION, seed=0)
    assert killed > 0, f"{name}: no prunable, exact channel group"
    with torch.no_grad():
        reference = model(x)
    params = _num_params(model)

    report = shrink(model, x, verify=False)

    assert report.channels_removed == killed
    assert report.after.params == _num_params(model) < report.before.params == params
    with torch.no_grad():
        output = model(x)
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAST)
def test_zoo_subset_shrinks_exactly(name):
    # 32x32 keeps the subset fast; the slow suite runs every model at its usual size.
    check_shrinks_exactly(name, size=32)


def _every_model() -> list:
    params = []
    for name in ALL:
        marks = [pytest.mark.slow]
        if name in UNSUPPORTED:
            raises, reason = UNSUPPORTED[name]
            marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _every_model())
def test_zoo_shrinks_exactly(name):
    with address_space_limit(MEMORY_GB):
        check_shrinks_exactly(name)


def test_zoo_lists_name_real_models():
    assert set(UNSUPPORTED) <= set(ALL)
    assert set(FAST) <= set(ALL) - set(UNSUPPORTED)
