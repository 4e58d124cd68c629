"""benchmarks/snip_mnist.py's "seed's scoring loss" rows: scores from F.nll_loss on logits, CE training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import SNIPCallback
from tests.helpers.modules import trainer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "snip_mnist.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("snip_mnist_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def hand_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, limit: float) -> list[torch.Tensor]:
    """The top ``1 − limit`` of ``|∂loss/∂w · w|`` over every Linear weight, computed here by hand."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(loss(model(x), y), weights)
    scores = torch.cat([(g * w).abs().flatten() for g, w in zip(grads, weights, strict=True)])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.topk(round(scores.numel() * (1 - limit))).indices] = True
    return [k.view_as(w) for k, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)]


def test_seed_scoring_loss_is_used_for_the_scores_and_cross_entropy_for_training(tmp_path):
    bench = load_benchmark()
    data = images()
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    masks = {}
    for name, cls in (("seed", bench.SeedScoringClassifier), ("ce", bench.MNISTClassifier)):
        pl.seed_everything(0, verbose=False)
        model = cls("lenet300100", lr=1e-9)
        before = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]
        init = cls("lenet300100", lr=1e-9)
        init.load_state_dict(model.state_dict())
        loss = nn.functional.nll_loss if name == "seed" else nn.functional.cross_entropy
        expected = hand_mask(init, x, y, loss, 0.9)
        loader = DataLoader(data, batch_size=16, shuffle=False)
        trainer(tmp_path / name, [SNIPCallback(limit=0.9)], max_steps=1).fit(model, loader)
        got = [m.weight != 0 for m in model.modules() if isinstance(m, nn.Linear)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), name
        assert all(b.ne(0).all() for b in before)  # no weight was zero before pruning
        masks[name] = got
        if name == "seed":
            assert not model.scoring  # the first training batch switched it to cross entropy
            model.log = lambda *args, **kwargs: None  # outside a trainer loop
            assert torch.equal(model.training_step((x, y), 0), nn.functional.cross_entropy(model(x), y))
            model.scoring = True
            assert torch.equal(model.training_step((x, y), 0), nn.functional.nll_loss(model(x), y))
    assert any(not torch.equal(a, b) for a, b in zip(masks["seed"], masks["ce"], strict=True))
