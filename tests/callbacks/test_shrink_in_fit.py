"""A physical shrink in the middle of training carries the optimizer and scheduler state over."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import ChannelGraph
from lightning_prune.callbacks.base import PruningCallback
from tests.helpers.modules import TinyModule, trainer


class ShrinkAfterFirstEpoch(PruningCallback):
    structured = True

    def __init__(self):
        super().__init__()
        self.checked = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch != 0:
            return
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        before = {
            names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in opt.state.items()
        }
        lr_before = opt.param_groups[0]["lr"]
        sched_before = trainer.lr_scheduler_configs[0].scheduler.state_dict()
        graph = ChannelGraph(pl_module, pl_module.example_input_array)
        plan = {"model.stem.0": [0, 3], "model.blocks.0.0": [1]}
        removals = self.shrink_in_fit(trainer, pl_module, graph, plan)

        opt = trainer.optimizers[0]
        params = dict(pl_module.named_parameters())
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params.values()}
        assert opt.param_groups[0]["lr"] == lr_before
        assert trainer.lr_scheduler_configs[0].scheduler.state_dict() == sched_before
        for name, state in before.items():  # every kept channel's state equals its value before
            new = opt.state[params[name]]
            assert new.keys() == state.keys()
            for key, value in state.items():
                expected = value
                if torch.is_tensor(value) and value.dim() > 0:
                    for r in removals:
                        if r.param == name:
                            expected = r.apply(expected)
                    assert new[key].shape == params[name].shape
                assert torch.equal(torch.as_tensor(new[key]), torch.as_tensor(expected)), (name, key)
        # independently of the replay: stem channels 0 and 3 are gone, the rest kept in order
        keep = torch.tensor([1, 2, 4, 5, 6, 7])
        old_stem = before["model.stem.0.weight"]
        new_stem = opt.state[params["model.stem.0.weight"]]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in old_stem:
                assert torch.equal(new_stem[key], old_stem[key][keep])
                assert old_stem[key].abs().sum() > 0
        self.checked = {"params": len(before), "removed_from_stem": params["model.stem.0.weight"].shape[0]}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_state_of_kept_channels_survives_a_shrink(tmp_path, optimizer):
    pl.seed_everything(0)
    module = TinyModule(arch="resnet", optimizer=optimizer, lr=0.01)
    cb = ShrinkAfterFirstEpoch()
    steps = []

    class Steps(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            steps.append(trainer.global_step)

    trainer(tmp_path, [cb, Steps()], max_epochs=3).fit(module)
    assert cb.checked == {"params": 22, "removed_from_stem": 6}
    assert steps == [4, 8, 12]  # training went on, one step per batch
    assert module.model.stem[0].out_channels == 6
    if optimizer == "adam":
        opt = module.trainer.optimizers[0]
        step = next(iter(opt.state.values()))["step"]
        assert float(step) == 12  # Adam's step counter continued across the shrink


def test_free_parameters_in_a_pruned_group_are_named_in_the_removals_and_their_optimizer_state_cut(tmp_path):
    """LLaMA's RMSNorm scales are free parameters of the hidden-size group: the engine replaces their
    objects when it cuts them, and the surgery must still report them (Adam's moments follow)."""
    pytest.importorskip("transformers")
    from lightning_prune import SNAPit
    from tests.callbacks.test_tied import CausalLM

    pl.seed_everything(0)
    module = CausalLM("llama")
    norms = {n for n, _ in module.named_parameters() if n.endswith("norm.weight")}
    cut = []

    class Record(pl.Callback):
        def on_shrink(self, removals):
            cut.extend(r.param for r in removals)

    fit = trainer(
        tmp_path,
        [SNAPit(limit=0.5, when="during", steps=1, prune_delay=1, prune_freq=1), Record()],
        max_epochs=4,
        limit_train_batches=2,
    )
    fit.fit(module)
    hidden = module.model.model.norm.weight.shape[0]
    assert hidden < 32 and norms <= set(cut)  # the hidden size was cut, and every scale with it
    opt = fit.optimizers[0]
    for p in module.parameters():
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.dim():
                assert value.shape == p.shape
