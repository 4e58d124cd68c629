"""The SNIP-it seed's regularised baselines on real data, small: HoyerSquare, Group-HS and L0 on digits.

Reduced CPU protocol (no CIFAR-10 and no GPU on this machine): `DigitsClassifier` (conv-BN ×3, two linear
layers, ~90k parameters) on scikit-learn's 8×8 digits (1,437 train / 360 held out), SGD lr 0.05 with
momentum 0.9, weight decay 5e-4, cosine schedule, batch 64. The seed's schedule shape is kept: the
Hoyer baselines are regularised for `epochs − finetune` epochs, cut once (|w| <= 1e-3), and fine-tuned for
`finetune` epochs (the seed: 70 + 10 of 80); L0 trains its gates for all epochs and removes the closed
channels at the end. Every run is one `Trainer.fit` with the callback and `ShrinkOnFitEnd`.

    python benchmarks/baselines_digits.py --out docs/benchmarks-baselines.md

Reported per run: held-out accuracy at the end, weight sparsity (zeros among the conv/linear weights, the
unstructured figure), nodes removed (conv/linear output channels, the structured figure), parameters and
MACs of the final network, and wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune import (
    GroupHoyerSquareCallback,
    HoyerSquareCallback,
    L0Callback,
    ShrinkOnFitEnd,
    model_stats,
)
from lightning_prune.examples import DigitsClassifier, DigitsDataModule

HEAD = "model.14"  # the output layer: never a node that can go


def nodes(module: nn.Module) -> int:
    return sum(
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for n, m in module.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and n != HEAD
    )


def weight_zeros(module: nn.Module) -> float:
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def accuracy(module: nn.Module, data: DigitsDataModule) -> float:
    module.eval()
    correct = total = 0
    for x, y in data.val_dataloader():
        correct += int((module(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def callback(method: str, penalty: float, args: argparse.Namespace) -> pl.Callback | None:
    delay = args.epochs - args.finetune - 1  # the cut at the end of epoch epochs − finetune
    if method == "hoyer":
        return HoyerSquareCallback(penalty=penalty, prune_delay=delay, prune_freq=1)
    if method == "group-hoyer":
        return GroupHoyerSquareCallback(penalty=penalty, prune_delay=delay, prune_freq=1)
    if method == "l0":
        return L0Callback(penalty=penalty, gate_lr=args.gate_lr)
    return None


def run(args: argparse.Namespace) -> list[dict]:
    records = []
    data = DigitsDataModule(batch_size=64, val_fraction=0.2, seed=0)
    data.setup("fit")
    base = DigitsClassifier(width=32, lr=0.05)
    nodes0 = nodes(base)
    example = base.example_input_array[:1]
    stats0 = model_stats(base, example)
    runs = [("dense", 0.0)] + [
        (m, p) for m in ("hoyer", "group-hoyer", "l0") for p in getattr(args, m.replace("-", "_"))
    ]
    for method, penalty in runs:
        pl.seed_everything(args.seed)
        module = DigitsClassifier(width=32, lr=0.05)
        pruner = callback(method, penalty, args)
        start = time.perf_counter()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[c for c in (pruner, ShrinkOnFitEnd()) if c is not None],
        )
        trainer.fit(module, datamodule=data)
        stats = model_stats(module, example)
        records.append(
            {
                "method": method,
                "penalty": penalty,
                "acc": accuracy(module, data),
                "weight_sparsity": weight_zeros(module),
                "nodes_removed": nodes0 - nodes(module),
                "nodes": nodes0,
                "params": stats.params,
                "params0": stats0.params,
                "macs": stats.macs,
                "macs0": stats0.macs,
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


def render(records: list[dict], args: argparse.Namespace, wall: float) -> str:
    penalties = " ".join(
        f"--{m} {' '.join(f'{p:g}' for p in getattr(args, m.replace('-', '_')))}"
        for m in ("hoyer", "group-hoyer", "l0")
    )
    lines = [
        "# The SNIP-it seed's regularised baselines on digits (reduced CPU protocol)",
        "",
        "Produced by `python benchmarks/baselines_digits.py "
        f"--epochs {args.epochs} --finetune {args.finetune} {penalties} --gate-lr {args.gate_lr:g} "
        f"--seed {args.seed} --out docs/benchmarks-baselines.md` on "
        f"{platform.machine()}, 2 CPU cores (no GPU), torch {torch.__version__}; whole run {wall:.0f} s; "
        "one seed.",
        "",
        "`DigitsClassifier` on scikit-learn's 8×8 digits (1,437 train / 360 held out), SGD lr 0.05, momentum "
        "0.9, weight decay 5e-4, cosine, batch 64. HoyerSquare and Group-HS: regularised for "
        f"{args.epochs - args.finetune} epochs, cut once at |w| <= 1e-3, fine-tuned {args.finetune} epochs "
        f"(the seed's 70 + 10 of 80, scaled); L0: gates trained for {args.epochs} epochs "
        f"(gate lr {args.gate_lr:g}), closed channels removed at the end. Accuracy is on the held-out split "
        "after training; 'weight sparsity' is the fraction of zero conv/linear weights of the final network, "
        "'nodes removed' the conv/linear output channels removed physically.",
        "",
        "| method | penalty | accuracy | weight sparsity | nodes removed | params | MACs | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["method"] == "meta":
            continue
        lines.append(
            f"| {r['method']} | {r['penalty']:g} | {r['acc']:.3f} | {r['weight_sparsity']:.1%} | "
            f"{r['nodes_removed']} of {r['nodes']} | {r['params']:,} ({r['params'] / r['params0']:.2f}×) | "
            f"{r['macs']:,} ({r['macs'] / r['macs0']:.2f}×) | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune", type=int, default=5, help="epochs after the Hoyer cut")
    parser.add_argument("--hoyer", type=float, nargs="*", default=[1e-4], help="HoyerSquare penalties")
    parser.add_argument("--group-hoyer", type=float, nargs="*", default=[1e-3], help="Group-HS penalties")
    parser.add_argument("--l0", type=float, nargs="*", default=[1e-4], help="L0 penalties")
    parser.add_argument("--gate-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", type=Path, help="write raw records here")
    parser.add_argument("--out", type=Path, help="markdown page (default: stdout)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    records = run(args)
    wall = time.perf_counter() - start
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    page = render(records, args, wall)
    if args.out:
        args.out.write_text(page + "\n")
    else:
        print(page)


if __name__ == "__main__":
    main()
