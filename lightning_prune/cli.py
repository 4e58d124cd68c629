"""The ``lightning-prune`` command: Lightning's CLI, with every pruning callback available from YAML.

Any :class:`~lightning.pytorch.LightningModule` and
:class:`~lightning.pytorch.LightningDataModule` can be given by ``class_path``; the pruning callbacks
are ordinary trainer callbacks, so one config file describes the whole prune-train-shrink job::

    # examples/digits_snip.yaml (abridged)
    model:
      class_path: lightning_prune.examples.DigitsClassifier
    data:
      class_path: lightning_prune.examples.DigitsDataModule
    trainer:
      max_epochs: 60
      callbacks:
        - class_path: lightning_prune.SNIPCallback
          init_args: {limit: 0.7, structured: true}
        - class_path: lightning_prune.ShrinkOnFitEnd
          init_args: {save_path: outputs/digits/shrunk.pt}

Run it with::

    lightning-prune fit --config examples/digits_snip.yaml
    lightning-prune fit --config examples/digits_snip.yaml --trainer.max_epochs=3   # override one value
    lightning-prune fit --help                                                        # every option

``lightning-prune`` accepts the ``fit``, ``validate``, ``test`` and ``predict`` subcommands of
:class:`~lightning.pytorch.cli.LightningCLI`. Modules configure their own optimizers
(``configure_optimizers``); ``--optimizer``/``--lr_scheduler`` are also available, as in Lightning.
The resolved config is saved next to the logs (``config.yaml``), overwriting an older one.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["main"]


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-prune`` command line.

    Args:
        args: The command line to parse instead of ``sys.argv[1:]``: a list of strings (as typed,
            e.g. ``["fit", "--config", "job.yaml"]``) or a dict of already-parsed options. ``None`` reads
            ``sys.argv``.

    Raises:
        SystemExit: After ``--help``, or with a non-zero status when the command line or a config file
            is invalid (the message names the bad option).

    Examples:
        Run one fast development batch of the digits job from Python::

            from lightning_prune.cli import main

            main(["fit", "--config", "examples/digits_snip.yaml", "--trainer.fast_dev_run=true"])
    """
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":  # pragma: no cover - `python -m lightning_prune.cli`
    main()
