"""L0Callback: hard-concrete gates and the expected-L0 penalty by hand, gates trained in a real fit,
folding and removing closed channels exactly, resume from a checkpoint, bad arguments."""

from __future__ import annotations

import math
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import ChannelGraph, L0Callback, PruningError, SNIPCallback
from lightning_prune.callbacks.l0 import deterministic_gates, open_probability, sample_gates
from tests.helpers.modules import TinyModule, trainer


# -- the distribution, by hand ---------------------------------------------------------------------------
def test_open_probability_and_its_gradient_by_hand():
    log_alpha = torch.tensor([0.0, 2.0], requires_grad=True)
    p = open_probability(log_alpha)
    hand = [1 / (1 + math.exp(-(a - (2 / 3) * math.log(0.1 / 1.1)))) for a in (0.0, 2.0)]
    torch.testing.assert_close(p.detach(), torch.tensor(hand))
    (grad,) = torch.autograd.grad(p.sum(), log_alpha)
    torch.testing.assert_close(grad, torch.tensor([h * (1 - h) for h in hand]))


def test_hard_concrete_samples_and_deterministic_gates_by_hand():
    def hand(u, a):
        s = 1 / (1 + math.exp(-(math.log(u) - math.log(1 - u) + a) / (2 / 3)))
        return min(max(s * 1.2 - 0.1, 0.0), 1.0)

    u = torch.tensor([0.5, 0.9, 0.2, 0.01])
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expected = [hand(float(x), float(y)) for x, y in zip(u, a, strict=True)]
    assert expected[1] == 1.0 and 0 < expected[2] < 0.05 and expected[3] == 0.0  # both clamps are hit
    torch.testing.assert_close(sample_gates(a, u), torch.tensor(expected))
    drawn = sample_gates(torch.zeros(10_000))
    assert drawn.min() >= 0 and drawn.max() <= 1 and 0 < float((drawn == 0).float().mean()) < 0.5
    assert deterministic_gates(torch.tensor([-10.0, 0.0, 10.0])).tolist() == [0.0, 0.5, 1.0]


def test_penalty_value_and_gradient_by_hand():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    (group,) = [g for g in ChannelGraph(net, torch.randn(1, 2)).groups if g.prunable]
    l0 = L0Callback(penalty=0.1, weight_decay=0.5)
    l0._layout(net, [group])
    l0.log_alpha = {group.name: nn.Parameter(torch.tensor([-1.0, 0.0, 2.0]))}
    value = l0.regularization(net)
    p = open_probability(l0.log_alpha[group.name]).detach()
    squares = net[0].weight.detach().pow(2).sum(1) + net[0].bias.detach().pow(2)
    per_channel = 0.1 * 3 + 0.5 * 0.5 * squares  # n_j = 2 weights + 1 bias
    assert float(value.detach()) == pytest.approx(float((p * per_channel).sum()), rel=1e-6)
    grad_alpha, grad_w = torch.autograd.grad(value, [l0.log_alpha[group.name], net[0].weight])
    torch.testing.assert_close(grad_alpha, p * (1 - p) * per_channel)
    torch.testing.assert_close(grad_w, 0.5 * p.view(-1, 1) * net[0].weight.detach())  # d/dw (wd/2·P·w²)


# -- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"penalty": -1.0},
            r"`L0Callback\(penalty=-1.0\)` is invalid: `penalty` must be a finite number >= 0",
        ),
        ({"weight_decay": float("nan")}, r"`weight_decay` must be a finite number >= 0; got nan"),
        ({"droprate_init": 0.0}, r"`droprate_init` must be a finite number > 0 and < 1; got 0.0"),
        ({"droprate_init": 1}, r"`droprate_init` must be a finite number > 0 and < 1; got 1"),
        ({"gate_lr": -0.1}, r"`gate_lr` must be a finite number >= 0; got -0.1"),
        ({"seed": -1}, r"`seed` must be an int >= 0; got -1"),
        ({"exclude": "model.*"}, r"`exclude` must be a list of glob patterns"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        L0Callback(**kwargs)


def test_another_shrinking_callback_is_refused_at_fit_start(tmp_path):
    callbacks = [L0Callback(), SNIPCallback(structured=True, limit=0.5)]
    with pytest.raises(PruningError, match=r"cannot share a fit with other callbacks .*\['SNIPCallback'\]"):
        trainer(tmp_path, callbacks, max_steps=1).fit(TinyModule())


# -- real fits -------------------------------------------------------------------------------------------
class SetGates(pl.Callback):
    """Put chosen values into the gates once L0Callback made them (placed after it in the list)."""

    def __init__(self, l0, values):
        self.l0, self.values = l0, values

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            for group, value in self.values.items():
                self.l0.log_alpha[group].copy_(value)


class Capture(pl.Callback):
    """The gates (and the Adam moments of the first group's gates) at the start of training."""

    def __init__(self, l0):
        self.l0 = l0

    def on_train_start(self, trainer, pl_module):
        self.gates = {g: a.detach().clone() for g, a in self.l0.log_alpha.items()}
        state = trainer.optimizers[0].state.get(self.l0.log_alpha["model.features.0"], {})
        self.moments = state.get("exp_avg")


class RecordOutputs(pl.Callback):
    """Eval outputs of the gated network at the end of training (placed before L0Callback)."""

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            self.gated = pl_module.eval()(self.x)
        pl_module.train()


def test_closed_channels_are_removed_and_the_rest_folded_exactly(tmp_path):
    torch.manual_seed(0)
    module = TinyModule(lr=0.0)  # the gates keep the values set here (gate_lr follows lr)
    l0 = L0Callback(penalty=0.0)
    first = torch.tensor([3.0, -10.0, 0.5, -10.0, -1.0, 2.0, 0.0, -0.2])  # channels 1 and 3 closed
    second = torch.linspace(-1.5, 1.5, 16)
    second[[0, 5, 9]] = -8.0
    record = RecordOutputs()
    setter = SetGates(l0, {"model.features.0": first, "model.features.3": second})
    trainer(tmp_path, [record, l0, setter], max_epochs=1, limit_val_batches=0).fit(module)
    net = module.model
    assert l0.pruned and l0.report.channels_removed == 5
    assert net.features[0].out_channels == 6 and net.features[1].num_features == 6
    assert net.features[3].in_channels == 6 and net.features[3].out_channels == 13
    assert net.classifier[1].in_features == 13 * 16 and net.classifier[1].out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(record.x), record.gated, atol=1e-5, rtol=1e-5)
    assert not l0._hooks  # the pruned model is a plain model again


def test_gates_learn_from_the_data_and_the_penalty_closes_them(tmp_path):
    means = {}
    for penalty in (0.0, 0.05):
        torch.manual_seed(0)
        l0 = L0Callback(penalty=penalty, gate_lr=0.5)
        start = Capture(l0)
        fit = trainer(tmp_path, [l0, start], max_epochs=2, limit_val_batches=0)
        fit.fit(TinyModule(scheduler=False))
        groups = fit.optimizers[0].param_groups
        assert len(groups) == 2 and groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0
        alphas = torch.cat([a.detach().flatten() for a in l0.log_alpha.values()])
        assert alphas.min() >= math.log(1e-2) - 1e-6 and alphas.max() <= math.log(1e2) + 1e-6
        means[penalty] = float(alphas.mean())
        if penalty == 0:  # moved away from the initial N(0, 0.01²) by the data's gradient alone
            initial = torch.cat([a.flatten() for a in start.gates.values()])
            assert initial.abs().max() < 0.05 and (alphas - initial).abs().max() > 0.02
    assert means[0.05] < means[0.0] - 1.0
    assert l0.report.node_sparsity > 0 and float(fit.callback_metrics["l0/closed"]) > 0


def test_resume_restores_the_gates_and_their_optimizer_state(tmp_path):
    torch.manual_seed(0)
    first = L0Callback(penalty=1e-3, gate_lr=0.1)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [first, ckpt], max_epochs=1, enable_checkpointing=True, limit_val_batches=0).fit(
        TinyModule(optimizer="adam", lr=1e-3)
    )
    saved = tmp_path / "epoch=0-step=4.ckpt"
    state = torch.load(saved, weights_only=True)
    gates = next(v["log_alpha"] for k, v in state["callbacks"].items() if k.startswith("L0Callback"))
    assert len(state["optimizer_states"][0]["param_groups"]) == 2  # the gates' group is saved

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.gates = {g: a.detach().clone() for g, a in second.log_alpha.items()}
            self.moments = (
                trainer.optimizers[0].state[second.log_alpha["model.features.0"]]["exp_avg"].clone()
            )

    second = L0Callback(penalty=1e-3, gate_lr=0.1)
    capture = Capture()
    trainer(tmp_path, [second, capture], max_epochs=2, limit_val_batches=0).fit(
        TinyModule(optimizer="adam", lr=1e-3), ckpt_path=saved
    )
    assert capture.gates.keys() == gates.keys()
    for group, value in gates.items():
        torch.testing.assert_close(capture.gates[group], value)
    assert (
        capture.moments is not None and capture.moments.abs().sum() > 0
    )  # Adam's moments of the gates came back with the optimizer
    assert second.pruned


def test_pickles_before_and_after_fit(tmp_path):
    l0 = L0Callback(penalty=0.05, gate_lr=0.5)
    assert pickle.loads(pickle.dumps(l0)).penalty == 0.05
    trainer(tmp_path, [l0], max_epochs=1, limit_val_batches=0).fit(TinyModule())
    clone = pickle.loads(pickle.dumps(l0))
    assert clone.pruned and clone.report == l0.report
    for group, value in l0.log_alpha.items():
        torch.testing.assert_close(clone.log_alpha[group].detach(), value.detach())


@pytest.mark.parametrize("schedule", ["onecycle", "plateau", "lambda"])
def test_the_gates_follow_schedulers_that_keep_per_group_state(tmp_path, schedule):
    class Scheduled(TinyModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            if schedule == "onecycle":
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            if schedule == "plateau":
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, min_lr=[1e-4])
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}
            return {
                "optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e),
            }

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    torch.manual_seed(0)
    fit = trainer(tmp_path, [L0Callback(penalty=1e-3, gate_lr=0.2)], max_epochs=3, limit_val_batches=0)
    fit.fit(Scheduled())
    first, gates = fit.optimizers[0].param_groups
    start = first.get("initial_lr", 0.1)  # OneCycleLR starts at max_lr / 25
    assert gates["lr"] == pytest.approx(first["lr"] * 0.2 / start)  # the first group's schedule, from gate_lr
    assert gates["lr"] != pytest.approx(0.2)  # and it did move
