"""Tiny LightningModules and synthetic data for real `Trainer.fit` runs in tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.nets import TinyCNN, TinyDenseNet, TinyResNet

ARCHS = {"cnn": TinyCNN, "resnet": TinyResNet, "densenet": TinyDenseNet}


def synthetic_data(n: int = 64, classes: int = 4, size: int = 8, seed: int = 0) -> TensorDataset:
    """Images whose class sets the mean of one channel, so a tiny CNN can learn something."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, 3, size, size, generator=gen) * 0.5
    x[:, 0] += y.view(-1, 1, 1).float() - classes / 2
    return TensorDataset(x, y)


class TinyModule(pl.LightningModule):
    """A classifier over a tiny CNN/ResNet with a configurable optimizer and scheduler."""

    def __init__(
        self,
        arch: str = "cnn",
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        scheduler: bool = True,
        batch_size: int = 16,
        n: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ARCHS[arch]()
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.scheduler:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        }

    def train_dataloader(self):
        return DataLoader(synthetic_data(self.hparams.n), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(synthetic_data(32, seed=1), batch_size=16)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer writing into ``tmp_path``."""
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
