"""`load_pruned_state_dict`: a shrunk model's weights reload into a freshly built, unpruned model.

Round trips go through a real file and ``torch.load(weights_only=True)``: a model is built, 30% of
its channels are killed and shrunk away, its state dict is saved, and a fresh instance from the same
constructor must come back with the same layer attributes, the same tensors and the same outputs.
Layer types the zoo does not reach (transposed, 1-d/3-d convolutions, GroupNorm, embeddings, free
parameters…) are checked by loading the state dict of a narrower instance into a wider one.
"""

from __future__ import annotations

import doctest
from collections import OrderedDict

import lightning as L
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_prune.checkpoint as checkpoint_module
from lightning_prune import PruningError, shrink
from lightning_prune.checkpoint import load_pruned_state_dict
from tests.helpers.nets import kill_channels

FRACTION = 0.3


# --------------------------------------------------------------------------------------------------
# helpers


def small_cnn(width: int = 8, hidden: int = 16) -> nn.Sequential:
    """conv-bn-relu twice, pooling, flatten → linear head; 8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 4),
    )


def public_attrs(module: nn.Module) -> dict:
    """The settings a layer runs with (``in_channels``, ``groups``, ``normalized_shape``, …)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: tensors (objects and values) and attributes."""
    return {
        "tensors": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "attrs": {name: public_attrs(m) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before["tensors"].keys()
    for key, (obj, value) in before["tensors"].items():
        assert after[key] is obj, key
        assert torch.equal(after[key].detach(), value), key
    assert {name: public_attrs(m) for name, m in model.named_modules()} == before["attrs"]


def eval_out(model: nn.Module, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_model(a: nn.Module, b: nn.Module, x) -> None:
    """``b`` has ``a``'s layers (types, attributes), tensors (shapes, values, flags) and outputs."""
    a_modules, b_modules = dict(a.named_modules()), dict(b.named_modules())
    assert a_modules.keys() == b_modules.keys()
    for name, module in a_modules.items():
        assert type(b_modules[name]) is type(module), name
        assert public_attrs(b_modules[name]) == public_attrs(module), name
    a_sd, b_sd = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert a_sd.keys() == b_sd.keys()
    for key, tensor in a_sd.items():
        other = b_sd[key]
        assert other.shape == tensor.shape, key
        assert other.dtype == tensor.dtype, key
        assert other.requires_grad == tensor.requires_grad, key
        assert type(other) is type(tensor), key
        assert torch.equal(other.detach(), tensor.detach()), key
    assert torch.allclose(eval_out(b, x), eval_out(a, x), atol=1e-6)


def shrunk_file(build, x, tmp_path, fraction: float = FRACTION):
    """Build, kill ``fraction`` of the channels, shrink; return the model and its reloaded state."""
    torch.manual_seed(0)
    model = build()
    assert kill_channels(model, x, fraction) > 0
    report = shrink(model, x)
    assert report.channels_removed > 0
    path = tmp_path / "shrunk.pt"
    torch.save(model.state_dict(), path)
    return model, torch.load(path, weights_only=True)


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial values in every floating tensor (running statistics included)."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    return module


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# round trips through a file


def test_doctest():
    result = doctest.testmod(checkpoint_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_round_trip_small_cnn_with_flatten_head(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    a, state_dict = shrunk_file(small_cnn, x, tmp_path)
    b = small_cnn()
    assert load_pruned_state_dict(b, state_dict) is b
    assert_same_model(a, b, x)
    assert b[0].out_channels == b[1].num_features == b[3].in_channels == a[0].out_channels < 8
    assert b[8].in_features == a[8].in_features == b[3].out_channels * 16 < 256


def tiny_densenet() -> nn.Module:
    """torchvision's DenseNet (concatenations) at a tenth of densenet121's size."""
    return torchvision.models.DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10
    )


ZOO = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "tiny_densenet": tiny_densenet,
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
}
# densenet121 takes ~6 s to trace and shrink on one CPU core; tiny_densenet covers the same
# torchvision code (dense blocks, transitions) in the default suite.
SLOW = {"densenet121"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in ZOO]
)
def test_round_trip_zoo(name, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    a, state_dict = shrunk_file(ZOO[name], x, tmp_path)
    b = ZOO[name]()
    unpruned = param_count(b)
    load_pruned_state_dict(b, state_dict)
    assert_same_model(a, b, x)
    assert param_count(b) == param_count(a) < unpruned

    convs = {n: m for n, m in b.named_modules() if isinstance(m, nn.Conv2d)}
    fresh = {n: m for n, m in ZOO[name]().named_modules() if isinstance(m, nn.Conv2d)}
    for layer, conv in convs.items():
        if fresh[layer].groups > 1 and fresh[layer].groups == fresh[layer].in_channels:
            # depthwise stays depthwise, with one group per remaining channel
            assert conv.groups == conv.in_channels == conv.out_channels, layer
        else:
            # grouped convolutions keep their groups; their channels shrank symmetrically
            assert conv.groups == fresh[layer].groups, layer
    if name == "resnet18":
        assert b.layer1[0].conv1.out_channels == a.layer1[0].conv1.out_channels < 64
        assert b.layer1[0].bn1.num_features == b.layer1[0].conv2.in_channels < 64
        assert b.fc.in_features == a.fc.in_features < 512
    if name == "mobilenet_v2":
        assert any(c.groups < fresh[n].groups for n, c in convs.items() if c.groups > 1)
    if name in ("regnet_x_400mf", "resnext50_32x4d"):
        grouped = [n for n, c in convs.items() if 1 < c.groups < c.in_channels]
        assert grouped
        assert any(convs[n].in_channels < fresh[n].in_channels for n in grouped)


# --------------------------------------------------------------------------------------------------
# every supported layer type: a narrower instance's state dict loads into a wider one

LAYERS = {
    "conv2d": (
        lambda: nn.Conv2d(8, 16, 3, padding=1),
        lambda: nn.Conv2d(5, 11, 3, padding=1),
        (2, 5, 6, 6),
    ),
    "conv2d_no_bias": (
        lambda: nn.Conv2d(8, 16, 3, bias=False),
        lambda: nn.Conv2d(8, 3, 3, bias=False),
        (2, 8, 6, 6),
    ),
    "conv1d": (lambda: nn.Conv1d(8, 16, 3), lambda: nn.Conv1d(6, 9, 3), (2, 6, 10)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3), lambda: nn.Conv3d(3, 2, 3), (1, 3, 5, 5, 5)),
    "grouped": (
        lambda: nn.Conv2d(8, 16, 3, groups=4),
        lambda: nn.Conv2d(4, 12, 3, groups=4),
        (2, 4, 6, 6),
    ),
    "depthwise": (
        lambda: nn.Conv2d(8, 8, 3, groups=8),
        lambda: nn.Conv2d(5, 5, 3, groups=5),
        (2, 5, 6, 6),
    ),
    "conv_transpose": (
        lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, output_padding=1),
        lambda: nn.ConvTranspose2d(5, 4, 3, stride=2, output_padding=1),
        (2, 5, 4, 4),
    ),
    "conv_transpose_grouped": (
        lambda: nn.ConvTranspose2d(8, 6, 3, groups=2),
        lambda: nn.ConvTranspose2d(4, 4, 3, groups=2),
        (2, 4, 4, 4),
    ),
    "conv_transpose_depthwise": (
        lambda: nn.ConvTranspose1d(8, 8, 3, groups=8),
        lambda: nn.ConvTranspose1d(5, 5, 3, groups=5),
        (2, 5, 7),
    ),
    "linear": (lambda: nn.Linear(8, 6), lambda: nn.Linear(5, 3), (2, 5)),
    "batch_norm": (lambda: nn.BatchNorm2d(8), lambda: nn.BatchNorm2d(5), (2, 5, 3, 3)),
    "batch_norm_no_affine": (
        lambda: nn.BatchNorm1d(8, affine=False),
        lambda: nn.BatchNorm1d(5, affine=False),
        (4, 5),
    ),
    "instance_norm": (
        lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
        (2, 5, 3, 3),
    ),
    "group_norm": (lambda: nn.GroupNorm(2, 8), lambda: nn.GroupNorm(2, 6), (2, 6, 3, 3)),
    "layer_norm": (lambda: nn.LayerNorm([8, 4]), lambda: nn.LayerNorm([6, 4]), (2, 6, 4)),
    "rms_norm": (lambda: nn.RMSNorm(8), lambda: nn.RMSNorm(5), (2, 3, 5)),
    "prelu": (lambda: nn.PReLU(8), lambda: nn.PReLU(5), (2, 5, 3, 3)),
    "embedding": (
        lambda: nn.Embedding(10, 8, padding_idx=0),
        lambda: nn.Embedding(7, 5, padding_idx=0),
        None,
    ),
    "embedding_bag": (
        lambda: nn.EmbeddingBag(10, 8, mode="mean"),
        lambda: nn.EmbeddingBag(7, 5, mode="mean"),
        None,
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_types(name):
    build_big, build_small, in_shape = LAYERS[name]
    small = randomize(build_small())
    big = build_big()
    x = torch.randint(0, 7, (2, 3)) if in_shape is None else torch.randn(in_shape)
    load_pruned_state_dict(big, small.state_dict())
    assert_same_model(small, big, x)


class Block(nn.Module):
    """A custom block with loose tensors: a layer scale, a buffer and a root-level class token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.full((width, 1, 1), 1e-2))
        self.register_buffer("offset", torch.zeros(width))
        self.register_buffer("cache", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.layer_scale + self.offset[:, None, None]


class TokenNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = Block(width)
        self.class_token = nn.Parameter(torch.zeros(1, width))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean((2, 3)) + self.class_token)


def test_free_parameters_and_buffers_take_the_saved_shape(tmp_path):
    small = randomize(TokenNet(5))
    torch.save(small.state_dict(), tmp_path / "sd.pt")
    big = TokenNet(8)
    load_pruned_state_dict(big, torch.load(tmp_path / "sd.pt", weights_only=True))
    assert_same_model(small, big, torch.randn(2, 3, 6, 6))
    assert isinstance(big.class_token, nn.Parameter)
    assert big.block.layer_scale.shape == (5, 1, 1)
    assert "offset" in dict(big.block.named_buffers())
    assert big.block.cache.shape == (3,)  # non-persistent: not in the state dict, untouched


class TiedLM(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def test_tied_parameters_stay_tied():
    small = randomize(TiedLM(5))
    big = TiedLM(8)
    load_pruned_state_dict(big, small.state_dict())
    assert big.head.weight is big.embed.weight
    assert big.embed.embedding_dim == big.head.in_features == 5
    assert big.norm.normalized_shape == (5,)
    assert_same_model(small, big, torch.randint(0, 10, (2, 4)))


def test_dtype_and_requires_grad_of_the_model_are_kept():
    small = randomize(small_cnn(width=5))
    big = small_cnn().double()
    big[0].weight.requires_grad_(False)
    load_pruned_state_dict(big, small.state_dict())
    assert big[0].weight.dtype == torch.float64 and big[1].running_mean.dtype == torch.float64
    assert not big[0].weight.requires_grad
    assert big[3].weight.requires_grad and isinstance(big[3].weight, nn.Parameter)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(eval_out(big, x.double()).float(), eval_out(small, x), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    widths=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    cuts=st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
)
def test_any_narrower_cnn_loads_into_a_wider_one(widths, cuts):
    """Property: for any widths w and w' <= w, loading the w'-model's state dict reproduces it."""
    small_widths = [max(1, w - c) for w, c in zip(widths, cuts, strict=True)]

    def build(w1, w2, hidden):
        return nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1),
            nn.BatchNorm2d(w1),
            nn.ReLU(),
            nn.Conv2d(w1, w2, 1),
            nn.GroupNorm(1, w2),
            nn.Flatten(),
            nn.Linear(w2 * 16, hidden),
            nn.PReLU(hidden),
            nn.Linear(hidden, 2),
        )

    small = randomize(build(*small_widths))
    big = build(*widths)
    load_pruned_state_dict(big, small.state_dict())
    assert_same_model(small, big, torch.randn(2, 3, 4, 4))


# --------------------------------------------------------------------------------------------------
# strict=False and prefixes


def test_strict_false_loads_what_matches(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    a, state_dict = shrunk_file(small_cnn, x, tmp_path)
    del state_dict["3.bias"]  # derived from 3.weight: resized, left with the old values' prefix
    del state_dict["10.weight"], state_dict["10.bias"]  # untouched head
    state_dict["extra.weight"] = torch.ones(3)  # ignored
    b = small_cnn()
    old_bias = b[3].bias.detach().clone()
    load_pruned_state_dict(b, state_dict, strict=False)
    assert b[3].out_channels == a[3].out_channels
    assert b[3].bias.shape == a[3].bias.shape
    assert torch.equal(b[3].bias.detach(), old_bias[: a[3].out_channels])
    assert torch.equal(b[3].weight.detach(), a[3].weight.detach())
    assert torch.equal(b[8].weight.detach(), a[8].weight.detach())
    assert b[10].weight.shape == (4, 16)


def test_state_dict_without_num_batches_tracked_loads_like_torch():
    small = randomize(small_cnn(width=5))
    state_dict = {k: v for k, v in small.state_dict().items() if "num_batches_tracked" not in k}
    big = load_pruned_state_dict(small_cnn(), state_dict)
    assert big[1].num_features == 5
    assert torch.equal(big[1].running_var, small[1].running_var)


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = nn.CrossEntropyLoss(weight=torch.ones(4))  # a buffer outside `model`

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # inside Lightning, torch 2.15
def test_prefix_with_a_real_lightning_checkpoint(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    a, _ = shrunk_file(small_cnn, x, tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Classifier(a), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "shrunk.ckpt")
    ckpt = torch.load(tmp_path / "shrunk.ckpt", weights_only=True)
    assert "criterion.weight" in ckpt["state_dict"]

    for prefix in ("model.", "model"):
        fresh = Classifier(small_cnn())
        load_pruned_state_dict(fresh.model, ckpt["state_dict"], prefix=prefix)
        assert_same_model(a, fresh.model, x)

    fresh = Classifier(small_cnn())
    before = snapshot(fresh.model)
    with pytest.raises(PruningError, match=r"pass prefix='model\.'"):
        load_pruned_state_dict(fresh.model, ckpt["state_dict"])
    with pytest.raises(PruningError, match=r"whole checkpoint.*checkpoint\['state_dict'\]"):
        load_pruned_state_dict(fresh.model, ckpt)
    with pytest.raises(PruningError, match=r"no key .* starts with 'net\.'.*model\."):
        load_pruned_state_dict(fresh.model, ckpt["state_dict"], prefix="net.")
    assert_unchanged(fresh.model, before)


def test_prefix_keeps_metadata_and_ignores_other_keys():
    small = randomize(small_cnn(width=5))
    wrapped = OrderedDict(("model." + k, v) for k, v in small.state_dict().items())
    wrapped["other.weight"] = torch.ones(2)
    wrapped._metadata = {"": {"version": 1}, "model": {"version": 1}, "model.1": {"version": 2}}
    stripped = checkpoint_module._strip_prefix(wrapped, "model.")
    assert list(stripped) == list(small.state_dict())
    assert stripped._metadata == {"": {"version": 1}, "1": {"version": 2}}
    big = load_pruned_state_dict(small_cnn(), wrapped, prefix="model.")
    assert_same_model(small, big, torch.randn(2, 3, 8, 8))


# --------------------------------------------------------------------------------------------------
# errors: raised before anything is modified


def test_a_checkpoint_written_before_a_shrink_grows_the_shrunk_model_back():
    big = randomize(small_cnn())
    small = randomize(small_cnn(width=5))
    load_pruned_state_dict(small, big.state_dict())
    assert {k: v.shape for k, v in small.state_dict().items()} == {
        k: v.shape for k, v in big.state_dict().items()
    }
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(small.eval()(x), big.eval()(x))


def test_another_number_of_dimensions_is_rejected():
    model = torchvision.models.resnet18(num_classes=10)
    before = snapshot(model)
    state_dict = model.state_dict()
    state_dict["layer1.0.conv1.weight"] = torch.zeros(64, 64, 9)
    message = (
        r"`load_pruned_state_dict`: layer1.0.conv1.weight has shape \(64, 64, 9\) in the state "
        r"dict but \(64, 64, 3, 3\) in the model: another number of dimensions\."
    )
    with pytest.raises(PruningError, match=message):
        load_pruned_state_dict(model, state_dict)
    assert_unchanged(model, before)


def shrunk_then(edit) -> tuple[nn.Module, dict, dict]:
    """A fresh small_cnn, a valid shrunk state dict for it edited by ``edit``, and a snapshot."""
    state_dict = randomize(small_cnn(width=5)).state_dict()
    edit(state_dict)
    model = small_cnn()
    return model, state_dict, snapshot(model)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda sd: sd.__setitem__("8.bias", torch.zeros(16, 1)),
            r"8\.bias has shape \(16, 1\) in the state dict but \(16,\) in the model: another "
            r"number of dimensions",
        ),
        (
            lambda sd: sd.pop("8.weight"),
            r"strict=True\)`: the state dict does not match Sequential\. "
            r"Missing keys \(1\): 8\.weight\.",
        ),
        (
            lambda sd: sd.__setitem__("11.weight", torch.zeros(2)),
            r"Unexpected keys \(1\): 11\.weight\. .*strict=False",
        ),
        (
            lambda sd: sd.__setitem__("0.weight", "oops"),
            r"0\.weight is a str in the state dict but a tensor of shape \(8, 3, 3, 3\)",
        ),
        (
            lambda sd: sd.__setitem__("3.bias", torch.zeros(9)),
            r"shapes of 3 \(Conv2d\) in the state dict are inconsistent .*bias should be \(10,\)",
        ),
        (
            lambda sd: sd.__setitem__("3.weight", torch.zeros(10, 5, 1, 1)),
            r"cannot resize 3 \(Conv2d\) .*its kernel size \(3, 3\) cannot change",
        ),
        (
            lambda sd: sd.__setitem__("1.running_var", torch.ones(4)),
            r"shapes of 1 \(BatchNorm2d\) in the state dict are inconsistent .*"
            r"running_var should be \(5,\)",
        ),
    ],
    ids=["ndim", "missing", "unexpected", "not_a_tensor", "bias", "kernel", "norm_stats"],
)
def test_bad_state_dict_is_rejected_before_modifying(edit, match):
    model, state_dict, before = shrunk_then(edit)
    with pytest.raises(PruningError, match=match):
        load_pruned_state_dict(model, state_dict)
    assert_unchanged(model, before)


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def parametrized(layer: nn.Module) -> nn.Module:
    nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    return layer


@pytest.mark.parametrize(
    ("big", "small", "match"),
    [
        (
            lambda: nn.ModuleDict({"fc": nn.Linear(4, 8), "rnn": nn.LSTM(8, 6)}),
            lambda: nn.ModuleDict({"fc": nn.Linear(4, 5), "rnn": nn.LSTM(5, 6)}),
            r"rnn is a LSTM whose tensors changed shape \(weight_ih_l0 \(24, 8\) → \(24, 5\)\).*"
            r"LSTM layers cannot be resized here",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2)),
            lambda: nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2)),
            r"1 is a MultiheadAttention .* cannot be resized here",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 16, 3, groups=4)),
            lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 14, 3, groups=2)),
            r"cannot resize 1 \(Conv2d\).*weight \(14, 2, 3, 3\).*14 channels cannot be split "
            r"into its 4 groups",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8)),
            lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(3, 6)),
            r"cannot resize 1 \(GroupNorm\).*6 channels cannot be split into its num_groups=4",
        ),
        (
            lambda: nn.Sequential(nn.Embedding(10, 4, padding_idx=9)),
            lambda: nn.Sequential(nn.Embedding(8, 4)),
            r"cannot resize 0 \(Embedding\).*padding_idx=9 is beyond 8 embeddings",
        ),
        (
            lambda: parametrized(nn.Linear(4, 8)),
            lambda: parametrized(nn.Linear(4, 5)),
            r"cannot resize the model itself \(ParametrizedLinear\).*no `weight` tensor of its own",
        ),
    ],
    ids=["lstm", "attention", "grouped_conv", "group_norm", "padding_idx", "parametrized"],
)
def test_layers_that_cannot_take_the_shapes_are_rejected(big, small, match):
    model = big()
    before = snapshot(model)  # the first layer's valid shrink must not be applied either
    with pytest.raises(PruningError, match=match):
        load_pruned_state_dict(model, small().state_dict())
    assert_unchanged(model, before)


def test_attention_output_projection_is_rejected():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    state_dict = model.state_dict()
    state_dict["0.out_proj.weight"] = torch.zeros(6, 8)
    state_dict["0.out_proj.bias"] = torch.zeros(6)
    before = snapshot(model)
    with pytest.raises(PruningError, match=r"0\.out_proj belongs to the MultiheadAttention 0"):
        load_pruned_state_dict(model, state_dict)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state_dict": [1, 2]}, r"`load_pruned_state_dict\(state_dict=...\)` is invalid: .*list"),
        ({"strict": "yes"}, r"`load_pruned_state_dict\(strict='yes'\)` is invalid"),
        ({"prefix": 3}, r"`load_pruned_state_dict\(prefix=3\)` is invalid"),
        ({"model": "resnet"}, r"`load_pruned_state_dict\(model=...\)` is invalid"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"model": small_cnn(), "state_dict": small_cnn().state_dict()} | kwargs
    with pytest.raises(PruningError, match=match):
        load_pruned_state_dict(**args)


def test_failed_load_restores_the_layers(monkeypatch):
    small = randomize(small_cnn(width=5))
    model = small_cnn()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model, "load_state_dict", broken)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_pruned_state_dict(model, small.state_dict())
    assert_unchanged(model, before)


def test_a_tensor_that_would_grow_without_values_is_refused():
    big, small = randomize(small_cnn()), randomize(small_cnn(width=5))
    state_dict = big.state_dict()
    del state_dict["1.running_var"]  # the norm of the grown conv would get made-up statistics
    before = snapshot(small)
    with pytest.raises(PruningError, match=r"1\.running_var would grow to \(8,\) .* has no values for it"):
        load_pruned_state_dict(small, state_dict, strict=False)
    assert_unchanged(small, before)


# -- load_pruned_checkpoint: inference by default, train=True to fine-tune ----------------------------------
def test_load_pruned_checkpoint_is_in_eval_mode_unless_train_is_asked(tmp_path, recwarn):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import load_pruned_checkpoint
    from lightning_prune.examples import DigitsClassifier

    module = DigitsClassifier(width=8)
    path = tmp_path / "digits.pt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)

    loaded = load_pruned_checkpoint(DigitsClassifier, path)
    assert not any(m.training for m in loaded.modules())
    tuned = load_pruned_checkpoint(DigitsClassifier, path, train=True)
    assert all(m.training for m in tuned.modules())
    with pytest.raises(PruningError, match=r"`load_pruned_checkpoint\(train='yes'\)` is invalid"):
        load_pruned_checkpoint(DigitsClassifier, path, train="yes")

    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(tuned, train_dataloaders=data)
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]
    assert tuned.model[1].num_batches_tracked == 2  # BatchNorm trained on batch statistics
