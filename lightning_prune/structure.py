"""Dependency-aware channel groups and physical channel removal.

A *channel group* is a set of channels that must be removed together: the output channels of a
convolution, the norm layer behind it, every layer that reads them, and every other producer coupled to
them through residual additions or concatenations. :class:`ChannelGraph` finds the groups of a model by
tracing one forward pass and removes chosen channels from every layer of a group at once.

The tracing and surgery are done by Torch-Pruning's ``DependencyGraph``; this module is the small
interface the rest of lightning-prune uses, so that engine never appears in the public API.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune import ChannelGraph
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    >>> [(g.name, g.size, g.prunable) for g in graph.groups]
    [('0', 8, True), ('3', 4, False)]
    >>> _ = graph.prune({"0": [1, 5]})
    >>> model[0].out_channels, model[1].num_features, model[3].in_channels
    (6, 6, 6)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch_pruning as tp
from torch import nn

from lightning_prune._inputs import (
    ExampleInputs,
    call_model,
    check_inputs,
    check_module,
    describe,
    flatten_outputs,
)
from lightning_prune.errors import PruningError
from lightning_prune.stats import ModelStats, model_stats

_OPS = tp.ops.OPTYPE
_CHANNEL_CHANGING = {_OPS.CONV, _OPS.LINEAR, _OPS.EMBED, _OPS.MHA, _OPS.LSTM}
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


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


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    *,
    types: tuple[type, ...] = _ROOT_TYPES,
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


class ChannelGraph:
    """The channel groups of a model, and the surgery that removes channels from them.

    Tracing runs one forward pass with ``example_inputs`` in eval mode; the model's train/eval modes
    and buffers are restored afterwards, so building a graph never changes the model. Layers not
    reached by that forward pass (e.g. auxiliary heads that only run in training mode) are not part of
    any group.

    Args:
        model: The model to analyse; :meth:`prune` modifies it in place.
        example_inputs: A tensor (one positional argument), a tuple of positional arguments or a dict
            of keyword arguments the model accepts.
        frozen: Qualified names of layers whose output channels must never be removed. The layers that
            produce the model's outputs are always frozen.

    Raises:
        PruningError: If ``model`` is not a module, the forward pass fails, or the model has no
            convolution or linear layer.

    Examples:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> graph = ChannelGraph(net, torch.randn(2, 3, 32, 32))
        >>> group = graph.group("layer1.0.conv1")
        >>> group.size, group.layers
        (64, ('layer1.0.conv1', 'layer1.0.bn1', 'layer1.0.conv2'))
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        *,
        frozen: Sequence[str] = (),
    ) -> None:
        self.model = check_module(model, "ChannelGraph")
        check_inputs(example_inputs, "ChannelGraph")
        if not any(isinstance(m, _ROOT_TYPES) for m in model.modules()):
            raise PruningError(
                f"{type(model).__name__} has nothing to prune: it contains no Conv or Linear layer."
            )
        inputs = _leaf_copies(example_inputs)
        self._dg = _trace(model, inputs)
        self._input_nodes = self._input_coupled(inputs)
        self._fragile_nodes = self._flattened_concats()
        self._names = {m: n for n, m in model.named_modules()}
        self._order = {n: i for i, n in enumerate(self._names.values())}
        self._modules_by_name = dict(model.named_modules())
        self._roots: dict[str, nn.Module] = {}
        self._outputs = self._output_layers()
        self._frozen = set(frozen) | self._outputs
        self._groups: dict[str, ChannelGroup] | None = None
        self._shape_cache: dict[str, torch.Size] | None = None

    @property
    def groups(self) -> list[ChannelGroup]:
        """Every channel group, named after its first producing conv/linear layer, in model order."""
        if self._groups is None:
            self._shape_cache = None
            found = [self._describe(g) for g in self._dg.get_all_groups(root_module_types=_ROOT_TYPES)]
            self._groups = {g.name: g for g in sorted(found, key=lambda g: self._order[g.name])}
        return list(self._groups.values())

    @property
    def output_layers(self) -> set[str]:
        """Layers whose output channels reach a model output (never pruned)."""
        return set(self._outputs)

    def group(self, name: str) -> ChannelGroup:
        """The group rooted at the layer called ``name``.

        Raises:
            PruningError: If no group is rooted at ``name``; the message lists the roots.
        """
        groups = {g.name: g for g in self.groups}
        for g in groups.values():
            if name in g.producers and name not in groups:
                return g
        if name not in groups:
            raise PruningError(
                f"No channel group is rooted at {name!r}. Roots: {', '.join(groups) or 'none'}."
            )
        return groups[name]

    def dead_channels(self) -> dict[str, list[int]]:
        """Channels whose every producing parameter is exactly zero, per prunable group.

        A channel is dead when, in every layer of its group, the conv/linear output rows and bias
        entries, the normalization scale and shift, and any free parameter slices are all zero: it then
        outputs zeros everywhere. Removing it leaves the function unchanged in groups with
        ``exact=True`` (a LayerNorm or GroupNorm across the channels would see different statistics).
        """
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        dead = {}
        for group in self.groups:
            if not group.prunable:
                continue
            alive = torch.zeros(group.size, dtype=torch.bool)
            for s in group.slices:
                if s.role in ("out", "norm"):
                    tensor = tensors[s.param].detach()
                    part = tensor.index_select(s.dim, s.positions.to(tensor.device))
                    nonzero = part.movedim(s.dim, 0).reshape(len(s.positions), -1).ne(0).any(1)
                    alive[s.channels[nonzero.cpu()]] = True
            dead[group.name] = torch.nonzero(~alive).flatten().tolist()
        return dead

    def prune(self, removals: Mapping[str, Sequence[int]]) -> list[Removal]:
        """Remove channels, in place, from every layer of their groups.

        Args:
            removals: Group name → channel indices (``0 <= i < group.size``) to remove.

        Returns:
            The surgery performed, parameter by parameter, in order (see :class:`Removal`).

        Raises:
            PruningError: For an unknown or non-prunable group, indices out of range or repeated, or a
                removal that would empty a group. Nothing is modified then.
        """
        plan = []
        for name, channels in removals.items():
            group = self.group(name)
            idx = sorted({int(c) for c in channels})
            if not idx:
                continue
            if len(idx) != len(channels):
                raise PruningError(f"Channels to remove from {name!r} repeat: {list(channels)}.")
            if not group.prunable:
                raise PruningError(f"Channel group {name!r} cannot be pruned: {group.reason}.")
            if idx[0] < 0 or idx[-1] >= group.size:
                raise PruningError(
                    f"Channel indices for group {name!r} must be in [0, {group.size}); got {idx}."
                )
            emptied = _emptied(group, idx, self._shapes())
            if emptied:
                raise PruningError(
                    f"Removing channels {idx} of group {name!r} would empty {emptied}; "
                    "keep at least one of its channels."
                )
            plan.append((group, idx))

        done: list[Removal] = []
        for group, idx in plan:
            root = self._roots[group.name]
            stride = self._dg.get_pruner_of_module(root).get_out_channels(root) // group.ties
            channels = sorted(c + k * stride for c in idx for k in range(group.ties))
            pruner = self._dg.get_pruner_of_module(root)
            tp_group = self._dg.get_pruning_group(root, pruner.prune_out_channels, channels)
            for item in tp_group:
                done += [Removal(s.param, s.dim, s.positions) for s in self._slices_of(item, stride)]
            tp_group.prune(record_history=False)
        self._groups = self._shape_cache = None
        return _dedupe(done)

    # -- internals ---------------------------------------------------------------------------------
    def _shapes(self) -> dict[str, torch.Size]:
        if self._shape_cache is None:
            self._shape_cache = {n: t.shape for n, t in self.model.state_dict(keep_vars=True).items()}
        return self._shape_cache

    def _output_layers(self) -> set[str]:
        """Layers whose output channels reach a model output without a channel-changing layer."""
        nodes = self._dg.module2node.values()
        todo = [n for n in nodes if not n.outputs]
        seen, found = set(), set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.module in self._names:
                found.add(self._names[node.module])
            if node.type not in _CHANNEL_CHANGING:
                todo.extend(node.inputs)
        return found

    def _input_coupled(self, inputs) -> set:
        """Nodes whose channels are the model input's channels (e.g. a depthwise conv on the input)."""
        leaves = {id(t) for t in flatten_outputs(inputs) if t.requires_grad}
        todo = [
            node
            for node in self._dg.module2node.values()
            if any(
                getattr(f, "variable", None) is not None and id(f.variable) in leaves
                for f, _ in getattr(node.grad_fn, "next_functions", ())
            )
        ]
        found = set()
        while todo:
            node = todo.pop()
            if node in found or node.type in _CHANNEL_CHANGING:
                continue
            found.add(node)
            todo.extend(node.outputs)
        return found

    def _flattened_concats(self) -> set:
        """Flattens of a concatenation with spatial size > 1, whose index mapping the engine gets wrong."""
        found = set()
        for node in self._dg.module2node.values():
            sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
            if node.type != _OPS.RESHAPE or sizes is None or math.prod(sizes[2:]) <= 1:
                continue
            todo, seen = list(node.inputs), set()
            while todo:
                up = todo.pop()
                if up in seen or up.type in _CHANNEL_CHANGING:
                    continue
                seen.add(up)
                if up.type in (_OPS.CONCAT, _OPS.SPLIT):
                    found.add(node)
                    break
                todo.extend(up.inputs)
        return found

    def _describe(self, tp_group) -> ChannelGroup:
        root = tp_group[0].dep.target.module
        channels = self._dg.get_pruner_of_module(root).get_out_channels(root)
        reasons, exact, ties = [], True, 1
        layers, producers = [], []
        for item in tp_group:
            module = item.dep.target.module
            node_type = item.dep.target.type
            label = self._label(module)
            if item.dep.target in self._input_nodes:
                reasons.append("its channels are coupled to the model input")
            if item.dep.target in self._fragile_nodes:
                reasons.append("a concatenation is flattened before a linear layer (unsupported)")
            if label is None:
                continue
            if label not in layers:
                layers.append(label)
            if node_type in (_OPS.MHA, _OPS.LSTM):
                reasons.append(f"{label} ({type(module).__name__}) cannot be resized here")
            if node_type in (_OPS.LN, _OPS.GN):
                exact = False
            if node_type == _OPS.CONV and module.transposed and module.groups > 1:
                reasons.append(f"{label} is a grouped transposed convolution")
            if node_type == _OPS.DEPTHWISE_CONV and module.in_channels != module.out_channels:
                reasons.append(f"{label} has groups == out_channels but fewer outputs than inputs")
            split = _groups_of(module, node_type)
            if split > 1:
                width = getattr(module, "num_channels", None) or (
                    module.out_channels if _is_producer(item) else module.in_channels
                )
                if list(item.idxs) != list(item.root_idxs) or len(item.idxs) != width:
                    reasons.append(f"{label} is a grouped layer behind a concatenation or split")
                else:
                    ties = math.lcm(ties, split)
            if _is_producer(item) and label not in producers:
                producers.append(label)
            if label in self._frozen and _is_producer(item):
                reasons.append(f"{label} is frozen (it produces a model output or was excluded)")
        if channels % ties:
            reasons.append(f"{channels} channels cannot be split evenly into {ties} ties")
            ties = 1
        size = channels // ties
        # Name the group after its first producing conv/linear layer in model order.
        name = min(
            (p for p in producers if isinstance(self._modules_by_name.get(p), _ROOT_TYPES)),
            key=self._order.__getitem__,
            default=self._names[root],
        )
        self._roots[name] = root
        slices = [s for item in tp_group for s in self._slices_of(item, size)]
        shapes = self._shapes()
        if any(s.param not in shapes or int(s.positions.max()) >= shapes[s.param][s.dim] for s in slices):
            reasons.append("the traced dependencies do not fit the layer shapes")
        return ChannelGroup(
            name=name,
            size=size,
            layers=tuple(layers),
            producers=tuple(producers),
            slices=tuple(slices),
            prunable=not reasons,
            reason="; ".join(dict.fromkeys(reasons)),
            exact=exact,
            ties=ties,
        )

    def _label(self, module) -> str | None:
        if isinstance(module, nn.Parameter):
            return self._dg._param_to_name.get(module)
        return self._names.get(module)

    def _slices_of(self, item, stride: int) -> list[ParamSlice]:
        """Where the item's indices sit in the parameters and buffers of its layer."""
        label = self._label(item.dep.target.module)
        if label is None or len(item.idxs) == 0:
            return []
        positions = torch.as_tensor(list(item.idxs), dtype=torch.long)
        channels = torch.as_tensor(list(item.root_idxs), dtype=torch.long) % stride
        slices = _layer_slices(item, label, positions, channels)
        return [s for s in slices if len(s.positions)]


def _layer_slices(item, label: str, positions, channels) -> list[ParamSlice]:
    """Per layer type: which dims of which tensors the item's channel indices run along."""
    module = item.dep.target.module
    node_type = item.dep.target.type

    def make(param: str, dim: int, role: str, pos=positions, ch=channels) -> ParamSlice:
        return ParamSlice(f"{label}.{param}" if param else label, dim, pos, ch, role)

    producing = _is_producer(item)
    if node_type == _OPS.PARAMETER:
        return [make("", item.dep.target.pruning_dim, "out")]
    if node_type == _OPS.DEPTHWISE_CONV:
        out = [make("weight", 0, "out")]
        return out + ([make("bias", 0, "out")] if module.bias is not None else [])
    if node_type == _OPS.CONV:
        w_out, w_in = (1, 0) if module.transposed else (0, 1)
        if producing:
            out = [make("weight", w_out, "out")]
            return out + ([make("bias", 0, "out")] if module.bias is not None else [])
        per_group = module.in_channels // module.groups
        first = positions < per_group
        return [make("weight", w_in, "in", positions[first], channels[first])]
    if node_type == _OPS.LINEAR:
        if producing:
            out = [make("weight", 0, "out")]
            return out + ([make("bias", 0, "out")] if module.bias is not None else [])
        return [make("weight", 1, "in")]
    if node_type in (_OPS.BN, _OPS.IN, _OPS.GN, _OPS.LN):
        dim = -1 if node_type == _OPS.LN else 0
        out = []
        if getattr(module, "weight", None) is not None:
            out.append(make("weight", dim, "norm"))
        if getattr(module, "bias", None) is not None:
            out.append(make("bias", dim, "norm"))
        if getattr(module, "running_mean", None) is not None:
            # Without an affine shift a zero input normalizes to -mean/std: the mean must be 0 too.
            role = "stat" if getattr(module, "affine", True) else "norm"
            out += [make("running_mean", 0, role), make("running_var", 0, "stat")]
        return out
    if node_type == _OPS.PRELU and module.num_parameters > 1:
        return [make("weight", 0, "in")]
    if node_type == _OPS.EMBED:
        return [make("weight", 1, "out")]
    return []


def _trace(model: nn.Module, example_inputs: ExampleInputs):
    """Build Torch-Pruning's dependency graph without changing the model's buffers."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    except Exception as err:
        raise PruningError(
            f"Could not trace {type(model).__name__} with example_inputs={describe(example_inputs)}: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:  # the engine switches to eval mode; put modes and buffers back as they were
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _leaf_copies(example_inputs: ExampleInputs) -> ExampleInputs:
    """Floating-point inputs as fresh autograd leaves, so the trace can tell where they enter."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.is_floating_point():
            return example_inputs.detach().clone().requires_grad_()
        return example_inputs
    if isinstance(example_inputs, Mapping):
        return {k: _leaf_copies(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return type(example_inputs)(_leaf_copies(v) for v in example_inputs)
    return example_inputs


def _is_producer(item) -> bool:
    node_type = item.dep.target.type
    if node_type in (_OPS.CONV, _OPS.LINEAR):
        return item.dep.handler.__name__.startswith("prune_out")
    return node_type in (_OPS.DEPTHWISE_CONV, _OPS.EMBED, _OPS.PARAMETER)


def _emptied(group: ChannelGroup, channels: Sequence[int], shapes: Mapping[str, torch.Size]) -> str | None:
    """The first parameter that would lose every entry along a dim if ``channels`` went, if any."""
    gone = torch.as_tensor(list(channels), dtype=torch.long)
    for s in group.slices:
        if int(torch.isin(s.channels, gone).sum()) >= shapes[s.param][s.dim]:
            return s.param
    return None


def _spare_one_per_layer(
    group: ChannelGroup, dead: list[int], shapes: Mapping[str, torch.Size]
) -> tuple[list[int], int]:
    """Drop channels from ``dead`` until no layer would be emptied; return them and how many."""
    dead, kept = list(dead), 0
    while (param := _emptied(group, dead, shapes)) is not None:
        slc = next(s for s in group.slices if s.param == param)
        dead.remove(min(int(c) for c in slc.channels if int(c) in dead))
        kept += 1
    return dead, kept


def _groups_of(module, node_type) -> int:
    if node_type == _OPS.CONV and module.groups > 1:
        return module.groups
    if node_type == _OPS.GN:
        return module.num_groups
    return 1


def _dedupe(removals: list[Removal]) -> list[Removal]:
    seen, out = set(), []
    for r in removals:
        key = (r.param, r.dim, tuple(r.index.tolist()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink` removed and what it gained.

    Attributes:
        before: Model statistics before shrinking.
        after: Model statistics after shrinking.
        removed: Group name → channels removed (counting every tied copy).
        kept_dead: Group name → dead channels kept (one per tie) because all of the group was dead
            and removing it would empty its layers.
        skipped: Group name → why its dead channels were left in place.
        removals: The surgery, parameter by parameter (replayable on optimizer state).
    """

    before: ModelStats
    after: ModelStats
    removed: dict[str, int]
    kept_dead: dict[str, int]
    skipped: dict[str, str]
    removals: list[Removal] = field(repr=False)

    @property
    def channels_removed(self) -> int:
        """Total channels removed."""
        return sum(self.removed.values())

    def __str__(self) -> str:
        b, a = self.before, self.after
        lines = [
            f"shrink: removed {self.channels_removed} channels in {len(self.removed)} groups",
            f"  params {b.params:,} -> {a.params:,} ({a.params / max(b.params, 1):.1%})",
            f"  MACs   {b.macs:,} -> {a.macs:,} ({a.macs / max(b.macs, 1):.1%})",
        ]
        lines += [
            f"  kept {n} dead channel(s) in {g}: the whole group is dead and a layer cannot be empty"
            for g, n in self.kept_dead.items()
        ]
        lines += [f"  left dead channels in {g}: {why}" for g, why in self.skipped.items()]
        return "\n".join(lines)


def shrink(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    frozen: Sequence[str] = (),
    verify: bool = True,
) -> ShrinkReport:
    """Physically remove dead channels (all producing parameters exactly zero), in place.

    Every channel group (see :class:`ChannelGraph`) whose channels are dead in *all* of its coupled
    producers loses those channels in every layer it touches: conv/linear output rows and bias, the
    norm layers' parameters and running statistics, the input slices of every consumer (flatten →
    linear included), depthwise and grouped convolutions. Channels coupled through a residual addition
    go only when dead in every branch. A group that is dead as a whole keeps one channel, so no layer is
    emptied. In eval mode the shrunk model computes the same function as before.

    Args:
        model: The model to shrink, in place.
        example_inputs: Inputs for one forward pass (tensor, tuple of positional arguments, or dict).
        frozen: Layers whose output channels must be kept (model outputs are always kept).
        verify: Compare the outputs before and after (eval mode) and raise if they differ.

    Returns:
        The :class:`ShrinkReport`.

    Raises:
        PruningError: If the model is not a module, cannot run on ``example_inputs`` or has nothing to
            prune (raised before the model is modified), or if verification fails.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prune import shrink
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[:3] = 0
        ...     net[0].bias[:3] = 0
        >>> report = shrink(net, torch.randn(5, 4))
        >>> net[0].out_features, net[2].in_features, report.removed
        (5, 5, {'0': 3})
    """
    check_module(model, "shrink")
    check_inputs(example_inputs, "shrink")
    graph = ChannelGraph(model, example_inputs, frozen=frozen)
    before = model_stats(model, example_inputs)
    reference = _eval_outputs(model, example_inputs) if verify else None

    plan, kept_dead, skipped = {}, {}, {}
    groups = {g.name: g for g in graph.groups}
    for name, dead in graph.dead_channels().items():
        group = groups[name]
        if not dead:
            continue
        if not group.exact:
            skipped[name] = "a LayerNorm/GroupNorm normalizes across these channels"
        else:
            dead, kept = _spare_one_per_layer(group, dead, graph._shapes())
            if kept:
                kept_dead[name] = kept * group.ties
            if dead:
                plan[name] = dead
    removals = graph.prune(plan)
    after = model_stats(model, example_inputs)
    if reference is not None:
        _check_same(reference, _eval_outputs(model, example_inputs), plan)
    return ShrinkReport(
        before=before,
        after=after,
        removed={n: len(c) * groups[n].ties for n, c in plan.items()},
        kept_dead=kept_dead,
        skipped=skipped,
        removals=removals,
    )


def _eval_outputs(model: nn.Module, example_inputs: ExampleInputs) -> list[torch.Tensor]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return [t.detach().clone() for t in flatten_outputs(call_model(model, example_inputs))]
    finally:
        for m, mode in modes.items():
            m.training = mode


def _check_same(reference, outputs, plan) -> None:
    same = len(reference) == len(outputs) and all(
        r.shape == o.shape and torch.allclose(r, o, rtol=1e-4, atol=1e-5)
        for r, o in zip(reference, outputs, strict=False)
    )
    if not same:
        raise PruningError(
            "shrink changed the model's outputs, which must not happen: please report this model. "
            f"Groups shrunk: {', '.join(plan)}."
        )


def node_weights(graph: ChannelGraph, group: ChannelGroup) -> int:
    """Conv/linear output channels (nodes) one channel of ``group`` stands for: ties × producing layers."""
    layers = sum(isinstance(graph._modules_by_name.get(p), _ROOT_TYPES) for p in group.producers)
    return group.ties * max(layers, 1)


def lowest_channels(
    graph: ChannelGraph, scores: Mapping[str, torch.Tensor], amount: float
) -> dict[str, list[int]]:
    """Plan the removal of the lowest-scoring channels in ONE global ranking over the scored groups.

    Channels are removed in ascending score order (ties broken by model order) until ``amount`` of the
    scored groups' nodes (conv/linear output channels; a channel shared by several producers counts once
    per producer, see :func:`node_weights`) are gone. A channel is skipped when removing it would empty a
    layer, so every group and every layer keeps at least one channel.

    Args:
        graph: The channel graph the scores refer to.
        scores: Group name → 1-D scores, one per channel (higher = keep).
        amount: Fraction of the scored nodes to remove, in [0, 1).

    Returns:
        Group name → channel indices to remove, for :meth:`ChannelGraph.prune`.
    """
    groups = {g.name: g for g in graph.groups}
    entries = []  # (score, order, group name, channel)
    total = 0
    for order, (name, values) in enumerate(scores.items()):
        group = groups[name]
        if values.shape != (group.size,):
            raise PruningError(
                f"Scores for group {name!r} must have shape ({group.size},); got {tuple(values.shape)}."
            )
        weight = node_weights(graph, group)
        total += weight * group.size
        entries += [(float(v), order, name, c) for c, v in enumerate(values.tolist())]
    entries.sort(key=lambda e: (e[0], e[1], e[3]))

    # For each group: which layers (slices) each channel is part of, and how many channels each still has.
    covers: dict[str, dict[int, list[int]]] = {}
    remaining: dict[str, list[int]] = {}
    for name in scores:
        slices = groups[name].slices
        covers[name] = {}
        remaining[name] = []
        for i, s in enumerate(slices):
            unique = s.channels.unique().tolist()
            remaining[name].append(len(unique))
            for c in unique:
                covers[name].setdefault(c, []).append(i)

    target = round(amount * total)
    plan: dict[str, list[int]] = {}
    removed = 0
    for _, _, name, channel in entries:
        if removed >= target:
            break
        layers = covers[name].get(channel, [])
        if any(remaining[name][i] <= 1 for i in layers):
            continue
        for i in layers:
            remaining[name][i] -= 1
        plan.setdefault(name, []).append(channel)
        removed += node_weights(graph, groups[name])
    return {name: sorted(chs) for name, chs in plan.items()}
