"""Gradient-based criteria: SNIP, SNAP (SNAP-it's node sensitivity), Taylor gates, GraSP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lightning_prune.criteria.registry import Criterion, ScoringInputs, register_criterion
from lightning_prune.structure import ChannelGroup
from lightning_prune.structure.layers import is_root, output_channels


def connection_sensitivity(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """SNIP's saliency of every weight: ``|∂L/∂w ⊙ w|`` (same shape as ``weight``; higher = keep).

    Normalising by the global sum, as the paper writes it, does not change a global ranking, so it is left
    to the caller.

    Examples:
        >>> import torch
        >>> connection_sensitivity(torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, 0.5, 3.0]))
        tensor([0.5000, 1.0000, 0.0000])
    """
    return (grad * weight).abs()


def group_sum(
    group: ChannelGroup, scores: Mapping[str, torch.Tensor], roles: tuple[str, ...] = ("out",)
) -> torch.Tensor:
    """Aggregate per-entry scores into one score per channel of ``group`` (a 1-D tensor of ``group.size``).

    Every entry of every slice of ``group`` with a role in ``roles`` whose parameter has scores adds its
    score to its channel: for SNIP's structured variant, the summed saliency of each channel's producing
    weights, over every coupled producer.

    Args:
        group: The channel group.
        scores: Parameter name → per-entry scores shaped like the parameter.
        roles: Slice roles to aggregate (see :class:`~lightning_prune.ParamSlice`).
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        if s.role not in roles or s.param not in scores:
            continue
        values = scores[s.param]
        part = values.index_select(s.dim, s.positions.to(values.device))
        per_position = part.movedim(s.dim, 0).reshape(len(s.positions), -1).sum(1)
        total.index_add_(0, s.channels, per_position.detach().to("cpu", torch.float64))
    return total


def summed_gradients(
    losses: Iterable[torch.Tensor], tensors: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], float]:
    """``Σ_batches ∂L_b/∂t`` for each tensor (zeros where the loss does not depend on it) and the mean loss.

    Uses ``torch.autograd.grad``: no ``.grad`` attribute is touched.
    """
    sums = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    total, count = 0.0, 0
    for loss in losses:
        grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
        for acc, g in zip(sums, grads, strict=True):
            if g is not None:
                acc += g.float()
        total += float(loss.detach())
        count += 1
    return sums, total / max(count, 1)


def producer_weights(module: nn.Module, groups: Iterable[ChannelGroup]) -> dict[str, nn.Parameter]:
    """The weights of the conv/linear layers producing ``groups``' channels, by parameter name."""
    found = {}
    for g in groups:
        for p in g.producers:
            layer = module.get_submodule(p)
            if is_root(layer):
                found[f"{p}.weight"] = layer.weight
    return found


@contextlib.contextmanager
def output_gates(module: nn.Module, layers: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Multiply the output of each conv/linear/norm layer by a gate of ones (one per output channel).

    The gates are float32 leaves that require grad; the forward pass is unchanged. On a conv/linear layer the
    gate sits after the bias, before any norm layer (SNAP's node gate); on a norm layer it sits after the
    affine shift (GateDecorators' gate on BatchNorm).
    """
    gates, handles = {}, []
    for name in layers:
        layer = module.get_submodule(name)
        size, channel_dim = output_channels(layer)
        gate = torch.ones(size, device=next(layer.parameters()).device, requires_grad=True)

        def hook(mod, args, out, gate=gate, channel_dim=channel_dim):
            shape = [1] * out.dim()
            shape[channel_dim(out)] = -1
            return out * gate.to(out.dtype).view(shape)

        handles.append(layer.register_forward_hook(hook))
        gates[name] = gate
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


def _gate_sum(
    group: ChannelGroup, values: Mapping[str, torch.Tensor], roles: tuple[str, ...] = ("out",)
) -> torch.Tensor:
    """Per-channel sum of 1-D ``values`` (layer → one value per output channel) over the group's slices."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        layer = s.param.removesuffix(".weight") if s.param.endswith(".weight") else None
        if layer in values and s.role in roles:
            part = values[layer].index_select(0, s.positions.to(values[layer].device))
            total.index_add_(0, s.channels, part.detach().to("cpu", torch.float64))
    return total


@register_criterion
class SNIP(Criterion):
    """Connection sensitivity ``|∂L/∂w ⊙ w|`` (Lee et al. 2019, arXiv:1810.02340).

    Gradients are summed over the scoring batches. A weight used in several places (a language-model head
    tied to the token embedding, a layer called twice) is one tensor with one gradient, which already sums
    every use, so it is scored once, by its whole effect on the loss. Structured: a channel's score is the
    summed sensitivity of its producing weights over every coupled producer (the "SNIP-pytorch" group
    variant). SNIP-it's division by the loss does not change a ranking and is left out.
    """

    name = "snip"
    weights = nodes = True

    def weight_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        names = list(inputs.weights)
        grads, _ = summed_gradients(inputs.losses(), [inputs.weights[n] for n in names])
        return {
            n: connection_sensitivity(inputs.weights[n].detach().float(), g)
            for n, g in zip(names, grads, strict=True)
        }

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        weights = producer_weights(inputs.module, inputs.groups)
        saliency = self.weight_scores(ScoringInputs(inputs.module, weights, inputs.losses, inputs.groups))
        return {g.name: group_sum(g, saliency) for g in inputs.groups}


@register_criterion
class SNAP(Criterion):
    """SNAP: node sensitivity ``|∂L/∂gate|`` of gates on conv/linear outputs (SNAP-it, arXiv:2006.00896).

    The gradient of a gate is ``Σ ∂L/∂y ⊙ y`` over the node's outputs (batch and positions), summed over
    the scoring batches before the absolute value; a channel shared by several producers (a residual group)
    scores the sum over its producers. The paper's division by ``|L|`` does not change a ranking.
    """

    name = "snap"
    nodes = True

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        layers = [n.removesuffix(".weight") for n in producer_weights(inputs.module, inputs.groups)]
        with output_gates(inputs.module, layers) as gates:
            grads, _ = summed_gradients(inputs.losses(), list(gates.values()))
        values = {n: g.abs() for n, g in zip(gates, grads, strict=True)}
        return {g.name: _gate_sum(g, values) for g in inputs.groups}


@register_criterion
class Taylor(Criterion):
    """First-order Taylor importance of channel gates (GateDecorators, Zhao et al., arXiv:1909.08174).

    A gate ``φ`` of ones multiplies the output of each norm layer in a group (after its affine shift, as the
    paper's gated BatchNorm); the score ``|φ · ∂L/∂φ| = |∂L/∂φ|`` (gradients summed over the scoring batches)
    is summed over the group's norm layers. A group without a norm layer gets the gate on its producers'
    outputs instead (then the score equals SNAP's).
    """

    name = "taylor"
    nodes = True

    def node_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        module = inputs.module
        norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
        layers = []
        for g in inputs.groups:
            norms = [
                s.param.removesuffix(".weight")
                for s in g.slices
                if s.role == "norm"
                and s.param.endswith(".weight")
                and isinstance(module.get_submodule(s.param.removesuffix(".weight")), norm_types)
            ]
            layers += norms or [n.removesuffix(".weight") for n in producer_weights(module, [g])]
        with output_gates(module, dict.fromkeys(layers)) as gates:
            grads, _ = summed_gradients(inputs.losses(), list(gates.values()))
        values = {n: g.abs() for n, g in zip(gates, grads, strict=True)}
        scores = {}
        for g in inputs.groups:
            has_norm = any(s.role == "norm" and s.param.removesuffix(".weight") in values for s in g.slices)
            scores[g.name] = _gate_sum(g, values, roles=("norm",) if has_norm else ("out",))
        return scores


@register_criterion
class GraSP(Criterion):
    """Gradient Signal Preservation (Wang, Zhang, Grosse, ICLR 2020, arXiv:2002.07376).

    The paper scores ``S(−θ) = −θ ⊙ Hg`` and removes the weights with the LARGEST scores (their removal
    reduces the gradient norm least, or raises it). Here higher = keep, so the returned score is
    ``θ ⊙ Hg``. ``g`` is the gradient summed over the scoring batches and held fixed; ``Hg`` is the
    Hessian-gradient product ``∂(Σ_b ∇L_b · g)/∂θ`` on the same batches (double backward).
    """

    name = "grasp"
    weights = True

    def weight_scores(self, inputs: ScoringInputs) -> dict[str, torch.Tensor]:
        names = list(inputs.weights)
        ws = [inputs.weights[n] for n in names]
        g, _ = summed_gradients(inputs.losses(), ws)
        hg = [torch.zeros_like(t) for t in g]
        for loss in inputs.losses():
            grads = torch.autograd.grad(loss, ws, create_graph=True, allow_unused=True)
            z = sum((gi.float() * fixed).sum() for gi, fixed in zip(grads, g, strict=True) if gi is not None)
            if isinstance(z, torch.Tensor) and z.requires_grad:
                for acc, h in zip(hg, torch.autograd.grad(z, ws, allow_unused=True), strict=True):
                    if h is not None:
                        acc += h.float()
        return {n: w.detach().float() * h for n, w, h in zip(names, ws, hg, strict=True)}
