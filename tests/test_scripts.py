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

from semibot_queue.codec import Codec, task_id_of
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


def push(scripts: Scripts, tasks: list[bytes], max_length: int, call: str = "call-0") -> int:
    """enqueue.lua on stored tasks, each id marked with the token ``call`` for a minute: the
    new length, -1 (full) or -2 (an id live under another call's token)."""
    status, _ = scripts.enqueue([(task_id_of(t), t) for t in tasks], max_length, 60, call)
    return status


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


def dead_letter_prelude() -> str:
    """The source of lib_dead_letter.lua, the prelude of the dead-letter scripts."""
    lua = resources.files("semibot_queue").joinpath("lua")
    return lua.joinpath("lib_dead_letter.lua").read_text("utf-8")


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
            "clear",
            "dead_letter",
            "dlq_delete",
            "dlq_purge",
            "dlq_retry",
            "enqueue",
            "fetch",
            "heartbeat",
            "lib_dead_letter",
            "promote",
            "publish_result",
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

    def test_a_repeat_of_the_same_call_writes_nothing_again(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert push(scripts, [task(1), task(2)], max_length=10, call="call-1") == 2
        before = snapshot(redis_client)
        # the library's own repeat after a lost reply: same call, same token
        assert push(scripts, [task(1), task(2)], max_length=10, call="call-1") == 2
        assert snapshot(redis_client) == before
        assert redis_client.get(KEYS.accepted("t1")) == b"call-1"
        assert 0 < redis_client.ttl(KEYS.accepted("t1")) <= 60

    # Was a package bug (issue 8): a second enqueue of an id seen in the last hour returned
    # as if it had been written, and wrote nothing; now the caller is told.
    def test_an_id_live_under_another_call_refuses_the_batch_naming_its_positions(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1), task(3)], max_length=10, call="call-1")
        before = snapshot(redis_client)
        tasks = [(task_id_of(t), t) for t in (task(0), task(1), task(2), task(3))]
        assert scripts.enqueue(tasks, 10, 60, "call-2") == (-2, [1, 3])
        assert snapshot(redis_client) == before

    def test_a_live_id_is_reported_before_a_full_queue(self, scripts: Scripts) -> None:
        push(scripts, [task(1)], max_length=1, call="call-1")
        assert scripts.enqueue([("t1", task(1))], 1, 60, "call-2") == (-2, [0])
        assert scripts.enqueue([("t2", task(2))], 1, 60, "call-2") == (-1, [])

    def test_an_id_twice_in_one_call_is_refused(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.enqueue([("t1", task(1)), ("t1", task(1))], 10, 60, "call") == (-2, [1])
        assert redis_client.keys("*") == []

    def test_a_tombstone_left_by_a_final_outcome_frees_the_id_for_other_calls_only(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.set(KEYS.accepted("t1"), b"~call-1", ex=60)
        # the repeat of the call that wrote the finished task: still a no-op
        assert push(scripts, [task(1)], max_length=10, call="call-1") == 0
        assert redis_client.get(KEYS.accepted("t1")) == b"~call-1"
        # any other call: the id is free again
        assert push(scripts, [task(1)], max_length=10, call="call-2") == 1
        assert redis_client.get(KEYS.accepted("t1")) == b"call-2"

    def test_a_marker_lives_the_seconds_it_is_given(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        scripts.enqueue([("t1", task(1))], 10, 600, "call")
        assert 590 < redis_client.ttl(KEYS.accepted("t1")) <= 600

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

    def test_tasks_are_taken_in_the_order_they_were_enqueued(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1), task(2)], max_length=10)
        push(scripts, [task(3)], max_length=10)
        push(scripts, [task(4), task(5)], max_length=10)
        # workers take from the right end of the pending list
        assert [redis_client.rpop(KEYS.pending) for _ in range(5)] == [task(i) for i in range(1, 6)]

    def test_enqueue_writes_only_the_pending_list_and_the_markers(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(1)], max_length=10)
        assert sorted(redis_client.keys("*")) == sorted(
            [KEYS.pending.encode(), KEYS.accepted("t1").encode()]
        )


class TestClear:
    """clear deletes pending tasks a bounded batch per call, with their markers and counts."""

    def test_one_call_deletes_at_most_one_batch_oldest_first(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        push(scripts, [task(i) for i in range(5)], max_length=10)
        assert scripts.clear(2, 1_000_000) == (2, 3)
        assert redis_client.lrange(KEYS.pending, 0, -1) == [task(4), task(3), task(2)]
        assert redis_client.exists(KEYS.accepted("t0"), KEYS.accepted("t1")) == 0
        assert redis_client.exists(KEYS.accepted("t2"), KEYS.accepted("t4")) == 2
        assert scripts.clear(10, 1_000_000) == (3, 0)
        assert redis_client.keys("*") == []
        assert scripts.clear(10, 1_000_000) == (0, 0)

    def test_one_call_stops_after_the_task_that_reaches_its_byte_budget(
        self, scripts: Scripts
    ) -> None:
        push(scripts, [task(i) for i in range(4)], max_length=10)
        assert scripts.clear(100, len(task(0)) + 1) == (2, 2)
        assert scripts.clear(100, 1) == (1, 1)

    # Was a package bug (issue 8): clear_queue left the idempotency markers, so the ids it
    # deleted stayed "accepted" for an hour and enqueueing them again wrote nothing.
    def test_a_cleared_id_can_be_enqueued_again(self, scripts: Scripts) -> None:
        push(scripts, [task(1)], max_length=10, call="call-1")
        scripts.clear(10, 1_000_000)
        assert push(scripts, [task(1)], max_length=10, call="call-2") == 1

    def test_delivery_counts_of_cleared_tasks_go_too_others_stay(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        garbage = b"not json at all"
        redis_client.lpush(KEYS.pending, task(1), garbage)
        raw_id = "raw-" + hashlib.sha1(garbage, usedforsecurity=False).hexdigest()
        redis_client.hset(KEYS.crashes, mapping={"t1": 1, raw_id: 2, "in-flight": 1})
        redis_client.hset(KEYS.releases, mapping={"t1": 3})
        assert scripts.clear(10, 1_000_000) == (2, 0)
        assert redis_client.hgetall(KEYS.crashes) == {b"in-flight": b"1"}
        assert redis_client.exists(KEYS.releases) == 0

    def test_a_body_whose_task_id_is_unreadable_is_deleted_without_touching_markers(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.set(KEYS.accepted("other"), b"call")
        redis_client.lpush(KEYS.pending, b'{"task_id": "has space"}', b"\xff\xfe", b"")
        assert scripts.clear(10, 1_000_000) == (3, 0)
        assert redis_client.keys("*") == [KEYS.accepted("other").encode()]

    def test_the_task_id_is_read_where_the_body_says_it(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        runtime = b'{"session_id": "s", "config": {"task_id": 7}, "task_id" : "rt-1"}'
        redis_client.set(KEYS.accepted("rt-1"), b"call")
        redis_client.lpush(KEYS.pending, runtime)
        assert scripts.clear(10, 1_000_000) == (1, 0)
        assert redis_client.exists(KEYS.accepted("rt-1")) == 0

    # Issue 8: every Lua script stays short whatever the payload size; the task id of a
    # 1 MB body is found by a plain search, not by decoding it.
    def test_clearing_twenty_bodies_of_one_megabyte_keeps_every_call_short(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        filler = "x" * 1_000_000
        bodies = [
            json.dumps({"session_id": "s", "config": {"text": filler}, "task_id": f"big{i}"})
            for i in range(20)
        ]
        redis_client.lpush(KEYS.pending, *bodies)
        redis_client.mset({KEYS.accepted(f"big{i}"): b"call" for i in range(20)})
        with slowlog_of_every_call(redis_client) as durations:
            calls = 0
            while scripts.clear(100, 1_000_000)[0]:
                calls += 1
        assert calls == 20
        assert redis_client.keys("*") == []
        assert len(durations) == 21  # the last call finds nothing left
        assert max(durations) < SCRIPT_BUDGET_US
        print(f"clear of 1 MB: max {max(durations)} us, total {sum(durations)} us")


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


def dead_keys(client: redis.Redis[bytes]) -> dict[bytes, Any]:
    """The dead-letter structures only (hash, index, ids, raw, counter), as snapshot() shows."""
    names = {KEYS.dead, KEYS.dead_index, KEYS.dead_ids, KEYS.dead_raw, KEYS.dead_seq}
    return {k: v for k, v in snapshot(client).items() if k.decode() in names}


def add_dead(client: redis.Redis[bytes], record_id: str, failed_ms: int, raw: bytes | None) -> None:
    """A dead-letter record written as lib_dead_letter.lua writes it."""
    client.hset(KEYS.dead, record_id, b'{"record": "%s"}' % record_id.encode())
    client.zadd(KEYS.dead_index, {record_id: failed_ms})
    client.zadd(KEYS.dead_ids, {record_id: 0})
    if raw is not None:
        client.hset(KEYS.dead_raw, record_id, raw)


def garbage_in_flight(client: redis.Redis[bytes], *bodies: bytes) -> str:
    inflight = KEYS.inflight("w1")
    client.lpush(inflight, *bodies)
    return inflight


@contextmanager
def slowlog_of_every_call(client: redis.Redis[bytes]) -> Iterator[list[int]]:
    """Durations in microseconds of every command run meanwhile (Redis' own SLOWLOG)."""
    old = client.config_get("slowlog-*")
    # Commands run inside a script are logged too: keep room for all of them.
    client.config_set("slowlog-max-len", 100_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    durations: list[int] = []
    try:
        yield durations
        durations += [
            entry["duration"]
            for entry in client.slowlog_get(-1)
            if entry["command"].startswith(b"EVALSHA")
        ]
    finally:
        client.config_set("slowlog-log-slower-than", old["slowlog-log-slower-than"])
        client.config_set("slowlog-max-len", old["slowlog-max-len"])
        client.slowlog_reset()


#: What "a few milliseconds" (DESIGN invariant 11) means for one script call, in microseconds.
SCRIPT_BUDGET_US = 10_000


class TestDeadLetter:
    """dead_letter moves a task out of flight into a new record of its own: its final outcome."""

    def test_the_task_becomes_a_new_record_indexed_by_failure_time_and_its_result_is_published(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = garbage_in_flight(redis_client, task(1), task(2))
        before = redis_ms(redis_client)
        with listening(redis_client, CHANNEL) as pubsub:
            record_id = scripts.dead_letter(
                inflight,
                task(1),
                "t1",
                b'{"record": 1}',
                None,
                (result_json(1, "failed"), CHANNEL, TTL),
            )
            published = next_message(pubsub)
        after = redis_ms(redis_client)
        assert record_id == "t1#1"
        assert published["data"] == result_json(1, "failed")
        assert redis_client.lrange(inflight, 0, -1) == [task(2)]
        assert redis_client.hgetall(KEYS.dead) == {b"t1#1": b'{"record": 1}'}
        ((member, failed_at),) = redis_client.zrange(KEYS.dead_index, 0, -1, withscores=True)
        assert member == b"t1#1"
        assert before <= failed_at <= after
        assert redis_client.zrange(KEYS.dead_ids, 0, -1, withscores=True) == [(b"t1#1", 0.0)]
        assert redis_client.exists(KEYS.dead_raw) == 0
        assert redis_client.get(KEYS.result("t1")) == result_json(1, "failed")
        assert 0 < redis_client.ttl(KEYS.result("t1")) <= TTL

    def test_a_final_outcome_drops_the_tasks_delivery_counts_and_idempotency_marker(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = garbage_in_flight(redis_client, task(1))
        redis_client.hset(KEYS.crashes, mapping={"t1": 2, "t2": 1})
        redis_client.hset(KEYS.releases, mapping={"t1": 1})
        redis_client.set(KEYS.accepted("t1"), b"token", ex=60)
        redis_client.set(KEYS.accepted("t2"), b"token", ex=60)
        assert scripts.dead_letter(inflight, task(1), "t1", b"{}", None, None) == "t1#1"
        assert redis_client.hgetall(KEYS.crashes) == {b"t2": b"1"}
        assert redis_client.exists(KEYS.releases, KEYS.accepted("t1")) == 0
        assert redis_client.get(KEYS.accepted("t2")) == b"token"

    @pytest.mark.parametrize(
        "raw",
        [b"\x00\xff\xfe not utf-8", b"", b"x" * 1_048_576],
        ids=["binary", "empty", "one-megabyte"],
    )
    def test_raw_bytes_are_kept_verbatim_beside_the_record(
        self, scripts: Scripts, redis_client: redis.Redis[bytes], raw: bytes
    ) -> None:
        inflight = garbage_in_flight(redis_client, raw)
        named = task_id_of(raw)
        record_id = scripts.dead_letter(inflight, raw, named, b'{"r": 1}', raw, None)
        assert record_id == f"{named}#1"
        assert redis_client.hgetall(KEYS.dead_raw) == {record_id.encode(): raw}
        assert redis_client.hgetall(KEYS.dead) == {record_id.encode(): b'{"r": 1}'}
        assert redis_client.llen(inflight) == 0

    def test_a_task_with_no_session_to_tell_gets_no_result(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = garbage_in_flight(redis_client, b"not json")
        with listening(redis_client, CHANNEL) as pubsub:
            record_id = scripts.dead_letter(inflight, b"not json", "raw-1", b"{}", None, None)
            assert_nothing_published(redis_client, pubsub, CHANNEL)
        assert record_id == "raw-1#1"
        assert redis_client.hgetall(KEYS.dead) == {b"raw-1#1": b"{}"}
        assert redis_client.exists(KEYS.result("raw-1")) == 0

    def test_a_task_no_longer_in_flight_is_not_dead_lettered_and_nothing_is_written(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        inflight = garbage_in_flight(redis_client, task(2))
        redis_client.hset(KEYS.crashes, "t1", 1)
        redis_client.set(KEYS.accepted("t1"), b"token")
        before = snapshot(redis_client)
        with listening(redis_client, CHANNEL) as pubsub:
            record_id = scripts.dead_letter(
                inflight, task(1), "t1", b"{}", task(1), (result_json(1, "failed"), CHANNEL, TTL)
            )
            assert_nothing_published(redis_client, pubsub, CHANNEL)
        assert record_id is None
        assert snapshot(redis_client) == before

    # Issue 8, "Why": identical garbage pushed twice was one dead-letter record (the second
    # wrote over the first, keyed by raw-<sha1>).
    def test_identical_garbage_pushed_twice_is_two_dead_letter_records(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        garbage = b"\xff garbage"
        inflight = garbage_in_flight(redis_client, garbage, garbage)
        named = task_id_of(garbage)
        first = scripts.dead_letter(inflight, garbage, named, b'{"n": 1}', garbage, None)
        second = scripts.dead_letter(inflight, garbage, named, b'{"n": 2}', garbage, None)
        assert (first, second) == (f"{named}#1", f"{named}#2")
        assert redis_client.hgetall(KEYS.dead) == {
            f"{named}#1".encode(): b'{"n": 1}',
            f"{named}#2".encode(): b'{"n": 2}',
        }
        assert redis_client.hgetall(KEYS.dead_raw) == {
            f"{named}#1".encode(): garbage,
            f"{named}#2".encode(): garbage,
        }
        assert redis_client.zcard(KEYS.dead_index) == redis_client.zcard(KEYS.dead_ids) == 2

    # Issue 8, "Why": a malformed message carrying a real task's id replaced that task's record.
    def test_a_malformed_message_carrying_a_real_tasks_id_keeps_that_tasks_record(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        malformed = b'{"task_id": "t1", "messages": 5}'
        inflight = garbage_in_flight(redis_client, task(1), malformed)
        real = scripts.dead_letter(inflight, task(1), "t1", b'{"reason": "exhausted"}', None, None)
        bad = scripts.dead_letter(
            inflight, malformed, "t1", b'{"reason": "invalid"}', malformed, None
        )
        assert (real, bad) == ("t1#1", "t1#2")
        assert redis_client.hgetall(KEYS.dead) == {
            b"t1#1": b'{"reason": "exhausted"}',
            b"t1#2": b'{"reason": "invalid"}',
        }
        assert redis_client.hgetall(KEYS.dead_raw) == {b"t1#2": malformed}

    def test_a_record_is_never_written_over_even_after_the_counter_was_lost(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, b"kept")
        add_dead(redis_client, "t1#2", 2, None)
        before = dead_keys(redis_client)
        inflight = garbage_in_flight(redis_client, task(1))
        assert redis_client.exists(KEYS.dead_seq) == 0
        assert scripts.dead_letter(inflight, task(1), "t1", b"{}", None, None) == "t1#3"
        after = dead_keys(redis_client)
        assert after[KEYS.dead.encode()][b"t1#1"] == before[KEYS.dead.encode()][b"t1#1"]
        assert after[KEYS.dead_raw.encode()] == {b"t1#1": b"kept"}

    # Was a package bug: Scripts.dead_letter always builds KeySpace.result(task_id), even
    # when there is no result to store, and task_id_of returns any string task_id it finds. A
    # raw task such as {"task_id": "a b"} (invalid, so bound for the dead letters) makes it
    # raise InvalidTaskError: the worker cannot dead-letter it and it stays in flight, then is
    # released or recovered and taken again, forever (DESIGN invariant 5).
    @pytest.mark.parametrize(
        "task_id",
        ["a b", "{other}", "x" * 201, "t1#2"],
        ids=["space", "braces", "too-long", "hash"],
    )
    def test_a_task_whose_id_is_unfit_for_a_key_is_dead_lettered_under_its_sha1(
        self, scripts: Scripts, redis_client: redis.Redis[bytes], task_id: str
    ) -> None:
        stored = json.dumps({"task_id": task_id}).encode()
        inflight = garbage_in_flight(redis_client, stored)
        named = "raw-" + hashlib.sha1(stored, usedforsecurity=False).hexdigest()
        assert scripts.dead_letter(inflight, stored, task_id, b"{}", stored, None) == f"{named}#1"
        assert redis_client.hkeys(KEYS.dead) == [f"{named}#1".encode()]

    # Issue 8, "Why" (every Lua script bounded): the old scripts parsed and base64-encoded
    # bodies in Lua; dead-lettering copies them, so twenty 1 MB tasks cost milliseconds.
    def test_dead_lettering_twenty_one_megabyte_tasks_takes_milliseconds_each(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        bodies = [b"%02d" % n + b"\xff" * 1_048_574 for n in range(20)]
        inflight = garbage_in_flight(redis_client, *bodies)
        with slowlog_of_every_call(redis_client) as durations:
            for body in bodies:
                assert scripts.dead_letter(inflight, body, task_id_of(body), b"{}", body, None)
        assert len(durations) == 20
        print(f"dead_letter of 1 MB: max {max(durations)} us, total {sum(durations)} us")
        assert max(durations) < SCRIPT_BUDGET_US
        assert redis_client.hlen(KEYS.dead_raw) == 20


class TestTrimDead:
    """trim_dead evicts records past the TTL, then the oldest beyond the length bound,
    one batch per call, from every structure."""

    def records(self, client: redis.Redis[bytes], ages_ms: dict[str, int]) -> None:
        now = redis_ms(client)
        for record_id, age in ages_ms.items():
            add_dead(client, record_id, now - age, b"raw " + record_id.encode())
        client.set(KEYS.dead_seq, len(ages_ms))

    def kept(self, client: redis.Redis[bytes]) -> list[bytes]:
        """The index, checked to agree with the hash, the ids and the raw bytes."""
        index = client.zrange(KEYS.dead_index, 0, -1)
        assert set(client.hkeys(KEYS.dead)) == set(index)
        assert set(client.zrange(KEYS.dead_ids, 0, -1)) == set(index)
        assert set(client.hkeys(KEYS.dead_raw)) == set(index)
        return index

    def test_records_older_than_the_ttl_are_evicted_oldest_first(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        day = 24 * 3600
        day_ms = day * 1000
        ages = {"fresh#4": 0, "older#2": 2 * day_ms, "oldest#1": 3 * day_ms, "recent#3": 1000}
        self.records(redis_client, ages)
        assert scripts.trim_dead(max_length=100, ttl=day) == ["oldest#1", "older#2"]
        assert self.kept(redis_client) == [b"recent#3", b"fresh#4"]

    def test_the_oldest_records_beyond_the_length_bound_are_evicted(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.records(redis_client, {f"r#{i}": (5 - i) * 1000 for i in range(5)})
        assert scripts.trim_dead(max_length=3, ttl=3600) == ["r#0", "r#1"]
        assert self.kept(redis_client) == [b"r#2", b"r#3", b"r#4"]

    def test_expired_records_count_towards_the_excess_only_once(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        hour_ms = 3600 * 1000
        ages = {"x#0": 5 * hour_ms, "x#1": 4 * hour_ms}
        ages |= {f"f#{i}": (5 - i) * 1000 for i in range(5)}
        self.records(redis_client, ages)
        assert scripts.trim_dead(max_length=3, ttl=3600) == ["x#0", "x#1", "f#0", "f#1"]
        assert self.kept(redis_client) == [b"f#2", b"f#3", b"f#4"]

    def test_one_call_evicts_at_most_one_batch_and_the_next_call_goes_on(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        hour_ms = 3600 * 1000
        self.records(redis_client, {f"x#{i}": (10 - i) * hour_ms for i in range(5)})
        assert scripts.trim_dead(max_length=100, ttl=60, batch=2) == ["x#0", "x#1"]
        assert scripts.trim_dead(max_length=100, ttl=60, batch=2) == ["x#2", "x#3"]
        assert len(self.kept(redis_client)) == 1

    def test_the_length_bound_is_kept_one_batch_per_call(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.records(redis_client, {f"r#{i}": (9 - i) * 1000 for i in range(9)})
        hour_ms = 3600 * 1000
        add_dead(redis_client, "x#9", redis_ms(redis_client) - 2 * hour_ms, None)
        assert scripts.trim_dead(max_length=4, ttl=3600, batch=3) == ["x#9", "r#0", "r#1"]
        assert scripts.trim_dead(max_length=4, ttl=3600, batch=3) == ["r#2", "r#3", "r#4"]
        assert self.kept(redis_client) == [b"r#5", b"r#6", b"r#7", b"r#8"]

    def test_nothing_is_evicted_within_both_bounds(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.records(redis_client, {"a#1": 2000, "b#2": 1000})
        before = snapshot(redis_client)
        assert scripts.trim_dead(max_length=2, ttl=3600) == []
        assert snapshot(redis_client) == before

    def test_evicting_the_last_record_leaves_no_key_behind(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        self.records(redis_client, {"a#1": 10_000, "b#2": 20_000})
        assert scripts.trim_dead(max_length=0, ttl=3600) == ["b#2", "a#1"]
        assert redis_client.keys("*") == []

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
    """dlq_retry requeues a dead letter's task only if its record is still as the caller read
    it, removing that record only; a task that parses is marked accepted, as enqueue does."""

    RECORD = b'{"record": "t1#1"}'
    LIMITS = (10, 600)
    MARKER = ("t1", "token-1")

    def test_an_unchanged_record_is_removed_and_its_task_queued_last_and_marked(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, b"raw t1")
        add_dead(redis_client, "t1#2", 2, None)
        add_dead(redis_client, "t2#3", 3, None)
        redis_client.set(KEYS.dead_seq, 3)
        redis_client.lpush(KEYS.pending, task("waiting"))
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, self.MARKER) == 1
        # Pushed at the far end (left) of the list that workers take from on the right.
        assert redis_client.lrange(KEYS.pending, 0, -1) == [task(1), task("waiting")]
        assert redis_client.hkeys(KEYS.dead) == [b"t1#2", b"t2#3"]
        assert redis_client.zrange(KEYS.dead_index, 0, -1) == [b"t1#2", b"t2#3"]
        assert redis_client.zrange(KEYS.dead_ids, 0, -1) == [b"t1#2", b"t2#3"]
        assert redis_client.exists(KEYS.dead_raw) == 0
        assert redis_client.get(KEYS.accepted("t1")) == b"token-1"
        assert 590 < redis_client.ttl(KEYS.accepted("t1")) <= 600

    def test_the_same_call_repeated_after_a_lost_reply_is_a_no_op_that_reports_success(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, None)
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, self.MARKER) == 1
        after = snapshot(redis_client)
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, self.MARKER) == 1
        assert snapshot(redis_client) == after
        assert redis_client.lrange(KEYS.pending, 0, -1) == [task(1)]

    def test_a_task_id_live_again_is_refused_and_nothing_is_written(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, None)
        redis_client.set(KEYS.accepted("t1"), b"someone else's enqueue")
        before = snapshot(redis_client)
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, self.MARKER) == -2
        assert snapshot(redis_client) == before

    def test_raw_bytes_go_back_verbatim_without_a_marker(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "raw-x#1", 1, b"\xff garbage")
        redis_client.set(KEYS.dead_seq, 1)
        assert (
            scripts.dlq_retry(
                "raw-x#1", b'{"record": "raw-x#1"}', b"\xff garbage", self.LIMITS, None
            )
            == 1
        )
        assert redis_client.keys("*") == [KEYS.pending.encode()]
        assert redis_client.lrange(KEYS.pending, 0, -1) == [b"\xff garbage"]

    def test_a_record_changed_since_it_was_read_is_left_alone(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, None)
        before = snapshot(redis_client)
        assert scripts.dlq_retry("t1#1", b"an older read", task(1), self.LIMITS, self.MARKER) == 0
        assert snapshot(redis_client) == before

    def test_a_record_that_is_gone_is_not_requeued(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, self.MARKER) == 0
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), self.LIMITS, None) == 0
        assert redis_client.keys("*") == []

    def test_a_full_queue_refuses_and_the_record_is_kept(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, None)
        fill_pending(redis_client, 2)
        before = snapshot(redis_client)
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), (2, 600), self.MARKER) == -1
        assert snapshot(redis_client) == before

    def test_the_last_free_place_can_be_taken(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, None)
        fill_pending(redis_client, 1)
        assert scripts.dlq_retry("t1#1", self.RECORD, task(1), (2, 600), self.MARKER) == 1
        assert redis_client.llen(KEYS.pending) == 2

    def test_a_one_megabyte_task_goes_back_in_milliseconds(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        body = b"\xff" * 1_048_576
        add_dead(redis_client, "raw-x#1", 1, body)
        with slowlog_of_every_call(redis_client) as durations:
            assert scripts.dlq_retry("raw-x#1", b'{"record": "raw-x#1"}', body, self.LIMITS, None)
        print(f"dlq_retry of 1 MB: {durations} us")
        assert durations
        assert max(durations) < SCRIPT_BUDGET_US


class TestDlqDelete:
    """dlq_delete removes one record from the hash, the index, the ids and the raw bytes."""

    def test_an_existing_record_is_deleted_everywhere_and_its_siblings_stay(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, b"raw 1")
        add_dead(redis_client, "t1#2", 2, b"raw 2")
        assert scripts.dlq_delete("t1#1") is True
        assert redis_client.hgetall(KEYS.dead_raw) == {b"t1#2": b"raw 2"}
        assert redis_client.hkeys(KEYS.dead) == [b"t1#2"]
        assert redis_client.zrange(KEYS.dead_index, 0, -1) == [b"t1#2"]
        assert redis_client.zrange(KEYS.dead_ids, 0, -1) == [b"t1#2"]

    def test_an_unknown_record_reports_false(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t2#1", 1, None)
        before = snapshot(redis_client)
        assert scripts.dlq_delete("t1#1") is False
        assert snapshot(redis_client) == before

    def test_an_orphan_index_entry_is_cleaned_up_too(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.zadd(KEYS.dead_index, {"t1#1": 1})
        redis_client.zadd(KEYS.dead_ids, {"t1#1": 0})
        assert scripts.dlq_delete("t1#1") is False
        assert redis_client.keys("*") == []

    def test_deleting_the_last_record_leaves_no_key_behind(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        add_dead(redis_client, "t1#1", 1, b"raw")
        redis_client.set(KEYS.dead_seq, 1)
        assert scripts.dlq_delete("t1#1") is True
        assert redis_client.keys("*") == []


class TestDlqPurge:
    """dlq_purge deletes the dead letters one batch per call, until no key is left."""

    def test_records_go_one_batch_per_call_and_the_last_call_leaves_no_key(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        for n in range(5):
            add_dead(redis_client, f"t{n}#{n}", n, b"raw" if n % 2 else None)
        redis_client.set(KEYS.dead_seq, 5)
        redis_client.lpush(KEYS.pending, task("kept"))
        calls = []
        while not calls or not calls[-1][1]:
            calls.append(scripts.dlq_purge(batch=2))
        assert calls == [(2, False), (2, False), (1, False), (0, True)]
        assert redis_client.keys("*") == [KEYS.pending.encode()]

    def test_entries_outside_the_index_are_deleted_too(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        redis_client.zadd(KEYS.dead_ids, {"a#1": 0})
        redis_client.hset(KEYS.dead, mapping={"a#1": b"r", "b#2": b"stray"})
        redis_client.hset(KEYS.dead_raw, "c#3", b"stray")
        assert scripts.dlq_purge(batch=10) == (1, False)
        assert scripts.dlq_purge(batch=10) == (1, True)
        assert redis_client.keys("*") == []

    def test_purging_nothing_returns_zero_and_done(
        self, scripts: Scripts, redis_client: redis.Redis[bytes]
    ) -> None:
        assert scripts.dlq_purge() == (0, True)
        assert redis_client.keys("*") == []


class TestDeadLetterPrelude:
    """lib_dead_letter.lua is a prelude only: it defines functions and touches nothing."""

    def test_the_prelude_alone_writes_nothing(self, redis_client: redis.Redis[bytes]) -> None:
        source = dead_letter_prelude()
        assert redis_client.eval(source + "\nreturn 1", 0) == 1
        assert redis_client.keys("*") == []

    def test_add_dead_letter_numbers_records_of_every_task_from_one_counter(
        self, redis_client: redis.Redis[bytes]
    ) -> None:
        script = dead_letter_prelude() + (
            "\nlocal K = dead_keys(1)"
            "\nreturn {add_dead_letter(K, ARGV[1], '{}', false, 5),"
            " add_dead_letter(K, ARGV[2], '{}', ARGV[3], 6)}"
        )
        keys = [KEYS.dead, KEYS.dead_index, KEYS.dead_ids, KEYS.dead_raw, KEYS.dead_seq]
        assert redis_client.eval(script, 5, *keys, "t1", "t2", b"raw") == [b"t1#1", b"t2#2"]
        assert redis_client.zrange(KEYS.dead_index, 0, -1, withscores=True) == [
            (b"t1#1", 5.0),
            (b"t2#2", 6.0),
        ]
        assert redis_client.hgetall(KEYS.dead_raw) == {b"t2#2": b"raw"}


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
