"""Argument checks with one error format: the call, the argument, its value and what is allowed.

Every check returns the value normalised (``np.float32(0.5)`` → ``0.5``) or raises
:class:`~lightning_prune.errors.PruningError` reading
``"`Owner(arg=value)` is invalid: `arg` must be <allowed>; got <value>."``. NumPy scalars are numbers
(they register as :class:`numbers.Real`/:class:`numbers.Integral`); booleans are not.

Examples:
    >>> fraction("SNAPit", "limit", 0.5)
    0.5
    >>> integer("SNAPit", "steps", 0, low=1)
    Traceback (most recent call last):
    ...
    lightning_prune.errors.PruningError: `SNAPit(steps=0)` is invalid: `steps` must be an int >= 1; got 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from lightning_prune.errors import PruningError


def invalid(owner: str, arg: str, value: Any, allowed: str) -> PruningError:
    """The error for ``owner(arg=value)``, where ``arg`` must be ``allowed``."""
    return PruningError(f"`{owner}({arg}={value!r})` is invalid: `{arg}` must be {allowed}; got {value!r}.")


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def number(
    owner: str,
    arg: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within the given bounds, as a float."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    allowed = " and ".join(["a finite number " + lo if lo else "a finite number", *([hi] if hi else [])])
    if not _real(value) or not math.isfinite(value):
        raise invalid(owner, arg, value, allowed)
    if low is not None and (value < low or (low_open and value == low)):
        raise invalid(owner, arg, value, allowed)
    if high is not None and (value > high or (high_open and value == high)):
        raise invalid(owner, arg, value, allowed)
    return float(value)


def fraction(owner: str, arg: str, value: Any) -> float:
    """A number in [0, 1)."""
    if not _real(value) or not 0 <= value < 1:
        raise invalid(owner, arg, value, "in [0, 1)")
    return float(value)


def integer(owner: str, arg: str, value: Any, *, low: int) -> int:
    """An int >= ``low``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise invalid(owner, arg, value, f"an int >= {low}")
    return int(value)


def boolean(owner: str, arg: str, value: Any) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise invalid(owner, arg, value, "a bool (True or False)")
    return value


def choice(owner: str, arg: str, value: Any, options: Sequence[Any]) -> Any:
    """One of ``options``."""
    if value not in options:
        raise invalid(owner, arg, value, f"one of {list(options)}")
    return value


def patterns(owner: str, arg: str, value: Any) -> list[str] | None:
    """None, or a list of glob patterns (strings)."""
    if value is None:
        return None
    texts = isinstance(value, Sequence) and not isinstance(value, str)
    if not texts or not all(isinstance(p, str) for p in value):
        raise invalid(owner, arg, value, "a list of glob patterns such as ['model.features.*']")
    return list(value)


def round_to(owner: str, value: Any) -> int | str:
    """``"auto"`` or an int >= 1 (a channel multiple)."""
    if value == "auto":
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise invalid(owner, "round_to", value, "an int >= 1 or 'auto'")
    return int(value)
