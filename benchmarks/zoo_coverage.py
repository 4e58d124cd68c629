"""Which torchvision classification models `shrink` handles exactly: docs/supported-architectures.md.

Every model (``weights=None``, ``num_classes=10``, eval mode, BatchNorm statistics calibrated, see
``tests/helpers/zoo.py``) gets a random 30% of the channels of every prunable, exact group killed
(producing parameters zeroed); reference outputs are computed, the model is shrunk without shrink's
own verification, and the outputs are compared (rtol 1e-4, atol 1e-5).

Usage, from the repository root::

    python benchmarks/zoo_coverage.py --jsonl zoo.jsonl --out docs/supported-architectures.md
    python benchmarks/zoo_coverage.py --jsonl zoo.jsonl resnet18 vgg11_bn   # some models only

Each model runs in a fresh subprocess under an address-space limit (``--memory-gb``) and a time
limit (``--timeout``), so a crash or a memory blow-up is recorded, not fatal. Results are appended
to ``--jsonl`` as they come; models already there are skipped unless ``--rerun`` is given, so an
interrupted run resumes. ``--no-run`` only renders the file. Without ``--out`` the page goes to
stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import traceback
from collections import Counter
from functools import partial

import _coverage
from _coverage import ROOT, add_survey_args, first_line, load_jsonl, survey, write_page

FRACTION = 0.3
MEMORY_GB = 16.0

# Why a family fails, for the page (the raw error is shown as well). A key lists name prefixes; the
# first key with a matching prefix applies. Empty since the engine checks shape operations itself:
# ShuffleNetV2's channel shuffle, Swin's window partitions and patch merging and MaxViT's partitions,
# which Torch-Pruning misread, now shrink exactly (docs/exactness.md).
EXPLANATIONS: dict[str, str] = {}

NOTES = """\
## Reading the table

- **removed / killed**: channels `shrink` removed / channels the test zeroed (equal when every
  dead channel goes; tied copies in grouped convolutions count separately).
- **params, MACs**: after shrinking, as a fraction of before.
- **groups: shrunk / LayerNorm / fixed**: channel groups that can shrink exactly; groups left
  alone because a LayerNorm (or GroupNorm) normalizes across their channels, so removing even a
  dead channel changes the statistics (the residual stream of ConvNeXt, ViT, Swin, MaxViT); and
  groups that cannot be resized at all (the classifier output, `nn.MultiheadAttention` embedding
  dims in ViT, channels behind a reshape the engine cannot follow).
- Inputs are small (64×64 for CNNs, 96×96 for Inception v3, 224×224 where positional
  embeddings or partitions need it); the result does not depend on the size.
- **peak RSS, seconds**: of the whole check (build, calibrate, trace, kill, shrink, compare) in
  its own process, one model at a time, under a 16 GB address-space limit. The machine (2 CPU
  cores) was shared with other jobs, and two busy processes on 2 cores can slow each other's
  thread pools down tenfold: read the seconds as indicative only.
"""


def run_one(name: str, memory_gb: float, fraction: float = FRACTION) -> dict:
    """Kill, shrink and compare one model; never raises."""
    sys.path.insert(0, str(ROOT))
    import torch

    from lightning_prune import ChannelGraph, shrink
    from tests.helpers.nets import kill_channels
    from tests.helpers.zoo import address_space_limit, zoo_model

    record: dict = {"model": name, "status": "error"}
    start = time.perf_counter()
    stage = "build"
    try:
        with address_space_limit(memory_gb):
            model, x = zoo_model(name)
            record["input"] = list(x.shape)
            stage = "trace"
            graph = ChannelGraph(model, x)
            groups = graph.groups
            record["groups_exact"] = sum(g.prunable and g.exact for g in groups)
            record["groups_inexact"] = sum(g.prunable and not g.exact for g in groups)
            record["channels_inexact"] = sum(g.size for g in groups if g.prunable and not g.exact)
            record["not_prunable"] = dict(Counter(_reason_kind(g.reason) for g in groups if not g.prunable))
            stage = "kill"
            record["killed"] = kill_channels(model, x, fraction, seed=0, graph=graph)
            with torch.no_grad():
                reference = model(x)
            stage = "shrink"
            report = shrink(model, x, verify=False)
            with torch.no_grad():
                output = model(x)
        stage = "compare"
        record["removed"] = report.channels_removed
        record["params"] = [report.before.params, report.after.params]
        record["macs"] = [report.before.macs, report.after.macs]
        record["max_abs_diff"] = float((output - reference).abs().max())
        record["output_scale"] = float(reference.abs().max())
        same = output.shape == reference.shape and torch.allclose(output, reference, rtol=1e-4, atol=1e-5)
        record["status"] = "exact" if same else "changed"
    except Exception as err:  # recorded: the page says why
        record["stage"] = stage
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return record


def _reason_kind(reason: str) -> str:
    """A short label for why a group is not prunable."""
    if "cannot be resized here" in reason:
        return "attention embed dim"
    if "frozen" in reason:
        return "classifier output"
    if "reshape" in reason:
        return "behind an unsupported reshape"
    if "grouped layer behind" in reason:
        return "grouped conv behind concat/split"
    return reason.split(";")[0][:60]


def run_isolated(name: str, timeout: float, memory_gb: float) -> dict:
    """Run :func:`run_one` in a fresh interpreter."""
    return _coverage.run_isolated(__file__, name, timeout, ["--memory-gb", str(memory_gb)])


def classification_models() -> list[str]:
    """Every classification model torchvision registers."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def render(records: list[dict], command: str) -> str:
    """The supported-architectures page."""
    import torch
    import torch_pruning
    import torchvision

    by_name = {r["model"]: r for r in records}
    names = [n for n in classification_models() if n in by_name]
    exact = [n for n in names if by_name[n]["status"] == "exact"]
    failed = [n for n in names if n not in exact]
    lines = [
        "# Supported architectures",
        "",
        f"`shrink` removes dead channels exactly from **{len(exact)} of the {len(names)}** "
        f"classification models in torchvision {torchvision.__version__} (torch "
        f"{torch.__version__}, Torch-Pruning {torch_pruning.__version__}, {platform.machine()} "
        "CPU).",
        "",
        f"Each model was built with `weights=None, num_classes=10`, its BatchNorm statistics "
        f"calibrated on random images, {FRACTION:.0%} of the channels of every prunable, exact "
        "group killed (producing parameters zeroed) and shrunk with `verify=False`; the outputs "
        "before and after were then compared in eval mode (`allclose`, rtol 1e-4, atol 1e-5). "
        "`tests/test_zoo.py` runs the same check (`pytest -m slow` for every model).",
        "",
        "Produced by (from the repository root; about 40 minutes on 2 CPU cores):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    if failed:
        lines += ["## Not supported", ""]
        # One bullet per family and error, e.g. the four ShuffleNetV2 widths together.
        bullets: dict[tuple[str, str], list[str]] = {}
        for n in failed:
            r = by_name[n]
            family = next((k for k in EXPLANATIONS if n.startswith(tuple(k.split()))), n)
            error = first_line(r.get("error", f"outputs changed by {r.get('max_abs_diff')}"))
            bullets.setdefault((family, f"{r.get('stage', 'compare')}: {error}"), []).append(n)
        for (family, error), models in bullets.items():
            why = EXPLANATIONS.get(family, "")
            listed = ", ".join(f"**{m}**" for m in models)
            lines.append(f"- {listed} ({error.replace('`', '')}). {why}".rstrip())
        lines.append("")
    lines += [
        "## Results",
        "",
        "| model | input | exact | removed / killed | params | MACs | groups: shrunk / "
        "LayerNorm / fixed | peak RSS | seconds | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(_row(by_name[n]))
    lines += ["", NOTES]
    return "\n".join(lines)


def _row(r: dict) -> str:
    size = f"{r['input'][-1]}" if r.get("input") else "-"
    rss = f"{r['peak_rss_gb']:.1f} GB" if "peak_rss_gb" in r else "-"
    seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
    if "removed" not in r:
        error = first_line(r.get("error", "")).replace("|", "\\|")
        return f"| {r['model']} | {size} | no | - | - | - | - | {rss} | {seconds} | {error} |"
    ok = "yes" if r["status"] == "exact" else f"**no** (diff {r['max_abs_diff']:.2g})"
    params = r["params"][1] / r["params"][0]
    macs = r["macs"][1] / max(r["macs"][0], 1)
    fixed = sum(r["not_prunable"].values())
    groups = f"{r['groups_exact']} / {r['groups_inexact']} / {fixed}"
    notes = []
    if r["groups_inexact"]:
        notes.append(f"{r['channels_inexact']:,} channels LayerNorm-coupled")
    for kind, count in sorted(r["not_prunable"].items()):
        if kind != "classifier output":
            notes.append(f"{count} {kind}")
    removed = f"{r['removed']:,} / {r['killed']:,}"
    return (
        f"| {r['model']} | {size} | {ok} | {removed} | {params:.0%} | {macs:.0%} | {groups} | "
        f"{rss} | {seconds} | {'; '.join(notes)} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_survey_args(parser, timeout=1800.0, memory_gb=MEMORY_GB)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_one(args.child, args.memory_gb)), flush=True)
        return

    records = load_jsonl(args.jsonl)
    if not args.no_run:
        names = args.models or classification_models()
        run = partial(run_isolated, timeout=args.timeout, memory_gb=args.memory_gb)
        survey(names, records, run, args.jsonl, args.rerun)
    # The command that reproduces the page from scratch (paths of this run left out).
    command = "python benchmarks/zoo_coverage.py --jsonl zoo.jsonl --out docs/supported-architectures.md"
    if args.memory_gb != MEMORY_GB:
        command += f" --memory-gb {args.memory_gb:g}"
    write_page(render(list(records.values()), command), args.out)


if __name__ == "__main__":
    main()
