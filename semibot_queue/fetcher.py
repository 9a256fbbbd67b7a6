"""The fetch loop of a worker: takes tasks from Redis while one of its slots is free.

Several at once with ``fetch.lua`` when pending holds them, else one blocking BLMOVE into
the worker's in-flight list (:class:`BlockingPop`), which ``stop()`` cuts short. After a
call whose reply was lost, the tasks it may have moved are found in the in-flight list
(the orphan search) before anything else is taken.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

import attrs

from semibot_queue.connection import REDIS_ERRORS, Client, Reconnector, oom_as_outage, translate
from semibot_queue.constants import BLOCKING_MARGIN
from semibot_queue.errors import QueueError
from semibot_queue.outcomes import Delivery
from semibot_queue.recorder import Fatal, repeatable
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.slots import Slots


class BlockingPop:
    """BLMOVE of one task from ``pending`` into ``inflight``, waiting up to ``timeout``
    seconds; :meth:`interrupt` (any thread) ends a wait in progress."""

    def __init__(
        self,
        client: Client,
        pending: str,
        inflight: str,
        timeout: float,
        stopping: threading.Event,
    ) -> None:
        self._client = client
        self._command = ("BLMOVE", pending, inflight, "RIGHT", "LEFT", timeout)
        self._stopping = stopping
        self._socket: socket.socket | None = None

    def __call__(self) -> bytes | None:
        """The task taken, or None when none came in time (or stopping cut the wait)."""
        pool = self._client.connection_pool
        connection: Any = pool.get_connection()  # redis-py leaves its methods untyped
        try:
            if self._stopping.is_set():
                return None
            connection.send_command(*self._command)
            # The socket the reply comes on, for interrupt() to shut down when stopping.
            # It never touches redis-py's connection object: disconnect() from another
            # thread raced with this one and could leave the read blocked on a socket
            # the connection no longer knew (seen under load: stop() waited out the pop).
            self._socket = connection._sock  # noqa: SLF001 - see above
            return cast("bytes | None", connection.read_response())
        except Exception:
            # A reply left half read must not reach the next call. When stop() cut the
            # pop short (the socket was shut under it, whatever error that shows as), a
            # task it may have taken is given back with the rest at release.
            connection.disconnect()
            if self._stopping.is_set():
                return None
            raise
        finally:
            self._socket = None
            pool.release(connection)

    def interrupt(self) -> None:
        """End a wait in progress now. A task it took meanwhile is given back at release."""
        sock = self._socket
        if sock is not None:
            # wakes the read (the pop's thread closes it); closed meanwhile: that pop ended
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def pop_timeout(client: Client, poll_timeout: float) -> float:
    """How long a blocking pop may wait on an injected client: QUEUE_POLL_TIMEOUT, cut to
    leave BLOCKING_MARGIN under the client's socket timeout."""
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    if socket_timeout is None:
        return poll_timeout
    wait = min(poll_timeout, float(socket_timeout) - BLOCKING_MARGIN)
    if wait <= 0:
        raise QueueError(
            f"the given client's socket timeout ({socket_timeout}s) leaves no room for a"
            f" blocking pop: it must exceed BLOCKING_MARGIN ({BLOCKING_MARGIN}s)"
        )
    return wait


@attrs.define(kw_only=True)
class Fetcher:
    """Runs the fetch loop in the calling thread until ``stopping`` is set; raises the
    worker's fatal error, or a QueueError when Redis stays away or refuses the fetch.

    ``wait_for_slot`` waits while every slot is held; ``dispatch`` hands taken tasks to
    the pool; ``resync`` is set when tasks may sit in flight that no thread runs.
    """

    client: Client
    scripts: Scripts
    pop: BlockingPop
    inflight: str
    redis_url: str
    settings: QueueSettings
    slots: Slots
    reconnect: Reconnector
    stopping: threading.Event
    resync: threading.Event
    fatal: Fatal
    wait_for_slot: Callable[[], None]
    dispatch: Callable[[list[Delivery]], None]

    def run(self) -> None:
        """Take tasks while slots are free, until stopped."""
        failures = 0
        while not self.stopping.is_set():
            self.fatal.raise_if_set()
            free = self.slots.reserve()
            if free == 0:
                self.wait_for_slot()
                continue
            batch: list[Delivery] = []
            try:
                batch = self._orphans(free) if self.resync.is_set() else self._take(free)
            except REDIS_ERRORS as exc:
                self.resync.set()  # a move whose reply was lost leaves an orphan
                if self.stopping.is_set():
                    break  # the pop was interrupted on purpose
                failures += 1
                if not repeatable(exc):
                    raise translate(exc, "fetch", url=self.redis_url) from exc
                # Raises QueueConnectionError once out of attempts.
                self.reconnect.wait_after(oom_as_outage(exc), "fetch", failures)
                continue
            finally:
                self.slots.fill(free, [d.stored for d in batch])
            failures = 0
            self.dispatch(batch)
        self.fatal.raise_if_set()

    def _take(self, free: int) -> list[Delivery]:
        batch = self.scripts.fetch(self.inflight, free)
        if batch:
            return batch
        one = self.pop()
        if one is None:
            return []
        return [self.scripts.took(one)]

    def _orphans(self, free: int) -> list[Delivery]:
        """Up to ``free`` tasks of our in-flight list that no thread runs: taken by a call
        whose reply was lost. Clears the resync flag once none are left over."""
        if not self.slots.taking.acquire(timeout=self.settings.stop_poll_slice):
            return []  # the recorder is mid-call; look again on the next turn
        try:
            present = cast("list[bytes]", self.client.lrange(self.inflight, 0, -1))
            missing = self.slots.missing(present)
        finally:
            self.slots.taking.release()
        if len(missing) <= free:
            self.resync.clear()
        return [self.scripts.took(stored) for stored in missing[:free]]
