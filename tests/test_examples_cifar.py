"""The CIFAR/Imagenette data modules and ImageClassifier, on tiny fake data sets laid out like the real ones.

Nothing is downloaded: the fixtures write a handful of random images in the exact formats torchvision
reads (CIFAR's pickled batches, Imagenette's JPEG folders).
"""

from __future__ import annotations

import doctest
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_prune.examples.cifar as cifar_module
import lightning_prune.examples.classifier as classifier_module
import lightning_prune.examples.imagenette as imagenette_module
from lightning_prune import PruningError, load_pruned_checkpoint, shrink
from lightning_prune.callbacks.shrink import save_shrunk
from lightning_prune.examples.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, CIFAR100DataModule
from lightning_prune.examples.classifier import ImageClassifier
from lightning_prune.examples.imagenette import ImagenetteDataModule
from tests.helpers.fake_data import TEST_IMAGES, TRAIN_PER_BATCH
from tests.helpers.nets import kill_channels


def _cifar10(root: Path, **kwargs) -> CIFAR10DataModule:
    kwargs = {"batch_size": 4, "num_workers": 0, "pin_memory": False, "download": False, **kwargs}
    return CIFAR10DataModule(root=root, **kwargs)


def test_doctests():
    for module in (cifar_module, imagenette_module, classifier_module):
        result = doctest.testmod(module)
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


# -- CIFAR --------------------------------------------------------------------------------------------


def test_cifar10_batches_are_normalized_tensors(fake_root, no_md5):
    dm = _cifar10(fake_root)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.long
    # test images are not augmented: exactly (pixel / 255 - mean) / std, per channel
    raw = dm.test_set.data[0]  # HWC uint8
    expected = (torch.from_numpy(raw).permute(2, 0, 1) / 255 - torch.tensor(CIFAR10_MEAN)[:, None, None]) / (
        torch.tensor(CIFAR10_STD)[:, None, None]
    )
    image, label = dm.test_set[0]
    torch.testing.assert_close(image, expected)
    assert label == 0


def test_cifar10_val_fraction_zero_validates_on_the_test_set(fake_root, no_md5):
    dm = _cifar10(fake_root)
    dm.setup()
    assert len(dm.train_set) == 5 * TRAIN_PER_BATCH
    assert dm.val_set is dm.test_set and len(dm.test_set) == TEST_IMAGES
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert labels.tolist() == list(range(TEST_IMAGES))
    assert torch.equal(torch.cat([y for _, y in dm.test_dataloader()]), labels)


def test_cifar10_val_fraction_holds_out_a_seeded_split_without_augmentation(fake_root, no_md5):
    dm = _cifar10(fake_root, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (15, 5)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert dm.train_set.dataset.transform.transforms[0].__class__.__name__ == "RandomCrop"
    assert dm.val_set.dataset.transform.transforms[0].__class__.__name__ == "ToTensor"
    # the held-out images come out the same every time (no augmentation), the split follows the seed
    first = torch.stack([dm.val_set[i][0] for i in range(5)])
    assert torch.equal(first, torch.stack([dm.val_set[i][0] for i in range(5)]))
    again = _cifar10(fake_root, val_fraction=0.25)
    again.setup()
    other = _cifar10(fake_root, val_fraction=0.25, seed=1)
    other.setup()
    assert again.val_set.indices == dm.val_set.indices
    assert other.val_set.indices != dm.val_set.indices
    assert len(dm.test_set) == TEST_IMAGES


def test_cifar10_augment_false_serves_plain_training_images(fake_root, no_md5):
    dm = _cifar10(fake_root, augment=False)
    dm.setup()
    assert torch.equal(dm.train_set[3][0], dm.train_set[3][0])


def test_cifar100(fake_root, no_md5):
    dm = CIFAR100DataModule(root=fake_root, batch_size=8, num_workers=0, pin_memory=False, download=False)
    dm.setup()
    assert dm.num_classes == 100
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long and int(y.max()) < 100
    assert len(dm.train_set) == 20 and len(dm.test_set) == TEST_IMAGES


def test_prepare_data_with_download_false_reads_nothing(tmp_path):
    _cifar10(tmp_path / "nowhere").prepare_data()  # no download, no error: setup reports missing data


def test_missing_data_gives_a_clear_error(tmp_path):
    dm = _cifar10(tmp_path / "nowhere")
    with pytest.raises(
        PruningError, match=r"CIFAR-10 is not in .*nowhere.cifar-10-batches-py.*download=True"
    ):
        dm.setup()
    dm = CIFAR100DataModule(root=tmp_path, download=False)
    with pytest.raises(PruningError, match=r"CIFAR-100 is not in .*cifar-100-python"):
        dm.setup()
    dm = ImagenetteDataModule(root=tmp_path, size="320px", download=False)
    with pytest.raises(PruningError, match=r"Imagenette train images are not in .*imagenette2-320.train"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`CIFAR10DataModule\(batch_size=0\)` is invalid: `batch_size` must be >= 1"),
        ({"val_fraction": 1.0}, r"`CIFAR10DataModule\(val_fraction=1.0\)` is invalid: .* in \[0, 1\)"),
        ({"val_fraction": "0.1"}, r"`val_fraction` must be a float in \[0, 1\); got str"),
        ({"num_workers": -1}, r"`num_workers` must be >= 0"),
        ({"pin_memory": 1}, r"`CIFAR10DataModule\(pin_memory=1\)` is invalid: `pin_memory` must be a bool"),
        ({"download": "yes"}, r"`download` must be a bool"),
        ({"augment": None}, r"`augment` must be a bool"),
        ({"seed": -1}, r"`seed` must be >= 0"),
        ({"root": 3}, r"`root` must be a path"),
    ],
)
def test_cifar_argument_errors(kwargs, match):
    with pytest.raises(PruningError, match=match):
        CIFAR10DataModule(**kwargs)


# -- Imagenette -----------------------------------------------------------------------------------------


def test_imagenette_batches(fake_root):
    dm = ImagenetteDataModule(root=fake_root, image_size=48, batch_size=5, num_workers=0, pin_memory=False)
    dm.prepare_data()  # the folder exists: torchvision downloads nothing
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.long
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, 48, 48)
    assert y.tolist() == [0, 1, 2, 3, 4]  # one image per class, classes in WordNet-ID order
    # normalized with ImageNet's statistics: random pixels average to about (0.5 - mean) / std
    assert abs(x.mean().item() - 0.2) < 0.3


def test_imagenette_defaults():
    assert ImagenetteDataModule().image_size == 160
    assert ImagenetteDataModule(size="320px").image_size == 224
    assert ImagenetteDataModule(size="full").image_size == 224
    assert ImagenetteDataModule(size="full", image_size=288).eval_transform.transforms[1].size == (288, 288)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": "160"}, r"`ImagenetteDataModule\(size='160'\)` is invalid: `size` must be one of '160px'"),
        ({"image_size": 0}, r"`image_size` must be >= 1"),
        ({"batch_size": 1.5}, r"`batch_size` must be an int >= 1; got float"),
        ({"pin_memory": "no"}, r"`pin_memory` must be a bool"),
    ],
)
def test_imagenette_argument_errors(kwargs, match):
    with pytest.raises(PruningError, match=match):
        ImagenetteDataModule(**kwargs)


# -- ImageClassifier -------------------------------------------------------------------------------------

TINY = {"model": "cifar_vgg11_bn", "model_kwargs": {"width": 0.125}}


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_fit_and_test_on_fake_cifar(fake_root, no_md5):
    module = ImageClassifier(**TINY, label_smoothing=0.1)
    dm = _cifar10(fake_root)
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert {"val/acc", "val/acc_top5", "val/loss"} <= set(trainer.callback_metrics)
    results = trainer.test(module, dm, verbose=False)[0]
    assert 0 <= results["test/acc"] <= results["test/acc_top5"] <= 1


def test_fit_on_fake_cifar100_with_adamw_and_step(fake_root, no_md5):
    module = ImageClassifier(
        "cifar_resnet56",
        num_classes=100,
        model_kwargs={"width": 0.25},
        optimizer="adamw",
        lr=1e-3,
        scheduler="step",
    )
    dm = CIFAR100DataModule(root=fake_root, batch_size=4, num_workers=0, pin_memory=False, download=False)
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, dm)
    assert module.model.fc.out_features == 100
    assert torch.isfinite(trainer.callback_metrics["val/acc_top5"])


def test_top5_only_with_five_classes_or_more():
    assert ImageClassifier(**TINY, num_classes=4).val_acc_top5 is None
    assert ImageClassifier(**TINY, num_classes=5).val_acc_top5 is not None


@pytest.mark.parametrize(
    ("kwargs", "optimizer", "scheduler", "milestones"),
    [
        ({}, torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR, None),
        ({"optimizer": "adam"}, torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR, None),
        ({"scheduler": "step"}, torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR, {80: 1, 120: 1}),
        ({"scheduler": "step", "milestones": [0.25], "gamma": 0.2}, torch.optim.SGD, None, {40: 1}),
        ({"optimizer": "adamw", "scheduler": "none"}, torch.optim.AdamW, None, None),
    ],
)
def test_configure_optimizers(kwargs, optimizer, scheduler, milestones):
    module = ImageClassifier(**TINY, **kwargs)
    module.trainer = _trainer(max_epochs=160)
    config = module.configure_optimizers()
    opt = config["optimizer"] if isinstance(config, dict) else config
    assert type(opt) is optimizer
    assert opt.param_groups[0]["weight_decay"] == 5e-4
    if kwargs.get("scheduler") == "none":
        assert not isinstance(config, dict)
        return
    sched = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    if scheduler is not None:
        assert type(sched) is scheduler
    if milestones is not None:
        assert dict(sched.milestones) == milestones
        assert sched.gamma == kwargs.get("gamma", 0.1)
    else:
        assert sched.T_max == 160


def test_sgd_options_reach_the_optimizer():
    module = ImageClassifier(
        **TINY, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-4, scheduler="none"
    )
    module.trainer = _trainer(max_epochs=2)
    group = module.configure_optimizers().param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.05,
        0.8,
        True,
        1e-4,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"model": "cifar_resnet_18"},
            r"`ImageClassifier\(model='cifar_resnet_18'\)` is invalid: unknown model .*"
            r"Did you mean 'cifar_resnet18'",
        ),
        ({"model": "torchvision.resnet19"}, r"Did you mean 'torchvision.resnet18'"),
        (
            {"model_kwargs": {"depth": 3}},
            r"model_kwargs=\{'depth': 3\}\)` is invalid: .*takes no argument 'depth'",
        ),
        ({"model_kwargs": [1]}, r"`model_kwargs` must be a dict"),
        ({"num_classes": 0}, r"`ImageClassifier\(num_classes=0\)` is invalid: `num_classes` must be >= 1"),
        ({"optimizer": "adan"}, r"`optimizer` must be one of 'sgd', 'adam', 'adamw'\. Did you mean 'adam'"),
        ({"lr": 0}, r"`ImageClassifier\(lr=0\)` is invalid: `lr` must be > 0"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0.0, 1.0\)"),
        (
            {"nesterov": True, "optimizer": "adam"},
            r"Nesterov momentum needs optimizer='sgd' and momentum > 0",
        ),
        ({"nesterov": True, "momentum": 0.0}, r"Nesterov momentum needs"),
        ({"weight_decay": -1e-4}, r"`weight_decay` must be >= 0"),
        (
            {"scheduler": "cos"},
            r"`scheduler` must be one of 'cosine', 'step', 'none'\. Did you mean 'cosine'",
        ),
        ({"milestones": (0.75, 0.5)}, r"`milestones` must be a non-empty, increasing sequence"),
        ({"milestones": (80, 120)}, r"each in \(0, 1\)"),
        ({"gamma": 2.0}, r"`gamma` must be in \(0, 1\]"),
        ({"label_smoothing": 1.0}, r"`label_smoothing` must be in \[0.0, 1.0\)"),
        ({"init_from": 3}, r"`init_from` must be a path"),
        (
            {"init_from": "missing.pt"},
            r"`ImageClassifier\(init_from='missing.pt'\)` is invalid: no such file",
        ),
        ({"input_size": (32, 32)}, r"`input_size` must be \(channels, height, width\)"),
    ],
)
def test_classifier_argument_errors(kwargs, match):
    with pytest.raises(PruningError, match=match):
        ImageClassifier(**{**TINY, **kwargs})


def test_torchvision_model_by_name():
    module = ImageClassifier("torchvision.resnet18", num_classes=10, input_size=(3, 64, 64))
    assert module.example_input_array.shape == (2, 3, 64, 64)
    assert module(module.example_input_array).shape == (2, 10)


def _shrunk_checkpoint(path: Path, **kwargs) -> ImageClassifier:
    """Zero 30% of the channels of every prunable group, shrink, save as ShrinkOnFitEnd does."""
    torch.manual_seed(0)
    module = ImageClassifier(**TINY, **kwargs)
    kill_channels(module, module.example_input_array, 0.3, seed=0)
    shrink(module, module.example_input_array)
    save_shrunk(module, path)
    return module.eval()


def test_init_from_a_shrunk_checkpoint(tmp_path):
    path = tmp_path / "shrunk.pt"
    shrunk = _shrunk_checkpoint(path)
    dense = ImageClassifier(**TINY)
    module = ImageClassifier(**TINY, init_from=str(path))
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in dense.parameters())
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    assert shapes == {k: v.shape for k, v in shrunk.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), shrunk(x))
    assert module.hparams.init_from == str(path)


def test_init_from_then_fine_tune(tmp_path, fake_root, no_md5):
    path = tmp_path / "shrunk.pt"
    _shrunk_checkpoint(path)
    module = ImageClassifier(**TINY, init_from=path)  # a Path is recorded as a string
    assert module.hparams.init_from == str(path)
    widths = [m.out_channels for m in module.model.features if isinstance(m, torch.nn.Conv2d)]
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, _cifar10(fake_root))
    # the optimizer was built for the small network, which kept its shapes through training
    assert [m.out_channels for m in module.model.features if isinstance(m, torch.nn.Conv2d)] == widths
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_init_from_rejects_a_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "shrunk.pt"
    _shrunk_checkpoint(path)
    with pytest.raises(
        PruningError, match=r"written with model='cifar_vgg11_bn', but this module has model="
    ):
        ImageClassifier("cifar_vgg16_bn", model_kwargs={"width": 0.125}, init_from=path)
    with pytest.raises(
        PruningError, match=r"written with num_classes=10, but this module has num_classes=100"
    ):
        ImageClassifier(**{**TINY, "num_classes": 100}, init_from=path)  # 10 logits would load into 100
    hyperless = torch.load(path, weights_only=True)
    del hyperless["hyper_parameters"]  # a plain state dict: the shapes alone must fit
    torch.save(hyperless, tmp_path / "bare.pt")
    with pytest.raises(PruningError, match=r"does not fit model='cifar_vgg16_bn'"):
        ImageClassifier("cifar_vgg16_bn", model_kwargs={"width": 0.125}, init_from=tmp_path / "bare.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(PruningError, match=r"holds no 'state_dict' entry"):
        ImageClassifier(**TINY, init_from=tmp_path / "other.pt")


def test_load_pruned_checkpoint_round_trip(tmp_path):
    path = tmp_path / "shrunk.pt"
    shrunk = _shrunk_checkpoint(path, label_smoothing=0.1, scheduler="step", milestones=[0.3, 0.6])
    loaded = load_pruned_checkpoint(ImageClassifier, path)
    assert loaded.hparams.model == "cifar_vgg11_bn" and loaded.hparams.milestones == (0.3, 0.6)
    assert loaded.hparams.label_smoothing == 0.1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), shrunk(x))


def test_load_pruned_checkpoint_of_a_fine_tuned_module(tmp_path):
    first = tmp_path / "stage2.pt"
    _shrunk_checkpoint(first)
    module = ImageClassifier(**TINY, init_from=first).eval()
    final = tmp_path / "stage3.pt"
    save_shrunk(module, final)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(load_pruned_checkpoint(ImageClassifier, final)(x), expected)
    first.unlink()
    with pytest.raises(PruningError, match=r"no such file.*init_from=None"):
        load_pruned_checkpoint(ImageClassifier, final)
    with torch.no_grad():
        torch.testing.assert_close(
            load_pruned_checkpoint(ImageClassifier, final, init_from=None)(x), expected
        )
