"""Sparsity schedules: the cumulative fraction removed after each pruning step."""

from __future__ import annotations

from lightning_prune._validate import fraction, integer


def snipit_schedule(limit: float, steps: int = 5, start: float = 0.5) -> list[float]:
    """SNIP-it's schedule of cumulative sparsities (Verdenius et al. 2020, arXiv:2006.00896).

    ``p_i = limit − (limit − start) · 0.5^i`` for ``i = 0 … steps``, then ``limit``: each step halves the
    distance to the limit. Values are capped at ``limit`` and repeated values dropped, so a ``start`` at or
    above ``limit`` gives ``[limit]``; ``steps=0`` also prunes once, straight to ``limit`` (one-shot).

    Args:
        limit: Final sparsity, in [0, 1).
        steps: ``S`` of the paper (>= 0); the schedule has ``S + 2`` steps when ``start < limit``.
        start: Sparsity of the first step, in [0, 1) (the paper: 0.5).

    Returns:
        The non-decreasing cumulative sparsities, the last one equal to ``limit``.

    Examples:
        >>> [round(p, 3) for p in snipit_schedule(0.98)]
        [0.5, 0.74, 0.86, 0.92, 0.95, 0.965, 0.98]
        >>> snipit_schedule(0.9, steps=0)
        [0.9]
    """
    limit, start = fraction("snipit_schedule", "limit", limit), fraction("snipit_schedule", "start", start)
    steps = integer("snipit_schedule", "steps", steps, low=0)
    values = [] if steps == 0 else [limit - (limit - start) * 0.5**i for i in range(steps + 1)]
    schedule: list[float] = []
    for p in [*values, limit]:
        p = min(float(p), float(limit))
        if not schedule or p > schedule[-1]:
            schedule.append(p)
    return schedule
