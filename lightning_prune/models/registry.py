"""A registry of models by name: ``register_model``, ``list_models``, ``create_model`` (timm's design).

Our own architectures (the CIFAR zoo, the MNIST LeNets) register themselves with :func:`register_model`
when :mod:`lightning_prune.models` is imported. Every classification model of torchvision is reachable too,
through the prefix ``torchvision.`` (``create_model("torchvision.resnet18", num_classes=10)``); torchvision
is imported only when such a name is used.

Examples:
    >>> from lightning_prune.models import create_model, list_models
    >>> list_models("cifar_vgg*")
    ['cifar_vgg11_bn', 'cifar_vgg16_bn', 'cifar_vgg19_bn']
    >>> net = create_model("cifar_vgg11_bn", num_classes=100, width=0.25)
    >>> net.classifier.out_features
    100
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from torch import nn

from lightning_prune.errors import PruningError

__all__ = ["TORCHVISION_PREFIX", "create_model", "is_model", "list_models", "register_model"]

TORCHVISION_PREFIX = "torchvision."
"""Names with this prefix are torchvision classification models (``torchvision.models.get_model``)."""

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[_Builder], _Builder]:
    """Register a model builder under ``name`` (a decorator; the builder is returned unchanged).

    A builder is a callable that takes ``num_classes`` (and any keyword arguments of its own) and returns
    a freshly initialized :class:`torch.nn.Module`: a class or a function.

    Args:
        name: The name :func:`create_model` will know it by: lowercase letters, digits and ``_``, not
            starting with the reserved prefix ``torchvision.``.

    Raises:
        PruningError: If ``name`` is malformed or already registered.

    Examples:
        >>> from torch import nn
        >>> @register_model("doc_linear")
        ... def doc_linear(num_classes: int = 10) -> nn.Module:
        ...     return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))
        >>> create_model("doc_linear", num_classes=4)[1].out_features
        4
        >>> _ = _REGISTRY.pop("doc_linear")  # (keep the doctest from leaving an entry behind)
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c == "_" for c in name):
        raise PruningError(
            f"`register_model(name={name!r})` is invalid: `name` must be a non-empty string of letters, "
            "digits and underscores."
        )
    if name != name.lower():
        raise PruningError(f"`register_model(name={name!r})` is invalid: `name` must be lowercase.")

    def decorate(builder: _Builder) -> _Builder:
        if name in _REGISTRY:
            raise PruningError(
                f"`register_model(name={name!r})` is invalid: a model is already registered under that "
                f"name ({_qualname(_REGISTRY[name])})."
            )
        if not callable(builder):
            raise PruningError(
                f"`register_model({name!r})` must decorate a callable that builds the model; "
                f"got {type(builder).__name__}."
            )
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models(pattern: str | None = None) -> list[str]:
    """The registered model names matching a shell-style ``pattern`` (all of ours if ``None``), sorted.

    Our own names never start with ``torchvision.``; with a pattern that does (``"torchvision.*"``,
    ``"torchvision.resnet*"``), torchvision's classification models are listed instead, with the prefix.

    Args:
        pattern: An :mod:`fnmatch` pattern (case-sensitive), e.g. ``"cifar_resnet*"``.

    Raises:
        PruningError: If ``pattern`` is not a string.

    Examples:
        >>> list_models("cifar_resnet*")
        ['cifar_resnet164', 'cifar_resnet18', 'cifar_resnet56']
        >>> list_models("torchvision.resnet1*")
        ['torchvision.resnet101', 'torchvision.resnet152', 'torchvision.resnet18']
    """
    if pattern is None:
        return sorted(_REGISTRY)
    if not isinstance(pattern, str):
        raise PruningError(
            f"`list_models(pattern={pattern!r})` is invalid: `pattern` must be a string such as "
            f"'cifar_*' or None; got {type(pattern).__name__}."
        )
    if pattern.startswith(TORCHVISION_PREFIX):
        names = [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    else:
        names = list(_REGISTRY)
    return sorted(n for n in names if fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """Whether :func:`create_model` knows ``name`` (ours, or ``torchvision.<a classification model>``)."""
    if not isinstance(name, str):
        return False
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX) :] in _torchvision_names()
    return name in _REGISTRY


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``, freshly initialized, with ``num_classes`` outputs.

    Args:
        name: A name from :func:`list_models`, or ``"torchvision.<name>"`` for any torchvision
            classification model (built with ``torchvision.models.get_model(name, weights=None, ...)``:
            no pretrained weights are downloaded).
        num_classes: Outputs of the classifier (``>= 1``).
        **kwargs: Keyword arguments of the builder (e.g. ``width=0.5`` for the CIFAR models; anything
            ``torchvision.models.get_model`` accepts for torchvision's).

    Returns:
        The model, in training mode.

    Raises:
        PruningError: If ``name`` is unknown (with the closest names), ``num_classes`` is not a positive
            int, or the builder does not take one of ``kwargs``.
        ModuleNotFoundError: For a ``torchvision.`` name if torchvision is not installed.

    Examples:
        >>> net = create_model("cifar_resnet56", num_classes=100)
        >>> net.fc.out_features
        100
        >>> create_model("cifar_resnet65")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_prune.errors.PruningError: `create_model(name='cifar_resnet65')` is invalid: ...
    """
    if not is_model(name):
        raise PruningError(unknown_model_message(f"create_model(name={name!r})", name))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise PruningError(
            f"`create_model(num_classes={num_classes!r})` is invalid: `num_classes` must be an int >= 1."
        )
    if name.startswith(TORCHVISION_PREFIX):
        tv_name = name[len(TORCHVISION_PREFIX) :]
        if "weights" in kwargs:
            raise PruningError(
                f"`create_model({name!r}, weights={kwargs['weights']!r})` is invalid: models are built "
                "with `weights=None` (pretrained weights would have to be downloaded and may not fit "
                "`num_classes`)."
            )
        models = _torchvision_models()
        return models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    builder = _REGISTRY[name]
    _check_kwargs(name, builder, kwargs)
    return builder(num_classes=num_classes, **kwargs)


def unknown_model_message(call: str, name: Any) -> str:
    """The error message for an unknown model ``name``, with the closest names and the list of ours.

    Args:
        call: How the caller was called, e.g. ``"ImageClassifier(model='x')"``.
        name: The name that was not found.
    """
    ours = ", ".join(repr(n) for n in sorted(_REGISTRY))
    allowed = f"one of {ours}, or 'torchvision.<name>' for a torchvision classification model"
    if not isinstance(name, str):
        return f"`{call}` is invalid: the model name must be a string, {allowed}; got {type(name).__name__}."
    if name.startswith(TORCHVISION_PREFIX):
        candidates = [TORCHVISION_PREFIX + n for n in _torchvision_names()]
        allowed = "a torchvision classification model (see `list_models('torchvision.*')`)"
    else:
        candidates = list(_REGISTRY)
    close = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"`{call}` is invalid: unknown model {name!r}.{hint} Allowed: {allowed}."


def _check_kwargs(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        args = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
        others = ", ".join(n for n in accepted if n != "num_classes") or "none"
        raise PruningError(
            f"`create_model({name!r}, {args})` is invalid: {name} takes no argument "
            f"{', '.join(repr(k) for k in unknown)}. Its arguments besides num_classes: {others}."
        )


def _torchvision_models():
    try:
        import torchvision.models as models
    except ImportError as err:
        raise ModuleNotFoundError(
            "Models named 'torchvision.<name>' need torchvision: pip install lightning-prune[vision]"
        ) from err
    return models


def _torchvision_names() -> list[str]:
    models = _torchvision_models()
    return models.list_models(module=models)


def _qualname(builder: Callable[..., Any]) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"
