"""SensitivityPruner: schedules, λ, vote → removal, budgets, residual nets, resume, hooks, errors."""

import pickle

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_prune import PruningError, SensitivityPruner
from lightning_prune.callbacks.sensitivity import (
    _fresh_weights,
    adapt_lambda,
    auto_blocks,
    beta_value,
    top_fraction,
)
from tests.helpers.modules import TinyModule, synthetic_data, trainer


class Ordered(TinyModule):
    """No shuffling: a resumed run sees the same batches as an uninterrupted one."""

    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n), batch_size=self.hparams.batch_size)


class Recording(SensitivityPruner):
    """Records every removal plan; can pin the strategy networks to fixed indicators."""

    def __init__(self, *args, pinned=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plans, self.pinned, self.betas = [], pinned or {}, []

    def shrink_in_fit(self, trainer, pl_module, graph, plan):
        self.plans.append({k: list(v) for k, v in plan.items()})
        return super().shrink_in_fit(trainer, pl_module, graph, plan)

    def _start_block(self, trainer, pl_module, resumed=False):
        super()._start_block(trainer, pl_module, resumed)
        with torch.no_grad():
            for name, net in self._net_items():
                if name in self.pinned:  # z = ±10 whatever the sensitivities: m ≈ 1 on the pinned channels
                    net.linear.weight.zero_()
                    keep = torch.zeros(net.linear.bias.numel(), dtype=torch.bool)
                    keep[self.pinned[name]] = True
                    net.linear.bias.copy_(torch.where(keep, 10.0, -10.0))


def fit(tmp_path, callback, module=None, **kwargs):
    pl.seed_everything(0)
    module = module or TinyModule(arch="resnet", n=64, batch_size=8)
    trainer(tmp_path, [callback], **{"max_epochs": 3, **kwargs}).fit(module)
    return module


def hooks(module):
    return sum(len(m._forward_hooks) for m in module.modules())


# -- the decisions ---------------------------------------------------------------------------------------
def test_beta_follows_the_seeds_linspace_schedule():
    # the seed: np.linspace(1, 100, epochs * batches / beta_range), one value per beta_range iterations
    n, every = 1000, 100
    expected = torch.linspace(1, 100, n // every)
    got = [beta_value(i, n, every) for i in range(n)]
    assert got[0] == 1.0 and got[-1] == pytest.approx(100.0)
    for i in range(n):
        assert got[i] == pytest.approx(float(expected[i // every]), rel=1e-6)
    assert beta_value(5000, n, every) == pytest.approx(100.0)  # stays at the end
    assert beta_value(50, 60, every) == 1.0  # shorter than one beta_range: the first value
    assert beta_value(150, 400, 100, (2.0, 8.0)) == pytest.approx(4.0)


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 10))
def test_lambda_is_zero_below_the_target_else_the_scaled_gap(kept, target, scale):
    lam = adapt_lambda(kept, target, scale)
    if kept < target:
        assert lam == 0.0
    else:
        assert lam == pytest.approx(scale * (kept - target))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=12), min_size=1, max_size=4),
    st.floats(0.01, 1.0),
    st.booleans(),
)
def test_top_fraction_keeps_the_highest_and_the_budget(layers, rate, per_layer):
    scores = {f"l{i}": torch.tensor(v, dtype=torch.float64) for i, v in enumerate(layers)}
    kept = top_fraction(scores, rate, per_layer)
    for name, s in scores.items():
        k = kept[name]
        assert k.any()  # no layer is emptied
        if k.all() or not k.any():
            continue
        assert s[k].min() >= s[~k].max() or not per_layer  # per layer: the highest are kept
    if per_layer:
        for name, s in scores.items():
            assert int(kept[name].sum()) == max(1, round(rate * s.numel()))
    else:
        total = sum(s.numel() for s in scores.values())
        count = sum(int(k.sum()) for k in kept.values())
        # exactly the global budget (at least one channel per layer, rescued from the budget)
        assert count == max(1, round(rate * total), len(scores))


def test_auto_blocks_split_stages_or_sequences():
    names = [
        "model.net.conv1",
        "model.net.layer1.0.conv1",
        "model.net.layer1.1.conv1",
        "model.net.layer2.0.conv1",
    ]
    assert auto_blocks(names) == [names[:1], names[1:3], names[3:]]
    flat = ["model.features.0", "model.features.3", "model.features.7"]
    assert auto_blocks(flat) == [[n] for n in flat]
    assert auto_blocks(["only.one"]) == [["only.one"]]


# -- arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"compression_rate": 0},
            r"`SensitivityPruner\(compression_rate=0\)` is invalid: `compression_rate` must",
        ),
        ({"compression_rate": 1.5}, r"`compression_rate` must be a finite number > 0 and <= 1; got 1.5"),
        ({"layer_sort": "yes"}, r"`layer_sort` must be a bool"),
        ({"epochs_per_block": 0}, r"`epochs_per_block` must be an int >= 1"),
        ({"blocks": "model.layer1.*"}, r"`blocks` must be None or a list of blocks"),
        ({"blocks": [["a.*"], []]}, r"`blocks` must be None or a list of blocks"),
        ({"beta_range": 0}, r"`beta_range` must be an int >= 1"),
        ({"beta_bounds": [100, 1]}, r"`beta_bounds` must be two numbers \[low, high\] with 0 < low <= high"),
        ({"beta_bounds": [1]}, r"`beta_bounds` must be two numbers"),
        ({"vote_window": 0}, r"`vote_window` must be an int >= 1"),
        ({"lambda_init": -1.0}, r"`lambda_init` must be a finite number >= 0"),
        ({"lambda_scale": float("nan")}, r"`lambda_scale` must be a finite number"),
        ({"strategy_lr": 0}, r"`strategy_lr` must be a finite number > 0"),
        ({"reinit": 1}, r"`reinit` must be a bool"),
        ({"seed": -1}, r"`seed` must be an int >= 0"),
        ({"round_to": 0}, r"`round_to` must be an int >= 1 or 'auto'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        SensitivityPruner(**kwargs)


def test_too_few_epochs_and_unmatched_blocks_fail_before_training(tmp_path):
    with pytest.raises(
        PruningError,
        match=r"2 blocks × epochs_per_block=2 from epoch 0 need max_epochs >= 4, but max_epochs=3",
    ):
        fit(tmp_path, SensitivityPruner(epochs_per_block=2))
    with pytest.raises(PruningError, match=r"no prunable channel group matches \[\['model.nothing.\*'\]\]"):
        fit(tmp_path, SensitivityPruner(blocks=["model.blocks.*", "model.nothing.*"]))


def test_pickles_and_refuses_float16_scaling(tmp_path):
    assert pickle.loads(pickle.dumps(SensitivityPruner(seed=3))).seed == 3
    pl.seed_everything(0)
    t = trainer(tmp_path, [SensitivityPruner()], max_epochs=3)
    t.precision_plugin.scaler = torch.amp.GradScaler("cpu")  # what precision="16-mixed" sets up on a GPU
    with pytest.raises(PruningError, match=r"float16 gradient scaling does not reach"):
        t.fit(TinyModule(arch="resnet"))


# -- in fit ------------------------------------------------------------------------------------------------
def test_the_voted_indicators_are_the_channels_kept(tmp_path):
    # pinned indicators: m ≈ 1 on channels {1, 2, 6, 7} of the stem group, ≈ 0 elsewhere → those 4 stay
    cb = Recording(
        compression_rate=0.5, vote_window=2, strategy_lr=1e-9, pinned={"model.stem.0": [1, 2, 6, 7]}
    )
    module = fit(tmp_path, cb, max_epochs=2)
    assert cb.plans[0] == {"model.stem.0": [0, 3, 4, 5]}
    assert cb.reports[0].corrections == 0 and cb.reports[0].kept == 4
    assert module.model.stem[0].out_channels == 4


def test_the_budget_overrules_the_vote_and_says_so(tmp_path):
    # six channels voted in, but compression_rate 0.5 keeps four; equal votes go by index: 0-3 stay
    cb = Recording(
        compression_rate=0.5, vote_window=2, strategy_lr=1e-9, pinned={"model.stem.0": [0, 1, 2, 3, 4, 5]}
    )
    fit(tmp_path, cb, max_epochs=2)
    assert cb.plans[0] == {"model.stem.0": [4, 5, 6, 7]}
    assert cb.reports[0].corrections == 2


@pytest.mark.parametrize("layer_sort", [True, False])
def test_kept_fraction_is_the_compression_rate_within_one_channel_per_layer(tmp_path, layer_sort):
    module = TinyModule(arch="cnn", n=64, batch_size=16)
    cb = SensitivityPruner(compression_rate=0.3, layer_sort=layer_sort, vote_window=2, blocks=["model.*"])
    sizes = {"features.0": 8, "features.3": 16, "classifier.1": 16}
    fit(tmp_path, cb, module=module, max_epochs=2)
    kept = {
        "features.0": module.model.features[0].out_channels,
        "features.3": module.model.features[3].out_channels,
        "classifier.1": module.model.classifier[1].out_features,
    }
    if layer_sort:
        for name, n in sizes.items():
            assert abs(kept[name] - 0.3 * n) <= 1, (name, kept[name])
    else:
        assert abs(sum(kept.values()) - 0.3 * sum(sizes.values())) <= len(sizes)
    assert module.model.classifier[3].out_features == 4  # the model's output is never pruned


def test_round_to_rounds_the_kept_counts(tmp_path):
    module = TinyModule(arch="cnn", n=64, batch_size=16)
    cb = SensitivityPruner(
        compression_rate=0.4, layer_sort=True, vote_window=2, blocks=["model.*"], round_to=4
    )
    fit(tmp_path, cb, module=module, max_epochs=2)
    assert module.model.features[0].out_channels == 4  # 0.4 · 8 = 3.2 → 3 → 4
    assert module.model.features[3].out_channels == 8  # 0.4 · 16 = 6.4 → 6 → 8
    assert module.model.classifier[1].out_features == 8


def test_residual_stages_are_pruned_consistently_and_hooks_removed(tmp_path):
    cb = Recording(compression_rate=0.5, vote_window=2)
    module = fit(tmp_path, cb)
    assert cb.block_groups == [["model.stem.0"], ["model.blocks.0.0", "model.blocks.1.0"]]
    assert cb.block == 2 and not cb.active and cb.nets is None
    net = module.model
    width = net.stem[0].out_channels
    assert width == 4  # the residual channels: stem, both blocks' last convs and BNs, the head's inputs
    assert {b[3].out_channels for b in net.blocks} == {b[4].num_features for b in net.blocks} == {width}
    assert {b[0].in_channels for b in net.blocks} == {net.head.in_features} == {width}
    assert net.blocks[0][0].out_channels + net.blocks[1][0].out_channels == 8  # global ranking in block 2
    assert hooks(module) == 0
    assert module(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    assert [r.block for r in cb.reports] == [1, 2] and cb.reports[-1].node_sparsity == pytest.approx(0.5)


def test_lambda_and_beta_adapt_at_every_vote(tmp_path):
    cb = SensitivityPruner(
        compression_rate=0.25, vote_window=2, beta_range=2, epochs_per_block=2, lambda_init=0.0
    )
    checked = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not cb.active or cb.window:  # only right after a vote
                return
            for name, voted in cb.voted.items():
                kept = float((voted > 0.5).float().mean())
                assert cb.lambdas[name] == pytest.approx(adapt_lambda(kept, cb.target_fraction[name]))
                checked.append((cb.block, cb.iteration, name, cb.lambdas[name], cb.beta_offset[name]))

    pl.seed_everything(0)
    module = TinyModule(arch="resnet", n=64, batch_size=8)  # 8 iterations per epoch, 16 per block
    trainer(tmp_path, [cb, Spy()], max_epochs=4).fit(module)
    assert len(checked) == 8 + 2 * 8  # a vote every 2 iterations: 8 in block 1, 8 for each layer of block 2
    assert any(lam > 0 for *_, lam, _ in checked)  # adapted from λ_init = 0
    # β + 1 for a layer whose indicators are not near-binary, only after the block's first epoch
    assert all(offset == 0 for _, it, _, _, offset in checked if it < 8)
    assert any(offset >= 1 for *_, offset in checked)


def test_hooks_are_removed_when_training_fails(tmp_path):
    class Failing(TinyModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing(arch="resnet", n=64, batch_size=8)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, SensitivityPruner(vote_window=2), module=module)
    assert hooks(module) == 0


def test_a_second_fit_after_a_failure_rebuilds_the_gates_and_strategy_networks(tmp_path):
    class FailsOnce(TinyModule):
        fail = True

        def training_step(self, batch, batch_idx):
            if self.fail and self.global_step == 3:
                self.fail = False
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = FailsOnce(arch="resnet", n=64, batch_size=8)
    pruner = SensitivityPruner(vote_window=2)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, pruner, module=module)
    assert hooks(module) == 0 and pruner.nets is None and pruner._saved_nets  # kept as state only
    seen = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(hooks(pl_module))

    pl.seed_everything(0)
    trainer(tmp_path, [pruner, Count()], max_epochs=3).fit(module)
    assert seen[0] > 0  # the block goes on gated from the first batch of the second fit
    assert pruner.block == 2 and hooks(module) == 0


def test_the_task_loss_reaches_the_strategy_networks_through_frozen_eval_mode_norms(tmp_path):
    grads = []

    class FrozenNorms(TinyModule):
        def on_train_epoch_start(self):
            for m in self.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

    class Grad(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if pruner.nets is not None:
                grads.append(
                    sum(float(p.grad.abs().sum()) for p in pruner.nets.parameters() if p.grad is not None)
                )

    pruner = SensitivityPruner(vote_window=2, lambda_init=0.0)  # no L1 term: any gradient is the task loss's
    pl.seed_everything(0)
    module = FrozenNorms(arch="resnet", n=64, batch_size=8)
    trainer(tmp_path, [Grad(), pruner], max_epochs=3).fit(module)
    assert grads and all(g > 0 for g in grads[:4])


def test_a_fit_from_a_later_epoch_schedules_blocks_from_there_and_cut_short_blocks_are_not_pruned(tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "pre", save_last=True)
    module = TinyModule(arch="resnet", n=64, batch_size=8)
    trainer(tmp_path, [ckpt], max_epochs=2, enable_checkpointing=True).fit(module)  # pretraining, no pruner
    pruner = SensitivityPruner(compression_rate=0.5, vote_window=2)
    with pytest.raises(PruningError, match=r"from epoch 2 need max_epochs >= 4, but max_epochs=3"):
        trainer(tmp_path, [pruner], max_epochs=3).fit(module, ckpt_path=tmp_path / "pre" / "last.ckpt")
    pruner = SensitivityPruner(compression_rate=0.5, vote_window=2)
    trainer(tmp_path, [pruner], max_epochs=5).fit(module, ckpt_path=tmp_path / "pre" / "last.ckpt")
    assert pruner.start_epoch == 2 and pruner.block == 2
    assert all(r.corrections < r.channels for r in pruner.reports)  # decided by votes, not an empty one
    assert [r.kept for r in pruner.reports] == [round(0.5 * r.channels) for r in pruner.reports]

    fresh = TinyModule(arch="resnet", n=64, batch_size=8)
    before = {k: v.shape for k, v in fresh.state_dict().items()}
    with pytest.warns(UserWarning, match="training stopped after 0 of 2 blocks"):
        trainer(tmp_path, [SensitivityPruner(vote_window=2)], max_epochs=3, fast_dev_run=True).fit(fresh)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == before  # one batch does not prune


def test_resume_mid_block_ends_like_an_uninterrupted_run(tmp_path):
    def make():
        return SensitivityPruner(
            compression_rate=0.5, epochs_per_block=2, vote_window=3, beta_range=2, reinit=True
        )

    pl.seed_everything(0)
    first, cb = Ordered(arch="resnet", n=32, batch_size=8, optimizer="adam", lr=0.01), make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [cb, ckpt], max_epochs=5, enable_checkpointing=True).fit(first)
    assert cb.block == 2

    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"  # block 1, half-way: 4 iterations, a vote window open
    state = torch.load(path, weights_only=True)["callbacks"][cb.state_key]
    assert state["active"] and state["block"] == 0 and state["iteration"] == 4 and state["window"] == 1
    assert state["nets"] and state["strategy_optimizer"]["state"]
    pl.seed_everything(1)  # a different seed must not matter: everything comes from the checkpoint
    resumed, cb2 = Ordered(arch="resnet", n=32, batch_size=8, optimizer="adam", lr=0.01), make()
    trainer(tmp_path, [cb2], max_epochs=5).fit(resumed, ckpt_path=path, weights_only=True)
    assert cb2.block == 2
    assert [(r.kept, r.corrections) for r in cb.reports] == [(r.kept, r.corrections) for r in cb2.reports]
    a, b = first.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fresh_weights_are_seeded_and_put_back():
    net = TinyModule(arch="resnet").model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []
    for _ in range(2):
        with _fresh_weights(net, torch.Generator().manual_seed(7)):
            seen.append(net.stem[0].weight.detach().clone())
            assert not torch.equal(seen[-1], before["stem.0.weight"])
            assert torch.equal(net.stem[1].weight, before["stem.1.weight"])  # norms keep theirs
    torch.testing.assert_close(seen[0], seen[1])
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_validation_inside_a_block_sees_the_voted_channels_zeroed(tmp_path):
    cb = Recording(
        compression_rate=0.5, vote_window=2, strategy_lr=1e-9, pinned={"model.stem.0": [1, 2, 6, 7]}
    )
    outputs = []

    class Probe(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, *args):
            if cb.active and cb.voted and not outputs:
                captured = {}
                handle = pl_module.model.stem[1].register_forward_hook(
                    lambda m, a, out: captured.update(y=out)
                )
                pl_module(torch.randn(2, 3, 8, 8))
                handle.remove()
                outputs.append(captured["y"])

    pl.seed_everything(0)
    module = TinyModule(arch="resnet", n=64, batch_size=8)
    trainer(tmp_path, [cb, Probe()], max_epochs=2).fit(module)
    (y,) = outputs  # the stem's BatchNorm output, gated after it by the hook registered first
    assert torch.equal(y[:, [0, 3, 4, 5]], torch.zeros_like(y[:, [0, 3, 4, 5]]))
    assert y[:, [1, 2, 6, 7]].abs().sum() > 0


def test_training_cut_short_mid_block_warns_and_leaves_a_plain_network(tmp_path):
    cb = SensitivityPruner(compression_rate=0.5, epochs_per_block=2, vote_window=2)
    with pytest.warns(UserWarning, match=r"training stopped after 1 of 2 blocks"):
        module = fit(tmp_path, cb, max_epochs=5, max_steps=20)  # 8 steps per epoch: stops in block 2
    assert cb.block == 1 and hooks(module) == 0
    assert module.model.stem[0].out_channels == 4  # block 1 (the stem's residual group) was pruned
    assert module.model.blocks[0][0].out_channels == 8  # block 2 was not
