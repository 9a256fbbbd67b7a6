"""The slots of one worker: which tasks it holds, and how many more it may take.

A slot is held from the moment a task is taken (reserved before the Redis call that
takes it) until its outcome is recorded. Two threads take tasks, the fetch loop and the
acker; reservations keep them from taking more than ``size`` between them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter


class Slots:
    """Thread-safe slot accounting; every method is one short critical section."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._running: Counter[bytes] = Counter()
        self._reserved = 0
        self._changed = threading.Condition()
        #: Held by the recorder from each Redis call until the slots match it (tasks it
        #: took are held, tasks it finished are freed), and by the orphan search: a task
        #: in flight in Redis but not yet held, or held but just finished, is no orphan.
        self.taking = threading.Lock()

    def _free(self) -> int:
        return self.size - sum(self._running.values()) - self._reserved

    def reserve(self, freed: int = 0, most: int | None = None) -> int:
        """Reserve every free slot (plus ``freed`` about to be freed), at most ``most``."""
        with self._changed:
            count = max(0, self._free() + freed)
            if most is not None:
                count = min(count, most)
            self._reserved += count
            return count

    def fill(self, reserved: int, taken: list[bytes]) -> None:
        """Turn ``reserved`` reservations into the ``taken`` tasks (no more than reserved)."""
        with self._changed:
            self._reserved -= reserved
            for stored in taken:
                self._running[stored] += 1
            self._changed.notify_all()

    def finish(self, stored: bytes) -> None:
        """Free the slot of ``stored``: its outcome is recorded (or given up)."""
        self.swap([stored], 0, [])

    def swap(self, finished: list[bytes], reserved: int, taken: list[bytes]) -> None:
        """Free the slots of ``finished`` and turn ``reserved`` reservations into ``taken``,
        at once (the acker's round trip does both)."""
        with self._changed:
            for stored in finished:
                self._running[stored] -= 1
                if self._running[stored] <= 0:
                    del self._running[stored]
            self._reserved -= reserved
            for stored in taken:
                self._running[stored] += 1
            self._changed.notify_all()

    def wait_free(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a free slot; whether there is one."""
        with self._changed:
            if self._free() <= 0:
                self._changed.wait(timeout)
            return self._free() > 0

    def wait_idle(self, deadline: float, hurry: threading.Event, tick: float) -> list[bytes]:
        """Wait until no task is held, ``deadline`` passes or ``hurry`` is set; the held."""
        with self._changed:
            while (self._running or self._reserved) and not hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, tick))
            return list(self._running.elements())

    def missing(self, present: list[bytes]) -> list[bytes]:
        """Those of ``present`` (the in-flight list) that no slot holds."""
        with self._changed:
            return list((Counter(present) - self._running).elements())
