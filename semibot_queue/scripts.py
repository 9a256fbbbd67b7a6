"""Typed wrappers of the Lua scripts in ``lua/``: one script per change of state.

Each wrapper names the keys it passes and returns plain Python values. Scripts run
through :mod:`semibot_queue.script_runner` (EVALSHA on a pooled connection, loaded again
when Redis forgot them, redirections followed, replicas waited for).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Literal

import attrs

from semibot_queue.codec import task_id_of
from semibot_queue.connection import Client
from semibot_queue.constants import (
    DEAD_LETTER_ID_SEPARATOR,
    MAINTENANCE_BATCH,
    MAX_NAME_LENGTH,
)
from semibot_queue.keys import KeySpace, is_valid_name
from semibot_queue.script_runner import Connections, Script
from semibot_queue.settings import QueueSettings

#: Prelude defining task_id_of(), key_of() and counts_of() (see its header).
TASK_ID_PRELUDE = "lib_task_id"

#: Prelude defining add_dead_letter() and the other dead-letter helpers (see its header).
DEAD_LETTER_PRELUDE = "lib_dead_letter"


def load_source(*names: str) -> str:
    """The source of the scripts ``names``, in order: preludes first, then the script."""
    lua = resources.files("semibot_queue").joinpath("lua")
    return "\n".join(lua.joinpath(f"{name}.lua").read_text("utf-8") for name in names)


@attrs.frozen
class Taken:
    """A task a worker just took: its bytes, its earlier deliveries lost to dead workers or
    given back, and whether its cancel was asked before it started."""

    stored: bytes
    redelivered: int = 0
    cancelled: bool = False


def _taken(moved: list[bytes], counts: list[int], cancelled: list[int]) -> list[Taken]:
    return [
        Taken(stored, int(n), bool(flag))
        for stored, n, flag in zip(moved, counts, cancelled, strict=True)
    ]


class Scripts:
    """All scripts of one queue, bound to one client and key space; every one that
    writes waits for ``settings.min_replicas_to_ack`` replicas."""

    def __init__(
        self, client: Client, keys: KeySpace, settings: QueueSettings | None = None
    ) -> None:
        self._keys = keys
        self._client = client
        self._connections = Connections(client)
        s = settings or QueueSettings()

        def register(source: str, writes: bool = True) -> Script:
            replicas = s.min_replicas_to_ack if writes else 0
            return Script(self._connections, source, replicas, s.replica_ack_timeout)

        self._enqueue = register(load_source("enqueue"))
        self._clear = register(load_source(TASK_ID_PRELUDE, "clear"))
        self._fetch = register(load_source(TASK_ID_PRELUDE, "fetch"))
        self._ack = register(load_source(TASK_ID_PRELUDE, "ack"))
        self._counts = register(load_source(TASK_ID_PRELUDE, "counts"))
        self._drop = register(load_source("drop"))
        self._adopt = register(load_source("adopt"))
        self._retry = register(load_source(TASK_ID_PRELUDE, "retry"))
        self._dead_letter = register(load_source(DEAD_LETTER_PRELUDE, "dead_letter"))
        self._trim_dead = register(load_source(DEAD_LETTER_PRELUDE, "trim_dead"))
        self._promote = register(load_source(TASK_ID_PRELUDE, "promote"))
        self._heartbeat = register(load_source("heartbeat"))
        self._recover = register(load_source(TASK_ID_PRELUDE, DEAD_LETTER_PRELUDE, "recover"))
        self._release = register(load_source(TASK_ID_PRELUDE, "release"))
        self._dlq_retry = register(load_source(DEAD_LETTER_PRELUDE, "dlq_retry"))
        self._dlq_delete = register(load_source(DEAD_LETTER_PRELUDE, "dlq_delete"))
        self._dlq_purge = register(load_source(DEAD_LETTER_PRELUDE, "dlq_purge"))
        self._publish_result = register(load_source("publish_result"))
        self._status = register(load_source("status"), writes=False)
        self._cancel = register(load_source("cancel"))

    def close(self) -> None:
        """Give every connection the scripts took back to the client's pool."""
        self._connections.close()

    def enqueue(
        self,
        tasks: Sequence[tuple[str, str, bytes]],
        limits: tuple[int, int],
        token: str,
        delay_ms: int | None = None,
    ) -> tuple[int, int, list[int]]:
        """Put ``(task id, session id, task)`` triples, oldest first, all or none, on
        pending (or, with ``delay_ms``, into the scheduled set, due that much later by
        Redis's clock), each id marked as accepted with this call's ``token`` and its
        state set. ``limits`` is (MAX_QUEUE_LENGTH, IDEMPOTENCY_TTL in seconds); pending
        plus scheduled tasks count against MAX_QUEUE_LENGTH.

        Returns ``(pending length, scheduled length, [])``, ``(-1, 0, [])`` when the tasks
        do not fit, or ``(-2, 0, positions)`` (0-based) of tasks whose id is still live;
        nothing is written then. A repeat of the same call (same token, after a lost
        reply) writes nothing.
        """
        k = self._keys
        keys = [k.pending, k.scheduled, k.state, k.voided]
        args: list[Any] = [*limits, token, b"" if delay_ms is None else delay_ms]
        word = "pending " if delay_ms is None else "scheduled "
        for task_id, session_id, task in tasks:
            keys += [k.accepted(task_id), k.result(task_id)]
            args += [task, task_id, word + session_id]
        status, *rest = self._enqueue(keys=keys, args=args)
        if status < 0:
            return int(status), 0, [int(p) - 1 for p in rest]
        return int(status), int(rest[0]), []

    def clear(self, batch: int, max_bytes: int) -> tuple[int, int]:
        """Delete up to ``batch`` pending tasks, oldest first, stopping after ``max_bytes``,
        with their idempotency markers and delivery counts: (deleted, still pending)."""
        k = self._keys
        keys = [k.pending, k.crashes, k.releases, k.state, k.cancel]
        args = [batch, max_bytes, k.accepted_prefix, MAX_NAME_LENGTH]
        deleted, left = self._clear(keys=keys, args=args)
        return int(deleted), int(left)

    def fetch(self, inflight: str, count: int) -> list[Taken]:
        """Move up to ``count`` pending tasks into ``inflight``, oldest first, each now
        running; each with its earlier deliveries lost to dead workers or given back, and
        whether its cancel was asked."""
        k = self._keys
        keys = [k.pending, inflight, k.crashes, k.releases, k.state, k.cancel]
        moved, counts, cancelled = self._fetch(keys=keys, args=[count, MAX_NAME_LENGTH])
        return _taken(moved, counts, cancelled)

    def took(self, stored: bytes) -> Taken:
        """The bookkeeping of ``stored``, taken by a plain BLMOVE: it is now running; its
        earlier deliveries lost or given back and whether its cancel was asked."""
        k = self._keys
        keys = [k.crashes, k.releases, k.state, k.cancel]
        count, cancelled = self._counts(keys=keys, args=[stored, MAX_NAME_LENGTH])
        return Taken(stored, int(count), bool(cancelled))

    def drop(
        self, inflight: str, stored: bytes, task_id: str, result: tuple[bytes, str, int]
    ) -> bool:
        """Take ``stored``, whose cancel was asked before it ran, out of ``inflight`` with
        its bookkeeping, storing and publishing ``result`` (cancelled result JSON,
        channel, ttl) unless a result is stored already; False if it was no longer in
        flight."""
        k = self._keys
        payload, channel, ttl = result
        keys = [inflight, k.crashes, k.releases, k.state, k.cancel]
        keys += [k.result(task_id), k.accepted(task_id)]
        return bool(self._drop(keys=keys, args=[stored, task_id_of(stored), payload, ttl, channel]))

    def ack(
        self, inflight: str, ttl: int, acks: list[tuple[bytes, str, bytes, str]], take: int = 0
    ) -> tuple[list[int], list[Taken]]:
        """Finish tasks given as ``(stored task, task id, result JSON, channel)``, then take
        up to ``take`` pending tasks into ``inflight``.

        Returns a flag per finished task (1 recorded, 0 already recovered) and the taken
        tasks, as :meth:`fetch` returns them.
        """
        k = self._keys
        keys = [inflight, k.pending, k.crashes, k.releases, k.state, k.cancel]
        args: list[Any] = [ttl, take, MAX_NAME_LENGTH]
        for stored, task_id, result, channel in acks:
            keys += [k.result(task_id), k.accepted(task_id)]
            args += [stored, result, channel, task_id]
        flags, moved, counts, cancelled = self._ack(keys=keys, args=args)
        return [int(flag) for flag in flags], _taken(moved, counts, cancelled)

    def retry(self, inflight: str, stored: bytes, next_task: bytes, delay_ms: int) -> bool:
        """Schedule ``next_task`` in ``delay_ms``; False if ``stored`` was no longer in flight."""
        keys = [inflight, self._keys.scheduled, self._keys.state]
        args = [stored, next_task, delay_ms, task_id_of(stored)]
        return bool(self._retry(keys=keys, args=args))

    def dead_letter(
        self,
        inflight: str,
        stored: bytes,
        task_id: str,
        record_json: bytes,
        raw: bytes | None,
        result: tuple[bytes, str, int] | None,
    ) -> str | None:
        """Dead-letter ``stored`` as a new record of its own; the new record id.

        ``raw`` is kept verbatim beside the record (a body that could not be parsed);
        ``result`` is (failed result JSON, channel, ttl) or None. The task's crash and
        release counts and its idempotency marker go: this is its final outcome. A
        ``task_id`` unfit for a key is replaced by ``raw-<sha1 of stored>``. None (nothing
        written) when ``stored`` was no longer in flight.
        """
        if not is_valid_name(task_id):
            task_id = "raw-" + hashlib.sha1(stored, usedforsecurity=False).hexdigest()
        k = self._keys
        keys = [inflight, *self._dead_keys(), k.crashes, k.releases, k.accepted(task_id)]
        keys += [k.result(task_id), k.state, k.cancel]
        payload, channel, ttl = result if result is not None else (b"", "", 0)
        if raw is None:
            raw, keep = b"", b"0"
        elif raw == stored:
            raw, keep = b"", b"2"  # the body itself: sent once, not twice
        else:
            keep = b"1"
        # counts are kept under the id lib_task_id.lua reads, which codec.task_id_of matches
        args = [stored, task_id, record_json, raw, keep, payload, ttl, channel, task_id_of(stored)]
        record_id = self._dead_letter(keys=keys, args=args)
        return None if record_id is None else _text(record_id)

    def trim_dead(self, max_length: int, ttl: int, batch: int = MAINTENANCE_BATCH) -> list[str]:
        """Evict up to ``batch`` expired, then excess, dead letters; their record ids."""
        evicted = self._trim_dead(keys=self._dead_keys(), args=[max_length, ttl, batch])
        return [_text(record_id) for record_id in evicted]

    def _dead_keys(self) -> list[str]:
        """The five keys of the dead letters, in the order lib_dead_letter.lua reads them."""
        k = self._keys
        return [k.dead, k.dead_index, k.dead_ids, k.dead_raw, k.dead_seq]

    def promote(self, batch: int, max_length: int) -> int:
        """Move due retries and delayed tasks to pending, as many as fit; how many moved."""
        k = self._keys
        keys = [k.scheduled, k.pending, k.state, k.voided, k.cancel, k.crashes, k.releases]
        args = [batch, max_length, MAX_NAME_LENGTH, k.accepted_prefix]
        return int(self._promote(keys=keys, args=args))

    def heartbeat(self, worker_id: str, *, outage_ms: int, grace_ms: int) -> tuple[int, int, int]:
        """Mark ``worker_id`` alive now: (Redis time in ms, 1 if it was not registered,
        1 if a grace window was opened because nobody heartbeated for ``outage_ms``)."""
        k = self._keys
        reply = self._heartbeat(
            keys=[k.workers, k.last_beat, k.grace], args=[worker_id, outage_ms, grace_ms]
        )
        return int(reply[0]), int(reply[1]), int(reply[2])

    def adopt(self, worker_ids: list[str]) -> list[str]:
        """Register the in-flight lists of ``worker_ids`` that hold tasks but no registry
        entry, as seen now; the ids adopted."""
        keys = [self._keys.workers, *(self._keys.inflight(w) for w in worker_ids)]
        return [_text(w) for w in self._adopt(keys=keys, args=worker_ids)]

    def recover(
        self,
        worker_id: str,
        dead_after_ms: int,
        max_deliveries: int,
        limits: tuple[int, int, int],
    ) -> tuple[int, list[str], list[str]] | Literal["alive", "grace"]:
        """Requeue a dead worker's tasks: (left in flight, requeued task ids, poison
        dead-letter record ids); "alive" when it heartbeated after all, "grace" inside
        the window after an outage when nobody is declared dead. ``limits`` is (tasks,
        MAX_QUEUE_LENGTH, bytes of bodies) one call moves at most."""
        batch, max_length, budget = limits
        k = self._keys
        keys = [
            k.workers,
            k.inflight(worker_id),
            k.pending,
            k.crashes,
            k.releases,
            k.grace,
            *self._dead_keys(),
            k.state,
            k.cancel,
        ]
        args = [
            worker_id,
            dead_after_ms,
            max_deliveries,
            batch,
            max_length,
            MAX_NAME_LENGTH,
            k.accepted_prefix,
            budget,
        ]
        reply = self._recover(keys=keys, args=args)
        status = {-1: "alive", -2: "grace"}.get(int(reply[0]))
        if status == "alive":
            return "alive"
        if status == "grace":
            return "grace"
        return int(reply[0]), [_text(i) for i in reply[1]], [_text(i) for i in reply[2]]

    def release(self, worker_id: str, max_length: int, budget: int) -> int:
        """Give back a stopping worker's tasks, ``budget`` bytes of bodies per script call;
        how many could not be given back (pending is full)."""
        k = self._keys
        keys = [k.workers, k.inflight(worker_id), k.pending, k.releases, k.state]
        args = [worker_id, max_length, MAX_NAME_LENGTH, budget]
        while True:
            left, moved = (int(n) for n in self._release(keys=keys, args=args))
            if left == 0 or moved == 0:
                return left

    def dlq_retry(
        self,
        record_id: str,
        seen: bytes,
        task: bytes,
        limits: tuple[int, int],
        marker: tuple[str, str, str] | None,
    ) -> int:
        """Push ``task`` back on pending and remove record ``record_id``, if it is still
        ``seen``. ``limits`` is (MAX_QUEUE_LENGTH, IDEMPOTENCY_TTL); ``marker`` is
        (task id, session id, this call's token) for a task that parses (its state becomes
        pending, its old result goes), None for raw bytes.

        1 requeued (also by an earlier try of this same call), 0 record gone or changed
        since read, -1 queue full (pending plus scheduled), -2 the task id is live again.
        """
        max_length, marker_ttl = limits
        k = self._keys
        if marker is None:
            mark, task_id, state, token = b"0", "", "", ""
            marker_key, result_key = k.dead_seq, k.dead_seq  # unused, in the queue's slot
        else:
            task_id, session_id, token = marker
            mark, state = b"1", f"pending {session_id}"
            marker_key, result_key = k.accepted(task_id), k.result(task_id)
        keys = [*self._dead_keys(), k.pending, marker_key, k.state, result_key, k.scheduled]
        keys.append(k.voided)
        args = [record_id, seen, task, max_length, marker_ttl, mark, token, task_id, state]
        return int(self._dlq_retry(keys=keys, args=args))

    def dlq_delete(self, record_id: str) -> bool:
        """Delete one dead-letter record; whether it existed."""
        return bool(self._dlq_delete(keys=self._dead_keys(), args=[record_id]))

    def dlq_purge(self, batch: int = MAINTENANCE_BATCH) -> tuple[int, bool]:
        """Delete up to ``batch`` dead letters: (how many, whether none is left now)."""
        deleted, done = self._dlq_purge(keys=self._dead_keys(), args=[batch])
        return int(deleted), bool(done)

    def publish_result(self, task_id: str, result: bytes, channel: str, ttl: int) -> int:
        """Store and publish a final result; how many waiters got it."""
        keys = [self._keys.result(task_id)]
        return int(self._publish_result(keys=keys, args=[result, ttl, channel]))

    def status(self, task_id: str) -> str | None:
        """The status word of ``task_id`` (see status.lua), None for an unknown task."""
        k = self._keys
        keys = [k.result(task_id), k.state, k.dead_ids, k.dead]
        word = self._status(keys=keys, args=[task_id, DEAD_LETTER_ID_SEPARATOR])
        return None if word is None else _text(word)

    def cancel(
        self, task_id: str, seen_state: bytes, session_id: str, result: bytes, ttl: int
    ) -> int:
        """Cancel ``task_id`` if it is still live (see cancel.lua). ``seen_state`` is the
        state value read before, ``result`` the cancelled result built for its session
        ``session_id``, published on that session's channel.

        1 cancelled before it ran (the result stored and published), 2 asked to stop
        while running, 0 not live, -1 its state changed since read (read it again).
        """
        k = self._keys
        keys = [k.state, k.cancel, k.result(task_id), k.accepted(task_id), k.voided]
        args = [task_id, seen_state, result, ttl, k.result_channel(session_id)]
        return int(self._cancel(keys=keys, args=args))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
