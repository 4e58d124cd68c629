"""Reload the weights of a shrunk model into a freshly built, unpruned instance.

:func:`~lightning_prune.shrink` removes channels physically, so the state dict of a shrunk model no
longer fits the model its constructor builds. :func:`load_pruned_state_dict` resizes the layers of a
fresh instance to the shapes in the state dict and then loads it. It needs nothing but tensors: the
state dict can come from ``torch.load(path, weights_only=True)``, no pickled module and no pruning
engine are involved.
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_prune._inputs import check_module
from lightning_prune._validate import boolean
from lightning_prune.errors import PruningError
from lightning_prune.structure.attention import sync_head_counts
from lightning_prune.structure.layers import RESIZABLE, Shapes, Unresizable, resize_handler

__all__ = ["load_pruned_checkpoint", "load_pruned_state_dict", "resize_to_state_dict"]

_FUNC = "load_pruned_state_dict"
_M = TypeVar("_M", bound=nn.Module)
_L = TypeVar("_L", bound=nn.Module)
_Shape = tuple[int, ...]

# Torch classes that only hold other modules or loose tensors: a module's own tensors are "free"
# (resized to the saved shape as they are) unless its class derives from some other torch class.
_CONTAINERS: tuple[type, ...] = (
    nn.Sequential,
    nn.ModuleList,
    nn.ModuleDict,
    nn.ParameterList,
    nn.ParameterDict,
    torch.fx.GraphModule,
)


def load_pruned_state_dict(
    model: _M,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    *,
    prefix: str = "",
) -> _M:
    """Resize an unpruned ``model`` to a shrunk model's state dict, in place, and load it.

    ``model`` is a freshly built instance of the architecture that was shrunk; ``state_dict`` is the
    state dict of the shrunk model (e.g. ``torch.load(path, weights_only=True)``). Every tensor
    whose shape differs is replaced by a new tensor of the saved shape (same dtype, device and
    ``requires_grad``), and the layer's attributes are updated so that it runs:

    - ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d``: ``in_channels``, ``out_channels``, ``groups``.
      A depthwise convolution (``groups == in_channels == out_channels``) stays depthwise; a
      grouped one keeps its ``groups``, which must divide the new channel counts.
    - ``Linear``: ``in_features``, ``out_features``.
    - ``BatchNorm``/``SyncBatchNorm``/``InstanceNorm`` (``num_features``), ``GroupNorm``
      (``num_channels``; ``num_groups`` must divide it), ``LayerNorm``/``RMSNorm``
      (``normalized_shape``), ``PReLU`` (``num_parameters``), ``Embedding``/``EmbeddingBag``
      (``num_embeddings``, ``embedding_dim``).
    - Tensors held directly by any other module that is not a torch layer (a ViT's
      ``class_token``, a ConvNeXt block's ``layer_scale``, a custom module's buffer) take the saved
      shape as they are.

    Then ``model.load_state_dict(state_dict, strict=strict)`` loads the values. A saved tensor must have
    as many dimensions as the model's; it may be smaller (a shrunk checkpoint into a fresh model) or
    larger (a checkpoint written before a shrink into the shrunk model, e.g. ``ModelCheckpoint``'s best
    file loaded by ``trainer.test(ckpt_path="best")`` after a shrink during fit).
    Everything is checked before the model is modified. Build optimizers after loading: the resized
    layers hold new parameter objects.

    Args:
        model: A freshly built instance of the unpruned architecture; resized and loaded in place.
        state_dict: The shrunk model's state dict (parameter/buffer name → tensor).
        strict: As in :meth:`torch.nn.Module.load_state_dict`: whether the keys of ``state_dict``
            and of the model must match exactly. With ``False`` only the tensors the model has are
            resized and loaded.
        prefix: Only keys starting with ``prefix`` are used, with the prefix removed; other keys are
            ignored. Use it for a LightningModule checkpoint whose ``state_dict`` holds the network
            as an attribute:
            ``load_pruned_state_dict(net, ckpt["state_dict"], prefix="model.")`` (a missing
            trailing ``"."`` is added).

    Returns:
        ``model``, resized and loaded.

    Raises:
        PruningError: If a saved tensor has another number of
            dimensions; if the saved shapes of a layer are inconsistent with each other (e.g. a
            grouped convolution whose channels no longer divide into its groups); if a torch layer
            without support here (``MultiheadAttention``, ``LSTM``, …) changed shape; if, with
            ``strict=True``, keys are missing or unexpected; or if no key starts with ``prefix``.
            The model is not modified then.

    Examples:
        >>> import io, torch
        >>> from torch import nn
        >>> from lightning_prune import shrink
        >>> from lightning_prune.checkpoint import load_pruned_state_dict
        >>> def build():
        ...     return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net = build()
        >>> with torch.no_grad():
        ...     net[0].weight[:3] = 0
        ...     net[0].bias[:3] = 0
        >>> _ = shrink(net, torch.randn(5, 4))
        >>> file = io.BytesIO()
        >>> torch.save(net.state_dict(), file)
        >>> _ = file.seek(0)
        >>> fresh = load_pruned_state_dict(build(), torch.load(file, weights_only=True))
        >>> fresh[0].out_features, fresh[2].in_features
        (5, 5)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(fresh(x), net(x))
        True
    """
    check_module(model, _FUNC)
    if not isinstance(state_dict, Mapping):
        raise PruningError(
            f"`{_FUNC}(state_dict=...)` is invalid: it must be a mapping of names to tensors; "
            f"got {type(state_dict).__name__}."
        )
    if isinstance(state_dict.get("state_dict"), Mapping):
        raise PruningError(
            f"`{_FUNC}(state_dict=...)` is invalid: it looks like a whole checkpoint (it has a "
            "'state_dict' entry). Pass checkpoint['state_dict'], with prefix='model.' (the "
            "LightningModule attribute holding the network)."
        )
    if not isinstance(strict, bool):
        raise PruningError(f"`{_FUNC}(strict={strict!r})` is invalid: `strict` must be True or False.")
    if not isinstance(prefix, str):
        raise PruningError(
            f"`{_FUNC}(prefix={prefix!r})` is invalid: `prefix` must be a string such as 'model.'."
        )
    state_dict = _strip_prefix(state_dict, prefix)

    undo = _resize(model, state_dict, strict)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        for module, name, old in reversed(undo):
            setattr(module, name, old)
        raise
    return model


def resize_to_state_dict(model: _M, state_dict: Mapping[str, Any]) -> _M:
    """Resize ``model``'s layers, in place, to the shapes in ``state_dict``, without loading values.

    The shape half of :func:`load_pruned_state_dict` (same rules and errors; keys the model lacks are
    ignored). The pruning callbacks use it to give a model the shrunk shapes of a checkpoint before Lightning
    loads its weights.

    Examples:
        >>> from torch import nn
        >>> net = resize_to_state_dict(nn.Linear(8, 4), nn.Linear(6, 4).state_dict())
        >>> net.in_features, tuple(net.weight.shape)
        (6, (4, 6))
    """
    check_module(model, "resize_to_state_dict")
    _resize(model, state_dict, strict=False)
    return model


def load_pruned_checkpoint(
    module_class: type[_L],
    checkpoint_path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    train: bool = False,
    **overrides: Any,
) -> _L:
    """Build ``module_class`` from a (shrunk) checkpoint's hyperparameters and load its shrunk weights.

    The counterpart of ``LightningModule.load_from_checkpoint`` for models whose layers were shrunk: it works
    with the file written by :class:`~lightning_prune.ShrinkOnFitEnd` (``save_path``) and with any Lightning
    checkpoint taken after a structured pruning callback shrank the model. Loading uses
    ``torch.load(..., weights_only=True)``: no pickled modules.

    Args:
        module_class: The LightningModule class (the same that was trained).
        checkpoint_path: The checkpoint file.
        map_location: Passed to :func:`torch.load`.
        train: Return the module in training mode, to fine-tune it with ``Trainer.fit``. The default,
            eval mode, is for inference; fitting an eval-mode module keeps dropout off and BatchNorm on its
            running statistics (Lightning warns "Found N module(s) in eval mode at the start of training").
        **overrides: Constructor arguments replacing the saved hyperparameters.

    Returns:
        The module, resized and loaded, in eval mode (``train=False``) or training mode (``train=True``).

    Raises:
        PruningError: If ``torch.load`` cannot read the file (truncated, corrupted, or holding objects that
            ``weights_only`` loading refuses; the original error is chained), the checkpoint has no
            ``state_dict`` or its shapes do not fit the module.
        FileNotFoundError: If there is no file at ``checkpoint_path`` (likewise ``IsADirectoryError``,
            ``PermissionError``).
    """
    train = boolean("load_pruned_checkpoint", "train", train)
    call = f"`load_pruned_checkpoint(checkpoint_path={str(checkpoint_path)!r})`"
    try:
        checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # they name the path, and the file is not at fault
    except Exception as err:  # a truncated file raises OSError, random bytes UnpicklingError, ...
        # The unpickler's reason, without torch's advice to load with weights_only=False.
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise PruningError(
            f"{call}: torch.load(weights_only=True) cannot read the file ({type(err).__name__}: "
            f"{' '.join(reason.split())}). It may be truncated or corrupted (an interrupted save or copy), "
            "or hold objects other than tensors and plain Python values."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise PruningError(
            f"{call}: the file holds no 'state_dict' entry; expected a Lightning or ShrinkOnFitEnd "
            "checkpoint."
        )
    hparams = {**_constructor_arguments(module_class, checkpoint.get("hyper_parameters", {})), **overrides}
    module = module_class(**hparams)
    load_pruned_state_dict(module, checkpoint["state_dict"])
    return module.train(train)


def _constructor_arguments(module_class: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The saved hyperparameters the constructor accepts (LightningCLI adds ``_class_path`` and the like)."""
    params = inspect.signature(module_class.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {k: v for k, v in hparams.items() if not k.startswith("_")}
    names = {p.name for p in params}
    return {k: v for k, v in hparams.items() if k in names}


def _resize(
    model: nn.Module, state_dict: Mapping[str, Any], strict: bool
) -> list[tuple[nn.Module, str, Any]]:
    """Check everything, then resize; return what to set back to undo it."""
    owners = _tensor_owners(model)
    expected = model.state_dict(keep_vars=True)
    if strict:
        _check_keys(model, owners, expected, state_dict)
    else:
        state_dict = {k: v for k, v in state_dict.items() if k in expected}
    plans = _plan(model, owners, expected, state_dict)
    undo: list[tuple[nn.Module, str, Any]] = []
    try:
        _apply(plans, undo)
        undo += sync_head_counts(model)  # attention modules hold their head counts as attributes
    except BaseException:
        for module, name, old in reversed(undo):
            setattr(module, name, old)
        raise
    return undo


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The entries of ``state_dict`` whose key starts with ``prefix``, without it (and metadata)."""
    if not prefix:
        return state_dict
    if not prefix.endswith("."):
        prefix += "."
    stripped: OrderedDict[str, Any] = OrderedDict(
        (key[len(prefix) :], value) for key, value in state_dict.items() if key.startswith(prefix)
    )
    if not stripped:
        starts = sorted({key.split(".", 1)[0] + "." for key in state_dict})
        raise PruningError(
            f"`{_FUNC}(prefix={prefix!r})` is invalid: no key of the state dict starts with "
            f"{prefix!r}. Keys start with: {_listing(starts) or 'nothing (it is empty)'}."
        )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        # Module prefixes have no trailing dot: "model" is the root, "model.layer1" is "layer1".
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            (key[len(prefix) :] if key != prefix[:-1] else "", value)
            for key, value in metadata.items()
            if key.startswith(prefix) or key == prefix[:-1]
        )
    return stripped


@dataclass
class _Owner:
    """Where a state-dict tensor lives: ``getattr(module, attr)`` of the layer called ``layer``."""

    layer: str
    module: nn.Module
    attr: str


@dataclass
class _Plan:
    """How one layer is resized: new tensor shapes and new attribute values."""

    owner: _Owner
    shapes: dict[str, _Shape] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def _tensor_owners(model: nn.Module) -> dict[str, _Owner]:
    """Every persistent parameter and buffer of ``model`` by state-dict key, with its layer."""
    owners = {}
    for layer, module in model.named_modules(remove_duplicate=False):
        base = f"{layer}." if layer else ""
        tensors = list(module._parameters.items()) + [
            (name, buffer)
            for name, buffer in module._buffers.items()
            if name not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if tensor is not None:
                owners[base + name] = _Owner(layer, module, name)
    return owners


def _check_keys(
    model: nn.Module,
    owners: Mapping[str, _Owner],
    expected: Mapping[str, Any],
    state_dict: Mapping[str, Any],
) -> None:
    """Raise, naming them, if keys are missing from or unexpected in the state dict."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    missing = []
    for key in expected:
        if key in state_dict:
            continue
        owner = owners.get(key)
        # BatchNorm fills in num_batches_tracked itself for state dicts older than it (version < 2).
        if (
            owner is not None
            and owner.attr == "num_batches_tracked"
            and isinstance(owner.module, nn.modules.batchnorm._NormBase)
            and (metadata.get(owner.layer, {}).get("version") or 0) < 2
        ):
            continue
        missing.append(key)
    unexpected = [key for key in state_dict if key not in expected]
    if not missing and not unexpected:
        return
    parts = [f"`{_FUNC}(strict=True)`: the state dict does not match {type(model).__name__}."]
    if missing:
        parts.append(f"Missing keys ({len(missing)}): {_listing(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys ({len(unexpected)}): {_listing(unexpected)}.")
    hint = _prefix_hint(expected, unexpected)
    if hint:
        parts.append(f"The keys look prefixed: pass prefix={hint!r}.")
    parts.append("Pass strict=False to load only the matching keys.")
    raise PruningError(" ".join(parts))


def _prefix_hint(expected: Mapping[str, Any], unexpected: list[str]) -> str:
    """A prefix whose removal turns unexpected keys into the model's keys, or ``""``."""
    firsts = {key.split(".", 1)[0] for key in unexpected if "." in key}
    for first in sorted(firsts):
        prefix = first + "."
        if any(key.startswith(prefix) and key[len(prefix) :] in expected for key in unexpected):
            return prefix
    return ""


def _plan(
    model: nn.Module,
    owners: Mapping[str, _Owner],
    expected: Mapping[str, Any],
    state_dict: Mapping[str, Any],
) -> list[_Plan]:
    """Check every shape and work out how each changed layer is resized; modifies nothing."""
    saved: dict[str, dict[str, _Shape]] = {}  # layer -> attr -> shape in the state dict
    changed: dict[str, _Owner] = {}  # layer -> owner of its first changed tensor
    for key, value in state_dict.items():
        current = expected.get(key)
        if not isinstance(current, torch.Tensor):
            continue  # e.g. a module's `_extra_state`, loaded as it is
        if not isinstance(value, torch.Tensor):
            raise PruningError(
                f"`{_FUNC}`: {key} is a {type(value).__name__} in the state dict but a tensor of "
                f"shape {tuple(current.shape)} in the model."
            )
        if nn.parameter.is_lazy(current):
            continue  # load_state_dict materializes lazy parameters with the saved shape itself
        new, old = tuple(value.shape), tuple(current.shape)
        if len(new) != len(old):
            raise PruningError(
                f"`{_FUNC}`: {key} has shape {new} in the state dict but {old} in the model: "
                "another number of dimensions."
            )
        owner = owners.get(key)
        if owner is None:
            if new != old:
                raise PruningError(
                    f"`{_FUNC}`: {key} has shape {new} in the state dict but {old} in the model, "
                    "and it is not a parameter or buffer of any layer (a state-dict hook renamed "
                    "it?), so it cannot be resized."
                )
            continue
        saved.setdefault(owner.layer, {})[owner.attr] = new
        if new != old:
            changed.setdefault(owner.layer, owner)

    plans = []
    targets: dict[int, tuple[_Shape, str]] = {}  # id(tensor) -> (new shape, key); tied tensors
    for layer, owner in changed.items():
        parent = layer.rpartition(".")[0]
        if layer and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            raise PruningError(
                f"`{_FUNC}`: {layer} belongs to the MultiheadAttention {parent or 'model'}, "
                "whose layers cannot be resized here (shapes in the state dict: "
                f"{_shapes(saved[layer])})."
            )
        plan = _plan_layer(owner, saved[layer])
        base = f"{layer}." if layer else ""
        for attr, shape in plan.shapes.items():
            current = getattr(owner.module, attr).shape
            if attr not in saved[layer] and any(n > o for n, o in zip(shape, current, strict=True)):
                raise PruningError(  # a grown tensor needs its values from the state dict
                    f"`{_FUNC}`: {base + attr} would grow to {shape} with {layer or 'the model'}, but "
                    "the state dict has no values for it (strict=False with a missing key)."
                )
            tensor = getattr(owner.module, attr)
            other = targets.setdefault(id(tensor), (shape, base + attr))
            if other[0] != shape:
                raise PruningError(
                    f"`{_FUNC}`: {base + attr} and {other[1]} are the same tensor in the model "
                    f"but need the shapes {shape} and {other[0]}."
                )
        plans.append(plan)
    return plans


def _plan_layer(owner: _Owner, saved: Mapping[str, _Shape]) -> _Plan:
    """New shapes and attributes of one layer, or a PruningError if it cannot take them."""
    module = owner.module
    kind = type(module).__name__
    label = owner.layer or "the model itself"
    tensors = {
        name: tuple(t.shape)
        for name, t in list(module._parameters.items()) + list(module._buffers.items())
        if t is not None
    }
    handler = resize_handler(module)
    if handler is None:
        if _is_torch_layer(module):
            names = ", ".join(
                f"{name} {tensors[name]} → {new}" for name, new in saved.items() if new != tensors[name]
            )
            raise PruningError(
                f"`{_FUNC}`: {label} is a {kind} whose tensors changed shape ({names}), and {kind} "
                f"layers cannot be resized here. Supported: {RESIZABLE}."
            )
        # Free tensors of a non-torch module (class tokens, layer scales): take the saved shapes.
        return _Plan(owner, {n: s for n, s in saved.items() if s != tensors[n]})

    try:
        attrs, wanted = handler(module, Shapes(saved, tensors))
    except Unresizable as err:
        raise PruningError(
            f"`{_FUNC}`: cannot resize {label} ({kind}) to the shapes in the state dict "
            f"({_shapes(saved)}): {err}."
        ) from None
    wanted = {name: s for name, s in wanted.items() if name in tensors}
    unknown = [name for name in saved if saved[name] != tensors[name] and name not in wanted]
    wrong = [name for name in saved if name in wanted and saved[name] != wanted[name]]
    if unknown or wrong:
        what = (
            f"{kind} does not know how to resize {', '.join(unknown)}"
            if unknown
            else ", ".join(f"{name} should be {wanted[name]}" for name in wrong)
        )
        raise PruningError(
            f"`{_FUNC}`: the shapes of {label} ({kind}) in the state dict are inconsistent "
            f"({_shapes(saved)}): {what}."
        )
    return _Plan(
        owner,
        shapes={name: s for name, s in wanted.items() if s != tensors[name]},
        attrs={name: value for name, value in attrs.items() if getattr(module, name) != value},
    )


def _apply(plans: list[_Plan], undo: list[tuple[nn.Module, str, Any]]) -> None:
    """Replace the tensors and attributes the plans name, recording the old ones in ``undo``."""
    replaced: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    for plan in plans:
        module = plan.owner.module
        for name, shape in plan.shapes.items():
            old = getattr(module, name)
            new = replaced.get(id(old))
            if new is None:
                with torch.no_grad():  # the values are loaded next; keep what overlaps, zeros elsewhere
                    data = old.new_zeros(shape)
                    overlap = tuple(slice(0, min(n, o)) for n, o in zip(shape, old.shape, strict=True))
                    data[overlap] = old[overlap]
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(data, requires_grad=old.requires_grad)
                else:
                    new = data.requires_grad_(old.requires_grad)
                replaced[id(old)] = new
            undo.append((module, name, old))
            setattr(module, name, new)
        for name, value in plan.attrs.items():
            undo.append((module, name, getattr(module, name)))
            setattr(module, name, value)


def _is_torch_layer(module: nn.Module) -> bool:
    """Whether ``module`` is (or subclasses) a layer defined by torch, other than a container."""
    neutral = (nn.Module, object, *_CONTAINERS)
    return any(cls.__module__.startswith("torch.") for cls in type(module).__mro__ if cls not in neutral)


def _shapes(shapes: Mapping[str, _Shape]) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in shapes.items())


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
