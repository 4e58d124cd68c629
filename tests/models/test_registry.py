"""The model registry and the CIFAR/MNIST zoo: every registered name is built, run, counted and shrunk.

Parametrized over ``list_models()`` the timm way, so a newly registered model is tested for free.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import lightning_prune.models as models_package
from lightning_prune import ChannelGraph, PruningError, shrink
from lightning_prune.models import cifar, create_model, is_model, list_models, mnist, register_model, registry
from lightning_prune.models.registry import _REGISTRY
from tests.helpers.nets import kill_channels
from tests.helpers.zoo import calibrate_norms

ALL = list_models()
CIFAR = list_models("cifar_*")

# Parameter counts of our layouts with 10 classes (a regression table: any change to an architecture
# shows up here). The published figures are checked separately below.
EXACT_PARAMS = {
    "cifar_densenet40": 1_059_298,
    "cifar_mobilenet_v2": 2_236_682,
    "cifar_resnet164": 1_703_258,
    "cifar_resnet18": 11_173_962,
    "cifar_resnet56": 855_770,
    "cifar_vgg11_bn": 9_228_362,
    "cifar_vgg16_bn": 14_724_042,
    "cifar_vgg19_bn": 20_035_018,
    "mnist_lenet300100": 266_610,  # 784·300+300 + 300·100+100 + 100·10+10
    "mnist_lenet5caffe": 431_080,  # 520 + 25,050 + 400,500 + 5,010
}

# Published parameter counts (10 classes), checked to within 3%:
PUBLISHED_PARAMS = {
    # Network Slimming (Liu et al. 2017, arXiv:1708.06519), Table 1, CIFAR-10 baselines.
    "cifar_vgg19_bn": 20.04e6,
    "cifar_resnet164": 1.70e6,
    # DenseNet-40 (k=12): the exact count of the DenseNet paper's layout is 1,059,298, the "1.06M" that
    # pruning papers list for it; the DenseNet paper (arXiv:1608.06993, Table 2) rounds to 1.0M and
    # Network Slimming's Table 1 says 1.02M, neither of which matches the layout to 3%.
    "cifar_densenet40": 1.06e6,
    # He et al. 2016 (arXiv:1512.03385), Table 6: ResNet-56, 0.85M (with zero-padding shortcuts; our
    # 1×1 conv + BN projections add 2,752 parameters).
    "cifar_resnet56": 0.85e6,
}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (1, 28, 28) if name.startswith("mnist_") else (3, 32, 32)
    return torch.randn(batch, *shape, generator=generator)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_doctests():
    for module in (models_package, registry, cifar, mnist):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


def test_the_zoo_is_registered():
    assert sorted(EXACT_PARAMS) == ALL
    assert all(is_model(name) for name in ALL)
    assert not any(name.startswith("torchvision.") for name in ALL)


@pytest.mark.parametrize("name", ALL)
def test_builds_and_runs(name):
    model = create_model(name)
    assert isinstance(model, nn.Module) and model.training
    assert model(_input(name)).shape == (2, 10)
    assert _params(model) == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_num_classes(name):
    model = create_model(name, num_classes=100)
    model.eval()
    with torch.no_grad():
        assert model(_input(name)).shape == (2, 100)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_papers(name):
    assert _params(create_model(name)) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.03)


@pytest.mark.parametrize("name", CIFAR)
def test_width_multiplier_keeps_the_structure(name):
    small = create_model(name, width=0.25)
    full = create_model(name)
    assert small(_input(name)).shape == (2, 10)
    assert _params(small) < _params(full) / 8  # most parameters scale with width²
    names = [n for n, m in small.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == [n for n, m in full.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", ALL)
def test_shrinks_exactly(name):
    """Graph builds with prunable groups; 30% of the channels zeroed are removed; outputs stay identical."""
    model = create_model(name)
    x = _input(name)
    calibrate_norms(model, x)  # realistic BN statistics keep activations near unit scale
    model.eval()
    graph = ChannelGraph(model, x)
    assert any(group.prunable for group in graph.groups)
    killed = kill_channels(model, x, 0.3, seed=0, graph=graph)
    assert killed > 0
    with torch.no_grad():
        reference = model(x)
    before = _params(model)
    report = shrink(model, x, verify=False)
    assert report.channels_removed == killed
    assert _params(model) < before
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5)


def test_vgg19_layout_is_network_slimmings():
    model = create_model("cifar_vgg19_bn")
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128] + [256] * 4 + [512] * 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 4
    assert model.classifier.in_features == 512
    assert all(m.bias is None for m in model.features if isinstance(m, nn.Conv2d))


def test_resnet_depths():
    def weighted(model):  # conv and linear layers on the main path (projection shortcuts excluded)
        return sum(
            isinstance(m, (nn.Conv2d, nn.Linear)) and "shortcut" not in n for n, m in model.named_modules()
        )

    assert weighted(create_model("cifar_resnet18")) == 18
    assert weighted(create_model("cifar_resnet56")) == 56
    assert weighted(create_model("cifar_resnet164")) == 164
    assert weighted(create_model("cifar_densenet40")) == 40  # transitions count, as in the paper


def test_lenets_use_he_fan_in_initialization():
    torch.manual_seed(0)
    model = create_model("mnist_lenet300100")
    first = model[1]
    assert first.weight.std().item() == pytest.approx((2 / 784) ** 0.5, rel=0.05)
    assert torch.count_nonzero(first.bias) == 0


def test_unknown_name_suggests_close_matches():
    with pytest.raises(
        PruningError, match=r"unknown model 'cifar_resnet_18'\. Did you mean 'cifar_resnet18'"
    ):
        create_model("cifar_resnet_18")
    with pytest.raises(PruningError, match=r"Did you mean 'cifar_vgg16_bn'"):
        create_model("cifar_vgg16")
    with pytest.raises(
        PruningError, match=r"unknown model 'nothing_alike'\. Allowed: one of 'cifar_densenet40'"
    ):
        create_model("nothing_alike")
    with pytest.raises(PruningError, match=r"the model name must be a string"):
        create_model(18)


def test_argument_errors():
    with pytest.raises(
        PruningError, match=r"`create_model\(num_classes=0\)` is invalid: `num_classes` must be"
    ):
        create_model("cifar_vgg11_bn", num_classes=0)
    with pytest.raises(PruningError, match=r"cifar_vgg11_bn takes no argument 'depth'.*width, in_channels"):
        create_model("cifar_vgg11_bn", depth=13)
    with pytest.raises(
        PruningError, match=r"`CifarVGG\(width=0\)` is invalid: `width` must be a finite number > 0"
    ):
        create_model("cifar_vgg11_bn", width=0)
    with pytest.raises(
        PruningError, match=r"`CifarVGG\(depth=13\)` is invalid: `depth` must be one of \[11, 16, 19\]"
    ):
        cifar.CifarVGG(13)
    with pytest.raises(PruningError, match=r"`CifarDenseNet\(depth=41\)` is invalid"):
        cifar.CifarDenseNet(depth=41)
    with pytest.raises(
        PruningError, match=r"`CifarResNet\(widths=\(16, 32\), blocks=\(1, 1, 1\)\)` is invalid"
    ):
        cifar.CifarResNet(widths=(16, 32), blocks=(1, 1, 1))
    with pytest.raises(PruningError, match=r"`LeNet5Caffe\(num_classes=-1\)` is invalid"):
        mnist.LeNet5Caffe(num_classes=-1)
    with pytest.raises(PruningError, match=r"`list_models\(pattern=3\)` is invalid"):
        list_models(3)


def test_register_model_rejects_duplicates_and_bad_names():
    with pytest.raises(PruningError, match=r"already registered.*cifar_vgg11_bn"):
        register_model("cifar_vgg11_bn")(lambda num_classes=10: nn.Linear(1, num_classes))
    with pytest.raises(PruningError, match=r"`register_model\(name='my-net'\)` is invalid"):
        register_model("my-net")
    with pytest.raises(PruningError, match=r"must be lowercase"):
        register_model("MyNet")


def test_register_model_adds_an_entry():
    @register_model("test_tiny_mlp")
    def tiny(num_classes: int = 10, hidden: int = 4) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    try:
        assert "test_tiny_mlp" in list_models("test_*")
        assert create_model("test_tiny_mlp", num_classes=3, hidden=5)[1].out_features == 5
    finally:
        _REGISTRY.pop("test_tiny_mlp")


def test_torchvision_prefix():
    model = create_model("torchvision.resnet18", num_classes=10)
    assert model.fc.out_features == 10
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # extra keyword arguments go to torchvision.models.get_model
    assert (
        create_model("torchvision.mobilenet_v2", num_classes=7, width_mult=0.5).classifier[1].out_features
        == 7
    )
    assert is_model("torchvision.resnet18") and not is_model("torchvision.resnet19")
    listed = list_models("torchvision.*")
    assert "torchvision.resnet18" in listed and "torchvision.vit_b_16" in listed
    assert list_models("torchvision.resnet1*") == [
        "torchvision.resnet101",
        "torchvision.resnet152",
        "torchvision.resnet18",
    ]
    assert "torchvision.resnet18" not in list_models("*resnet18")
    with pytest.raises(
        PruningError, match=r"unknown model 'torchvision.resnet19'\. Did you mean 'torchvision.resnet18'"
    ):
        create_model("torchvision.resnet19")
    with pytest.raises(PruningError, match=r"built with `weights=None`"):
        create_model("torchvision.resnet18", weights="DEFAULT")
