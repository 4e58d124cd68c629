"""Robust accuracy of dense and pruned LeNet-300-100 on MNIST: docs/callbacks/adversarial.md.

Trains LeNet-300-100 dense, with SNIP and with SNIP-it (before training) at one weight sparsity, with the
recipe of benchmarks/snip_mnist.py (SGD momentum 0.9, cosine learning rate from 0.1, batch 100, He
initialisation, ``seed_everything(seed)`` before the model is built), then runs ``trainer.test`` with
:class:`~lightning_prune.AdversarialEvaluation` for Carlini–Wagner L2 (the SNIP-it seed's attack) and PGD
(L∞) on the first ``--batches`` test batches, and prints a markdown table. Budgets are in pixel units
(images in [0, 1]); the data module normalises the images, so the callback gets the normalised box and
the budgets divided by the standard deviation.

Usage, from the repository root (the data folder holds ``MNIST/raw``)::

    OMP_NUM_THREADS=1 python benchmarks/adversarial_mnist.py --data /path/to/data --epochs 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source tree without installing
    sys.path.insert(0, str(ROOT))

from lightning_prune import AdversarialEvaluation, IterativeSNIPCallback, SNIPCallback  # noqa: E402
from lightning_prune.examples.mnist import MEAN, STD, MNISTClassifier, MNISTDataModule  # noqa: E402

L2 = (0.5, 1.0, 1.5, 2.0)  # budgets in pixel units ([0, 1] images)
LINF = (0.05, 0.1)
# the normalised images' bounds, computed like the data module computes them (float32)
LOW, HIGH = (float((torch.tensor(p) - MEAN) / STD) for p in (0.0, 1.0))


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder containing MNIST/raw (default: $LIGHTNING_PRUNE_DATA)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=5, help="test batches of 100 attacked")
    args = parser.parse_args()
    data_dir = args.data or os.environ.get("LIGHTNING_PRUNE_DATA")
    if not data_dir:
        parser.error("no data: pass --data DIR or set LIGHTNING_PRUNE_DATA")
    warnings.filterwarnings("ignore")
    data = MNISTDataModule(root=data_dir, batch_size=100, download=False)
    methods = {
        "dense": list,
        "SNIP": lambda: [SNIPCallback(limit=args.sparsity)],
        "SNIP-it (before)": lambda: [
            IterativeSNIPCallback(limit=args.sparsity, when="before", num_batches=5)
        ],
    }
    rows = []
    for name, callbacks in methods.items():
        pl.seed_everything(args.seed, verbose=False)
        model = MNISTClassifier("lenet300100", lr=0.1)
        started = time.perf_counter()
        trainer = quiet_trainer(
            max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks()
        )
        trainer.fit(model, datamodule=data)
        fit = time.perf_counter() - started
        figures = {}
        for attack, epsilons in (("carlini_wagner", L2), ("pgd", LINF)):
            # the data module normalises pixels as (p - MEAN) / STD: the box and the budgets in those units
            evaluation = AdversarialEvaluation(
                attack, epsilons=[e / STD for e in epsilons], max_batches=args.batches, low=LOW, high=HIGH
            )
            started = time.perf_counter()
            quiet_trainer(limit_test_batches=args.batches, callbacks=[evaluation]).test(
                model, datamodule=data, verbose=False
            )
            figures[attack] = (evaluation.report, time.perf_counter() - started)
        rows.append((name, figures, fit))
        print(f"{name}: done ({fit:.0f} s fit)", flush=True)

    header = ["model", "clean acc"] + [f"CW L2 ≤ {e:g}" for e in L2] + [f"PGD L∞ ≤ {e:g}" for e in LINF]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, figures, _ in rows:
        cw, pgd = figures["carlini_wagner"][0], figures["pgd"][0]
        cells = [f"{cw.clean_accuracy:.3f}"]
        cells += [f"{cw.robust_accuracy[e / STD]:.3f}" for e in L2]
        cells += [f"{pgd.robust_accuracy[e / STD]:.3f}" for e in LINF]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for name, figures, fit in rows:
        cw, pgd = figures["carlini_wagner"], figures["pgd"]
        print(
            f"- {name}: fit {fit:.0f} s; {cw[0].examples} test images attacked; "
            f"Carlini-Wagner {cw[1]:.0f} s, PGD {pgd[1]:.0f} s"
        )


if __name__ == "__main__":
    main()
