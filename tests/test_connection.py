"""Connections and errors: bounded pools, no silent re-sends, every redis-py error translated.

Regression tests for issue 8's "Why" bullets in this area run against real redis-servers
(a password, an ACL file, TLS with trustme certificates, maxmemory, a replica):

- one producer used from 150 short-lived threads:
  ``test_150_short_lived_threads_share_one_producer_within_max_connections``;
- a wrong password or a failed certificate check retried for minutes as "unreachable":
  ``test_a_wrong_or_missing_password_fails_at_once_as_a_configuration_error``,
  ``test_a_failed_certificate_check_fails_at_once_as_a_configuration_error``
  (and ``test_an_acl_user_refused_a_command_fails_at_once_as_a_configuration_error``);
- Redis out of memory reaching callers as a raw redis-py exception:
  ``test_out_of_memory_reaches_the_producer_as_queue_out_of_memory_error``;
- READONLY, NOREPLICAS and the other "not now" replies are transient:
  ``test_readonly_from_a_replica_is_retried_until_it_is_promoted``;
- an injected client that would re-send commands:
  ``test_an_injected_client_that_would_resend_commands_is_refused``.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import fakeredis
import pytest
import redis
import trustme
from prometheus_client import CollectorRegistry
from redis._parsers import BaseParser
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    DataError,
    ExternalAuthProviderError,
    InvalidResponse,
    MasterDownError,
    MaxConnectionsError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from redis_server import HOST, RedisServer, free_port
from semibot_queue import DeadLetterQueue, QueueSettings, TaskConsumer, TaskProducer
from semibot_queue.cli import Exit, main
from semibot_queue.clients import make_client
from semibot_queue.connection import (
    TRANSIENT,
    Reconnector,
    check_client,
    is_configuration_error,
    is_transient,
    translate,
)
from semibot_queue.constants import MAX_CONNECTIONS
from semibot_queue.errors import (
    QueueConfigurationError,
    QueueConnectionError,
    QueueError,
    QueueOutOfMemoryError,
    RedisCommandError,
)
from semibot_queue.keys import KeySpace
from semibot_queue.script_runner import Connections as _Connections
from semibot_queue.script_runner import Script as _Script
from support import payload, wait_until

#: Retries that would show: a retried call waits exactly 1 s (no jitter) before trying again.
SLOW_RETRY = QueueSettings(
    error_retry_delay=1.0, max_reconnect_delay=1.0, max_reconnect_attempts=2, retry_jitter=0.0
)
#: A call that fails for good must fail faster than one retry's wait.
AT_ONCE_S = 1.0
#: Quick reconnects, so a wrong classification fails a test in seconds, not minutes.
QUICK_RETRY = QueueSettings(
    error_retry_delay=0.01, max_reconnect_delay=0.05, max_reconnect_attempts=3, retry_jitter=0.0
)
PASSWORD = "right-pass"  # noqa: S105 - a test server's password
ENQUEUE = ("enqueue", "--session-id", "s", "--agent-id", "a", "--org-id", "o", "--message", "u:hi")


@pytest.fixture(autouse=True)
def _restore_package_logger() -> Iterator[None]:
    """The command line configures the ``semibot_queue`` logger; undo it after the test."""
    logger = logging.getLogger("semibot_queue")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# --- servers -------------------------------------------------------------------------------


@attrs.frozen
class TlsFiles:
    """A CA, the server certificate it signed (for 127.0.0.1), and a CA that signed nothing."""

    ca: Path
    cert: Path
    key: Path
    stranger_ca: Path


class SecuredRedisServer(RedisServer):
    """A RedisServer that wants a password, or speaks only TLS; its URL says what it needs."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: TlsFiles | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        super().__init__(directory, extra_args=extra_args)
        self.password = password
        self.tls = tls

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}{HOST}:{self.port}/0"
        return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={self.tls.ca}"

    def _command(self) -> list[str]:
        command = super()._command()
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls is not None:
            command += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return command


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert(HOST)
    files = TlsFiles(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        stranger_ca=directory / "stranger-ca.pem",
    )
    ca.cert_pem.write_to_path(str(files.ca))
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    trustme.CA().cert_pem.write_to_path(str(files.stranger_ca))
    return files


@pytest.fixture
def tls_server(tmp_path: Path, certificates: TlsFiles) -> Iterator[SecuredRedisServer]:
    with SecuredRedisServer(tmp_path / "tls", tls=certificates) as server:
        yield server


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[SecuredRedisServer]:
    with SecuredRedisServer(tmp_path / "auth", password=PASSWORD) as server:
        yield server


#: ``queue`` may run anything but scripts; ``nopush`` anything but LPUSH; ``noread`` no reads.
ACL = """\
user default on nopass ~* &* +@all
user queue on >queue-pass ~* &* +@all -@scripting
user nopush on >nopush-pass ~* &* +@all -lpush
user noread on >noread-pass ~* &* +@all -@read
"""


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RedisServer]:
    acl = tmp_path / "users.acl"
    acl.write_text(ACL)
    with RedisServer(tmp_path / "acl", extra_args=("--aclfile", str(acl))) as server:
        yield server


def as_user(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{user}-pass@{HOST}:{server.port}/0"


def elapsed(call: Callable[[], Any]) -> tuple[BaseException, float]:
    """What ``call()`` raised and how long it took; fails if it raised nothing."""
    started = time.monotonic()
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the callers check the type
        call()
    return caught.value, time.monotonic() - started


def producer(url: str, settings: QueueSettings = SLOW_RETRY, **options: Any) -> TaskProducer:
    return TaskProducer(url, "q", settings, registry=CollectorRegistry(), **options)


def opened_connections(admin: redis.Redis[bytes]) -> int:
    """How many connections the server has accepted since it started."""
    return int(admin.info("stats")["total_connections_received"])


def client_ids(admin: redis.Redis[bytes]) -> set[int]:
    """Ids of the normal clients connected to the server now (``admin`` among them)."""
    return {int(client["id"]) for client in admin.client_list(_type="normal")}


# --- bounded connections ---------------------------------------------------------------------


class TestBoundedConnections:
    """However many threads call one client object, it holds at most MAX_CONNECTIONS."""

    def test_150_short_lived_threads_share_one_producer_within_max_connections(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        assert QUICK_RETRY.max_connections == MAX_CONNECTIONS
        before = client_ids(redis_client)  # other tests may leave idle clients behind
        opened_before = opened_connections(redis_client)
        errors: list[BaseException] = []
        start = threading.Barrier(150)

        def enqueue_once(shared: TaskProducer, n: int) -> None:
            start.wait()
            try:
                shared.enqueue(payload(n))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        with producer(redis_url, QUICK_RETRY) as shared:
            threads = [threading.Thread(target=enqueue_once, args=(shared, n)) for n in range(150)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert errors == []
            assert shared.get_queue_length() == 150
            assert len(client_ids(redis_client) - before) <= MAX_CONNECTIONS
        opened = opened_connections(redis_client) - opened_before
        assert 1 <= opened <= MAX_CONNECTIONS

    def test_callers_wait_for_a_free_connection_instead_of_failing(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        opened_before = opened_connections(redis_client)
        settings = attrs.evolve(QUICK_RETRY, max_connections=2)
        with producer(redis_url, settings) as shared:
            threads = [
                threading.Thread(target=lambda n=n: shared.enqueue(payload(n))) for n in range(40)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            assert shared.get_queue_length() == 40
        opened = opened_connections(redis_client) - opened_before
        assert opened <= 2

    def test_make_client_builds_a_bounded_waiting_pool_that_never_resends(self) -> None:
        settings = QueueSettings(max_connections=7, socket_timeout=2.5)
        client = make_client("redis://127.0.0.1:1/3", settings)
        try:
            pool = client.connection_pool
            assert isinstance(pool, redis.BlockingConnectionPool)
            assert (pool.max_connections, pool.timeout) == (7, None)
            options = pool.connection_kwargs
            assert options["retry"].get_retries() == 0
            assert (options["socket_timeout"], options["socket_connect_timeout"]) == (2.5, 2.5)
            assert options["db"] == 3
            assert check_client(client) is client
        finally:
            client.close()

    def test_a_blocking_pop_client_gets_its_own_socket_timeout(self) -> None:
        client = make_client("redis://127.0.0.1:1/0", QueueSettings(), socket_timeout=40.0)
        try:
            options = client.connection_pool.connection_kwargs
            assert options["socket_timeout"] == 40.0
            assert options["socket_connect_timeout"] == QueueSettings().socket_timeout
        finally:
            client.close()

    def test_closing_the_client_closes_its_connections(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        before = client_ids(redis_client)
        client = make_client(redis_url, QueueSettings())
        assert client.ping() is True
        assert len(client_ids(redis_client) - before) == 1
        client.close()
        wait_until(lambda: client_ids(redis_client) <= before, what="the connection to close")


# --- scripts: one connection per call ---------------------------------------------------------


def script_of(client: redis.Redis[bytes], source: str) -> _Script:
    return _Script(_Connections(client), source)


class TestScriptConnections:
    """A script call borrows a pooled connection and gives it back; a broken one is dropped."""

    def test_a_connection_is_lent_for_one_call_so_another_thread_can_use_it(
        self, redis_url: str
    ) -> None:
        pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=None)
        client = redis.Redis(connection_pool=pool)
        echo = script_of(client, "return ARGV[1]")
        try:
            assert echo(args=["main"]) == b"main"
            replies: list[bytes] = []
            # a daemon: if the connection were kept by the main thread, this one waits forever
            other = threading.Thread(
                target=lambda: replies.append(echo(args=["other"])), daemon=True
            )
            other.start()
            other.join(5)
            assert replies == [b"other"]  # the main thread's call gave its connection back
            assert client.ping() is True
        finally:
            pool.disconnect()

    def test_threads_wait_for_a_plain_pool_instead_of_running_out(self, redis_url: str) -> None:
        pool = redis.ConnectionPool.from_url(redis_url, max_connections=2)
        client = redis.Redis(connection_pool=pool)
        echo = script_of(client, "return ARGV[1]")
        replies: list[bytes] = []
        lock = threading.Lock()

        def call(n: int) -> None:
            for _ in range(20):
                reply = echo(args=[str(n)])
                with lock:
                    replies.append(reply)

        try:
            threads = [threading.Thread(target=call, args=(n,)) for n in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert sorted(replies) == sorted(str(n).encode() for n in range(10) for _ in range(20))
            assert client.ping() is True  # nothing kept: the pool has its connections back
        finally:
            pool.disconnect()

    def test_a_connection_killed_while_idle_is_replaced_at_the_next_call(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        before = client_ids(redis_client)
        client = make_client(redis_url, QueueSettings())
        echo = script_of(client, "return ARGV[1]")
        try:
            assert echo(args=["1"]) == b"1"
            (ours,) = client_ids(redis_client) - before
            assert redis_client.client_kill_filter(_id=str(ours)) == 1
            wait_until(lambda: ours not in client_ids(redis_client), what="the server to close it")
            opened = opened_connections(redis_client)
            assert echo(args=["2"]) == b"2"  # it saw the closed socket before sending
            assert opened_connections(redis_client) == opened + 1
        finally:
            client.close()

    def test_a_reply_left_unread_by_a_timeout_never_reaches_the_next_call(
        self, redis_url: str
    ) -> None:
        client = make_client(redis_url, QueueSettings(), socket_timeout=0.1)
        slow = script_of(
            client,
            "local t = redis.call('TIME') local start = t[1] * 1e6 + t[2]"
            " repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - start > 300000"
            " return 'late'",
        )
        echo = script_of(client, "return ARGV[1]")
        try:
            with pytest.raises(redis.TimeoutError):
                slow()
            assert wait_until(lambda: _echo_or_none(echo, "next"), what="the server") == b"next"
        finally:
            client.close()

    def test_a_script_redis_forgot_is_loaded_again_on_the_same_call(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        client = make_client(redis_url, QueueSettings())
        echo = script_of(client, "return ARGV[1]")
        try:
            assert echo(args=["1"]) == b"1"
            redis_client.script_flush()
            assert echo(args=["2"]) == b"2"
        finally:
            client.close()


class TestIdleConnections:
    """A few connections wait between calls, never more than a quarter of the pool."""

    @pytest.mark.parametrize(("size", "kept"), [(1, 0), (3, 0), (4, 1), (8, 2), (50, 2)])
    def test_how_many_wait_depends_on_the_pool_size(
        self, redis_url: str, size: int, kept: int
    ) -> None:
        client = make_client(redis_url, QueueSettings(max_connections=size))
        connections = _Connections(client)
        slow = _Script(connections, "redis.call('TIME') return ARGV[1]")
        start = threading.Barrier(size)

        def call() -> None:
            start.wait()
            slow(args=["x"])

        try:
            threads = [threading.Thread(target=call) for _ in range(size)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert len(connections._idle) <= kept
            connections.close()
            assert connections._idle == []
        finally:
            client.close()

    def test_an_error_reply_keeps_the_connection(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        client = make_client(redis_url, QueueSettings())
        connections = _Connections(client)
        echo = _Script(connections, "return ARGV[1]")
        boom = _Script(connections, "return redis.error_reply('BOOM no luck')")
        try:
            assert echo(args=["1"]) == b"1"
            opened = opened_connections(redis_client)
            with pytest.raises(redis.ResponseError, match="no luck"):
                boom()
            assert echo(args=["2"]) == b"2"
            assert opened_connections(redis_client) == opened
        finally:
            connections.close()
            client.close()

    def test_a_failed_connect_gives_its_place_in_a_plain_pool_back(self) -> None:
        client = redis.Redis(
            connection_pool=redis.ConnectionPool(port=free_port(), max_connections=1)
        )
        echo = script_of(client, "return 1")
        failures: list[BaseException] = []

        def twice() -> None:
            for _ in range(2):
                try:
                    echo()
                except redis.ConnectionError as exc:
                    failures.append(exc)

        thread = threading.Thread(target=twice, daemon=True)  # a lost place would block it
        thread.start()
        thread.join(10)
        assert len(failures) == 2

    def test_a_forked_child_opens_its_own_connection(
        self, redis_url: str, redis_client: redis.Redis[bytes]
    ) -> None:
        client = make_client(redis_url, QueueSettings())
        connections = _Connections(client)
        echo = _Script(connections, "return ARGV[1]")
        try:
            assert echo(args=["parent"]) == b"parent"
            assert connections._idle  # the parent's connection waits for its next call
            opened = opened_connections(redis_client)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads around
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                os._exit(0 if echo(args=["child"]) == b"child" else 1)
            _, status = os.waitpid(pid, 0)
            assert status == 0
            assert opened_connections(redis_client) == opened + 1  # the child's own
            assert echo(args=["parent again"]) == b"parent again"
            assert opened_connections(redis_client) == opened + 1  # the parent kept its own
        finally:
            connections.close()
            client.close()


def _echo_or_none(echo: _Script, text: str) -> bytes | None:
    """The echo, or None while the server is still busy with the slow script."""
    try:
        reply: bytes = echo(args=[text])
    except redis.TimeoutError:
        return None
    return reply


# --- injected clients --------------------------------------------------------------------------


class TestInjectedClients:
    """A client given as client= must not re-send commands by itself."""

    @pytest.mark.parametrize(
        ("build", "count"),
        [
            (
                lambda url: redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 3)),
                "retries=3",
            ),
            (lambda url: redis.Redis.from_url(url, retry_on_timeout=True), "retries=1"),
            (
                lambda url: redis.Redis.from_url(url, retry=Retry(NoBackoff(), -1)),
                "retries=-1, forever",
            ),
        ],
        ids=["retry-3", "retry-on-timeout", "retry-forever"],
    )
    def test_an_injected_client_that_would_resend_commands_is_refused(
        self, redis_url: str, build: Callable[[str], redis.Redis[bytes]], count: str
    ) -> None:
        client = build(redis_url)
        try:
            with pytest.raises(QueueConfigurationError, match=count) as caught:
                producer(redis_url, client=client).connect()
            assert "Retry(redis.backoff.NoBackoff(), 0)" in str(caught.value)
            with pytest.raises(QueueConfigurationError):
                DeadLetterQueue(queue_name="q", client=client).purge()
            with pytest.raises(QueueConfigurationError):  # at construction, or at connect
                TaskConsumer(
                    queue_name="q",
                    handler=lambda message: None,
                    client=client,
                    registry=CollectorRegistry(),
                    handle_signals=False,
                ).connect()
        finally:
            client.close()

    def test_redis_py_default_client_retries_ten_times_and_is_refused(self) -> None:
        client = redis.Redis(host=HOST, port=1)
        with pytest.raises(QueueConfigurationError, match="retries=10"):
            check_client(client)

    def test_clients_that_never_resend_pass_as_they_are(self, redis_url: str) -> None:
        fake = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        from_url = redis.Redis.from_url(redis_url)
        explicit = redis.Redis(host=HOST, port=1, retry=Retry(NoBackoff(), 0))
        for client in (fake, from_url, explicit):
            assert check_client(client) is client
        with producer(redis_url, client=from_url) as given:
            assert given.enqueue(payload(1))
        for client in (fake, from_url, explicit):
            client.close()


# --- configuration errors fail at once -------------------------------------------------------


class TestConfigurationErrors:
    """Wrong credentials, an ACL refusal or a failed certificate check fail at once."""

    @pytest.mark.parametrize("password", ["wrong-pass", None], ids=["wrong", "missing"])
    def test_a_wrong_or_missing_password_fails_at_once_as_a_configuration_error(
        self, password_server: SecuredRedisServer, password: str | None
    ) -> None:
        url = password_server.url.replace(f":{PASSWORD}@", f":{password}@" if password else "")
        error, took = elapsed(lambda: producer(url).connect())
        assert isinstance(error, QueueConfigurationError), repr(error)
        assert took < AT_ONCE_S
        message = str(error)
        assert "password" in message
        assert f"127.0.0.1:{password_server.port}" in message
        if password is not None:
            assert password not in message
            assert ":***@" in message

    def test_the_right_password_works(self, password_server: SecuredRedisServer) -> None:
        with producer(password_server.url) as right:
            assert right.enqueue(payload(1))

    def test_a_failed_certificate_check_fails_at_once_as_a_configuration_error(
        self, tls_server: SecuredRedisServer, certificates: TlsFiles
    ) -> None:
        url = tls_server.url.replace(str(certificates.ca), str(certificates.stranger_ca))
        error, took = elapsed(lambda: producer(url).connect())
        assert isinstance(error, QueueConfigurationError), repr(error)
        assert took < AT_ONCE_S
        assert "certificate" in str(error).lower()
        assert isinstance(error.__cause__, redis.ConnectionError)

    def test_a_trusted_certificate_works(self, tls_server: SecuredRedisServer) -> None:
        with producer(tls_server.url) as trusted:
            assert trusted.enqueue(payload(1))
            assert trusted.get_queue_length() == 1

    def test_an_acl_user_refused_a_command_fails_at_once_as_a_configuration_error(
        self, acl_server: RedisServer
    ) -> None:
        with producer(as_user(acl_server, "queue")) as refused:
            error, took = elapsed(lambda: refused.enqueue(payload(1)))
        assert isinstance(error, QueueConfigurationError), repr(error)
        assert took < AT_ONCE_S
        assert "ACL user" in str(error)
        assert "evalsha" in str(error).lower()

    def test_a_command_refused_inside_a_script_is_an_acl_refusal_too(
        self, acl_server: RedisServer
    ) -> None:
        client = redis.Redis.from_url(as_user(acl_server, "nopush"))
        try:
            with pytest.raises(redis.ResponseError) as caught:
                client.eval("return redis.call('LPUSH', KEYS[1], 'x')", 1, "{q}:k")
        finally:
            client.close()
        assert is_configuration_error(caught.value)
        assert isinstance(translate(caught.value, "enqueue"), QueueConfigurationError)

    @pytest.mark.parametrize(
        ("case", "command"),
        [
            ("password", ENQUEUE),
            ("certificate", ENQUEUE),
            ("acl", ENQUEUE),
            ("password", ("stats",)),
            ("acl-no-read", ("stats",)),
        ],
        ids=[
            "enqueue-password",
            "enqueue-certificate",
            "enqueue-acl",
            "stats-password",
            "stats-acl",
        ],
    )
    def test_the_cli_exits_with_the_configuration_status(
        self,
        request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str],
        case: str,
        command: tuple[str, ...],
    ) -> None:
        if case == "password":
            url = request.getfixturevalue("password_server").url.replace(PASSWORD, "wrong-pass")
        elif case == "certificate":
            files: TlsFiles = request.getfixturevalue("certificates")
            url = request.getfixturevalue("tls_server").url
            url = url.replace(str(files.ca), str(files.stranger_ca))
        else:
            user = "queue" if case == "acl" else "noread"
            url = as_user(request.getfixturevalue("acl_server"), user)
        status = main(["--redis-url", url, *command])
        assert status == Exit.CONFIGURATION == 9
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("semibot-queue: error: ")
        assert "wrong-pass" not in lines[0]


# --- refusals that are not configuration -------------------------------------------------------


class TestRefusals:
    """Out of memory says so; READONLY and the other "not now" replies are retried."""

    def test_out_of_memory_reaches_the_producer_as_queue_out_of_memory_error(
        self, tmp_path: Path
    ) -> None:
        with RedisServer(tmp_path, extra_args=("--maxmemory", "1")) as server:
            with producer(server.url) as full:
                error, took = elapsed(lambda: full.enqueue(payload(1)))
            with server.client() as admin:
                assert admin.dbsize() == 0
        assert isinstance(error, QueueOutOfMemoryError), repr(error)
        assert isinstance(error, RedisCommandError)
        assert isinstance(error.__cause__, OutOfMemoryError)
        assert took < AT_ONCE_S
        assert "out of memory" in str(error)
        assert "enqueue" in str(error)

    def test_the_cli_reports_out_of_memory_in_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with RedisServer(tmp_path, extra_args=("--maxmemory", "1")) as server:
            status = main(["--redis-url", server.url, *ENQUEUE])
        assert status == Exit.ERROR
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        assert "out of memory (maxmemory)" in lines[0]

    def test_readonly_from_a_replica_is_retried_until_it_is_promoted(self, tmp_path: Path) -> None:
        settings = QueueSettings(
            error_retry_delay=0.02, max_reconnect_delay=0.05, max_reconnect_attempts=500
        )
        with (
            RedisServer(tmp_path / "master") as master,
            RedisServer(
                tmp_path / "replica", extra_args=("--replicaof", HOST, str(master.port))
            ) as replica,
            replica.client() as admin,
            producer(replica.url, settings) as writer,
        ):
            outcome: list[object] = []
            thread = threading.Thread(target=lambda: outcome.append(_try(writer.enqueue, 1)))
            thread.start()
            wait_until(lambda: _errors(admin, "READONLY") >= 2, what="two READONLY replies")
            admin.replicaof("NO", "ONE")
            thread.join(10)
            assert [type(o) for o in outcome] == [str], outcome
            assert admin.llen(KeySpace.of("q", settings).pending) == 1

    def test_a_readonly_reply_drops_the_connection_so_the_next_call_dials_again(
        self, tmp_path: Path
    ) -> None:
        with (
            RedisServer(tmp_path / "master") as master,
            RedisServer(
                tmp_path / "replica", extra_args=("--replicaof", HOST, str(master.port))
            ) as replica,
            replica.client() as admin,
        ):
            client = make_client(replica.url, QueueSettings())
            write = script_of(client, "return redis.call('INCR', KEYS[1])")
            try:
                with pytest.raises(ReadOnlyError):
                    write(keys=["{q}:n"])
                opened = opened_connections(admin)
                admin.replicaof("NO", "ONE")  # what a failover does; Sentinel would redirect
                assert write(keys=["{q}:n"]) == 1
                assert opened_connections(admin) == opened + 1
            finally:
                client.close()

    @pytest.mark.parametrize(
        "reply",
        ["NOREPLICAS Not enough good replicas to write.", "BUSY Redis is busy running a script."],
    )
    def test_replies_redis_py_has_no_class_for_are_retried_too(self, reply: str) -> None:
        calls: list[int] = []

        def refused_once() -> str:
            calls.append(1)
            if len(calls) == 1:
                raise BaseParser.parse_error(reply)
            return "done"

        reconnect = Reconnector("redis://h:1/0", "q", QUICK_RETRY, rand=lambda: 0.5)
        assert reconnect.call("enqueue", refused_once) == "done"
        assert len(calls) == 2


def _try(call: Callable[[Any], str], argument: int) -> object:
    try:
        return call(payload(argument))
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


def _errors(admin: redis.Redis[bytes], code: str) -> int:
    stats = admin.info("errorstats").get(f"errorstat_{code}", {})
    return int(stats.get("count", 0)) if isinstance(stats, dict) else 0


# --- the translation, case by case ---------------------------------------------------------------


def reply(text: str) -> redis.RedisError:
    """The exception redis-py raises for the error reply ``text``."""
    error: redis.RedisError = BaseParser.parse_error(text)
    return error


def caused_by(outer: Exception, inner: BaseException) -> Exception:
    """``outer`` raised while handling ``inner``, as redis-py raises a failed connect."""
    outer.__context__ = inner
    return outer


TRANSIENT_ERRORS = {
    "connection": redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Refused."),
    "timeout": redis.TimeoutError("Timeout reading from socket"),
    "loading": reply("LOADING Redis is loading the dataset in memory"),
    "readonly": reply("READONLY You can't write against a read only replica."),
    "masterdown": reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is no"),
    "tryagain": reply("TRYAGAIN Multiple keys request during rehashing of slot"),
    "clusterdown": reply("CLUSTERDOWN The cluster is down"),
    "noreplicas": reply("NOREPLICAS Not enough good replicas to write."),
    "busy": reply("BUSY Redis is busy running a script."),
    "pool-exhausted": MaxConnectionsError("Too many connections"),
    "moved": reply("MOVED 3999 127.0.0.1:6381"),  # the slot's owner changed: not run
    "ask": reply("ASK 3999 127.0.0.1:6381"),  # the slot is being migrated: not run
    "slot-not-covered": SlotNotCoveredError("Slot 12 is not covered by the cluster"),
    "tls-link-dropped": caused_by(redis.ConnectionError("EOF"), ssl.SSLEOFError(8, "EOF")),
}

CONFIGURATION_ERRORS = {
    "wrongpass": reply("WRONGPASS invalid username-password pair or user is disabled."),
    "noauth": reply("NOAUTH Authentication required."),
    "auth-args": AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth'"),
    "external-auth": ExternalAuthProviderError("token provider failed"),
    "noperm": reply("NOPERM this user has no permissions to run the 'evalsha' command"),
    "acl-in-script": reply(
        "ERR The user executing the script can't run this command or subcommand script: x"
    ),
    "authorization": AuthorizationError("not authorized"),
    "certificate": caused_by(
        redis.ConnectionError("Error 1 connecting: certificate verify failed"),
        ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"),
    ),
    "tls-protocol": caused_by(
        redis.ConnectionError("Error 1 connecting: wrong version number"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ),
}

COMMAND_ERRORS = {
    "wrongtype": reply("WRONGTYPE Operation against a key holding the wrong kind of value"),
    "err": reply("ERR Error running script (call to f_x): @user_script:1: bad"),
    "noscript": reply("NOSCRIPT No matching script."),
    "execabort": reply("EXECABORT Transaction discarded because of previous errors."),
    "data": DataError("Invalid input of type: 'dict'."),
    "invalid-response": InvalidResponse("Protocol Error: x"),
}


class TestTranslate:
    """Every redis-py error becomes the QueueError that says what to do about it."""

    @pytest.mark.parametrize("name", list(TRANSIENT_ERRORS))
    def test_not_now_errors_are_transient_connection_errors(self, name: str) -> None:
        error = TRANSIENT_ERRORS[name]
        assert is_transient(error)
        assert not is_configuration_error(error)
        translated = translate(error, "fetch", url="redis://u:secret@h:1/0")
        assert type(translated) is QueueConnectionError
        assert "fetch" in str(translated)
        assert "redis://u:***@h:1/0" in str(translated)
        assert "secret" not in str(translated)

    @pytest.mark.parametrize("name", list(CONFIGURATION_ERRORS))
    def test_refusals_for_good_are_configuration_errors(self, name: str) -> None:
        error = CONFIGURATION_ERRORS[name]
        assert is_configuration_error(error)
        assert not is_transient(error)
        translated = translate(error, "connect", url="redis://u:secret@h:1/0")
        assert type(translated) is QueueConfigurationError
        assert "redis://u:***@h:1/0" in str(translated)
        assert "secret" not in str(translated)

    @pytest.mark.parametrize(
        "error",
        [OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), reply("OOM x")],
        ids=["class", "reply"],
    )
    def test_out_of_memory_says_so(self, error: redis.RedisError) -> None:
        translated = translate(error, "enqueue of task t1")
        assert type(translated) is QueueOutOfMemoryError
        assert "out of memory (maxmemory) and refused enqueue of task t1" in str(translated)
        assert not is_transient(error)

    @pytest.mark.parametrize("name", list(COMMAND_ERRORS))
    def test_other_refusals_are_command_errors_naming_what_failed(self, name: str) -> None:
        error = COMMAND_ERRORS[name]
        assert not is_transient(error)
        translated = translate(error, "dlq retry")
        assert type(translated) is RedisCommandError
        assert "refused dlq retry" in str(translated)
        assert type(error).__name__ in str(translated)

    def test_classes_map_as_their_replies_do(self) -> None:
        for cls in (BusyLoadingError, ReadOnlyError, MasterDownError, ClusterDownError):
            assert is_transient(cls("x")), cls
        assert is_transient(TryAgainError())
        for cls in (AuthenticationError, NoPermissionError, AuthorizationError):
            assert is_configuration_error(cls("x")), cls
        assert type(translate(NoScriptError("x"))) is RedisCommandError

    def test_a_queue_error_is_returned_as_it_is(self) -> None:
        error = QueueError("already translated")
        assert translate(error) is error

    def test_anything_else_becomes_a_plain_queue_error(self) -> None:
        translated = translate(ValueError("bad"), "stats")
        assert type(translated) is QueueError
        assert str(translated) == "stats failed: ValueError: bad"
        assert not is_transient(ValueError("bad"))
        assert not is_configuration_error(ValueError("bad"))

    def test_transient_classes_can_be_caught_and_authentication_is_among_them(self) -> None:
        # `except TRANSIENT` then Reconnector.wait_after: the latter knows the difference
        with pytest.raises(TRANSIENT):
            raise ReadOnlyError("x")
        assert isinstance(AuthenticationError("x"), TRANSIENT)
        assert not is_transient(AuthenticationError("x"))


class RecordingEvent(threading.Event):
    """A stop event that records each wait asked of it and returns at once."""

    def __init__(self, waits: list[float]) -> None:
        super().__init__()
        self.waits = waits

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(0.0 if timeout is None else timeout)
        return self.is_set()


class TestReconnector:
    """Only transient errors are retried; the rest come out translated at once."""

    def reconnector(self, waits: list[float]) -> Reconnector:
        return Reconnector("redis://:s3cr3t@h:1/0", "q", QUICK_RETRY, stop=RecordingEvent(waits))

    @pytest.mark.parametrize(
        ("error", "expected"),
        [
            (CONFIGURATION_ERRORS["wrongpass"], QueueConfigurationError),
            (CONFIGURATION_ERRORS["certificate"], QueueConfigurationError),
            (CONFIGURATION_ERRORS["noperm"], QueueConfigurationError),
            (reply("OOM command not allowed"), QueueOutOfMemoryError),
            (COMMAND_ERRORS["wrongtype"], RedisCommandError),
        ],
        ids=["password", "certificate", "acl", "oom", "wrongtype"],
    )
    def test_call_raises_other_errors_at_once_translated(
        self, error: Exception, expected: type[QueueError]
    ) -> None:
        waits: list[float] = []
        calls: list[int] = []

        def fail() -> None:
            calls.append(1)
            raise error

        with pytest.raises(expected) as caught:
            self.reconnector(waits).call("enqueue", fail, task_id="t1")
        assert (len(calls), waits) == (1, [])
        assert caught.value.__cause__ is error
        assert "enqueue of task t1" in str(caught.value)
        assert "s3cr3t" not in str(caught.value)

    def test_wait_after_raises_what_except_transient_caught_by_mistake(self) -> None:
        waits: list[float] = []
        reconnector = self.reconnector(waits)

        def fetch() -> None:
            try:
                raise CONFIGURATION_ERRORS["wrongpass"]
            except TRANSIENT as exc:  # catches AuthenticationError, a ConnectionError
                reconnector.wait_after(exc, "fetch", 1)

        with pytest.raises(QueueConfigurationError):
            fetch()
        assert waits == []

    def test_wait_after_passes_a_queue_error_through(self) -> None:
        error = QueueOutOfMemoryError("full")
        with pytest.raises(QueueOutOfMemoryError) as caught:
            self.reconnector([]).wait_after(error, "ack", 1)
        assert caught.value is error

    def test_transient_errors_still_end_as_unreachable_after_the_last_attempt(self) -> None:
        waits: list[float] = []

        def fail() -> None:
            raise TRANSIENT_ERRORS["readonly"]

        with pytest.raises(QueueConnectionError, match="unreachable after 3 attempts") as caught:
            self.reconnector(waits).call("enqueue", fail)
        assert type(caught.value) is QueueConnectionError
        assert len(waits) == 2
