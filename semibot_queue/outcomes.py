"""What happened to one task: its handler is run here and the outcome decided.

Nothing here touches Redis: a pool thread turns a taken task into an :class:`Outcome`
(succeeded, retry or dead letter) and hands it to the
:class:`~semibot_queue.recorder.Recorder`, the one thread that writes outcomes.
``decide`` never raises, whatever the handler raises or returns and whatever encoding
its outcome raises: a pool thread's loop cannot end on a task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import attrs

from semibot_queue.backoff import Random, exponential_delay
from semibot_queue.codec import Codec, describe_error, format_traceback, task_id_of
from semibot_queue.constants import CANCELLED_ERROR
from semibot_queue.errors import InvalidTaskError, PermanentTaskError, TaskTimeoutError
from semibot_queue.keys import KeySpace
from semibot_queue.limits import TimeLimiter
from semibot_queue.metrics import Metrics
from semibot_queue.models import DeadLetterRecord, TaskMessage, TaskResult
from semibot_queue.scripts import Taken as Delivery
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.consumer")

Handler = Callable[[TaskMessage], Any]
Kind = Literal["succeeded", "cancelled", "retry", "dead", "dropped"]

__all__ = ["Decider", "Delivery", "Handler", "Outcome"]


@attrs.frozen
class Outcome:
    """One finished delivery, encoded and ready to record in one script call.

    ``result`` is the TaskResult JSON to store and publish on ``channel`` (empty for a
    retry, or for a dead letter with no session to tell); ``next_task`` the retry copy;
    ``record`` the dead-letter record JSON, with ``raw`` the bytes of a task that could
    not be parsed; ``summary`` the text of the log line once recorded.
    """

    delivery: Delivery
    task_id: str
    kind: Kind
    result: bytes = b""
    channel: str = ""
    next_task: bytes = b""
    delay: float = 0.0
    record: bytes = b""
    raw: bytes | None = None
    summary: str = ""
    error: str = ""
    attempt: int = 0


@attrs.define
class Decider:
    """Runs handlers and turns each delivery into an Outcome (no I/O)."""

    handler: Handler
    worker_id: str
    keys: KeySpace
    settings: QueueSettings
    codec: Codec
    metrics: Metrics
    rand: Random
    limiter: TimeLimiter | None = None
    #: The messages running now, by task id (the watcher marks those whose cancel is asked).
    running: dict[str, TaskMessage] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def running_now(self) -> dict[str, TaskMessage]:
        """A copy of the messages running now, by task id."""
        with self._lock:
            return dict(self.running)

    def decide(self, delivery: Delivery) -> Outcome:
        """Run ``delivery`` and return its outcome; never raises."""
        try:
            return self._decide(delivery)
        except BaseException as exc:  # noqa: BLE001 - a pool thread must survive anything
            return self.unrunnable(delivery, exc)

    def unrunnable(
        self, delivery: Delivery, exc: BaseException, reason: str = "invalid"
    ) -> Outcome:
        """A dead letter keeping the raw bytes, for a task nothing else could be made of."""
        record = DeadLetterRecord(
            task_id=task_id_of(delivery.stored),
            reason=reason,
            error_type=type(exc).__name__,
            error=describe_error(exc),
            traceback=format_traceback(exc),
            delivery_count=delivery.redelivered + 1,
            failed_at=time.time(),
            worker_id=self.worker_id,
        )
        return Outcome(
            delivery=delivery,
            task_id=record.task_id,
            kind="dead",
            record=self.codec.encode_record(record),
            raw=delivery.stored,
            summary=reason,
            error=f"{record.error_type}: {record.error}",
        )

    def _decide(self, delivery: Delivery) -> Outcome:
        try:
            message = self.codec.decode_delivery(delivery.stored, delivery.redelivered)
        except InvalidTaskError as exc:
            return self.unrunnable(delivery, exc)
        if delivery.cancelled:  # cancelled before it started: it never runs
            return attrs.evolve(
                self._cancelled(delivery, message, time.perf_counter()), kind="dropped"
            )
        limit = message.time_limit or self.settings.task_time_limit or None
        with self._lock:
            self.running[message.task_id] = message
        self.metrics.concurrent.inc()
        started = time.perf_counter()
        try:
            value = self._call(message, limit)
        except TaskTimeoutError:
            if self.limiter is not None:
                self.limiter.forget()  # in case it landed before its block's exit ran
            self.metrics.processed["timed_out"].inc()
            timeout = TaskTimeoutError(f"the handler ran past its time limit of {limit}s")
            return self._failed(delivery, message, timeout, started, permanent=False)
        except PermanentTaskError as exc:
            return self._failed(delivery, message, exc, started, permanent=True)
        except BaseException as exc:  # noqa: BLE001 - BaseException included, it retries
            return self._failed(delivery, message, exc, started, permanent=False)
        finally:
            self.metrics.concurrent.dec()
            with self._lock:
                self.running.pop(message.task_id, None)
        return self._succeeded(delivery, message, value, started)

    def _call(self, message: TaskMessage, limit: float | None) -> Any:
        if self.limiter is None:
            return self.handler(message)
        with self.limiter.limit(message.task_id, limit):
            return self.handler(message)

    def _succeeded(
        self, delivery: Delivery, message: TaskMessage, value: Any, started: float
    ) -> Outcome:
        if message.cancel_requested():
            return self._cancelled(delivery, message, started)
        duration = time.perf_counter() - started
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
        except BaseException as exc:  # noqa: BLE001 - whatever the value does while encoded
            bad = PermanentTaskError(
                f"the handler's return value cannot be stored: {describe_error(exc)}"
            )
            return self._failed(delivery, message, bad, started, permanent=True)
        self.metrics.duration.observe(duration)
        return Outcome(
            delivery=delivery,
            task_id=message.task_id,
            kind="succeeded",
            result=encoded,
            channel=self.keys.result_channel(message.session_id),
        )

    def _failed(
        self,
        delivery: Delivery,
        message: TaskMessage,
        exc: BaseException,
        started: float,
        *,
        permanent: bool,
    ) -> Outcome:
        if message.cancel_requested():
            return self._cancelled(delivery, message, started)
        duration = time.perf_counter() - started
        self.metrics.duration.observe(duration)
        error = f"{type(exc).__name__}: {describe_error(exc)}"
        if not permanent and message.retry_count < self.settings.max_retry_attempts:
            return self._retry(delivery, message, error)
        reason = "permanent" if permanent else "exhausted"
        finished = time.time()
        record = DeadLetterRecord(
            task_id=message.task_id,
            reason=reason,
            error_type=type(exc).__name__,
            error=describe_error(exc),
            traceback=format_traceback(exc),
            attempts=message.retry_count + 1,
            delivery_count=message.delivery_count,
            enqueued_at=message.enqueued_at,
            failed_at=finished,
            worker_id=self.worker_id,
        )
        result = TaskResult(
            task_id=message.task_id,
            session_id=message.session_id,
            status="failed",
            error=error,
            attempts=message.retry_count + 1,
            duration_s=duration,
            finished_at=finished,
        )
        return Outcome(
            delivery=delivery,
            task_id=message.task_id,
            kind="dead",
            result=self.codec.encode_result(result),
            channel=self.keys.result_channel(message.session_id),
            record=self.codec.encode_record(record),
            # The task is kept as it was taken, byte for byte: the dead-letter queue shows
            # and replays it from these bytes (a copy inside the record JSON would cost
            # Redis a JSON string three times the size).
            raw=delivery.stored,
            summary=f"{reason} after {record.attempts} attempt(s)",
            error=error,
        )

    def _cancelled(self, delivery: Delivery, message: TaskMessage, started: float) -> Outcome:
        """The outcome of a task whose cancel was asked while it ran: it ends cancelled,
        whatever its handler returned or raised."""
        duration = time.perf_counter() - started
        self.metrics.duration.observe(duration)
        result = TaskResult(
            task_id=message.task_id,
            session_id=message.session_id,
            status="cancelled",
            error=CANCELLED_ERROR,
            attempts=message.retry_count + 1,
            duration_s=duration,
            finished_at=time.time(),
        )
        return Outcome(
            delivery=delivery,
            task_id=message.task_id,
            kind="cancelled",
            result=self.codec.encode_result(result),
            channel=self.keys.result_channel(message.session_id),
        )

    def _retry(self, delivery: Delivery, message: TaskMessage, error: str) -> Outcome:
        attempt = message.retry_count + 1
        s = self.settings
        delay = exponential_delay(
            attempt, s.retry_base_delay, s.retry_max_delay, s.retry_jitter, self.rand
        )
        # The copy stores the deliveries that ended in a recorded outcome; the ones lost
        # or given back are counted in Redis and added when it is taken again.
        following = attrs.evolve(
            message,
            retry_count=attempt,
            delivery_count=message.delivery_count - delivery.redelivered,
            last_error=error,
        )
        return Outcome(
            delivery=delivery,
            task_id=message.task_id,
            kind="retry",
            next_task=self.codec.encode_retry(following),
            delay=delay,
            error=error,
            attempt=attempt,
        )
