"""Result waiting against a real redis-server (issue 9, item 5).

A waiter returns by its deadline whatever Redis does (killed, hung), skips whatever else is
published on its channel, reads the stored result only once its subscription is
confirmed, listens on its session's channel when it knows the session, and all the
waiters of one producer share one pub/sub connection.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from fault_proxy import LossyProxy
from redis_server import RedisServer
from semibot_queue import (
    InvalidTaskError,
    QueueConnectionError,
    QueueError,
    QueueSettings,
    TaskProducer,
    TaskResult,
)
from semibot_queue.codec import Codec
from semibot_queue.keys import KeySpace
from support import FAST, payload, wait_until

KEYS = KeySpace("q")
CODEC = Codec(1 << 20)

#: How late past its deadline a waiter may return: thread scheduling on a busy machine.
SLACK_S = 0.3


def producer_for(url: str, settings: QueueSettings = FAST) -> TaskProducer:
    return TaskProducer(url, "q", settings, registry=CollectorRegistry())


def finish(client: redis.Redis[bytes], task_id: str, session_id: str, value: int = 1) -> TaskResult:
    """Store and publish a result as a worker's ack does (stored first, then published)."""
    result = TaskResult(task_id=task_id, session_id=session_id, status="succeeded", result=value)
    encoded = CODEC.encode_result(result)
    client.set(KEYS.result(task_id), encoded, ex=60)
    client.publish(KEYS.result_channel(session_id), encoded)
    return result


def subscribers(client: redis.Redis[bytes], session_id: str) -> int:
    """Connections subscribed to a session's result channel."""
    return int(client.pubsub_numsub(KEYS.result_channel(session_id))[0][1])


def pubsub_connections(client: redis.Redis[bytes]) -> int:
    """Connections of the server in pub/sub mode (subscribed to a channel or pattern)."""
    return sum(
        1
        for entry in client.client_list()
        if int(entry.get("sub", 0)) or int(entry.get("psub", 0)) or "P" in entry.get("flags", "")
    )


class Waiting:
    """``wait_for_result`` run in a thread; remembers what it returned or raised, and when."""

    def __init__(self, producer: TaskProducer, task_id: str, timeout: float, **kw: str) -> None:
        self.result: TaskResult | None = None
        self.error: BaseException | None = None
        self.started = self.ended = 0.0
        self.done = threading.Event()

        def run() -> None:
            self.started = time.monotonic()
            try:
                self.result = producer.wait_for_result(task_id, timeout, **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc
            finally:
                self.ended = time.monotonic()
                self.done.set()

        self.thread = threading.Thread(target=run, name=f"test-waiter-{task_id}")
        self.thread.start()

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the waiter did not return"

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, that the test may kill or freeze."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


class TestDeadlines:
    """The deadline holds whatever Redis does."""

    # Was a package bug (issue 9): with Redis down, wait_for_result(timeout=2) returned
    # after ~16 s (minutes with the default settings).
    def test_a_waiter_whose_redis_is_killed_mid_wait_returns_by_its_deadline(
        self, own_redis: RedisServer
    ) -> None:
        settings = QueueSettings(error_retry_delay=1.0, max_reconnect_attempts=10)
        with own_redis.client() as admin, producer_for(own_redis.url, settings) as producer:
            task_id = producer.enqueue(payload(1))
            waiting = Waiting(producer, task_id, timeout=2.0)
            wait_until(lambda: subscribers(admin, "session-1") == 1, what="the subscription")
            own_redis.kill()
            waiting.join()
        assert waiting.result is None
        assert waiting.error is None or isinstance(waiting.error, QueueConnectionError)
        assert waiting.elapsed <= 2.0 + SLACK_S

    def test_a_waiter_on_a_redis_that_is_down_from_the_start_says_so_by_its_deadline(
        self, own_redis: RedisServer
    ) -> None:
        with producer_for(own_redis.url) as producer:
            task_id = producer.enqueue(payload(1))
            own_redis.kill()
            started = time.monotonic()
            with pytest.raises(QueueConnectionError, match="could not be asked"):
                producer.wait_for_result(task_id, timeout=1.0)
        assert time.monotonic() - started <= 1.0 + SLACK_S

    def test_a_waiter_whose_redis_hangs_returns_by_its_deadline(
        self, own_redis: RedisServer
    ) -> None:
        with own_redis.client() as admin, producer_for(own_redis.url) as producer:
            task_id = producer.enqueue(payload(1))
            pid = int(admin.info("server")["process_id"])
            waiting = Waiting(producer, task_id, timeout=1.5)
            wait_until(lambda: subscribers(admin, "session-1") == 1, what="the subscription")
            os.kill(pid, signal.SIGSTOP)  # the socket stays open, nothing answers
            try:
                waiting.join()
            finally:
                os.kill(pid, signal.SIGCONT)
        assert waiting.result is None
        assert waiting.error is None or isinstance(waiting.error, QueueConnectionError)
        assert waiting.elapsed <= 1.5 + SLACK_S

    def test_a_waiter_gets_a_result_published_after_redis_came_back(
        self, own_redis: RedisServer
    ) -> None:
        with own_redis.client() as admin, producer_for(own_redis.url) as producer:
            task_id = producer.enqueue(payload(1))
            waiting = Waiting(producer, task_id, timeout=20.0)
            wait_until(lambda: subscribers(admin, "session-1") == 1, what="the subscription")
            own_redis.kill()
            own_redis.restart()  # not persistent: the result below is the only data
            with own_redis.client() as again:
                wait_until(lambda: subscribers(again, "session-1") == 1, what="resubscribed")
                expected = finish(again, task_id, "session-1")
            waiting.join()
        assert waiting.result == expected

    def test_a_missing_result_returns_none_at_the_timeout(self, redis_url: str) -> None:
        with producer_for(redis_url) as producer:
            started = time.monotonic()
            assert producer.wait_for_result("never-enqueued", timeout=0.3) is None
        assert 0.3 <= time.monotonic() - started <= 0.3 + SLACK_S

    def test_a_timeout_of_zero_reads_the_stored_result_once(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            assert producer.wait_for_result(task_id, timeout=0) is None
            expected = finish(redis_client, task_id, "session-1")
            assert producer.wait_for_result(task_id, timeout=0) == expected

    @pytest.mark.parametrize(
        ("kw", "says"),
        [
            ({"timeout": -1}, "timeout"),
            ({"timeout": float("nan")}, "timeout"),
            ({"timeout": "5"}, "timeout"),
            ({"session_id": ""}, "session_id"),
        ],
        ids=["negative", "nan", "text", "empty-session"],
    )
    def test_a_bad_timeout_or_session_is_refused_by_name(
        self, redis_url: str, kw: dict[str, object], says: str
    ) -> None:
        with producer_for(redis_url) as producer, pytest.raises(InvalidTaskError, match=says):
            producer.wait_for_result("t1", **kw)  # type: ignore[arg-type]

    def test_a_waiter_still_waiting_when_the_producer_disconnects_is_told(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        producer = producer_for(redis_url)
        producer.connect()
        task_id = producer.enqueue(payload(1))
        waiting = Waiting(producer, task_id, timeout=30.0)
        wait_until(lambda: subscribers(redis_client, "session-1") == 1, what="the subscription")
        producer.disconnect()
        waiting.join()
        assert isinstance(waiting.error, QueueError)
        assert "disconnected" in str(waiting.error)
        assert waiting.elapsed < 5.0


class TestChannelNoise:
    """Whatever else is published on a session's channel is skipped."""

    # Was a package bug (issue 9): a progress note on the session's channel made the
    # waiter raise InvalidTaskError.
    def test_messages_that_are_not_this_tasks_result_are_skipped(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            other = producer.enqueue(payload(4))  # also of session-1
            waiting = Waiting(producer, task_id, timeout=10.0)
            wait_until(lambda: subscribers(redis_client, "session-1") == 1, what="the waiter")
            channel = KEYS.result_channel("session-1")
            for noise in (
                b"not json",
                b"[1, 2, 3]",
                b'{"task_id": "' + task_id.encode() + b'", "type": "progress", "step": 1}',
                b'{"task_id": "' + task_id.encode() + b'", "status": "completed"}',
                b"\xff\xfe garbage",
            ):
                redis_client.publish(channel, noise)
            finish(redis_client, other, "session-1", value=2)
            expected = finish(redis_client, task_id, "session-1", value=3)
            waiting.join()
        assert waiting.error is None
        assert waiting.result == expected


class TestSubscriptions:
    """The session's channel is subscribed (and confirmed) before the stored result is read."""

    # Was a package bug (issue 9): the stored result was read before the subscription was
    # confirmed, so a result published in between was missed.
    def test_the_stored_result_is_read_only_once_the_subscription_is_confirmed(
        self, redis_server: RedisServer, redis_client: redis.Redis[bytes]
    ) -> None:
        proxy = LossyProxy(redis_server.port)
        proxy.start()
        try:
            with producer_for(proxy.url) as producer:
                task_id = producer.enqueue(payload(1))
                expected = finish(redis_client, task_id, "session-1")
                reads_before = self.result_reads(redis_client)
                proxy.delay_reply_to(b"SUBSCRIBE", 1.0)
                waiting = Waiting(producer, task_id, timeout=10.0)
                assert proxy.request_seen.wait(5), "the waiter never subscribed"
                # While the confirmation is held back, the stored result is not read.
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    assert self.result_reads(redis_client) == reads_before
                    assert not waiting.done.wait(0.02)
                waiting.join()
        finally:
            proxy.close()
        assert waiting.result == expected
        assert self.result_reads(redis_client) > reads_before

    @staticmethod
    def result_reads(client: redis.Redis[bytes]) -> int:
        stats = client.info("commandstats")
        names = ("cmdstat_get", "cmdstat_mget")
        return sum(int(stats.get(name, {}).get("calls", 0)) for name in names)

    def test_a_session_given_avoids_the_pattern_subscription(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as first, producer_for(redis_url) as second:
            task_id = first.enqueue(payload(2))  # session-2; `second` never saw it
            waiting = Waiting(second, task_id, timeout=10.0, session_id="session-2")
            wait_until(lambda: subscribers(redis_client, "session-2") == 1, what="the channel")
            assert redis_client.pubsub_numpat() == 0
            expected = finish(redis_client, task_id, "session-2")
            waiting.join()
        assert waiting.result == expected

    def test_a_waiter_that_knows_no_session_listens_by_pattern(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as first, producer_for(redis_url) as second:
            task_id = first.enqueue(payload(4))
            waiting = Waiting(second, task_id, timeout=10.0)
            wait_until(lambda: redis_client.pubsub_numpat() == 1, what="the pattern")
            expected = finish(redis_client, task_id, "session-1")
            waiting.join()
        assert waiting.result == expected

    def test_a_channel_is_subscribed_once_for_all_its_waiters_and_left_after_the_last(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as producer:
            ids = [producer.enqueue(payload(n)) for n in (1, 4, 7)]  # all of session-1
            waiters = [Waiting(producer, task_id, timeout=10.0) for task_id in ids]
            wait_until(lambda: subscribers(redis_client, "session-1") == 1, what="the channel")
            for task_id in ids[:2]:
                finish(redis_client, task_id, "session-1")
            for waiting in waiters[:2]:
                waiting.join()
            assert subscribers(redis_client, "session-1") == 1  # the third still waits
            finish(redis_client, ids[2], "session-1")
            waiters[2].join()
            wait_until(lambda: subscribers(redis_client, "session-1") == 0, what="unsubscribed")
        assert [w.result.task_id if w.result else None for w in waiters] == ids

    def test_two_hundred_concurrent_waiters_share_one_pubsub_connection(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        count = 200
        with producer_for(redis_url) as producer, producer_for(redis_url) as other:
            ids = [producer.enqueue(payload(n)) for n in range(count - 20)]
            foreign = [other.enqueue(payload(n)) for n in range(20)]  # waited for by pattern
            waiters = [Waiting(producer, task_id, timeout=60.0) for task_id in ids + foreign]
            for session in ("session-0", "session-1", "session-2"):
                wait_until(lambda s=session: subscribers(redis_client, s) == 1, what=session)
            wait_until(lambda: redis_client.pubsub_numpat() == 1, what="the pattern")
            assert not any(w.done.is_set() for w in waiters)
            seen = max(pubsub_connections(redis_client) for _ in range(20))
            print(f"\n{count} concurrent waiters: {seen} Redis connection(s) for pub/sub")
            expected = {}
            for n, task_id in enumerate(ids):
                expected[task_id] = finish(redis_client, task_id, f"session-{n % 3}", n)
            for n, task_id in enumerate(foreign):
                expected[task_id] = finish(redis_client, task_id, f"session-{n % 3}", n)
            for waiting in waiters:
                waiting.join(30)
        assert seen <= 2
        assert [w.result for w in waiters] == [expected[t] for t in ids + foreign]

    def test_a_waiter_whose_subscription_drops_subscribes_again_and_gets_its_result(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        with producer_for(redis_url) as producer:
            task_id = producer.enqueue(payload(1))
            waiting = Waiting(producer, task_id, timeout=10.0)
            wait_until(lambda: subscribers(redis_client, "session-1") == 1, what="the waiter")
            assert redis_client.client_kill_filter(_type="pubsub") >= 1
            # Published while the link is down: only the stored copy can be found.
            expected = finish(redis_client, task_id, "session-1")
            waiting.join()
        assert waiting.result == expected
