"""status(), get_result() and cancel() against a real redis-server (issue 9, items 2 and 3).

status() answers in one script call, without looking at the pending list, through every
state a task goes: pending, scheduled, running, succeeded, failed, dead, cancelled.
cancel() of a pending or scheduled task means it never runs and its waiter gets the
cancelled result at once; a running task sees ``message.cancel_requested()`` within a
heartbeat and finishes cancelled.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import attrs
import pytest
import redis
from prometheus_client import CollectorRegistry

from redis_server import RedisServer
from semibot_queue import (
    DeadLetterQueue,
    DuplicateTaskError,
    InvalidTaskError,
    PermanentTaskError,
    QueueConnectionError,
    QueueFullError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
    TaskResult,
)
from semibot_queue.codec import Codec, cancelled_result
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from support import FAST, payload, running, wait_until

KEYS = KeySpace("q")
CODEC = Codec(1 << 20)

#: How late a waiter of a cancelled task may get its result, and a handler its flag,
#: beyond what the design promises (thread scheduling on a busy machine).
SLACK_S = 0.5


def producer_for(url: str) -> TaskProducer:
    return TaskProducer(url, "q", FAST, registry=CollectorRegistry())


def consumer_for(url: str, handler: Callable[[TaskMessage], object]) -> TaskConsumer:
    return TaskConsumer(url, "q", handler, 2, FAST, registry=CollectorRegistry())


def command_calls(client: redis.Redis[bytes]) -> dict[str, int]:
    """Calls per command so far (commands run inside scripts included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


class Gate:
    """A handler that records each task it starts and holds it until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, message: TaskMessage) -> str:
        self.started.append(message.task_id)
        self.entered.set()
        self.release.wait(30)
        return "done"


@pytest.fixture
def producer(redis_url: str) -> Iterator[TaskProducer]:
    with producer_for(redis_url) as p:
        yield p


class TestStatus:
    """Every state a task goes through, in one round trip, never scanning pending."""

    def test_an_unknown_task_has_no_status(self, producer: TaskProducer) -> None:
        assert producer.status("never-enqueued") is None

    def test_a_task_waiting_for_a_worker_is_pending(self, producer: TaskProducer) -> None:
        task_id = producer.enqueue(payload(1))
        assert producer.status(task_id) == "pending"

    def test_a_delayed_task_is_scheduled(self, producer: TaskProducer) -> None:
        task_id = producer.enqueue(payload(1), delay=60)
        assert producer.status(task_id) == "scheduled"

    def test_a_task_a_worker_runs_is_running_then_succeeded(
        self, redis_url: str, producer: TaskProducer
    ) -> None:
        gate = Gate()
        task_id = producer.enqueue(payload(1))
        with running(consumer_for(redis_url, gate)):
            assert gate.entered.wait(10), "the worker never ran the task"
            assert producer.status(task_id) == "running"
            gate.release.set()
            assert producer.wait_for_result(task_id, timeout=10) is not None
        assert producer.status(task_id) == "succeeded"

    def test_a_dead_lettered_task_is_dead_and_failed_once_its_record_is_deleted(
        self, redis_url: str, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        def refuse(message: TaskMessage) -> None:
            raise PermanentTaskError("no")

        task_id = producer.enqueue(payload(1))
        with running(consumer_for(redis_url, refuse)):
            result = producer.wait_for_result(task_id, timeout=10)
        assert result is not None
        assert result.status == "failed"
        assert producer.status(task_id) == "dead"
        with DeadLetterQueue(redis_url, "q", FAST) as dlq:
            assert dlq.delete(task_id) is True
        assert producer.status(task_id) == "failed"
        redis_client.delete(KEYS.result(task_id))  # its result expired too
        assert producer.status(task_id) is None

    def test_a_dead_task_whose_result_expired_is_still_dead(
        self, redis_url: str, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        def refuse(message: TaskMessage) -> None:
            raise PermanentTaskError("no")

        task_id = producer.enqueue(payload(1))
        with running(consumer_for(redis_url, refuse)):
            assert producer.wait_for_result(task_id, timeout=10) is not None
        redis_client.delete(KEYS.result(task_id))
        assert producer.status(task_id) == "dead"

    def test_a_cancelled_task_is_cancelled(self, producer: TaskProducer) -> None:
        task_id = producer.enqueue(payload(1))
        assert producer.cancel(task_id) is True
        assert producer.status(task_id) == "cancelled"

    def test_a_succeeded_task_whose_result_expired_is_unknown(
        self, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        result = TaskResult(task_id="t1", session_id="s", status="succeeded", result=1)
        redis_client.set(KEYS.result("t1"), CODEC.encode_result(result))
        assert producer.status("t1") == "succeeded"
        redis_client.delete(KEYS.result("t1"))
        assert producer.status("t1") is None

    def test_status_is_one_script_call_that_never_reads_the_pending_list(
        self, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        producer.enqueue_many([payload(n) for n in range(500)])
        last = producer.enqueue(payload(9))
        before = command_calls(redis_client)
        assert producer.status(last) == "pending"
        assert producer.status("never-enqueued") is None
        spent = {
            name: calls - before.get(name, 0)
            for name, calls in command_calls(redis_client).items()
            if calls != before.get(name, 0)
        }
        spent.pop("info", None)  # command_calls' own
        assert spent.get("evalsha") == 2  # one per status() call
        list_reads = {"lrange", "lpos", "lindex", "llen", "lmove", "rpop", "lpop"}
        assert not list_reads & set(spent), spent

    def test_a_task_id_no_key_can_hold_is_refused(self, producer: TaskProducer) -> None:
        with pytest.raises(InvalidTaskError, match="task id"):
            producer.status("has space")


class TestGetResult:
    """get_result() reads the stored result, once, and never waits."""

    def test_it_returns_the_stored_result_or_none(
        self, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        task_id = producer.enqueue(payload(1))
        assert producer.get_result(task_id) is None
        result = TaskResult(task_id=task_id, session_id="session-1", status="succeeded", result=7)
        redis_client.set(KEYS.result(task_id), CODEC.encode_result(result))
        assert producer.get_result(task_id) == result

    def test_it_does_not_wait_for_a_redis_that_is_down(self, tmp_path) -> None:
        settings = QueueSettings(error_retry_delay=1.0, max_reconnect_attempts=10)
        with RedisServer(tmp_path / "redis") as server:
            producer = TaskProducer(server.url, "q", settings, registry=CollectorRegistry())
            producer.connect()
            server.kill()
            started = time.monotonic()
            with pytest.raises(QueueConnectionError):
                producer.get_result("t1")
            assert time.monotonic() - started < 1.0
            producer.disconnect()


class TestCancel:
    """A pending or scheduled task never runs; a running one is asked to stop."""

    def test_a_pending_task_never_runs_and_its_waiter_gets_cancelled_at_once(
        self, redis_url: str, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        task_id = producer.enqueue(payload(1))
        got: list[TaskResult | None] = []
        waiter = threading.Thread(target=lambda: got.append(producer.wait_for_result(task_id, 30)))
        waiter.start()
        wait_until(lambda: redis_client.pubsub_numsub(KEYS.result_channel("session-1"))[0][1])
        cancelled_at = time.monotonic()
        assert producer.cancel(task_id) is True
        waiter.join(10)
        assert time.monotonic() - cancelled_at < SLACK_S
        [result] = got
        assert result is not None
        assert (result.task_id, result.status, result.error) == (task_id, "cancelled", "cancelled")
        assert producer.status(task_id) == "cancelled"
        gate = Gate()
        gate.release.set()
        with running(consumer_for(redis_url, gate)):
            wait_until(lambda: redis_client.llen(KEYS.pending) == 0, what="the worker's take")
            wait_until(lambda: not redis_client.hexists(KEYS.cancel, task_id), what="the drop")
        assert gate.started == []
        assert producer.status(task_id) == "cancelled"

    def test_a_scheduled_task_never_runs_and_its_waiter_gets_cancelled_at_once(
        self, redis_url: str, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        task_id = producer.enqueue(payload(1), delay=0.3)
        assert producer.cancel(task_id) is True
        result = producer.wait_for_result(task_id, timeout=5)
        assert result is not None
        assert result.status == "cancelled"
        gate = Gate()
        gate.release.set()
        with running(consumer_for(redis_url, gate)):
            # Promoted when due, then taken and dropped.
            wait_until(lambda: redis_client.zcard(KEYS.scheduled) == 0, what="the promotion")
            wait_until(lambda: not redis_client.hexists(KEYS.cancel, task_id), what="the drop")
            assert redis_client.llen(KEYS.pending) == 0
        assert gate.started == []

    def test_a_cancelled_scheduled_task_no_longer_counts_against_the_queue_length(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        # Found by a black-box review: cancelled delayed tasks held their room for an hour.
        small = attrs.evolve(FAST, max_queue_length=3, queue_length_warning_threshold=3)
        with TaskProducer(redis_url, "q", small, registry=CollectorRegistry()) as producer:
            later = [producer.enqueue(payload(n), delay=3600) for n in range(3)]
            with pytest.raises(QueueFullError):
                producer.enqueue(payload(3))
            assert producer.cancel(later[0]) is True
            assert producer.enqueue(payload(4))  # the cancelled one's room
            with pytest.raises(QueueFullError):
                producer.enqueue(payload(5))
            assert all(producer.cancel(t) for t in later[1:])
            assert len(producer.enqueue_many([payload(6), payload(7)])) == 2
        assert redis_client.scard(KEYS.voided) == 3

    def test_a_cancelled_scheduled_task_is_dropped_when_due_and_never_pending_again(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        # Found by a black-box review: once due it came back as pending, then running.
        short = attrs.evolve(FAST, result_ttl=1)
        with TaskProducer(redis_url, "q", short, registry=CollectorRegistry()) as producer:
            task = payload(1)
            producer.enqueue(task, delay=1.5)
            assert producer.cancel(task.task_id) is True
            seen: set[str | None] = set()
            gate = Gate()
            gate.release.set()
            consumer = TaskConsumer(redis_url, "q", gate, 2, short, registry=CollectorRegistry())
            with running(consumer):

                def dropped() -> bool:
                    seen.add(producer.status(task.task_id))
                    return not redis_client.exists(KEYS.scheduled, KEYS.accepted(task.task_id))

                wait_until(dropped, 10.0, "the due copy dropped")
                assert producer.enqueue(task) == task.task_id  # the id is free again
                assert producer.wait_for_result(task.task_id, timeout=10) is not None
        assert seen <= {"cancelled", None}, seen
        assert gate.started == [task.task_id]  # the new task, once
        assert not redis_client.exists(KEYS.voided, KEYS.cancel)

    def test_the_id_of_a_cancelled_task_is_taken_until_a_worker_dropped_it(
        self, redis_url: str, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        task = payload(1)
        producer.enqueue(task)
        assert producer.cancel(task.task_id) is True
        with pytest.raises(DuplicateTaskError):
            producer.enqueue(task)
        gate = Gate()
        gate.release.set()
        with running(consumer_for(redis_url, gate)):
            wait_until(lambda: not redis_client.hexists(KEYS.cancel, task.task_id), what="drop")
            assert producer.enqueue(task) == task.task_id  # a new task of the same id
            assert producer.wait_for_result(task.task_id, timeout=10) is not None
        assert gate.started == [task.task_id]
        assert producer.status(task.task_id) == "succeeded"

    def test_a_running_task_sees_the_request_within_a_heartbeat_and_ends_cancelled(
        self, redis_url: str, producer: TaskProducer
    ) -> None:
        seen = threading.Event()
        entered = threading.Event()

        def cooperative(message: TaskMessage) -> str:
            entered.set()
            deadline = time.monotonic() + 20
            while not message.cancel_requested() and time.monotonic() < deadline:
                time.sleep(0.005)  # a handler's own work loop, checking the flag
            if message.cancel_requested():
                seen.set()
            return "stopped early"

        task_id = producer.enqueue(payload(1))
        with running(consumer_for(redis_url, cooperative)):
            assert entered.wait(10), "the worker never ran the task"
            asked = time.monotonic()
            assert producer.cancel(task_id) is True
            assert seen.wait(FAST.heartbeat_interval + SLACK_S), "cancel_requested() stayed false"
            result = producer.wait_for_result(task_id, timeout=10)
        assert result is not None
        assert (result.status, result.result, result.error) == ("cancelled", None, "cancelled")
        assert time.monotonic() - asked < 10
        assert producer.status(task_id) == "cancelled"

    def test_a_running_task_that_raises_after_the_request_ends_cancelled_not_retried(
        self, redis_url: str, producer: TaskProducer
    ) -> None:
        attempts: list[int] = []
        entered = threading.Event()

        def raises_when_asked(message: TaskMessage) -> None:
            attempts.append(message.retry_count)
            entered.set()
            deadline = time.monotonic() + 20
            while not message.cancel_requested() and time.monotonic() < deadline:
                time.sleep(0.005)
            raise RuntimeError("interrupted")

        task_id = producer.enqueue(payload(1))
        with running(consumer_for(redis_url, raises_when_asked)):
            assert entered.wait(10)
            assert producer.cancel(task_id) is True
            result = producer.wait_for_result(task_id, timeout=10)
        assert result is not None
        assert result.status == "cancelled"
        assert attempts == [0]

    def test_cancel_of_an_unknown_or_ended_task_is_false(self, producer: TaskProducer) -> None:
        assert producer.cancel("never-enqueued") is False
        task_id = producer.enqueue(payload(1))
        assert producer.cancel(task_id) is True
        assert producer.cancel(task_id) is False  # already cancelled

    def test_the_cancelled_result_keeps_the_runtimes_wire_format(
        self, redis_client: redis.Redis[bytes], producer: TaskProducer
    ) -> None:
        task_id = producer.enqueue(payload(2))
        assert producer.cancel(task_id) is True
        stored = json.loads(redis_client.get(KEYS.result(task_id)) or b"")
        assert stored["status"] == "cancelled"
        assert stored["result"] == {"error": "cancelled"}
        assert (stored["task_id"], stored["session_id"], stored["attempts"]) == (
            task_id,
            "session-2",
            0,
        )

    def test_a_state_changed_to_another_session_since_read_is_read_again(
        self, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.hset(KEYS.state, "t1", "pending session-b")
        stale = CODEC.encode_result(cancelled_result("t1", "session-a"))
        scripts = Scripts(redis_client, KEYS)
        try:
            assert scripts.cancel("t1", b"pending session-a", "session-a", stale, 60) == -1
            assert redis_client.exists(KEYS.result("t1")) == 0
            fresh = CODEC.encode_result(cancelled_result("t1", "session-b"))
            assert scripts.cancel("t1", b"pending session-b", "session-b", fresh, 60) == 1
            # The same call repeated after a lost reply finds its own result.
            assert scripts.cancel("t1", b"pending session-b", "session-b", fresh, 60) == 1
            # Its copy promoted (pending again, no session known) before a worker dropped
            # it: cancelled already, the result stays as it is.
            redis_client.hset(KEYS.state, "t1", "pending ")
            other = CODEC.encode_result(cancelled_result("t1", ""))
            assert scripts.cancel("t1", b"pending ", "", other, 60) == 0
            assert redis_client.get(KEYS.result("t1")) == fresh
        finally:
            scripts.close()
