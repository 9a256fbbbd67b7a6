"""N worker processes of one handler under one supervisor (``worker --processes N``).

Each worker process is ``python -m semibot_queue worker MODULE:FUNCTION`` started with
:mod:`subprocess`: the process a user runs by hand, with its own worker id, ``--concurrency``
slots, signal handling and exit statuses, and nothing taken from the supervisor's memory (no
fork of a process running threads, nothing pickled; multiprocessing's spawn would start the
same fresh interpreter with more machinery, and coverage's subprocess patch measures this
one). So the handler must be importable as ``MODULE:FUNCTION`` by a fresh interpreter. The
Redis URL and the settings go through the environment, never argv (no password in ``ps``).

The supervisor restarts a child that exits unexpectedly after a backoff (RestartPolicy) and
gives up (exit 1) when one keeps dying; a child exiting with one of FINAL_STATUSES is not
restarted: the supervisor stops the others and exits with that status. SIGTERM and SIGINT
are forwarded to every child (they run in their own session, so a Ctrl-C reaches them once,
through the supervisor; a second signal makes them skip their drain wait), and it exits 0
when all have exited. With a metrics port it serves every child's metrics on one endpoint
(prometheus-client's multiprocess mode, in a temporary directory removed at exit). However
it ends, no child is left running: SIGTERM, then SIGKILL after ``stop_timeout``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from semibot_queue import constants as c
from semibot_queue.backoff import exponential_delay
from semibot_queue.errors import SettingsError
from semibot_queue.producer import default_redis_url
from semibot_queue.settings import QueueSettings
from semibot_queue.signals import install_handlers, restore_handlers, signals_to_main_thread
from semibot_queue.worker_process import (
    EXIT_CONFIGURATION,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

log = logging.getLogger("semibot_queue.supervisor")

#: Exit statuses of a worker process that a restart cannot help (usage, Redis gone for
#: good, handler not importable, refused by Redis): the supervisor ends with the same one.
FINAL_STATUSES = frozenset({EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INVALID, EXIT_CONFIGURATION})

#: The variable that puts prometheus-client in multiprocess mode, naming its directory.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _check(kind: type, low: float) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if type(value) not in (kind, int) or not value >= low:  # type: ignore[operator]
            raise SettingsError(f"restart policy {attribute.name} must be >= {low}: {value!r}")

    return check


@attrs.frozen(kw_only=True)
class RestartPolicy:
    """When the supervisor starts a dead worker process again, and when it gives up.

    After the n-th death of one process within ``window`` seconds it waits
    ``backoff_base * 2**(n-1)`` seconds (at most ``backoff_cap``) and starts it again;
    death number ``max_restarts + 1`` within the window ends the supervisor (exit 1).
    """

    backoff_base: float = attrs.field(default=c.RESTART_BACKOFF_BASE, validator=_check(float, 0))
    backoff_cap: float = attrs.field(default=c.RESTART_BACKOFF_CAP, validator=_check(float, 0))
    window: float = attrs.field(default=c.RESTART_WINDOW, validator=_check(float, 0.001))
    max_restarts: int = attrs.field(default=c.MAX_RESTARTS_IN_WINDOW, validator=_check(int, 0))

    def delay(self, deaths: int) -> float:
        """Seconds before the restart that follows the ``deaths``-th death in the window."""
        return exponential_delay(deaths, self.backoff_base, self.backoff_cap, 0.0)


@attrs.define
class _Child:
    """One of the N places of worker processes: who runs in it now, when it died lately."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    deaths: list[float] = attrs.Factory(list)
    restart_at: float = 0.0

    @property
    def label(self) -> str:
        """``worker process 2 (pid 1234)``, for the logs."""
        pid = "-" if self.process is None else self.process.pid
        return f"worker process {self.number} (pid {pid})"


def describe(status: int) -> str:
    """``exited with status 1``, or ``was killed by SIGKILL`` for a negative status."""
    if status >= 0:
        return f"exited with status {status}"
    names = {member.value: member.name for member in signal.Signals}
    return f"was killed by {names.get(-status, f'signal {-status}')}"


class Supervisor:
    """Runs ``processes`` copies of ``command`` and keeps them running; :meth:`run` blocks.

    ``env`` is the children's environment (default: this one's), ``stop_timeout`` the
    seconds a stopping child gets before SIGKILL, ``metrics`` the ``(host, port)`` of one
    endpoint for all of them. The constructor starts nothing.
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        stop_timeout: float,
        env: Mapping[str, str] | None = None,
        metrics: tuple[str, int] | None = None,
        policy: RestartPolicy | None = None,
        queue: str = c.DEFAULT_QUEUE_NAME,
    ) -> None:
        self.command = list(command)
        self.env = dict(os.environ if env is None else env)
        self.stop_timeout = stop_timeout
        self.metrics = metrics
        self.policy = policy or RestartPolicy()
        self.restarts = 0  #: restarts so far; also semibot_queue_worker_restarts_total
        self.log = logging.LoggerAdapter(log, {"queue": queue})
        self.registry = CollectorRegistry()  #: what the metrics endpoint serves
        restarts = Counter(
            "semibot_queue_worker_restarts",
            "Worker processes restarted.",
            ["queue"],
            registry=self.registry,
        )
        self._restarts_metric = restarts.labels(queue=queue)
        self._children = [_Child(number) for number in range(1, processes + 1)]
        self._signals: list[int] = []  # appended by the signal handlers and stop(), only
        self._metrics_dir: str | None = None
        self._server: Any = None

    @property
    def pids(self) -> list[int]:
        """The pids of the worker processes started and not yet seen to exit."""
        return [child.process.pid for child in self._children if child.process is not None]

    def stop(self) -> None:
        """Stop as a SIGTERM to the supervisor does; a second call makes the children hurry.
        Never blocks; safe from any thread."""
        self._signals.append(signal.SIGTERM)

    def run(self) -> int:
        """Start the worker processes and watch them until stopped; the exit status."""
        previous = install_handlers(self._on_signal)  # off the main thread: stop() only
        try:
            status = self._open_metrics()
            return self._watch() if status is None else status
        except OSError as exc:  # fork or exec refused (memory, process limit), disk full, ...
            self.log.error("supervisor cannot go on: %s", exc)
            return EXIT_FAILED
        finally:
            try:
                self._stop_children()
            finally:
                self._close_metrics()
                restore_handlers(previous)

    def _watch(self) -> int:
        for child in self._children:
            self._spawn(child)
        while not self._signals:
            now = time.monotonic()
            for child in self._children:
                status = self._look_after(child, now)
                if status is not None:
                    return status
            time.sleep(c.SUPERVISOR_POLL_INTERVAL)
        self.log.info(
            "%s received: stopping every worker process", signal.Signals(self._signals[0]).name
        )
        return 0

    def _spawn(self, child: _Child) -> None:
        child.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            self.command, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.log.info("%s started", child.label)

    def _look_after(self, child: _Child, now: float) -> int | None:
        """Start ``child`` again when due; when it died, None to go on or the status to end."""
        if child.process is None:
            if now >= child.restart_at:
                self._spawn(child)
            return None
        status = child.process.poll()
        if status is None:
            return None
        what = f"{child.label} {describe(status)}"
        self._forget(child)
        if status in FINAL_STATUSES:
            self.log.error("%s: not restarted; stopping the others", what)
            return status
        window = self.policy.window
        child.deaths = [t for t in child.deaths if now - t < window] + [now]
        deaths = len(child.deaths)
        if deaths > self.policy.max_restarts:
            self.log.error("%s, %d times in %g s: supervisor giving up", what, deaths, window)
            return EXIT_FAILED
        delay = self.policy.delay(deaths)
        self.restarts += 1
        self._restarts_metric.inc()
        self.log.warning("%s; restart %d in %.2f s", what, self.restarts, delay)
        child.restart_at = now + delay
        return None

    def _stop_children(self) -> None:
        """Forward each signal received (a SIGTERM if none) to every child still running,
        wait for them all, SIGKILL those still running after ``stop_timeout``."""
        if not self._signals:
            self._signals.append(signal.SIGTERM)
        forwarded = 0
        deadline = time.monotonic() + self.stop_timeout
        try:
            while True:
                if forwarded < len(self._signals):  # one per look, so no child merges two
                    self._send(self._signals[forwarded])
                    forwarded += 1
                for child in self._children:
                    status = None if child.process is None else child.process.poll()
                    if status is not None:
                        self.log.info("%s %s", child.label, describe(status))
                        self._forget(child)
                if not self.pids or time.monotonic() >= deadline:
                    break
                time.sleep(c.SUPERVISOR_POLL_INTERVAL)
        finally:
            for child in self._children:  # the last resort
                if child.process is not None:
                    self.log.warning("%s still runs: killing it", child.label)
                    child.process.kill()
                    child.process.wait()
                    self._forget(child)

    def _send(self, signum: int) -> None:
        sent = 0
        for child in self._children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)
                sent += 1
        name = signal.Signals(signum).name
        self.log.info("%s sent to %d worker process(es)", name, sent)

    def _forget(self, child: _Child) -> None:
        """Forget the child's process (exited); drop its live gauges (its counters stay)."""
        if child.process is not None and self._metrics_dir is not None:
            mark_process_dead(child.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        child.process = None

    def _open_metrics(self) -> int | None:
        """Serve the children's metrics directory; EXIT_USAGE if the port cannot be opened."""
        if self.metrics is None:
            return None
        self._metrics_dir = tempfile.mkdtemp(prefix=c.METRICS_DIR_PREFIX)
        self.env[MULTIPROC_DIR_ENV] = self._metrics_dir
        MultiProcessCollector(self.registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        host, port = self.metrics
        try:
            with signals_to_main_thread():  # its thread must leave them to the supervisor
                self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # taken since the command line checked it
            self.log.error("metrics endpoint %s:%d cannot be opened: %s", host, port, exc)
            return EXIT_USAGE
        self.log.info("metrics of every worker process on http://%s:%d/metrics", host, port)
        return None

    def _close_metrics(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)  # only recorded: the main loop forwards it


def run_workers(
    handler: str,
    *,
    processes: int,
    redis_url: str | None = None,
    queue_name: str | None = None,
    concurrency: int | None = None,
    settings: QueueSettings | None = None,
    metrics_port: int | None = None,
    metrics_host: str = c.METRICS_HOST,
    restart_policy: RestartPolicy | None = None,
    worker_args: Sequence[str] = (),
) -> int:
    """Run ``processes`` worker processes of ``handler`` until SIGTERM/SIGINT; the exit status.

    ``handler`` is ``"module:function"``: each worker process is a fresh interpreter
    (``python -m semibot_queue worker``) that imports it, so the module must be importable
    there (on PYTHONPATH or in the current directory); a callable cannot be passed. Each
    process runs ``concurrency`` handlers at once (default: MAX_CONCURRENT_TASKS) with
    ``settings`` (default: ``QueueSettings.from_env()``) on ``redis_url`` (default:
    ``$REDIS_URL``); ``worker_args`` are more options of each ``worker`` command line
    (``["--log-format", "json"]``). With ``metrics_port``, one endpoint serves all of them.

    Blocks. From the main thread it handles SIGTERM and SIGINT: the first drains every
    process, a second makes them hurry; then it returns 0. A process that dies is restarted
    as ``restart_policy`` says, else it returns 1; one that exits 2, 3, 5 or 9 (the command
    line's statuses) ends it with that status. Every worker process has exited when it
    returns. A bad argument raises SettingsError.
    """
    module, _, function = handler.partition(":")
    if not module or not function:
        raise SettingsError(f"handler {handler!r} is not of the form MODULE:FUNCTION")
    for name, value in (("processes", processes), ("concurrency", concurrency)):
        if value is not None and (type(value) is not int or value < 1):
            raise SettingsError(f"{name} must be a whole number >= 1, got {value!r}")
    if processes > c.MAX_WORKER_PROCESSES:
        raise SettingsError(
            f"processes must be at most MAX_WORKER_PROCESSES ({c.MAX_WORKER_PROCESSES}),"
            f" got {processes}"
        )
    settings = settings if settings is not None else QueueSettings.from_env()
    command = [sys.executable, "-m", "semibot_queue", "worker", handler, *worker_args]
    if queue_name is not None:
        command += ["--queue", queue_name]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    env = {name: value for name, value in os.environ.items() if not name.startswith(c.ENV_PREFIX)}
    for field in attrs.fields(QueueSettings):
        env[c.ENV_PREFIX + field.name.upper()] = str(getattr(settings, field.name))
    env["REDIS_URL"] = redis_url if redis_url is not None else default_redis_url()
    env[c.SUPERVISOR_PID_ENV] = str(os.getpid())
    return Supervisor(
        command,
        processes,
        stop_timeout=settings.shutdown_timeout + c.SUPERVISOR_KILL_MARGIN,
        env=env,
        metrics=None if metrics_port is None else (metrics_host, metrics_port),
        policy=restart_policy,
        queue=queue_name or settings.default_queue_name,
    ).run()
