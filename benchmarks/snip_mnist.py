"""The SNIP paper's MNIST table, side by side with other pruning methods: docs/benchmarks-mnist.md.

LeNet-300-100 (at 95% and 98% weight sparsity) and LeNet-5-Caffe (98%, 99%) are trained on MNIST with the
same budget for every method, and their test error on the 10,000 test images is set next to the numbers of
Lee et al., "SNIP" (ICLR 2019, arXiv:1810.02340, Table 2). Methods:

- ``dense``: no pruning (once per model and seed);
- ``snip``: ``SNIPCallback(limit=s)``, one batch of 100 at initialisation;
- ``snip-it``: ``IterativeSNIPCallback(limit=s, when="before", steps=5, num_batches=5)``;
- ``random``: ``IterativeSNIPCallback(limit=s, criterion="random", steps=0, seed=seed)``, one shot at init;
- ``snip-seedloss``, ``snip-it-seedloss``: ``snip`` with 5 batches and ``snip-it``, scored with the SNIP-it
  seed's scoring loss ``F.nll_loss`` on the raw logits (:class:`SeedScoringClassifier`; docs/fidelity.md);
- ``magnitude``: ``IterativeSNIPCallback(limit=s, criterion="magnitude", when="during", steps=5,
  prune_delay=0, prune_freq=1)``: global |w| with SNIP-it's schedule, one step at the end of each epoch;
- ``modelpruning``: Lightning's ``ModelPruning("l1_unstructured", use_global_unstructured=True)`` on the
  same schedule as ``magnitude`` (the per-epoch ``amount`` is the fraction of the surviving weights).

After each fit, the sparsity of the conv/linear weights is measured and must equal the target within
0.1 percentage point; every run is appended to ``--jsonl`` as it finishes, so an interrupted run resumes
(runs already there with the same configuration are skipped) and ``--no-run`` re-renders the page.

Usage, from the repository root (the data folder holds ``MNIST/raw``)::

    OMP_NUM_THREADS=1 python benchmarks/snip_mnist.py --data /path/to/data \\
        --jsonl outputs/snip_mnist.jsonl --out docs/benchmarks-mnist.md
    python benchmarks/snip_mnist.py --jsonl outputs/snip_mnist.jsonl --out docs/benchmarks-mnist.md --no-run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source tree without installing
    sys.path.insert(0, str(ROOT))

from lightning_prune.examples.mnist import MNISTClassifier, MNISTDataModule  # noqa: E402

MODELS = ("lenet300100", "lenet5caffe")
METHODS = (
    "dense",
    "snip",
    "snip-it",
    "random",
    "magnitude",
    "modelpruning",
    "snip-seedloss",
    "snip-it-seedloss",
)
NAMES = {"lenet300100": "LeNet-300-100", "lenet5caffe": "LeNet-5-Caffe"}
METHOD_NAMES = {
    "dense": "dense",
    "snip": "SNIP",
    "snip-it": "SNIP-it (before)",
    "random": "random (one shot)",
    "magnitude": "magnitude (SNIP-it schedule, during)",
    "modelpruning": "Lightning ModelPruning (L1, global)",
    "snip-seedloss": "SNIP, seed's scoring loss",
    "snip-it-seedloss": "SNIP-it (before), seed's scoring loss",
}
SPARSITIES = {"lenet300100": [0.95, 0.98], "lenet5caffe": [0.98, 0.99]}
# Test error (%) in Table 2 of the SNIP paper: the dense reference and SNIP at each sparsity.
PAPER = {
    ("lenet300100", "dense", 0.0): 1.7,
    ("lenet300100", "snip", 0.95): 1.6,
    ("lenet300100", "snip", 0.98): 2.4,
    ("lenet5caffe", "dense", 0.0): 0.9,
    ("lenet5caffe", "snip", 0.98): 0.8,
    ("lenet5caffe", "snip", 0.99): 1.1,
}
TOLERANCE = 0.001  # measured sparsity must equal the target within 0.1 percentage point
SNIPIT = {"steps": 5, "start": 0.5}  # the schedule of snip-it, magnitude and modelpruning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder containing MNIST/raw (default: $LIGHTNING_PRUNE_DATA)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, help="for every model (default: the paper's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="for every model (default: per model, below)")
    for model, epochs, seeds, lr in (("lenet300100", 20, [0, 1, 2], 0.1), ("lenet5caffe", 9, [0], 0.01)):
        parser.add_argument(f"--epochs-{model}", type=int, default=epochs, help=f"default {epochs}")
        parser.add_argument(f"--seeds-{model}", nargs="+", type=int, default=seeds, help=f"default {seeds}")
        parser.add_argument(f"--lr-{model}", type=float, default=lr, help=f"peak learning rate, default {lr}")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--limit-train-batches", type=int, help="smoke runs only: batches per epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--jsonl", default="outputs/snip_mnist.jsonl", help="raw results, one run a line")
    parser.add_argument("--out", help="markdown page to write (default: print it)")
    parser.add_argument("--no-run", action="store_true", help="only render the page from --jsonl")
    parser.add_argument("--plot", help="also write test error against sparsity as a PNG (matplotlib)")
    parser.add_argument("--rerun", action="store_true", help="run again even if --jsonl has the result")
    args = parser.parse_args(argv)
    if args.sparsities:
        for s in args.sparsities:
            if not 0 < s < 1:
                parser.error(f"--sparsities: every value must be in (0, 1); got {s}")
    for model in MODELS:
        if args.seeds is not None:
            setattr(args, f"seeds_{model}", args.seeds)
        if getattr(args, f"epochs_{model}") < 1:
            parser.error(f"--epochs-{model} must be >= 1")
    args.data = args.data or os.environ.get("LIGHTNING_PRUNE_DATA")
    if not args.no_run and not args.data:
        parser.error(
            "no data: pass --data DIR or set LIGHTNING_PRUNE_DATA to a folder that contains MNIST/raw "
            "(the four uncompressed idx files)"
        )
    return args


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configuration of every run, in order: per model, per seed, dense then each sparsity × method."""
    runs = []
    for model in args.models:
        sparsities = args.sparsities or SPARSITIES[model]
        for seed in getattr(args, f"seeds_{model}"):
            for sparsity in [0.0, *sparsities]:
                for method in args.methods:
                    if (method == "dense") != (sparsity == 0.0):
                        continue
                    runs.append(
                        {
                            "model": model,
                            "method": method,
                            "sparsity": sparsity,
                            "seed": seed,
                            "epochs": getattr(args, f"epochs_{model}"),
                            "lr": getattr(args, f"lr_{model}"),
                            "schedule": args.schedule,
                            "batch_size": args.batch_size,
                            "limit_train_batches": args.limit_train_batches,
                        }
                    )
    return runs


def schedule_amounts(sparsity: float) -> dict[int, float]:
    """ModelPruning's ``amount`` per (0-based) epoch that follows SNIP-it's schedule, one step per epoch.

    PyTorch's pruning containers apply ``amount`` to the weights that survive, so the step from cumulative
    sparsity ``p`` to ``q`` prunes ``(q - p) / (1 - p)`` of them.
    """
    from lightning_prune.schedules import snipit_schedule

    amounts, previous = {}, 0.0
    for epoch, p in enumerate(snipit_schedule(sparsity, **SNIPIT)):
        amounts[epoch] = (p - previous) / (1 - previous)
        previous = p
    return amounts


def make_callbacks(config: dict[str, Any], model: MNISTClassifier) -> list[pl.Callback]:
    method, s, seed = config["method"], config["sparsity"], config["seed"]
    if method == "dense":
        return []
    if method in ("snip", "snip-seedloss"):
        from lightning_prune import SNIPCallback

        return [SNIPCallback(limit=s, num_batches=1 if method == "snip" else 5)]
    if method == "modelpruning":
        from lightning.pytorch.callbacks import ModelPruning

        amounts = schedule_amounts(s)
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=[(m, "weight") for m in layers],
                parameter_names=["weight"],
                amount=lambda epoch: amounts.get(epoch, 0.0),
                use_global_unstructured=True,
                use_lottery_ticket_hypothesis=False,  # Lightning's default True rewinds to init each time
                make_pruning_permanent=True,
                verbose=0,
            )
        ]
    from lightning_prune import IterativeSNIPCallback

    if method in ("snip-it", "snip-it-seedloss"):
        return [IterativeSNIPCallback(limit=s, when="before", num_batches=5, **SNIPIT)]
    if method == "random":
        return [IterativeSNIPCallback(limit=s, criterion="random", steps=0, seed=seed)]
    if method == "magnitude":
        return [
            IterativeSNIPCallback(
                limit=s, criterion="magnitude", when="during", prune_delay=0, prune_freq=1, **SNIPIT
            )
        ]
    raise ValueError(method)


class SeedScoringClassifier(MNISTClassifier):
    """:class:`MNISTClassifier` whose pruning scores come from the SNIP-it seed's scoring loss.

    The seed's ``SNIP.get_weight_saliencies`` (models/criterions/SNIP.py, used by SNIP and SNIP-it) scores
    with ``F.nll_loss(model(x), y)`` on the model's raw logits: minus the mean logit of the true class, not
    the cross entropy it trains with. Here ``training_step`` returns that loss until the first training
    batch starts (the pruning callbacks score before it), and cross entropy from then on.
    """

    scoring = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.scoring = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.scoring:
            x, y = batch
            return nn.functional.nll_loss(self(x), y)
        return super().training_step(batch, batch_idx)


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (pruning at its end included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after the pruning callbacks' own epoch-end hooks (trainer callbacks come first)
        self.seconds.append(time.perf_counter() - self._start)


def weight_sparsity(module: nn.Module) -> float:
    """Measured fraction of exactly-zero entries over every Conv2d/Linear weight."""
    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def run_one(config: dict[str, Any], data: MNISTDataModule) -> dict[str, Any]:
    started = time.perf_counter()
    pl.seed_everything(config["seed"], verbose=False)
    seedloss = config["method"].endswith("-seedloss")
    model = (SeedScoringClassifier if seedloss else MNISTClassifier)(
        config["model"], lr=config["lr"], schedule=config["schedule"]
    )
    callbacks = make_callbacks(config, model)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config["epochs"],
        limit_train_batches=config["limit_train_batches"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - started
    sparsity = weight_sparsity(model)
    tested = time.perf_counter()
    evaluator = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (test,) = evaluator.test(model, datamodule=data, verbose=False)
    (val,) = evaluator.validate(model, datamodule=data, verbose=False)
    record = {
        "kind": "run",
        "config": config,
        "status": "ok",
        "test_acc": test["test/acc"],
        "test_error": 100.0 * (1.0 - test["test/acc"]),
        "val_acc": val["val/acc"],
        "train_loss_last": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "measured_sparsity": sparsity,
        "sparsity_ok": abs(sparsity - config["sparsity"]) <= TOLERANCE,
        "epoch_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
        "eval_seconds": time.perf_counter() - tested,
    }
    report = getattr(callbacks[0], "report", None) if callbacks else None
    if report:
        record["prune_report"] = report.metrics()
    return record


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interrupted write
                continue
    return records


def append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def quiet() -> None:
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jsonl = Path(args.jsonl)
    command = "python benchmarks/snip_mnist.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.no_run:
        quiet()
        torch.set_num_threads(args.threads)
        session_start = time.perf_counter()
        started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        data = MNISTDataModule(root=args.data, batch_size=args.batch_size, download=False)
        data.setup()
        env = environment(args)
        done = {json.dumps(r["config"], sort_keys=True) for r in read_jsonl(jsonl) if r.get("status") == "ok"}
        todo = plan(args)
        ran = 0
        for i, config in enumerate(todo, 1):
            key = json.dumps(config, sort_keys=True)
            if key in done and not args.rerun:
                continue
            label = (
                f"[{i}/{len(todo)}] {config['model']} {config['method']} s={config['sparsity']} "
                f"seed={config['seed']}"
            )
            print(f"{label} ...", flush=True)
            try:
                record = run_one(config, data)
            except Exception as err:  # record the failure, go on with the other runs
                record = {
                    "kind": "run",
                    "config": config,
                    "status": "error",
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
            record.update(env=env, finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            append(jsonl, record)
            ran += 1
            if record["status"] == "ok":
                epochs = record["epoch_seconds"]
                print(
                    f"{label}: test error {record['test_error']:.2f}%, sparsity "
                    f"{record['measured_sparsity']:.4f}{'' if record['sparsity_ok'] else ' (OFF TARGET)'}, "
                    f"{record['fit_seconds']:.0f} s fit, {statistics.median(epochs):.2f} s/epoch",
                    flush=True,
                )
            else:
                print(f"{label}: FAILED {record['error']}\n{record['traceback']}", flush=True)
            write_page(args, jsonl, command)
        append(
            jsonl,
            {
                "kind": "session",
                "command": command,
                "data": args.data,
                "started": started_at,
                "wall_seconds": time.perf_counter() - session_start,
                "runs": ran,
                "env": env,
            },
        )
    write_page(args, jsonl, command)


# -- rendering ---------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Test error (mean over seeds) against sparsity, one panel per model, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r.get("kind") == "run" and r.get("status") == "ok"]
    models = [m for m in MODELS if any(r["config"]["model"] == m for r in runs)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in runs if r["config"]["model"] == model]
        dense = [r["test_error"] for r in mine if r["config"]["method"] == "dense"]
        for method in (m for m in METHODS if m != "dense"):
            points = sorted({r["config"]["sparsity"] for r in mine if r["config"]["method"] == method})
            errors = [
                statistics.mean(
                    r["test_error"]
                    for r in mine
                    if r["config"]["method"] == method and r["config"]["sparsity"] == sp
                )
                for sp in points
            ]
            if points:
                ax.plot([100 * p for p in points], errors, marker="o", label=method)
        if dense:
            ax.axhline(statistics.mean(dense), color="grey", linestyle=":", label="dense")
        paper = sorted((sp, err) for (m, method, sp), err in PAPER.items() if m == model and method == "snip")
        ax.plot([100 * sp for sp, _ in paper], [e for _, e in paper], "kx", markersize=9, label="paper: SNIP")
        ax.set(yscale="log", xlabel="weights removed (%)", ylabel="test error (%)", title=model)
        ax.legend()
    fig.suptitle("MNIST: test error at the same sparsity and training budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_page(args: argparse.Namespace, jsonl: Path, command: str) -> None:
    if getattr(args, "plot", None):
        plot(read_jsonl(jsonl), args.plot)
    page = render(args, read_jsonl(jsonl), command)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(page)
    else:
        print(page)


def render(args: argparse.Namespace, records: list[dict[str, Any]], command: str) -> str:
    wanted = {json.dumps(c, sort_keys=True): c for c in plan(args)}
    runs: dict[str, dict[str, Any]] = {}
    for r in records:  # the last record of each planned configuration wins
        if r.get("kind") == "run":
            key = json.dumps(r["config"], sort_keys=True)
            if key in wanted:
                runs[key] = r
    ok = [r for r in runs.values() if r["status"] == "ok"]
    failed = [r for r in runs.values() if r["status"] != "ok"]
    sessions = [s for s in records if s.get("kind") == "session" and s.get("runs")]
    env = (ok or failed or [{}])[-1].get("env", {})
    # runs that finished after the second invocation started came from a later one (re-run or added)
    starts = sorted(dt.datetime.fromisoformat(x["started"]) for x in sessions)
    second = starts[1] if len(starts) > 1 else None

    def later(r: dict[str, Any]) -> bool:
        return second is not None and dt.datetime.fromisoformat(r["finished"]) >= second

    def cell(model: str, method: str, sparsity: float) -> list[dict[str, Any]]:
        return [
            r
            for r in ok
            if (r["config"]["model"], r["config"]["method"], r["config"]["sparsity"])
            == (model, method, sparsity)
        ]

    columns = [(m, s) for m in args.models for s in (args.sparsities or SPARSITIES[m])]
    lines = [
        "# SNIP's MNIST table, side by side",
        "",
        "Test error (%) on the 10,000 MNIST test images after the same training budget for every method, "
        "mean ± standard deviation over seeds (the number of seeds is in brackets), next to Table 2 of the "
        "SNIP paper (Lee et al., ICLR 2019, [arXiv:1810.02340](https://arxiv.org/abs/1810.02340)). "
        "Sparsity is the fraction of conv/linear weights removed (biases are not pruned).",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
    ]
    commands = list(dict.fromkeys(_shell(s) for s in sessions)) or [command]
    lines += [f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS') or 1} {c}" for c in commands]
    lines += ["```", ""]
    header = "| method | " + " | ".join(f"{NAMES[m]} {s:.0%}" for m, s in columns) + " |"
    lines += [header, "|---|" + "---|" * len(columns)]
    for method in args.methods:
        cells = []
        for model, s in columns:
            rs = cell(model, method, 0.0 if method == "dense" else s)
            errors = [r["test_error"] for r in rs]
            mark = "" if all(r["sparsity_ok"] for r in rs) else " ⚠"
            mark += " †" if any(later(r) for r in rs) else ""
            cells.append(f"{mean_std(errors)} ({len(errors)}){mark}" if errors else "—")
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    for method in ("dense", "snip"):
        paper = [PAPER.get((m, method, 0.0 if method == "dense" else s)) for m, s in columns]
        lines.append(f"| *paper: {METHOD_NAMES[method]}* | " + " | ".join(f"*{p}*" for p in paper) + " |")
    lines.append("")
    if any(later(r) for r in ok):
        lines += [
            "† run (again) by an invocation after the first one (commands above, in order); the "
            "other cells come from the first invocation.",
            "",
        ]
    lines.append(
        "The paper trained for 250k iterations (about 463 epochs of its 54k training images); the runs here "
        "are far shorter (below). The paper's rows are a reference for a much longer budget; the comparison "
        "made here under one budget is between the rows of a column."
    )
    lines.append("")

    # -- budget ------------------------------------------------------------------------------------------
    lines += ["## Training budget", ""]
    for model in args.models:
        seeds = getattr(args, f"seeds_{model}")
        lines.append(
            f"- **{NAMES[model]}**: {getattr(args, f'epochs_{model}')} epochs of the 54,000 training images "
            f"(batch {args.batch_size}), SGD momentum 0.9, weight decay 5e-4, peak learning rate "
            f"{getattr(args, f'lr_{model}')} with {describe_schedule(args.schedule)}; seeds "
            f"{', '.join(map(str, seeds))} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})."
        )
    lines.append(
        "- The budget was chosen so that the whole script takes about an hour on one thread of this machine: "
        "more epochs and seeds for the small LeNet-300-100, one seed and fewer epochs for LeNet-5-Caffe, "
        "whose epoch costs about ten times more. **magnitude** and **ModelPruning** need at least 7 epochs "
        "(one pruning step per epoch)."
    )
    if args.limit_train_batches:
        lines.append(f"- **Smoke run**: only {args.limit_train_batches} batches per epoch.")
    lines += [
        "- Same for every method: He (Kaiming normal, fan-in) initialisation, `seed_everything(seed)` before "
        "the model is built (so every method of a seed starts from the same weights and sees the same batch "
        "order), 6,000 training images held out (split seed 0), no validation during training; test (and "
        "validation, in the JSONL) once at the end.",
        "- LeNet-5-Caffe diverges (NaN loss within 200 steps, dense, seed 0, constant rate) at the paper's "
        "learning rate 0.1 with this initialisation, and at 0.05 and 0.02, so it is trained at 0.01 (the "
        "rate of Caffe's own LeNet solver). LeNet-300-100 uses the paper's 0.1.",
        "",
        "## Methods",
        "",
        "- **dense**: no callback; one run per model and seed, shown in every column of its model.",
        "- **SNIP**: `SNIPCallback(limit=s)` (unstructured, one batch of 100 at initialisation, one global "
        "ranking of |∂L/∂w · w|).",
        "- **SNIP-it (before)**: `IterativeSNIPCallback(limit=s, when='before', steps=5, num_batches=5)`: "
        "the cumulative sparsities 0.5, then halving the distance to s five times, then s "
        "(0.98: .50, .74, .86, .92, .95, .965, .98), every step rescored on 5 fresh batches, all before the "
        "first optimizer step.",
        "- **random (one shot)**: `IterativeSNIPCallback(limit=s, criterion='random', steps=0, seed=seed)`, "
        "uniformly random weights over all layers at initialisation.",
        "- **SNIP, seed's scoring loss** and **SNIP-it (before), seed's scoring loss**: "
        "`SNIPCallback(limit=s, num_batches=5)` and **SNIP-it (before)**, with the scores computed "
        "from the loss the SNIP-it seed scores with, `F.nll_loss` on the raw logits (minus the mean "
        "true-class logit) instead of the cross entropy the model trains with; training is unchanged "
        "(docs/fidelity.md explains why these rows exist).",
        "- **magnitude (SNIP-it schedule, during)**: `IterativeSNIPCallback(limit=s, criterion='magnitude', "
        "when='during', steps=5, prune_delay=0, prune_freq=1)`: global |w| ranking, one step of the same "
        "7-step schedule at the end of each of epochs 1–7, then training on at s for the remaining epochs.",
        "- **Lightning ModelPruning (L1, global)**: `lightning.pytorch.callbacks.ModelPruning("
        "'l1_unstructured', use_global_unstructured=True, parameter_names=['weight'], amount=f)` on the "
        "conv/linear weights, with "
        "`f(epoch)` = the fraction of the surviving weights that reaches the same cumulative sparsity as "
        "**magnitude** at the end of the same epochs (PyTorch pruning applies `amount` to the survivors); "
        "`use_lottery_ticket_hypothesis=False` (Lightning's default, True, resets the surviving weights to "
        "their initial values after every pruning: that would be lottery-ticket rewinding, not this "
        "baseline); masks made permanent at the end of fit. It is the same algorithm as **magnitude**, "
        "implemented by Lightning/PyTorch, with two differences measured on a short run with the same batch "
        "order: PyTorch's `global_unstructured` ranks the weights of the last forward pass, one optimizer "
        "step old (0.3% of the mask entries differ at the second pruning step), and **magnitude**'s callback "
        "draws training batches for scoring (unused by this data-free criterion) from a fresh shuffled "
        "loader, which advances the global random state, so the two rows do not see the same batch order.",
        "",
        "After every fit the zeros of the conv/linear weights are counted; a ⚠ marks a cell where the "
        f"measured sparsity missed the target by more than {100 * TOLERANCE:.1f} percentage point in some "
        "run.",
        "",
    ]

    # -- details -----------------------------------------------------------------------------------------
    lines += [
        "## Every cell",
        "",
        "| model | target sparsity | method | test error % | seeds | measured sparsity (min–max) | "
        "median epoch | fit time per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for s in [0.0, *(args.sparsities or SPARSITIES[model])]:
            for method in args.methods:
                if (method == "dense") != (s == 0.0):
                    continue
                rs = cell(model, method, s)
                if not rs:
                    lines.append(f"| {NAMES[model]} | {s:.0%} | {METHOD_NAMES[method]} | not run | 0 | | | |")
                    continue
                sp = [r["measured_sparsity"] for r in rs]
                epoch = statistics.median(t for r in rs for t in r["epoch_seconds"])
                fit = statistics.mean(r["fit_seconds"] for r in rs)
                lines.append(
                    f"| {NAMES[model]} | {s:.0%} | {METHOD_NAMES[method]} | "
                    f"{mean_std([r['test_error'] for r in rs])} | {len(rs)} | "
                    f"{min(sp):.4%}–{max(sp):.4%} | {epoch:.1f} s | {duration(fit)} |"
                )
    lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        for r in failed:
            c = r["config"]
            lines.append(
                f"- {NAMES[c['model']]} {c['method']} s={c['sparsity']} seed {c['seed']}: `{r['error']}`"
            )
        lines.append("")

    # -- machine and time --------------------------------------------------------------------------------
    planned = len(wanted)
    total_fit = sum(r["fit_seconds"] + r.get("eval_seconds", 0.0) for r in ok)
    lines += ["## Machine and wall time", ""]
    if env:
        lines.append(
            f"- {env.get('cpu')}, {env.get('cpu_count')} CPU cores, no GPU; torch {env.get('torch')} with "
            f"{env.get('torch_threads')} intra-op thread (OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}), "
            f"Lightning {env.get('lightning')}, Python {env.get('python')}. The machine was shared with "
            "other jobs whose load varied (at times more than the one other core), so times are indicative: "
            "that load explains most of the spread of the epoch times below."
        )
    lines.append(f"- Runs finished: {len(ok)} of {planned} planned ({len(failed)} failed).")
    lines.append(f"- Sum of the runs' wall times (fit + test + validation): {duration(total_fit)}.")
    for s in sessions:
        lines.append(
            f"- Script invocation started {s['started']}: {s['runs']} runs, {duration(s['wall_seconds'])} "
            "of wall time (data loading included)."
        )
    for model in args.models:
        times = [t for r in ok if r["config"]["model"] == model for t in r["epoch_seconds"]]
        if times:
            lines.append(
                f"- {NAMES[model]}: median epoch {statistics.median(times):.2f} s "
                f"(range {min(times):.2f}–{max(times):.2f} s over {len(times)} epochs)."
            )
    lines += [
        "",
        "Raw per-run results (configuration, test and validation accuracy, measured sparsity, per-epoch "
        f"seconds, the pruning callback's report) are in `{args.jsonl}`; re-render this page with "
        "`--no-run`.",
        "",
    ]
    return "\n".join(lines)


def _shell(session: dict[str, Any]) -> str:
    """A session's command, with the data folder it read from ``$LIGHTNING_PRUNE_DATA`` made explicit."""
    command = session["command"]
    if "--data" in shlex.split(command):
        return command
    return f"LIGHTNING_PRUNE_DATA={shlex.quote(session.get('data') or '/path/to/data')} {command}"


def describe_schedule(schedule: str) -> str:
    return {
        "cosine": "a cosine decay to zero over the run (stepped per epoch)",
        "step": "×0.1 after 50% and 75% of the epochs",
        "constant": "no decay",
    }[schedule]


if __name__ == "__main__":
    main()
