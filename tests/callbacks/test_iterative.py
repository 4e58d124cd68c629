"""IterativeSNIPCallback, SNIPit, SNAPit: schedules, pruning in fit, optimizer state, resume, rewinding."""

import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_prune import IterativeSNIPCallback, PruningError, SNAPit, SNIPit, list_criteria
from lightning_prune.schedules import snipit_schedule
from tests.helpers.modules import TinyModule, synthetic_data, trainer


class Ordered(TinyModule):
    """No shuffling: a resumed run sees the same batches as an uninterrupted one."""

    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n), batch_size=self.hparams.batch_size)


class Recording(IterativeSNIPCallback):
    """Remembers the epoch of every step and a copy of the masks after it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs, self.history = [], []

    def prune_step(self, trainer, pl_module, batches):
        super().prune_step(trainer, pl_module, batches)
        self.epochs.append(trainer.current_epoch if self.when == "during" else 0)  # epochs completed
        self.history.append({n: m.clone() for n, m in self.masks.items()})


def node_count(module):
    """Output channels of every conv/linear layer except the classifier head."""
    layers = [m for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    return sum(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in layers[:-1])


# -- arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 1.0}, r"`IterativeSNIPCallback\(limit=1.0\)` is invalid: `limit` must be in \[0, 1\)"),
        ({"steps": -1}, r"`steps` must be an int >= 0"),
        ({"start": 1.5}, r"`start` must be in \[0, 1\)"),
        ({"when": "after"}, r"`when` must be one of \['before', 'during'\]"),
        ({"prune_delay": -1}, r"`prune_delay` must be an int >= 0"),
        ({"prune_freq": 0}, r"`prune_freq` must be an int >= 1"),
        ({"num_batches": 0}, r"`num_batches` must be an int >= 1"),
        ({"criterion": "snipp"}, r"criterion='snipp'.*Did you mean 'snip'"),
        ({"criterion": "grasp", "structured": True}, r"cannot score channels"),
        ({"criterion": "snap"}, r"cannot score single weights"),
        ({"seed": -3}, r"`seed` must be an int >= 0"),
        ({"criterion": ["snip"]}, r"`criterion` must be a name such as 'snip'"),
        ({"rewind_epoch": 1}, r"needs `when='during'`"),
        (
            {"rewind_epoch": 5, "when": "during", "prune_delay": 2, "prune_freq": 2},
            r"before the first pruning event \(end of epoch 4\)",
        ),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        IterativeSNIPCallback(**kwargs)


def test_presets_and_their_schedules():
    snipit, snapit = SNIPit(), SNAPit()
    assert (snipit.limit, snipit.structured, snipit.criterion_name) == (0.98, False, "snip")
    assert (snapit.limit, snapit.structured, snapit.criterion_name) == (0.93, True, "snap")
    assert snapit.schedule == snipit_schedule(0.93, 5, 0.5)
    assert SNIPit(when="during").event_epochs() == [8, 12, 16, 20, 24, 28, 32]  # the seed's delay 4, freq 4
    assert IterativeSNIPCallback(criterion="random").state_key != IterativeSNIPCallback().state_key
    clone = pickle.loads(pickle.dumps(snapit))
    assert clone.schedule == snapit.schedule


def test_too_few_epochs_for_the_events_fails_in_setup(tmp_path):
    cb = IterativeSNIPCallback(limit=0.8, steps=1, when="during", prune_delay=1, prune_freq=2)
    with pytest.raises(PruningError, match=r"last time at the end of epoch 7, but .* max_epochs=5"):
        trainer(tmp_path, [cb], max_epochs=5).fit(TinyModule())


def test_start_at_or_above_limit_warns_that_steps_have_no_effect():
    with pytest.warns(UserWarning, match=r"`start` is not below `limit`, so pruning happens in one step"):
        cb = SNIPit(limit=0.3)
    assert cb.schedule == [0.3]


def test_budget_and_model_problems_fail_before_training(tmp_path):
    during = {"limit": 0.8, "steps": 1, "when": "during", "prune_delay": 1, "prune_freq": 1}
    with pytest.raises(
        PruningError, match=r"end of epoch 4 \(after about 16 optimizer steps\), but max_steps=10"
    ):
        trainer(tmp_path, [IterativeSNIPCallback(**during)], max_epochs=10, max_steps=10).fit(TinyModule())

    class HeadOnly(TinyModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    pruner = IterativeSNIPCallback(structured=True, **during)
    with pytest.raises(PruningError, match=r"no channel group of HeadOnly can be pruned"):
        trainer(tmp_path, [pruner, Steps()], max_epochs=10).fit(HeadOnly())
    assert steps == []  # refused before the first step, not at the first event


def test_a_schedule_cut_short_warns_at_the_end(tmp_path):
    cb = IterativeSNIPCallback(limit=0.8, steps=1, when="during", prune_delay=0, prune_freq=1)
    early_stop = pl.callbacks.Callback()
    early_stop.on_train_epoch_end = lambda trainer, *a: setattr(
        trainer, "should_stop", trainer.current_epoch >= 1
    )
    with pytest.warns(UserWarning, match=r"training stopped after 2 of 3 pruning steps, at sparsity 65.0"):
        trainer(tmp_path, [cb, early_stop], max_epochs=5).fit(TinyModule())


def test_steps_before_training_score_on_consecutive_batches(tmp_path):
    """Each step scores fresh batches; a loader that runs out starts over (4 batches, 2 per step)."""
    seen = []

    class Indexed(Ordered):
        def training_step(self, batch, batch_idx):
            seen.append(float(batch[0][0, 0, 0, 0]))
            return super().training_step(batch, batch_idx)

    module = Indexed()
    firsts = [float(x[0, 0, 0, 0]) for x, _ in module.train_dataloader()]
    cb = IterativeSNIPCallback(limit=0.9, steps=2, num_batches=2)  # 4 steps: 8 scoring batches
    trainer(tmp_path, [cb], max_steps=1).fit(module)
    assert seen[:8] == [firsts[i] for i in (0, 1, 2, 3, 0, 1, 2, 3)]


def test_steps_is_the_papers_s_and_setup_logs_the_number_of_pruning_steps(tmp_path, caplog):
    """The seed's --snip_steps 5 prunes 7 times (p_0 … p_5, then limit); setup says so before training."""
    cb = Recording(limit=0.98, steps=5, num_batches=1)
    with caplog.at_level("INFO"):
        trainer(tmp_path, [cb], max_steps=1).fit(TinyModule())
    assert len(cb.history) == len(cb.schedule) == cb.steps + 2 == 7
    assert (
        "Recording: 7 pruning steps at the start of fit, to sparsities [0.5, 0.74, 0.86, 0.92, 0.95, 0.965, "
        "0.98] (steps=5 is the paper's S: p_0 … p_S, then limit)."
    ) in caplog.text


# -- before training -------------------------------------------------------------------------------------
def test_snipit_before_prunes_along_the_schedule_with_nested_masks(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    cb = Recording(limit=0.9, steps=2, num_batches=2)
    trainer(tmp_path, [cb], max_epochs=2).fit(module)
    assert [round(p, 4) for p in cb.schedule] == [0.5, 0.7, 0.8, 0.9]
    assert len(cb.history) == 4
    total = sum(m.numel() for m in cb.history[0].values())
    for p, masks in zip(cb.schedule, cb.history, strict=True):
        assert sum(int(m.sum()) for m in masks.values()) == round(total * (1 - p))
    for earlier, later in zip(cb.history, cb.history[1:], strict=False):
        assert all(torch.equal(later[n] & ~earlier[n], torch.zeros_like(later[n])) for n in later)
    params = dict(module.named_parameters())
    for name, mask in cb.masks.items():  # pruned weights stayed exactly zero through training
        assert torch.all(params[name][~mask] == 0)
    assert cb.report.weight_sparsity == pytest.approx(0.9, abs=1 / total)


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_snapit_before_shrinks_the_network_step_by_step(tmp_path, arch):
    pl.seed_everything(0)
    module = TinyModule(arch=arch)
    nodes = node_count(module)
    cb = SNAPit(limit=0.6, steps=2, num_batches=2)
    losses = []

    class Loss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, [cb, Loss()], max_epochs=2).fit(module)
    assert cb.step == len(cb.schedule) == 4
    assert 1 - node_count(module) / nodes == pytest.approx(cb.report.node_sparsity)
    assert cb.report.node_sparsity == pytest.approx(0.6, abs=0.07)
    assert not cb.masks  # structured pruning removes, it does not mask
    assert module(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))


# -- during training -------------------------------------------------------------------------------------
def test_during_events_follow_delay_and_freq(tmp_path):
    pl.seed_everything(0)
    cb = Recording(limit=0.8, steps=1, when="during", prune_delay=1, prune_freq=2, num_batches=1)
    trainer(tmp_path, [cb], max_epochs=8).fit(TinyModule(n=32))
    assert cb.epochs == [e for e in range(1, 9) if e - 1 > 0 and (e - 1) % 2 == 0][:3] == [3, 5, 7]
    assert cb.report.weight_sparsity == pytest.approx(0.8, abs=1e-3)


class OptimizerStateCheck(IterativeSNIPCallback):
    """Around each shrink: the Adam state of every kept channel of the stem equals its value before."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked = self.stem_removed = 0

    def shrink_in_fit(self, trainer, pl_module, graph, plan):
        opt = trainer.optimizers[0]
        weight = pl_module.model.features[0].weight
        before = {k: v.clone() for k, v in opt.state[weight].items()}
        next_before = {k: v.clone() for k, v in opt.state[pl_module.model.features[3].weight].items()}
        lr, scheduler = opt.param_groups[0]["lr"], trainer.lr_scheduler_configs[0].scheduler.state_dict()
        removals = super().shrink_in_fit(trainer, pl_module, graph, plan)
        if trainer.global_step == 0:
            return removals
        opt = trainer.optimizers[0]
        assert opt.param_groups[0]["lr"] == lr  # decayed learning rate and scheduler state carried over
        assert trainer.lr_scheduler_configs[0].scheduler.state_dict() == scheduler
        assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
        removed = plan.get("model.features.0", [])
        keep = torch.tensor([c for c in range(before["exp_avg"].shape[0]) if c not in removed])
        after = opt.state[pl_module.model.features[0].weight]
        after_next = opt.state[pl_module.model.features[3].weight]
        assert float(after["step"]) == float(before["step"]) == trainer.global_step  # the counter goes on
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key], before[key][keep])  # rows of the conv that lost channels
            consumer = next_before[key][:, keep]  # input columns of the next conv
            kept_rows = [
                r for r in range(next_before[key].shape[0]) if r not in plan.get("model.features.3", [])
            ]
            assert torch.equal(after_next[key], consumer[kept_rows])
        self.checked += 1
        self.stem_removed += len(removed)
        return removals


def test_structured_during_keeps_the_optimizer_state_of_kept_channels(tmp_path):
    pl.seed_everything(0)
    module = TinyModule(optimizer="adam", lr=0.01, scheduler=True)
    cb = OptimizerStateCheck(
        limit=0.6, start=0.3, structured=True, steps=1, when="during", prune_delay=0, prune_freq=1
    )
    trainer(tmp_path, [cb], max_epochs=4).fit(module)
    assert cb.step == 3 and cb.checked == 3
    assert cb.stem_removed > 0  # the rows compared above really lost channels
    assert module.model.features[0].out_channels < 8
    assert float(next(iter(module.trainer.optimizers[0].state.values()))["step"]) == 16


# -- resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structured", [False, True])
def test_resume_between_two_steps_ends_like_an_uninterrupted_run(tmp_path, structured):
    def make_callback():
        return IterativeSNIPCallback(
            limit=0.7,
            structured=structured,
            steps=1,
            when="during",
            prune_delay=0,
            prune_freq=2,
            num_batches=2,
        )

    pl.seed_everything(0)
    first, cb = Ordered(arch="resnet", optimizer="adam", lr=0.01), make_callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [cb, ckpt], max_epochs=6, enable_checkpointing=True).fit(first)
    assert cb.step == 3

    path = tmp_path / "ckpt" / "epoch=2-step=12.ckpt"  # after the first event (epoch 2), before the second
    state = torch.load(path, weights_only=True)
    assert state["callbacks"][cb.state_key]["step"] == 1
    pl.seed_everything(1)  # a different seed must not matter: everything comes from the checkpoint
    resumed, cb2 = Ordered(arch="resnet", optimizer="adam", lr=0.01), make_callback()
    trainer(tmp_path, [cb2], max_epochs=6).fit(resumed, ckpt_path=path, weights_only=True)
    assert cb2.step == 3
    a, b = first.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert cb.masks.keys() == cb2.masks.keys()
    assert all(torch.equal(cb.masks[k].cpu(), cb2.masks[k].cpu()) for k in cb.masks)


def test_an_event_missed_by_a_step_checkpoint_runs_on_resume(tmp_path):
    """A checkpoint written after the last batch of an event epoch, before the epoch-end hook pruned:
    resuming from it must still take that step (and end like an uninterrupted run)."""

    def run(callbacks, **kwargs):
        pl.seed_everything(0)
        module = Ordered()
        trainer(tmp_path, callbacks, max_epochs=3, **kwargs).fit(module)
        return module

    make = lambda: IterativeSNIPCallback(limit=0.6, steps=0, when="during", prune_delay=0, prune_freq=2)  # noqa: E731
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    whole = run([make(), ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"  # last batch of epoch 2, the event epoch
    assert torch.load(path, weights_only=True)["callbacks"][make().state_key]["step"] == 0
    cb = make()
    pl.seed_everything(0)
    resumed = Ordered()
    trainer(tmp_path, [cb], max_epochs=3).fit(resumed, ckpt_path=path, weights_only=True)
    assert cb.step == 1
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_resuming_with_another_schedule_is_refused(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = IterativeSNIPCallback(limit=0.6, steps=1, when="during", prune_delay=0, prune_freq=1)
    trainer(tmp_path, [first, ckpt], max_epochs=3, enable_checkpointing=True).fit(TinyModule())
    other = IterativeSNIPCallback(limit=0.6, steps=2, when="during", prune_delay=0, prune_freq=1)
    with pytest.raises(PruningError, match=r"written with the schedule .* resume with the same `limit`"):
        trainer(tmp_path, [other], max_epochs=4).fit(
            TinyModule(),
            ckpt_path=tmp_path / "ckpt" / "epoch=1-step=8.ckpt",  # after the first step
        )


# -- rewinding -------------------------------------------------------------------------------------------
class RewindCheck(IterativeSNIPCallback):
    def on_train_epoch_start(self, trainer, pl_module):
        step = self.step
        super().on_train_epoch_start(trainer, pl_module)
        if self.step > step:
            self.after_event = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


class Snapshots(pl.Callback):
    """Parameters at the end of every epoch, recorded before the pruner runs (it is listed first)."""

    def __init__(self):
        self.epochs = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch + 1] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }


def test_imp_rewinds_surviving_weights_to_the_rewind_epoch(tmp_path):
    pl.seed_everything(0)
    module = TinyModule()
    snapshots = Snapshots()
    cb = RewindCheck(
        limit=0.75, criterion="magnitude", steps=0, when="during", prune_delay=1, prune_freq=1, rewind_epoch=1
    )
    trainer(tmp_path, [snapshots, cb], max_epochs=3).fit(module)
    assert cb.step == 1
    epoch1, epoch2 = snapshots.epochs[1], snapshots.epochs[2]
    for name, value in cb.after_event.items():  # right after the event at the end of epoch 2
        expected = epoch1[name] * cb.masks[name].to(value.dtype) if name in cb.masks else epoch1[name]
        assert torch.equal(value, expected), name
        assert not torch.equal(value, epoch2[name]), name  # epoch 2 really changed it; it was rewound
    assert not torch.equal(
        module.model.features[0].weight, cb.after_event["model.features.0.weight"]
    )  # trained


def test_rewinding_survives_another_callbacks_shrink(tmp_path):
    """IMP with rewinding next to SNAP-it during training: the rewind weights are cut like the model."""
    pl.seed_everything(0)
    module = TinyModule()
    imp = IterativeSNIPCallback(
        limit=0.5, criterion="magnitude", steps=0, when="during", prune_delay=2, prune_freq=1, rewind_epoch=0
    )
    snap = IterativeSNIPCallback(
        limit=0.4, structured=True, steps=0, when="during", prune_delay=1, prune_freq=1
    )
    trainer(tmp_path, [snap, imp], max_epochs=4).fit(module)
    assert snap.step == imp.step == 1
    params = dict(module.named_parameters())
    assert module.model.features[0].out_channels < 8
    for name, value in imp.rewind.items():
        assert value.shape == params[name].shape, name
    assert imp.report.weight_sparsity == pytest.approx(0.5, abs=1e-3)


# -- every criterion through the callback: the highest scores are kept ---------------------------------
class Recorder:
    def __init__(self, inner):
        self.inner, self.scores, self.needs_data = inner, None, inner.needs_data

    def weight_scores(self, inputs):
        self.scores = self.inner.weight_scores(inputs)
        return self.scores

    def node_scores(self, inputs):
        self.scores = self.inner.node_scores(inputs)
        return self.scores


@pytest.mark.parametrize("name", list_criteria(structured=False))
def test_unstructured_criteria_keep_the_highest_scores(tmp_path, name):
    pl.seed_everything(0)
    cb = IterativeSNIPCallback(limit=0.5, steps=0, criterion=name, num_batches=1)
    cb.criterion = Recorder(cb.criterion)
    trainer(tmp_path, [cb], max_steps=1).fit(TinyModule())
    scores = torch.cat([cb.criterion.scores[n].flatten() for n in cb.masks])
    kept = torch.cat([cb.masks[n].flatten().cpu() for n in cb.masks])
    assert kept.float().mean() == pytest.approx(0.5, abs=1e-3)
    assert scores[kept].min() >= scores[~kept].max()


@pytest.mark.parametrize("name", list_criteria(structured=True))
def test_structured_criteria_remove_the_lowest_scores(tmp_path, name):
    pl.seed_everything(0)
    plans = []

    class Plan(IterativeSNIPCallback):
        def shrink_in_fit(self, trainer, pl_module, graph, plan):
            plans.append(plan)
            return super().shrink_in_fit(trainer, pl_module, graph, plan)

    cb = Plan(limit=0.3, structured=True, steps=0, criterion=name, num_batches=1)
    cb.criterion = Recorder(cb.criterion)
    trainer(tmp_path, [cb], max_steps=1).fit(TinyModule())
    (plan,) = plans
    removed = [float(cb.criterion.scores[g][c]) for g, chs in plan.items() for c in chs]
    kept = [
        float(v) for g, s in cb.criterion.scores.items() for c, v in enumerate(s) if c not in plan.get(g, [])
    ]
    assert removed and min(kept) >= max(removed)


# -- SNAP-it on real architectures (the original cannot prune residual nets) -------------------------------
class Torchvision(TinyModule):
    def __init__(self, name: str):
        super().__init__(n=32, batch_size=8, scheduler=False)
        import torchvision

        self.model = torchvision.models.get_model(name, weights=None, num_classes=4)
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n, size=32), batch_size=self.hparams.batch_size)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_snapit_preset_shrinks_torchvision_models(tmp_path, name):
    pl.seed_everything(0)
    module = Torchvision(name)
    params = sum(p.numel() for p in module.parameters())
    cb = SNAPit(steps=1, num_batches=1)  # limit 0.93, three steps: 0.5, 0.715, 0.93
    trainer(tmp_path, [cb], max_steps=2).fit(module)
    assert cb.step == 3
    assert cb.report.node_sparsity == pytest.approx(0.93, abs=0.01)
    assert sum(p.numel() for p in module.parameters()) < 0.1 * params
    module.eval()
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("criterion", ["snip", "magnitude"])
def test_scoring_does_not_change_the_training_batch_order(tmp_path, criterion):
    """Starting a shuffling loader for scoring consumes random numbers; that must not reorder training."""

    def first_batches(callbacks):
        seen = []

        class Watch(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(float(batch[0][0, 0, 0, 0]))

        pl.seed_everything(0)
        trainer(tmp_path, [*callbacks, Watch()], max_epochs=2).fit(TinyModule())
        return seen

    pruner = IterativeSNIPCallback(limit=0.5, steps=1, criterion=criterion, num_batches=3)
    assert first_batches([pruner]) == first_batches([])
