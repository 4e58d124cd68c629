"""A generic image classifier: any model of the registry, the seed repositories' training options.

Every CIFAR and Imagenette config uses :class:`ImageClassifier`; the network is chosen by name from
:mod:`lightning_prune.models` (``"cifar_vgg16_bn"``, ``"cifar_resnet164"``, ``"torchvision.resnet18"``, ...).

Examples:
    >>> model = ImageClassifier("cifar_resnet56", num_classes=100)
    >>> model(model.example_input_array).shape
    torch.Size([2, 100])
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.checkpoint import load_pruned_state_dict
from lightning_prune.errors import PruningError
from lightning_prune.examples.digits import _check_float, _check_int, schedule_length
from lightning_prune.models import create_model, is_model
from lightning_prune.models.registry import unknown_model_message

__all__ = ["ImageClassifier"]

OPTIMIZERS = ("sgd", "adam", "adamw")
"""The optimizers :class:`ImageClassifier` builds."""

SCHEDULERS = ("cosine", "step", "none")
"""The learning-rate schedules of :class:`ImageClassifier`."""


class ImageClassifier(LightningModule):
    """Image classification with a model from the registry, cross entropy and top-1/top-5 accuracy.

    ``self.model`` is ``lightning_prune.models.create_model(model, num_classes, **model_kwargs)``, so layer
    names in pruning patterns start with ``model.`` (``"model.features.*"``). The loss is cross entropy
    with ``label_smoothing``. Logged: ``train/loss``; ``val/loss``, ``val/acc``, ``val/acc_top5``;
    ``test/loss``, ``test/acc``, ``test/acc_top5`` (micro-averaged accuracy, i.e. the fraction of images
    whose label is the top prediction, or among the top 5; top-5 only when ``num_classes >= 5``).

    :meth:`configure_optimizers` builds, over every parameter:

    - ``optimizer="sgd"``: SGD with ``momentum``, ``nesterov`` and L2 ``weight_decay`` (the seeds' choice);
      ``"adam"``: Adam with L2 ``weight_decay``; ``"adamw"``: AdamW with decoupled ``weight_decay``
      (``momentum`` and ``nesterov`` are SGD's only).
    - ``scheduler="cosine"``: decays ``lr`` to zero on a cosine over ``trainer.max_epochs``;
      ``"step"``: multiplies it by ``gamma`` at each of ``milestones`` (fractions of ``max_epochs``:
      ``(0.5, 0.75)`` of 160 epochs is Network Slimming's epochs 80 and 120); ``"none"``: constant.
      The schedule steps once per epoch; when ``max_epochs`` is unset (``-1``, a run by steps) it is laid
      out over the optimizer steps the trainer expects instead and steps every batch.

    **Fine-tuning a shrunk network** (stage 3 of Network Slimming, as a second ``lightning-prune fit``):
    ``init_from`` names a checkpoint written by ``ShrinkOnFitEnd(save_path=...)`` (or any Lightning
    checkpoint of this module). The module is built as usual, then resized to the checkpoint's smaller
    shapes and loaded with :func:`lightning_prune.load_pruned_state_dict`, all in ``__init__``, so the
    optimizers are built for the small network. ``init_from`` is saved with the other hyperparameters;
    :func:`lightning_prune.load_pruned_checkpoint` therefore reads that file again when it rebuilds the
    module (harmless: the checkpoint's own weights are loaded last). If that file is gone, pass
    ``init_from=None`` as an override: the checkpoint alone holds every shape.

    Args:
        model: A name from ``lightning_prune.models.list_models()``, or ``"torchvision.<name>"``.
        num_classes: Classes (``>= 1``).
        model_kwargs: Extra keyword arguments of the model builder (e.g. ``{"width": 0.5}``).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: Initial learning rate (``> 0``).
        momentum: SGD momentum, in [0, 1).
        nesterov: Nesterov momentum (SGD with ``momentum > 0`` only).
        weight_decay: Weight decay (``>= 0``), applied to every parameter.
        scheduler: ``"cosine"``, ``"step"`` or ``"none"``.
        milestones: For ``"step"``: increasing fractions of ``max_epochs``, each in (0, 1).
        gamma: For ``"step"``: the factor applied at each milestone, in (0, 1].
        label_smoothing: Label smoothing of the cross entropy, in [0, 1).
        init_from: Path of a (shrunk) checkpoint with a ``"state_dict"`` of this module to start from.
        input_size: ``(channels, height, width)`` of the images; sets ``example_input_array`` (two zero
            images), which the pruning callbacks trace the network with.
        norm_weight_init: If set, every norm layer's scale γ starts at this value instead of the model's
            default (Network Slimming initializes γ to 0.5). Ignored with ``init_from``.

    Raises:
        PruningError: If an argument is invalid (unknown model names come with the closest names), or
            ``init_from`` is missing or does not fit the model.

    Examples:
        >>> module = ImageClassifier("cifar_vgg11_bn", model_kwargs={"width": 0.5}, scheduler="step")
        >>> module.model.classifier.in_features, module.example_input_array.shape
        (256, torch.Size([2, 3, 32, 32]))

        The three stages of Network Slimming, as two runs (YAML for ``lightning-prune fit``)::

            # 1+2. train with the L1 penalty on BN scales, prune, shrink, save
            model: {model: cifar_vgg19_bn, lr: 0.1, scheduler: step}
            trainer: {callbacks: [{class_path: lightning_prune.ShrinkOnFitEnd,
                                   init_args: {save_path: outputs/vgg19_pruned.pt}}, ...]}
            # 3. fine-tune the small network
            model: {model: cifar_vgg19_bn, lr: 0.1, scheduler: step, init_from: outputs/vgg19_pruned.pt}
    """

    def __init__(
        self,
        model: str = "cifar_resnet18",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        scheduler: str = "cosine",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        init_from: str | os.PathLike | None = None,
        input_size: Sequence[int] = (3, 32, 32),
        norm_weight_init: float | None = None,
    ) -> None:
        super().__init__()
        owner = "ImageClassifier"
        if not is_model(model):
            raise PruningError(unknown_model_message(f"{owner}(model={model!r})", model))
        _check_int(owner, "num_classes", num_classes, 1)
        if model_kwargs is not None and (
            not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs)
        ):
            raise PruningError(
                f"`{owner}(model_kwargs={model_kwargs!r})` is invalid: `model_kwargs` must be a dict of "
                "keyword arguments of the model builder (e.g. {'width': 0.5}) or None."
            )
        _check_choice(owner, "optimizer", optimizer, OPTIMIZERS)
        _check_float(owner, "lr", lr, low=0.0, low_open=True)
        _check_float(owner, "momentum", momentum, low=0.0, high=1.0)
        if not isinstance(nesterov, bool):
            raise PruningError(
                f"`{owner}(nesterov={nesterov!r})` is invalid: `nesterov` must be a bool; "
                f"got {type(nesterov).__name__}."
            )
        if nesterov and (optimizer != "sgd" or momentum == 0):
            raise PruningError(
                f"`{owner}(nesterov=True, optimizer={optimizer!r}, momentum={momentum!r})` is invalid: "
                "Nesterov momentum needs optimizer='sgd' and momentum > 0."
            )
        _check_float(owner, "weight_decay", weight_decay, low=0.0)
        _check_choice(owner, "scheduler", scheduler, SCHEDULERS)
        _check_milestones(owner, milestones)
        _check_float(owner, "gamma", gamma, low=0.0, low_open=True)
        if gamma > 1:
            raise PruningError(f"`{owner}(gamma={gamma!r})` is invalid: `gamma` must be in (0, 1].")
        _check_float(owner, "label_smoothing", label_smoothing, low=0.0, high=1.0)
        if init_from is not None and not isinstance(init_from, (str, os.PathLike)):
            raise PruningError(
                f"`{owner}(init_from={init_from!r})` is invalid: `init_from` must be a path to a checkpoint "
                f"or None; got {type(init_from).__name__}."
            )
        if (
            isinstance(input_size, (str, bytes))
            or not isinstance(input_size, Sequence)
            or len(input_size) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_size)
        ):
            raise PruningError(
                f"`{owner}(input_size={input_size!r})` is invalid: `input_size` must be (channels, height, "
                "width), three ints >= 1, e.g. (3, 32, 32)."
            )
        if norm_weight_init is not None:
            _check_float(owner, "norm_weight_init", norm_weight_init, low=0.0)
        self.save_hyperparameters()
        # Checkpoints must load with `weights_only=True`: keep the recorded values to plain types.
        self.hparams.init_from = os.fspath(init_from) if init_from is not None else None
        self.hparams.milestones = tuple(float(m) for m in milestones)
        self.hparams.input_size = tuple(input_size)
        self.hparams.model_kwargs = dict(model_kwargs) if model_kwargs is not None else None

        try:
            self.model = create_model(model, num_classes=num_classes, **dict(model_kwargs or {}))
        except (PruningError, TypeError) as err:
            raise PruningError(
                f"`{owner}(model={model!r}, model_kwargs={model_kwargs!r})` is invalid: {err}"
            ) from err
        if norm_weight_init is not None:
            norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
            with torch.no_grad():
                for m in self.model.modules():
                    if isinstance(m, norms) and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
                        m.weight.fill_(norm_weight_init)
        self.example_input_array = torch.zeros(2, *input_size)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        top5 = num_classes >= 5
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        if init_from is not None:
            self._init_from(os.fspath(init_from))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` for images ``(N, *input_size)``."""
        out = self.model(x)
        # torchvision's GoogLeNet/Inception return (logits, aux_logits...) in training mode
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross entropy (with label smoothing) of one batch, logged as ``train/loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``val/loss``, ``val/acc`` and ``val/acc_top5`` (accumulated over the epoch)."""
        self._evaluate(batch, "val", self.val_acc, self.val_acc_top5)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``test/loss``, ``test/acc`` and ``test/acc_top5`` (accumulated over the epoch)."""
        self._evaluate(batch, "test", self.test_acc, self.test_acc_top5)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Predicted classes ``(N,)`` for a batch of images or of ``(images, labels)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        """The optimizer and learning-rate schedule chosen by the hyperparameters (see the class)."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        length, interval = schedule_length(self.trainer)
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length)
        else:
            milestones = sorted({max(1, round(length * f)) for f in hp.milestones})
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _evaluate(self, batch, split: str, accuracy, accuracy_top5) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), prog_bar=True)
        accuracy(logits, y)
        self.log(f"{split}/acc", accuracy, prog_bar=True)
        if accuracy_top5 is not None:
            accuracy_top5(logits, y)
            self.log(f"{split}/acc_top5", accuracy_top5)

    def _init_from(self, path: str) -> None:
        call = f"ImageClassifier(init_from={path!r})"
        if not Path(path).is_file():
            raise PruningError(
                f"`{call}` is invalid: no such file. Give the checkpoint written by "
                "`ShrinkOnFitEnd(save_path=...)` (or a Lightning checkpoint of this module). When "
                "`load_pruned_checkpoint` rebuilds a module that was fine-tuned from a file that is gone, "
                "pass the override `init_from=None`."
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
            raise PruningError(
                f"`{call}` is invalid: the file holds no 'state_dict' entry; expected a checkpoint "
                "written by `ShrinkOnFitEnd(save_path=...)` or by Lightning."
            )
        saved = (
            checkpoint.get("hyper_parameters", {})
            if isinstance(checkpoint.get("hyper_parameters"), Mapping)
            else {}
        )
        for key in ("model", "num_classes"):
            if key in saved and saved[key] != self.hparams[key]:
                raise PruningError(
                    f"`{call}`: the checkpoint was written with {key}={saved[key]!r}, but this module has "
                    f"{key}={self.hparams[key]!r}; build it with the same {key}."
                )
        try:
            load_pruned_state_dict(self, checkpoint["state_dict"])
        except PruningError as err:
            raise PruningError(
                f"`{call}`: the checkpoint does not fit model={self.hparams.model!r} with "
                f"model_kwargs={self.hparams.model_kwargs!r} (it must come from the same architecture): {err}"
            ) from err


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if isinstance(value, str) and value in allowed:
        return
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PruningError(
        f"`{owner}({name}={value!r})` is invalid: `{name}` must be one of "
        f"{', '.join(repr(a) for a in allowed)}.{hint}"
    )


def _check_milestones(owner: str, milestones: Any) -> None:
    ok = (
        isinstance(milestones, Sequence)
        and not isinstance(milestones, (str, bytes))
        and len(milestones) > 0
        and all(not isinstance(m, bool) and isinstance(m, (int, float)) and 0 < m < 1 for m in milestones)
        and all(a < b for a, b in itertools.pairwise(milestones))
    )
    if not ok:
        raise PruningError(
            f"`{owner}(milestones={milestones!r})` is invalid: `milestones` must be a non-empty, increasing "
            "sequence of fractions of max_epochs, each in (0, 1), e.g. (0.5, 0.75)."
        )
