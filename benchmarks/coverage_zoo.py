"""Does `shrink` keep its contract on timm and Hugging Face transformers models? Exact, or refused untouched.

Every model (random init, small inputs, eval mode, BatchNorm statistics calibrated; see
``tests/helpers/zoo_timm.py`` and ``tests/helpers/zoo_hf.py``) gets a random 30% of the channels of
every prunable, exact group killed (producing parameters zeroed); reference outputs are computed, the
model is shrunk with ``verify=False`` and the outputs are compared (rtol 1e-4, atol 1e-5). Outcomes:

- ``exact``: shrunk, same outputs (also when float32 outputs differ but the same check in float64
  agrees to 1e-6 of the output scale: rounding that random weights amplify, listed apart);
- ``refused``: a ``PruningError`` was raised and the model is untouched (same state dict, same outputs);
- bad: ``changed-outputs``, ``broken-model`` (fails to run after shrinking), ``refused-but-modified``,
  ``crash`` (any other exception), ``timeout``, ``memory`` (MemoryError under the address-space limit,
  also when wrapped in a PruningError, or killed); ``no-build`` (the zoo harness could not build it).

Usage, from the repository root::

    python benchmarks/coverage_zoo.py --zoo timm --jsonl timm.jsonl --out docs/coverage-timm.md
    python benchmarks/coverage_zoo.py --zoo transformers --jsonl hf.jsonl --out docs/coverage-transformers.md
    python benchmarks/coverage_zoo.py --zoo timm --jsonl timm.jsonl resnet10t vit_tiny_patch16_224

timm: one model per family (the variant with the fewest parameters; the choice is cached next to
``--jsonl`` as ``<jsonl>.families.json``). Runs one model at a time, each in a process forked from
one that imported the libraries once (so the code under test is the same for the whole run), under
``--timeout`` and ``--memory-gb``, resuming from ``--jsonl`` like ``zoo_coverage.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from collections import Counter
from functools import partial
from pathlib import Path

import _coverage
from _coverage import ROOT, add_survey_args, first_line, load_jsonl, survey, write_page

FRACTION = 0.3
# Relative difference in float64 below which a float32 mismatch is rounding (random weights amplify it),
# not a misread operation (which leaves about the same difference in float64 as in float32).
ROUNDING = 1e-6
MEMORY_GB = 12.0
TIMEOUT = 180.0
OUTCOMES = (
    "exact",
    "refused",
    "changed-outputs",
    "broken-model",
    "refused-but-modified",
    "crash",
    "timeout",
    "memory",
    "no-build",
)
FIXED_KINDS = {"View": "reshape", "Split": "split", "Slice": "slice", "concatenation": "concat"}
# Beyond the smallest of each family: variants whose one operation differs (ConvNeXt V2's GRN, LayerNorm
# ConvNeXt against the SimpleNorm of convnext_zepto_rms, ResNet with BlurPool anti-aliasing).
EXTRA_TIMM = ("convnextv2_atto", "convnext_atto", "resnetblur18")
TITLES = {"timm": "timm", "transformers": "Hugging Face transformers"}


def run_one(zoo: str, name: str, memory_gb: float) -> dict:
    """Build, kill, shrink and compare one model, and classify the outcome; never raises."""
    sys.path.insert(0, str(ROOT))
    from lightning_prune import ChannelGraph, PruningError, shrink
    from tests.helpers.nets import kill_channels
    from tests.helpers.zoo import address_space_limit

    record: dict = {"model": name}
    start = time.perf_counter()
    stage = "build"
    try:
        with address_space_limit(memory_gb):
            model, x = _build(zoo, name)
            record["input"] = list(x.shape)
            stage = "trace"
            try:
                graph = ChannelGraph(model, x)
                groups = graph.groups
            except PruningError as err:  # shrink must refuse too: checked below
                if _out_of_memory(err):
                    raise
                record["trace_error"] = first_line(f"{type(err).__name__}: {err}", 500)
                groups = []
            record["groups_exact"] = sum(g.prunable and g.exact for g in groups)
            record["groups_inexact"] = sum(g.prunable and not g.exact for g in groups)
            record["groups_fixed"] = sum(not g.prunable for g in groups)
            record["fixed_why"] = dict(Counter(g.reason[:120] for g in groups if not g.prunable))
            stage = "kill"
            record["killed"] = kill_channels(model, x, FRACTION, seed=0, graph=graph) if groups else 0
            reference = _outputs(model, x)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stage = "shrink"
            try:
                report = shrink(model, x, verify=False)
            except PruningError as err:
                if _out_of_memory(err):
                    raise
                record["error"] = f"{type(err).__name__}: {err}"[:2000]
                record["traceback"] = traceback.format_exc()[-4000:]
                same = _same_state(model, state) and _same_outputs(_try_outputs(model, x), reference)
                record["status"] = "refused" if same else "refused-but-modified"
                return _finish(record, start)
            stage = "run"
            record["removed"] = report.channels_removed
            record["params"] = [report.before.params, report.after.params]
            record["macs"] = [report.before.macs, report.after.macs]
            try:
                output = _outputs(model, x)
            except Exception as err:
                record["status"] = "broken-model"
                raise err
            record["max_abs_diff"] = max(
                (
                    float((o - r).abs().max())
                    for o, r in zip(output, reference, strict=False)
                    if o.shape == r.shape
                ),
                default=float("nan"),
            )
            record["status"] = "exact" if _same_outputs(output, reference) else "changed-outputs"
            if record["status"] == "changed-outputs":
                stage = "float64"
                record["float64_relative_diff"] = _float64_diff(zoo, name)
                if record["float64_relative_diff"] < ROUNDING:  # exact; float32 rounding amplified
                    record["status"] = "exact"
    except Exception as err:  # classified and recorded: the page says why
        memory = _out_of_memory(err)
        default = "no-build" if stage == "build" else "crash"
        record["status"] = "memory" if memory else record.get("status", default)
        record["stage"] = stage
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    return _finish(record, start)


def _float64_diff(zoo: str, name: str) -> float:
    """The same check in float64: max |after - before| / max |before|.

    Rounding alone leaves ~1e-16 times the network's amplification (below 1e-6 even in chaotic random
    networks); a misread operation leaves about the same difference as in float32.
    """
    from lightning_prune import shrink
    from tests.helpers.nets import kill_channels

    model, x = _build(zoo, name)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    kill_channels(model, x, FRACTION, seed=0)
    reference = _outputs(model, x)
    shrink(model, x, verify=False)
    diffs = [
        float((o - r).abs().max() / r.abs().max().clamp_min(1e-30))
        for o, r in zip(_outputs(model, x), reference, strict=True)
    ]
    return max(diffs, default=float("nan"))


def _build(zoo: str, name: str):
    if zoo == "timm":
        from tests.helpers.zoo_timm import timm_model

        return timm_model(name)
    from tests.helpers.zoo_hf import hf_model

    return hf_model(name)


def _family(zoo: str, name: str) -> str:
    if zoo != "timm":
        return name
    import timm

    from tests.helpers.zoo_timm import timm_family

    if name not in _MODULES:
        _MODULES.update({n: m for m in timm.list_modules() for n in timm.list_models(module=m)})
    return timm_family(_MODULES.get(name, "?"), name)


_MODULES: dict[str, str] = {}


def _finish(record: dict, start: float) -> dict:
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return record


def _out_of_memory(err: BaseException | None) -> bool:
    """A MemoryError or PyTorch's allocator failing (under the address-space limit), maybe wrapped."""
    while err is not None:
        if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _outputs(model, x) -> list:
    import torch

    from lightning_prune._inputs import flatten_outputs

    with torch.no_grad():
        return [t.detach().clone() for t in flatten_outputs(model(x))]


def _try_outputs(model, x) -> list | None:
    try:
        return _outputs(model, x)
    except Exception:
        return None


def _same_outputs(outputs: list | None, reference: list) -> bool:
    import torch

    return (
        outputs is not None
        and len(outputs) == len(reference)
        and all(
            o.shape == r.shape and torch.allclose(o, r, rtol=1e-4, atol=1e-5)
            for o, r in zip(outputs, reference, strict=True)
        )
    )


def _same_state(model, state: dict) -> bool:
    import torch

    now = model.state_dict()
    return now.keys() == state.keys() and all(
        now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items()
    )


def run_isolated(name: str, zoo: str, timeout: float, memory_gb: float) -> dict:
    """Run :func:`run_one` in a forked process; a timeout or a killed process is classified too."""
    record = _coverage.run_forked(partial(run_one, zoo, memory_gb=memory_gb), name, timeout)
    if record.get("status") == "error":
        error = record.get("error", "")
        killed = record["stage"] == "crash" and ("MemoryError" in error or error == "exit code -9")
        record["status"] = "timeout" if record["stage"] == "timeout" else "memory" if killed else "crash"
    return {"model": name, "family": _family(zoo, name)} | record


def _preload(zoo: str) -> None:
    """Import everything a model needs once, before forking (timm alone takes seconds)."""
    sys.path.insert(0, str(ROOT))
    import lightning_prune  # noqa: F401
    import tests.helpers.nets

    if zoo == "timm":
        import tests.helpers.zoo_timm  # noqa: F401
    else:
        import transformers

        from tests.helpers.zoo_hf import MODELS

        for model_cls, config_cls, *_ in MODELS.values():
            getattr(transformers, model_cls), getattr(transformers, config_cls)


def model_names(zoo: str, jsonl: Path | None) -> list[str]:
    """Every model surveyed: timm's family representatives (cached next to ``jsonl``) and EXTRA_TIMM, or
    the transformers MODELS."""
    if zoo == "transformers":
        sys.path.insert(0, str(ROOT))
        from tests.helpers.zoo_hf import MODELS

        return list(MODELS)
    cache = jsonl.with_name(jsonl.name + ".families.json") if jsonl else None
    if cache and cache.exists():
        return [*json.loads(cache.read_text()).values(), *EXTRA_TIMM]
    sys.path.insert(0, str(ROOT))
    from tests.helpers.zoo_timm import timm_families

    families = timm_families()
    if cache:
        cache.write_text(json.dumps(families, indent=1))
    return [*families.values(), *EXTRA_TIMM]


def render(zoo: str, records: list[dict], command: str) -> str:
    """The markdown section for one zoo: outcome counts, the failures by outcome, one row per model."""
    import torch

    import lightning_prune

    module = __import__("timm" if zoo == "timm" else "transformers")
    records = sorted(records, key=lambda r: (r.get("family", ""), r["model"]))
    counts = Counter(r["status"] for r in records)
    lines = [
        f"## {TITLES[zoo]}",
        "",
        f"{len(records)} models ({module.__name__} {module.__version__}, torch {torch.__version__}, "
        f"lightning-prune {lightning_prune.__version__}). Each: random init, small inputs, eval mode, "
        f"BatchNorm statistics calibrated; {FRACTION:.0%} of the channels of every prunable, exact group "
        "killed, `shrink(verify=False)`, outputs compared (rtol 1e-4, atol 1e-5). A model must end "
        "*exact* or *refused* (PruningError, model untouched).",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        "| outcome | models |",
        "|---|---|",
        *(f"| {o} | {counts[o]} |" for o in OUTCOMES if counts[o]),
        "",
    ]
    rounding = [r for r in records if r["status"] == "exact" and "float64_relative_diff" in r]
    if rounding:
        lines += ["### Exact up to float32 rounding", ""]
        lines += [f"- **{r['model']}**: {_reason(r).replace('`', '')}" for r in rounding]
        lines.append("")
    bad = [r for r in records if r["status"] != "exact"]
    if bad:
        lines += ["### Not exact", ""]
        for outcome in OUTCOMES[1:]:
            for r in (r for r in bad if r["status"] == outcome):
                lines.append(f"- **{r['model']}** ({outcome}): {_reason(r).replace('`', '')}")
        lines.append("")
    family = " family |" if zoo == "timm" else ""
    lines += [
        "### Results",
        "",
        "**groups**: shrunk / left alone because a LayerNorm normalizes across them / fixed (the notes "
        "count fixed groups by what they pass through: a reshape, split or slice of the channels, a "
        "concatenation not along channels; the classifier output is always fixed).",
        "",
        f"| model |{family} input | outcome | removed / killed | params | MACs | groups | peak RSS | "
        "seconds | reason, notes |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if family else ""),
    ]
    lines += [_row(r, zoo) for r in records]
    return "\n".join(lines) + "\n"


def _reason(r: dict) -> str:
    if "float64_relative_diff" in r:
        why = f"outputs changed by up to {r.get('max_abs_diff', float('nan')):.2g}"
        if "float64_relative_diff" in r:
            diff = r["float64_relative_diff"]
            kind = "rounding: random weights amplify it" if diff < ROUNDING else "not rounding"
            why += f"; in float64 by {diff:.1e} of the output scale ({kind})"
        return why
    return first_line(r.get("error", ""), 200)


def _row(r: dict, zoo: str) -> str:
    shape = r.get("input", [])
    size = f"{shape[1]} tokens" if len(shape) == 2 else "×".join(map(str, shape[1:])) or "-"
    rss = f"{r['peak_rss_gb']:.1f} GB" if "peak_rss_gb" in r else "-"
    seconds = f"{r['seconds']:.0f}" if "seconds" in r else "-"
    removed = params = macs = groups = "-"
    if "removed" in r:
        removed = f"{r['removed']:,} / {r['killed']:,}"
        params = f"{r['params'][1] / max(r['params'][0], 1):.0%}"
        macs = f"{r['macs'][1] / max(r['macs'][0], 1):.0%}"
    if "groups_exact" in r:
        groups = f"{r['groups_exact']} / {r['groups_inexact']} / {r['groups_fixed']}"
    kinds = Counter()
    for why, count in r.get("fixed_why", {}).items():
        kinds[_fixed_kind(why)] += count
    notes = [f"{n} {kind}" for kind, n in sorted(kinds.items()) if kind]
    if r["status"] != "exact" or "float64_relative_diff" in r:
        notes.insert(0, _reason(r).replace("|", "\\|"))
    family = f" {r.get('family', '')} |" if zoo == "timm" else ""
    return (
        f"| {r['model']} |{family} {size} | {r['status']} | {removed} | {params} | {macs} | {groups} | "
        f"{rss} | {seconds} | {'; '.join(notes)} |"
    )


def _fixed_kind(why: str) -> str:
    """A short label for why a group cannot shrink (the classifier output is not worth a note)."""
    first = why.split(";")[0]
    for key, label in FIXED_KINDS.items():
        if key in first:
            return label
    return "" if "frozen" in first else first[:60]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(TITLES), required=True)
    add_survey_args(parser, timeout=TIMEOUT, memory_gb=MEMORY_GB)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_one(args.zoo, args.child, args.memory_gb)), flush=True)
        return

    records = load_jsonl(args.jsonl)
    if not args.no_run:
        names = args.models or model_names(args.zoo, args.jsonl)
        _preload(args.zoo)
        run = partial(run_isolated, zoo=args.zoo, timeout=args.timeout, memory_gb=args.memory_gb)
        survey(names, records, run, args.jsonl, args.rerun)
    out = f"docs/coverage-{args.zoo}.md"
    command = f"python benchmarks/coverage_zoo.py --zoo {args.zoo} --jsonl {args.zoo}.jsonl --out {out}"
    if args.timeout != TIMEOUT:
        command += f" --timeout {args.timeout:g}"
    if args.memory_gb != MEMORY_GB:
        command += f" --memory-gb {args.memory_gb:g}"
    write_page(render(args.zoo, list(records.values()), command), args.out)


if __name__ == "__main__":
    main()
