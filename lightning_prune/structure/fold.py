"""Fold inference-mode BatchNorm layers into the convolution or linear layer that feeds them.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``;
when its input is the output of a convolution (or linear layer) read by nothing else, the map can be
multiplied into that layer's weight and bias and the BatchNorm dropped. The folded model computes the same
function (up to float rounding) with one pass over each feature map fewer: for a deployed model, not for
training (the BatchNorm statistics stop updating, and the gradients differ).

Which BatchNorm follows which layer is read from one traced forward pass (the autograd record), so it
works on models ``torch.fx`` cannot trace, and a BatchNorm is only folded when the trace shows that its
input is exactly the layer's output, with no other reader.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from lightning_prune._inputs import ExampleInputs, call_model, check_inputs, check_module, flatten_outputs
from lightning_prune.errors import PruningError
from lightning_prune.stats import _eval_mode
from lightning_prune.structure.graph import max_difference, same_outputs

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: The forwards of a plain BatchNorm: a subclass with its own (timm's ``BatchNormAct2d`` adds an activation)
#: computes more than the affine map, and replacing it by ``nn.Identity`` would drop the rest.
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


@dataclass(frozen=True)
class FoldPlan:
    """Which BatchNorm layers of a model can be folded, into which layer, and why the others cannot.

    Attributes:
        pairs: BatchNorm name → name of the convolution/linear layer it folds into.
        refused: BatchNorm name → why it cannot be folded (only BatchNorms the forward pass calls).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def describe_refused(self, shown: int = 3) -> str:
        """The refused BatchNorms grouped by reason, at most ``shown`` names per reason."""
        by_reason: dict[str, list[str]] = {}
        for name, why in self.refused.items():
            by_reason.setdefault(why, []).append(repr(name))
        parts = []
        for why, names in by_reason.items():
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{', '.join(names[:shown])}{more} ({why})")
        return "; ".join(parts)


def fold_batchnorm(model: nn.Module, example_inputs: ExampleInputs, *, strict: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode with its BatchNorm layers folded into the layers that feed them.

    A BatchNorm (1d/2d/3d, with running statistics) is folded when its input is the output of a
    ``Conv1d``/``Conv2d``/``Conv3d`` or ``Linear`` layer, as traced on ``example_inputs``, that nothing
    else reads; both layers are called once per forward pass, and the layer's weight is not shared with
    another layer nor parametrized. The layer's weight is scaled, its bias set (added if it had none),
    and the BatchNorm replaced by ``nn.Identity``. ``model`` is not changed; the copy is checked to give
    ``model``'s eval-mode outputs (float tolerance) on ``example_inputs``.

    Use it on a model about to be deployed (exported, compiled, timed): the copy's BatchNorms no longer
    normalise with batch statistics, so it is not for training.

    Args:
        model: The model (not modified).
        example_inputs: A tensor (one positional argument), a tuple of positional arguments or a dict of
            keyword arguments the model accepts.
        strict: Raise if a BatchNorm that the forward pass calls cannot be folded. With ``False``, those
            are left in place and named in a warning.

    Returns:
        The folded copy, in eval mode.

    Raises:
        PruningError: If the model has no BatchNorm to fold; with ``strict``, if one cannot be folded
            (each is named with the reason: e.g. it follows an addition or a pooling, not a layer); or if
            the folded copy's outputs differ.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> folded = fold_batchnorm(net, x)
        >>> folded[1], folded[0].bias.shape
        (Identity(), torch.Size([8]))
        >>> torch.allclose(folded(x), net(x), atol=1e-5)
        True
    """
    check_module(model, "fold_batchnorm")
    check_inputs(example_inputs, "fold_batchnorm")
    twin = _copy_of(model)
    plan = fold_plan(twin, example_inputs)
    if not plan.pairs and not plan.refused:
        raise PruningError(
            f"`fold_batchnorm` found no BatchNorm layer in {type(model).__name__} that the forward pass "
            "calls: there is nothing to fold."
        )
    if plan.refused:
        listed = plan.describe_refused()
        if strict:
            raise PruningError(
                f"`fold_batchnorm` cannot fold {len(plan.refused)} BatchNorm layer(s) of "
                f"{type(model).__name__}: {listed}. Pass `strict=False` to fold the others and leave these."
            )
        rank_zero_warn(f"fold_batchnorm: left {len(plan.refused)} BatchNorm layer(s) unfolded: {listed}.")
    with torch.no_grad(), _eval_mode(model):
        expected = flatten_outputs(call_model(model, example_inputs))
        for bn_name, layer_name in plan.pairs.items():
            _fold_pair(twin, bn_name, layer_name)
        if same_outputs(expected, flatten_outputs(call_model(twin, example_inputs))):
            return twin
        # A pair the trace could not see through (a layer whose own forward does more, an output also read
        # outside autograd): fold the pairs one by one into a fresh copy and keep those that change nothing.
        twin, wrong = _copy_of(model), {}
        for bn_name, layer_name in plan.pairs.items():
            undo = _fold_pair(twin, bn_name, layer_name)
            got = flatten_outputs(call_model(twin, example_inputs))
            if not same_outputs(expected, got):
                undo()
                by = max_difference(expected, got)
                wrong[bn_name] = f"folding it into {layer_name!r} changed the outputs by {by:.3g}"
    if not wrong:  # every pair kept the outputs when folded one by one (the whole only missed by rounding)
        return twin
    listed = FoldPlan(refused=wrong).describe_refused()
    if strict or len(wrong) == len(plan.pairs):
        raise PruningError(
            f"`fold_batchnorm` cannot fold {len(wrong)} BatchNorm layer(s) of {type(model).__name__}: "
            f"{listed}." + (" Pass `strict=False` to fold the others and leave these." if strict else "")
        )
    rank_zero_warn(f"fold_batchnorm: left {len(wrong)} more BatchNorm layer(s) unfolded: {listed}.")
    return twin


def _copy_of(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).eval()
    except Exception as err:
        raise PruningError(
            f"`fold_batchnorm` folds a copy of the model, and {type(model).__name__} cannot be copied "
            f"(`copy.deepcopy` raised {type(err).__name__}: {err})."
        ) from err


def _fold_pair(model: nn.Module, bn_name: str, layer_name: str):
    """Fold one BatchNorm into its layer, in place (under no_grad); return a function that undoes it."""
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    weight, bias = layer.weight.detach().clone(), layer.bias
    bias_values = bias.detach().clone() if bias is not None else None
    _fold_into(layer, bn)
    parent, _, attr = bn_name.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Identity())

    def undo() -> None:
        layer.weight.copy_(weight)
        if bias is None:
            layer.bias = None
        else:
            layer.bias.copy_(bias_values)
        setattr(model.get_submodule(parent), attr, bn)

    return undo


def fold_plan(model: nn.Module, example_inputs: ExampleInputs) -> FoldPlan:
    """Which BatchNorm layers of ``model`` :func:`fold_batchnorm` can fold, and why the others cannot.

    Runs one forward pass in eval mode with autograd recording (parameters are made to require gradients
    for it and given their flags back; modes are restored, and eval-mode BatchNorms change no buffer).
    """
    names = {m: n for n, m in model.named_modules()}
    calls: Counter[nn.Module] = Counter()
    made: dict[nn.Module, object] = {}  # conv/linear -> grad_fn of its output
    fed: dict[nn.Module, tuple[object, int]] = {}  # BatchNorm -> grad_fn of its input, input's dim

    def layer_hook(module: nn.Module, args: tuple, output: object) -> None:
        calls[module] += 1
        if isinstance(output, torch.Tensor):
            made[module] = output.grad_fn

    def norm_hook(module: nn.Module, args: tuple) -> None:
        calls[module] += 1
        if args and isinstance(args[0], torch.Tensor):
            fed[module] = (args[0].grad_fn, args[0].dim())

    hooks = []
    for module in model.modules():
        if isinstance(module, _FOLDABLE):
            hooks.append(module.register_forward_hook(layer_hook))
        elif isinstance(module, _BatchNorm):
            hooks.append(module.register_forward_pre_hook(norm_hook))
    flags = [(p, p.requires_grad) for p in model.parameters() if p.is_floating_point()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad(), _eval_mode(model):
            outputs = flatten_outputs(call_model(model, example_inputs))
    except Exception as err:
        raise PruningError(
            f"`fold_batchnorm` could not run {type(model).__name__}: {type(err).__name__}: {err}"
        ) from err
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    readers = _readers(outputs)
    by_grad_fn = {fn: layer for layer, fn in made.items() if fn is not None}
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    plan = FoldPlan()
    for bn, (grad_fn, dim) in fed.items():
        layer = by_grad_fn.get(grad_fn)
        why = _refusal(bn, layer, calls, readers.get(grad_fn, 0), dim, owners, names)
        if why is None:
            plan.pairs[names[bn]] = names[layer]
        else:
            plan.refused[names[bn]] = why
    return plan


def _refusal(
    bn: _BatchNorm,
    layer: nn.Module | None,
    calls: Counter,
    readers: int,
    dim: int,
    owners: Counter,
    names: dict[nn.Module, str],
) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (None: it can)."""
    if layer is None:
        return "its input is not the output of a Conv1d/2d/3d or Linear layer (e.g. an addition, a pooling)"
    where = f"after {names[layer]!r}"
    if type(bn).forward not in _PLAIN_FORWARDS:
        return f"{where}: {type(bn).__name__} has its own forward (it may compute more than the BatchNorm)"
    if bn.running_mean is None or bn.running_var is None:
        return f"{where}: it has no running statistics (track_running_stats=False), so it uses batch ones"
    if calls[bn] != 1 or calls[layer] != 1:
        return f"{where}: it or the layer is called more than once per forward pass"
    if readers != 1:
        return f"{where}: the layer's output is also read by something besides the BatchNorm"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != channels or (isinstance(layer, nn.Linear) and dim != 2):
        return f"{where}: the BatchNorm's channels are not the layer's output channels"
    if parametrize.is_parametrized(layer) or any(owners[id(p)] > 1 for p in layer.parameters(recurse=False)):
        return f"{where}: the layer's weight is parametrized or shared with another layer"
    if not layer.weight.is_floating_point():
        return f"{where}: the layer's weight is not a float tensor"
    return None


def _readers(outputs: list[torch.Tensor]) -> Counter:
    """How many times each autograd node is read: by later nodes, or as a model output."""
    counts: Counter = Counter(t.grad_fn for t in outputs if t.grad_fn is not None)
    seen, stack = set(), [fn for fn in counts]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for child, _ in fn.next_functions:
            if child is not None:
                counts[child] += 1
                stack.append(child)
    return counts


def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """Multiply ``bn``'s eval-mode affine map into ``layer``'s weight and bias (in float64, then back)."""
    weight = layer.weight
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
    new_bias = (bias * scale + shift).to(device=weight.device, dtype=weight.dtype)
    if layer.bias is not None:
        layer.bias.copy_(new_bias)
    else:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
