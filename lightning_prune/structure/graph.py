"""`ChannelGraph`: the channel groups of a model, and transactional surgery that removes channels."""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune._inputs import (
    ExampleInputs,
    call_model,
    check_inputs,
    check_module,
    describe,
    flatten_outputs,
)
from lightning_prune._params import aliases, every_tensor
from lightning_prune.errors import PruningError
from lightning_prune.stats import (
    _BufferCopy,
    _eval_mode,
    _give_modes_back,
    _mha_fastpath_disabled,
    counted_stats,
)
from lightning_prune.structure._engine import CHANNEL_CHANGING, Engine, Item
from lightning_prune.structure.attention import find_heads, head_group, remove_units
from lightning_prune.structure.layers import ROOT_TYPES, is_root, layer_spec, unresized_tensors
from lightning_prune.structure.types import ChannelGroup, ParamSlice, Removal

#: Seconds tracing or listing the groups of one model may take before the model is refused.
DEFAULT_TIME_BUDGET = 120.0


class ChannelGraph:
    """The channel groups of a model, and the surgery that removes channels from them.

    Tracing runs one forward pass with ``example_inputs`` in eval mode; the model's train/eval modes
    and buffers are restored afterwards, so building a graph never changes the model. Layers not
    reached by that forward pass (e.g. auxiliary heads that only run in training mode) are not part of
    any group.

    A group is refused (``prunable=False``, with the ``reason``) when removing its channels cannot be
    done exactly: it produces a model output (also one that later layers read, as in feature
    pyramids), it is coupled to the model input, its channels pass through an operation that splits or
    merges them (attention-head reshapes, ``torch.split`` with sizes fixed in the code, concatenations
    along other dimensions), or a layer of it carries tensors the surgery would not resize.

    Surgery (:meth:`prune`) is transactional: if it fails, or its verification finds that the kept
    channels no longer compute what they did, the model is restored exactly as it was.

    Args:
        model: The model to analyse; :meth:`prune` modifies it in place.
        example_inputs: A tensor (one positional argument), a tuple of positional arguments or a dict
            of keyword arguments the model accepts.
        frozen: Qualified names of layers whose output channels must never be removed. The layers that
            produce the model's outputs are always frozen.
        time_budget: Seconds that tracing and listing the groups may take (``None``: no limit); past
            it the model is refused with the reason instead of the engine running on for minutes.
        measure: Also count the model's parameters and MACs in the tracing pass, as
            :func:`~lightning_prune.stats.model_stats` does, into :attr:`traced_stats` (saves a
            forward pass for statistics before pruning).

    Attributes:
        traced_outputs: The model's output tensors in the first tracing pass, before any pruning (eval
            mode, detached).
        traced_stats: With ``measure=True``, the model's :class:`~lightning_prune.stats.ModelStats` as
            traced (before any pruning); else None.

    Raises:
        PruningError: If ``model`` is not a module, the forward pass or the engine fails, the time
            budget runs out, or the model has no convolution or linear layer.

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
        time_budget: float | None = DEFAULT_TIME_BUDGET,
        measure: bool = False,
    ) -> None:
        self.model = check_module(model, "ChannelGraph")
        self.example_inputs = check_inputs(example_inputs, "ChannelGraph")
        if time_budget is not None and not (isinstance(time_budget, int | float) and time_budget > 0):
            raise PruningError(
                f"`ChannelGraph(time_budget={time_budget!r})` is invalid: `time_budget` must be a number of "
                "seconds > 0, or None for no limit."
            )
        if not any(is_root(m) for m in model.modules()):
            raise PruningError(
                f"{type(model).__name__} has nothing to prune: it contains no Conv or Linear layer."
            )
        self._frozen_arg = tuple(frozen)
        self.time_budget = time_budget
        counter = FlopCounterMode(display=False) if measure else None
        self._build(counter)
        self.traced_outputs = self._engine.outputs
        self.traced_stats = counted_stats(model, counter) if counter is not None else None

    def _build(self, counter: FlopCounterMode | None = None) -> None:
        model = self.model
        inputs = _leaf_copies(self.example_inputs)
        # The fused attention kernel hides its operations from the trace and the count.
        # One walk over the module tree for the whole graph (surgery replaces tensors, not modules).
        self._walk = walk = list(model.named_modules(remove_duplicate=False))
        names: dict[nn.Module, str] = {}
        for name, module in walk:
            names.setdefault(module, name)  # the first name, as ``named_modules()`` gives
        self._modules = list(names)  # each module once (the engine adds free parameters to `names`)
        with _traced_as_is(self._modules), _mha_fastpath_disabled():
            try:
                self._engine = Engine(model, inputs, self.time_budget, counter, names)
            except PruningError as err:
                raise PruningError(
                    f"Could not trace {type(model).__name__} with "
                    f"example_inputs={describe(self.example_inputs)}: {err}"
                ) from err.__cause__
        self._names = self._engine.names
        self._order = {n: i for i, n in enumerate(self._names.values())}
        self._modules_by_name = {n: m for m, n in self._names.items()}
        self._aliases = aliases(model, buffers=True, walk=walk)  # tied names only
        self._input_nodes = self._input_coupled(inputs)
        self._fragile_nodes = self._flattened_concats()
        self._roots: dict[str, nn.Module] = {}
        self._outputs = self._output_layers()
        self._frozen = set(self._frozen_arg) | self._outputs
        self._groups: dict[str, ChannelGroup] | None = None
        self._heads: dict = {}
        self._shape_cache: dict[str, torch.Size] | None = None
        self._specs: dict[tuple[int, bool], list] = {}  # (id(layer), producing) -> layer_spec
        self._unresized_of: dict[int, list[str]] = {}  # id(layer) -> unresized_tensors
        self._indices: dict[int, tuple[list[int], torch.Tensor, int]] = {}  # id(list) -> (list, tensor, max)

    @property
    def groups(self) -> list[ChannelGroup]:
        """Every channel group, named after its first producing conv/linear layer, in model order."""
        if self._groups is None:
            self._shape_cache = None
            roots = ROOT_TYPES + self._engine.conv1d_types
            found = [self._describe(items, probe) for items, probe in self._engine.groups(roots)]
            reached = {self._names[n.module] for n in self._engine.nodes if n.module in self._names}
            self._heads = {h.name: h for h in find_heads(self.model)}
            found += [head_group(self.model, h, self._frozen, reached) for h in self._heads.values()]
            order = self._order
            found.sort(key=lambda g: order.get(g.name, order.get(g.name.removesuffix(".heads"), 0)))
            self._groups = {g.name: g for g in found}
        return list(self._groups.values())

    @property
    def output_layers(self) -> set[str]:
        """Layers whose output channels reach a model output (never pruned)."""
        return set(self._outputs)

    def group(self, name: str) -> ChannelGroup:
        """The group rooted at the layer called ``name`` (or the group a producer ``name`` belongs to).

        Raises:
            PruningError: If no group is rooted at ``name``; the message lists the roots.
        """
        self.groups  # noqa: B018 - computes the groups once
        groups = self._groups or {}
        if name in groups:
            return groups[name]
        for g in groups.values():
            if name in g.producers:
                return g
        raise PruningError(f"No channel group is rooted at {name!r}. Roots: {', '.join(groups) or 'none'}.")

    def refusals(self) -> str:
        """Why groups are refused, most common reasons first, and the layers no group can resize.

        For error messages such as "nothing can be pruned": e.g. ``"3 groups: a View from [...] that
        splits or merges the channel dimension; layers the engine cannot resize: Conv1D ×8"``.
        """
        counts: dict[str, int] = {}
        for g in self.groups:
            if not g.prunable:
                for reason in g.reason.split("; "):
                    counts[reason] = counts.get(reason, 0) + 1
        parts = [f"{n} group(s): {why}" for why, n in sorted(counts.items(), key=lambda kv: -kv[1])[:3]]
        unknown: dict[str, int] = {}
        for m in self.model.modules():
            weight = m._parameters.get("weight")
            if weight is not None and weight.dim() >= 2 and layer_spec(m, True) is None:
                unknown[type(m).__name__] = unknown.get(type(m).__name__, 0) + 1
        if unknown:
            listed = ", ".join(f"{k} ×{v}" for k, v in unknown.items())
            parts.append(f"layers of types the engine cannot resize: {listed}")
        return "; ".join(parts) or "no group at all"

    def dead_channels(self) -> dict[str, list[int]]:
        """Channels whose every producing parameter is exactly zero, per prunable group.

        A channel is dead when, in every layer of its group, the conv/linear output rows and bias
        entries, the normalization scale and shift, and any free parameter slices are all zero: it then
        outputs zeros everywhere. Removing it leaves the function unchanged in groups with
        ``exact=True`` (a LayerNorm or GroupNorm across the channels would see different statistics).
        """
        tensors = self._tensors()
        dead = {}
        for group in self.groups:
            if not group.prunable:
                continue
            # Index arithmetic in NumPy: these arrays are small, and a torch call costs microseconds each.
            alive = np.zeros(group.size, dtype=bool)
            producing = [s for s in group.slices if s.role in ("out", "norm")]
            # Small tensors first (biases, norm affines): a channel found alive there needs no look at
            # its weight rows, which are then read only for the channels still in question.
            producing.sort(key=lambda s: tensors[s.param].numel())
            for k, s in enumerate(producing):
                positions, channels = s.positions.numpy(), s.channels.numpy()
                if k:
                    if alive.all():
                        break
                    open_ = ~alive[channels]
                    if not open_.any():
                        continue
                    positions, channels = positions[open_], channels[open_]
                alive[channels[_nonzero_at(tensors[s.param].detach(), s.dim, positions)]] = True
            dead[group.name] = np.flatnonzero(~alive).tolist()
        return dead

    def prune(
        self,
        removals: Mapping[str, Sequence[int]],
        *,
        verify: ExampleInputs | None = None,
        compare: bool = True,
        reference: Sequence[torch.Tensor] | None = None,
        run: Callable[[nn.Module, ExampleInputs], list[torch.Tensor]] | None = None,
    ) -> list[Removal]:
        """Remove channels, in place, from every layer of their groups; all or nothing.

        Args:
            removals: Group name → channel indices (``0 <= i < group.size``) to remove.
            verify: Inputs to check the surgery with (eval mode): the pruned model must run and keep
                its output shapes, and (``compare``) give the outputs the model gave with the removed
                channels zeroed (all their producing weights, biases and norm affines set to 0). In
                groups with ``exact=False`` (a LayerNorm or GroupNorm across the channels) removal is
                not equivalent to zeroing, and only the first part applies. ``None`` skips the check.
            compare: Compare output values, not only shapes (needs one more forward pass, unless
                ``reference`` is given).
            reference: The outputs to verify against, if already known (the outputs of the model on
                ``verify`` with the removed channels zeroed; for dead channels, its plain outputs).
            run: How the pruned model is run on ``verify``: a function of the model and the inputs
                returning the output tensors (default: :func:`eval_outputs`), e.g. one that also
                counts MACs.

        Returns:
            The surgery performed, parameter by parameter, in order (see :class:`Removal`). Tied
            parameters (one tensor under several names) appear once, under their first name.

        Raises:
            PruningError: For an unknown or non-prunable group, indices out of range or repeated, or a
                removal that would empty a layer (nothing is modified then); or if the surgery fails,
                breaks a tie between parameters, or fails verification (the model is then restored
                exactly as it was).
        """
        plan = self._plan(removals)
        if not plan:
            return []
        exact = compare and all(g.exact for g, _ in plan)
        if verify is not None and reference is None:
            if not exact and verify is self.example_inputs:
                reference = self._engine.outputs  # compared by shape only
            else:
                with _zeroed(self._tensors(), [s for g, idx in plan for s in _producing(g, idx)]):
                    reference = eval_outputs(self.model, verify)
        snapshot = _Snapshot(self._modules)
        tied = self._aliases
        frozen = {
            n for n, p in every_tensor(self.model, buffers=False, walk=self._walk) if not p.requires_grad
        }
        try:
            done = self._surgery(plan)
            _retie(self.model, tied)
            for name, param in every_tensor(self.model, buffers=False, walk=self._walk) if frozen else ():
                param.requires_grad_(name not in frozen)  # the engine makes every new tensor trainable
            if verify is not None:
                try:
                    outputs = (run or eval_outputs)(self.model, verify)
                except Exception as err:
                    raise PruningError(
                        f"the pruned model no longer runs: {type(err).__name__}: {err}"
                    ) from err
                if not same_outputs(reference, outputs, shapes_only=not exact):
                    raise PruningError(
                        "the kept channels no longer compute what they did (outputs changed by "
                        f"{max_difference(reference, outputs):.3g}): an operation between the groups' "
                        "layers is not channel-wise or does not map zero to zero"
                    )
        except Exception as err:
            snapshot.restore()
            self._build()  # the engine's own records were cut with the model: trace again
            names = ", ".join(g.name for g, _ in plan)
            cause = err if isinstance(err, PruningError) else f"{type(err).__name__}: {err}"
            raise PruningError(
                f"Removing channels from {names} was undone, the model is as it was: {cause}. "
                "Leave these layers out (`exclude`/`frozen`) and please report the model."
            ) from err
        self._groups = self._shape_cache = None
        self._indices, self._specs = {}, {}  # new index lists; layer specs may depend on sizes (PReLU)
        return done

    # -- internals ---------------------------------------------------------------------------------
    def _plan(self, removals: Mapping[str, Sequence[int]]) -> list[tuple[ChannelGroup, list[int]]]:
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
            emptied = emptied_by(group, idx, self._shapes())
            if emptied:
                raise PruningError(
                    f"Removing channels {idx} of group {name!r} would empty {emptied}; "
                    "keep at least one of its channels."
                )
            plan.append((group, idx))
        return plan

    def _surgery(self, plan: list[tuple[ChannelGroup, list[int]]]) -> list[Removal]:
        done: list[Removal] = []
        heads = [(g, idx) for g, idx in plan if g.name in self._heads]
        for group, idx in heads:  # our own surgery: the engine refuses the projections' channels
            done += _dedupe(remove_units(self.model, self._heads[group.name], group, idx), self._aliases)
        if heads:
            plan = [(g, idx) for g, idx in plan if g.name not in self._heads]
            self._build()  # the engine's records of the projections are stale now
            self.groups  # noqa: B018 - the remaining groups' roots in the new trace
        for group, idx in plan:
            root = self._roots[group.name]
            stride = self._engine.out_channels(root) // group.ties
            channels = (
                idx if group.ties == 1 else sorted(c + k * stride for c in idx for k in range(group.ties))
            )
            if not heads and self._engine.reusable(root):  # its slices still say where the channels are
                self._engine.cut_listed(root, channels)
                removals = _removals(group, idx)
            else:
                widths = self._group_widths(group)  # as the items' indices count them: before the cut
                items = self._engine.prune(root, channels)
                removals = [
                    Removal(s.param, s.dim, s.positions)
                    for i in items
                    for s in self._slices_of(i, stride, widths)
                ]
            # One group cuts each entry once (tied names and repeated items are one cut); two groups may
            # cut the same positions of a tensor one after the other, and both cuts are real.
            done += _dedupe(removals, self._aliases)
        return done

    def _tensors(self) -> dict[str, torch.Tensor]:
        return dict(every_tensor(self.model, walk=self._walk))

    def _shapes(self) -> dict[str, torch.Size]:
        if self._shape_cache is None:
            self._shape_cache = {n: t.shape for n, t in self._tensors().items()}
        return self._shape_cache

    def _output_layers(self) -> set[str]:
        """Layers whose output channels reach a model output without a channel-changing layer.

        Outputs are the tensors the model returns, also where later layers read them too (feature
        pyramids); nodes with no consumer count as outputs as well.
        """
        outputs = self._engine.output_grad_fns
        todo = [n for n in self._engine.nodes if not n.outputs or n.grad_fn in outputs]
        seen, found = set(), set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.module in self._names:
                found.add(self._names[node.module])
            if Engine.kind(node) not in CHANNEL_CHANGING:
                todo.extend(node.inputs)
        return found

    def _input_coupled(self, inputs) -> set:
        """Nodes whose channels are the model input's channels (e.g. a depthwise conv on the input)."""
        leaves = {id(t) for t in flatten_outputs(inputs) if t.requires_grad}
        todo = [
            node
            for node in self._engine.nodes
            if any(
                getattr(f, "variable", None) is not None and id(f.variable) in leaves
                for f, _ in getattr(node.grad_fn, "next_functions", ())
            )
        ]
        found = set()
        while todo:
            node = todo.pop()
            if node in found or Engine.kind(node) in CHANNEL_CHANGING:
                continue
            found.add(node)
            todo.extend(node.outputs)
        return found

    def _flattened_concats(self) -> set:
        """Flattens of a concatenation with spatial size > 1, whose index mapping the engine gets wrong."""
        found = set()
        for node in self._engine.nodes:
            sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
            if Engine.kind(node) != "reshape" or sizes is None or math.prod(sizes[2:]) <= 1:
                continue
            todo, seen = list(node.inputs), set()
            while todo:
                up = todo.pop()
                if up in seen or Engine.kind(up) in CHANNEL_CHANGING:
                    continue
                seen.add(up)
                if Engine.kind(up) in ("concat", "split"):
                    found.add(node)
                    break
                todo.extend(up.inputs)
        return found

    def _label(self, module) -> str | None:
        if isinstance(module, torch.Tensor):  # a free parameter (Parameter's own isinstance check is slow)
            return self._engine.param_name(module)
        return self._names.get(module)

    def _describe(self, items: list[Item], probe: list[Item] | None) -> ChannelGroup:
        root = items[0].module
        channels = self._engine.out_channels(root)
        reasons, exact, ties = [], True, 1
        layers, producers = [], []
        for item in items:
            module, kind = item.module, item.kind
            label = self._label(module)
            if item.node in self._engine.barriers:
                reasons.append(f"its channels pass through {self._engine.barriers[item.node]}")
            if item.node in self._input_nodes:
                reasons.append("its channels are coupled to the model input")
            if item.node in self._fragile_nodes:
                reasons.append("a concatenation is flattened before a linear layer (unsupported)")
            if item.node in self._engine.mixing:
                exact = False
            if label is None:
                continue
            if label not in layers:
                layers.append(label)
            if kind in ("mha", "lstm"):
                reasons.append(f"{label} ({type(module).__name__}) cannot be resized here")
            if kind in ("ln", "gn"):
                exact = False
            if isinstance(module, nn.Module) and (extra := self._unresized(module)):
                reasons.append(
                    f"{label} ({type(module).__name__}) has tensors that would not be resized: {extra}"
                )
            if kind == "conv" and module.transposed and module.groups > 1:
                reasons.append(f"{label} is a grouped transposed convolution")
            if kind == "depthwise_conv" and module.in_channels != module.out_channels:
                reasons.append(f"{label} has groups == out_channels but fewer outputs than inputs")
            split = _groups_of(module, kind)
            if split > 1:
                width = getattr(module, "num_channels", None) or (
                    module.out_channels if item.producing else module.in_channels
                )
                # Its ties are strides of its own width: they are the group's only when it spans them all.
                if item.idxs != item.root_idxs or len(item.idxs) != width or width != channels:
                    reasons.append(f"{label} is a grouped layer behind a concatenation or split")
                else:
                    ties = math.lcm(ties, split)
            if item.producing and item.kind != "parameter" and label not in producers:
                producers.append(label)
            if label in self._frozen and item.producing:
                reasons.append(f"{label} is frozen (it produces a model output or was excluded)")
        if channels % ties:
            reasons.append(f"{channels} channels cannot be split evenly into {ties} ties")
            ties = 1
        size = channels // ties
        # Name the group after its first producing conv/linear layer in model order.
        name = min(
            (p for p in producers if p in self._modules_by_name and is_root(self._modules_by_name[p])),
            key=self._order.__getitem__,
            default=self._names[root],
        )
        self._roots[name] = root
        slices = [s for item in items for s in self._slices_of(item, size)]
        shapes, top = self._shapes(), {}  # slices share their position tensors: one max each
        for s in slices:
            if id(s.positions) not in top:
                top[id(s.positions)] = int(s.positions.numpy().max())
        if any(s.param not in shapes or top[id(s.positions)] >= shapes[s.param][s.dim] for s in slices):
            reasons.append("the traced dependencies do not fit the layer shapes")
        if probe is not None and _entries(items, only=0) != _entries(probe):
            reasons.append(
                "removing one of its channels reaches entries the group maps to another channel (its "
                "channels are coupled to each other, e.g. by a depthwise layer between two parts of a "
                "concatenation)"
            )
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

    def _spec(self, module: nn.Module, producing: bool) -> list:
        key = (id(module), producing)
        if key not in self._specs:
            self._specs[key] = layer_spec(module, producing) or []
        return self._specs[key]

    def _unresized(self, module: nn.Module) -> list[str]:
        if id(module) not in self._unresized_of:
            self._unresized_of[id(module)] = unresized_tensors(module)
        return self._unresized_of[id(module)]

    def _index(self, idxs: list[int]) -> tuple[torch.Tensor, int]:
        """``idxs`` as a tensor, and its max; a listed group's items share one list: converted once."""
        found = self._indices.get(id(idxs))
        if found is None or found[0] is not idxs:
            array = np.asarray(idxs, dtype=np.int64)  # NumPy converts a list of ints several times faster
            found = self._indices[id(idxs)] = (idxs, torch.from_numpy(array), int(array.max()))
        return found[1], found[2]

    def _group_widths(self, group: ChannelGroup) -> dict[nn.Module, int]:
        """Input channels per convolution group of the grouped convolutions among ``group``'s layers."""
        layers = (self._modules_by_name.get(name) for name in group.layers)
        return {
            m: m.in_channels // m.groups
            for m in layers
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
        }

    def _slices_of(
        self, item: Item, stride: int, widths: Mapping[nn.Module, int] | None = None
    ) -> list[ParamSlice]:
        """Where the item's indices sit in the parameters and buffers of its layer.

        ``widths``: the input channels per group of grouped convolutions as the item's indices count
        them, where the layer has been cut since (default: as the layer is now).
        """
        label = self._label(item.module)
        if label is None or not item.idxs:
            return []
        positions, _ = self._index(item.idxs)
        same = item.root_idxs is item.idxs or item.root_idxs == item.idxs
        channels, top = (positions, _) if same else self._index(item.root_idxs)
        if top >= stride:
            channels = channels % stride
        module = item.module
        if item.kind == "parameter":
            return [ParamSlice(label, item.pruning_dim, positions, channels, "out")]
        producing = item.producing or item.kind == "depthwise_conv"
        spec = self._spec(module, producing)
        if item.kind == "conv" and not producing and module.groups > 1:
            width = widths[module] if widths and module in widths else module.in_channels // module.groups
            first = positions < width  # a grouped conv's weight repeats
            positions, channels = positions[first], channels[first]
            if not len(positions):
                return []
        return [
            ParamSlice(f"{label}.{attr}", dim, positions, channels, role) for attr, dim, role in spec if role
        ]


def _entries(items: list[Item], only: int | None = None) -> set[tuple[int, bool, int]]:
    """(layer, producing, position) of every item index (of group channel ``only``, if given)."""
    return {
        (id(item.module), item.producing, i)
        for item in items
        for i, root in zip(item.idxs, item.root_idxs, strict=True)
        if only is None or root == only
    }


def prune_or_refuse(
    graph: ChannelGraph,
    plan: Mapping[str, Sequence[int]],
    *,
    verify: ExampleInputs | None,
    compare: bool = True,
    reference: Sequence[torch.Tensor] | None = None,
    run: Callable[[nn.Module, ExampleInputs], list[torch.Tensor]] | None = None,
) -> tuple[list[Removal], dict[str, str]]:
    """Prune ``plan``, verified; where that fails, bisect it: prune what passes, refuse the rest.

    Returns:
        The removals made, and group name → why its removal was refused (the model holds those
        channels as before).
    """
    refused: dict[str, str] = {}

    def attempt(part: dict[str, Sequence[int]]) -> list[Removal]:
        if not part:
            return []
        try:
            return graph.prune(part, verify=verify, compare=compare, reference=reference, run=run)
        except PruningError as err:
            if len(part) == 1:
                text = str(err)
                refused[next(iter(part))] = text[text.find("as it was: ") + 11 :].split(". Leave these")[0]
                return []
        names = list(part)
        half = len(names) // 2
        return attempt({n: part[n] for n in names[:half]}) + attempt({n: part[n] for n in names[half:]})

    return attempt(dict(plan)), refused


_CHUNK = 4 << 20  # bytes


def _nonzero_at(t: torch.Tensor, dim: int, positions: np.ndarray) -> np.ndarray:
    """Which of the ``positions`` along ``dim`` of ``t`` hold a non-zero entry (NaN counts as non-zero).

    On the CPU through NumPy, whose ``any`` reads memory several times faster than torch's reductions:
    most of the rows are read in place; fewer are copied out in chunks of at most ``_CHUNK`` bytes.
    """
    if t.device.type != "cpu" or t.dtype not in _NUMPY_FLOATS:
        return _nonzero_at_torch(t, dim, positions)
    a = t.numpy()
    if a.ndim == 1:
        return a[positions] != 0
    dim %= a.ndim
    others = tuple(d for d in range(a.ndim) if d != dim)
    n = a.shape[dim]
    if 2 * len(positions) >= n:
        return a.any(axis=others)[positions]
    step = max(1, _CHUNK // max(a.size // max(n, 1) * a.itemsize, 1))
    found = [
        np.take(a, positions[i : i + step], axis=dim).any(axis=others) for i in range(0, len(positions), step)
    ]
    return np.concatenate(found) if len(found) > 1 else found[0]


def _nonzero_at_torch(t: torch.Tensor, dim: int, positions: np.ndarray) -> np.ndarray:
    """:func:`_nonzero_at` in torch (other devices, dtypes NumPy lacks).

    Most of the rows: the whole tensor is read in place. Fewer: they are copied out in chunks of at most
    ``_CHUNK`` bytes into one reused buffer (fresh memory for one large copy costs more than reading
    the whole tensor).
    """
    n = t.shape[dim]
    if 2 * len(positions) >= n:
        return _nonzero_rows((t.movedim(dim, 0) if dim else t).reshape(n, -1))[positions]
    index = torch.from_numpy(positions).to(t.device)
    step = max(1, _CHUNK // max(t.numel() // max(n, 1) * t.element_size(), 1))
    buffer, found = t.new_empty(0), []
    for part in index.split(step):
        torch.index_select(t, dim, part, out=buffer.resize_(0))  # resize_(0) keeps the storage
        found.append(_nonzero_rows(buffer.movedim(dim, 0).reshape(len(part), -1)))
    return np.concatenate(found)


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _nonzero_rows(t: torch.Tensor) -> np.ndarray:
    """Which rows of a 2-D tensor hold a non-zero entry (NaN counts as non-zero)."""
    if t.is_floating_point():  # an L1 norm reads memory faster than `any`
        return (torch.linalg.vector_norm(t, 1, dim=1) != 0).cpu().numpy()
    return t.any(1).cpu().numpy()


def _groups_of(module, kind: str) -> int:
    if kind == "conv" and module.groups > 1:
        return module.groups
    if kind == "gn":
        return module.num_groups
    return 1


def _removals(group: ChannelGroup, channels: Sequence[int]) -> list[Removal]:
    """The entries of ``channels`` of ``group`` in each of its slices, as removals in slice order."""
    gone = np.zeros(group.size, dtype=bool)
    gone[list(channels)] = True
    out, cut = [], {}  # slices mostly share their index tensors: cut each pair once
    for s in group.slices:
        key = (id(s.positions), id(s.channels))
        if key not in cut:
            hit = gone[s.channels.numpy()]
            cut[key] = torch.from_numpy(s.positions.numpy()[hit]) if hit.any() else None
        if cut[key] is not None:
            out.append(Removal(s.param, s.dim, cut[key]))
    return out


def _producing(group: ChannelGroup, channels: Sequence[int]) -> list[ParamSlice]:
    """The producing slices (weights, biases, norm affines) of ``channels`` of ``group``."""
    gone = torch.zeros(group.size, dtype=torch.bool)
    gone[list(channels)] = True
    out = []
    for s in group.slices:
        if s.role in ("out", "norm"):
            hit = gone[s.channels]
            if hit.any():
                out.append(ParamSlice(s.param, s.dim, s.positions[hit], s.channels[hit], s.role))
    return out


def emptied_by(group: ChannelGroup, channels: Sequence[int], shapes: Mapping[str, torch.Size]) -> str | None:
    """The first parameter that would lose every entry along a dim if ``channels`` went, if any."""
    gone = np.zeros(group.size, dtype=bool)
    gone[list(channels)] = True
    counted: dict[int, int] = {}  # slices of one group mostly share their channel map: count it once
    for s in group.slices:
        size = shapes[s.param][s.dim]
        if len(s.positions) < size:
            continue
        if (n := counted.get(id(s.channels))) is None:
            n = counted[id(s.channels)] = int(gone[s.channels.numpy()].sum())
        if n >= size:
            return s.param
    return None


def _dedupe(removals: list[Removal], aliases: Mapping[str, str]) -> list[Removal]:
    seen, out = set(), []
    for r in removals:
        if (first := aliases.get(r.param, r.param)) != r.param:
            r = Removal(first, r.dim, r.index)
        key = (r.param, r.dim, r.index.numpy().tobytes())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make tensors that were one tensor before surgery one tensor again (same values required).

    ``aliases``: the tied names → their canonical name (:func:`~lightning_prune._params.aliases`).
    """
    if not aliases:
        return  # nothing is tied
    params = dict(every_tensor(model, buffers=False))
    for name, first in aliases.items():
        if name not in params or first not in params:
            continue
        a, b = params[first], params[name]
        if a is b:
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            raise PruningError(
                f"{name} is tied to {first}, but the surgery would cut them differently "
                f"({tuple(b.shape)} vs {tuple(a.shape)})"
            )
        owner, attr = name.rpartition(".")[::2] if "." in name else ("", name)
        setattr(model.get_submodule(owner), attr, a)


class _Snapshot:
    """Every module's attributes by reference: surgery replaces tensors, so this restores the model.

    The engine never writes into a tensor: it builds smaller ones and sets them as attributes. Keeping
    each module's attribute dictionary, and the contents of its parameter, buffer and submodule tables
    (also empty ones, which surgery could fill) and of its own list/dict/set attributes (which surgery
    may edit in place), is therefore enough to undo it exactly, at no memory cost. Hook tables are kept
    by reference only: surgery adds no hooks.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self._state = []
        for module in modules:
            attrs = vars(module).copy()
            contents = [
                (table, table.copy() if table else None)  # None: emptied on restore
                for table in (
                    module._parameters,
                    module._buffers,
                    module._modules,
                    module._non_persistent_buffers_set,
                )
            ]
            for key in attrs.keys() - _MODULE_ATTRS:  # its own attributes
                value = attrs[key]
                if type(value) in _CONTAINERS or isinstance(value, _CONTAINERS):
                    contents.append((value, copy.copy(value)))
            self._state.append((module, attrs, contents))

    def restore(self) -> None:
        for module, attrs, contents in self._state:
            vars(module).clear()
            vars(module).update(attrs)
            for container, content in contents:
                if isinstance(container, list):
                    container[:] = content
                else:
                    container.clear()
                    if content:
                        container.update(content)


_CONTAINERS = (dict, list, set, OrderedDict)
_MODULE_ATTRS = frozenset(vars(nn.Module()))  # what every module has (tables, hooks, `training`)


class _zeroed:
    """Context: the given slices set to zero, their values put back afterwards."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], slices: Sequence[ParamSlice]) -> None:
        self.tensors, self.slices, self.saved = tensors, slices, []

    def __enter__(self):
        with torch.no_grad():
            for s in self.slices:
                t = self.tensors[s.param]
                idx = s.positions.to(t.device)
                self.saved.append((t, s.dim, idx, t.index_select(s.dim, idx).clone()))
                t.index_fill_(s.dim, idx, 0)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, dim, idx, values in reversed(self.saved):
                t.index_copy_(dim, idx, values)


@contextlib.contextmanager
def _traced_as_is(modules: list[nn.Module]) -> Iterator[None]:
    """The model ready to be traced inside; exactly as it was afterwards (one walk over its modules).

    Inside: eval mode, and every floating-point parameter requires grad (the trace follows autograd:
    frozen layers must record it too). On exit, each module gets back its mode (see
    :func:`~lightning_prune.stats._give_modes_back`), its forward hooks (the engine leaves its own
    behind when tracing fails) and, last, its buffers as they were before ``eval()`` (tensors and values:
    also a norm layer's in eval mode, which code outside it may write); each parameter gets back its
    ``requires_grad``. ``modules``: every module once, the model first (as ``model.modules()`` gives
    them).
    """
    modes = [(m, m.training) for m in modules]
    hooks = [set(m._forward_hooks) if m._forward_hooks else None for m in modules]
    buffers = _BufferCopy(modules)
    switched = any(training for _, training in modes)
    if switched:
        modules[0].eval()
    frozen = [
        p
        for m in modules
        for p in m._parameters.values()
        if p is not None and not p.requires_grad and p.is_floating_point()
    ]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        _give_modes_back(modes, switched)
        for m, keys in zip(modules, hooks, strict=True):
            if m._forward_hooks:
                for key in set(m._forward_hooks) - (keys or set()):
                    del m._forward_hooks[key]
        buffers.restore()


def eval_outputs(model: nn.Module, example_inputs: ExampleInputs) -> list[torch.Tensor]:
    """The model's output tensors in eval mode, without gradients (modes restored).

    PyTorch's fused attention path stays off, as in :func:`~lightning_prune.stats.stats_and_outputs`,
    so that both compute the same numbers.
    """
    with _eval_mode(model), torch.no_grad(), _mha_fastpath_disabled():
        return [t.detach().clone() for t in flatten_outputs(call_model(model, example_inputs))]


def same_outputs(reference, outputs, *, shapes_only: bool = False) -> bool:
    """Whether two output lists match (shapes, and values up to float tolerance unless ``shapes_only``).

    The absolute tolerance grows with the outputs' magnitude (float rounding does too).
    """
    pairs = list(zip(reference, outputs, strict=False))
    if len(reference) != len(outputs) or any(r.shape != o.shape for r, o in pairs):
        return False
    if shapes_only:
        return all(not o.is_floating_point() or bool(torch.isfinite(o).all()) for o in outputs)
    for r, o in pairs:
        if not r.is_floating_point():
            if not torch.equal(r, o):
                return False
            continue
        rtol, atol = (1e-4, 1e-5) if r.dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)
        if not torch.allclose(r, o, rtol=rtol, atol=atol * max(1.0, _amax(r))):
            return False
    return True


def max_difference(reference, outputs) -> float:
    """Largest absolute difference between matching float outputs (inf when shapes differ)."""
    diffs = [
        _amax(r.float() - o.float()) if r.shape == o.shape else math.inf
        for r, o in zip(reference, outputs, strict=False)
    ]
    return max(diffs, default=math.inf)


def _amax(t: torch.Tensor) -> float:
    return float(t.abs().amax()) if t.numel() else 0.0


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
