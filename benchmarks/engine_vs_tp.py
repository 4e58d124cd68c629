"""CPU time of the channel engine against plain Torch-Pruning, on the same channels (torchvision, 224 px).

Target: ``shrink(verify=False, stats=False)`` (graph build + dead-channel search + surgery, the like-for-like
run) within 1.2x of Torch-Pruning's ``DependencyGraph`` build + ``get_pruning_group`` + ``group.prune()``
removing exactly the same channels. ``shrink`` with its defaults (statistics and output verification, which
Torch-Pruning does not do) is timed too: its verification needs one more forward pass, so it cannot be.

For each model (``weights=None``, eval, input 1x3x224x224) 30% of the channels of every
prunable exact group are zeroed once (seed 0, as ``tests/helpers/nets.kill_channels``); every timed run
then works on a fresh ``copy.deepcopy`` of that prepared model (the copy is not timed).

Each repeat runs, in this order: ``shrink(model, x)``, TP, ``shrink(model, x, verify=False,
stats=False)``, TP,
``ChannelGraph`` build + ``.groups``, so that machine noise hits both engines. Times are process CPU
time (``time.process_time``) with ``torch.set_num_threads(1)``; the table shows medians (TP: over both
of its runs per repeat). After every TP run the parameter and buffer shapes are asserted equal to those
``shrink`` produced, and in the first repeat the TP-pruned outputs are checked against the unpruned ones.

    OMP_NUM_THREADS=1 python benchmarks/engine_vs_tp.py --repeats 3 \\
        --out docs/data/engine_vs_tp.md --jsonl docs/data/engine_vs_tp.jsonl

Columns: *bare* = ``shrink(verify=False, stats=False)``, the engine's work alone (no statistics, no output
check), and its ratio to TP (target <= 1.2); *ours* = ``shrink(model, x)`` end to end with statistics and
verification, and its ratio; *TP* = ``build_dependency`` + per group ``get_pruning_group`` + ``prune``.
Breakdown: *build* = ``ChannelGraph(model, x)``; *groups* = its ``.groups`` listing; *TP build* / *TP
groups+prune* = the two parts of the TP run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
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

from lightning_prune import ChannelGraph, shrink  # noqa: E402
from tests.helpers.nets import kill_channels  # noqa: E402

MODELS = ["resnet50", "densenet121", "vgg16_bn", "mobilenet_v2"]
FRACTION = 0.3
TARGET = 1.2
TIMES = ("ours", "ours_bare", "build", "groups", "tp", "tp_build", "tp_prune")  # CPU seconds per run


def prepare(name: str, x: torch.Tensor, seed: int = 0) -> tuple[nn.Module, dict, dict]:
    """The model with 30% of each prunable exact group's channels zeroed, the plan and the TP indices.

    Returns:
        The prepared model; group name → dead channels (what ``shrink`` should remove); group name →
        the root layer's output-channel indices for Torch-Pruning (tied copies expanded).
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    graph = ChannelGraph(model, x)
    kill_channels(model, x, FRACTION, seed=seed, graph=graph)
    groups = {g.name: g for g in graph.groups}
    plan = {n: d for n, d in graph.dead_channels().items() if d and groups[n].exact}
    modules = dict(model.named_modules())
    tp_idxs = {}
    for name_, dead in plan.items():
        group, root = groups[name_], modules[name_]
        width = root.out_channels if isinstance(root, nn.modules.conv._ConvNd) else root.out_features
        stride = width // group.ties
        tp_idxs[name_] = sorted(c + k * stride for c in dead for k in range(group.ties))
    return model, plan, tp_idxs


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def run_ours(prepared: nn.Module, x: torch.Tensor, bare: bool):
    model = copy.deepcopy(prepared)
    gc.collect()
    start = time.process_time()
    report = shrink(model, x, verify=not bare, stats=not bare)
    return time.process_time() - start, model, report


def run_build(prepared: nn.Module, x: torch.Tensor) -> tuple[float, float, int]:
    model = copy.deepcopy(prepared)
    gc.collect()
    start = time.process_time()
    graph = ChannelGraph(model, x)
    built = time.process_time()
    n = len(graph.groups)
    return built - start, time.process_time() - built, n


def run_tp(prepared: nn.Module, x: torch.Tensor, tp_idxs: dict) -> tuple[float, float, nn.Module]:
    """Torch-Pruning alone: build the graph, then one group per root, pruned in model order."""
    model = copy.deepcopy(prepared)
    gc.collect()
    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    built = time.process_time()
    modules = dict(model.named_modules())
    for name, idxs in tp_idxs.items():
        root = modules[name]
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune(record_history=False)
    end = time.process_time()
    return built - start, end - built, model


def bench(name: str, x: torch.Tensor, repeats: int) -> dict:
    prepared, plan, tp_idxs = prepare(name, x)
    with torch.no_grad():
        reference = prepared(x)
    rec: dict = {"model": name, "input": list(x.shape), "groups_pruned": len(plan)}
    rec |= {key: [] for key in TIMES}
    full = None
    for r in range(repeats):
        for bare in (False, True):
            seconds, ours, report = run_ours(prepared, x, bare)
            rec["ours_bare" if bare else "ours"].append(seconds)
            if not bare:
                full = report
            expected = {n: len(idx) for n, idx in tp_idxs.items()}
            assert report.removed == expected, f"{name}: shrink removed {report.removed}, expected {expected}"
            want = shapes(ours)
            build_s, prune_s, theirs = run_tp(prepared, x, tp_idxs)
            rec["tp"].append(build_s + prune_s)
            rec["tp_build"].append(build_s)
            rec["tp_prune"].append(prune_s)
            got = shapes(theirs)
            diff = sorted(set(got.items()) ^ set(want.items()))[:6]
            assert got == want, f"{name}: TP shapes differ from ours: {diff}"
            if r == 0 and not bare:
                with torch.no_grad():
                    out = theirs.eval()(x)
                assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5), f"{name}: TP changed outputs"
        build_s, groups_s, rec["groups_total"] = run_build(prepared, x)
        rec["build"].append(build_s)
        rec["groups"].append(groups_s)
    rec["channels_removed"] = full.channels_removed
    rec["params"] = [full.before.params, full.after.params]
    rec["median"] = {key: statistics.median(rec[key]) for key in TIMES}
    rec["ratio"] = rec["median"]["ours"] / rec["median"]["tp"]
    rec["ratio_bare"] = rec["median"]["ours_bare"] / rec["median"]["tp"]
    return rec


def render(records: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | groups (pruned / all) | channels removed | bare CPU s | TP CPU s | bare / TP | "
        "ours CPU s (/ TP) | build | groups | TP build | TP groups+prune |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["median"]
        flag = "" if r["ratio_bare"] <= TARGET else " ✗"
        lines.append(
            f"| {r['model']} | {r['groups_pruned']} / {r['groups_total']} | {r['channels_removed']:,} | "
            f"{m['ours_bare']:.3f} | {m['tp']:.3f} | **{r['ratio_bare']:.2f}**{flag} | "
            f"{m['ours']:.3f} ({r['ratio']:.2f}) | {m['build']:.3f} | {m['groups']:.3f} | "
            f"{m['tp_build']:.3f} | {m['tp_prune']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--jsonl", type=Path, help="append one JSON record per model here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    header = (
        f"`{' '.join(['python', *sys.argv])}` — torch {torch.__version__}, torch_pruning "
        f"{getattr(tp, '__version__', '?')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread, input {tuple(x.shape)}, {args.repeats} repeats, "
        f"process CPU seconds (medians), target bare / TP <= {TARGET}"
    )
    print(header, flush=True)
    records = []
    for name in args.models:
        rec = bench(name, x, args.repeats)
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("model", "median", "ratio", "ratio_bare")}), flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(rec) + "\n")
    table = render(records, header)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
