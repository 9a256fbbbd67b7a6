"""``worker --processes N``: one supervisor keeps N real worker processes serving a queue.

The supervisor runs as a subprocess where a test signals it (``python -m semibot_queue worker
... --processes N``) and in this process where it ends by itself (``run_workers``); its
worker processes are always real, on the tests' own redis-server. Every wait has a deadline.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import semibot_queue
from fault_handlers import RUNS_FILE_ENV
from fault_ledger import SUCCEEDED, Ledger, ResultListener, wait_until
from fault_workers import FAST_SETTINGS
from redis_server import free_port
from semibot_queue import QueueSettings, RestartPolicy, SettingsError, TaskProducer, run_workers
from semibot_queue.cli import Exit, main
from semibot_queue.constants import ENV_PREFIX, METRICS_DIR_PREFIX
from semibot_queue.keys import KeySpace
from semibot_queue.supervisor import Supervisor, describe
from support import FAST, payload

QUEUE = "supervised:q"
KEYS = KeySpace(QUEUE)
HANDLER = "fault_handlers:handle"
TESTS_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(semibot_queue.__file__).resolve().parent.parent
#: Seconds N worker processes may take to import, connect and register.
START_TIMEOUT_S = 30.0
#: Seconds a drained supervisor may take to exit.
EXIT_TIMEOUT_S = 30.0

#: A handler module whose first $FAIL_STARTS imports (counted in $STARTS_FILE, one pid a
#: line) end the process with $START_STATUS, as a crash at start would; later ones serve.
STARTS_MODULE = """
    import os
    from pathlib import Path

    from cli_handlers import echo as run

    starts = Path(os.environ["STARTS_FILE"])
    fd = os.open(starts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()}\\n".encode())
    os.close(fd)
    if starts.read_text().split().index(str(os.getpid())) < int(os.environ["FAIL_STARTS"]):
        os._exit(int(os.environ["START_STATUS"]))
"""


# --- helpers --------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: trust kill
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def environment(tmp_path: Path, **settings: str | float) -> dict[str, str]:
    """A supervisor's environment: quick settings, the tests and ``tmp_path`` importable,
    temporary files (the metrics directory) under ``tmp_path/tmp``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX) and name != "REDIS_URL"
    }
    for name, value in {**FAST_SETTINGS, **settings}.items():
        env[ENV_PREFIX + name.upper()] = str(value)
    paths = [str(tmp_path), str(TESTS_DIR), str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env[RUNS_FILE_ENV] = str(tmp_path / "runs.jsonl")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "tmp")
    return env


def metrics_dirs(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmp").glob(METRICS_DIR_PREFIX + "*"))


class Supervised:
    """One ``semibot-queue worker --processes N`` subprocess, its log and its children."""

    def __init__(self, tmp_path: Path, redis_url: str, argv: list[str], env: dict[str, str]):
        self.log_path = tmp_path / "supervisor.log"
        self.seen: set[int] = set()
        command = [
            sys.executable, "-m", "semibot_queue", "--redis-url", redis_url, "--queue", QUEUE,
            "worker", *argv,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self, client) -> set[int]:
        """The pids of its registered worker processes that run now (ids: host-pid-random)."""
        pids = {int(m.decode().rsplit("-", 2)[-2]) for m in client.zrange(KEYS.workers, 0, -1)}
        found = {pid for pid in pids if alive(pid) and parent_of(pid) == self.process.pid}
        self.seen |= found
        return found

    def wait_children(self, client, count: int, but_not: set[int] = frozenset()) -> set[int]:
        """Wait until exactly ``count`` children run and are registered, none of ``but_not``."""
        return wait_until(
            lambda: (
                self.process.poll() is None
                and len(pids := self.children(client)) == count
                and not pids & but_not
                and pids
            ),
            START_TIMEOUT_S,
            f"{count} registered worker processes",
            lambda: f"exit {self.process.poll()}, log:\n{self.log()[-3000:]}",
        )

    def wait_log(self, text: str) -> None:
        wait_until(lambda: text in self.log(), START_TIMEOUT_S, repr(text), self.log)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal it and wait for its exit status."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still runs after {EXIT_TIMEOUT_S} s") from None

    def close(self) -> None:
        """SIGKILL it and every child seen that still runs; print the log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        print(self.log())


@pytest.fixture
def supervised(tmp_path, redis_url) -> Iterator:
    """Start supervisors with ``supervised(argv, **settings)``; all killed at the end."""
    started: list[Supervised] = []

    def start(argv: list[str], **settings: str | float) -> Supervised:
        one = Supervised(tmp_path, redis_url, argv, environment(tmp_path, **settings))
        started.append(one)
        return one

    yield start
    for one in started:
        one.close()


@pytest.fixture
def importable(tmp_path, monkeypatch) -> Path:
    """Worker processes started from this process import from ``tmp_path`` (``starts``) and
    the tests."""
    paths = [str(tmp_path), str(TESTS_DIR), str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.delenv("REDIS_URL", raising=False)
    (tmp_path / "starts.py").write_text(textwrap.dedent(STARTS_MODULE))
    return tmp_path


@pytest.fixture(autouse=True)
def _logs_reach_caplog(monkeypatch, caplog) -> None:
    """The ``semibot_queue`` logs of this process, INFO and up, reach caplog (a command
    line test may have configured the logger; it is restored after the test)."""
    logger = logging.getLogger("semibot_queue")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.INFO, logger="semibot_queue")


def failing_starts(monkeypatch, tmp_path: Path, count: int, status: int) -> Path:
    """Make the first ``count`` imports of ``starts`` exit ``status``; the starts file."""
    starts = tmp_path / "starts.txt"
    monkeypatch.setenv("STARTS_FILE", str(starts))
    monkeypatch.setenv("FAIL_STARTS", str(count))
    monkeypatch.setenv("START_STATUS", str(status))
    return starts


def started(messages: list[str]) -> list[int]:
    """The pids of the worker processes a supervisor of this process logged as started."""
    return [
        int(m) for m in re.findall(r"worker process \d+ \(pid (\d+)\) started", "\n".join(messages))
    ]


def started_pids(starts: Path) -> list[int]:
    return [int(line) for line in starts.read_text().split()] if starts.exists() else []


def enqueue(redis_url: str, count: int, **config) -> list[str]:
    with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
        return producer.enqueue_many([payload(n, config=config) for n in range(count)])


def results(redis_url: str, ids: list[str]) -> list:
    with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
        return [producer.wait_for_result(task_id, timeout=30) for task_id in ids]


def in_flight(client) -> int:
    return sum(client.llen(key) for key in client.scan_iter(match=KEYS.inflight_prefix + "*"))


def scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    """The samples of ``/metrics`` by (name, sorted labels); None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- N processes --------------------------------------------------------------------


class TestProcesses:
    """Each of the N processes is a worker of its own: registered, taking tasks."""

    def test_each_process_registers_and_runs_tasks(self, supervised, redis_url, redis_client):
        sup = supervised([HANDLER, "--processes", "3", "--concurrency", "2"])
        pids = sup.wait_children(redis_client, 3)
        # 12 tasks of 0.3 s on 3 x 2 slots: no process can take them all
        ids = enqueue(redis_url, 12, sleep=0.3)
        done = results(redis_url, ids)
        assert [r.status for r in done if r is not None] == ["succeeded"] * 12
        assert {r.result["pid"] for r in done} == pids
        assert sup.stop() == 0, sup.log()


class TestSupervisorKilled:
    """Found by a black-box review: a supervisor killed by SIGKILL left its workers running
    and serving, re-parented to init; starting it again gave twice the processes."""

    def test_its_workers_drain_and_stop_by_themselves_and_no_task_is_lost(
        self, supervised, redis_url, redis_client
    ):
        sup = supervised([HANDLER, "--processes", "2", "--concurrency", "2"])
        orphans = sup.wait_children(redis_client, 2)
        ids = enqueue(redis_url, 8, sleep=0.5)
        wait_until(lambda: in_flight(redis_client) >= 2, 10, "tasks running")
        sup.process.kill()
        sup.process.wait()
        wait_until(
            lambda: not any(alive(pid) for pid in orphans), 15, "the orphaned workers to stop"
        )
        assert sup.log().count("is gone; this worker stops") == len(orphans), sup.log()
        assert in_flight(redis_client) == 0, "a stopped worker left tasks in flight"
        again = supervised([HANDLER, "--processes", "1", "--concurrency", "4"])
        again.wait_children(redis_client, 1)
        done = results(redis_url, ids)
        assert [r.status if r else None for r in done] == ["succeeded"] * 8
        assert again.stop() == 0, again.log()


def stop_signals_blocked(pid: int) -> dict[str, bool]:
    """For each thread of ``pid`` but its main one: whether it blocks SIGTERM and SIGINT."""
    wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    blocked = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
        mask = int(status["SigBlk"].strip(), 16)
        blocked[f"{status['Name'].strip()} ({task.name})"] = mask & wanted == wanted
    return blocked


class TestSignalsReachTheMainThread:
    """A thread that takes SIGTERM leaves the main thread in its blocking pop for up to
    QUEUE_POLL_TIMEOUT: found in review, the supervisor check's thread did not block them."""

    def test_every_thread_of_a_supervised_worker_but_the_main_one_blocks_them(
        self, supervised, redis_client
    ):
        sup = supervised([HANDLER, "--processes", "1", "--concurrency", "2"])
        [child] = sup.wait_children(redis_client, 1)
        blocked = stop_signals_blocked(child)
        assert len(blocked) >= 5, blocked  # pool, recorder, watcher, limiter, check...
        assert all(blocked.values()), blocked
        assert sup.stop() == 0, sup.log()


class TestLateSignals:
    """Found by a black-box review: a signal arriving after the stop was done, once the
    handlers were put back, killed the supervisor by that signal instead of its exit 0."""

    def test_a_storm_of_sigterm_still_ends_with_exit_0(self, supervised, redis_client):
        sup = supervised([HANDLER, "--processes", "1", "--concurrency", "1"])
        sup.wait_children(redis_client, 1)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while sup.process.poll() is None and time.monotonic() < deadline:
            sup.process.send_signal(signal.SIGTERM)
            try:
                sup.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
        assert sup.process.returncode == 0, sup.log()


# --- restarts and giving up -----------------------------------------------------------


class TestRestarts:
    """A process that dies is replaced after a backoff; one that keeps dying ends it all."""

    def test_a_killed_process_is_replaced_and_its_tasks_run_once(
        self, supervised, redis_url, redis_client
    ):
        sup = supervised([HANDLER, "--processes", "2", "--concurrency", "2"])
        before = sup.wait_children(redis_client, 2)
        listener = ResultListener(redis_url, KEYS)
        listener.start()
        try:
            ids = enqueue(redis_url, 6, sleep=1.0)
            wait_until(lambda: in_flight(redis_client) == 4, 10, "4 tasks running")
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            after = sup.wait_children(redis_client, 2, but_not={victim})
            assert len(after - before) == 1
            outcomes = Ledger(redis_client, KEYS).wait_settled(ids, 30)
            assert set(outcomes.values()) == {SUCCEEDED}
            wait_until(lambda: sum(listener.counts().values()) >= 6, 10, "6 results")
        finally:
            listener.stop()
        assert {task_id: listener.counts()[task_id] for task_id in ids} == dict.fromkeys(ids, 1)
        assert f"(pid {victim}) was killed by SIGKILL; restart 1 in " in sup.log()
        assert sup.stop() == 0, sup.log()

    def test_a_process_that_dies_at_start_makes_it_give_up(self, importable, monkeypatch, caplog):
        starts = failing_starts(monkeypatch, importable, 1000, 1)
        policy = RestartPolicy(backoff_base=0.05, backoff_cap=0.1, window=60, max_restarts=2)
        began = time.monotonic()
        status = run_workers("starts:run", processes=1, restart_policy=policy)
        assert status == 1
        assert time.monotonic() - began < 30
        assert len(started_pids(starts)) == 3  # the first start and 2 restarts, no more
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([w for w in warnings if "exited with status 1; restart" in w]) == 2
        [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert error.endswith("exited with status 1, 3 times in 60 s: supervisor giving up")
        assert not any(map(alive, started_pids(starts)))

    def test_a_process_that_died_once_is_restarted_and_serves(
        self, importable, monkeypatch, redis_url, redis_client
    ):
        starts = failing_starts(monkeypatch, importable, 1, 1)
        sup = Supervisor(
            [sys.executable, "-m", "semibot_queue", "worker", "starts:run"],
            2,
            stop_timeout=10,
            env={**os.environ, "REDIS_URL": redis_url, "SEMIBOT_QUEUE_DEFAULT_QUEUE_NAME": QUEUE},
            policy=RestartPolicy(backoff_base=0.05),
        )
        thread = threading.Thread(target=lambda: setattr(sup, "status", sup.run()))
        thread.start()
        try:
            wait_until(lambda: redis_client.zcard(KEYS.workers) == 2, START_TIMEOUT_S, "2 workers")
            assert sup.restarts == 1
            assert sorted(sup.pids) == sorted(started_pids(starts)[1:])
        finally:
            sup.stop()
            thread.join(EXIT_TIMEOUT_S)
        assert not thread.is_alive()
        assert sup.status == 0  # type: ignore[attr-defined]
        assert not any(map(alive, started_pids(starts)))

    @pytest.mark.parametrize("status", [3, 9], ids=["unreachable", "refused"])
    def test_a_status_a_restart_cannot_help_stops_the_others(
        self, importable, monkeypatch, redis_url, caplog, status
    ):
        starts = failing_starts(monkeypatch, importable, 1, status)
        settings = QueueSettings(shutdown_timeout=1.0)
        assert run_workers("starts:run", processes=2, redis_url=redis_url, settings=settings) == (
            status
        )
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            m.endswith(f"exited with status {status}: not restarted; stopping the others")
            for m in messages
        )
        assert "SIGTERM sent to 1 worker process(es)" in messages
        assert not any("; restart" in m for m in messages)
        pids = started(messages)
        assert len(pids) == 2
        assert started_pids(starts)[0] in pids
        assert not any(map(alive, pids))

    @pytest.mark.usefixtures("importable")
    def test_a_handler_that_cannot_be_imported_ends_it_with_exit_5(self, redis_url, caplog):
        assert run_workers("nonexistent_module_xyz:f", processes=2, redis_url=redis_url) == 5
        messages = [r.getMessage() for r in caplog.records]
        says = "exited with status 5: not restarted; stopping the others"
        assert any(m.endswith(says) for m in messages)
        assert not any("; restart" in m for m in messages)

    def test_the_command_line_refuses_a_bad_handler_before_starting_any_process(
        self, redis_url, capsys
    ):
        logger = logging.getLogger("semibot_queue")
        saved = (logger.handlers[:], logger.level, logger.propagate)
        try:
            status = main(["--redis-url", redis_url, "worker", "nonexistent_module_xyz:f",
                           "--processes", "2"])  # fmt: skip
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        assert status == Exit.INVALID
        err = capsys.readouterr().err
        assert "cannot import 'nonexistent_module_xyz'" in err
        assert "started" not in err


# --- stopping -----------------------------------------------------------------------


class TestStopping:
    """SIGTERM/SIGINT drain every process; a second one hurries them; none is left."""

    def test_sigterm_drains_every_process_and_exits_0(self, supervised, redis_url, redis_client):
        sup = supervised([HANDLER, "--processes", "2", "--concurrency", "2"], shutdown_timeout=20)
        pids = sup.wait_children(redis_client, 2)
        ids = enqueue(redis_url, 4, sleep=1.0)
        wait_until(lambda: in_flight(redis_client) == 4, 10, "4 tasks running")
        assert sup.stop() == 0, sup.log()
        # drained: they finished where they ran, nothing was given back
        assert set(Ledger(redis_client, KEYS).check(ids).values()) == {SUCCEEDED}
        assert not any(map(alive, pids))
        assert redis_client.zcard(KEYS.workers) == 0
        assert "SIGTERM sent to 2 worker process(es)" in sup.log()

    def test_a_second_signal_makes_the_processes_hurry(self, supervised, redis_url, redis_client):
        sup = supervised(["cli_handlers:hang", "--processes", "2"], shutdown_timeout=120)
        pids = sup.wait_children(redis_client, 2)
        [task_id] = enqueue(redis_url, 1)
        wait_until(lambda: in_flight(redis_client) == 1, 10, "the task running")
        sup.process.send_signal(signal.SIGINT)
        sup.wait_log("SIGINT sent to 2 worker process(es)")
        sup.wait_log("exited with status 0")  # the idle one drained: the signal arrived
        # without the second signal they would wait SHUTDOWN_TIMEOUT (120 s) for the task
        assert sup.stop(signal.SIGINT) == 0, sup.log()
        assert sup.log().count("SIGINT sent to") == 2
        assert f"task {task_id} still running at shutdown; given back to pending" in sup.log()
        assert not any(map(alive, pids))

    def test_a_process_that_ignores_sigterm_is_killed_after_the_stop_timeout(
        self, tmp_path, caplog
    ):
        ready = tmp_path / "ready"
        script = (
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "open(sys.argv[1], 'w').close()\n"
            "time.sleep(120)\n"
        )
        sup = Supervisor([sys.executable, "-c", script, str(ready)], 1, stop_timeout=0.5)
        thread = threading.Thread(target=lambda: setattr(sup, "status", sup.run()))
        thread.start()
        try:
            wait_until(ready.exists, START_TIMEOUT_S, "the process to ignore SIGTERM")
            [pid] = sup.pids
        finally:
            sup.stop()
            thread.join(EXIT_TIMEOUT_S)
        assert not thread.is_alive()
        assert sup.status == 0  # type: ignore[attr-defined]
        assert f"worker process 1 (pid {pid}) still runs: killing it" in caplog.text
        assert not alive(pid)

    def test_a_failing_supervisor_stops_the_processes_it_started(self, monkeypatch, caplog):
        spawn = Supervisor._spawn
        started: list[subprocess.Popen[bytes]] = []

        def spawn_once(self, child) -> None:  # the second start fails, as at a process limit
            if started:
                raise OSError(11, "Resource temporarily unavailable")
            spawn(self, child)
            started.append(child.process)

        monkeypatch.setattr(Supervisor, "_spawn", spawn_once)
        command = [sys.executable, "-c", "import time; time.sleep(120)"]
        assert Supervisor(command, 2, stop_timeout=10).run() == 1
        assert "supervisor cannot go on: [Errno 11] Resource temporarily unavailable" in caplog.text
        [process] = started
        assert process.returncode == -signal.SIGTERM
        assert not alive(process.pid)


# --- metrics --------------------------------------------------------------------------


class TestMetrics:
    """With --metrics-port, one endpoint serves every process's metrics, summed."""

    def test_one_endpoint_sums_every_process(self, supervised, redis_url, redis_client, tmp_path):
        port = free_port()
        argv = [HANDLER, "--processes", "2", "--concurrency", "2", "--metrics-port", str(port)]
        sup = supervised(argv)
        sup.wait_children(redis_client, 2)
        wait_until(lambda: scrape(port), START_TIMEOUT_S, "/metrics")
        [directory] = metrics_dirs(tmp_path)
        ids = enqueue(redis_url, 10, sleep=0.2)  # 4 slots: both processes take some
        done = results(redis_url, ids)
        assert len({r.result["pid"] for r in done}) == 2
        queue = (("queue", QUEUE),)
        succeeded = ("semibot_queue_tasks_processed_total", (*queue, ("status", "succeeded")))
        samples = wait_until(
            lambda: (
                (s := scrape(port))
                and s[succeeded] == 10
                and s[("semibot_queue_concurrent_tasks", queue)] == 0
                and s
            ),
            10,
            "10 successes summed over the processes",
            lambda: str(scrape(port)),
        )
        assert samples[("semibot_queue_task_duration_seconds_count", queue)] == 10
        assert samples[("semibot_queue_worker_restarts_total", queue)] == 0
        assert any(directory.glob("*.db"))
        assert "metrics on http" not in sup.log()  # no process opened a port of its own
        assert sup.stop() == 0, sup.log()
        assert not directory.exists()
        assert metrics_dirs(tmp_path) == []

    def test_a_metrics_port_taken_exits_2_and_starts_nothing(self, tmp_path, monkeypatch, caplog):
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            sup = Supervisor(["no-such-command"], 2, stop_timeout=1, metrics=("127.0.0.1", port))
            assert sup.run() == 2
        assert f"metrics endpoint 127.0.0.1:{port} cannot be opened" in caplog.text
        assert sup.pids == []
        assert list(tmp_path.glob(METRICS_DIR_PREFIX + "*")) == []


# --- the API --------------------------------------------------------------------------


class TestApi:
    """``run_workers`` and ``RestartPolicy`` refuse nonsense with SettingsError."""

    def test_restart_delays_double_up_to_the_cap(self):
        policy = RestartPolicy(backoff_base=0.5, backoff_cap=3.0)
        assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]

    @pytest.mark.parametrize(
        "fields",
        [{"backoff_base": -1}, {"backoff_cap": float("nan")}, {"window": 0},
         {"max_restarts": -1}, {"max_restarts": 1.5}, {"max_restarts": True}],
    )  # fmt: skip
    def test_a_bad_restart_policy_is_refused_naming_the_field(self, fields):
        [name] = fields
        with pytest.raises(SettingsError, match=f"restart policy {name} must be"):
            RestartPolicy(**fields)

    @pytest.mark.parametrize(
        ("handler", "kwargs", "says"),
        [
            ("no_colon", {"processes": 1}, "is not of the form MODULE:FUNCTION"),
            (":run", {"processes": 1}, "is not of the form MODULE:FUNCTION"),
            ("m:run", {"processes": 0}, "processes must be a whole number >= 1, got 0"),
            ("m:run", {"processes": True}, "processes must be a whole number >= 1, got True"),
            ("m:run", {"processes": 2, "concurrency": 0}, "concurrency must be a whole number"),
            ("m:run", {"processes": 257}, r"at most MAX_WORKER_PROCESSES \(256\), got 257"),
        ],
    )
    def test_run_workers_refuses_nonsense_before_starting_anything(self, handler, kwargs, says):
        with pytest.raises(SettingsError, match=says):
            run_workers(handler, **kwargs)

    def test_exit_statuses_are_described(self):
        assert describe(1) == "exited with status 1"
        assert describe(-signal.SIGKILL) == "was killed by SIGKILL"
        assert describe(-200) == "was killed by signal 200"
