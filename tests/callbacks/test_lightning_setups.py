"""The callbacks combined with what Lightning users combine them with: checkpoints, strategies, budgets."""

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_prune import PruningError, ShrinkOnFitEnd, SlimmingL1Callback, SNAPit, SNIPCallback, SNIPit
from lightning_prune.checkpoint import resize_to_state_dict
from tests.helpers.modules import TinyModule, synthetic_data, trainer
from tests.helpers.nets import TinyCNN


class ValLoss(TinyModule):
    """Logs a continuous validation score, so that each checkpoint's score can be recomputed."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    test_step = validation_step


def val_loss(module: TinyModule) -> float:
    module.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(module(x), y) for x, y in module.val_dataloader()]
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize(
    "make",
    [
        lambda: SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1),
        lambda: SNIPit(limit=0.8, steps=1, when="during", prune_delay=1, prune_freq=1),
        lambda: SlimmingL1Callback(penalty=1e-3, limit=0.5, prune_at=2),
    ],
    ids=["snapit", "snipit", "slimming"],
)
def test_every_checkpoint_score_belongs_to_the_network_it_holds(tmp_path, make):
    """A pruning step at an epoch end must come after that epoch's checkpoint, not between its validation
    and its checkpoint (the file would hold the pruned network under the unpruned network's score)."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, every_n_epochs=1)
    fit = trainer(tmp_path, [make(), ckpt], max_epochs=4, enable_checkpointing=True)
    fit.fit(ValLoss())
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 4
    shapes = set()
    for path in files:
        state = torch.load(path, weights_only=True)
        recorded = float(state["callbacks"][ckpt.state_key]["current_score"])
        module = resize_to_state_dict(ValLoss(), state["state_dict"])
        module.load_state_dict(state["state_dict"])
        assert val_loss(module) == pytest.approx(recorded, rel=1e-5, abs=1e-6), path.name
        shapes.add(tuple(v.shape for v in state["state_dict"].values()))
    assert len(shapes) > 1 or make().__class__ is SNIPit  # structured runs really changed shapes


def test_test_with_the_best_checkpoint_after_a_shrink_in_fit(tmp_path):
    pl.seed_everything(0)
    module = ValLoss()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    fit = trainer(tmp_path, [pruner, ckpt], max_epochs=4, enable_checkpointing=True)
    fit.fit(module)
    best = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    fit.test(module, dataloaders=module.val_dataloader(), ckpt_path="best", weights_only=True)
    for key, value in best.items():  # the module now holds the best file's weights, whatever its shapes
        torch.testing.assert_close(module.state_dict()[key], value, msg=key)


def test_numpy_numbers_are_numbers():
    cb = SNAPit(limit=np.float32(0.5), steps=np.int64(2))
    assert cb.limit == 0.5 and isinstance(cb.limit, float) and cb.steps == 2
    assert SlimmingL1Callback(penalty=np.float64(1e-4), limit=np.float32(0.25)).limit == 0.25
    with pytest.raises(PruningError, match=r"`SNAPit\(limit=1.5\)` is invalid: `limit` must be in \[0, 1\)"):
        SNAPit(limit=1.5)
    with pytest.raises(PruningError, match=r"`steps` must be an int >= 0; got True"):
        SNAPit(steps=True)


class MyDDP(DDPStrategy):
    """A user's DDP strategy (e.g. with a custom hook): still DDP."""


def test_a_ddp_strategy_subclass_is_accepted_for_structured_pruning(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    pruner = SNAPit(limit=0.5, steps=0)
    strategy = MyDDP(process_group_backend="gloo")
    trainer(tmp_path, [pruner], max_epochs=1, strategy=strategy).fit(module)
    assert pruner.step == 1 and pruner.shrunk


def test_the_max_steps_budget_counts_optimizer_steps_under_accumulation(tmp_path):
    """64 samples in batches of 16 with accumulate_grad_batches=3: 2 optimizer steps per epoch (3 + 1
    batches), so three events (end of epochs 2, 3, 4) need 8 steps, not ceil(4 * 4 / 3) = 6."""
    during = {"limit": 0.8, "steps": 1, "when": "during", "prune_delay": 1, "prune_freq": 1}
    with pytest.raises(PruningError, match=r"epoch 4 \(after about 8 optimizer steps\), but max_steps=7"):
        trainer(tmp_path, [SNIPit(**during)], max_epochs=10, max_steps=7, accumulate_grad_batches=3).fit(
            TinyModule()
        )
    pruner = SNIPit(**during)
    fit = trainer(tmp_path, [pruner], max_epochs=10, max_steps=8, accumulate_grad_batches=3)
    fit.fit(TinyModule())
    assert fit.global_step == 8 and pruner.step == len(pruner.schedule) == 3


def averaged(callback) -> torch.nn.Module:
    copy = callback._average_model
    return copy.module if isinstance(copy, torch.optim.swa_utils.AveragedModel) else copy


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_weight_averaging_follows_a_shrink_in_fit(tmp_path, kind):
    """The averaged copy is cut like the module at every shrink; at the end it becomes the module."""
    pl.seed_everything(0)
    module = TinyModule(scheduler=False)
    if kind == "swa":
        averaging = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    else:
        averaging = EMAWeightAveraging(decay=0.9)
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    trainer(tmp_path, [pruner, averaging], max_epochs=4).fit(module)
    assert pruner.step == len(pruner.schedule) == 3 and pruner.shrunk
    copy = averaged(averaging)
    assert module.model.features[0].out_channels < 8
    for (name, p), (_, q) in zip(module.named_parameters(), copy.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)  # the average, transferred at the end of training
    assert torch.isfinite(module(torch.randn(2, 3, 8, 8))).all()


class OwnCopy(TinyModule):
    """Keeps a tensor per parameter (a hand-made EMA) and follows shrinks through the public hook."""

    def on_fit_start(self):
        self.shadow = {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_shrink(self, removals):
        for r in removals:
            if r.param in self.shadow:
                self.shadow[r.param] = r.apply(self.shadow[r.param])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for n, p in self.named_parameters():
            self.shadow[n].mul_(0.9).add_(p.detach(), alpha=0.1)


def test_the_module_s_own_shape_bound_tensors_follow_through_on_shrink(tmp_path):
    pl.seed_everything(0)
    module = OwnCopy()
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    trainer(tmp_path, [pruner], max_epochs=4).fit(module)
    assert pruner.shrunk
    shapes = {n: p.shape for n, p in module.named_parameters()}
    assert {n: t.shape for n, t in module.shadow.items()} == shapes


@pytest.mark.parametrize("make", [lambda: SNAPit(limit=0.5, steps=1), lambda: SNIPit(limit=0.8, steps=1)])
def test_a_compiled_module_is_scored_like_the_eager_one(tmp_path, make):
    """Hooks added after compilation are invisible to compiled code: scoring runs the eager code."""

    def run(compiled: bool):
        pl.seed_everything(0)
        module = TinyModule(scheduler=False)
        pruner = make()
        fit = trainer(tmp_path, [pruner], max_steps=2)
        fit.fit(torch.compile(module, backend="eager") if compiled else module)
        return pruner, module

    (eager_cb, eager_module), (compiled_cb, compiled_module) = run(False), run(True)
    assert eager_cb.masks.keys() == compiled_cb.masks.keys()
    for name, mask in eager_cb.masks.items():
        assert torch.equal(mask, compiled_cb.masks[name]), name
    shapes = {k: v.shape for k, v in eager_module.state_dict().items()}
    assert {k: v.shape for k, v in compiled_module.state_dict().items()} == shapes


def test_the_end_of_fit_shrink_notifies_the_module_too(tmp_path):
    pl.seed_everything(0)
    module = OwnCopy()
    callbacks = [SNIPCallback(limit=0.5, structured=True), ShrinkOnFitEnd(latency_repeats=1)]
    trainer(tmp_path, callbacks).fit(module)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    assert module.model.features[0].out_channels < 8
    assert {n: t.shape for n, t in module.shadow.items()} == shapes


class ExtraTensor(TinyModule):
    """The optimizer also trains a tensor that is no registered parameter, in its own parameter group."""

    def __init__(self):
        super().__init__(scheduler=False)
        self.extra = [torch.ones(1, requires_grad=True)]  # a list: not registered

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * self.extra[0]

    def configure_optimizers(self):
        head = [p for n, p in self.named_parameters() if n.startswith("model.classifier")]
        body = [p for n, p in self.named_parameters() if not n.startswith("model.classifier")]
        groups = [{"params": body}, {"params": head, "lr": 0.01}, {"params": self.extra, "lr": 0.001}]
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def test_a_shrink_keeps_parameter_groups_and_tensors_outside_the_module(tmp_path):
    pl.seed_everything(0)
    module = ExtraTensor()
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    fit = trainer(tmp_path, [pruner], max_epochs=4)
    fit.fit(module)
    assert pruner.shrunk
    (opt,) = fit.optimizers
    body, head, extra = opt.param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert [names[id(p)] for p in head["params"]] == [
        "model.classifier.1.weight",
        "model.classifier.1.bias",
        "model.classifier.3.weight",
        "model.classifier.3.bias",
    ]
    assert head["lr"] == 0.01 and extra["lr"] == 0.001
    assert extra["params"][0] is module.extra[0] and float(module.extra[0]) != 1.0  # trained throughout
    assert {id(p) for p in body["params"] + head["params"]} == {id(p) for p in module.parameters()}
    for p in body["params"] + head["params"]:  # momentum buffers follow their (shrunk) parameters
        assert opt.state[p]["momentum_buffer"].shape == p.shape


class NoForward(pl.LightningModule):
    """No `forward`: `training_step` calls the network on a dict batch (a very common shape)."""

    def __init__(self, split: bool = False):
        super().__init__()
        self.net = TinyCNN()
        self.extra_head = nn.Linear(4, 4) if split else None

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["image"])
        if self.extra_head is not None:
            logits = self.extra_head(logits)
        return nn.functional.cross_entropy(logits, batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        data = [{"image": x, "label": y} for x, y in synthetic_data(64)]
        return torch.utils.data.DataLoader(data, batch_size=16)


def test_a_module_without_forward_is_traced_through_its_training_step(tmp_path):
    pl.seed_everything(0)
    module = NoForward()
    pruner, shrinker = (
        SNAPit(limit=0.5, steps=1),
        ShrinkOnFitEnd(save_path=tmp_path / "small.pt", latency_repeats=1),
    )
    trainer(tmp_path, [pruner, shrinker], max_epochs=1).fit(module)
    assert pruner.shrunk and module.net.features[0].out_channels < 8
    x = torch.randn(2, 3, 8, 8)
    module.eval()
    torch.testing.assert_close(module(x), module.net(x))  # the forward it was given calls the network
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.net.classifier[3].bias.add_(1.0)
    torch.testing.assert_close(twin(x), module(x) + 1.0)  # a copy's forward calls the copy's network
    assert shrinker.report.after.params < shrinker.report.before.params


def test_a_module_without_forward_calling_two_networks_is_refused_before_training(tmp_path):
    module = NoForward(split=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        PruningError, match=r"no `forward`, and its `training_step` calls net\(…\), extra_head"
    ):
        trainer(tmp_path, [SNAPit(limit=0.5, steps=1)], max_epochs=1).fit(module)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "make", [lambda: SNIPCallback(limit=0.5), lambda: SNAPit(limit=0.5), lambda: ShrinkOnFitEnd()]
)
def test_sharding_strategies_are_refused_by_every_callback(make):
    """FSDP needs a GPU in Lightning, so the check is called the way Lightning calls it, with the strategy."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True)
    with pytest.raises(PruningError, match=r"does not support FSDPStrategy .* need whole tensors"):
        make().setup(fake, TinyModule(), "fit")


class Recorder(pl.loggers.Logger):
    """A logger that keeps every logged metric."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_early_stopping_ends_the_schedule_early_with_a_warning(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    pl.seed_everything(0)
    module = ValLoss()
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)  # stops after the second epoch
    with pytest.warns(UserWarning, match=r"training stopped after 1 of 3 pruning steps"):
        trainer(tmp_path, [pruner, stop], max_epochs=6).fit(module)
    assert pruner.step == 1 and pruner.shrunk  # the step due at the end of epoch 2 ran, no later one
    assert module.model.features[0].out_channels < 8


def test_learning_rate_monitor_sees_the_schedule_go_on_across_shrinks(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    pl.seed_everything(0)
    logger = Recorder()
    pruner = SNAPit(limit=0.6, steps=1, when="during", prune_delay=1, prune_freq=1)
    fit = trainer(tmp_path, [pruner, LearningRateMonitor("epoch")], max_epochs=4, logger=logger)
    fit.fit(TinyModule())  # SGD lr 0.05, StepLR gamma 0.5 every epoch; shrinks after epochs 2, 3, 4
    rates = [m["lr-SGD"] for m in logger.metrics if "lr-SGD" in m]
    assert rates == pytest.approx([0.05, 0.025, 0.0125, 0.00625])
    assert pruner.shrunk


def test_lr_find_before_fit_leaves_the_model_and_the_pruner_as_they_were(tmp_path):
    from lightning.pytorch.tuner import Tuner

    pl.seed_everything(0)
    module = TinyModule(scheduler=False)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    pruner = SNAPit(limit=0.5, steps=1)
    fit = trainer(tmp_path, [pruner], max_epochs=1)
    Tuner(fit).lr_find(module, min_lr=1e-3, max_lr=1e-1, num_training=8)
    assert {k: v.shape for k, v in module.state_dict().items()} == shapes
    assert pruner.step == 0 and not pruner.masks
    fit.fit(module)
    assert pruner.step == len(pruner.schedule) and pruner.shrunk


def test_masks_of_one_callback_follow_the_shrinks_of_another(tmp_path):
    """SNIP's weight masks are cut when SNAP-it shrinks, and keep their weights at zero afterwards."""
    pl.seed_everything(0)
    module = TinyModule(scheduler=False)
    masker = SNIPCallback(limit=0.5)
    shrinker = SNAPit(limit=0.5, steps=1, when="during", prune_delay=1, prune_freq=1)
    trainer(tmp_path, [masker, shrinker], max_epochs=4).fit(module)
    assert shrinker.shrunk and module.model.features[0].out_channels < 8
    params = dict(module.named_parameters())
    assert masker.masks
    for name, mask in masker.masks.items():
        assert mask.shape == params[name].shape, name
        assert torch.all(params[name][~mask] == 0), name  # trained for epochs after the shrinks
