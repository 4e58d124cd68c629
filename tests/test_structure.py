import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_prune import ChannelGraph, PruningError, model_stats, shrink
from lightning_prune.structure import select_layers
from tests.helpers.nets import TinyCNN, TinyResNet, eval_outputs

X = torch.randn(2, 3, 8, 8)


def zero_channels(model, names_and_idx):
    with torch.no_grad():
        for name, idx in names_and_idx:
            module = model.get_submodule(name)
            for p in (module.weight, module.bias):
                if p is not None:
                    p[idx] = 0


def test_groups_of_a_plain_cnn():
    graph = ChannelGraph(TinyCNN(), X)
    groups = {g.name: g for g in graph.groups}
    assert set(groups) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    g = groups["features.0"]
    assert g.size == 8 and g.prunable and g.exact and g.ties == 1
    assert g.layers == ("features.0", "features.1", "features.3")
    assert g.producers == ("features.0",)
    roles = {(s.param, s.role) for s in g.slices}
    assert ("features.0.weight", "out") in roles
    assert ("features.1.weight", "norm") in roles
    assert ("features.1.running_mean", "stat") in roles
    assert ("features.3.weight", "in") in roles


def test_output_layer_is_frozen_and_exclusions_too():
    graph = ChannelGraph(TinyCNN(), X, frozen=["features.3"])
    groups = {g.name: g for g in graph.groups}
    assert not groups["classifier.3"].prunable
    assert "model output" in groups["classifier.3"].reason
    assert not groups["features.3"].prunable
    assert groups["features.0"].prunable


def test_flatten_linear_slices_expand_by_spatial_size():
    graph = ChannelGraph(TinyCNN(), X)
    group = graph.group("features.3")
    lin = [s for s in group.slices if s.param == "classifier.1.weight"]
    assert len(lin) == 1 and len(lin[0].positions) == 16 * 16
    # channel c owns the 16 consecutive flattened features c*16 .. c*16+15
    assert lin[0].channels[:16].tolist() == [0] * 16
    assert lin[0].channels[16:32].tolist() == [1] * 16


def test_residual_channels_form_one_group():
    graph = ChannelGraph(TinyResNet(), X)
    group = graph.group("stem.0")
    assert set(group.producers) == {"stem.0", "blocks.0.3", "blocks.1.3"}
    assert graph.group("blocks.1.3").name == group.name  # looked up by any producer


def test_prune_removes_channels_everywhere_and_returns_replayable_removals():
    model = TinyCNN()
    graph = ChannelGraph(model, X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removals = graph.prune({"features.0": [1, 5], "features.3": [0]})
    assert model.features[0].out_channels == 6
    assert model.features[1].num_features == 6
    assert model.features[3].in_channels == 6 and model.features[3].out_channels == 15
    assert model.classifier[1].in_features == 15 * 16
    # replaying the removals on the old tensors gives exactly the new ones
    after = model.state_dict()
    for name, old in before.items():
        new = old
        for r in removals:
            if r.param == name:
                new = r.apply(new)
        assert torch.equal(new, after[name]), name
    assert model(X).shape == (2, 4)
    # the graph stays usable after surgery
    assert graph.group("features.0").size == 6


@pytest.mark.parametrize(
    ("removal", "match"),
    [
        ({"nope": [0]}, "No channel group is rooted at 'nope'"),
        ({"features.0": [8]}, r"must be in \[0, 8\)"),
        ({"features.0": [1, 1]}, "repeat"),
        ({"features.0": list(range(8))}, "would empty features.0.weight"),
        ({"classifier.3": [0]}, "cannot be pruned"),
    ],
)
def test_prune_rejects_bad_requests_without_touching_the_model(removal, match):
    model = TinyCNN()
    graph = ChannelGraph(model, X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=match):
        graph.prune({"features.3": [0], **removal})
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tracing_leaves_buffers_and_modes_alone():
    model = TinyCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ChannelGraph(model, X)
    assert model.training and model.features[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shrink_removes_dead_channels_and_keeps_the_function():
    model = TinyCNN()
    model.features[1].running_mean.uniform_(-1, 1)
    zero_channels(model, [("features.0", [0, 3]), ("features.1", [0, 3])])
    zero_channels(model, [("features.3", [2]), ("features.4", [2])])
    zero_channels(model, [("classifier.1", [7])])
    ref = eval_outputs(model, X)
    report = shrink(model, X, verify=False)
    assert report.removed == {"features.0": 2, "features.3": 1, "classifier.1": 1}
    assert report.before.params > report.after.params
    assert report.before.macs > report.after.macs
    torch.testing.assert_close(eval_outputs(model, X), ref, rtol=1e-4, atol=1e-5)
    assert "removed 4 channels in 3 groups" in str(report)


def test_a_conv_channel_with_a_live_norm_is_not_dead():
    model = TinyCNN()
    zero_channels(model, [("features.0", [0])])  # BN still adds beta - gamma*mean/std
    report = shrink(model, X)
    assert report.removed == {}
    assert model.features[0].out_channels == 8


def test_dead_channels_found_by_weight_rows_alone_also_when_read_in_chunks(monkeypatch):
    # Biases and norm affines zero in a channel, weights not: only the weight rows tell it is alive.
    # The rows are read in chunks (a tiny chunk size forces several), in either dimension layout.
    graph_module = importlib.import_module("lightning_prune.structure.graph")
    monkeypatch.setattr(graph_module, "_CHUNK", 64)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        model[0].bias[[1, 4, 5, 8, 9]] = 0  # fewer than half the rows left in question: copied out
        model[0].weight[[1, 4, 5, 8, 9]] = 0
        model[0].weight[9, 2] = 1e-30  # one tiny non-zero entry keeps a channel
    assert ChannelGraph(model, torch.randn(2, 6)).dead_channels() == {"0": [1, 4, 5, 8]}


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dim_seed=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([8, 64, 4 << 20]),
)
def test_nonzero_at_tells_every_row_with_a_non_zero_entry(shape, dim_seed, dtype, transposed, seed, chunk):
    # Every path (NumPy: vectors, rows read in place or copied out in chunks, any dim and layout; torch
    # for dtypes NumPy lacks: the same, chunks through one buffer) against the plain definition.
    graph_module = importlib.import_module("lightning_prune.structure.graph")
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)  # mostly zero rows
    if t.dim() > 1:
        t[0].view(-1)[0] = 2.0  # a row alive by its first entry alone
    if seed % 3 == 0 and dtype.is_floating_point:
        t.view(-1)[seed % t.numel()] = float("nan")  # NaN counts as non-zero
    if transposed and t.dim() > 1:
        t = t.transpose(0, -1)
    t = t.to(dtype)
    dim = dim_seed % t.dim() - (t.dim() if seed % 2 else 0)  # negative dims too (LayerNorm's -1)
    positions = torch.randperm(t.shape[dim], generator=g)[: 1 + seed % t.shape[dim]].numpy()
    expected = (t.movedim(dim, 0).reshape(t.shape[dim], -1) != 0).any(1)[positions].numpy()
    old = graph_module._CHUNK
    graph_module._CHUNK = chunk
    try:
        found = graph_module._nonzero_at(t, dim, positions)
    finally:
        graph_module._CHUNK = old
    assert found.dtype == bool and found.tolist() == expected.tolist()


def test_residual_channel_dead_in_one_branch_only_stays():
    model = TinyResNet()
    zero_channels(model, [("stem.0", [1]), ("stem.1", [1]), ("blocks.0.3", [1]), ("blocks.0.4", [1])])
    assert shrink(model, X).removed == {}
    zero_channels(model, [("blocks.1.3", [1]), ("blocks.1.4", [1])])
    ref = eval_outputs(model, X)
    report = shrink(model, X, verify=False)
    assert report.removed == {"stem.0": 1}
    assert model.stem[0].out_channels == 7 and model.blocks[1][3].out_channels == 7
    torch.testing.assert_close(eval_outputs(model, X), ref, rtol=1e-4, atol=1e-5)


def test_a_wholly_dead_layer_keeps_one_channel_and_says_so():
    model = TinyCNN()
    zero_channels(model, [("features.3", slice(None)), ("features.4", slice(None))])
    report = shrink(model, X)
    assert model.features[3].out_channels == 1
    assert report.kept_dead == {"features.3": 1}
    assert report.removed == {"features.3": 15}
    assert "kept 1 dead channel(s) in features.3" in str(report)


def test_layernorm_groups_are_left_with_a_reason():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    zero_channels(model, [("0", [1]), ("1", [1]), ("2", [3])])
    report = shrink(model, torch.randn(3, 4))
    assert "0" in report.skipped and "LayerNorm" in report.skipped["0"]
    assert report.removed == {"2": 1}
    assert model[0].out_features == 8 and model[2].out_features == 7


def test_grouped_conv_channels_are_removed_symmetrically():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 3),
    )
    graph = ChannelGraph(model, X)
    group = graph.group("0")
    assert group.ties == 2 and group.size == 4
    zero_channels(model, [("0", [1]), ("1", [1])])  # only one of the two tied copies: stays
    assert shrink(model, X).removed == {}
    zero_channels(model, [("0", [5]), ("1", [5])])
    ref = eval_outputs(model, X)
    report = shrink(model, X, verify=False)
    assert report.removed == {"0": 2}
    assert model[3].in_channels == 6 and model[3].groups == 2
    torch.testing.assert_close(eval_outputs(model, X), ref, rtol=1e-4, atol=1e-5)


def test_bad_input_is_reported_before_any_change():
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"must be a torch\.nn\.Module"):
        shrink("resnet", X)
    with pytest.raises(PruningError, match=r"tensor of shape \(2, 5, 8, 8\)"):
        shrink(model, torch.randn(2, 5, 8, 8))
    with pytest.raises(PruningError, match="example_inputs"):
        shrink(model, 3)
    with pytest.raises(PruningError, match="nothing to prune"):
        shrink(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_select_layers_by_glob_patterns():
    model = TinyCNN()
    assert select_layers(model, None, None) == [
        "features.0",
        "features.3",
        "classifier.1",
        "classifier.3",
    ]
    assert select_layers(model, ["features.*"], ["features.3"]) == ["features.0"]
    with pytest.raises(PruningError, match=r"pattern 'head\*' matches no .*features\.0"):
        select_layers(model, ["head*"], None, owner="SNIPCallback")
    with pytest.raises(PruningError, match="must be a list of patterns"):
        select_layers(model, "features.*", None)


def test_channels_tied_to_the_model_input_are_frozen():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))
    zero_channels(model, [("0", [1]), ("1", [1])])
    graph = ChannelGraph(model, X)
    assert not graph.group("0").prunable
    assert "coupled to the model input" in graph.group("0").reason
    assert shrink(model, X).removed == {}


def test_shrink_needs_two_forward_passes_and_its_statistics_match_model_stats():
    model = TinyCNN()
    zero_channels(model, [("features.0", [0, 3]), ("features.1", [0, 3])])
    dense = model_stats(model, X)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    report = shrink(model, X)
    assert len(calls) == 2  # the trace (statistics before, reference outputs) and the check afterwards
    assert report.before == dense
    assert report.after == model_stats(model, X) and report.after.params < dense.params


def test_shrink_without_verify_or_stats_runs_no_forward_pass_after_the_surgery():
    model = TinyCNN()
    zero_channels(model, [("features.3", [2]), ("features.4", [2])])
    ref = eval_outputs(model, X)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    report = shrink(model, X, verify=False, stats=False)
    assert len(calls) == 1 and report.removed == {"features.3": 1} and report.before is None
    torch.testing.assert_close(eval_outputs(model, X), ref, rtol=1e-4, atol=1e-5)


def test_measured_graph_counts_what_model_stats_counts():
    model = TinyResNet()
    graph = ChannelGraph(model, X, measure=True)
    assert graph.traced_stats == model_stats(model, X)
    torch.testing.assert_close(graph.traced_outputs[0], eval_outputs(model, X))
    assert ChannelGraph(model, X).traced_stats is None


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), max_size=30),
    st.integers(1, 7),
    st.booleans(),
)
def test_our_flatten_mapping_gives_the_engine_s_index_records(pairs, stride, reverse):
    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    from lightning_prune.structure._engine import _FlattenMapping

    idxs = [_HybridIndex(idx=i, root_idx=r) for i, r in pairs]
    theirs = _FlattenIndexMapping(stride, reverse)(idxs)
    ours = _FlattenMapping(stride, reverse)(idxs)
    assert ours == theirs and all(type(i) is _HybridIndex for i in ours)


class FrozenTokens(nn.Module):
    """Token ids in, every parameter frozen: nothing in the forward pass records autograd on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)).mean(1))


def test_a_frozen_model_on_token_ids_is_traced_counted_and_stays_frozen():
    torch.manual_seed(0)
    model = FrozenTokens().eval()
    zero_channels(model, [("block.linear1", slice(0, 10))])
    model.requires_grad_(False)
    ids = torch.randint(0, 50, (2, 5))
    ref = eval_outputs(model, ids)
    dense = model_stats(model, ids)
    traced = ChannelGraph(model, ids, measure=True).traced_stats
    assert (traced.macs, traced.params) == (dense.macs, dense.params)  # fused attention counted too
    report = shrink(model, ids)
    assert report.removed == {"block.linear1": 10} and report.before.macs == dense.macs
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(eval_outputs(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_the_channel_dim_of_a_layer_norm_output_follows_its_layout():
    """nn.LayerNorm normalizes the last dim; timm's LayerNorm2d subclasses it and normalizes NCHW maps."""
    from lightning_prune.structure.layers import output_channels

    timm_layers = pytest.importorskip("timm.layers")
    size, dim = output_channels(timm_layers.LayerNorm2d(40))
    assert (size, dim(torch.zeros(2, 40, 16, 16))) == (40, 1)
    size, dim = output_channels(nn.LayerNorm(40))
    assert dim(torch.zeros(2, 16, 16, 40)) == 3 and dim(torch.zeros(2, 9, 40)) == 2
