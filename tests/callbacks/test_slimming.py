"""SlimmingL1Callback: the L1 update on γ (plain, accumulated, AMP), pruning coupled groups by |γ|."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import (
    ChannelGraph,
    PruningError,
    ShrinkOnFitEnd,
    SlimmingL1Callback,
    load_pruned_checkpoint,
)
from lightning_prune.structure import node_weights
from tests.helpers.modules import TinyModule, synthetic_data, trainer
from tests.helpers.nets import kill_channels


class Ordered(TinyModule):
    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n), batch_size=self.hparams.batch_size)


def gammas(module):
    return {n: m.weight.detach().clone() for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


# -- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"penalty": -1e-4},
            r"`SlimmingL1Callback\(penalty=-0.0001\)` is invalid: `penalty` must be a finite number >= 0; "
            r"got -0.0001\.",
        ),
        ({"penalty": float("nan")}, r"`penalty` must be a finite number >= 0; got nan"),
        ({"penalty": float("inf")}, r"`penalty` must be a finite number >= 0; got inf"),
        ({"penalty": "1e-4"}, r"`penalty` must be a finite number >= 0; got '1e-4'"),
        ({"limit": 1.0}, r"`limit` must be in \[0, 1\); got 1.0"),
        ({"limit": -0.2}, r"`limit` must be in \[0, 1\)"),
        ({"prune_at": 0}, r"`prune_at` must be 'fit_end' or an epoch number >= 1"),
        ({"prune_at": "end"}, r"`prune_at` must be 'fit_end'"),
        ({"aggregate": "min"}, r"`aggregate` must be one of \['max', 'mean', 'sum'\]"),
        ({"include": "model.*"}, r"`include` must be a list of glob patterns"),
        (
            {"layer_floor": 1.0},
            r"`SlimmingL1Callback\(layer_floor=1.0\)` is invalid: .* in \[0, 1\); got 1.0",
        ),
        ({"layer_floor": -0.1}, r"`layer_floor` must be in \[0, 1\); got -0.1"),
        ({"layer_floor": "0.1"}, r"`layer_floor` must be in \[0, 1\); got '0.1'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        SlimmingL1Callback(**kwargs)


def test_prune_at_beyond_max_epochs_fails_in_setup(tmp_path):
    with pytest.raises(PruningError, match=r"prune_at=5\)` is invalid: training stops after max_epochs=3"):
        trainer(tmp_path, [SlimmingL1Callback(limit=0.5, prune_at=5)], max_epochs=3).fit(TinyModule())


class NoNorm(TinyModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 4))


class NonAffine(TinyModule):
    def __init__(self):
        super().__init__()
        self.model.features[1] = nn.BatchNorm2d(8, affine=False)


def test_models_without_usable_norms_fail_in_setup(tmp_path):
    with pytest.raises(PruningError, match=r"has no normalization layer .* layer types are \[.*'Linear'"):
        trainer(tmp_path, [SlimmingL1Callback()], max_steps=1).fit(NoNorm())
    with pytest.raises(PruningError, match=r"model\.features\.1 \(BatchNorm2d\) has no learnable scale"):
        trainer(tmp_path, [SlimmingL1Callback()], max_steps=1).fit(NonAffine())
    with pytest.raises(PruningError, match=r"pattern 'model\.nothing\*' matches no BatchNorm/GroupNorm"):
        trainer(tmp_path, [SlimmingL1Callback(include=["model.nothing*"])], max_steps=1).fit(TinyModule())


# -- the L1 update on γ ----------------------------------------------------------------------------------
def one_step(tmp_path, penalty, **trainer_kwargs):
    """γ before and after one optimizer step of plain SGD (lr 0.1, no momentum/decay) on fixed batches."""
    pl.seed_everything(0)
    module = Ordered(lr=0.1, weight_decay=0.0, scheduler=False, batch_size=8)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    before = gammas(module)
    kwargs = {"max_steps": 1, **trainer_kwargs}
    trainer(tmp_path, [SlimmingL1Callback(penalty=penalty)], **kwargs).fit(module)
    return before, gammas(module)


@pytest.mark.parametrize(
    "setting",
    ["fp32", "accumulate", "bf16-mixed", "fp16-mixed+scaler"],
)
def test_penalty_adds_exactly_lr_times_penalty_times_sign(tmp_path, setting):
    """Same batches, same init: γ(with penalty) − γ(without) = −lr · penalty · sign(γ), in every setting.

    Under accumulation the penalty is applied once per optimizer step (not once per micro-batch); under
    fp16 AMP the gradients Lightning hands to the hook are unscaled (a loss scale of 1024 would otherwise
    shrink the penalty 1024-fold).
    """
    kwargs = {
        "fp32": {},
        "accumulate": {"accumulate_grad_batches": 2},
        "bf16-mixed": {"precision": "bf16-mixed"},
        "fp16-mixed+scaler": {
            "plugins": [
                MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
            ]
        },
    }[setting]
    penalty = 0.05
    start, with_l1 = one_step(tmp_path, penalty, **kwargs)
    _, without = one_step(tmp_path, 0.0, **kwargs)
    for name in start:
        assert not torch.equal(without[name], start[name])  # a real step was taken
        expected = -0.1 * penalty * torch.sign(start[name])
        torch.testing.assert_close(with_l1[name] - without[name], expected, rtol=0, atol=1e-6)


def test_update_matches_a_hand_computed_step(tmp_path):
    pl.seed_everything(0)
    reference = Ordered(lr=0.1, weight_decay=0.0, scheduler=False, batch_size=8)
    start = copy.deepcopy(reference)
    x, y = next(iter(reference.train_dataloader()))
    start.train()
    loss = nn.functional.cross_entropy(start(x), y)
    loss.backward()
    before, after = one_step(tmp_path, 1e-3)
    for name, g in gammas(start).items():
        grad = start.get_submodule(name).weight.grad
        expected = g - 0.1 * (grad + 1e-3 * torch.sign(g))
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(before[name], g)


# -- pruning ---------------------------------------------------------------------------------------------
class Outputs(pl.Callback):
    """Eval-mode outputs on fixed inputs at the end of training (placed before and after the pruner)."""

    def __init__(self):
        self.x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        self.value = None

    def on_train_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.value = pl_module(self.x)
        pl_module.train()


@pytest.mark.parametrize("arch", ["cnn", "resnet", "densenet"])
def test_dead_channels_of_every_coupled_group_are_removed_exactly(tmp_path, arch):
    """Channels whose γ (and everything else producing them) is zero score lowest, in every coupled group
    (residual adds, DenseNet concatenations): with ``limit`` equal to their share they are exactly what is
    removed, and the network computes the same function after the removal."""
    pl.seed_everything(0)
    module = TinyModule(arch=arch, lr=0.0, weight_decay=0.0, scheduler=False)  # weights stay put
    assert kill_channels(module, module.example_input_array, 0.25, seed=1) > 0
    params = sum(p.numel() for p in module.parameters())
    # limit = the killed share of the scored nodes, counted with the callback's own scoring rules
    probe = SlimmingL1Callback(penalty=0.0, limit=0.5)
    probe._select_norms(module)
    graph = ChannelGraph(module, module.example_input_array)
    scores = {g.name: probe.channel_scores(g, module) for g in graph.groups if g.prunable and g.size > 1}
    groups = [g for g in graph.groups if scores.get(g.name) is not None]
    total = sum(node_weights(graph, g) * g.size for g in groups)
    dead = {g.name: int((scores[g.name] == 0).sum()) for g in groups}
    dead_nodes = sum(node_weights(graph, g) * dead[g.name] for g in groups)
    assert dead_nodes > 0
    slim = SlimmingL1Callback(penalty=0.0, limit=dead_nodes / total)
    before, after = Outputs(), Outputs()
    trainer(tmp_path, [before, slim, after], max_epochs=1).fit(module)
    assert slim.report.channels_removed == sum(dead.values())
    assert slim.report.threshold == 0.0  # only zero-γ channels went
    torch.testing.assert_close(after.value, before.value, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in module.parameters()) < params


@pytest.mark.parametrize("arch", ["cnn", "resnet", "densenet"])
def test_prunes_at_an_epoch_and_training_goes_on(tmp_path, arch):
    pl.seed_everything(0)
    module = TinyModule(arch=arch)
    params = sum(p.numel() for p in module.parameters())
    slim = SlimmingL1Callback(penalty=1e-3, limit=0.4, prune_at=1)
    steps = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(float(outputs["loss"]))

    trainer(tmp_path, [slim, Steps()], max_epochs=3).fit(module)
    assert slim.pruned
    # `limit` counts the nodes of groups that have a norm: in the CNN, 8 + 16 conv channels (the hidden
    # linear layer has no BatchNorm and is not scored): 40% of 24 is 10 channels, 10 of 40 nodes overall;
    # in the ResNet every node is scored (a stem channel counts 3: stem conv + two block outputs).
    expected = {"cnn": (10, 0.25), "resnet": (12, 16 / 40), "densenet": (6, 6 / 16)}[arch]
    assert (slim.report.channels_removed, slim.report.node_sparsity) == pytest.approx(expected)
    assert sum(p.numel() for p in module.parameters()) < params
    assert len(steps) == 12 and all(torch.isfinite(torch.tensor(steps)))
    assert module(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


def test_max_aggregation_keeps_a_residual_channel_one_block_needs():
    """In a residual group a channel with one large |γ| among small ones is kept under "max"."""
    module = TinyModule(arch="resnet")
    graph = ChannelGraph(module, module.example_input_array)
    (group,) = [g for g in graph.groups if g.name == "model.stem.0"]
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.01)
        module.model.blocks[1][4].weight[3] = 2.0  # channel 3 matters to the last block only
    cb = SlimmingL1Callback(limit=0.5)
    cb._select_norms(module)
    scores = cb.channel_scores(group, module)
    assert int(scores.argmax()) == 3 and float(scores[3]) == pytest.approx(2.0)
    cb.aggregate = "mean"
    assert float(cb.channel_scores(group, module)[3]) == pytest.approx((2.0 + 0.02) / 3)
    cb.aggregate = "sum"
    assert float(cb.channel_scores(group, module)[3]) == pytest.approx(2.0 + 0.02)


# -- composition, resume, logging ------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["slimming-first", "shrink-first"])
def test_composes_with_shrink_on_fit_end_in_either_order(tmp_path, order):
    pl.seed_everything(0)
    module = TinyModule(arch="resnet")
    slim = SlimmingL1Callback(penalty=1e-3, limit=0.5)
    shrinker = ShrinkOnFitEnd(save_path=tmp_path / "small.pt", latency_repeats=1)
    callbacks = [slim, shrinker] if order == "slimming-first" else [shrinker, slim]
    trainer(tmp_path, callbacks, max_epochs=2).fit(module)
    params = float(sum(p.numel() for p in module.parameters()))
    assert shrinker.report.after.params == params == slim.report.params_after
    assert shrinker.report.before.params > params
    loaded = load_pruned_checkpoint(TinyModule, tmp_path / "small.pt")
    module.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), module(x))


def test_resume_before_and_after_pruning(tmp_path):
    def make():
        return SlimmingL1Callback(penalty=1e-3, limit=0.5, prune_at=2)

    pl.seed_everything(0)
    first, slim = Ordered(arch="resnet"), make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [slim, ckpt], max_epochs=3, enable_checkpointing=True).fit(first)

    before = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # sparsity training only
    resumed, slim2 = Ordered(arch="resnet"), make()
    trainer(tmp_path, [slim2], max_epochs=3).fit(resumed, ckpt_path=before, weights_only=True)
    assert slim2.pruned
    shapes = {k: v.shape for k, v in first.state_dict().items()}
    assert {k: v.shape for k, v in resumed.state_dict().items()} == shapes
    for key, value in first.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)

    after = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"  # pruned after epoch 2 (at the start of epoch 3)
    again, slim3 = Ordered(arch="resnet"), make()
    trainer(tmp_path, [slim3], max_epochs=3).fit(again, ckpt_path=after, weights_only=True)
    assert slim3.pruned and slim3.report is None  # resumed as pruned: no second pruning
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes


def test_logs_the_gamma_distribution(tmp_path):
    histograms = []

    class Experiment:
        def add_histogram(self, tag, values, step):
            histograms.append((tag, values.clone(), step))

    from lightning.pytorch.loggers import Logger

    class Recording(Logger):
        name, version = "rec", 0
        metrics = []

        @property
        def experiment(self):
            return Experiment()

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = Recording()
    trainer(tmp_path, [SlimmingL1Callback(penalty=1e-2)], max_epochs=2, logger=logger).fit(TinyModule())
    assert [(tag, step) for tag, _, step in histograms] == [
        ("slimming/abs_gamma", 4),
        ("slimming/abs_gamma", 8),
    ]
    assert histograms[0][1].numel() == 8 + 16  # every BatchNorm scale of the CNN
    fractions = [m["slimming/frac_below_1e-2"] for m in logger.metrics if "slimming/frac_below_1e-2" in m]
    assert len(fractions) == 2 and all(0 <= f <= 1 for f in fractions)


# -- what the penalty touches, and when pruning cannot happen ---------------------------------------------
def test_penalty_touches_only_the_selected_scales(tmp_path):
    """β and the scales of excluded norms get exactly the update they get without the penalty."""

    def step(penalty):
        pl.seed_everything(0)
        module = Ordered(lr=0.1, weight_decay=0.0, scheduler=False, batch_size=8)
        module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
        cb = SlimmingL1Callback(penalty=penalty, exclude=["model.features.4"])
        trainer(tmp_path, [cb], max_steps=1).fit(module)
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    with_l1, without = step(0.05), step(0.0)
    changed = {n for n in with_l1 if not torch.equal(with_l1[n], without[n])}
    assert changed == {"model.features.1.weight"}


def test_frozen_scales_stay_frozen(tmp_path):
    module = TinyModule()
    module.model.features[1].weight.requires_grad_(False)
    before = module.model.features[1].weight.detach().clone()
    trainer(tmp_path, [SlimmingL1Callback(penalty=0.1)], max_steps=2).fit(module)
    assert torch.equal(module.model.features[1].weight, before)


def test_prune_at_never_reached_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"prune_at=5\): training ended after 2 epochs, before epoch 5"):
        trainer(tmp_path, [SlimmingL1Callback(limit=0.5, prune_at=5)], max_epochs=10, max_steps=8).fit(
            TinyModule()
        )


def test_prune_at_from_a_command_line_string():
    assert SlimmingL1Callback(limit=0.5, prune_at="80").prune_at == 80


def test_nothing_prunable_fails_before_training(tmp_path):
    class NormOnOutput(TinyModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.BatchNorm1d(4))

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    with pytest.raises(PruningError, match=r"no prunable channel group contains a selected norm layer"):
        trainer(tmp_path, [SlimmingL1Callback(limit=0.5), Steps()], max_epochs=2).fit(NormOnOutput())
    assert steps == []


class BuiltLate(TinyModule):
    """Layers built in `configure_model`, after the callbacks' `setup`."""

    def __init__(self):
        super().__init__()
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = TinyModule().model


def test_layers_built_in_configure_model(tmp_path):
    module = BuiltLate()
    slim = SlimmingL1Callback(penalty=1e-3, limit=0.3)
    trainer(tmp_path, [slim], max_epochs=1).fit(module)
    assert slim.pruned and module.model.features[0].out_channels < 8


class GroupNormNet(TinyModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 16),
            nn.LayerNorm(16),
            nn.ReLU(),
            nn.Linear(16, 4),
        )


def test_group_norm_and_layer_norm(tmp_path):
    """GroupNorm ties channels across its groups (removals stay symmetric); LayerNorm over features works."""
    pl.seed_everything(0)
    module = GroupNormNet()
    slim = SlimmingL1Callback(penalty=1e-2, limit=0.5)
    trainer(tmp_path, [slim], max_epochs=2).fit(module)
    convs = [m for m in module.model if isinstance(m, nn.Conv2d)]
    norms = [m for m in module.model if isinstance(m, nn.GroupNorm)]
    for conv, norm in zip(convs, norms, strict=True):
        assert conv.out_channels == norm.num_channels and norm.num_channels % norm.num_groups == 0
    removed = 8 - convs[0].out_channels + 8 - convs[1].out_channels + 16 - module.model[9].normalized_shape[0]
    assert removed == slim.report.channels_removed > 0
    assert module(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


def test_pruning_at_fit_end_revalidates_and_warns_when_scales_are_not_separated(tmp_path):
    """Without sparsity training (penalty 0) the scales are not separated: a warning; the metrics shown
    at the end are those of the pruned network, the earlier ones kept under `_before_pruning`."""
    pl.seed_everything(0)
    module = TinyModule()
    slim = SlimmingL1Callback(penalty=0.0, limit=0.7)
    fit = trainer(tmp_path, [slim], max_epochs=1)
    with pytest.warns(UserWarning, match=r"the scales are not separated: removed channels have \|γ\| up to"):
        fit.fit(module)
    module.eval()
    with torch.no_grad():
        hits = [(module(x).argmax(1) == y).float() for x, y in module.val_dataloader()]
        accuracy = float(torch.cat(hits).mean())
    assert float(fit.callback_metrics["val/acc"]) == pytest.approx(accuracy)
    assert "val/acc_before_pruning" in fit.callback_metrics
    before, after = slim.evaluation["val/acc"]
    assert before == float(fit.callback_metrics["val/acc_before_pruning"])
    assert after == pytest.approx(accuracy)
    assert slim.report.after_pruning["val/acc"] == pytest.approx(accuracy)


@pytest.mark.parametrize(("floor", "first", "second"), [(0.0, 1, 11), (0.5, 4, 8)])
def test_layer_floor_stops_one_threshold_from_emptying_a_layer(tmp_path, floor, first, second):
    module = TinyModule(lr=0.0)  # the scales stay as set here
    with torch.no_grad():
        module.model.features[1].weight.fill_(1e-4)  # every scale of the first layer below the second's
        module.model.features[4].weight.copy_(torch.linspace(0.5, 1.5, 16))
    slim = SlimmingL1Callback(penalty=0.0, limit=0.5, layer_floor=floor)
    trainer(tmp_path, [slim], max_epochs=1, limit_val_batches=0).fit(module)
    # 24 scored nodes (8 + 16), 12 removed: the first layer's 8 go first, down to its floor
    assert module.model.features[0].out_channels == first
    assert module.model.features[3].out_channels == second
    assert slim.report.channels_removed == 12
