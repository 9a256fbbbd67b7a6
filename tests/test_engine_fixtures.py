"""The distributed-engine fixtures of ``engines.py`` start what they promise.

Each test checks the engine from the outside (CLUSTER KEYSLOT, MOVED replies, ROLE, a TLS
handshake), so a fixture that only seems to work fails here.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis

from engines import RedisCluster, SentinelGroup, TlsRedis

SAMPLE_KEYS = ["agent:tasks", "{agent:tasks}:processing", "a", "b", "c", "user:1", "x" * 40]


def test_single_node_cluster_serves_every_slot(cluster1: RedisCluster) -> None:
    (port,) = cluster1.ports
    assert cluster1.url == f"redis+cluster://127.0.0.1:{port}"
    assert {cluster1.owner_port(slot) for slot in (0, 5000, 16383)} == {port}
    with cluster1.node_client(port) as client:
        assert b"cluster_slots_assigned:16384" in client.execute_command("CLUSTER", "INFO")
        for key in SAMPLE_KEYS:
            assert cluster1.slot_of(key) == client.execute_command("CLUSTER", "KEYSLOT", key)
        assert client.set("agent:tasks", b"1")
    assert len(cluster1.node_id(port)) == 40


@pytest.mark.engines
def test_three_node_cluster_routes_each_key_to_its_owner(cluster3: RedisCluster) -> None:
    assert len(set(cluster3.ports)) == 3
    assert cluster3.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster3.ports)
    # every master owns a share of the slots
    assert {cluster3.owner_port(slot) for slot in range(0, 16384, 512)} == set(cluster3.ports)
    for key in SAMPLE_KEYS:
        slot = cluster3.slot_of(key.encode())
        owner = cluster3.owner_port(slot)
        for port in cluster3.ports:
            with cluster3.node_client(port) as client:
                assert client.execute_command("CLUSTER", "KEYSLOT", key) == slot
            assert cluster3.moved_to(port, key) == (None if port == owner else owner)
    assert cluster3.slot_of("agent:tasks") == cluster3.slot_of("{agent:tasks}:results")


@pytest.mark.engines
def test_migrate_slot_moves_every_key_to_the_new_owner(cluster3: RedisCluster) -> None:
    slot = cluster3.slot_of("agent:tasks")
    source = cluster3.owner_port(slot)
    target = next(port for port in cluster3.ports if port != source)
    keys = [f"{{agent:tasks}}:{i}" for i in range(50)]
    with cluster3.node_client(source) as client:
        client.mset({key: key.encode() for key in keys})
    split_counts: list[tuple[int, int]] = []

    def count_split() -> None:  # keys on (source, target) while the slot is half moved
        counts = []
        for port in (source, target):
            with cluster3.node_client(port) as client:
                counts.append(client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
        split_counts.append((counts[0], counts[1]))

    cluster3.migrate_slot(slot, target, batch=10, between_batches=count_split)

    assert split_counts == [(50 - n, n) for n in range(10, 51, 10)]
    assert cluster3.owner_port(slot) == target
    for port in cluster3.ports:  # every node's own map sends the slot's keys to the target
        assert cluster3.moved_to(port, keys[0]) == (None if port == target else target)
    with cluster3.node_client(target) as client:
        assert client.mget(keys) == [key.encode() for key in keys]
    with cluster3.node_client(source) as client:
        assert client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    with pytest.raises(ValueError, match="already served"):
        cluster3.migrate_slot(slot, target)


@pytest.mark.engines
def test_sentinel_failover_promotes_the_replica(sentinels: SentinelGroup) -> None:
    master, replica = sentinels.data_ports
    hosts = ",".join(f"127.0.0.1:{p}" for p in sentinels.sentinel_ports)
    assert sentinels.url == f"redis+sentinel://{hosts}/semibot/0"
    assert sentinels.master_port() == master
    with sentinels.data_client(master) as client:
        client.set("before", b"1")
        assert client.execute_command("WAIT", 1, 2000) == 1  # on the replica before failover

    took = sentinels.failover()

    assert 0 < took < 20
    for port in sentinels.sentinel_ports:
        assert sentinels.master_port(port) == replica
    with sentinels.data_client(replica) as client:
        assert client.execute_command("ROLE")[0] == b"master"
        assert client.get("before") == b"1"
        assert client.set("after", b"2")


def test_tls_server_verifies_with_the_right_ca_only(tls_redis: TlsRedis) -> None:
    with redis.Redis.from_url(tls_redis.url("admin", "adminpw")) as admin:
        assert admin.ping()
        assert admin.acl_whoami() == "admin"
    with redis.Redis.from_url(tls_redis.url()) as queue:  # the restricted queue user
        assert queue.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            queue.flushall()
    with (
        redis.Redis.from_url(tls_redis.url("admin", "adminpw", ca=tls_redis.other_ca_path)) as c,
        pytest.raises(redis.ConnectionError) as refused,
    ):
        c.ping()
    assert "certificate verify failed" in str(refused.value)
    assert isinstance(refused.value.__cause__ or refused.value.__context__, ssl.SSLError)


def test_mutual_tls_refuses_a_client_without_certificate(tmp_path: Path) -> None:
    with TlsRedis(tmp_path / "tls", mutual=True) as server:
        with redis.Redis.from_url(server.url(client_cert=True)) as client:
            assert client.ping()
        with (
            redis.Redis.from_url(server.url()) as client,
            pytest.raises(redis.ConnectionError) as refused,
        ):
            client.ping()
        # TLS 1.3: the handshake completes on the client's side, then the server hangs up
        assert not isinstance(refused.value, redis.AuthenticationError)
