"""What the callbacks report: typed figures, and the flat metric names they are logged under.

Every report has ``metrics()``: the same figures as ``{name: float}`` for loggers and
``trainer.callback_metrics`` (names such as ``prune/node_sparsity``, ``slimming/threshold``,
``shrink/params_after``).

Examples:
    >>> report = StepReport(
    ...     weight_sparsity=0.5, node_sparsity=0.0, params=120, step=1, target=0.5, seconds=0.1
    ... )
    >>> report.metrics()["prune/weight_sparsity"]
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lightning_prune.stats import LATENCY_MODES


@dataclass(frozen=True)
class Sparsity:
    """Sparsity of the layers a callback prunes.

    Attributes:
        weight_sparsity: Fraction of the selected weights that are zero, against their count before pruning.
        node_sparsity: Fraction of the nodes (output channels of selected conv/linear layers that do not
            produce a model output) removed, against their count before pruning.
        params: Parameters of the whole module now.
    """

    weight_sparsity: float
    node_sparsity: float
    params: int

    def metrics(self) -> dict[str, float]:
        """The figures under their logged names (``prune/...``)."""
        return {
            "prune/weight_sparsity": float(self.weight_sparsity),
            "prune/node_sparsity": float(self.node_sparsity),
            "prune/params": float(self.params),
        }


@dataclass(frozen=True)
class StepReport(Sparsity):
    """After a pruning step of SNIP, SNIP-it or SNAP-it.

    Attributes:
        step: Steps done so far (1 after the first).
        target: The sparsity this step aimed at.
        seconds: Wall time of the step (scoring and pruning).
        macs: MACs of one forward pass with the example inputs, after a structured step (None when
            unstructured: masking does not change the dense count).
    """

    step: int
    target: float
    seconds: float
    macs: int | None = None

    def metrics(self) -> dict[str, float]:
        """Adds ``prune/step``, ``prune/target``, ``prune/seconds`` and ``prune/macs`` (structured)."""
        out = super().metrics() | {
            "prune/step": float(self.step),
            "prune/target": float(self.target),
            "prune/seconds": float(self.seconds),
        }
        return out | ({"prune/macs": float(self.macs)} if self.macs is not None else {})


@dataclass(frozen=True)
class SlimmingReport(Sparsity):
    """After Network Slimming pruned.

    Attributes:
        threshold: The largest score (aggregated ``|γ|``) of a removed channel.
        channels_removed: Channels removed, counted in every layer of their groups once.
        params_before: Parameters before pruning.
        params_after: Parameters after pruning.
        macs_before: MACs before pruning.
        macs_after: MACs after pruning.
        after_pruning: Validation figures of the pruned network, when it was re-validated (name → value).
    """

    threshold: float
    channels_removed: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    after_pruning: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Adds the ``slimming/...`` figures, the re-validated ones as ``slimming/after_pruning/<name>``."""
        out = super().metrics() | {
            "slimming/threshold": float(self.threshold),
            "slimming/channels_removed": float(self.channels_removed),
            "slimming/params_before": float(self.params_before),
            "slimming/params_after": float(self.params_after),
            "slimming/macs_before": float(self.macs_before),
            "slimming/macs_after": float(self.macs_after),
        }
        return out | {f"slimming/after_pruning/{k}": float(v) for k, v in self.after_pruning.items()}


@dataclass(frozen=True)
class ThresholdReport(Sparsity):
    """After a regularise-then-threshold baseline pruned (HoyerSquare, Group-HS, L0).

    Attributes:
        threshold: Weights (or channels) at or below this magnitude were removed.
        channels_removed: Channels removed physically (0 for unstructured pruning).
        macs: MACs of one forward pass with the example inputs after pruning (None when unstructured).
    """

    threshold: float
    channels_removed: int = 0
    macs: int | None = None

    def metrics(self) -> dict[str, float]:
        """Adds ``prune/threshold``, ``prune/channels_removed`` and ``prune/macs`` (structured)."""
        out = super().metrics() | {
            "prune/threshold": float(self.threshold),
            "prune/channels_removed": float(self.channels_removed),
        }
        return out | ({"prune/macs": float(self.macs)} if self.macs is not None else {})


@dataclass(frozen=True)
class BlockReport(Sparsity):
    """After the Sensitivity Pruner removed the channels of one block.

    Attributes:
        block: Blocks finished so far (1 after the first).
        blocks: Blocks in all.
        channels: Channels of the block's groups before the removal.
        kept: Channels of the block's groups kept.
        corrections: Channels whose fate the exact budget decided against the vote (kept although voted
            out, or removed although voted in).
        macs: MACs of one forward pass with the example inputs, after the removal.
        seconds: Wall time of the removal (vote, plan, surgery).
    """

    block: int
    blocks: int
    channels: int
    kept: int
    corrections: int
    macs: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Adds ``sensitivity/block``, ``…/kept``, ``…/corrections``, ``prune/macs`` and ``prune/seconds``."""
        return super().metrics() | {
            "sensitivity/blocks_done": float(self.block),
            "sensitivity/kept": float(self.kept),
            "sensitivity/corrections": float(self.corrections),
            "prune/macs": float(self.macs),
            "prune/seconds": float(self.seconds),
        }


@dataclass(frozen=True)
class Figures:
    """What a model costs, as :class:`~lightning_prune.ShrinkOnFitEnd` measures it.

    Attributes:
        params: Parameters.
        nonzero_params: Non-zero parameters.
        macs: MACs of one forward pass with the example inputs (all ``examples`` of them).
        examples: The example inputs' batch size (``macs_per_example`` divides by it).
        latency_b1_ms: Median latency of a batch of one, in milliseconds.
        latency_b1_range: Its fastest and slowest timed call, in milliseconds.
        latency_batch_ms: Median latency of a batch of ``batch_size``, in milliseconds.
        latency_batch_range: Its fastest and slowest timed call, in milliseconds.
        batch_size: The larger batch size.
        checkpoint_mb: Size of the module's state dict saved with ``torch.save``, in MiB.
        modes: Latency of a batch of ``batch_size`` run in other modes (``"channels_last"``,
            ``"compile"``: see :func:`lightning_prune.stats.in_mode`): mode -> (median, fastest, slowest),
            in milliseconds.
    """

    params: int
    nonzero_params: int
    macs: int
    examples: int
    latency_b1_ms: float
    latency_b1_range: tuple[float, float]
    latency_batch_ms: float
    latency_batch_range: tuple[float, float]
    batch_size: int
    checkpoint_mb: float
    modes: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def macs_per_example(self) -> float:
        """MACs of one example (the per-sample figure papers report)."""
        return self.macs / max(self.examples, 1)

    def short(self) -> dict[str, float]:
        """The figures under short names (``params``, ``latency_b64_ms``, ...)."""
        b = self.batch_size
        return {
            "params": float(self.params),
            "nonzero_params": float(self.nonzero_params),
            "macs": float(self.macs),
            "macs_per_example": float(self.macs_per_example),
            "examples": float(self.examples),
            "latency_b1_ms": float(self.latency_b1_ms),
            "latency_b1_min_ms": float(self.latency_b1_range[0]),
            "latency_b1_max_ms": float(self.latency_b1_range[1]),
            f"latency_b{b}_ms": float(self.latency_batch_ms),
            f"latency_b{b}_min_ms": float(self.latency_batch_range[0]),
            f"latency_b{b}_max_ms": float(self.latency_batch_range[1]),
            "checkpoint_mb": float(self.checkpoint_mb),
        } | {
            f"latency_b{b}_{mode}_{stat}ms": float(value)
            for mode, figures in self.modes.items()
            for stat, value in zip(("", "min_", "max_"), figures, strict=True)
        }

    @classmethod
    def from_short(cls, values: dict[str, float], batch_size: int) -> Figures:
        """The inverse of :meth:`short` (KeyError for figures written by an older version)."""
        b = batch_size
        return cls(
            params=int(values["params"]),
            nonzero_params=int(values["nonzero_params"]),
            macs=int(values["macs"]),
            examples=int(values["examples"]),
            latency_b1_ms=float(values["latency_b1_ms"]),
            latency_b1_range=(float(values["latency_b1_min_ms"]), float(values["latency_b1_max_ms"])),
            latency_batch_ms=float(values[f"latency_b{b}_ms"]),
            latency_batch_range=(
                float(values[f"latency_b{b}_min_ms"]),
                float(values[f"latency_b{b}_max_ms"]),
            ),
            batch_size=b,
            checkpoint_mb=float(values["checkpoint_mb"]),
            modes={
                mode: tuple(float(values[f"latency_b{b}_{mode}_{stat}ms"]) for stat in ("", "min_", "max_"))
                for mode in LATENCY_MODES
                if f"latency_b{b}_{mode}_ms" in values
            },
        )


@dataclass(frozen=True)
class GainReport:
    """What :class:`~lightning_prune.ShrinkOnFitEnd` measured at the start and at the end of fit.

    Attributes:
        before: At the start of fit, before any callback pruned.
        after: At the end of fit, shrunk.
        channels_removed: Dead channels removed at the end of fit.
    """

    before: Figures
    after: Figures
    channels_removed: int

    def metrics(self) -> dict[str, float]:
        """``shrink/<figure>_before``, ``shrink/<figure>_after`` and ``shrink/channels_removed``."""
        return (
            {f"shrink/{k}_before": v for k, v in self.before.short().items()}
            | {f"shrink/{k}_after": v for k, v in self.after.short().items()}
            | {"shrink/channels_removed": float(self.channels_removed)}
        )
