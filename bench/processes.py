"""Child processes the harness owns: spawned so they die with it, stopped politely, then killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

#: How long a child gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0

#: The directory that holds the ``bench`` package, so ``python -m bench.worker_x`` imports.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: ``setpriv`` (util-linux) arms the parent-death signal, then execs the real program.
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, output to ``log_path``, dying with the harness.

    Its own session keeps a terminal's Ctrl-C away from it (the harness stops it in order);
    on Linux, ``setpriv --pdeathsig TERM`` makes the kernel SIGTERM it if the harness dies
    without cleaning up (even on SIGKILL). The process id is that of ``argv`` itself.
    """
    command = list(argv)
    if _SETPRIV is not None:
        command = [_SETPRIV, "--pdeathsig", "TERM", *command]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``process``, wait up to ``grace_s``, then SIGKILL it; reap it either way."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def peak_rss_mib(pid: int) -> float | None:
    """Return the peak resident set size (``VmHWM``) of ``pid`` in MiB, or None if unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def log_tail(log_path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a child's log, for error messages."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class WorkerProcess:
    """One benchmark worker, ``python -m <module> --redis-url URL``, as a context manager."""

    def __init__(
        self, module: str, redis_url: str, log_path: Path, concurrency: int, processes: int = 1
    ) -> None:
        """Describe the worker; nothing starts until ``__enter__``."""
        self.module = module
        self.redis_url = redis_url
        self.log_path = log_path
        self.concurrency = concurrency
        self.processes = processes
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        """Start the worker process."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-m", self.module, "--redis-url", self.redis_url]
        argv += ["--concurrency", str(self.concurrency), "--processes", str(self.processes)]
        env["BENCH_REDIS_URL"] = self.redis_url  # for worker processes of a supervisor
        self._process = spawn(argv, self.log_path, env)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the worker, whatever happened inside the block."""
        if self._process is not None:
            stop(self._process)

    @property
    def pid(self) -> int:
        """The worker's process id."""
        if self._process is None:
            raise RuntimeError("worker not started")
        return self._process.pid

    def check_alive(self) -> None:
        """Raise with the worker's log tail if it has exited."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"{self.module} exited with {self._process.returncode}:\n{log_tail(self.log_path)}"
            )

    def peak_rss_mib(self) -> float | None:
        """The worker's peak RSS so far, in MiB."""
        return peak_rss_mib(self.pid)


def wait_until(predicate: Callable[[], object], deadline: float, poll_s: float = 0.02) -> bool:
    """Poll ``predicate()`` until it is true or ``time.monotonic()`` passes ``deadline``."""
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())
