"""Network Slimming: L1 sparsity on normalization scales during training, then channel pruning by |γ|."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from rich.table import Table
from torch import nn
from typing_extensions import override

from lightning_prune._validate import choice, fraction, integer, invalid, number
from lightning_prune._validate import round_to as check_round_to
from lightning_prune.callbacks._trainer import validation_metrics
from lightning_prune.callbacks.base import PrunesOnce
from lightning_prune.callbacks.reports import SlimmingReport
from lightning_prune.errors import PruningError
from lightning_prune.stats import model_stats
from lightning_prune.structure import ChannelGraph, ChannelGroup, lowest_channels, select_layers
from lightning_prune.structure.layers import is_root

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
AGGREGATES = ("max", "mean", "sum")
SMALL = 1e-2  # |γ| below this counts as "near zero" in the logged fraction


def scale_scores(
    group: ChannelGroup, module: nn.Module, norms: Sequence[str], aggregate: str = "max"
) -> torch.Tensor | None:
    """Network Slimming's channel score: ``|γ|`` of the group's norm layers among ``norms``, aggregated.

    Args:
        group: A channel group of ``module``.
        module: The model the group belongs to.
        norms: Qualified names of the norm layers whose scales count.
        aggregate: ``"max"``, ``"mean"`` or ``"sum"`` over the norms a channel passes through.

    Returns:
        One float64 score per channel of ``group``, or ``None`` if no norm of ``norms`` is in the group.
    """
    values, channels = [], []
    selected = {f"{n}.weight" for n in norms}
    params = dict(module.named_parameters())
    for s in group.slices:
        if s.role == "norm" and s.param in selected:
            gamma = params[s.param].detach().abs().float().cpu()
            values.append(gamma.index_select(0, s.positions))
            channels.append(s.channels)
    if not values:
        return None
    v, c = torch.cat(values).double(), torch.cat(channels)
    zeros = torch.zeros(group.size, dtype=torch.float64)
    if aggregate == "max":
        return zeros.scatter_reduce_(0, c, v, "amax", include_self=False)
    total = zeros.index_add_(0, c, v)
    if aggregate == "sum":
        return total
    return total / torch.bincount(c, minlength=group.size).clamp_min(1)


class SlimmingL1Callback(PrunesOnce):
    """Network Slimming: L1 on normalization scales during training, then prune channels by ``|γ|``.

    Paper: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017,
    https://arxiv.org/abs/1708.06519.

    **Sparsity training.** At every optimizer step, ``penalty · sign(γ)`` is added to the gradient of every
    selected normalization scale ``γ`` (BatchNorm 1d/2d/3d, GroupNorm, channel-wise LayerNorm): the
    subgradient of ``penalty · Σ|γ|``. It is added in ``on_before_optimizer_step``, i.e. once per optimizer
    step (not per micro-batch under gradient accumulation), after AMP has unscaled the gradients and before
    gradient clipping, so the update is the same with and without mixed precision.

    **Pruning** (when ``limit`` is set), after epoch ``prune_at`` (counted from 1; after its validation
    and any checkpoint written at its end, so a checkpoint's score belongs to the network it holds) or at
    the end of training (``"fit_end"``): each channel group (see :class:`~lightning_prune.ChannelGroup`)
    that contains a selected norm layer is scored by its channels' ``|γ|`` — aggregated over all the group's
    norm layers with ``aggregate`` (``"max"``, the default: a channel is as important as its most important
    use, so a residual channel that one block still needs is kept) — and, in ONE global ranking, the lowest
    channels are removed until ``limit`` of the scored nodes are gone (the global-threshold rule of the
    paper; a channel feeding several producers counts once per producer). Every layer keeps at least one
    channel, and at least ``layer_floor`` of its channels (rounded up) when that is set: one global
    threshold can otherwise cut a layer whose scales all shrank down to a single channel (Torch-Pruning's
    per-layer ``max_pruning_ratio`` is ``1 - layer_floor``). Unlike the original, residual additions and
    concatenations are not skipped: their coupled channels are removed together, in every layer. Removal
    is physical and immediate; during fit the optimizer keeps the state of the kept channels, so training
    (fine-tuning) goes on with the smaller network. At ``"fit_end"`` pruning runs in ``on_train_end``,
    before any ``on_fit_end`` hook, so :class:`~lightning_prune.ShrinkOnFitEnd` (in either order in the
    callback list) reports and saves the pruned network.

    **Monitoring.** At every epoch end: ``slimming/frac_below_1e-2`` (fraction of selected ``|γ|`` below
    0.01) and ``slimming/mean_abs_gamma`` to every logger, and a histogram of ``|γ|`` to TensorBoard loggers.

    Args:
        penalty: ``s`` of the paper (1e-4 for VGG, 1e-5 for ResNet/DenseNet); 0 disables the sparsity term.
        limit: Fraction of the scored nodes to remove, in [0, 1); ``None`` only trains with the penalty.
        prune_at: ``"fit_end"`` or an epoch number (>= 1, within ``max_epochs``) at whose end to prune.
        aggregate: How a group's norms combine into one score per channel: ``"max"``, ``"mean"`` or ``"sum"``.
        include: Glob patterns of norm-layer names to regularize and prune by; default: every norm layer.
        exclude: Glob patterns of norm layers to leave alone.
        round_to: Every channel group the pruning cuts keeps a multiple of this many channels
            (:func:`~lightning_prune.structure.round_kept`); ``"auto"`` picks it from the device and dtype
            (:func:`~lightning_prune.structure.auto_round_to`); 1: no rounding.
        layer_floor: Fraction of each layer's channels that pruning always keeps, in [0, 1) (0.1: no
            layer loses more than 90% of its channels); 0: at least one channel per layer. When the floors
            leave fewer removable channels than ``limit`` asks for, fewer are removed (the report says how
            many).

    Raises:
        PruningError: For invalid arguments (here) or a model without selected affine norm layers (setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import ShrinkOnFitEnd, SlimmingL1Callback
        >>> slimming = SlimmingL1Callback(penalty=1e-4, limit=0.7)
        >>> trainer = pl.Trainer(callbacks=[slimming, ShrinkOnFitEnd("vgg19_slim.pt")], max_epochs=160)
    """

    def __init__(
        self,
        penalty: float = 1e-4,
        limit: float | None = None,
        prune_at: int | str = "fit_end",
        aggregate: str = "max",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        round_to: int | str = 1,
        layer_floor: float = 0.0,
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        owner = type(self).__name__
        self.round_to = check_round_to(owner, round_to)
        self.layer_floor = fraction(owner, "layer_floor", layer_floor)
        self.penalty = number(owner, "penalty", penalty, low=0)
        self.limit = None if limit is None else fraction(owner, "limit", limit)
        self.structured = self.limit is not None
        if isinstance(prune_at, str) and prune_at.isdigit():  # "80" from a command line
            prune_at = int(prune_at)
        if prune_at != "fit_end":
            try:
                prune_at = integer(owner, "prune_at", prune_at, low=1)
            except PruningError:
                raise invalid(owner, "prune_at", prune_at, "'fit_end' or an epoch number >= 1") from None
        self.prune_at = prune_at
        self.aggregate = choice(owner, "aggregate", aggregate, AGGREGATES)
        if self.limit is None and prune_at != "fit_end":
            rank_zero_warn(
                f"{owner}(prune_at={prune_at!r}) has no effect without `limit`: nothing is pruned."
            )
        self.pruned = False
        self.evaluation: dict[str, tuple[float | None, float]] = {}  # metric -> (before, after pruning)
        self.report: SlimmingReport | None = None  # after pruning
        self._norms: list[str] = []
        self._scales: list[nn.Parameter] = []

    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "penalty": self.penalty, "limit": self.limit}

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check ``prune_at`` against ``max_epochs`` and that the selected norm layers have scales."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        owner = type(self).__name__
        max_epochs = trainer.max_epochs
        if (
            self.limit is not None
            and isinstance(self.prune_at, int)
            and not trainer.fast_dev_run
            and max_epochs is not None
            and 0 < max_epochs < self.prune_at
        ):
            raise PruningError(
                f"`{owner}(prune_at={self.prune_at})` is invalid: training stops after "
                f"max_epochs={max_epochs}; `prune_at` must be an epoch in [1, {max_epochs}] or 'fit_end'."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the norm layers (``configure_model`` has built them by now); check pruning can happen."""
        self._detach_resize()
        self._select_norms(pl_module)
        self._layers = [n for n, m in pl_module.named_modules() if is_root(m)]
        if self.limit is not None and not self.pruned:
            graph = ChannelGraph(pl_module, self.example_inputs(trainer, pl_module))
            if not self._scores(graph, pl_module):
                raise PruningError(
                    f"{type(self).__name__}: no prunable channel group contains a selected norm layer "
                    f"({self._norms}); the layers producing the model output are never pruned."
                )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add ``penalty · sign(γ)`` to the (unscaled, accumulated) gradients of the selected scales."""
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.penalty == 0:
            return
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        with torch.no_grad():
            for gamma in self._scales:
                if id(gamma) not in owned or not gamma.requires_grad:  # frozen scales stay as they are
                    continue
                if gamma.grad is None:
                    gamma.grad = torch.zeros_like(gamma)
                gamma.grad.add_(torch.sign(gamma), alpha=self.penalty)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the |γ| distribution."""
        self._log_gammas(trainer, pl_module)

    @override
    def prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule, evaluate: bool = False) -> bool:
        """Prune once ``prune_at`` epochs are complete (``evaluate``: re-validate, see :meth:`prune`)."""
        if self.limit is None or self.pruned or not isinstance(self.prune_at, int):
            return False
        if trainer.current_epoch < self.prune_at:
            return False
        self.prune(trainer, pl_module, evaluate=evaluate)
        return True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune at the end of training (``prune_at="fit_end"``, or the last epoch), before ``on_fit_end``."""
        if self.limit is None or self.pruned:
            return
        if self.prune_at == "fit_end" or self.prune_due(trainer, pl_module, evaluate=True):
            if not self.pruned:
                self.prune(trainer, pl_module, evaluate=True)
            saved = any(getattr(cb, "save_path", None) for cb in trainer.callbacks)
            say = rank_zero_info if saved else rank_zero_warn
            say(
                f"{type(self).__name__}: pruned at the end of training, after Lightning's last checkpoint: "
                "its checkpoints hold the network before pruning. ShrinkOnFitEnd(save_path=...) saves the "
                "pruned one."
            )
        else:
            rank_zero_warn(
                f"{type(self).__name__}(prune_at={self.prune_at}): training ended after "
                f"{trainer.current_epoch} epochs, before epoch {self.prune_at}; nothing was pruned."
            )

    # -- selection -----------------------------------------------------------------------------------------
    def _select_norms(self, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        present = [
            f"{n} ({type(m).__name__})" for n, m in pl_module.named_modules() if isinstance(m, NORM_TYPES)
        ]
        if not present:
            layers = sorted({type(m).__name__ for m in pl_module.modules()})
            raise PruningError(
                f"{owner}: {type(pl_module).__name__} has no normalization layer (BatchNorm, GroupNorm, "
                f"LayerNorm) whose scales could be regularized; its layer types are {layers}."
            )
        norms = select_layers(pl_module, self.include, self.exclude, types=NORM_TYPES, owner=owner)
        if not norms:
            raise PruningError(
                f"{owner}: include={self.include} and exclude={self.exclude} select no normalization layer; "
                f"the model has: {', '.join(present)}."
            )
        for name in norms:
            norm = pl_module.get_submodule(name)
            scale = getattr(norm, "weight", None)
            if not isinstance(scale, nn.Parameter):
                raise PruningError(
                    f"{owner}: {name} ({type(norm).__name__}) has no learnable scale (affine=False or "
                    "elementwise_affine=False): Network Slimming needs one. Exclude it with "
                    f"exclude=[{name!r}] or build it with affine=True."
                )
            if scale.dim() != 1:
                raise PruningError(
                    f"{owner}: {name} ({type(norm).__name__}) normalizes over {tuple(scale.shape)}, not over "
                    "channels; exclude it with exclude=[...]."
                )
        self._norms = norms
        self._scales = [pl_module.get_submodule(n).weight for n in norms]

    # -- pruning -------------------------------------------------------------------------------------------
    def channel_scores(self, group: ChannelGroup, module: nn.Module) -> torch.Tensor | None:
        """One score per channel of ``group`` from its selected norms (see :func:`scale_scores`)."""
        return scale_scores(group, module, self._norms, self.aggregate)

    def _scores(self, graph: ChannelGraph, module: nn.Module) -> dict[str, torch.Tensor]:
        scores = {}
        for g in graph.groups:
            if g.prunable and g.size > 1:
                s = self.channel_scores(g, module)
                if s is not None:
                    scores[g.name] = s
        return scores

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, evaluate: bool = False) -> None:
        """Remove the lowest-|γ| channels now (physically, optimizer state carried over).

        With ``evaluate`` (pruning after the last validation), the validation step is run again on the
        pruned network: ``trainer.callback_metrics`` then hold its figures (the figures before pruning stay
        under ``<name>_before_pruning``), and the table shows both.

        Warns when the scales are not separated: when the largest removed score exceeds a tenth of the
        median kept score, the L1 penalty has not pushed the removed channels towards zero (raise
        ``penalty``, train longer, or lower ``limit``).
        """
        owner = type(self).__name__
        example = self.example_inputs(trainer, pl_module)
        graph = ChannelGraph(pl_module, example, measure=True)  # the trace counts params and MACs too
        self._node_layers = [n for n in self._layers if n not in graph.output_layers]
        before = graph.traced_stats
        self.sparsity(pl_module)  # counts before pruning
        scores = self._scores(graph, pl_module)
        if not scores:
            raise PruningError(
                f"{owner}: no prunable channel group contains a selected norm layer ({self._norms}); the "
                "layers producing the model output are never pruned."
            )
        plan = lowest_channels(
            graph, scores, self.limit, self.channel_multiple(pl_module), floor=self.layer_floor
        )
        plan = self.from_rank_zero(trainer, plan)
        groups = {g.name: g for g in graph.groups}
        threshold = max((float(scores[g][c]) for g, chs in plan.items() for c in chs), default=0.0)
        self._warn_if_not_separated(scores, plan, threshold)
        if plan:
            self.shrink_in_fit(trainer, pl_module, graph, plan)
        self._select_norms(pl_module)  # the scales are new parameters after the shrink
        after = model_stats(pl_module, example)
        self.pruned = True
        evaluated = validation_metrics(trainer, pl_module) if evaluate else {}
        self.evaluation = {
            name: (float(trainer.callback_metrics[name]) if name in trainer.callback_metrics else None, value)
            for name, value in evaluated.items()
        }
        for name, (before_value, value) in self.evaluation.items():
            if before_value is not None:
                trainer.callback_metrics[f"{name}_before_pruning"] = torch.tensor(before_value)
            trainer.callback_metrics[name] = torch.tensor(value)
        self.report = SlimmingReport(
            **vars(self.sparsity(pl_module)),
            threshold=threshold,
            channels_removed=sum(len(c) * groups[g].ties for g, c in plan.items()),
            params_before=before.params,
            params_after=after.params,
            macs_before=before.macs,
            macs_after=after.macs,
            after_pruning={name: value for name, (_, value) in self.evaluation.items()},
        )
        self.log_metrics(trainer, self.report.metrics())
        if trainer.is_global_zero:
            Console().print(self.table())
        rank_zero_info(
            f"{owner}: removed {self.report.channels_removed} channels with score <= "
            f"{threshold:.3g} (node sparsity {self.report.node_sparsity:.2%})"
        )

    def table(self) -> Table:
        """What pruning removed, as a rich ``Table``."""
        r = self.report
        table = Table(title="lightning-prune: Network Slimming")
        for column in ("", "before pruning", "after pruning", "after / before"):
            table.add_column(column, justify="right" if column else "left")
        for label, b, a in (
            ("params", r.params_before, r.params_after),
            ("MACs", r.macs_before, r.macs_after),
        ):
            table.add_row(label, f"{b:,.0f}", f"{a:,.0f}", f"{a / b:.3f}" if b else "-")
        for name, (b, a) in self.evaluation.items():  # re-validated after pruning
            ratio = f"{a / b:.3f}" if b else "-"
            table.add_row(f"{name} (validation)", "-" if b is None else f"{b:.4g}", f"{a:.4g}", ratio)
        table.caption = (
            f"{r.channels_removed} channels removed ({self.aggregate} |γ| <= {r.threshold:.3g}), "
            f"node sparsity {r.node_sparsity:.1%}"
        )
        return table

    def _warn_if_not_separated(
        self, scores: dict[str, torch.Tensor], plan: dict[str, list[int]], threshold: float
    ) -> None:
        kept = []
        for name, values in scores.items():
            gone = set(plan.get(name, ()))
            kept += [float(v) for c, v in enumerate(values.tolist()) if c not in gone]
        median = float(torch.tensor(kept).median()) if kept else 0.0
        if median > 0 and threshold > 0.1 * median:
            rank_zero_warn(
                f"{type(self).__name__}(limit={self.limit}): the scales are not separated: removed channels "
                f"have |γ| up to {threshold:.3g}, more than a tenth of the kept channels' median "
                f"{median:.3g}. Expect a large accuracy drop; raise `penalty`, train longer or lower `limit`."
            )

    # -- monitoring ----------------------------------------------------------------------------------------
    def _log_gammas(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._scales:
            return
        gammas = torch.cat([g.detach().abs().float().flatten() for g in self._scales])
        metrics = {
            "slimming/frac_below_1e-2": float((gammas < SMALL).float().mean()),
            "slimming/mean_abs_gamma": float(gammas.mean()),
        }
        self.log_metrics(trainer, metrics)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
                if callable(add_histogram):
                    add_histogram("slimming/abs_gamma", gammas.cpu(), trainer.global_step)
