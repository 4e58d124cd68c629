"""Channel counts rounded to hardware-friendly multiples: the planner, the one-shot entry point, callbacks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune import (
    ChannelGraph,
    PruningError,
    SlimmingL1Callback,
    SNAPit,
    SNIPCallback,
    prune_channels,
)
from lightning_prune.structure import auto_round_to, round_kept
from tests.helpers.modules import TinyModule, trainer
from tests.helpers.nets import TinyResNet, eval_outputs

X = torch.randn(2, 3, 8, 8)


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(2, 40),
    multiple=st.integers(1, 16),
    data=st.data(),
)
def test_rounded_plans_keep_a_multiple_nearest_to_the_ranked_plan(width, multiple, data):
    graph = ChannelGraph(mlp(width), torch.randn(1, 4))
    cut = data.draw(st.integers(1, width - 1))
    scores = torch.tensor(data.draw(st.permutations(range(width))), dtype=torch.float32)
    planned = sorted(torch.argsort(scores)[:cut].tolist())  # the lowest `cut` channels
    plan = round_kept(graph, {"0": scores}, {"0": planned}, multiple)
    removed = plan.get("0", [])
    kept = width - len(removed)
    if width < multiple or multiple == 1:
        assert removed == planned  # too small to round, or no rounding
        return
    assert kept % multiple == 0 and multiple <= kept <= width
    assert abs(kept - (width - cut)) <= multiple  # the nearest multiple (or the closest allowed)
    lowest = set(torch.argsort(scores)[: len(removed)].tolist())
    assert set(removed) == lowest  # still the lowest scores


def test_prune_channels_rounds_every_group_it_cuts():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    shape = eval_outputs(model, X).shape
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    result = prune_channels(model, X, 0.5, round_to=4)
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    cut = [n for n in after if after[n] < before[n]]
    assert cut and all(after[n] % 4 == 0 for n in cut)
    assert result.round_to == 4 and 0.3 <= result.node_sparsity <= 0.7
    assert result.after.params < result.before.params
    assert eval_outputs(model, X).shape == shape


def test_prune_channels_takes_the_user_s_scores_and_checks_them():
    model = mlp(16)
    x = torch.randn(3, 4)
    scores = {"0": torch.arange(16.0)}  # channel 0 is the least important
    result = prune_channels(model, x, 0.25, scores=scores)
    assert result.removed == {"0": 4} and model[0].out_features == 12
    with pytest.raises(PruningError, match=r"scores for '0' must be a finite tensor of shape \(12,\)"):
        prune_channels(model, x, 0.25, scores={"0": torch.ones(3)})
    with pytest.raises(PruningError, match=r"scores for '0' must be a finite tensor"):
        prune_channels(model, x, 0.25, scores={"0": torch.full((12,), float("nan"))})
    with pytest.raises(PruningError, match=r"has no prunable channel group"):
        prune_channels(nn.Linear(4, 2), x, 0.25)
    with pytest.raises(PruningError, match=r"'snip' needs training batches"):
        prune_channels(model, x, 0.25, scores="snip")
    with pytest.raises(PruningError, match=r"`round_to` must be an int >= 1 or 'auto'; got 0"):
        prune_channels(model, x, 0.25, round_to=0)


def test_auto_picks_the_multiple_from_device_and_dtype(monkeypatch):
    assert auto_round_to("cuda", torch.float16) == auto_round_to("cuda", torch.bfloat16) == 8
    assert auto_round_to("cuda", torch.float32) == 4
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert auto_round_to("cpu", torch.float32) == 16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert auto_round_to("cpu", torch.float32) == 8
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert auto_round_to("cpu", torch.float32) == 4


@pytest.mark.parametrize(
    "make",
    [
        lambda: SNAPit(limit=0.6, steps=1, round_to=4),
        lambda: SlimmingL1Callback(penalty=1e-3, limit=0.5, round_to=4),
    ],
    ids=["snapit", "slimming"],
)
def test_structured_callbacks_keep_multiples_in_fit(tmp_path, make):
    torch.manual_seed(0)
    module = TinyModule(arch="resnet")
    before = {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    trainer(tmp_path, [make()], max_epochs=1).fit(module)
    after = {n: m.out_channels for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}
    cut = [n for n in after if after[n] < before[n]]
    assert cut and all(after[n] % 4 == 0 for n in cut)


def test_round_to_is_refused_where_it_means_nothing():
    match = r"`SNIPCallback\(round_to=8\)` is invalid: `round_to` must be 1 when unstructured"
    with pytest.raises(PruningError, match=match):
        SNIPCallback(limit=0.5, round_to=8)
    assert SNIPCallback(limit=0.5, structured=True, round_to="auto").round_to == "auto"
    with pytest.raises(PruningError, match=r"`round_to` must be an int >= 1 or 'auto'; got 'fast'"):
        SNAPit(round_to="fast")
