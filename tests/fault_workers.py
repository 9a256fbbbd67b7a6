"""Worker subprocesses for the fault tests: ``python -m semibot_queue worker``, as deployed.

:class:`Workers` starts each one with short timings (heartbeat 0.2 s, dead after 1 s, fast
reconnects) read from ``SEMIBOT_QUEUE_*`` variables, sends their output to a log file of
the test, and at :meth:`Workers.close` SIGKILLs whatever still runs and prints every log
(pytest shows it only when the test failed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

import semibot_queue
from fault_handlers import RUNS_FILE_ENV
from fault_ledger import wait_until
from semibot_queue.constants import ENV_PREFIX
from semibot_queue.keys import KeySpace

#: The handler every worker runs (tests/fault_handlers.py).
HANDLER = "fault_handlers:handle"

#: Settings of every worker unless a test overrides them (names as in QueueSettings).
FAST_SETTINGS: dict[str, str] = {
    "heartbeat_interval": "0.2",
    "worker_dead_after": "1.0",
    "stop_poll_slice": "0.5",
    "error_retry_delay": "0.05",
    "max_reconnect_delay": "0.5",
    "max_reconnect_attempts": "100",
    "retry_base_delay": "0.05",
    "shutdown_timeout": "0.5",
}

#: Seconds a worker may take to import, connect and register.
START_TIMEOUT_S = 15.0

#: Lines of each worker log printed at teardown.
LOG_TAIL_LINES = 150

_TESTS_DIR = Path(__file__).resolve().parent
#: Where the package the tests import lives (the source tree, or site-packages under tox).
_PACKAGE_ROOT = Path(semibot_queue.__file__).resolve().parent.parent


class WorkerProcess:
    """One worker subprocess and its log file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, number: int) -> None:
        self.process = process
        self.log_path = log_path
        self.number = number

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.process.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` (SIGTERM, SIGINT, SIGKILL) if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL it, as the OOM killer would, and reap it; its exit status."""
        self.signal(signal.SIGKILL)
        return self.process.wait()

    def wait(self, timeout: float, why: str = "") -> int:
        """Its exit status; AssertionError (saying ``why`` it should have exited) if it
        still runs after ``timeout`` seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            because = f": {why}" if why else ""
            raise AssertionError(
                f"worker {self.number} still runs after {timeout} s{because}"
            ) from None

    def log(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_id(self, client: redis.Redis[bytes], keys: KeySpace) -> str | None:
        """Its worker id, once it has registered (ids are ``host-pid-random``)."""
        for member in client.zrange(keys.workers, 0, -1):
            worker_id = member.decode()
            if worker_id.rsplit("-", 2)[-2] == str(self.pid):
                return worker_id
        return None


class Workers:
    """Starts worker subprocesses for one test and kills them all at :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.runs_path = directory / "runs.jsonl"
        self.started: list[WorkerProcess] = []

    def start(
        self,
        redis_url: str,
        queue: str,
        *,
        concurrency: int = 4,
        handler: str = HANDLER,
        **settings: str | float,
    ) -> WorkerProcess:
        """Start one worker running ``handler`` (``module:function``); ``settings``
        override FAST_SETTINGS (lower-case field names)."""
        number = len(self.started) + 1
        log_path = self.directory / f"worker-{number}.log"
        command = [
            sys.executable, "-m", "semibot_queue",
            "--redis-url", redis_url,
            "--queue", queue,
            "worker", handler,
            "--concurrency", str(concurrency),
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self._environment(settings),
            )
        worker = WorkerProcess(process, log_path, number)
        self.started.append(worker)
        return worker

    def start_registered(
        self,
        client: redis.Redis[bytes],
        keys: KeySpace,
        redis_url: str,
        *,
        concurrency: int = 4,
        handler: str = HANDLER,
        **settings: str | float,
    ) -> tuple[WorkerProcess, str]:
        """Start one worker and wait until it has registered; it and its worker id."""
        worker = self.start(
            redis_url, keys.queue, concurrency=concurrency, handler=handler, **settings
        )
        worker_id = wait_until(
            lambda: worker.returncode is None and worker.worker_id(client, keys),
            START_TIMEOUT_S,
            f"worker {worker.number} to register",
            lambda: f"exit status {worker.returncode}, log:\n{worker.log()[-2000:]}",
        )
        return worker, worker_id

    def alive(self) -> list[WorkerProcess]:
        """The workers still running."""
        return [worker for worker in self.started if worker.returncode is None]

    def close(self) -> None:
        """SIGKILL every worker still running, reap them all, print their logs."""
        for worker in self.started:
            worker.kill()
        for worker in self.started:
            lines = worker.log().splitlines()[-LOG_TAIL_LINES:]
            print(f"----- worker {worker.number} (pid {worker.pid}, exit {worker.returncode})")
            print("\n".join(lines))

    def _environment(self, settings: dict[str, str | float]) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(ENV_PREFIX) and name != "REDIS_URL"
        }
        for name, value in {**FAST_SETTINGS, **settings}.items():
            env[ENV_PREFIX + name.upper()] = str(value)
        paths = [str(_TESTS_DIR), str(_PACKAGE_ROOT)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env[RUNS_FILE_ENV] = str(self.runs_path)
        return env
