"""SNIP-it / SNAP-it: iterative sensitivity pruning before or during training, and its baselines."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_prune._validate import boolean, choice, fraction, integer, invalid
from lightning_prune._validate import round_to as check_round_to
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.reports import StepReport
from lightning_prune.criteria import ScoringInputs, get_criterion
from lightning_prune.errors import PruningError
from lightning_prune.schedules import snipit_schedule
from lightning_prune.stats import model_stats
from lightning_prune.structure import ChannelGraph, Removal, lowest_channels, node_weights

WHEN = ("before", "during")


class IterativeSNIPCallback(PruningCallback):
    """SNIP-it / SNAP-it: prune in several steps by sensitivity, before or during training.

    Paper: Verdenius, Stol, Forré, "Pruning via Iterative Ranking of Sensitivity Statistics",
    https://arxiv.org/abs/2006.00896.

    Each step scores the units still alive on fresh training batches (the module's own ``training_step``
    loss, BatchNorm in eval mode, nothing stepped) and prunes the lowest-scoring ones in ONE global ranking
    until the step's cumulative sparsity is reached. The steps follow SNIP-it's schedule
    (:func:`~lightning_prune.schedules.snipit_schedule`): ``p_i = limit − (limit − start) · 0.5^i`` for
    ``i = 0 … steps``, then ``limit`` (``steps=0``: one shot to ``limit``). For ``limit=0.98``: .50, .74, .86,
    .92, .95, .965, .98.

    - ``when="before"``: every step at the start of fit, before the first optimizer step.
    - ``when="during"``: one step per pruning event, at the end of epoch ``e`` (counted from 1) whenever
      ``e − prune_delay > 0`` and ``(e − prune_delay) % prune_freq == 0``, until ``limit`` is reached.
      The step runs after that epoch's validation and after any checkpoint written at its end (in
      ``on_train_epoch_start`` of the next epoch, or ``on_train_end`` after the last one), so a
      ``ModelCheckpoint`` file and its score always belong to the same network. Setup refuses a
      ``max_epochs``/``max_steps`` budget that ends before the last event, and warns when it ends right
      at it (the last step would never be trained).
    - Unstructured (default criterion ``"snip"``, ``|∂L/∂w ⊙ w|``): ``limit`` is the fraction of the
      selected weights removed; pruned weights score lowest at later steps and stay exactly zero. A weight
      shared by several layers (an LM head tied to the embedding) is scored, masked and counted once.
    - Structured (default criterion ``"snap"``, SNAP-it's node sensitivity ``|∂L/∂gate|``): ``limit`` is the
      fraction of nodes (conv/linear output channels of layers that do not produce a model output) removed;
      pruned channels are removed physically at every step, in every coupled layer (residual nets
      included), and the optimizer keeps the state of the kept channels.

    Other criteria (``lightning_prune.criteria.list_criteria()``) run on the same machinery: ``"random"``,
    ``"magnitude"`` (with ``when="during"`` and ``rewind_epoch``: IMP with rewinding), ``"l1_norm"``,
    ``"taylor"``, ``"grasp"``. Random scores come from ``seed`` and the step number, so runs repeat.

    Under DDP, scores are summed over ranks and rank 0's decision is broadcast. The step count, masks and
    rewind weights are saved in checkpoints; a run resumed between two steps ends like an uninterrupted one.

    Args:
        limit: Final fraction removed: of selected weights (unstructured) or of nodes (structured).
        structured: Remove whole channels/neurons (physically) instead of single weights.
        steps: ``S`` of the paper's algorithm and the seed's ``--snip_steps`` (>= 0): how many times the
            distance to ``limit`` is halved after ``start``. It is not the number of pruning steps: the
            schedule is ``p_0 … p_S`` then ``limit``, so ``steps=5`` prunes 7 times (``len(schedule)``;
            fewer when ``start`` is not below ``limit``), as the seed does. Setup logs the count.
        start: Cumulative sparsity of the first step, in [0, 1) (the paper: 0.5).
        when: ``"before"`` or ``"during"`` training.
        prune_delay: Epochs before the first pruning event (``when="during"``).
        prune_freq: Epochs between pruning events (``when="during"``).
        num_batches: Training batches each step's scores are accumulated over (the paper: 5).
        criterion: A registered criterion name; ``None``: ``"snap"`` if structured, else ``"snip"``.
        seed: Seed of random criteria.
        rewind_epoch: With ``when="during"``: after every pruning event, reset the surviving parameters to
            their values at the end of this epoch (0: at the start of fit) — lottery-ticket rewinding.
            Optimizer state is kept.
        include: Glob patterns of layer names to prune; default: all Conv/Linear layers.
        exclude: Glob patterns of layers to keep whole.
        round_to: Structured only: every channel group a step cuts keeps a multiple of this many
            channels (fast shapes for the hardware; see :func:`~lightning_prune.structure.round_kept`);
            ``"auto"`` picks it from the training device and dtype
            (:func:`~lightning_prune.structure.auto_round_to`). 1: no rounding. The sparsity reached is
            in the report.

    Raises:
        PruningError: For invalid arguments (here) or a module, data or trainer they do not fit (in setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import IterativeSNIPCallback
        >>> pruner = IterativeSNIPCallback(limit=0.98, when="during", prune_delay=4, prune_freq=4)
        >>> [round(p, 3) for p in pruner.schedule]
        [0.5, 0.74, 0.86, 0.92, 0.95, 0.965, 0.98]
        >>> trainer = pl.Trainer(callbacks=[pruner], max_epochs=40, logger=False)
    """

    def __init__(
        self,
        limit: float = 0.9,
        structured: bool = False,
        steps: int = 5,
        start: float = 0.5,
        when: str = "before",
        prune_delay: int = 4,
        prune_freq: int = 4,
        num_batches: int = 5,
        criterion: str | None = None,
        seed: int = 0,
        rewind_epoch: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        round_to: int | str = 1,
    ) -> None:
        super().__init__(include=include, exclude=exclude, num_batches=num_batches)
        owner = type(self).__name__
        self.round_to = check_round_to(owner, round_to)
        self.limit = fraction(owner, "limit", limit)
        self.structured = boolean(owner, "structured", structured)
        if self.round_to != 1 and not self.structured:
            raise invalid(owner, "round_to", round_to, "1 when unstructured (it rounds channel counts)")
        self.steps = integer(owner, "steps", steps, low=0)
        self.start = fraction(owner, "start", start)
        self.when = choice(owner, "when", when, WHEN)
        self.prune_delay = integer(owner, "prune_delay", prune_delay, low=0)
        self.prune_freq = integer(owner, "prune_freq", prune_freq, low=1)
        if criterion is not None and not isinstance(criterion, str):
            allowed = "a name such as 'snip' (see lightning_prune.list_criteria())"
            raise invalid(owner, "criterion", criterion, allowed)
        self.criterion_name = criterion if criterion is not None else ("snap" if structured else "snip")
        self.criterion = get_criterion(self.criterion_name, structured, owner=owner)
        self.seed = integer(owner, "seed", seed, low=0)
        if rewind_epoch is not None:
            rewind_epoch = integer(owner, "rewind_epoch", rewind_epoch, low=0)
            if when != "during":
                raise PruningError(
                    f"`{owner}(rewind_epoch={rewind_epoch!r})` needs `when='during'`: before training "
                    "there is nothing to rewind to."
                )
            if rewind_epoch >= self.event_epochs()[0]:
                raise PruningError(
                    f"`{owner}(rewind_epoch={rewind_epoch!r})` is invalid: it must be before the first "
                    f"pruning event (end of epoch {self.event_epochs()[0]})."
                )
        self.rewind_epoch = rewind_epoch
        self.schedule = snipit_schedule(self.limit, self.steps, self.start)
        if self.steps > 0 and self.start >= self.limit > 0:
            rank_zero_warn(
                f"{owner}(limit={self.limit}, start={self.start}): `start` is not below `limit`, so pruning "
                f"happens in one step to {self.limit} (`steps={self.steps}` has no effect)."
            )
        self.step = 0  # pruning steps done
        self.rewind: dict[str, torch.Tensor] = {}
        self.report: StepReport | None = None  # after the last step

    def event_epochs(self) -> list[int]:
        """Epochs (counted from 1) at whose end the steps run when ``when="during"``."""
        count = len(snipit_schedule(self.limit, self.steps, self.start))
        return [self.prune_delay + self.prune_freq * (k + 1) for k in range(count)]

    # -- state ---------------------------------------------------------------------------------------------
    def _state_key_args(self) -> dict[str, Any]:
        return {
            **super()._state_key_args(),
            "limit": self.limit,
            "structured": self.structured,
            "criterion": self.criterion_name,
            "when": self.when,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        """See :meth:`PruningCallback.state_dict`; adds the steps done and the rewind weights."""
        rewind = {n: t.detach().cpu() for n, t in self.rewind.items()}
        return {**super().state_dict(), "step": self.step, "schedule": list(self.schedule), "rewind": rewind}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """See :meth:`PruningCallback.load_state_dict`."""
        super().load_state_dict(state_dict)
        self.step = int(state_dict.get("step", len(self.schedule) if state_dict.get("pruned") else 0))
        saved = state_dict.get("schedule")
        if (
            saved is not None
            and self.step
            and [round(p, 9) for p in saved] != [round(p, 9) for p in self.schedule]
        ):
            raise PruningError(
                f"{type(self).__name__}: the checkpoint was written with the schedule {saved} "
                f"({self.step} steps done), but this callback's schedule is {self.schedule}: resume with "
                "the same `limit`, `steps` and `start`."
            )
        self.rewind = dict(state_dict.get("rewind", {}))

    def on_shrink(self, removals: Sequence[Removal]) -> None:
        """Cut the masks and the rewind weights like the parameters were cut."""
        super().on_shrink(removals)
        for r in removals:
            if r.param in self.rewind:
                self.rewind[r.param] = r.apply(self.rewind[r.param])

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Also check that every pruning event fits into ``max_epochs``."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.steps > 0 and self.step < len(self.schedule):
            when = "at the start of fit" if self.when == "before" else f"ending epochs {self.event_epochs()}"
            targets = [round(p, 3) for p in self.schedule]
            rank_zero_info(
                f"{type(self).__name__}: {len(self.schedule)} pruning steps {when}, to sparsities {targets} "
                f"(steps={self.steps} is the paper's S: p_0 … p_S, then limit)."
            )
        last = self.event_epochs()[-1]
        max_epochs = trainer.max_epochs
        if (
            stage == "fit"
            and self.when == "during"
            and not trainer.fast_dev_run  # a smoke test runs one epoch on purpose
            and max_epochs is not None
            and 0 < max_epochs < last
        ):
            raise PruningError(
                f"{type(self).__name__}(when='during', prune_delay={self.prune_delay}, "
                f"prune_freq={self.prune_freq}) prunes {len(self.schedule)} times, the last time at the end "
                f"of epoch {last}, but the trainer stops after max_epochs={max_epochs}: raise max_epochs, "
                "or lower prune_delay, prune_freq or steps."
            )
        if stage == "fit" and self.when == "during" and not trainer.fast_dev_run and max_epochs == last:
            rank_zero_warn(
                f"{type(self).__name__}: the last pruning step runs at the end of the last epoch ({last}); "
                "the network is not trained (nor validated) after it. Raise max_epochs to fine-tune it."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune every step before training (``when="before"``); keep the rewind point; attach masks."""
        if self.rewind_epoch == 0 and not self.rewind:
            self._keep_rewind_point(pl_module)
        if self.when == "before" and self.step < len(self.schedule):
            batches = self.train_batches(trainer)
            while self.step < len(self.schedule):
                self.prune_step(trainer, pl_module, batches)
        if self.when == "during" and self.step < len(self.schedule):
            self._check_before_training(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    @override
    def prune_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Run the steps of the events at or before ``trainer.current_epoch`` (``when="during"``)."""
        if self.when != "during":
            return False
        due = sum(e <= trainer.current_epoch for e in self.event_epochs())
        if self.step >= due:
            return False
        batches = self.train_batches(trainer)
        while self.step < due:
            self.prune_step(trainer, pl_module, batches)
        if self.rewind:
            self._rewind(pl_module)
        self._attach(trainer, pl_module)
        return True

    def _check_before_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What would fail at the first pruning event fails now: budget, loss, inputs, prunable groups."""
        owner = type(self).__name__
        per_epoch = trainer.num_training_batches
        if trainer.max_steps > 0 and not trainer.fast_dev_run and per_epoch not in (0, float("inf")):
            per_epoch = math.ceil(per_epoch / trainer.accumulate_grad_batches)  # the last window steps too
            needed = self.event_epochs()[-1] * per_epoch
            if trainer.max_steps < needed:
                raise PruningError(
                    f"{owner}: the last pruning step runs at the end of epoch {self.event_epochs()[-1]} "
                    f"(after about {needed} optimizer steps), but max_steps={trainer.max_steps}: raise "
                    "max_steps, or lower prune_delay, prune_freq or steps."
                )
        if self.criterion.needs_data:
            batch = self.scoring_batches(trainer, self.train_batches(trainer))[:1]
            for _ in self.loss_stream(trainer, pl_module, batch)():  # `training_step` returns a usable loss
                pass
        if self.structured:
            graph = self.channel_graph(trainer, pl_module)
            if not any(g.prunable and g.size > 1 for g in graph.groups):
                raise _nothing_prunable(owner, pl_module, graph)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run a step due at the end of the last epoch; warn if training stopped before the schedule's end."""
        self.prune_due(trainer, pl_module)
        if self.step < len(self.schedule):
            kind = "node_sparsity" if self.structured else "weight_sparsity"
            reached = getattr(self.report, kind) if self.report is not None else 0.0
            rank_zero_warn(
                f"{type(self).__name__}: training stopped after {self.step} of {len(self.schedule)} pruning "
                f"steps, at sparsity {reached:.2%} instead of limit={self.limit}."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the rewind point at the end of epoch ``rewind_epoch``."""
        if trainer.current_epoch + 1 == self.rewind_epoch and not self.rewind:
            self._keep_rewind_point(pl_module)

    # -- one step ------------------------------------------------------------------------------------------
    def prune_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Iterator[Any]) -> None:
        """Score the surviving units on fresh batches and prune to the next sparsity of the schedule."""
        started = time.perf_counter()
        target = self.schedule[self.step]
        inputs = ScoringInputs(
            module=pl_module,
            weights={},
            losses=self.loss_stream(
                trainer,
                pl_module,
                self.scoring_batches(trainer, batches) if self.criterion.needs_data else [],
            ),
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.step),
        )
        if self.structured:
            self._prune_nodes(trainer, pl_module, inputs, target)
        else:
            self._prune_weights(trainer, pl_module, inputs, target)
        self.step += 1
        macs = None
        if self.structured:  # masking does not change the (dense) MAC count
            macs = model_stats(pl_module, self.example_inputs(trainer, pl_module)).macs
        self.report = StepReport(
            **vars(self.sparsity(pl_module)),
            step=self.step,
            target=target,
            seconds=time.perf_counter() - started,
            macs=macs,
        )
        self.log_metrics(trainer, self.report.metrics())
        kind = "node" if self.structured else "weight"
        rank_zero_info(
            f"{type(self).__name__}: step {self.step}/{len(self.schedule)} ({self.criterion_name}), {kind} "
            f"sparsity {getattr(self.report, f'{kind}_sparsity'):.2%} (target {target:.2%}), "
            f"{self.report.params:,} params ({self.report.seconds:.1f} s)"
        )

    def _checked(self, scores: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict:
        for name, shape in shapes.items():
            s = scores.get(name)
            if s is None or s.shape != shape:
                got = None if s is None else tuple(s.shape)
                raise PruningError(
                    f"criterion {self.criterion_name!r} returned scores of shape {got} for {name}; "
                    f"expected {tuple(shape)}."
                )
            if not torch.isfinite(s).all():
                raise PruningError(
                    f"{type(self).__name__}: {self.criterion_name} scores of {name} are not finite (the loss "
                    "or its gradients overflowed?)."
                )
        return scores

    def _prune_weights(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: ScoringInputs, target: float
    ) -> None:
        weights = self.prunable_weights(pl_module)
        self.sparsity(pl_module)  # record the counts before pruning
        inputs = ScoringInputs(pl_module, weights, inputs.losses, (), inputs.generator)
        scores = self._checked(self.criterion.weight_scores(inputs), {n: w.shape for n, w in weights.items()})
        flat = []
        for name, w in weights.items():
            s = scores[name].detach().to(w.device, torch.float32).flatten()
            if name in self.masks:  # pruned weights rank below every surviving one
                s = s.masked_fill(~self.masks[name].to(w.device).flatten(), float("-inf"))
            flat.append(s)
        flat = self.sum_over_ranks(trainer, torch.cat(flat))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        # the target counts against the weights before any pruning (another callback may have shrunk some)
        n_keep = min(round(self.initial["weights"] * (1 - target)), flat.numel())
        if n_keep:
            keep[torch.topk(flat, n_keep, sorted=False).indices] = True
        keep = self.from_rank_zero(trainer, keep.cpu())
        masks, offset = {}, 0
        for name, w in weights.items():
            mask = keep[offset : offset + w.numel()].view_as(w)
            masks[name] = mask & self.masks[name].cpu() if name in self.masks else mask
            offset += w.numel()
        self.set_masks(pl_module, masks)

    def _prune_nodes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: ScoringInputs, target: float
    ) -> None:
        owner = type(self).__name__
        graph = self.channel_graph(trainer, pl_module)
        outputs = graph.output_layers
        self._node_layers = [n for n in self._layers if n not in outputs]
        before = self.sparsity(pl_module).node_sparsity
        groups = [g for g in graph.groups if g.prunable and g.size > 1]
        if not groups:
            if self.step == 0:
                raise _nothing_prunable(owner, pl_module, graph)
            return
        inputs = ScoringInputs(pl_module, {}, inputs.losses, groups, inputs.generator)
        scores = self._checked(self.criterion.node_scores(inputs), {g.name: (g.size,) for g in groups})
        flat = torch.cat([scores[g.name].detach().to(pl_module.device, torch.float32) for g in groups])
        flat = self.sum_over_ranks(trainer, flat).cpu()
        sizes = [g.size for g in groups]
        scores = {g.name: s for g, s in zip(groups, flat.split(sizes), strict=True)}
        # nodes still to remove, as a fraction of the nodes in the scored groups
        scored = sum(node_weights(graph, g) * g.size for g in groups)
        amount = (target - before) * self.initial["nodes"] / max(scored, 1)
        amount = min(max(amount, 0.0), 1.0)
        plan = lowest_channels(graph, scores, amount, self.channel_multiple(pl_module))
        plan = self.from_rank_zero(trainer, plan)
        if plan:
            self.shrink_in_fit(trainer, pl_module, graph, plan)

    # -- rewinding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _keep_rewind_point(self, pl_module: pl.LightningModule) -> None:
        self.rewind = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters()}

    @torch.no_grad()
    def _rewind(self, pl_module: pl.LightningModule) -> None:
        for name, p in pl_module.named_parameters():
            if name in self.rewind:
                p.copy_(self.rewind[name].to(p.device, p.dtype))
        self.apply_masks(pl_module)


class SNIPit(IterativeSNIPCallback):
    """SNIP-it, unstructured: iterative ``|∂L/∂w ⊙ w|`` pruning to 98% of the weights by default.

    The seed's ``--prune_criterion SNIPit --pruning_limit 0.98`` (``when="before"``) and
    ``SNIPitDuring`` with ``--prune_delay 4 --prune_freq 4`` (``when="during"``). See
    :class:`IterativeSNIPCallback` for the arguments.

    Examples:
        >>> from lightning_prune import SNIPit
        >>> SNIPit(when="during").event_epochs()
        [8, 12, 16, 20, 24, 28, 32]
    """

    def __init__(
        self,
        limit: float = 0.98,
        steps: int = 5,
        start: float = 0.5,
        when: str = "before",
        prune_delay: int = 4,
        prune_freq: int = 4,
        num_batches: int = 5,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            limit=limit,
            structured=False,
            steps=steps,
            start=start,
            when=when,
            prune_delay=prune_delay,
            prune_freq=prune_freq,
            num_batches=num_batches,
            criterion="snip",
            include=include,
            exclude=exclude,
        )


class SNAPit(IterativeSNIPCallback):
    """SNAP-it, structured: iterative node-sensitivity pruning that removes 93% of the nodes by default.

    Each step scores every channel/neuron by ``|∂L/∂gate|`` (a gate of ones on each conv/linear output)
    and removes the lowest physically, in every coupled layer, so the network really shrinks as it is
    pruned; residual networks included. The seed's ``--prune_criterion SNAPit --pruning_limit 0.93``.
    See :class:`IterativeSNIPCallback` for the arguments.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import SNAPit
        >>> trainer = pl.Trainer(callbacks=[SNAPit(limit=0.93)], max_epochs=80, logger=False)
    """

    def __init__(
        self,
        limit: float = 0.93,
        steps: int = 5,
        start: float = 0.5,
        when: str = "before",
        prune_delay: int = 4,
        prune_freq: int = 4,
        num_batches: int = 5,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        round_to: int | str = 1,
    ) -> None:
        super().__init__(
            limit=limit,
            structured=True,
            steps=steps,
            start=start,
            when=when,
            prune_delay=prune_delay,
            prune_freq=prune_freq,
            num_batches=num_batches,
            criterion="snap",
            include=include,
            exclude=exclude,
            round_to=round_to,
        )


def _nothing_prunable(owner: str, pl_module: pl.LightningModule, graph: ChannelGraph) -> PruningError:
    return PruningError(
        f"{owner}(structured=True): no channel group of {type(pl_module).__name__} can be pruned "
        f"(layers producing the model output and excluded layers are kept whole). {graph.refusals()}."
    )
