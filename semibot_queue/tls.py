"""TLS connections that tell a refused client certificate from a dropped link.

With TLS 1.3 the client's handshake ends before the server has checked the client's
certificate. A server that refuses it (mutual TLS, no or a wrong certificate) sends an
alert and closes, and the client's first write races that alert: about 2 times in 3 it
fails with ``SSLEOFError`` ("EOF occurred in violation of protocol") or a connection
reset, which looks like a link that dropped and would be retried for minutes. When a new
connection fails that way, one probe connection reads what the server says before
anything is written: the alert, if the server refuses us (re-raised, so the refusal is a
configuration error at once), or nothing within TLS_PROBE_TIMEOUT (the first error
stands: a dropped link).
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.connection import SSLConnection

from semibot_queue.constants import TLS_PROBE_TIMEOUT

#: How a link the server closed shows on the client's first write or read.
_DROPPED = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)


def _dropped(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _DROPPED):
            return True
        current = current.__cause__ or current.__context__
    return False


class ProbingSSLConnection(SSLConnection):
    """redis-py's TLS connection, whose failed connect asks the server why (see above)."""

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        """redis-py's connect; a new link the server closed is probed for its alert."""
        base: Any = super()
        try:
            base.connect_check_health(*args, **kwargs)
        except redis.ConnectionError as exc:
            if _dropped(exc):
                self._probe()
            raise

    def _probe(self) -> None:
        try:
            connect: Any = self._connect  # untyped in redis-py
            sock = connect()  # a new TLS link, its handshake done
        except (OSError, redis.RedisError):
            return  # the server is not there: the first error says so
        try:
            sock.settimeout(TLS_PROBE_TIMEOUT)
            sock.recv(1)
        except ssl.SSLError as exc:
            if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise redis.ConnectionError(f"TLS refused by the server: {exc}") from exc
        except OSError:
            pass  # nothing said in time, or a reset: the first error stands
        finally:
            sock.close()
