"""``TaskProducer``: puts tasks on the queue within its limit and waits for their results."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from types import TracebackType

from prometheus_client import CollectorRegistry

from semibot_queue.codec import Codec
from semibot_queue.connection import REDIS_ERRORS, Client, Reconnector, as_bytes, make_client
from semibot_queue.constants import DEFAULT_REDIS_URL, MAX_TRACKED_SESSIONS
from semibot_queue.errors import DuplicateTaskError, InvalidTaskError, QueueError, QueueFullError
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import TaskPayload, TaskResult
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.producer")

#: Bytes of randomness in the token an enqueue call marks its task ids with.
_TOKEN_BYTES = 8

#: Task ids named at most in one DuplicateTaskError or InvalidTaskError message.
_NAMED_IDS = 5

#: What the enqueue script answers when the tasks do not fit, or an id is live.
_FULL, _LIVE = -1, -2


def default_redis_url() -> str:
    """``$REDIS_URL``, else the local default."""
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


class TaskProducer:
    """Enqueues tasks and waits for their results; also a context manager.

    ``client`` may be given instead of ``redis_url`` (an embedded fakeredis, say).
    Safe to share between threads once connected.
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
        self._metrics = Metrics(self.keys.queue, registry)
        self._given_client = client
        self._client: Client | None = None
        self._scripts: Scripts | None = None
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._retry = Reconnector(
            self.redis_url, self.keys.queue, self.settings, on_retry=self._metrics.reconnects.inc
        )

    # --- connection -----------------------------------------------------------

    def connect(self) -> None:
        """Open the connection and check that Redis answers (QueueConnectionError if not)."""
        if self._client is not None:
            return
        client = self._given_client or make_client(self.redis_url, self.settings)
        self._retry.call("connect", client.ping)
        self._client = client
        self._scripts = Scripts(client, self.keys)

    def disconnect(self) -> None:
        """Close the connection (a given client is left to its owner)."""
        if self._scripts is not None:
            self._scripts.close()
        if self._client is not None and self._given_client is None:
            self._client.close()
        self._client = None
        self._scripts = None

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

    def enqueue(self, payload: TaskPayload) -> str:
        """Put ``payload`` on the queue; its task id.

        Nothing is written when it raises: InvalidTaskError for a bad payload,
        QueueFullError when the pending list is at MAX_QUEUE_LENGTH, DuplicateTaskError
        when a task of the same id is still live (enqueued less than IDEMPOTENCY_TTL ago
        and not finished, cleared or purged since). A repeat the library makes itself
        after a lost reply never writes a second copy.
        """
        return self.enqueue_many([payload])[0]

    def enqueue_many(self, payloads: Iterable[TaskPayload]) -> list[str]:
        """Put all ``payloads`` on the queue in one round trip, or none of them.

        Raises as ``enqueue`` does, for any one of them; a task id given twice in
        ``payloads`` is an InvalidTaskError.
        """
        batch = list(payloads)
        if not batch:
            return []
        for index, payload in enumerate(batch):
            if not isinstance(payload, TaskPayload):
                raise InvalidTaskError(
                    f"payload #{index}: expected a TaskPayload, got {type(payload).__name__}"
                )
        _refuse_repeated_ids(batch)
        now = time.time()
        tasks = [(p.task_id, self._codec.encode_new(p, now)) for p in batch]
        _, scripts = self._connected()
        limit, ttl = self.settings.max_queue_length, self.settings.idempotency_ttl
        # One token per call, the same on every try: a try repeated after a lost reply
        # finds its own token on the markers and writes nothing again.
        token = secrets.token_hex(_TOKEN_BYTES)
        length, live = self._retry.call(
            "enqueue",
            lambda: scripts.enqueue(tasks, limit, ttl, token),
            task_id=batch[0].task_id,
        )
        if length == _LIVE:
            ids = [batch[i].task_id for i in live]
            raise DuplicateTaskError(
                f"queue {self.keys.queue}: task id {_named(ids)} still live (enqueued less"
                f" than IDEMPOTENCY_TTL={ttl}s ago and not finished, cleared or purged):"
                f" {len(batch)} task(s) refused, nothing written"
            )
        if length == _FULL:
            self._metrics.rejected.inc(len(batch))
            log.error(
                "queue %s full (limit %d): refused %d task(s), first %s",
                self.keys.queue,
                limit,
                len(batch),
                batch[0].task_id,
                extra={"queue": self.keys.queue, "task_id": batch[0].task_id},
            )
            raise QueueFullError(
                f"queue {self.keys.queue} is full (MAX_QUEUE_LENGTH={limit}):"
                f" {len(batch)} task(s) refused, nothing written"
            )
        self._metrics.enqueued.inc(len(batch))
        self._metrics.queue_length.set(length)
        if length >= self.settings.queue_length_warning_threshold:
            log.warning(
                "queue %s has %d pending tasks (warning from %d); last task %s",
                self.keys.queue,
                length,
                self.settings.queue_length_warning_threshold,
                batch[-1].task_id,
                extra={"queue": self.keys.queue, "task_id": batch[-1].task_id},
            )
        for payload in batch:
            self._remember(payload)
        return [payload.task_id for payload in batch]

    def _remember(self, payload: TaskPayload) -> None:
        self._sessions[payload.task_id] = payload.session_id
        while len(self._sessions) > MAX_TRACKED_SESSIONS:
            self._sessions.popitem(last=False)

    # --- results --------------------------------------------------------------

    def wait_for_result(self, task_id: str, timeout: float | None = None) -> TaskResult | None:
        """The result of ``task_id``, or None if none arrives within ``timeout`` seconds.

        Listens before it looks, so a result published at any moment, before or during
        the call, is found (results are stored for RESULT_TTL as well as published).
        """
        client, _ = self._connected()
        wait = self.settings.result_wait_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        result_key = self.keys.result(task_id)
        session = self._sessions.get(task_id)
        failures = 0
        while True:
            try:
                return self._listen(client, task_id, result_key, session, deadline)
            except REDIS_ERRORS as exc:
                # Re-subscribe and look again: a result published meanwhile is stored.
                # (wait_after raises at once, translated, what retrying will not fix.)
                failures += 1
                self._retry.wait_after(exc, "wait_for_result", failures)

    def _listen(
        self,
        client: Client,
        task_id: str,
        result_key: str,
        session: str | None,
        deadline: float,
    ) -> TaskResult | None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            if session is not None:
                pubsub.subscribe(self.keys.result_channel(session))
            else:
                pubsub.psubscribe(self.keys.result_channel_pattern)
            stored = client.get(result_key)
            if stored is not None:
                return self._codec.decode_result(as_bytes(stored))
            while (left := deadline - time.monotonic()) > 0:
                message = pubsub.get_message(
                    timeout=min(left, self.settings.pubsub_message_timeout)
                )
                if message is None:
                    continue
                try:
                    result = self._codec.decode_result(message["data"])
                except InvalidTaskError:
                    continue  # not one of our results (another publisher on the channel)
                if result.task_id == task_id:
                    self._sessions.pop(task_id, None)
                    return result
            return None
        finally:
            pubsub.close()

    # --- inspection -----------------------------------------------------------

    def get_queue_length(self) -> int:
        """Tasks pending now."""
        client, _ = self._connected()
        length = int(self._retry.call("get_queue_length", lambda: client.llen(self.keys.pending)))
        self._metrics.queue_length.set(length)
        return length

    def clear_queue(self) -> int:
        """Delete the tasks pending now; how many. In-flight tasks and retries stay.

        Their ids can be enqueued again at once (their idempotency markers go with
        them). Deleted in batches of MAINTENANCE_BATCH, so Redis is never blocked long:
        tasks pushed while it runs may be deleted too, and at most as many tasks as
        were pending when it started are.
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
        self._metrics.queue_length.set(left)
        return removed

    def __repr__(self) -> str:
        return f"TaskProducer(queue={self.keys.queue!r}, redis_url={self._retry.url!r})"


def _named(ids: list[str]) -> str:
    """Up to _NAMED_IDS task ids for a message, with how many more there are."""
    shown = ", ".join(ids[:_NAMED_IDS])
    return shown if len(ids) <= _NAMED_IDS else f"{shown} (and {len(ids) - _NAMED_IDS} more)"


def _refuse_repeated_ids(batch: list[TaskPayload]) -> None:
    """InvalidTaskError naming each task id given more than once, and where."""
    positions: dict[str, list[int]] = {}
    for index, payload in enumerate(batch):
        positions.setdefault(payload.task_id, []).append(index)
    repeated = [(task_id, where) for task_id, where in positions.items() if len(where) > 1]
    if repeated:
        named = "; ".join(
            f"{task_id} at positions {', '.join(map(str, where))}"
            for task_id, where in repeated[:_NAMED_IDS]
        )
        raise InvalidTaskError(
            f"enqueue_many: a task id may appear once per call, got {named}: nothing written"
        )
