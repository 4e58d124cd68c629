"""Latency speedup against MACs reduction: ours and Torch-Pruning, with and without rounded channel counts.

For each model and pruning amount, in one run and on one CPU thread, five variants of the same randomly
initialised torchvision model (seed 0, eval mode) are built and timed:

- *dense*: the model as built;
- *ours* / *ours r8*: :func:`lightning_prune.prune_channels` (L1-norm scores, one global ranking over the
  channel groups, ``amount`` of the nodes removed) without rounding / with ``round_to=8``;
- *ours r8 lat*: the same with ``latency_aware=True``: rounded counts moved to the fast side of latency
  steps measured layer by layer on this machine (batch 1);
- *TP* / *TP r8*: Torch-Pruning's ``MetaPruner`` with ``MagnitudeImportance(p=1)``, global pruning,
  ``pruning_ratio=amount``, the classifier ignored, without / with ``round_to=8``.

Each variant can be run in several *modes* (``--modes``; the modes other than ``eager`` time only *dense*,
*ours r8* and *TP r8*):

- ``eager``: the model as it is (NCHW, BatchNorm layers and all);
- ``deploy``: :func:`lightning_prune.structure.fold_batchnorm` (BatchNorm folded into the convolutions),
  then weights and input in the channels-last memory format;
- ``compile``: ``torch.compile`` of the BN-folded model (inductor's default settings);
- ``frozen``: the same with ``torch._inductor.config.freezing = True`` (weights treated as constants:
  inductor pre-packs them for oneDNN and folds constants; inference only).

Latency is the median of ``--repeats`` rounds; in each round every (variant, mode) runs ``--calls`` timed
forward passes (batch 1, after 3 warm-up calls; compiled models are compiled before the first round) in
alternating order, and the round's figure is their median. The table gives MACs reduction (dense MACs /
pruned MACs), speedup (dense latency / pruned latency, both in the same mode) and their ratio, the
*efficiency* (1.0: the latency falls as much as the MACs), with the spread of the speedup (min–max over
rounds).

    OMP_NUM_THREADS=1 python benchmarks/speedup.py --repeats 7 --out docs/data/speedup.md
    OMP_NUM_THREADS=1 python benchmarks/speedup.py --repeats 7 --modes eager deploy compile frozen
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch_pruning as tp
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_prune import model_stats, prune_channels  # noqa: E402
from lightning_prune.structure import fold_batchnorm  # noqa: E402

CASES = [("resnet18", 0.5, 224), ("resnet18", 0.7, 224), ("mobilenet_v2", 0.5, 224), ("vgg16_bn", 0.5, 32)]
CASES += [("resnet50", 0.5, 224)]
MODES = ("eager", "deploy", "compile", "frozen")
DEPLOYED = ("dense", "ours r8", "TP r8")  # the variants timed in the modes other than eager


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=1000).eval()


def ours(
    model: nn.Module, x: torch.Tensor, amount: float, round_to: int, latency_aware: bool = False
) -> nn.Module:
    prune_channels(model, x, amount, round_to=round_to, latency_aware=latency_aware)
    return model


def torch_pruning(model: nn.Module, x: torch.Tensor, amount: float, round_to: int | None) -> nn.Module:
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=amount,
            global_pruning=True,
            ignored_layers=[head],
            round_to=round_to,
        )
        pruner.step()
    return model


def latency(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[nn.Module, torch.Tensor]:
    """``model`` and ``x`` ready to be timed in ``mode`` (compiled ones compiled already)."""
    if mode == "eager":
        return model, x
    folded = fold_batchnorm(model, x)
    if mode == "deploy":
        last = torch.channels_last
        return folded.to(memory_format=last), x.contiguous(memory_format=last)
    # A traced copy has a forward of its own: compiled models of one family would otherwise share the
    # code object dynamo caches on, and a model compiled later (frozen) could run code compiled earlier.
    traced = torch.fx.symbolic_trace(folded)
    with torch._inductor.config.patch(freezing=mode == "frozen"), torch.no_grad():
        compiled = torch.compile(traced)
        compiled(x)  # compiles now, under this configuration
    return compiled, x


def bench(
    name: str, amount: float, size: int, repeats: int, calls: int, modes: tuple[str, ...] = ("eager",)
) -> list[dict]:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    variants = {
        "dense": build(name),
        "ours": ours(build(name), x, amount, 1),
        "ours r8": ours(build(name), x, amount, 8),
        "ours r8 lat": ours(build(name), x, amount, 8, latency_aware=True),
        "TP": torch_pruning(build(name), x, amount, None),
        "TP r8": torch_pruning(build(name), x, amount, 8),
    }
    macs = {k: model_stats(m, x).macs for k, m in variants.items()}
    torch._dynamo.reset()  # each case compiles afresh (the models of a family share their code objects)
    runs = {
        (key, mode): prepare(model, x, mode)
        for mode in modes
        for key, model in variants.items()
        if mode == "eager" or key in DEPLOYED
    }
    rounds = alternating_rounds(runs, repeats, calls)
    rows = []
    for (key, mode), times in rounds.items():
        model = variants[key]
        dense_times = rounds["dense", mode]
        dense, lat = statistics.median(dense_times), statistics.median(times)
        speedups = [d / p for d, p in zip(dense_times, times, strict=True)]
        reduction = macs["dense"] / macs[key]
        rows.append(
            {
                "model": name,
                "amount": amount,
                "input": size,
                "variant": key,
                "mode": mode,
                "params": sum(p.numel() for p in model.parameters()),
                "macs_reduction": reduction,
                "latency_ms": 1e3 * lat,
                "speedup": dense / lat,
                "speedup_spread": (min(speedups), max(speedups)),
                "efficiency": (dense / lat) / reduction,
                "odd_layers": sum(
                    m.out_channels % 8 != 0 for m in model.modules() if isinstance(m, nn.Conv2d)
                ),
            }
        )
    return rows


def render(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | amount | input | variant | mode | params | MACs reduction | latency ms | "
        "speedup (min–max) | efficiency | convs with out_channels % 8 != 0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["speedup_spread"]
        lines.append(
            f"| {r['model']} | {r['amount']:.0%} | {r['input']} | {r['variant']} | {r['mode']} | "
            f"{r['params']:,} | "
            f"{r['macs_reduction']:.2f}× | {r['latency_ms']:.2f} | {r['speedup']:.2f}× ({lo:.2f}–{hi:.2f}) | "
            f"{r['efficiency']:.2f} | {r['odd_layers']} |"
        )
    return "\n".join(lines) + "\n"


def render_efficiency(rows: list[dict]) -> str:
    """Efficiency by case and variant (rows) and mode (columns), for the variants timed in every mode.

    The last columns compare each model run its fastest way with the dense model run its fastest way.
    """
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cells = {(r["model"], r["amount"], r["variant"], r["mode"]): r for r in rows}
    head = "| model | amount | variant | " + " | ".join(modes) + " | fastest dense → fastest pruned | "
    lines = [head + "speedup | efficiency |", "|---" * (6 + len(modes)) + "|"]
    for model, amount, variant in dict.fromkeys((r["model"], r["amount"], r["variant"]) for r in rows):
        if variant == "dense" or any((model, amount, variant, m) not in cells for m in modes):
            continue
        effs = " | ".join(f"{cells[model, amount, variant, m]['efficiency']:.2f}" for m in modes)
        dense = min((cells[model, amount, "dense", m] for m in modes), key=lambda r: r["latency_ms"])
        best = min((cells[model, amount, variant, m] for m in modes), key=lambda r: r["latency_ms"])
        speedup = dense["latency_ms"] / best["latency_ms"]
        lines.append(
            f"| {model} | {amount:.0%} | {variant} | {effs} | {dense['mode']} {dense['latency_ms']:.2f} ms → "
            f"{best['mode']} {best['latency_ms']:.2f} ms | {speedup:.2f}× | "
            f"{speedup / best['macs_reduction']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def alternating_rounds(runs: dict, repeats: int, calls: int) -> dict:
    """Key → latency per round of ``runs[key] = (model, input)``, the order reversed every other round."""
    rounds: dict = {key: [] for key in runs}
    order = list(runs)
    for r in range(repeats):
        for key in order if r % 2 == 0 else reversed(order):
            rounds[key].append(latency(*runs[key], calls))
    return rounds


def timing_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every latency benchmark here takes: rounds, calls per round, which models."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--models", nargs="+", help="limit to these model names")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=["eager"], help="ways of running the models (see above)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = (
        f"`{' '.join(['python', *sys.argv])}` — torch {torch.__version__}, torch_pruning "
        f"{getattr(tp, '__version__', '?')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread, batch 1, {args.repeats} rounds of {args.calls} calls (medians)"
    )
    print(header, flush=True)
    rows = []
    for name, amount, size in CASES:
        if args.models and name not in args.models:
            continue
        found = bench(name, amount, size, args.repeats, args.calls, tuple(args.modes))
        rows += found
        print(render(found, "").strip(), flush=True)
    summary = "Efficiency by mode:\n\n" + render_efficiency(rows) if len(args.modes) > 1 else ""
    print(summary, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(rows, header) + ("\n" + summary if summary else ""))


if __name__ == "__main__":
    main()
