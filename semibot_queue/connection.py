"""Redis clients and the reconnect loop shared by producer, consumer and dead-letter queue.

Redis errors are translated here: after MAX_RECONNECT_ATTEMPTS consecutive failures
a caller gets QueueConnectionError naming the (password-masked) URL.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
from typing import TypeVar, cast
from urllib.parse import urlsplit

import redis

from semibot_queue.backoff import Random, exponential_delay
from semibot_queue.errors import QueueConnectionError
from semibot_queue.settings import QueueSettings

T = TypeVar("T")

#: The client type; built with ``decode_responses=False``, so replies are bytes.
Client = redis.Redis


def as_bytes(reply: object) -> bytes:
    """A reply of our client, which never decodes, typed as the bytes it is."""
    return cast("bytes", reply)


log = logging.getLogger("semibot_queue.connection")

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")

#: The errors after which a call is worth repeating once Redis is back.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def mask_url(url: str) -> str:
    """``url`` with every password (in the address or ``?password=``) shown as ``***``."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(userinfo + "@", userinfo.partition(":")[0] + ":***@", 1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def make_client(url: str, settings: QueueSettings) -> Client:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``; ACL users in it).

    Its socket timeout stays above every blocking call the queue makes.
    """
    client: Client = redis.Redis.from_url(
        url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_timeout,
        health_check_interval=0,
    )
    return client


class Reconnector:
    """Runs Redis calls, retrying transient failures with exponential backoff.

    Holds no per-call state, so one instance serves every thread of its owner.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        settings: QueueSettings,
        stop: threading.Event | None = None,
        rand: Random = random.random,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.url = mask_url(url)
        self._queue = queue
        self._settings = settings
        self._stop = stop or threading.Event()
        self._rand = rand
        self._on_retry = on_retry

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures."""
        s = self._settings
        return exponential_delay(
            failures, s.error_retry_delay, s.max_reconnect_delay, s.retry_jitter, self._rand
        )

    def wait_after(
        self, exc: Exception, what: str, failures: int, task_id: str | None = None
    ) -> None:
        """Wait before try ``failures + 1`` of ``what``, or raise when out of attempts."""
        limit = self._settings.max_reconnect_attempts
        if failures >= limit:
            raise QueueConnectionError(
                f"Redis at {self.url} unreachable after {failures} attempts ({what}): {exc}"
            ) from exc
        wait = self.delay(failures)
        log.warning(
            "queue %s: redis at %s failed during %s (%s); reconnect attempt %d/%d in %.2fs",
            self._queue,
            self.url,
            what if task_id is None else f"{what} of task {task_id}",
            exc,
            failures,
            limit,
            wait,
            extra={
                "queue": self._queue,
                "task_id": task_id,
                "redis_url": self.url,
                "attempt": failures,
            },
        )
        if self._on_retry is not None:
            self._on_retry()
        self._stop.wait(wait)

    def call(self, what: str, fn: Callable[[], T], task_id: str | None = None) -> T:
        """``fn()``, retried on transient errors up to MAX_RECONNECT_ATTEMPTS in a row."""
        failures = 0
        while True:
            try:
                return fn()
            except TRANSIENT as exc:
                failures += 1
                self.wait_after(exc, what, failures, task_id)
