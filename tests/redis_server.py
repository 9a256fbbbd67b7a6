"""A real ``redis-server`` of the tests' own, on a free loopback port, that can be killed.

The integration and fault tests never use a Redis they did not start: :class:`RedisServer`
runs one in a directory it is given, binds it to 127.0.0.1 only, and waits until it answers
PING. A persistent server (append-only file, fsync on every write) keeps its data across
:meth:`RedisServer.kill` and :meth:`RedisServer.restart`, like a production Redis that crashes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
READY_TIMEOUT_S = 10.0  #: how long a start or restart may take before it fails
STOP_TIMEOUT_S = 5.0  #: how long a graceful stop may take before SIGKILL
POLL_INTERVAL_S = 0.02  #: pause between two readiness checks
START_ATTEMPTS = 3  #: fresh ports to try if another process takes ours before redis binds it


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


class RedisServerExitedError(RedisServerError):
    """redis-server exited while starting (a taken port, a bad option: its log says)."""


def find_redis_server() -> str:
    """Path of the redis-server to run: ``$REDIS_SERVER`` if set, else the one on PATH."""
    configured = os.environ.get("REDIS_SERVER")
    if configured:
        if not os.access(configured, os.X_OK):
            raise RedisServerError(f"REDIS_SERVER={configured!r} is not an executable file")
        return configured
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            "redis-server is not on PATH. The integration and fault tests need a real Redis "
            "(6.2 or newer) and are never skipped: install it (apt-get install redis-server) "
            "or set REDIS_SERVER to its path."
        )
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; :meth:`start` runs it, the constructor starts nothing."""

    def __init__(
        self, directory: Path, *, persistent: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self._binary = find_redis_server()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis[Any]:
        """A new client of this server; the caller closes it."""
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> None:
        """Start on :attr:`port`, moving to a fresh port if another process took it first."""
        for attempt in range(START_ATTEMPTS):
            try:
                self._spawn_and_wait()
            except RedisServerExitedError:
                if attempt == START_ATTEMPTS - 1:
                    raise
                self.port = free_port()
            else:
                return

    def restart(self) -> None:
        """Start again on the same port and directory, so a persistent server reloads its AOF."""
        if self.running:
            self.stop()
        self._spawn_and_wait()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and reap it."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """Terminate the server and wait; SIGKILL it if it does not exit in time."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        if self.persistent:
            persistence = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            persistence = ["--save", "", "--appendonly", "no"]
        return [
            self._binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--daemonize", "no",
            *persistence,
            *self.extra_args,
        ]  # fmt: skip

    def _spawn_and_wait(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        # no retries inside redis-py: this loop is the retry, bounded by the deadline
        with self.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 0)) as client:
            while True:
                if not self.running:
                    raise RedisServerExitedError(f"redis-server exited early:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading its AOF
                if time.monotonic() >= deadline:
                    self.kill()
                    raise RedisServerError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{READY_TIMEOUT_S} s:\n{self._log_tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
