"""Property: randomly structured CNNs with random dead channels shrink without changing their outputs."""

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lightning_prune import shrink
from tests.helpers.nets import RandomCNN, eval_outputs, kill_channels

SIZE = 8


@st.composite
def cnn_specs(draw):
    # Real CNNs open with a convolution stem. The raw input concatenated with features is a known
    # limit of the tracer (documented); a depthwise conv on the input is covered in test_structure.
    channels, size = draw(st.integers(2, 6)), SIZE
    specs = [("conv", channels, 3, 1)]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "dw", "res", "cat", "pool", "act"]))
        if kind == "conv":
            groups = draw(st.sampled_from([1, 1, 2]))
            if channels % groups:
                groups = 1
            out = groups * draw(st.integers(1, 6))
            specs.append(("conv", out, draw(st.sampled_from([1, 3])), groups))
            channels = out
        elif kind == "cat":
            out = draw(st.integers(1, 5))
            specs.append(("cat", out))
            channels += out
        elif kind == "pool":
            if size >= 4:
                specs.append(("pool",))
                size //= 2
        elif kind == "act":
            specs.append(("act", draw(st.sampled_from(sorted(RandomCNN.ACTS)))))
        else:
            specs.append((kind,))
    return specs, size


# A grouped conv whose output is concatenated and then coupled by a depthwise conv to the other part:
# its ties (strides of its own 4 channels) are not the group's (6 channels): refused, not mis-cut.
@example(
    spec=([("conv", 2, 3, 1), ("conv", 4, 1, 2), ("cat", 4), ("dw",)], 8),
    flatten_head=False,
    fraction=0.5,
    seed=0,
)
@example(
    spec=([("conv", 2, 3, 1), ("conv", 4, 1, 2), ("cat", 2), ("dw",)], 8),
    flatten_head=False,
    fraction=0.5,
    seed=0,
)
@given(
    spec=cnn_specs(),
    flatten_head=st.booleans(),
    fraction=st.sampled_from([0.25, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_cnn_with_dead_channels_shrinks_exactly(spec, flatten_head, fraction, seed):
    specs, _ = spec
    torch.manual_seed(seed)
    model = RandomCNN(specs, in_channels=3, size=SIZE, flatten_head=flatten_head, classes=3)
    with torch.no_grad():  # non-trivial running statistics, so a wrongly kept/removed channel shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, SIZE, SIZE)
    killed = kill_channels(model, x, fraction, seed)
    params = sum(p.numel() for p in model.parameters())
    ref = eval_outputs(model, x)

    report = shrink(model, x, verify=False)

    torch.testing.assert_close(eval_outputs(model, x), ref, rtol=1e-4, atol=1e-5)
    assert report.after.params == sum(p.numel() for p in model.parameters())
    # every killed channel goes, except one per wholly dead group, which keeps its layers non-empty
    assert report.channels_removed + sum(report.kept_dead.values()) == killed
    if report.channels_removed:
        assert report.after.params < params
    for m in model.modules():  # no layer emptied
        for attr in ("out_channels", "in_channels", "num_features", "in_features", "out_features"):
            assert getattr(m, attr, 1) >= 1
