"""Imagenette: ten easy ImageNet classes, a data module over torchvision's ``Imagenette``.

Imagenette (https://github.com/fastai/imagenette) is a 10-class subset of ImageNet (about 9,500 training
and 3,900 validation images) distributed in three sizes: ``"160px"`` and ``"320px"`` (shortest side
resized) and ``"full"``. It is small enough to train torchvision's ImageNet architectures
(``ImageClassifier(model="torchvision.resnet18", input_size=(3, 160, 160))``) on one GPU in minutes.

Examples:
    >>> dm = ImagenetteDataModule(root="data", size="320px")
    >>> dm.num_classes, dm.image_size
    (10, 224)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_prune.errors import PruningError
from lightning_prune.examples.cifar import _datasets, _transforms
from lightning_prune.examples.digits import _check_int

__all__ = ["ImagenetteDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The per-channel normalization of ImageNet (pixels in [0, 1]) that torchvision's models assume."""

SIZES = ("160px", "320px", "full")
"""The Imagenette variants torchvision downloads."""

_FOLDERS = {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}


class ImagenetteDataModule(LightningDataModule):
    """Imagenette via ``torchvision.datasets.Imagenette``: train on the train split, validate and test on val.

    Training images get a ``RandomResizedCrop(image_size)`` (scale 0.08-1, ImageNet's standard crop)
    and a random horizontal flip; validation images are resized (shorter side ``image_size / 0.875``) and
    center-cropped to ``image_size``. All are normalized with ImageNet's mean and standard deviation.
    Batches are float tensors ``(N, 3, image_size, image_size)`` and ``torch.long`` labels in 0-9.

    Imagenette has no separate test split: :meth:`val_dataloader`, :meth:`test_dataloader` and
    :meth:`predict_dataloader` all serve the val split, so ``test/acc`` equals ``val/acc``.

    Args:
        root: Folder that contains (or will receive) ``imagenette2-160``, ``imagenette2-320`` or
            ``imagenette2`` (the folders of the three sizes).
        size: ``"160px"``, ``"320px"`` or ``"full"``.
        image_size: Side of the square crops the model sees (``>= 1``); default 160 for ``"160px"``,
            224 otherwise.
        batch_size: Samples per batch (``>= 1``).
        num_workers: Data-loader worker processes (``>= 0``).
        pin_memory: Pin batches in page-locked memory (faster copies to a GPU).
        download: Download the chosen size into ``root`` in :meth:`prepare_data` if it is missing
            (94 MB for 160px, 326 MB for 320px, 1.5 GB for full). With ``False`` it must be there.

    Raises:
        PruningError: If an argument is out of range (here), or from :meth:`setup` if the data is not
            under ``root``.
        ModuleNotFoundError: From :meth:`prepare_data` or :meth:`setup` if torchvision is not installed.

    Examples:
        >>> dm = ImagenetteDataModule(root="data", size="160px", batch_size=32)
        >>> dm.image_size, [type(t).__name__ for t in dm.eval_transform.transforms]
        (160, ['Resize', 'CenterCrop', 'ToTensor', 'Normalize'])
    """

    num_classes: ClassVar[int] = 10

    def __init__(
        self,
        root: str | os.PathLike = "data",
        size: str = "160px",
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        download: bool = True,
    ) -> None:
        super().__init__()
        owner = "ImagenetteDataModule"
        if not isinstance(root, (str, os.PathLike)):
            raise PruningError(
                f"`{owner}(root={root!r})` is invalid: `root` must be a path (str or os.PathLike); "
                f"got {type(root).__name__}."
            )
        if size not in SIZES:
            raise PruningError(
                f"`{owner}(size={size!r})` is invalid: `size` must be one of {', '.join(map(repr, SIZES))}."
            )
        if image_size is not None:
            _check_int(owner, "image_size", image_size, 1)
        _check_int(owner, "batch_size", batch_size, 1)
        _check_int(owner, "num_workers", num_workers, 0)
        for name, value in (("pin_memory", pin_memory), ("download", download)):
            if not isinstance(value, bool):
                raise PruningError(
                    f"`{owner}({name}={value!r})` is invalid: `{name}` must be a bool; "
                    f"got {type(value).__name__}."
                )
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.size = size
        self.image_size = image_size if image_size is not None else (160 if size == "160px" else 224)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.download = download
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def train_transform(self) -> Any:
        """Random resized crop to ``image_size``, horizontal flip, to tensor, ImageNet normalization."""
        t = _transforms()
        return t.Compose(
            [
                t.RandomResizedCrop(self.image_size),
                t.RandomHorizontalFlip(),
                t.ToTensor(),
                t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @property
    def eval_transform(self) -> Any:
        """Resize (shorter side ``image_size / 0.875``), center crop, to tensor, ImageNet normalization."""
        t = _transforms()
        return t.Compose(
            [
                t.Resize(round(self.image_size / 0.875)),
                t.CenterCrop(self.image_size),
                t.ToTensor(),
                t.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def prepare_data(self) -> None:
        """Download and extract the chosen size into ``root`` if ``download=True`` and it is missing."""
        if self.download:
            _datasets().Imagenette(self.root, split="train", size=self.size, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Index the images of both splits (once; later calls do nothing).

        Raises:
            PruningError: If the data is not under ``root``.
            ModuleNotFoundError: If torchvision is not installed.
        """
        if self.train_set is not None:
            return
        self.train_set = self._read("train", self.train_transform)
        self.val_set = self._read("val", self.eval_transform)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented batches of the train split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the val split, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the val split (Imagenette has no separate test split)."""
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the val split (images and labels; the model predicts from the images)."""
        return self._loader(self.val_set, shuffle=False)

    def _read(self, split: str, transform: Any) -> Dataset:
        try:
            return _datasets().Imagenette(
                self.root, split=split, size=self.size, download=False, transform=transform
            )
        except (RuntimeError, FileNotFoundError) as err:
            where = Path(self.root) / _FOLDERS[self.size] / split
            raise PruningError(
                f"`ImagenetteDataModule(root={self.root!r}, size={self.size!r}, download={self.download})`: "
                f"the Imagenette {split} images are not in {where} (one folder per class WordNet ID). Pass "
                f"`download=True` (and let `prepare_data` run), or point `root` at the folder that contains "
                f"{_FOLDERS[self.size]}. ({err})"
            ) from err

    def _loader(self, dataset: Dataset | None, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("`ImagenetteDataModule` has no data yet: call `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
