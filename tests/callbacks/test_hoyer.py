"""HoyerSquare and Group-HS: hand-computed regularisers and gradients, the added gradient in a real fit,
the threshold cut (masks, physical channels), resume from a checkpoint, bad arguments."""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_prune import GroupHoyerSquareCallback, HoyerSquareCallback, PruningError
from lightning_prune.callbacks.hoyer import group_hoyer_square, hoyer_square
from tests.helpers.modules import TinyModule, synthetic_data, trainer


class Ordered(TinyModule):
    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n), batch_size=self.hparams.batch_size)


# -- the regularisers, by hand ---------------------------------------------------------------------------
def test_hoyer_square_value_and_gradient_by_hand():
    w = torch.tensor([3.0, -4.0, 0.0], requires_grad=True)
    value = hoyer_square(w)
    assert float(value.detach()) == pytest.approx(49 / 25)
    (grad,) = torch.autograd.grad(value, w)
    # d/dw (L1²/L2²) = 2·L1·sign(w)/L2² − 2·L1²·w/L2⁴, L1 = 7, L2² = 25
    expected = [2 * 7 / 25 - 2 * 49 * 3 / 625, -2 * 7 / 25 + 2 * 49 * 4 / 625, 0.0]
    torch.testing.assert_close(grad, torch.tensor(expected))
    assert float(hoyer_square(torch.zeros(4))) == 0.0
    assert float(hoyer_square(torch.ones(10))) == pytest.approx(10.0)  # all equal: numel


def test_group_hoyer_square_value_and_gradient_by_hand():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    value = group_hoyer_square(w)
    assert float(value.detach()) == pytest.approx((49 + 49) / 25)  # rows 3 + 4, columns 3 + 4
    (grad,) = torch.autograd.grad(value, w)
    # d/dW_ij = (2R·W_ij/‖row_i‖ + 2C·W_ij/‖col_j‖)/S − (R² + C²)·2W_ij/S², R = C = 7, S = 25
    expected = [[28 / 25 - 98 * 6 / 625, 0.0], [0.0, 28 / 25 - 98 * 8 / 625]]
    torch.testing.assert_close(grad, torch.tensor(expected))


def test_group_hoyer_square_matches_the_seed_formula_on_a_conv_weight():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    rows = w.pow(2).sum((1, 2, 3)).sqrt().sum()
    columns = w.pow(2).sum((0, 2, 3)).sqrt().sum()
    torch.testing.assert_close(group_hoyer_square(w), (rows**2 + columns**2) / w.pow(2).sum())


def test_group_hoyer_square_zero_rows_give_finite_gradients():
    w = torch.tensor([[3.0, 0.0], [0.0, 0.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(group_hoyer_square(w), w)
    assert torch.isfinite(grad).all()
    assert float(group_hoyer_square(torch.zeros(3, 2))) == 0.0
    with pytest.raises(PruningError, match=r"2 or more dimensions; got \(3,\)"):
        group_hoyer_square(torch.ones(3))


# -- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HoyerSquareCallback, GroupHoyerSquareCallback])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"penalty": -1.0},
            r"\(penalty=-1.0\)` is invalid: `penalty` must be a finite number >= 0; got -1.0",
        ),
        ({"penalty": float("nan")}, r"`penalty` must be a finite number >= 0; got nan"),
        ({"threshold": -1e-3}, r"`threshold` must be a finite number >= 0; got -0.001"),
        ({"threshold": "1e-3"}, r"`threshold` must be a finite number >= 0; got '1e-3'"),
        ({"prune_delay": -1}, r"`prune_delay` must be an int >= 0; got -1"),
        ({"prune_freq": 0}, r"`prune_freq` must be an int >= 1; got 0"),
        ({"include": "model.*"}, r"`include` must be a list of glob patterns"),
    ],
)
def test_constructor_rejects_bad_arguments(cls, kwargs, match):
    with pytest.raises(PruningError, match=match):
        cls(**kwargs)


def test_pruning_event_after_max_epochs_fails_in_setup(tmp_path):
    with pytest.raises(
        PruningError, match=r"prunes at the end of epoch 5, but training stops after max_epochs=3"
    ):
        trainer(tmp_path, [HoyerSquareCallback(prune_delay=4, prune_freq=1)], max_epochs=3).fit(TinyModule())


# -- the gradient added during a real fit ----------------------------------------------------------------
def test_one_step_adds_penalty_times_the_hand_gradient(tmp_path):
    torch.manual_seed(0)
    start = Ordered(scheduler=False)
    runs = {}
    for penalty in (0.0, 0.01):
        module = copy.deepcopy(start)
        hoyer = HoyerSquareCallback(penalty=penalty, prune_delay=1, prune_freq=1)
        trainer(tmp_path, [hoyer], max_steps=1, max_epochs=5, limit_val_batches=0).fit(module)
        runs[penalty] = dict(module.named_parameters())
    lr = start.hparams.lr  # SGD: the first step moves by lr · gradient (momentum buffer = gradient)
    for name, w0 in start.named_parameters():
        diff = runs[0.01][name].detach() - runs[0.0][name].detach()
        if w0.dim() < 2:  # biases and norm parameters are not regularised
            torch.testing.assert_close(diff, torch.zeros_like(diff))
            continue
        w = w0.detach()
        l1, l2 = w.abs().sum(), w.pow(2).sum()
        hand = 2 * l1 * torch.sign(w) / l2 - 2 * l1**2 * w / l2**2
        torch.testing.assert_close(diff, -lr * 0.01 * hand, atol=1e-6, rtol=1e-4)


# -- pruning ---------------------------------------------------------------------------------------------
class RecordBeforePruning(pl.Callback):
    """Keeps the weights at the end of each epoch (pruning runs at the start of the next one)."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch + 1] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }


def test_hoyer_masks_every_weight_at_or_below_the_threshold_and_keeps_them_zero(tmp_path):
    torch.manual_seed(0)
    hoyer = HoyerSquareCallback(penalty=1e-3, threshold=0.05, prune_delay=1, prune_freq=1)
    record = RecordBeforePruning()
    module = TinyModule()
    trainer(tmp_path, [hoyer, record], max_epochs=3).fit(module)
    assert hoyer.pruned and hoyer.prune_epoch == 2
    at_prune = record.weights[2]  # the event is at the end of epoch 2
    weights = [n for n, p in module.named_parameters() if p.dim() > 1]
    assert sorted(hoyer.masks) == sorted(weights)
    zeros = total = 0
    for name in weights:
        expected = at_prune[name].abs() > 0.05
        assert torch.equal(hoyer.masks[name].cpu(), expected.cpu()), name
        final = dict(module.named_parameters())[name]
        assert torch.all(final[~expected] == 0)  # stayed zero through epoch 3
        zeros += int((~expected).sum())
        total += expected.numel()
    assert 0 < zeros < total
    assert hoyer.report.weight_sparsity == pytest.approx(zeros / total)


def test_group_hoyer_removes_exactly_the_channels_small_in_every_coupled_producer(tmp_path):
    module = TinyModule(arch="resnet", lr=0.0)  # lr 0: the weights at the event are the ones set here
    net = module.model
    with torch.no_grad():
        for conv in (net.stem[0], net.blocks[0][3], net.blocks[1][3]):  # the residual group's producers
            conv.weight[0] *= 1e-4  # channel 0: small in all three -> removed
        net.stem[0].weight[1] *= 1e-4  # channel 1: small in the stem only -> kept (coupled)
        net.blocks[0][0].weight[2:5] *= 1e-4  # a block's inner channels 2, 3, 4 -> removed
        net.head.weight.mul_(1e-4)  # the output layer is never cut
    hoyer = GroupHoyerSquareCallback(penalty=0.0, prune_delay=0, prune_freq=1)
    trainer(tmp_path, [hoyer], max_epochs=2, limit_val_batches=0).fit(module)
    assert hoyer.pruned
    assert net.stem[0].out_channels == 7 and net.head.in_features == 7 and net.head.out_features == 4
    assert net.blocks[0][0].out_channels == 5 and net.blocks[0][3].in_channels == 5
    assert net.blocks[1][0].out_channels == 8
    assert hoyer.report.channels_removed == 4
    # nodes: stem + 4 block convs, 8 each; residual channel 0 was a node of 3 of them
    assert hoyer.report.node_sparsity == pytest.approx((3 + 3) / 40)


def test_group_hoyer_keeps_one_channel_when_a_whole_layer_is_small(tmp_path):
    module = TinyModule(lr=0.0)
    with torch.no_grad():
        module.model.features[0].weight.mul_(1e-5)
    hoyer = GroupHoyerSquareCallback(penalty=0.0, prune_delay=0, prune_freq=1)
    trainer(tmp_path, [hoyer], max_epochs=1, limit_val_batches=0).fit(module)
    assert module.model.features[0].out_channels == 1


def test_group_hoyer_regularizer_is_logged_and_stops_after_pruning(tmp_path):
    torch.manual_seed(0)
    module = TinyModule()
    hoyer = GroupHoyerSquareCallback(penalty=1e-3, prune_delay=0, prune_freq=2)
    fit = trainer(tmp_path, [hoyer], max_epochs=3, limit_val_batches=0)
    fit.fit(module)
    logged = float(fit.callback_metrics["group_hoyer/regularizer"])  # last logged: epoch 2, before the event
    assert logged > 0
    expected = sum(float(group_hoyer_square(p.detach())) for p in module.parameters() if p.dim() > 1)
    assert hoyer.regularization(module) == pytest.approx(expected, rel=1e-5)


# -- resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [HoyerSquareCallback, GroupHoyerSquareCallback])
def test_resume_after_pruning_keeps_the_pruned_network_and_does_not_prune_again(tmp_path, cls):
    torch.manual_seed(0)
    threshold = 0.05 if cls is HoyerSquareCallback else 0.2
    first = cls(penalty=1e-3, threshold=threshold, prune_delay=0, prune_freq=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    module = TinyModule()
    trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True, limit_val_batches=0).fit(module)
    assert first.pruned
    shapes = {n: p.shape for n, p in module.named_parameters()}
    saved = tmp_path / "epoch=1-step=8.ckpt"
    assert saved.is_file()

    second = cls(penalty=1e-3, threshold=threshold, prune_delay=0, prune_freq=1)
    resumed = TinyModule()
    fit = trainer(tmp_path, [second], max_epochs=3, limit_val_batches=0)
    fit.fit(resumed, ckpt_path=saved)
    assert second.pruned and second.report is None  # restored, not pruned a second time
    assert {n: p.shape for n, p in resumed.named_parameters()} == shapes
    for name, mask in second.masks.items():
        assert torch.all(dict(resumed.named_parameters())[name][~mask.to(torch.bool)] == 0)
    if cls is HoyerSquareCallback:
        assert second.masks.keys() == first.masks.keys()
        assert all(torch.equal(second.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)


@pytest.mark.parametrize("cls", [HoyerSquareCallback, GroupHoyerSquareCallback])
def test_pickles_before_and_after_fit(tmp_path, cls):
    callback = cls(penalty=1e-3, threshold=0.2, prune_delay=0, prune_freq=1)
    assert pickle.loads(pickle.dumps(callback)).threshold == 0.2
    trainer(tmp_path, [callback], max_epochs=2, limit_val_batches=0).fit(TinyModule())
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.pruned and clone.report == callback.report
    assert clone.masks.keys() == callback.masks.keys()


def test_resume_before_the_event_prunes_in_the_resumed_run(tmp_path):
    torch.manual_seed(0)
    first = HoyerSquareCallback(penalty=1e-3, threshold=0.05, prune_delay=1, prune_freq=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    trainer(tmp_path, [first, ckpt], max_epochs=3, enable_checkpointing=True, limit_val_batches=0).fit(
        Ordered()  # no shuffling: the resumed epoch 2 sees the batches of the uninterrupted one
    )
    second = HoyerSquareCallback(penalty=1e-3, threshold=0.05, prune_delay=1, prune_freq=1)
    resumed = Ordered()
    fit = trainer(tmp_path, [second], max_epochs=3, limit_val_batches=0)
    fit.fit(resumed, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")  # one epoch done, the event after two
    assert second.pruned and second.report is not None  # pruned in the resumed run
    assert all(torch.equal(second.masks[n].cpu(), first.masks[n].cpu()) for n in first.masks)
