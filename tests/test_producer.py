"""TaskProducer against a real redis-server: enqueue, backpressure, results, inspection."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from prometheus_client import CollectorRegistry

from redis_server import free_port
from semibot_queue import (
    InvalidTaskError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
    QueueSettings,
    TaskProducer,
    TaskResult,
)
from semibot_queue.codec import Codec
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from support import FAST, payload, wait_until


def producer_for(url: str, **settings: object) -> TaskProducer:
    return TaskProducer(
        url, "q", QueueSettings(**settings) if settings else FAST, registry=CollectorRegistry()
    )


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

    def test_enqueueing_the_same_task_again_leaves_one_copy(self, redis_url):
        task = payload(1)
        with producer_for(redis_url) as producer:
            assert producer.enqueue(task) == task.task_id
            assert producer.enqueue(task) == task.task_id
            assert producer.get_queue_length() == 1

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
        markers = {k for k in redis_client.keys("*") if k.startswith(b"{q}:accepted:")}
        assert set(redis_client.keys("*")) - markers == {KeySpace("q").pending.encode()}
        assert markers == {KeySpace("q").accepted(task_id).encode() for task_id in accepted}
        stored = {json.loads(raw)["task_id"] for raw in redis_client.lrange("{q}:pending", 0, -1)}
        assert stored == set(accepted)


class TestInvalidInput:
    """A bad payload raises InvalidTaskError naming what is wrong, and writes nothing."""

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ({"session_id": "s"}, "expected a TaskPayload"),
            (payload(config={"when": object()}), "config: not JSON-serialisable"),
            (payload(metadata={"blob": b"bytes"}), "metadata: not JSON-serialisable"),
            (payload(config={"text": "x" * 5000}), "exceeds MAX_PAYLOAD_BYTES"),
        ],
    )
    def test_bad_payloads_are_refused(self, redis_url, redis_client, bad, message):
        with (
            producer_for(redis_url, max_payload_bytes=4096) as producer,
            pytest.raises(InvalidTaskError, match=message),
        ):
            producer.enqueue_many([payload(1), bad])
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

    def test_a_missing_result_returns_none_at_the_timeout(self, redis_url):
        with producer_for(redis_url) as producer:
            started = time.monotonic()
            assert producer.wait_for_result("never-enqueued", timeout=0.3) is None
            elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 2.0


class TestInspection:
    """Queue length and clearing, and the connection's life cycle."""

    def test_clear_queue_deletes_pending_tasks_only(self, redis_url, redis_client):
        redis_client.zadd(KeySpace("q").scheduled, {b"retry": 1})
        with producer_for(redis_url) as producer:
            producer.enqueue_many([payload(n) for n in range(4)])
            assert producer.clear_queue() == 4
            assert producer.get_queue_length() == 0
            assert producer.clear_queue() == 0
        assert redis_client.zcard(KeySpace("q").scheduled) == 1

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
        with TaskProducer(queue_name="q", client=fake_redis, registry=CollectorRegistry()) as p:
            p.enqueue(payload())
        assert fake_redis.llen(KeySpace("q").pending) == 1

    def test_the_default_url_comes_from_the_environment(self, monkeypatch):
        monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/5")
        assert TaskProducer(registry=CollectorRegistry()).redis_url == "redis://127.0.0.1:1/5"
        monkeypatch.delenv("REDIS_URL")
        assert TaskProducer(registry=CollectorRegistry()).redis_url.startswith("redis://localhost")
