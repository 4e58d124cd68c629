"""Run by tests/callbacks/test_ddp.py: a 2-process CPU DDP fit (Lightning relaunches this script)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_prune import (
    GroupHoyerSquareCallback,
    HoyerSquareCallback,
    IterativeSNIPCallback,
    L0Callback,
    SensitivityPruner,
    SlimmingL1Callback,
    SNIPCallback,
)
from tests.helpers.modules import TinyModule


class Dump(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")
        pruner = next(cb for cb in trainer.callbacks if hasattr(cb, "masks"))
        masks = {k: v.cpu() for k, v in pruner.masks.items()}
        torch.save(masks, self.folder / f"masks{trainer.global_rank}.pt")


class RecordScores:
    """Wraps a criterion: each rank writes the scores it computed (before the sum over ranks)."""

    def __init__(self, inner, folder: Path) -> None:
        self.inner, self.folder, self.needs_data = inner, folder, inner.needs_data

    def weight_scores(self, inputs):
        scores = self.inner.weight_scores(inputs)
        rank = torch.distributed.get_rank()
        torch.save({n: s.detach().cpu() for n, s in scores.items()}, self.folder / f"scores{rank}.pt")
        return scores


if __name__ == "__main__":
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "snapit-during":  # structured SNAP-it: a physical shrink at the end of each of 3 epochs
        pruner = IterativeSNIPCallback(
            limit=0.6,
            structured=True,
            steps=1,
            start=0.3,
            when="during",
            prune_delay=0,
            prune_freq=1,
            num_batches=2,
        )
    elif mode == "hoyer":  # the regulariser's gradient, then |w| <= 0.05 masked at the end of epoch 2
        pruner = HoyerSquareCallback(penalty=1e-3, threshold=0.05, prune_delay=1, prune_freq=1)
    elif mode == "group-hoyer":  # channels with every producing |w| <= 0.2 removed at the end of epoch 2
        pruner = GroupHoyerSquareCallback(penalty=1e-3, threshold=0.2, prune_delay=1, prune_freq=1)
    elif mode == "l0":  # gates trained on both ranks' data, folded and closed channels removed at the end
        pruner = L0Callback(penalty=0.05, gate_lr=0.5)
    elif mode == "sensitivity":  # two blocks (stem, residual blocks) of 1 epoch each, then a fine-tune epoch
        pruner = SensitivityPruner(compression_rate=0.5, vote_window=2, beta_range=2)
    elif mode == "slimming":  # L1 on the BatchNorm scales, channels pruned by |γ| at the end of epoch 2
        pruner = SlimmingL1Callback(penalty=1e-3, limit=0.5, prune_at=2)
    else:
        pruner = SNIPCallback(limit=0.6, structured=mode == "structured", num_batches=2)
        if mode == "unstructured":
            pruner.criterion = RecordScores(pruner.criterion, folder)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruner, Dump(folder)],
    )
    trainer.fit(TinyModule(arch="resnet", n=64, batch_size=8))
