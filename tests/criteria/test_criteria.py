"""Every registered criterion keeps the contract; each one computes what its paper defines."""

import copy

import pytest
import torch
from torch import nn

from lightning_prune import ChannelGraph, PruningError, list_criteria
from lightning_prune.criteria import ScoringInputs, get_criterion
from tests.helpers.nets import TinyCNN, TinyResNet


def make_inputs(model, groups=(), seed=0, batches=2):
    gen = torch.Generator().manual_seed(123)
    data = [
        (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
        for _ in range(batches)
    ]

    def losses():
        for x, y in data:
            yield nn.functional.cross_entropy(model(x), y)

    weights = {
        f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }
    return ScoringInputs(model, weights, losses, groups, torch.Generator().manual_seed(seed)), data


def model_and_groups(arch):
    torch.manual_seed(0)
    model = arch().eval()
    graph = ChannelGraph(model, torch.zeros(2, 3, 8, 8))
    return model, graph, [g for g in graph.groups if g.prunable]


# -- the contract, for every registered criterion --------------------------------------------------------
@pytest.mark.parametrize("name", list_criteria(structured=False))
def test_weight_scores_contract(name):
    model, _, _ = model_and_groups(TinyCNN)
    inputs, _ = make_inputs(model)
    scores = get_criterion(name).weight_scores(inputs)
    assert scores.keys() == inputs.weights.keys()
    for key, w in inputs.weights.items():
        assert scores[key].shape == w.shape
        assert torch.isfinite(scores[key]).all()
        assert w.grad is None  # criteria leave .grad alone
    again = get_criterion(name).weight_scores(make_inputs(copy.deepcopy(model))[0])
    assert all(torch.equal(scores[k], again[k]) for k in scores)  # same seed, same scores
    assert len({float(s.std()) for s in scores.values()}) > 1  # not a constant


@pytest.mark.parametrize("arch", [TinyCNN, TinyResNet])
@pytest.mark.parametrize("name", list_criteria(structured=True))
def test_node_scores_contract(name, arch):
    model, _, groups = model_and_groups(arch)
    inputs, _ = make_inputs(model, groups)
    scores = get_criterion(name).node_scores(inputs)
    assert scores.keys() == {g.name for g in groups}
    for g in groups:
        assert scores[g.name].shape == (g.size,)
        assert torch.isfinite(scores[g.name]).all()
    again = get_criterion(name).node_scores(make_inputs(copy.deepcopy(model), groups)[0])
    assert all(torch.equal(scores[k], again[k]) for k in scores)
    assert any(float(s.std()) > 0 for s in scores.values())


def test_random_depends_on_the_seed_only():
    model, _, _ = model_and_groups(TinyCNN)
    random = get_criterion("random")
    a = random.weight_scores(make_inputs(model, seed=1)[0])
    b = random.weight_scores(make_inputs(model, seed=2)[0])
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])
    assert all(((s >= 0) & (s < 1)).all() for s in a.values())


def test_unknown_or_unfit_names_are_refused_with_suggestions():
    with pytest.raises(PruningError, match=r"criterion='snp'.*Did you mean 'snip' or 'snap'"):
        get_criterion("snp", owner="X")
    with pytest.raises(PruningError, match=r"'grasp'\)` cannot score channels .*\['l1_norm', 'random'"):
        get_criterion("grasp", structured=True, owner="X")
    with pytest.raises(PruningError, match=r"'snap'\)` cannot score single weights"):
        get_criterion("snap", structured=False, owner="X")


# -- each criterion against its definition, computed by hand ---------------------------------------------
def hand_gradients(model, data):
    model.zero_grad()
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()


def test_snip_is_abs_grad_times_weight():
    model, _, groups = model_and_groups(TinyCNN)
    inputs, data = make_inputs(model, groups)
    scores = get_criterion("snip").weight_scores(inputs)
    nodes = get_criterion("snip").node_scores(inputs)
    hand_gradients(model, data)
    w = model.features[0].weight
    torch.testing.assert_close(scores["features.0.weight"], (w.grad * w).abs().detach())
    per_channel = (w.grad * w).abs().sum((1, 2, 3)).double()
    torch.testing.assert_close(nodes["features.0"], per_channel.detach())


def test_snap_is_abs_of_summed_gate_gradient():
    """∂L/∂gate_j = Σ over batches, samples and positions of ∂L/∂y_j · y_j (y: the conv output)."""
    model, _, groups = model_and_groups(TinyCNN)
    inputs, data = make_inputs(model, groups)
    nodes = get_criterion("snap").node_scores(inputs)
    outputs = []

    def keep(module, args, y):
        y.retain_grad()
        outputs.append(y)

    handle = model.features[0].register_forward_hook(keep)
    hand_gradients(model, data)
    handle.remove()
    gate_grad = sum((y.grad * y).sum((0, 2, 3)) for y in outputs)
    torch.testing.assert_close(nodes["features.0"], gate_grad.abs().double().detach())
    assert not torch.allclose(nodes["features.0"], get_criterion("snip").node_scores(inputs)["features.0"])


def test_taylor_gates_the_norm_output_after_its_shift():
    """GateDecorators: φ multiplies the BatchNorm output z = γ·x̂ + β; score |φ·∂L/∂φ| = |Σ ∂L/∂z · z|.

    With β ≠ 0 this differs from |γ·∂L/∂γ| (which leaves out β·∂L/∂β): the test makes sure it is the gate.
    """
    model, _, groups = model_and_groups(TinyCNN)
    with torch.no_grad():
        model.features[1].bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    inputs, data = make_inputs(model, groups)
    nodes = get_criterion("taylor").node_scores(inputs)
    outputs = []

    def keep(module, args, z):
        z.retain_grad()
        outputs.append(z)

    handle = model.features[1].register_forward_hook(keep)
    hand_gradients(model, data)
    handle.remove()
    gate_grad = sum((z.grad * z).sum((0, 2, 3)) for z in outputs)
    torch.testing.assert_close(nodes["features.0"], gate_grad.abs().double().detach())
    bn = model.features[1]
    assert not torch.allclose(nodes["features.0"], (bn.weight * bn.weight.grad).abs().double())
    # the hidden linear layer has no norm: a gate of ones on its output, i.e. SNAP's score
    torch.testing.assert_close(
        nodes["classifier.1"], get_criterion("snap").node_scores(inputs)["classifier.1"]
    )


def test_grasp_sign_follows_the_paper():
    """GraSP (arXiv:2002.07376, eq. 8): S(−θ) = −θ ⊙ Hg, and the weights with the LARGEST S are removed.

    On least squares L = ½·mean((Xθ − y)²): g = Xᵀ(Xθ − y)/n and H = XᵀX/n exactly, so Hg is known in closed
    form. Higher = keep, so the criterion must return −S = θ ⊙ Hg, and the weight with the largest S must
    get the lowest score.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=gen), torch.randn(32, generator=gen)
    model = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 6, generator=gen))

    def losses():
        yield 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()

    theta = model.weight.detach()[0]
    g = x.T @ (x @ theta - y) / len(x)
    hg = x.T @ x @ g / len(x)
    paper = -theta * hg
    inputs = ScoringInputs(model, {"weight": model.weight}, losses)
    scores = get_criterion("grasp").weight_scores(inputs)["weight"][0]
    torch.testing.assert_close(scores, -paper)
    assert int(scores.argmin()) == int(paper.argmax())  # the paper's first removal is our lowest score


def test_magnitude_and_per_layer_l1_norm():
    model, _, groups = model_and_groups(TinyCNN)
    inputs, _ = make_inputs(model, groups)
    mags = get_criterion("magnitude").weight_scores(inputs)
    torch.testing.assert_close(mags["features.3.weight"], model.features[3].weight.detach().abs())
    ranks = get_criterion("l1_norm").node_scores(inputs)
    norms = model.features[0].weight.detach().abs().sum((1, 2, 3))
    expected = (torch.argsort(torch.argsort(norms)).double() + 1) / 8  # rank within the layer, in (0, 1]
    torch.testing.assert_close(ranks["features.0"], expected)
    for g in groups:  # every group's scores are the same ladder: equal fractions removed per layer
        assert sorted(ranks[g.name].tolist()) == pytest.approx([(i + 1) / g.size for i in range(g.size)])
