"""The watcher thread of a worker: heartbeats, crash recovery, due retries, housekeeping.

It never runs tasks. Its loop wakes every WATCHER_TICK: it promotes due retries and
checks that the worker's own threads are alive each time; every HEARTBEAT_INTERVAL it
heartbeats, recovers workers silent for longer than WORKER_DEAD_AFTER (never inside the
grace window that follows an outage), adopts in-flight lists that no registry entry
points to, trims the dead letters and refreshes the length gauges. Once the worker is
stopping it ends a blocking pop at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import attrs

from semibot_queue.codec import Codec
from semibot_queue.connection import REDIS_ERRORS, Client, translate
from semibot_queue.constants import ADOPT_EVERY, WATCHER_TICK
from semibot_queue.errors import QueueError
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import TaskMessage, TaskResult
from semibot_queue.recorder import Fatal, repeatable
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
    stopping: threading.Event = attrs.field(factory=threading.Event)
    fatal: Fatal = attrs.field(factory=Fatal)
    check_health: Callable[[], None] = lambda: None
    interrupt_pop: Callable[[], None] = lambda: None
    running: Callable[[], dict[str, TaskMessage]] = dict
    clock: Callable[[], float] = time.monotonic
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None
    _next_beat: float = 0.0
    _beats: int = 0

    def start(self) -> None:
        """Start the thread (the worker has already sent its first heartbeat)."""
        self._next_beat = self.clock() + self.settings.heartbeat_interval
        self._stop.clear()
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
            if self.stopping.is_set():
                self.interrupt_pop()
            try:
                self.check_health()
                if not self.fatal.is_set():
                    self.tick()
            except REDIS_ERRORS as exc:
                if not repeatable(exc):
                    log.error(
                        "queue %s: watcher of %s refused: %s", self.keys.queue, self.worker_id, exc
                    )
                    self.fatal.set(translate(exc, "the watcher's round"))
                    self._stop.wait(WATCHER_TICK)
                    continue
                self.metrics.reconnects.inc()
                log.warning(
                    "queue %s: watcher of %s cannot reach Redis (%s); retrying",
                    self.keys.queue,
                    self.worker_id,
                    exc,
                    extra={"queue": self.keys.queue, "worker_id": self.worker_id},
                )
            except Exception as exc:
                # A worker that cannot heartbeat or recover would look dead or alive
                # without being either: stop it, so a supervisor restarts it.
                log.exception("queue %s: watcher of %s failed", self.keys.queue, self.worker_id)
                error = translate(exc, "watcher") if not isinstance(exc, QueueError) else exc
                self.fatal.set(error)
            self._stop.wait(WATCHER_TICK)

    def beat(self) -> bool:
        """Heartbeat now; whether the worker had been forgotten (taken for dead)."""
        s = self.settings
        # A silence this long means every worker may look dead: one heartbeat before it
        # began plus this gap reach WORKER_DEAD_AFTER.
        gap = s.worker_dead_after - s.heartbeat_interval
        _, added, opened = self.scripts.heartbeat(
            self.worker_id, outage_ms=int(gap * 1000), grace_ms=int(s.worker_dead_after * 1000)
        )
        if opened:
            log.warning(
                "queue %s: no worker heartbeated for over %.1fs (an outage?): no worker is"
                " declared dead for the next %.1fs",
                self.keys.queue,
                gap,
                s.worker_dead_after,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )
        return bool(added)

    def tick(self) -> None:
        """One round: promote due retries; heartbeat and recover when due."""
        s = self.settings
        self.scripts.promote(s.maintenance_batch, s.max_queue_length)
        if self.clock() < self._next_beat:
            return
        self._next_beat = self.clock() + s.heartbeat_interval
        self.beat()
        self.pass_on_cancels()
        self._beats += 1
        if self._beats % ADOPT_EVERY == 1:
            self.adopt_orphan_lists()
        self.recover_dead_workers()
        self.trim_dead_letters()
        self.refresh_gauges()

    def pass_on_cancels(self) -> list[str]:
        """Tell the running handlers whose cancel was asked (``cancel_requested()``)."""
        running = self.running()
        if not running:
            return []
        ids = list(running)
        flags = self.client.hmget(self.keys.cancel, ids)
        asked = [task_id for task_id, flag in zip(ids, flags, strict=True) if flag is not None]
        for task_id in asked:
            message = running[task_id]
            if not message.cancel_requested():
                message.mark_cancel_requested()
                log.info(
                    "queue %s: task %s asked to stop (cancelled while running)",
                    self.keys.queue,
                    task_id,
                    extra={
                        "queue": self.keys.queue,
                        "task_id": task_id,
                        "worker_id": self.worker_id,
                    },
                )
        return asked

    def trim_dead_letters(self) -> None:
        """Evict dead letters past their TTL or bound, logging and counting each one."""
        s = self.settings
        for record_id in self.scripts.trim_dead(s.dead_letter_max_length, s.dead_letter_ttl):
            self.metrics.evictions.inc()
            log.warning(
                "queue %s: dead letter %s evicted (DEAD_LETTER_MAX_LENGTH=%d, DEAD_LETTER_TTL=%ds)",
                self.keys.queue,
                record_id,
                s.dead_letter_max_length,
                s.dead_letter_ttl,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )

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

    def adopt_orphan_lists(self) -> list[str]:
        """Register in-flight lists whose worker is not registered (see adopt.lua)."""
        prefix = self.keys.inflight_prefix
        found: list[str] = []
        for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            worker = cast("bytes", key).decode()[len(prefix) :]
            if worker != self.worker_id:
                found.append(worker)
        if not found:
            return []
        adopted = self.scripts.adopt(found)
        for worker in adopted:
            log.warning(
                "queue %s: in-flight list of unregistered worker %s found; it is recovered"
                " unless that worker heartbeats within %.1fs",
                self.keys.queue,
                worker,
                self.settings.worker_dead_after,
                extra={"queue": self.keys.queue, "worker_id": worker},
            )
        return adopted

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
                    (s.maintenance_batch, s.max_queue_length, s.max_payload_bytes),
                )
                if reply == "grace":
                    return total  # just after an outage: every live worker may beat first
                if reply == "alive":
                    break  # it heartbeated meanwhile
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
        for record_id in poisoned:
            self.metrics.processed["dead_lettered"].inc()
            task_id = record_id.rpartition("#")[0] or record_id
            log.error(
                "queue %s: task %s dead-lettered as poison (%s): workers died holding it"
                " %d times (last %s)",
                self.keys.queue,
                task_id,
                record_id,
                self.settings.max_delivery_attempts,
                dead,
                extra={"queue": self.keys.queue, "task_id": task_id, "worker_id": dead},
            )
            self._publish_poison_result(record_id, task_id)

    def _publish_poison_result(self, record_id: str, task_id: str) -> None:
        raw = self.client.hget(self.keys.dead_raw, record_id)
        if raw is None:
            return
        try:
            message = self.codec.decode_delivery(cast("bytes", raw), 0)
        except Exception:  # noqa: BLE001 - an unparseable poison task has no session to tell
            return
        result = TaskResult(
            task_id=task_id,
            session_id=message.session_id,
            status="failed",
            error="PoisonTaskError: workers died holding this task"
            f" {self.settings.max_delivery_attempts} times",
            attempts=message.retry_count + 1,
            finished_at=time.time(),
        )
        self.scripts.publish_result(
            task_id,
            self.codec.encode_result(result),
            self.keys.result_channel(message.session_id),
            self.settings.result_ttl,
        )


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN pattern (queue names may not hold glob characters,
    but the hash tag's braces are not special; brackets and stars would be)."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
