"""AdversarialEvaluation in real `trainer.test` runs: closed forms on a linear model, dense vs pruned."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import AdversarialEvaluation, PruningError, SNIPCallback
from tests.helpers.modules import trainer

SCRIPT = Path(__file__).with_name("ddp_adversarial.py")


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    """Inputs in [0.2, 0.8]^8, away from the box's faces; class 1 when the first half outweighs the second."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, 8, generator=gen)
    y = (x[:, :4].mean(1) > x[:, 4:].mean(1)).long()
    return TensorDataset(x, y)


class Blobs(pl.LightningModule):
    """A linear or two-layer classifier of :func:`blobs`."""

    def __init__(self, hidden: int = 0, n_test: int = 64) -> None:
        super().__init__()
        self.n_test = n_test
        torch.manual_seed(0)
        self.net = (
            nn.Linear(8, 2)
            if hidden == 0
            else nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean(), reduce_fx="mean")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(blobs(256, seed=1), batch_size=32, shuffle=True)

    def test_dataloader(self):
        return DataLoader(blobs(self.n_test), batch_size=16)


def hand_weights(module: Blobs) -> None:
    with torch.no_grad():
        module.net.weight.copy_(
            torch.tensor([[-1.0, -1, -1, -1, 1, 1, 1, 1], [1.0, 1, 1, 1, -1, -1, -1, -1]])
        )
        module.net.weight.mul_(torch.linspace(0.5, 1.5, 8))
        module.net.bias.zero_()


def margins(module: Blobs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True-class margin, and the L1 and L2 norms of the weight difference, for every test example."""
    x, y = blobs(module.n_test).tensors
    with torch.no_grad():
        z = module(x)
        margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, 1 - y[:, None]).squeeze(1)
    diff = (module.net.weight[1] - module.net.weight[0]).detach()
    return margin, diff.abs().sum(), diff.norm()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_linf_robust_accuracy_equals_the_closed_form_of_a_linear_model(tmp_path, attack):
    # for a linear two-class model the worst L∞ perturbation lowers the margin by exactly eps·‖w₁ − w₀‖₁;
    # FGSM and PGD both reach it (the inputs stay away from the box's faces)
    module = Blobs()
    hand_weights(module)
    epsilons = [0.0, 0.02, 0.05, 0.1]
    evaluation = AdversarialEvaluation(attack, epsilons=epsilons)
    (result,) = trainer(tmp_path, [evaluation]).test(module, verbose=False)
    margin, l1, _ = margins(module)
    assert result["adversarial/clean_acc"] == pytest.approx(float((margin > 0).float().mean()))
    assert result["adversarial/clean_acc"] == pytest.approx(result["test/acc"])
    for eps in epsilons:
        expected = float((margin > eps * l1).float().mean())
        assert result[f"adversarial/{attack}/acc@{eps:g}"] == pytest.approx(expected), eps
    assert evaluation.report.examples == 64
    assert evaluation.report.robust_accuracy[0.1] < evaluation.report.clean_accuracy  # the budgets bite


def test_carlini_wagner_robust_accuracy_brackets_the_closed_form_distances(tmp_path):
    # an example is robust at eps iff the found distance exceeds eps; CW finds the exact distance d or a
    # little more (Adam's step bounds its precision: 5% or 0.005 here), so the count lies between
    # #(d > eps) and #(1.05·d + 0.005 >= eps)
    module = Blobs(n_test=32)
    hand_weights(module)
    epsilons = [0.03, 0.06, 0.1]
    evaluation = AdversarialEvaluation("carlini_wagner", epsilons=epsilons, steps=150)
    (result,) = trainer(tmp_path, [evaluation]).test(module, verbose=False)
    margin, _, l2 = margins(module)
    distance = margin / l2
    for eps in epsilons:
        got = result[f"adversarial/carlini_wagner/acc@{eps:g}"]
        low = float((distance > eps).float().mean())
        high = float(((distance * 1.05 + 0.005 >= eps) & (distance > 0)).float().mean())
        assert low - 1e-6 <= got <= high + 1e-6, (eps, low, got, high)
        assert high - low < 0.15  # the bracket is narrow: the check can fail
    assert result["adversarial/carlini_wagner/acc@0.1"] < result["adversarial/clean_acc"]


def test_dense_and_pruned_models_report_robust_accuracy(tmp_path):
    reports = {}
    for name, callbacks in {"dense": [], "pruned": [SNIPCallback(limit=0.8)]}.items():
        pl.seed_everything(0, verbose=False)
        module = Blobs(hidden=16)
        trainer(tmp_path / name, callbacks, max_epochs=12).fit(module)
        evaluation = AdversarialEvaluation(
            "carlini_wagner", epsilons=[0.0, 0.05, 0.2, 1.0], max_batches=2, steps=30, binary_steps=5
        )
        (result,) = trainer(tmp_path / name, [evaluation]).test(module, verbose=False)
        report = evaluation.report
        assert report.examples == 32  # two batches of 16
        assert report.clean_accuracy > 0.8  # both learned the task
        assert result["adversarial/carlini_wagner/acc@0"] == pytest.approx(report.clean_accuracy)
        accs = [report.robust_accuracy[e] for e in (0.0, 0.05, 0.2, 1.0)]
        assert accs == sorted(accs, reverse=True)  # larger budgets never leave more examples robust
        assert accs[-1] < report.clean_accuracy
        reports[name] = report
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)  # the second model really is pruned
    assert reports["dense"].metrics().keys() == reports["pruned"].metrics().keys()


def test_batches_that_are_not_inputs_and_labels_are_refused(tmp_path):
    class Unlabelled(Blobs):
        def test_step(self, batch, batch_idx):
            return None

        def test_dataloader(self):
            return DataLoader(TensorDataset(blobs(16).tensors[0]), batch_size=8)

    with pytest.raises(PruningError, match=r"AdversarialEvaluation: test batches must be \(inputs, labels"):
        trainer(tmp_path, [AdversarialEvaluation("fgsm", epsilons=[0.1])]).test(Unlabelled(), verbose=False)


def test_inputs_outside_the_box_are_refused_with_their_range(tmp_path):
    evaluation = AdversarialEvaluation("pgd", epsilons=[0.1], low=0.0, high=0.5)
    match = r"AdversarialEvaluation\(low=0.0, high=0.5\): the test inputs range over \[0.2"
    with pytest.raises(PruningError, match=match):
        trainer(tmp_path, [evaluation]).test(Blobs(), verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"attack": "deepfool"},
            r"`AdversarialEvaluation\(attack='deepfool'\)` is invalid: `attack` must be one",
        ),
        ({"epsilons": []}, r"`AdversarialEvaluation\(epsilons=\[\]\)` is invalid"),
        ({"epsilons": [0.1, -1]}, r"`AdversarialEvaluation\(epsilons=-1\)` is invalid"),
        ({"max_batches": 0}, r"`AdversarialEvaluation\(max_batches=0\)` is invalid: `max_batches` must be"),
        ({"steps": 0}, r"`AdversarialEvaluation\(steps=0\)` is invalid"),
        ({"binary_steps": 1.5}, r"`AdversarialEvaluation\(binary_steps=1.5\)` is invalid"),
        ({"low": 1.0, "high": 0.0}, r"`AdversarialEvaluation\(high=0.0\)` is invalid: `high` must be"),
        ({"seed": -1}, r"`AdversarialEvaluation\(seed=-1\)` is invalid"),
    ],
)
def test_invalid_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(PruningError, match=match):
        AdversarialEvaluation(**kwargs)


def test_defaults_pickle_and_state_key():
    cw, pgd = AdversarialEvaluation(), AdversarialEvaluation("pgd")
    assert cw.epsilons[:4] == (0.25, 0.5, 0.75, 1.0) and cw.epsilons[-1] == 10.0  # the seed's L2 budgets
    assert pgd.epsilons == (0.05, 0.1, 0.2, 0.3) and pgd.steps == 10 and cw.steps == 100
    assert cw.state_key != pgd.state_key
    again = pickle.loads(pickle.dumps(pgd))
    assert (again.attack, again.epsilons, again.state_key) == (pgd.attack, pgd.epsilons, pgd.state_key)


@pytest.mark.slow  # two fresh processes: about 80 s on a busy 2-core machine
def test_two_ranks_sum_their_counts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(tmp_path / "adversarial0.pt", weights_only=True)
    b = torch.load(tmp_path / "adversarial1.pt", weights_only=True)
    assert a == b  # both ranks log the same, summed figures
    assert a["examples"] == 64.0  # each rank attacked half of the 64 test examples
    module = Blobs()
    hand_weights(module)
    margin, l1, _ = margins(module)
    assert a["adversarial/fgsm/acc@0.05"] == pytest.approx(float((margin > 0.05 * l1).float().mean()))


def test_the_documented_yaml_builds_the_callback():
    # the LightningCLI form of docs/callbacks/adversarial.md, parsed and instantiated by jsonargparse
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[pl.Callback])
    entry = {
        "class_path": "lightning_prune.AdversarialEvaluation",
        "init_args": {"attack": "pgd", "epsilons": [0.05, 0.1], "max_batches": 10},
    }
    (evaluation,) = parser.instantiate_classes(parser.parse_object({"callbacks": [entry]})).callbacks
    assert isinstance(evaluation, AdversarialEvaluation)
    assert (evaluation.attack, evaluation.epsilons, evaluation.max_batches) == ("pgd", (0.05, 0.1), 10)


def test_checkpointed_model_is_evaluated_with_ckpt_path(tmp_path):
    # the callback is inert during fit and has no state of its own in the checkpoint
    module = Blobs(hidden=8)
    evaluation = AdversarialEvaluation("fgsm", epsilons=[0.05])
    fit = trainer(tmp_path, [evaluation], max_epochs=2, enable_checkpointing=True)
    fit.fit(module)
    assert evaluation.report is None
    checkpoint = torch.load(fit.checkpoint_callback.best_model_path, weights_only=False)
    assert not any("AdversarialEvaluation" in key for key in checkpoint.get("callbacks", {}))
    (result,) = fit.test(module, ckpt_path="best", verbose=False)
    assert evaluation.report.examples == 64
    assert result["adversarial/fgsm/acc@0.05"] <= result["adversarial/clean_acc"]
