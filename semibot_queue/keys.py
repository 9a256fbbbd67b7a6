"""The only place where a Redis key or channel name is spelled.

Every key of a queue carries the hash tag ``{queue}`` so that each script touches a
single Redis Cluster slot.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import attrs

from semibot_queue.constants import DEAD_LETTER_QUEUE, MAX_NAME_LENGTH, RESULT_CHANNEL_PREFIX
from semibot_queue.errors import InvalidTaskError

if TYPE_CHECKING:
    from semibot_queue.settings import QueueSettings

_NAME = re.compile(r"[A-Za-z0-9_.:\-]+")


def is_valid_name(value: str) -> bool:
    """Whether ``value`` may appear inside a key (see ``validate_name``)."""
    return len(value) <= MAX_NAME_LENGTH and _NAME.fullmatch(value) is not None


def validate_name(value: str, what: str) -> str:
    """Return ``value`` if it may appear inside a key, else raise InvalidTaskError.

    Braces, spaces and wildcards are refused so that no name can change another
    key's hash tag or match other keys in a pattern.
    """
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value):
        raise InvalidTaskError(
            f"{what} {value!r} is not allowed: use 1 to {MAX_NAME_LENGTH}"
            " of the characters A-Z a-z 0-9 _ . : -"
        )
    return value


def _queue_name(value: str) -> str:
    return validate_name(value, "queue name")


def _dead_suffix(value: str) -> str:
    return validate_name(value, "dead-letter queue suffix")


@attrs.frozen
class KeySpace:
    """Key names of one queue."""

    queue: str = attrs.field(converter=_queue_name)
    result_prefix: str = RESULT_CHANNEL_PREFIX
    dead_suffix: str = attrs.field(default=DEAD_LETTER_QUEUE, converter=_dead_suffix)

    @classmethod
    def of(cls, queue: str | None, settings: QueueSettings) -> KeySpace:
        """The key space of ``queue`` (None: the settings' queue) under ``settings``.

        An empty name is refused like any other bad name, never read as "the default".
        """
        return cls(
            settings.default_queue_name if queue is None else queue,
            settings.result_channel_prefix,
            settings.dead_letter_queue,
        )

    @property
    def _tag(self) -> str:
        return "{" + self.queue + "}"

    @property
    def pending(self) -> str:
        """List of tasks waiting for a worker (pushed left, taken right), plain JSON bodies.

        Named exactly as the queue, as the Semibot runtime's list was, so that its producers
        (LPUSH) feed our workers. In Redis Cluster a key named ``q`` hashes to the same slot
        as ``{q}:...``: the whole name is the hash tag.
        """
        return self.queue

    @property
    def crashes(self) -> str:
        """Hash: task id -> deliveries of it lost to dead workers (kept out of the body)."""
        return f"{self._tag}:crashes"

    @property
    def releases(self) -> str:
        """Hash: task id -> deliveries of it given back by stopping workers."""
        return f"{self._tag}:releases"

    @property
    def state(self) -> str:
        """Hash: task id -> "pending" | "scheduled" | "running", while the task is live."""
        return f"{self._tag}:state"

    @property
    def cancel(self) -> str:
        """Hash: task id -> 1 when cancel() was asked for it and it has not ended yet."""
        return f"{self._tag}:cancel"

    @property
    def grace(self) -> str:
        """String: Redis time in ms before which no worker is declared dead (after an outage)."""
        return f"{self._tag}:grace"

    @property
    def last_beat(self) -> str:
        """String: Redis time in ms of the latest heartbeat of any worker of the queue."""
        return f"{self._tag}:last_beat"

    @property
    def scheduled(self) -> str:
        """Sorted set of tasks waiting for a retry, scored by due time in ms."""
        return f"{self._tag}:scheduled"

    @property
    def voided(self) -> str:
        """Set of the ids of tasks cancelled while scheduled, whose copy still waits in
        the scheduled set: not counted against MAX_QUEUE_LENGTH, dropped when due."""
        return f"{self._tag}:voided"

    @property
    def workers(self) -> str:
        """Sorted set of live workers, scored by their last heartbeat in ms."""
        return f"{self._tag}:workers"

    @property
    def dead(self) -> str:
        """Hash of dead-letter records by task id."""
        return f"{self._tag}:{self.dead_suffix}"

    @property
    def dead_index(self) -> str:
        """Sorted set of dead-letter record ids, scored by failure time in ms."""
        return f"{self._tag}:{self.dead_suffix}:index"

    @property
    def dead_ids(self) -> str:
        """Sorted set of dead-letter record ids, all scored 0: found by task id in lex order."""
        return f"{self._tag}:{self.dead_suffix}:ids"

    @property
    def dead_raw(self) -> str:
        """Hash: dead-letter record id -> the raw bytes of a task that could not be parsed."""
        return f"{self._tag}:{self.dead_suffix}:raw"

    @property
    def dead_seq(self) -> str:
        """Counter giving each dead-letter record its own id."""
        return f"{self._tag}:{self.dead_suffix}:seq"

    @property
    def inflight_prefix(self) -> str:
        """Prefix of every worker's in-flight list; a script appends the worker id."""
        return f"{self._tag}:inflight:"

    def inflight(self, worker_id: str) -> str:
        """List of tasks that ``worker_id`` has taken and not yet finished."""
        return self.inflight_prefix + validate_name(worker_id, "worker id")

    @property
    def result_key_prefix(self) -> str:
        """Prefix of stored results; a script appends the task id."""
        return f"{self._tag}:result:"

    @property
    def accepted_prefix(self) -> str:
        """Prefix of idempotency markers; a script appends the task id."""
        return f"{self._tag}:accepted:"

    def accepted(self, task_id: str) -> str:
        """Marker that ``task_id`` was enqueued, so that a repeated enqueue is a no-op."""
        return self.accepted_prefix + validate_name(task_id, "task id")

    def result(self, task_id: str) -> str:
        """String holding the JSON result of ``task_id`` for RESULT_TTL seconds."""
        return self.result_key_prefix + validate_name(task_id, "task id")

    def result_channel(self, session_id: str) -> str:
        """Pub/sub channel on which the results of one session are published."""
        return f"{self.result_prefix}:{session_id}"

    @property
    def result_channel_pattern(self) -> str:
        """Pattern matching every result channel, for waiters that do not know the session."""
        return f"{self.result_prefix}:*"
