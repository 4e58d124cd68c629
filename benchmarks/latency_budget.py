"""Experiment: a latency-budget planner (HALP-style) against the MACs-budget plan, same predicted latency.

HALP (Shen et al., 2022, arXiv:2110.10811) chooses channels by importance per unit of *latency* saved,
from a table of measured layer latencies, until a latency budget is met. Here, for each case:

1. *ours r8*: :func:`lightning_prune.prune_channels` (L1 norms, one global ranking, ``round_to=8``).
2. Its latency is *predicted* as the sum of every convolution/linear layer's measured time at its planned
   channel counts (fresh layers on the traced input shapes, fastest of 7 calls; the lookup table of
   :mod:`lightning_prune.structure.latency`).
3. *budget*: starting from the dense model, units of 8 channels are removed greedily: each step removes,
   from one group, the 1–16 lowest-scoring units with the least L1 importance lost per predicted second
   saved, until the predicted latency is at most that of *ours r8*.

Both (and dense) are then timed as in ``speedup.py`` (alternating rounds, eager and ``deploy`` — BN
folded, channels-last), and the table gives MACs reduction, speedup, efficiency and the L1 importance
kept (the criterion's own measure of what the plan keeps; higher is better at equal latency).

Not part of the package: an experiment whose result is reported in docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/latency_budget.py --repeats 7
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speedup import alternating_rounds, build, prepare, timing_parser  # noqa: E402

import lightning_prune.structure.latency as lut  # noqa: E402
from lightning_prune import ChannelGraph, model_stats  # noqa: E402
from lightning_prune.criteria import ScoringInputs, get_criterion  # noqa: E402
from lightning_prune.structure import lowest_channels  # noqa: E402

CASES = [("resnet18", 0.7, 224), ("resnet18", 0.5, 224), ("mobilenet_v2", 0.5, 224)]
UNIT = 8


class Predictor:
    """Predicted seconds of the conv/linear layers for given channels removed per group."""

    def __init__(self, graph: ChannelGraph, groups: list, x: torch.Tensor) -> None:
        self.graph, self.groups = graph, {g.name: g for g in groups}
        self.dims = lut._planned_dims(graph, {}, x, groups)  # full counts and traced input shapes
        self.touch: dict[str, list[tuple[str, str, float]]] = {}  # group -> (layer, role, rows per channel)
        for g in groups:
            for s in lut._weight_slices(graph, g):
                name = s.param.removesuffix(".weight")
                if name in self.dims:
                    self.touch.setdefault(g.name, []).append((name, s.role, len(s.positions) / g.size))

    def counts(self, removed: dict[str, int]) -> dict[str, tuple[int, int]]:
        out = {n: [d.out, d.inp] for n, d in self.dims.items()}
        for group, k in removed.items():
            for name, role, per in self.touch.get(group, []):
                out[name][0 if role == "out" else 1] -= round(k * per)
        return {n: (o, i) for n, (o, i) in out.items()}

    def layer(self, name: str, out: int, inp: int) -> float:
        return lut._layer_seconds(self.dims[name], out, inp, 7)

    def total(self, removed: dict[str, int]) -> float:
        return sum(self.layer(n, o, i) for n, (o, i) in self.counts(removed).items())


def scores_of(model: nn.Module, groups: list) -> dict[str, torch.Tensor]:
    criterion = get_criterion("l1_norm", structured=True, owner="latency_budget")
    found = criterion.node_scores(ScoringInputs(model, {}, lambda: iter(()), groups))
    return {n: v.detach().float() for n, v in found.items()}


def budget_plan(
    graph: ChannelGraph, groups: list, scores: dict, x: torch.Tensor, target: float
) -> dict[str, list[int]]:
    """Greedy: remove the units with the least importance lost per predicted second saved."""
    predictor = Predictor(graph, groups, x)
    order = {n: torch.argsort(scores[n]).tolist() for n in scores}  # lowest score first
    sorted_scores = {n: scores[n][order[n]] for n in scores}
    removed = {n: 0 for n in scores}
    now = predictor.total(removed)
    while now > target:
        best = None
        counts = predictor.counts(removed)
        for name in scores:
            size, touched = predictor.groups[name].size, predictor.touch.get(name, [])
            before = sum(predictor.layer(n, *counts[n]) for n, _, _ in touched)
            for units in (1, 2, 3, 4, 6, 8, 12, 16):
                k = removed[name] + units * UNIT
                if k > size - UNIT:
                    break
                after_counts = predictor.counts({**removed, name: k})
                if any(min(after_counts[n]) < 1 for n, _, _ in touched):
                    break
                after = sum(predictor.layer(n, *after_counts[n]) for n, _, _ in touched)
                saved = before - after
                if saved <= 0:
                    continue
                lost = float(sorted_scores[name][removed[name] : k].sum())
                if best is None or lost / saved < best[0]:
                    best = (lost / saved, name, k, saved)
        if best is None:
            break
        _, name, k, saved = best
        removed[name] = k
        now = predictor.total(removed)
    return {n: sorted(order[n][:k]) for n, k in removed.items() if k}


def bench(name: str, amount: float, size: int, repeats: int, calls: int) -> list[str]:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    base = build(name)
    graph = ChannelGraph(base, x)
    groups = [g for g in graph.groups if g.prunable and g.size > 1]
    scores = scores_of(base, groups)
    reference = lowest_channels(graph, scores, amount, UNIT)
    predictor = Predictor(graph, groups, x)
    target = predictor.total({n: len(c) for n, c in reference.items()})
    plans = {"ours r8": reference, "budget": budget_plan(graph, groups, scores, x, target)}
    predicted = {k: predictor.total({n: len(c) for n, c in p.items()}) for k, p in plans.items()}
    total_importance = sum(float(s.sum()) for s in scores.values())
    kept = {
        k: 1 - sum(float(scores[n][c].sum()) for n, c in p.items()) / total_importance
        for k, p in plans.items()
    }
    models = {"dense": build(name)}
    for key, plan in plans.items():
        model = build(name)
        ChannelGraph(model, x).prune(plan)
        models[key] = model
    macs = {k: model_stats(m, x).macs for k, m in models.items()}
    runs = {(k, mode): prepare(m, x, mode) for mode in ("eager", "deploy") for k, m in models.items()}
    rounds = alternating_rounds(runs, repeats, calls)
    rows = []
    for (key, mode), times in rounds.items():
        if key == "dense":
            continue
        dense = rounds["dense", mode]
        speedups = [d / p for d, p in zip(dense, times, strict=True)]
        speedup = statistics.median(dense) / statistics.median(times)
        reduction = macs["dense"] / macs[key]
        rows.append(
            f"| {name} | {amount:.0%} | {key} | {mode} | {1e3 * predicted[key]:.2f} | {reduction:.2f}× | "
            f"{1e3 * statistics.median(times):.2f} | {speedup:.2f}× "
            f"({min(speedups):.2f}–{max(speedups):.2f}) | {speedup / reduction:.2f} | {kept[key]:.3f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = timing_parser(__doc__)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"`{' '.join(['python', *sys.argv])}` — torch {torch.__version__}, 1 thread, batch 1\n")
    print(
        "| model | amount | plan | mode | predicted conv+linear ms | MACs reduction | latency ms | "
        "speedup (min–max) | efficiency | L1 importance kept |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        if not args.models or case[0] in args.models:
            for row in bench(*case, args.repeats, args.calls):
                print(row, flush=True)


if __name__ == "__main__":
    main()
