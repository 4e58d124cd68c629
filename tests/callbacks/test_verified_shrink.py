"""Structured pruning inside fit gets shrink's guarantee: kept channels compute what they did, or the
group is put back, refused for the rest of training, and named in a warning."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune import SNAPit, SNIPCallback
from tests.helpers.modules import TinyModule, trainer


class SigmoidNet(nn.Module):
    """``a``'s channels go through a sigmoid (f(0) = 0.5): removing one is not the same as zeroing it.

    The channel engine cannot see that from the graph; only the verification after surgery can.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.sigmoid(self.a(x)))).mean((2, 3)))


class SigmoidModule(TinyModule):
    def __init__(self) -> None:
        super().__init__(arch="cnn")
        self.model = SigmoidNet()


@pytest.mark.parametrize(
    "make", [lambda: SNIPCallback(limit=0.6, structured=True), lambda: SNAPit(limit=0.6, steps=1)]
)
def test_a_group_that_cannot_be_removed_exactly_is_kept_and_named(tmp_path, make):
    pl.seed_everything(0)
    module, pruner = SigmoidModule(), make()
    with pytest.warns(
        UserWarning, match=r"kept the channels of 1 group\(s\) that cannot be removed exactly.*model\.a"
    ):
        trainer(tmp_path, [pruner], max_epochs=1).fit(module)
    assert set(pruner.refused_groups) == {"model.a"}
    assert module.model.a.out_channels == 8 and module.model.b.in_channels == 8
    assert module.model.b.out_channels < 8  # the other group was pruned as planned


def test_verified_shrinks_leave_ordinary_models_alone(tmp_path):
    pl.seed_everything(0)
    module, pruner = TinyModule(arch="resnet"), SNAPit(limit=0.5, steps=2)
    trainer(tmp_path, [pruner], max_epochs=1).fit(module)
    assert pruner.refused_groups == {}
    assert sum(p.numel() for p in module.parameters()) < sum(
        p.numel() for p in TinyModule("resnet").parameters()
    )


def test_a_frozen_norm_stays_frozen_and_untrained_through_a_shrink_in_fit(tmp_path):
    pl.seed_everything(0)
    module = TinyModule(arch="cnn")
    norm = module.model.features[4]  # frozen affine of a norm whose channels get pruned
    for p in norm.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.num_features))  # distinct values, to find them
    before = norm.weight.detach().clone()
    trainer(tmp_path, [SNAPit(limit=0.5, steps=2)], max_epochs=1).fit(module)
    norm = module.model.features[4]
    assert norm.num_features < before.numel()  # shrunk in fit ...
    assert not any(p.requires_grad for p in norm.parameters())  # ... still frozen ...
    assert torch.isin(norm.weight, before).all()  # ... and the kept scales never trained
