"""The ``lightning-prune`` command: the main job's YAML runs, and bad configs fail with a message."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import lightning_prune.cli as cli_module
from lightning_prune import PruningError, ShrinkOnFitEnd, SNAPit, SNIPCallback, load_pruned_checkpoint
from lightning_prune.cli import main
from lightning_prune.examples import DigitsClassifier

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_snip.yaml"
SNAPIT = CONFIG.with_name("digits_snapit.yaml")
FAST = ["--trainer.fast_dev_run=true", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """`main(args)` must not see pytest's own command line (LightningCLI warns when both are set)."""
    monkeypatch.setattr("sys.argv", ["lightning-prune"])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder: the job writes relative paths (``outputs/...``)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def captured(monkeypatch) -> list[LightningCLI]:
    """The LightningCLI instances `main` builds (main returns None, as a console script must)."""
    instances: list[LightningCLI] = []

    class Recording(cli_module._PruneCLI):
        def __init__(self, *args, **kwargs) -> None:
            instances.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_module, "_PruneCLI", Recording)
    return instances


def write_config(path: Path, edit) -> Path:
    config = yaml.safe_load(CONFIG.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return path


def pruning_callback_args(config: dict, name: str) -> dict:
    (entry,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    return entry.setdefault("init_args", {})


def test_main_job_config_declares_the_documented_job():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["seed_everything"] == 0
    assert config["model"]["class_path"] == "lightning_prune.examples.DigitsClassifier"
    assert config["data"]["class_path"] == "lightning_prune.examples.DigitsDataModule"
    assert pruning_callback_args(config, "SNIPCallback") == {"limit": 0.7, "structured": True}
    assert pruning_callback_args(config, "ShrinkOnFitEnd") == {"save_path": "outputs/digits/shrunk.pt"}


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in out


def public_callbacks() -> list[str]:
    import lightning.pytorch as pl

    import lightning_prune

    return [
        name
        for name in lightning_prune.__all__
        if isinstance(getattr(lightning_prune, name), type)
        and issubclass(getattr(lightning_prune, name), pl.Callback)
    ]


def test_help_introduces_the_tool_and_lists_what_is_in_the_box(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Prune a PyTorch Lightning model" in out
    assert "lightning-prune list" in out
    assert len(public_callbacks()) >= 7
    for name in public_callbacks():
        assert f"lightning_prune.{name} " in out
    for name in ("DigitsClassifier", "DigitsDataModule", "ImageClassifier", "CIFAR10DataModule"):
        assert f"lightning_prune.examples.{name} " in out


def test_list_follows_the_public_api(capsys, monkeypatch):
    import lightning.pytorch as pl

    import lightning_prune

    class BrandNewPruner(pl.Callback):
        """A callback another change adds to the public API."""

    monkeypatch.setattr(lightning_prune, "BrandNewPruner", BrandNewPruner, raising=False)
    monkeypatch.setattr(lightning_prune, "__all__", [*lightning_prune.__all__, "BrandNewPruner"])
    with pytest.raises(SystemExit) as exit_info:
        main(["list"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.split() == ["lightning_prune.BrandNewPruner", "A", "callback", "another", *line.split()[4:]]
        for line in lines
    )
    assert not any("lightning_prune.PruneResult" in line for line in lines)  # not a callback


def test_model_help_lists_the_example_modules(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "lightning_prune.examples.DigitsClassifier" in capsys.readouterr().out


def test_fit_help_lists_the_trainer_callbacks_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.callbacks" in capsys.readouterr().out


def test_main_job_runs_prunes_shrinks_and_saves(in_tmp, captured, capsys):
    main(["fit", "--config", str(CONFIG), *FAST])

    (cli,) = captured
    snip = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SNIPCallback))
    assert (snip.limit, snip.structured) == (0.7, True)
    assert any(isinstance(cb, ShrinkOnFitEnd) for cb in cli.trainer.callbacks)
    assert isinstance(cli.model, DigitsClassifier)

    dense = sum(p.numel() for p in DigitsClassifier().parameters())
    shrunk = sum(p.numel() for p in cli.model.parameters())
    assert shrunk < 0.5 * dense  # 70% of the hidden channels go; the 10 outputs stay
    assert cli.model.model[-1].out_features == 10

    saved = in_tmp / "outputs" / "digits" / "shrunk.pt"
    assert saved.is_file()
    loaded = load_pruned_checkpoint(DigitsClassifier, saved)
    x = torch.randn(4, 1, 8, 8)
    cli.model.eval()
    torch.testing.assert_close(loaded(x), cli.model(x))
    assert "params" in capsys.readouterr().out


def test_print_config_resolves_every_class(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["max_epochs"] == yaml.safe_load(CONFIG.read_text())["trainer"]["max_epochs"]
    assert resolved["model"]["init_args"]["width"] == 32
    assert pruning_callback_args(resolved, "SNIPCallback")["limit"] == 0.7


def snip_config(folder: Path, **init_args) -> Path:
    """The main job's config with SNIPCallback's arguments updated."""
    return write_config(
        folder / "bad.yaml", lambda c: pruning_callback_args(c, "SNIPCallback").update(init_args)
    )


def failing(capsys, args: list[str]) -> tuple[int, str]:
    """The exit status and the stderr of a command that must fail."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_unknown_callback_argument_is_a_usage_error(in_tmp, capsys):
    code, err = failing(capsys, ["fit", "--config", str(snip_config(in_tmp, limmit=0.5)), *FAST])
    assert code != 0
    assert "limmit" in err


def test_wrongly_typed_callback_argument_is_a_usage_error(in_tmp, capsys):
    code, err = failing(capsys, ["fit", "--config", str(snip_config(in_tmp, limit="most")), *FAST])
    assert code != 0
    assert "limit" in err


def test_out_of_range_callback_argument_is_a_short_error_with_its_config_key(in_tmp, capsys):
    # the callback's own PruningError, raised while the config is instantiated, before any data is loaded
    code, err = failing(capsys, ["fit", "--config", str(snip_config(in_tmp, limit=70)), *FAST])
    assert code == 2
    assert "`SNIPCallback(limit=70.0)` is invalid: `limit` must be in [0, 1); got 70.0." in err
    assert "config key: trainer.callbacks[2].init_args.limit" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 3


def test_debug_flag_raises_the_configuration_error_with_its_traceback(in_tmp):
    bad = snip_config(in_tmp, limit=1.5)
    # jsonargparse may wrap the PruningError in a ValueError that quotes it
    with pytest.raises(
        ValueError, match=r"`SNIPCallback\(limit=1.5\)` is invalid: `limit` must be in \[0, 1\)"
    ):
        main(["fit", "--config", str(bad), *FAST, "--debug"])


def test_setup_error_is_short(in_tmp, capsys):
    # SNAP-it prunes 5 times up to the end of epoch 12: a 3-epoch budget is refused in setup
    code, err = failing(capsys, ["fit", "--config", str(SNAPIT), "--trainer.max_epochs=3"])
    assert code == 2
    assert "the trainer stops after max_epochs=3" in err
    assert "Traceback" not in err


def test_snapit_during_config_smoke_runs(in_tmp, captured):
    main(["fit", "--config", str(SNAPIT), *FAST])
    (cli,) = captured
    snapit = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SNAPit))
    assert (snapit.limit, snapit.when, snapit.event_epochs()) == (0.8, "during", [4, 6, 8, 10, 12])


def test_snapit_during_config_shrinks_at_each_event(in_tmp, captured):
    main(["fit", "--config", str(SNAPIT), "--trainer.max_epochs=12", "--trainer.logger=false"])
    (cli,) = captured
    snapit = next(cb for cb in cli.trainer.callbacks if isinstance(cb, SNAPit))
    assert snapit.step == 5
    assert snapit.report.node_sparsity == pytest.approx(0.8, abs=0.02)
    dense = sum(p.numel() for p in DigitsClassifier().parameters())
    assert sum(p.numel() for p in cli.model.parameters()) < 0.2 * dense
    loaded = load_pruned_checkpoint(DigitsClassifier, in_tmp / "outputs" / "digits_snapit" / "shrunk.pt")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in cli.model.parameters())


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_threads_pick_one_for_tiny_models_unless_omp_num_threads_is_set(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty: as if unset
    torch.set_num_threads(2)
    assert cli_module.pick_num_threads("auto", torch.nn.Linear(10, 10)) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    big = torch.nn.Linear(1000, cli_module.TINY_MODEL_PARAMS // 1000)  # just over the limit with the bias
    assert cli_module.pick_num_threads("auto", big) == 2
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))  # size unknown until the first batch: not called tiny
    assert cli_module.pick_num_threads("auto", lazy) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli_module.pick_num_threads("auto", torch.nn.Linear(10, 10)) == 2
    assert cli_module.pick_num_threads(3, None) == 3
    assert cli_module.pick_num_threads(None, torch.nn.Linear(10, 10)) == 3


@pytest.mark.parametrize("bad", [0, -1, True, "many"])
def test_invalid_num_threads_names_the_option(bad, restore_threads):
    with pytest.raises(PruningError, match=r"`num_threads` must be an int >= 1, 'auto' or null; got "):
        cli_module.pick_num_threads(bad, None)


def test_num_threads_option_sets_torch_threads(in_tmp, restore_threads, caplog):
    torch.set_num_threads(2)
    with caplog.at_level("INFO"):
        main(["fit", "--config", str(CONFIG), *FAST, "--num_threads=1"])
    assert torch.get_num_threads() == 1
    assert "lightning-prune: 1 CPU thread(s) (num_threads=1)." in caplog.text


def test_zero_threads_is_a_short_error(in_tmp, restore_threads, capsys):
    code, err = failing(capsys, ["fit", "--config", str(CONFIG), *FAST, "--num_threads=0"])
    assert code == 2
    assert "`num_threads` must be an int >= 1, 'auto' or null; got 0" in err


def test_same_seed_and_threads_give_the_same_model(in_tmp, captured, restore_threads):
    # SNIP scores, the pruned architecture, 8 training steps: bitwise equal for one seed and thread count
    run = ["fit", "--config", str(CONFIG), "--trainer.logger=false", "--trainer.max_steps=8"]
    run += ["--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", "--num_threads=1"]
    main(run)
    main(run)
    first, second = (cli.model.state_dict() for cli in captured)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert sum(p.numel() for p in captured[0].model.parameters()) < 20_000  # pruned


def test_missing_example_extra_is_a_short_error(in_tmp, capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed
    code, err = failing(capsys, ["fit", "--config", str(CONFIG), *FAST])
    assert code == 2
    assert "The digits example needs scikit-learn" in err
    assert "pip install '.[examples]'" in err
    assert "Traceback" not in err


def test_lightning_misconfiguration_is_a_short_error(in_tmp, capsys):
    # the config lists RichProgressBar: Lightning refuses enable_progress_bar=false when the trainer is built
    no_bar = "--trainer.enable_progress_bar=false"
    code, err = failing(capsys, ["fit", "--config", str(CONFIG), *FAST, no_bar])
    assert code == 2
    assert "found `RichProgressBar` in callbacks list" in err
    assert "Traceback" not in err
