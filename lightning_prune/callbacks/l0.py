"""L0 regularisation with hard-concrete gates on channels (Louizos et al.); closed channels removed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_prune._validate import integer, number
from lightning_prune.callbacks.base import PrunesOnce, PruningCallback
from lightning_prune.callbacks.reports import ThresholdReport
from lightning_prune.errors import PruningError
from lightning_prune.stats import model_stats
from lightning_prune.structure import ChannelGroup
from lightning_prune.structure.graph import eval_outputs
from lightning_prune.structure.layers import is_root, output_channels
from lightning_prune.structure.plan import spare_one_per_layer

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # temperature and stretch interval of the hard-concrete distribution
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))  # the reference code clamps log α here after every step
_EPS = 1e-6


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z ≠ 0) = sigmoid(log α − β·log(−γ/ζ))``: each gate's share of the expected L0 norm.

    Examples:
        >>> import torch
        >>> round(float(open_probability(torch.tensor(0.0))), 4)  # sigmoid((2/3)·log 11)
        0.8318
    """
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def sample_gates(log_alpha: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Hard-concrete samples: ``clamp(sigmoid((log u − log(1−u) + log α)/β)·(ζ−γ) + γ, 0, 1)``.

    Args:
        log_alpha: The gates' location parameters.
        u: Uniform noise in (0, 1) shaped like ``log_alpha``; drawn when not given.

    Examples:
        >>> import torch
        >>> float(sample_gates(torch.tensor(0.0), u=torch.tensor(0.5)))  # sigmoid(0)·1.2 − 0.1
        0.5
    """
    if u is None:
        u = torch.empty_like(log_alpha).uniform_(_EPS, 1 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gates of the paper: ``clamp(sigmoid(log α)·(ζ−γ) + γ, 0, 1)``.

    Examples:
        >>> import torch
        >>> deterministic_gates(torch.tensor([-10.0, 0.0, 10.0])).tolist()
        [0.0, 0.5, 1.0]
    """
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class L0Callback(PrunesOnce):
    """L0 regularisation: a hard-concrete gate on every channel, the expected L0 norm as penalty.

    Paper: Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR
    2018, https://arxiv.org/abs/1712.01312. The SNIP-it seed's structured ``L0`` baseline (``--l0
    --l0_reg <REG>``).

    **Gates.** Every channel of every prunable channel group (an output channel or neuron with every layer
    coupled to it, see :class:`~lightning_prune.ChannelGroup`) gets a gate ``z`` with a trainable
    ``log α`` (initialised at ``log((1 − droprate_init)/droprate_init)`` plus N(0, 0.01²) noise). The gate
    multiplies the channel where it leaves its producer: the output of the group's normalization layers
    when it has any (so BatchNorm cannot normalize the gate away), otherwise the output of its conv/linear
    producers. In training, one hard-concrete sample per channel and batch
    (:func:`sample_gates`, ``β = 2/3``, ``γ = −0.1``, ``ζ = 1.1``); in evaluation the deterministic gates
    :func:`deterministic_gates`. The ``log α`` are an extra parameter group of the (first) optimizer
    (learning rate ``gate_lr``, no weight decay; the optimizer's schedulers are extended to it, so that it
    follows the first group's schedule scaled to start at ``gate_lr``: ``StepLR``, ``CosineAnnealingLR``,
    ``OneCycleLR``, ``LambdaLR``, ``ReduceLROnPlateau`` ...),
    averaged over ranks under DDP, clamped to ``[log 0.01, log 100]`` after every step, and saved in
    checkpoints.

    **Penalty**, added to the gradients once per optimizer step:
    ``Σ_j P(z_j ≠ 0) · (penalty · n_j + weight_decay/2 · ‖θ_j‖²)``, with :func:`open_probability`,
    ``n_j`` the number of parameters producing channel ``j`` (weight rows and biases of its conv/linear
    producers) and ``θ_j`` those parameters: the expected L0 norm of the producing parameters, plus the
    reference code's expected L2 term.

    **Removal**, at the end of training (``on_train_end``, before ``ShrinkOnFitEnd`` measures and saves):
    the deterministic gates are folded into the gated layers' per-channel parameters (norm scale and
    shift, or weight rows and bias), the gates are removed, and every channel whose gate is exactly 0 is
    removed physically (a layer keeps at least one channel). The network then computes what the gated
    network computed in evaluation; a warning says by how much it differs when a channel also reaches a
    consumer without passing through a gated layer.

    Args:
        penalty: The weight of one expected non-zero parameter. The seed's ``--l0_reg λ`` on a data set of
            ``N`` examples is ``penalty = λ / N`` (its loss adds ``λ · E[L0] / N`` to the mean loss).
        weight_decay: The seed's expected L2 term (its ``--l2_reg``, 5e-5; the seed turns the optimizer's
            weight decay off in L0 runs); 0 disables it.
        droprate_init: The initial probability of a gate being closed, in (0, 1) (the seed: 0.5).
        gate_lr: Learning rate of the ``log α`` group; ``None``: the optimizer's first group's.
        seed: Seed of the ``log α`` initialisation (the same on every rank).
        include: Glob patterns of conv/linear layers whose channels are gated; default: all.
        exclude: Glob patterns of layers whose channels stay ungated (and are never removed).

    Raises:
        PruningError: For invalid arguments (here), a model without a prunable channel group, or another
            callback that shrinks during training (start of fit).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import L0Callback, ShrinkOnFitEnd
        >>> l0 = L0Callback(penalty=0.1 / 50_000, weight_decay=5e-5)
        >>> trainer = pl.Trainer(callbacks=[l0, ShrinkOnFitEnd("vgg16_l0.pt")], max_epochs=160, logger=False)
    """

    structured = True

    def __init__(
        self,
        penalty: float = 2e-5,
        weight_decay: float = 0.0,
        droprate_init: float = 0.5,
        gate_lr: float | None = None,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__(include=include, exclude=exclude)
        owner = type(self).__name__
        self.penalty = number(owner, "penalty", penalty, low=0)
        self.weight_decay = number(owner, "weight_decay", weight_decay, low=0)
        self.droprate_init = number(
            owner, "droprate_init", droprate_init, low=0, high=1, low_open=True, high_open=True
        )
        self.gate_lr = None if gate_lr is None else number(owner, "gate_lr", gate_lr, low=0)
        self.seed = integer(owner, "seed", seed, low=0)
        self.log_alpha: dict[str, nn.Parameter] = {}  # group name -> one log α per channel
        self.pruned = False
        self.report: ThresholdReport | None = None
        self._points: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}  # module -> gated slices
        self._widths: dict[str, int] = {}  # gated module -> its channel count
        # group -> its producing rows: (parameter, dim, positions, channels)
        self._rows: dict[str, list[tuple[str, int, torch.Tensor, torch.Tensor]]] = {}
        self._counts: dict[str, torch.Tensor] = {}  # group -> n_j
        self._samples: dict[str, torch.Tensor] = {}  # group -> this batch's gates
        self._hooks: list[Any] = []

    # -- state ---------------------------------------------------------------------------------------------
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "penalty": self.penalty}

    @override
    def state_dict(self) -> dict[str, Any]:
        """See :meth:`PrunesOnce.state_dict`; adds the ``log α`` of every group."""
        gates = {g: a.detach().cpu().clone() for g, a in self.log_alpha.items()}
        return {**super().state_dict(), "log_alpha": gates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`PrunesOnce.load_state_dict`."""
        super().load_state_dict(state_dict)
        self.log_alpha = {g: nn.Parameter(a.float()) for g, a in state_dict.get("log_alpha", {}).items()}

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the groups, create (or restore) their gates, hook them in, give them to the optimizer."""
        super().on_fit_start(trainer, pl_module)
        owner = type(self).__name__
        if self.pruned:
            return
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if cb is not self and isinstance(cb, PruningCallback) and cb.structured
        ]
        if others:
            raise PruningError(
                f"{owner} cannot share a fit with other callbacks that shrink during training ({others}): "
                "its gates are laid out on the channels of the network as it is at the start of fit."
            )
        graph = self.channel_graph(trainer, pl_module)
        groups = [g for g in graph.groups if g.prunable and g.size > 1]
        if not groups:
            raise PruningError(
                f"{owner}: no channel group of {type(pl_module).__name__} can be pruned (layers producing "
                "the model output and layers not selected are kept whole)."
            )
        self._layout(pl_module, groups)
        device = next(pl_module.parameters()).device
        if self.log_alpha:
            sizes = {g.name: g.size for g in groups}
            saved = {g: a.numel() for g, a in self.log_alpha.items()}
            if saved != sizes:
                raise PruningError(
                    f"{owner}: the checkpoint's gates ({saved}) do not match the channel groups of this "
                    f"model ({sizes}); resume with the model and layers they were made for."
                )
        else:
            generator = torch.Generator().manual_seed(self.seed)
            mean = math.log(1 - self.droprate_init) - math.log(self.droprate_init)
            self.log_alpha = {
                g.name: nn.Parameter(torch.randn(g.size, generator=generator) * 1e-2 + mean) for g in groups
            }
        self.log_alpha = {g: nn.Parameter(a.detach().to(device)) for g, a in self.log_alpha.items()}
        if not trainer.optimizers:
            raise PruningError(
                f"{owner} needs an optimizer to train the gates; configure_optimizers gave none."
            )
        optimizer = trainer.optimizers[0]
        lr = self.gate_lr if self.gate_lr is not None else optimizer.param_groups[0]["lr"]
        optimizer.add_param_group({"params": list(self.log_alpha.values()), "lr": lr, "weight_decay": 0.0})
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                _follow_schedule(config.scheduler, optimizer, lr)
        self._attach_gates(pl_module)

    def _layout(self, pl_module: nn.Module, groups: Sequence[ChannelGroup]) -> None:
        """Where each group's gates apply (norm outputs, else producer outputs) and what they count."""
        self._points, self._widths, self._rows, self._counts = {}, {}, {}, {}
        params = dict(pl_module.named_parameters())
        for group in groups:
            norms = [s for s in group.slices if s.role == "norm" and s.param.endswith(".weight")]
            rows = [
                s
                for s in group.slices
                if s.role == "out" and is_root(pl_module.get_submodule(s.param.rsplit(".", 1)[0]))
            ]
            points = norms or [s for s in rows if s.param.endswith(".weight")]
            for s in points:
                name = s.param.rsplit(".", 1)[0]
                self._points.setdefault(name, []).append((group.name, s.positions, s.channels))
                self._widths[name] = params[s.param].shape[s.dim]
            self._rows[group.name] = [(s.param, s.dim, s.positions, s.channels) for s in rows]
            counts = torch.zeros(group.size)
            for s in rows:
                per_row = params[s.param].numel() // params[s.param].shape[s.dim]
                counts.index_add_(0, s.channels, torch.full((len(s.channels),), float(per_row)))
            self._counts[group.name] = counts

    def _attach_gates(self, pl_module: nn.Module) -> None:
        self._detach_gates()
        for name in self._points:
            module = pl_module.get_submodule(name)
            self._hooks.append(module.register_forward_hook(self._gate_hook(name)))

    def _detach_gates(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _gate_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output * self._vector(name, module.training, output).view(self._shape(module, output))

        return hook

    def _vector(self, name: str, training: bool, like: torch.Tensor) -> torch.Tensor:
        vector = torch.ones(self._widths[name], device=like.device, dtype=like.dtype)
        for group, positions, channels in self._points[name]:
            if training and group in self._samples:
                z = self._samples[group]
            else:
                z = deterministic_gates(self.log_alpha[group])
            vector = vector.index_put((positions.to(like.device),), z[channels.to(z.device)].to(like.dtype))
        return vector

    def _shape(self, module: nn.Module, output: torch.Tensor) -> list[int]:
        shape = [1] * output.dim()
        shape[output_channels(module)[1](output)] = -1  # the layer table knows where channels sit
        return shape

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Draw this batch's gates (one sample per channel, shared by every layer of its group)."""
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self.pruned:
            self._samples = {g: sample_gates(a) for g, a in self.log_alpha.items()}

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Average the gates' gradients over ranks and add the penalty's gradient."""
        if not self.pruned and self.log_alpha:
            gates = list(self.log_alpha.values())
            if trainer.world_size > 1:
                for a in gates:
                    grad = a.grad if a.grad is not None else torch.zeros_like(a)
                    a.grad = trainer.strategy.reduce(grad, reduce_op="mean")
            weights = self._penalised_weights(pl_module) if self.weight_decay > 0 else {}
            inputs = gates + list(weights.values())
            with torch.enable_grad():
                grads = torch.autograd.grad(self.regularization(pl_module), inputs, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(inputs, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _penalised_weights(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(pl_module.named_parameters())
        names = {name for rows in self._rows.values() for name, *_ in rows}
        return {n: params[n] for n in sorted(names) if params[n].requires_grad}

    def regularization(self, pl_module: nn.Module) -> torch.Tensor:
        """The penalty now: ``Σ_j P(z_j ≠ 0)·(penalty·n_j + weight_decay/2·‖θ_j‖²)`` (differentiable)."""
        params = dict(pl_module.named_parameters())
        total = torch.zeros((), device=next(iter(self.log_alpha.values())).device)
        for group, log_alpha in self.log_alpha.items():
            per_channel = self.penalty * self._counts[group].to(log_alpha.device)
            if self.weight_decay > 0:
                squares = torch.zeros_like(log_alpha)
                for name, dim, positions, channels in self._rows[group]:
                    rows = params[name].movedim(dim, 0).index_select(0, positions.to(log_alpha.device))
                    squares = squares.index_add(
                        0, channels.to(log_alpha.device), rows.float().pow(2).reshape(len(rows), -1).sum(1)
                    )
                per_channel = per_channel + 0.5 * self.weight_decay * squares
            total = total + (open_probability(log_alpha) * per_channel).sum()
        return total

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Clamp ``log α`` to ``[log 0.01, log 100]`` (after the optimizer step)."""
        self._samples = {}
        with torch.no_grad():
            for a in self.log_alpha.values():
                a.clamp_(*LOG_ALPHA_RANGE)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the expected fraction of open gates and the fraction the deterministic gates close."""
        if self.pruned or not self.log_alpha:
            return
        with torch.no_grad():
            alphas = torch.cat([a.detach().flatten() for a in self.log_alpha.values()])
            metrics = {
                "l0/expected_open": float(open_probability(alphas).mean()),
                "l0/closed": float((deterministic_gates(alphas) == 0).float().mean()),
            }
        self.log_metrics(trainer, metrics)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fold the deterministic gates into the network, remove the gates and the closed channels."""
        if self.pruned or not self.log_alpha:
            return
        self._samples = {}
        example = self.example_inputs(trainer, pl_module)
        gated = _eval_outputs(pl_module, example)
        self._fold(pl_module)
        self._detach_gates()
        graph = self.channel_graph(trainer, pl_module)
        self._node_layers = [n for n in self._layers if n not in graph.output_layers]
        self.sparsity(pl_module)  # counts before removal
        shapes = graph._shapes()
        plan = {}
        for group in graph.groups:
            if group.name not in self.log_alpha or not group.prunable:
                continue
            closed = (
                (deterministic_gates(self.log_alpha[group.name].detach()) == 0).nonzero().flatten().tolist()
            )
            closed, _ = spare_one_per_layer(group, closed, shapes)
            if closed:
                plan[group.name] = closed
        plan = self.from_rank_zero(trainer, plan)
        removed = 0
        if plan:
            self.shrink_in_fit(trainer, pl_module, graph, plan)
            removed = sum(len(c) for g, c in plan.items() if g not in self.refused_groups)
        self.pruned = True
        difference = max(
            (
                float((a - b).abs().max())
                for a, b in zip(gated, _eval_outputs(pl_module, example), strict=True)
            ),
            default=0.0,
        )
        if difference > 1e-4 * max(max((float(a.abs().max()) for a in gated), default=1.0), 1.0):
            rank_zero_warn(
                f"{type(self).__name__}: the pruned network's outputs differ from the gated network's by "
                f"up to {difference:.3g} on the example inputs: some closed channel also reached a layer "
                "without passing through a gated one."
            )
        macs = model_stats(pl_module, example).macs
        self.report = ThresholdReport(
            **vars(self.sparsity(pl_module)), threshold=0.0, channels_removed=removed, macs=macs
        )
        self.log_metrics(trainer, self.report.metrics())
        rank_zero_info(
            f"{type(self).__name__}: removed {removed} channels with closed gates (node sparsity "
            f"{self.report.node_sparsity:.2%}), {self.report.params:,} params"
        )

    @torch.no_grad()
    def _fold(self, pl_module: nn.Module) -> None:
        """Multiply each gated layer's per-channel parameters by its deterministic gates."""
        for name in self._points:
            module = pl_module.get_submodule(name)
            weight = module.weight
            vector = self._vector(name, False, weight)
            shape = [-1] + [1] * (weight.dim() - 1)
            weight.mul_(vector.view(shape))
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(vector)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detach the gates (if training stopped early) and the mask hooks."""
        self._detach_gates()
        super().on_fit_end(trainer, pl_module)


def _eval_outputs(module: nn.Module, example: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in eval_outputs(module, example)]


def _follow_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Extend ``scheduler``'s per-group settings to the group just added (the gates), scaled by its rate.

    Schedulers keep one entry per parameter group (``base_lrs``, ``max_lrs``, ``lr_lambdas``, ``min_lrs``
    of ``ReduceLROnPlateau``; the keys a scheduler adds to the groups, such as ``OneCycleLR``'s);
    a group added after they were built would make them fail at their first step.
    """
    first, new = optimizer.param_groups[0], optimizer.param_groups[-1]
    ratio = lr / first["lr"] if first["lr"] else 1.0
    for key, value in first.items():
        if key not in new:  # e.g. OneCycleLR's initial_lr, max_lr, min_lr (scaled), max/base_momentum
            new[key] = value * ratio if key.endswith("lr") and isinstance(value, float | int) else value
    groups = len(optimizer.param_groups)
    for attr, scale in (("base_lrs", ratio), ("max_lrs", ratio), ("min_lrs", 1.0), ("lr_lambdas", None)):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == groups - 1 and values:
            values.append(values[0] if scale is None else values[0] * scale)
