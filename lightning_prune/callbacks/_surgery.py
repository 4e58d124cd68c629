"""Shrinking inside ``Trainer.fit``: what has to follow the module when its tensors get smaller.

The optimizers (:class:`OptimizerSnapshot`: same objects, new parameters in the same slots, state cut),
the averaged copies of weight-averaging callbacks, and everyone with an ``on_shrink(removals)`` hook
(:func:`notify_shrink`, the one public way to be told).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_prune._params import canonical_names
from lightning_prune.checkpoint import load_pruned_state_dict
from lightning_prune.structure import Removal


@dataclass
class OptimizerSnapshot:
    """Which parameter, by name, sits in which optimizer slot (names survive a shrink; objects do not).

    Attributes:
        slots: Per optimizer, per parameter group, the name of each parameter, or the tensor itself
            for one that is not a registered parameter of the module (a shrink never touches those).
    """

    slots: list[list[list[str | torch.Tensor]]]

    @classmethod
    def capture(cls, trainer: pl.Trainer, module: pl.LightningModule) -> OptimizerSnapshot:
        """Record where the module's parameters sit in the trainer's optimizers, before the surgery."""
        names = {id(p): n for n, p in module.named_parameters()}
        return cls(
            [
                [[names.get(id(p), p) for p in group["params"]] for group in opt.param_groups]
                for opt in trainer.strategy.optimizers
            ]
        )

    def restore(self, trainer: pl.Trainer, module: pl.LightningModule, removals: Iterable[Removal]) -> None:
        """Put the shrunk parameters into the same optimizers, in the same slots, with their state sliced.

        The optimizer objects stay (so do learning-rate schedulers and anything else that holds them, such
        as ``StochasticWeightAveraging``'s), and so do parameter groups with their membership and
        hyperparameters. State tensors shaped like their parameter (momentum buffers, Adam moments) lose
        exactly the entries the parameter lost; scalars (Adam's step counter) are kept.
        """
        by_param: dict[str, list[Removal]] = {}
        for r in removals:
            by_param.setdefault(r.param, []).append(r)
        params = dict(module.named_parameters())
        for slots, opt in zip(self.slots, trainer.strategy.optimizers, strict=True):
            state: dict[torch.Tensor, Any] = {}
            for names, group in zip(slots, opt.param_groups, strict=True):
                new = []
                for key, old in zip(names, group["params"], strict=True):
                    param = params.get(key, old) if isinstance(key, str) else old
                    if old in opt.state:
                        cuts = by_param.get(key, ()) if isinstance(key, str) else ()
                        state[param] = {k: _slice(v, old.shape, cuts) for k, v in opt.state[old].items()}
                    new.append(param)
                group["params"] = new
            opt.state.clear()
            opt.state.update(state)


def _slice(value: Any, shape: torch.Size, removals: Iterable[Removal]) -> Any:
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        return value
    for r in removals:
        value = r.apply(value)
    return value


def notify_shrink(trainer: pl.Trainer, pl_module: pl.LightningModule, removals: Sequence[Removal]) -> None:
    """Let everything that holds tensors shaped like the module's parameters follow a shrink.

    - Every callback and the LightningModule itself with an ``on_shrink(removals)`` method (the public
      hook: cut your own shape-bound tensors, e.g. a module's EMA copy, with ``Removal.apply``).
    - The averaged copies of Lightning's ``StochasticWeightAveraging``, ``WeightAveraging`` and
      ``EMAWeightAveraging`` callbacks, cut like the module (values averaged so far are kept).
    """
    for cb in trainer.callbacks:
        for copy in _averaged_copies(cb):
            shrink_like(copy, removals)
        hook = getattr(cb, "on_shrink", None)
        if callable(hook):
            hook(removals)
    hook = getattr(pl_module, "on_shrink", None)
    if callable(hook):
        hook(removals)


def _averaged_copies(callback: Callback) -> list[nn.Module]:
    """The copies of the module a weight-averaging callback keeps (Lightning's, by their attribute)."""
    copy = getattr(callback, "_average_model", None)
    if isinstance(copy, AveragedModel):
        return [copy.module]
    return [copy] if isinstance(copy, nn.Module) else []


def shrink_like(copy: nn.Module, removals: Sequence[Removal]) -> None:
    """Cut ``copy`` (same tensor names as the module ``removals`` were made on) the same way."""
    cuts: dict[str, list[Removal]] = {}
    for r in removals:
        cuts.setdefault(r.param, []).append(r)
    canonical = canonical_names(copy, buffers=True)
    state = {}
    for key, value in copy.state_dict(keep_vars=True).items():
        for r in cuts.get(canonical.get(key, key), ()):
            value = r.apply(value.detach())
        state[key] = value.detach()
    load_pruned_state_dict(copy, state)
