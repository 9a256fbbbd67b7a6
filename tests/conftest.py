"""Shared fixtures: a real Redis for integration and fault tests, fakeredis for unit tests.

Real servers are started by the fixtures themselves (see ``redis_server.py``) on free loopback
ports; when redis-server is missing they fail with a clear error rather than skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from engines import RedisCluster, SentinelGroup, TlsRedis
from redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One non-persistent redis-server shared by the whole session."""
    with RedisServer(tmp_path_factory.mktemp("redis-shared")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied (FLUSHALL) before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    """A client of the emptied shared server, closed after the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, started redis-server of this test's own, with AOF fsynced on every write.

    Fault tests may ``kill()`` and ``restart()`` it (same port, data reloaded from the AOF);
    it is stopped after the test.
    """
    with RedisServer(tmp_path / "redis", persistent=True) as server:
        yield server


@pytest.fixture
def fake_redis() -> Iterator[fakeredis.FakeRedis]:
    """An in-process fakeredis client, with Lua, on a server of this test's own."""
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


# --- the distributed engines (engines.py) ---------------------------------------------


@pytest.fixture
def cluster1(tmp_path: Path) -> Iterator[RedisCluster]:
    """A started single-node cluster holding all 16384 slots."""
    with RedisCluster(tmp_path / "cluster1", masters=1) as cluster:
        yield cluster


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[RedisCluster]:
    """A started three-master cluster (no replicas)."""
    with RedisCluster(tmp_path / "cluster3", masters=3) as cluster:
        yield cluster


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A started master + replica + three sentinels, master name ``semibot``."""
    with SentinelGroup(tmp_path / "sentinels") as group:
        yield group


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A started TLS-only redis-server (client certificates optional) with its ACL file."""
    with TlsRedis(tmp_path / "tls") as server:
        yield server
