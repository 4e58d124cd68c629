"""The criterion contract and registry: a criterion turns units (weights or channels) into scores.

Contract, for every registered criterion:

- :meth:`Criterion.weight_scores` (unstructured): selected weight name → scores shaped like the weight;
- :meth:`Criterion.node_scores` (structured): channel-group name → 1-D scores, one per channel;
- **higher = keep**; scores are finite; the same inputs and the same ``generator`` seed give the same scores.

Criteria are pure torch: the loss comes from a callable (:attr:`ScoringInputs.losses`) that yields the
training loss of a few batches, each a scalar that requires grad; every call replays the same batches.

Examples:
    >>> from lightning_prune.criteria import get_criterion, list_criteria
    >>> list_criteria(structured=False)
    ['grasp', 'magnitude', 'random', 'snip']
    >>> get_criterion("snap").nodes
    True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from lightning_prune.errors import PruningError
from lightning_prune.structure import ChannelGroup


@dataclass(frozen=True)
class ScoringInputs:
    """What a criterion may look at.

    Attributes:
        module: The model (its parameters' ``.grad`` may be used and are cleared by the caller afterwards).
        weights: The selected Conv/Linear weights, by parameter name (the units of unstructured pruning);
            a parameter shared by several layers (a head tied to the embedding) appears once, under its
            canonical name (the first in ``named_parameters()``).
        groups: The prunable channel groups (the units of structured pruning).
        losses: Returns an iterator over the training losses of the scoring batches (scalars requiring grad,
            modes and precision handled by the caller); every call replays the same batches.
        generator: Seeded CPU generator for criteria that draw random numbers.
    """

    module: nn.Module
    weights: Mapping[str, nn.Parameter]
    losses: Callable[[], Iterator[torch.Tensor]]
    groups: Sequence[ChannelGroup] = ()
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))


class Criterion:
    """Base class of the pruning criteria; subclasses set ``name`` and implement what they support."""

    name: ClassVar[str] = ""
    weights: ClassVar[bool] = False  # scores single weights (unstructured pruning)
    nodes: ClassVar[bool] = False  # scores channels of groups (structured pruning)
    needs_data: ClassVar[bool] = True  # False: ScoringInputs.losses is never called (no batch is drawn)

    def weight_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        """Selected weight name → scores shaped like the weight (higher = keep)."""
        raise NotImplementedError(f"criterion {self.name!r} does not score single weights")

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        """Group name → 1-D scores of its channels (higher = keep)."""
        raise NotImplementedError(f"criterion {self.name!r} does not score channels")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise PruningError(f"criterion name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_criteria(structured: bool | None = None) -> list[str]:
    """Names of the registered criteria, sorted; ``structured`` filters by what they can score.

    Args:
        structured: ``True``: criteria that score channels; ``False``: criteria that score single weights;
            ``None``: all.
    """
    return sorted(
        n for n, c in _REGISTRY.items() if structured is None or (c.nodes if structured else c.weights)
    )


def get_criterion(name: str, structured: bool | None = None, owner: str = "get_criterion") -> Criterion:
    """A criterion by name, checked against what it can score.

    Raises:
        PruningError: Unknown name (close matches suggested), or a criterion that cannot score the units
            asked for.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PruningError(
            f"`{owner}(criterion={name!r})` is invalid: known criteria are {list_criteria()}.{hint}"
        )
    cls = _REGISTRY[name]
    if structured is not None and not (cls.nodes if structured else cls.weights):
        kind = "channels (structured=True)" if structured else "single weights (structured=False)"
        raise PruningError(
            f"`{owner}(criterion={name!r})` cannot score {kind}; criteria that can: "
            f"{list_criteria(structured)}."
        )
    return cls()
