"""The dead-letter queue: where every task that cannot succeed ends, to be seen and replayed.

Every dead letter is a record of its own, ``<task id>#<n>`` (see lib_dead_letter.lua):
the same task id, or the same garbage, dead-lettered twice is two records. The raw bytes
of a task that could not be parsed (or killed workers) are kept verbatim beside the
record and shown here as UTF-8 text, or base64 when they are not UTF-8.
"""

from __future__ import annotations

import base64
import logging
import uuid
from functools import partial
from types import TracebackType
from typing import cast

import attrs

from semibot_queue.clients import given_client, make_client
from semibot_queue.codec import Codec
from semibot_queue.connection import Client, Reconnector
from semibot_queue.constants import DEAD_LETTER_ID_SEPARATOR
from semibot_queue.errors import DuplicateTaskError, InvalidTaskError, QueueError, QueueFullError
from semibot_queue.keys import KeySpace
from semibot_queue.models import DeadLetterRecord, RawEncoding
from semibot_queue.producer import default_redis_url
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.dead_letter")

#: What dlq_retry.lua answers when it refuses: the pending list is full, the task id is live.
_FULL, _LIVE = -1, -2


def raw_fields(raw: bytes) -> tuple[str, RawEncoding]:
    """``(text, encoding)`` keeping ``raw`` exactly: UTF-8 text, else base64."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def raw_bytes(record: DeadLetterRecord) -> bytes:
    """The stored bytes of a record kept raw."""
    if record.raw is None:
        raise InvalidTaskError(f"dead letter {record.id or record.task_id} keeps no raw payload")
    if record.raw_encoding == "base64":
        return base64.b64decode(record.raw)
    return record.raw.encode("utf-8")


def task_id_of_record(record_id: str) -> str:
    """The task id a record id ``<task id>#<n>`` names (a record id without ``#``, kept
    from before records had their own ids, is its task id)."""
    return record_id.rpartition(DEAD_LETTER_ID_SEPARATOR)[0] or record_id


def find_record_id(client: Client, keys: KeySpace, record_or_task_id: str) -> str | None:
    """The record id ``record_or_task_id`` names, or None: a record id names itself, a
    task id its newest record (the one numbered last)."""
    if DEAD_LETTER_ID_SEPARATOR in record_or_task_id:
        return record_or_task_id if client.hexists(keys.dead, record_or_task_id) else None
    pipe = client.pipeline(transaction=False)
    pipe.hexists(keys.dead, record_or_task_id)
    sep = DEAD_LETTER_ID_SEPARATOR
    # The ids of one task sit together in lex order: from "<id>#" up to "<id>$" excluded.
    pipe.zrangebylex(
        keys.dead_ids,
        f"[{record_or_task_id}{sep}",
        f"({record_or_task_id}{chr(ord(sep) + 1)}",
    )
    legacy, members = pipe.execute()
    numbered = [m.decode() for m in cast("list[bytes]", members)]
    if numbered:
        return max(numbered, key=lambda m: int(m.rpartition(sep)[2]))
    return record_or_task_id if legacy else None


def read_record(
    client: Client, keys: KeySpace, codec: Codec, record_id: str
) -> tuple[DeadLetterRecord, bytes] | None:
    """Record ``record_id`` as shown (id set, raw bytes rendered) and its stored JSON."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.dead, record_id)
    pipe.hget(keys.dead_raw, record_id)
    stored, raw = pipe.execute()
    if stored is None:
        return None
    return _shown(codec, record_id, stored, raw), stored


def _shown(codec: Codec, record_id: str, stored: bytes, raw: bytes | None) -> DeadLetterRecord:
    """The record stored as ``stored`` (with ``raw`` kept beside it), ready to show."""
    record = attrs.evolve(codec.decode_record(stored), id=record_id)
    if raw is not None:
        text, encoding = raw_fields(raw)
        record = attrs.evolve(record, raw=text, raw_encoding=encoding)
    if record.message is None and record.raw is not None:
        # Poison records keep the task's exact bytes; show the task when it parses.
        try:
            message = codec.decode_message(raw_bytes(record))
        except InvalidTaskError:
            return record
        return attrs.evolve(record, message=codec.unstructure(message))
    return record


class RetriedCount(int):
    """What ``retry_all()`` returns: how many tasks went back on pending (an int, as
    before), and ``stopped_early``: True when it stopped at a full queue, leaving
    ``remaining`` records of the run in place (the one refused included)."""

    stopped_early: bool
    remaining: int

    def __new__(cls, moved: int, *, remaining: int = 0) -> RetriedCount:
        count = super().__new__(cls, moved)
        count.remaining = remaining
        count.stopped_early = remaining > 0
        return count

    def __str__(self) -> str:
        return str(int(self))

    def __repr__(self) -> str:
        return f"RetriedCount({int(self)}, remaining={self.remaining})"


class DeadLetterQueue:
    """Inspect, replay and delete the dead letters of one queue; also a context manager.

    ``get``, ``retry`` and ``delete`` take a record id (``<task id>#<n>``, as ``list``
    shows) or a task id, which names that task's newest record. ``retry`` puts the task
    back on pending through the same length limit as ``enqueue``: a full queue refuses it
    with QueueFullError and the record stays.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        queue_name: str | None = None,
        settings: QueueSettings | None = None,
        *,
        client: Client | None = None,
    ) -> None:
        self.settings = settings or QueueSettings()
        self.redis_url = redis_url or default_redis_url()
        self.keys = KeySpace.of(queue_name, self.settings)
        self._codec = Codec(self.settings.max_payload_bytes)
        self._client, self._owned = (
            (make_client(self.redis_url, self.settings, queue=self.keys.queue), True)
            if client is None
            else given_client(client, self.settings, self.keys.queue)
        )
        self._scripts = Scripts(self._client, self.keys, self.settings)
        self._retry = Reconnector(self.redis_url, self.keys.queue, self.settings)

    def __enter__(self) -> DeadLetterQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a given client is left to its owner)."""
        self._scripts.close()
        if self._owned:
            self._client.close()

    def count(self) -> int:
        """Dead letters kept."""
        return int(self._retry.call("dlq count", lambda: self._client.hlen(self.keys.dead)))

    def list(self, offset: int = 0, limit: int = 100) -> list[DeadLetterRecord]:
        """Records, newest first, from ``offset``, at most ``limit``; each with its ``id``."""
        if offset < 0 or limit < 0:
            raise QueueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
        if limit == 0:
            return []

        def read() -> list[tuple[bytes, bytes | None, bytes | None]]:
            ids = cast(
                "list[bytes]",
                self._client.zrevrange(self.keys.dead_index, offset, offset + limit - 1),
            )
            if not ids:
                return []
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(self.keys.dead, ids)
            pipe.hmget(self.keys.dead_raw, ids)
            stored, raws = pipe.execute()
            return list(zip(ids, stored, raws, strict=True))

        rows = self._retry.call("dlq list", read)
        # A record evicted between the two reads is gone: skip it.
        return [
            _shown(self._codec, record_id.decode(), stored, raw)
            for record_id, stored, raw in rows
            if stored is not None
        ]

    def get(self, record_or_task_id: str) -> DeadLetterRecord | None:
        """The record of that id (a task id: its newest record), or None."""
        found = self._retry.call("dlq get", partial(self._read, record_or_task_id))
        return None if found is None else found[0]

    def retry(self, record_or_task_id: str) -> bool:
        """Put the task of that record back on pending, counts reset; False if unknown.

        Only that record is removed. A task that parses goes back as plain JSON and is
        marked accepted for IDEMPOTENCY_TTL, as ``enqueue`` marks it; bytes that never
        parsed go back as they were. Raises QueueFullError (record kept) when the pending
        list is full, DuplicateTaskError (record kept) when the task id is live again.
        """
        token = uuid.uuid4().hex
        for _ in range(self.settings.max_reconnect_attempts):
            found = self._retry.call("dlq get", partial(self._read, record_or_task_id))
            if found is None:
                return False
            record, seen = found
            record_id = cast("str", record.id)
            task, marker = self._replay(record, token)
            limits = (self.settings.max_queue_length, self.settings.idempotency_ttl)
            moved = self._retry.call(
                "dlq retry",
                partial(self._scripts.dlq_retry, record_id, seen, task, limits, marker),
                record.task_id,
            )
            if moved == 1:
                log.info(
                    "queue %s: dead letter %s put back on pending",
                    self.keys.queue,
                    record_id,
                    extra={"queue": self.keys.queue, "task_id": record.task_id},
                )
                return True
            self._refused(moved, record)
            # The record changed or went between read and write: read it again.
        raise QueueError(f"dead letter {record_or_task_id} kept changing; retry not done")

    def retry_all(self) -> RetriedCount:
        """Retry every dead letter (oldest first), as many as fit; how many went back on
        pending (an int).

        A record whose task id is live again is left in place (logged) and the run goes
        on. At a full queue the run stops (no QueueFullError): the count says how many
        were moved, its ``stopped_early`` is True and ``remaining`` says how many records
        of the run are left (the command line prints the count and exits 6).
        """
        ids = self._retry.call("dlq ids", lambda: self._client.zrange(self.keys.dead_index, 0, -1))
        record_ids = [raw_id.decode() for raw_id in cast("list[bytes]", ids)]
        moved = 0
        for done, record_id in enumerate(record_ids):
            try:
                moved += self.retry(record_id)
            except DuplicateTaskError as exc:
                log.warning(
                    "queue %s: %s",
                    self.keys.queue,
                    exc,
                    extra={"queue": self.keys.queue, "task_id": task_id_of_record(record_id)},
                )
            except QueueFullError:
                remaining = len(record_ids) - done
                log.warning(
                    "queue %s is full: retry_all stopped after %d dead letter(s), %d left",
                    self.keys.queue,
                    moved,
                    remaining,
                    extra={"queue": self.keys.queue, "task_id": task_id_of_record(record_id)},
                )
                return RetriedCount(moved, remaining=remaining)
        return RetriedCount(moved)

    def delete(self, record_or_task_id: str) -> bool:
        """Delete that record (a task id: its newest record); whether it existed."""
        # Found first, then deleted by record id: a delete repeated after a lost reply
        # must not take the task's next record with it.
        record_id = self._retry.call(
            "dlq find", partial(find_record_id, self._client, self.keys, record_or_task_id)
        )
        if record_id is None:
            return False
        return self._retry.call("dlq delete", partial(self._scripts.dlq_delete, record_id))

    def purge(self) -> int:
        """Delete every dead letter, in batches; how many there were."""
        removed = 0
        batch = self.settings.maintenance_batch
        while True:
            deleted, done = self._retry.call("dlq purge", partial(self._scripts.dlq_purge, batch))
            removed += deleted
            if done:
                break
        log.warning(
            "queue %s: dead-letter queue purged, %d record(s) deleted",
            self.keys.queue,
            removed,
            extra={"queue": self.keys.queue},
        )
        return removed

    def _read(self, record_or_task_id: str) -> tuple[DeadLetterRecord, bytes] | None:
        record_id = find_record_id(self._client, self.keys, record_or_task_id)
        if record_id is None:
            return None
        return read_record(self._client, self.keys, self._codec, record_id)

    def _replay(
        self, record: DeadLetterRecord, token: str
    ) -> tuple[bytes, tuple[str, str, str] | None]:
        """The task to push again (retry and delivery counts reset, else the raw bytes)
        and, for a task that parses, its marker (task id, session id, token)."""
        if record.message is None:
            return raw_bytes(record), None
        message = self._codec.message_from_dict(record.message)
        fresh = attrs.evolve(
            message,
            retry_count=0,
            delivery_count=0,
            last_error=f"{record.error_type}: {record.error}",
        )
        return self._codec.encode_message(fresh), (fresh.task_id, fresh.session_id, token)

    def _refused(self, moved: int, record: DeadLetterRecord) -> None:
        """Raise for a refused retry (full, live again); return for a raced one (0)."""
        if moved == _FULL:
            limit = self.settings.max_queue_length
            raise QueueFullError(
                f"queue {self.keys.queue} is full (MAX_QUEUE_LENGTH={limit}):"
                f" dead letter {record.id} kept"
            )
        if moved == _LIVE:
            raise DuplicateTaskError(
                f"task {record.task_id} was enqueued again since it was dead-lettered and is"
                f" still live: dead letter {record.id} kept"
            )

    def __repr__(self) -> str:
        return f"DeadLetterQueue(queue={self.keys.queue!r}, redis_url={self._retry.url!r})"
