import doctest

import torch
from torch import nn

import lightning_prune._params as params_module
from lightning_prune._params import aliases, canonical_names, layer_weights


def test_doctest():
    result = doctest.testmod(params_module)
    assert result.attempted > 0 and result.failed == 0


def test_canonical_names_follow_named_parameters():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net.add_module("again", net[1])  # the same module under a second name
    net[0].weight = net[1].weight  # and its weight lent to the first layer
    first = dict(net.named_parameters())  # one name per object: the canonical ones
    names = canonical_names(net)
    assert set(names.values()) == set(first)
    assert names == {
        "0.weight": "0.weight",
        "0.bias": "0.bias",
        "1.weight": "0.weight",
        "1.bias": "1.bias",
        "again.weight": "0.weight",
        "again.bias": "1.bias",
    }
    assert aliases(net) == {"1.weight": "0.weight", "again.weight": "0.weight", "again.bias": "1.bias"}
    assert list(layer_weights(net, ["1", "0", "again"])) == ["0.weight"]
    assert layer_weights(net, ["1"])["0.weight"] is net[1].weight


def test_an_unregistered_weight_keeps_its_layer_name():
    net = nn.Sequential(nn.Linear(3, 3))
    nn.utils.parametrizations.weight_norm(net[0])
    weights = layer_weights(net, ["0"])
    assert list(weights) == ["0.weight"]
    assert torch.equal(weights["0.weight"], net[0].weight)


def test_aliases_are_the_non_canonical_names_also_for_buffers_and_shared_modules():
    shared = nn.BatchNorm1d(4)
    net = nn.ModuleDict(
        {"embed": nn.Embedding(8, 4), "head": nn.Linear(4, 8, bias=False), "a": shared, "b": shared}
    )
    net["head"].weight = net["embed"].weight  # tied parameter; a module used twice shares its buffers
    net["a"].register_buffer("extra", net["a"].running_mean)  # one buffer under two names
    walk = list(net.named_modules(remove_duplicate=False))
    for buffers in (False, True):
        expected = {n: f for n, f in canonical_names(net, buffers=buffers).items() if n != f}
        assert aliases(net, buffers=buffers) == expected
        assert aliases(net, buffers=buffers, walk=walk) == expected
    assert aliases(net, buffers=True)["b.running_var"] == "a.running_var"
    assert aliases(net, buffers=True)["a.extra"] == "a.running_mean"
    assert aliases(net) == {"head.weight": "embed.weight", "b.weight": "a.weight", "b.bias": "a.bias"}
