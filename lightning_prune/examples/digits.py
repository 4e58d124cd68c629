"""Handwritten digits: a data module and a small CNN to prune, trained in seconds on a CPU.

The data is scikit-learn's bundled copy of the UCI optical digits test set: 1,797 real 8×8 grey-scale
images of the digits 0–9, shipped inside scikit-learn, so nothing is downloaded. Small as it is, a CNN
reaches ~98% validation accuracy on it in a few epochs, which makes it a quick, honest check that a
pruned and shrunk network still works.

Examples:
    >>> import torch
    >>> model = DigitsClassifier()
    >>> model(model.example_input_array).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.errors import PruningError

__all__ = ["DigitsClassifier", "DigitsDataModule"]

NUM_CLASSES = 10
"""Digits 0–9."""

IMAGE_SIZE = 8
"""The images are ``IMAGE_SIZE × IMAGE_SIZE`` pixels, one channel."""


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1,797 bundled 8×8 handwritten digits, split into train and validation sets.

    The split is stratified by class and fixed by ``seed``. Images are float tensors of shape
    ``(1, 8, 8)``: pixel values 0–16 are scaled to [0, 1], then normalized with the mean and standard
    deviation of the *training* split (:attr:`mean`, :attr:`std`). Labels are ``torch.long`` in 0–9.

    The set is too small for three splits: :meth:`test_dataloader` and :meth:`predict_dataloader` serve
    the validation split, so ``test/acc`` equals ``val/acc`` for the same weights.

    Nothing is downloaded: the data ships inside scikit-learn (``pip install lightning-prune[examples]``).

    Args:
        batch_size: Samples per batch (``>= 1``).
        val_fraction: Fraction of the images held out for validation, in (0, 1). The default 0.2 holds
            out 360 images and trains on 1,437.
        seed: Seed of the split (the training order is shuffled by the trainer's seed, not this one).
        num_workers: Data-loader worker processes (``>= 0``); the default 0 is fastest for data this
            small, which lives in memory as tensors.

    Raises:
        PruningError: If an argument is out of range (raised here, before any data is loaded).
        ModuleNotFoundError: From :meth:`setup` if scikit-learn is not installed.

    Examples:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([32, 1, 8, 8]), torch.float32, torch.int64)
        >>> len(dm.train_set), len(dm.val_set)
        (1437, 360)
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_int("DigitsDataModule", "batch_size", batch_size, 1)
        _check_int("DigitsDataModule", "num_workers", num_workers, 0)
        _check_int("DigitsDataModule", "seed", seed, 0)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise PruningError(
                f"`DigitsDataModule(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be a "
                f"float in (0, 1); got {type(val_fraction).__name__}."
            )
        if not 0 < val_fraction < 1:
            raise PruningError(
                f"`DigitsDataModule(val_fraction={val_fraction!r})` is invalid: `val_fraction` must be in "
                f"(0, 1); got {val_fraction!r}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.mean: float | None = None
        self.std: float | None = None

    def prepare_data(self) -> None:
        """Check that scikit-learn is installed (the data ships with it; nothing is downloaded)."""
        _load_digits()

    def setup(self, stage: str | None = None) -> None:
        """Load the images, split them and compute the normalization (once; later calls do nothing).

        Raises:
            ModuleNotFoundError: If scikit-learn is not installed.
        """
        if self.train_set is not None:
            return
        images, labels = _load_digits()
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(
            range(len(labels)),
            test_size=self.val_fraction,
            random_state=self.seed,
            stratify=labels.numpy(),
        )
        train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        train_x = images[train_idx]
        self.mean, self.std = train_x.mean().item(), train_x.std().item()
        self.train_set = TensorDataset(self._normalize(train_x), labels[train_idx])
        self.val_set = TensorDataset(self._normalize(images[val_idx]), labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the validation split: the data set is too small for a separate test split."""
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the validation split (images and labels; the model predicts from the images)."""
        return self._loader(self.val_set, shuffle=False)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return ((images - self.mean) / self.std).unsqueeze(1).contiguous()

    def _loader(self, dataset: TensorDataset | None, *, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("`DigitsDataModule` has no data yet: call `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class DigitsClassifier(LightningModule):
    """A small CNN for the 8×8 digits, laid out as one ``nn.Sequential`` so pruning patterns are short.

    ``self.model`` is, with ``w = width``::

        model.0   Conv2d(1, w, 3, padding=1)      model.1  BatchNorm2d   model.2  ReLU
        model.3   Conv2d(w, 2w, 3, padding=1)     model.4  BatchNorm2d   model.5  ReLU   model.6  MaxPool2d(2)
        model.7   Conv2d(2w, 2w, 3, padding=1)    model.8  BatchNorm2d   model.9  ReLU   model.10 MaxPool2d(2)
        model.11  Flatten                         (2w channels × 2 × 2)
        model.12  Linear(8w, 4w)                  model.13 ReLU
        model.14  Linear(4w, 10)                  the classifier, whose outputs are never pruned

    With the default ``width=32`` that is conv 1→32→64→64, then linear 256→128→10 (about 90k
    parameters). Training uses SGD with momentum and a cosine learning-rate decay over
    ``trainer.max_epochs`` (over the estimated optimizer steps when ``max_epochs`` is unset).

    Logged: ``train/loss``; ``val/loss`` and ``val/acc``; ``test/loss`` and ``test/acc`` (micro-averaged
    accuracy, i.e. the fraction of images classified correctly).

    Args:
        width: Channels of the first convolution (``>= 1``); every layer scales with it.
        lr: Peak learning rate of SGD (``> 0``).
        momentum: SGD momentum, in [0, 1).
        weight_decay: L2 weight decay (``>= 0``).

    Raises:
        PruningError: If an argument is out of range.

    Examples:
        >>> model = DigitsClassifier(width=8)
        >>> model(model.example_input_array).shape
        torch.Size([2, 10])
        >>> type(model.model[14]).__name__, model.model[14].in_features
        ('Linear', 32)
    """

    def __init__(
        self,
        width: int = 32,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        _check_int("DigitsClassifier", "width", width, 1)
        _check_float("DigitsClassifier", "lr", lr, low=0.0, low_open=True)
        _check_float("DigitsClassifier", "momentum", momentum, low=0.0, high=1.0)
        _check_float("DigitsClassifier", "weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters()
        w = width
        self.model = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, 4 * w),
            nn.ReLU(),
            nn.Linear(4 * w, NUM_CLASSES),
        )
        self.example_input_array = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, 10)``, for images of shape ``(N, 1, 8, 8)``."""
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

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with momentum and weight decay; the learning rate decays to zero on a cosine."""
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        t_max, interval = schedule_length(self.trainer)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str, accuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), prog_bar=True)
        accuracy(logits, y)
        self.log(f"{split}/acc", accuracy, prog_bar=True)


def schedule_length(trainer: Any) -> tuple[int, str]:
    """How long a learning-rate schedule lasts, in the unit it steps in; at least 1.

    ``(max_epochs, "epoch")``, or with ``max_epochs=-1`` (run by steps or forever) the optimizer steps the
    trainer expects, ``(steps, "step")``.
    """
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0:
        return max_epochs, "epoch"
    steps = trainer.estimated_stepping_batches
    return max(1, int(steps) if math.isfinite(steps) else 1), "step"


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as float images in [0, 1], shape (N, 8, 8), and long labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "The digits example needs scikit-learn, which ships the data set (nothing is downloaded): "
            "pip install lightning-prune[examples]"
        ) from err
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(data.target, dtype=torch.long)


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PruningError(
            f"`{owner}({name}={value!r})` is invalid: `{name}` must be an int >= {minimum}; "
            f"got {type(value).__name__}."
        )
    if value < minimum:
        raise PruningError(f"`{owner}({name}={value!r})` is invalid: `{name}` must be >= {minimum}.")


def _check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    allowed = f"{'(' if low_open else '['}{low}, {high})" if high is not None else None
    allowed = allowed or (f"> {low}" if low_open else f">= {low}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PruningError(
            f"`{owner}({name}={value!r})` is invalid: `{name}` must be a number {allowed}; "
            f"got {type(value).__name__}."
        )
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value >= high) or not math.isfinite(value):
        where = f"in {allowed}" if high is not None else allowed
        raise PruningError(f"`{owner}({name}={value!r})` is invalid: `{name}` must be {where}.")
