"""The digits example: scikit-learn's bundled 8×8 digits as a data module, and a small CNN to prune."""

from __future__ import annotations

import doctest
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_prune.examples.digits as digits_module
from lightning_prune import PruningError
from lightning_prune.examples import DigitsClassifier, DigitsDataModule


@pytest.fixture(scope="module")
def data() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


def test_doctest():
    result = doctest.testmod(digits_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_split_sizes_shapes_and_dtypes(data):
    assert len(data.train_set) + len(data.val_set) == 1797
    assert (len(data.train_set), len(data.val_set)) == (1437, 360)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.long
    labels = data.val_set.tensors[1]
    assert labels.min() == 0 and labels.max() == 9
    # stratified: every digit is held out in proportion (the set has ~180 of each)
    assert torch.bincount(labels, minlength=10).min() >= 30


def test_normalized_with_train_statistics(data):
    train_x = data.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 1e-5
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-5)
    # pixels are 0..16 scaled to [0, 1] before normalizing: the blank background maps to -mean/std
    assert 0 < data.mean < 1 and 0 < data.std < 1
    assert data.val_set.tensors[0].min().item() == pytest.approx(-data.mean / data.std, abs=1e-5)


def test_split_is_deterministic_and_follows_the_seed(data):
    again = DigitsDataModule(seed=0)
    again.setup("fit")
    other = DigitsDataModule(seed=1)
    other.setup("fit")
    assert torch.equal(again.val_set.tensors[0], data.val_set.tensors[0])
    assert torch.equal(again.val_set.tensors[1], data.val_set.tensors[1])
    assert not torch.equal(other.val_set.tensors[0], data.val_set.tensors[0])


def test_val_fraction_sets_the_held_out_size():
    dm = DigitsDataModule(val_fraction=0.5)
    dm.setup()
    assert len(dm.val_set) == 899  # ceil(0.5 * 1797), as scikit-learn rounds the test side up
    assert len(dm.train_set) == 898


def test_loaders_train_shuffles_and_evaluation_serves_the_validation_split(data):
    first = torch.cat([y for _, y in data.train_dataloader()])
    second = torch.cat([y for _, y in data.train_dataloader()])
    assert len(first) == 1437 and not torch.equal(first, second)
    val = torch.cat([y for _, y in data.val_dataloader()])
    assert torch.equal(val, data.val_set.tensors[1])
    for loader in (data.test_dataloader(), data.predict_dataloader()):
        assert torch.equal(torch.cat([y for _, y in loader]), val)


def test_setup_runs_once(data):
    val = data.val_set
    data.setup("validate")
    assert data.val_set is val


def test_loader_before_setup_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"call `setup\(\)` first"):
        DigitsDataModule().train_dataloader()


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install lightning-prune\[examples\]"):
        DigitsDataModule().setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`DigitsDataModule\(batch_size=0\)` is invalid: `batch_size` must be >= 1"),
        ({"batch_size": 6.4}, r"`batch_size` must be an int >= 1; got float"),
        ({"num_workers": -1}, r"`num_workers` must be >= 0"),
        ({"seed": True}, r"`seed` must be an int >= 0; got bool"),
        ({"val_fraction": 1.0}, r"`DigitsDataModule\(val_fraction=1.0\)` is invalid: .* in \(0, 1\)"),
        ({"val_fraction": 0}, r"`val_fraction` must be in \(0, 1\); got 0"),
        ({"val_fraction": "0.2"}, r"`val_fraction` must be a float in \(0, 1\); got str"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize("width", [1, 8, 32])
def test_classifier_layout_and_forward(width):
    model = DigitsClassifier(width=width)
    out = model(model.example_input_array)
    assert out.shape == (2, 10)
    layers = dict(model.named_modules())
    assert layers["model.0"].out_channels == width
    assert layers["model.7"].out_channels == 2 * width
    assert layers["model.12"].in_features == 8 * width
    last = model.model[-1]
    assert layers["model.14"] is last
    assert isinstance(last, nn.Linear) and last.out_features == 10


def test_default_classifier_matches_the_documented_architecture():
    model = DigitsClassifier()
    convs = [(m.in_channels, m.out_channels) for m in model.model if isinstance(m, nn.Conv2d)]
    linears = [(m.in_features, m.out_features) for m in model.model if isinstance(m, nn.Linear)]
    assert convs == [(1, 32), (32, 64), (64, 64)]
    assert linears == [(256, 128), (128, 10)]
    assert model.hparams == {"width": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"`DigitsClassifier\(width=0\)` is invalid: `width` must be >= 1"),
        ({"lr": 0.0}, r"`DigitsClassifier\(lr=0.0\)` is invalid: `lr` must be > 0.0"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0.0, 1.0\)"),
        ({"weight_decay": -1e-4}, r"`weight_decay` must be >= 0.0"),
        ({"lr": float("nan")}, r"`lr` must be > 0.0"),
        ({"lr": "fast"}, r"`lr` must be a number > 0.0; got str"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        DigitsClassifier(**kwargs)


def test_fit_validate_test_predict_with_a_real_trainer(data):
    pl.seed_everything(0)
    model = DigitsClassifier(width=8)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    # one cosine period over max_epochs, stepped per epoch
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "epoch" and scheduler.scheduler.T_max == 1

    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    assert set(tested) == {"test/loss", "test/acc"}
    (predicted,) = trainer.predict(model, datamodule=data)
    assert predicted.shape == (64,) and predicted.dtype == torch.long


def test_cosine_schedule_falls_back_to_steps_without_max_epochs(data):
    trainer = pl.Trainer(
        max_epochs=-1,
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(width=4), datamodule=data)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.T_max == 4
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
