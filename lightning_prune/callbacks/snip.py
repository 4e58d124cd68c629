"""SNIP: single-shot network pruning by connection sensitivity, at the start of fit."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import connection_sensitivity, group_sum
from lightning_prune.errors import PruningError
from lightning_prune.stats import model_stats
from lightning_prune.structure import _ROOT_TYPES, ChannelGraph, lowest_channels


def check_limit(owner: str, limit: Any) -> float:
    """Validate a ``limit`` argument: a number in [0, 1)."""
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 <= limit < 1:
        raise PruningError(
            f"`{owner}(limit={limit!r})` is invalid: `limit` must be in [0, 1); got {limit!r}."
        )
    return float(limit)


class SNIPCallback(PruningCallback):
    """SNIP: prune by connection sensitivity ``|∂L/∂w ⊙ w|`` once, at the start of fit.

    Paper: Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
    ICLR 2019, https://arxiv.org/abs/1810.02340.

    Before the first training step, the module's own ``training_step`` loss is backpropagated over
    ``num_batches`` training batches (BatchNorm in eval mode, no optimizer step, gradients cleared after).

    - Unstructured (default): every selected Conv/Linear weight is scored ``|g ⊙ w|``; one global ranking
      keeps the top ``round(n · (1 − limit))``. The pruned weights stay exactly zero through training:
      their gradients are zeroed before clipping and every optimizer step, and the weights re-zeroed after
      it, so momentum, weight decay, Adam moments, clipping norms and AMP all leave them at zero.
    - Structured (``structured=True``, the group SNIP of "SNIP-pytorch"): each channel group is scored by the
      summed ``|g ⊙ w|`` of its producing conv/linear weights (over every coupled producer of a residual
      group); in one global ranking, the lowest-scoring channels are removed physically until ``limit`` of
      the nodes (conv/linear output channels) of the prunable groups are gone — a channel shared by several
      producers counts once per producer — never emptying a layer, so the whole training runs on the
      smaller network. Layers producing the model's output, excluded and frozen layers are never shrunk.

    Under DDP, scores are summed over ranks and rank 0's decision is broadcast, so every rank prunes the
    same weights. The decision is saved in checkpoints; resuming does not prune again.

    Args:
        limit: Fraction removed: of selected weights (unstructured) or of selected nodes (structured).
        structured: Remove whole channels/neurons instead of single weights.
        num_batches: Training batches the gradient is accumulated over (the paper: one batch).
        include: Glob patterns of layer names (``LightningModule.named_modules()``) to prune; default: all
            Conv/Linear layers.
        exclude: Glob patterns of layers to keep whole.

    Raises:
        PruningError: ``limit`` outside [0, 1), ``num_batches`` < 1, patterns matching no layer, no training
            dataloader, a ``training_step`` that returns no scalar loss, non-finite scores (naming the layer),
            or structured pruning of a model with nothing to prune.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import SNIPCallback
        >>> trainer = pl.Trainer(callbacks=[SNIPCallback(limit=0.9)], max_epochs=1, logger=False)
    """

    def __init__(
        self,
        limit: float = 0.9,
        structured: bool = False,
        num_batches: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude, num_batches=num_batches)
        self.limit = check_limit(type(self).__name__, limit)
        if not isinstance(structured, bool):
            raise PruningError(
                f"`{type(self).__name__}(structured={structured!r})` is invalid: `structured` must be a bool."
            )
        self.structured = structured
        self.pruned = False
        self.report: dict[str, float] = {}

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "limit": self.limit, "structured": self.structured}

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`PruningCallback.state_dict`; adds whether pruning already happened."""
        return {**super().state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`PruningCallback.load_state_dict`."""
        super().load_state_dict(state_dict)
        self.pruned = bool(state_dict.get("pruned", False))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune once (unless resumed from a checkpoint taken after pruning), then attach the masks."""
        if not self.pruned:
            start = time.perf_counter()
            if self.structured:
                self._prune_nodes(trainer, pl_module)
            else:
                self._prune_weights(trainer, pl_module)
            self.pruned = True
            metrics = self.sparsity_metrics(pl_module)
            try:
                example = self.example_inputs(trainer, pl_module)
                metrics["prune/macs"] = float(model_stats(pl_module, example).macs)
            except PruningError as err:  # unstructured pruning needs no inputs; MACs are optional
                rank_zero_warn(f"{type(self).__name__}: prune/macs not logged: {err}")
            metrics["prune/seconds"] = time.perf_counter() - start
            self.report = metrics
            self.log_metrics(trainer, metrics)
            rank_zero_info(
                f"{type(self).__name__}: weight sparsity {metrics['prune/weight_sparsity']:.2%}, node "
                f"sparsity {metrics['prune/node_sparsity']:.2%}, {int(metrics['prune/params']):,} params "
                f"({metrics['prune/seconds']:.1f} s)"
            )
        super().on_train_start(trainer, pl_module)

    # -- unstructured ----------------------------------------------------------------------------------
    def _scores(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, weights: dict
    ) -> dict[str, torch.Tensor]:
        self.sparsity_metrics(pl_module)  # record the counts before pruning
        self.accumulate_gradients(trainer, pl_module, self.train_batches(trainer))
        scores = {}
        for name, w in weights.items():
            if w.grad is None:
                scores[name] = torch.zeros_like(w)
                continue
            s = connection_sensitivity(w.detach(), w.grad)
            if not torch.isfinite(s).all():
                self.clear_gradients(pl_module)
                raise PruningError(f"{type(self).__name__}: sensitivity scores of {name} are not finite.")
            scores[name] = s
        self.clear_gradients(pl_module)
        return scores

    def _prune_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = self.prunable_weights(pl_module)
        scores = self._scores(trainer, pl_module, weights)
        flat = self.sum_over_ranks(trainer, torch.cat([s.flatten().float() for s in scores.values()]))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        n_keep = round(flat.numel() * (1 - self.limit))
        if n_keep:
            keep[torch.topk(flat, n_keep, sorted=False).indices] = True
        keep = self.from_rank_zero(trainer, keep.cpu())
        masks, offset = {}, 0
        for name, w in weights.items():
            masks[name] = keep[offset : offset + w.numel()].view_as(w)
            offset += w.numel()
        self.set_masks(pl_module, masks)

    # -- structured ------------------------------------------------------------------------------------
    def _prune_nodes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        selected = set(self._layers)
        frozen = [n for n, m in pl_module.named_modules() if isinstance(m, _ROOT_TYPES) and n not in selected]
        graph = ChannelGraph(pl_module, self.example_inputs(trainer, pl_module), frozen=frozen)
        outputs = graph.output_layers
        self._node_layers = [n for n in self._layers if n not in outputs]
        groups = [g for g in graph.groups if g.prunable and g.size > 1]
        if not groups:
            raise PruningError(
                f"{owner}(structured=True): no channel group of {type(pl_module).__name__} can be pruned "
                f"(layers producing the model output and excluded layers are kept whole)."
            )
        weights = {
            f"{p}.weight": pl_module.get_submodule(p).weight
            for g in groups
            for p in g.producers
            if isinstance(pl_module.get_submodule(p), _ROOT_TYPES)
        }
        saliency = self._scores(trainer, pl_module, weights)
        per_group = [group_sum(g, saliency) for g in groups]
        flat = self.sum_over_ranks(trainer, torch.cat(per_group).to(pl_module.device))
        scores, offset = {}, 0
        for g in groups:
            scores[g.name] = flat[offset : offset + g.size].cpu()
            offset += g.size
        plan = self.from_rank_zero(trainer, lowest_channels(graph, scores, self.limit))
        if not math.isclose(self.limit, 0.0):
            self.shrink_in_fit(trainer, pl_module, graph, plan)
