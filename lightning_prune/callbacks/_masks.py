"""The masks of a pruning callback: which weights are zero, kept zero through training and shrinks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune._params import aliases, canonical_names
from lightning_prune.errors import PruningError
from lightning_prune.structure import Removal


class Masks:
    """Bool masks by canonical parameter name, and the optimizer hooks that keep masked weights at zero.

    Masked weights are zeroed when masks are adopted, their gradients are zeroed before every optimizer
    step (:meth:`zero_grads`, from the callback's ``on_before_optimizer_step``) and the weights again after
    it (a step post-hook: weight decay and momentum cannot revive them). A shrink cuts the masks like
    their parameters (:meth:`cut`).

    Attributes:
        masks: Canonical parameter name → bool tensor shaped like the parameter (True = kept).
        tied: Other names of masked shared parameters → their canonical name (``lm_head.weight`` →
            ``embed.weight``), to refuse a model in which they are no longer one parameter.

    Examples:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> masks = Masks("Demo")
        >>> masks.adopt(net, {"weight": torch.tensor([[True, False], [True, True]])})
        >>> bool(net.weight[0, 1] == 0), sorted(masks.masks)
        (True, ['weight'])
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.masks: dict[str, torch.Tensor] = {}
        self.tied: dict[str, str] = {}
        self._hooks: list[Any] = []
        self._masked: list[tuple[list[torch.Tensor], list[torch.Tensor], Any]] = []
        self.stale = False  # the masks were cut, and the hooks still hold the replaced parameters

    def adopt(self, module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Adopt new masks (parameter name → bool tensor) and zero the masked weights now.

        A mask given under another name of a shared parameter is filed under the canonical name, and two
        masks of one parameter are combined (an entry is kept only if both keep it).

        Raises:
            PruningError: A name that is not a parameter of the module, a mask shaped unlike its
                parameter, or masks made while two names shared one parameter that are separate here.
        """
        owner = self.owner
        names = canonical_names(module)
        params = dict(module.named_parameters())
        adopted: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if name not in names:
                raise PruningError(
                    f"{owner}: there is a mask for {name}, which is not a parameter of "
                    f"{type(module).__name__}; the checkpoint does not match this model."
                )
            key = names[name]
            if params[key].shape != mask.shape:
                raise PruningError(
                    f"{owner}: the mask of {name} has shape {tuple(mask.shape)} but the parameter has "
                    f"{tuple(params[key].shape)}; the checkpoint does not match this model."
                )
            mask = mask.to(params[key].device, torch.bool)
            adopted[key] = adopted[key] & mask if key in adopted else mask
        untied = sorted(a for a, c in self.tied.items() if c in adopted and names.get(a) != c)
        if untied:
            raise PruningError(
                f"{owner}: the masks were made while {untied[0]} was tied to {self.tied[untied[0]]} (one "
                "parameter), but in this model it is a separate parameter: its weights would escape the "
                "mask. Tie them as when the masks were made (e.g. `tie_word_embeddings=True`)."
            )
        self.masks = adopted
        self.tied = {a: c for a, c in aliases(module).items() if c in adopted}
        self.apply(module)

    @torch.no_grad()
    def apply(self, module: nn.Module) -> None:
        """Zero every masked weight (in place)."""
        params = dict(module.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def cut(self, removals: Sequence[Removal]) -> None:
        """Cut the masks like their parameters were cut by a shrink."""
        for r in removals:
            if r.param in self.masks:
                self.masks[r.param] = r.apply(self.masks[r.param])
                self.stale = True

    def clear(self, module: nn.Module) -> None:
        """Zero the masked weights a last time and forget the masks: the zeros become plain weights."""
        self.apply(module)
        self.detach()
        self.masks, self.tied = {}, {}

    def attach(self, trainer: pl.Trainer, module: nn.Module) -> None:
        """(Re)adopt the masks on ``module``'s current parameters and hook the trainer's optimizers."""
        self.detach()
        self.stale = False
        if not self.masks:
            return
        self.adopt(module, self.masks)
        params = dict(module.named_parameters())
        for opt in trainer.strategy.optimizers:
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            pairs = [(params[n], m) for n, m in self.masks.items() if id(params[n]) in owned]
            if not pairs:
                continue
            weights = [p for p, _ in pairs]
            masks = [m.to(p.dtype) for p, m in pairs]
            self._masked.append((weights, masks, opt))

            @torch.no_grad()
            def zero_weights(_opt, _args, _kwargs, weights=weights, masks=masks) -> None:
                torch._foreach_mul_(weights, masks)

            self._hooks.append(opt.register_step_post_hook(zero_weights))

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._masked = []

    def zero_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the masked gradients of the weights ``optimizer`` steps."""
        for weights, masks, owner in self._masked:
            if owner is optimizer:
                for w, m in zip(weights, masks, strict=True):
                    if w.grad is not None:
                        w.grad.mul_(m)
