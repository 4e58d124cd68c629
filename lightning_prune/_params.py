"""Names of shared parameters: one canonical name per parameter object.

A parameter can have several names: a language-model head tied to the token embedding
(``lm_head.weight is embed.weight``), two layers given one weight, or one layer registered under two
attribute names. ``named_parameters()`` yields each parameter object once, under the first of its names
(in module registration order); ``state_dict()`` keeps every name. Masks, scores and counts must treat
the object as one unit, so they are keyed by that first name, the *canonical* name: it is the key of
``dict(model.named_parameters())`` (as used by optimizers, rewinding and the optimizer snapshot), and it
depends only on the order modules are registered, so a fresh instance of the same class (the one a run
resumes into) gives the same name. ``load_state_dict`` writes every name of a tied parameter into the one
tensor, so a mask re-applied after it reaches every use.

Examples:
    >>> from torch import nn
    >>> net = nn.ModuleDict({"embed": nn.Embedding(8, 4), "head": nn.Linear(4, 8, bias=False)})
    >>> net["head"].weight = net["embed"].weight  # tied
    >>> canonical_names(net)
    {'embed.weight': 'embed.weight', 'head.weight': 'embed.weight'}
    >>> list(layer_weights(net, ["head"]))
    ['embed.weight']
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def canonical_names(module: nn.Module, *, buffers: bool = False) -> dict[str, str]:
    """Every name of every parameter (and buffer, if asked) of ``module`` → its canonical name.

    The canonical name is the first name of the tensor object.
    """
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in every_tensor(module, buffers=buffers)}


#: ``list(module.named_modules(remove_duplicate=False))``: every name of every submodule.
Walk = list[tuple[str, nn.Module]]


def every_tensor(
    module: nn.Module, *, buffers: bool = True, walk: Walk | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Every name of every parameter, then (if asked) of every buffer, in ``named_parameters`` order.

    The same as ``named_parameters(remove_duplicate=False)`` followed by ``named_buffers(...)``, from
    one walk over the modules; ``walk``: that walk, if the caller keeps one (the module tree unchanged).
    """
    params, bufs = [], []
    for prefix, m in walk if walk is not None else module.named_modules(remove_duplicate=False):
        at = f"{prefix}." if prefix else ""
        params += [(at + k, v) for k, v in m._parameters.items() if v is not None]
        if buffers:
            bufs += [(at + k, v) for k, v in m._buffers.items() if v is not None]
    return params + bufs


def aliases(module: nn.Module, *, buffers: bool = False, walk: Walk | None = None) -> dict[str, str]:
    """The names of shared parameters (and buffers, if asked) that are not canonical → their canonical name.

    ``{}``: none shared. The same as the entries of :func:`canonical_names` that differ, with only those
    names written out. ``walk``: as for :func:`every_tensor`.
    """
    walk = walk if walk is not None else list(module.named_modules(remove_duplicate=False))
    found: dict[str, str] = {}
    for table in ("_parameters", "_buffers") if buffers else ("_parameters",):
        first: dict[int, tuple[str, str]] = {}
        for prefix, m in walk:
            for key, t in getattr(m, table).items():
                if t is not None and (at := first.setdefault(id(t), (prefix, key))) != (prefix, key):
                    found[_joined(prefix, key)] = _joined(*at)
    return found


def _joined(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def layer_weights(module: nn.Module, layers: Iterable[str]) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of ``layers``, one entry per parameter object, by canonical name.

    Layers sharing one weight (tied or reused) give one entry, in the order of their first layer. A weight
    that is not a parameter registered in ``module`` (a ``torch.nn.utils.parametrize`` property) keeps its
    layer's name, ``f"{layer}.weight"``.
    """
    names = canonical_names(module)
    weights: dict[str, nn.Parameter] = {}
    for layer in layers:
        name = f"{layer}.weight" if layer else "weight"
        weights[names.get(name, name)] = module.get_submodule(layer).weight
    return weights
