"""SNIP: single-shot network pruning by connection sensitivity, at the start of fit."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_prune.callbacks.iterative import IterativeSNIPCallback


class SNIPCallback(IterativeSNIPCallback):
    """SNIP: prune by connection sensitivity ``|∂L/∂w ⊙ w|`` once, at the start of fit.

    Paper: Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
    ICLR 2019, https://arxiv.org/abs/1810.02340.

    Before the first training step, the module's own ``training_step`` loss is backpropagated over
    ``num_batches`` training batches (BatchNorm in eval mode, no optimizer step, no ``.grad`` touched).

    - Unstructured (default): every selected Conv/Linear weight is scored ``|g ⊙ w|``; one global ranking
      keeps the top ``round(n · (1 − limit))``. The pruned weights stay exactly zero through training:
      their gradients are zeroed before clipping and every optimizer step, and the weights re-zeroed after
      it, so momentum, weight decay, Adam moments, clipping norms and AMP all leave them at zero. A weight
      shared by several layers (an LM head tied to the embedding, a layer used twice) is scored by its one
      gradient, which sums every use, and is masked and counted once; a selected tied head masks the
      embedding matrix it shares (see :class:`~lightning_prune.callbacks.base.PruningCallback`).
    - Structured (``structured=True``, the group SNIP of "SNIP-pytorch"): each channel group is scored by the
      summed ``|g ⊙ w|`` of its producing conv/linear weights (over every coupled producer of a residual
      group); in one global ranking, the lowest-scoring channels are removed physically until ``limit`` of
      the nodes (conv/linear output channels of layers that do not produce a model output) are gone — a
      channel shared by several producers counts once per producer — never emptying a layer, so the whole
      training runs on the smaller network. Layers producing the model's output, excluded and frozen layers
      are never shrunk.

    This is :class:`IterativeSNIPCallback` with one step (``steps=0``) and the ``"snip"`` criterion. Under
    DDP, scores are summed over ranks and rank 0's decision is broadcast, so every rank prunes the same
    weights. The decision is saved in checkpoints; resuming does not prune again.

    Args:
        limit: Fraction removed: of selected weights (unstructured) or of nodes (structured).
        structured: Remove whole channels/neurons instead of single weights.
        num_batches: Training batches the gradient is accumulated over (the paper: one batch).
        include: Glob patterns of layer names (``LightningModule.named_modules()``) to prune; default: all
            Conv/Linear layers.
        exclude: Glob patterns of layers to keep whole.
        round_to: Structured only: every channel group cut keeps a multiple of this many channels;
            ``"auto"`` from the device and dtype (see :class:`IterativeSNIPCallback`).

    Raises:
        PruningError: ``limit`` outside [0, 1), ``num_batches`` < 1, patterns matching no layer, no training
            dataloader, a ``training_step`` that returns no scalar loss, non-finite scores (naming the layer),
            or structured pruning of a model with nothing to prune.

    Examples:
        >>> import lightning.pytorch as pl
        >>> from lightning_prune import SNIPCallback
        >>> trainer = pl.Trainer(callbacks=[SNIPCallback(limit=0.9)], max_epochs=1, logger=False)
    """

    def __init__(
        self,
        limit: float = 0.9,
        structured: bool = False,
        num_batches: int = 1,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        round_to: int | str = 1,
    ) -> None:
        super().__init__(
            limit=limit,
            structured=structured,
            steps=0,
            num_batches=num_batches,
            criterion="snip",
            include=include,
            exclude=exclude,
            round_to=round_to,
        )

    def _state_key_args(self) -> dict:
        keys = ("include", "exclude", "limit", "structured")  # as before the iterative callback existed
        return {k: getattr(self, k) for k in keys}

    @property
    def pruned(self) -> bool:
        """Whether the network has been pruned (also after resuming from a checkpoint)."""
        return self.step >= len(self.schedule)
