"""The ``lightning-prune`` command: the main job's YAML runs, and bad configs fail with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import lightning_prune.cli as cli_module
from lightning_prune import ShrinkOnFitEnd, SNAPit, SNIPCallback, load_pruned_checkpoint
from lightning_prune.cli import main
from lightning_prune.examples import DigitsClassifier

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_snip.yaml"
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

    class Recording(LightningCLI):
        def __init__(self, *args, **kwargs) -> None:
            instances.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_module, "LightningCLI", Recording)
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


def test_unknown_callback_argument_is_a_usage_error(in_tmp, capsys):
    bad = write_config(
        in_tmp / "bad.yaml",
        lambda c: pruning_callback_args(c, "SNIPCallback").update(limmit=0.5),
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), *FAST])
    assert exit_info.value.code != 0
    assert "limmit" in capsys.readouterr().err


def test_wrongly_typed_callback_argument_is_a_usage_error(in_tmp, capsys):
    bad = write_config(
        in_tmp / "bad.yaml",
        lambda c: pruning_callback_args(c, "SNIPCallback").update(limit="most"),
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), *FAST])
    assert exit_info.value.code != 0
    assert "limit" in capsys.readouterr().err


def test_out_of_range_callback_argument_names_the_argument(in_tmp):
    bad = write_config(
        in_tmp / "bad.yaml",
        lambda c: pruning_callback_args(c, "SNIPCallback").update(limit=1.5),
    )
    # the callback's own PruningError, raised while the config is instantiated (jsonargparse may wrap
    # it in a ValueError that quotes it), before any data is loaded or any step runs
    with pytest.raises(
        ValueError, match=r"`SNIPCallback\(limit=1.5\)` is invalid: `limit` must be in \[0, 1\)"
    ):
        main(["fit", "--config", str(bad), *FAST])


SNAPIT = CONFIG.with_name("digits_snapit.yaml")


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
