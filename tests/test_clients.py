"""The clients of every engine (``semibot_queue.clients``): URL parsing, a one-node Redis
Cluster, a Sentinel group, MIN_REPLICAS_TO_ACK, TLS with the README's ACL user, and the
refusals that must fail at once instead of looping on reconnects.

Cheap enough for every Python: the engines are started once per module (a one-node
cluster, one Sentinel group, one TLS server with the README's rule line) and emptied
before each test; nothing here fails over.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import redis.sentinel
from prometheus_client import CollectorRegistry
from redis.connection import SSLConnection

from engines import ADMIN_PASSWORD, RedisCluster, SentinelGroup, TlsRedis
from fault_ledger import DEAD, SUCCEEDED, Ledger, dead_record_ids
from redis_server import HOST
from semibot_queue import (
    DeadLetterQueue,
    PermanentTaskError,
    QueueConfigurationError,
    QueueConnectionError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue import clients as clients_module
from semibot_queue.clients import (
    RoutedConnection,
    RoutedSSLConnection,
    distributed_pool,
    make_client,
)
from semibot_queue.codec import Codec
from semibot_queue.keys import KeySpace
from semibot_queue.script_runner import NotReplicatedError
from semibot_queue.urls import parse_distributed_url
from support import FAST, Running, payload, running, wait_until

#: The queue the README's ACL rule line is written for; every test here uses it.
QUEUE = "agent:tasks"
KEYS = KeySpace(QUEUE)
TESTS_DIR = Path(__file__).resolve().parent
README = TESTS_DIR.parent / "README.md"
#: Seconds any one call that must fail at once is given before the test calls it a hang.
DEADLINE_S = 10.0


def settings(**changes: Any) -> QueueSettings:
    """FAST, with ``changes``."""
    return attrs.evolve(FAST, **changes)


def producer(url: str | None = None, conf: QueueSettings = FAST, **kwargs: Any) -> TaskProducer:
    return TaskProducer(url, QUEUE, conf, registry=CollectorRegistry(), **kwargs)


def consumer(
    url: str | None, handler: Callable[[TaskMessage], Any], conf: QueueSettings = FAST, **kw: Any
) -> TaskConsumer:
    return TaskConsumer(url, QUEUE, handler, 4, conf, registry=CollectorRegistry(), **kw)


def shout(message: TaskMessage) -> str:
    return str(message.messages[0]["content"]).upper()


def reconnects(registry: CollectorRegistry) -> float:
    """The reconnect attempts counted in ``registry`` for the queue."""
    value = registry.get_sample_value("semibot_queue_redis_reconnects_total", {"queue": QUEUE})
    return value or 0.0


def raised_within(call: Callable[[], Any], timeout: float = DEADLINE_S) -> BaseException | None:
    """What ``call()`` raised (None if it returned), failing if it is still running after
    ``timeout`` seconds (a retry loop or a hang instead of an answer)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="test-call", daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the call did not end within {timeout} s (a retry loop?)"
    return outcome[0]


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reconnect warnings the library logged."""
    return [r.getMessage() for r in caplog.records if "reconnect attempt" in r.getMessage()]


def readme_acl_rules() -> str:
    """The rules of the README's ```acl line for user ``queue`` (without ``user queue``)."""
    blocks = re.findall(r"^```acl\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    lines = [line for b in blocks for line in b.splitlines() if line.startswith("user queue ")]
    assert len(lines) == 1, f"expected one `user queue ...` line in README's ```acl blocks: {lines}"
    return lines[0].removeprefix("user queue ").strip()


# --- the engines, once per module ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster1"), masters=1) as engine:
        yield engine


@pytest.fixture
def cluster(cluster_engine: RedisCluster) -> RedisCluster:
    """The module's one-node cluster, emptied."""
    cluster_engine.flushall()
    return cluster_engine


@pytest.fixture(scope="module")
def sentinel_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path_factory.mktemp("sentinels")) as engine:
        yield engine


@pytest.fixture
def group(sentinel_engine: SentinelGroup) -> SentinelGroup:
    """The module's Sentinel group (master + replica), emptied, the replica caught up."""
    sentinel_engine.flushall()
    master, replica = sentinel_engine.data_ports
    assert sentinel_engine.master_port() == master, "the group failed over: no test does that"
    with sentinel_engine.data_client(replica) as client:
        wait_until(lambda: client.dbsize() == 0, 5.0, "the replica to follow FLUSHALL")
    return sentinel_engine


@pytest.fixture(scope="module")
def tls_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A TLS server whose user ``queue`` has exactly the README's rule line."""
    rules = readme_acl_rules()
    with TlsRedis(tmp_path_factory.mktemp("tls"), queue_user_rules=rules) as engine:
        yield engine


def tls_admin(tls: TlsRedis) -> redis.Redis[bytes]:
    """A client of user ``admin`` (may do anything); the caller closes it."""
    return redis.Redis(
        HOST,
        tls.port,
        ssl=True,
        ssl_ca_certs=str(tls.ca_path),
        username="admin",
        password=ADMIN_PASSWORD,
        socket_timeout=5.0,
    )


@pytest.fixture
def tls(tls_engine: TlsRedis) -> TlsRedis:
    """The module's TLS server, emptied, its ACL log reset."""
    with tls_admin(tls_engine) as admin:
        admin.flushall()
        admin.execute_command("ACL", "LOG", "RESET")
    return tls_engine


# --- 1. URLs (no server) ---------------------------------------------------------------------


class TestParseDistributedUrl:
    def test_cluster_url_with_seeds_credentials_and_options(self):
        engine, hosts, master, options = parse_distributed_url(
            "redis+cluster://queue:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/0"
            "?socket_timeout=2.5&health_check_interval=3"
        )
        assert (engine, master) == ("cluster", "")
        assert hosts == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)]
        assert (options["username"], options["password"]) == ("queue", "s3cret")
        assert options["db"] == 0
        assert options["socket_timeout"] == 2.5
        assert options["health_check_interval"] == 3
        assert "connection_class" not in options, "a redis+ URL is plain TCP"
        assert "host" not in options
        assert "port" not in options

    def test_cluster_url_without_path_is_database_0(self):
        engine, hosts, _, options = parse_distributed_url("redis+cluster://h1:7000")
        assert (engine, hosts, options) == ("cluster", [("h1", 7000)], {"db": 0})

    def test_sentinel_url_with_master_db_and_sentinel_credentials(self):
        engine, hosts, master, options = parse_distributed_url(
            "redis+sentinel://queue:s3cret@s1:26379,s2:26380,s3:26381/mymaster/3"
            "?socket_timeout=1.5&sentinel_username=watcher&sentinel_password=spw"
        )
        assert (engine, master) == ("sentinel", "mymaster")
        assert hosts == [("s1", 26379), ("s2", 26380), ("s3", 26381)]
        assert (options["username"], options["password"], options["db"]) == ("queue", "s3cret", 3)
        assert options["socket_timeout"] == 1.5
        # still among the options here; distributed_pool takes them out (next test)
        assert (options["sentinel_username"], options["sentinel_password"]) == ("watcher", "spw")

    def test_sentinel_url_db_defaults_to_0(self):
        _, _, master, options = parse_distributed_url("redis+sentinel://s1:26379/mymaster")
        assert (master, options["db"]) == ("mymaster", 0)

    @pytest.mark.parametrize(
        "url",
        [
            "rediss+cluster://queue:s3cret@h1:7000,h2:7001?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
            "rediss+sentinel://queue:s3cret@h1:26379/mymaster?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
        ],
    )
    def test_tls_schemes_give_ssl_connections_with_their_options(self, url):
        _, _, _, options = parse_distributed_url(url)
        assert options["connection_class"] is SSLConnection
        assert options["ssl_cert_reqs"] == "none"
        assert options["ssl_ca_certs"] == "/ca.pem"

    def test_sentinel_credentials_go_to_the_sentinels_only(self, monkeypatch):
        asked: list[tuple[tuple[str, int], dict[str, Any], tuple[Any, ...]]] = []

        def fake_ask(address: tuple[str, int], options: dict[str, Any], *command: Any) -> Any:
            asked.append((address, options, command))
            return [b"10.9.9.9", b"6390"]

        monkeypatch.setattr(clients_module, "_ask", fake_ask)
        pool = distributed_pool(
            "rediss+sentinel://queue:s3cret@s1:26379,s2:26380/mymaster/2"
            "?sentinel_username=watcher&sentinel_password=spw&ssl_cert_reqs=none",
            QUEUE,
            max_connections=3,
            socket_connect_timeout=1.5,
        )
        node = pool.connection_kwargs
        assert pool.connection_class is RoutedSSLConnection
        assert (node["username"], node["password"], node["db"]) == ("queue", "s3cret", 2)
        assert "sentinel_password" not in node
        assert "sentinel_username" not in node
        _, address = node["router"].address()
        assert address == ("10.9.9.9", 6390)
        [(sentinel, options, command)] = asked
        assert sentinel == ("s1", 26379)
        assert command == ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        assert (options["username"], options["password"]) == ("watcher", "spw")
        assert options["ssl"] is True
        assert options["ssl_cert_reqs"] == "none"
        assert "db" not in options
        assert options["socket_timeout"] == 1.5, "a hanging sentinel is given up on"

    def test_sentinels_get_no_credentials_unless_given_their_own(self, monkeypatch):
        asked: list[dict[str, Any]] = []

        def fake_ask(_address: tuple[str, int], options: dict[str, Any], *_command: Any) -> Any:
            asked.append(options)
            return [b"10.9.9.9", b"6390"]

        monkeypatch.setattr(clients_module, "_ask", fake_ask)
        pool = distributed_pool("redis+sentinel://queue:s3cret@s1:26379/mymaster", QUEUE)
        assert pool.connection_class is RoutedConnection
        pool.connection_kwargs["router"].address()
        assert [(o["username"], o["password"]) for o in asked] == [(None, None)]

    def test_cluster_seeds_get_the_node_credentials(self, monkeypatch):
        asked: list[tuple[tuple[str, int], dict[str, Any]]] = []

        def fake_ask(address: tuple[str, int], options: dict[str, Any], *command: Any) -> Any:
            asked.append((address, options))
            assert command == ("CLUSTER", "SLOTS")
            if address[1] == 7000:
                raise redis.ConnectionError("seed down")
            return [[0, 16383, [b"10.9.9.8", 7005, b"id"]]]

        monkeypatch.setattr(clients_module, "_ask", fake_ask)
        pool = distributed_pool("redis+cluster://queue:s3cret@h1:7000,h2:7001", QUEUE)
        _, address = pool.connection_kwargs["router"].address()
        assert address == ("10.9.9.8", 7005), "the second seed answers when the first is down"
        assert [a for a, _ in asked] == [("h1", 7000), ("h2", 7001)]
        assert all((o["username"], o["password"]) == ("queue", "s3cret") for _, o in asked)
        assert all("db" not in o for _, o in asked)

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("redis+cluster://queue:s3cret@h1", "'h1' is not host:port"),
            ("redis+cluster://queue:s3cret@h1:7000,h2", "'h2' is not host:port"),
            ("redis+cluster://queue:s3cret@h1:port", "'h1:port' is not host:port"),
            ("redis+cluster://queue:s3cret@h1:7000,:7001", "':7001' is not host:port"),
            ("redis+sentinel://queue:s3cret@s1:26379,s2:26379", "name the master"),
            ("redis+sentinel://queue:s3cret@s1:26379/", "name the master"),
            ("redis+sentinel://queue:s3cret@s1:26379/m/one", "'/m/one' is not a database number"),
            ("redis+sentinel://queue:s3cret@s1:26379/m/0/1", "is not a database number"),
            ("redis+cluster://queue:s3cret@h1:7000/x", "'/x' is not a database number"),
            ("redis+cluster://queue:s3cret@h1:7000/1", "a cluster has database 0 only"),
            ("redis+cluster://queue:s3cret@h1:7000?socket_timeout=soon", "socket_timeout"),
            ("redis://queue:s3cret@h1:6379", "not a cluster or Sentinel URL"),
        ],
    )
    def test_malformed_urls_are_refused_naming_why_with_the_password_masked(self, url, why):
        with pytest.raises(QueueConfigurationError) as caught:
            parse_distributed_url(url)
        message = str(caught.value)
        assert why in message, f"{why!r} not in {message!r}"
        assert "s3cret" not in message, f"password shown: {message!r}"
        assert "queue:***@" in message, f"URL not named with its password masked: {message!r}"

    # Found by a black-box review: redis-py's ValueError reached the caller of the Python
    # API, and a database that is not a number was taken for db 0.
    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("http://queue:s3cret@h1:6379/0", "not a Redis URL"),
            ("redis://queue:s3cret@h1:99999/0", "Port out of range"),
            ("redis://queue:s3cret@h1:abc/0", "Port could not be cast"),
            ("redis://queue:s3cret@h1:6379/notadb", "'/notadb' is not a database number"),
            ("redis://queue:s3cret@h1:6379/0?socket_timeout=abc", "socket_timeout"),
            ("redis+cluster://queue:s3cret@h1", "'h1' is not host:port"),
            # a second black-box review: these reached redis-py, which failed at connect
            ("redis://queue:s3cret@h1:6379/0?bogus=1", "unknown option 'bogus'"),
            ("redis://queue:s3cret@h1:6379/0?socket_timeout=-1", "socket_timeout=-1.0 must"),
            ("redis://queue:s3cret@h1:6379/0?socket_timeout=0", "socket_timeout=0.0 must"),
            ("redis://queue:s3cret@h1:6379/0?max_connections=0", "max_connections=0 must"),
            ("redis+cluster://queue:s3cret@h1:7000?bogus=1", "unknown option 'bogus'"),
            ("redis+sentinel://queue:s3cret@s1:26379/m?health_check_interval=-1", "must be"),
        ],
    )
    def test_every_client_refuses_a_bad_url_with_a_queue_error(self, url, why):
        makers = [
            lambda: TaskProducer(url, "q", registry=CollectorRegistry()).connect(),
            lambda: TaskConsumer(url, "q", print, 1, registry=CollectorRegistry()).connect(),
            lambda: DeadLetterQueue(url, "q"),
        ]
        for make in makers:
            with pytest.raises(QueueConfigurationError) as caught:
                make()
            message = str(caught.value)
            assert why in message, f"{why!r} not in {message!r}"
            assert "s3cret" not in message, f"password shown: {message!r}"

    def test_cli_refuses_a_malformed_cluster_url_as_a_usage_error(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR.parent), env.get("PYTHONPATH", "")) if p
        )
        env.pop("REDIS_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "semibot_queue", "stats", "--redis-url",
             "redis+cluster://queue:s3cret@h1"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, f"exit {done.returncode}, stderr: {done.stderr!r}"
        assert "'h1' is not host:port" in done.stderr, done.stderr
        assert "--redis-url" in done.stderr, done.stderr
        assert "s3cret" not in done.stderr + done.stdout, "password shown"


# --- 2. a one-node cluster ---------------------------------------------------------------------


class TestCluster:
    def test_producer_consumer_and_dead_letters_through_a_cluster_url(self, cluster):
        url = cluster.url
        assert url == f"redis+cluster://{HOST}:{cluster.ports[0]}"

        def handler(message: TaskMessage) -> str:
            if message.config.get("refuse"):
                raise PermanentTaskError("not this one")
            return shout(message)

        with producer(url) as queue, running(consumer(url, handler)):
            task_id = queue.enqueue(payload(1))
            refused = queue.enqueue(payload(2, config={"refuse": True}))
            result = queue.wait_for_result(task_id, timeout=10)
            failed = queue.wait_for_result(refused, timeout=10)
        assert result is not None, "no result within 10 s"
        assert (result.status, result.result) == ("succeeded", "QUESTION 1")
        assert failed is not None, "no result for the refused task within 10 s"
        assert failed.status == "failed"
        with DeadLetterQueue(url, QUEUE, FAST) as dlq:
            records = dlq.list()
            assert [(r.task_id, r.reason) for r in records] == [(refused, "permanent")]
            assert dlq.count() == 1
        with cluster.node_client(cluster.ports[0]) as node:
            assert Ledger(node, KEYS).check([task_id, refused]) == {
                task_id: SUCCEEDED,
                refused: DEAD,
            }

    def test_a_given_redis_cluster_client_is_adopted(self, cluster):
        port = cluster.ports[0]
        theirs = redis.RedisCluster(host=HOST, port=port)
        try:
            with producer(client=theirs) as queue:
                task_id = queue.enqueue(payload(3))
                with cluster.node_client(port) as node:
                    stored = node.lrange(QUEUE, 0, -1)
                assert len(stored) == 1, f"expected the task on the cluster, found {stored}"
                assert task_id.encode() in stored[0]
                assert queue.status(task_id) == "pending"
                with running(consumer(None, shout, client=theirs)):
                    result = queue.wait_for_result(task_id, timeout=10)
            assert result is not None, "no result within 10 s"
            assert (result.status, result.result) == ("succeeded", "QUESTION 3")
            assert theirs.ping(), "the given client was closed with the producer"
        finally:
            theirs.close()


# --- 3. Sentinel -------------------------------------------------------------------------------


class TestSentinel:
    def test_producer_and_consumer_through_a_sentinel_url(self, group):
        url = group.url
        assert url.endswith("/semibot/0")
        with producer(url) as queue, running(consumer(url, shout)):
            task_id = queue.enqueue(payload(4))
            result = queue.wait_for_result(task_id, timeout=10)
        assert result is not None, "no result within 10 s"
        assert (result.status, result.result) == ("succeeded", "QUESTION 4")
        with group.data_client(group.data_ports[0]) as master:
            assert Ledger(master, KEYS).check([task_id]) == {task_id: SUCCEEDED}

    def test_a_given_sentinel_master_client_is_adopted(self, group):
        sentinel = redis.sentinel.Sentinel(
            [(HOST, port) for port in group.sentinel_ports], socket_timeout=5.0
        )
        theirs = sentinel.master_for(group.master_name, socket_timeout=5.0)
        try:
            with producer(client=theirs) as queue:
                task_id = queue.enqueue(payload(5))
                with group.data_client(group.data_ports[0]) as master:
                    assert master.llen(QUEUE) == 1, "the task is not on the master"
                with running(consumer(None, shout, client=theirs)):
                    result = queue.wait_for_result(task_id, timeout=10)
            assert result is not None, "no result within 10 s"
            assert (result.status, result.result) == ("succeeded", "QUESTION 5")
            assert theirs.ping(), "the given client was closed with the producer"
        finally:
            theirs.close()
            for node in sentinel.sentinels:
                node.close()

    def test_a_write_refused_readonly_asks_the_sentinels_again(self, group, caplog):
        """Pointed at the replica (as a client of a demoted master is), a write is
        refused READONLY, retried, and lands on the master the sentinels name."""
        master, replica = ((HOST, port) for port in group.data_ports)
        client = make_client(group.url, FAST, queue=QUEUE)
        router = client.connection_pool.connection_kwargs["router"]
        registry = CollectorRegistry()
        queue = TaskProducer(None, QUEUE, FAST, client=client, registry=registry)
        try:
            queue.connect()
            generation, found = router.address()
            assert found == master, "the sentinels named another master"
            router.moved(generation, replica)  # what a master demoted under us looks like
            assert router.address()[1] == replica
            with caplog.at_level(logging.WARNING, logger="semibot_queue"):
                task_id = queue.enqueue(payload(6))
        finally:
            queue.disconnect()
            client.close()
        warnings = retry_warnings(caplog)
        assert len(warnings) == 1, f"expected one refused try, then success: {warnings}"
        assert "read only replica" in warnings[0], warnings[0]
        assert reconnects(registry) == 1
        assert router.address()[1] == master, "the router did not ask the sentinels again"
        with group.data_client(master[1]) as node:
            stored = node.lrange(QUEUE, 0, -1)
        assert len(stored) == 1, f"expected one copy on the master, found {stored}"
        assert task_id.encode() in stored[0]


# --- 4. MIN_REPLICAS_TO_ACK --------------------------------------------------------------------


def wait_calls(client: redis.Redis[bytes]) -> int:
    """How many WAIT commands the server has run."""
    stats = client.info("commandstats").get("cmdstat_wait", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


class TestMinReplicasToAck:
    def test_a_confirmed_enqueue_is_on_the_replica_at_once(self, group):
        master_port, replica_port = group.data_ports
        conf = settings(min_replicas_to_ack=1, replica_ack_timeout=5.0)
        with group.data_client(master_port) as master, group.data_client(replica_port) as replica:
            waits_before = wait_calls(master)
            with producer(group.url, conf) as queue:
                task_id = queue.enqueue(payload(7))
                # no waiting here: WAIT returned only once the replica had it
                copied = replica.lrange(QUEUE, 0, -1)
                ids = queue.enqueue_many([payload(8), payload(9)])
                copied_many = replica.llen(QUEUE)
            waits = wait_calls(master) - waits_before
        assert len(copied) == 1, f"the replica has {copied}, not the confirmed task"
        assert task_id.encode() in copied[0]
        assert copied_many == 3, f"the replica has {copied_many} of 3 confirmed tasks"
        assert len(ids) == 2
        assert waits == 2, f"expected one WAIT per enqueue call, the master ran {waits}"

    def test_no_replica_to_confirm_raises_and_leaves_one_copy_pending(
        self, redis_url, redis_client
    ):
        conf = settings(
            min_replicas_to_ack=1,
            replica_ack_timeout=0.05,
            max_reconnect_attempts=2,
            error_retry_delay=0.01,
        )
        task = payload(10)
        with producer(redis_url, conf) as queue:
            with pytest.raises(QueueConnectionError) as caught:
                queue.enqueue(task)
            status = queue.status(task.task_id)  # a read: no WAIT
        message = str(caught.value)
        assert not isinstance(caught.value, QueueConfigurationError)
        assert isinstance(caught.value.__cause__, NotReplicatedError), repr(caught.value.__cause__)
        assert "0 of the 1 replicas" in message, message
        assert "confirmed the write within 50 ms" in message, message
        assert "after 2 attempts" in message, message
        # What the library does: the first try wrote the task and WAIT found no replica;
        # the repeat, with the same token, wrote nothing again. So the task is pending,
        # once, though enqueue raised ("it may be lost" on failover, not a refusal).
        stored = redis_client.lrange(KEYS.pending, 0, -1)
        assert len(stored) == 1, f"expected exactly one copy pending, found {stored}"
        assert task.task_id.encode() in stored[0]
        assert status == "pending"


# --- 5. TLS and the README's ACL user ----------------------------------------------------------

#: Denials the README calls optional (CONFIG GET: skipped quietly), and redis-py's CLIENT
#: SETINFO, which a Redis of 7.2 or later refuses to this user (redis-py ignores the refusal;
#: Redis 7.0 has no such command).
TOLERATED_DENIALS = {"config|get", "client|setinfo"}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def acl_denials(admin: redis.Redis[bytes]) -> list[str]:
    """What the server refused to user ``queue`` since the test began, but the tolerated."""
    denials = []
    for entry in admin.execute_command("ACL", "LOG"):
        # RESP3 gives a map per entry, RESP2 a flat list of field, value
        pairs = (
            entry.items() if isinstance(entry, dict) else zip(entry[::2], entry[1::2], strict=True)
        )
        text = {_text(key): _text(value) for key, value in pairs}
        if text.get("username") == "queue" and text.get("object") not in TOLERATED_DENIALS:
            denials.append(f"{text.get('reason')} {text.get('object')!r} ({text.get('context')})")
    return denials


def assert_allowed(admin: redis.Redis[bytes], worker: Running | None = None) -> None:
    """Nothing refused to user ``queue`` so far, and ``worker`` still running."""
    denied = acl_denials(admin)
    assert not denied, f"refused to the README's ACL user (its line lacks them): {denied}"
    if worker is not None:
        assert worker.thread.is_alive(), f"the worker stopped: {worker.error!r}"


def reached(
    admin: redis.Redis[bytes], worker: Running, queue: TaskProducer, wanted: dict[str, str]
) -> bool:
    """Whether every task has its wanted status; fails at once on an ACL refusal."""
    assert_allowed(admin, worker)
    return all(queue.status(task_id) == status for task_id, status in wanted.items())


def assert_no_acl_refusal_logged(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r.getMessage() for r in caplog.records if "ACL" in r.getMessage()]
    assert not logged, f"ACL refusals logged: {logged}"


class TestTlsAcl:
    def test_the_readme_acl_line_is_what_the_server_runs(self, tls):
        with tls_admin(tls) as admin:
            rules = admin.execute_command("ACL", "GETUSER", "queue")
        assert rules, "user queue is missing: the README's line was refused"

    def test_producer_with_the_readme_acl_user(self, tls, caplog):
        url = tls.url()  # user queue, password queuepw, verified with the right CA
        assert url.startswith("rediss://queue:queuepw@")
        with (
            caplog.at_level(logging.WARNING, logger="semibot_queue"),
            tls_admin(tls) as admin,
            producer(url) as queue,
        ):
            plain = queue.enqueue(payload(11))
            many = queue.enqueue_many([payload(12), payload(13)])
            # due no later than `later`: dropped by the promotion that moves `later`
            voided = queue.enqueue(payload(16), delay=0.2)
            later = queue.enqueue(payload(14), delay=0.2)
            doomed = queue.enqueue(payload(15))
            assert queue.status(plain) == "pending"
            assert queue.status(later) == "scheduled"
            assert queue.cancel(doomed) is True, "cancel of a pending task said not live"
            assert queue.cancel(voided) is True, "cancel of a scheduled task said not live"
            assert queue.status(doomed) == "cancelled"
            # 4 pending and 2 scheduled, one of them cancelled: a 6th live task fits in 6
            small = attrs.evolve(FAST, max_queue_length=6, queue_length_warning_threshold=6)
            with producer(url, small) as full:
                last = full.enqueue(payload(17))
            assert_allowed(admin)
            finished = [plain, *many, later, last]
            with running(consumer(url, shout)) as worker:
                first = queue.wait_for_result(plain, timeout=5)  # waits for it to run
                wait_until(
                    lambda: reached(admin, worker, queue, dict.fromkeys(finished, "succeeded")),
                    10.0,
                    "every task but the cancelled one to succeed",
                )
                results = [queue.wait_for_result(t, timeout=1) for t in finished]
            cancelled = queue.wait_for_result(doomed, timeout=1)
            assert_allowed(admin)
            ledger = Ledger(admin, KEYS)
            assert ledger.outcomes(finished) == dict.fromkeys(finished, SUCCEEDED)
            assert not ledger.leftovers(), ledger.leftovers()
        assert first is not None, "no result within 5 s"
        assert (first.status, first.result) == ("succeeded", "QUESTION 11")
        assert [r.result if r else None for r in results] == [
            f"QUESTION {n}" for n in (11, 12, 13, 14, 17)
        ]
        assert cancelled is not None
        assert cancelled.status == "cancelled"
        assert_no_acl_refusal_logged(caplog)

    def test_worker_retries_and_dead_letters_with_the_readme_acl_user(self, tls, caplog):
        url = tls.url()
        conf = settings(max_retry_attempts=3, retry_base_delay=0.01, retry_max_delay=0.02)
        runs: dict[str, int] = {}
        lock = threading.Lock()

        def handler(message: TaskMessage) -> str:
            with lock:
                runs[message.task_id] = runs.get(message.task_id, 0) + 1
                first_run = runs[message.task_id] == 1
            kind = message.config.get("kind")
            if kind == "flaky" and first_run:
                raise TimeoutError("upstream slow, once")
            if kind == "refuse" and first_run:
                raise PermanentTaskError("not this one")
            return shout(message)

        with (
            caplog.at_level(logging.WARNING, logger="semibot_queue"),
            tls_admin(tls) as admin,
            producer(url, conf) as queue,
            running(consumer(url, handler, conf)) as worker,
        ):
            flaky = queue.enqueue(payload(20, config={"kind": "flaky"}))
            refused = queue.enqueue_many([payload(n, config={"kind": "refuse"}) for n in (21, 22)])
            wanted = {flaky: "succeeded", refused[0]: "dead", refused[1]: "dead"}
            wait_until(lambda: reached(admin, worker, queue, wanted), 10.0, f"statuses {wanted}")
            with DeadLetterQueue(url, QUEUE, conf) as dlq:
                records = dlq.list()
                assert sorted(r.task_id for r in records) == sorted(refused)
                assert {r.reason for r in records} == {"permanent"}
                assert dlq.get(refused[0]) is not None
                assert dlq.retry(refused[0]) is True, "retry of a dead letter refused"
                assert dlq.delete(refused[1]) is True, "delete of a dead letter refused"
                assert dlq.count() == 0
            replayed = {refused[0]: "succeeded"}
            wait_until(lambda: reached(admin, worker, queue, replayed), 10.0, "the replay to run")
            flaky_result = queue.wait_for_result(flaky, timeout=1)
            assert_allowed(admin)
            ledger = Ledger(admin, KEYS)
            assert ledger.outcomes([flaky, refused[0]]) == dict.fromkeys(
                [flaky, refused[0]], SUCCEEDED
            )
            assert dead_record_ids(admin, KEYS, refused[1]) == [], "the deleted record is back"
        assert flaky_result is not None
        assert (flaky_result.status, flaky_result.attempts) == ("succeeded", 2), "not retried once"
        assert runs == {flaky: 2, refused[0]: 2, refused[1]: 1}
        assert_no_acl_refusal_logged(caplog)

    def test_recovery_clear_resync_and_replica_wait_with_the_readme_acl_user(self, tls, caplog):
        """The paths off the happy one: a dead worker's task recovered, clear_queue, a
        worker whose link dropped looking for orphans of its own, and WAIT."""
        url = tls.url()
        orphan = TaskMessage.from_payload(payload(30), 0.0)
        with (
            caplog.at_level(logging.WARNING, logger="semibot_queue"),
            tls_admin(tls) as admin,
            producer(url) as queue,
        ):
            admin.lpush(KEYS.inflight("gone-1"), Codec(1 << 20).encode_message(orphan))
            admin.zadd(KEYS.workers, {"gone-1": 0})  # its last heartbeat long ago
            queue.enqueue_many([payload(31), payload(32)])
            assert queue.clear_queue() == 2
            with running(consumer(url, shout)) as worker:
                wait_until(
                    lambda: reached(admin, worker, queue, {orphan.task_id: "succeeded"}),
                    10.0,
                    "the dead worker's task to be recovered and run",
                )
                # every link of user queue drops: the worker's blocking pop among them
                killed = admin.execute_command("CLIENT", "KILL", "USER", "queue")
                assert killed >= 1, "no connection of user queue to kill"
                after = queue.enqueue(payload(33))
                wait_until(
                    lambda: reached(admin, worker, queue, {after: "succeeded"}),
                    10.0,
                    "a task enqueued after the links dropped to run",
                )
            strict = settings(min_replicas_to_ack=1, replica_ack_timeout=0.01)
            with (
                producer(url, attrs.evolve(strict, max_reconnect_attempts=1)) as waiting,
                pytest.raises(QueueConnectionError) as caught,
            ):
                waiting.enqueue(payload(34))  # no replica here: WAIT finds none
            assert not isinstance(caught.value, QueueConfigurationError), str(caught.value)
            assert "replicas" in str(caught.value), str(caught.value)
            assert_allowed(admin)
            assert not admin.exists(KEYS.inflight("gone-1"))
        assert_no_acl_refusal_logged(caplog)

    def test_cli_stats_with_the_readme_acl_user(self, tls):
        url = tls.url()
        with producer(url) as queue:
            queue.enqueue(payload(18))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR.parent), env.get("PYTHONPATH", "")) if p
        )
        env.pop("REDIS_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "semibot_queue", "stats", "--redis-url", url,
             "--queue", QUEUE],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"exit {done.returncode}, stderr: {done.stderr}"
        assert "pending" in done.stdout, done.stdout
        with tls_admin(tls) as admin:
            assert_allowed(admin)


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """A TLS server that refuses clients without a certificate; the README's ACL user."""
    rules = readme_acl_rules()
    with TlsRedis(tmp_path_factory.mktemp("mtls"), mutual=True, queue_user_rules=rules) as tls:
        yield tls


class TestMutualTls:
    def test_the_client_certificate_in_the_url_is_accepted(self, mutual):
        url = mutual.url(client_cert=True)
        assert "ssl_certfile=" in url
        assert "ssl_keyfile=" in url
        with producer(url) as queue, running(consumer(url, shout)):
            task_id = queue.enqueue(payload(19))
            result = queue.wait_for_result(task_id, timeout=10)
        assert result is not None, "no result within 10 s"
        assert (result.status, result.result) == ("succeeded", "QUESTION 19")

    def test_without_a_client_certificate_it_fails_at_once(self, mutual):
        # max_reconnect_attempts=1: a refusal taken for a dropped link shows as a plain
        # QueueConnectionError; the race goes either way, so try several times
        conf = settings(max_reconnect_attempts=1)
        seen = []
        for _ in range(10):
            queue = producer(mutual.url(), conf)
            error = raised_within(queue.connect)
            queue.disconnect()
            seen.append(f"{type(error).__name__}: {error}")
            assert isinstance(error, QueueConfigurationError), f"tries so far: {seen}"
            assert "TLS" in str(error), str(error)


# --- 6. refusals fail at once ------------------------------------------------------------------

#: Many slow attempts: a refusal retried as "unreachable" would be seen (and take seconds).
PATIENT = settings(max_reconnect_attempts=20, error_retry_delay=0.2, max_reconnect_delay=0.5)


def assert_refused_at_once(
    make: Callable[[CollectorRegistry], Any], caplog: pytest.LogCaptureFixture, *words: str
) -> str:
    """``make(registry)`` builds a producer or consumer whose ``connect()`` must raise
    QueueConfigurationError on the first attempt; its message, which has ``words``."""
    registry = CollectorRegistry()
    user = make(registry)
    with caplog.at_level(logging.WARNING, logger="semibot_queue"):
        try:
            error = raised_within(user.connect)
        finally:
            user.disconnect()
    assert isinstance(error, QueueConfigurationError), f"raised {error!r}"
    message = str(error)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert retry_warnings(caplog) == [], "a refusal was retried"
    assert reconnects(registry) == 0
    return message


class TestRefusedAtOnce:
    def test_a_wrong_password_over_tls(self, tls, caplog):
        url = tls.url(password="not-the-password")  # noqa: S106 - wrong on purpose
        message = assert_refused_at_once(
            lambda reg: TaskProducer(url, QUEUE, PATIENT, registry=reg),
            caplog,
            "refused our credentials",
        )
        assert "not-the-password" not in message
        assert_refused_at_once(
            lambda reg: TaskConsumer(url, QUEUE, shout, 1, PATIENT, registry=reg),
            caplog,
            "refused our credentials",
        )

    def test_a_certificate_of_another_ca(self, tls, caplog):
        url = tls.url(ca=tls.other_ca_path)
        assert_refused_at_once(
            lambda reg: TaskProducer(url, QUEUE, PATIENT, registry=reg),
            caplog,
            "TLS",
            "certificate",
        )

    def test_a_cluster_seed_refusing_the_password(self, cluster, caplog):
        url = f"redis+cluster://queue:wrongpw@{HOST}:{cluster.ports[0]}"
        message = assert_refused_at_once(
            lambda reg: TaskProducer(url, QUEUE, PATIENT, registry=reg),
            caplog,
            "refused our credentials",
        )
        assert "wrongpw" not in message
