"""SNIP-it's schedule against its formula: p_i = limit − (limit − start)·0.5^i for i = 0..S, then limit."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_prune import PruningError
from lightning_prune.schedules import snipit_schedule


def test_the_papers_example():
    assert snipit_schedule(0.98) == pytest.approx([0.5, 0.74, 0.86, 0.92, 0.95, 0.965, 0.98])


def test_node_limit_of_snapit():
    assert snipit_schedule(0.93, steps=3) == pytest.approx([0.5, 0.715, 0.8225, 0.87625, 0.93])


def test_one_shot_and_start_beyond_limit():
    assert snipit_schedule(0.9, steps=0) == [0.9]
    assert snipit_schedule(0.3, steps=5, start=0.5) == [0.3]
    assert snipit_schedule(0.0) == [0.0]


@given(
    limit=st.floats(0.0, 0.999),
    start=st.floats(0.0, 0.999),
    steps=st.integers(0, 12),
)
def test_matches_the_formula_and_is_increasing(limit, start, steps):
    schedule = snipit_schedule(limit, steps, start)
    assert schedule[-1] == limit
    assert all(a < b for a, b in itertools.pairwise(schedule))
    if start < limit and steps > 0:
        formula = [limit - (limit - start) * 0.5**i for i in range(steps + 1)]
        # repeated values (steps so many that p_i rounds to limit) are dropped, nothing else
        expected = [p for i, p in enumerate(formula) if p < limit and (i == 0 or p > formula[i - 1])]
        assert schedule == [*expected, limit]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"limit": 1.0}, r"`limit` must be in \[0, 1\)"),
        ({"limit": 0.9, "start": -0.1}, r"`start` must be in \[0, 1\)"),
        ({"limit": 0.9, "steps": -1}, r"`steps` must be an int >= 0"),
        ({"limit": 0.9, "steps": 2.0}, r"`steps` must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PruningError, match=match):
        snipit_schedule(**kwargs)
