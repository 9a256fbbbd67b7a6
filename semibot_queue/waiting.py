"""Result waiting: all the waiters of one producer share one pub/sub connection.

A listener thread, started by the first wait and stopped by the producer's
``disconnect()``, owns that connection. It reads every reply, hands each result to the
waiters of its task, and reads the stored results of waiters whose subscription the
server has confirmed (so a result published before the wait, or while the link was
down, is found). Waiters register, wait on an Event until their deadline and leave: they
never wait on Redis, so a deadline holds whatever Redis does (down, hung or slow).

Subscriptions are counted: a session's channel (or, for a waiter that knows no session,
the pattern of every result channel) is subscribed while a waiter needs it and
unsubscribed when its last waiter leaves. A registering thread writes the SUBSCRIBE
itself, a few bytes on a live connection (never a connect, never a read), so that the
listener wakes when the confirmation arrives; for a subscription already confirmed it
writes a PING instead, whose reply wakes the listener to read the stored result. When
the link drops, the listener reconnects (every PUBSUB_MESSAGE_TIMEOUT at most, while
anyone waits), subscribes everything again and reads every waiter's stored result again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from semibot_queue.codec import Codec, task_id_of
from semibot_queue.connection import REDIS_ERRORS, Client, Reconnector, is_transient, translate
from semibot_queue.errors import InvalidTaskError, QueueConnectionError, QueueError
from semibot_queue.keys import KeySpace
from semibot_queue.models import TaskResult
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.waiting")

#: A subscription: (b"c", channel) or (b"p", pattern), names as bytes.
Sub = tuple[bytes, bytes]

#: Reply kinds that confirm or end a subscription, with the kind of subscription they name
#: and whether they confirm it.
_SUBSCRIPTION_REPLIES = {
    b"subscribe": (b"c", True),
    b"unsubscribe": (b"c", False),
    b"psubscribe": (b"p", True),
    b"punsubscribe": (b"p", False),
}
_COMMANDS = {(b"c", True): "SUBSCRIBE", (b"c", False): "UNSUBSCRIBE"}
_COMMANDS |= {(b"p", True): "PSUBSCRIBE", (b"p", False): "PUNSUBSCRIBE"}

#: Items of a reply naming a subscription at least: its kind and the name.
_NAMING_REPLY = 2


class _Waiter:
    """One ``wait`` call: its task, its subscription and what it got."""

    __slots__ = ("checked", "done", "error", "result", "result_key", "sub", "task_id")

    def __init__(self, task_id: str, result_key: str, sub: Sub) -> None:
        self.task_id = task_id
        self.result_key = result_key
        self.sub = sub
        self.done = threading.Event()
        self.result: TaskResult | None = None
        self.error: QueueError | None = None
        #: Its stored result was read since its subscription was last confirmed.
        self.checked = False


class ResultWaiters:
    """The waiters of one producer and the listener thread serving them."""

    def __init__(
        self,
        client: Client,
        keys: KeySpace,
        codec: Codec,
        settings: QueueSettings,
        reconnect: Reconnector,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._codec = codec
        self._poll = settings.pubsub_message_timeout
        self._reconnect = reconnect
        self._on_retry = on_retry
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # the pub/sub connection, held from the pool while open
        self._up = False  # connected, every wanted subscription sent on this link
        self._link = 0  # counts links, so a late reply or check of an old one is ignored
        self._refs: dict[Sub, int] = {}
        self._expect: dict[Sub, deque[bool]] = {}  # replies due per subscription, in order
        self._confirmed: set[Sub] = set()
        self._by_sub: dict[Sub, set[_Waiter]] = {}
        self._by_task: dict[str, set[_Waiter]] = {}
        self._checks: set[_Waiter] = set()
        self._error: BaseException | None = None  # why the link is down
        self._fatal: QueueError | None = None  # a refusal retrying will not fix
        self._closed = False

    # --- waiters --------------------------------------------------------------------

    def wait(self, task_id: str, timeout: float, session_id: str | None) -> TaskResult | None:
        """The result of ``task_id``, or None if it has none within ``timeout`` seconds.

        Raises QueueConnectionError at the deadline when Redis could not be asked (the
        link was down and the stored result not read since), at once the QueueError of
        a refusal retrying will not fix (an ACL, a password).
        """
        if session_id is None:
            sub = (b"p", _encoded(self._keys.result_channel_pattern, "result channel pattern"))
        else:
            sub = (b"c", _encoded(self._keys.result_channel(session_id), "session_id"))
        waiter = _Waiter(task_id, self._keys.result(task_id), sub)
        self._add(waiter)
        try:
            waiter.done.wait(timeout)
            return self._outcome(waiter, timeout)
        finally:
            self._remove(waiter)

    def _outcome(self, waiter: _Waiter, timeout: float) -> TaskResult | None:
        with self._lock:
            if waiter.result is not None:
                return waiter.result
            if waiter.error is not None:
                raise waiter.error
            if self._fatal is not None:
                raise self._fatal
            error = self._error
            if self._up or waiter.checked or error is None:
                return None  # Redis answered (or was still being dialled): no result yet
        raise QueueConnectionError(
            f"queue {self._keys.queue}: no result for task {waiter.task_id} within"
            f" {timeout:g}s: Redis at {self._reconnect.url} could not be asked"
            + (f" ({type(error).__name__}: {error})" if error is not None else "")
        )

    def _add(self, waiter: _Waiter) -> None:
        with self._lock:
            if self._closed:
                raise QueueError("producer is not connected: call connect() first")
            if self._fatal is not None:
                raise self._fatal
            self._by_task.setdefault(waiter.task_id, set()).add(waiter)
            self._by_sub.setdefault(waiter.sub, set()).add(waiter)
            count = self._refs.get(waiter.sub, 0)
            self._refs[waiter.sub] = count + 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"semibot-queue-results-{self._keys.queue}", daemon=True
                )
                self._thread.start()
            if not self._up:
                self._lock.notify_all()  # a listener idle with no link connects now
            elif count == 0:
                self._send_locked(waiter.sub, subscribe=True)
            elif waiter.sub in self._confirmed:
                self._checks.add(waiter)
                self._write_locked("PING")  # its reply wakes the listener to read the result

    def _remove(self, waiter: _Waiter) -> None:
        with self._lock:
            self._checks.discard(waiter)
            _discard(self._by_task, waiter.task_id, waiter)
            _discard(self._by_sub, waiter.sub, waiter)
            count = self._refs[waiter.sub] - 1
            if count:
                self._refs[waiter.sub] = count
                return
            del self._refs[waiter.sub]
            self._confirmed.discard(waiter.sub)
            if self._up:
                self._send_locked(waiter.sub, subscribe=False)

    def _send_locked(self, sub: Sub, *, subscribe: bool) -> None:
        if self._write_locked(_COMMANDS[sub[0], subscribe], sub[1]):
            self._expect.setdefault(sub, deque()).append(subscribe)

    def _write_locked(self, *command: str | bytes) -> bool:
        """Write ``command`` on the live link; on failure mark it down for the listener."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            self._down_locked(QueueConnectionError("the pub/sub link dropped"))
            return False
        try:
            conn.send_command(*command, check_health=False)
        except Exception as exc:  # noqa: BLE001 - whatever the write raised, the link is lost
            self._down_locked(exc)
            return False
        return True

    # --- the listener ---------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while not (self._closed or self._up or self._by_task):
                    self._lock.wait()
                if self._closed:
                    return
                up, conn, link = self._up, self._conn, self._link
            if not up:
                try:
                    self._open()
                except Exception as exc:  # noqa: BLE001 - any failure to connect is retried
                    failures += 1
                    self._failed(exc, failures)
                else:
                    failures = 0
                continue
            try:
                if conn.can_read(timeout=self._poll):
                    self._handle(conn.read_response(disconnect_on_error=False, push_request=True))
                self._read_stored(link)
            except Exception as exc:  # noqa: BLE001 - a socket closed under a read raises anything
                self._lost(exc, link)

    def _open(self) -> None:
        """Connect a fresh link and subscribe everything waiters need on it."""
        conn = self._conn
        if conn is None:
            conn = self._client.connection_pool.get_connection()
            with self._lock:
                self._conn = conn
                if self._closed:
                    return
        conn.disconnect()  # never reuse a link a reply may be half read on
        conn.connect()
        with self._lock:
            if self._closed:
                return
            self._link += 1
            self._up = True
            self._error = self._fatal = None
            for sub in list(self._refs):
                self._send_locked(sub, subscribe=True)

    def _lost(self, exc: Exception, link: int) -> None:
        """A read or a stored-result check of link ``link`` failed."""
        with self._lock:
            if link != self._link or not self._up or self._closed:
                return  # already known lost (a waiter's write, or close(), found it first)
            self._down_locked(exc)
        if isinstance(exc, REDIS_ERRORS) and not is_transient(exc):
            self._fail_everyone(translate(exc, "waiting for results", url=self._reconnect.url))

    def _failed(self, exc: Exception, failures: int) -> None:
        if isinstance(exc, REDIS_ERRORS) and not is_transient(exc):
            self._fail_everyone(translate(exc, "waiting for results", url=self._reconnect.url))
            return
        wait = min(self._reconnect.delay(failures), self._poll)
        with self._lock:
            self._error = exc
        log.warning(
            "queue %s: result listener cannot reach Redis at %s (%s); reconnect attempt %d"
            " in %.2fs",
            self._keys.queue,
            self._reconnect.url,
            exc,
            failures,
            wait,
            extra={"queue": self._keys.queue, "attempt": failures},
        )
        if self._on_retry is not None:
            self._on_retry()
        self._stop.wait(wait)

    def _down_locked(self, exc: BaseException) -> None:
        """The link is lost: every waiter must be subscribed and checked again."""
        self._up = False
        self._error = exc
        self._confirmed.clear()
        self._expect.clear()
        self._checks.clear()
        for waiters in self._by_task.values():
            for waiter in waiters:
                waiter.checked = False
        if self._conn is not None:
            self._conn.disconnect()
        self._lock.notify_all()

    def _fail_everyone(self, error: QueueError) -> None:
        with self._lock:
            self._fatal = error
            for waiters in self._by_task.values():
                for waiter in waiters:
                    waiter.done.set()
        self._stop.wait(self._poll)

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return  # a PONG (RESP3): the waker's work is done by _read_stored
        kind = reply[0]
        if kind in (b"message", b"pmessage"):
            self._deliver(reply[-1])
            return
        confirms = _SUBSCRIPTION_REPLIES.get(kind)
        if confirms is None or len(reply) < _NAMING_REPLY:
            return  # a pong: as above
        sub, subscribed = (confirms[0], reply[1]), confirms[1]
        with self._lock:
            due = self._expect.get(sub)
            if not due:
                return
            due.popleft()
            if due:
                return  # a later (un)subscribe of it is still on its way
            del self._expect[sub]
            if subscribed and sub in self._refs:
                self._confirmed.add(sub)
                self._checks.update(w for w in self._by_sub.get(sub, ()) if not w.checked)

    def _deliver(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        with self._lock:
            wanted = task_id_of(data) in self._by_task
        if not wanted:
            return  # not a result anyone here waits for (or not a result at all)
        try:
            result = self._codec.decode_result(data)
        except InvalidTaskError:
            return  # a progress note or anything else that is not a result
        self._complete(result)

    def _complete(self, result: TaskResult) -> None:
        with self._lock:
            for waiter in self._by_task.get(result.task_id, ()):
                waiter.result = result
                waiter.done.set()

    def _read_stored(self, link: int) -> None:
        """Read the stored results of the waiters whose subscription is confirmed."""
        with self._lock:
            if not self._checks:
                return
            batch = list(self._checks)
            self._checks.clear()
        stored = cast("list[bytes | None]", self._client.mget([w.result_key for w in batch]))
        with self._lock:
            fresh = link == self._link and self._up
            for waiter, raw in zip(batch, stored, strict=True):
                if raw is None:
                    waiter.checked = waiter.checked or fresh
                    continue
                try:
                    waiter.result = self._codec.decode_result(raw)
                except InvalidTaskError as exc:
                    waiter.error = InvalidTaskError(
                        f"the stored result of task {waiter.task_id} is unreadable: {exc}"
                    )
                waiter.done.set()

    # --- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Stop the listener and give the link back; waiters still waiting raise."""
        with self._lock:
            self._closed = True
            for waiters in self._by_task.values():
                for waiter in waiters:
                    waiter.error = QueueError("the producer was disconnected during the wait")
                    waiter.done.set()
            if self._conn is not None:
                self._conn.disconnect()  # ends a read in progress
            self._lock.notify_all()
            thread = self._thread
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._conn is not None:
            self._conn.disconnect()
            self._client.connection_pool.release(self._conn)
            self._conn = None

    def subscriptions(self) -> int:
        """Channels and patterns subscribed for waiters now (for tests and metrics)."""
        with self._lock:
            return len(self._refs)


def _encoded(name: str, what: str) -> bytes:
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTaskError(f"{what}: not UTF-8 text, got {name!r}") from None


def _discard(index: dict[Any, set[_Waiter]], key: Any, waiter: _Waiter) -> None:
    waiters = index.get(key)
    if waiters is not None:
        waiters.discard(waiter)
        if not waiters:
            del index[key]
