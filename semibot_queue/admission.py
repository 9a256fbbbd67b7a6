"""What a producer checks before it sends an enqueue, and how it watches the queue's
length: the ``delay`` argument, task ids repeated in one call, and the warning when the
pending length crosses QUEUE_LENGTH_WARNING_THRESHOLD (on crossing, not on every push
above it, and at most once per QUEUE_LENGTH_WARNING_INTERVAL). No I/O here.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from semibot_queue.errors import InvalidTaskError
from semibot_queue.models import TaskPayload

#: Task ids named at most in one DuplicateTaskError or InvalidTaskError message.
NAMED_IDS = 5


def delay_ms(delay: object) -> int | None:
    """``delay`` seconds as whole milliseconds (rounded up); None for 0 (pending at once).
    InvalidTaskError naming ``delay`` unless it is a finite number >= 0."""
    ms = math.nan
    if not isinstance(delay, bool) and isinstance(delay, (int, float)):
        try:
            ms = float(delay) * 1000
        except OverflowError:  # an int beyond any float
            ms = math.inf
    if not (math.isfinite(ms) and ms >= 0):
        raise InvalidTaskError(f"delay: must be a finite number of seconds >= 0, got {delay!r}")
    return math.ceil(ms) or None


def named(ids: list[str]) -> str:
    """Up to NAMED_IDS task ids for a message, with how many more there are."""
    shown = ", ".join(ids[:NAMED_IDS])
    return shown if len(ids) <= NAMED_IDS else f"{shown} (and {len(ids) - NAMED_IDS} more)"


def refuse_repeated_ids(batch: list[TaskPayload]) -> None:
    """InvalidTaskError naming each task id given more than once, and where."""
    positions: dict[str, list[int]] = {}
    for index, payload in enumerate(batch):
        positions.setdefault(payload.task_id, []).append(index)
    repeated = [(task_id, where) for task_id, where in positions.items() if len(where) > 1]
    if repeated:
        shown = "; ".join(
            f"{task_id} at positions {', '.join(map(str, where))}"
            for task_id, where in repeated[:NAMED_IDS]
        )
        raise InvalidTaskError(
            f"enqueue_many: a task id may appear once per call, got {shown}: nothing written"
        )


class LengthWatch:
    """Tells when a length seen crosses a threshold from below, at most once per
    ``interval`` seconds: staying above it, or crossing again sooner, tells nothing.
    Safe to share between threads; ``clock`` is injectable for tests."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._above = False
        self._last: float | None = None
        self._lock = threading.Lock()

    def crossed(self, length: int, threshold: int) -> bool:
        """Note ``length``; whether it is a crossing worth a warning."""
        above = length >= threshold
        if above == self._above:
            return False  # the usual case, without the lock: nothing changed
        with self._lock:
            if above == self._above:
                return False
            self._above = above
            if not above:
                return False
            now = self._clock()
            if self._last is not None and now - self._last < self._interval:
                return False
            self._last = now
            return True
