"""``TaskProducer``: puts tasks on the queue within its limit, and follows them: their
status, their cancellation, their results (waited for through :mod:`semibot_queue.waiting`)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from types import TracebackType

from prometheus_client import CollectorRegistry

from semibot_queue.admission import LengthWatch, delay_ms, named, refuse_repeated_ids
from semibot_queue.clients import given_client, make_client
from semibot_queue.codec import Codec, cancelled_result
from semibot_queue.connection import (
    REDIS_ERRORS,
    Client,
    Reconnector,
    as_bytes,
    translate,
)
from semibot_queue.constants import (
    DEFAULT_REDIS_URL,
    MAX_TRACKED_SESSIONS,
    QUEUE_LENGTH_WARNING_INTERVAL,
)
from semibot_queue.errors import DuplicateTaskError, InvalidTaskError, QueueError, QueueFullError
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import TASK_STATUSES, TaskPayload, TaskResult, TaskStatus
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.waiting import ResultWaiters

log = logging.getLogger("semibot_queue.producer")

#: Bytes of randomness in the token an enqueue call marks its task ids with.
_TOKEN_BYTES = 8

#: What the enqueue script answers when the tasks do not fit, or an id is live.
_FULL, _LIVE = -1, -2

#: What the cancel script answers when the task's state changed since it was read.
_CANCEL_RACED = -1

#: Times cancel() reads a task's state again when it keeps changing under it.
_CANCEL_ATTEMPTS = 5


def default_redis_url() -> str:
    """``$REDIS_URL``, else the local default."""
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


class TaskProducer:
    """Enqueues tasks, follows and cancels them, waits for their results; also a context
    manager. ``client`` may be given instead of ``redis_url`` (an embedded fakeredis,
    say). Safe to share between threads once connected.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        queue_name: str | None = None,
        settings: QueueSettings | None = None,
        *,
        client: Client | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or QueueSettings()
        self.redis_url = redis_url or default_redis_url()
        self.keys = KeySpace.of(queue_name, self.settings)
        self._codec = Codec(self.settings.max_payload_bytes)
        self.metrics = Metrics(self.keys.queue, registry)
        self._given_client: Client | None = None
        #: Whether the given client is one of ours (on a given cluster or Sentinel
        #: client's nodes), to close with the producer.
        self._owns_given = False
        if client is not None:
            self._given_client, self._owns_given = given_client(
                client, self.settings, self.keys.queue
            )
        self._client: Client | None = None
        self._scripts: Scripts | None = None
        self._waiters: ResultWaiters | None = None
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._retry = Reconnector(
            self.redis_url, self.keys.queue, self.settings, on_retry=self.metrics.reconnects.inc
        )
        self._length_watch = LengthWatch(QUEUE_LENGTH_WARNING_INTERVAL)

    # --- connection -----------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and check that Redis answers (QueueConnectionError if not)."""
        if self._client is not None:
            return
        client = self._given_client or make_client(
            self.redis_url, self.settings, queue=self.keys.queue
        )
        self._retry.call("connect", client.ping)
        self._client = client
        self._scripts = Scripts(client, self.keys, self.settings)
        self._waiters = ResultWaiters(
            client,
            self.keys,
            self._codec,
            self.settings,
            self._retry,
            on_retry=self.metrics.reconnects.inc,
        )

    def disconnect(self) -> None:
        """Close the connection (a given client is left to its owner). Waits still in
        progress raise QueueError."""
        if self._waiters is not None:
            self._waiters.close()
        if self._scripts is not None:
            self._scripts.close()
        if self._client is not None and (self._given_client is None or self._owns_given):
            self._client.close()
        self._client = None
        self._scripts = None
        self._waiters = None

    def __enter__(self) -> TaskProducer:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()

    def _connected(self) -> tuple[Client, Scripts]:
        if self._client is None or self._scripts is None:
            raise QueueError("producer is not connected: call connect() or use it in a with block")
        return self._client, self._scripts

    # --- enqueue --------------------------------------------------------------

    def enqueue(self, payload: TaskPayload, *, delay: float | None = None) -> str:
        """Put ``payload`` on the queue; its task id.

        With ``delay`` (seconds, > 0) the task is scheduled instead: it becomes pending
        that much later, by Redis's clock. Nothing is written when it raises:
        InvalidTaskError for a bad payload or delay, QueueFullError when pending plus
        scheduled tasks are at MAX_QUEUE_LENGTH, DuplicateTaskError when a task of the
        same id is still live (enqueued less than IDEMPOTENCY_TTL ago and not finished,
        cleared or purged since). A repeat the library makes itself after a lost reply
        never writes a second copy.
        """
        if not isinstance(payload, TaskPayload):
            raise InvalidTaskError(f"expected a TaskPayload, got {type(payload).__name__}")
        ms = None if delay is None else delay_ms(delay)
        task_id = payload.task_id
        body = self._codec.encode_new(payload, time.time())
        self._push([(task_id, payload.session_id, body)], ms)
        self._remember(task_id, payload.session_id)
        return task_id

    def enqueue_many(
        self, payloads: Iterable[TaskPayload], *, delay: float | None = None
    ) -> list[str]:
        """Put all ``payloads`` on the queue in one round trip, or none of them.

        Raises as ``enqueue`` does, for any one of them; a task id given twice in
        ``payloads`` is an InvalidTaskError. ``delay`` applies to all of them.
        """
        ms = None if delay is None else delay_ms(delay)
        batch = list(payloads)
        if not batch:
            return []
        for index, payload in enumerate(batch):
            if not isinstance(payload, TaskPayload):
                raise InvalidTaskError(
                    f"payload #{index}: expected a TaskPayload, got {type(payload).__name__}"
                )
        refuse_repeated_ids(batch)
        now = time.time()
        encode = self._codec.encode_new
        self._push([(p.task_id, p.session_id, encode(p, now)) for p in batch], ms)
        for payload in batch:
            self._remember(payload.task_id, payload.session_id)
        return [payload.task_id for payload in batch]

    def _push(self, tasks: list[tuple[str, str, bytes]], delay_ms: int | None) -> None:
        """Run the enqueue script for ``(task id, session id, body)`` triples; raise as
        ``enqueue`` documents, or count them and watch the pending length."""
        _, scripts = self._connected()
        limits = (self.settings.max_queue_length, self.settings.idempotency_ttl)
        # One token per call, the same on every try: a try repeated after a lost reply
        # finds its own token on the markers and writes nothing again.
        token = secrets.token_hex(_TOKEN_BYTES)
        first = tasks[0][0]
        length, scheduled, live = self._retry.call(
            "enqueue", lambda: scripts.enqueue(tasks, limits, token, delay_ms), first
        )
        if length == _LIVE:
            ids = [tasks[i][0] for i in live]
            raise DuplicateTaskError(
                f"queue {self.keys.queue}: task id {named(ids)} still live (enqueued less"
                f" than IDEMPOTENCY_TTL={limits[1]}s ago and not finished, cleared or"
                f" purged, or cancelled and not yet dropped by a worker):"
                f" {len(tasks)} task(s) refused, nothing written"
            )
        if length == _FULL:
            self._refuse_full(len(tasks), first)
        self.metrics.enqueued.inc(len(tasks))
        self.metrics.queue_length.set(length)
        if delay_ms is not None:
            self.metrics.scheduled_length.set(scheduled)
        self._watch_length(length, tasks[-1][0])

    def _refuse_full(self, count: int, first: str) -> None:
        limit = self.settings.max_queue_length
        self.metrics.rejected.inc(count)
        log.error(
            "queue %s full (limit %d): refused %d task(s), first %s",
            self.keys.queue,
            limit,
            count,
            first,
            extra={"queue": self.keys.queue, "task_id": first},
        )
        raise QueueFullError(
            f"queue {self.keys.queue} is full (MAX_QUEUE_LENGTH={limit}, pending and"
            f" scheduled tasks counted): {count} task(s) refused, nothing written"
        )

    def _watch_length(self, length: int, task_id: str) -> None:
        """Warn when the pending length crosses the threshold from below, at most once
        per QUEUE_LENGTH_WARNING_INTERVAL; staying above it says nothing more."""
        threshold = self.settings.queue_length_warning_threshold
        if not self._length_watch.crossed(length, threshold):
            return
        log.warning(
            "queue %s has %d pending tasks: crossed the warning threshold %d; last task %s",
            self.keys.queue,
            length,
            threshold,
            task_id,
            extra={"queue": self.keys.queue, "task_id": task_id},
        )

    def _remember(self, task_id: str, session_id: str) -> None:
        sessions = self._sessions
        sessions[task_id] = session_id
        if len(sessions) > MAX_TRACKED_SESSIONS:
            with contextlib.suppress(KeyError):  # another thread emptied it meanwhile
                sessions.popitem(last=False)

    # --- following a task -------------------------------------------------------

    def status(self, task_id: str) -> TaskStatus | None:
        """Where ``task_id`` is now (see TaskStatus), in one round trip; None for an id the
        queue does not know, or whose result has expired (RESULT_TTL)."""
        self.keys.result(task_id)  # InvalidTaskError for an id no key can hold
        _, scripts = self._connected()
        word = self._retry.call("status", lambda: scripts.status(task_id), task_id)
        for status in TASK_STATUSES:
            if word == status:
                return status
        return None

    def get_result(self, task_id: str) -> TaskResult | None:
        """The stored result of ``task_id``, or None; never waits. One try: a Redis that
        cannot answer now raises QueueConnectionError at once."""
        client, _ = self._connected()
        key = self.keys.result(task_id)
        try:
            stored = client.get(key)
        except REDIS_ERRORS as exc:
            raise translate(exc, f"get_result of task {task_id}", url=self._retry.url) from exc
        return None if stored is None else self._codec.decode_result(as_bytes(stored))

    def cancel(self, task_id: str) -> bool:
        """Cancel ``task_id``; False if it is not live (unknown, or already ended).

        A pending or scheduled task will never run: it finishes ``cancelled`` now and its
        waiters get that result at once. A running task is asked to stop: its handler's
        ``message.cancel_requested()`` turns true within a heartbeat and it finishes
        ``cancelled`` when the handler returns or raises.
        """
        client, scripts = self._connected()
        self.keys.result(task_id)  # InvalidTaskError for an id no key can hold
        ttl = self.settings.result_ttl
        for _ in range(_CANCEL_ATTEMPTS):
            seen = self._retry.call(
                "cancel", lambda: client.hget(self.keys.state, task_id), task_id
            )
            if seen is None:
                return False
            state = as_bytes(seen)
            session = state.partition(b" ")[2].decode("utf-8", "replace")
            result = self._codec.encode_result(cancelled_result(task_id, session))
            done = self._retry.call(
                "cancel",
                lambda: scripts.cancel(task_id, state, session, result, ttl),  # noqa: B023
                task_id,
            )
            if done != _CANCEL_RACED:
                if done:
                    log.info(
                        "queue %s: task %s %s",
                        self.keys.queue,
                        task_id,
                        "cancelled before it ran" if done == 1 else "asked to stop (running)",
                        extra={"queue": self.keys.queue, "task_id": task_id},
                    )
                return done > 0
        raise QueueError(f"task {task_id} kept changing state; cancel not done")

    def wait_for_result(
        self, task_id: str, timeout: float | None = None, *, session_id: str | None = None
    ) -> TaskResult | None:
        """The result of ``task_id``, or None if it has none after ``timeout`` seconds
        (RESULT_WAIT_TIMEOUT when None). Returns by its deadline whatever Redis does.

        Listens on the task's session channel (``session_id``, else the session of a task
        this producer enqueued; else every session's channel, by pattern) and reads the
        stored result once that subscription is confirmed, so a result published before
        or during the call is found. Messages on the channel that are not this task's
        result are skipped. Raises QueueConnectionError, by the deadline, when Redis
        could not be asked meanwhile; QueueError when the producer is disconnected.
        """
        self.keys.result(task_id)  # InvalidTaskError for an id no key can hold
        wait = self.settings.result_wait_timeout if timeout is None else timeout
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise InvalidTaskError(f"timeout: must be a number of seconds >= 0, got {timeout!r}")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise InvalidTaskError(f"session_id: must be a non-empty string, got {session_id!r}")
        self._connected()
        waiters = self._waiters
        if waiters is None:  # pragma: no cover - set by connect
            raise QueueError("producer is not connected")
        if wait == 0:
            return self.get_result(task_id)
        session = session_id if session_id is not None else self._sessions.get(task_id)
        result = waiters.wait(task_id, float(min(wait, 1e9)), session)
        if result is not None:
            self._sessions.pop(task_id, None)
        return result

    # --- the queue ---------------------------------------------------------------

    def get_queue_length(self) -> int:
        """Tasks pending now."""
        client, _ = self._connected()
        length = int(self._retry.call("get_queue_length", lambda: client.llen(self.keys.pending)))
        self.metrics.queue_length.set(length)
        return length

    def clear_queue(self) -> int:
        """Delete the tasks pending now; how many. In-flight tasks and scheduled ones stay.

        Their ids can be enqueued again at once (their idempotency markers go with
        them; their status becomes unknown). Deleted in batches of MAINTENANCE_BATCH, so
        Redis is never blocked long: tasks pushed while it runs may be deleted too, and at
        most as many tasks as were pending when it started are.
        """
        _, scripts = self._connected()
        batch, max_bytes = self.settings.maintenance_batch, self.settings.max_payload_bytes
        removed, target = 0, None
        while True:
            deleted, left = self._retry.call("clear_queue", lambda: scripts.clear(batch, max_bytes))
            removed += deleted
            target = removed + left if target is None else target
            if deleted == 0 or left == 0 or removed >= target:
                break
        log.warning(
            "queue %s cleared: %d pending task(s) deleted",
            self.keys.queue,
            removed,
            extra={"queue": self.keys.queue},
        )
        self.metrics.queue_length.set(left)
        self._watch_length(left, "")
        return removed

    def __repr__(self) -> str:
        return f"TaskProducer(queue={self.keys.queue!r}, redis_url={self._retry.url!r})"
