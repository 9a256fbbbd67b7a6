"""Typed wrappers of the Lua scripts in ``lua/``: one script per change of state.

Each wrapper names the keys it passes and returns plain Python values. Scripts run
with EVALSHA on a pooled connection, and are loaded again when Redis forgot them (after
a restart).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from semibot_queue.connection import Client
from semibot_queue.constants import MAX_NAME_LENGTH
from semibot_queue.keys import KeySpace


def _load(name: str) -> str:
    return (
        resources.files("semibot_queue").joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")
    )


class _Script:
    """One Lua script, sent straight down a pooled connection.

    This is redis-py's ``Script`` without the client's command layer: on this hot path
    that layer cost more CPU than the round trip itself (about 130 against 50 us per
    call, measured with ``time.process_time``), and a worker makes one call per task.
    """

    def __init__(self, connections: _Connections, source: str) -> None:
        self._connections = connections
        self._source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        connection = self._connections.get()
        try:
            connection.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
            try:
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                connection.send_command("SCRIPT", "LOAD", self._source)
                connection.read_response()
                connection.send_command("EVALSHA", self.sha, len(keys), *keys, *args)
                return connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            # A reply left half read must never reach this connection's next call; it
            # reconnects by itself on the next send.
            connection.disconnect()
            raise


class _Connections:
    """One connection per thread, taken from the client's pool once and kept.

    Taking and returning a pooled connection on every call cost as much CPU as the
    call itself; a thread keeps its own instead. ``close()`` gives them all back.
    """

    def __init__(self, client: Client) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        self._taken: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._pool.get_connection()
            self._local.connection = connection
            with self._lock:
                self._taken.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            taken, self._taken = self._taken, []
        for connection in taken:
            self._pool.release(connection)
        self._local = threading.local()


class Scripts:
    """All scripts of one queue, bound to one client and key space."""

    def __init__(self, client: Client, keys: KeySpace) -> None:
        self._keys = keys
        self._client = client
        self._connections = _Connections(client)

        def register(source: str) -> _Script:
            return _Script(self._connections, source)

        self._enqueue = register(_load("enqueue"))
        self._fetch = register(_load("fetch"))
        self._ack = register(_load("ack"))
        self._retry = register(_load("retry"))
        self._dead_letter = register(_load("dead_letter"))
        self._trim_dead = register(_load("trim_dead"))
        self._promote = register(_load("promote"))
        self._heartbeat = register(_load("heartbeat"))
        self._recover = register(_load("recover"))
        self._release = register(_load("release"))
        self._dlq_retry = register(_load("dlq_retry"))
        self._dlq_delete = register(_load("dlq_delete"))
        self._purge = register(_load("purge"))
        self._publish_result = register(_load("publish_result"))

    def close(self) -> None:
        """Give every connection the scripts took back to the client's pool."""
        self._connections.close()

    def enqueue(self, tasks: list[tuple[str, bytes]], max_length: int, marker_ttl: int) -> int:
        """Push ``(task id, task)`` pairs, oldest first, skipping ids already accepted in
        the last ``marker_ttl`` seconds; the new length, or -1 if the new ones do not fit."""
        keys = [self._keys.pending] + [self._keys.accepted(task_id) for task_id, _ in tasks]
        return int(self._enqueue(keys=keys, args=[max_length, marker_ttl, *(t for _, t in tasks)]))

    def fetch(self, inflight: str, count: int) -> list[bytes]:
        """Move up to ``count`` pending tasks into ``inflight``, oldest first."""
        return list(self._fetch(keys=[self._keys.pending, inflight], args=[count]))

    def ack(
        self, inflight: str, ttl: int, acks: list[tuple[bytes, str, bytes, str]], take: int = 0
    ) -> tuple[list[int], list[bytes]]:
        """Finish tasks given as ``(stored task, task id, result JSON, channel)``, then take
        up to ``take`` pending tasks into ``inflight``.

        Returns a flag per finished task (1 recorded, 0 already recovered) and the taken tasks.
        """
        keys = [inflight, self._keys.pending] + [self._keys.result(t) for _, t, _, _ in acks]
        args: list[Any] = [ttl, take]
        for stored, _, result, channel in acks:
            args += [stored, result, channel]
        flags, taken = self._ack(keys=keys, args=args)
        return [int(flag) for flag in flags], list(taken)

    def retry(self, inflight: str, stored: bytes, next_task: bytes, delay_ms: int) -> bool:
        """Schedule ``next_task`` in ``delay_ms``; False if ``stored`` was no longer in flight."""
        keys = [inflight, self._keys.scheduled]
        return bool(self._retry(keys=keys, args=[stored, next_task, delay_ms]))

    def dead_letter(
        self,
        inflight: str,
        stored: bytes,
        task_id: str,
        record: bytes,
        result: tuple[bytes, str, int] | None,
    ) -> bool:
        """Move ``stored`` to the dead letters; ``result`` is (JSON, channel, ttl) or None."""
        keys = [inflight, self._keys.dead, self._keys.dead_index, self._keys.result(task_id)]
        payload, channel, ttl = result if result is not None else (b"", "", 0)
        args: list[Any] = [stored, task_id, record, payload, ttl, channel]
        return bool(self._dead_letter(keys=keys, args=args))

    def trim_dead(self, max_length: int, ttl: int) -> list[str]:
        """Evict expired and excess dead letters; their task ids."""
        keys = [self._keys.dead, self._keys.dead_index]
        return [_text(task_id) for task_id in self._trim_dead(keys=keys, args=[max_length, ttl])]

    def promote(self, batch: int, max_length: int) -> int:
        """Move due retries to pending, as many as fit; how many moved."""
        keys = [self._keys.scheduled, self._keys.pending]
        return int(self._promote(keys=keys, args=[batch, max_length]))

    def heartbeat(self, worker_id: str) -> int:
        """Mark ``worker_id`` alive now; the Redis time in ms."""
        return int(self._heartbeat(keys=[self._keys.workers], args=[worker_id]))

    def recover(
        self, worker_id: str, dead_after_ms: int, max_deliveries: int, batch: int, max_length: int
    ) -> tuple[int, list[str], list[str]] | None:
        """Requeue a dead worker's tasks: (left in flight, requeued ids, poisoned ids).

        None when the worker turned out to be alive.
        """
        keys = [
            self._keys.workers,
            self._keys.inflight(worker_id),
            self._keys.pending,
            self._keys.dead,
            self._keys.dead_index,
        ]
        args = [worker_id, dead_after_ms, max_deliveries, batch, max_length, MAX_NAME_LENGTH]
        reply = self._recover(keys=keys, args=args)
        if int(reply[0]) < 0:
            return None
        return int(reply[0]), [_text(i) for i in reply[1]], [_text(i) for i in reply[2]]

    def release(self, worker_id: str, max_length: int) -> int:
        """Give back a stopping worker's tasks; how many could not be given back."""
        keys = [self._keys.workers, self._keys.inflight(worker_id), self._keys.pending]
        return int(self._release(keys=keys, args=[worker_id, max_length]))

    def dlq_retry(self, task_id: str, seen: bytes, task: bytes, max_length: int) -> int:
        """1 requeued, 0 record gone or changed since read, -1 pending list full."""
        keys = [self._keys.dead, self._keys.dead_index, self._keys.pending]
        return int(self._dlq_retry(keys=keys, args=[task_id, seen, task, max_length]))

    def dlq_delete(self, task_id: str) -> bool:
        """Delete one dead letter; whether it existed."""
        keys = [self._keys.dead, self._keys.dead_index]
        return bool(self._dlq_delete(keys=keys, args=[task_id]))

    def publish_result(self, task_id: str, result: bytes, channel: str, ttl: int) -> int:
        """Store and publish a final result; how many waiters got it."""
        keys = [self._keys.result(task_id)]
        return int(self._publish_result(keys=keys, args=[result, ttl, channel]))

    def purge(self, key: str, *companions: str) -> int:
        """Delete ``key`` (and companions); how many entries ``key`` held."""
        return int(self._purge(keys=[key, *companions]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
