"""A TCP proxy in front of Redis that can lose or hold back one reply after Redis acted.

A lost reply is what a network cut, a load balancer's idle timeout or a failover does to a
client: the command ran, the reply never arrived, and the client cannot tell it from a
command that never ran. :meth:`LossyProxy.lose_reply_to` arms the proxy for the next
request that contains a marker (``b"EVALSHA"``, ``b"BLMOVE"``, a script's digest); Redis
gets that request, and when its reply comes the proxy closes both sides of that
connection instead of passing it on. :meth:`LossyProxy.delay_reply_to` holds the reply
back for a while instead (a slow network), so that other threads act in between.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

HOST = "127.0.0.1"
#: Seconds the proxy's loop waits for sockets before it checks whether it must stop.
SELECT_TIMEOUT_S = 0.05
CHUNK = 65536


class _Pair:
    """A client connection and its upstream connection to Redis."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.doomed = False  # the next reply from Redis is to be lost
        self.hold_until = 0.0  # replies from Redis wait until then (monotonic clock)
        self.held = bytearray()


class LossyProxy:
    """Forwards bytes both ways between clients and one Redis; one named thread does it all."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = (HOST, upstream_port)
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._delay = 0.0  # 0: lose the armed reply; else hold it back this many seconds
        self._pairs: list[_Pair] = []
        #: Set when the armed request went to Redis, and when its reply was lost.
        self.request_seen = threading.Event()
        self.reply_lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-lossy-proxy")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start accepting connections."""
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._thread.start()

    def lose_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next request containing ``marker`` (once)."""
        self._arm(marker, 0.0)

    def delay_reply_to(self, marker: bytes, seconds: float) -> None:
        """Hold back the reply to the next request containing ``marker`` (once)."""
        self._arm(marker, seconds)

    def _arm(self, marker: bytes, delay: float) -> None:
        with self._lock:
            self._marker = marker
            self._delay = delay
            self.request_seen.clear()
            self.reply_lost.clear()

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        self._thread.join()
        for pair in list(self._pairs):
            self._drop(pair)
        self._selector.close()
        self._listener.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(SELECT_TIMEOUT_S):
                if key.data is None:
                    self._accept()
                else:
                    pair, from_client = key.data
                    self._forward(pair, from_client=from_client)
            self._release_held()

    def _release_held(self) -> None:
        now = time.monotonic()
        for pair in list(self._pairs):
            if pair.held and pair.hold_until <= now:
                data, pair.held = bytes(pair.held), bytearray()
                try:
                    pair.client.sendall(data)
                except OSError:
                    self._drop(pair)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self._upstream)
        except OSError:
            client.close()  # Redis is away: the client sees a dropped connection
            return
        pair = _Pair(client, upstream)
        self._pairs.append(pair)
        self._selector.register(client, selectors.EVENT_READ, (pair, True))
        self._selector.register(upstream, selectors.EVENT_READ, (pair, False))

    def _forward(self, pair: _Pair, *, from_client: bool) -> None:
        source, target = (
            (pair.client, pair.upstream) if from_client else (pair.upstream, pair.client)
        )
        try:
            data = source.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            self._drop(pair)
            return
        if from_client:
            with self._lock:
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    if self._delay:
                        pair.hold_until = time.monotonic() + self._delay
                    else:
                        pair.doomed = True
                    self.request_seen.set()
        elif pair.doomed:
            self._drop(pair)  # Redis has acted and replied; the client never hears it
            self.reply_lost.set()
            return
        elif pair.held or pair.hold_until > time.monotonic():
            pair.held += data  # passed on by _release_held, in order, once the time is up
            return
        try:
            target.sendall(data)
        except OSError:
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.remove(pair)
        for sock in (pair.client, pair.upstream):
            with contextlib.suppress(KeyError, ValueError):  # already unregistered
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):  # already closed by the other side
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
