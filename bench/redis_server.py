"""A throw-away ``redis-server`` on a free loopback port, with persistence off."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from bench.processes import log_tail, spawn, stop

#: How long the server gets to answer PING after it is started.
START_TIMEOUT_S = 10.0

_HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Start ``redis-server`` in ``workdir`` on entry and stop it on exit (even on Ctrl-C)."""

    def __init__(self, workdir: Path) -> None:
        """Pick the binary; nothing starts until ``__enter__``."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found on PATH")
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://{_HOST}:{self.port}/0"

    def __enter__(self) -> RedisServer:
        """Start the server, retrying once on a lost race for the port."""
        for _attempt in range(3):
            self.port = free_port()
            self._process = spawn(self._argv(), self.workdir / "redis.log")
            if self._wait_ready():
                return self
            stop(self._process)
        raise RuntimeError(f"redis-server did not start:\n{log_tail(self.workdir / 'redis.log')}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        if self._process is not None:
            stop(self._process)

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
        ]  # fmt: skip

    def _wait_ready(self) -> bool:
        if self._process is None:
            return False
        client = redis.Redis(host=_HOST, port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()
