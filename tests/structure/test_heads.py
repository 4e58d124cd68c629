"""Attention heads as channel groups: removed whole, head counts updated, outputs exact, reloadable."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune import ChannelGraph, SNIPCallback, load_pruned_state_dict, shrink
from lightning_prune.structure.graph import eval_outputs
from tests.callbacks.test_tied import CausalLM, hf_causal_lm
from tests.helpers.modules import trainer

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def kill_units(model: nn.Module, graph: ChannelGraph, name: str, units: list[int]) -> None:
    """Zero the query/key/value rows (and biases) of ``units`` of the head group ``name``."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for s in graph.group(name).slices:
            if s.role == "out":
                hit = s.positions[torch.isin(s.channels, torch.tensor(units))]
                tensors[s.param].index_fill_(s.dim, hit, 0)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


IDS = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def test_dead_heads_of_a_bert_like_model_are_removed_exactly():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = Logits(transformers.BertForMaskedLM(config)).eval()
    graph = ChannelGraph(model, IDS)
    name = "model.bert.encoder.layer.0.attention.heads"
    group = graph.group(name)
    assert (group.size, group.ties, group.prunable, group.exact) == (4, 8, True, True)
    kill_units(model, graph, name, [1, 3])
    ref = eval_outputs(model, IDS)
    report = shrink(model, IDS, verify=False)
    assert report.removed[name] == 2 * 8
    attention = model.model.bert.encoder.layer[0].attention
    assert attention.self.num_attention_heads == 2 and attention.self.all_head_size == 16
    assert attention.self.query.weight.shape == (16, 32) and attention.output.dense.weight.shape == (32, 16)
    torch.testing.assert_close(eval_outputs(model, IDS), ref, rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_loses_whole_key_value_groups():
    torch.manual_seed(0)
    model = Logits(hf_causal_lm("llama").eval())  # 4 query heads sharing 2 key/value heads
    graph = ChannelGraph(model, IDS)
    name = "model.model.layers.1.self_attn.heads"
    assert graph.group(name).size == 2  # units are key/value heads, each with its 2 query heads
    kill_units(model, graph, name, [0])
    ref = eval_outputs(model, IDS)
    graph.prune({name: [0]}, verify=IDS)
    attn = model.model.model.layers[1].self_attn
    assert attn.q_proj.out_features == 16 and attn.k_proj.out_features == 8 and attn.v_proj.out_features == 8
    assert attn.o_proj.in_features == 16 and attn.num_key_value_groups == 2
    torch.testing.assert_close(eval_outputs(model, IDS), ref, rtol=1e-4, atol=1e-5)


def test_timm_vit_heads_shrink_and_reload_into_a_fresh_model():
    torch.manual_seed(0)
    build = lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10).eval()  # noqa: E731
    model, x = build(), torch.randn(2, 3, 32, 32)
    graph = ChannelGraph(model, x)
    kill_units(model, graph, "blocks.0.attn.heads", [2])
    ref = eval_outputs(model, x)
    shrink(model, x)
    assert model.blocks[0].attn.num_heads == 2 and model.blocks[0].attn.attn_dim == 128
    torch.testing.assert_close(eval_outputs(model, x), ref, rtol=1e-4, atol=1e-5)
    fresh = build()
    load_pruned_state_dict(fresh, copy.deepcopy(model.state_dict()))
    assert fresh.blocks[0].attn.num_heads == 2 and fresh.blocks[0].attn.attn_dim == 128
    torch.testing.assert_close(eval_outputs(fresh, x), ref, rtol=1e-4, atol=1e-5)


class TiedCausalLM(CausalLM):
    """A tiny LLaMA with its LM head tied to the token embedding, callable on token ids."""

    def __init__(self) -> None:
        super().__init__("llama")
        self.example_input_array = IDS

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def test_structured_snip_prunes_heads_of_a_tied_lm_and_the_checkpoint_reloads(tmp_path):
    pl.seed_everything(0)
    module = TiedCausalLM()
    # Only the attention projections are selected: the head groups are what there is to prune.
    pruner = SNIPCallback(limit=0.5, structured=True, include=["model.model.layers.*.self_attn.*"])
    trainer(tmp_path, [pruner], max_steps=2).fit(module)
    hf = module.model
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    attention = [layer.self_attn for layer in hf.model.layers]
    kept = [a.k_proj.out_features // a.head_dim for a in attention]
    assert sum(kept) == 2 and min(kept) >= 1  # half of the 4 key/value heads (2 per layer) are gone
    for a, units in zip(attention, kept, strict=True):
        assert a.q_proj.out_features == units * 2 * a.head_dim == a.o_proj.in_features
    assert all(layer.mlp.gate_proj.out_features == 64 for layer in hf.model.layers)
    path = tmp_path / "lm.pt"
    torch.save({"state_dict": module.state_dict()}, path)
    state = torch.load(path, weights_only=True)["state_dict"]
    fresh = TiedCausalLM()
    load_pruned_state_dict(fresh, state)
    assert fresh.model.lm_head.weight is fresh.model.get_input_embeddings().weight
    module.eval()
    torch.testing.assert_close(eval_outputs(fresh, IDS), eval_outputs(module, IDS))


def test_gpt2_conv1d_heads_and_mlp_shrink_exactly_and_reload():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    build = lambda: Logits(transformers.GPT2LMHeadModel(config)).eval()  # noqa: E731
    model = build()
    graph = ChannelGraph(model, IDS)
    heads, mlp = "model.transformer.h.0.attn.heads", "model.transformer.h.1.mlp.c_fc"
    assert graph.group(heads).prunable and graph.group(mlp).prunable
    kill_units(model, graph, heads, [1, 2])
    tensors = dict(model.named_parameters())
    with torch.no_grad():  # Conv1D stores its weight (in, out): output channels are columns
        tensors[f"{mlp}.weight"][:, :40] = 0
        tensors[f"{mlp}.bias"][:40] = 0
    ref = eval_outputs(model, IDS)
    report = shrink(model, IDS)
    assert report.removed == {heads: 2 * 8, mlp: 40}
    attn = model.model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size) == (2, 16) and attn.c_attn.weight.shape == (32, 48)
    assert model.model.transformer.h[1].mlp.c_fc.nf == 88
    torch.testing.assert_close(eval_outputs(model, IDS), ref, rtol=1e-4, atol=1e-5)
    fresh = build()
    load_pruned_state_dict(fresh, copy.deepcopy(model.state_dict()))
    assert fresh.model.transformer.h[0].attn.num_heads == 2
    torch.testing.assert_close(eval_outputs(fresh, IDS), ref, rtol=1e-4, atol=1e-5)


def test_layers_the_engine_cannot_resize_are_named_when_nothing_is_prunable():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(nn.Linear(8, 8), Custom(), nn.Linear(8, 2))
    graph = ChannelGraph(model, torch.randn(2, 8))
    assert "layers of types the engine cannot resize: Custom ×1" in graph.refusals()
