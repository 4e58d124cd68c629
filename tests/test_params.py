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
