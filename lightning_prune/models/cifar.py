"""The CIFAR model zoo (32×32 inputs), written from the papers and registered by name.

=====================  ============================================================  ==============
name                   architecture                                                  params (10 cl.)
=====================  ============================================================  ==============
``cifar_vgg11_bn``     VGG-11 with BN, Network Slimming's CIFAR layout                9.23 M
``cifar_vgg16_bn``     VGG-16 with BN, Network Slimming's CIFAR layout                14.72 M
``cifar_vgg19_bn``     VGG-19 with BN, Network Slimming's CIFAR layout                20.04 M
``cifar_resnet18``     ResNet-18, 3×3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]     11.17 M
``cifar_resnet56``     He et al. (2016) CIFAR ResNet-56, projection shortcuts         0.86 M
``cifar_resnet164``    pre-activation bottleneck ResNet-164 (He et al., 2016b)        1.70 M
``cifar_mobilenet_v2`` MobileNetV2 with CIFAR strides                                 2.24 M
``cifar_densenet40``   DenseNet-40, growth 12, no bottleneck or compression           1.06 M
=====================  ============================================================  ==============

Every model takes ``num_classes``, ``width`` (a multiplier of every layer's channels, default 1.0: the
published network; ``width=0.25`` gives a tiny variant with the same structure for tests and quick runs)
and ``in_channels`` (3). Convolutions have no bias when a BatchNorm follows; weights are initialized as in
He et al. (2015): Kaiming normal with fan-out for convolutions, BatchNorm scale 1 and shift 0, the
classifier normal with std 0.01 and zero bias.

Layers are plain attributes and ``nn.Sequential`` indices, so pruning patterns stay short (e.g.
``"features.*"`` for the VGGs, ``"layer2.*.conv1"`` for the ResNets). The layers that produce the logits
(``classifier`` or ``fc``) are never pruned by the engine.

Examples:
    >>> import torch
    >>> from lightning_prune.models import create_model
    >>> net = create_model("cifar_resnet56", num_classes=10)
    >>> net(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningError
from lightning_prune.models.registry import register_model

__all__ = [
    "VGG_LAYOUTS",
    "CifarDenseNet",
    "CifarMobileNetV2",
    "CifarPreActResNet",
    "CifarResNet",
    "CifarVGG",
]

VGG_LAYOUTS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}
"""Network Slimming's CIFAR VGG layouts: output channels of each 3×3 conv-BN-ReLU, ``"M"`` a 2×2 max-pool.

As in ImageNet VGG without its last pool and its three fully connected layers: the final 2×2 map is
average-pooled and fed to a single ``Linear(512, num_classes)``.
"""


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32×32 inputs, as in Network Slimming (Liu et al., 2017).

    Network Slimming (https://arxiv.org/abs/1708.06519) trains VGG on CIFAR as a stack of 3×3
    conv-BN-ReLU layers with 2×2 max-pools (:data:`VGG_LAYOUTS`; VGG-19 is
    ``[64, 64, M, 128, 128, M, 256×4, M, 512×4, M, 512×4]``), then a 2×2 average pool and one linear
    classifier. VGG-19 has 20.04M parameters with 10 classes, as in the paper's Table 1.

    Layers: ``features.<i>`` (``Conv2d``, ``BatchNorm2d``, ``ReLU`` triples and ``MaxPool2d``),
    ``pool`` (global average pool: the 2×2 map of a 32×32 input), ``classifier`` (``Linear``).

    Args:
        depth: 11, 16 or 19.
        num_classes: Outputs of the classifier (``>= 1``).
        width: Multiplier of every layer's channels (``> 0``); each count is rounded, at least 1.
        in_channels: Channels of the input images (``>= 1``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> net = CifarVGG(19)
        >>> sum(p.numel() for p in net.parameters())
        20035018
        >>> net.features[0], net.classifier
        (Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False), Linear(in_features=512, out_features=10, bias=True))
    """  # noqa: E501

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        owner = f"{type(self).__name__}"
        if depth not in VGG_LAYOUTS:
            raise PruningError(
                f"`{owner}(depth={depth!r})` is invalid: `depth` must be one of {sorted(VGG_LAYOUTS)}."
            )
        _check_common(owner, num_classes, width, in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_LAYOUTS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = _scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers and a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity (an empty ``nn.Sequential``) when shapes agree, else a 1×1 conv + BN
    projection with the block's stride (He et al. 2016, option B).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``planes`` channels."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages for 32×32 inputs: 3×3 stem, no max-pool.

    Two members are registered:

    - ``cifar_resnet18``: the ImageNet ResNet-18 stages (widths 64/128/256/512, blocks [2, 2, 2, 2]) with
      a 3×3 stride-1 stem and no max-pool, as used throughout the CIFAR pruning literature
      (11.17M parameters with 10 classes).
    - ``cifar_resnet56``: He et al. (2016, https://arxiv.org/abs/1512.03385, Sec. 4.2): 16/32/64
      channels, 3 stages of 9 blocks, 6·9 + 2 = 56 layers (0.86M parameters). Downsampling shortcuts are
      1×1 conv + BN projections (option B) rather than the paper's zero-padding (option A), so every
      residual addition is an ordinary channel dependency for the pruning engine.

    Layers: ``conv1``, ``bn1``, ``layer<s>.<b>.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}``, ``fc``.

    Args:
        widths: Channels of each stage (before ``width``); the stem has ``widths[0]``.
        blocks: Blocks per stage; the first block of every stage but the first has stride 2.
        num_classes: Outputs of the classifier (``>= 1``).
        width: Multiplier of every layer's channels (``> 0``).
        in_channels: Channels of the input images (``>= 1``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> net = CifarResNet(widths=(16, 32, 64), blocks=(9, 9, 9))
        >>> sum(p.numel() for p in net.parameters())
        855770
    """

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_stages(owner, widths, blocks)
        _check_common(owner, num_classes, width, in_channels)
        planes = [_scaled(w, width) for w in widths]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        channels = planes[0]
        for i, (p, n) in enumerate(zip(planes, blocks, strict=True)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(channels, p, stride=2 if i > 0 and b == 0 else 1))
                channels = p
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.pool(x).flatten(1))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1×1, BN-ReLU-conv3×3 (stride), BN-ReLU-conv1×1 (×4), plus x.

    The shortcut is the identity when shapes agree, else a 1×1 convolution (with the block's stride) of
    the block's input, as in He et al. (2016b).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``4 · planes`` channels."""
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + self.shortcut(x)


class CifarPreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet for CIFAR (He et al. 2016b), e.g. ResNet-164 of Network Slimming.

    "Identity Mappings in Deep Residual Networks" (https://arxiv.org/abs/1603.05027): a 3×3 conv stem
    with 16 channels, three stages of :class:`PreActBottleneck` blocks with 16, 32 and 64 bottleneck
    channels (outputs ×4: 64, 128, 256), strides 1, 2, 2, then BN-ReLU, global average pool and a linear
    classifier. With 18 blocks per stage that is 9·18 + 2 = 164 layers and 1.70M parameters, the
    ResNet-164 of Network Slimming (https://arxiv.org/abs/1708.06519, Table 1).

    Layers: ``conv1``, ``layer<s>.<b>.{bn1,conv1,bn2,conv2,bn3,conv3,shortcut.0}``, ``bn``, ``fc``.

    Args:
        blocks: Bottleneck blocks per stage (``(18, 18, 18)`` for ResNet-164).
        num_classes: Outputs of the classifier (``>= 1``).
        width: Multiplier of every layer's channels (``> 0``).
        in_channels: Channels of the input images (``>= 1``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> net = CifarPreActResNet(blocks=(18, 18, 18))
        >>> sum(p.numel() for p in net.parameters())
        1703258
    """

    def __init__(
        self,
        blocks: Sequence[int] = (18, 18, 18),
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_stages(owner, (16, 32, 64), blocks)
        _check_common(owner, num_classes, width, in_channels)
        planes = [_scaled(p, width) for p in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        channels = planes[0]
        for i, (p, n) in enumerate(zip(planes, blocks, strict=True)):
            stage = []
            for b in range(n):
                stage.append(PreActBottleneck(channels, p, stride=2 if i > 0 and b == 0 else 1))
                channels = p * PreActBottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion, 3×3 depthwise, 1×1 linear projection; ``+ x`` if shapes agree.

    ``conv`` is one ``nn.Sequential``: ``[Conv2d, BatchNorm2d, ReLU6]`` for the expansion (absent when
    the expansion factor is 1), the same for the depthwise conv, then ``Conv2d, BatchNorm2d``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output, ``out_planes`` channels."""
        out = self.conv(x)
        return x + out if self.use_residual else out


MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""MobileNetV2's stages for CIFAR: (expansion t, output channels c, blocks n, stride s of the first)."""


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018) with CIFAR strides.

    The network of https://arxiv.org/abs/1801.04381 (Table 2: a 32-channel 3×3 stem, 17 inverted residual
    blocks :data:`MOBILENET_V2_STAGES`, a 1×1 conv to 1280 channels, global average pool, linear), with
    the two first downsamplings removed for 32×32 inputs as in the common CIFAR adaptation: the stem and
    the first 24-channel block have stride 1 instead of 2, so the input is downsampled 8× (to 4×4)
    instead of 32×. Residual connections only where the paper has them (stride 1, same channels).
    2.24M parameters with 10 classes (the ImageNet network's 3.5M minus its 1000-way classifier).

    Layers: ``features.0`` (stem ``Sequential``: conv, BN, ReLU6), ``features.1`` … ``features.17``
    (:class:`InvertedResidual`, layers in ``.conv.<i>``), ``features.18`` (last 1×1 conv, BN, ReLU6),
    ``classifier`` (``Linear``). ``width`` scales every layer, the last 1×1 conv included (the paper
    keeps 1280 channels for multipliers below 1).

    Args:
        num_classes: Outputs of the classifier (``>= 1``).
        width: Multiplier of every layer's channels (``> 0``).
        in_channels: Channels of the input images (``>= 1``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> net = CifarMobileNetV2()
        >>> sum(p.numel() for p in net.parameters())
        2236682
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        _check_common(type(self).__name__, num_classes, width, in_channels)
        stem = _scaled(32, width)
        features: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()
            )
        ]
        channels = stem
        for t, c, n, s in MOBILENET_V2_STAGES:
            out = _scaled(c, width)
            for b in range(n):
                features.append(InvertedResidual(channels, out, s if b == 0 else 1, t))
                channels = out
        last = _scaled(1280, width)
        features.append(
            nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        )
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv3×3 producing ``growth`` channels, concatenated to its input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` and the ``growth`` new feature maps, concatenated on the channels."""
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1×1 (same channel count: no compression), then a 2×2 average pool."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(planes, planes, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Half-resolution feature maps with the same channels."""
        return self.pool(self.conv(self.relu(self.bn(x))))


class CifarDenseNet(nn.Module):
    """DenseNet for CIFAR without bottleneck or compression (Huang et al., 2017), e.g. DenseNet-40.

    https://arxiv.org/abs/1608.06993, Sec. 3-4: a 3×3 stem with ``2 · growth`` channels, three dense
    blocks of ``(depth - 4) / 3`` :class:`DenseLayer` (BN-ReLU-conv3×3, ``growth`` new channels each,
    concatenated), :class:`Transition` layers (BN-ReLU-conv1×1, 2×2 average pool) between the blocks,
    then BN-ReLU, global average pool and a linear classifier. DenseNet-40 (growth 12) has 12 layers per
    block, 456 channels at the end and 1.06M parameters with 10 classes (the DenseNet paper rounds to
    1.0M; Network Slimming, https://arxiv.org/abs/1708.06519, lists 1.02M).

    Layers: ``conv1``, ``block<s>.<i>.{bn,conv}``, ``trans<s>.{bn,conv}``, ``bn``, ``fc``.

    Args:
        depth: Total depth; ``depth - 4`` must be a positive multiple of 3 (40 → 12 layers per block).
        growth: Growth rate k (before ``width``).
        num_classes: Outputs of the classifier (``>= 1``).
        width: Multiplier of the growth rate (``> 0``), hence of every layer's channels.
        in_channels: Channels of the input images (``>= 1``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> net = CifarDenseNet(depth=40, growth=12)
        >>> sum(p.numel() for p in net.parameters()), net.fc.in_features
        (1059298, 456)
    """

    def __init__(
        self,
        depth: int = 40,
        growth: int = 12,
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 7 or (depth - 4) % 3:
            raise PruningError(
                f"`{owner}(depth={depth!r})` is invalid: `depth` must be an int >= 7 with depth - 4 a "
                "multiple of 3 (e.g. 40)."
            )
        _check_int(owner, "growth", growth, 1)
        _check_common(owner, num_classes, width, in_channels)
        k = _scaled(growth, width)
        per_block = (depth - 4) // 3
        channels = 2 * k
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for s in range(3):
            layers = []
            for _ in range(per_block):
                layers.append(DenseLayer(channels, k))
                channels += k
            self.add_module(f"block{s + 1}", nn.Sequential(*layers))
            if s < 2:
                self.add_module(f"trans{s + 1}", Transition(channels))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, in_channels, 32, 32)``."""
        x = self.trans1(self.block1(self.conv1(x)))
        x = self.block3(self.trans2(self.block2(x)))
        return self.fc(self.pool(self.relu(self.bn(x))).flatten(1))


# -- registered builders ---------------------------------------------------------------------------


@register_model("cifar_vgg11_bn")
def cifar_vgg11_bn(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarVGG:
    """VGG-11 with BatchNorm, Network Slimming's CIFAR layout (:class:`CifarVGG`)."""
    return CifarVGG(11, num_classes=num_classes, width=width, in_channels=in_channels)


@register_model("cifar_vgg16_bn")
def cifar_vgg16_bn(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarVGG:
    """VGG-16 with BatchNorm, Network Slimming's CIFAR layout (:class:`CifarVGG`)."""
    return CifarVGG(16, num_classes=num_classes, width=width, in_channels=in_channels)


@register_model("cifar_vgg19_bn")
def cifar_vgg19_bn(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarVGG:
    """VGG-19 with BatchNorm, Network Slimming's CIFAR layout (:class:`CifarVGG`), 20.04M parameters."""
    return CifarVGG(19, num_classes=num_classes, width=width, in_channels=in_channels)


@register_model("cifar_resnet18")
def cifar_resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 for CIFAR: 3×3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] (:class:`CifarResNet`)."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, width, in_channels)


@register_model("cifar_resnet56")
def cifar_resnet56(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarResNet:
    """He et al.'s CIFAR ResNet-56: 16/32/64 channels, 3 × 9 BasicBlocks (:class:`CifarResNet`)."""
    return CifarResNet((16, 32, 64), (9, 9, 9), num_classes, width, in_channels)


@register_model("cifar_resnet164")
def cifar_resnet164(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarPreActResNet:
    """Pre-activation bottleneck ResNet-164, 3 × 18 blocks (:class:`CifarPreActResNet`)."""
    return CifarPreActResNet((18, 18, 18), num_classes, width, in_channels)


@register_model("cifar_mobilenet_v2")
def cifar_mobilenet_v2(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarMobileNetV2:
    """MobileNetV2 with CIFAR strides (:class:`CifarMobileNetV2`)."""
    return CifarMobileNetV2(num_classes, width, in_channels)


@register_model("cifar_densenet40")
def cifar_densenet40(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> CifarDenseNet:
    """DenseNet-40, growth rate 12, no bottleneck or compression (:class:`CifarDenseNet`)."""
    return CifarDenseNet(40, 12, num_classes, width, in_channels)


# -- helpers -----------------------------------------------------------------------------------------


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _init_weights(model: nn.Module) -> None:
    """He et al. (2015) initialization: Kaiming normal (fan-out) convs, BN 1/0, classifier N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PruningError(
            f"`{owner}({name}={value!r})` is invalid: `{name}` must be an int >= {minimum}; got {value!r}."
        )


def _check_common(owner: str, num_classes: Any, width: Any, in_channels: Any) -> None:
    _check_int(owner, "num_classes", num_classes, 1)
    _check_int(owner, "in_channels", in_channels, 1)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise PruningError(
            f"`{owner}(width={width!r})` is invalid: `width` must be a finite number > 0 (1.0 is the "
            "published network)."
        )


def _check_stages(owner: str, widths: Any, blocks: Any) -> None:
    for name, value in (("widths", widths), ("blocks", blocks)):
        if (
            not isinstance(value, Sequence)
            or isinstance(value, str)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
        ):
            raise PruningError(
                f"`{owner}({name}={value!r})` is invalid: `{name}` must be a non-empty sequence of ints >= 1."
            )
    if len(widths) != len(blocks):
        raise PruningError(
            f"`{owner}(widths={tuple(widths)!r}, blocks={tuple(blocks)!r})` is invalid: `widths` and "
            "`blocks` must have one entry per stage (the same length)."
        )
