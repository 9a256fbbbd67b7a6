"""Running one Lua script: EVALSHA on a connection lent for the call, sent once.

A reply that says the script never ran is acted on here: ``NOSCRIPT`` (loaded and sent
again), ``MOVED`` (the queue's slot has a new owner: sent there) and ``ASK`` (the slot is
being migrated: sent to the importing node after ``ASKING``), at most
CLUSTER_REDIRECTS times. With MIN_REPLICAS_TO_ACK > 0 every call is followed, in the
same round trip and on the same connection, by ``WAIT``; a write fewer replicas confirm
is reported as :class:`NotReplicatedError`, a ``ConnectionError``: like a lost reply, the
write may or may not survive, and callers repeat it as they repeat a lost reply.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.connection import Connection, SSLConnection
from redis.exceptions import AskError, MovedError, NoScriptError

from semibot_queue.clients import Routed
from semibot_queue.connection import Client, check_client, is_transient
from semibot_queue.constants import CLUSTER_REDIRECTS, IDLE_SCRIPT_CONNECTIONS


class NotReplicatedError(redis.ConnectionError):
    """Fewer replicas than MIN_REPLICAS_TO_ACK confirmed a write in REPLICA_ACK_TIMEOUT."""


class Script:
    """One Lua script, sent straight down a connection lent by the pool for the call.

    This is redis-py's ``Script`` without the client's command layer: on this hot path
    that layer cost more CPU than the round trip itself (about 130 against 50 us per
    call, measured with ``time.process_time``), and a worker makes one call per task.
    The pool's limits and the client's no-resend rule still hold: a call is sent once,
    except after a reply saying it did not run. ``replicas`` (with ``timeout`` in
    seconds) is MIN_REPLICAS_TO_ACK.
    """

    def __init__(
        self, connections: Connections, source: str, replicas: int = 0, timeout: float = 0.0
    ) -> None:
        self._connections = connections
        self._source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._wait = ("WAIT", replicas, max(1, int(timeout * 1000))) if replicas else None

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """Run the script once; raw redis-py errors, callers translate."""
        redirects = 0
        while True:
            try:
                return self._once(keys, args)
            except AskError as exc:  # MOVED too: nothing ran
                redirects += 1
                if redirects > CLUSTER_REDIRECTS:
                    raise
                if not isinstance(exc, MovedError):
                    return self._asking(exc, keys, args)

    def _once(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        connection = self._connections.take()
        try:
            return self._run(connection, keys, args)
        except redis.ResponseError as exc:
            # An error reply was read whole: the connection is clean. But one that says
            # "not here, not now" (READONLY after a failover, MOVED, LOADING...) is
            # dropped, so the next call dials where the queue's node is now.
            if is_transient(exc):
                connection.disconnect()
            raise
        except BaseException:
            # A reply left half read (a lost link, a timeout, an interrupt) must never
            # reach the connection's next caller: drop it; the pool reconnects on next use.
            connection.disconnect()
            raise
        finally:
            self._connections.give_back(connection)

    def _asking(self, ask: AskError, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run it once on the node importing the slot (rare: only during a migration)."""
        connection = self._connections.direct(ask.host, int(ask.port))
        try:
            return self._run(connection, keys, args, asking=True)
        finally:
            connection.disconnect()

    def _run(
        self, connection: Any, keys: Sequence[Any], args: Sequence[Any], asking: bool = False
    ) -> Any:
        call = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return self._send(connection, call, asking)
        except NoScriptError:
            # Redis forgot it (a restart, SCRIPT FLUSH): nothing ran, so sending it is safe.
            connection.send_command("SCRIPT", "LOAD", self._source)
            connection.read_response()
            return self._send(connection, call, asking)

    def _send(self, connection: Any, call: tuple[Any, ...], asking: bool) -> Any:
        if not asking and self._wait is None:  # the hot path: one command, one reply
            connection.send_command(*call)
            return connection.read_response()
        commands: list[tuple[Any, ...]] = [("ASKING",)] if asking else []
        commands.append(call)
        if self._wait is not None:
            commands.append(self._wait)
        connection.send_packed_command(connection.pack_commands(commands))
        replies = []
        error: redis.ResponseError | None = None
        for _ in commands:  # every reply is read, so none is left for the next caller
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:
                error = error or exc
                replies.append(None)
        if error is not None:
            raise error
        if self._wait is not None:
            confirmed = int(replies[-1])
            if confirmed < self._wait[1]:
                # a master demoted by a failover has no replicas: ask where it is now
                if isinstance(connection, Routed):
                    connection.router.forget(connection.generation)
                connection.disconnect()
                raise NotReplicatedError(
                    f"{confirmed} of the {self._wait[1]} replicas MIN_REPLICAS_TO_ACK asks for"
                    f" confirmed the write within {self._wait[2]} ms: it may be lost"
                )
        return replies[1 if asking else 0]


class Connections:
    """Lends the client's pooled connections one call at a time.

    A call takes a connection and gives it back when it ends, so any number of threads
    share the pool's few (``make_client``'s pool holds at most MAX_CONNECTIONS and makes
    a caller wait for a free one). Up to IDLE_SCRIPT_CONNECTIONS given-back connections
    (never more than a quarter of the pool) wait here for the next call instead of going
    back to the pool: the pool's bookkeeping costs about 20 us of CPU per call, more than
    the rest of the call. A pool that raises when it runs out (redis-py's plain
    ConnectionPool, as an injected client may have) is waited for here, on a semaphore
    of its size. A client that would re-send a command by itself is refused
    (:func:`check_client`).
    """

    def __init__(self, client: Client) -> None:
        self._pool = check_client(client).connection_pool
        limit: int = getattr(self._pool, "max_connections", 0) or 0
        self._keep = min(IDLE_SCRIPT_CONNECTIONS, limit // 4)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._free: threading.BoundedSemaphore | None = None
        if limit and not isinstance(self._pool, redis.BlockingConnectionPool):
            self._free = threading.BoundedSemaphore(limit)

    def take(self) -> Any:
        """A connection for one call; waits while the pool has none free."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share the parent's sockets
                self._idle, self._pid = [], os.getpid()  # pragma: no cover - in a child (tested)
            connection = self._idle.pop() if self._idle else None
        if connection is not None:
            self._check(connection)
            return connection
        if self._free is not None:
            self._free.acquire()
        try:
            return self._pool.get_connection()
        except BaseException:
            if self._free is not None:
                self._free.release()
            raise

    def give_back(self, connection: Any) -> None:
        """Return ``connection``, taken by :meth:`take`: kept for the next call or pooled."""
        with self._lock:
            if len(self._idle) < self._keep and self._pid == os.getpid():
                self._idle.append(connection)
                return
        self._release(connection)

    def close(self) -> None:
        """Give the connections kept between calls back to the pool."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            self._release(connection)

    def direct(self, host: str, port: int) -> Any:
        """A connection of its own to ``host:port`` with the pool's options (the caller
        disconnects it): for a reply that names another node for one command (ASK)."""
        options = dict(self._pool.connection_kwargs)
        options.pop("router", None)
        tls = issubclass(self._pool.connection_class, SSLConnection)
        return (SSLConnection if tls else Connection)(**{**options, "host": host, "port": port})

    @staticmethod
    def _check(connection: Any) -> None:
        """Drop ``connection`` if the server closed it (or left data on it) while it waited
        here, as the pool does when it lends one, or if it was dialled for a node the
        queue has left (cluster, Sentinel): the next send reconnects."""
        if isinstance(connection, Routed) and connection.stale():
            connection.disconnect()
            return
        try:
            stale = connection.can_read()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            stale = True
        if stale:
            connection.disconnect()

    def _release(self, connection: Any) -> None:
        self._pool.release(connection)
        if self._free is not None:
            self._free.release()
