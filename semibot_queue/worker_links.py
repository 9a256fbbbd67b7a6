"""A worker's links to Redis: its client, its blocking pop's own connection, its scripts.

Opened by ``TaskConsumer.connect()`` and closed by ``disconnect()``; a client given to the
consumer is used for everything and left to its owner, unless the library built it
(on a given cluster or Sentinel client's nodes), in which case it is closed here too.
"""

from __future__ import annotations

import logging
import threading

import attrs
import redis

from semibot_queue.clients import make_client
from semibot_queue.connection import Client, Reconnector
from semibot_queue.constants import BLOCKING_MARGIN
from semibot_queue.fetcher import BlockingPop, pop_timeout
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.consumer")


@attrs.define
class Links:
    """The open connections of one worker."""

    client: Client
    pop: BlockingPop
    scripts: Scripts
    #: The blocking pop's own client, or the given client when there is one.
    pop_client: Client


def open_links(
    redis_url: str,
    keys: KeySpace,
    inflight: str,
    settings: QueueSettings,
    *,
    given: Client | None,
    reconnect: Reconnector,
    stopping: threading.Event,
    extra: dict[str, str | None],
) -> Links:
    """Connect (waiting out an outage as ``reconnect`` allows) and build the links."""
    client = given or make_client(redis_url, settings, queue=keys.queue)
    reconnect.call("connect", client.ping)
    if given is None:
        # The blocking pop has a connection of its own whose socket timeout leaves a
        # margin above QUEUE_POLL_TIMEOUT: a full wait is never taken for a dead link.
        pop_client = make_client(
            redis_url,
            attrs.evolve(settings, max_connections=1),  # one pop at a time
            queue=keys.queue,
            socket_timeout=settings.queue_poll_timeout + BLOCKING_MARGIN,
        )
        wait = settings.queue_poll_timeout
    else:
        pop_client = client
        wait = pop_timeout(client, settings.queue_poll_timeout)
    pop = BlockingPop(pop_client, keys.pending, inflight, wait, stopping)
    scripts = Scripts(client, keys, settings)
    _warn_if_evicting(client, keys.queue, extra)
    return Links(client=client, pop=pop, scripts=scripts, pop_client=pop_client)


def close_links(links: Links, close_clients: bool) -> None:
    """Give the scripts' connections back; close the clients when they are ours."""
    links.scripts.close()
    if close_clients:
        for client in {links.client, links.pop_client}:
            client.close()


def _warn_if_evicting(client: Client, queue: str, extra: dict[str, str | None]) -> None:
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return  # CONFIG is often disabled on managed Redis; a lost link shows elsewhere
    if policy not in (None, "noeviction", b"noeviction"):
        log.warning(
            "queue %s: Redis maxmemory-policy is %r, not noeviction: Redis may drop tasks",
            queue,
            policy,
            extra=extra,
        )
