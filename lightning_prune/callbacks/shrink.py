"""ShrinkOnFitEnd: turn pruned channels into smaller tensors at the end of fit, and report the gain."""

from __future__ import annotations

import io
import numbers
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from rich.console import Console
from rich.table import Table
from typing_extensions import override

from lightning_prune._inputs import call_arguments, flatten_outputs
from lightning_prune._validate import boolean, integer, invalid
from lightning_prune.callbacks._surgery import notify_shrink
from lightning_prune.callbacks._trainer import example_inputs, refuse_sharding
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.reports import Figures, GainReport
from lightning_prune.errors import PruningError
from lightning_prune.stats import LATENCY_MODES, ModelStats, _eval_mode, in_mode, latency_samples, model_stats
from lightning_prune.structure import ChannelGraph, ShrinkReport, fold_batchnorm, fold_plan, shrink
from lightning_prune.structure.graph import same_outputs


class ShrinkOnFitEnd(Callback):
    """At the end of fit, make pruning permanent, remove dead channels and report what was gained.

    Every pruning callback's masks are made permanent (the zeros become plain weights), then
    :func:`lightning_prune.shrink` removes every channel whose producing parameters are all zero, in every
    coupled layer. A rich table compares params, non-zero params, MACs, latency (batch 1 and
    ``latency_batch_size``, median of ``latency_repeats``, on the module's device) and checkpoint size at the
    start of fit (before any callback pruned) and at the end; the same figures go to the trainer's loggers
    (``shrink/<figure>_before``/``_after``) and to :attr:`report` (a
    :class:`~lightning_prune.callbacks.reports.GainReport`).

    Example inputs are ``LightningModule.example_input_array`` if set, else the inputs of one training batch.

    What can be checked early is checked before training: in ``setup`` (rank 0) that ``save_path`` can be
    written, and in ``on_fit_start`` that the model can be traced for shrinking. If shrinking still fails at
    the end of fit, the trained weights are not lost: they are saved unshrunk (masks made permanent) next to
    ``save_path`` as ``<stem>.unshrunk<suffix>`` (without ``save_path``: ``<default_root_dir>/unshrunk.ckpt``)
    before the error is raised.

    Args:
        save_path: Where to write the shrunk model (rank 0), as soon as it is shrunk: see :func:`save_shrunk`.
            :func:`lightning_prune.load_pruned_checkpoint` restores it into a freshly built module, and
            ``trainer.validate``/``trainer.test(ckpt_path=save_path)`` evaluate it, into the shrunk module or,
            when the trainer has a pruning callback (whose ``load_state_dict`` pre-hook resizes the layers),
            into a freshly built one. Its folder is created in ``setup``.
        channels_last: Convert the shrunk model to the channels-last memory format (NHWC conv weights,
            often faster for convolutions on CPU and with Tensor Cores) before it is measured, saved and
            exported; the end-of-fit latency is then that format's.
        latency_batch_size: The larger batch size of the latency measurement.
        latency_repeats: Timed forward passes per measurement (the median is reported).
        export_path: Also write the shrunk model for deployment (rank 0), after checking that the exported
            model gives the module's outputs on the example inputs: an ONNX file if the path ends in
            ``.onnx`` (needs ``onnx``, ``onnxscript`` and ``onnxruntime``: ``pip install
            lightning-prune[onnx]``; checked with ONNX Runtime), else a ``torch.export`` program (use
            ``.pt2``; load it with ``torch.export.load(path).module()``). The batch dimension is dynamic
            where the model allows it. Its folder is checked in ``setup`` like ``save_path``'s. A model
            that cannot be exported fails here with the reason (the shrunk checkpoint is saved first).
        fold_bn: Export the model with its BatchNorm layers folded into the convolution or linear layers
            that feed them (:func:`~lightning_prune.structure.fold_batchnorm`; needs ``export_path``): one
            pass over each feature map fewer at inference. Only the exported copy is folded: the module
            and the ``save_path`` checkpoint keep their BatchNorm layers. Checked in ``on_fit_start``:
            BatchNorms that cannot be folded (e.g. after an addition) are named in a warning and exported
            as they are; a model with none to fold is refused. A fold that fails at the end of fit (one
            that would change the outputs) exports the model unfolded, with a warning saying why.
        latency_modes: Other ways of running the model whose latency (batch ``latency_batch_size``) is
            measured at the start and at the end of fit too: ``"channels_last"`` (NHWC copy) and
            ``"compile"`` (``torch.compile`` of a copy; compiling takes seconds to minutes, and a mode that
            fails is reported as unavailable rather than stopping the run). ``"eager"`` is always measured.

    Raises:
        PruningError: Here, if ``latency_batch_size`` or ``latency_repeats`` < 1, ``save_path`` is a
            directory, a latency mode is unknown, ``export_path`` ends in ``.onnx`` and the ONNX packages
            are missing, or ``fold_bn`` is set without ``export_path``. In ``setup``, if ``save_path``
            cannot be written. In ``on_fit_start``, if the model cannot be traced for shrinking (e.g. it has
            no Conv or Linear layer), or ``fold_bn`` finds no BatchNorm it can fold. In ``on_fit_end``, if
            shrinking fails; the message says where the unshrunk weights were saved.

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
        export_path: str | os.PathLike | None = None,
        channels_last: bool = False,
        latency_modes: Sequence[str] = ("eager",),
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        owner = "ShrinkOnFitEnd"
        latency_batch_size = integer(owner, "latency_batch_size", latency_batch_size, low=1)
        latency_repeats = integer(owner, "latency_repeats", latency_repeats, low=1)
        self.save_path = Path(save_path) if save_path is not None else None
        self.export_path = Path(export_path) if export_path is not None else None
        self.channels_last = boolean(owner, "channels_last", channels_last)
        self.fold_bn = boolean(owner, "fold_bn", fold_bn)
        if self.fold_bn and export_path is None:
            raise PruningError(
                "`ShrinkOnFitEnd(fold_bn=True)` is invalid without `export_path`: only the exported copy is "
                "folded. Give `export_path` (e.g. 'outputs/model.pt2'), or use "
                "`lightning_prune.fold_batchnorm(model, example_inputs)` on the shrunk module yourself."
            )
        for arg, path in (("save_path", self.save_path), ("export_path", self.export_path)):
            if path is not None and path.is_dir():
                raise PruningError(
                    f"`ShrinkOnFitEnd({arg}={str(path)!r})` is invalid: it is a directory; give a file "
                    "path such as 'outputs/shrunk.pt'."
                )
        if self.export_path is not None and self.export_path.suffix == ".onnx":
            missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if find_spec(name) is None]
            if missing:
                raise PruningError(
                    f"`ShrinkOnFitEnd(export_path={str(self.export_path)!r})` needs the packages "
                    f"{', '.join(missing)} to write and check an ONNX file: `pip install "
                    "lightning-prune[onnx]`, or give a '.pt2' path for a torch.export program."
                )
        texts = isinstance(latency_modes, Sequence) and not isinstance(latency_modes, str)
        if not texts or any(mode not in LATENCY_MODES for mode in latency_modes):
            raise invalid(
                owner, "latency_modes", latency_modes, f"a list of modes from {list(LATENCY_MODES)}"
            )
        self.latency_modes = [mode for mode in LATENCY_MODES[1:] if mode in latency_modes]
        self.unavailable: dict[str, str] = {}  # latency mode -> why it could not be measured
        self.folded = 0  # BatchNorm layers folded in the exported copy (fold_bn)
        self.latency_batch_size = latency_batch_size
        self.latency_repeats = latency_repeats
        self.report: GainReport | None = None  # at the end of fit
        self.shrink_report: ShrinkReport | None = None
        self._before: Figures | None = None
        self._device = torch.device("cpu")
        self._inputs: Any = None  # example inputs found when no pruner is present (once per fit)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The figures measured at the start of the first fit (so a resumed fit compares with them)."""
        return {"before": self._before.short() if self._before is not None else {}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the start-of-fit figures."""
        saved = state_dict.get("before", {})
        try:
            self._before = Figures.from_short(saved, self.latency_batch_size) if saved else None
        except KeyError:  # written with another latency_batch_size: measure again
            self._before = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before fit: refuse spawning strategies and check (on rank 0) that ``save_path`` can be written.

        Spawning strategies are refused because the main process could not take the shrunk weights back.
        ``save_path``'s folder is created and a temporary file written and removed there.
        """
        self._inputs = None
        self.unavailable = {}
        if stage != "fit":
            return
        refuse_sharding("ShrinkOnFitEnd", trainer.strategy)
        if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
            raise PruningError(
                "ShrinkOnFitEnd cannot run under a spawning strategy (ddp_spawn): Lightning copies the "
                "shrunk weights back into the main process's unshrunk module, which fails. Use "
                "strategy='ddp'."
            )
        for arg, path in (("save_path", self.save_path), ("export_path", self.export_path)):
            if path is None:
                continue
            problem = _unwritable(path) if trainer.is_global_zero else None
            problem = trainer.strategy.broadcast(problem, src=0)  # every rank stops, not only rank 0
            if problem:
                raise PruningError(
                    f"`ShrinkOnFitEnd({arg}={str(path)!r})` cannot be written: {problem}. "
                    "Checked before training so that no training is lost; give a writable file path."
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the model before any callback prunes it, and check it can be traced for shrinking.

        The figures are measured once (a resumed fit keeps the first ones). The check builds the
        :class:`~lightning_prune.structure.ChannelGraph` that :func:`~lightning_prune.shrink` will build at
        the end of fit; it does not modify the model.
        """
        self._device = pl_module.device
        try:  # the trace also counts params and MACs for the figures
            graph = ChannelGraph(pl_module, self._example(trainer, pl_module), measure=True)
        except PruningError as err:
            raise PruningError(
                f"ShrinkOnFitEnd could not shrink {type(pl_module).__name__} at the end of fit, so it stops "
                f"before training: {err}"
            ) from err
        if self.fold_bn:
            self._check_foldable(pl_module, self._example(trainer, pl_module))
        if self._before is None:
            self._before = self._measure(trainer, pl_module, graph.traced_stats)

    def _check_foldable(self, pl_module: pl.LightningModule, example: Any) -> None:
        """Refuse a model with no BatchNorm to fold; warn about those that cannot be (model unchanged)."""
        plan = fold_plan(pl_module, example)
        if not plan.pairs:
            why = f" ({plan.describe_refused()})" if plan.refused else ""
            raise PruningError(
                f"`ShrinkOnFitEnd(fold_bn=True)`: {type(pl_module).__name__} has no BatchNorm layer that "
                f"follows a convolution or linear layer{why}, so there is nothing to fold. It stops before "
                "training; set `fold_bn=False`."
            )
        if plan.refused:
            rank_zero_warn(
                f"ShrinkOnFitEnd(fold_bn=True) will export {len(plan.refused)} BatchNorm layer(s) of "
                f"{type(pl_module).__name__} unfolded: {plan.describe_refused()}."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make masks permanent, shrink, save, measure, report.

        If shrinking fails, the unshrunk weights are saved (see the class) and a PruningError says where.
        """
        for cb in trainer.callbacks:
            if isinstance(cb, PruningCallback):
                cb.make_permanent(pl_module)
        # Lightning's teardown moved the module to the CPU: shrink and measure on the training device.
        teardown_device = pl_module.device
        pl_module.to(self._device)
        try:
            result = shrink(pl_module, self._example(trainer, pl_module))
        except Exception as err:
            pl_module.to(teardown_device)
            raise self._save_unshrunk(trainer, pl_module, err) from err
        self.shrink_report = result
        notify_shrink(trainer, pl_module, result.removals)  # a module's own shape-bound tensors follow
        if self.channels_last:  # 4-D tensors (conv weights) in NHWC order; the function is unchanged
            pl_module.to(memory_format=torch.channels_last)
        if trainer.is_global_zero and self.save_path is not None:
            save_shrunk(pl_module, self.save_path)  # first: nothing below can lose the shrunk weights
        if trainer.is_global_zero and self.export_path is not None:
            example = self._example(trainer, pl_module)
            deployed = pl_module
            if self.fold_bn:
                try:  # the ones fold_plan refused were named in on_fit_start
                    deployed = fold_batchnorm(pl_module, example, strict=False)
                except PruningError as err:  # the end of a training is no place to stop
                    rank_zero_warn(f"ShrinkOnFitEnd(fold_bn=True) exports the model unfolded: {err}")
                self.folded = _batchnorms(pl_module) - _batchnorms(deployed)
            export_checked(deployed, example, self.export_path, reference=pl_module)
        before = self._before or self._measure(trainer, pl_module)
        after = self._measure(trainer, pl_module, result.after)  # shrink counted them after the surgery
        self.report = GainReport(before, after, result.channels_removed)
        metrics = self.report.metrics()
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
            Console().print(self.table())
        pl_module.to(teardown_device)

    def _save_unshrunk(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: Exception
    ) -> PruningError:
        """Save the trained weights after shrinking failed (rank 0); return the error saying where."""
        if self.save_path is not None:
            path = self.save_path.with_name(f"{self.save_path.stem}.unshrunk{self.save_path.suffix}")
        else:
            path = Path(trainer.default_root_dir) / "unshrunk.ckpt"
        if trainer.is_global_zero:
            save_shrunk(pl_module, path)
        return PruningError(
            f"ShrinkOnFitEnd could not shrink {type(pl_module).__name__} at the end of fit "
            f"({type(err).__name__}: {err}). The trained weights, unshrunk (masks made permanent), were "
            f"saved to {str(path)!r}: load them with `load_pruned_checkpoint` or evaluate them with "
            "`trainer.validate(ckpt_path=...)`."
        )

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        pruners = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]
        if pruners:
            return pruners[0].example_inputs(trainer, pl_module)
        if self._inputs is None:
            self._inputs = example_inputs(trainer, pl_module, type(self).__name__)
        return self._inputs

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stats: ModelStats | None = None
    ) -> Figures:
        """The figures of ``pl_module`` now; ``stats``: its params and MACs, if already counted."""
        example = self._example(trainer, pl_module)
        stats = stats or model_stats(pl_module, example)
        buffer = io.BytesIO()
        torch.save(pl_module.state_dict(), buffer)
        one = _first_sample(example)
        big = self.latency_batch_size
        repeats = self.latency_repeats
        small = [1e3 * t for t in latency_samples(pl_module, one, repeats=repeats)]
        large = [1e3 * t for t in latency_samples(pl_module, one, batch_size=big, repeats=repeats)]
        modes = {}
        for mode in self.latency_modes:
            try:
                model, inputs = in_mode(pl_module, one, mode)
                times = [1e3 * t for t in latency_samples(model, inputs, batch_size=big, repeats=repeats)]
            except Exception as err:  # e.g. no C++ compiler for torch.compile: report, do not stop
                self.unavailable[mode] = (
                    f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                )
                continue
            modes[mode] = (statistics.median(times), min(times), max(times))
        return Figures(
            params=stats.params,
            nonzero_params=stats.nonzero_params,
            macs=stats.macs,
            examples=_batch_size(example),
            latency_b1_ms=statistics.median(small),
            latency_b1_range=(min(small), max(small)),
            latency_batch_ms=statistics.median(large),
            latency_batch_range=(min(large), max(large)),
            batch_size=big,
            checkpoint_mb=buffer.getbuffer().nbytes / 2**20,
            modes=modes,
        )

    def table(self) -> Table:
        """The before/after table as a rich ``Table``."""
        r = self.report
        table = Table(title="lightning-prune: what pruning gained")
        for column in ("", "start of fit", "end of fit", "end / start"):
            table.add_column(column, justify="right" if column else "left")
        rows = [
            ("params", "params", "{:,.0f}"),
            ("non-zero params", "nonzero_params", "{:,.0f}"),
            ("MACs per example", "macs_per_example", "{:,.0f}"),
            ("latency, batch 1 (ms, median)", "latency_b1_ms", "{:.3f}"),
            (f"latency, batch {r.after.batch_size} (ms, median)", "latency_batch_ms", "{:.3f}"),
            ("checkpoint (MB)", "checkpoint_mb", "{:.3f}"),
        ]
        for label, key, fmt in rows:
            b, a = getattr(r.before, key), getattr(r.after, key)
            table.add_row(label, fmt.format(b), fmt.format(a), f"{a / b:.3f}" if b else "-")
        noisy = []
        batch = f"batch {r.after.batch_size}"
        ranges = [("batch 1", r.before.latency_b1_range, r.after.latency_b1_range)]
        ranges.append((batch, r.before.latency_batch_range, r.after.latency_batch_range))
        for mode in self.latency_modes:
            if mode in r.before.modes and mode in r.after.modes:
                (b, b_lo, b_hi), (a, a_lo, a_hi) = r.before.modes[mode], r.after.modes[mode]
                table.add_row(
                    f"latency, {batch}, {mode} (ms, median)", f"{b:.3f}", f"{a:.3f}", f"{a / b:.3f}"
                )
                ranges.append((f"{batch}, {mode}", (b_lo, b_hi), (a_lo, a_hi)))
        for label, (b_lo, b_hi), (a_lo, a_hi) in ranges:
            table.add_row(
                f"  fastest–slowest, {label}", f"{b_lo:.3f}–{b_hi:.3f}", f"{a_lo:.3f}–{a_hi:.3f}", ""
            )
            if a_lo <= b_hi and b_lo <= a_hi:
                noisy.append(label)
        table.caption = f"{r.channels_removed} dead channels removed at the end of fit"
        if self.channels_last:
            table.caption += "; end of fit in channels_last memory format"
        if self.fold_bn:
            table.caption += f"; exported with {self.folded} BatchNorm layer(s) folded"
        for mode, why in self.unavailable.items():
            table.caption += f"; {mode} latency not measured ({why})"
        if noisy:
            table.caption += (
                f"; latency ({', '.join(noisy)}): the start and end ranges overlap, so the difference is "
                "within run-to-run noise"
            )
        return table


def save_shrunk(pl_module: pl.LightningModule, path: str | os.PathLike) -> None:
    """Write ``pl_module``'s weights and hyperparameters as a checkpoint for evaluation and reloading.

    The file loads with ``torch.load(path, weights_only=True)``; :func:`load_pruned_checkpoint` rebuilds the
    module from it, and it is a Lightning checkpoint for ``trainer.validate``/``trainer.test(ckpt_path=path)``
    (``state_dict``, ``hyper_parameters`` and ``pytorch-lightning_version``; no optimizer or loop state, so
    it cannot resume a fit). Hyperparameters that ``weights_only`` loading refuses are stored as strings:
    paths silently, anything else with a warning naming them. The file is written to a temporary file next
    to ``path`` and then renamed, so ``path`` never holds half a checkpoint; its folder is created.

    Args:
        pl_module: The module to save (shrunk or not).
        path: The file to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    converted: list[str] = []
    checkpoint = {
        "pytorch-lightning_version": pl.__version__,
        "state_dict": pl_module.state_dict(),
        "hyper_parameters": {k: _plain(v, str(k), converted) for k, v in pl_module.hparams.items()},
        "lightning_prune": {"module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"},
    }
    if converted:
        rank_zero_warn(
            f"save_shrunk: stored the hyperparameters {', '.join(converted)} of {type(pl_module).__name__} "
            f"as strings in {str(path)!r}: `torch.load(weights_only=True)` cannot load their types."
        )
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


# Types that `torch.load(weights_only=True)` loads, besides the containers `_plain` walks into.
_SAFE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def export_checked(
    module: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    reference: torch.nn.Module | None = None,
) -> None:
    """Write ``module`` for deployment at ``path``, checked to give the same outputs.

    The module is captured with ``torch.export`` in eval mode on ``example_inputs`` (batch dimension
    dynamic where the model allows it). A path ending in ``.onnx`` gets that program converted to ONNX
    (``torch.onnx.export``, run with ONNX Runtime for the check); any other path gets the program itself
    (load it with ``torch.export.load(path).module()``). The written model must give the outputs of
    ``reference`` (default: ``module`` itself; e.g. the unfolded model when ``module`` is its BN-folded copy)
    in eval mode (float tolerance) on the example inputs, else nothing is written.

    Raises:
        PruningError: If the module cannot be exported, or the exported model's outputs differ.
    """
    path = Path(path)
    fmt = "ONNX" if path.suffix == ".onnx" else "torch.export"
    args, kwargs = call_arguments(example_inputs)
    reference = module if reference is None else reference
    with _eval_mode(reference), _eval_mode(module), torch.no_grad():
        expected = flatten_outputs(reference(*args, **kwargs))
        try:
            program = _export(module, args, kwargs)
            if fmt == "ONNX":
                program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, verbose=False)
                got = flatten_outputs(program(*args, **kwargs))
            else:
                got = flatten_outputs(program.module()(*args, **kwargs))
        except Exception as err:
            raise PruningError(
                f"ShrinkOnFitEnd(export_path={str(path)!r}): {fmt} cannot export "
                f"{type(module).__name__}: {type(err).__name__}: {err}"
            ) from err
    if not same_outputs(expected, got):
        raise PruningError(
            f"ShrinkOnFitEnd(export_path={str(path)!r}): the {fmt} model does not give the outputs of "
            f"{type(reference).__name__}; nothing was written."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    program.save(tmp) if fmt == "ONNX" else torch.export.save(program, tmp)
    os.replace(tmp, path)


def _export(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``torch.export`` with the first dimension of every input tensor dynamic (static if that fails)."""

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: torch.export.Dim.AUTO} if value.dim() > 0 else None
        if isinstance(value, list | tuple):
            return type(value)(spec(v) for v in value)
        if isinstance(value, Mapping):
            return {k: spec(v) for k, v in value.items()}
        return None

    dynamic = {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(a) for a in args)
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    except Exception:
        return torch.export.export(module, args, kwargs)


def _plain(value: Any, key: str, converted: list[str]) -> Any:
    """``value`` with every part that ``weights_only`` loading refuses made a string.

    Containers are walked into. Paths become strings silently; the keys of other values made strings
    (dotted from ``key``, e.g. ``data.root`` or ``sizes[2]``) are appended to ``converted``.
    """
    if type(value) in _SAFE or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, numbers.Integral):  # NumPy integers and floats, IntEnum members
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {_plain(k, key, converted): _plain(v, f"{key}.{k}", converted) for k, v in value.items()}
    if type(value) in (list, tuple, set):
        return type(value)(_plain(v, f"{key}[{i}]", converted) for i, v in enumerate(value))
    converted.append(key)
    return str(value)


def _unwritable(path: Path) -> str | None:
    """Why no file can be written at ``path`` (``"OSError: ..."``), or None; creates its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass  # removed on closing
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _batchnorms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _first_sample(example: Any) -> Any:
    return apply_to_collection(example, torch.Tensor, lambda t: t[:1])


def _batch_size(example: Any) -> int:
    """The batch size of example inputs: the first dimension of their first tensor (1 without one)."""
    tensors = flatten_outputs(example)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() > 0 else 1
