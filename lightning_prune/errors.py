"""The one exception type lightning-prune raises for problems it can explain."""

from __future__ import annotations


class PruningError(ValueError):
    """Raised when an argument, a model or its inputs cannot be pruned as asked.

    It subclasses :class:`ValueError` because the cause is almost always bad input: the message names the
    argument or layer, echoes the value and says what is allowed.
    """
