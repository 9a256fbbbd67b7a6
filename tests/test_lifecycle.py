"""The consumer's lifecycle (DESIGN §1): stop() never blocks, join(), a context manager
running in the background, signal handlers restored when start() returns."""

from __future__ import annotations

import random
import signal
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from semibot_queue import QueueError, TaskConsumer, TaskMessage, TaskProducer
from semibot_queue.keys import KeySpace
from support import FAST, Running, payload, wait_until

KEYS = KeySpace("q")


def consumer_for(url: str, handler: Any) -> TaskConsumer:
    return TaskConsumer(url, "q", handler, 2, FAST, registry=CollectorRegistry())


class TestStopAndJoin:
    """stop() only asks; join() waits."""

    def test_stop_returns_at_once_while_a_task_still_runs_and_join_waits_for_it(
        self, redis_url: str
    ) -> None:
        started, release = threading.Event(), threading.Event()

        def slow(message: TaskMessage) -> str:
            started.set()
            release.wait(10)
            return "done"

        consumer = consumer_for(redis_url, slow)
        handle = Running(consumer)
        handle.thread.start()
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            assert started.wait(10)
            asked = time.monotonic()
            consumer.stop()
            assert time.monotonic() - asked < 0.1, "stop() blocked"
            assert consumer.join(0.2) is False, "joined while a task still ran"
            release.set()
            assert consumer.join(10) is True
            result = producer.wait_for_result(task_id, timeout=5)
        handle.thread.join(5)
        assert handle.error is None
        assert result is not None
        assert result.status == "succeeded"

    def test_stop_at_any_moment_of_an_idle_worker_ends_it_within_a_second(
        self, redis_url: str
    ) -> None:
        # stop() lands anywhere in the fetch loop: before, while and after the blocking pop
        # is sent (seeded). A pop the watcher failed to cut short waits QUEUE_POLL_TIMEOUT:
        # under load, 3 of 80 stops did before the watcher shut the socket itself (when it
        # called redis-py's disconnect() across threads); a race, so this catches it often,
        # not always.
        rand = random.Random(20261130)  # noqa: S311 - a seeded test input
        slow = []
        for attempt in range(30):
            consumer = consumer_for(redis_url, lambda m: None)
            handle = Running(consumer)
            handle.thread.start()
            time.sleep(rand.uniform(0.0, 0.15))  # where stop() lands is the test's input
            asked = time.monotonic()
            consumer.stop()
            if not consumer.join(10):
                slow.append((attempt, "did not stop within 10s"))
            elif time.monotonic() - asked > 1.0:
                slow.append((attempt, f"{time.monotonic() - asked:.2f}s"))
            handle.thread.join(5)
            assert handle.error is None, f"attempt {attempt}: {handle.error!r}"
        assert slow == [], f"stops that took over a second: {slow}"

    def test_stop_from_a_handler_returns_and_the_worker_stops(self, redis_url: str) -> None:
        returned = threading.Event()
        consumer: list[TaskConsumer] = []

        def stopping(message: TaskMessage) -> str:
            consumer[0].stop()
            returned.set()
            return "stopped myself"

        consumer.append(consumer_for(redis_url, stopping))
        handle = Running(consumer[0])
        handle.thread.start()
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue(payload(0))
        assert returned.wait(10), "stop() from a handler did not return"
        assert consumer[0].join(10)
        handle.thread.join(5)
        assert handle.error is None


class TestContextManager:
    """``with TaskConsumer(...)`` runs it in a background thread, stopped and joined on exit."""

    def test_tasks_run_inside_the_block_and_the_worker_is_gone_after_it(
        self, redis_url: str, redis_client: Any
    ) -> None:
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            with consumer_for(redis_url, lambda m: "ran") as consumer:
                result = producer.wait_for_result(task_id, timeout=10)
                assert consumer.join(0) is False
            assert consumer.join(0) is True
        assert result is not None
        assert result.result == "ran"
        assert redis_client.zscore(KEYS.workers, consumer.worker_id) is None


class TestSignalHandlers:
    """start() in the main thread installs SIGTERM/SIGINT handlers and restores them."""

    def test_the_previous_handlers_are_back_when_start_returns(self, redis_url: str) -> None:
        assert threading.current_thread() is threading.main_thread()

        def mine(_signum: int, _frame: object) -> None:
            """A handler of the application's own."""

        previous = signal.signal(signal.SIGTERM, mine)
        consumer = consumer_for(redis_url, lambda m: None)
        try:
            stopper = threading.Thread(
                target=lambda: (
                    wait_until(lambda: signal.getsignal(signal.SIGTERM) is not mine),
                    consumer.stop(),
                )
            )
            stopper.start()
            consumer.start()  # blocks until the stopper saw the worker's handler and stopped it
            stopper.join(10)
            assert signal.getsignal(signal.SIGTERM) is mine
        finally:
            signal.signal(signal.SIGTERM, previous)


class TestOneStartAtATime:
    """Found by a black-box review: a second start() shared the first run's state, and a
    stop() then ended one of them while join() said the worker had stopped."""

    def test_a_second_start_while_running_is_refused_and_stop_ends_the_worker(
        self, redis_url: str, redis_client: Any
    ) -> None:
        ran: list[str] = []
        consumer = consumer_for(redis_url, lambda message: ran.append(message.task_id))
        handle = Running(consumer)
        handle.thread.start()
        wait_until(lambda: redis_client.zscore(KEYS.workers, consumer.worker_id), 10.0)
        with pytest.raises(QueueError, match="already running"):
            consumer.start()
        with pytest.raises(QueueError, match="already running"):
            consumer.__enter__()
        consumer.stop()
        assert consumer.join(10) is True
        handle.thread.join(5)
        assert not handle.thread.is_alive(), "start() still runs after stop() and join()"
        assert handle.error is None
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            assert producer.status(task_id) == "pending"
        assert ran == []
        # once stopped, it may start again
        with consumer:
            wait_until(lambda: ran == [task_id], 10.0, "the task, after a restart")


class TestAStopForAnEndedRun:
    """Found by a black-box review: ``with c: c.stop(); c.join()`` left the block's own
    stop() behind, and the same consumer's next run returned at once, taking nothing."""

    def test_the_next_run_after_a_with_block_that_stopped_and_joined_takes_tasks(
        self, redis_url: str
    ) -> None:
        ran: list[str] = []
        consumer = consumer_for(redis_url, lambda message: ran.append(message.task_id))
        with consumer:
            consumer.stop()
            assert consumer.join(10) is True
        with TaskProducer(redis_url, "q", FAST, registry=CollectorRegistry()) as producer:
            first = producer.enqueue(payload(0))
            handle = Running(consumer)
            handle.thread.start()
            assert producer.wait_for_result(first, timeout=10) is not None, "start() took nothing"
            consumer.stop()
            handle.thread.join(10)
            assert handle.error is None
            second = producer.enqueue(payload(1))
            with consumer:
                assert producer.wait_for_result(second, timeout=10) is not None
        assert ran == [first, second]
