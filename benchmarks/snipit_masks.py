"""Where SNIP and SNIP-it put the weights of LeNet-300-100 at initialisation: docs/fidelity.md.

For each sparsity, prunes a freshly initialised LeNet-300-100 (``seed_everything(seed)`` as in
benchmarks/snip_mnist.py) on MNIST with SNIP (1 and 5 batches), SNIP-it before training, and both scored
with the SNIP-it seed's loss (``F.nll_loss`` on the logits, :class:`snip_mnist.SeedScoringClassifier`),
and prints a markdown table of the masks: weights kept per layer, hidden neurons left without inputs or
outputs ("dead"), and kept weights that sit on dead neurons ("stranded"). Only the masks are measured:
each run stops after one optimizer step at a learning rate of 1e-9.

Usage, from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/snipit_masks.py --data /path/to/data
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # snip_mnist, next to this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversarial_mnist import quiet_trainer
from snip_mnist import SeedScoringClassifier

from lightning_prune import IterativeSNIPCallback, SNIPCallback
from lightning_prune.examples.mnist import MNISTClassifier, MNISTDataModule

VARIANTS = {
    "SNIP, 1 batch": (MNISTClassifier, lambda s: SNIPCallback(limit=s, num_batches=1)),
    "SNIP, 5 batches": (MNISTClassifier, lambda s: SNIPCallback(limit=s, num_batches=5)),
    "SNIP-it, 5 batches a step": (
        MNISTClassifier,
        lambda s: IterativeSNIPCallback(limit=s, when="before", num_batches=5),
    ),
    "SNIP, seed's loss, 5 batches": (SeedScoringClassifier, lambda s: SNIPCallback(limit=s, num_batches=5)),
    "SNIP-it, seed's loss": (
        SeedScoringClassifier,
        lambda s: IterativeSNIPCallback(limit=s, when="before", num_batches=5),
    ),
}


def masks(cls: type, callback: pl.Callback, data: MNISTDataModule, seed: int) -> list[torch.Tensor]:
    """The callback's masks of the three Linear weights, in layer order."""
    pl.seed_everything(seed, verbose=False)
    model = cls("lenet300100", lr=1e-9)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[callback])
    trainer.fit(model, datamodule=data)
    return [callback.masks[f"model.{i}.weight"].cpu() for i in (1, 3, 5)]


def row(sparsity: float, name: str, m: list[torch.Tensor]) -> str:
    w1, w2, w3 = m
    no_in1, no_out1 = w1.sum(1) == 0, w2.sum(0) == 0
    no_in2, no_out2 = w2.sum(1) == 0, w3.sum(0) == 0
    dead1, dead2 = no_in1 | no_out1, no_in2 | no_out2
    stranded = int(w1[dead1].sum() + w2[:, dead1].sum() + w2[dead2].sum() + w3[:, dead2].sum())
    kept = " / ".join(str(int(x.sum())) for x in m)
    return (
        f"| {sparsity:.0%} | {name} | {kept} | {int(dead1.sum())} ({int(no_in1.sum())} / "
        f"{int(no_out1.sum())}) | {int(dead2.sum())} | {stranded} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder containing MNIST/raw (default: $LIGHTNING_PRUNE_DATA)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = args.data or os.environ.get("LIGHTNING_PRUNE_DATA")
    if not data_dir:
        parser.error("no data: pass --data DIR or set LIGHTNING_PRUNE_DATA")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = MNISTDataModule(root=data_dir, batch_size=100, download=False)
    lines = [
        "| sparsity | method | kept weights per layer | dead layer-1 neurons (no input / no output) | "
        "dead layer-2 neurons | stranded weights |",
        "|---|---|---|---|---|---|",
    ]
    for s in args.sparsities:
        for name, (cls, make) in VARIANTS.items():
            lines.append(row(s, name, masks(cls, make(s), data, args.seed)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
