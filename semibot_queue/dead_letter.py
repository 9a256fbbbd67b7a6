"""The dead-letter queue: where every task that cannot succeed ends, to be seen and replayed."""

from __future__ import annotations

import base64
import logging
from functools import partial
from typing import cast

import attrs

from semibot_queue.codec import Codec, split_redelivery
from semibot_queue.connection import Client, Reconnector, as_bytes, make_client
from semibot_queue.errors import InvalidTaskError, QueueError, QueueFullError
from semibot_queue.keys import KeySpace
from semibot_queue.models import DeadLetterRecord, RawEncoding
from semibot_queue.producer import default_redis_url
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.dead_letter")


def raw_fields(raw: bytes) -> tuple[str, RawEncoding]:
    """``(text, encoding)`` keeping ``raw`` exactly: UTF-8 text, else base64."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def raw_bytes(record: DeadLetterRecord) -> bytes:
    """The stored bytes of a record kept raw."""
    if record.raw is None:
        raise InvalidTaskError(f"dead letter {record.task_id} keeps no raw payload")
    if record.raw_encoding == "base64":
        return base64.b64decode(record.raw)
    return record.raw.encode("utf-8")


class DeadLetterQueue:
    """Inspect, replay and delete the dead letters of one queue.

    ``get``, ``retry`` and ``delete`` are O(1) by task id. ``retry`` puts the task back
    on pending through the same length limit as ``enqueue``: a full queue refuses it
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
        self._given_client = client
        self._client = client or make_client(self.redis_url, self.settings)
        self._scripts = Scripts(self._client, self.keys)
        self._retry = Reconnector(self.redis_url, self.keys.queue, self.settings)

    def close(self) -> None:
        """Close the connection (a given client is left to its owner)."""
        self._scripts.close()
        if self._given_client is None:
            self._client.close()

    def count(self) -> int:
        """Dead letters kept."""
        return int(self._retry.call("dlq count", lambda: self._client.hlen(self.keys.dead)))

    def list(self, offset: int = 0, limit: int = 100) -> list[DeadLetterRecord]:
        """Records, newest first, from ``offset``, at most ``limit``."""
        if offset < 0 or limit < 0:
            raise QueueError(f"offset and limit must be >= 0, got offset={offset} limit={limit}")
        if limit == 0:
            return []

        def read() -> list[bytes | None]:
            ids: list[bytes] = cast(
                "list[bytes]",
                self._client.zrevrange(self.keys.dead_index, offset, offset + limit - 1),
            )
            return (
                cast("list[bytes | None]", self._client.hmget(self.keys.dead, ids)) if ids else []
            )

        raws = self._retry.call("dlq list", read)
        # An id evicted between the two reads has no record: skip it.
        return [self._decode(raw) for raw in raws if raw is not None]

    def get(self, task_id: str) -> DeadLetterRecord | None:
        """The record of ``task_id``, or None."""
        raw = self._retry.call("dlq get", lambda: self._client.hget(self.keys.dead, task_id))
        return None if raw is None else self._decode(as_bytes(raw))

    def retry(self, task_id: str) -> bool:
        """Put ``task_id`` back on pending with its retry count reset; False if unknown.

        Raises QueueFullError (record kept) when the pending list is full.
        """
        for _ in range(self.settings.max_reconnect_attempts):
            reply = self._retry.call("dlq get", lambda: self._client.hget(self.keys.dead, task_id))
            if reply is None:
                return False
            seen = as_bytes(reply)
            task = self._replay(self._decode(seen))
            limit = self.settings.max_queue_length
            moved = self._retry.call(
                "dlq retry", partial(self._scripts.dlq_retry, task_id, seen, task, limit)
            )
            if moved < 0:
                raise QueueFullError(
                    f"queue {self.keys.queue} is full (MAX_QUEUE_LENGTH={limit}):"
                    f" dead letter {task_id} kept"
                )
            if moved:
                log.info(
                    "queue %s: dead letter %s put back on pending",
                    self.keys.queue,
                    task_id,
                    extra={"queue": self.keys.queue, "task_id": task_id},
                )
                return True
            # The record changed or went between read and write: read it again.
        raise QueueError(f"dead letter {task_id} kept changing; retry not done")

    def retry_all(self) -> int:
        """Retry every dead letter (oldest first) until done or the queue is full; how many."""
        ids = self._retry.call("dlq ids", lambda: self._client.zrange(self.keys.dead_index, 0, -1))
        moved = 0
        for raw_id in cast("list[bytes]", ids):
            if self.retry(raw_id.decode()):
                moved += 1
        return moved

    def delete(self, task_id: str) -> bool:
        """Delete the record of ``task_id``; whether it existed."""
        return self._retry.call("dlq delete", lambda: self._scripts.dlq_delete(task_id))

    def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        removed = self._retry.call(
            "dlq purge", lambda: self._scripts.purge(self.keys.dead, self.keys.dead_index)
        )
        log.warning(
            "queue %s: dead-letter queue purged, %d record(s) deleted",
            self.keys.queue,
            removed,
            extra={"queue": self.keys.queue},
        )
        return removed

    def _decode(self, raw: bytes) -> DeadLetterRecord:
        record = self._codec.decode_record(raw)
        if record.message is None and record.raw:
            # Poison records keep the task's exact bytes; show the task when it parses.
            try:
                message = self._codec.decode_message(split_redelivery(raw_bytes(record))[1])
            except InvalidTaskError:
                return record
            return attrs.evolve(record, message=self._codec.unstructure(message))
        return record

    def _replay(self, record: DeadLetterRecord) -> bytes:
        """The task to push again: retry and delivery counts reset, else the raw bytes."""
        if record.message is None:
            return raw_bytes(record)
        message = self._codec.message_from_dict(record.message)
        fresh = attrs.evolve(
            message,
            retry_count=0,
            delivery_count=0,
            last_error=f"{record.error_type}: {record.error}",
        )
        return self._codec.encode_message(fresh)
