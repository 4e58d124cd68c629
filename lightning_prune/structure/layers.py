"""Per-layer-type knowledge, in one table: :data:`LAYERS`.

For every layer type the package resizes, one :class:`LayerType` row answers:

- ``slices``: which dimensions of which tensors its output ("producing") and input ("consuming")
  channels run along, with their role (see :class:`~lightning_prune.structure.types.ParamSlice`): read
  by the engine adapter, the dead-channel test and the check that a layer carries no tensor we would
  leave unresized;
- ``resize``: the attributes and tensor shapes a layer takes from the shapes of a (shrunk) state dict:
  read by checkpoint reloading;
- ``outputs``: how many output channels it has and where they sit in its output tensor: read by the
  criteria that put gates on layer outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningError

#: Layers whose output channels root a channel group.
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_RMS_NORM: tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

Shape = tuple[int, ...]
#: (tensor attribute, dim, role) triples; role "" marks a tensor with no channel dimension.
Spec = list[tuple[str, int, str]]


class Unresizable(Exception):
    """A layer cannot take the shapes of a state dict (internal: callers raise a PruningError)."""


@dataclass(frozen=True)
class Shapes:
    """The shapes a layer's tensors have in a state dict, or in the model where not saved."""

    saved: Mapping[str, Shape]
    current: Mapping[str, Shape]

    def __call__(self, name: str) -> Shape:
        """The shape of tensor ``name``: saved if the state dict has it, else the current one."""
        if name in self.saved:
            return self.saved[name]
        if name not in self.current:
            raise Unresizable(f"it has no `{name}` tensor of its own (is it parametrized?)")
        return self.current[name]

    def first(self, names: tuple[str, ...]) -> Shape:
        """The shape of the first of ``names`` in the state dict, else the first the layer has."""
        for name in names:
            if name in self.saved:
                return self.saved[name]
        return next(self.current[name] for name in names if name in self.current)


Resize = Callable[[nn.Module, Shapes], tuple[dict[str, Any], dict[str, Shape]]]
#: Output channels of a layer, and a function giving their dim in an output tensor.
Outputs = Callable[[nn.Module], tuple[int, Callable[[torch.Tensor], int]]]


@dataclass(frozen=True)
class LayerType:
    """What the package knows about one family of layers (one row of :data:`LAYERS`).

    A row matches by ``isinstance(module, types)``, or by ``match`` for layers recognised by their
    attributes (so that no optional library has to be imported).
    """

    types: tuple[type, ...]
    slices: Callable[[nn.Module, bool], Spec]
    resize: Resize
    outputs: Outputs | None = None
    match: Callable[[nn.Module], bool] | None = None

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer of this row."""
        return self.match(module) if self.match is not None else isinstance(module, self.types)


# -- convolutions -----------------------------------------------------------------------------------------
def _conv_slices(module: nn.Module, producing: bool) -> Spec:
    w_out, w_in = (1, 0) if module.transposed else (0, 1)
    if producing:
        return [("weight", w_out, "out"), ("bias", 0, "out")]
    return [("weight", w_in, "in")]


def _conv_resize(module: nn.Module, shape: Shapes):
    weight = shape("weight")
    kernel = tuple(module.kernel_size)
    if weight[2:] != kernel:
        raise Unresizable(f"its kernel size {kernel} cannot change")
    # weight: (out, in / groups, *kernel), or (in, out / groups, *kernel) when transposed
    lead, per_group = weight[0], weight[1]
    groups = module.groups
    if groups > 1 and groups == module.in_channels == module.out_channels:
        if per_group != 1:
            raise Unresizable(
                f"it is depthwise (groups == channels), so weight.shape[1] must stay 1; got {per_group}"
            )
        groups = other = lead
    else:
        if lead % groups:
            raise Unresizable(f"weight.shape[0] = {lead} channels cannot be split into its {groups} groups")
        other = per_group * groups
    out_channels, in_channels = (other, lead) if module.transposed else (lead, other)
    attrs = {"in_channels": in_channels, "out_channels": out_channels, "groups": groups}
    return attrs, {"weight": weight, "bias": (out_channels,)}


def _conv_outputs(module: nn.Module):
    return module.out_channels, lambda out: 1 if out.dim() == 2 + len(module.kernel_size) else 0


# -- linear -------------------------------------------------------------------------------------------------
def _linear_slices(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 0, "out"), ("bias", 0, "out")] if producing else [("weight", 1, "in")]


def _linear_resize(module: nn.Module, shape: Shapes):
    out_features, in_features = shape("weight")
    attrs = {"in_features": in_features, "out_features": out_features}
    return attrs, {"weight": (out_features, in_features), "bias": (out_features,)}


def _last_dim_outputs(size: Callable[[nn.Module], int]) -> Outputs:
    """Channels last (a LayerNorm's features), or at dim 1 for NCHW subclasses; the output's shape tells.

    timm's ``LayerNorm2d`` subclasses ``nn.LayerNorm`` and permutes inside its forward.
    """

    def outputs(module: nn.Module) -> tuple[int, Callable[[torch.Tensor], int]]:
        n = size(module)
        return (
            n,
            lambda out: 1 if out.dim() > 2 and out.shape[-1] != n and out.shape[1] == n else out.dim() - 1,
        )

    return outputs


# -- transformers' Conv1D (GPT-2): a linear layer with its weight stored (in, out) ------------------------
def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (``y = x @ weight + bias``, weight ``(nx, nf)``)."""
    if type(module).__name__ != "Conv1D":  # first: the cheapest test, and false for almost every module
        return False
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def _conv1d_slices(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 1, "out"), ("bias", 0, "out")] if producing else [("weight", 0, "in")]


def _conv1d_resize(module: nn.Module, shape: Shapes):
    nx, nf = shape("weight")
    attrs = {"nf": nf} | ({"nx": nx} if hasattr(module, "nx") else {})
    return attrs, {"weight": (nx, nf), "bias": (nf,)}


def is_root(module: nn.Module) -> bool:
    """Whether ``module``'s output channels root a channel group: a convolution or linear layer."""
    return isinstance(module, ROOT_TYPES) or is_conv1d(module)


# -- normalization -------------------------------------------------------------------------------------------
def _norm_slices(module: nn.Module, producing: bool) -> Spec:
    dim = -1 if isinstance(module, (nn.LayerNorm, *_RMS_NORM)) else 0
    spec = [("weight", dim, "norm"), ("bias", dim, "norm")]
    if getattr(module, "running_mean", None) is not None:
        # Without an affine shift a zero input normalizes to -mean/std: the mean must be 0 too.
        role = "stat" if getattr(module, "affine", True) else "norm"
        spec += [("running_mean", 0, role), ("running_var", 0, "stat"), ("num_batches_tracked", -1, "")]
    return spec


def _batch_norm_resize(module: nn.Module, shape: Shapes):
    names = ("weight", "bias", "running_mean", "running_var")
    (features,) = shape.first(names)
    return {"num_features": features}, dict.fromkeys(names, (features,))


def _group_norm_resize(module: nn.Module, shape: Shapes):
    (channels,) = shape.first(("weight", "bias"))
    if channels % module.num_groups:
        raise Unresizable(
            f"{channels} channels cannot be split into its num_groups={module.num_groups} groups"
        )
    return {"num_channels": channels}, dict.fromkeys(("weight", "bias"), (channels,))


def _layer_norm_resize(module: nn.Module, shape: Shapes):
    normalized = shape.first(("weight", "bias"))
    return {"normalized_shape": normalized}, dict.fromkeys(("weight", "bias"), normalized)


def _channel_first_outputs(size: Callable[[nn.Module], int]) -> Outputs:
    return lambda module: (size(module), lambda out: 1 if out.dim() > 1 else 0)


# -- the rest ---------------------------------------------------------------------------------------------
def _prelu_slices(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 0, "in")] if module.num_parameters > 1 else [("weight", -1, "")]


def _prelu_resize(module: nn.Module, shape: Shapes):
    (count,) = shape("weight")
    return {"num_parameters": count}, {"weight": (count,)}


def _embedding_slices(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 1, "out")]


def _embedding_resize(module: nn.Module, shape: Shapes):
    count, dim = shape("weight")
    if module.padding_idx is not None and module.padding_idx >= count:
        raise Unresizable(f"its padding_idx={module.padding_idx} is beyond {count} embeddings")
    return {"num_embeddings": count, "embedding_dim": dim}, {"weight": (count, dim)}


#: Every layer type the package resizes, most specific first.
LAYERS: tuple[LayerType, ...] = (
    LayerType((nn.modules.conv._ConvNd,), _conv_slices, _conv_resize, _conv_outputs),
    LayerType((nn.Linear,), _linear_slices, _linear_resize, _last_dim_outputs(lambda m: m.out_features)),
    LayerType(
        (nn.modules.batchnorm._NormBase,),
        _norm_slices,
        _batch_norm_resize,
        _channel_first_outputs(lambda m: m.num_features),
    ),
    LayerType(
        (nn.GroupNorm,), _norm_slices, _group_norm_resize, _channel_first_outputs(lambda m: m.num_channels)
    ),
    LayerType(
        (nn.LayerNorm, *_RMS_NORM),
        _norm_slices,
        _layer_norm_resize,
        _last_dim_outputs(lambda m: m.normalized_shape[-1]),
    ),
    LayerType((), _conv1d_slices, _conv1d_resize, _last_dim_outputs(lambda m: m.nf), is_conv1d),
    LayerType((nn.PReLU,), _prelu_slices, _prelu_resize),
    LayerType((nn.Embedding, nn.EmbeddingBag), _embedding_slices, _embedding_resize),
)
#: The layer types :data:`LAYERS` covers, in words (for error messages).
RESIZABLE = (
    "Conv/ConvTranspose 1d-3d, Linear, BatchNorm/SyncBatchNorm/InstanceNorm, GroupNorm, LayerNorm, "
    + ("RMSNorm, " if _RMS_NORM else "")
    + "PReLU, Embedding/EmbeddingBag, transformers' Conv1D, and tensors held directly by non-torch modules"
)


def layer_type(module: nn.Module) -> LayerType | None:
    """The row of :data:`LAYERS` for ``module``, or None for a type the table does not know."""
    row = _ROW_OF_TYPE.get(type(module), _UNKNOWN)
    if row is _UNKNOWN:
        row = next((r for r in LAYERS if r.matches(module)), None)
        # Remembered by type unless a row that looks at the instance was asked first (or matched).
        if row is not None and all(r.match is None for r in LAYERS[: LAYERS.index(row) + 1]):
            _ROW_OF_TYPE[type(module)] = row
    return row


_UNKNOWN = object()
_ROW_OF_TYPE: dict[type, LayerType] = {}


def layer_spec(module: nn.Module, producing: bool) -> Spec | None:
    """The tensors of ``module`` along its channels, or None for a type the table does not know."""
    row = layer_type(module)
    if row is None:
        return None
    return [(a, d, r) for a, d, r in row.slices(module, producing) if _has_tensor(module, a)]


def _has_tensor(module: nn.Module, name: str) -> bool:
    """``getattr(module, name, None) is not None``, reading the tensor dictionaries first (faster)."""
    for table in (module._parameters, module._buffers):
        if name in table:
            return table[name] is not None
    return getattr(module, name, None) is not None


def resize_handler(module: nn.Module) -> Resize | None:
    """How ``module`` takes the shapes of a state dict, or None for a type the table does not know."""
    row = layer_type(module)
    return row.resize if row is not None else None


def output_channels(module: nn.Module) -> tuple[int, Callable[[torch.Tensor], int]]:
    """Output channels of a conv/linear/norm layer, and a function giving their dim in its output.

    Raises:
        PruningError: For a layer type without output channels in the table.
    """
    row = layer_type(module)
    if row is None or row.outputs is None:
        raise PruningError(f"{type(module).__name__} has no output channels this package can gate.")
    return row.outputs(module)


def unresized_tensors(module: nn.Module) -> list[str]:
    """Parameters/buffers of a known layer type that the table does not resize (e.g. a conv's extra gain).

    Such a layer (a subclass that adds tensors, like weight-standardized convolutions with a gain) would
    be left inconsistent by surgery, so its groups are refused.
    """
    plain = _PLAIN_TENSORS.get(type(module))
    if plain is not None and plain.issuperset(module._parameters) and plain.issuperset(module._buffers):
        return []  # a PyTorch layer with only the tensors it registers itself: the table resizes each
    known = {a for p in (True, False) for a, _, _ in (layer_spec(module, p) or [])}
    first: dict[int, str] = {}  # one name per tensor, as named_parameters/named_buffers give
    for tensors in (module._parameters, module._buffers):
        for n, t in tensors.items():
            if t is not None:
                first.setdefault(id(t), n)
    own = list(first.values())
    return [n for n in own if n not in known]


_NORM_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
#: PyTorch layer classes (not subclasses) → every tensor they register; :data:`LAYERS` resizes them all.
_PLAIN_TENSORS: dict[type, frozenset[str]] = {
    **dict.fromkeys(
        (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.ConvTranspose1d,
            nn.ConvTranspose2d,
            nn.ConvTranspose3d,
            nn.Linear,
        ),
        frozenset({"weight", "bias"}),
    ),
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _NORM_TENSORS),
    **dict.fromkeys((nn.LayerNorm, nn.GroupNorm), frozenset({"weight", "bias"})),
}


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    *,
    types: tuple[type, ...] | None = None,
    owner: str = "select_layers",
) -> list[str]:
    """Qualified names of the layers of ``types`` chosen by glob ``include``/``exclude`` patterns.

    Args:
        model: The model.
        include: Patterns (``fnmatch`` style, e.g. ``"features.*"``); ``None`` means every layer.
        exclude: Patterns of layers to leave out.
        types: Layer types to consider; ``None``: the layers that root channel groups (convolutions,
            linear layers, transformers' ``Conv1D``, see :func:`is_root`).
        owner: Name of the caller, used in error messages.

    Raises:
        PruningError: If a pattern matches no layer of ``types`` (the message lists the layers).

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_layers(net, include=None, exclude=["2"])
        ['0']
    """
    names = [n for n, m in model.named_modules() if (is_root(m) if types is None else isinstance(m, types))]
    kinds = "Conv/Linear/Conv1D" if types is None else "/".join(t.__name__.lstrip("_") for t in types)
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if patterns is None:
            continue
        if isinstance(patterns, str):
            raise PruningError(
                f"`{owner}({arg}={patterns!r})` is invalid: `{arg}` must be a list of patterns; "
                f"got a single string. Use [{patterns!r}]."
            )
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
                raise PruningError(
                    f"`{owner}({arg}=[..., {pattern!r}, ...])` is invalid: pattern {pattern!r} "
                    f"matches no {kinds} layer. Layers: {shown}."
                )
    chosen = [n for n in names if include is None or any(fnmatchcase(n, p) for p in include)]
    return [n for n in chosen if not any(fnmatchcase(n, p) for p in exclude or ())]
