from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_prune.stats as stats_module
from lightning_prune.errors import PruningError
from lightning_prune.stats import ModelStats, measure_latency, model_stats

# --------------------------------------------------------------------------------------------------
# MACs computed by hand


def test_conv_macs_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    stats = model_stats(conv, torch.randn(1, 3, 8, 8))
    assert stats.macs == 8 * 3 * 9 * 64
    assert stats.macs_by_op == {"convolution": 8 * 3 * 9 * 64}
    assert stats.params == 8 * 3 * 9 + 8


def test_linear_macs_by_hand():
    stats = model_stats(nn.Linear(10, 5), torch.randn(2, 10))
    assert stats.macs == 2 * 10 * 5 == 100
    assert stats.macs_by_op == {"addmm": 100}


def test_depthwise_conv_macs_by_hand():
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    stats = model_stats(conv, torch.randn(1, 16, 8, 8))
    # one 3x3 filter per channel, one input channel each
    assert stats.macs == 16 * 1 * 9 * 64


def test_grouped_conv_macs_by_hand():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    stats = model_stats(conv, torch.randn(1, 8, 8, 8))
    # output 4x4; each output channel sees 8 / 4 = 2 input channels
    assert stats.macs == 12 * 2 * 9 * 16


def test_transposed_conv_macs_by_hand():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    stats = model_stats(conv, torch.randn(1, 4, 5, 5))
    # every input position scatters into 3x3 outputs of the 6 / 2 = 3 channels of its group
    assert stats.macs == 25 * 4 * 3 * 9


def test_macs_scale_with_batch_size():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    one = model_stats(net, torch.randn(1, 3, 8, 8))
    two = model_stats(net, torch.randn(2, 3, 8, 8))
    assert one.macs == 4 * 3 * 9 * 36 + 144 * 3
    assert two.macs == 2 * one.macs
    assert two.params == one.params


def test_macs_scale_with_input_size():
    conv = nn.Conv2d(3, 4, 1)
    small = model_stats(conv, torch.randn(1, 3, 4, 4))
    large = model_stats(conv, torch.randn(1, 3, 8, 8))
    assert large.macs == 4 * small.macs


def _mha_macs(batch: int, seq: int, embed: int) -> int:
    projections = 3 * batch * seq * embed * embed  # q, k, v
    scores = batch * seq * seq * embed  # QK^T over all heads: heads * seq * seq * head_dim
    weighted = batch * seq * seq * embed  # AV
    out_proj = batch * seq * embed * embed
    return projections + scores + weighted + out_proj


class SelfAttention(nn.Module):
    def __init__(self, embed: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_macs_by_hand():
    stats = model_stats(SelfAttention(16, 2), torch.randn(2, 5, 16))
    assert stats.macs == _mha_macs(batch=2, seq=5, embed=16) == 11840
    # QK^T and AV, through a scaled-dot-product kernel (need_weights=False) or bmm
    attention = {op: macs for op, macs in stats.macs_by_op.items() if op not in ("mm", "addmm")}
    assert attention
    assert sum(attention.values()) == 2 * (2 * 5 * 5 * 16)


def test_attention_counted_for_frozen_weights_and_under_no_grad():
    # With no parameter requiring grad, PyTorch takes the fused fast path even with grad enabled.
    model = SelfAttention(16, 2).requires_grad_(False)
    with torch.no_grad():
        stats = model_stats(model, torch.randn(2, 5, 16))
    assert stats.macs == _mha_macs(batch=2, seq=5, embed=16)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored


def test_attention_counted_under_inference_mode():
    model = SelfAttention(16, 2)
    with torch.inference_mode():
        stats = model_stats(model, torch.randn(2, 5, 16))
    assert stats.macs == _mha_macs(batch=2, seq=5, embed=16)


def test_transformer_encoder_layer_counts_attention():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    stats = model_stats(layer, torch.randn(2, 5, 16))
    feedforward = 2 * (2 * 5 * 16 * 32)
    assert stats.macs == _mha_macs(batch=2, seq=5, embed=16) + feedforward


class SDPA(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_scaled_dot_product_attention_macs_by_hand():
    batch, heads, seq_q, seq_k, dim = 2, 3, 4, 6, 8
    q = torch.randn(batch, heads, seq_q, dim)
    k = torch.randn(batch, heads, seq_k, dim)
    v = torch.randn(batch, heads, seq_k, dim)
    stats = model_stats(SDPA(), (q, k, v))
    assert stats.macs == 2 * batch * heads * seq_q * seq_k * dim
    assert stats.params == 0
    assert stats.sparsity == 0.0
    (name,) = stats.macs_by_op
    assert "scaled_dot_product" in name


def test_dict_inputs_are_keyword_arguments():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    stats = model_stats(SDPA(), {"q": q, "k": k, "v": v})
    assert stats.macs == 2 * 2 * 3 * 4


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.integers(3, 7),
    batch=st.integers(1, 2),
)
def test_conv_macs_formula(groups, in_per_group, out_per_group, kernel, stride, padding, size, batch):
    in_ch, out_ch = groups * in_per_group, groups * out_per_group
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups)
    out = (size + 2 * padding - kernel) // stride + 1
    stats = model_stats(conv, torch.randn(batch, in_ch, size, size))
    assert stats.macs == batch * out_ch * out * out * in_per_group * kernel * kernel


# --------------------------------------------------------------------------------------------------
# Published figures (torchvision, 1x3x224x224)


@pytest.mark.parametrize(
    ("name", "published_gmacs", "params"),
    [
        ("resnet18", 1.82, 11_689_512),
        ("resnet50", 4.09, 25_557_032),
        ("mobilenet_v2", 0.30, 3_504_872),
        ("vit_b_16", 17.56, 86_567_656),  # 17.56 only if attention is counted
    ],
)
def test_published_figures(name, published_gmacs, params):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, weights=None)
    stats = model_stats(model, torch.randn(1, 3, 224, 224))
    assert stats.macs / 1e9 == pytest.approx(published_gmacs, rel=0.02)
    assert stats.params == params
    assert stats.macs == sum(stats.macs_by_op.values())


def test_vit_attention_appears_in_macs_by_op():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16(weights=None, image_size=32)
    stats = model_stats(model, torch.randn(1, 3, 32, 32))
    tokens, embed, layers = 2 * 2 + 1, 768, 12
    attention = [op for op in stats.macs_by_op if "scaled_dot_product" in op or op == "bmm"]
    assert attention
    assert sum(stats.macs_by_op[op] for op in attention) == layers * 2 * tokens * tokens * embed


# --------------------------------------------------------------------------------------------------
# Parameters and sparsity


def test_params_and_nonzero_params():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    stats = model_stats(net, torch.randn(1, 4))
    assert stats.params == sum(p.numel() for p in net.parameters()) == 15 + 8
    assert stats.nonzero_params == stats.params
    assert stats.sparsity == 0.0

    with torch.no_grad():
        net[0].weight[0].zero_()  # 4 entries
        net[2].bias.zero_()  # 2 entries
    stats = model_stats(net, torch.randn(1, 4))
    assert stats.params == 23
    assert stats.nonzero_params == 23 - 6
    assert stats.sparsity == pytest.approx(6 / 23)


def test_shared_parameters_counted_once():
    linear = nn.Linear(4, 4)
    net = nn.Sequential(linear, linear)
    stats = model_stats(net, torch.randn(1, 4))
    assert stats.params == 20
    assert stats.macs == 2 * 16


def test_sparsity_property():
    assert ModelStats(params=10, nonzero_params=10, macs=0).sparsity == 0.0
    assert ModelStats(params=10, nonzero_params=0, macs=0).sparsity == 1.0
    assert ModelStats(params=8, nonzero_params=2, macs=5).sparsity == pytest.approx(0.75)
    assert ModelStats(params=0, nonzero_params=0, macs=0).sparsity == 0.0


def test_model_stats_is_frozen_and_hashable():
    stats = ModelStats(params=1, nonzero_params=1, macs=2, macs_by_op={"addmm": 2})
    with pytest.raises(AttributeError):
        stats.params = 2  # type: ignore[misc]
    assert hash(stats) == hash(ModelStats(params=1, nonzero_params=1, macs=2))


# --------------------------------------------------------------------------------------------------
# No side effects


class CountingModule(nn.Module):
    """Mutates a buffer on every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.cache = torch.ones(3)  # replaces the buffer
        return x


def _mixed_mode_net() -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), CountingModule())
    net.train()
    net[0].eval()  # mixed modes must come back exactly, not as one net.train()/net.eval()
    with torch.no_grad():
        net[1].running_mean.uniform_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _snapshot(net: nn.Module):
    modes = [m.training for m in net.modules()]
    buffers = {name: (buf, buf.clone()) for name, buf in net.named_buffers()}
    return modes, buffers


def _assert_unchanged(net: nn.Module, snapshot) -> None:
    modes, buffers = snapshot
    assert [m.training for m in net.modules()] == modes
    assert dict(net.named_buffers()).keys() == buffers.keys()
    for name, buf in net.named_buffers():
        original, values = buffers[name]
        assert buf is original, name
        assert torch.equal(buf, values), name


def test_model_stats_leaves_modes_and_buffers_unchanged():
    net = _mixed_mode_net()
    snapshot = _snapshot(net)
    params_before = [p.clone() for p in net.parameters()]
    model_stats(net, torch.randn(2, 3, 8, 8))
    _assert_unchanged(net, snapshot)
    assert net[1].num_batches_tracked.item() == 0
    for before, after in zip(params_before, net.parameters(), strict=True):
        assert torch.equal(before, after)
        assert after.grad is None


def test_model_stats_restores_modes_after_forward_error():
    net = _mixed_mode_net()
    snapshot = _snapshot(net)
    with pytest.raises(PruningError):
        model_stats(net, torch.randn(2, 5, 8, 8))
    _assert_unchanged(net, snapshot)
    assert torch.backends.mha.get_fastpath_enabled()


def test_measure_latency_restores_modes():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net.train()
    net[1].eval()
    modes = [m.training for m in net.modules()]
    mean = net[1].running_mean.clone()
    measure_latency(net, torch.randn(1, 3, 8, 8), warmup=1, repeats=2)
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(net[1].running_mean, mean)


# --------------------------------------------------------------------------------------------------
# measure_latency


def _record_batch_sizes(model: nn.Module) -> list[int]:
    seen: list[int] = []

    def hook(_module, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        seen.append(first.shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_measure_latency_returns_positive_seconds():
    model = nn.Linear(10, 5)
    seen = _record_batch_sizes(model)
    seconds = measure_latency(model, torch.randn(3, 10), warmup=2, repeats=3)
    assert isinstance(seconds, float)
    assert 0 < seconds < 1
    assert seen == [3] * 5  # warmup + repeats, inputs unchanged


def test_measure_latency_runs_without_grad():
    grad_enabled: list[bool] = []
    model = nn.Linear(2, 2)
    model.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    measure_latency(model, torch.randn(1, 2), warmup=0, repeats=1)
    assert grad_enabled == [False]


def test_measure_latency_expands_batch():
    model = nn.Linear(10, 5)
    seen = _record_batch_sizes(model)
    measure_latency(model, torch.randn(2, 10), batch_size=16, warmup=1, repeats=2)
    assert seen == [16, 16, 16]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], tuple[int, ...], float]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.seen.append((tuple(x.shape), tuple(y.shape), scale))
        return x.sum() + y.sum()


@pytest.mark.parametrize(
    "make_inputs",
    [
        lambda x, y: (x, y, 2.0),
        lambda x, y: [x, y, 2.0],
        lambda x, y: {"x": x, "y": y, "scale": 2.0},
    ],
    ids=["tuple", "list", "dict"],
)
def test_measure_latency_expands_tensors_in_containers(make_inputs):
    model = TwoInputs()
    x = torch.arange(6.0).reshape(3, 2)
    y = torch.randn(3, 4, 5)
    measure_latency(model, make_inputs(x, y), batch_size=7, warmup=0, repeats=1)
    assert model.seen == [((7, 2), (7, 4, 5), 2.0)]


def test_expanded_batch_repeats_first_sample():
    x = torch.arange(6.0).reshape(3, 2)
    expanded = stats_module._expand_batch(x, 4)
    assert torch.equal(expanded, torch.tensor([[0.0, 1.0]] * 4))
    assert expanded.is_contiguous()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"repeats": 0},
            r"`measure_latency\(repeats=0\)` is invalid: `repeats` must be >= 1; got 0\.",
        ),
        (
            {"warmup": -1},
            r"`measure_latency\(warmup=-1\)` is invalid: `warmup` must be >= 0; got -1\.",
        ),
        ({"batch_size": 0}, r"`batch_size` must be >= 1; got 0\."),
        ({"batch_size": 2.0}, r"`batch_size` must be an int >= 1; got float\."),
        ({"repeats": True}, r"`repeats` must be an int >= 1; got bool\."),
        ({"device": "meta"}, r"model's parameters are on cpu"),
        ({"device": "gpu9"}, r"`device` must be a torch.device or a device string"),
    ],
)
def test_measure_latency_invalid_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_measure_latency_empty_batch_cannot_expand():
    with pytest.raises(PruningError, match=r"empty batch: tensor of shape \(0, 2\)"):
        measure_latency(nn.Linear(2, 2), torch.randn(0, 2), batch_size=2)


def test_measure_latency_forward_error_is_wrapped():
    with pytest.raises(PruningError, match=r"measure_latency.*tensor of shape \(1, 3\)") as info:
        measure_latency(nn.Linear(2, 2), torch.randn(1, 3))
    assert isinstance(info.value.__cause__, RuntimeError)


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("func", [model_stats, measure_latency])
def test_non_module_is_rejected(func):
    with pytest.raises(PruningError, match=r"must be a torch.nn.Module; got function"):
        func(lambda x: x, torch.randn(1, 2))


@pytest.mark.parametrize("func", [model_stats, measure_latency])
def test_bad_inputs_type_is_rejected(func):
    with pytest.raises(PruningError, match=r"example_inputs=\.\.\.\)` is invalid.*got str"):
        func(nn.Linear(2, 2), "not a tensor")


def test_wrong_shape_is_reported_with_the_shape():
    net = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(PruningError, match=r"`model_stats.*tensor of shape \(1, 4, 8, 8\)") as info:
        model_stats(net, torch.randn(1, 4, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "RuntimeError" in str(info.value)


def test_wrong_shape_in_tuple_is_described():
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 5), torch.randn(1, 1, 3, 4)
    with pytest.raises(PruningError, match=r"tensor of shape \(1, 1, 3, 5\), tensor of shape"):
        model_stats(SDPA(), (q, k, v))


# --------------------------------------------------------------------------------------------------
# Docstring examples


def test_doctests():
    results = doctest.testmod(stats_module, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 4
    assert results.failed == 0
