"""The watcher thread of a worker: heartbeats, crash recovery, due retries, housekeeping.

It never runs tasks. Its loop wakes every WATCHER_TICK: it promotes due retries each
time, and every HEARTBEAT_INTERVAL it heartbeats, recovers workers silent for longer
than WORKER_DEAD_AFTER, trims the dead letters and refreshes the length gauges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import attrs

from semibot_queue.codec import Codec
from semibot_queue.connection import TRANSIENT, Client, as_bytes
from semibot_queue.constants import WATCHER_TICK
from semibot_queue.dead_letter import raw_bytes
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import TaskResult
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.watcher")


@attrs.define
class Watcher:
    """Owns one named thread; ``start()`` starts it, ``stop()`` stops and joins it."""

    worker_id: str
    client: Client
    keys: KeySpace
    settings: QueueSettings
    scripts: Scripts
    codec: Codec
    metrics: Metrics
    trim_dead_letters: Callable[[], None]
    clock: Callable[[], float] = time.monotonic
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None
    _next_beat: float = 0.0

    def start(self) -> None:
        """Start the thread (the worker has already sent its first heartbeat)."""
        self._next_beat = self.clock() + self.settings.heartbeat_interval
        self._thread = threading.Thread(
            target=self._run, name=f"semibot-queue-watcher-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except TRANSIENT as exc:
                self.metrics.reconnects.inc()
                log.warning(
                    "queue %s: watcher of %s cannot reach Redis (%s); retrying",
                    self.keys.queue,
                    self.worker_id,
                    exc,
                    extra={"queue": self.keys.queue, "worker_id": self.worker_id},
                )
            except Exception:
                # A bug here must not stop heartbeats for good: log it and go on.
                log.exception("queue %s: watcher tick failed", self.keys.queue)
            self._stop.wait(WATCHER_TICK)

    def tick(self) -> None:
        """One round: promote due retries; heartbeat and recover when due."""
        s = self.settings
        self.scripts.promote(s.maintenance_batch, s.max_queue_length)
        if self.clock() < self._next_beat:
            return
        self._next_beat = self.clock() + s.heartbeat_interval
        self.scripts.heartbeat(self.worker_id)
        self.recover_dead_workers()
        self.trim_dead_letters()
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Read the lengths from Redis into the gauges (never done by the hot loop)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.keys.pending)
        pipe.zcard(self.keys.scheduled)
        pipe.hlen(self.keys.dead)
        pending, scheduled, dead = pipe.execute()
        self.metrics.queue_length.set(pending)
        self.metrics.scheduled_length.set(scheduled)
        self.metrics.dead_letter_length.set(dead)

    def dead_workers(self) -> list[str]:
        """Workers whose last heartbeat is older than WORKER_DEAD_AFTER, on the Redis clock."""
        seconds, micros = self.client.time()
        cutoff_ms = seconds * 1000 + micros // 1000 - int(self.settings.worker_dead_after * 1000)
        ids = cast(
            "list[bytes]", self.client.zrangebyscore(self.keys.workers, "-inf", f"({cutoff_ms}")
        )
        return [raw.decode() for raw in ids if raw.decode() != self.worker_id]

    def recover_dead_workers(self) -> int:
        """Give the tasks of every dead worker back to pending; how many were requeued."""
        s = self.settings
        total = 0
        for dead in self.dead_workers():
            while True:
                reply = self.scripts.recover(
                    dead,
                    int(s.worker_dead_after * 1000),
                    s.max_delivery_attempts,
                    s.maintenance_batch,
                    s.max_queue_length,
                )
                if reply is None:
                    break  # it heartbeated meanwhile: alive after all
                left, requeued, poisoned = reply
                total += len(requeued)
                self._report(dead, requeued, poisoned)
                if left == 0 or not (requeued or poisoned):
                    break  # done, or pending is full: the rest waits for the next round
        return total

    def _report(self, dead: str, requeued: list[str], poisoned: list[str]) -> None:
        self.metrics.recovered.inc(len(requeued))
        for task_id in requeued:
            log.error(
                "queue %s: task %s recovered from dead worker %s and put back on pending",
                self.keys.queue,
                task_id,
                dead,
                extra={"queue": self.keys.queue, "task_id": task_id, "worker_id": dead},
            )
        for task_id in poisoned:
            self.metrics.processed["dead_lettered"].inc()
            log.error(
                "queue %s: task %s dead-lettered as poison: workers died holding it"
                " %d times (last %s)",
                self.keys.queue,
                task_id,
                self.settings.max_delivery_attempts,
                dead,
                extra={"queue": self.keys.queue, "task_id": task_id, "worker_id": dead},
            )
            self._publish_poison_result(task_id)

    def _publish_poison_result(self, task_id: str) -> None:
        raw = self.client.hget(self.keys.dead, task_id)
        if raw is None:
            return
        record = self.codec.decode_record(as_bytes(raw))
        try:
            message = self.codec.decode_message(raw_bytes(record))
        except Exception:  # noqa: BLE001 - an unparseable poison task has no session to tell
            return
        result = TaskResult(
            task_id=task_id,
            session_id=message.session_id,
            status="failed",
            error=f"{record.error_type}: {record.error}",
            attempts=message.retry_count + 1,
            finished_at=record.failed_at,
        )
        self.scripts.publish_result(
            task_id,
            self.codec.encode_result(result),
            self.keys.result_channel(message.session_id),
            self.settings.result_ttl,
        )
