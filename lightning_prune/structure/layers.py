"""Per-layer-type knowledge: which dimensions of which tensors a layer's channels run along.

One table, :data:`LAYER_SLICES`, answers for every layer type the engine resizes: for output
("producing") channels and for input ("consuming") channels, the tensors, the dimension and the role
(see :class:`~lightning_prune.structure.types.ParamSlice`). The engine adapter, the dead-channel test,
the check that a layer carries no tensor we would leave unresized, and :func:`select_layers` read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from lightning_prune.errors import PruningError

#: Layers whose output channels root a channel group.
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

#: (tensor attribute, dim, role) triples; a callable gets the module.
Spec = list[tuple[str, int, str]]


def _conv(module: nn.Module, producing: bool) -> Spec:
    w_out, w_in = (1, 0) if module.transposed else (0, 1)
    if producing:
        return [("weight", w_out, "out"), ("bias", 0, "out")]
    return [("weight", w_in, "in")]


def _linear(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 0, "out"), ("bias", 0, "out")] if producing else [("weight", 1, "in")]


def _norm(module: nn.Module, producing: bool) -> Spec:
    dim = -1 if isinstance(module, nn.LayerNorm) else 0
    spec = [("weight", dim, "norm"), ("bias", dim, "norm")]
    if getattr(module, "running_mean", None) is not None:
        # Without an affine shift a zero input normalizes to -mean/std: the mean must be 0 too.
        role = "stat" if getattr(module, "affine", True) else "norm"
        spec += [("running_mean", 0, role), ("running_var", 0, "stat"), ("num_batches_tracked", -1, "")]
    return spec


def _prelu(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 0, "in")] if module.num_parameters > 1 else [("weight", -1, "")]


def _embedding(module: nn.Module, producing: bool) -> Spec:
    return [("weight", 1, "out")]


#: Layer type -> its tensors along the channels. Dim -1 with role "" marks a tensor with no channel
#: dimension (kept as it is).
LAYER_SLICES: tuple[tuple[tuple[type, ...], Callable[[nn.Module, bool], Spec]], ...] = (
    ((nn.modules.conv._ConvNd,), _conv),
    ((nn.Linear,), _linear),
    (_NORMS, _norm),
    ((nn.PReLU,), _prelu),
    ((nn.Embedding,), _embedding),
)


def layer_spec(module: nn.Module, producing: bool) -> Spec | None:
    """The tensors of ``module`` along its channels, or None for a type the table does not know."""
    for types, spec in LAYER_SLICES:
        if isinstance(module, types):
            return [(a, d, r) for a, d, r in spec(module, producing) if getattr(module, a, None) is not None]
    return None


def unresized_tensors(module: nn.Module) -> list[str]:
    """Parameters/buffers of a known layer type that the table does not resize (e.g. a conv's extra gain).

    Such a layer (a subclass that adds tensors, like weight-standardized convolutions with a gain) would
    be left inconsistent by surgery, so its groups are refused.
    """
    known = {a for p in (True, False) for a, _, _ in (layer_spec(module, p) or [])}
    own = [n for n, _ in module.named_parameters(recurse=False)] + [
        n for n, b in module.named_buffers(recurse=False) if b is not None
    ]
    return [n for n in own if n not in known]


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    *,
    types: tuple[type, ...] = ROOT_TYPES,
    owner: str = "select_layers",
) -> list[str]:
    """Qualified names of the layers of ``types`` chosen by glob ``include``/``exclude`` patterns.

    Args:
        model: The model.
        include: Patterns (``fnmatch`` style, e.g. ``"features.*"``); ``None`` means every layer.
        exclude: Patterns of layers to leave out.
        types: Layer types to consider.
        owner: Name of the caller, used in error messages.

    Raises:
        PruningError: If a pattern matches no layer of ``types`` (the message lists the layers).

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_layers(net, include=None, exclude=["2"])
        ['0']
    """
    names = [n for n, m in model.named_modules() if isinstance(m, types)]
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
                    f"matches no {'/'.join(t.__name__.lstrip('_') for t in types)} layer. Layers: {shown}."
                )
    chosen = [n for n in names if include is None or any(fnmatchcase(n, p) for p in include)]
    return [n for n in chosen if not any(fnmatchcase(n, p) for p in exclude or ())]
