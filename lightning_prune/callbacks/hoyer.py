"""DeepHoyer baselines: HoyerSquare and Group-HS regularisation while training, then a threshold cut.

The regularisers are pure functions (:func:`hoyer_square`, :func:`group_hoyer_square`); the callbacks add
their gradient during training and prune once, at ``prune_delay``/``prune_freq``, as the SNIP-it seed's
``HoyerSquare`` and ``GroupHoyerSquare`` baselines do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_prune._validate import integer, number
from lightning_prune.callbacks.base import PrunesOnce
from lightning_prune.callbacks.reports import ThresholdReport
from lightning_prune.errors import PruningError
from lightning_prune.stats import model_stats
from lightning_prune.structure import ChannelGraph, ChannelGroup
from lightning_prune.structure.layers import is_root
from lightning_prune.structure.plan import spare_one_per_layer

THRESHOLD = 1e-3  # the seed's HOYER_THERSHOLD


def hoyer_square(weight: torch.Tensor) -> torch.Tensor:
    """DeepHoyer's HoyerSquare of one tensor: ``(Σ|w|)² / Σw²`` (0 for an all-zero tensor).

    Scale-invariant, between 1 (one non-zero entry) and ``weight.numel()`` (all entries equal in size).
    Paper: Yang, Wen, Li, "DeepHoyer", ICLR 2020, https://arxiv.org/abs/1908.09979.

    Examples:
        >>> import torch
        >>> round(float(hoyer_square(torch.tensor([3.0, -4.0, 0.0]))), 6)  # 7² / 25
        1.96
    """
    squares = weight.pow(2).sum()
    return weight.abs().sum().pow(2) / squares.clamp_min(torch.finfo(squares.dtype).tiny)


def _slice_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each slice along dim 0; an all-zero slice has norm 0 and passes no (infinite) gradient."""
    squares = weight.pow(2).flatten(1).sum(1)
    positive = squares > 0
    return torch.where(positive, squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt(), 0.0)


def group_hoyer_square(weight: torch.Tensor) -> torch.Tensor:
    """DeepHoyer's Group-HS of one weight: ``((Σ_o ‖W[o]‖)² + (Σ_i ‖W[:, i]‖)²) / Σ W²``.

    The groups are the output rows ``W[o]`` (filters, neurons) and the input columns ``W[:, i]`` (every
    dimension after the first two is summed within a group), as in the seed's ``GroupHoyerSquare`` loss.
    0 for an all-zero weight.

    Raises:
        PruningError: For a weight with fewer than 2 dimensions.

    Examples:
        >>> import torch
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # rows and columns of norms 3 and 4
        >>> round(float(group_hoyer_square(w)), 6)  # (7² + 7²) / 25
        3.92
    """
    if weight.dim() < 2:
        raise PruningError(
            f"group_hoyer_square needs a weight of 2 or more dimensions; got {tuple(weight.shape)}."
        )
    squares = weight.pow(2).sum()
    rows = _slice_norms(weight).sum()
    columns = _slice_norms(weight.transpose(0, 1)).sum()
    return (rows.pow(2) + columns.pow(2)) / squares.clamp_min(torch.finfo(squares.dtype).tiny)


def row_magnitudes(group: ChannelGroup, module: nn.Module) -> torch.Tensor:
    """Largest ``|w|`` of each channel of ``group`` over the weight rows of its conv/linear producers.

    A channel whose value is at or below a threshold has every producing weight at or below it.

    Examples:
        >>> import torch
        >>> from lightning_prune import ChannelGraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[0.5, -2.0], [1e-4, 0.0], [0.1, 0.2]]))
        >>> group = ChannelGraph(net, torch.randn(1, 2)).groups[0]
        >>> [round(v, 6) for v in row_magnitudes(group, net).tolist()]
        [2.0, 0.0001, 0.2]
    """
    params = dict(module.named_parameters())
    out = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        layer = s.param.removesuffix(".weight")
        if s.role != "out" or not s.param.endswith(".weight") or not is_root(module.get_submodule(layer)):
            continue
        rows = (
            params[s.param].detach().movedim(s.dim, 0).index_select(0, s.positions.to(params[s.param].device))
        )
        values = rows.abs().flatten(1).amax(1).double().cpu()
        out.scatter_reduce_(0, s.channels, values, "amax")
    return out


class _HoyerCallback(PrunesOnce):
    """Shared machinery: the regulariser's gradient at every optimizer step until pruning; one event."""

    regularizer: Callable[[torch.Tensor], torch.Tensor]
    prefix = "hoyer"

    def __init__(
        self,
        penalty: float = 1e-4,
        threshold: float = THRESHOLD,
        prune_delay: int = 69,
        prune_freq: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        owner = type(self).__name__
        self.penalty = number(owner, "penalty", penalty, low=0)
        self.threshold = number(owner, "threshold", threshold, low=0)
        self.prune_delay = integer(owner, "prune_delay", prune_delay, low=0)
        self.prune_freq = integer(owner, "prune_freq", prune_freq, low=1)
        self.pruned = False
        self.report: ThresholdReport | None = None

    @property
    def prune_epoch(self) -> int:
        """The epoch (counted from 1) at whose end pruning runs: ``prune_delay + prune_freq``."""
        return self.prune_delay + self.prune_freq

    # -- state ---------------------------------------------------------------------------------------------
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "penalty": self.penalty, "threshold": self.threshold}

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Also check that the pruning event fits into ``max_epochs``."""
        super().setup(trainer, pl_module, stage)
        max_epochs = trainer.max_epochs
        if stage != "fit" or trainer.fast_dev_run or max_epochs is None or max_epochs <= 0:
            return
        owner = type(self).__name__
        if max_epochs < self.prune_epoch:
            raise PruningError(
                f"`{owner}(prune_delay={self.prune_delay}, prune_freq={self.prune_freq})` is invalid: it "
                f"prunes at the end of epoch {self.prune_epoch}, but training stops after "
                f"max_epochs={max_epochs}; lower prune_delay or raise max_epochs."
            )
        if max_epochs == self.prune_epoch:
            rank_zero_warn(
                f"{owner}: pruning runs at the end of the last epoch ({max_epochs}); the pruned network is "
                "not fine-tuned. Raise max_epochs to fine-tune it."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add ``penalty · ∂R/∂W`` to the (unscaled, accumulated) gradients until pruning; then the masks."""
        if not self.pruned and self.penalty > 0:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            weights = [
                w for w in self.prunable_weights(pl_module).values() if id(w) in owned and w.requires_grad
            ]
            if weights:
                with torch.enable_grad():
                    total = sum(type(self).regularizer(w.float()) for w in weights)
                    grads = torch.autograd.grad(total * self.penalty, weights)
                with torch.no_grad():
                    for w, g in zip(weights, grads, strict=True):
                        w.grad = g if w.grad is None else w.grad.add_(g)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the regulariser ``R`` (summed over the selected weights, without ``penalty``) until pruning."""
        if not self.pruned:
            self.log_metrics(trainer, {f"{self.prefix}/regularizer": self.regularization(pl_module)})

    def regularization(self, pl_module: nn.Module) -> float:
        """The regulariser summed over the selected weights now (without ``penalty``)."""
        with torch.no_grad():
            values = [type(self).regularizer(w.float()) for w in self.prunable_weights(pl_module).values()]
        return float(sum(values)) if values else 0.0

    @override
    def prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Prune once ``prune_epoch`` epochs are complete."""
        if self.pruned or trainer.current_epoch < self.prune_epoch:
            return False
        self.prune(trainer, pl_module)
        self.pruned = True
        self._attach(trainer, pl_module)
        r = self.report
        rank_zero_info(
            f"{type(self).__name__}: pruned |w| <= {self.threshold:g} after epoch {trainer.current_epoch}: "
            f"weight sparsity {r.weight_sparsity:.2%}, node sparsity {r.node_sparsity:.2%}, "
            f"{r.params:,} params"
        )
        return True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune if due at the end of the last epoch; warn if training stopped before the event."""
        self.prune_due(trainer, pl_module)
        if not self.pruned:
            rank_zero_warn(
                f"{type(self).__name__}: training stopped after {trainer.current_epoch} epochs, before the "
                f"pruning event (end of epoch {self.prune_epoch}); nothing was pruned."
            )

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove what is at or below ``threshold`` now; sets :attr:`report`."""
        raise NotImplementedError


class HoyerSquareCallback(_HoyerCallback):
    """HoyerSquare: DeepHoyer's scale-invariant sparsity regulariser during training, then a magnitude cut.

    Paper: Yang, Wen, Li, "DeepHoyer: Learning Sparser Neural Network with Differentiable Scale-Invariant
    Sparsity Measures", ICLR 2020, https://arxiv.org/abs/1908.09979. The SNIP-it seed's ``HoyerSquare``
    baseline (``--prune_criterion HoyerSquare --hoyer_square --hoyer_reg <REG> --prune_delay 69
    --prune_freq 1``).

    **Regularisation.** Until pruning, ``penalty · Σ_W (Σ|W|)² / ΣW²`` (:func:`hoyer_square` of each selected
    Conv/Linear weight, every one including the first and last layers, as the seed with
    ``--outer_layer_pruning``) is added to the loss: its gradient is added to the weights' gradients once per
    optimizer step in ``on_before_optimizer_step`` (after AMP unscaling, before clipping), which equals
    adding it to every micro-batch's loss when Lightning averages accumulated gradients.

    **Pruning**, once, at the end of epoch ``prune_delay + prune_freq`` (counted from 1, after that epoch's
    validation and checkpoint): every selected weight with ``|w| <= threshold`` is masked to zero and stays
    zero for the rest of training (the unstructured masks of
    :class:`~lightning_prune.callbacks.base.PruningCallback`), and the regulariser stops, as in the seed.
    The sparsity reached is whatever the regulariser produced: there is no ``limit``.

    Args:
        penalty: The regulariser's weight (the seed's ``--hoyer_reg``; the seed leaves it to the user).
        threshold: Weights with ``|w|`` at or below it are pruned (the seed: 1e-3).
        prune_delay: Epochs before the pruning event is counted (the seed's commands: 69).
        prune_freq: The event is ``prune_freq`` epochs after ``prune_delay`` (the seed's commands: 1).
        include: Glob patterns of layer names to regularise and prune; default: every Conv/Linear layer.
        exclude: Glob patterns of layers to leave alone.

    Raises:
        PruningError: For invalid arguments (here) or a pruning event after ``max_epochs`` (setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import HoyerSquareCallback
        >>> hoyer = HoyerSquareCallback(penalty=1e-4, prune_delay=69, prune_freq=1)
        >>> hoyer.prune_epoch
        70
        >>> trainer = pl.Trainer(callbacks=[hoyer], max_epochs=80, logger=False)
    """

    regularizer = staticmethod(hoyer_square)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Mask every selected weight with ``|w| <= threshold``."""
        weights = self.prunable_weights(pl_module)
        self.sparsity(pl_module)  # counts before pruning
        masks = {n: (w.detach().abs() > self.threshold).cpu() for n, w in weights.items()}
        self.set_masks(pl_module, self.from_rank_zero(trainer, masks))
        self.report = ThresholdReport(**vars(self.sparsity(pl_module)), threshold=self.threshold)
        self.log_metrics(trainer, self.report.metrics())


class GroupHoyerSquareCallback(_HoyerCallback):
    """Group-HS: DeepHoyer's group regulariser on filters/neurons during training, then channels cut.

    Paper: Yang, Wen, Li, "DeepHoyer", ICLR 2020, https://arxiv.org/abs/1908.09979. The SNIP-it seed's
    structured ``GroupHoyerSquare`` baseline (``--prune_criterion GroupHoyerSquare --group_hoyer_square
    --hoyer_reg <REG> --prune_delay 69 --prune_freq 1``).

    **Regularisation.** Until pruning, ``penalty · Σ_W ((Σ_o ‖W[o]‖)² + (Σ_i ‖W[:, i]‖)²) / ΣW²``
    (:func:`group_hoyer_square`: output rows and input columns of every selected Conv/Linear weight, as
    the seed's loss), its gradient added once per optimizer step as in :class:`HoyerSquareCallback`.

    **Pruning**, once, at the end of epoch ``prune_delay + prune_freq``: a channel (an output channel or
    neuron, with every layer coupled to it, see :class:`~lightning_prune.ChannelGroup`) is removed
    physically when all the weights producing it are at or below ``threshold`` in magnitude
    (:func:`row_magnitudes`), in every coupled producer; a layer keeps at least one channel. The optimizer
    keeps the state of the kept channels and training goes on with the smaller network. The removed
    channels' weights are small, not zero, and their biases and norm shifts are dropped with them, so the
    function changes slightly, as in the seed. Layers producing the model's output are never cut.

    Args:
        penalty: The regulariser's weight (the seed's ``--hoyer_reg``).
        threshold: Channels whose producing weights are all at or below it are removed (the seed: 1e-3).
        prune_delay: Epochs before the pruning event is counted (the seed's commands: 69).
        prune_freq: The event is ``prune_freq`` epochs after ``prune_delay`` (the seed's commands: 1).
        include: Glob patterns of layer names to regularise and prune; default: every Conv/Linear layer.
        exclude: Glob patterns of layers to leave alone (kept whole, not regularised).

    Raises:
        PruningError: For invalid arguments (here), a pruning event after ``max_epochs`` (setup) or a model
            without a prunable channel group (start of fit).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import GroupHoyerSquareCallback, ShrinkOnFitEnd
        >>> group_hs = GroupHoyerSquareCallback(penalty=2e-4)
        >>> trainer = pl.Trainer(callbacks=[group_hs, ShrinkOnFitEnd("s.pt")], max_epochs=80, logger=False)
    """

    structured = True
    prefix = "group_hoyer"
    regularizer = staticmethod(group_hoyer_square)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the layers; check that some channel group can be cut."""
        super().on_fit_start(trainer, pl_module)
        if not self.pruned and not self._groups(self.channel_graph(trainer, pl_module)):
            raise PruningError(
                f"{type(self).__name__}: no channel group of {type(pl_module).__name__} can be pruned "
                "(layers producing the model output and layers not selected are kept whole)."
            )

    @staticmethod
    def _groups(graph: ChannelGraph) -> list[ChannelGroup]:
        return [g for g in graph.groups if g.prunable and g.size > 1]

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove every channel whose producing weights are all at or below ``threshold``."""
        graph = self.channel_graph(trainer, pl_module, measure=True)
        self._node_layers = [n for n in self._layers if n not in graph.output_layers]
        self.sparsity(pl_module)  # counts before pruning
        plan = {}
        for group in self._groups(graph):
            magnitudes = row_magnitudes(group, pl_module)
            dead = [c for c in range(group.size) if magnitudes[c] <= self.threshold]
            dead, _ = spare_one_per_layer(group, dead, graph._shapes())
            if dead:
                plan[group.name] = dead
        plan = self.from_rank_zero(trainer, plan)
        removed = 0
        if plan:
            groups = {g.name: g for g in graph.groups}
            self.shrink_in_fit(trainer, pl_module, graph, plan)
            removed = sum(len(c) * groups[g].ties for g, c in plan.items() if g not in self.refused_groups)
        macs = model_stats(pl_module, self.example_inputs(trainer, pl_module)).macs
        self.report = ThresholdReport(
            **vars(self.sparsity(pl_module)), threshold=self.threshold, channels_removed=removed, macs=macs
        )
        self.log_metrics(trainer, self.report.metrics())
