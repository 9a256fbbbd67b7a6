"""Typed wrappers of the Lua scripts in ``lua/``: one script per change of state.

Each wrapper names the keys it passes and returns plain Python values. redis-py's
``Script`` runs EVALSHA and reloads a script that Redis forgot (after a restart).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from semibot_queue.connection import Client
from semibot_queue.keys import KeySpace


def _load(name: str) -> str:
    return (
        resources.files("semibot_queue").joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")
    )


class Scripts:
    """All scripts of one queue, bound to one client and key space."""

    def __init__(self, client: Client, keys: KeySpace) -> None:
        self._keys = keys
        self._client = client
        register = client.register_script
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

    def enqueue(self, tasks: list[bytes], max_length: int) -> int:
        """Push ``tasks`` (oldest first); the new length, or -1 if they do not all fit."""
        return int(self._enqueue(keys=[self._keys.pending], args=[max_length, *tasks]))

    def fetch(self, inflight: str, count: int) -> list[bytes]:
        """Move up to ``count`` pending tasks into ``inflight``, oldest first."""
        return list(self._fetch(keys=[self._keys.pending, inflight], args=[count]))

    def ack(self, inflight: str, ttl: int, acks: list[tuple[bytes, str, bytes, str]]) -> list[int]:
        """Finish tasks given as ``(stored task, task id, result JSON, channel)``.

        Returns 1 per task whose result was recorded, 0 per task already recovered.
        """
        keys = [inflight] + [self._keys.result(task_id) for _, task_id, _, _ in acks]
        args: list[Any] = [ttl]
        for stored, _, result, channel in acks:
            args += [stored, result, channel]
        return [int(flag) for flag in self._ack(keys=keys, args=args)]

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
        args = [worker_id, dead_after_ms, max_deliveries, batch, max_length]
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
