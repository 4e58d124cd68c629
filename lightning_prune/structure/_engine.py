"""The adapter over Torch-Pruning's ``DependencyGraph``: the only module that imports the engine.

It traces a model, lists the engine's channel groups and executes their surgery, and hands the rest of
the package plain :class:`Item` records. It also corrects what the engine misreads, before the engine
uses it:

- **Reshapes, splits, slices, unbinds, expands and concatenations** are checked against the tensor
  shapes recorded by autograd. One that keeps the channel dimension (with everything on one side of it)
  is treated as channel-wise; a flatten of ``(N, C, ...)`` into ``(N, C·...)`` keeps the engine's flatten
  mapping; any other (attention ``(B, N, C) → (B, N, heads, C/heads)`` reshapes, ``torch.split``/``chunk``
  along the channels with sizes fixed in the model's code, concatenations along a non-channel dimension)
  becomes a *barrier*: the engine's propagation stops there, and every group that reaches it is refused
  with the reason. This also keeps the engine's index lists from multiplying through a chain of
  reshapes (Swin, MaxViT), which used to take tens of GB.
- **Index mappings** are refreshed once before all groups are listed and once per group pruned (the
  engine refreshes them for every group it builds).
- **Time**: tracing and listing run under a time budget (main thread, POSIX), so a graph the engine
  cannot resolve is refused with the reason instead of running for minutes.
- **Errors** of the engine become :class:`~lightning_prune.errors.PruningError` with the model named.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency import shape_infer as _shape_infer

from lightning_prune._inputs import ExampleInputs, call_model, flatten_outputs
from lightning_prune.errors import PruningError
from lightning_prune.structure.layers import is_conv1d

_OPS = tp.ops.OPTYPE
KIND = {op: op.name.lower() for op in _OPS}
#: Node kinds whose output channels are not their input channels: channel information stops there.
CHANNEL_CHANGING = {"conv", "linear", "embed", "mha", "lstm", "customized"}
_MAX_VALID_DIM = 1 << 32  # PyTorch saves dim=-1 as 2**64 - 1


class BudgetExceeded(BaseException):
    """Raised inside the engine when the time budget runs out.

    A BaseException, so that no ``except Exception`` in the traced code swallows it.
    """


class Item(NamedTuple):  # a tuple: built for every dependency of every group, cheaply
    """One layer or operation a channel group touches, with the group's indices there.

    Attributes:
        node: The engine's node (opaque: compare by identity only).
        module: The layer (or free parameter) the item modifies, or the engine's stand-in for a
            functional operation.
        kind: Lower-case node kind (``"conv"``, ``"linear"``, ``"bn"``, ``"ln"``, ``"gn"``, ``"in"``,
            ``"depthwise_conv"``, ``"embed"``, ``"parameter"``, ``"concat"``, ``"elementwise"``, ...).
        producing: Whether the item removes output channels (rows) of its layer.
        idxs: Indices in the layer's own channel numbering.
        root_idxs: For each index, the group channel it belongs to.
        pruning_dim: For free parameters, the dimension that is pruned.
    """

    node: Any
    module: Any
    kind: str
    producing: bool
    idxs: list[int]
    root_idxs: list[int]
    pruning_dim: int | None = None


class Engine:
    """A traced model: its nodes, the barriers found in it, its groups and their surgery."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        budget: float | None,
        counter=None,
        names: dict[nn.Module, str] | None = None,
    ) -> None:
        self.model = model
        self.barriers: dict[Any, str] = {}
        outputs: list[torch.Tensor] = []

        def keep_outputs(out):
            outputs.extend(flatten_outputs(out))
            return outputs

        def forward(model, inputs):  # under a FlopCounterMode when one is given
            with counter if counter is not None else contextlib.nullcontext():
                return call_model(model, inputs)

        dg = tp.DependencyGraph()
        dg.verbose = False
        dg.model = model
        #: Every module → its qualified name (the engine's table, shared with the graph).
        self.names = names if names is not None else {m: n for n, m in model.named_modules()}
        #: Module types rooting groups beyond convolutions and linear layers (transformers' Conv1D).
        self.conv1d_types = tuple({type(m) for m in self.names if is_conv1d(m)})
        for layer_type in self.conv1d_types:
            dg.register_customized_layer(layer_type, _Conv1DPruner())
        dg._module2name = self.names
        dg.ignored_params = []
        with _deadline(budget, model, "tracing"):
            dg._param_to_name, dg.unwrapped_parameters = dg._detect_unwrapped_parameters(None)
            dg.module2node = dg._trace(model, example_inputs, forward, output_transform=keep_outputs)
            dg._build_dependency(dg.module2node)
            self._dg = dg
            self._mark_barriers()
            _shape_infer.init_shape_information(dg)
            _index_mapping.update_index_mapping(dg)
            _fast_flattens(dg, _flattening_nodes(dg))
        self.output_grad_fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
        self.outputs = [t.detach() for t in outputs]
        self._stale: set | None = None  # None: refresh every index mapping before the next prune
        self._fresh = True  # the index mappings are as traced: listing groups needs no refresh
        # root -> its group's (dependency, indices, root indices) for all channels; None: the identity
        self._listed: dict[nn.Module, list[tuple[Any, list[int] | None, list[int] | None]]] = {}
        self.mixing = self._channel_mixing()
        self.budget = budget

    # -- nodes ----------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Any]:
        """Every node of the traced graph."""
        return list(self._dg.module2node.values())

    @staticmethod
    def kind(node) -> str:
        """Lower-case kind of a node."""
        return KIND[node.type]

    def param_name(self, param: nn.Parameter) -> str | None:
        """Qualified name of a free parameter the engine tracks."""
        return self._dg._param_to_name.get(param)

    def out_channels(self, module: nn.Module) -> int:
        """Output channels of a root layer, as the engine counts them."""
        return self._dg.get_pruner_of_module(module).get_out_channels(module)

    # -- groups ----------------------------------------------------------------------------------------
    def groups(self, root_types: tuple[type, ...]) -> list[tuple[list[Item], list[Item] | None]]:
        """Every channel group rooted at a layer of ``root_types``, as two item lists.

        The items for all of its channels, and the items for channel 0 alone: a probe, since both must
        agree on what channel 0 touches (None when no index mapping lies in the group: they agree).
        Roots are taken in the engine's order and a layer already producing in a listed group roots
        none, as in the engine's own listing. Each group is first built for channel 0 alone: without an
        index mapping every channel reaches the same entries at its own index, so the full group is
        that one with every channel, and only groups with a mapping are built again for all of them.
        """
        dg = self._dg
        fresh = set() if self._fresh else None
        with _deadline(self.budget, self.model, "listing the channel groups"), _refresh_only(dg, fresh):
            found, visited = [], set()
            for module in list(dg.module2node):
                if not isinstance(module, root_types) or module in visited:
                    continue
                pruner = dg.get_pruner_of_module(module)
                width = pruner.get_out_channels(module) if pruner is not None else None
                if width is None:
                    continue
                probe = group = self._group(module, [0])
                if any(e.dep.target.type not in _IDENTITY for e in probe):
                    group = self._group(module, list(range(width)))
                    self._listed[module] = [(e.dep, list(e.idxs), list(e.root_idxs)) for e in group]
                    found.append((self._items(group), self._items(probe)))
                else:  # None: every channel at its own index
                    self._listed[module] = [(e.dep, None, None) for e in probe]
                    every = list(range(width))
                    found.append(([self._item(e.dep, every, every) for e in probe], None))
                visited.update(
                    e.dep.target.module for e in group if dg.is_out_channel_pruning_fn(e.dep.handler)
                )
            return found

    def reusable(self, root: nn.Module) -> bool:
        """Whether ``root``'s listed group stays valid through other groups' prunes (no index mapping).

        Its entries then sit at the positions listed, and :meth:`cut_listed` removes channels from it.
        """
        listed = self._listed.get(root)
        return listed is not None and all(dep.target.type not in _PROPAGATED for dep, _, _ in listed)

    def cut_listed(self, root: nn.Module, channels: list[int]) -> None:
        """Remove ``channels`` of a :meth:`reusable` group from every layer of it, in place.

        The listed group, cut down to these channels, is the group the engine would build again (other
        groups' prunes cannot move its entries), so no group is built.
        """
        self._fresh = False
        chosen, same = set(channels), list(channels)
        for dep, idxs, roots in self._listed[root]:
            if idxs is None:  # every channel at its own index
                dep(same)
                continue
            keep = [idxs[k] for k, r in enumerate(roots) if r in chosen]
            if keep:
                dep(keep)

    def prune(self, root: nn.Module, channels: list[int]) -> list[Item]:
        """Remove ``channels`` of ``root``'s group from every layer of it, in place; return its items.

        Index mappings are refreshed before the group is built, for the nodes earlier prunes touched
        (all of them on the first call): one refresh per pruned group, of what changed.
        """
        self._fresh = False
        with _refresh_only(self._dg, self._stale):
            group = self._group(root, channels)
        group.prune(record_history=False)
        # Listed after the prune: pruning a free parameter (an RMSNorm scale) replaces its object, and only
        # the new one is in the engine's name table, so the removal names every tensor it cut.
        items = self._items(group)
        self._stale = (self._stale or set()) | {i.node for i in items if i.node.type in _REFRESH}
        return items

    # -- internals -------------------------------------------------------------------------------------------
    def _group(self, root: nn.Module, channels: list[int]):
        pruner = self._dg.get_pruner_of_module(root)
        return self._dg.get_pruning_group(root, pruner.prune_out_channels, channels)

    def _items(self, group) -> list[Item]:
        return [self._item(e.dep, list(e.idxs), list(e.root_idxs)) for e in group]

    @staticmethod
    def _item(dep, idxs: list[int], root_idxs: list[int]) -> Item:
        target = dep.target
        kind = KIND[target.type]
        if kind in ("conv", "linear", "customized"):
            producing = dep.handler.__name__.startswith("prune_out")
        else:
            producing = kind in ("depthwise_conv", "embed", "parameter")
        return Item(
            node=target,
            module=target.module,
            kind=kind,
            producing=producing,
            idxs=idxs,
            root_idxs=root_idxs,
            pruning_dim=getattr(target, "pruning_dim", None),
        )

    def _channels(self, node) -> int | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _shape_infer.infer_out_channels_recursively(self._dg, node, [0])

    def _channel_mixing(self) -> dict[Any, str]:
        """Functional reductions across the channels (RMSNorm's mean, GRN, softmax over channels).

        Removing a channel changes what they compute even when it is zero, as a LayerNorm's statistics
        do: groups through them are not exact.
        """
        found = {}
        for node in self.nodes:
            fn = node.grad_fn
            name = type(fn).__name__
            if KIND[node.type] != "elementwise":
                continue
            if name.startswith(_FUNCTIONAL_NORMS):  # F.layer_norm, F.group_norm, F.rms_norm
                found[node] = f"a functional {name.removesuffix('Backward0')}"
                continue
            if not name.startswith(_MIXING):
                continue
            sizes = _input_sizes(fn)
            dims = getattr(fn, "_saved_dim", None)
            if sizes is None or dims is None:
                continue
            dims = [d % len(sizes) if d < _MAX_VALID_DIM else len(sizes) - 1 for d in _as_tuple(dims)]
            where = _channel_dim(node.inputs[0]) if node.inputs else None
            channels = self._channels(node.inputs[0]) if node.inputs else None
            if where is not None:
                mixes = where in dims
            else:  # the layout is not known: any reduced dimension as long as the channels may mix
                mixes = channels is not None and any(sizes[d] == channels for d in dims)
            if mixes:
                found[node] = (
                    f"{name.removesuffix('Backward0').removesuffix('Backward1')} across the channels"
                )
        return found

    def _mark_barriers(self) -> None:
        """Decide, from the recorded shapes, which shape operations keep channels and which do not."""
        ordered = sorted(self.nodes, key=lambda n: _ORDER.get(KIND[n.type], 9))
        internal = self._linear_internals()
        for node in ordered:
            kind = KIND[node.type]
            if node in internal:
                node.type = _OPS.ELEMENTWISE  # part of a linear layer's own computation
                continue
            if kind == "elementwise" and type(node.grad_fn).__name__.startswith(_FUNCTIONAL_LAYERS):
                # F.conv2d(x, buffer, groups=C) and the like: weights and groups fixed in the code
                self.barriers[node] = f"a functional {type(node.grad_fn).__name__.removesuffix('Backward0')}"
                node.dependencies = []
                continue
            if kind not in _ORDER:
                continue
            reason = self._judge(node, kind)
            if reason == "engine":
                continue  # a channel concatenation or a flatten (N, C, ...) -> (N, C·...)
            node.type = _OPS.ELEMENTWISE  # channel-wise from now on: indices pass unchanged
            if reason:
                self.barriers[node] = reason
                node.dependencies = []  # the engine's propagation stops here

    def _linear_internals(self) -> set:
        """The reshape back to (..., out) inside ``nn.Linear`` on a non-contiguous input.

        ``F.linear`` then runs as reshape → ``mm`` → reshape, and the engine sees the second reshape
        between the ``mm`` and the layer's output: it belongs to the layer, not to the channels' path.
        """
        found = set()
        for node in self.nodes:
            if KIND[node.type] != "linear" or not node.inputs:
                continue
            up = node.inputs[0]
            if type(up.grad_fn).__name__.startswith(("UnsafeView", "View")) and any(
                type(i.grad_fn).__name__.startswith("Mm") for i in up.inputs
            ):
                found.add(up)
        return found

    def _judge(self, node, kind: str) -> str:
        """How an operation treats the channels.

        '' when it keeps every channel where it was, 'engine' when the engine's own mapping is right
        (channel concatenations, flattens), otherwise why the channels cannot be followed.
        """
        fn = node.grad_fn
        name = type(fn).__name__.removesuffix("Backward0").removesuffix("Backward1")
        sizes = _input_sizes(fn)
        outs = [tuple(m.shape) for m in getattr(fn, "_input_metadata", ())]
        dim = getattr(fn, "_saved_dim", None)
        if isinstance(dim, int) and dim >= _MAX_VALID_DIM:
            dim -= 1 << 64  # PyTorch saves dim=-1 as 2**64 - 1
        inputs = [i for i in node.inputs]
        channels = self._channels(inputs[0]) if inputs else None
        if kind == "concat":
            if dim is None or not outs:
                return f"a concatenation ({name}) whose dimension is not recorded"
            parts = [self._channels(i) for i in inputs]
            if None not in parts and sum(parts) == outs[0][dim]:
                return "engine"  # along the channels: the engine's offsets are right
            return (
                f"a concatenation along dimension {dim} (output {list(outs[0])}) whose parts are not channels"
            )
        if sizes is None or not outs or channels is None:
            return f"a {name} whose channels cannot be followed"
        if kind in ("split", "unbind", "slice"):
            where = _channel_dim(inputs[0])
            along = dim % len(sizes) == where if where is not None and dim is not None else None
            if along or (along is None and dim is not None and sizes[dim] == channels):
                return (
                    f"{name} along the channels (sizes fixed in the model's code) of a {list(sizes)} tensor"
                )
            return ""
        sizes, out = tuple(sizes), outs[0]
        where = _channel_dim(inputs[0])
        if where is None:  # layout unknown: only where exactly one dimension can hold the channels
            candidates = [d for d, n in enumerate(sizes) if n == channels and (d > 0 or len(sizes) == 1)]
            if len(candidates) != 1:
                return f"a {name} from {list(sizes)} to {list(out)} whose channel dimension is ambiguous"
            where = candidates[0]
        if sizes[where] != channels:
            return f"a {name} of a {list(sizes)} tensor whose channels cannot be located"
        flatten = len(out) == 2 and (out[0], out[1]) == (sizes[0], math.prod(sizes[1:]))
        if kind == "reshape" and where == 1 and len(sizes) > 2 and flatten and math.prod(sizes[2:]) > 1:
            return "engine"  # a flatten of 1×1 maps (after global pooling) keeps every channel where it is
        if [d for d in sizes if d != 1] == [d for d in out if d != 1] or _follow(
            sizes, out, where
        ) is not None:
            return ""
        return f"a {name} from {list(sizes)} to {list(out)} that splits or merges the channel dimension"


_MIXING = ("Mean", "Var", "Std", "Norm", "LinalgVectorNorm", "Softmax", "LogSoftmax", "Amax", "Max", "Min")
_FUNCTIONAL_NORMS = ("NativeLayerNorm", "NativeGroupNorm", "RmsNorm", "FusedRmsNorm")
_FUNCTIONAL_LAYERS = ("Convolution", "ConvolutionBackwardOverrideable", "Mkldnn", "ThnnConv", "SlowConv")
_ORDER = {"split": 0, "unbind": 0, "slice": 0, "concat": 1, "reshape": 2, "expand": 2}


_CHANNELS_FIRST = {"conv", "depthwise_conv", "bn", "gn", "in", "prelu"}
_CHANNELS_LAST = {"linear", "ln", "embed", "customized"}


def _output_shape(node) -> tuple[int, ...] | None:
    meta = getattr(node.grad_fn, "_input_metadata", ())
    return tuple(meta[0].shape) if len(meta) == 1 else None


def _channel_dim(node) -> int | None:
    """Where the channels are in ``node``'s output, or None if that cannot be told.

    Walks up to the producing layer (channels at dim 1 behind convolutions and batch norms, last behind
    linear layers and layer norms), then replays the operations on the way down: permutes and
    transposes move the channel dimension, reshapes that keep it (and everything on one side of it)
    shift it, element-wise operations keep it; anything else loses it.
    """
    chain = []
    while node is not None and KIND[node.type] not in _CHANNELS_FIRST | _CHANNELS_LAST:
        chain.append(node)
        node = node.inputs[0] if node.inputs else None
    shape = _output_shape(node) if node is not None else None
    if shape is None:
        return None
    dim = 1 if KIND[node.type] in _CHANNELS_FIRST else len(shape) - 1
    for step in reversed(chain):
        fn, out = step.grad_fn, _output_shape(step)
        name = type(fn).__name__
        if out is None:
            return None
        if name.startswith("Permute"):
            dim = [d % len(out) for d in fn._saved_dims].index(dim)
        elif name.startswith("Transpose"):
            a, b = (d % len(out) for d in (fn._saved_dim0, fn._saved_dim1))
            dim = b if dim == a else a if dim == b else dim
        elif len(out) != len(shape) or name.startswith(("View", "UnsafeView", "Reshape", "Expand")):
            dim = _follow(shape, out, dim)
            if dim is None:
                return None
        shape = out
    return dim


def _follow(before: tuple[int, ...], after: tuple[int, ...], dim: int) -> int | None:
    """Where dimension ``dim`` goes through a reshape that keeps it and one side of it, else None."""
    if before[: dim + 1] == after[: dim + 1]:
        return dim
    tail = len(before) - dim
    if len(after) >= tail and before[dim:] == after[len(after) - tail :]:
        return len(after) - tail
    return None


def _input_sizes(fn) -> tuple[int, ...] | None:
    """The input shape an autograd node saved: its sizes, or the input itself (var, std, norm)."""
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if sizes is None and isinstance(getattr(fn, "_saved_self", None), torch.Tensor):
        sizes = tuple(fn._saved_self.shape)
    return sizes


def _as_tuple(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


#: Nodes whose index mapping depends on other groups' channel counts (offsets into concatenations and
#: splits), and free parameters (replaced by the engine's own group pruning). The reshapes left as the
#: engine's are flattens, whose stride (the spatial size) no prune changes.
_PROPAGATED = {_OPS.CONCAT, _OPS.SPLIT, _OPS.UNBIND, _OPS.EXPAND, _OPS.SLICE, _OPS.PARAMETER}
#: Nodes that keep every channel at its own index (anything else may map it elsewhere).
_IDENTITY = {
    _OPS.CONV,
    _OPS.BN,
    _OPS.LINEAR,
    _OPS.PRELU,
    _OPS.DEPTHWISE_CONV,
    _OPS.ELEMENTWISE,
    _OPS.LN,
    _OPS.GN,
    _OPS.IN,
    _OPS.OUTPUT,
    _OPS.CUSTOMIZED,  # only our Conv1D pruner: channel i maps to entry i
}
_REFRESH = {
    _OPS.CONCAT: _index_mapping.update_concat_index_mapping,
    _OPS.SPLIT: _index_mapping.update_split_index_mapping,
    _OPS.RESHAPE: _index_mapping.update_reshape_index_mapping,
    _OPS.UNBIND: _index_mapping.update_unbind_index_mapping,
    _OPS.EXPAND: _index_mapping.update_expand_index_mapping,
    _OPS.SLICE: _index_mapping.update_slice_index_mapping,
}


class _FlattenMapping(_index_mapping._FlattenIndexMapping):
    """The engine's flatten index mapping, with the same output built without per-index Python calls.

    A flatten before a large linear layer maps each channel to ``stride`` features (VGG: 49), and the
    engine's version spends most of a group listing creating those index records one by one.
    """

    def __call__(self, idxs):
        new, kind, stride = tuple.__new__, _HybridIndex, self._stride
        if self.reverse:
            return list({new(kind, (i.idx // stride, i.root_idx)) for i in idxs})
        return [new(kind, (k, i.root_idx)) for i in idxs for k in range(i.idx * stride, (i.idx + 1) * stride)]


def _flattening_nodes(dg) -> list:
    """The nodes the engine puts flatten mappings around: linear layers and reshapes."""
    return [n for n in dg.module2node.values() if n.type in (_OPS.LINEAR, _OPS.RESHAPE)]


def _fast_flattens(dg, nodes) -> None:
    """Swap the flatten mappings around ``nodes`` (and neighbours) for :class:`_FlattenMapping`."""
    for node in nodes:
        for n in (node, *node.inputs, *node.outputs):
            for dep in n.dependencies:
                for k, mapping in enumerate(dep.index_mapping):
                    if type(mapping) is _index_mapping._FlattenIndexMapping:
                        dep.index_mapping[k] = _FlattenMapping(mapping._stride, mapping.reverse)


@contextlib.contextmanager
def _refresh_only(dg, stale: set | None) -> Iterator[None]:
    """Refresh the index mappings of ``stale`` nodes (all if None), then keep them while groups are built."""
    refresh = _index_mapping.update_index_mapping
    if stale is None:
        refresh(dg)
        stale = _flattening_nodes(dg)
    else:
        for node in stale:
            _REFRESH[node.type](dg, node)
    _fast_flattens(dg, stale)
    _index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        _index_mapping.update_index_mapping = refresh


@contextlib.contextmanager
def _deadline(seconds: float | None, model: nn.Module, what: str) -> Iterator[None]:
    """Run the engine under a time budget; its exceptions become PruningErrors naming the model."""
    use_alarm = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    previous, outer = None, (0.0, 0.0)
    start = time.monotonic()
    running = True
    if use_alarm:

        def expire(signum, frame):
            if running:  # not once the body has returned
                raise BudgetExceeded

        previous = signal.signal(signal.SIGALRM, expire)
        outer = signal.setitimer(signal.ITIMER_REAL, seconds)  # a caller's timer, put back afterwards
    try:
        with torch.enable_grad():
            yield
    except BudgetExceeded:
        raise PruningError(
            f"{what.capitalize()} of {type(model).__name__} took longer than the time budget of "
            f"{seconds:g} s; refusing rather than running on. The engine cannot resolve this graph in "
            "reasonable time (typically long chains of reshapes); raise `time_budget` to wait longer."
        ) from None
    except PruningError:
        raise
    except Exception as err:
        raise PruningError(
            f"{what.capitalize()} of {type(model).__name__} failed in the channel engine after "
            f"{time.monotonic() - start:.1f} s: {type(err).__name__}: {err}"
        ) from err
    finally:
        running = False
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer[0] > 0:  # what was left of it, at least a moment so that it still fires
                signal.setitimer(
                    signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - start), 1e-3), outer[1]
                )


class _Conv1DPruner(tp.pruner.function.BasePruningFunc):
    """Surgery for transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs):
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs):
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]
