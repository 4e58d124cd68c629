"""Run by tests/callbacks/test_adversarial.py: `trainer.test` with AdversarialEvaluation on 2 CPU ranks."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_prune import AdversarialEvaluation
from tests.callbacks.test_adversarial import Blobs, hand_weights


class Dump(pl.Callback):
    def on_test_end(self, trainer, pl_module):
        evaluation = next(cb for cb in trainer.callbacks if isinstance(cb, AdversarialEvaluation))
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("adversarial/")}
        figures["examples"] = float(evaluation.report.examples)
        torch.save(figures, Path(sys.argv[1]) / f"adversarial{trainer.global_rank}.pt")


if __name__ == "__main__":
    module = Blobs()
    hand_weights(module)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AdversarialEvaluation("fgsm", epsilons=[0.05]), Dump()],
    )
    trainer.test(module, verbose=False)
