"""Carry optimizer and LR-scheduler state across a physical shrink inside ``Trainer.fit``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_prune.structure import Removal


@dataclass
class _OptimizerState:
    groups: list[dict[str, Any]]  # hyperparameters of each param group, with "params" as names
    state: dict[str, dict[str, Any]]  # per-parameter state, keyed by parameter name
    shapes: dict[str, torch.Size]


@dataclass
class OptimizerSnapshot:
    """Optimizer states keyed by parameter *name* (names survive a shrink; parameter objects do not)."""

    optimizers: list[_OptimizerState]
    schedulers: list[dict[str, Any]]

    @classmethod
    def capture(cls, trainer: pl.Trainer, module: pl.LightningModule) -> OptimizerSnapshot:
        """Record the trainer's optimizers and schedulers before the module's parameters are replaced."""
        names = {id(p): n for n, p in module.named_parameters()}
        optimizers = []
        for opt in trainer.strategy.optimizers:
            groups = [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [names[id(p)] for p in g["params"]],
                }
                for g in opt.param_groups
            ]
            state = {names[id(p)]: dict(s) for p, s in opt.state.items() if id(p) in names}
            shapes = {names[id(p)]: p.shape for g in opt.param_groups for p in g["params"]}
            optimizers.append(_OptimizerState(groups, state, shapes))
        schedulers = [cfg.scheduler.state_dict() for cfg in trainer.strategy.lr_scheduler_configs]
        return cls(optimizers, schedulers)

    def restore(self, trainer: pl.Trainer, module: pl.LightningModule, removals: Iterable[Removal]) -> None:
        """Rebuild optimizers with ``configure_optimizers`` and load the recorded state, sliced.

        State tensors shaped like their parameter (momentum buffers, Adam moments) lose exactly the
        entries the parameter lost; scalars (Adam's step counter) are kept as they are. Parameter-group
        hyperparameters (the learning rate a scheduler has decayed, for instance) and scheduler states
        are restored too, so training continues where it was.
        """
        by_param: dict[str, list[Removal]] = {}
        for r in removals:
            by_param.setdefault(r.param, []).append(r)
        trainer.strategy.setup_optimizers(trainer)
        params = dict(module.named_parameters())
        for old, opt in zip(self.optimizers, trainer.strategy.optimizers, strict=False):
            for old_group, group in zip(old.groups, opt.param_groups, strict=False):
                group.update({k: v for k, v in old_group.items() if k != "params"})
            for name, state in old.state.items():
                if name not in params:
                    continue
                opt.state[params[name]] = {
                    key: _slice(value, old.shapes[name], by_param.get(name, ()))
                    for key, value in state.items()
                }
        for state, cfg in zip(self.schedulers, trainer.strategy.lr_scheduler_configs, strict=False):
            cfg.scheduler.load_state_dict(state)


def _slice(value: Any, shape: torch.Size, removals: Iterable[Removal]) -> Any:
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        return value
    for r in removals:
        value = r.apply(value)
    return value
