"""ShrinkOnFitEnd: turn pruned channels into smaller tensors at the end of fit, and report the gain."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.errors import PruningError
from lightning_prune.stats import measure_latency, model_stats
from lightning_prune.structure import ShrinkReport, shrink


class ShrinkOnFitEnd(Callback):
    """At the end of fit, make pruning permanent, remove dead channels and report what was gained.

    Every pruning callback's masks are made permanent (the zeros become plain weights), then
    :func:`lightning_prune.shrink` removes every channel whose producing parameters are all zero, in every
    coupled layer. A rich table compares params, non-zero params, MACs, latency (batch 1 and
    ``latency_batch_size``, median of ``latency_repeats``, on the module's device) and checkpoint size at the
    start of fit (before any callback pruned) and at the end; the same figures go to the trainer's loggers
    (``shrink/<figure>_before``/``_after``) and to :attr:`report`.

    Example inputs are ``LightningModule.example_input_array`` if set, else the inputs of one training batch.

    Args:
        save_path: Where to write the shrunk model (rank 0): a checkpoint with ``state_dict`` and
            ``hyper_parameters`` that :func:`lightning_prune.load_pruned_checkpoint` restores into a freshly
            built module, and that loads with ``torch.load(..., weights_only=True)``.
        latency_batch_size: The larger batch size of the latency measurement.
        latency_repeats: Timed forward passes per measurement (the median is reported).

    Raises:
        PruningError: ``latency_batch_size`` or ``latency_repeats`` < 1.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import SNIPCallback, ShrinkOnFitEnd
        >>> callbacks = [SNIPCallback(limit=0.5, structured=True), ShrinkOnFitEnd(save_path="small.ckpt")]
        >>> trainer = pl.Trainer(callbacks=callbacks, max_epochs=1, logger=False)
    """

    def __init__(
        self,
        save_path: str | os.PathLike | None = None,
        latency_batch_size: int = 64,
        latency_repeats: int = 10,
    ) -> None:
        super().__init__()
        for arg, value in (("latency_batch_size", latency_batch_size), ("latency_repeats", latency_repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(
                    f"`ShrinkOnFitEnd({arg}={value!r})` is invalid: `{arg}` must be an int >= 1; "
                    f"got {value!r}."
                )
        self.save_path = Path(save_path) if save_path is not None else None
        if self.save_path is not None and self.save_path.is_dir():
            raise PruningError(
                f"`ShrinkOnFitEnd(save_path={str(save_path)!r})` is invalid: it is a directory; give a file "
                "path such as 'outputs/shrunk.pt'."
            )
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.report: dict[str, float] = {}
        self.shrink_report: ShrinkReport | None = None
        self._before: dict[str, float] = {}
        self._device = torch.device("cpu")
        self._inputs = PruningCallback()  # finds (and caches) example inputs when no pruner is present

    def state_dict(self) -> dict[str, Any]:
        """The figures measured at the start of the first fit (so a resumed fit compares with them)."""
        return {"before": dict(self._before)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the start-of-fit figures."""
        self._before = dict(state_dict.get("before", {}))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse spawning strategies: the main process could not take the shrunk weights back."""
        self._inputs._example = None
        launcher = type(getattr(trainer.strategy, "launcher", None)).__name__
        if stage == "fit" and launcher == "_MultiProcessingLauncher":
            raise PruningError(
                "ShrinkOnFitEnd cannot run under a spawning strategy (ddp_spawn): Lightning copies the "
                "shrunk weights back into the main process's unshrunk module, which fails. Use "
                "strategy='ddp'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the model before any callback prunes it (once; a resumed fit keeps the first figures)."""
        self._device = pl_module.device
        if not self._before:
            self._before = self._measure(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make masks permanent, shrink, measure, report, save."""
        for cb in trainer.callbacks:
            if isinstance(cb, PruningCallback):
                cb.make_permanent(pl_module)
        # Lightning's teardown moved the module to the CPU: shrink and measure on the training device.
        teardown_device = pl_module.device
        pl_module.to(self._device)
        result = shrink(pl_module, self._example(trainer, pl_module))
        self.shrink_report = result
        after = self._measure(trainer, pl_module)
        self.report = {
            **{f"shrink/{k}_before": v for k, v in self._before.items()},
            **{f"shrink/{k}_after": v for k, v in after.items()},
            "shrink/channels_removed": float(result.channels_removed),
        }
        for key, value in self.report.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.report, step=trainer.global_step)
                logger.save()
            Console().print(self.table())
            if self.save_path is not None:
                save_shrunk(pl_module, self.save_path)
        pl_module.to(teardown_device)

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]
        return (pruners[0] if pruners else self._inputs).example_inputs(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        example = self._example(trainer, pl_module)
        stats = model_stats(pl_module, example)
        buffer = io.BytesIO()
        torch.save(pl_module.state_dict(), buffer)
        one = _first_sample(example)
        big = self.latency_batch_size
        return {
            "params": float(stats.params),
            "nonzero_params": float(stats.nonzero_params),
            "macs": float(stats.macs),
            "latency_b1_ms": 1e3 * measure_latency(pl_module, one, repeats=self.latency_repeats),
            f"latency_b{big}_ms": 1e3
            * measure_latency(pl_module, one, batch_size=big, repeats=self.latency_repeats),
            "checkpoint_mb": buffer.getbuffer().nbytes / 2**20,
        }

    def table(self) -> Table:
        """The before/after table as a rich ``Table``."""
        r = self.report
        table = Table(title="lightning-prune: what pruning gained")
        for column in ("", "start of fit", "end of fit", "end / start"):
            table.add_column(column, justify="right" if column else "left")
        rows = [
            ("params", "params", "{:,.0f}"),
            ("non-zero params", "nonzero_params", "{:,.0f}"),
            ("MACs", "macs", "{:,.0f}"),
            ("latency, batch 1 (ms)", "latency_b1_ms", "{:.3f}"),
            (
                f"latency, batch {self.latency_batch_size} (ms)",
                f"latency_b{self.latency_batch_size}_ms",
                "{:.3f}",
            ),
            ("checkpoint (MB)", "checkpoint_mb", "{:.3f}"),
        ]
        for label, key, fmt in rows:
            b, a = r[f"shrink/{key}_before"], r[f"shrink/{key}_after"]
            table.add_row(label, fmt.format(b), fmt.format(a), f"{a / b:.3f}" if b else "-")
        table.caption = f"{int(r['shrink/channels_removed'])} dead channels removed at the end of fit"
        return table


def save_shrunk(pl_module: pl.LightningModule, path: str | os.PathLike) -> None:
    """Write ``pl_module``'s weights and hyperparameters so :func:`load_pruned_checkpoint` can rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": pl_module.state_dict(),
        "hyper_parameters": dict(pl_module.hparams),
        "lightning_prune": {"module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def _first_sample(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example[:1]
    if isinstance(example, dict):
        return {k: _first_sample(v) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return type(example)(_first_sample(v) for v in example)
    return example
