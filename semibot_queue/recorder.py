"""The outcome recorder: the one thread of a worker that writes outcomes to Redis.

Pool threads hand it :class:`~semibot_queue.outcomes.Outcome` objects. Each round trip
records every queued success (``ack.lua``) and takes as many pending tasks as that frees,
which the pool then runs; retries and dead letters are one script each. A slot is freed
only once its task's outcome is recorded. When Redis is unreachable the recording is
repeated with backoff; an outcome Redis refuses for a reason retrying will not fix is
recorded as a dead letter instead; and when even that fails, or Redis stays away, the
worker is told to exit (its tasks stay in flight, where recovery finds them).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import attrs

from semibot_queue.connection import REDIS_ERRORS, Reconnector, is_transient, translate
from semibot_queue.constants import MAX_ACK_BATCH
from semibot_queue.errors import (
    QueueConfigurationError,
    QueueConnectionError,
    QueueError,
    QueueOutOfMemoryError,
)
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.outcomes import Decider, Delivery, Outcome
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.slots import Slots

log = logging.getLogger("semibot_queue.consumer")

T = TypeVar("T")

#: Put on the queue to end the thread.
_STOP = None


#: Outcomes recorded by ack.lua: a result stored and published, the task finished.
_ACKED = ("succeeded", "cancelled")


def repeatable(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` is worth repeating: Redis unreachable or busy
    (nothing ran), or out of memory for now (a write refused whole)."""
    return is_transient(exc) or isinstance(translate(exc), QueueOutOfMemoryError)


class Fatal:
    """The first reason the worker cannot go on; set once, read by the fetch loop."""

    def __init__(self) -> None:
        self._error: QueueError | None = None
        self._set = threading.Event()

    def set(self, error: QueueError) -> None:
        """Record ``error`` as the reason to stop (the first one wins)."""
        if self._error is None:
            self._error = error
        self._set.set()

    def is_set(self) -> bool:
        """Whether the worker must exit."""
        return self._set.is_set()

    def raise_if_set(self) -> None:
        """Raise the recorded error, if any."""
        if self._error is not None:
            raise self._error


class _Unrecorded(Exception):  # noqa: N818 - internal signal, never escapes this module
    """A write gave up (shutdown, or Redis lost): its tasks stay in flight."""


@attrs.define(kw_only=True)
class Recorder:
    """Owns one named thread; ``start()`` starts it, ``stop()`` drains, stops and joins it.

    ``decider`` makes the dead letter of an outcome Redis refuses; ``dispatch`` hands taken
    tasks to the pool; the events are the consumer's (see TaskConsumer).
    """

    scripts: Scripts
    keys: KeySpace
    settings: QueueSettings
    worker_id: str
    decider: Decider
    metrics: Metrics
    reconnect: Reconnector
    slots: Slots
    dispatch: Callable[[list[Delivery]], None]
    stopping: threading.Event
    resync: threading.Event
    give_up: threading.Event
    fatal: Fatal
    _queue: queue.SimpleQueue[Outcome | None] = attrs.field(init=False, factory=queue.SimpleQueue)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    _closed: threading.Event = attrs.field(init=False, factory=threading.Event)

    @property
    def _inflight(self) -> str:
        return self.keys.inflight(self.worker_id)

    def submit(self, outcome: Outcome) -> None:
        """Queue ``outcome`` to be recorded; its slot stays held until then.

        After ``stop()`` nothing is recorded: the task was given back at shutdown (or
        stays in flight for recovery), and its redelivery records the outcome.
        """
        if self._closed.is_set():
            self._gone(outcome)
            return
        self._queue.put(outcome)

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(
            target=self._run, name=f"semibot-queue-recorder-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the thread runs (the watcher checks it)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Record what is queued, then stop the thread and wait for it."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._closed.set()
        while not self._queue.empty():  # submitted while the thread drained its last batch
            late = self._queue.get_nowait()
            if late is not None:
                self._gone(late)

    # --- the thread ---------------------------------------------------------------

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
                    self._queue.put(_STOP)  # seen again once this batch is recorded
                    break
                batch.append(item)
            if self.fatal.is_set():
                continue  # nothing more is written: the tasks stay in flight for recovery
            try:
                self._flush(batch)
            except _Unrecorded:
                continue
            except BaseException as exc:
                log.exception("queue %s: recording outcomes failed", self.keys.queue)
                self.fatal.set(QueueError(f"recording outcomes failed: {exc!r}"))

    def _flush(self, batch: list[Outcome]) -> None:
        successes = [o for o in batch if o.kind in _ACKED]
        for outcome in batch:
            if outcome.kind not in _ACKED:
                # Out of the in-flight list but still held: the orphan search must not see
                # it in between (see Slots.taking).
                with self.slots.taking:
                    self._record_failure(outcome)
                    self.slots.finish(outcome.delivery.stored)
        take = 0 if self.stopping.is_set() else self.slots.reserve(freed=len(successes))
        if not successes and not take:
            return
        held = [take]

        def lost_reply() -> None:
            # Repeated with nothing to take: free the reserved slots now, not after an
            # outage that may last until shutdown.
            self.resync.set()
            self.slots.fill(held[0], [])
            held[0] = 0

        taken: list[Delivery] = []
        finished: list[bytes] = []
        with self.slots.taking:
            try:
                finished, taken = self._ack(successes, take, lost_reply)
            finally:
                self.slots.swap(finished, held[0], [d.stored for d in taken])
        if taken:
            self.dispatch(taken)

    # --- successes ------------------------------------------------------------------

    def _ack(
        self, successes: list[Outcome], take: int, lost_reply: Callable[[], None]
    ) -> tuple[list[bytes], list[Delivery]]:
        """Record ``successes`` and take ``take`` tasks; the recorded and the taken."""
        acks = [(o.delivery.stored, o.task_id, o.result, o.channel) for o in successes]

        def write(attempt: int) -> tuple[list[int], list[Delivery]]:
            if attempt > 1 and take:
                lost_reply()
            return self.scripts.ack(
                self._inflight, self.settings.result_ttl, acks, take if attempt == 1 else 0
            )

        first = successes[0].task_id if successes else "-"
        try:
            flags, taken = self._write(first, "ack", write)
        except QueueError as exc:
            self._stop_if_refused(exc)
            if len(successes) <= 1 and not take:
                if successes:
                    self._unrecordable(successes[0], exc)
                return [o.delivery.stored for o in successes], []
            # Find the outcome Redis refuses: record them one by one, taking nothing.
            lost_reply()
            for outcome in successes:
                self._ack([outcome], 0, lost_reply)
            return [o.delivery.stored for o in successes], []
        for outcome, flag in zip(successes, flags, strict=True):
            if flag:
                self.metrics.processed[outcome.kind].inc()
            else:
                self._gone(outcome)
        return [o.delivery.stored for o in successes], taken

    # --- retries and dead letters ------------------------------------------------------

    def _record_failure(self, outcome: Outcome) -> None:
        try:
            self._write_failure(outcome)
        except QueueError as exc:
            self._stop_if_refused(exc)
            self._unrecordable(outcome, exc)

    def _stop_if_refused(self, exc: QueueError) -> None:
        """A refusal of us (credentials, ACL, certificate) is not a fault of the outcome:
        every write would be refused alike, so the worker stops and recovery takes over."""
        if isinstance(exc, QueueConfigurationError):
            self.fatal.set(exc)
            raise _Unrecorded from exc

    def _write_failure(self, outcome: Outcome) -> None:
        stored = outcome.delivery.stored
        if outcome.kind == "dropped":
            result = (outcome.result, outcome.channel, self.settings.result_ttl)
            dropped = self._write(
                outcome.task_id,
                "drop",
                lambda _: self.scripts.drop(self._inflight, stored, outcome.task_id, result),
            )
            if dropped:
                self.metrics.processed["cancelled"].inc()
                log.info(
                    "queue %s: task %s was cancelled before it started; dropped",
                    self.keys.queue,
                    outcome.task_id,
                    extra=self._extra(outcome.task_id),
                )
            return
        if outcome.kind == "retry":
            done = self._write(
                outcome.task_id,
                "retry",
                lambda _: self.scripts.retry(
                    self._inflight, stored, outcome.next_task, int(outcome.delay * 1000)
                ),
            )
            if not done:
                self._gone(outcome)
                return
            self.metrics.processed["failed"].inc()
            self.metrics.processed["retried"].inc()
            self.metrics.retries.inc()
            log.warning(
                "queue %s: task %s failed (%s); retry %d/%d in %.2fs",
                self.keys.queue,
                outcome.task_id,
                outcome.error,
                outcome.attempt,
                self.settings.max_retry_attempts,
                outcome.delay,
                extra=self._extra(outcome.task_id),
            )
            return
        result = (outcome.result, outcome.channel, self.settings.result_ttl)
        record_id = self._write(
            outcome.task_id,
            "dead letter",
            lambda _: self.scripts.dead_letter(
                self._inflight,
                stored,
                outcome.task_id,
                outcome.record,
                outcome.raw,
                result if outcome.result else None,
            ),
        )
        if record_id is None:
            self._gone(outcome)
            return
        self.metrics.processed["failed"].inc()
        self.metrics.processed["dead_lettered"].inc()
        log.error(
            "queue %s: task %s dead-lettered (%s): %s; record %s",
            self.keys.queue,
            outcome.task_id,
            outcome.summary,
            outcome.error,
            record_id,
            extra=self._extra(outcome.task_id),
        )

    def _unrecordable(self, outcome: Outcome, exc: QueueError) -> None:
        """Redis refused ``outcome`` itself: keep the task as a dead letter instead, or
        stop the worker when even that is refused."""
        log.error(
            "queue %s: outcome of task %s refused by Redis (%s); dead-lettering it",
            self.keys.queue,
            outcome.task_id,
            exc,
            extra=self._extra(outcome.task_id),
        )
        fallback = self.decider.unrunnable(outcome.delivery, exc, reason="unrecordable")
        try:
            self._write_failure(fallback)
        except QueueError as second:
            self.fatal.set(
                QueueError(
                    f"task {outcome.task_id}: its outcome cannot be recorded ({exc}) nor"
                    f" dead-lettered ({second}); the worker stops so that recovery takes it"
                )
            )
            raise _Unrecorded from second

    def _gone(self, outcome: Outcome) -> None:
        log.warning(
            "queue %s: task %s finished after it left this worker (recovered or given"
            " back); its redelivery records the outcome",
            self.keys.queue,
            outcome.task_id,
            extra=self._extra(outcome.task_id),
        )

    # --- writing through outages --------------------------------------------------------

    def _write(self, task_id: str, what: str, write: Callable[[int], T]) -> T:
        """``write(attempt)``, repeated while Redis is unreachable (or out of memory) until
        it works; raises _Unrecorded when the worker gives up, QueueError when refused."""
        failures = 0
        while True:
            try:
                return write(failures + 1)
            except REDIS_ERRORS as exc:
                if not repeatable(exc):
                    raise translate(exc, f"recording {what} of task {task_id}") from exc
                failures += 1
                if failures >= self.settings.max_reconnect_attempts:
                    self.fatal.set(
                        QueueConnectionError(
                            f"Redis at {self.reconnect.url} unreachable after {failures}"
                            f" attempts (recording {what} of task {task_id}): {exc}"
                        )
                    )
                if self.give_up.is_set() or self.fatal.is_set():
                    log.error(
                        "queue %s: task %s outcome (%s) unrecorded at shutdown (%s); it stays"
                        " in flight for recovery",
                        self.keys.queue,
                        task_id,
                        what,
                        exc,
                        extra=self._extra(task_id),
                    )
                    raise _Unrecorded from exc
                self.metrics.reconnects.inc()
                wait = self.reconnect.delay(failures)
                log.warning(
                    "queue %s: recording %s of task %s failed (%s); attempt %d, next in %.2fs",
                    self.keys.queue,
                    what,
                    task_id,
                    exc,
                    failures,
                    wait,
                    extra=self._extra(task_id),
                )
                self.give_up.wait(wait)

    def _extra(self, task_id: str) -> dict[str, str]:
        return {"queue": self.keys.queue, "task_id": task_id, "worker_id": self.worker_id}
