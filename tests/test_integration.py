"""Producers and workers together on a real redis-server, end to end."""

from __future__ import annotations

import collections
import json
import threading

from prometheus_client import CollectorRegistry

from semibot_queue import TaskConsumer, TaskMessage, TaskProducer
from semibot_queue.codec import Codec
from semibot_queue.keys import KeySpace
from semibot_queue.models import TaskMessage as Message
from support import FAST, payload, running, wait_until

KEYS = KeySpace("q")


def worker(url: str, handler, slots: int = 8) -> TaskConsumer:
    return TaskConsumer(url, "q", handler, slots, FAST, registry=CollectorRegistry())


class TestEndToEnd:
    """A thousand tasks through two workers: each result arrives once, nothing is left."""

    def test_a_thousand_tasks_each_deliver_one_result(self, redis_url, redis_client):
        listener = redis_client.pubsub(ignore_subscribe_messages=True)
        listener.psubscribe(KEYS.result_channel_pattern)
        published: collections.Counter[str] = collections.Counter()
        done = threading.Event()
        total = 1000

        def listen() -> None:
            # Until the test is done and the channel has gone quiet: duplicates would show.
            while True:
                message = listener.get_message(timeout=0.2)
                if message is not None:
                    published[json.loads(message["data"])["task_id"]] += 1
                elif done.is_set():
                    return

        thread = threading.Thread(target=listen)
        thread.start()
        runs: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()

        def handler(message: TaskMessage) -> dict[str, str]:
            with lock:
                runs[message.task_id] += 1
            return {"answer": message.messages[0]["content"].upper()}

        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            with running(worker(redis_url, handler)), running(worker(redis_url, handler)):
                ids = producer.enqueue_many([payload(n) for n in range(total // 2)])
                ids += [producer.enqueue(payload(n)) for n in range(total // 2, total)]
                received = [producer.wait_for_result(task_id, timeout=30) for task_id in ids]
            done.set()
            thread.join(10)
        listener.close()
        assert len(set(ids)) == total
        assert all(r is not None and r.status == "succeeded" for r in received)
        assert [r.result["answer"] for r in received if r] == [
            f"QUESTION {n}" for n in range(total)
        ]
        assert set(runs) == set(ids)
        assert set(runs.values()) == {1}
        assert set(published) == set(ids)
        assert set(published.values()) == {1}
        assert redis_client.llen(KEYS.pending) == 0
        assert redis_client.zcard(KEYS.scheduled) == 0
        assert redis_client.keys(KEYS.inflight_prefix + "*") == []

    def test_retries_come_back_through_the_watcher(self, redis_url):
        failures_left = collections.Counter({"flaky": 2})

        def handler(message: TaskMessage) -> int:
            if message.config.get("kind") == "flaky" and failures_left["flaky"] > 0:
                failures_left["flaky"] -= 1
                raise TimeoutError("upstream slow")
            return message.retry_count

        with (
            TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer,
            running(worker(redis_url, handler, 1)),
        ):
            task_id = producer.enqueue(payload(1, config={"kind": "flaky"}))
            result = producer.wait_for_result(task_id, timeout=10)
        assert result is not None
        assert (result.status, result.result, result.attempts) == ("succeeded", 2, 3)


class TestCrashRecovery:
    """A dead worker's tasks are taken over by a live one's watcher."""

    def test_tasks_of_a_silent_worker_run_again_elsewhere(self, redis_url, redis_client):
        codec = Codec(1 << 20)
        ids = []
        for n in range(3):
            message = Message.from_payload(payload(n), 0.0)
            ids.append(message.task_id)
            redis_client.lpush(KEYS.inflight("gone-1"), codec.encode_message(message))
        redis_client.zadd(KEYS.workers, {"gone-1": 0})  # last heartbeat long ago
        seen: list[TaskMessage] = []
        with running(worker(redis_url, seen.append)):
            wait_until(lambda: len(seen) == 3, what="recovered tasks run")
        assert sorted(m.task_id for m in seen) == sorted(ids)
        assert {m.delivery_count for m in seen} == {2}
        assert not redis_client.exists(KEYS.inflight("gone-1"))
        assert redis_client.zscore(KEYS.workers, "gone-1") is None

    def test_a_task_that_kills_its_workers_ends_as_poison(self, redis_url, redis_client):
        codec = Codec(1 << 20)
        message = Message.from_payload(payload(9), 0.0)
        redis_client.lpush(KEYS.inflight("gone-2"), codec.encode_message(message))
        redis_client.hset(KEYS.crashes, message.task_id, 2)  # lost twice before
        redis_client.zadd(KEYS.workers, {"gone-2": 0})
        with (
            TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer,
            running(worker(redis_url, lambda m: "never runs")),
        ):
            result = producer.wait_for_result(message.task_id, timeout=10)
        assert result is not None
        assert result.status == "failed"
        assert "PoisonTaskError" in (result.error or "")
        [record_id] = redis_client.hkeys(KEYS.dead)
        assert record_id.decode().startswith(message.task_id + "#")
        record = json.loads(redis_client.hget(KEYS.dead, record_id))
        assert (record["reason"], record["delivery_count"]) == ("poison", 3)
