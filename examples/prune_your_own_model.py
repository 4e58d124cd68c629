"""Prune your own model: a plain LightningModule → pruned, trained, shrunk → reloaded and fine-tuned.

The tutorial of the documentation (docs/tutorial.md) walks through this file. Run it from the repository root:

    python examples/prune_your_own_model.py            # about 30 s on one CPU core
    python examples/prune_your_own_model.py --epochs 1 # a quick look

It needs scikit-learn for the data (1,797 8×8 digits that ship inside it, nothing is downloaded):
``pip install "lightning-prune[examples]"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import ShrinkOnFitEnd, SNIPCallback, load_pruned_checkpoint


# 1. Your model: an ordinary LightningModule. Two things help pruning: `save_hyperparameters()` (the shrunk
#    checkpoint rebuilds the module from them) and layers that make output channels (Conv2d, Linear).
class MyNet(pl.LightningModule):
    def __init__(self, width: int = 32, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.hidden = nn.Linear(2 * width * 4 * 4, 128)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.classifier(F.relu(self.hidden(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# 2. Your data: here scikit-learn's digits as tensors (any DataLoader or LightningDataModule works).
def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[360:], order[:360]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def accuracy(model: pl.LightningModule, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)


def main(epochs: int = 20, out: str = "outputs/tutorial") -> dict[str, float]:
    # A network this small runs fastest on one CPU thread (a second one only adds synchronisation), and a
    # fixed thread count keeps the run reproducible for a given seed. Larger models: leave torch's default.
    torch.set_num_threads(1)
    pl.seed_everything(0)
    train, val = digits_loaders()
    model = MyNet()
    dense_params = sum(p.numel() for p in model.parameters())

    # 3. Two callbacks: SNIP removes 70% of the output channels before the first step (structured=True:
    #    whole channels, physically), ShrinkOnFitEnd reports what that gained and saves the small model.
    saved = Path(out) / "mynet_shrunk.pt"
    trainer = pl.Trainer(
        max_epochs=epochs,  # always set it: Lightning's default is 1,000 epochs
        callbacks=[SNIPCallback(limit=0.7, structured=True), ShrinkOnFitEnd(save_path=saved)],
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)

    # 4. Reload the shrunk model into a fresh MyNet: its layers are resized to the checkpoint's shapes.
    #    `MyNet.load_from_checkpoint` cannot, its constructor builds the full-size layers.
    small = load_pruned_checkpoint(MyNet, saved)  # eval mode: ready for inference
    small_params = sum(p.numel() for p in small.parameters())
    print(f"params: {dense_params:,} dense → {small_params:,} shrunk ({small_params / dense_params:.3f}×)")
    print(f"val accuracy of the reloaded model: {accuracy(small, val):.3f}")

    # 5. Fine-tune it further: load in training mode (train=True), or BatchNorm keeps its running statistics
    #    and Lightning warns about modules in eval mode.
    tuned = load_pruned_checkpoint(MyNet, saved, train=True, lr=5e-4)
    pl.Trainer(
        max_epochs=max(1, epochs // 4),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(tuned, train, val)
    print(f"val accuracy after fine-tuning: {accuracy(tuned, val):.3f}")
    return {"dense_params": dense_params, "small_params": small_params, "accuracy": accuracy(tuned, val)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="outputs/tutorial")
    args = parser.parse_args()
    main(args.epochs, args.out)
