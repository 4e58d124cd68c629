"""Models by name: the CIFAR zoo, the MNIST LeNets, and torchvision's classifiers (``torchvision.<name>``).

A timm-style registry: :func:`register_model` adds a builder, :func:`list_models` lists names by pattern,
:func:`create_model` builds one, freshly initialized. See :mod:`lightning_prune.models.cifar` for the zoo.

Examples:
    >>> from lightning_prune.models import create_model, list_models
    >>> list_models("cifar_*")  # doctest: +NORMALIZE_WHITESPACE
    ['cifar_densenet40', 'cifar_mobilenet_v2', 'cifar_resnet164', 'cifar_resnet18', 'cifar_resnet56',
     'cifar_vgg11_bn', 'cifar_vgg16_bn', 'cifar_vgg19_bn']
    >>> create_model("cifar_vgg16_bn", num_classes=100).classifier.out_features
    100
"""

from lightning_prune.models import cifar, mnist  # noqa: F401  (registers the models)
from lightning_prune.models.cifar import (
    CifarDenseNet,
    CifarMobileNetV2,
    CifarPreActResNet,
    CifarResNet,
    CifarVGG,
)
from lightning_prune.models.mnist import LeNet5Caffe, LeNet300100
from lightning_prune.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "CifarDenseNet",
    "CifarMobileNetV2",
    "CifarPreActResNet",
    "CifarResNet",
    "CifarVGG",
    "LeNet5Caffe",
    "LeNet300100",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]
