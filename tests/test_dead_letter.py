"""DeadLetterQueue: inspect, replay and delete what failed, by task id, without races."""

from __future__ import annotations

import base64
import json

import pytest
from prometheus_client import CollectorRegistry

from semibot_queue import (
    DeadLetterQueue,
    PermanentTaskError,
    QueueError,
    QueueFullError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue.keys import KeySpace
from support import FAST, payload, running, wait_until

KEYS = KeySpace("q")


def refuse(message: TaskMessage) -> None:
    raise PermanentTaskError(f"cannot do {message.task_id}")


def dead_letters(url: str, count: int) -> list[str]:
    """Enqueue ``count`` tasks and let a worker dead-letter every one (oldest first)."""
    with TaskProducer(url, "q", FAST, registry=CollectorRegistry()) as producer:
        ids = producer.enqueue_many([payload(n) for n in range(count)])
    consumer = TaskConsumer(url, "q", refuse, 1, FAST, registry=CollectorRegistry())
    dlq = DeadLetterQueue(url, "q")
    with running(consumer):
        wait_until(lambda: dlq.count() == count, what=f"{count} dead letters")
    dlq.close()
    return ids


@pytest.fixture
def dlq(redis_url):
    queue = DeadLetterQueue(redis_url, "q", FAST)
    yield queue
    queue.close()


class TestInspecting:
    """count, list and get show every record with its payload and error."""

    def test_list_shows_newest_first_with_offset_and_limit(self, redis_url, dlq):
        ids = dead_letters(redis_url, 5)
        assert dlq.count() == 5
        newest_first = [r.task_id for r in dlq.list()]
        assert newest_first == list(reversed(ids))
        assert [r.task_id for r in dlq.list(offset=1, limit=2)] == newest_first[1:3]
        assert dlq.list(limit=0) == []
        assert dlq.list(offset=10) == []
        with pytest.raises(QueueError, match="offset and limit"):
            dlq.list(offset=-1)

    def test_get_returns_the_whole_record(self, redis_url, dlq):
        [task_id] = dead_letters(redis_url, 1)
        record = dlq.get(task_id)
        assert record is not None
        assert record.reason == "permanent"
        assert record.error == f"cannot do {task_id}"
        assert record.message is not None
        assert record.message["messages"] == [{"role": "user", "content": "question 0"}]
        assert record.attempts == 1
        assert record.delivery_count == 1
        assert record.worker_id
        assert record.failed_at >= record.enqueued_at
        assert dlq.get("unknown") is None

    def test_a_poison_record_shows_the_task_it_kept_raw(self, redis_url, redis_client, dlq):
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(1))
        stored = redis_client.rpop(KEYS.pending)
        redis_client.rpush(KEYS.inflight("dead-worker"), b"~2~" + stored)
        redis_client.zadd(KEYS.workers, {"dead-worker": 0})
        from semibot_queue.scripts import Scripts  # noqa: PLC0415

        Scripts(redis_client, KEYS).recover("dead-worker", 1000, 3, 10, 100)
        record = dlq.get(task_id)
        assert record is not None
        assert record.reason == "poison"
        assert record.message is not None
        assert record.message["task_id"] == task_id


class TestReplaying:
    """retry puts a task back through backpressure; a full queue keeps the record."""

    def test_retry_puts_the_task_back_with_counts_reset(self, redis_url, redis_client, dlq):
        [task_id] = dead_letters(redis_url, 1)
        assert dlq.retry(task_id) is True
        assert dlq.get(task_id) is None
        [stored] = redis_client.lrange(KEYS.pending, 0, -1)
        message = json.loads(stored)
        assert message["task_id"] == task_id
        assert (message["retry_count"], message["delivery_count"]) == (0, 0)
        assert message["last_error"].startswith("PermanentTaskError")
        assert dlq.retry(task_id) is False

    def test_retry_into_a_full_queue_keeps_the_record(self, redis_url, redis_client):
        [task_id] = dead_letters(redis_url, 1)
        small = QueueSettings(max_queue_length=1, queue_length_warning_threshold=1)
        dlq = DeadLetterQueue(redis_url, "q", small)
        redis_client.lpush(KEYS.pending, b"occupant")
        with pytest.raises(QueueFullError, match="kept"):
            dlq.retry(task_id)
        assert dlq.get(task_id) is not None
        dlq.close()

    def test_retry_of_a_raw_record_pushes_its_exact_bytes(self, redis_client, dlq):
        raw = b"\x00\xffnot json"
        record = {
            "task_id": "raw-1",
            "reason": "invalid",
            "error_type": "InvalidTaskError",
            "error": "payload is not UTF-8 text",
            "raw": base64.b64encode(raw).decode(),
            "raw_encoding": "base64",
        }
        redis_client.hset(KEYS.dead, "raw-1", json.dumps(record))
        redis_client.zadd(KEYS.dead_index, {"raw-1": 1})
        assert dlq.retry("raw-1") is True
        assert redis_client.lrange(KEYS.pending, 0, -1) == [raw]

    def test_retry_all_replays_every_record_oldest_first(self, redis_url, redis_client, dlq):
        ids = dead_letters(redis_url, 3)
        assert dlq.retry_all() == 3
        assert dlq.count() == 0
        taken = [json.loads(redis_client.rpop(KEYS.pending))["task_id"] for _ in ids]
        assert taken == ids


class TestDeleting:
    """delete and purge remove records and say what they removed."""

    def test_delete_removes_one_record(self, redis_url, dlq):
        first, second = dead_letters(redis_url, 2)
        assert dlq.delete(first) is True
        assert dlq.delete(first) is False
        assert [r.task_id for r in dlq.list()] == [second]

    def test_purge_removes_everything_and_counts_it(self, redis_url, redis_client, dlq):
        dead_letters(redis_url, 3)
        assert dlq.purge() == 3
        assert dlq.count() == 0
        assert not redis_client.exists(KEYS.dead_index)
        assert dlq.purge() == 0
