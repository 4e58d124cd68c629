"""Where the latency of a pruned model goes: convolutions against everything else, dense against pruned.

For each case (model, amount; pruned with :func:`lightning_prune.prune_channels`, L1-norm scores,
``round_to=8``), the dense and the pruned model are run on one CPU thread, batch 1, in two modes:
``eager`` (as built), ``deploy`` (BatchNorm folded into the convolutions with
:func:`lightning_prune.structure.fold_batchnorm`, weights and input channels-last) and ``onednn`` (``deploy``
with every convolution calling oneDNN's kernel, ``torch.mkldnn_convolution``, directly: at batch 1 ATen
sends small 3×3 and, on one thread, 1×1 convolutions to its fallback kernel instead — a what-if, not a
deployment recipe).

Two measurements per model and mode:

- *wall*: the median latency of ``--repeats`` alternating rounds of ``--calls`` calls (as in
  ``speedup.py``), without the profiler;
- *profile*: ``torch.profiler`` over ``--calls`` calls (three such windows, alternating; the median per
  kind is kept); the time of every top-level ATen operator is added
  up by kind: convolutions (``aten::conv2d``, split into depthwise and the others), linear, batch norm,
  activations, additions, pooling, other operators, and the *rest*: profiled wall time not inside any
  operator (Python, module calls, the profiler's own cost). It also counts the convolutions that ran on
  ATen's fallback kernel (``_slow_conv2d_forward``, im2col + GEMM) instead of oneDNN's.

MACs are counted per layer (convolutions, linear) with forward hooks. The *conv-only efficiency* is
(dense conv time / pruned conv time) / (dense conv MACs / pruned conv MACs): 1.0 means the convolutions
got faster exactly as their MACs fell; below it, the thinner kernels run at a lower MAC rate.

With ``--kernels``, it times instead, layer by layer, every convolution of the pruned models that ATen
runs on its fallback kernel, once as ATen chooses and once through oneDNN (NCHW, median of 200 calls each).

    OMP_NUM_THREADS=1 python benchmarks/latency_breakdown.py --out docs/data/latency_breakdown.md
    OMP_NUM_THREADS=1 python benchmarks/latency_breakdown.py --kernels --out docs/data/conv_kernels.md
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speedup import build, latency, timing_parser  # noqa: E402

from lightning_prune import prune_channels  # noqa: E402
from lightning_prune.structure import fold_batchnorm  # noqa: E402

CASES = [("resnet18", 0.7, 224), ("mobilenet_v2", 0.5, 224), ("resnet18", 0.5, 224), ("resnet50", 0.5, 224)]
MODES = ("eager", "deploy", "onednn")
KINDS = ("conv", "dw conv", "linear", "batch norm", "activation", "add", "pooling", "other ops", "rest")
_KIND_OF = {
    "aten::linear": "linear",
    "aten::addmm": "linear",
    "aten::batch_norm": "batch norm",
    "aten::add": "add",
    "aten::add_": "add",
    "aten::max_pool2d": "pooling",
    "aten::adaptive_avg_pool2d": "pooling",
    "aten::avg_pool2d": "pooling",
}
_ACTIVATIONS = ("relu", "hardtanh", "clamp", "silu", "sigmoid", "gelu", "hardswish")


@dataclass
class Run:
    """One model in one mode: wall latencies per round, profiled ms per kind, MACs per kind."""

    wall: list[float] = field(default_factory=list)
    ms: dict[str, float] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    slow: tuple[int, int, float] = (0, 0, 0.0)  # convs on the fallback kernel, all convs, their ms


def prepare(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[nn.Module, torch.Tensor]:
    if mode == "eager":
        return model, x
    last = torch.channels_last
    folded = fold_batchnorm(model, x).to(memory_format=last)
    if mode == "onednn":
        for module in folded.modules():
            if isinstance(module, nn.Conv2d):
                module.forward = types.MethodType(_onednn_forward, module)
    return folded, x.contiguous(memory_format=last)


def _onednn_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    args = (self.padding, self.stride, self.dilation, self.groups)
    return torch.mkldnn_convolution(x, self.weight, self.bias, *args)


def layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs of the convolutions (depthwise apart) and linear layers in one forward pass."""
    macs = dict.fromkeys(("conv", "dw conv", "linear"), 0)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs["linear"] += out.numel() * module.in_features
            return
        kind = "dw conv" if module.groups > 1 and module.groups == module.in_channels else "conv"
        macs[kind] += out.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hooks = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return macs


def kind(event) -> str:
    name = event.name
    if name in ("aten::conv2d", "aten::mkldnn_convolution"):
        shapes = event.input_shapes
        depthwise = len(shapes) > 1 and len(shapes[1]) == 4 and shapes[1][1] == 1
        return "dw conv" if depthwise else "conv"
    if name in _KIND_OF:
        return _KIND_OF[name]
    if any(a in name for a in _ACTIVATIONS):
        return "activation"
    return "other ops"


def profiled(
    model: nn.Module, x: torch.Tensor, calls: int
) -> tuple[dict[str, float], tuple[int, int, float]]:
    """ms per call by kind, and (fallback-kernel convs, convs, their ms) per call, from torch.profiler."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            wall = time.perf_counter() - start
    ms = dict.fromkeys(KINDS, 0.0)
    slow_calls = slow_us = convs = 0
    for event in prof.events():
        if event.name == "aten::_slow_conv2d_forward":
            slow_calls += 1
            slow_us += event.cpu_time_total
        if event.cpu_parent is not None:
            continue
        if event.name in ("aten::conv2d", "aten::mkldnn_convolution"):
            convs += 1
        ms[kind(event)] += event.cpu_time_total / 1e3 / calls
    ms["rest"] = max(0.0, 1e3 * wall / calls - sum(ms.values()))
    return ms, (slow_calls // calls, convs // calls, slow_us / 1e3 / calls)


def bench(name: str, amount: float, size: int, repeats: int, calls: int) -> dict[tuple[str, str], Run]:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pruned = build(name)
    prune_channels(pruned, x, amount, round_to=8)
    models = {"dense": build(name), "pruned": pruned}
    prepared = {(v, mode): prepare(m, x, mode) for mode in MODES for v, m in models.items()}
    runs = {key: Run(macs=layer_macs(models[key[0]], x)) for key in prepared}
    order = list(prepared)
    for r in range(repeats):
        for key in order if r % 2 == 0 else reversed(order):
            runs[key].wall.append(latency(*prepared[key], calls))
    profiles: dict[tuple[str, str], list] = {key: [] for key in prepared}
    for r in range(3):  # three profiled windows each, alternating too; the median per kind is kept
        for key in order if r % 2 == 0 else reversed(order):
            profiles[key].append(profiled(*prepared[key], calls))
    for key, found in profiles.items():
        runs[key].ms = {k: statistics.median(ms[k] for ms, _ in found) for k in KINDS}
        runs[key].slow = found[0][1]
    return runs


def render(results: dict[tuple[str, float, int], dict[tuple[str, str], Run]], header: str) -> str:
    lines = [header, "", "Milliseconds per call by kind (profiled; *rest* is time outside any operator):", ""]
    lines.append(
        "| model | amount | mode | variant | wall ms | " + " | ".join(KINDS) + " | slow-path convs (ms) |"
    )
    lines.append("|---" * (5 + len(KINDS) + 1) + "|")
    for (name, amount, _), runs in results.items():
        for (variant, mode), run in runs.items():
            cells = " | ".join(f"{run.ms[k]:.2f}" for k in KINDS)
            slow, convs, slow_ms = run.slow
            lines.append(
                f"| {name} | {amount:.0%} | {mode} | {variant} | {1e3 * statistics.median(run.wall):.2f} | "
                f"{cells} | {slow}/{convs} ({slow_ms:.2f}) |"
            )
    lines += [
        "",
        "Where the efficiency goes (ratios dense / pruned; efficiency = speedup / MACs reduction):",
        "",
    ]
    lines.append(
        "| model | amount | mode | MACs reduction | speedup (wall) | efficiency (wall) | "
        "conv MACs reduction | conv speedup | conv-only efficiency | dw conv speedup (MACs red.) | "
        "non-MAC ops + rest speedup | "
        "pruned time in convs | efficiency if convs scaled with MACs | efficiency if the rest did |"
    )
    lines.append("|---" * 14 + "|")
    for (name, amount, _), runs in results.items():
        for mode in MODES:
            d, p = runs["dense", mode], runs["pruned", mode]
            lines.append(f"| {name} | {amount:.0%} | {mode} | " + " | ".join(_breakdown(d, p)) + " |")
    return "\n".join(lines) + "\n"


def _breakdown(d: Run, p: Run) -> list[str]:
    """The cells of one row of the efficiency table."""
    macs_red = sum(d.macs.values()) / sum(p.macs.values())
    speedup = statistics.median(d.wall) / statistics.median(p.wall)
    conv_red = d.macs["conv"] / p.macs["conv"]
    conv_speedup = d.ms["conv"] / p.ms["conv"]
    dw = "–"
    if d.macs["dw conv"]:
        dw = f"{d.ms['dw conv'] / p.ms['dw conv']:.2f}× ({d.macs['dw conv'] / p.macs['dw conv']:.2f}×)"
    mac_kinds = ("conv", "dw conv", "linear")
    d_mac, p_mac = sum(d.ms[k] for k in mac_kinds), sum(p.ms[k] for k in mac_kinds)
    d_rest, p_rest = sum(d.ms.values()) - d_mac, sum(p.ms.values()) - p_mac
    d_total, p_total = d_mac + d_rest, p_mac + p_rest
    # Counterfactuals on the profiled times: MAC ops at the dense MAC rate, or the rest shrunk with the MACs.
    ideal_mac = sum(d.ms[k] * p.macs[k] / d.macs[k] for k in mac_kinds if d.macs[k])
    if_convs = d_total / (ideal_mac + p_rest) / macs_red
    if_rest = d_total / (p_mac + d_rest / macs_red) / macs_red
    return [
        f"{macs_red:.2f}×",
        f"{speedup:.2f}×",
        f"{speedup / macs_red:.2f}",
        f"{conv_red:.2f}×",
        f"{conv_speedup:.2f}×",
        f"{conv_speedup / conv_red:.2f}",
        dw,
        f"{d_rest / p_rest:.2f}×",
        f"{p_mac / p_total:.0%}",
        f"{if_convs:.2f}",
        f"{if_rest:.2f}",
    ]


def kernels(name: str, amount: float, size: int) -> list[str]:
    """Table rows: each distinct fallback-kernel convolution of the pruned model, ATen's choice vs oneDNN."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = build(name)
    prune_channels(model, x, amount, round_to=8)
    shapes: dict[tuple, int] = {}

    def hook(module: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
        key = (tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding, module.groups)
        shapes[key] = shapes.get(key, 0) + 1

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    rows = []
    for (shape, wshape, stride, padding, groups), count in shapes.items():
        inp, weight = torch.randn(shape), torch.randn(wshape)
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            nn.functional.conv2d(inp, weight, None, stride, padding, 1, groups)
        if not any(e.name == "aten::_slow_conv2d_forward" for e in prof.events()):
            continue
        conv = (inp, weight, None, stride, padding, (1, 1), groups)
        aten = _median_us(nn.functional.conv2d, conv)
        onednn = _median_us(torch.mkldnn_convolution, (inp, weight, None, padding, stride, (1, 1), groups))
        macs = weight.numel() // groups * groups * (shape[2] // stride[0]) * (shape[3] // stride[1])
        rows.append(
            f"| {name} {amount:.0%} | {shape[1]}→{wshape[0]}, {wshape[2]}×{wshape[3]}, stride {stride[0]}, "
            f"{shape[2]}×{shape[3]} | {shape[1] * shape[2] * shape[3]:,} | {count} | {aten:.0f} | "
            f"{onednn:.0f} | {aten / onednn:.2f}× | {macs / aten / 1e3:.1f} → {macs / onednn / 1e3:.1f} |"
        )
    return rows


def chosen_kernel(channels: int, size: int) -> str:
    """The ATen kernel that runs a 3×3 convolution of ``channels`` channels on a ``size``² input."""
    x, weight = torch.randn(1, channels, size, size), torch.randn(channels, channels, 3, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        nn.functional.conv2d(x, weight, padding=1)
    names = {e.name for e in prof.events()}
    return "fallback (_slow_conv2d_forward)" if "aten::_slow_conv2d_forward" in names else "oneDNN"


def _median_us(func, args: tuple, repeats: int = 200) -> float:
    with torch.no_grad():
        for _ in range(20):
            func(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args)
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--out", type=Path, help="write the markdown tables here")
    parser.add_argument("--kernels", action="store_true", help="time fallback-kernel convolutions alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.kernels:
        lines = [
            f"`{' '.join(['python', *sys.argv])}` — torch {torch.__version__}, 1 thread, batch 1, "
            "median of 200 calls",
            "",
            "| pruned model | convolution (in→out, kernel, stride, input) | input elements | layers | "
            "ATen's choice µs | oneDNN µs | oneDNN faster by | GMAC/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for case in CASES:
            if not args.models or case[0] in args.models:
                lines += kernels(*case)
        lines += [
            "",
            "Which kernel ATen picks for a 3×3 convolution, C → C channels on a 14×14 input, batch 1:",
            "",
        ]
        lines += [
            f"- C = {c} ({c * 196:,} input elements): {chosen_kernel(c, 14)}"
            for c in (100, 102, 104, 105, 106, 108)
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return
    header = (
        f"`{' '.join(['python', *sys.argv])}` — torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, batch 1, "
        f"pruned = ours with round_to=8, {args.repeats} rounds of {args.calls} calls (wall medians)"
    )
    print(header, flush=True)
    results = {}
    for case in CASES:
        if args.models and case[0] not in args.models:
            continue
        results[case] = bench(*case, args.repeats, args.calls)
        print(render({case: results[case]}, "").strip(), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results, header))


if __name__ == "__main__":
    main()
