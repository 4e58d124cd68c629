"""Sensitivity Pruner: learn which channels to keep, block by block, while the network fine-tunes.

The decisions are pure functions (:func:`beta_value`, :func:`adapt_lambda`, :func:`top_fraction`,
:func:`auto_blocks`) that the callback :class:`SensitivityPruner` drives from its hooks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_prune._validate import boolean, integer, invalid, number
from lightning_prune._validate import round_to as check_round_to
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.reports import BlockReport
from lightning_prune.criteria import ScoringInputs, get_criterion
from lightning_prune.errors import PruningError
from lightning_prune.stats import model_stats
from lightning_prune.structure import ChannelGraph, ChannelGroup, round_kept
from lightning_prune.structure.layers import is_root, output_channels

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# -- the decisions, as pure functions ------------------------------------------------------------------------
def beta_value(
    iteration: int, iterations: int, beta_range: int, bounds: Sequence[float] = (1.0, 100.0)
) -> float:
    """The seed's β schedule: ``linspace(low, high, iterations // beta_range)``, one value per ``beta_range``.

    Iteration ``i`` of a block of ``iterations`` uses value ``min(i // beta_range, n - 1)``; with fewer
    iterations than one ``beta_range`` (n = 1) β stays at ``low``.

    Examples:
        >>> [beta_value(i, 400, 100) for i in (0, 99, 100, 250, 399, 500)]
        [1.0, 1.0, 34.0, 67.0, 100.0, 100.0]
    """
    low, high = float(bounds[0]), float(bounds[1])
    n = max(1, iterations // beta_range)
    if n == 1:
        return low
    return low + (high - low) * min(iteration // beta_range, n - 1) / (n - 1)


def adapt_lambda(kept_fraction: float, target_fraction: float, scale: float = 5.0) -> float:
    """The seed's λ: 0 once the binarised kept fraction is below the target's, else ``scale`` × the gap.

    Examples:
        >>> round(adapt_lambda(0.7, 0.4), 6), adapt_lambda(0.3, 0.4)
        (1.5, 0.0)
    """
    return 0.0 if kept_fraction < target_fraction else scale * abs(kept_fraction - target_fraction)


def top_fraction(scores: Mapping[str, torch.Tensor], rate: float, per_layer: bool) -> dict[str, torch.Tensor]:
    """Keep the highest ``rate`` of the channels: per layer, or in one ranking over all layers.

    Per layer, each layer keeps ``max(1, round(rate · n))`` channels; globally, ``max(1, round(rate · N))``
    channels of all ``N`` are kept (at least one per layer): a layer left without one keeps its best, in
    place of the lowest-scoring channel kept elsewhere. Ties go to lower indices.

    Returns:
        Layer name → bool tensor (True = kept), on the CPU.

    Examples:
        >>> kept = top_fraction({"a": torch.tensor([0.1, 0.9, 0.5, 0.2])}, 0.5, per_layer=True)
        >>> kept["a"].tolist()
        [False, True, True, False]
    """
    cpu = {n: s.detach().to("cpu", torch.float64).flatten() for n, s in scores.items()}
    if per_layer:
        return {n: _top(s, max(1, round(rate * s.numel()))) for n, s in cpu.items()}
    flat = torch.cat(list(cpu.values()))
    budget = max(1, round(rate * flat.numel()), len(cpu))
    kept_all = _top(flat, budget)
    out = dict(zip(cpu, kept_all.split([s.numel() for s in cpu.values()]), strict=True))
    for n, kept in out.items():
        if not kept.any():
            kept[int(torch.argmax(cpu[n]))] = True
    while sum(int(k.sum()) for k in out.values()) > budget:  # the rescued channels come out of the budget
        spare = [
            (float(cpu[n][c]), n, int(c)) for n, k in out.items() if k.sum() > 1 for c in torch.nonzero(k)
        ]
        _, n, c = min(spare)
        out[n][c] = False
    return out


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-scores, stable=True).indices  # highest first, ties by index
    kept = torch.zeros(scores.numel(), dtype=torch.bool)
    kept[order[:k]] = True
    return kept


def auto_blocks(names: Sequence[str]) -> list[list[str]]:
    """Default blocks: group names split by the first name component after their common prefix.

    ResNets split into their stem and stages (``layer1``, ``layer2``, ...), a plain ``features``
    sequence into its top-level entries, in model order.

    Examples:
        >>> auto_blocks(["m.conv1", "m.layer1.0.conv1", "m.layer1.1.conv1", "m.layer2.0.conv1"])
        [['m.conv1'], ['m.layer1.0.conv1', 'm.layer1.1.conv1'], ['m.layer2.0.conv1']]
    """
    parts = [n.split(".") for n in names]
    depth = 0
    shortest = min((len(p) for p in parts), default=1)
    while depth < shortest - 1 and len({tuple(p[: depth + 1]) for p in parts}) == 1:
        depth += 1
    blocks: dict[tuple[str, ...], list[str]] = {}
    for name, p in zip(names, parts, strict=True):
        blocks.setdefault(tuple(p[: depth + 1]), []).append(name)
    return list(blocks.values())


class StrategyNet(nn.Module):
    """The per-layer strategy network: channel sensitivities → soft indicators ``sigmoid(β · z)``.

    ``z = W s + b`` (one linear map over the layer's channels, the seed's convolution over the sensitivity
    map, summed over the kernel positions).

    Examples:
        >>> net = StrategyNet(4)
        >>> net(torch.ones(4), beta=100.0).shape
        torch.Size([4])
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)

    def forward(self, sensitivity: torch.Tensor, beta: float) -> torch.Tensor:
        """Indicators in (0, 1), one per channel."""
        return torch.sigmoid(beta * self.linear(sensitivity))


class SensitivityPruner(PruningCallback):
    """Sensitivity Pruner: strategy networks learn which channels to keep, block by block, during fine-tuning.

    Paper: Guo et al., "Sensitivity pruner: Filter-Level compression algorithm for deep neural networks",
    Pattern Recognition 140:109508 (2023), https://doi.org/10.1016/j.patcog.2023.109508.

    The prunable channel groups are split into blocks (``blocks`` glob patterns, or automatically: the
    stem and stages of a ResNet, the top-level entries of a ``features`` sequence; see
    :func:`auto_blocks`). Block ``b`` trains during epochs ``b · epochs_per_block`` to
    ``(b + 1) · epochs_per_block - 1``, then its channels are removed physically; the remaining epochs
    fine-tune the pruned network. In every training iteration of a block:

    1. **Sensitivities**: SNIP's ``Σ |∂L/∂w ⊙ w|`` over each channel's producing weights (kernel and inputs),
       on this batch, with every conv/linear weight freshly initialised (Xavier normal, seeded; the seed's
       ``init_sensity_model``) when ``reinit=True``, else on the network as it is; normalised by their mean
       over the block.
    2. **Target**: the top ``compression_rate`` channels by sensitivity, per layer (``layer_sort=True``) or in
       one ranking over the block.
    3. **Indicators**: ``m = sigmoid(β · z)`` from the group's :class:`StrategyNet`; ``m`` multiplies the
       group's channels at the output of its norm layers (so that BatchNorm does not undo it), or of its
       producing layers when it has none. In validation the channels are multiplied by the last vote (0/1).
    4. **Loss**: the module's loss plus ``Σ λ_l · mean|m_l − t_l|`` (the L1 term is back-propagated into the
       strategy networks at the start of the batch, the task loss reaches them through the forward pass).
    5. **Vote** every ``vote_window`` iterations: a channel is kept if ``m > 0.5`` in most of the window's
       iterations (counted over all DDP ranks); λ of each layer becomes :func:`adapt_lambda` of the voted
       kept fraction and the target's; a layer whose indicators are not yet near-binary (less than 90% below
       0.2 or above 0.8) after the block's first epoch gets β + 1 from then on (the seed's rule).

    β follows :func:`beta_value` from ``beta_bounds[0]`` to ``beta_bounds[1]`` over the block, a new value
    every ``beta_range`` iterations. At the end of a block, the channels whose voted indicator is 0 are
    removed; the count is made exact (``max(1, round(compression_rate · n))`` per layer, or per block) by
    keeping the most-voted channels, and rounded to ``round_to``. Optimizer state is carried over.

    The strategy networks are trained by an Adam optimizer (``strategy_lr``) owned by the callback, stepped
    in ``on_before_optimizer_step`` next to the module's optimizer, their gradients averaged over DDP ranks.
    The current block, iteration, strategy networks and their optimizer, β offsets, λ and votes are in the
    callback's state: a run resumed mid-block ends like an uninterrupted one. Forward hooks and strategy
    networks are removed at the end of each block, at the end of training and on exceptions.

    Args:
        compression_rate: Fraction of each block's channels kept, in (0, 1] (the seed's default 0.4).
        layer_sort: Rank channels within each layer (True) or over the whole block (False, the seed's
            default).
        epochs_per_block: Epochs each block trains before its channels are removed.
        blocks: Glob patterns of channel-group names (a group is named by its first producing layer, e.g.
            ``"model.layer1.*"``), one entry per block, in pruning order; an entry may be a list of patterns.
            ``None``: :func:`auto_blocks`.
        beta_range: Iterations each β value lasts (the seed's ``--beta_range``).
        beta_bounds: First and last β of the schedule.
        vote_window: Iterations per vote (the seed's ``--channel_index_range``).
        lambda_init: λ of every layer before the first vote.
        lambda_scale: λ = ``lambda_scale`` × the gap between the voted and the target kept fraction.
        strategy_lr: Learning rate of the strategy networks' Adam optimizer.
        reinit: Score sensitivities on freshly initialised weights (the seed) or on the current ones.
        seed: Seed of the strategy networks' initialisation and of the fresh weights.
        include: Glob patterns of layer names to prune; default: all Conv/Linear layers.
        exclude: Glob patterns of layers to keep whole.
        round_to: Every pruned group keeps a multiple of this many channels (``"auto"``: from the device).

    Raises:
        PruningError: For invalid arguments (here) or a module, data or trainer they do not fit (before
            training starts).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import SensitivityPruner
        >>> pruner = SensitivityPruner(compression_rate=0.4, epochs_per_block=8)
        >>> trainer = pl.Trainer(callbacks=[pruner], max_epochs=40, logger=False)
    """

    structured = True

    def __init__(
        self,
        compression_rate: float = 0.4,
        layer_sort: bool = False,
        epochs_per_block: int = 1,
        blocks: Sequence[str | Sequence[str]] | None = None,
        beta_range: int = 100,
        beta_bounds: Sequence[float] = (1.0, 100.0),
        vote_window: int = 20,
        lambda_init: float = 0.1,
        lambda_scale: float = 5.0,
        strategy_lr: float = 0.01,
        reinit: bool = True,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        round_to: int | str = 1,
    ) -> None:
        super().__init__(include=include, exclude=exclude, num_batches=1)
        owner = type(self).__name__
        self.compression_rate = number(
            owner, "compression_rate", compression_rate, low=0, low_open=True, high=1
        )
        self.layer_sort = boolean(owner, "layer_sort", layer_sort)
        self.epochs_per_block = integer(owner, "epochs_per_block", epochs_per_block, low=1)
        self.blocks = _check_blocks(owner, blocks)
        self.beta_range = integer(owner, "beta_range", beta_range, low=1)
        if (
            not isinstance(beta_bounds, Sequence)
            or isinstance(beta_bounds, str)
            or len(beta_bounds) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in beta_bounds)
            or not 0 < beta_bounds[0] <= beta_bounds[1]
        ):
            raise invalid(owner, "beta_bounds", beta_bounds, "two numbers [low, high] with 0 < low <= high")
        self.beta_bounds = (float(beta_bounds[0]), float(beta_bounds[1]))
        self.vote_window = integer(owner, "vote_window", vote_window, low=1)
        self.lambda_init = number(owner, "lambda_init", lambda_init, low=0)
        self.lambda_scale = number(owner, "lambda_scale", lambda_scale, low=0)
        self.strategy_lr = number(owner, "strategy_lr", strategy_lr, low=0, low_open=True)
        self.reinit = boolean(owner, "reinit", reinit)
        self.seed = integer(owner, "seed", seed, low=0)
        self.round_to = check_round_to(owner, round_to)
        # progress (in the checkpoint)
        self.block_groups: list[list[str]] = []  # group names of every block, fixed at the first fit
        self.block = 0  # blocks finished
        self.start_epoch = (
            0  # the epoch the first fit started at: block b trains epochs start + b·epochs_per_block …
        )
        self.active = False  # the current block has started
        self.iteration = 0  # training iterations of the current block
        self.window = 0  # iterations in the current vote window
        self.lambdas: dict[str, float] = {}
        self.beta_offset: dict[str, float] = {}
        self.votes: dict[str, torch.Tensor] = {}  # m > 0.5 counts in the current window
        self.voted: dict[str, torch.Tensor] = {}  # fraction of the last window's votes (all ranks)
        self.target_fraction: dict[str, float] = {}
        self.reports: list[BlockReport] = []
        # the current block's machinery (rebuilt from the state on resume)
        self.nets: nn.ModuleDict | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved_nets: dict[str, dict[str, torch.Tensor]] = {}
        self._saved_optimizer: dict[str, Any] | None = None
        self._indicators: dict[str, torch.Tensor] = {}
        self._gates: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, int]]] = {}
        self._handles: list[Any] = []
        self._gating = False
        self._paused = False
        self._current: list[ChannelGroup] = []  # the current block's groups, as traced at its start
        self._stepped_at: int | None = None
        self._iterations_per_epoch = 1

    # -- state -----------------------------------------------------------------------------------------------
    def _state_key_args(self) -> dict[str, Any]:
        return {
            **super()._state_key_args(),
            "compression_rate": self.compression_rate,
            "layer_sort": self.layer_sort,
            "blocks": self.blocks,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        """See :meth:`PruningCallback.state_dict`; adds the block, the strategy networks and the schedules."""
        nets, optimizer = self._nets_state()
        return {
            **super().state_dict(),
            "block_groups": [list(b) for b in self.block_groups],
            "block": self.block,
            "start_epoch": self.start_epoch,
            "active": self.active,
            "iteration": self.iteration,
            "window": self.window,
            "lambdas": dict(self.lambdas),
            "beta_offset": dict(self.beta_offset),
            "votes": {n: v.detach().cpu() for n, v in self.votes.items()},
            "voted": {n: v.detach().cpu() for n, v in self.voted.items()},
            "target_fraction": dict(self.target_fraction),
            "nets": nets,
            "strategy_optimizer": optimizer,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`PruningCallback.load_state_dict`."""
        super().load_state_dict(state_dict)
        self.block_groups = [list(b) for b in state_dict.get("block_groups", [])]
        self.block = int(state_dict.get("block", 0))
        self.start_epoch = int(state_dict.get("start_epoch", 0))
        self.active = bool(state_dict.get("active", False))
        self.iteration = int(state_dict.get("iteration", 0))
        self.window = int(state_dict.get("window", 0))
        self.lambdas = dict(state_dict.get("lambdas", {}))
        self.beta_offset = dict(state_dict.get("beta_offset", {}))
        self.votes = dict(state_dict.get("votes", {}))
        self.voted = dict(state_dict.get("voted", {}))
        self.target_fraction = dict(state_dict.get("target_fraction", {}))
        self._saved_nets = dict(state_dict.get("nets", {}))
        self._saved_optimizer = state_dict.get("strategy_optimizer")
        self.nets, self.optimizer = None, None

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Also refuse float16 with a gradient scaler (the strategy networks' gradients would stay scaled)."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise PruningError(
                f"{type(self).__name__} trains its strategy networks outside the module's optimizer, which "
                f"float16 gradient scaling does not reach; got precision={trainer.precision!r} with a "
                "gradient scaler. Use '32-true' or 'bf16-mixed'."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Split the groups into blocks (first fit), check the epoch budget, rebuild a resumed block."""
        owner = type(self).__name__
        if not self.block_groups:
            graph = self.channel_graph(trainer, pl_module)
            self._node_layers = [n for n in self._layers if n not in graph.output_layers]
            self.sparsity(pl_module)  # record the counts before pruning
            self.block_groups = self._split(graph)
            self.start_epoch = trainer.current_epoch  # blocks count from here (a fit from a pretrained ckpt)
        budget = self.start_epoch + len(self.block_groups) * self.epochs_per_block
        if not trainer.fast_dev_run and trainer.max_epochs is not None and trainer.max_epochs > 0:
            if trainer.max_epochs < budget:
                raise PruningError(
                    f"{owner}: {len(self.block_groups)} blocks × epochs_per_block={self.epochs_per_block} "
                    f"from epoch {self.start_epoch} need max_epochs >= {budget}, but max_epochs="
                    f"{trainer.max_epochs}: raise max_epochs, lower epochs_per_block or merge blocks."
                )
            if trainer.max_epochs == budget:
                rank_zero_warn(
                    f"{owner}: the last block is pruned at the end of the last epoch ({budget}); the pruned "
                    "network is not fine-tuned. Raise max_epochs for the final fine-tune."
                )
        self._iterations_per_epoch = _batches_per_epoch(trainer)
        if self.active and self.nets is None and self.block < len(self.block_groups):
            self._start_block(trainer, pl_module, resumed=True)
        super().on_train_start(trainer, pl_module)

    @override
    def prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Finish the blocks whose epochs are over, and start the next one."""
        pruned = self._finish_due(trainer, pl_module)
        if self.block < len(self.block_groups) and not self.active:
            self._start_block(trainer, pl_module)
        return pruned

    def _finish_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, at_end: bool = False
    ) -> bool:
        """Finish the blocks whose epochs are over; at the end of training only one that ran all its batches.

        A block that never trained (iteration 0) is never finished: its vote would be empty.
        """
        due = min((trainer.current_epoch - self.start_epoch) // self.epochs_per_block, len(self.block_groups))
        pruned = False
        while self.block < due:
            if not self.active:
                self._start_block(trainer, pl_module)
            full = self._iterations_per_epoch * self.epochs_per_block
            if self.iteration == 0 or (at_end and (trainer.fast_dev_run or self.iteration < full)):
                break  # cut short (max_steps, fast_dev_run, a stop mid-epoch): not pruned on a partial vote
            self._finish_block(trainer, pl_module)
            pruned = True
        return pruned

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Score the block's channels on this batch, set the indicators, back-propagate the L1 term."""
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self.active or not self.nets:
            return
        names = list(self.block_groups[self.block])
        sens = self._sensitivities(trainer, pl_module, batch, names)
        targets = top_fraction(sens, self.compression_rate, self.layer_sort)
        iterations = self._iterations_per_epoch * self.epochs_per_block
        beta = beta_value(self.iteration, iterations, self.beta_range, self.beta_bounds)
        reg = None
        self._indicators = {}
        for name, net in self._net_items():
            m = net(sens[name], beta + self.beta_offset.get(name, 0.0))
            target = targets[name].to(m.device, m.dtype)
            term = self.lambdas.get(name, self.lambda_init) * (m - target).abs().mean()
            reg = term if reg is None else reg + term
            self._indicators[name] = m
            self.votes[name] = self.votes.get(name, torch.zeros(m.numel())).to(m.device) + (m.detach() > 0.5)
            self.target_fraction[name] = float(targets[name].float().mean())
        if reg is not None and reg.requires_grad:
            (reg / trainer.accumulate_grad_batches).backward(retain_graph=True)
        self._gating = True
        self.iteration += 1
        self.window += 1
        if self.window >= self.vote_window:
            self._vote(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Step the strategy networks once per optimizer step, their gradients averaged over ranks."""
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.optimizer is None or self._stepped_at == trainer.global_step:
            return
        self._stepped_at = trainer.global_step
        params = [p for net in self.nets.values() for p in net.parameters()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if trainer.world_size > 1:
            flat = (
                self.sum_over_ranks(trainer, torch.cat([p.grad.flatten() for p in params]))
                / trainer.world_size
            )
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad.copy_(g.view_as(p))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Drop this batch's indicators (and their graph)."""
        self._indicators = {}
        self._gating = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finish a block due at the end of the last epoch; warn (and start nothing more) if cut short."""
        self._finish_due(trainer, pl_module, at_end=True)
        if self.block < len(self.block_groups):
            rank_zero_warn(
                f"{type(self).__name__}: training stopped after {self.block} of {len(self.block_groups)} "
                "blocks; the channels of the others were not removed."
            )
        self._teardown()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove the indicator hooks, so the module is left as a plain network."""
        self._teardown()

    # -- blocks ----------------------------------------------------------------------------------------------
    def _split(self, graph: ChannelGraph) -> list[list[str]]:
        owner = type(self).__name__
        names = [g.name for g in graph.groups if g.prunable and g.size > 1]
        if not names:
            raise PruningError(
                f"{owner}: no channel group of {type(graph.model).__name__} can be pruned (layers producing "
                f"the model output and excluded layers are kept whole). {graph.refusals()}."
            )
        if self.blocks is None:
            return auto_blocks(names)
        blocks: list[list[str]] = [[] for _ in self.blocks]
        for name in names:
            for i, pats in enumerate(self.blocks):
                if any(fnmatch.fnmatchcase(name, p) for p in pats):
                    blocks[i].append(name)
                    break
        empty = [pats for pats, b in zip(self.blocks, blocks, strict=True) if not b]
        if empty:
            raise PruningError(
                f"{owner}(blocks=...): no prunable channel group matches {empty}. Groups: {', '.join(names)}."
            )
        left = [n for n in names if not any(n in b for b in blocks)]
        if left:
            rank_zero_warn(f"{owner}: groups in no block are left whole: {left}.")
        return blocks

    def _start_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule, resumed: bool = False) -> None:
        graph = self.channel_graph(trainer, pl_module)
        groups = {g.name: g for g in graph.groups if g.prunable and g.size > 1}
        names = [n for n in self.block_groups[self.block] if n in groups]
        self.block_groups[self.block] = names
        self._current = [groups[n] for n in names]
        device = pl_module.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.block)
            self.nets = nn.ModuleDict({_key(n): StrategyNet(groups[n].size) for n in names}).to(device)
        # a block whose groups all shrank to one channel meanwhile has nothing left to learn
        self.optimizer = torch.optim.Adam(self.nets.parameters(), lr=self.strategy_lr) if names else None
        if resumed:
            for key, net in self.nets.items():
                net.load_state_dict(self._saved_nets[key])
            if self._saved_optimizer is not None and self.optimizer is not None:
                self.optimizer.load_state_dict(self._saved_optimizer)
        else:
            self.iteration = self.window = 0
            self.lambdas = dict.fromkeys(names, self.lambda_init)
            self.beta_offset = dict.fromkeys(names, 0.0)
            self.votes, self.voted, self.target_fraction = {}, {}, {}
        self._saved_nets, self._saved_optimizer = {}, None
        self._attach_gates(pl_module, [groups[n] for n in names])
        self.active = True
        rank_zero_info(
            f"{type(self).__name__}: block {self.block + 1}/{len(self.block_groups)} "
            f"({'resumed at iteration ' + str(self.iteration) if resumed else 'started'}): {names}"
        )

    def _attach_gates(self, pl_module: pl.LightningModule, groups: Sequence[ChannelGroup]) -> None:
        self._remove_hooks()
        by_layer: dict[str, list[tuple[str, torch.Tensor, torch.Tensor, int]]] = {}
        for g in groups:
            norms = [
                s
                for s in g.slices
                if s.role == "norm"
                and s.param.endswith(".weight")
                and isinstance(pl_module.get_submodule(s.param.removesuffix(".weight")), _NORMS)
            ]
            slices = norms or [
                s
                for s in g.slices
                if s.role == "out"
                and s.param.endswith(".weight")
                and is_root(pl_module.get_submodule(s.param.removesuffix(".weight")))
            ]
            for s in slices:
                layer = s.param.removesuffix(".weight")
                size = output_channels(pl_module.get_submodule(layer))[0]
                by_layer.setdefault(layer, []).append((g.name, s.positions, s.channels, size))
        for layer, gates in by_layer.items():
            module = pl_module.get_submodule(layer)
            self._handles.append(module.register_forward_hook(self._gate_hook(gates, module)))

    def _gate_hook(self, gates: list[tuple[str, torch.Tensor, torch.Tensor, int]], module: nn.Module):
        channel_dim = output_channels(module)[1]

        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._paused or not isinstance(out, torch.Tensor):
                return None
            factor = None
            for group, positions, channels, size in gates:
                if (
                    self._gating
                ):  # a training step: the soft indicators (also through a frozen, eval-mode norm)
                    if group not in self._indicators:
                        continue
                    values = self._indicators[group]
                elif group in self.voted:  # validation and other forwards: the last vote
                    values = (self.voted[group] > 0.5).to(out.device, torch.float32)
                else:
                    continue
                ones = torch.ones(size, device=out.device, dtype=values.dtype)
                part = ones.scatter(0, positions.to(out.device), values[channels.to(out.device)])
                factor = part if factor is None else factor * part
            if factor is None:
                return None
            shape = [1] * out.dim()
            shape[channel_dim(out)] = -1
            return out * factor.to(out.dtype).view(shape)

        return hook

    def _sensitivities(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, names: list[str]
    ) -> dict[str, torch.Tensor]:
        losses = self.loss_stream(trainer, pl_module, [batch])
        self._gating, self._paused = False, True  # the indicators stay out of the sensitivity pass
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.block * 100_003 + self.iteration
        )
        try:
            with _fresh_weights(pl_module, generator) if self.reinit else contextlib.nullcontext():
                inputs = ScoringInputs(pl_module, {}, losses, self._current)
                scores = get_criterion("snip").node_scores(inputs)
        finally:
            self._paused = False
        flat = torch.cat([scores[n].float() for n in names])
        if not torch.isfinite(flat).all():
            raise PruningError(
                f"{type(self).__name__}: channel sensitivities are not finite (the loss overflowed?)."
            )
        scale = flat.mean().clamp_min(1e-12)
        return {n: (scores[n].float() / scale).to(pl_module.device) for n in names}

    def _vote(self, trainer: pl.Trainer) -> None:
        """Close the vote window: majority of ``m > 0.5`` over all ranks; adapt λ and β."""
        names = list(self.votes)
        if not names:
            return
        device = next(iter(self.votes.values())).device
        counts = self.sum_over_ranks(trainer, torch.cat([self.votes[n].float() for n in names]))
        windows = self.sum_over_ranks(trainer, torch.tensor([float(self.window)], device=device))
        fractions = (counts / windows.clamp_min(1)).cpu()
        targets = (
            self.sum_over_ranks(
                trainer, torch.tensor([self.target_fraction.get(n, 0.0) for n in names], device=device)
            ).cpu()
            / trainer.world_size
        )
        last = {n: m.detach() for n, m in self._indicators.items()}
        binary = (
            self.sum_over_ranks(
                trainer,
                torch.tensor(
                    [
                        float(((last[n] > 0.8) | (last[n] < 0.2)).float().mean()) if n in last else 1.0
                        for n in names
                    ],
                    device=device,
                ),
            ).cpu()
            / trainer.world_size
        )
        sizes = [self.votes[n].numel() for n in names]
        raise_beta = self.iteration >= self._iterations_per_epoch
        for i, (name, frac) in enumerate(zip(names, fractions.split(sizes), strict=True)):
            self.voted[name] = frac
            kept = float((frac > 0.5).float().mean())
            self.lambdas[name] = adapt_lambda(kept, float(targets[i]), self.lambda_scale)
            if raise_beta and float(binary[i]) < 0.9:
                self.beta_offset[name] = self.beta_offset.get(name, 0.0) + 1.0
            self.votes[name] = torch.zeros_like(self.votes[name])
        self.window = 0
        kept_all = float(torch.cat([(self.voted[n] > 0.5).float() for n in names]).mean())
        self.log_metrics(
            trainer,
            {
                "sensitivity/block": float(self.block + 1),
                "sensitivity/voted_kept_fraction": kept_all,
                "sensitivity/lambda": sum(self.lambdas[n] for n in names) / len(names),
                "sensitivity/beta_offset": sum(self.beta_offset[n] for n in names) / len(names),
            },
        )

    def _finish_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the channels the vote dropped (exact count, rounded), carry the optimizer state over."""
        started = time.perf_counter()
        if self.window:
            self._vote(trainer)
        self._remove_hooks()
        names = list(self.block_groups[self.block])
        graph = self.channel_graph(trainer, pl_module)
        groups = {g.name: g for g in graph.groups}
        names = [n for n in names if n in groups and groups[n].prunable and groups[n].size > 1]
        priority = {n: self.voted.get(n, torch.zeros(groups[n].size)).double() for n in names}
        kept = top_fraction(priority, self.compression_rate, self.layer_sort) if names else {}
        plan = {n: [int(i) for i in torch.nonzero(~k).flatten()] for n, k in kept.items()}
        plan = {n: chs for n, chs in plan.items() if chs}
        multiple = self.channel_multiple(pl_module)
        if multiple > 1 and plan:
            plan = round_kept(graph, {n: priority[n].float() for n in plan}, plan, multiple)
        corrections = sum(int(((self.voted.get(n, priority[n]) > 0.5) != kept[n]).sum()) for n in kept)
        plan = self.from_rank_zero(trainer, plan)
        channels = sum(groups[n].size for n in names)
        if plan:
            self.shrink_in_fit(trainer, pl_module, graph, plan)
        removed = sum(len(v) for v in plan.values())
        self.block += 1
        self.active = False
        self._drop_block()
        report = BlockReport(
            **vars(self.sparsity(pl_module)),
            block=self.block,
            blocks=len(self.block_groups),
            channels=channels,
            kept=channels - removed,
            corrections=corrections,
            macs=model_stats(pl_module, self.example_inputs(trainer, pl_module)).macs,
            seconds=time.perf_counter() - started,
        )
        self.reports.append(report)
        self.log_metrics(trainer, report.metrics())
        rank_zero_info(
            f"{type(self).__name__}: block {self.block}/{len(self.block_groups)} pruned, kept {report.kept} "
            f"of {channels} channels ({corrections} set by the budget, not the vote), node sparsity "
            f"{report.node_sparsity:.2%}, {report.params:,} params"
        )

    def _drop_block(self) -> None:
        self.nets, self.optimizer = None, None
        self._saved_nets, self._saved_optimizer = {}, None
        self._indicators, self.votes, self.voted = {}, {}, {}
        self.iteration = self.window = 0
        self._current = []

    def _net_items(self) -> Iterator[tuple[str, StrategyNet]]:
        assert self.nets is not None
        for name in self.block_groups[self.block]:
            yield name, self.nets[_key(name)]

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _nets_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any] | None]:
        """The strategy networks' weights (CPU) and their optimizer's state; the saved ones between fits."""
        if self.nets is None:
            return self._saved_nets, self._saved_optimizer
        nets = {
            _key(n): {k: v.detach().cpu() for k, v in net.state_dict().items()}
            for n, net in self._net_items()
        }
        return nets, self.optimizer.state_dict() if self.optimizer is not None else None

    def _teardown(self) -> None:
        """Remove hooks and strategy networks (their weights stay in the state: a later fit rebuilds them)."""
        if self.nets is not None:
            self._saved_nets, self._saved_optimizer = self._nets_state()
            self.nets, self.optimizer = None, None
        self._remove_hooks()
        self._indicators = {}
        self._gating = False


def _key(name: str) -> str:
    """A group name as a ModuleDict key (no dots)."""
    return name.replace(".", "/")


def _batches_per_epoch(trainer: pl.Trainer) -> int:
    n = trainer.num_training_batches
    if n in (0, float("inf")):
        return 1
    return max(1, int(n))


@contextlib.contextmanager
def _fresh_weights(module: nn.Module, generator: torch.Generator) -> Iterator[None]:
    """Every conv/linear weight Xavier-normal from ``generator`` inside the block; restored after it."""
    saved = []
    with torch.no_grad():
        for layer in module.modules():
            if is_root(layer) and isinstance(getattr(layer, "weight", None), torch.Tensor):
                saved.append((layer.weight, layer.weight.detach().clone()))
                fresh = torch.empty(layer.weight.shape, dtype=torch.float32)
                nn.init.xavier_normal_(fresh, generator=generator)
                layer.weight.copy_(fresh)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def _check_blocks(owner: str, blocks: Any) -> list[list[str]] | None:
    if blocks is None:
        return None
    allowed = "None or a list of blocks, each a glob pattern or a list of them, e.g. ['model.layer1.*']"
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks:
        raise invalid(owner, "blocks", blocks, allowed)
    out = []
    for entry in blocks:
        pats = [entry] if isinstance(entry, str) else entry
        if not isinstance(pats, Sequence) or not pats or not all(isinstance(p, str) and p for p in pats):
            raise invalid(owner, "blocks", blocks, allowed)
        out.append(list(pats))
    return out
