"""The test fixtures start real Redis servers that answer, and persistent ones survive a crash."""

from __future__ import annotations

import fakeredis
import pytest
import redis

from redis_server import RedisServer


def test_shared_server_answers_ping_on_loopback(
    redis_server: RedisServer, redis_client: redis.Redis[bytes]
) -> None:
    assert redis_client.ping() is True
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_each_test_starts_with_an_empty_database(redis_client: redis.Redis[bytes]) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("left-behind", "by this test")


def test_persistent_server_keeps_acknowledged_writes_across_sigkill_and_restart(
    persistent_redis: RedisServer,
) -> None:
    port = persistent_redis.port
    with persistent_redis.client() as client:
        client.rpush("{q}:pending", "a", "b")

    persistent_redis.kill()
    assert not persistent_redis.running
    with persistent_redis.client() as client, pytest.raises(redis.ConnectionError):
        client.ping()

    persistent_redis.restart()
    assert persistent_redis.port == port
    with persistent_redis.client() as client:
        assert client.lrange("{q}:pending", 0, -1) == [b"a", b"b"]


def test_fake_redis_runs_lua_scripts(fake_redis: fakeredis.FakeRedis) -> None:
    assert fake_redis.eval("return redis.call('INCR', KEYS[1])", 1, "counter") == 1
