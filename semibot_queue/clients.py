"""The clients of every engine: one server, Redis Cluster and Sentinel.

:func:`make_client` builds the client for a URL; :func:`adopt` wraps a given cluster or
Sentinel client.

A queue lives in one hash slot (every key is ``{queue}:...``, and the plain pending key
hashes the same), so on a cluster it lives on one master, and under Sentinel on the
current master. Either way the queue talks to one node at a time: the client here is a
plain ``redis.Redis`` whose pool dials wherever a :class:`Router` says that node is now.
Everything built for one server (scripts on a lent connection, the blocking pop,
pipelines, pub/sub) works unchanged, and one round trip stays one round trip.

The router learns the node from the seeds (``CLUSTER SLOTS``) or the sentinels
(``SENTINEL GET-MASTER-ADDR-BY-NAME``), moves at once on a ``MOVED`` reply, and asks
again after ``READONLY``/``MASTERDOWN`` (a demoted master) or a failed dial. Connections
dialled for an older answer are dropped when next lent, never from another thread.
The replies themselves stay errors for the caller, who repeats what is safe to repeat:
none of them ran the command.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection, SSLConnection
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, ReadOnlyError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool

from semibot_queue.connection import Client, check_client, is_configuration_error
from semibot_queue.constants import DEFAULT_QUEUE_NAME
from semibot_queue.settings import QueueSettings
from semibot_queue.tls import ProbingSSLConnection
from semibot_queue.urls import Address, check_url, is_distributed, parse_distributed_url


class Router:
    """Where the queue's node is now; found on first use, and again when told it moved.

    ``generation`` changes with every move, so a connection knows whether it was dialled
    for the current answer.
    """

    def __init__(self, locate: Callable[[], Address], describe: str) -> None:
        self._locate = locate
        self.describe = describe
        self._lock = threading.Lock()
        self._address: Address | None = None
        self.generation = 0

    def address(self) -> tuple[int, Address]:
        """The generation and the address to dial (asks the seeds when none is known)."""
        with self._lock:
            if self._address is None:
                self._address = self._locate()
            return self.generation, self._address

    def moved(self, generation: int, address: Address) -> None:
        """A node of ``generation`` answered MOVED to ``address``: go there."""
        with self._lock:
            if generation == self.generation and address != self._address:
                self._address = address
                self.generation += 1

    def forget(self, generation: int) -> None:
        """A node of ``generation`` is no master now (or unreachable): ask again."""
        with self._lock:
            if generation == self.generation:
                self._address = None
                self.generation += 1


class Routed:
    """Dials the router's address, and tells the router what the node answered.

    Mixed into redis-py's connection classes; ``connect_check_health`` is what the pool calls on
    every connection it lends, so a connection dialled for an old answer is dropped
    there, by the thread about to use it.
    """

    host: str
    port: int
    _sock: Any
    disconnect: Any  # redis-py's (untyped)

    def __init__(self, *, router: Router, **kwargs: Any) -> None:
        self.router = router
        self.generation = -1  #: the router's generation this connection was dialled for
        super().__init__(**kwargs)

    def stale(self) -> bool:
        """Whether it was dialled for an answer the router has since replaced."""
        return self.generation != self.router.generation

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        """Connect to where the router says the queue's node is now (redis-py's pool and
        its first send both come through here)."""
        base: Any = super()
        if self._sock is not None and self.stale():
            self.disconnect()
        if self._sock is None:
            self.generation, (self.host, self.port) = self.router.address()
        try:
            base.connect_check_health(*args, **kwargs)
        except redis.ConnectionError:
            self.router.forget(self.generation)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """redis-py's, telling the router about MOVED and READONLY/MASTERDOWN replies."""
        base: Any = super()
        try:
            return base.read_response(*args, **kwargs)
        except MovedError as exc:
            self.router.moved(self.generation, (exc.host, int(exc.port)))
            raise
        except (ReadOnlyError, ClusterDownError):  # MASTERDOWN is a ClusterDownError
            self.router.forget(self.generation)
            raise


class RoutedConnection(Routed, Connection):
    """A TCP connection to the router's node."""


class RoutedSSLConnection(Routed, ProbingSSLConnection):
    """A TLS connection to the router's node."""


# --- locating the node ------------------------------------------------------------------


def _ask(address: Address, options: dict[str, Any], *command: Any) -> Any:
    """One command to one seed or sentinel, on a connection of its own."""
    client: Any = redis.Redis(  # its command methods are untyped
        host=address[0], port=address[1], retry=Retry(NoBackoff(), 0), **options
    )
    try:
        return client.execute_command(*command)
    finally:
        client.close()


def _first_answer(
    addresses: list[Address], ask: Callable[[Address], Address | None], what: str
) -> Address:
    errors = []
    for address in addresses:
        try:
            found = ask(address)
        except redis.RedisError as exc:
            if is_configuration_error(exc):
                raise  # wrong credentials or certificate: every node will say the same
            errors.append(f"{address[0]}:{address[1]}: {exc}")
            continue
        if found is not None:
            return found
        errors.append(f"{address[0]}:{address[1]}: does not know {what}")
    raise redis.ConnectionError(f"no node told where {what} is ({'; '.join(errors)})")


def cluster_locator(seeds: list[Address], options: dict[str, Any], slot: int) -> Router:
    """A router to the master owning ``slot``, asked of ``seeds`` in turn."""
    probe = _probe_options(options)

    def owner(seed: Address) -> Address | None:
        for start, end, master, *_ in _ask(seed, probe, "CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                return (host if host not in ("", "?") else seed[0], int(master[1]))
        return None

    names = ",".join(f"{h}:{p}" for h, p in seeds)
    return Router(
        lambda: _first_answer(seeds, owner, f"slot {slot}"), f"cluster {names}, slot {slot}"
    )


def sentinel_locator(sentinels: list[Address], options: dict[str, Any], master: str) -> Router:
    """A router to the master named ``master``, asked of ``sentinels`` in turn."""
    probe = _probe_options(options)

    def current(sentinel: Address) -> Address | None:
        reply = _ask(sentinel, probe, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", master)
        if not reply:
            return None
        host, port = reply
        return (host.decode() if isinstance(host, bytes) else str(host), int(port))

    names = ",".join(f"{h}:{p}" for h, p in sentinels)
    return Router(
        lambda: _first_answer(sentinels, current, f"master {master!r}"),
        f"sentinels {names}, master {master!r}",
    )


def _probe_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a seed or sentinel connection: the node's, minus the database;
    sentinels take ``sentinel_username``/``sentinel_password`` instead of the node's."""
    probe = {k: v for k, v in options.items() if k not in ("db", "connection_class")}
    if options.get("connection_class") is SSLConnection or any(k.startswith("ssl") for k in probe):
        probe["ssl"] = True
    return probe


# --- clients ------------------------------------------------------------------------------


def make_client(
    url: str,
    settings: QueueSettings,
    *,
    queue: str = DEFAULT_QUEUE_NAME,
    socket_timeout: float | None = None,
) -> Client:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://`` (ACL users in it), or
    a cluster or Sentinel URL (see :func:`parse_distributed_url`), there for ``queue``.

    At most ``settings.max_connections`` connections, however many threads use it: a
    caller waits for a free one, it never fails for want of one. The client never
    re-sends a command itself. Its socket timeout, ``settings.socket_timeout`` unless
    ``socket_timeout`` is given (a client for long blocking pops), bounds every call.
    """
    options: dict[str, Any] = {
        "max_connections": settings.max_connections,
        "timeout": None,  # wait for a free connection as long as it takes
        "socket_timeout": settings.socket_timeout if socket_timeout is None else socket_timeout,
        "socket_connect_timeout": settings.socket_timeout,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
    }
    check_url(url)
    if is_distributed(url):
        pool = distributed_pool(url, queue, **options)
    elif url[:9].lower() == "rediss://":
        pool = redis.BlockingConnectionPool.from_url(
            url, connection_class=ProbingSSLConnection, **options
        )
    else:
        pool = redis.BlockingConnectionPool.from_url(url, **options)
    client: Client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # close() closes the pool, as from_url's do
    return client


def given_client(client: Any, settings: QueueSettings, queue: str) -> tuple[Client, bool]:
    """The client to use for a ``client=`` argument, and whether we own it (must close it).

    A ``RedisCluster`` or a Sentinel-managed client is replaced by one of ours on the
    same nodes, with the same options (see :func:`adopt`); any other is used as it is,
    once :func:`~semibot_queue.connection.check_client` accepts it.
    """
    ours = adopt(
        client,
        queue,
        max_connections=settings.max_connections,
        timeout=None,
        health_check_interval=0,
        retry=Retry(NoBackoff(), 0),
    )
    if ours is not None:
        return ours, True
    return check_client(client), False


def distributed_pool(url: str, queue: str, **pool_options: Any) -> redis.BlockingConnectionPool:
    """The pool for a cluster or Sentinel ``url``, for the queue named ``queue``."""
    engine, hosts, master, options = parse_distributed_url(url)
    tls = options.get("connection_class") is SSLConnection
    sentinel_auth = {
        "username": options.pop("sentinel_username", None),
        "password": options.pop("sentinel_password", None),
    }
    # a seed or sentinel that hangs is given up on as a node would be
    limits = {
        "socket_timeout": pool_options.get("socket_connect_timeout"),
        "socket_connect_timeout": pool_options.get("socket_connect_timeout"),
    }
    if engine == "cluster":
        router = cluster_locator(hosts, {**options, **limits}, _slot(queue))
    else:
        router = sentinel_locator(hosts, {**options, **sentinel_auth, **limits}, master)
    return _routed_pool(router, options, tls, **pool_options)


def adopt(client: Any, queue: str, **pool_options: Any) -> Client | None:
    """Our routed client on the nodes of a given ``RedisCluster`` or Sentinel-managed
    client, or None for any other client. Theirs re-send commands and follow redirections
    by themselves, so ours opens connections of its own, with their options."""
    if isinstance(client, redis.RedisCluster):
        manager = client.nodes_manager
        seeds = [(n.host, int(n.port)) for n in manager.startup_nodes.values()]
        options = dict(manager.connection_kwargs)
        tls = bool(options.pop("ssl", False)) or options.get("connection_class") is SSLConnection
        router = cluster_locator(seeds, _own(options), _slot(queue))
    else:
        pool = getattr(client, "connection_pool", None)
        if not isinstance(pool, SentinelConnectionPool):
            return None
        manager = pool.sentinel_manager
        sentinels = [
            (str(kw["host"]), int(kw["port"]))
            for kw in (s.connection_pool.connection_kwargs for s in manager.sentinels)
        ]
        options = dict(pool.connection_kwargs)
        tls = issubclass(pool.connection_class, SSLConnection)
        router = sentinel_locator(sentinels, _own(manager.sentinel_kwargs), pool.service_name)
    ours: Client = redis.Redis(
        connection_pool=_routed_pool(router, _own(options), tls, **pool_options)
    )
    ours.auto_close_connection_pool = True
    return ours


def _own(options: dict[str, Any]) -> dict[str, Any]:
    """A given client's connection options, minus what our pool sets itself."""
    theirs = ("retry", "host", "port", "connection_class", "connection_pool", "ssl")
    return {k: v for k, v in options.items() if k not in theirs}


def _slot(queue: str) -> int:
    # every key of the queue is the queue name itself or carries it as its hash tag
    return int(key_slot(queue.encode()))


def _routed_pool(
    router: Router, options: dict[str, Any], tls: bool, **pool_options: Any
) -> redis.BlockingConnectionPool:
    kwargs = {k: v for k, v in options.items() if k != "connection_class"}
    pool_class: Any = redis.BlockingConnectionPool  # untyped in redis-py
    return pool_class(  # type: ignore[no-any-return]
        connection_class=RoutedSSLConnection if tls else RoutedConnection,
        router=router,
        **{**kwargs, **pool_options},
    )
