"""Each Lua script on its own, against a real redis-server, through ``Scripts``.

Every state change of the queue is one script (DESIGN invariant 2); these tests pin what each
one writes, what it refuses, and that a refusal writes nothing. Times are checked against the
Redis clock (``TIME``), the clock the scripts themselves use.

Tests marked "was a package bug" pin defects found while writing them.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import fakeredis
import pytest
import redis
from redis.client import PubSub

from semibot_queue.codec import Codec, split_redelivery, task_id_of
from semibot_queue.dead_letter import raw_bytes
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts

#: How long a test waits for a pub/sub message that must arrive.
MESSAGE_DEADLINE_S = 5.0

#: Dead-after limit that no freshly heartbeating worker can exceed during a test.
ONE_MINUTE_MS = 60_000

KEYS = KeySpace("q")
CHANNEL = "agent:results:session-1"
TTL = 3600


def task(n: int | str) -> bytes:
    """A stored task whose task id is ``t<n>``."""
    return json.dumps({"task_id": f"t{n}", "session_id": "session-1"}).encode()


def push(scripts: Scripts, tasks: list[bytes], max_length: int) -> int:
    """enqueue.lua on stored tasks, each marked as accepted by its task id for a minute."""
    return scripts.enqueue([(task_id_of(t), t) for t in tasks], max_length, 60)


def marked(lost: int, body: bytes) -> bytes:
    return b"~%d~" % lost + body


def released(crashes: int, given_back: int, body: bytes) -> bytes:
    return b"~%dr%d~" % (crashes, given_back) + body


def redis_ms(client: redis.Redis[bytes]) -> int:
    """Now on the Redis clock, in ms, computed as the scripts do."""
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


@pytest.fixture
def scripts(redis_client: redis.Redis[bytes]) -> Iterator[Scripts]:
    bound = Scripts(redis_client, KEYS)
    yield bound
    bound.close()


def snapshot(client: redis.Redis[bytes]) -> dict[bytes, Any]:
    """Every key of the database with its type and content, to prove that nothing changed."""
    state: dict[bytes, Any] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            state[key] = client.hgetall(key)
        else:
            state[key] = client.get(key)
    return state


def next_message(pubsub: PubSub) -> dict[str, Any]:
    """The next pub/sub message, waiting at most MESSAGE_DEADLINE_S for it."""
    deadline = time.monotonic() + MESSAGE_DEADLINE_S
    while (left := deadline - time.monotonic()) > 0:
        received = pubsub.get_message(timeout=left)
        if received is not None:
            return received
    raise AssertionError(f"no pub/sub message within {MESSAGE_DEADLINE_S} s")


@contextmanager
def listening(client: redis.Redis[bytes], channel: str) -> Iterator[PubSub]:
    """A subscription to ``channel`` that Redis has confirmed, so no publish can be missed."""
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    try:
        confirmation = next_message(pubsub)
        assert confirmation["type"] == "subscribe"
        yield pubsub
    finally:
        pubsub.close()


def assert_nothing_published(client: redis.Redis[bytes], pubsub: PubSub, channel: str) -> None:
    """Publish a sentinel and check that it is the first message: nothing came before it."""
    client.publish(channel, b"sentinel")
    assert next_message(pubsub)["data"] == b"sentinel"


def fill_pending(client: redis.Redis[bytes], count: int, prefix: str = "filler") -> None:
    client.lpush(KEYS.pending, *[task(f"{prefix}{i}") for i in range(count)])


def register_dead_worker(client: redis.Redis[bytes], worker: str, *tasks: bytes) -> None:
    """A worker last seen two minutes ago, holding ``tasks`` (oldest first) in flight."""
    client.zadd(KEYS.workers, {worker: redis_ms(client) - 2 * ONE_MINUTE_MS})
    for stored in tasks:
        client.lpush(KEYS.inflight(worker), stored)


def take_all(scripts: Scripts, worker: str = "taker") -> list[bytes]:
    return scripts.fetch(KEYS.inflight(worker), 1000)


# --- the scripts as files ---------------------------------------------------------------------

LUA_NAMES = sorted(
    entry.name.removesuffix(".lua")
    for entry in resources.files("semibot_queue").joinpath("lua").iterdir()
    if entry.name.endswith(".lua")
)


class TestScriptFiles:
    """Each script is a file whose header documents every KEYS and ARGV slot it reads."""

    def test_there_is_one_script_per_state_change(self) -> None:
        assert LUA_NAMES == [
            "ack",
            "dead_letter",
            "dlq_delete",
            "dlq_retry",
            "enqueue",
            "fetch",
            "heartbeat",
            "promote",
            "publish_result",
            "purge",
            "recover",
            "release",
            "retry",
            "trim_dead",
        ]

    @pytest.mark.parametrize("name", LUA_NAMES)
    def test_the_header_names_the_script_and_documents_each_slot_used(self, name: str) -> None:
        text = resources.files("semibot_queue").joinpath("lua", f"{name}.lua").read_text("utf-8")
        lines = text.splitlines()
        header = [line for line in lines if line.startswith("--")]
        code = "\n".join(line for line in lines if not line.startswith("--"))
        assert lines[0].startswith(f"-- {name}: ")
        for slot in set(re.findall(r"(?:KEYS|ARGV)\[\d+\]", code)):
            assert any(line.startswith(f"-- {slot}") for line in header), slot


# --- how scripts reach Redis -----------------------------------------------------------------


class TestScriptConnections:
    """Scripts run on one pooled connection per thread, reload after a flush, and give back."""

    def test_a_script_that_redis_forgot_is_loaded_again(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert push(scripts, [task(1)], max_length=10) == 1
        redis_client.script_flush()
        assert push(scripts, [task(2)], max_length=10) == 2

    def test_a_dropped_connection_fails_one_call_and_the_next_call_reconnects(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1)], max_length=10)
        # Other tests may leave idle clients on the shared server: ours is among those killed.
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
        with pytest.raises(redis.ConnectionError):
            push(scripts, [task(2)], max_length=10)
        assert push(scripts, [task(3)], max_length=10) == 2
        assert take_all(scripts) == [task(1), task(3)]

    def test_each_thread_keeps_one_connection_until_close_gives_them_all_back(
        self, redis_url: str
    ) -> None:
        pool = redis.ConnectionPool.from_url(redis_url, max_connections=2)
        client = redis.Redis(connection_pool=pool)
        bound = Scripts(client, KEYS)
        try:
            push(bound, [task(1)], max_length=10)
            push(bound, [task(2)], max_length=10)  # the same thread reuses its connection
            assert client.ping() is True
            other = threading.Thread(target=bound.fetch, args=(KEYS.inflight("w1"), 1))
            other.start()
            other.join()
            with pytest.raises(redis.ConnectionError, match="Too many connections"):
                client.ping()
            bound.close()
            assert client.ping() is True
            assert bound.fetch(KEYS.inflight("w1"), 5) == [task(2)]
        finally:
            bound.close()
            client.close()


# --- enqueue and fetch ------------------------------------------------------------------------


class TestEnqueue:
    """enqueue pushes a batch all or nothing, never beyond the limit."""

    def test_enqueue_returns_the_new_length_up_to_the_limit_exactly(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert [push(scripts, [task(i)], max_length=3) for i in range(3)] == [1, 2, 3]
        assert push(scripts, [task(3)], max_length=3) == -1
        assert redis_client.llen(KEYS.pending) == 3

    def test_a_task_id_already_accepted_is_not_pushed_again(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert push(scripts, [task(1), task(2)], max_length=10) == 2
        # A repeat after a lost reply, and a batch mixing old and new ids: one copy each.
        assert push(scripts, [task(1), task(2)], max_length=10) == 2
        assert push(scripts, [task(2), task(3)], max_length=10) == 3
        assert take_all(scripts) == [task(1), task(2), task(3)]
        ttl = redis_client.ttl(KEYS.accepted("t1"))
        assert 0 < ttl <= 60

    def test_a_repeat_of_a_full_batch_fits_even_when_the_queue_is_full(
        self, scripts: Scripts
    ) -> None:
        assert push(scripts, [task(1), task(2)], max_length=2) == 2
        assert push(scripts, [task(1), task(2)], max_length=2) == 2

    def test_enqueue_accepts_a_batch_that_fills_the_queue_exactly(self, scripts: Scripts) -> None:
        assert push(scripts, [task(1), task(2), task(3)], max_length=3) == 3

    def test_enqueue_refuses_a_batch_that_does_not_all_fit_and_writes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1), task(2)], max_length=10)
        before = snapshot(redis_client)
        assert push(scripts, [task(3), task(4)], max_length=3) == -1
        assert snapshot(redis_client) == before

    def test_enqueue_refuses_a_batch_larger_than_an_empty_queue(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert push(scripts, [task(i) for i in range(4)], max_length=3) == -1
        assert redis_client.exists(KEYS.pending) == 0

    def test_enqueue_of_an_empty_batch_writes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert push(scripts, [], max_length=3) == 0
        assert redis_client.exists(KEYS.pending) == 0

    def test_tasks_are_fetched_in_the_order_they_were_enqueued(self, scripts: Scripts) -> None:
        push(scripts, [task(1), task(2)], max_length=10)
        push(scripts, [task(3)], max_length=10)
        push(scripts, [task(4), task(5)], max_length=10)
        assert take_all(scripts) == [task(i) for i in range(1, 6)]

    def test_enqueue_writes_only_the_pending_list_and_the_markers(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1)], max_length=10)
        assert sorted(redis_client.keys("*")) == sorted(
            [KEYS.pending.encode(), KEYS.accepted("t1").encode()]
        )


class TestFetch:
    """fetch moves up to N pending tasks into a worker's in-flight list, oldest first."""

    def test_fetch_moves_at_most_n_oldest_first(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(i) for i in range(5)], max_length=10)
        assert scripts.fetch(KEYS.inflight("w1"), 2) == [task(0), task(1)]
        assert redis_client.lrange(KEYS.inflight("w1"), 0, -1) == [task(1), task(0)]
        assert scripts.fetch(KEYS.inflight("w1"), 2) == [task(2), task(3)]
        assert redis_client.llen(KEYS.pending) == 1

    def test_fetch_takes_what_there_is_when_asked_for_more(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1), task(2)], max_length=10)
        assert scripts.fetch(KEYS.inflight("w1"), 10) == [task(1), task(2)]
        assert redis_client.exists(KEYS.pending) == 0

    def test_fetch_from_an_empty_queue_returns_nothing_and_writes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.fetch(KEYS.inflight("w1"), 5) == []
        assert redis_client.keys("*") == []

    def test_fetch_of_zero_moves_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1)], max_length=10)
        assert scripts.fetch(KEYS.inflight("w1"), 0) == []
        assert redis_client.llen(KEYS.pending) == 1

    def test_two_workers_never_get_the_same_task(self, scripts: Scripts) -> None:
        push(scripts, [task(i) for i in range(4)], max_length=10)
        first = scripts.fetch(KEYS.inflight("w1"), 3)
        second = scripts.fetch(KEYS.inflight("w2"), 3)
        assert first == [task(0), task(1), task(2)]
        assert second == [task(3)]


# --- finishing a task -------------------------------------------------------------------------


def result_json(n: int | str, status: str = "succeeded") -> bytes:
    return json.dumps({"task_id": f"t{n}", "status": status}).encode()


class TestAck:
    """ack finishes tasks (out of flight, result stored and published), then takes more."""

    def test_ack_removes_the_task_stores_the_result_and_publishes_it(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        push(scripts, [task(1), task(2)], max_length=10)
        scripts.fetch(inflight, 2)
        with listening(redis_client, CHANNEL) as pubsub:
            assert scripts.ack(inflight, TTL, [(task(1), "t1", result_json(1), CHANNEL)]) == (
                [1],
                [],
            )
            published = next_message(pubsub)
        assert (published["channel"], published["data"]) == (CHANNEL.encode(), result_json(1))
        assert redis_client.lrange(inflight, 0, -1) == [task(2)]
        assert redis_client.get(KEYS.result("t1")) == result_json(1)
        assert 0 < redis_client.ttl(KEYS.result("t1")) <= TTL

    def test_ack_of_a_task_no_longer_in_flight_returns_0_and_writes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(2))
        before = snapshot(redis_client)
        with listening(redis_client, CHANNEL) as pubsub:
            assert scripts.ack(inflight, TTL, [(task(1), "t1", result_json(1), CHANNEL)]) == (
                [0],
                [],
            )
            assert_nothing_published(redis_client, pubsub, CHANNEL)
        assert snapshot(redis_client) == before

    def test_ack_of_several_tasks_flags_each_one(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        push(scripts, [task(1), task(3)], max_length=10)
        scripts.fetch(inflight, 2)
        acks = [(task(n), f"t{n}", result_json(n), CHANNEL) for n in (1, 2, 3)]
        assert scripts.ack(inflight, TTL, acks) == ([1, 0, 1], [])
        assert redis_client.exists(inflight) == 0
        assert redis_client.get(KEYS.result("t1")) == result_json(1)
        assert redis_client.exists(KEYS.result("t2")) == 0
        assert redis_client.get(KEYS.result("t3")) == result_json(3)

    def test_ack_removes_one_copy_of_a_duplicated_task(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1), task(1))
        assert scripts.ack(inflight, TTL, [(task(1), "t1", result_json(1), CHANNEL)]) == ([1], [])
        assert redis_client.lrange(inflight, 0, -1) == [task(1)]

    def test_ack_then_takes_up_to_n_pending_tasks_oldest_first_into_the_same_list(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        push(scripts, [task(1)], max_length=10)
        scripts.fetch(inflight, 1)
        push(scripts, [task(2), task(3), task(4)], max_length=10)
        acks = [(task(1), "t1", result_json(1), CHANNEL)]
        assert scripts.ack(inflight, TTL, acks, take=2) == ([1], [task(2), task(3)])
        assert redis_client.lrange(inflight, 0, -1) == [task(3), task(2)]
        assert redis_client.lrange(KEYS.pending, 0, -1) == [task(4)]
        assert redis_client.get(KEYS.result("t1")) == result_json(1)

    def test_ack_takes_what_there_is_when_pending_runs_short(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1))
        push(scripts, [task(2)], max_length=10)
        acks = [(task(1), "t1", result_json(1), CHANNEL)]
        assert scripts.ack(inflight, TTL, acks, take=5) == ([1], [task(2)])
        assert redis_client.exists(KEYS.pending) == 0

    def test_ack_of_nothing_is_a_plain_batch_fetch(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        push(scripts, [task(1), task(2)], max_length=10)
        assert scripts.ack(inflight, TTL, [], take=1) == ([], [task(1)])
        assert redis_client.lrange(inflight, 0, -1) == [task(1)]

    def test_a_stopping_worker_acks_without_taking(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1))
        push(scripts, [task(2)], max_length=10)
        assert scripts.ack(inflight, TTL, [(task(1), "t1", result_json(1), CHANNEL)], take=0) == (
            [1],
            [],
        )
        assert redis_client.lrange(KEYS.pending, 0, -1) == [task(2)]
        assert redis_client.exists(inflight) == 0

    def test_an_acked_task_is_not_acked_twice(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1))
        ack = [(task(1), "t1", result_json(1), CHANNEL)]
        assert scripts.ack(inflight, TTL, ack) == ([1], [])
        assert scripts.ack(inflight, TTL, ack) == ([0], [])


class TestRetry:
    """retry takes a failed task out of flight and schedules its next attempt on the Redis clock."""

    def test_retry_schedules_the_next_attempt_at_redis_time_plus_the_delay(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1), task(2))
        before = redis_ms(redis_client)
        assert scripts.retry(inflight, task(1), b"next-attempt", delay_ms=5_000) is True
        after = redis_ms(redis_client)
        assert redis_client.lrange(inflight, 0, -1) == [task(2)]
        ((member, due),) = redis_client.zrange(KEYS.scheduled, 0, -1, withscores=True)
        assert member == b"next-attempt"
        assert before + 5_000 <= due <= after + 5_000

    def test_retry_of_a_task_no_longer_in_flight_returns_false_and_writes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(2))
        before = snapshot(redis_client)
        assert scripts.retry(inflight, task(1), b"next-attempt", delay_ms=0) is False
        assert snapshot(redis_client) == before


class TestDeadLetter:
    """dead_letter moves a task out of flight into the dead-letter hash and index."""

    def test_the_record_is_kept_indexed_by_failure_time_and_the_result_published(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(1), task(2))
        before = redis_ms(redis_client)
        with listening(redis_client, CHANNEL) as pubsub:
            moved = scripts.dead_letter(
                inflight, task(1), "t1", b'{"record": 1}', (result_json(1, "failed"), CHANNEL, TTL)
            )
            published = next_message(pubsub)
        after = redis_ms(redis_client)
        assert moved is True
        assert published["data"] == result_json(1, "failed")
        assert redis_client.lrange(inflight, 0, -1) == [task(2)]
        assert redis_client.hgetall(KEYS.dead) == {b"t1": b'{"record": 1}'}
        ((member, failed_at),) = redis_client.zrange(KEYS.dead_index, 0, -1, withscores=True)
        assert member == b"t1"
        assert before <= failed_at <= after
        assert redis_client.get(KEYS.result("t1")) == result_json(1, "failed")
        assert 0 < redis_client.ttl(KEYS.result("t1")) <= TTL

    def test_a_task_with_no_session_to_tell_gets_no_result(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, b"not json")
        with listening(redis_client, CHANNEL) as pubsub:
            assert scripts.dead_letter(inflight, b"not json", "raw-1", b"{}", None) is True
            assert_nothing_published(redis_client, pubsub, CHANNEL)
        assert redis_client.hgetall(KEYS.dead) == {b"raw-1": b"{}"}
        assert redis_client.exists(KEYS.result("raw-1")) == 0

    def test_a_task_no_longer_in_flight_is_not_dead_lettered_and_nothing_is_written(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, task(2))
        before = snapshot(redis_client)
        with listening(redis_client, CHANNEL) as pubsub:
            moved = scripts.dead_letter(
                inflight, task(1), "t1", b"{}", (result_json(1, "failed"), CHANNEL, TTL)
            )
            assert_nothing_published(redis_client, pubsub, CHANNEL)
        assert moved is False
        assert snapshot(redis_client) == before

    # Was a package bug: Scripts.dead_letter always builds KeySpace.result(task_id), even
    # when there is no result to store, and task_id_of returns any string task_id it finds. A
    # raw task such as {"task_id": "a b"} (invalid, so bound for the dead letters) makes it
    # raise InvalidTaskError: the worker cannot dead-letter it and it stays in flight, then is
    # released or recovered and taken again, forever (DESIGN invariant 5).
    @pytest.mark.parametrize(
        "task_id", ["a b", "{other}", "x" * 201], ids=["space", "braces", "too-long"]
    )
    def test_a_task_whose_id_is_unfit_for_a_key_can_still_be_dead_lettered(
        self, scripts: Scripts, redis_client: redis.Redis[bytes], task_id: str
    ) -> None:
        stored = json.dumps({"task_id": task_id}).encode()
        inflight = KEYS.inflight("w1")
        redis_client.lpush(inflight, stored)
        named = task_id_of(stored)
        assert scripts.dead_letter(inflight, stored, named, b"{}", None) is True
        assert redis_client.hkeys(KEYS.dead) == [named.encode()]


class TestTrimDead:
    """trim_dead evicts records past the TTL, then the oldest beyond the length bound."""

    def add_records(self, client: redis.Redis[bytes], ages_ms: dict[str, int]) -> None:
        """Dead letters that failed ``age`` ms ago (simulated through their index score)."""
        now = redis_ms(client)
        client.zadd(KEYS.dead_index, {task_id: now - age for task_id, age in ages_ms.items()})
        client.hset(KEYS.dead, mapping=dict.fromkeys(ages_ms, b"record"))

    def kept(self, client: redis.Redis[bytes]) -> tuple[list[bytes], set[bytes]]:
        return client.zrange(KEYS.dead_index, 0, -1), set(client.hkeys(KEYS.dead))

    def test_records_older_than_the_ttl_are_evicted_oldest_first(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        day = 86_400
        self.add_records(
            redis_client,
            {
                "fresh": 0,
                "older": day * 1000 + 60_000,
                "oldest": 2 * day * 1000,
                "recent": 3_600_000,
            },
        )
        assert scripts.trim_dead(max_length=100, ttl=day) == ["oldest", "older"]
        assert self.kept(redis_client) == ([b"recent", b"fresh"], {b"recent", b"fresh"})

    def test_the_oldest_records_beyond_the_length_bound_are_evicted(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.add_records(redis_client, {f"r{i}": 5_000 - i * 1_000 for i in range(5)})
        assert scripts.trim_dead(max_length=3, ttl=3600) == ["r0", "r1"]
        assert self.kept(redis_client) == ([b"r2", b"r3", b"r4"], {b"r2", b"r3", b"r4"})

    def test_expired_records_count_towards_the_excess_only_once(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        hour_ms = 3_600_000
        ages = {
            "x0": 3 * hour_ms,
            "x1": 2 * hour_ms,
            "f0": 4_000,
            "f1": 3_000,
            "f2": 2_000,
            "f3": 1_000,
        }
        self.add_records(redis_client, ages)
        assert scripts.trim_dead(max_length=3, ttl=3600) == ["x0", "x1", "f0"]
        assert self.kept(redis_client)[0] == [b"f1", b"f2", b"f3"]

    def test_nothing_is_evicted_within_both_bounds(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.add_records(redis_client, {"a": 2_000, "b": 1_000})
        before = snapshot(redis_client)
        assert scripts.trim_dead(max_length=2, ttl=3600) == []
        assert snapshot(redis_client) == before

    def test_an_empty_dead_letter_store_is_left_alone(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.trim_dead(max_length=1, ttl=1) == []
        assert redis_client.keys("*") == []


class TestPromote:
    """promote moves due retries to pending, oldest due first, only as many as fit."""

    def schedule(self, client: redis.Redis[bytes], due_in_ms: dict[bytes, int]) -> None:
        now = redis_ms(client)
        client.zadd(KEYS.scheduled, {member: now + delta for member, delta in due_in_ms.items()})

    def test_only_due_retries_are_promoted_oldest_due_first(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.schedule(redis_client, {task(2): -1_000, task(1): -2_000, task(3): ONE_MINUTE_MS})
        assert scripts.promote(batch=100, max_length=100) == 2
        assert take_all(scripts) == [task(1), task(2)]
        assert redis_client.zrange(KEYS.scheduled, 0, -1) == [task(3)]

    def test_promoted_retries_queue_behind_tasks_already_pending(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task("new")], max_length=10)
        self.schedule(redis_client, {task(1): -1_000})
        assert scripts.promote(batch=100, max_length=100) == 1
        assert take_all(scripts) == [task("new"), task(1)]

    def test_only_as_many_as_fit_under_the_limit_are_promoted(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 2)
        self.schedule(redis_client, {task(1): -3_000, task(2): -2_000, task(3): -1_000})
        assert scripts.promote(batch=100, max_length=3) == 1
        assert redis_client.llen(KEYS.pending) == 3
        assert redis_client.lindex(KEYS.pending, 0) == task(1)
        assert redis_client.zrange(KEYS.scheduled, 0, -1) == [task(2), task(3)]

    def test_a_full_queue_promotes_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 3)
        self.schedule(redis_client, {task(1): -1_000})
        before = snapshot(redis_client)
        assert scripts.promote(batch=100, max_length=3) == 0
        assert snapshot(redis_client) == before

    def test_at_most_one_batch_is_promoted_per_call(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.schedule(redis_client, {task(i): -10_000 + i for i in range(5)})
        assert scripts.promote(batch=2, max_length=100) == 2
        assert take_all(scripts) == [task(0), task(1)]
        assert redis_client.zcard(KEYS.scheduled) == 3


class TestHeartbeat:
    """heartbeat records a worker as alive at the Redis time."""

    def test_heartbeat_scores_the_worker_with_redis_time(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        before = redis_ms(redis_client)
        beat = scripts.heartbeat("w1")
        after = redis_ms(redis_client)
        assert before <= beat <= after
        assert redis_client.zscore(KEYS.workers, "w1") == beat

    def test_a_later_heartbeat_moves_the_score_forward(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.zadd(KEYS.workers, {"w1": 1})
        beat = scripts.heartbeat("w1")
        assert redis_client.zrange(KEYS.workers, 0, -1, withscores=True) == [(b"w1", beat)]


# --- crash recovery and shutdown --------------------------------------------------------------


def recover(
    scripts: Scripts,
    worker: str = "dead",
    max_deliveries: int = 3,
    batch: int = 100,
    max_length: int = 100,
) -> Any:
    return scripts.recover(worker, ONE_MINUTE_MS, max_deliveries, batch, max_length)


class TestRecover:
    """recover puts a dead worker's tasks back in their order, and dead-letters poison."""

    def test_a_live_worker_is_left_alone(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("alive")
        redis_client.lpush(KEYS.inflight("alive"), task(1))
        before = snapshot(redis_client)
        assert recover(scripts, "alive") is None
        assert snapshot(redis_client) == before

    def test_a_dead_workers_tasks_go_back_in_order_at_the_taking_end(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1), task(2), task(3)], max_length=10)
        scripts.fetch(KEYS.inflight("dead"), 3)
        redis_client.zadd(KEYS.workers, {"dead": redis_ms(redis_client) - 2 * ONE_MINUTE_MS})
        push(scripts, [task("later")], max_length=10)

        assert recover(scripts) == (0, ["t3", "t2", "t1"], [])
        assert take_all(scripts) == [
            marked(1, task(1)),
            marked(1, task(2)),
            marked(1, task(3)),
            task("later"),
        ]
        assert redis_client.exists(KEYS.inflight("dead")) == 0
        assert redis_client.zscore(KEYS.workers, "dead") is None

    def test_a_worker_that_never_registered_is_dead(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.lpush(KEYS.inflight("ghost"), task(1))
        assert recover(scripts, "ghost") == (0, ["t1"], [])
        assert redis_client.lrange(KEYS.pending, 0, -1) == [marked(1, task(1))]

    def test_deliveries_lost_are_counted_across_recoveries(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        register_dead_worker(redis_client, "first", task(1))
        recover(scripts, "first")
        taken = scripts.fetch(KEYS.inflight("second"), 1)
        assert taken == [marked(1, task(1))]
        register_dead_worker(redis_client, "second")
        assert recover(scripts, "second") == (0, ["t1"], [])
        assert redis_client.lrange(KEYS.pending, 0, -1) == [marked(2, task(1))]

    def test_a_task_at_the_delivery_limit_is_dead_lettered_as_poison_with_its_raw_body(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        register_dead_worker(redis_client, "dead", marked(2, task(1)), marked(1, task(2)))
        before = redis_ms(redis_client)
        assert recover(scripts, max_deliveries=3) == (0, ["t2"], ["t1"])
        after = redis_ms(redis_client)

        assert redis_client.lrange(KEYS.pending, 0, -1) == [marked(2, task(2))]
        record = Codec(1_000_000).decode_record(redis_client.hget(KEYS.dead, "t1") or b"")
        assert (record.task_id, record.reason, record.error_type) == (
            "t1",
            "poison",
            "PoisonTaskError",
        )
        assert raw_bytes(record) == task(1)
        assert record.raw_encoding == "base64"
        assert (record.delivery_count, record.worker_id, record.message) == (3, "dead", None)
        assert before / 1000 <= record.failed_at <= after / 1000
        assert "3 times" in record.error
        assert redis_client.zscore(KEYS.dead_index, "t1") is not None

    def test_a_poison_task_that_is_not_json_is_named_by_the_sha1_of_its_body(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        body = b"not json at all"
        register_dead_worker(redis_client, "dead", marked(2, body))
        expected = "raw-" + hashlib.sha1(body, usedforsecurity=False).hexdigest()
        assert recover(scripts) == (0, [], [expected])
        assert task_id_of(marked(2, body)) == expected
        record = Codec(1_000_000).decode_record(redis_client.hget(KEYS.dead, expected) or b"")
        assert raw_bytes(record) == body

    def test_a_redelivery_marker_round_trips_through_python(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        register_dead_worker(redis_client, "dead", marked(1, task(1)))
        recover(scripts)
        (stored,) = take_all(scripts)
        assert split_redelivery(stored) == (2, task(1))
        assert task_id_of(stored) == "t1"

    # Was a package bug: recover.lua wrote a non-UTF-8 body into a JSON record as is.
    def test_a_poison_task_that_is_not_utf8_leaves_a_readable_record_of_its_bytes(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        body = b"\xff\xfe not utf-8"
        register_dead_worker(redis_client, "dead", marked(2, body))
        (poisoned,) = recover(scripts)[2]
        record = Codec(1_000_000).decode_record(redis_client.hget(KEYS.dead, poisoned) or b"")
        assert raw_bytes(record) == body

    def test_a_full_pending_list_leaves_the_tasks_in_flight_and_the_worker_registered(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 3)
        register_dead_worker(redis_client, "dead", task(1), task(2))
        before = snapshot(redis_client)
        assert recover(scripts, max_length=3) == (2, [], [])
        assert snapshot(redis_client) == before

    def test_a_nearly_full_pending_list_takes_what_fits_and_the_rest_waits(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 2)
        register_dead_worker(redis_client, "dead", task(1), task(2), task(3))
        assert recover(scripts, max_length=3) == (2, ["t3"], [])
        assert redis_client.llen(KEYS.pending) == 3
        assert redis_client.zscore(KEYS.workers, "dead") is not None

        redis_client.delete(KEYS.pending)
        assert recover(scripts, max_length=3) == (0, ["t2", "t1"], [])
        assert take_all(scripts) == [marked(1, task(1)), marked(1, task(2))]
        assert redis_client.zscore(KEYS.workers, "dead") is None

    def test_poison_takes_no_room_on_the_pending_list(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 2)
        register_dead_worker(redis_client, "dead", task(1), marked(2, task(2)))
        assert recover(scripts, max_length=3) == (0, ["t1"], ["t2"])

    def test_one_call_moves_at_most_one_batch(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        register_dead_worker(redis_client, "dead", task(1), task(2), task(3))
        assert recover(scripts, batch=2) == (1, ["t3", "t2"], [])
        assert redis_client.zscore(KEYS.workers, "dead") is not None
        assert recover(scripts, batch=2) == (0, ["t1"], [])
        assert take_all(scripts) == [marked(1, task(i)) for i in (1, 2, 3)]

    def test_a_dead_worker_with_nothing_in_flight_is_forgotten(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        register_dead_worker(redis_client, "dead")
        assert recover(scripts) == (0, [], [])
        assert redis_client.exists(KEYS.workers) == 0


class TestRelease:
    """release gives a stopping worker's tasks back, marked, then deregisters it."""

    def test_release_requeues_in_order_at_the_taking_end_and_deregisters(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("w1")
        push(scripts, [task(1), task(2)], max_length=10)
        scripts.fetch(KEYS.inflight("w1"), 2)
        redis_client.lpush(KEYS.inflight("w1"), marked(2, task(3)))
        push(scripts, [task("later")], max_length=10)

        assert scripts.release("w1", max_length=10) == 0
        assert take_all(scripts) == [
            released(0, 1, task(1)),
            released(0, 1, task(2)),
            released(2, 1, task(3)),
            task("later"),
        ]
        assert redis_client.exists(KEYS.inflight("w1")) == 0
        assert redis_client.zscore(KEYS.workers, "w1") is None

    def test_release_into_a_nearly_full_queue_gives_back_what_fits_and_stays_registered(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("w1")
        fill_pending(redis_client, 2)
        redis_client.lpush(KEYS.inflight("w1"), task(1), task(2), task(3))
        assert scripts.release("w1", max_length=3) == 2
        assert redis_client.lindex(KEYS.pending, -1) == released(0, 1, task(3))
        assert redis_client.lrange(KEYS.inflight("w1"), 0, -1) == [task(2), task(1)]
        assert redis_client.zscore(KEYS.workers, "w1") is not None

    def test_release_into_a_full_queue_moves_nothing(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("w1")
        fill_pending(redis_client, 3)
        redis_client.lpush(KEYS.inflight("w1"), task(1))
        before = snapshot(redis_client)
        assert scripts.release("w1", max_length=3) == 1
        assert snapshot(redis_client) == before

    def test_deliveries_given_back_count_but_never_poison_a_task(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("w1")
        redis_client.lpush(KEYS.inflight("w1"), released(0, 2, task(1)))
        assert scripts.release("w1", max_length=10) == 0
        assert redis_client.lrange(KEYS.pending, 0, -1) == [released(0, 3, task(1))]
        register_dead_worker(redis_client, "dead", released(2, 3, task(1)))
        redis_client.delete(KEYS.pending)
        assert recover(scripts, "dead", max_deliveries=4) == (0, ["t1"], [])
        assert redis_client.lrange(KEYS.pending, 0, -1) == [released(3, 3, task(1))]
        assert split_redelivery(released(3, 3, task(1))) == (6, task(1))

    def test_release_with_nothing_in_flight_just_deregisters(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.heartbeat("w1")
        assert scripts.release("w1", max_length=3) == 0
        assert redis_client.keys("*") == []


# --- the dead-letter queue --------------------------------------------------------------------


class TestDlqRetry:
    """dlq_retry requeues a dead letter only if it is still as the caller read it."""

    RECORD = b'{"task_id": "t1", "reason": "exhausted"}'

    def dead_letter(self, client: redis.Redis[bytes]) -> None:
        client.hset(KEYS.dead, "t1", self.RECORD)
        client.zadd(KEYS.dead_index, {"t1": 1})

    def test_an_unchanged_record_is_removed_and_its_task_queued_last(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.dead_letter(redis_client)
        redis_client.hset(KEYS.dead, "t2", b"other")
        redis_client.zadd(KEYS.dead_index, {"t2": 2})
        push(scripts, [task("waiting")], max_length=10)
        assert scripts.dlq_retry("t1", self.RECORD, task(1), max_length=10) == 1
        assert take_all(scripts) == [task("waiting"), task(1)]
        assert redis_client.hkeys(KEYS.dead) == [b"t2"]
        assert redis_client.zrange(KEYS.dead_index, 0, -1) == [b"t2"]

    def test_a_record_changed_since_it_was_read_is_left_alone(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.dead_letter(redis_client)
        before = snapshot(redis_client)
        assert scripts.dlq_retry("t1", b'{"an": "older read"}', task(1), max_length=10) == 0
        assert snapshot(redis_client) == before

    def test_a_record_that_is_gone_is_not_requeued(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.dlq_retry("t1", self.RECORD, task(1), max_length=10) == 0
        assert redis_client.keys("*") == []

    def test_a_full_queue_refuses_and_the_record_is_kept(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.dead_letter(redis_client)
        fill_pending(redis_client, 2)
        before = snapshot(redis_client)
        assert scripts.dlq_retry("t1", self.RECORD, task(1), max_length=2) == -1
        assert snapshot(redis_client) == before

    def test_the_last_free_place_can_be_taken(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.dead_letter(redis_client)
        fill_pending(redis_client, 1)
        assert scripts.dlq_retry("t1", self.RECORD, task(1), max_length=2) == 1
        assert redis_client.llen(KEYS.pending) == 2


class TestDlqDelete:
    """dlq_delete removes a record from both the hash and the index."""

    def test_an_existing_record_is_deleted_from_hash_and_index(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.hset(KEYS.dead, mapping={"t1": b"a", "t2": b"b"})
        redis_client.zadd(KEYS.dead_index, {"t1": 1, "t2": 2})
        assert scripts.dlq_delete("t1") is True
        assert redis_client.hkeys(KEYS.dead) == [b"t2"]
        assert redis_client.zrange(KEYS.dead_index, 0, -1) == [b"t2"]

    def test_an_unknown_record_reports_false(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.hset(KEYS.dead, "t2", b"b")
        assert scripts.dlq_delete("t1") is False
        assert redis_client.hkeys(KEYS.dead) == [b"t2"]

    def test_an_orphan_index_entry_is_cleaned_up_too(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.zadd(KEYS.dead_index, {"t1": 1})
        assert scripts.dlq_delete("t1") is False
        assert redis_client.exists(KEYS.dead_index) == 0


class TestPublishResult:
    """publish_result stores a result with its TTL and tells the session's waiters."""

    def test_the_result_is_stored_and_published_to_each_waiter(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        with listening(redis_client, CHANNEL) as pubsub:
            assert scripts.publish_result("t1", result_json(1), CHANNEL, TTL) == 1
            published = next_message(pubsub)
        assert (published["channel"], published["data"]) == (CHANNEL.encode(), result_json(1))
        assert redis_client.get(KEYS.result("t1")) == result_json(1)
        assert 0 < redis_client.ttl(KEYS.result("t1")) <= TTL

    def test_with_no_waiter_the_result_is_still_stored(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.publish_result("t1", result_json(1), CHANNEL, TTL) == 0
        assert redis_client.get(KEYS.result("t1")) == result_json(1)


class TestPurge:
    """purge deletes a list or hash, with its companions, and says how much it held."""

    def test_purging_the_pending_list_counts_its_tasks(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        fill_pending(redis_client, 4)
        redis_client.zadd(KEYS.scheduled, {b"kept": 1})
        assert scripts.purge(KEYS.pending) == 4
        assert redis_client.keys("*") == [KEYS.scheduled.encode()]

    def test_purging_the_dead_letters_counts_records_and_drops_the_index(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.hset(KEYS.dead, mapping={"t1": b"a", "t2": b"b", "t3": b"c"})
        redis_client.zadd(KEYS.dead_index, {"t1": 1, "t2": 2, "t3": 3})
        assert scripts.purge(KEYS.dead, KEYS.dead_index) == 3
        assert redis_client.keys("*") == []

    def test_purging_nothing_returns_zero(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.purge(KEYS.dead, KEYS.dead_index) == 0
        assert redis_client.keys("*") == []

    def test_a_key_of_another_type_counts_as_zero_but_is_deleted(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.set(KEYS.pending, b"not a list")
        assert scripts.purge(KEYS.pending) == 0
        assert redis_client.exists(KEYS.pending) == 0


# --- the same scripts on fakeredis ------------------------------------------------------------


class TestScriptsOnFakeRedis:
    """fakeredis (with Lua) runs the same scripts, so unit tests elsewhere may use it."""

    def test_enqueue_fetch_and_ack_behave_as_on_a_real_redis(
        self, fake_redis: fakeredis.FakeRedis
    ) -> None:
        scripts = Scripts(fake_redis, KEYS)
        inflight = KEYS.inflight("w1")
        try:
            assert push(scripts, [task(1), task(2)], max_length=2) == 2
            assert push(scripts, [task(3)], max_length=2) == -1
            assert scripts.fetch(inflight, 1) == [task(1)]
            acks = [
                (task(1), "t1", result_json(1), CHANNEL),
                (task(3), "t3", result_json(3), CHANNEL),
            ]
            with listening(fake_redis, CHANNEL) as pubsub:
                assert scripts.ack(inflight, TTL, acks, take=1) == ([1, 0], [task(2)])
                assert next_message(pubsub)["data"] == result_json(1)
        finally:
            scripts.close()
        assert fake_redis.lrange(inflight, 0, -1) == [task(2)]
        assert fake_redis.get(KEYS.result("t1")) == result_json(1)
        assert 0 < fake_redis.ttl(KEYS.result("t1")) <= TTL
        assert fake_redis.exists(KEYS.result("t3")) == 0
