"""ShrinkOnFitEnd fails early or loses nothing: save_path and tracing checked before training, the unshrunk
weights saved when shrinking fails, a saved file that Lightning evaluates and torch loads with
weights_only=True, and unreadable files named."""

import os
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_prune.callbacks.shrink as shrink_module
from lightning_prune import PruningError, ShrinkOnFitEnd, SNIPCallback, load_pruned_checkpoint, shrink
from lightning_prune.structure import _engine
from tests.helpers.modules import TinyModule, synthetic_data, trainer

X = torch.randn(4, 3, 8, 8)


def quick_shrinker(**kwargs) -> ShrinkOnFitEnd:
    return ShrinkOnFitEnd(latency_batch_size=4, latency_repeats=1, **kwargs)


def same_outputs(a: nn.Module, b: nn.Module) -> None:
    a.eval(), b.eval()
    torch.testing.assert_close(a(X), b(X))


class EvalModule(TinyModule):
    """TinyModule with a test loop too."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def test_dataloader(self):
        return self.val_dataloader()


class PathModule(TinyModule):
    """A module whose hyperparameters hold paths and a value torch's weights_only loading refuses."""

    def __init__(self, data_dir: str | Path = "data", options: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir)


class FlatModule(pl.LightningModule):
    """A linear classifier over flattened images: one output Linear layer, or a bare matrix product."""

    def __init__(self, linear_layer: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        if linear_layer:
            self.head = nn.Linear(3 * 8 * 8, 4)
        else:
            self.weight = nn.Parameter(torch.zeros(3 * 8 * 8, 4))
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(x) if self.hparams.linear_layer else x @ self.weight

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(synthetic_data(32), batch_size=16)


# -- 1. save_path is checked in setup ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("below", "error"), [("small.pt", "FileExistsError"), ("sub/small.pt", "NotADirectoryError")]
)
def test_a_save_path_under_a_file_is_refused_before_training(tmp_path, below, error):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    save_path = blocker / below
    module = TinyModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = trainer(tmp_path, [quick_shrinker(save_path=save_path)])
    with pytest.raises(PruningError, match=r"`ShrinkOnFitEnd\(save_path=") as info:
        run.fit(module)
    assert f"save_path={str(save_path)!r})` cannot be written: {error}: " in str(info.value)
    assert run.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # no training happened
    assert blocker.read_text() == "a file, not a folder"


# -- 2a. the model is traced at the start of fit -----------------------------------------------------------
def test_a_model_shrink_cannot_work_on_is_refused_before_training(tmp_path):
    module = FlatModule(linear_layer=False)
    with pytest.raises(PruningError, match="nothing to prune"):  # what shrink would raise at the end
        shrink(FlatModule(linear_layer=False), X)
    run = trainer(tmp_path, [quick_shrinker(save_path=tmp_path / "small.pt")])
    with pytest.raises(
        PruningError, match=r"could not shrink FlatModule .* stops before training: .*nothing"
    ):
        run.fit(module)
    assert run.global_step == 0
    assert torch.count_nonzero(module.weight) == 0  # still as built: no optimizer step
    assert not (tmp_path / "small.pt").exists()


def test_an_engine_failure_while_tracing_is_reported_before_training(tmp_path, monkeypatch):
    def broken(graph):
        raise ZeroDivisionError("engine bug")

    monkeypatch.setattr(_engine._shape_infer, "init_shape_information", broken)
    run = trainer(tmp_path, [quick_shrinker()])
    with pytest.raises(PruningError, match=r"stops before training: Could not trace .*ZeroDivisionError"):
        run.fit(TinyModule())
    assert run.global_step == 0


def test_a_model_with_nothing_prunable_still_trains_and_shrinks_nothing(tmp_path):
    # Its only layer produces the output: nothing to remove, which is no reason to refuse it.
    module = FlatModule(linear_layer=True)
    shrinker = quick_shrinker(save_path=tmp_path / "small.pt")
    run = trainer(tmp_path, [shrinker])
    run.fit(module)
    assert run.global_step == 2
    assert shrinker.report.channels_removed == 0
    same_outputs(load_pruned_checkpoint(FlatModule, tmp_path / "small.pt"), module)


# -- 2b. a failing shrink at the end of fit loses nothing --------------------------------------------------
@pytest.mark.parametrize("with_save_path", [True, False])
def test_a_failing_shrink_saves_the_unshrunk_weights_and_says_where(tmp_path, monkeypatch, with_save_path):
    def failing_shrink(model, example_inputs):
        raise PruningError("the engine gave up")

    monkeypatch.setattr(shrink_module, "shrink", failing_shrink)
    pl.seed_everything(0)
    module = TinyModule()
    snip = SNIPCallback(limit=0.5)
    save_path = tmp_path / "out" / "small.pt"
    shrinker = quick_shrinker(save_path=save_path if with_save_path else None)
    run = trainer(tmp_path / "root", [snip, shrinker])
    with pytest.raises(PruningError, match=r"could not shrink TinyModule at the end of fit") as info:
        run.fit(module)

    rescued = (
        save_path.with_name("small.unshrunk.pt") if with_save_path else tmp_path / "root" / "unshrunk.ckpt"
    )
    message = str(info.value)
    assert "(PruningError: the engine gave up)" in message
    assert f"saved to {str(rescued)!r}" in message
    assert isinstance(info.value.__cause__, PruningError)
    assert run.global_step == 4  # the training ran to its end
    assert not save_path.exists()  # it is reserved for the shrunk model
    assert snip.masks == {}  # made permanent before shrinking
    raw = torch.load(rescued, weights_only=True)
    state = module.state_dict()
    assert raw["state_dict"].keys() == state.keys()
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in state.items())
    assert (raw["state_dict"]["model.features.0.weight"] == 0).any()  # the pruned zeros are in it
    same_outputs(load_pruned_checkpoint(TinyModule, rescued), module)


# -- 3. the saved file is a Lightning checkpoint for validate/test -----------------------------------------
@pytest.fixture(scope="module")
def shrunk_run(tmp_path_factory):
    """A structured SNIP fit whose shrunk model ShrinkOnFitEnd saved into a folder it had to create."""
    tmp_path = tmp_path_factory.mktemp("shrunk")
    pl.seed_everything(0)
    module = EvalModule()
    path = tmp_path / "out" / "nested" / "small.pt"
    run = trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True), quick_shrinker(save_path=path)])
    run.fit(module)
    return run, module, path


def test_the_saved_file_is_created_in_its_new_folder_without_leftovers(shrunk_run):
    _, _, path = shrunk_run
    assert sorted(p.name for p in path.parent.iterdir()) == ["small.pt"]  # no probe, no .tmp left


def test_the_saved_file_evaluates_with_ckpt_path_in_the_same_process(shrunk_run):
    run, module, path = shrunk_run
    raw = torch.load(path, weights_only=True)
    assert raw["pytorch-lightning_version"] == pl.__version__
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    validated = run.validate(module, ckpt_path=path, verbose=False)
    tested = run.test(module, ckpt_path=path, verbose=False)
    assert set(validated[0]) == {"val/acc"} and set(tested[0]) == {"test/acc"}
    assert validated[0]["val/acc"] == tested[0]["test/acc"]  # same data, same weights
    assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items())


def test_the_saved_file_evaluates_into_a_fresh_module_through_a_pruning_callback(shrunk_run, tmp_path):
    # The resizing is the pruning callbacks' load_state_dict pre-hook: without one on the trainer, a fresh
    # (unshrunk) module does not fit the weights; use load_pruned_checkpoint then.
    _, module, path = shrunk_run
    fresh = EvalModule()
    assert sum(p.numel() for p in fresh.parameters()) > sum(p.numel() for p in module.parameters())
    run = trainer(tmp_path, [SNIPCallback(limit=0.5, structured=True)])
    validated = run.validate(fresh, ckpt_path=path, verbose=False)
    assert 0 <= validated[0]["val/acc"] <= 1
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in module.parameters())
    same_outputs(fresh, module)
    same_outputs(load_pruned_checkpoint(EvalModule, path), module)


# -- 4. hyperparameters are stored as types weights_only loading accepts -----------------------------------
def test_path_hyperparameters_are_saved_as_strings_and_the_module_rebuilds(tmp_path):
    pl.seed_everything(0)
    options = {"root": Path("/data/root"), "pick": slice(0, 2), "sizes": [1, (2, Path("a"))]}
    module = PathModule(data_dir=tmp_path / "data", options=options)
    save_path = tmp_path / "small.pt"
    with pytest.warns(UserWarning, match=r"hyperparameters options\.pick of PathModule as strings"):
        trainer(tmp_path, [quick_shrinker(save_path=save_path)]).fit(module)

    hparams = torch.load(save_path, weights_only=True)["hyper_parameters"]
    assert hparams["data_dir"] == str(tmp_path / "data")
    assert hparams["options"] == {"root": "/data/root", "pick": "slice(0, 2, None)", "sizes": [1, (2, "a")]}
    assert hparams["lr"] == 0.05 and hparams["scheduler"] is True
    loaded = load_pruned_checkpoint(PathModule, save_path)
    assert loaded.data_dir == tmp_path / "data"
    same_outputs(loaded, module)


# -- 5. unreadable checkpoints are named -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_checkpoint_is_named_in_the_error(shrunk_run, tmp_path, damage):
    _, _, path = shrunk_run
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    pattern = (
        rf"`load_pruned_checkpoint\(checkpoint_path={re.escape(repr(str(damaged)))}\)`: "
        r"torch\.load\(weights_only=True\) cannot read the file .* may be truncated or corrupted"
    )
    with pytest.raises(PruningError, match=pattern) as info:
        load_pruned_checkpoint(EvalModule, damaged)
    assert info.value.__cause__ is not None


def test_a_missing_checkpoint_stays_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pruned_checkpoint(EvalModule, tmp_path / "absent.pt")
