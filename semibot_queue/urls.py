"""Redis URLs: the plain ones redis-py reads, and those of the distributed engines.

``redis+cluster://[user:pw@]h:p[,h:p...][/0][?options]`` and
``redis+sentinel://[user:pw@]h:p[,h:p...]/MASTER_NAME[/db][?options]`` (``rediss+`` for
TLS). Every check here raises QueueConfigurationError naming what is wrong, with the
password masked; nothing is connected.
"""

from __future__ import annotations

import inspect
import math
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection, parse_url

from semibot_queue.connection import mask_url
from semibot_queue.errors import QueueConfigurationError

Address = tuple[str, int]

#: URL schemes of the distributed engines, and whether each uses TLS.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}

#: redis-py's URL parser (untyped), for the options of a cluster or Sentinel URL.
_PARSE_URL: Any = parse_url

#: URL options that configure redis-py's connection pool, not its connections.
_POOL_OPTIONS = frozenset({"max_connections", "timeout", "connection_class"})

#: URL options that are numbers of seconds, each with the least value that makes sense:
#: a timeout of 0 would make every socket non-blocking.
_SECONDS = {"socket_timeout": 0.0, "socket_connect_timeout": 0.0, "health_check_interval": -1.0}


def is_distributed(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster or a Sentinel-managed master."""
    scheme = url.partition("://")[0].lower()
    return scheme in CLUSTER_SCHEMES or scheme in SENTINEL_SCHEMES


def _hosts(netloc: str, url: str) -> list[Address]:
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise QueueConfigurationError(
                f"{mask_url(url)}: {part.strip()!r} is not host:port (list every node as"
                " host:port, separated by commas)"
            )
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def check_url(url: str) -> None:
    """Raise QueueConfigurationError, naming what is wrong (password masked), unless the
    clients can use ``url``; nothing is connected."""
    if is_distributed(url):
        parse_distributed_url(url)
        return
    if url.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
        raise QueueConfigurationError(
            f"{mask_url(url)}: not a Redis URL (redis://, rediss://, unix://,"
            " redis+cluster://, redis+sentinel://, or their rediss+ forms)"
        )
    try:
        options = _PARSE_URL(url)
    except ValueError as exc:
        raise QueueConfigurationError(f"{mask_url(url)}: {exc}") from None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    kind = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(scheme, Connection)
    _check_options(url, options, kind)
    database = parts.path.strip("/")
    if scheme in ("redis", "rediss") and database and not database.isdigit():
        raise QueueConfigurationError(
            f"{mask_url(url)}: {parts.path!r} is not a database number (redis://host:port/0)"
        )


def parse_distributed_url(url: str) -> tuple[str, list[Address], str, dict[str, Any]]:
    """``(engine, hosts, master_name, connection options)`` of a cluster or Sentinel URL.

    ``redis+cluster://[user:pw@]h:p[,h:p...][/0][?options]`` and
    ``redis+sentinel://[user:pw@]h:p[,h:p...]/MASTER_NAME[/db][?options]`` (``rediss+``
    for TLS); the options are redis-py's URL options. Raises QueueConfigurationError.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    tls = CLUSTER_SCHEMES.get(scheme, SENTINEL_SCHEMES.get(scheme))
    if tls is None:
        raise QueueConfigurationError(f"{mask_url(url)}: not a cluster or Sentinel URL")
    engine = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    hosts = _hosts(parts.netloc, url)
    path = [unquote(p) for p in parts.path.split("/") if p]
    master = ""
    if engine == "sentinel":
        if not path:
            raise QueueConfigurationError(
                f"{mask_url(url)}: name the master after the sentinels"
                " (redis+sentinel://host:port,host:port/MASTER_NAME[/db])"
            )
        master, path = path[0], path[1:]
    if len(path) > 1 or (path and not path[0].isdigit()):
        raise QueueConfigurationError(f"{mask_url(url)}: {parts.path!r} is not a database number")
    if engine == "cluster" and path and path[0] != "0":
        raise QueueConfigurationError(f"{mask_url(url)}: a cluster has database 0 only")
    userinfo = parts.netloc.rpartition("@")[0]
    host, port = hosts[0]
    plain = f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}{host}:{port}"
    try:
        options: dict[str, Any] = _PARSE_URL(f"{plain}/{path[0] if path else 0}?{parts.query}")
    except ValueError as exc:
        raise QueueConfigurationError(f"{mask_url(url)}: {exc}") from None
    for name in ("host", "port"):
        options.pop(name, None)
    sentinels = {"sentinel_username", "sentinel_password"} if engine == "sentinel" else set()
    _check_options(url, options, SSLConnection if tls else Connection, sentinels)
    return engine, hosts, master, options


def _accepted(kind: type[Any]) -> set[str]:
    """The keyword arguments a redis-py connection class (and its bases) accepts."""
    names: set[str] = set()
    for klass in kind.__mro__:
        init = vars(klass).get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def _check_options(
    url: str, options: dict[str, Any], kind: type[Any], extra: set[str] | None = None
) -> None:
    """Refuse a query option that neither redis-py's ``kind`` of connection nor ``extra``
    takes, or a number of seconds out of range; redis-py would fail only when it connects."""
    unknown = sorted(set(options) - _accepted(kind) - _POOL_OPTIONS - (extra or set()))
    if unknown:
        raise QueueConfigurationError(
            f"{mask_url(url)}: unknown option {unknown[0]!r} (see redis-py's URL options)"
        )
    for name, least in _SECONDS.items():
        value = options.get(name)
        if value is not None and not (math.isfinite(value) and value > least):
            bound = "> 0" if least == 0 else ">= 0"
            raise QueueConfigurationError(
                f"{mask_url(url)}: option {name}={value} must be a number of seconds {bound}"
            )
    connections = options.get("max_connections")
    if connections is not None and connections < 1:
        raise QueueConfigurationError(
            f"{mask_url(url)}: option max_connections={connections} must be >= 1"
        )
