"""Trainer-facing helpers of the pruning callbacks, as free functions: data, losses, inputs, ranks, checks.

They read the trainer and the module and change nothing lasting (modes, logging and random state are
restored), except :func:`forward_from_training_step`, which gives a module without ``forward`` one.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torchmetrics import Metric

from lightning_prune._inputs import ExampleInputs, eager, flatten_outputs, to_device
from lightning_prune.errors import PruningError
from lightning_prune.stats import _eval_mode
from lightning_prune.structure.layers import is_root


def train_batches(trainer: pl.Trainer, owner: str) -> Iterator[Any]:
    """The training data, batch after batch, starting over when it runs out (never ends).

    A fresh iterator: the trainer's own is not touched. Every call starts a new pass, so with a shuffling
    loader each call sees new random batches; steps that share one iterator see consecutive batches.

    Raises:
        PruningError: If the training dataloader yields no batch at all.
    """
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    if isinstance(loader, Mapping | Sequence):
        from lightning.pytorch.utilities import CombinedLoader

        loader = CombinedLoader(loader, "max_size_cycle")
        return _cycle(lambda: (batch for batch, _, _ in iter(loader)), owner)
    return _cycle(lambda: iter(loader), owner)


def scoring_batches(trainer: pl.Trainer, batches: Iterator[Any], count: int) -> list[Any]:
    """The next ``count`` batches of ``batches``, on the training device and in its precision.

    Drawn under a forked CPU random state: starting a shuffling loader consumes random numbers, which would
    otherwise change the order in which the trainer sees the data.
    """
    with torch.random.fork_rng(devices=[]):  # a shuffling loader must not shift the training's order
        taken = [next(batches) for _ in range(count)]
    return [_on_device(trainer, b) for b in taken]


def loss_stream(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any], owner: str
) -> Callable[[], Iterator[torch.Tensor]]:
    """A replayable stream of the module's ``training_step`` losses on ``batches`` (for criteria).

    While it runs, the module is in eval mode (BatchNorm uses its running statistics: the official SNIP
    choice), ``self.log`` is muted, compiled code runs eagerly (hooks must be seen) and gradients are
    enabled under the precision plugin's context; modes are restored when the stream ends. Nothing is
    stepped.
    """
    precision = trainer.precision_plugin

    def losses() -> Iterator[torch.Tensor]:
        with (
            _eval_mode(pl_module),
            _muted_logging(pl_module),
            torch.enable_grad(),
            precision.train_step_context(),
            eager(),
        ):
            for batch_idx, batch in enumerate(batches):
                yield _loss_of(pl_module.training_step(batch, batch_idx), owner)

    return losses


def example_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: str) -> ExampleInputs:
    """``example_input_array`` if the module sets it, else the inputs of one training batch.

    A module without ``forward`` gets one first (see :func:`forward_from_training_step`).
    """
    example = pl_module.example_input_array
    if example is None:
        with torch.random.fork_rng(devices=[]):
            batch = next(train_batches(trainer, owner))
        if not has_forward(pl_module):
            example = forward_from_training_step(pl_module, _on_device(trainer, batch), owner)
        elif isinstance(batch, torch.Tensor):
            example = batch
        elif isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
            example = batch[0]
        else:
            raise PruningError(
                f"{owner} needs example inputs to trace the model: set `example_input_array` on "
                f"{type(pl_module).__name__} (batches are {type(batch).__name__}, not (inputs, ...))."
            )
    return trainer.precision_plugin.convert_input(to_device(example, pl_module.device))


def sum_over_ranks(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity on one device)."""
    if trainer.world_size > 1:
        tensor = trainer.strategy.reduce(tensor, reduce_op="sum")
    return tensor


def from_rank_zero(trainer: pl.Trainer, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    return trainer.strategy.broadcast(obj, src=0) if trainer.world_size > 1 else obj


def _on_device(trainer: pl.Trainer, batch: Any) -> Any:
    return trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))


def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """Re-run ``validation_step`` on the trainer's validation data now; the logged values, averaged.

    For a figure of the network as it is at this moment (e.g. right after pruning, with no validation loop
    to come). Eval mode, no gradients; ``self.log`` calls are captured instead of logged: each name's values
    are averaged over batches weighted by the batch size (``batch_size=`` if given, else the batch's first
    tensor's length), a torchmetrics ``Metric`` logged as an object is computed over all batches. Empty
    when there is no validation data or no ``validation_step``.
    """
    loaders = trainer.val_dataloaders
    if loaders is None or not is_overridden("validation_step", pl_module, pl.LightningModule):
        return {}
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    sums: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    current = {"size": 1}

    def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if hasattr(value, "compute") and hasattr(value, "reset"):
            metrics[name] = value
            return
        weight = batch_size or current["size"]
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * weight
        total[1] += weight

    for m in pl_module.modules():
        if isinstance(m, Metric):  # start from no state: the last validation epoch may have left some
            m.reset()
    pl_module.__dict__["log"] = log
    try:
        with _eval_mode(pl_module), torch.no_grad(), eager():
            for index, loader in enumerate(loaders):
                for batch_idx, batch in enumerate(loader):
                    batch = _on_device(trainer, batch)
                    tensors = [t for t in flatten_outputs(batch) if t.dim() > 0]
                    current["size"] = len(tensors[0]) if tensors else 1
                    extra = (index,) if len(loaders) > 1 else ()
                    pl_module.validation_step(batch, batch_idx, *extra)
        out = {name: total / count for name, (total, count) in sums.items() if count}
        for name, metric in metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        return out
    finally:
        del pl_module.__dict__["log"]


def refuse_sharding(owner: str, strategy: Any) -> None:
    """Raise for strategies that shard parameters (FSDP, DeepSpeed, model parallel).

    Masks, scores and channel surgery need whole tensors. Strategies are recognised by class name, so
    that their packages need not be importable.
    """
    sharded = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"} & _names(strategy)
    if sharded:
        raise PruningError(
            f"{owner} does not support {type(strategy).__name__} (a {sharded.pop()}): it shards parameters "
            "across processes, and the masks, scores and channel surgery need whole tensors. Use a single "
            "device or strategy='ddp'."
        )


def _names(obj: Any) -> set[str]:
    """Names of ``obj``'s class and its bases (to recognise classes without importing their packages)."""
    return {cls.__name__ for cls in type(obj).__mro__}


def has_forward(module: nn.Module) -> bool:
    """Whether ``module`` defines ``forward`` (LightningModule's own defers to nn.Module's, which raises)."""
    inherited = (pl.LightningModule.forward, nn.Module.forward)
    return "forward" in vars(module) or type(module).forward not in inherited


def forward_from_training_step(pl_module: pl.LightningModule, batch: Any, owner: str) -> ExampleInputs:
    """Give a module without ``forward`` the one its ``training_step`` implies; return its example inputs.

    ``training_step(batch, 0)`` runs once (eval mode, no gradients, logging muted) while the module's
    direct children record how they are called. If exactly one child holding conv/linear layers is called,
    with positional or keyword arguments (not both), the module gets ``forward = <that child>(...)``: the
    network the pruning callbacks trace, measure and shrink. Any other case raises with what was seen.
    """
    calls: dict[str, tuple[tuple, dict]] = {}
    children = dict(pl_module.named_children())

    def record(name: str):
        def hook(_module, args, kwargs):
            calls.setdefault(name, (args, kwargs))

        return hook

    handles = [c.register_forward_pre_hook(record(n), with_kwargs=True) for n, c in children.items()]
    try:
        with _eval_mode(pl_module), _muted_logging(pl_module), torch.no_grad(), eager():
            pl_module.training_step(batch, 0)
    except Exception as err:
        raise PruningError(
            f"{owner}: {type(pl_module).__name__} has no `forward`, and its `training_step` failed on a "
            f"training batch ({type(err).__name__}: {err}); set `example_input_array` and a `forward`."
        ) from err
    finally:
        for h in handles:
            h.remove()
    networks = [n for n in calls if any(is_root(m) for m in children[n].modules())]
    if len(networks) != 1 or (calls[networks[0]][0] and calls[networks[0]][1]):
        seen = ", ".join(f"{n}({_signature(*calls[n])})" for n in calls) or "no submodule"
        raise PruningError(
            f"{owner}: {type(pl_module).__name__} has no `forward`, and its `training_step` calls {seen}: "
            "lightning-prune can stand in for a forward that calls ONE submodule holding the conv/linear "
            "layers, with positional or keyword arguments. Define `forward` and `example_input_array`."
        )
    name = networks[0]
    args, kwargs = calls[name]
    pl_module._lightning_prune_forward = name
    pl_module.forward = types.MethodType(_forward_to_child, pl_module)
    rank_zero_info(
        f"{owner}: {type(pl_module).__name__} has no `forward`; its `training_step` calls `self.{name}`, so "
        f"`forward` now calls `self.{name}({_signature(args, kwargs)})` (what is traced and shrunk)."
    )
    if kwargs:
        return dict(kwargs)
    return args[0] if len(args) == 1 else tuple(args)


def _forward_to_child(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return getattr(self, self._lightning_prune_forward)(*args, **kwargs)


def _signature(args: tuple, kwargs: dict) -> str:
    return ", ".join([*("…" for _ in args), *(f"{k}=…" for k in kwargs)])


def _cycle(start: Callable[[], Iterator[Any]], owner: str) -> Iterator[Any]:
    while True:
        empty = True
        for batch in start():
            empty = False
            yield batch
        if empty:
            raise PruningError(f"{owner}: the training dataloader yielded no batch.")


def _loss_of(output: Any, owner: str) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise PruningError(
            f"{owner}: `training_step` returned {type(output).__name__}; sensitivity scores need the "
            "loss as a tensor (or a dict with a 'loss' tensor)."
        )
    if loss.numel() != 1:
        raise PruningError(
            f"{owner}: `training_step` returned a loss of shape {tuple(loss.shape)}; it must be a scalar."
        )
    if not loss.requires_grad:
        raise PruningError(f"{owner}: the loss returned by `training_step` does not require grad.")
    if not math.isfinite(float(loss.detach())):
        raise PruningError(f"{owner}: the loss returned by `training_step` is {float(loss.detach())}.")
    return loss.reshape(())


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` calls inside a sensitivity pass go nowhere (they would be logged out of place)."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
