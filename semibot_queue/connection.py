"""Redis clients, the one translation of redis-py's errors, and the reconnect loop.

Every redis-py exception becomes a :class:`~semibot_queue.errors.QueueError` through
:func:`translate`::

    redis-py raises                                  callers get                retried?
    ConnectionError, TimeoutError, LOADING,          QueueConnectionError       yes, up to
    READONLY, MASTERDOWN, TRYAGAIN, NOREPLICAS,      (after the last attempt)   MAX_RECONNECT_
    CLUSTERDOWN, BUSY, MOVED, ASK: "not now" or                                 ATTEMPTS
    "not here", nothing ran
    AuthenticationError (WRONGPASS, NOAUTH), NOPERM, QueueConfigurationError    never
    AuthorizationError, a failed TLS handshake
    (an ssl.SSLError inside a ConnectionError)
    OutOfMemoryError (OOM)                           QueueOutOfMemoryError      never
    any other reply error or redis-py error          RedisCommandError          never

Our clients never re-send a command by themselves (``Retry(NoBackoff(), 0)``): only the
callers here repeat a call, and only calls that are safe to repeat.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    ExternalAuthProviderError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from semibot_queue.backoff import Random, exponential_delay
from semibot_queue.errors import (
    QueueConfigurationError,
    QueueConnectionError,
    QueueError,
    QueueOutOfMemoryError,
    RedisCommandError,
)
from semibot_queue.settings import QueueSettings

T = TypeVar("T")

#: The client type; built with ``decode_responses=False``, so replies are bytes.
Client = redis.Redis


def as_bytes(reply: object) -> bytes:
    """A reply of our client, which never decodes, typed as the bytes it is."""
    return cast("bytes", reply)


log = logging.getLogger("semibot_queue.connection")

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")

#: Everything redis-py raises (its cluster client has a second root).
REDIS_ERRORS = (redis.RedisError, RedisClusterException)

#: The classes of the errors after which a call is worth repeating once Redis is back.
#: ``except TRANSIENT`` also catches AuthenticationError (a ConnectionError in redis-py),
#: and misses NOREPLICAS and BUSY (plain ResponseErrors): hand what it catches to
#: :meth:`Reconnector.wait_after`, which decides with :func:`is_transient`.
TRANSIENT = (
    redis.ConnectionError,  # BusyLoadingError (LOADING) is one
    redis.TimeoutError,
    ReadOnlyError,  # READONLY: a replica, or a master demoted by a failover
    ClusterDownError,  # CLUSTERDOWN, and MasterDownError (MASTERDOWN)
    TryAgainError,  # TRYAGAIN: a slot in the middle of a migration
    SlotNotCoveredError,  # the cluster client's map is out of date
    AskError,  # MOVED (a MovedError is one) and ASK: the slot is served elsewhere now
)

#: Error codes of replies saying "not now": Redis did not run the command.
_TRANSIENT_CODES = frozenset(
    {"LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS", "BUSY"}
    | {"MOVED", "ASK"}
)

#: How Redis 7.0 words an ACL refusal of a command called from a script (an ERR reply;
#: later versions answer NOPERM).
_SCRIPT_ACL_REFUSAL = "user executing the script can't run this command"

#: Errors meaning the credentials are wrong, whatever the server's state.
_AUTHENTICATION = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ExternalAuthProviderError,
)

#: SSL errors of a link that dropped, not of a certificate or protocol refused.
_SSL_LINK_ERRORS = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def mask_url(url: str) -> str:
    """``url`` with every password (in the address or ``?password=``) shown as ``***``."""
    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(userinfo + "@", userinfo.partition(":")[0] + ":***@", 1)
    return _QUERY_PASSWORD.sub(r"\1***", url)


# --- errors -------------------------------------------------------------------------------


def _code(exc: BaseException) -> str:
    """The error code of a reply (``READONLY``, ``NOREPLICAS``...), or ``""``."""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    first = str(exc).split(" ", 1)[0]
    return first if first.isupper() else ""


def _ssl_failure(exc: BaseException) -> ssl.SSLError | None:
    """The certificate or TLS protocol error behind ``exc``, if one is (redis-py chains it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError) and not isinstance(current, _SSL_LINK_ERRORS):
            return current
        current = current.__cause__ or current.__context__
    return None


def _refusal(exc: BaseException, where: str, what: str) -> str | None:
    """Why Redis refuses us for good (credentials, ACL, certificate), or None."""
    failure = _ssl_failure(exc)
    if failure is not None:
        return (
            f"TLS with {where} failed during {what} ({failure}): check the certificates"
            " (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs in the URL)"
        )
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, _AUTHENTICATION):
        return (
            f"{where} refused our credentials during {what} ({detail}):"
            " check the user name and password in the URL"
        )
    if _is_acl_refusal(exc):
        return (
            f"{where} refused {what} to our ACL user ({detail}):"
            " grant that user the commands the queue needs (see the README)"
        )
    return None


def _is_acl_refusal(exc: BaseException) -> bool:
    if isinstance(exc, (NoPermissionError, AuthorizationError)) or _code(exc) == "NOPERM":
        return True
    return isinstance(exc, redis.ResponseError) and _SCRIPT_ACL_REFUSAL in str(exc)


def is_configuration_error(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis refuses us for good: credentials, ACL or certificate."""
    return isinstance(exc, REDIS_ERRORS) and _refusal(exc, "Redis", "a command") is not None


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the call that raised ``exc`` may succeed once Redis is back."""
    if not isinstance(exc, REDIS_ERRORS) or is_configuration_error(exc):
        return False
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, redis.ResponseError) and _code(exc) in _TRANSIENT_CODES


def translate(exc: BaseException, what: str = "a command", *, url: str | None = None) -> QueueError:
    """The QueueError to raise for ``exc``, a redis-py error met while doing ``what``.

    A QueueError comes back as it is. Messages name ``url`` with its password masked.
    """
    if isinstance(exc, QueueError):
        return exc
    where = f"Redis at {mask_url(url)}" if url else "Redis"
    detail = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, REDIS_ERRORS):
        return QueueError(f"{what} failed: {detail}")
    refusal = _refusal(exc, where, what)
    if refusal is not None:
        return QueueConfigurationError(refusal)
    if is_transient(exc):
        return QueueConnectionError(f"{where} unavailable during {what}: {detail}")
    if isinstance(exc, OutOfMemoryError) or _code(exc) == "OOM":
        return QueueOutOfMemoryError(
            f"{where} is out of memory (maxmemory) and refused {what}: {exc}"
        )
    return RedisCommandError(f"{where} refused {what}: {detail}")


# --- clients ------------------------------------------------------------------------------


def _retries(client: Any) -> int:
    """How many times ``client`` would re-send a command on a connection error (-1: forever)."""
    pool = getattr(client, "connection_pool", None)
    options: dict[str, Any] = getattr(pool, "connection_kwargs", None) or {}
    retry = options.get("retry") if pool is not None else client.get_retry()
    if retry is not None:
        return int(retry.get_retries())
    # a connection given no Retry builds Retry(NoBackoff(), 1) when told to retry on errors
    return 1 if options.get("retry_on_error") or options.get("retry_on_timeout") else 0


def check_client(client: Client) -> Client:
    """``client`` if it never re-sends a command by itself; else QueueConfigurationError.

    A command re-sent after a lost reply runs twice (a script that took a task takes
    another); the queue repeats only what is safe to repeat, so it does that itself.
    fakeredis clients pass (they have no Retry).
    """
    retries = _retries(client)
    if retries == 0:
        return client
    forever = ", forever" if retries < 0 else ""
    raise QueueConfigurationError(
        f"the client given as client= re-sends a command by itself on a connection error"
        f" (retries={retries}{forever}), so a lost reply could run a command twice. Build it with"
        " retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), as redis.Redis.from_url"
        " does, or pass redis_url= instead (the queue retries what is safe to retry)"
    )


def oom_as_outage(exc: Exception) -> Exception:
    """``exc`` as an error the reconnect loop waits after when it is Redis out of memory:
    for a worker's own writes (register, fetch), out of memory is waited out like an
    outage (a write Redis refuses whole), not a reason to exit."""
    if isinstance(translate(exc), QueueOutOfMemoryError):
        return redis.ConnectionError(f"Redis out of memory: {exc}")
    return exc


# --- the reconnect loop -------------------------------------------------------------------


class Reconnector:
    """Runs Redis calls, retrying transient failures with exponential backoff.

    Every other redis-py error comes out translated (:func:`translate`) at once.
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
        """Wait before try ``failures + 1`` of ``what``, or raise when out of attempts.

        An error that is not transient is raised at once, translated to a QueueError.
        """
        doing = what if task_id is None else f"{what} of task {task_id}"
        if isinstance(exc, QueueError):
            raise exc
        if not is_transient(exc):
            raise translate(exc, doing, url=self.url) from exc
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
            doing,
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

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        task_id: str | None = None,
        *,
        oom_is_outage: bool = False,
    ) -> T:
        """``fn()``, retried on transient errors up to MAX_RECONNECT_ATTEMPTS in a row
        (and on out of memory too with ``oom_is_outage``).

        Any other redis-py error is raised at once as its QueueError (:func:`translate`).
        """
        failures = 0
        while True:
            try:
                return fn()
            except REDIS_ERRORS as exc:
                failures += 1
                self.wait_after(
                    oom_as_outage(exc) if oom_is_outage else exc, what, failures, task_id
                )
