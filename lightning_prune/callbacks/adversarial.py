"""Robust accuracy under adversarial attacks, measured during ``trainer.test``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_prune._validate import choice, integer, number
from lightning_prune.attacks import ATTACKS, carlini_wagner_l2, check_epsilons, fgsm, pgd, robust_accuracy
from lightning_prune.errors import PruningError

# The seed's budgets for Carlini-Wagner (models/testers/AdversarialEvaluation.py), L2 on inputs in [0, 1].
L2_EPSILONS = (0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
LINF_EPSILONS = (0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class AdversarialReport:
    """Clean and robust accuracy over the attacked test examples.

    Attributes:
        attack: The attack's name.
        examples: Test examples attacked (summed over ranks).
        clean_accuracy: Fraction of them the model classifies correctly.
        robust_accuracy: Budget ε → fraction classified correctly and still correctly under attack.
        norm: ``"l2"`` or ``"linf"``, the norm of the budgets.
    """

    attack: str
    examples: int
    clean_accuracy: float
    robust_accuracy: dict[float, float]
    norm: str

    def metrics(self) -> dict[str, float]:
        """``adversarial/clean_acc`` and ``adversarial/<attack>/acc@<ε>`` for every budget."""
        out = {"adversarial/clean_acc": self.clean_accuracy}
        for eps, acc in self.robust_accuracy.items():
            out[f"adversarial/{self.attack}/acc@{eps:g}"] = acc
        return out


class AdversarialEvaluation(Callback):
    """Robust accuracy of the model under an adversarial attack, logged at the end of ``trainer.test``.

    Every test batch ``(x, y, ...)`` (the first ``max_batches``) is attacked with ``attack`` (see
    :mod:`lightning_prune.attacks`) through the module's ``forward`` (class logits), in eval mode and with
    gradients enabled for the inputs only; the test step itself is not changed. An example counts as robust
    at budget ε when the model classifies it correctly, and also its adversarial example, or that example
    lies farther than ε away. ``"carlini_wagner"`` (the seed's ``--attack CarliniWagner``) looks for the
    smallest L2 perturbation once and is read at every ε; ``"fgsm"`` and ``"pgd"`` attack once per L∞ ε.

    At the end of the test epoch the counts are summed over ranks and logged (``trainer.test`` returns them)
    as ``adversarial/clean_acc`` and ``adversarial/<attack>/acc@<ε>``; ``report`` keeps them typed.

    Args:
        attack: ``"carlini_wagner"``, ``"fgsm"`` or ``"pgd"``.
        epsilons: Budgets, in the attack's norm (L2 for Carlini–Wagner, L∞ otherwise); default: the seed's
            L2 budgets 0.25 … 10, or 0.05, 0.1, 0.2, 0.3 for L∞.
        max_batches: Attack only the first this many test batches (per rank); ``None``: all.
        steps: PGD steps (default 10) or Adam steps per constant of Carlini–Wagner (default 100).
        binary_steps: Constants Carlini–Wagner tries per example (binary search).
        low: Lower bound of the inputs (attacks stay in ``[low, high]``). For inputs normalised as
            ``(pixel − mean) / std``, pass ``(0 − mean) / std`` and budgets divided by ``std``.
        high: Upper bound of the inputs (``(1 − mean) / std`` when normalised).
        seed: Seed of PGD's random start.

    Raises:
        PruningError: For an invalid argument, or test batches that are not ``(inputs, labels, ...)``.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import AdversarialEvaluation
        >>> evaluation = AdversarialEvaluation("pgd", epsilons=[0.1], steps=5, max_batches=2)
        >>> trainer = pl.Trainer(callbacks=[evaluation], logger=False)
        >>> # trainer.test(model, datamodule=data)[0]["adversarial/pgd/acc@0.1"]
    """

    def __init__(
        self,
        attack: str = "carlini_wagner",
        epsilons: Sequence[float] | None = None,
        max_batches: int | None = None,
        steps: int | None = None,
        binary_steps: int = 9,
        low: float = 0.0,
        high: float = 1.0,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        self.attack = choice(owner, "attack", attack, ATTACKS)
        self.norm = "l2" if attack == "carlini_wagner" else "linf"
        default = L2_EPSILONS if self.norm == "l2" else LINF_EPSILONS
        self.epsilons = check_epsilons(owner, default if epsilons is None else epsilons)
        self.max_batches = None if max_batches is None else integer(owner, "max_batches", max_batches, low=1)
        if steps is None:
            steps = 100 if attack == "carlini_wagner" else 10
        self.steps = integer(owner, "steps", steps, low=1)
        self.binary_steps = integer(owner, "binary_steps", binary_steps, low=1)
        self.low = number(owner, "low", low)
        self.high = number(owner, "high", high, low=self.low, low_open=True)
        self.seed = integer(owner, "seed", seed, low=0)
        self.report: AdversarialReport | None = None
        self._reset()

    @property
    def state_key(self) -> str:
        """Distinguishes two evaluations with different attacks or budgets."""
        return self._generate_state_key(attack=self.attack, epsilons=self.epsilons)

    def _reset(self) -> None:
        self._examples = 0
        self._clean = 0
        self._robust = [0] * len(self.epsilons)
        self._batches = 0

    def attack_batch(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[int, list[int]]:
        """Attack one batch: ``(clean correct, robust correct per ε)``."""
        if self.attack == "carlini_wagner":
            adv = carlini_wagner_l2(
                model, x, y, steps=self.steps, binary_steps=self.binary_steps, low=self.low, high=self.high
            )
            counts = [robust_accuracy(model, x, adv, y, eps) for eps in self.epsilons]
        else:
            counts = []
            for k, eps in enumerate(self.epsilons):
                if self.attack == "fgsm":
                    adv = fgsm(model, x, y, eps, low=self.low, high=self.high)
                else:
                    generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._batches * 101 + k)
                    adv = pgd(
                        model, x, y, eps, steps=self.steps, generator=generator, low=self.low, high=self.high
                    )
                counts.append(robust_accuracy(model, x, adv, y))
        return counts[0][0], [robust for _, robust in counts]

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Attack the batch's inputs and count the robust examples."""
        if self.max_batches is not None and self._batches >= self.max_batches:
            return
        x, y = self._inputs(batch)
        with torch.inference_mode(False), torch.enable_grad():
            x, y = x.clone(), y.clone()  # normal tensors: the test loop runs in inference mode
            was_training = pl_module.training
            pl_module.eval()
            try:
                clean, robust = self.attack_batch(pl_module, x, y)
            finally:
                pl_module.train(was_training)
        self._examples += len(y)
        self._clean += clean
        self._robust = [a + b for a, b in zip(self._robust, robust, strict=True)]
        self._batches += 1

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sum the counts over ranks, keep the report and log its metrics."""
        counts = torch.tensor([self._examples, self._clean, *self._robust], dtype=torch.float64)
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        total = int(counts[0])
        fraction = (lambda c: float(c) / total) if total else (lambda c: math.nan)
        self.report = AdversarialReport(
            attack=self.attack,
            examples=total,
            clean_accuracy=fraction(counts[1]),
            robust_accuracy={eps: fraction(c) for eps, c in zip(self.epsilons, counts[2:], strict=True)},
            norm=self.norm,
        )
        for name, value in self.report.metrics().items():
            pl_module.log(name, value, sync_dist=True)  # equal on every rank: the mean changes nothing

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ok = isinstance(batch, (tuple, list)) and len(batch) >= 2
        if ok and isinstance(batch[0], torch.Tensor) and isinstance(batch[1], torch.Tensor):
            x, y = batch[0], batch[1]
            if x.is_floating_point() and y.dtype == torch.long and y.shape == x.shape[:1]:
                if x.numel() and (x.min() < self.low or x.max() > self.high):
                    raise PruningError(
                        f"{type(self).__name__}(low={self.low}, high={self.high}): the test inputs range "
                        f"over [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the box the attacks "
                        "keep them in: pass the bounds of your inputs (for normalised images, the normalised "
                        "bounds, and the budgets in the same units)."
                    )
                return x, y
        raise PruningError(
            f"{type(self).__name__}: test batches must be (inputs, labels, ...) with floating-point inputs "
            f"and one int64 label per input; got {_describe(batch)}."
        )


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(
            f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch
        )
        return f"a {type(batch).__name__} of ({inner})"
    return f"a {type(batch).__name__}"
