"""The MNIST networks of the SNIP paper, registered as ``mnist_lenet300100`` and ``mnist_lenet5caffe``.

SNIP (Lee, Ajanthan, Torr, ICLR 2019, https://arxiv.org/abs/1810.02340) reports LeNet-300-100 and
LeNet-5-Caffe on MNIST (1×28×28 inputs). Both are initialized as the paper found best: variance scaling,
i.e. Kaiming normal with fan-in (ReLU gain), and zero biases.

Examples:
    >>> import torch
    >>> from lightning_prune.models import create_model
    >>> net = create_model("mnist_lenet5caffe")
    >>> net(torch.zeros(2, 1, 28, 28)).shape, sum(p.numel() for p in net.parameters())
    (torch.Size([2, 10]), 431080)
"""

from __future__ import annotations

from torch import nn

from lightning_prune.models.cifar import _check_int
from lightning_prune.models.registry import register_model

__all__ = ["LeNet5Caffe", "LeNet300100"]


class LeNet300100(nn.Sequential):
    """LeNet-300-100: a 784-300-100-``num_classes`` multilayer perceptron with ReLU (266,610 parameters).

    Layers: ``0`` Flatten, ``1`` Linear(784, 300), ``2`` ReLU, ``3`` Linear(300, 100), ``4`` ReLU,
    ``5`` Linear(100, num_classes) (the classifier).

    Args:
        num_classes: Outputs of the classifier (``>= 1``).

    Raises:
        PruningError: If ``num_classes`` is not an int >= 1.

    Examples:
        >>> sum(p.numel() for p in LeNet300100().parameters())
        266610
    """

    def __init__(self, num_classes: int = 10) -> None:
        _check_int("LeNet300100", "num_classes", num_classes, 1)
        super().__init__(
            nn.Flatten(),
            nn.Linear(28 * 28, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )
        _he_fan_in(self)


class LeNet5Caffe(nn.Sequential):
    """LeNet-5-Caffe, the LeNet-5 of Caffe's MNIST example used by SNIP (431,080 parameters).

    Layers: ``0`` Conv2d(1, 20, 5), ``1`` MaxPool2d(2), ``2`` Conv2d(20, 50, 5), ``3`` MaxPool2d(2),
    ``4`` Flatten (50 × 4 × 4 = 800), ``5`` Linear(800, 500), ``6`` ReLU, ``7`` Linear(500, num_classes).
    As in Caffe's ``lenet_train_test.prototxt``, there is no nonlinearity after the convolutions.

    Args:
        num_classes: Outputs of the classifier (``>= 1``).

    Raises:
        PruningError: If ``num_classes`` is not an int >= 1.

    Examples:
        >>> sum(p.numel() for p in LeNet5Caffe().parameters())
        431080
    """

    def __init__(self, num_classes: int = 10) -> None:
        _check_int("LeNet5Caffe", "num_classes", num_classes, 1)
        super().__init__(
            nn.Conv2d(1, 20, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )
        _he_fan_in(self)


@register_model("mnist_lenet300100")
def mnist_lenet300100(num_classes: int = 10) -> LeNet300100:
    """LeNet-300-100 for 1×28×28 inputs (:class:`LeNet300100`)."""
    return LeNet300100(num_classes)


@register_model("mnist_lenet5caffe")
def mnist_lenet5caffe(num_classes: int = 10) -> LeNet5Caffe:
    """LeNet-5-Caffe for 1×28×28 inputs (:class:`LeNet5Caffe`)."""
    return LeNet5Caffe(num_classes)


def _he_fan_in(module: nn.Module) -> None:
    """Variance scaling as in SNIP: Kaiming normal (fan-in, ReLU gain) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
