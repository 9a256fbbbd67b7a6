"""TaskProducer against a real redis-server: enqueue, backpressure, results, inspection."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from fault_proxy import LossyProxy
from redis_server import RedisServer, free_port
from semibot_queue import (
    InvalidTaskError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
    TaskResult,
)
from semibot_queue.admission import LengthWatch
from semibot_queue.codec import Codec, task_id_of
from semibot_queue.constants import IDEMPOTENCY_TTL, RESULT_TTL
from semibot_queue.errors import DuplicateTaskError
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from support import FAST, payload, running, wait_until

KEYS = KeySpace("q")


def pending_ids(client: redis.Redis[bytes]) -> list[str]:
    """Task ids on the pending list, oldest first."""
    return [task_id_of(raw) for raw in reversed(client.lrange(KEYS.pending, 0, -1))]


def markers(client: redis.Redis[bytes]) -> set[bytes]:
    return set(client.keys(KEYS.accepted_prefix + "*"))


def producer_for(url: str, **settings: object) -> TaskProducer:
    return TaskProducer(
        url, "q", QueueSettings(**settings) if settings else FAST, registry=CollectorRegistry()
    )


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"x": value}
    return value


def publish_result(client: redis.Redis[bytes], task_id: str, session_id: str) -> TaskResult:
    """Record a result the way a worker's ack does: in flight -> stored and published."""
    keys = KeySpace("q")
    scripts = Scripts(client, keys)
    client.lpush(keys.inflight("w"), b"task")
    result = TaskResult(task_id=task_id, session_id=session_id, status="succeeded", result=[1])
    encoded = Codec(1 << 20).encode_result(result)
    channel = keys.result_channel(session_id)
    assert scripts.ack(keys.inflight("w"), 60, [(b"task", task_id, encoded, channel)]) == ([1], [])
    return result


class TestEnqueue:
    """enqueue and enqueue_many write exactly what was accepted, in order."""

    def test_enqueue_stores_the_task_with_its_enqueue_time(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            before = time.time()
            task_id = producer.enqueue(payload(7, config={"model": "m"}))
        stored = redis_client.lrange(KeySpace("q").pending, 0, -1)
        assert len(stored) == 1
        data = json.loads(stored[0])
        assert data["task_id"] == task_id
        assert data["config"] == {"model": "m"}
        assert data["retry_count"] == 0
        assert data["delivery_count"] == 0
        assert before <= data["enqueued_at"] <= time.time()

    def test_a_task_is_stored_as_plain_json_under_the_queue_name(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
        [stored] = redis_client.lrange("q", 0, -1)
        assert stored.startswith(b'{"task_id":"' + task_id.encode() + b'",')

    def test_enqueue_many_keeps_fifo_order(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            ids = producer.enqueue_many([payload(n) for n in range(5)])
            assert producer.get_queue_length() == 5
        taken = [json.loads(redis_client.rpop(KeySpace("q").pending))["task_id"] for _ in range(5)]
        assert taken == ids

    def test_enqueue_many_of_nothing_writes_nothing(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            assert producer.enqueue_many([]) == []
        assert redis_client.keys("*") == []

    def test_a_batch_that_does_not_fit_is_refused_whole(self, redis_url):
        with producer_for(redis_url, max_queue_length=5, queue_length_warning_threshold=4) as p:
            p.enqueue_many([payload(n) for n in range(3)])
            with pytest.raises(QueueFullError, match="3 task"):
                p.enqueue_many([payload(n) for n in range(3)])
            assert p.get_queue_length() == 3
            p.enqueue_many([payload(n) for n in range(2)])
            assert p.get_queue_length() == 5

    def test_racing_producers_never_exceed_the_limit(self, redis_url, redis_client):
        limit = 500
        accepted: list[str] = []
        refused = []
        lock = threading.Lock()
        start = threading.Barrier(20)

        def push(producer: TaskProducer) -> None:
            start.wait()
            for n in range(40):
                try:
                    task_id = producer.enqueue(payload(n))
                except QueueFullError:
                    with lock:
                        refused.append(n)
                else:
                    with lock:
                        accepted.append(task_id)

        settings = {"max_queue_length": limit, "queue_length_warning_threshold": limit}
        with producer_for(redis_url, **settings) as producer:
            threads = [threading.Thread(target=push, args=(producer,)) for _ in range(20)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert len(accepted) == limit
        assert len(refused) == 20 * 40 - limit
        found = markers(redis_client)
        assert set(redis_client.keys("*")) - found == {b"q", KEYS.state.encode()}
        assert found == {KEYS.accepted(task_id).encode() for task_id in accepted}
        assert set(pending_ids(redis_client)) == set(accepted)
        assert {k.decode() for k in redis_client.hkeys(KEYS.state)} == set(accepted)


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[LossyProxy]:
    """A proxy in front of the emptied shared server that can lose one reply."""
    lossy = LossyProxy(redis_server.port)
    lossy.start()
    try:
        yield lossy
    finally:
        lossy.close()


def finish(client: redis.Redis[bytes], task_id: str) -> None:
    """Take ``task_id``'s task and record its result as a worker's ack does (a final outcome)."""
    stored = client.lmove(KEYS.pending, KEYS.inflight("w"), "RIGHT", "LEFT")
    assert stored is not None
    assert task_id_of(stored) == task_id
    result = TaskResult(task_id=task_id, session_id="session-1", status="succeeded")
    encoded = Codec(1 << 20).encode_result(result)
    scripts = Scripts(client, KEYS)
    try:
        flags, _ = scripts.ack(KEYS.inflight("w"), 60, [(stored, task_id, encoded, "c")])
    finally:
        scripts.close()
    assert flags == [1]


class TestIdempotency:
    """A task id is live from its enqueue until its final outcome, clear_queue or
    IDEMPOTENCY_TTL: a user's second enqueue of it raises, the library's own repeat does not."""

    # Was a package bug (issue 8): a second enqueue of an id returned the id as if it had
    # been written, and wrote nothing.
    def test_a_second_enqueue_of_a_live_id_raises_duplicate_and_writes_nothing(
        self, redis_url, redis_client
    ):
        task = payload(1, config={"first": True})
        with producer_for(redis_url) as producer:
            assert producer.enqueue(task) == task.task_id
            before = redis_client.lrange(KEYS.pending, 0, -1)
            again = payload(1, task_id=task.task_id, config={"second": True})
            with pytest.raises(DuplicateTaskError, match=rf"task id {task.task_id} still live"):
                producer.enqueue(again)
        assert redis_client.lrange(KEYS.pending, 0, -1) == before

    def test_a_batch_holding_one_live_id_is_refused_whole(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            live = producer.enqueue(payload(1))
            batch = [payload(2), payload(3, task_id=live), payload(4)]
            with pytest.raises(DuplicateTaskError, match=rf"{live} still live.* 3 task\(s\)"):
                producer.enqueue_many(batch)
        assert pending_ids(redis_client) == [live]
        assert markers(redis_client) == {KEYS.accepted(live).encode()}

    # Was a package bug (issue 8): enqueue_many([t, t]) pushed two copies.
    def test_a_task_id_twice_in_one_enqueue_many_is_refused_and_nothing_written(
        self, redis_url, redis_client
    ):
        first, other = payload(1), payload(2)
        with (
            producer_for(redis_url) as producer,
            pytest.raises(InvalidTaskError, match=rf"{first.task_id} at positions 0, 2"),
        ):
            producer.enqueue_many([first, other, first])
        assert redis_client.keys("*") == []

    # Was a package bug (issue 8): an id enqueued in the last hour was silently dropped by
    # enqueue even after clear_queue had deleted its task.
    def test_an_id_cleared_from_the_queue_can_be_enqueued_again(self, redis_url, redis_client):
        task = payload(1)
        with producer_for(redis_url) as producer:
            producer.enqueue(task)
            assert producer.clear_queue() == 1
            assert markers(redis_client) == set()
            assert producer.enqueue(task) == task.task_id
        assert pending_ids(redis_client) == [task.task_id]

    def test_an_id_whose_task_finished_can_be_enqueued_again(self, redis_url, redis_client):
        task = payload(1)
        with producer_for(redis_url) as producer:
            producer.enqueue(task)
            finish(redis_client, task.task_id)
            assert producer.enqueue(task) == task.task_id
        assert pending_ids(redis_client) == [task.task_id]

    # Was a package bug (issue 8): the marker lived RESULT_TTL (an hour).
    @pytest.mark.parametrize("ttl", [None, 30])
    def test_the_marker_lives_idempotency_ttl(self, redis_url, redis_client, ttl):
        settings = {} if ttl is None else {"idempotency_ttl": ttl}
        expected = IDEMPOTENCY_TTL if ttl is None else ttl
        with producer_for(redis_url, **settings) as producer:
            task_id = producer.enqueue(payload(1))
        left = redis_client.ttl(KEYS.accepted(task_id))
        assert expected - 5 < left <= expected
        assert IDEMPOTENCY_TTL < RESULT_TTL

    # Issue 8: the library's own resend after a lost reply must stay idempotent: the
    # same call repeated finds its own token on the marker, so no DuplicateTaskError.
    @pytest.mark.parametrize("size", [1, 3])
    def test_an_enqueue_whose_reply_is_lost_is_repeated_and_written_once(
        self, redis_client, proxy, size
    ):
        settings = QueueSettings(error_retry_delay=0.05, max_reconnect_delay=0.1)
        with TaskProducer(proxy.url, "q", settings, registry=CollectorRegistry()) as producer:
            producer.enqueue(payload(0))  # Redis now knows the script: one EVALSHA per call
            proxy.lose_reply_to(b"EVALSHA")
            batch = [payload(n) for n in range(1, size + 1)]
            ids = producer.enqueue_many(batch)
        assert proxy.reply_lost.is_set()
        assert ids == [p.task_id for p in batch]
        assert pending_ids(redis_client)[1:] == ids


class TestWaitersIgnoreForeignMessages:
    """A result channel may carry other publishers' messages (the runtime's own workers)."""

    def test_a_message_that_is_not_a_result_is_skipped(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            channel = KEYS.result_channel("session-1").encode()

            def publish_later() -> None:
                wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] > 0, what="waiter")
                redis_client.publish(channel, b'{"task_id": "x", "status": "completed"}')
                redis_client.publish(channel, b"not json")
                publish_result(redis_client, task_id, "session-1")

            thread = threading.Thread(target=publish_later)
            thread.start()
            result = producer.wait_for_result(task_id, timeout=5)
            thread.join()
        assert result is not None
        assert result.task_id == task_id


class TestInvalidInput:
    """A bad payload raises InvalidTaskError naming what is wrong, and writes nothing."""

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ({"session_id": "s"}, "expected a TaskPayload"),
            (payload(config={"when": object()}), r"config\.when: not JSON-serialisable"),
            (payload(metadata={"blob": b"bytes"}), r"metadata\.blob: not JSON-serialisable"),
            (payload(config={"text": "x" * 5000}), "exceeds MAX_PAYLOAD_BYTES"),
            (payload(config={"deep": nested(100)}), "nested deeper than MAX_JSON_DEPTH"),
            (payload(config={"deep": nested(50_000)}), "nested deeper than MAX_JSON_DEPTH"),
        ],
        ids=["not-a-payload", "object", "bytes", "too-large", "too-deep", "far-too-deep"],
    )
    def test_bad_payloads_are_refused(self, redis_url, redis_client, bad, message):
        with (
            producer_for(redis_url, max_payload_bytes=4096) as producer,
            pytest.raises(InvalidTaskError, match=message),
        ):
            producer.enqueue_many([payload(1), bad])
        assert redis_client.keys("*") == []

    # Was a package bug (issue 8): a payload changed after it was built was encoded
    # unchecked; the worker then dead-lettered it as invalid instead of enqueue refusing it.
    @pytest.mark.parametrize(
        ("change", "says"),
        [
            (lambda p: p.messages.append({"role": "user"}), r"messages\[1\]: must be a mapping"),
            (lambda p: p.config.update(t=math.inf), r"config\.t: not JSON-serialisable"),
            (lambda p: p.metadata.update({7: "x"}), "a key of type int is not a string"),
        ],
        ids=["message", "infinity", "int-key"],
    )
    def test_a_payload_changed_after_it_was_built_is_refused_and_nothing_written(
        self, redis_url, redis_client, change, says
    ):
        changed = payload(2)
        change(changed)
        with producer_for(redis_url) as producer, pytest.raises(InvalidTaskError, match=says):
            producer.enqueue_many([payload(1), changed])
        assert redis_client.keys("*") == []

    def test_a_task_id_unfit_for_a_key_is_refused_when_built(self):
        with pytest.raises(InvalidTaskError, match="task_id: must be"):
            payload(task_id="has {space}")


class TestResults:
    """wait_for_result never misses a result, and gives up at its timeout."""

    def test_a_result_published_before_the_wait_is_returned(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            expected = publish_result(redis_client, task_id, "session-1")
            assert producer.wait_for_result(task_id, timeout=1) == expected

    def test_a_result_published_during_the_wait_is_returned(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(2))
            other = producer.enqueue(payload(3))
            channel = KeySpace("q").result_channel("session-2").encode()

            def publish_later() -> None:
                wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] > 0, what="waiter")
                publish_result(redis_client, other, "session-0")
                publish_result(redis_client, task_id, "session-2")

            thread = threading.Thread(target=publish_later)
            thread.start()
            result = producer.wait_for_result(task_id, timeout=5)
            thread.join()
        assert result is not None
        assert result.task_id == task_id

    def test_a_task_of_another_producer_is_awaited_on_every_session(self, redis_url, redis_client):
        with producer_for(redis_url) as first, producer_for(redis_url) as second:
            task_id = first.enqueue(payload(4))

            def publish_later() -> None:
                wait_until(lambda: redis_client.pubsub_numpat() > 0, what="pattern waiter")
                publish_result(redis_client, task_id, "session-1")

            thread = threading.Thread(target=publish_later)
            thread.start()
            result = second.wait_for_result(task_id, timeout=5)
            thread.join()
        assert result is not None
        assert result.session_id == "session-1"

    def test_a_waiter_whose_subscription_drops_subscribes_again_and_gets_its_result(
        self, redis_url, redis_client
    ):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            channel = KEYS.result_channel("session-1").encode()

            def cut_then_publish() -> None:
                wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] > 0, what="waiter")
                assert redis_client.client_kill_filter(_type="pubsub") >= 1
                wait_until(lambda: redis_client.pubsub_numsub(channel)[0][1] > 0, what="again")
                publish_result(redis_client, task_id, "session-1")

            thread = threading.Thread(target=cut_then_publish)
            thread.start()
            result = producer.wait_for_result(task_id, timeout=10)
            thread.join()
        assert result is not None
        assert result.task_id == task_id

    def test_a_missing_result_returns_none_at_the_timeout(self, redis_url):
        with producer_for(redis_url) as producer:
            started = time.monotonic()
            assert producer.wait_for_result("never-enqueued", timeout=0.3) is None
            elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 2.0


class TestInspection:
    """Queue length and clearing, and the connection's life cycle."""

    def test_clear_queue_deletes_pending_tasks_only(self, redis_url, redis_client):
        redis_client.zadd(KEYS.scheduled, {b"retry": 1})
        with producer_for(redis_url) as producer:
            producer.enqueue_many([payload(n) for n in range(4)])
            assert producer.clear_queue() == 4
            assert producer.get_queue_length() == 0
            assert producer.clear_queue() == 0
        assert redis_client.keys("*") == [KEYS.scheduled.encode()]

    def test_clear_queue_works_through_many_batches(self, redis_url, redis_client):
        with producer_for(redis_url, maintenance_batch=3) as producer:
            producer.enqueue_many([payload(n) for n in range(10)])
            redis_client.lpush(KEYS.pending, b"garbage the runtime pushed")
            assert producer.clear_queue() == 11
        assert redis_client.keys("*") == []

    # Was a package bug (issue 8): queue_name="" silently meant the default queue.
    def test_an_empty_queue_name_is_refused(self):
        with pytest.raises(InvalidTaskError, match=r"^queue name '' is not allowed"):
            TaskProducer("redis://127.0.0.1:1/0", "", registry=CollectorRegistry())

    def test_a_producer_used_before_connect_says_so(self, redis_url):
        producer = producer_for(redis_url)
        with pytest.raises(QueueError, match="not connected"):
            producer.enqueue(payload())
        producer.connect()
        producer.connect()  # connecting twice is harmless
        assert producer.get_queue_length() == 0
        producer.disconnect()
        with pytest.raises(QueueError, match="not connected"):
            producer.get_queue_length()
        assert "q" in repr(producer)

    def test_an_unreachable_redis_raises_with_the_password_masked(self):
        url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
        producer = TaskProducer(
            url,
            "q",
            QueueSettings(max_reconnect_attempts=3, error_retry_delay=0.01),
            registry=CollectorRegistry(),
        )
        with pytest.raises(QueueConnectionError) as caught:
            producer.connect()
        assert "***" in str(caught.value)
        assert "secret" not in str(caught.value)
        assert "3 attempts" in str(caught.value)

    def test_a_given_client_is_used_and_left_open(self, fake_redis):
        task = payload()
        with TaskProducer(queue_name="q", client=fake_redis, registry=CollectorRegistry()) as p:
            p.enqueue(task)
            with pytest.raises(DuplicateTaskError):
                p.enqueue(task)
            p.clear_queue()
            p.enqueue(task)
        assert fake_redis.llen(KEYS.pending) == 1

    def test_the_default_url_comes_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/5")
        assert TaskProducer(registry=CollectorRegistry()).redis_url == "redis://127.0.0.1:1/5"
        monkeypatch.delenv("REDIS_URL")
        assert TaskProducer(registry=CollectorRegistry()).redis_url.startswith("redis://localhost")


def task_starts(url: str, started: dict[str, float], ready: threading.Event) -> TaskConsumer:
    """A worker whose handler notes when (wall clock) each task started."""

    def note(message: TaskMessage) -> str:
        started[message.task_id] = time.time()
        return "ok"

    consumer = TaskConsumer(url, "q", note, 4, FAST, registry=CollectorRegistry())
    original = consumer.connect

    def connect() -> None:
        original()
        ready.set()

    consumer.connect = connect  # type: ignore[method-assign]
    return consumer


class TestDelay:
    """enqueue(..., delay=S): scheduled by Redis's clock, promoted when due, counted against
    MAX_QUEUE_LENGTH with the pending tasks."""

    def test_a_delayed_task_waits_in_the_scheduled_set_due_by_redis_time(
        self, redis_url, redis_client
    ):
        with producer_for(redis_url) as producer:
            before = redis_client.time()
            task_id = producer.enqueue(payload(1), delay=30)
            after = redis_client.time()
        assert redis_client.llen(KEYS.pending) == 0
        [(body, due)] = redis_client.zrange(KEYS.scheduled, 0, -1, withscores=True)
        assert task_id_of(body) == task_id
        ms = [seconds * 1000 + micros // 1000 for seconds, micros in (before, after)]
        assert ms[0] + 30_000 <= due <= ms[1] + 30_000
        assert redis_client.hget(KEYS.state, task_id) == b"scheduled session-1"
        assert redis_client.exists(KEYS.accepted(task_id)) == 1

    def test_a_delayed_task_runs_within_half_a_second_of_due_and_not_before(
        self, redis_url, redis_client
    ):
        started: dict[str, float] = {}
        ready = threading.Event()
        with running(task_starts(redis_url, started, ready)), producer_for(redis_url) as producer:
            assert ready.wait(10)
            wait_until(lambda: redis_client.zcard(KEYS.workers) == 1, what="the worker")
            sent = time.time()
            task_id = producer.enqueue(payload(1), delay=1.0)
            returned = time.time()
            wait_until(lambda: task_id in started, timeout=10, what="the delayed task")
        assert started[task_id] >= sent + 1.0
        assert started[task_id] <= returned + 1.0 + 0.5

    def test_enqueue_many_with_a_delay_schedules_every_task(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            ids = producer.enqueue_many([payload(n) for n in range(3)], delay=5)
            assert [producer.status(task_id) for task_id in ids] == ["scheduled"] * 3
        assert redis_client.zcard(KEYS.scheduled) == 3
        assert redis_client.llen(KEYS.pending) == 0

    def test_a_delay_of_zero_makes_the_task_pending_at_once(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1), delay=0)
            assert producer.status(task_id) == "pending"
        assert pending_ids(redis_client) == [task_id]

    @pytest.mark.parametrize(
        "delay",
        [-1, -0.001, math.nan, math.inf, "1", True, None.__class__, 10**400, 1e308],
        ids=["negative", "tiny-negative", "nan", "inf", "text", "bool", "type", "huge", "1e308"],
    )
    def test_a_delay_that_is_not_a_finite_number_of_seconds_is_refused(
        self, redis_url, redis_client, delay
    ):
        with producer_for(redis_url) as producer:
            with pytest.raises(InvalidTaskError, match=r"^delay: must be a finite number"):
                producer.enqueue(payload(1), delay=delay)
            with pytest.raises(InvalidTaskError, match=r"^delay: must be a finite number"):
                producer.enqueue_many([payload(2)], delay=delay)
        assert redis_client.keys("*") == []

    def test_delayed_tasks_count_against_the_limit_with_pending_ones(self, redis_url, redis_client):
        settings = {"max_queue_length": 3, "queue_length_warning_threshold": 3}
        with producer_for(redis_url, **settings) as producer:
            producer.enqueue_many([payload(0), payload(1)], delay=60)
            producer.enqueue(payload(2))
            before = sorted(redis_client.keys("*"))
            with pytest.raises(QueueFullError, match="pending and scheduled"):
                producer.enqueue(payload(3))
            with pytest.raises(QueueFullError):
                producer.enqueue(payload(4), delay=1)
            assert sorted(redis_client.keys("*")) == before
        assert redis_client.zcard(KEYS.scheduled) == 2
        assert redis_client.llen(KEYS.pending) == 1


class TestTaskShape:
    """What an enqueue writes besides the body: its state; a per-task time limit."""

    def test_a_time_limit_survives_the_wire(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            producer.enqueue(payload(1, time_limit=2.5))
            producer.enqueue(payload(2))
        second, first = redis_client.lrange(KEYS.pending, 0, -1)
        codec = Codec(1 << 20)
        assert codec.decode_message(first).time_limit == 2.5
        assert codec.decode_message(second).time_limit is None

    @pytest.mark.parametrize("limit", [0, -1, math.nan, math.inf, "5", True])
    def test_a_time_limit_that_is_not_positive_seconds_is_refused(self, limit):
        with pytest.raises(InvalidTaskError, match=r"^time_limit: must be a finite number"):
            payload(1, time_limit=limit)

    def test_a_new_task_of_an_id_used_before_does_not_inherit_its_old_result(
        self, redis_url, redis_client
    ):
        task = payload(1)
        with producer_for(redis_url) as producer:
            producer.enqueue(task)
            finish(redis_client, task.task_id)
            assert producer.status(task.task_id) == "succeeded"
            producer.enqueue(task)
            assert producer.status(task.task_id) == "pending"
            assert producer.get_result(task.task_id) is None
            assert producer.wait_for_result(task.task_id, timeout=0.2) is None

    def test_enqueue_one_at_a_time_is_one_script_call(self, redis_url, redis_client):
        with producer_for(redis_url) as producer:
            producer.enqueue(payload(0))  # connected, script loaded
            redis_client.config_resetstat()
            for n in range(1, 21):
                producer.enqueue(payload(n))
            stats = redis_client.info("commandstats")
        top_level = {"evalsha", "eval", "script|load"}
        assert stats["cmdstat_evalsha"]["calls"] == 20
        assert {name.removeprefix("cmdstat_") for name in stats} & top_level == {"evalsha"}


class TestLengthWarning:
    """The pending length crossing QUEUE_LENGTH_WARNING_THRESHOLD warns once per crossing,
    at most once per QUEUE_LENGTH_WARNING_INTERVAL."""

    @staticmethod
    def warnings(caplog) -> list[str]:
        return [r.getMessage() for r in caplog.records if "crossed the warning" in r.getMessage()]

    def test_a_second_crossing_within_the_interval_is_not_logged(self, redis_url, caplog):
        settings = {"max_queue_length": 10, "queue_length_warning_threshold": 3}
        with producer_for(redis_url, **settings) as producer:
            producer.enqueue_many([payload(n) for n in range(4)])  # crosses: warns
            assert producer.clear_queue() == 4  # below again
            producer.enqueue_many([payload(n) for n in range(4)])  # crosses again: quiet
        assert len(self.warnings(caplog)) == 1

    def test_a_crossing_after_the_interval_is_logged_again(self, redis_url, caplog, monkeypatch):
        monkeypatch.setattr("semibot_queue.producer.QUEUE_LENGTH_WARNING_INTERVAL", 0.0)
        settings = {"max_queue_length": 10, "queue_length_warning_threshold": 3}
        with producer_for(redis_url, **settings) as producer:
            producer.enqueue_many([payload(n) for n in range(4)])
            producer.enqueue(payload(5))  # still above: quiet
            producer.clear_queue()
            producer.enqueue_many([payload(n) for n in range(3)])
        first, second = self.warnings(caplog)
        assert "has 4 pending tasks" in first
        assert "has 3 pending tasks" in second

    def test_the_watch_tells_a_crossing_once_and_again_only_after_its_interval(self):
        now = [100.0]
        watch = LengthWatch(60.0, clock=lambda: now[0])
        assert [watch.crossed(n, 3) for n in (1, 2, 3, 4, 9)] == [False, False, True, False, False]
        assert watch.crossed(2, 3) is False  # below again
        now[0] += 59.0
        assert watch.crossed(3, 3) is False  # crossed again, within the interval
        assert watch.crossed(0, 3) is False
        now[0] += 1.0
        assert watch.crossed(5, 3) is True  # crossed again, the interval over
