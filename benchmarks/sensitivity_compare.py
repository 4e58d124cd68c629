"""Sensitivity Pruner vs SNAP-it, L1-filter and random channel pruning on scikit-learn's digits.

Protocol (CPU, reduced): per seed, `DigitsClassifier` (conv 1→w→2w→2w, linear 8w→4w→10) is trained dense
for `--pretrain` epochs (SGD, `--pretrain-lr`; the seed prunes a trained network). Every method then
starts from a copy of those SAME weights and gets the SAME `--epochs` epochs (SGD lr `--lr`, cosine decay)
and the same kept fraction of nodes (conv/linear output channels except the classifier's), `--keep`:

- `sensitivity`: `SensitivityPruner(compression_rate=keep)`, automatic blocks (the four prunable layers),
  `--epochs-per-block` epochs each, then the rest of the epochs fine-tune;
- `sensitivity-trained`: the same with `reinit=False`: sensitivities on the network being trained, not
  on freshly initialised weights (the seed's choice);
- `snap-it`: `SNAPit(limit=1 - keep)` before the first step (5 steps from 0.5), then `--epochs` epochs;
- `l1-filter`: one-shot structured pruning by the `l1_norm` criterion (the filter's L1 norm ranked within
  its layer, so every layer loses about the same fraction; EfficientConvNets), then `--epochs` epochs;
- `random`: one-shot random channels (seeded), then `--epochs` epochs.

With `--data mnist` (MNIST from `$LIGHTNING_PRUNE_DATA`, 10% held out), the network is LeNet-5-Caffe
(`MNISTClassifier(arch="lenet5caffe")`, conv 20/50, linear 500: three prunable layers, three blocks).

Reported per method: held-out accuracy at the end (mean ± std over seeds), params and MACs of one example,
the measured node kept fraction, wall time.

    python benchmarks/sensitivity_compare.py --out docs/benchmarks-sensitivity.md
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_prune import IterativeSNIPCallback, SensitivityPruner, SNAPit, model_stats
from lightning_prune.examples import DigitsClassifier, DigitsDataModule, MNISTClassifier, MNISTDataModule

METHODS = ("sensitivity", "sensitivity-trained", "snap-it", "l1-filter", "random")


QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, **QUIET)


def nodes(module: pl.LightningModule) -> int:
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    return sum(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features for m in layers[:-1])


def callback(method: str, args: argparse.Namespace, seed: int) -> pl.Callback:
    limit = 1 - args.keep
    if method.startswith("sensitivity"):
        return SensitivityPruner(
            reinit=method == "sensitivity",
            compression_rate=args.keep,
            epochs_per_block=args.epochs_per_block,
            beta_range=args.beta_range,
            vote_window=args.vote_window,
            seed=seed,
        )
    if method == "snap-it":
        return SNAPit(limit=limit)
    criterion = {"l1-filter": "l1_norm", "random": "random"}[method]
    return IterativeSNIPCallback(limit=limit, structured=True, steps=0, criterion=criterion, seed=seed)


def dataset(args: argparse.Namespace) -> pl.LightningDataModule:
    if args.data == "digits":
        return DigitsDataModule(batch_size=64, val_fraction=0.2, seed=0)
    root = os.environ.get("LIGHTNING_PRUNE_DATA")
    if not root:
        raise SystemExit(
            "--data mnist reads MNIST from $LIGHTNING_PRUNE_DATA (torchvision's layout); it is unset."
        )
    return MNISTDataModule(root=root, batch_size=100, val_fraction=0.1, download=False)


def network(args: argparse.Namespace, lr: float) -> pl.LightningModule:
    if args.data == "digits":
        return DigitsClassifier(width=args.width, lr=lr)
    return MNISTClassifier(arch="lenet5caffe", lr=lr)


def run(args: argparse.Namespace) -> list[dict]:
    records = []
    for seed in args.seeds:
        pl.seed_everything(seed)
        data = dataset(args)
        dense = network(args, lr=args.pretrain_lr or (0.05 if args.data == "digits" else 0.02))
        trainer(args.pretrain, []).fit(dense, datamodule=data)
        if not all(torch.isfinite(p).all() for p in dense.parameters()):
            raise SystemExit(f"seed {seed}: the dense pretraining diverged; lower --pretrain-lr.")
        pretrained = copy.deepcopy(dense.state_dict())
        before = nodes(dense)
        for method in args.methods:
            pl.seed_everything(seed)
            module = network(args, lr=args.lr)
            module.load_state_dict(pretrained)
            started = time.perf_counter()
            t = trainer(args.epochs, [callback(method, args, seed)])
            t.fit(module, datamodule=data)
            seconds = time.perf_counter() - started
            acc = float(t.validate(module, datamodule=data, verbose=False)[0]["val/acc"])
            stats = model_stats(module, module.example_input_array[:1])
            records.append(
                {
                    "seed": seed,
                    "method": method,
                    "acc": acc,
                    "params": stats.params,
                    "macs": stats.macs,
                    "kept": nodes(module) / before,
                    "seconds": seconds,
                }
            )
            print(records[-1], flush=True)
        stats = model_stats(dense, dense.example_input_array[:1])
        acc = float(trainer(1, []).validate(dense, datamodule=data, verbose=False)[0]["val/acc"])
        records.append(
            {
                "seed": seed,
                "method": "dense (pretrained)",
                "acc": acc,
                "params": stats.params,
                "macs": stats.macs,
            }
        )
    return records


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def render(records: list[dict], args: argparse.Namespace, command: str, wall: float) -> str:
    lines = [
        "| method | accuracy (%) | params | MACs / example | nodes kept | wall time per run (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in ("dense (pretrained)", *args.methods):
        rows = [r for r in records if r["method"] == method]
        kept = mean_std([r["kept"] for r in rows], 100, 1) + " %" if "kept" in rows[0] else "100 %"
        secs = mean_std([r["seconds"] for r in rows], 1, 1) if "seconds" in rows[0] else "–"
        lines.append(
            f"| {method} | {mean_std([r['acc'] for r in rows], 100)} | "
            f"{statistics.mean(r['params'] for r in rows):,.0f} | "
            f"{statistics.mean(r['macs'] for r in rows):,.0f} | {kept} | {secs} |"
        )
    head = [
        f"Command: `{command}`",
        "",
        f"Data {args.data}; seeds {args.seeds}; width {args.width} (digits); pretrain {args.pretrain} "
        f"epochs; then {args.epochs} epochs per method (lr {args.lr}, cosine), kept fraction {args.keep}; "
        "Sensitivity Pruner: "
        f"{args.epochs_per_block} epochs per block, beta_range {args.beta_range}, vote_window "
        f"{args.vote_window}. "
        f"Total wall time {wall / 60:.1f} min on a shared 2-core CPU (OMP_NUM_THREADS=1).",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--pretrain", type=int, default=20)
    parser.add_argument("--pretrain-lr", type=float, default=None, help="default: 0.05 digits, 0.02 mnist")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--epochs-per-block", type=int, default=4)
    parser.add_argument("--beta-range", type=int, default=10)
    parser.add_argument("--vote-window", type=int, default=20)
    parser.add_argument("--keep", type=float, default=0.4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    records = run(args)
    command = "python " + " ".join(["benchmarks/sensitivity_compare.py", *sys.argv[1:]])
    text = render(records, args, command, time.perf_counter() - started)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
