"""MNIST: the data module and the two networks of the SNIP paper's MNIST table.

SNIP (Lee, Ajanthan, Torr, ICLR 2019, https://arxiv.org/abs/1810.02340) reports LeNet-300-100 and
LeNet-5-Caffe on MNIST. This module provides both networks, initialised as the paper found best
(variance scaling: He / Kaiming normal with fan-in), a LightningModule that trains them with the paper's
optimizer (SGD, momentum 0.9, weight decay 5e-4, learning rate 0.1, batch 100), and a data module that
loads the whole of MNIST once into memory as normalized float tensors, which keeps a CPU epoch short.

The data comes through torchvision (``pip install lightning-prune[examples]``): with ``download=False``
it is read from ``<root>/MNIST/raw`` (the four uncompressed idx files).

Examples:
    >>> model = MNISTClassifier("lenet5caffe")
    >>> model(model.example_input_array).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in LeNet300100().parameters())
    266610
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.errors import PruningError
from lightning_prune.examples.digits import _check_float, _check_int, schedule_length
from lightning_prune.models.mnist import LeNet5Caffe, LeNet300100

__all__ = ["ARCHITECTURES", "LeNet5Caffe", "LeNet300100", "MNISTClassifier", "MNISTDataModule"]

NUM_CLASSES = 10
"""Digits 0–9."""

IMAGE_SIZE = 28
"""MNIST images are ``IMAGE_SIZE × IMAGE_SIZE`` pixels, one channel."""

MEAN, STD = 0.1307, 0.3081
"""The usual normalization of MNIST pixels scaled to [0, 1] (mean and std of the training images)."""

TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
"""Images in the MNIST training and test sets."""


class MNISTDataModule(LightningDataModule):
    """MNIST held in memory: a seeded train/validation split of the 60k training images, and the 10k test set.

    :meth:`setup` reads the raw files once with torchvision and keeps every split as float tensors of
    shape ``(N, 1, 28, 28)``: pixels scaled to [0, 1], then normalized with mean 0.1307 and standard
    deviation 0.3081. Labels are ``torch.long`` in 0–9. The loaders serve ``TensorDataset`` batches from
    memory (no per-image transform), so ``num_workers=0`` is the fastest choice on a CPU.

    ``round(60000 · val_fraction)`` training images are held out for validation (6,000 with the default,
    as in the SNIP paper), chosen by a random permutation seeded with ``seed``;
    :meth:`test_dataloader` serves the 10,000 test images.

    Args:
        root: Folder containing ``MNIST/raw`` (the folder torchvision downloads into).
        batch_size: Samples per batch (``>= 1``); the paper used 100.
        val_fraction: Fraction of the training images held out for validation, in (0, 1).
        download: Download the data into ``root`` in :meth:`prepare_data` if it is missing. With
            ``False``, the raw files must already be there.
        seed: Seed of the train/validation split (the training order is shuffled by the trainer's seed).
        num_workers: Data-loader worker processes (``>= 0``).

    Raises:
        PruningError: If an argument is out of range (here), or from :meth:`setup` if
            ``download=False`` and the raw files are missing.
        ModuleNotFoundError: From :meth:`prepare_data` or :meth:`setup` if torchvision is not installed.

    Examples:
        >>> dm = MNISTDataModule(root="data", batch_size=100)
        >>> dm.batch_size, dm.val_fraction
        (100, 0.1)
    """

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 100,
        val_fraction: float = 0.1,
        download: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = "MNISTDataModule"
        if not isinstance(root, (str, os.PathLike)):
            raise PruningError(
                f"`{owner}(root={root!r})` is invalid: `root` must be a path (str or os.PathLike) to the "
                f"folder containing MNIST/raw; got {type(root).__name__}."
            )
        _check_int(owner, "batch_size", batch_size, 1)
        _check_int(owner, "num_workers", num_workers, 0)
        _check_int(owner, "seed", seed, 0)
        if not isinstance(download, bool):
            raise PruningError(
                f"`{owner}(download={download!r})` is invalid: `download` must be a bool; "
                f"got {type(download).__name__}."
            )
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise PruningError(
                f"`{owner}(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be a float in "
                f"(0, 1); got {type(val_fraction).__name__}."
            )
        if not 0 < val_fraction < 1:
            raise PruningError(
                f"`{owner}(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be in (0, 1); "
                f"got {val_fraction!r}."
            )
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.download = download
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Download MNIST into ``root`` if ``download=True`` and it is not there yet."""
        if self.download:
            datasets = _torchvision_datasets()
            for train in (True, False):
                datasets.MNIST(self.root, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Read the raw files, split and normalize them (once; later calls do nothing).

        Raises:
            PruningError: If the raw files are not under ``<root>/MNIST/raw``.
            ModuleNotFoundError: If torchvision is not installed.
        """
        if self.train_set is not None:
            return
        train_x, train_y = _read_mnist(self.root, train=True)
        test_x, test_y = _read_mnist(self.root, train=False)
        n_val = max(1, min(len(train_y) - 1, round(len(train_y) * self.val_fraction)))
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(train_x[train_idx], train_y[train_idx])
        self.val_set = TensorDataset(train_x[val_idx], train_y[val_idx])
        self.test_set = TensorDataset(test_x, test_y)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split (the last, smaller batch is kept)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the held-out validation split, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the 10,000 test images, in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test images (images and labels; the model predicts from the images)."""
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: TensorDataset | None, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("`MNISTDataModule` has no data yet: call `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


ARCHITECTURES: dict[str, type[nn.Module]] = {"lenet300100": LeNet300100, "lenet5caffe": LeNet5Caffe}
"""The networks :class:`MNISTClassifier` can build, by ``arch`` name."""

SCHEDULES = ("cosine", "step", "constant")
"""Learning-rate schedules of :class:`MNISTClassifier`."""


class MNISTClassifier(LightningModule):
    """LeNet-300-100 or LeNet-5-Caffe on MNIST, trained as in the SNIP paper but for a chosen budget.

    ``self.model`` is the network (:class:`LeNet300100` or :class:`LeNet5Caffe`), so its layers are
    ``model.1``, ``model.3``, ... in ``named_modules()``. Training minimises cross entropy with SGD
    (momentum, weight decay on every parameter) and one of these learning-rate schedules over the run:

    - ``"cosine"`` (default): decays from ``lr`` to zero on a cosine over ``trainer.max_epochs``, stepped
      once per epoch;
    - ``"step"``: multiplies the rate by 0.1 after 50% and again after 75% of ``trainer.max_epochs``
      (a shortened version of the paper's step decay);
    - ``"constant"``: keeps ``lr``.

    When ``max_epochs`` is unset (``-1``, a run by steps), ``"cosine"`` and ``"step"`` are laid out over
    the optimizer steps the trainer expects instead, stepped every batch.

    Logged: ``train/loss``; ``val/loss`` and ``val/acc``; ``test/loss`` and ``test/acc`` (accuracy is the
    fraction of images classified correctly; the paper's error is ``1 - acc``).

    Args:
        arch: ``"lenet300100"`` or ``"lenet5caffe"``.
        lr: Peak learning rate of SGD (``> 0``); the paper used 0.1.
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 weight decay (``>= 0``).
        schedule: ``"cosine"``, ``"step"`` or ``"constant"``.

    Raises:
        PruningError: If an argument is out of range or an unknown name (with the closest match).

    Examples:
        >>> model = MNISTClassifier("lenet300100")
        >>> model(model.example_input_array).shape
        torch.Size([2, 10])
        >>> [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        ['model.1', 'model.3', 'model.5']
    """

    def __init__(
        self,
        arch: str = "lenet300100",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "cosine",
    ) -> None:
        super().__init__()
        owner = "MNISTClassifier"
        _check_choice(owner, "arch", arch, tuple(ARCHITECTURES))
        _check_float(owner, "lr", lr, low=0.0, low_open=True)
        _check_float(owner, "momentum", momentum, low=0.0, high=1.0)
        _check_float(owner, "weight_decay", weight_decay, low=0.0)
        _check_choice(owner, "schedule", schedule, SCHEDULES)
        self.save_hyperparameters()
        self.model = ARCHITECTURES[arch]()
        self.example_input_array = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, 10)``, for images of shape ``(N, 1, 28, 28)``."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy loss of one batch, logged as ``train/loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``val/loss`` and ``val/acc`` (accumulated over the epoch)."""
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``test/loss`` and ``test/acc`` (accumulated over the epoch)."""
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted digits, shape ``(N,)``, for a batch of images or of ``(images, labels)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        """SGD with momentum and weight decay, and the learning-rate schedule chosen by ``schedule``."""
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        if self.hparams.schedule == "constant":
            return optimizer
        length, interval = schedule_length(self.trainer)
        if self.hparams.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length)
        else:
            milestones = sorted({max(1, round(length * 0.5)), max(1, round(length * 0.75))})
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, accuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), prog_bar=True)
        accuracy(logits, y)
        self.log(f"{split}/acc", accuracy, prog_bar=True)


def _torchvision_datasets():
    try:
        from torchvision import datasets
    except ImportError as err:
        raise ModuleNotFoundError(
            "The MNIST example reads the data with torchvision: pip install lightning-prune[examples]"
        ) from err
    return datasets


def _read_mnist(root: str, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One MNIST split as normalized float images, shape (N, 1, 28, 28), and long labels."""
    datasets = _torchvision_datasets()
    try:
        data = datasets.MNIST(root, train=train, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
        raw = Path(root) / "MNIST" / "raw"
        split = "train" if train else "t10k"
        raise PruningError(
            f"`MNISTDataModule(root={root!r})`: the MNIST {split} files are not in {raw} "
            f"({split}-images-idx3-ubyte and {split}-labels-idx1-ubyte are needed). Pass `download=True` "
            f"or point `root` at the folder that contains MNIST/raw. ({err})"
        ) from err
    images = (data.data.to(torch.float32) / 255.0 - MEAN) / STD
    return images.unsqueeze(1).contiguous(), data.targets.to(torch.long)


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if isinstance(value, str) and value in allowed:
        return
    options = ", ".join(repr(a) for a in allowed)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PruningError(
        f"`{owner}({name}={value!r})` is invalid: `{name}` must be one of {options}; got {value!r}.{hint}"
    )
