"""Exponential backoff with jitter, as pure functions (safe to share between threads)."""

from __future__ import annotations

import random
from collections.abc import Callable

#: A source of uniform numbers in [0, 1); tests inject a fixed one.
Random = Callable[[], float]


def exponential_delay(
    attempt: int, base: float, cap: float, jitter: float, rand: Random = random.random
) -> float:
    """Delay before attempt ``attempt`` (1 for the first retry).

    ``base * 2**(attempt-1)`` capped at ``cap``, then moved by up to ``jitter`` of
    itself either way (``rand() == 0.5`` gives the exact value), never above ``cap``.
    """
    exponent = min(max(attempt - 1, 0), 63)  # 2**63 already exceeds any cap
    delay = min(cap, base * 2.0**exponent)
    return min(cap, delay * (1.0 + jitter * (2.0 * rand() - 1.0)))
