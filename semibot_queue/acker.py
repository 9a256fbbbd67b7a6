"""The acker thread: records successes in batches, one round trip for all of them.

Handlers finish on the pool; their results queue here. Each round trip acks every
queued result and takes as many pending tasks as that frees (``ack.lua``), which the
pool then runs. Under load a round trip carries several tasks; when idle it carries one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from semibot_queue.constants import MAX_ACK_BATCH
from semibot_queue.runner import Delivery, TaskRunner
from semibot_queue.slots import Slots

log = logging.getLogger("semibot_queue.consumer")

#: Put on the queue to end the thread.
_STOP = None


class Acker:
    """Owns one named thread; ``start()`` starts it, ``stop()`` drains, stops and joins it."""

    def __init__(
        self,
        runner: TaskRunner,
        slots: Slots,
        dispatch: Callable[[list[bytes]], None],
        stopping: threading.Event,
        resync: threading.Event,
    ) -> None:
        self._runner = runner
        self._slots = slots
        self._dispatch = dispatch
        self._stopping = stopping
        self._resync = resync
        self._queue: queue.SimpleQueue[tuple[Delivery, bytes] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, delivery: Delivery, encoded_result: bytes) -> bool:
        """Queue a success to be acked (its slot stays held until then); False once the
        acker has stopped, when the caller must ack by itself."""
        if self._thread is None:
            return False
        self._queue.put((delivery, encoded_result))
        return True

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(
            target=self._run, name=f"semibot-queue-acker-{self._runner.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Ack what is queued, then stop the thread and wait for it."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < MAX_ACK_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # seen again once this batch is acked
                    break
                batch.append(item)
            self._flush(batch)

    def _flush(self, batch: list[tuple[Delivery, bytes]]) -> None:
        take = 0 if self._stopping.is_set() else self._slots.reserve(freed=len(batch))
        taken: list[bytes] = []
        held = [take]

        def lost_reply() -> None:
            # The call is being repeated with nothing to take: free the reserved slots
            # now, not after an outage that may last until shutdown.
            self._resync.set()
            self._slots.fill(held[0], [])
            held[0] = 0

        with self._slots.taking:
            try:
                taken = self._runner.ack_batch(batch, take, lost_reply)
            except Exception:  # pragma: no cover - a bug here must not strand the slots
                log.exception(
                    "queue %s: acking %d task(s) failed", self._runner.keys.queue, len(batch)
                )
            finally:
                self._slots.swap([delivery.stored for delivery, _ in batch], held[0], taken)
        if taken:
            self._dispatch(taken)
