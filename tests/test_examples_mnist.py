"""The MNIST example: the SNIP paper's two networks, a classifier module and an in-memory data module.

Unit tests run on a tiny fake MNIST written in the real raw layout (idx files under ``MNIST/raw``); the real
data is only read by the slow test, from ``$LIGHTNING_PRUNE_DATA``.
"""

from __future__ import annotations

import doctest
import math
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import lightning_prune.examples.mnist as mnist_module
from lightning_prune import PruningError, SNIPCallback
from lightning_prune.examples import LeNet5Caffe, LeNet300100, MNISTClassifier, MNISTDataModule
from lightning_prune.examples.mnist import ARCHITECTURES, MEAN, STD

N_TRAIN, N_TEST = 50, 20


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor in MNIST's idx format (big-endian magic 0x08 0x0N, then the dims)."""
    header = struct.pack(">I", 0x0800 + data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A folder with MNIST/raw holding 50 training and 20 test images; image i is filled with value i."""
    root = tmp_path_factory.mktemp("fake_mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    return root


@pytest.fixture(scope="module")
def fake_data(fake_root) -> MNISTDataModule:
    dm = MNISTDataModule(root=fake_root, batch_size=8, download=False)
    dm.setup("fit")
    return dm


def test_doctest():
    result = doctest.testmod(mnist_module)
    assert result.attempted > 0
    assert result.failed == 0


# -- networks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("net", "params"),
    [(LeNet300100, 266_610), (LeNet5Caffe, 431_080)],
)
def test_networks_output_shape_and_parameter_count(net, params):
    model = net()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_lenet300100_layout():
    linears = [
        (n, m.in_features, m.out_features)
        for n, m in LeNet300100().named_modules()
        if isinstance(m, nn.Linear)
    ]
    assert linears == [("1", 784, 300), ("3", 300, 100), ("5", 100, 10)]


def test_lenet5caffe_layout_is_caffes():
    net = LeNet5Caffe()
    convs = [
        (n, m.in_channels, m.out_channels, m.kernel_size)
        for n, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    linears = [(n, m.in_features, m.out_features) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    assert convs == [("0", 1, 20, (5, 5)), ("2", 20, 50, (5, 5))]
    assert linears == [("5", 800, 500), ("7", 500, 10)]
    # Caffe's LeNet: no nonlinearity after the convolutions, one ReLU between the two linear layers
    assert [type(m).__name__ for m in net] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear",
    ]  # fmt: skip


@pytest.mark.parametrize("net", [LeNet300100, LeNet5Caffe])
def test_he_fan_in_initialisation(net):
    torch.manual_seed(0)
    layers = [m for m in net().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        fan_in = layer.weight[0].numel()
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.15)
        assert abs(layer.weight.mean().item()) < 0.3 * math.sqrt(2 / fan_in)
        assert torch.count_nonzero(layer.bias) == 0


# -- data module -------------------------------------------------------------------------------------------
def test_split_sizes_shapes_dtypes_and_normalization(fake_data):
    assert (len(fake_data.train_set), len(fake_data.val_set), len(fake_data.test_set)) == (45, 5, 20)
    x, y = next(iter(fake_data.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.long
    # image i is the constant i/255 before normalization: undo it to recover which images each split holds
    pixels = {
        split: torch.round((ds.tensors[0][:, 0, 0, 0] * STD + MEAN) * 255).long()
        for split, ds in (
            ("train", fake_data.train_set),
            ("val", fake_data.val_set),
            ("test", fake_data.test_set),
        )
    }
    assert sorted(torch.cat([pixels["train"], pixels["val"]]).tolist()) == list(range(N_TRAIN))
    assert pixels["test"].tolist() == list(range(N_TEST))  # the test set is served in order
    assert torch.equal(fake_data.val_set.tensors[1], pixels["val"] % 10)  # labels follow their images
    assert fake_data.test_set.tensors[0][0].max().item() == pytest.approx(-MEAN / STD)


def test_split_follows_the_seed(fake_root, fake_data):
    same = MNISTDataModule(root=fake_root, download=False)
    same.setup()
    other = MNISTDataModule(root=fake_root, download=False, seed=1)
    other.setup()
    assert torch.equal(same.val_set.tensors[0], fake_data.val_set.tensors[0])
    assert not torch.equal(other.val_set.tensors[0], fake_data.val_set.tensors[0])


def test_val_fraction_sets_the_held_out_size(fake_root):
    dm = MNISTDataModule(root=str(fake_root), val_fraction=0.5, download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (25, 25)


def test_loaders_shuffle_only_training_and_setup_runs_once(fake_data):
    first = torch.cat([y for _, y in fake_data.train_dataloader()])
    assert len(first) == 45
    assert not all(
        torch.equal(first, torch.cat([y for _, y in fake_data.train_dataloader()])) for _ in range(3)
    )
    assert torch.equal(torch.cat([y for _, y in fake_data.val_dataloader()]), fake_data.val_set.tensors[1])
    for loader in (fake_data.test_dataloader(), fake_data.predict_dataloader()):
        assert torch.equal(torch.cat([y for _, y in loader]), fake_data.test_set.tensors[1])
    train_set = fake_data.train_set
    fake_data.setup("test")
    assert fake_data.train_set is train_set


def test_prepare_data_without_download_reads_nothing(tmp_path):
    MNISTDataModule(root=tmp_path, download=False).prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_missing_files_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(PruningError, match=r"MNIST train files are not in .*MNIST.raw.* `download=True`"):
        MNISTDataModule(root=tmp_path, download=False).setup()


def test_loader_before_setup_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"call `setup\(\)` first"):
        MNISTDataModule().test_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"root": 3}, r"`MNISTDataModule\(root=3\)` is invalid: `root` must be a path .*; got int"),
        ({"batch_size": 0}, r"`MNISTDataModule\(batch_size=0\)` is invalid: `batch_size` must be >= 1"),
        ({"batch_size": 1.5}, r"`batch_size` must be an int >= 1; got float"),
        ({"num_workers": -1}, r"`num_workers` must be >= 0"),
        ({"seed": -2}, r"`MNISTDataModule\(seed=-2\)` is invalid: `seed` must be >= 0"),
        ({"download": "yes"}, r"`download` must be a bool; got str"),
        ({"val_fraction": 1.0}, r"`MNISTDataModule\(val_fraction=1.0\)` is invalid: .* in \(0, 1\)"),
        ({"val_fraction": 0}, r"`val_fraction` must be in \(0, 1\); got 0"),
        ({"val_fraction": None}, r"`val_fraction` must be a float in \(0, 1\); got NoneType"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        MNISTDataModule(**kwargs)


# -- classifier --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_classifier_builds_each_architecture(arch):
    model = MNISTClassifier(arch)
    assert isinstance(model.model, ARCHITECTURES[arch])
    assert model(model.example_input_array).shape == (2, 10)
    assert model.example_input_array.shape == (2, 1, 28, 28)


def test_classifier_defaults_are_the_papers():
    assert MNISTClassifier().hparams == {
        "arch": "lenet300100",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "cosine",
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "lenet5"}, r"`MNISTClassifier\(arch='lenet5'\)` is invalid: `arch` must be one of "
         r"'lenet300100', 'lenet5caffe'; got 'lenet5'. Did you mean 'lenet5caffe'\?"),
        ({"arch": "LeNet300100"}, r"Did you mean 'lenet300100'\?"),
        ({"arch": None}, r"`arch` must be one of 'lenet300100', 'lenet5caffe'; got None\.$"),
        ({"schedule": "linear"}, r"`schedule` must be one of 'cosine', 'step', 'constant'; got 'linear'"),
        ({"lr": 0}, r"`MNISTClassifier\(lr=0\)` is invalid: `lr` must be > 0.0"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0.0, 1.0\)"),
        ({"weight_decay": -1.0}, r"`weight_decay` must be >= 0.0"),
        ({"lr": "0.1"}, r"`lr` must be a number > 0.0; got str"),
    ],
)  # fmt: skip
def test_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        MNISTClassifier(**kwargs)


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fit_validate_test_predict_with_a_real_trainer(fake_data, arch):
    pl.seed_everything(0, verbose=False)
    model = MNISTClassifier(arch, lr=0.01)
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(model, datamodule=fake_data)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/acc"] <= 1
    (tested,) = trainer.test(model, datamodule=fake_data, verbose=False)
    assert set(tested) == {"test/loss", "test/acc"}
    (predicted, *_) = trainer.predict(model, datamodule=fake_data)
    assert predicted.shape == (8,) and predicted.dtype == torch.long


def test_snip_prunes_the_example_network(fake_data):
    pl.seed_everything(0, verbose=False)
    model = MNISTClassifier("lenet300100")
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[SNIPCallback(0.95)]
    )
    trainer.fit(model, datamodule=fake_data)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.95 * sum(w.numel() for w in weights))


@pytest.mark.parametrize(
    ("schedule", "epochs", "lrs"),
    [
        (
            "cosine",
            4,
            [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 - math.cos(math.pi / 4)) / 2],
        ),
        ("step", 4, [0.1, 0.1, 0.01, 0.001]),
        ("constant", 4, [0.1, 0.1, 0.1, 0.1]),
    ],
)
def test_learning_rate_schedules_over_max_epochs(fake_data, schedule, epochs, lrs):
    class RecordLR(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    record = RecordLR()
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, callbacks=[record])
    trainer.fit(MNISTClassifier(schedule=schedule, lr=0.1), datamodule=fake_data)
    assert record.lrs == pytest.approx(lrs)


def test_schedule_falls_back_to_steps_without_max_epochs(fake_data):
    trainer = quiet_trainer(max_epochs=-1, max_steps=4, limit_val_batches=0)
    trainer.fit(MNISTClassifier(lr=0.01), datamodule=fake_data)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and scheduler.scheduler.T_max == 4
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


# -- the real data -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_mnist_splits_and_one_epoch_of_lenet300100():
    root = os.environ.get("LIGHTNING_PRUNE_DATA")
    if not root:
        pytest.skip("set LIGHTNING_PRUNE_DATA to a folder containing MNIST/raw to run the real-data test")
    dm = MNISTDataModule(root=root, download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54_000, 6_000, 10_000)
    train_x = dm.train_set.tensors[0]
    assert abs(train_x.mean().item()) < 0.01 and train_x.std().item() == pytest.approx(1.0, abs=0.01)
    assert torch.bincount(dm.test_set.tensors[1], minlength=10).min() > 800
    pl.seed_everything(0, verbose=False)
    model = MNISTClassifier("lenet300100")
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    (tested,) = trainer.test(model, datamodule=dm, verbose=False)
    assert tested["test/acc"] > 0.95
