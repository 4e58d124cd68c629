"""The ``lightning-prune`` command: Lightning's CLI, with every pruning callback available from YAML.

Any :class:`~lightning.pytorch.LightningModule` and
:class:`~lightning.pytorch.LightningDataModule` can be given by ``class_path``; the pruning callbacks
are ordinary trainer callbacks, so one config file describes the whole prune-train-shrink job:

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

Run it with:

    lightning-prune fit --config examples/digits_snip.yaml
    lightning-prune fit --config examples/digits_snip.yaml --trainer.max_epochs=3   # override one value
    lightning-prune fit --help                                                        # every option
    lightning-prune list                                   # the callbacks and example modules in the box

``lightning-prune`` accepts the ``fit``, ``validate``, ``test`` and ``predict`` subcommands of
:class:`~lightning.pytorch.cli.LightningCLI`, and ``list``. Modules configure their own optimizers
(``configure_optimizers``); ``--optimizer``/``--lr_scheduler`` are also available, as in Lightning.
The resolved config is saved next to the logs (``config.yaml``), overwriting an older one.

Two options of its own:

- ``--num_threads`` (or ``num_threads:`` in the config): the CPU threads torch uses. The default,
  ``auto``, keeps ``OMP_NUM_THREADS`` when it is set, and otherwise uses 1 thread for models under
  :data:`TINY_MODEL_PARAMS` parameters (for them a second thread only adds synchronisation: the digits
  jobs run several times faster) and torch's default for larger ones. Results are reproducible for a given
  ``seed_everything`` and thread count; a different thread count changes the order of floating-point
  sums, and so the numbers a long run ends at.
- ``--debug``: show the full traceback of a configuration mistake. Without it, a
  :class:`~lightning_prune.PruningError` (an invalid argument, a callback that does not fit the model or
  trainer) prints its message and the config key it comes from, and the command exits with status 2;
  so do Lightning's ``MisconfigurationException`` and a missing optional dependency of an example.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import lightning_prune
from lightning_prune._validate import invalid
from lightning_prune.errors import PruningError

__all__ = ["TINY_MODEL_PARAMS", "catalogue", "main", "pick_num_threads"]

TINY_MODEL_PARAMS = 1_000_000
"""Models with fewer parameters train on 1 CPU thread under ``--num_threads=auto``."""

DESCRIPTION = """\
Prune a PyTorch Lightning model with callbacks and physically shrink it.
Lightning's CLI: a YAML config gives the model, the data and the trainer, whose callbacks prune.
Start with: lightning-prune fit --config examples/digits_snip.yaml
What is in the box: lightning-prune list (also at the end of this help)"""
DEBUG_FLAG = "--debug"


def _first_line(obj: object) -> str:
    return (inspect.getdoc(obj) or "").split("\n", 1)[0].replace("``", "")


def _public(module: Any, base: type) -> Iterator[tuple[str, type]]:
    for name in sorted(getattr(module, "__all__", ())):
        obj = getattr(module, name, None)
        if isinstance(obj, type) and issubclass(obj, base):
            yield f"{module.__name__}.{name}", obj


def catalogue() -> str:
    """What is in the box: the pruning callbacks and the example modules, one line each.

    Derived from ``lightning_prune.__all__`` (every :class:`~lightning.pytorch.Callback` exported there)
    and ``lightning_prune.examples.__all__``, so a callback added to the public API is listed without
    editing the CLI.

    Returns:
        The text ``lightning-prune list`` prints and ``lightning-prune --help`` ends with.

    Examples:
        >>> from lightning_prune.cli import catalogue
        >>> "lightning_prune.SNIPCallback" in catalogue()
        True
    """
    import lightning_prune.examples as examples

    sections = [
        ("Pruning callbacks (trainer.callbacks, class_path)", _public(lightning_prune, pl.Callback)),
        ("Example models (model, class_path)", _public(examples, pl.LightningModule)),
        ("Example data (data, class_path)", _public(examples, pl.LightningDataModule)),
    ]
    lines = []
    for title, entries in sections:
        lines.append(f"{title}:")
        lines += [f"  {path:<45} {_first_line(cls)}" for path, cls in entries]
        lines.append("")
    lines += [
        "Example configs: examples/*.yaml in the repository (1,797 digits from scikit-learn, no download):",
        "  lightning-prune fit --config examples/digits_snip.yaml",
        "One class's arguments: lightning-prune fit --model.help CLASS (or --data.help CLASS)",
    ]
    return "\n".join(lines)


def pick_num_threads(setting: int | str | None, model: torch.nn.Module | None) -> int:
    """Set torch's CPU threads for ``setting`` (``--num_threads``) and return the count in use.

    Args:
        setting: An int >= 1: that many threads. ``None``: torch's default, untouched. ``"auto"``: keep
            ``OMP_NUM_THREADS`` if it is set (not empty); otherwise 1 thread when ``model`` has fewer than
            :data:`TINY_MODEL_PARAMS` parameters, else torch's default.
        model: The model to be trained (``None``: no size known, torch's default).

    Returns:
        ``torch.get_num_threads()`` after the choice.

    Raises:
        PruningError: If ``setting`` is none of the above.

    Examples:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> pick_num_threads(None, torch.nn.Linear(2, 2)) == before
        True
    """
    if setting == "auto":
        params = list(model.parameters()) if model is not None else []
        lazy = any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in params)
        tiny = model is not None and not lazy and sum(p.numel() for p in params) < TINY_MODEL_PARAMS
        if tiny and not os.environ.get("OMP_NUM_THREADS", "").strip():
            torch.set_num_threads(1)
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        torch.set_num_threads(setting)
    elif setting is not None:
        raise invalid("lightning-prune", "num_threads", setting, "an int >= 1, 'auto' or null")
    return torch.get_num_threads()


class _PruneCLI(LightningCLI):
    """LightningCLI with ``--num_threads`` and config keys attached to configuration errors."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--num_threads",
            type=int | Literal["auto"] | None,
            default="auto",
            help=(
                "CPU threads for torch: an int, null (torch's default) or auto (OMP_NUM_THREADS if set, "
                f"else 1 for models under {TINY_MODEL_PARAMS:,} parameters)."
            ),
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _pruning_error(err)
            if cause is not None:
                config = self.config[self.subcommand] if self.subcommand else self.config
                cause.config_key = _config_key(config, str(cause))  # type: ignore[attr-defined]
            raise

    def after_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        setting = config.get("num_threads", "auto")
        threads = pick_num_threads(setting, getattr(self, "model", None))
        rank_zero_info(f"lightning-prune: {threads} CPU thread(s) (num_threads={setting}).")


def _pruning_error(err: BaseException | None) -> PruningError | None:
    """The PruningError in ``err``'s chain of causes, if any (jsonargparse wraps it in a ValueError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, PruningError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _missing_extra(err: BaseException) -> bool:
    """Whether ``err`` is our message that an optional dependency is missing (``pip install ...``)."""
    return isinstance(err, ModuleNotFoundError) and "pip install lightning-prune[" in str(err)


def _config_key(config: Any, message: str) -> str | None:
    """The config key of the class named at the start of ``message`` (`` `Owner(arg=...)` ``), if found."""
    if not message.startswith("`") or "(" not in message:
        return None
    owner, _, rest = message[1:].partition("(")
    arg = rest.split("=", 1)[0] if "=" in rest.split(")", 1)[0] else None

    def walk(node: Any, key: str) -> Iterator[str]:
        if hasattr(node, "__dict__") and not isinstance(node, type):
            node = vars(node)
        if isinstance(node, dict):
            path = node.get("class_path")
            if isinstance(path, str) and path.rsplit(".", 1)[-1] == owner:
                yield f"{key}.init_args.{arg}" if arg else key
            for k, v in node.items():
                yield from walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{key}[{i}]")

    return next(walk(config, ""), None)


def main(args: ArgsType = None) -> None:
    """Run the ``lightning-prune`` command line.

    Args:
        args: The command line to parse instead of ``sys.argv[1:]``: a list of strings (as typed,
            e.g. ``["fit", "--config", "job.yaml"]``) or a dict of already-parsed options. ``None`` reads
            ``sys.argv``.

    Raises:
        SystemExit: After ``--help`` or ``list``; with status 2 when a configuration is invalid: a bad
            option or config file (the message names it), a :class:`~lightning_prune.PruningError`
            (its message and config key are printed; ``--debug`` raises it with the traceback instead),
            Lightning's ``MisconfigurationException`` (trainer arguments that contradict each other), or
            an example that needs an extra that is not installed (e.g. scikit-learn).

    Examples:
        Run one fast development batch of the digits job from Python::

            from lightning_prune.cli import main

            main(["fit", "--config", "examples/digits_snip.yaml", "--trainer.fast_dev_run=true"])
    """
    argv = sys.argv[1:] if args is None else args
    debug = isinstance(argv, list) and DEBUG_FLAG in argv
    if debug:
        argv = [a for a in argv if a != DEBUG_FLAG]
        if args is None:
            sys.argv[1:] = argv
        else:
            args = argv
    if isinstance(argv, list) and argv[:1] == ["list"]:
        print(catalogue())
        raise SystemExit(0)

    import lightning_prune.examples  # noqa: F401 - the example classes appear as known subclasses in --help

    epilog = f"{catalogue()}\n\nlightning-prune list: this list; --debug: full tracebacks of config errors."
    try:
        _PruneCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": DESCRIPTION, "epilog": epilog, "formatter_class": _Formatter},
            args=args,
        )
    except Exception as err:
        short = _missing_extra(err) or isinstance(err, MisconfigurationException)
        cause = _pruning_error(err) or (err if short else None)
        if cause is None or debug:
            raise
        key = getattr(cause, "config_key", None)
        where = f"\n  config key: {key}" if key else ""
        if isinstance(cause, ModuleNotFoundError):
            where = "\n  (not published yet? from a clone of the repository: pip install '.[examples]')"
        print(
            f"lightning-prune: error: {cause}{where}\n  (rerun with {DEBUG_FLAG} for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _formatter() -> type:
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        """Keeps the epilog's line breaks (the list of classes)."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


_Formatter = _formatter()


if __name__ == "__main__":  # pragma: no cover - `python -m lightning_prune.cli`
    main()
