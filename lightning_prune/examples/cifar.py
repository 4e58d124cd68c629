"""CIFAR-10 and CIFAR-100 data modules over torchvision's datasets, with the standard augmentation.

Both serve float tensors of shape ``(3, 32, 32)`` normalized per channel with the published statistics
of the training set, and ``torch.long`` labels. Training images are augmented as in every CIFAR paper the
seed repositories reproduce (random 32×32 crop of the image padded by 4 pixels, random horizontal flip).

The data is downloaded by :meth:`~CIFAR10DataModule.prepare_data` into ``root`` (``download=True``, the
default), or read from there: ``<root>/cifar-10-batches-py`` and ``<root>/cifar-100-python``, the
folders torchvision creates (``pip install lightning-prune[examples]``).

Examples:
    >>> dm = CIFAR10DataModule(root="data", batch_size=256, val_fraction=0.1)
    >>> dm.num_classes, dm.batch_size, dm.val_fraction
    (10, 256, 0.1)
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_prune.errors import PruningError
from lightning_prune.examples.digits import _check_int

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
"""Per-channel mean and standard deviation of the 50,000 CIFAR-10 training images (pixels in [0, 1])."""

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
"""Per-channel mean and standard deviation of the 50,000 CIFAR-100 training images (pixels in [0, 1])."""


class _CIFARDataModule(LightningDataModule):
    """Shared implementation of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`."""

    dataset_class: ClassVar[str]  # the torchvision.datasets class
    folder: ClassVar[str]  # what torchvision extracts into root
    title: ClassVar[str]
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 128,
        val_fraction: float = 0.0,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = True,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(root, (str, os.PathLike)):
            raise PruningError(
                f"`{owner}(root={root!r})` is invalid: `root` must be a path (str or os.PathLike) to the "
                f"folder that contains (or will contain) {self.folder}; got {type(root).__name__}."
            )
        _check_int(owner, "batch_size", batch_size, 1)
        _check_int(owner, "num_workers", num_workers, 0)
        _check_int(owner, "seed", seed, 0)
        for name, value in (("pin_memory", pin_memory), ("download", download), ("augment", augment)):
            if not isinstance(value, bool):
                raise PruningError(
                    f"`{owner}({name}={value!r})` is invalid: `{name}` must be a bool; "
                    f"got {type(value).__name__}."
                )
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise PruningError(
                f"`{owner}(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be a float in "
                f"[0, 1); got {type(val_fraction).__name__}."
            )
        if not 0 <= val_fraction < 1:
            raise PruningError(
                f"`{owner}(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be in [0, 1) "
                "(0 validates on the test set)."
            )
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.download = download
        self.augment = augment
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def train_transform(self) -> Any:
        """Random crop (padding 4) and flip if ``augment``, then to tensor and normalize."""
        transforms = _transforms()
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        return transforms.Compose([*(augment if self.augment else []), *self._to_normalized_tensor()])

    @property
    def eval_transform(self) -> Any:
        """Evaluation transform: to tensor and normalize (no augmentation)."""
        return _transforms().Compose(self._to_normalized_tensor())

    def prepare_data(self) -> None:
        """Download the data set into ``root`` if ``download=True`` and it is not there yet."""
        if self.download:
            dataset = getattr(_datasets(), self.dataset_class)
            for train in (True, False):
                dataset(self.root, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Read the data and build the splits (once; later calls do nothing).

        Raises:
            PruningError: If the data is not under ``root`` (with ``download=False``, or if
                :meth:`prepare_data` was not run).
            ModuleNotFoundError: If torchvision is not installed.
        """
        if self.train_set is not None:
            return
        train = self._read(train=True)
        test = self._read(train=False)
        train.transform = self.train_transform
        test.transform = self.eval_transform
        self.test_set = test
        if self.val_fraction == 0:
            self.train_set, self.val_set = train, test
            return
        # The held-out images are read without augmentation: a shallow copy shares the arrays.
        held_out = copy.copy(train)
        held_out.transform = self.eval_transform
        n = len(train)
        n_val = min(n - 1, max(1, round(n * self.val_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train, order[n_val:])
        self.val_set = Subset(held_out, order[:n_val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented batches of the training split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the held-out split, or of the test set with ``val_fraction=0``, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the 10,000 test images, in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test images (images and labels; the model predicts from the images)."""
        return self._loader(self.test_set, shuffle=False)

    def _to_normalized_tensor(self) -> list[Any]:
        transforms = _transforms()
        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]

    def _read(self, *, train: bool) -> Any:
        dataset = getattr(_datasets(), self.dataset_class)
        try:
            return dataset(self.root, train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. ..."
            where = os.path.join(self.root, self.folder)
            raise PruningError(
                f"`{type(self).__name__}(root={self.root!r}, download={self.download})`: {self.title} is "
                f"not in {where} (or a file there is corrupted). Pass `download=True` (and let "
                f"`prepare_data` run), or point `root` at the folder that contains {self.folder}. ({err})"
            ) from err

    def _loader(self, dataset: Dataset | None, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"`{type(self).__name__}` has no data yet: call `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images, 32×32, 10 classes) over torchvision's ``CIFAR10``.

    Training images are augmented (``augment=True``): a random 32×32 crop of the image zero-padded by 4
    pixels, then a random horizontal flip. Every image is scaled to [0, 1] and normalized per channel with
    the training set's mean (0.4914, 0.4822, 0.4465) and standard deviation (0.2470, 0.2435, 0.2616).
    (Several seed repositories divide by (0.2023, 0.1994, 0.2010) instead, which is not the per-channel
    standard deviation of the data; the difference only rescales the inputs by about 20%.)

    With ``val_fraction=0`` (the default) the model is validated on the *test set*, which is what the seed
    repositories (SNIP-it, Network Slimming, ...) do and report; ``val/acc`` then equals ``test/acc``.
    With ``val_fraction > 0``, ``round(50000 · val_fraction)`` training images, chosen by a permutation
    seeded with ``seed``, are held out for validation, without augmentation, and the test set is only
    used by :meth:`test_dataloader`.

    Args:
        root: Folder that contains (or will receive) ``cifar-10-batches-py``.
        batch_size: Samples per batch (``>= 1``).
        val_fraction: Fraction of the training images held out for validation, in [0, 1).
        num_workers: Data-loader worker processes (``>= 0``).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        download: Download the data into ``root`` in :meth:`prepare_data` if it is missing (about
            170 MB). With ``False`` the data must be there already.
        augment: Augment the training images (random crop with padding 4, horizontal flip).
        seed: Seed of the train/validation split (the training order is shuffled by the trainer's seed).

    Raises:
        PruningError: If an argument is out of range (here), or from :meth:`setup` if the data is not
            under ``root``.
        ModuleNotFoundError: From :meth:`prepare_data` or :meth:`setup` if torchvision is not installed.

    Examples:
        >>> dm = CIFAR10DataModule(root="data", download=False, val_fraction=0.1, num_workers=0)
        >>> dm.num_classes, dm.val_fraction, dm.train_transform.transforms[0]
        (10, 0.1, RandomCrop(size=(32, 32), padding=4))
    """

    dataset_class = "CIFAR10"
    folder = "cifar-10-batches-py"
    title = "CIFAR-10"
    num_classes = 10
    mean = CIFAR10_MEAN
    std = CIFAR10_STD


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50,000 training and 10,000 test images, 32×32, 100 classes) over torchvision's ``CIFAR100``.

    The same as :class:`CIFAR10DataModule` (augmentation, validation split, loaders, arguments), with the
    100 fine labels and the CIFAR-100 training statistics: mean (0.5071, 0.4865, 0.4409), standard
    deviation (0.2673, 0.2564, 0.2762). The data lives in ``<root>/cifar-100-python``.

    With ``val_fraction=0`` (the default) the model is validated on the test set, as in the seed
    repositories; otherwise a seeded fraction of the training images is held out.

    Args:
        root: Folder that contains (or will receive) ``cifar-100-python``.
        batch_size: Samples per batch (``>= 1``).
        val_fraction: Fraction of the training images held out for validation, in [0, 1).
        num_workers: Data-loader worker processes (``>= 0``).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        download: Download the data into ``root`` in :meth:`prepare_data` if it is missing (about
            170 MB). With ``False`` the data must be there already.
        augment: Augment the training images (random crop with padding 4, horizontal flip).
        seed: Seed of the train/validation split.

    Raises:
        PruningError: If an argument is out of range (here), or from :meth:`setup` if the data is not
            under ``root``.
        ModuleNotFoundError: From :meth:`prepare_data` or :meth:`setup` if torchvision is not installed.

    Examples:
        >>> dm = CIFAR100DataModule(root="data", batch_size=64)
        >>> dm.num_classes, dm.mean
        (100, (0.5071, 0.4865, 0.4409))
    """

    dataset_class = "CIFAR100"
    folder = "cifar-100-python"
    title = "CIFAR-100"
    num_classes = 100
    mean = CIFAR100_MEAN
    std = CIFAR100_STD


def _datasets():
    try:
        from torchvision import datasets
    except ImportError as err:
        raise ModuleNotFoundError(
            "The CIFAR and Imagenette examples read the data with torchvision: "
            "pip install lightning-prune[examples]"
        ) from err
    return datasets


def _transforms():
    try:
        from torchvision import transforms
    except ImportError as err:
        raise ModuleNotFoundError(
            "The CIFAR and Imagenette examples transform the images with torchvision: "
            "pip install lightning-prune[examples]"
        ) from err
    return transforms
