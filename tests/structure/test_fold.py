"""fold_batchnorm: BatchNorm folded into the layer that feeds it, same outputs, clear refusals."""

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune import PruningError, fold_batchnorm
from lightning_prune.structure import fold_plan
from tests.helpers.nets import TinyCNN, TinyDenseNet, TinyResNet


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm statistics and an affine map far from the identity (else folding is trivial)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))
    return model


def norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("net", [TinyCNN, TinyResNet])
def test_folded_copy_gives_the_same_outputs_and_has_no_batchnorm(net):
    model = randomise_norms(net()).train()
    x = torch.randn(4, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    assert norms(folded) == 0 and norms(model) > 0  # the model itself keeps its BatchNorms
    assert model.training and not folded.training  # and its mode
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    if net is TinyCNN:
        assert isinstance(folded.features[1], nn.Identity)
        assert not torch.equal(folded.features[0].weight, model.features[0].weight)


def test_a_bias_is_added_where_the_layer_had_none_and_linear_folds_too():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.Flatten())
    model.append(nn.Linear(6 * 36, 5, bias=False)).append(nn.BatchNorm1d(5))
    model = randomise_norms(model).eval()
    x = torch.randn(3, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    assert folded[0].bias is not None and folded[3].bias is not None
    assert model[0].bias is None
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    kernel=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_folding_preserves_outputs_for_any_conv_bn(out, kernel, groups, bias, affine, seed):
    out = out * groups
    model = nn.Sequential(
        nn.Conv2d(4, out, kernel, groups=groups, bias=bias), nn.BatchNorm2d(out, affine=affine), nn.ReLU()
    )
    model = randomise_norms(model, seed).eval()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(fold_batchnorm(model, x)(x), model(x), rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_folds_every_batchnorm():
    model = randomise_norms(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = fold_plan(model, x)
    assert len(plan.pairs) == 20 and not plan.refused
    assert plan.pairs["layer1.0.bn1"] == "layer1.0.conv1" and plan.pairs["layer2.0.downsample.1"] == (
        "layer2.0.downsample.0"
    )
    torch.testing.assert_close(fold_batchnorm(model, x)(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_batchnorm_after_a_concatenation_is_refused_by_name_or_left_when_not_strict():
    model = randomise_norms(TinyDenseNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        PruningError, match=r"cannot fold 3 BatchNorm.*'layers.0.0'.*not the output of a Conv"
    ):
        fold_batchnorm(model, x)
    with pytest.warns(UserWarning, match="left 3 BatchNorm"):
        folded = fold_batchnorm(model, x, strict=False)
    assert norms(folded) == 3
    torch.testing.assert_close(folded(x), model(x))


class Reused(nn.Module):
    """conv → BN, with the conv's output also added back (read twice)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (Reused(), r"'bn'.*after 'conv': the layer's output is also read by something besides"),
        (Twice(), r"'bn'.*called more than once"),
        (
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
            r"'1'.*after '0': it has no running statistics",
        ),
    ],
)
def test_unsafe_folds_are_refused_with_the_reason(model, match):
    with pytest.raises(PruningError, match=match):
        fold_batchnorm(randomise_norms(model), torch.randn(2, 4, 6, 6))


def test_a_shared_weight_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.raises(PruningError, match="parametrized or shared"):
        fold_batchnorm(model, torch.randn(3, 4))


def test_a_model_without_batchnorm_is_refused_and_inputs_are_checked():
    with pytest.raises(PruningError, match=r"no BatchNorm layer .* nothing to fold"):
        fold_batchnorm(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(PruningError, match=r"`fold_batchnorm\(model=...\)` is invalid"):
        fold_batchnorm("net", torch.randn(2, 3))


def test_parameters_keep_their_requires_grad_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].weight.requires_grad_(False)
    fold_batchnorm(model, torch.randn(1, 3, 5, 5))
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad


def test_the_plan_of_a_training_model_changes_no_statistics_nor_mode():
    model = randomise_norms(TinyCNN()).train()
    before = model.features[1].running_mean.clone()
    plan = fold_plan(model, torch.randn(4, 3, 8, 8))
    assert plan.pairs == {"features.1": "features.0", "features.4": "features.3"}
    assert model.training and torch.equal(model.features[1].running_mean, before)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass with an activation in its own forward (as timm's ``BatchNormAct2d``)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_not_replaced():
    # Replacing it by Identity would drop its activation: refused in the plan, left in the copy.
    model = randomise_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 6, 6)
    plan = fold_plan(model, x)
    assert plan.pairs == {"3": "2"}
    assert "own forward" in plan.refused["1"]
    folded = fold_batchnorm(model, x, strict=False)
    assert isinstance(folded[1], BatchNormAct) and isinstance(folded[3], nn.Identity)


def test_an_integer_parameter_does_not_stop_the_plan():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.register_parameter("step", nn.Parameter(torch.tensor([3]), requires_grad=False))
    assert fold_plan(model, torch.randn(2, 3, 6, 6)).pairs == {"1": "0"}
    assert not model.step.requires_grad


class _ConvReadOutsideAutograd(nn.Module):
    """Conv → BN whose conv output is also read by a comparison: the trace cannot see that reader."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c, self.d = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        return self.d(self.c(self.b(y) * (y > 0)))


def test_a_pair_that_changes_the_outputs_is_left_and_the_others_fold():
    torch.manual_seed(0)
    model = _ConvReadOutsideAutograd().eval()
    with torch.no_grad():
        for bn in (model.b, model.d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    assert set(fold_plan(model, x).pairs) == {"b", "d"}  # the trace sees no other reader of a's output
    with pytest.raises(PruningError, match=r"'b' \(folding it into 'a' changed the outputs"):
        fold_batchnorm(model, x)
    with pytest.warns(UserWarning, match="left 1 more BatchNorm"):
        folded = fold_batchnorm(model, x, strict=False)
    assert isinstance(folded.b, nn.BatchNorm2d) and isinstance(folded.d, nn.Identity)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(folded.a.weight, model.a.weight)  # the undone fold left the conv as it was
