"""Network Slimming side by side: our coupled-group |γ| pruning vs Torch-Pruning's BNScalePruner vs the
netslim restriction (only BatchNorms between two convs through per-channel ops are pruned).

Reduced CPU protocol (no CIFAR-10 on this machine): scikit-learn's 8×8 digits, two networks — the plain
`DigitsClassifier` (conv-BN ×3, VGG-like) and a small residual network (`DigitsResNet` below) — trained
once with the L1 penalty on every BatchNorm scale (`SlimmingL1Callback(penalty=...)`, no pruning). Then,
on copies of the SAME sparsity-trained weights, each method prunes at a sweep of pruning ratios and the
pruned model is evaluated on the held-out split with no fine-tuning. The table reports, per method, the
largest number of conv/linear output channels (nodes) removed while validation accuracy stays within
`--tolerance` of the unpruned sparsity-trained model, and the params/MACs at that point.

    python benchmarks/slimming_compare.py --out docs/benchmarks-slimming.md

Methods:
- `ours`: `lightning_prune` — every channel group with a BatchNorm is scored by max |γ| over the group's
  norms (residual-coupled groups included), one global ranking, node-weighted count, never emptying a layer
  (`scale_scores` and `lowest_channels`, the functions `SlimmingL1Callback.prune` calls).
- `ours-floor`: `ours` with a per-layer floor (`SlimmingL1Callback(layer_floor=...)`, `--floor`): every
  layer keeps at least that fraction of its channels (Torch-Pruning's `max_pruning_ratio` = 1 - floor).
- `netslim`: the same scores and ranking, restricted to groups with a single producer and a single
  BatchNorm (what the netslim seed can prune: no residual/concat coupling).
- `torch-pruning`: `tp.pruner.BNScalePruner(importance=tp.importance.BNScaleImportance(),
  global_pruning=True, pruning_ratio=r)` with its defaults (mean over the group's BNs, each group's scores
  normalized by their mean), the classifier ignored.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from torch import nn

from lightning_prune import ChannelGraph, SlimmingL1Callback, model_stats
from lightning_prune.callbacks.slimming import scale_scores
from lightning_prune.examples import DigitsClassifier, DigitsDataModule
from lightning_prune.structure import lowest_channels

RATIOS = [round(0.05 * i, 2) for i in range(1, 19)]  # 0.05 … 0.90
METHODS = ("ours", "ours-floor", "netslim", "torch-pruning")


class DigitsResNet(nn.Module):
    """Stem conv-BN, 2 basic blocks at `w`, a strided block to `2w` (1×1 projection), 1 block, linear."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = nn.ModuleList([block(w, w), block(w, w)])
        self.down = block(w, 2 * w, 2)
        self.shortcut = nn.Sequential(nn.Conv2d(w, 2 * w, 1, 2, bias=False), nn.BatchNorm2d(2 * w))
        self.stage2 = nn.ModuleList([block(2 * w, 2 * w)])
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.stage1:
            x = torch.relu(x + b(x))
        x = torch.relu(self.shortcut(x) + self.down(x))
        for b in self.stage2:
            x = torch.relu(x + b(x))
        return self.head(x.mean((2, 3)))


def build(arch: str) -> DigitsClassifier:
    module = DigitsClassifier(width=32, lr=0.05)
    if arch == "resnet":
        module.model = DigitsResNet(width=32)
    return module


def node_count(model: nn.Module, head: str) -> int:
    return sum(
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and n != head
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsDataModule) -> float:
    model.eval()
    correct = total = 0
    for x, y in data.val_dataloader():
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def head_name(arch: str) -> str:
    return "model.head" if arch == "resnet" else "model.14"


def prune_ours(module: DigitsClassifier, ratio: float, restricted: bool, floor: float = 0.0) -> None:
    example = module.example_input_array
    graph = ChannelGraph(module, example)
    norms = [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    scores = {}
    for g in graph.groups:
        if not (g.prunable and g.size > 1):
            continue
        s = scale_scores(g, module, norms, "max")
        if s is None:
            continue
        norm_layers = {p.param.rsplit(".", 1)[0] for p in g.slices if p.role == "norm"}
        if restricted and (len(g.producers) != 1 or len(norm_layers) != 1):
            continue  # netslim: only a BatchNorm between two convs through per-channel ops
        scores[g.name] = s
    plan = lowest_channels(graph, scores, ratio, floor=floor)
    graph.prune(plan)


def prune_torch_pruning(module: DigitsClassifier, ratio: float, head: str) -> None:
    pruner = tp.pruner.BNScalePruner(
        module,
        module.example_input_array,
        importance=tp.importance.BNScaleImportance(),
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=[module.get_submodule(head)],
    )
    pruner.step()


FINETUNE_RATIOS = (0.3, 0.5, 0.7, 0.9)


def finetune(module: DigitsClassifier, data: DigitsDataModule, epochs: int) -> float | None:
    """Accuracy after fine-tuning the pruned network for a few epochs (SGD lr 0.01, cosine, clip 1.0).

    Gradients are clipped (norm 1.0): a layer left with one channel whose |γ| is ~0 outputs a near
    constant, the next BatchNorm sees a near-zero batch variance in train mode and, unclipped, the first
    steps explode (observed at every ratio on this protocol, for every method).
    """
    if epochs <= 0:
        return None
    module = copy.deepcopy(module)
    module.hparams.lr = 0.01
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return accuracy(module, data)


def run(args: argparse.Namespace) -> list[dict]:
    records = []
    for arch in args.archs:
        pl.seed_everything(0)
        data = DigitsDataModule(batch_size=64, val_fraction=0.2, seed=0)
        data.setup("fit")
        trained = {}
        for penalty in (0.0, args.penalty):
            pl.seed_everything(0)
            module = build(arch)
            start = time.perf_counter()
            trainer = pl.Trainer(
                accelerator="cpu",
                max_epochs=args.epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[SlimmingL1Callback(penalty=penalty)],
            )
            trainer.fit(module, datamodule=data)
            trained[penalty] = module
            records.append(
                {
                    "arch": arch,
                    "method": "train",
                    "penalty": penalty,
                    "acc": accuracy(module, data),
                    "seconds": time.perf_counter() - start,
                }
            )
        base = trained[args.penalty]
        head = head_name(arch)
        nodes0 = node_count(base, head)
        stats0 = model_stats(base, base.example_input_array[:1])
        for method in METHODS:
            for ratio in RATIOS:
                module = copy.deepcopy(base)
                start = time.perf_counter()
                try:
                    if method == "torch-pruning":
                        prune_torch_pruning(module, ratio, head)
                    else:
                        floor = args.floor if method == "ours-floor" else 0.0
                        prune_ours(module, ratio, restricted=method == "netslim", floor=floor)
                except Exception as err:  # report, do not hide
                    records.append({"arch": arch, "method": method, "ratio": ratio, "error": repr(err)[:200]})
                    continue
                stats = model_stats(module, module.example_input_array[:1])
                acc = accuracy(module, data)
                tuned = finetune(module, data, args.finetune_epochs) if ratio in FINETUNE_RATIOS else None
                records.append(
                    {
                        "arch": arch,
                        "method": method,
                        "ratio": ratio,
                        "acc": acc,
                        "acc_finetuned": tuned,
                        "nodes_removed": nodes0 - node_count(module, head),
                        "nodes": nodes0,
                        "params": stats.params,
                        "params0": stats0.params,
                        "macs": stats.macs,
                        "macs0": stats0.macs,
                        "seconds": time.perf_counter() - start,
                    }
                )
    return records


def render(records: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# Network Slimming: side by side (reduced CPU protocol)",
        "",
        "Produced by `python benchmarks/slimming_compare.py "
        f"--epochs {args.epochs} --penalty {args.penalty:g} --tolerance {args.tolerance:g} "
        f"--finetune-epochs {args.finetune_epochs} --floor {args.floor:g} "
        f"--out docs/benchmarks-slimming.md` on {platform.machine()}, 2 CPU cores (no GPU), "
        f"torch {torch.__version__}, torch-pruning {tp.__version__}; whole run {wall:.0f} s.",
        "",
        "Data: scikit-learn's 8×8 digits (1,437 train / 360 held out; CIFAR-10 is not on this machine).",
        f"Sparsity training: {args.epochs} epochs, SGD lr 0.05 cosine, batch 64, "
        f"`SlimmingL1Callback(penalty={args.penalty:g})` on every BatchNorm scale, seed 0.",
        "Then each method prunes copies of the same trained weights at ratios 0.05 … 0.90; accuracy is on",
        "the held-out split, **before any fine-tuning**. 'best' = most conv/linear output channels (nodes)",
        f"removed with accuracy ≥ trained − {args.tolerance:g}. `ours-floor` is `ours` with "
        f"`layer_floor={args.floor:g}`: every layer keeps at least {args.floor:.0%} of its channels.",
        "",
    ]
    for arch in args.archs:
        train = {r["penalty"]: r["acc"] for r in records if r["arch"] == arch and r["method"] == "train"}
        ref = train[args.penalty]
        lines += [
            f"## {arch}",
            "",
            f"Accuracy after training: {train[0.0]:.3f} without the penalty, {ref:.3f} with it "
            "(the reference).",
            "",
            "| method | best ratio | nodes removed | accuracy | params | MACs |",
            "|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            rows = [r for r in records if r["arch"] == arch and r["method"] == method and "acc" in r]
            ok = [r for r in rows if r["acc"] >= ref - args.tolerance]
            if not ok:
                lines.append(f"| {method} | — | 0 | — | — | — |")
                continue
            best = max(ok, key=lambda r: (r["nodes_removed"], r["acc"]))
            lines.append(
                f"| {method} | {best['ratio']:.2f} | {best['nodes_removed']} of {best['nodes']} "
                f"({best['nodes_removed'] / best['nodes']:.0%}) | {best['acc']:.3f} | "
                f"{best['params']:,} ({best['params'] / best['params0']:.2f}×) | "
                f"{best['macs']:,} ({best['macs'] / best['macs0']:.2f}×) |"
            )
        lines += [
            "",
            f"After pruning and {args.finetune_epochs} epochs of fine-tuning (SGD lr 0.01, cosine, gradient "
            "norm clipped at 1.0), accuracy:",
            "",
            "| method | " + " | ".join(f"ratio {r}" for r in FINETUNE_RATIOS) + " |",
            "|---|" + "---|" * len(FINETUNE_RATIOS),
        ]
        for method in METHODS:
            cells = []
            for ratio in FINETUNE_RATIOS:
                r = next(
                    (
                        r
                        for r in records
                        if r["arch"] == arch and r["method"] == method and r.get("ratio") == ratio
                    ),
                    None,
                )
                if r is None or r.get("acc_finetuned") is None:
                    cells.append("—")
                else:
                    cells.append(
                        f"{r['acc_finetuned']:.3f} ({r['nodes_removed']} nodes, {r['params']:,} params)"
                    )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "<details><summary>every ratio</summary>",
            "",
            "| method | ratio | nodes removed | accuracy | params |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in records:
            if r["arch"] != arch or r["method"] == "train":
                continue
            if "error" in r:
                lines.append(f"| {r['method']} | {r['ratio']:.2f} | error: {r['error']} | | |")
            else:
                lines.append(
                    f"| {r['method']} | {r['ratio']:.2f} | {r['nodes_removed']} | {r['acc']:.3f} "
                    f"| {r['params']:,} |"
                )
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def plot(records: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Accuracy before fine-tuning against params kept (top row) and MACs kept (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(args.archs)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 7.5), squeeze=False)
    for col, arch in enumerate(args.archs):
        ref = next(r["acc"] for r in records if r["arch"] == arch and r.get("penalty") == args.penalty)
        for row, (key, label) in enumerate((("params", "params kept"), ("macs", "MACs kept"))):
            ax = axes[row][col]
            for method, marker in zip(METHODS, "oDs^", strict=True):
                rows = sorted(
                    (r for r in records if r["arch"] == arch and r["method"] == method and "acc" in r),
                    key=lambda r: r[key],
                )
                xs = [r[key] / r[f"{key}0"] for r in rows]
                ax.plot(xs, [r["acc"] for r in rows], marker=marker, label=method)
            ax.axhline(
                ref - args.tolerance, color="grey", linestyle=":", label=f"trained − {args.tolerance:g}"
            )
            ax.set(
                xscale="log", xlabel=f"{label} (fraction)", ylabel="accuracy before fine-tuning", title=arch
            )
            ax.legend(loc="lower right")
    fig.suptitle("Network Slimming on digits: same sparsity-trained weights, four pruners")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["plain", "resnet"], choices=["plain", "resnet"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--penalty", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tune at ratios 0.3/0.5/0.7/0.9")
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed")
    parser.add_argument("--floor", type=float, default=0.1, help="layer_floor of the ours-floor variant")
    parser.add_argument("--jsonl", type=Path, help="write raw records here")
    parser.add_argument("--out", type=Path, help="markdown page (default: stdout)")
    parser.add_argument(
        "--plot", type=Path, help="write the accuracy-vs-params/MACs plot here (PNG, matplotlib)"
    )
    parser.add_argument("--from-jsonl", type=Path, help="render (and plot) a previous run's records")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.from_jsonl:
        records = [json.loads(line) for line in args.from_jsonl.read_text().splitlines() if line.strip()]
        wall = float(records[-1].get("wall", 0.0)) if records else 0.0
    else:
        records = run(args)
        wall = time.perf_counter() - start
        records.append({"method": "meta", "arch": None, "wall": wall})
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.plot:
        plot(records, args, args.plot)
    page = render(records, args, wall)
    if args.out:
        args.out.write_text(page + "\n")
    else:
        print(page)


if __name__ == "__main__":
    main()
