"""Redis URLs: the plain ones redis-py reads, and those of the distributed engines.

``redis+cluster://[user:pw@]h:p[,h:p...][/0][?options]`` and
``redis+sentinel://[user:pw@]h:p[,h:p...]/MASTER_NAME[/db][?options]`` (``rediss+`` for
TLS). Every check here raises QueueConfigurationError naming what is wrong, with the
password masked; nothing is connected.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.connection import parse_url

from semibot_queue.connection import mask_url
from semibot_queue.errors import QueueConfigurationError

Address = tuple[str, int]

#: URL schemes of the distributed engines, and whether each uses TLS.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}

#: redis-py's URL parser (untyped), for the options of a cluster or Sentinel URL.
_PARSE_URL: Any = parse_url


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
        _PARSE_URL(url)
    except ValueError as exc:
        raise QueueConfigurationError(f"{mask_url(url)}: {exc}") from None
    parts = urlsplit(url)
    database = parts.path.strip("/")
    if parts.scheme.lower() in ("redis", "rediss") and database and not database.isdigit():
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
    return engine, hosts, master, options
