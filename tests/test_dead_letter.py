"""DeadLetterQueue: every dead letter a record of its own, found by record id or task id,
replayed and deleted without races, purged without leaving a key behind.

Records are made the way a worker makes them (dead_letter.lua through ``Scripts``), except in
the regression tests of issue 8, which run a real worker on a real redis-server.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
import redis
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
from semibot_queue.codec import Codec, task_id_of
from semibot_queue.errors import DuplicateTaskError
from semibot_queue.keys import KeySpace
from semibot_queue.models import DeadLetterRecord
from semibot_queue.scripts import Scripts
from support import FAST, payload, running, wait_until

KEYS = KeySpace("q")
CODEC = Codec(1_048_576)


def refuse(message: TaskMessage) -> None:
    raise PermanentTaskError(f"cannot do {message.task_id}")


def dead_letter(
    client: redis.Redis[bytes],
    body: bytes,
    *,
    reason: str = "permanent",
    error: str = "boom",
    keep_raw: bool = False,
) -> str:
    """Dead-letter ``body`` as a worker does (taken into flight, then dead_letter.lua).

    A body that parses is kept as its message unless ``keep_raw``; the new record id.
    """
    inflight = KEYS.inflight("w1")
    client.lpush(inflight, body)
    message = None
    if not keep_raw:
        message = CODEC.unstructure(CODEC.decode_message(body))
    record = DeadLetterRecord(
        task_id=task_id_of(body),
        reason=reason,
        error_type="PermanentTaskError",
        error=error,
        attempts=1,
        delivery_count=1,
        failed_at=time.time(),
        worker_id="w1",
        message=message,
    )
    scripts = Scripts(client, KEYS)
    try:
        record_id = scripts.dead_letter(
            inflight,
            body,
            record.task_id,
            CODEC.encode_record(record),
            body if keep_raw else None,
            None,
        )
    finally:
        scripts.close()
    assert record_id is not None
    return record_id


def task(task_id: str, n: int = 0) -> bytes:
    """The stored body of a valid task named ``task_id``."""
    return CODEC.encode_new(payload(n, task_id=task_id), time.time())


def dead_keys(client: redis.Redis[bytes]) -> list[bytes]:
    """Every key of the dead letters left in Redis."""
    return sorted(client.keys("{q}:dead*"))


@pytest.fixture
def dlq(redis_url: str) -> Iterator[DeadLetterQueue]:
    with DeadLetterQueue(redis_url, "q", FAST) as queue:
        yield queue


class TestRegressionsOfIssue8:
    """Two arrivals are two records, each keeping its own reason and raw bytes."""

    def run_worker_until(self, url: str, count: int) -> None:
        consumer = TaskConsumer(url, "q", refuse, 1, FAST, registry=CollectorRegistry())
        with running(consumer), DeadLetterQueue(url, "q", FAST) as dlq:
            wait_until(lambda: dlq.count() == count, what=f"{count} dead letters")

    # Was: identical garbage pushed twice was one dead-letter record (keyed by raw-<sha1>).
    def test_identical_garbage_pushed_twice_is_two_dead_letter_records(
        self, redis_url: str, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        garbage = b"\xff\x00 not a task"
        redis_client.lpush(KEYS.pending, garbage, garbage)
        self.run_worker_until(redis_url, 2)
        records = dlq.list()
        assert len({r.id for r in records}) == 2
        named = task_id_of(garbage)
        assert {r.id for r in records} == {f"{named}#1", f"{named}#2"}
        for record in records:
            assert (record.task_id, record.reason) == (named, "invalid")
            assert record.raw_encoding == "base64"
            assert base64.b64decode(record.raw or "") == garbage
            assert record.error

    # Was: a malformed message carrying a real task's id replaced that task's record.
    def test_a_malformed_message_carrying_a_real_tasks_id_keeps_that_tasks_record(
        self, redis_url: str, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(1))
        self.run_worker_until(redis_url, 1)
        malformed = json.dumps({"task_id": task_id, "messages": "not a list"}).encode()
        redis_client.lpush(KEYS.pending, malformed)
        self.run_worker_until(redis_url, 2)
        real, bad = sorted(dlq.list(), key=lambda r: r.failed_at)
        assert (real.task_id, bad.task_id) == (task_id, task_id)
        assert real.id != bad.id
        assert (real.reason, real.error) == ("permanent", f"cannot do {task_id}")
        assert real.message is not None
        assert real.message["messages"] == [{"role": "user", "content": "question 1"}]
        assert bad.reason == "invalid"
        assert bad.message is None
        assert (bad.raw, bad.raw_encoding) == (malformed.decode(), "utf-8")
        assert dlq.get(real.id or "") == real


class TestInspecting:
    """count, list and get show every record with its id, payload or raw bytes, and error."""

    def test_list_shows_newest_first_with_record_ids_offset_and_limit(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        ids = [dead_letter(redis_client, task(f"t{n}", n)) for n in range(5)]
        assert ids == [f"t{n}#{n + 1}" for n in range(5)]
        assert dlq.count() == 5
        newest_first = [r.id for r in dlq.list()]
        assert newest_first == list(reversed(ids))
        assert [r.id for r in dlq.list(offset=1, limit=2)] == newest_first[1:3]
        assert dlq.list(limit=0) == []
        assert dlq.list(offset=10) == []
        with pytest.raises(QueueError, match="offset and limit"):
            dlq.list(offset=-1)

    def test_the_json_of_a_listed_record_carries_its_id(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        dead_letter(redis_client, task("t1"))
        [shown] = [CODEC.unstructure(r) for r in dlq.list()]
        assert (shown["id"], shown["task_id"]) == ("t1#1", "t1")
        assert json.loads(json.dumps(shown)) == shown

    def test_get_returns_the_whole_record(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        record_id = dead_letter(redis_client, task("t1", 3), error="cannot do t1")
        record = dlq.get(record_id)
        assert record is not None
        assert (record.id, record.task_id, record.reason) == ("t1#1", "t1", "permanent")
        assert record.error == "cannot do t1"
        assert record.message is not None
        assert record.message["messages"] == [{"role": "user", "content": "question 3"}]
        assert (record.attempts, record.delivery_count, record.worker_id) == (1, 1, "w1")
        assert (record.raw, record.raw_encoding) == (None, None)
        assert dlq.get("unknown") is None
        assert dlq.get("t1#2") is None

    def test_a_task_id_names_its_newest_record_and_a_record_id_names_itself(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        first = dead_letter(redis_client, task("t1"), error="first")
        dead_letter(redis_client, task("t2"))
        second = dead_letter(redis_client, task("t1"), error="second")
        assert (first, second) == ("t1#1", "t1#3")
        newest = dlq.get("t1")
        assert newest is not None
        assert (newest.id, newest.error) == (second, "second")
        oldest = dlq.get(first)
        assert oldest is not None
        assert (oldest.id, oldest.error) == (first, "first")

    def test_the_newest_record_is_the_highest_number_not_the_last_in_text_order(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        redis_client.set(KEYS.dead_seq, 8)
        assert dead_letter(redis_client, task("t1"), error="ninth") == "t1#9"
        assert dead_letter(redis_client, task("t1"), error="tenth") == "t1#10"
        newest = dlq.get("t1")
        assert newest is not None
        assert newest.error == "tenth"

    def test_a_task_id_that_prefixes_another_does_not_find_the_others_records(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        dead_letter(redis_client, task("t1-long"))
        assert dlq.get("t1") is None
        assert dlq.get("t1-lon") is None

    @pytest.mark.parametrize(
        ("raw", "shown", "encoding"),
        [
            (b"not json at all", "not json at all", "utf-8"),
            (b"\x00\xff\xfe", base64.b64encode(b"\x00\xff\xfe").decode(), "base64"),
            (b"", "", "utf-8"),
        ],
        ids=["utf-8", "binary", "empty"],
    )
    def test_raw_bytes_are_shown_as_utf8_text_or_base64(
        self,
        redis_client: redis.Redis[bytes],
        dlq: DeadLetterQueue,
        raw: bytes,
        shown: str,
        encoding: str,
    ) -> None:
        record_id = dead_letter(redis_client, raw, reason="invalid", keep_raw=True)
        record = dlq.get(record_id)
        assert record is not None
        assert (record.raw, record.raw_encoding, record.message) == (shown, encoding, None)
        assert [r.raw for r in dlq.list()] == [shown]

    def test_a_poison_record_shows_the_task_it_kept_raw(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        body = task("t1", 7)
        record_id = dead_letter(redis_client, body, reason="poison", keep_raw=True)
        record = dlq.get("t1")
        assert record is not None
        assert (record.id, record.reason, record.raw) == (record_id, "poison", body.decode())
        assert record.message is not None
        assert record.message["task_id"] == "t1"
        assert record.message["messages"] == [{"role": "user", "content": "question 7"}]

    def test_a_record_kept_before_records_had_ids_is_still_read(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        legacy = {
            "task_id": "old",
            "reason": "invalid",
            "error_type": "InvalidTaskError",
            "error": "payload is not UTF-8 text",
            "raw": base64.b64encode(b"\xff old").decode(),
            "raw_encoding": "base64",
        }
        redis_client.hset(KEYS.dead, "old", json.dumps(legacy))
        redis_client.zadd(KEYS.dead_index, {"old": 1})
        record = dlq.get("old")
        assert record is not None
        assert (record.id, record.raw, record.raw_encoding) == ("old", legacy["raw"], "base64")
        assert [r.id for r in dlq.list()] == ["old"]
        assert dlq.retry("old") is True
        assert redis_client.lrange(KEYS.pending, 0, -1) == [b"\xff old"]
        assert dead_keys(redis_client) == []


class TestReplaying:
    """retry puts one record's task back through backpressure, marked as enqueue marks it."""

    def test_retry_puts_the_task_back_as_plain_json_with_counts_reset_and_marks_it(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        record_id = dead_letter(redis_client, task("t1"), error="cannot do t1")
        assert dlq.retry(record_id) is True
        assert dlq.get(record_id) is None
        [stored] = redis_client.lrange(KEYS.pending, 0, -1)
        message = json.loads(stored)
        assert message["task_id"] == "t1"
        assert (message["retry_count"], message["delivery_count"]) == (0, 0)
        assert message["last_error"] == "PermanentTaskError: cannot do t1"
        assert 0 < redis_client.ttl(KEYS.accepted("t1")) <= FAST.idempotency_ttl
        assert dead_keys(redis_client) == []
        assert dlq.retry(record_id) is False

    def test_retry_by_task_id_takes_its_newest_record_only(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        first = dead_letter(redis_client, task("t1"), error="first")
        dead_letter(redis_client, task("t1"), error="second")
        assert dlq.retry("t1") is True
        assert [r.id for r in dlq.list()] == [first]
        [stored] = redis_client.lrange(KEYS.pending, 0, -1)
        assert json.loads(stored)["last_error"] == "PermanentTaskError: second"

    def test_retry_by_record_id_takes_that_record_only(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        first = dead_letter(redis_client, task("t1"), error="first")
        second = dead_letter(redis_client, task("t1"), error="second")
        assert dlq.retry(first) is True
        assert [r.id for r in dlq.list()] == [second]
        [stored] = redis_client.lrange(KEYS.pending, 0, -1)
        assert json.loads(stored)["last_error"] == "PermanentTaskError: first"

    def test_retry_into_a_full_queue_keeps_the_record(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        record_id = dead_letter(redis_client, task("t1"))
        small = QueueSettings(max_queue_length=1, queue_length_warning_threshold=1)
        redis_client.lpush(KEYS.pending, b"occupant")
        with (
            DeadLetterQueue(redis_url, "q", small) as dlq,
            pytest.raises(QueueFullError, match="kept"),
        ):
            dlq.retry(record_id)
        assert redis_client.hexists(KEYS.dead, record_id)
        assert redis_client.exists(KEYS.accepted("t1")) == 0

    def test_retry_of_a_task_enqueued_again_meanwhile_is_refused_and_the_record_kept(
        self, redis_url: str, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        record_id = dead_letter(redis_client, task("t1"))
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue(payload(1, task_id="t1"))
        with pytest.raises(DuplicateTaskError, match="t1#1 kept"):
            dlq.retry("t1")
        assert redis_client.hexists(KEYS.dead, record_id)
        assert redis_client.llen(KEYS.pending) == 1

    def test_retry_of_raw_bytes_pushes_them_exactly_and_marks_nothing(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        raw = b"\x00\xffnot json"
        record_id = dead_letter(redis_client, raw, reason="invalid", keep_raw=True)
        assert dlq.retry(record_id) is True
        assert redis_client.keys("*") == [KEYS.pending.encode()]
        assert redis_client.lrange(KEYS.pending, 0, -1) == [raw]

    def test_retry_of_a_poison_task_kept_raw_pushes_it_as_plain_json_and_marks_it(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        dead_letter(redis_client, task("t1", 4), reason="poison", keep_raw=True)
        assert dlq.retry("t1") is True
        [stored] = redis_client.lrange(KEYS.pending, 0, -1)
        message = json.loads(stored)
        assert (message["task_id"], message["delivery_count"]) == ("t1", 0)
        assert message["messages"] == [{"role": "user", "content": "question 4"}]
        assert redis_client.exists(KEYS.accepted("t1")) == 1
        assert dead_keys(redis_client) == []

    def test_retry_all_replays_every_record_oldest_first(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        ids = [f"t{n}" for n in range(3)]
        for task_id in ids:
            dead_letter(redis_client, task(task_id))
        assert dlq.retry_all() == 3
        assert dlq.count() == 0
        taken = [json.loads(redis_client.rpop(KEYS.pending) or b"")["task_id"] for _ in ids]
        assert taken == ids

    def test_retry_all_leaves_a_record_whose_task_is_live_again_and_goes_on(
        self, redis_url: str, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        live = dead_letter(redis_client, task("t1"))
        dead_letter(redis_client, task("t2"))
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue(payload(1, task_id="t1"))
        assert dlq.retry_all() == 1
        assert [r.id for r in dlq.list()] == [live]

    # Was a package bug (issue 9): retry_all() raised QueueFullError halfway, and how many
    # it had moved was lost.
    def test_retry_all_into_a_queue_with_room_for_some_moves_those_and_says_it_stopped(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        records = [dead_letter(redis_client, task(f"t{n}")) for n in range(5)]
        small = QueueSettings(max_queue_length=3, queue_length_warning_threshold=3)
        redis_client.lpush(KEYS.pending, b"occupant")
        with DeadLetterQueue(redis_url, "q", small) as dlq:
            moved = dlq.retry_all()
            left = [r.id for r in dlq.list()]
        assert moved == 2
        assert f"{moved}" == "2"  # what the command line prints
        assert moved.stopped_early is True
        assert moved.remaining == 3
        assert sorted(left) == sorted(records[2:])
        assert redis_client.llen(KEYS.pending) == 3

    def test_retry_all_that_moved_everything_did_not_stop_early(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        dead_letter(redis_client, task("t1"))
        moved = dlq.retry_all()
        assert (moved, moved.stopped_early, moved.remaining) == (1, False, 0)
        assert isinstance(moved, int)
        assert dlq.retry_all() == 0

    def test_retry_all_counts_scheduled_tasks_against_the_limit_as_enqueue_does(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        dead_letter(redis_client, task("t1"))
        small = QueueSettings(max_queue_length=1, queue_length_warning_threshold=1)
        redis_client.zadd(KEYS.scheduled, {b"a delayed task": 1})
        with DeadLetterQueue(redis_url, "q", small) as dlq:
            moved = dlq.retry_all()
        assert (moved, moved.stopped_early) == (0, True)

    def test_a_retried_task_is_pending_again_and_its_old_result_is_gone(
        self, redis_url: str, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        dead_letter(redis_client, task("t1", 2))
        redis_client.set(KEYS.result("t1"), b'{"task_id": "t1", "status": "failed"}')
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            assert producer.status("t1") == "dead"
            assert dlq.retry("t1") is True
            assert producer.status("t1") == "pending"
            assert producer.get_result("t1") is None
        assert redis_client.hget(KEYS.state, "t1") == b"pending session-2"


class TestDeleting:
    """delete removes one record; purge removes every structure, in batches."""

    def test_delete_by_task_id_removes_its_newest_record_only(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        first = dead_letter(redis_client, task("t1"))
        dead_letter(redis_client, task("t1"))
        assert dlq.delete("t1") is True
        assert [r.id for r in dlq.list()] == [first]
        assert dlq.delete("t1") is True
        assert dlq.delete("t1") is False
        assert dead_keys(redis_client) == []

    def test_delete_by_record_id_removes_that_record_and_its_raw_bytes(
        self, redis_client: redis.Redis[bytes], dlq: DeadLetterQueue
    ) -> None:
        first = dead_letter(redis_client, b"garbage", reason="invalid", keep_raw=True)
        second = dead_letter(redis_client, b"garbage", reason="invalid", keep_raw=True)
        assert dlq.delete(first) is True
        assert dlq.delete(first) is False
        assert [r.id for r in dlq.list()] == [second]
        assert redis_client.hkeys(KEYS.dead_raw) == [second.encode()]

    def test_purge_removes_everything_in_batches_and_counts_it(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        for n in range(7):
            dead_letter(redis_client, task(f"t{n}"), keep_raw=n % 2 == 1)
        redis_client.lpush(KEYS.pending, task("waiting"))
        small_batches = QueueSettings(maintenance_batch=2)
        with DeadLetterQueue(redis_url, "q", small_batches) as dlq:
            assert dlq.purge() == 7
            assert dlq.count() == 0
            assert dlq.purge() == 0
        assert dead_keys(redis_client) == []
        assert redis_client.llen(KEYS.pending) == 1


class TestLifecycle:
    """A DeadLetterQueue is a context manager that gives its connections back."""

    def test_leaving_the_block_closes_the_connections_it_opened(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        def client_ids() -> set[int]:
            return {int(client["id"]) for client in redis_client.client_list()}

        before = client_ids()
        with DeadLetterQueue(redis_url, "q", FAST) as dlq:
            dead_letter(redis_client, task("t1"))
            assert dlq.delete("t1") is True
            opened = client_ids() - before
            assert opened
        wait_until(lambda: not opened & client_ids(), what="the connections to close")

    def test_a_given_client_is_left_open(self, redis_client: redis.Redis[bytes]) -> None:
        with DeadLetterQueue(queue_name="q", settings=FAST, client=redis_client) as dlq:
            assert dlq.count() == 0
        assert redis_client.ping() is True
