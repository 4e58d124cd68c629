"""Machinery shared by every pruning callback.

- sensitivity passes: the module's own ``training_step`` loss on batches of the trainer's training data;
- unstructured masks kept exactly zero through every optimizer step: masked gradients are zeroed in
  ``on_before_optimizer_step`` (after backward and AMP unscaling, before clipping, once per step under
  gradient accumulation) and masked weights re-zeroed by an optimizer step post-hook;
- physical shrinking inside ``fit``: optimizers rebuilt with their state sliced, DDP re-wrapped;
- ranks agree: scores are summed over ranks, rank 0 decides and broadcasts;
- resumable: masks live in the callback's ``state_dict`` (tensors and primitives only), and a fresh model
  takes the shapes of a shrunk checkpoint when Lightning loads its weights (a ``load_state_dict`` pre-hook
  registered in ``setup``);
- shared parameters (a head tied to the embedding, a layer reused or registered twice) are one unit: scored,
  masked and counted once, under their canonical name (:mod:`lightning_prune._params`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_prune._inputs import ExampleInputs
from lightning_prune._params import canonical_names, layer_weights
from lightning_prune._validate import integer, patterns
from lightning_prune.callbacks import _trainer
from lightning_prune.callbacks._masks import Masks
from lightning_prune.callbacks._surgery import OptimizerSnapshot, notify_shrink
from lightning_prune.callbacks.reports import Sparsity
from lightning_prune.checkpoint import resize_to_state_dict
from lightning_prune.errors import PruningError
from lightning_prune.structure import ChannelGraph, Removal, channel_multiple, prune_or_refuse, select_layers
from lightning_prune.structure.layers import is_root, output_channels


class PruningCallback(Callback):
    """Base class of the pruning callbacks: shared arguments, masks, shrinking and checkpoint state.

    A weight shared by several selected layers, or by a selected layer and another module, is one unit:
    masks, scores and counts are keyed by its canonical name, the first of its names in
    ``named_parameters()`` order. A language-model head tied to the token embedding is a selected Linear
    layer, so its weight, which IS the embedding matrix, is pruned (under the embedding's name, e.g.
    ``model.embed_tokens.weight``): the mask zeros entries of the embedding too, the tie holds through
    training, and the weight counts once. ``exclude=["model.lm_head"]`` keeps it whole.

    Args:
        include: Glob patterns of qualified layer names (as in ``LightningModule.named_modules()``, e.g.
            ``"model.features.*"``) to prune; ``None`` selects every Conv/Linear layer.
        exclude: Glob patterns of layers to leave alone.
        num_batches: Training batches each sensitivity pass averages over.

    Raises:
        PruningError: For invalid arguments (here) or a module they do not fit (in ``setup``).
    """

    structured: bool = False

    def __init__(
        self,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        num_batches: int = 1,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.include = patterns(owner, "include", include)
        self.exclude = patterns(owner, "exclude", exclude)
        self.num_batches = integer(owner, "num_batches", num_batches, low=1)
        self.mask_state = Masks(owner)  # the masks, and the optimizer hooks that keep them
        self.shrunk = False
        self.initial: dict[str, int] = {}  # weights / nodes before any pruning, for sparsity figures
        self._layers: list[str] = []
        self._node_layers: list[str] = []  # selected layers whose outputs are not model outputs
        self._resize_hook: Any = None
        self._example: ExampleInputs | None = None
        self._due_checked: int | None = None  # the epoch whose due pruning was run
        self.refused_groups: dict[str, str] = {}  # group -> why its channels could not be removed exactly

    # -- identity and state ----------------------------------------------------------------------------
    @override
    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints, from the arguments that distinguish instances."""
        return self._generate_state_key(**self._state_key_args())

    def _state_key_args(self) -> dict[str, Any]:
        return {"include": self.include, "exclude": self.exclude}

    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks (bool tensors), whether the model was shrunk, counters: loads with ``weights_only=True``."""
        return {
            "masks": {n: m.detach().to("cpu", torch.bool) for n, m in self.masks.items()},
            "shrunk": self.shrunk,
            "initial": dict(self.initial),
            "tied": dict(self.tied),
            "refused_groups": dict(self.refused_groups),
            "node_layers": list(self._node_layers),  # what node sparsity counts, fixed at the first fit
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the masks and counters (older checkpoints without some entries load too)."""
        self.masks = {n: m.to(torch.bool) for n, m in state_dict.get("masks", {}).items()}
        self.shrunk = bool(state_dict.get("shrunk", False))
        self.initial = dict(state_dict.get("initial", {}))
        self.tied = dict(state_dict.get("tied", {}))
        self.refused_groups = dict(state_dict.get("refused_groups", {}))
        self._node_layers = list(state_dict.get("node_layers", []))

    # -- Lightning hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module, data and strategy fit the arguments; let a shrunk checkpoint resize the model.

        Lightning loads checkpoint weights after ``setup`` (in every stage): a ``load_state_dict`` pre-hook
        gives the fresh model the shrunk shapes of the incoming weights first.
        """
        self._detach_resize()
        self._resize_hook = pl_module.register_load_state_dict_pre_hook(_resize_before_load)
        self._example = None
        if stage != "fit":
            return
        owner = type(self).__name__
        _trainer.refuse_sharding(owner, trainer.strategy)
        if not pl_module.automatic_optimization:
            raise PruningError(
                f"{owner} needs automatic optimization: its sensitivity passes call `training_step` and "
                "use the loss it returns, which a manual-optimization module does not."
            )
        if not trainer.fit_loop._data_source.is_defined():
            raise PruningError(
                f"{owner} needs a training dataloader: pass `train_dataloaders` or a datamodule to "
                "`Trainer.fit`, or define `train_dataloader()` on the module."
            )
        if self.structured and not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            raise PruningError(
                f"{owner} shrinks the network during fit, which is supported with single-device and DDP "
                f"strategies; got {type(trainer.strategy).__name__}."
            )
        if (
            self.structured
            and type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher"
        ):
            raise PruningError(
                f"{owner}(structured=True) cannot run under a spawning strategy (ddp_spawn): Lightning "
                "copies the shrunk weights back into the main process's unshrunk module, which fails. Use "
                "strategy='ddp'."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers (after ``configure_model`` built them); frozen layers are never pruned."""
        self._detach_resize()
        owner = type(self).__name__
        layers = select_layers(pl_module, self.include, self.exclude, owner=owner)
        frozen = [n for n in layers if not pl_module.get_submodule(n).weight.requires_grad]
        if frozen:
            rank_zero_warn(f"{owner}: leaving frozen layers (weights without requires_grad) alone: {frozen}.")
        self._layers = [n for n in layers if n not in frozen]
        if not self._layers:
            raise PruningError(
                f"{owner}: include={self.include} and exclude={self.exclude} leave no trainable layer "
                "to prune."
            )
        names = canonical_names(pl_module)
        loose = [n for n in self._layers if f"{n}.weight" not in names]
        if loose and not self.structured:
            raise PruningError(
                f"{owner}: the weights of {loose} are not parameters registered in "
                f"{type(pl_module).__name__} (parametrized?), so they cannot be masked; exclude them."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """(Re)attach the mask hooks; subclasses prune before calling this."""
        self._due_checked = None  # every fit checks its first epoch
        self._attach(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the pruning due by now (see :meth:`prune_due`), before this epoch trains.

        Pruning "at the end of epoch k" runs here, at the start of epoch k + 1: after epoch k's validation
        *and* after any checkpoint written at its end, so that each checkpoint's score belongs to the
        network it holds. A run resumed from such a checkpoint catches up here too.
        """
        self._prune_due_once(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Catch up before the batch when Lightning resumed mid-epoch without ``on_train_epoch_start``."""
        self._prune_due_once(trainer, pl_module)

    def _prune_due_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due_checked != trainer.current_epoch:  # once per epoch, not in every batch
            self._due_checked = trainer.current_epoch
            self.prune_due(trainer, pl_module)

    def prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Prune now what is due after ``trainer.current_epoch`` completed epochs; whether anything was.

        The default prunes nothing; callbacks that prune during training override it.
        """
        return False

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checkpoint weights are loaded by now: drop the resize hook."""
        self._detach_resize()

    on_test_start = on_predict_start = on_validation_start

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zero masked gradients: after backward and AMP unscaling, before clipping and the step."""
        if self.mask_state.stale:  # a shrink (by any callback) replaced the parameters
            self.mask_state.attach(trainer, pl_module)
        self.mask_state.zero_grads(optimizer)

    def _detach_resize(self) -> None:
        if getattr(self, "_resize_hook", None) is not None:
            self._resize_hook.remove()
        self._resize_hook = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detach the optimizer hooks."""
        self._detach()

    # -- masks (see ``_masks.Masks``) ----------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Canonical parameter name → bool mask (True = kept)."""
        return self.mask_state.masks

    @masks.setter
    def masks(self, value: dict[str, torch.Tensor]) -> None:
        self.mask_state.masks = value

    @property
    def tied(self) -> dict[str, str]:
        """Other names of masked shared parameters → their canonical name."""
        return self.mask_state.tied

    @tied.setter
    def tied(self, value: dict[str, str]) -> None:
        self.mask_state.tied = value

    def set_masks(self, pl_module: pl.LightningModule, masks: Mapping[str, torch.Tensor]) -> None:
        """Adopt new masks (parameter name → bool tensor) and zero the masked weights now."""
        self.mask_state.adopt(pl_module, masks)

    def apply_masks(self, pl_module: pl.LightningModule) -> None:
        """Zero every masked weight (in place)."""
        self.mask_state.apply(pl_module)

    def on_shrink(self, removals: Sequence[Removal]) -> None:
        """Called on every pruning callback after any of them shrank the model: cut per-parameter state.

        The default cuts the masks; subclasses keeping other tensors shaped like parameters extend it.
        """
        self.mask_state.cut(removals)

    def make_permanent(self, pl_module: pl.LightningModule) -> None:
        """Zero the masked weights a last time and forget the masks: the zeros are now plain weights."""
        self.mask_state.clear(pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mask_state.attach(trainer, pl_module)

    def _detach(self) -> None:
        self.mask_state.detach()

    # -- sensitivity passes (see ``_trainer``) ------------------------------------------------------------
    def scoring_batches(self, trainer: pl.Trainer, batches: Iterator[Any]) -> list[Any]:
        """The next ``num_batches`` batches of ``batches``, on the training device and in its precision."""
        return _trainer.scoring_batches(trainer, batches, self.num_batches)

    def loss_stream(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any]
    ) -> Callable[[], Iterator[torch.Tensor]]:
        """A replayable stream of ``training_step`` losses on ``batches`` (see ``_trainer.loss_stream``)."""
        return _trainer.loss_stream(trainer, pl_module, batches, type(self).__name__)

    def train_batches(self, trainer: pl.Trainer) -> Iterator[Any]:
        """A fresh, endless pass over the training data (see ``_trainer.train_batches``)."""
        return _trainer.train_batches(trainer, type(self).__name__)

    def example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ExampleInputs:
        """The inputs the model is traced with, found once per fit (see ``_trainer.example_inputs``)."""
        if self._example is None:
            self._example = _trainer.example_inputs(trainer, pl_module, type(self).__name__)
        return self._example

    sum_over_ranks = staticmethod(_trainer.sum_over_ranks)
    from_rank_zero = staticmethod(_trainer.from_rank_zero)

    # -- physical shrinking inside fit ---------------------------------------------------------------------
    def channel_graph(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, measure: bool = False
    ) -> ChannelGraph:
        """The module's channel groups; unselected conv/linear layers and refused groups are kept whole.

        ``measure``: also count params and MACs in the trace.
        """
        selected = set(self._layers)
        frozen = [n for n, m in pl_module.named_modules() if is_root(m) and n not in selected]
        frozen += list(self.refused_groups)
        example = self.example_inputs(trainer, pl_module)
        return ChannelGraph(pl_module, example, frozen=frozen, measure=measure)

    def shrink_in_fit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        graph: ChannelGraph,
        plan: Mapping[str, Sequence[int]],
    ) -> list[Removal]:
        """Remove channels during fit: optimizer state carried over, masks sliced, DDP re-wrapped.

        Everything else that holds per-parameter tensors follows through the public ``on_shrink`` hook
        (see ``_surgery.notify_shrink``); other pruning callbacks cut their masks there and re-attach them
        to the new parameters before the next optimizer step.
        """
        snapshot = OptimizerSnapshot.capture(trainer, pl_module) if trainer.strategy.optimizers else None
        # Verified and all-or-nothing per group: a group whose removal would change what the kept
        # channels compute is put back as it was, refused from now on, and named in a warning.
        removals, refused = prune_or_refuse(graph, plan, verify=self.example_inputs(trainer, pl_module))
        if refused:
            self.refused_groups.update(refused)
            rank_zero_warn(
                f"{type(self).__name__}: kept the channels of {len(refused)} group(s) that cannot be removed "
                "exactly (they stay whole for the rest of training): "
                + "; ".join(f"{name}: {why}" for name, why in refused.items())
            )
        notify_shrink(trainer, pl_module, removals)
        if snapshot is not None:
            snapshot.restore(trainer, pl_module, removals)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy.model is not pl_module:
            strategy.model = pl_module
            strategy.configure_ddp()
        if self.masks:  # other pruning callbacks re-attach theirs before the next optimizer step
            self._attach(trainer, pl_module)
        self.shrunk = True
        return removals

    # -- measurements ---------------------------------------------------------------------------------------
    def prunable_weights(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The weights of the selected Conv/Linear layers, one entry per parameter, by canonical name.

        Layers sharing a weight give one entry, named by the first name of the parameter in
        ``named_parameters()`` order (a tied LM head's weight under the embedding's name).
        """
        return layer_weights(pl_module, self._layers)

    def channel_multiple(self, pl_module: pl.LightningModule) -> int:
        """The ``round_to`` of this callback for ``pl_module`` (``"auto"`` resolved for its device/dtype)."""
        return channel_multiple(pl_module, getattr(self, "round_to", 1))

    def sparsity(self, pl_module: pl.LightningModule) -> Sparsity:
        """Sparsity of the selected layers now (see :class:`~lightning_prune.callbacks.reports.Sparsity`).

        The first call records the counts before pruning that later calls compare with.
        """
        weights = self.prunable_weights(pl_module)
        nonzero = sum(int(w.count_nonzero()) for w in weights.values())
        nodes = _node_count(pl_module, self._node_layers or self._layers)
        self.initial.setdefault("weights", sum(w.numel() for w in weights.values()))
        self.initial.setdefault("nodes", nodes)
        return Sparsity(
            weight_sparsity=1.0 - nonzero / max(self.initial["weights"], 1),
            node_sparsity=1.0 - nodes / max(self.initial["nodes"], 1),
            params=sum(p.numel() for p in pl_module.parameters()),
        )

    def log_metrics(self, trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Send figures to every logger (rank 0) and to ``trainer.callback_metrics``."""
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(metrics), step=trainer.global_step)


class PrunesOnce(PruningCallback):
    """A pruning callback that prunes once: whether it already has (``pruned``) is kept in checkpoints."""

    pruned: bool = False

    @override
    def state_dict(self) -> dict[str, Any]:
        """See :meth:`PruningCallback.state_dict`; adds whether pruning already happened."""
        return {**super().state_dict(), "pruned": self.pruned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`PruningCallback.load_state_dict`."""
        super().load_state_dict(state_dict)
        self.pruned = bool(state_dict.get("pruned", False))


def _resize_before_load(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: give the module the shapes of the incoming weights (either way)."""
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = module.state_dict(keep_vars=True)
    if any(k in expected and getattr(v, "shape", None) != expected[k].shape for k, v in own.items()):
        resize_to_state_dict(module, own)
        rank_zero_info(f"lightning-prune: resized {type(module).__name__} to the shapes of the checkpoint.")


def _node_count(module: nn.Module, layers: Sequence[str]) -> int:
    total = 0
    for name in layers:
        layer = module.get_submodule(name)
        if is_root(layer):
            total += output_channels(layer)[0]
    return total
