"""TaskConsumer against a real redis-server: slots, outcomes, stopping, reconnecting."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import attrs
import pytest
import redis
from prometheus_client import CollectorRegistry

from redis_server import RedisServer
from semibot_queue import (
    DeadLetterQueue,
    PermanentTaskError,
    QueueConnectionError,
    QueueError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from support import FAST, Running, payload, running, wait_until

KEYS = KeySpace("q")


def consumer_for(url: str, handler: Any, slots: int = 4, **kw: Any) -> TaskConsumer:
    settings = kw.pop("settings", FAST)
    return TaskConsumer(
        url, "q", handler, slots, settings, registry=CollectorRegistry(), rand=lambda: 0.5, **kw
    )


def enqueue(url: str, count: int, **fields: Any) -> list[str]:
    with TaskProducer(url, "q", FAST, registry=CollectorRegistry()) as producer:
        return producer.enqueue_many([payload(n, **fields) for n in range(count)])


def dead_letter(url: str, task_id: str) -> dict[str, Any] | None:
    """The newest dead-letter record of ``task_id`` as JSON data (raw bytes rendered)."""
    with DeadLetterQueue(url, "q") as dlq:
        record = dlq.get(task_id)
    return None if record is None else attrs.asdict(record)


def results(client: redis.Redis[bytes], ids: list[str]) -> list[dict[str, Any]]:
    raws = [client.get(KEYS.result(task_id)) for task_id in ids]
    return [json.loads(raw) for raw in raws if raw is not None]


class TestRunning:
    """Tasks run once each, within the slots, and their results are recorded."""

    def test_every_task_runs_and_its_result_is_stored(self, redis_url, redis_client):
        seen: list[TaskMessage] = []
        ids = enqueue(redis_url, 50)
        with running(consumer_for(redis_url, lambda m: seen.append(m) or m.task_id)):
            wait_until(lambda: len(results(redis_client, ids)) == 50, what="50 results")
        assert sorted(m.task_id for m in seen) == sorted(ids)
        assert {m.delivery_count for m in seen} == {1}
        assert all(
            r["status"] == "succeeded" and r["result"] == r["task_id"]
            for r in results(redis_client, ids)
        )
        assert redis_client.llen(KEYS.pending) == 0
        assert redis_client.zcard(KEYS.workers) == 0  # deregistered on stop

    def test_never_more_than_max_concurrent_run_or_are_held(self, redis_url, redis_client):
        lock = threading.Lock()
        active = [0]
        peaks: list[tuple[int, int]] = []
        probe = redis.Redis.from_url(redis_url)

        def handler(message: TaskMessage) -> None:
            with lock:
                active[0] += 1
                now_active = active[0]
            held = probe.llen(KEYS.inflight(worker.worker_id))
            with lock:
                peaks.append((now_active, held))
            time.sleep(0.005)  # the work: long enough for slots to fill
            with lock:
                active[0] -= 1

        ids = enqueue(redis_url, 60)
        worker = consumer_for(redis_url, handler, 3)
        with running(worker):
            wait_until(lambda: len(results(redis_client, ids)) == 60, what="60 results")
        probe.close()
        assert len(peaks) == 60
        assert max(a for a, _ in peaks) == 3
        assert max(h for _, h in peaks) <= 3

    def test_a_worker_takes_nothing_while_its_slots_are_busy(self, redis_url, redis_client):
        release = threading.Event()
        started = threading.Semaphore(0)

        def blocked(message: TaskMessage) -> None:
            started.release()
            release.wait(10)

        enqueue(redis_url, 3)
        first = consumer_for(redis_url, blocked, 1)
        second = consumer_for(redis_url, blocked, 1)
        with running(first), running(second):
            assert started.acquire(timeout=5)
            assert started.acquire(timeout=5)
            # Two slots in all, both busy: the third task waits for whichever frees first.
            assert redis_client.llen(KEYS.pending) == 1
            release.set()
            wait_until(lambda: redis_client.llen(KEYS.pending) == 0, what="third task taken")

    def test_a_redelivered_task_shows_its_delivery_count(self, redis_url, redis_client):
        [task_id] = enqueue(redis_url, 1)
        redis_client.hset(KEYS.crashes, task_id, 2)  # as recovery counts lost deliveries
        seen: list[TaskMessage] = []
        with running(consumer_for(redis_url, seen.append)):
            wait_until(lambda: seen, what="the task")
        assert seen[0].delivery_count == 3

    def test_the_contract_hooks_record_a_result(self, redis_url, redis_client):
        from semibot_queue.models import TaskResult  # noqa: PLC0415
        from semibot_queue.outcomes import Delivery  # noqa: PLC0415

        consumer = consumer_for(redis_url, lambda m: "ok")
        consumer.connect()
        enqueue(redis_url, 1)
        stored = redis_client.lmove(KEYS.pending, consumer.inflight, "RIGHT", "LEFT")
        message = TaskMessage(**json.loads(stored))
        result = TaskResult(
            task_id=message.task_id, session_id=message.session_id, status="succeeded", result=42
        )
        consumer._publish_result(Delivery(stored, message), result)
        assert json.loads(redis_client.get(KEYS.result(message.task_id)))["result"] == 42
        assert redis_client.llen(consumer.inflight) == 0
        consumer.disconnect()


class TestOutcomes:
    """Handler errors retry with backoff; permanent and invalid ones are dead-lettered."""

    def test_a_failing_task_is_retried_then_dead_lettered(self, redis_url, redis_client):
        attempts: list[TaskMessage] = []

        def failing(message: TaskMessage) -> None:
            attempts.append(message)
            raise ValueError(f"boom {message.retry_count}")

        [task_id] = enqueue(redis_url, 1)
        with running(consumer_for(redis_url, failing)):
            wait_until(lambda: dead_letter(redis_url, task_id), what="dead letter")
        assert [m.retry_count for m in attempts] == [0, 1, 2, 3]
        assert [m.last_error for m in attempts][1:] == [
            "ValueError: boom 0",
            "ValueError: boom 1",
            "ValueError: boom 2",
        ]
        record = dead_letter(redis_url, task_id)
        assert record["reason"] == "exhausted"
        assert record["attempts"] == 4
        assert "ValueError: boom 3" in record["traceback"]
        [result] = results(redis_client, [task_id])
        assert result["status"] == "failed"
        assert result["error"] == "ValueError: boom 3"

    def test_a_permanent_error_is_dead_lettered_at_once(self, redis_url):
        calls = []

        def refuse(message: TaskMessage) -> None:
            calls.append(message)
            raise PermanentTaskError("bad request")

        [task_id] = enqueue(redis_url, 1)
        with running(consumer_for(redis_url, refuse)):
            wait_until(lambda: dead_letter(redis_url, task_id), what="dead letter")
        assert len(calls) == 1
        record = dead_letter(redis_url, task_id)
        assert (record["reason"], record["error_type"]) == ("permanent", "PermanentTaskError")
        assert record["message"]["task_id"] == task_id

    def test_a_result_that_is_not_json_is_dead_lettered(self, redis_url):
        [task_id] = enqueue(redis_url, 1)
        with running(consumer_for(redis_url, lambda m: {1, 2})):
            wait_until(lambda: dead_letter(redis_url, task_id), what="dead letter")
        record = dead_letter(redis_url, task_id)
        assert record["reason"] == "permanent"
        assert "result of task" in record["error"]

    def test_garbage_is_dead_lettered_with_its_bytes_and_the_worker_goes_on(
        self, redis_url, redis_client
    ):
        redis_client.lpush(KEYS.pending, b"\xff\xfe not json")
        redis_client.lpush(KEYS.pending, b'{"task_id": "t-1", "session_id": 5}')
        good = enqueue(redis_url, 1)
        with running(consumer_for(redis_url, lambda m: "ok")):
            wait_until(lambda: results(redis_client, good), what="the good task")
            wait_until(lambda: redis_client.hlen(KEYS.dead) == 2, what="two dead letters")
        with DeadLetterQueue(redis_url, "q") as dlq:
            records = [attrs.asdict(r) for r in dlq.list()]
        by_encoding = {r["raw_encoding"]: r for r in records}
        assert by_encoding["base64"]["reason"] == "invalid"
        assert by_encoding["utf-8"]["task_id"] == "t-1"
        assert "session_id" in by_encoding["utf-8"]["error"]


class TestStopping:
    """stop() acts promptly, lets in-flight work finish, and gives back what cannot."""

    def test_stop_returns_promptly_with_a_long_poll_timeout(self, redis_url, redis_client):
        settings = QueueSettings(queue_poll_timeout=30)
        handle = Running(consumer_for(redis_url, lambda m: None, settings=settings))
        handle.thread.start()
        wait_until(
            lambda: any(c.get("cmd") == "blmove" for c in redis_client.client_list()),
            what="the loop blocked in its pop",
        )
        started = time.monotonic()
        handle.stop()
        assert time.monotonic() - started < 2.0
        assert handle.error is None

    def test_in_flight_tasks_finish_before_start_returns(self, redis_url, redis_client):
        release = threading.Event()
        began = threading.Event()

        def slow(message: TaskMessage) -> str:
            began.set()
            release.wait(5)
            return "finished"

        ids = enqueue(redis_url, 1)
        handle = Running(consumer_for(redis_url, slow))
        handle.thread.start()
        assert began.wait(5)
        stopper = threading.Thread(target=handle.consumer.stop)
        stopper.start()
        handle.thread.join(0.2)  # must not end: the handler still runs
        assert handle.thread.is_alive()
        release.set()
        stopper.join(5)
        handle.thread.join(5)
        assert results(redis_client, ids)[0]["result"] == "finished"
        assert handle.consumer.unfinished == []

    def test_tasks_unfinished_at_the_deadline_go_back_to_pending(
        self, redis_url, redis_client, caplog
    ):
        release = threading.Event()
        began = threading.Event()

        def stuck(message: TaskMessage) -> None:
            began.set()
            release.wait(10)

        [task_id] = enqueue(redis_url, 1)
        handle = Running(consumer_for(redis_url, stuck))
        handle.thread.start()
        assert began.wait(5)
        handle.stop(timeout=0.2)
        assert handle.consumer.unfinished == [task_id]
        [back] = redis_client.lrange(KEYS.pending, 0, -1)
        assert json.loads(back)["task_id"] == task_id  # plain JSON, as it was enqueued
        assert redis_client.hget(KEYS.releases, task_id) == b"1"
        assert redis_client.zcard(KEYS.workers) == 0
        with caplog.at_level(logging.WARNING, "semibot_queue"):
            release.set()  # the late handler's ack must record nothing
            wait_until(
                lambda: any("after it left this worker" in r.getMessage() for r in caplog.records),
                what="the late ack",
            )
        assert redis_client.get(KEYS.result(task_id)) is None
        assert redis_client.lrange(KEYS.pending, 0, -1) == [back]

    def test_stop_before_start_makes_start_return_at_once(self, redis_url):
        consumer = consumer_for(redis_url, lambda m: None)
        consumer.stop()
        started = time.monotonic()
        consumer.start()
        assert time.monotonic() - started < 2.0

    def test_a_handler_may_stop_its_own_worker(self, redis_url, redis_client):
        holder: list[TaskConsumer] = []
        ids = enqueue(redis_url, 1)
        consumer = consumer_for(redis_url, lambda m: holder[0].stop())
        holder.append(consumer)
        handle = Running(consumer)
        handle.thread.start()
        handle.thread.join(10)
        assert not handle.thread.is_alive()
        assert results(redis_client, ids)


class TestConstruction:
    """Bad arguments are refused before anything starts."""

    def test_the_handler_must_be_callable(self, redis_url):
        with pytest.raises(QueueError, match="handler must be a callable"):
            TaskConsumer(redis_url, "q", "not callable", registry=CollectorRegistry())

    def test_max_concurrent_must_be_positive(self, redis_url):
        with pytest.raises(QueueError, match="max_concurrent"):
            TaskConsumer(redis_url, "q", print, -1, registry=CollectorRegistry())

    def test_an_evicting_redis_is_reported(self, redis_url, redis_client, caplog):
        redis_client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            with caplog.at_level(logging.WARNING, "semibot_queue"):
                consumer = consumer_for(redis_url, print)
                consumer.connect()
                consumer.connect()
                consumer.disconnect()
        finally:
            redis_client.config_set("maxmemory-policy", "noeviction")
        assert any("allkeys-lru" in r.getMessage() for r in caplog.records)


class TestConnectionFailures:
    """A lost Redis is retried with backoff, then reported; lost replies lose no task."""

    def test_a_worker_gives_up_after_its_reconnect_attempts(self, tmp_path):
        settings = QueueSettings(
            max_reconnect_attempts=3, error_retry_delay=0.01, stop_poll_slice=0.2
        )
        with RedisServer(tmp_path / "r") as server:
            handle = Running(consumer_for(server.url, print, settings=settings))
            handle.thread.start()
            probe = server.client()
            workers = KEYS.workers
            wait_until(lambda: probe.zcard(workers) == 1, what="the worker registered")
            probe.close()
            server.kill()
            handle.thread.join(20)
        assert isinstance(handle.error, QueueConnectionError)
        assert "3 attempts" in str(handle.error)

    # Found by a black-box review: out of memory at start (the registration) ended the
    # worker at once with exit 1, though a running worker waits it out like an outage.
    def test_a_worker_started_while_redis_is_out_of_memory_waits_then_runs(self, tmp_path, caplog):
        settings = attrs.evolve(FAST, max_reconnect_attempts=1000)
        with RedisServer(tmp_path / "r") as server, server.client() as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")
            seen: list[str] = []
            handle = Running(consumer_for(server.url, seen.append, settings=settings))
            handle.thread.start()
            try:
                wait_until(
                    lambda: "out of memory" in caplog.text and "register" in caplog.text,
                    what="a registration refused for want of memory, and retried",
                )
                assert handle.thread.is_alive(), f"the worker ended: {handle.error!r}"
                admin.config_set("maxmemory", "0")
                ids = enqueue(server.url, 1)
                wait_until(lambda: len(results(admin, ids)) == 1, what="the task's result")
            finally:
                handle.stop()
        assert handle.error is None

    def test_a_task_moved_before_a_lost_reply_is_still_run(
        self, redis_url, redis_client, monkeypatch
    ):
        original = Scripts.fetch
        failed = []

        def fetch_then_lose_reply(self: Scripts, inflight: str, count: int) -> list[bytes]:
            moved = original(self, inflight, count)
            if moved and not failed:
                failed.append(moved)
                raise redis.ConnectionError("reply lost")
            return moved

        monkeypatch.setattr(Scripts, "fetch", fetch_then_lose_reply)
        ids = enqueue(redis_url, 3)
        with running(consumer_for(redis_url, lambda m: "ok")):
            wait_until(lambda: len(results(redis_client, ids)) == 3, what="all three results")
        assert failed
