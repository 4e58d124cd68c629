"""Value types of the channel engine: where a group sits in the tensors, the groups, the surgery."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ParamSlice:
    """The part of one parameter or buffer that belongs to a channel group.

    Attributes:
        param: Qualified name of the parameter or buffer (as in ``model.state_dict()``).
        dim: The dimension the group's channels run along.
        positions: Indices along ``dim`` that belong to the group.
        channels: For each position, the group channel it belongs to (``0 <= c < group.size``).
        role: ``"out"`` for weights that produce the channel (conv/linear output rows, their bias,
            embedding columns, free parameters), ``"norm"`` for normalization affine parameters,
            ``"stat"`` for running statistics, ``"in"`` for weights that consume the channel.
    """

    param: str
    dim: int
    positions: torch.Tensor
    channels: torch.Tensor
    role: str


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of a model that must be removed together.

    Attributes:
        name: Qualified name of the root layer: the convolution or linear layer whose output channels
            index the group.
        size: Number of channels in the group. In groups that feed a grouped convolution or a GroupNorm,
            one channel stands for the channel at that offset in every convolution/norm group
            (``ties`` copies), since only such symmetric removals keep the layer valid.
        layers: Qualified names of every layer the group touches.
        producers: Layers whose output channels (or normalized features) are the group's channels.
        slices: Where the group sits in each parameter and buffer (see :class:`ParamSlice`).
        prunable: Whether channels of this group may be removed at all.
        reason: Why not, when ``prunable`` is False.
        exact: Whether removing an all-zero ("dead") channel leaves the function unchanged. False
            when a LayerNorm or GroupNorm normalizes across the channels (their statistics change).
        ties: Number of copies each channel stands for (1 in ordinary groups).
    """

    name: str
    size: int
    layers: tuple[str, ...]
    producers: tuple[str, ...]
    slices: tuple[ParamSlice, ...] = field(repr=False)
    prunable: bool = True
    reason: str = ""
    exact: bool = True
    ties: int = 1


@dataclass(frozen=True)
class Removal:
    """One step of channel surgery: ``param`` lost the ``index`` entries along ``dim``.

    Replaying the removals returned by :meth:`ChannelGraph.prune`, in order, on any tensor shaped like
    the parameter (an optimizer's momentum buffer, a mask) gives the tensor the pruned layer expects.
    """

    param: str
    dim: int
    index: torch.Tensor

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return ``tensor`` without the removed entries (a new tensor)."""
        keep = torch.ones(tensor.shape[self.dim], dtype=torch.bool, device=tensor.device)
        keep[self.index.to(tensor.device)] = False
        return tensor[(slice(None),) * self.dim + (keep,)]
