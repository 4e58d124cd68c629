"""Attention heads as channel groups: found by module layout, removed by our own surgery.

The engine cannot follow the reshape that splits a projection's output into heads (it refuses those
groups, see ``_engine``). A whole head, though, can be removed exactly: its rows of the query, key and
value projections and its columns of the output projection, with the module's head count updated. This
module recognises the common attention layouts by their attributes (no import of timm or transformers):

- timm ``Attention`` (fused ``qkv``, ``proj``, ``num_heads``, ``head_dim``, ``attn_dim``);
- Hugging Face BERT/RoBERTa/ViT-style ``…Attention`` (``self.query/key/value`` or
  ``attention.query/key/value``, ``output.dense``,
  ``num_attention_heads``, ``attention_head_size``, ``all_head_size``);
- Hugging Face GPT-2 attention (``c_attn``/``c_proj`` ``Conv1D``, ``num_heads``, ``head_dim``,
  ``split_size``);
- Hugging Face LLaMA-style attention (``q_proj/k_proj/v_proj/o_proj``, ``head_dim``, optionally
  ``num_key_value_groups``: LLaMA, Mistral, Qwen2, ViT in transformers 5), where a unit is one
  key/value head with the query heads that share it, so grouped-query attention stays consistent.

A group's channel is one unit (head or key/value group); ``ties`` is the head dimension, so
node counts see a head as the nodes it removes from each projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.structure.layers import Shapes, is_conv1d, layer_spec, resize_handler, unresized_tensors
from lightning_prune.structure.types import ChannelGroup, ParamSlice, Removal


@dataclass(frozen=True)
class HeadLayout:
    """Where the units (heads, or key/value groups) of one attention module sit.

    Attributes:
        module: Qualified name of the attention module.
        units: Number of units.
        head_dim: Size of one head.
        producers: Projection name → (blocks, rows per unit): a fused ``qkv`` has 3 blocks.
        consumer: The output projection, whose input columns are per unit.
        columns: Input columns of ``consumer`` per unit.
        count_attrs: Attributes of the attention module (dotted, relative to it) holding
            ``units × factor``: they are set to ``kept × factor``.
        shared: Submodules (relative to the attention module) whose tensors do not depend on the heads:
            norms over one head's dimension, the norm after the output projection. A tensor anywhere
            else in the module refuses the group (relative-position tables, per-head norms, gates).
    """

    module: str
    units: int
    head_dim: int
    producers: dict[str, tuple[int, int]]
    consumer: str
    columns: int
    count_attrs: dict[str, int]
    shared: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The group's name: ``<attention module>.heads``."""
        return f"{self.module}.heads" if self.module else "heads"


def _at(name: str) -> str:
    """``name.`` for a submodule path, nothing for the model itself."""
    return f"{name}." if name else ""


def _linear(module: nn.Module, attr: str) -> nn.Linear | None:
    found = module
    for part in attr.split("."):
        found = getattr(found, part, None)
    return found if type(found) is nn.Linear else None


def _timm(name: str, m: nn.Module) -> HeadLayout | None:
    qkv, proj = _linear(m, "qkv"), _linear(m, "proj")
    heads, dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not (qkv and proj and isinstance(heads, int) and isinstance(dim, int)):
        return None
    if getattr(m, "gate", None) is not None or not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return None
    if qkv.out_features != 3 * heads * dim or proj.in_features != heads * dim:
        return None
    counts = {"num_heads": 1} | ({"attn_dim": dim} if getattr(m, "attn_dim", None) == heads * dim else {})
    producers = {f"{_at(name)}qkv": (3, dim)}
    return HeadLayout(name, heads, dim, producers, f"{_at(name)}proj", dim, counts, ("q_norm", "k_norm"))


def _bert(name: str, m: nn.Module) -> HeadLayout | None:
    part = next((p for p in ("self", "attention") if hasattr(getattr(m, p, None), "query")), None)
    if part is None:
        return None
    inner = getattr(m, part)
    q, k, v = (_linear(m, f"{part}.{p}") for p in ("query", "key", "value"))
    out = _linear(m, "output.dense")
    heads, dim = getattr(inner, "num_attention_heads", None), getattr(inner, "attention_head_size", None)
    if not (q and k and v and out and isinstance(heads, int) and isinstance(dim, int)):
        return None
    if {q.out_features, k.out_features, v.out_features, out.in_features} != {heads * dim}:
        return None
    producers = {f"{_at(name)}{part}.{p}": (1, dim) for p in ("query", "key", "value")}
    counts = {f"{part}.num_attention_heads": 1, f"{part}.all_head_size": dim}
    return HeadLayout(
        name, heads, dim, producers, f"{_at(name)}output.dense", dim, counts, ("output.LayerNorm",)
    )


def _llama(name: str, m: nn.Module) -> HeadLayout | None:
    q, k, v, o = (_linear(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    dim = getattr(m, "head_dim", None)
    if not (q and k and v and o and isinstance(dim, int)):
        return None
    groups = getattr(m, "num_key_value_groups", 1 if q.out_features == k.out_features else None)
    if not isinstance(groups, int):
        return None
    units = k.out_features // dim
    if (
        v.out_features != units * dim
        or q.out_features != units * groups * dim
        or o.in_features != q.out_features
    ):
        return None
    producers = {
        f"{_at(name)}q_proj": (1, groups * dim),
        f"{_at(name)}k_proj": (1, dim),
        f"{_at(name)}v_proj": (1, dim),
    }
    known = (("num_heads", groups), ("num_attention_heads", groups), ("num_key_value_heads", 1))
    counts = {a: f for a, f in known if isinstance(getattr(m, a, None), int)}
    return HeadLayout(
        name, units, dim, producers, f"{_at(name)}o_proj", groups * dim, counts, ("q_norm", "k_norm")
    )


def _gpt2(name: str, m: nn.Module) -> HeadLayout | None:
    qkv, proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    heads, dim, split = (getattr(m, a, None) for a in ("num_heads", "head_dim", "split_size"))
    if not (qkv is not None and is_conv1d(qkv) and proj is not None and is_conv1d(proj)):
        return None
    if not all(isinstance(v, int) for v in (heads, dim, split)) or hasattr(m, "q_attn"):
        return None  # cross-attention (q_attn) keeps its own layout
    if split != heads * dim or qkv.nf != 3 * split or proj.weight.shape[0] != split:
        return None
    counts = {"num_heads": 1, "split_size": dim}
    return HeadLayout(name, heads, dim, {f"{_at(name)}c_attn": (3, dim)}, f"{_at(name)}c_proj", dim, counts)


#: Recognisers, tried in order on every module.
LAYOUTS: tuple[Callable[[str, nn.Module], HeadLayout | None], ...] = (_timm, _bert, _llama, _gpt2)
#: A child every recogniser needs one of (qkv, self/attention, q_proj, c_attn): modules without are skipped.
_PROJECTIONS = frozenset({"qkv", "self", "attention", "q_proj", "c_attn"})


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_heads(model: nn.Module) -> list[HeadLayout]:
    """Every attention module of ``model`` whose heads can be removed, with its layout."""
    found = []
    for name, module in model.named_modules():
        if _PROJECTIONS.isdisjoint(module._modules) or isinstance(module, _CONTAINERS):
            continue
        for layout in LAYOUTS:
            if (head := layout(name, module)) is not None:
                found.append(head)
                break
    return found


def head_group(model: nn.Module, layout: HeadLayout, frozen: set[str], reached: set[str]) -> ChannelGroup:
    """The channel group of ``layout``'s units.

    Refused when a projection is frozen, not reached by the example inputs, or carries tensors the
    surgery would not resize, or when there is a single unit.
    """
    slices, reasons = [], []
    units = torch.arange(layout.units)
    for layer, (blocks, rows) in layout.producers.items():
        width = layout.units * rows
        within = units.repeat_interleave(rows) * rows + torch.arange(rows).repeat(layout.units)
        positions = torch.cat([b * width + within for b in range(blocks)])
        channels = units.repeat_interleave(rows).repeat(blocks)
        for attr, dim, role in layer_spec(model.get_submodule(layer), True) or []:
            slices.append(ParamSlice(f"{layer}.{attr}", dim, positions, channels, role))
    cols = torch.arange(layout.units * layout.columns)
    for attr, dim, role in layer_spec(model.get_submodule(layout.consumer), False) or []:
        slices.append(ParamSlice(f"{layout.consumer}.{attr}", dim, cols, cols // layout.columns, role))
    layers = [*layout.producers, layout.consumer]
    if layout.name in frozen:
        reasons.append(f"{layout.name} is frozen (excluded, or refused earlier)")
    if state := per_head_state(model, layout):
        reasons.append(f"{layout.module} holds tensors the head surgery would not resize: {state}")
    for layer in layers:
        if layer in frozen and layer in layout.producers:
            reasons.append(f"{layer} is frozen (it produces a model output or was excluded)")
        if layer not in reached:
            reasons.append(f"{layer} is not reached by the example inputs")
        if extra := unresized_tensors(model.get_submodule(layer)):
            reasons.append(f"{layer} has tensors that would not be resized: {extra}")
    if layout.units < 2:
        reasons.append("it has a single head")
    return ChannelGroup(
        name=layout.name,
        size=layout.units,
        layers=tuple(layers),
        producers=tuple(layout.producers),
        slices=tuple(slices),
        prunable=not reasons,
        reason="; ".join(reasons),
        exact=True,
        ties=layout.head_dim,
    )


def per_head_state(model: nn.Module, layout: HeadLayout) -> list[str]:
    """Tensors of the attention module that could depend on the heads: head removal is then unsafe.

    Anything outside the projections and ``layout.shared`` counts (relative-position tables, per-head
    norms, gates); a shared norm over one head's dimension (``q_norm``/``k_norm``) must hold ``head_dim``
    entries.
    """
    attention = model.get_submodule(layout.module)
    prefix = _at(layout.module)
    own = {layer.removeprefix(prefix) for layer in [*layout.producers, layout.consumer]}
    found = []
    for name, tensor in [*attention.named_parameters(), *attention.named_buffers()]:
        owner = name.rpartition(".")[0]
        if owner in own:
            continue
        if owner in layout.shared and (not owner.endswith("_norm") or tensor.numel() == layout.head_dim):
            continue
        found.append(name)
    return found


def remove_units(
    model: nn.Module, layout: HeadLayout, group: ChannelGroup, units: Sequence[int]
) -> list[Removal]:
    """Remove ``units`` from every projection of ``layout`` and update the module's counts, in place."""
    gone = torch.as_tensor(sorted(units), dtype=torch.long)
    done = []
    for s in group.slices:
        owner_name, attr = s.param.rpartition(".")[::2]
        owner = model.get_submodule(owner_name)
        tensor = getattr(owner, attr)
        if tensor is None:
            continue
        index = s.positions[torch.isin(s.channels, gone)]
        removal = Removal(s.param, s.dim, index)
        setattr(owner, attr, nn.Parameter(removal.apply(tensor.detach()), requires_grad=tensor.requires_grad))
        done.append(removal)
    for layer in [*layout.producers, layout.consumer]:  # out_features, in_features, nf, ... from the shapes
        module = model.get_submodule(layer)
        current = {n: tuple(t.shape) for n, t in module.named_parameters(recurse=False)}
        attrs, _ = resize_handler(module)(module, Shapes({}, current))
        for attr, value in attrs.items():
            setattr(module, attr, value)
    kept = layout.units - len(gone)
    attention = model.get_submodule(layout.module)
    for path, factor in layout.count_attrs.items():
        owner_path, attr = path.rpartition(".")[::2]
        setattr(attention.get_submodule(owner_path) if owner_path else attention, attr, kept * factor)
    return done


def sync_head_counts(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """Set every recognised attention module's head counts from its projections' sizes, in place.

    For a model whose projections were resized from a shrunk checkpoint (the tensors carry the head
    count, the attributes do not). Returns ``(module, attribute, old value)`` for each change, to undo.
    """
    changed = []
    for m in model.modules():
        for attrs in _COUNTS:
            counts = attrs(m)
            if counts is None:
                continue
            for owner, attr, value in counts:
                if getattr(owner, attr) != value:
                    changed.append((owner, attr, getattr(owner, attr)))
                    setattr(owner, attr, value)
            break
    return changed


def _timm_counts(m: nn.Module):
    qkv, proj, dim = _linear(m, "qkv"), _linear(m, "proj"), getattr(m, "head_dim", None)
    if not (qkv and proj and isinstance(dim, int) and isinstance(getattr(m, "num_heads", None), int)):
        return None
    out = [(m, "num_heads", proj.in_features // dim)]
    return out + (
        [(m, "attn_dim", proj.in_features)] if isinstance(getattr(m, "attn_dim", None), int) else []
    )


def _bert_counts(m: nn.Module):
    part = next((p for p in ("self", "attention") if hasattr(getattr(m, p, None), "query")), None)
    inner = getattr(m, part) if part else None
    q, dim = _linear(m, f"{part}.query") if part else None, getattr(inner, "attention_head_size", None)
    if not (q and isinstance(dim, int) and isinstance(getattr(inner, "num_attention_heads", None), int)):
        return None
    return [(inner, "num_attention_heads", q.out_features // dim), (inner, "all_head_size", q.out_features)]


def _llama_counts(m: nn.Module):
    q, k, dim = _linear(m, "q_proj"), _linear(m, "k_proj"), getattr(m, "head_dim", None)
    if not (q and k and _linear(m, "o_proj") and isinstance(dim, int)):
        return None
    values = {"num_heads": q.out_features // dim, "num_attention_heads": q.out_features // dim}
    values["num_key_value_heads"] = k.out_features // dim
    return [(m, a, v) for a, v in values.items() if isinstance(getattr(m, a, None), int)]


def _gpt2_counts(m: nn.Module):
    qkv, dim = getattr(m, "c_attn", None), getattr(m, "head_dim", None)
    if not (qkv is not None and is_conv1d(qkv) and isinstance(dim, int)) or hasattr(m, "q_attn"):
        return None
    if not isinstance(getattr(m, "split_size", None), int):
        return None
    return [(m, "num_heads", qkv.nf // 3 // dim), (m, "split_size", qkv.nf // 3)]


_COUNTS = (_timm_counts, _bert_counts, _llama_counts, _gpt2_counts)
