import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import PruningError, SNIPCallback
from tests.helpers.modules import TinyModule, synthetic_data, trainer


def zero_fraction(module, names):
    params = dict(module.named_parameters())
    total = sum(params[n].numel() for n in names)
    return sum(int((params[n] == 0).sum()) for n in names) / total


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 1.0}, r"`SNIPCallback\(limit=1.0\)` is invalid: `limit` must be in \[0, 1\); got 1.0"),
        ({"limit": -0.1}, r"`limit` must be in \[0, 1\)"),
        ({"limit": "0.5"}, r"got '0.5'"),
        ({"num_batches": 0}, r"`num_batches` must be an int >= 1; got 0"),
        ({"include": "model.*"}, r"`include` must be a list of glob patterns"),
        ({"structured": "yes"}, r"`structured` must be a bool"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        SNIPCallback(**kwargs)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_unstructured_masks_hold_exactly_through_training(tmp_path, optimizer):
    pl.seed_everything(0)
    module = TinyModule(optimizer=optimizer, lr=0.01)
    snip = SNIPCallback(limit=0.8)
    spy = MaskSpy(snip)
    trainer(tmp_path, [snip, spy], max_epochs=3, gradient_clip_val=1.0).fit(module)
    assert spy.masked_grad_sum == 0.0  # clipping never saw the pruned weights' gradients
    weights = [n for n in snip.masks]
    assert len(weights) == 4  # every Conv/Linear weight, the classifier included
    total = sum(m.numel() for m in snip.masks.values())
    kept = sum(int(m.sum()) for m in snip.masks.values())
    assert kept == round(total * 0.2)  # one global ranking: exactly limit
    params = dict(module.named_parameters())
    for name, mask in snip.masks.items():
        assert torch.all(params[name][~mask] == 0), name
        assert torch.count_nonzero(params[name][mask]) > 0.9 * int(mask.sum())  # the rest trained
    assert snip.report.weight_sparsity == pytest.approx(0.8, abs=1 / total)


class MaskSpy(pl.Callback):
    """Placed after the pruning callback: sees the gradients that clipping and the optimizer will see."""

    def __init__(self, snip):
        self.snip, self.masked_grad_sum, self.steps = snip, 0.0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        for name, mask in self.snip.masks.items():
            if params[name].grad is not None:
                self.masked_grad_sum += float(params[name].grad[~mask].abs().sum())
        self.steps += 1


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16-mixed"},
        {"precision": "bf16-true"},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
        pytest.param(
            {"precision": "16-mixed", "accelerator": "cuda"},
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP needs CUDA"),
        ),
    ],
    ids=["bf16-mixed", "bf16-true", "accumulate+clip", "16-mixed-cuda"],
)
def test_masked_gradients_and_optimizer_state_stay_zero(tmp_path, options):
    pl.seed_everything(0)
    module = TinyModule()
    snip = SNIPCallback(limit=0.5)
    spy = MaskSpy(snip)
    trainer(tmp_path, [snip, spy], max_epochs=2, **options).fit(module)
    assert spy.steps > 0 and spy.masked_grad_sum == 0.0
    params = dict(module.named_parameters())
    opt = module.trainer.optimizers[0]
    for name, mask in snip.masks.items():
        mask = mask.to(params[name].device)
        assert torch.all(params[name][~mask] == 0), name
        assert torch.all(opt.state[params[name]]["momentum_buffer"][~mask] == 0), name


def test_frozen_layers_are_left_alone(tmp_path):
    module = TinyModule()
    module.model.features.requires_grad_(False)
    snip = SNIPCallback(limit=0.5)
    with pytest.warns(UserWarning, match="leaving frozen layers"):
        trainer(tmp_path, [snip], max_steps=1).fit(module)
    assert list(snip.masks) == ["model.classifier.1.weight", "model.classifier.3.weight"]
    assert torch.count_nonzero(module.model.features[0].weight) == module.model.features[0].weight.numel()


def test_dict_batches_prune_without_example_inputs(tmp_path):
    class DictBatches(TinyModule):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

        def train_dataloader(self):
            data = [{"x": x, "y": y} for x, y in synthetic_data()]
            return DataLoader(data, batch_size=16)

        val_dataloader = None

    module = DictBatches()
    module.example_input_array = None
    snip = SNIPCallback(limit=0.5)
    trainer(tmp_path, [snip], max_steps=1).fit(module)  # unstructured pruning needs no example inputs
    assert snip.report.weight_sparsity == pytest.approx(0.5, abs=1e-3)
    assert snip.report.macs is None  # masking does not change the dense MAC count: not logged
    assert "prune/macs" not in snip.report.metrics()


def test_scores_are_the_connection_sensitivity(tmp_path):
    """The kept weights are exactly the top |g*w| of the first batch, as computed by hand."""
    pl.seed_everything(0)
    module = TinyModule(n=16, batch_size=16)
    reference = TinyModule(n=16, batch_size=16)
    reference.load_state_dict(module.state_dict())
    x, y = next(iter(reference.train_dataloader()))
    reference.eval()
    nn.functional.cross_entropy(reference(x), y).backward()
    scores = torch.cat(
        [
            (p.grad * p).abs().flatten()
            for n, p in reference.named_parameters()
            if n.endswith("weight") and p.dim() > 1
        ]
    )

    pl.seed_everything(0)  # the same shuffle order for the callback's first batch
    snip = SNIPCallback(limit=0.7)
    trainer(tmp_path, [snip], max_steps=1).fit(module)
    kept = torch.cat([m.flatten() for m in snip.masks.values()])
    threshold = scores.topk(int(kept.sum())).values.min()
    assert torch.all(scores[kept] >= threshold)
    assert torch.all(scores[~kept] <= threshold)


def test_include_and_exclude_select_layers(tmp_path):
    snip = SNIPCallback(limit=0.5, include=["model.features.*"], exclude=["model.features.3"])
    trainer(tmp_path, [snip], max_steps=1).fit(TinyModule())
    assert list(snip.masks) == ["model.features.0.weight"]


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_structured_shrinks_at_fit_start_and_trains_on(tmp_path, arch):
    pl.seed_everything(0)
    module = TinyModule(arch=arch)
    params_before = sum(p.numel() for p in module.parameters())
    snip = SNIPCallback(limit=0.5, structured=True)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen.append(opt_params == {id(p) for p in pl_module.parameters()})

    trainer(tmp_path, [snip, Spy()], max_epochs=2).fit(module)
    assert all(seen) and len(seen) == 8  # the optimizer holds the shrunk parameters from the first step
    assert sum(p.numel() for p in module.parameters()) < params_before
    assert snip.report.node_sparsity >= 0.45
    assert module(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    head = module.model.head if arch == "resnet" else module.model.classifier[3]
    assert head.out_features == 4  # the classifier's outputs are never pruned


def test_metrics_reach_the_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True)], max_steps=1, logger=logger).fit(
        TinyModule()
    )
    text = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("prune/weight_sparsity", "prune/node_sparsity", "prune/params", "prune/macs"):
        assert key in text


def test_pattern_matching_nothing_fails_in_setup_listing_layers(tmp_path):
    t = trainer(tmp_path, [SNIPCallback(include=["features.*"])], max_steps=1)
    with pytest.raises(PruningError, match=r"matches no .*model\.features\.0"):
        t.fit(TinyModule())


class NoneStep(TinyModule):
    def training_step(self, batch, batch_idx):
        return None


class VectorStep(TinyModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class NanStep(TinyModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * float("nan")


@pytest.mark.parametrize(
    ("module_class", "match"),
    [
        (NoneStep, "returned NoneType"),
        (VectorStep, r"loss of shape \(16,\); it must be a scalar"),
        (NanStep, "is nan"),
    ],
)
def test_bad_training_step_is_reported_before_training(tmp_path, module_class, match):
    module = module_class()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(PruningError, match=match):
        trainer(tmp_path, [SNIPCallback()], max_steps=1).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_no_training_dataloader(tmp_path):
    class NoData(TinyModule):
        train_dataloader = None

    module = NoData()
    with pytest.raises(PruningError, match="SNIPCallback needs a training dataloader"):
        trainer(tmp_path, [SNIPCallback()], max_steps=1).fit(module)


def test_structured_on_a_model_with_nothing_to_prune(tmp_path):
    class Linear(TinyModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))

    with pytest.raises(PruningError, match=r"no channel group .* can be pruned"):
        trainer(tmp_path, [SNIPCallback(structured=True)], max_steps=1).fit(Linear())


def test_example_inputs_fall_back_to_a_training_batch(tmp_path):
    module = TinyModule()
    module.example_input_array = None
    snip = SNIPCallback(limit=0.5, structured=True)
    trainer(tmp_path, [snip], max_steps=1).fit(module)
    assert snip.report.node_sparsity > 0.4


def test_pickles_before_and_after_fit(tmp_path):
    snip = SNIPCallback(limit=0.5)
    assert pickle.loads(pickle.dumps(snip)).limit == 0.5
    trainer(tmp_path, [snip], max_steps=2).fit(TinyModule())
    clone = pickle.loads(pickle.dumps(snip))
    assert clone.masks.keys() == snip.masks.keys()


def test_works_with_dataloaders_passed_to_fit(tmp_path):
    class External(TinyModule):
        train_dataloader = None
        val_dataloader = None

    snip = SNIPCallback(limit=0.5, num_batches=2)
    loader = DataLoader(synthetic_data(), batch_size=8)
    trainer(tmp_path, [snip], max_steps=2).fit(External(), train_dataloaders=loader)
    assert snip.pruned


@pytest.mark.parametrize("structured", [False, True])
def test_resume_from_a_mid_fit_checkpoint(tmp_path, structured):
    pl.seed_everything(0)
    first = TinyModule(arch="resnet")
    snip = SNIPCallback(limit=0.6, structured=structured)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [snip, ckpt], max_epochs=1, enable_checkpointing=True).fit(first)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    state = torch.load(path, weights_only=True)  # tensors and primitives only
    assert state["callbacks"][snip.state_key]["step"] == 1  # the one SNIP step is done

    resumed = TinyModule(arch="resnet")  # a fresh, unpruned instance
    snip2 = SNIPCallback(limit=0.6, structured=structured)
    trainer(tmp_path, [snip2], max_epochs=2).fit(resumed, ckpt_path=path, weights_only=True)
    assert snip2.masks.keys() == snip.masks.keys()
    assert all(torch.equal(snip2.masks[k].cpu(), snip.masks[k].cpu()) for k in snip.masks)
    shapes = {k: v.shape for k, v in first.state_dict().items()}
    assert shapes == {k: v.shape for k, v in resumed.state_dict().items()}
    params = dict(resumed.named_parameters())
    for name, mask in snip2.masks.items():
        assert torch.all(params[name][~mask.to(params[name].device)] == 0)


class NanGradient(TinyModule):
    """A finite loss whose gradient is NaN in the first conv: sqrt(0) has an infinite slope, times 0."""

    def training_step(self, batch, batch_idx):
        x, _ = batch
        feats = self.model.features[0](x)
        poison = (feats - feats.detach()).abs().sqrt().sum() * 0.0
        return super().training_step(batch, batch_idx) + poison


def test_non_finite_scores_name_the_layer(tmp_path):
    with pytest.raises(PruningError, match=r"scores of model\.features\.0\.weight are not finite"):
        trainer(tmp_path, [SNIPCallback()], max_steps=1).fit(NanGradient())
