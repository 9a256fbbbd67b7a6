"""Runs one taken task through its handler and records the outcome in Redis.

Every outcome is one script: ack (result stored and published), retry (scheduled with
backoff), or dead letter. A recording that fails because Redis is away is repeated
until Redis is back, or until the worker gives up at shutdown (the task then stays
in the in-flight list, where crash recovery finds it: never lost).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from semibot_queue.backoff import Random, exponential_delay
from semibot_queue.codec import Codec, split_redelivery, task_id_of
from semibot_queue.connection import TRANSIENT, Reconnector
from semibot_queue.dead_letter import raw_fields
from semibot_queue.errors import InvalidTaskError, PermanentTaskError
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import DeadLetterRecord, TaskMessage, TaskResult
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.consumer")

Handler = Callable[[TaskMessage], Any]
T = TypeVar("T")


@attrs.frozen
class Delivery:
    """A task as taken from Redis (``stored``, byte for byte) and as the handler sees it."""

    stored: bytes
    message: TaskMessage


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


#: A task that succeeded and the encoded result to ack it with.
Success = tuple[Delivery, bytes]


@attrs.define
class TaskRunner:
    """Everything a pool thread needs to run tasks of one worker."""

    handler: Handler
    worker_id: str
    keys: KeySpace
    settings: QueueSettings
    scripts: Scripts
    codec: Codec
    metrics: Metrics
    reconnect: Reconnector
    #: Set when the worker stops waiting for Redis to record outcomes.
    give_up: threading.Event
    #: Set once an outcome failed MAX_RECONNECT_ATTEMPTS times in a row: the worker must
    #: give up on Redis even when the fetch loop, all slots busy, makes no call to count.
    redis_lost: threading.Event
    rand: Random

    @property
    def inflight(self) -> str:
        """This worker's in-flight list."""
        return self.keys.inflight(self.worker_id)

    def _log_extra(self, task_id: str) -> dict[str, str]:
        return {"queue": self.keys.queue, "task_id": task_id, "worker_id": self.worker_id}

    # --- running ----------------------------------------------------------------

    def run(self, stored: bytes) -> Success | None:
        """Decode and run one task; never raises.

        A failure is recorded here (retry or dead letter). A success is returned as
        ``(delivery, encoded result)`` for the acker to record with others in one trip.
        """
        try:
            message = self.codec.decode_delivery(stored)
        except InvalidTaskError as exc:
            self._dead_letter_invalid(stored, exc)
            return None
        return self._process(Delivery(stored, message))

    def _process(self, delivery: Delivery) -> Success | None:
        message = delivery.message
        self.metrics.concurrent.inc()
        started = time.perf_counter()
        try:
            value = self.handler(message)
        except PermanentTaskError as exc:
            self._failed(delivery, exc, started, permanent=True)
        except Exception as exc:  # noqa: BLE001 - any handler error is an outcome to record
            self._failed(delivery, exc, started, permanent=False)
        else:
            return self._succeeded(delivery, value, started)
        finally:
            self.metrics.concurrent.dec()
        return None

    def _succeeded(self, delivery: Delivery, value: Any, started: float) -> Success | None:
        message = delivery.message
        duration = time.perf_counter() - started
        self.metrics.duration.observe(duration)
        result = TaskResult(
            task_id=message.task_id,
            session_id=message.session_id,
            status="succeeded",
            result=value,
            attempts=message.retry_count + 1,
            duration_s=duration,
            finished_at=time.time(),
        )
        try:
            encoded = self.codec.encode_result(result)
        except InvalidTaskError as exc:
            self._failed(delivery, PermanentTaskError(str(exc)), started, permanent=True)
            return None
        self.metrics.processed["succeeded"].inc()
        return delivery, encoded

    def ack_batch(
        self, batch: list[Success], take: int, lost_reply: Callable[[], None]
    ) -> list[bytes]:
        """Ack every success of ``batch`` (out of the in-flight list, result stored and
        published) and take up to ``take`` pending tasks, in one round trip; the taken.

        If that round trip fails and is repeated, the repeat takes nothing and
        ``lost_reply()`` is called: the first try may have taken tasks before its reply
        was lost, and they must be found again in the in-flight list.
        """
        acks = [
            (d.stored, d.message.task_id, encoded, self.keys.result_channel(d.message.session_id))
            for d, encoded in batch
        ]
        ttl = self.settings.result_ttl

        def write(attempt: int) -> tuple[list[int], list[bytes]]:
            if attempt > 1 and take:
                lost_reply()
            return self.scripts.ack(self.inflight, ttl, acks, take if attempt == 1 else 0)

        outcome = self._record(acks[0][1], "ack", write)
        if outcome is None:
            return []
        flags, taken = outcome
        for (delivery, _), flag in zip(batch, flags, strict=True):
            if not flag:
                log.warning(
                    "queue %s: task %s finished after it left this worker (recovered or"
                    " given back); its redelivery records the result",
                    self.keys.queue,
                    delivery.message.task_id,
                    extra=self._log_extra(delivery.message.task_id),
                )
        return taken

    # --- failures ---------------------------------------------------------------

    def _failed(
        self, delivery: Delivery, exc: Exception, started: float, *, permanent: bool
    ) -> None:
        message = delivery.message
        duration = time.perf_counter() - started
        self.metrics.duration.observe(duration)
        self.metrics.processed["failed"].inc()
        if not permanent and message.retry_count < self.settings.max_retry_attempts:
            self._schedule_retry(delivery, exc)
            return
        reason = "permanent" if permanent else "exhausted"
        record = DeadLetterRecord(
            task_id=message.task_id,
            reason=reason,
            error_type=type(exc).__name__,
            error=str(exc),
            traceback="".join(traceback.format_exception(exc)),
            attempts=message.retry_count + 1,
            delivery_count=message.delivery_count,
            enqueued_at=message.enqueued_at,
            failed_at=time.time(),
            worker_id=self.worker_id,
            message=self.codec.unstructure(message),
        )
        result = TaskResult(
            task_id=message.task_id,
            session_id=message.session_id,
            status="failed",
            error=_describe(exc),
            attempts=message.retry_count + 1,
            duration_s=duration,
            finished_at=record.failed_at,
        )
        channel = self.keys.result_channel(message.session_id)
        self._dead_letter(
            delivery.stored,
            record,
            (self.codec.encode_result(result), channel, self.settings.result_ttl),
        )

    def _schedule_retry(self, delivery: Delivery, exc: Exception) -> None:
        message = delivery.message
        attempt = message.retry_count + 1
        s = self.settings
        delay = exponential_delay(
            attempt, s.retry_base_delay, s.retry_max_delay, s.retry_jitter, self.rand
        )
        following = attrs.evolve(message, retry_count=attempt, last_error=_describe(exc))
        encoded = self.codec.encode_message(following)
        done = self._record(
            message.task_id,
            "retry",
            lambda _: self.scripts.retry(
                self.inflight, delivery.stored, encoded, int(delay * 1000)
            ),
        )
        if done:
            self.metrics.processed["retried"].inc()
            self.metrics.retries.inc()
            log.warning(
                "queue %s: task %s failed (%s); retry %d/%d in %.2fs",
                self.keys.queue,
                message.task_id,
                _describe(exc),
                attempt,
                s.max_retry_attempts,
                delay,
                extra=self._log_extra(message.task_id),
            )

    def _dead_letter_invalid(self, stored: bytes, exc: InvalidTaskError) -> None:
        lost, body = split_redelivery(stored)
        raw, encoding = raw_fields(body)
        record = DeadLetterRecord(
            task_id=task_id_of(body),
            reason="invalid",
            error_type=type(exc).__name__,
            error=str(exc),
            failed_at=time.time(),
            worker_id=self.worker_id,
            delivery_count=lost + 1,
            raw=raw,
            raw_encoding=encoding,
        )
        self._dead_letter(stored, record, None)

    def _dead_letter(
        self, stored: bytes, record: DeadLetterRecord, result: tuple[bytes, str, int] | None
    ) -> None:
        encoded = self.codec.encode_record(record)
        moved = self._record(
            record.task_id,
            "dead letter",
            lambda _: self.scripts.dead_letter(
                self.inflight, stored, record.task_id, encoded, result
            ),
        )
        if not moved:
            return
        self.metrics.processed["dead_lettered"].inc()
        log.error(
            "queue %s: task %s dead-lettered (%s after %d attempt(s)): %s: %s",
            self.keys.queue,
            record.task_id,
            record.reason,
            record.attempts,
            record.error_type,
            record.error,
            extra=self._log_extra(record.task_id),
        )
        self.trim_dead_letters()

    def trim_dead_letters(self) -> None:
        """Evict dead letters past their TTL or bound, logging and counting each one."""
        s = self.settings
        evicted = self._record(
            "-",
            "trim",
            lambda _: self.scripts.trim_dead(s.dead_letter_max_length, s.dead_letter_ttl),
        )
        for task_id in evicted or []:
            self.metrics.evictions.inc()
            log.warning(
                "queue %s: dead letter %s evicted (DEAD_LETTER_MAX_LENGTH=%d, DEAD_LETTER_TTL=%ds)",
                self.keys.queue,
                task_id,
                s.dead_letter_max_length,
                s.dead_letter_ttl,
                extra=self._log_extra(task_id),
            )

    # --- recording through outages -------------------------------------------

    def _record(self, task_id: str, what: str, write: Callable[[int], T]) -> T | None:
        """``write(attempt)``, repeated while Redis is unreachable until it works or we give up."""
        failures = 0
        while True:
            try:
                return write(failures + 1)
            except TRANSIENT as exc:
                failures += 1
                if self.give_up.is_set():
                    log.error(
                        "queue %s: task %s outcome (%s) unrecorded at shutdown, Redis"
                        " unreachable (%s); it stays in flight for recovery",
                        self.keys.queue,
                        task_id,
                        what,
                        exc,
                        extra=self._log_extra(task_id),
                    )
                    return None
                if failures >= self.settings.max_reconnect_attempts:
                    self.redis_lost.set()
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
                    extra=self._log_extra(task_id),
                )
                self.give_up.wait(wait)
