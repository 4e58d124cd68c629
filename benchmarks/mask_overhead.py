"""Per-step cost of SNIP's mask enforcement, and the wall time of scoring + shrinking.

Trains a small CNN (CIFAR-sized synthetic batches) for ``--steps`` steps per run with plain Lightning and
with ``SNIPCallback(limit=0.9)`` (unstructured: gradients masked before, weights re-zeroed after every
optimizer step). Runs alternate, ``--repeats`` of each; the step time of a run is the median over its
steps after ``--warmup``; the reported ratio is median(masked) / median(plain).

    python benchmarks/mask_overhead.py --repeats 5 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import ShrinkOnFitEnd, SNIPCallback


class SmallCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(steps: int, warmup: int, callbacks: list) -> float:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(64 * steps, 3, 32, 32), torch.randint(0, 10, (64 * steps,)))
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
    )  # fmt: skip
    trainer.fit(SmallCNN(), DataLoader(data, batch_size=64))
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    plain, masked = [], []
    for _ in range(args.repeats):
        plain.append(run(args.steps, args.warmup, []))
        masked.append(run(args.steps, args.warmup, [SNIPCallback(limit=0.9)]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64x3x32x32, SGD momentum+wd")
    for label, times in (("plain ", plain), ("masked", masked)):
        runs = [round(1e3 * t, 2) for t in times]
        print(f"{label} step median {1e3 * statistics.median(times):.2f} ms (runs: {runs})")
    print(f"ratio masked/plain: {statistics.median(masked) / statistics.median(plain):.3f}")

    snip, unstructured, shrink_cb = (
        SNIPCallback(limit=0.5, structured=True),
        SNIPCallback(limit=0.9),
        ShrinkOnFitEnd(),
    )
    run(args.warmup + 2, 0, [snip])
    run(args.warmup + 2, 0, [unstructured, shrink_cb])
    print(f"scoring + structured shrink (SNIP, limit 0.5): {snip.report.seconds:.3f} s")
    print(f"scoring + masking (SNIP, limit 0.9): {unstructured.report.seconds:.3f} s")


if __name__ == "__main__":
    main()
