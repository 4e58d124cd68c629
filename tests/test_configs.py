"""Every YAML config under examples/ parses and runs a fast_dev_run on tiny fake data (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_prune.cli as cli_module
from lightning_prune import PruningCallback, SlimmingL1Callback, load_pruned_checkpoint
from lightning_prune.cli import main
from lightning_prune.examples import ImageClassifier

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SLIMMING = sorted(p.stem for p in (EXAMPLES / "slimming").glob("*.yaml") if not p.stem.endswith("_finetune"))


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["lightning-prune"])
    monkeypatch.chdir(tmp_path)  # configs write relative paths (outputs/...)


@pytest.fixture
def captured(monkeypatch):
    instances = []

    class Recording(cli_module._PruneCLI):
        def __init__(self, *args, **kwargs):
            instances.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli_module, "_PruneCLI", Recording)
    return instances


def fast(root: Path) -> list[str]:
    """Tiny, offline variants of a config: fake data, a quarter-width model, one batch of 4."""
    return [
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        f"--data.init_args.root={root}",
        "--data.init_args.download=false",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
        '--model.init_args.model_kwargs={"width": 0.25}',
    ]


def test_every_slimming_recipe_has_its_fine_tune_stage():
    assert SLIMMING == ["densenet40_cifar10", "resnet164_cifar10", "resnet18_cifar100", "vgg19_cifar10"]
    for name in SLIMMING:
        assert (EXAMPLES / "slimming" / f"{name}_finetune.yaml").is_file()


@pytest.mark.parametrize("name", SLIMMING)
def test_slimming_three_stages_run(name, fake_root, no_md5, captured, tmp_path):
    config = EXAMPLES / "slimming" / f"{name}.yaml"
    main(["fit", "--config", str(config), *fast(fake_root)])
    slim = next(cb for cb in captured[0].trainer.callbacks if isinstance(cb, SlimmingL1Callback))
    assert slim.pruned and slim.report.channels_removed > 0
    pruned = tmp_path / "outputs" / "slimming" / name / "pruned.pt"
    assert pruned.is_file()

    main(["fit", "--config", str(config.with_name(f"{name}_finetune.yaml")), *fast(fake_root)])
    tuned = captured[1].model
    assert isinstance(tuned, ImageClassifier)
    small = load_pruned_checkpoint(ImageClassifier, pruned)
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }
    dense = ImageClassifier(
        model=tuned.hparams.model, num_classes=tuned.hparams.num_classes, model_kwargs={"width": 0.25}
    )
    assert sum(p.numel() for p in tuned.parameters()) < sum(p.numel() for p in dense.parameters())
    final = load_pruned_checkpoint(ImageClassifier, tmp_path / "outputs" / "slimming" / name / "finetuned.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(final.eval()(x), tuned.eval()(x))


SEED_CONFIGS = sorted(
    str(p.relative_to(EXAMPLES))
    for folder in ("snipit", "snip", "sensitivity")
    for p in (EXAMPLES / folder).glob("*.yaml")
)


def test_the_seed_commands_all_have_a_config():
    names = {Path(p).stem for p in SEED_CONFIGS}
    assert {
        "snapit_vgg16_cifar10",
        "snipit_resnet18_cifar10",
        "snipit_during_resnet18_cifar10",
        "snip_vgg16_bn_cifar10",
        "snip_resnet50_cifar10",
        "snip_mobilenetv2_cifar10",
        "hoyersquare_resnet18_cifar10",
        "grouphoyersquare_vgg16_cifar10",
        "l0_vgg16_cifar10",
        "resnet56_cifar10",
        "resnet56_cifar100",
        "vgg16_cifar10",
        "vgg16_cifar100",
        "mobilenetv2_imagenette",
    } <= names


@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_seed_configs_run_on_fake_data(config, fake_root, no_md5, captured, tmp_path):
    args = fast(fake_root)
    if "torchvision." in (EXAMPLES / config).read_text():
        args = [a for a in args if "model_kwargs" not in a]  # torchvision models have no width knob
    if "ImagenetteDataModule" in (EXAMPLES / config).read_text():  # 64 px instead of 160 px: 6x faster
        args += ["--data.init_args.image_size=64", "--model.init_args.input_size=[3, 64, 64]"]
    main(["fit", "--config", str(EXAMPLES / config), *args])
    (cli,) = captured
    pruners = [cb for cb in cli.trainer.callbacks if isinstance(cb, PruningCallback)]
    for pruner in pruners:
        if getattr(pruner, "block_groups", None):  # SensitivityPruner: the first block ran its one batch
            assert pruner.iteration == 1 or pruner.block >= 1
        # "during" events are epochs away; a fast_dev_run only checks the wiring
        if getattr(pruner, "when", None) == "before":
            assert pruner.step == len(pruner.schedule)
    saved = tmp_path / "outputs" / Path(config).parent / Path(config).stem / "shrunk.pt"
    model = load_pruned_checkpoint(ImageClassifier, saved)
    assert model(torch.zeros(2, *model.hparams.input_size)).shape == (2, model.hparams.num_classes)
