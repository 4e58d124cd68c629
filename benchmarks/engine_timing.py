"""Wall time of the channel-surgery engine on ResNet-50 and DenseNet-121 (CPU).

For each model: build the ChannelGraph (trace + group discovery), then `shrink` a copy in which 30% of the
channels of every prunable group were zeroed (graph build + dead-channel search + surgery + before/after
stats + output verification). Medians over ``--repeats`` runs, each on a fresh model.

    python benchmarks/engine_timing.py --size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from lightning_prune import ChannelGraph, shrink
from tests.helpers.nets import kill_channels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = torch.randn(1, 3, args.size, args.size)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, input {tuple(x.shape)}"
    )
    print("| model | groups | graph build (s) | shrink (s) | channels removed | params before → after |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        builds, shrinks = [], []
        for _ in range(args.repeats):
            model = torchvision.models.get_model(name).eval()
            start = time.perf_counter()
            groups = len(ChannelGraph(model, x).groups)
            builds.append(time.perf_counter() - start)
            kill_channels(model, x, 0.3)
            start = time.perf_counter()
            report = shrink(model, x)
            shrinks.append(time.perf_counter() - start)
        build, shrink_time = statistics.median(builds), statistics.median(shrinks)
        before, after = report.before.params / 1e6, report.after.params / 1e6
        print(
            f"| {name} | {groups} | {build:.2f} | {shrink_time:.2f} | "
            f"{report.channels_removed} | {before:.2f} M → {after:.2f} M |"
        )


if __name__ == "__main__":
    main()
