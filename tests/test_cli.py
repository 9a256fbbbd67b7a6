"""The ``semibot-queue`` command line: every command in-process through ``main(argv)`` and
through a real subprocess (``python -m semibot_queue`` and the console script).

Errors are one line on stderr, ``semibot-queue: error: ...``, with a distinct exit status;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import configparser
import importlib
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import semibot_queue
from cli_handlers import echo, reject
from redis_server import RedisServer, free_port
from semibot_queue import DeadLetterQueue, DeadLetterRecord, TaskConsumer, TaskProducer
from semibot_queue.cli import Exit, main
from semibot_queue.codec import task_id_of
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import Scripts
from semibot_queue.tables import print_dead_letters
from support import FAST, payload, running, wait_until

QUEUE = "agent:tasks"  #: the command line's default queue
KEYS = KeySpace(QUEUE)
UNREACHABLE = "redis://127.0.0.1:1/0"  #: nothing listens on port 1
TESTS_DIR = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(semibot_queue.__file__).resolve().parent.parent
MODULE = [sys.executable, "-m", "semibot_queue"]
#: Reconnect quickly so that "unreachable" is decided in milliseconds, not minutes.
FAST_RECONNECT = {
    "SEMIBOT_QUEUE_MAX_RECONNECT_ATTEMPTS": "2",
    "SEMIBOT_QUEUE_ERROR_RETRY_DELAY": "0.01",
    "SEMIBOT_QUEUE_MAX_RECONNECT_DELAY": "0.02",
}
PAYLOAD = {
    "session_id": "session-7",
    "agent_id": "agent-1",
    "org_id": "org-1",
    "messages": [{"role": "user", "content": "summarise the report"}],
    "task_id": "task-from-json",
}


# --- helpers ------------------------------------------------------------------------


def cli(*argv: str) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit status, what it printed)."""
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def error_line(err: str) -> str:
    """The one line an error prints on stderr (fails if there is more, or a traceback)."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("semibot-queue: error: "), lines[0]
    return lines[0]


def cli_env(redis_url: str | None = None, **variables: str) -> dict[str, str]:
    """The environment of a command-line subprocess: the package and ``cli_handlers``
    importable, ``$REDIS_URL`` set (or unset) and ``variables`` added."""
    env = dict(os.environ)
    paths = [str(PACKAGE_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("REDIS_URL", None)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(variables)
    return env


def run(command: list[str], *argv: str, env: dict[str, str], stdin: str | None = None):
    """Run the command line to completion in a subprocess."""
    return subprocess.run(
        [*command, *argv],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def declared_entry_point() -> str:
    """The target of the ``semibot-queue`` console script, as setup.cfg declares it."""
    config = configparser.ConfigParser()
    config.read(TESTS_DIR.parent / "setup.cfg")
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        if name.strip() == "semibot-queue":
            return target.strip()
    raise AssertionError("setup.cfg declares no semibot-queue console script")


def console_script() -> list[str]:
    """The installed ``semibot-queue`` script; from a source tree that has not been
    installed, the declared entry point run the way the generated script runs it."""
    installed = shutil.which("semibot-queue")
    if installed is not None:
        return [installed]
    module, _, function = declared_entry_point().partition(":")
    return [
        sys.executable,
        "-c",
        f"import sys; from {module} import {function}; sys.exit({function}())",
    ]


@pytest.fixture(params=["python -m", "console script"])
def launcher(request) -> list[str]:
    """Each way a user starts the command line."""
    return MODULE if request.param == "python -m" else console_script()


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """``worker`` and ``demo`` configure the ``semibot_queue`` logger; undo it after the test."""
    logger = logging.getLogger("semibot_queue")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def pending(redis_client, keys: KeySpace = KEYS) -> list[dict]:
    """The pending tasks of a queue, oldest first, decoded."""
    return [json.loads(raw) for raw in reversed(redis_client.lrange(keys.pending, 0, -1))]


def dead_letter(url: str, count: int, queue_name: str = QUEUE) -> list[str]:
    """Enqueue ``count`` tasks and let a worker dead-letter each one; their ids, oldest first."""
    with TaskProducer(url, queue_name, FAST, registry=CollectorRegistry()) as producer:
        ids = producer.enqueue_many([payload(n) for n in range(count)])
    consumer = TaskConsumer(url, queue_name, reject, 1, FAST, registry=CollectorRegistry())
    dlq = DeadLetterQueue(url, queue_name, FAST)
    try:
        with running(consumer):
            wait_until(lambda: dlq.count() == count, what=f"{count} dead letters")
    finally:
        dlq.close()
    return ids


@pytest.fixture
def two_dead_letters(redis_url) -> list[str]:
    """Two dead letters on the default queue, oldest first."""
    return dead_letter(redis_url, 2)


class FakeTty(io.StringIO):
    """A terminal on stdin, so destructive commands ask before they act."""

    def isatty(self) -> bool:
        return True


def answer(monkeypatch, reply: str) -> list[str]:
    """Make stdin a terminal whose user types ``reply``; the questions asked."""
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return reply

    monkeypatch.setattr(sys, "stdin", FakeTty())
    monkeypatch.setattr("builtins.input", fake_input)
    return asked


# --- enqueue ------------------------------------------------------------------------


class TestEnqueue:
    """``enqueue`` builds a payload from flags or JSON, prints the task id, and can wait."""

    def test_flags_make_a_task_on_pending_and_its_id_is_printed(self, redis_url, redis_client):
        status, out = cli(
            "--redis-url", redis_url, "enqueue",
            "--session-id", "s-1", "--agent-id", "a-1", "--org-id", "o-1",
            "--message", "system:be brief", "--message", "user:what is 2:3?",
        )  # fmt: skip
        assert status == Exit.OK
        task_id = out.strip()
        assert str(uuid.UUID(task_id)) == task_id
        [task] = pending(redis_client)
        assert task["task_id"] == task_id
        assert (task["session_id"], task["agent_id"], task["org_id"]) == ("s-1", "a-1", "o-1")
        assert task["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is 2:3?"},
        ]

    def test_redis_url_defaults_to_the_environment_and_queue_is_chosen(
        self, redis_url, redis_client, monkeypatch
    ):
        monkeypatch.setenv("REDIS_URL", redis_url)
        status, out = cli(
            "--queue", "ops:q", "enqueue",
            "--session-id", "s", "--agent-id", "a", "--org-id", "o",
        )  # fmt: skip
        assert status == Exit.OK
        assert [t["task_id"] for t in pending(redis_client, KeySpace("ops:q"))] == [out.strip()]
        assert pending(redis_client) == []

    def test_json_file_is_the_payload(self, redis_url, redis_client, tmp_path):
        path = tmp_path / "task.json"
        path.write_text(json.dumps(PAYLOAD))
        status, out = cli("--redis-url", redis_url, "enqueue", "--json", str(path))
        assert status == Exit.OK
        assert out.strip() == "task-from-json"
        [task] = pending(redis_client)
        assert task["messages"] == PAYLOAD["messages"]

    def test_json_dash_reads_the_payload_from_stdin(self, redis_url, redis_client, monkeypatch):
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(PAYLOAD)))
        status, out = cli("--redis-url", redis_url, "enqueue", "--json", "-")
        assert status == Exit.OK
        assert out.strip() == "task-from-json"
        assert [t["task_id"] for t in pending(redis_client)] == ["task-from-json"]

    def test_invalid_json_file_exits_5_and_writes_nothing(
        self, redis_url, redis_client, tmp_path, capsys
    ):
        path = tmp_path / "broken.json"
        path.write_text('{"session_id": ')
        status, out = cli("--redis-url", redis_url, "enqueue", "--json", str(path))
        assert status == Exit.INVALID == 5
        assert out == ""
        assert "is not valid JSON" in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    def test_a_file_that_is_not_text_exits_5_with_one_line(
        self, redis_url, redis_client, tmp_path, capsys
    ):
        path = tmp_path / "binary.json"
        path.write_bytes(b"\xff\xfe\x00{")
        status, _ = cli("--redis-url", redis_url, "enqueue", "--json", str(path))
        assert status == Exit.INVALID
        assert str(path) in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    def test_json_that_is_not_a_payload_exits_5(self, redis_url, redis_client, capsys):
        bad = dict(PAYLOAD, messages="hello")
        for text in (json.dumps([PAYLOAD]), json.dumps(bad)):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "stdin", io.StringIO(text))
                status, _ = cli("--redis-url", redis_url, "enqueue", "--json", "-")
            assert status == Exit.INVALID
            error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    # Was a package bug (issue 8): an unknown key (a typo such as "sesion_id") was ignored.
    def test_json_with_an_unknown_key_exits_5_naming_the_key(
        self, redis_url, redis_client, monkeypatch, capsys
    ):
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({**PAYLOAD, "priorty": 1})))
        status, out = cli("--redis-url", redis_url, "enqueue", "--json", "-")
        assert status == Exit.INVALID == 5
        assert out == ""
        assert "unknown key 'priorty'" in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    # Found by a black-box review: a payload nested past the JSON parser's recursion limit
    # printed a RecursionError traceback (exit 1).
    def test_json_nested_past_the_parser_exits_5_with_one_line(
        self, redis_url, redis_client, tmp_path, capsys
    ):
        path = tmp_path / "deep.json"
        path.write_text("[" * 100_000 + "]" * 100_000)
        status, out = cli("--redis-url", redis_url, "enqueue", "--json", str(path))
        assert status == Exit.INVALID
        assert out == ""
        assert "deeper than the parser can follow" in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    def test_a_task_id_still_live_exits_5_and_writes_nothing_more(
        self, redis_url, redis_client, monkeypatch, capsys
    ):
        for expected in (Exit.OK, Exit.INVALID):
            monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(PAYLOAD)))
            status, _ = cli("--redis-url", redis_url, "enqueue", "--json", "-")
            assert status == expected
        assert "task-from-json" in error_line(capsys.readouterr().err)
        assert [t["task_id"] for t in pending(redis_client)] == ["task-from-json"]

    def test_missing_file_exits_5(self, redis_url, tmp_path, capsys):
        missing = tmp_path / "nowhere.json"
        status, _ = cli("--redis-url", redis_url, "enqueue", "--json", str(missing))
        assert status == Exit.INVALID
        assert f"cannot read {missing}" in error_line(capsys.readouterr().err)

    def test_message_without_a_role_exits_5(self, redis_url, redis_client, capsys):
        status, _ = cli(
            "--redis-url", redis_url, "enqueue",
            "--session-id", "s", "--agent-id", "a", "--org-id", "o", "--message", "no role",
        )  # fmt: skip
        assert status == Exit.INVALID
        assert "'no role' is not ROLE:TEXT" in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    def test_missing_agent_id_exits_2_naming_it(self, redis_url, redis_client, capsys):
        status, _ = cli("--redis-url", redis_url, "enqueue", "--session-id", "s", "--org-id", "o")
        assert status == Exit.USAGE == 2
        assert error_line(capsys.readouterr().err).endswith("enqueue needs --agent-id")
        status, _ = cli("--redis-url", redis_url, "enqueue", "--session-id", "s")
        assert status == Exit.USAGE
        assert "--agent-id, --org-id" in error_line(capsys.readouterr().err)
        assert pending(redis_client) == []

    def test_a_bad_settings_variable_is_one_line_naming_it(self, redis_url, monkeypatch, capsys):
        monkeypatch.setenv("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "lots")
        status, out = cli(
            "--redis-url", redis_url, "enqueue", "--session-id", "s", "--agent-id", "a",
            "--org-id", "o",
        )  # fmt: skip
        assert status == Exit.ERROR
        assert out == ""
        assert "SEMIBOT_QUEUE_MAX_QUEUE_LENGTH='lots'" in error_line(capsys.readouterr().err)

    def test_no_payload_at_all_is_a_usage_error(self, redis_url, capsys):
        status, out = cli("--redis-url", redis_url, "enqueue", "--agent-id", "a")
        assert (status, out) == (Exit.USAGE, "")
        line = error_line(capsys.readouterr().err)
        assert "one of the arguments --json --session-id is required" in line

    def test_a_full_queue_exits_6_and_keeps_what_was_there(
        self, redis_url, redis_client, monkeypatch, capsys
    ):
        monkeypatch.setenv("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "1")
        monkeypatch.setenv("SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD", "1")
        argv = ["--redis-url", redis_url, "enqueue", "--session-id", "s"]
        argv += ["--agent-id", "a", "--org-id", "o"]
        assert cli(*argv)[0] == Exit.OK
        capsys.readouterr()
        status, out = cli(*argv)
        assert status == Exit.FULL == 6
        assert out == ""
        assert "is full (MAX_QUEUE_LENGTH=1" in error_line(capsys.readouterr().err)
        assert len(pending(redis_client)) == 1

    def test_wait_prints_the_result_of_a_running_worker(self, redis_url):
        consumer = TaskConsumer(redis_url, None, echo, 2, FAST, registry=CollectorRegistry())
        with running(consumer):
            status, out = cli(
                "--redis-url", redis_url, "enqueue",
                "--session-id", "s", "--agent-id", "a-9", "--org-id", "o",
                "--message", "user:ping", "--wait", "5",
            )  # fmt: skip
        assert status == Exit.OK
        task_id, line = out.splitlines()
        result = json.loads(line)
        assert set(result) == {
            "task_id", "session_id", "status", "result", "error", "attempts", "duration_s",
            "finished_at",
        }  # fmt: skip
        assert result["task_id"] == task_id
        assert result["session_id"] == "s"
        assert result["status"] == "succeeded"
        assert result["result"] == {"agent": "a-9", "echo": "ping"}
        assert result["attempts"] == 1

    def test_wait_for_a_dead_lettered_task_prints_the_failure_and_exits_1(self, redis_url):
        consumer = TaskConsumer(redis_url, None, reject, 1, FAST, registry=CollectorRegistry())
        with running(consumer):
            status, out = cli(
                "--redis-url", redis_url, "enqueue",
                "--session-id", "s", "--agent-id", "a", "--org-id", "o", "--wait", "5",
            )  # fmt: skip
        assert status == Exit.ERROR == 1
        task_id, line = out.splitlines()
        result = json.loads(line)
        assert result["status"] == "failed"
        assert result["error"] == f"PermanentTaskError: cannot handle task {task_id}"

    def test_wait_without_a_worker_times_out_with_exit_7(self, redis_url, redis_client, capsys):
        status, out = cli(
            "--redis-url", redis_url, "enqueue",
            "--session-id", "s", "--agent-id", "a", "--org-id", "o", "--wait", "0.5",
        )  # fmt: skip
        assert status == Exit.TIMEOUT == 7
        task_id = out.strip()
        assert error_line(capsys.readouterr().err).endswith(f"no result for task {task_id} in time")
        assert [t["task_id"] for t in pending(redis_client)] == [task_id]


class TestEnqueueSubprocess:
    """The same through a real process."""

    def test_enqueue_prints_the_id_of_a_pending_task(self, launcher, redis_url, redis_client):
        done = run(
            launcher, "enqueue", "--session-id", "s", "--agent-id", "a", "--org-id", "o",
            "--message", "user:hi", env=cli_env(redis_url),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert [t["task_id"] for t in pending(redis_client)] == [done.stdout.strip()]

    def test_json_from_stdin_and_wait_for_the_result(self, redis_url):
        consumer = TaskConsumer(redis_url, None, echo, 2, FAST, registry=CollectorRegistry())
        with running(consumer):
            done = run(
                MODULE, "--redis-url", redis_url, "enqueue", "--json", "-", "--wait", "5",
                env=cli_env(), stdin=json.dumps(PAYLOAD),
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
        task_id, line = done.stdout.splitlines()
        assert task_id == "task-from-json"
        assert json.loads(line)["result"] == {"agent": "agent-1", "echo": "summarise the report"}

    def test_bad_input_exits_5_and_missing_agent_id_exits_2(self, redis_url, tmp_path):
        broken = tmp_path / "broken.json"
        broken.write_text("{not json")
        done = run(MODULE, "enqueue", "--json", str(broken), env=cli_env(redis_url))
        assert done.returncode == 5
        assert "is not valid JSON" in error_line(done.stderr)
        done = run(MODULE, "enqueue", "--session-id", "s", "--org-id", "o", env=cli_env(redis_url))
        assert done.returncode == 2
        assert "--agent-id" in error_line(done.stderr)

    def test_wait_without_a_worker_exits_7(self, redis_url):
        done = run(
            MODULE, "enqueue", "--session-id", "s", "--agent-id", "a", "--org-id", "o",
            "--wait", "0.5", env=cli_env(redis_url),
        )  # fmt: skip
        assert done.returncode == 7
        assert "in time" in error_line(done.stderr)

    def test_console_script_runs_the_cli(self):
        assert declared_entry_point() == "semibot_queue.cli:run"


# --- stats --------------------------------------------------------------------------


def registered_workers(redis_client) -> dict[str, str]:
    """Register a live worker holding one task and a worker silent for two minutes holding
    two; their ids by state."""
    scripts = Scripts(redis_client, KEYS)
    scripts.heartbeat("live-worker", outage_ms=60_000, grace_ms=10_000)
    seconds, _ = redis_client.time()
    redis_client.zadd(KEYS.workers, {"dead-worker": (seconds - 120) * 1000})
    redis_client.lpush(KEYS.inflight("live-worker"), b"task-a")
    redis_client.lpush(KEYS.inflight("dead-worker"), b"task-b", b"task-c")
    return {"alive": "live-worker", "dead": "dead-worker"}


@pytest.fixture
def busy_queue(redis_url, redis_client, two_dead_letters):
    """Three pending, one scheduled, two dead letters, a live and a dead worker."""
    assert len(two_dead_letters) == 2
    # The worker that made the dead letters may have left its registration behind (see
    # test_a_stopped_worker_is_no_longer_listed): these tests want exactly their own two.
    redis_client.delete(KEYS.workers)
    with TaskProducer(redis_url, None, FAST, registry=CollectorRegistry()) as producer:
        producer.enqueue_many([payload(n) for n in range(3)])
    seconds, _ = redis_client.time()
    redis_client.zadd(KEYS.scheduled, {b"retry-later": (seconds + 3600) * 1000})
    return registered_workers(redis_client)


def column_starts(line: str) -> list[int]:
    return [match.start() for match in re.finditer(r"\S+", line)]


class TestStats:
    """``stats`` shows pending, scheduled, in flight per worker, dead letters, dead workers."""

    @pytest.mark.usefixtures("busy_queue")
    def test_json_snapshot_has_the_documented_keys_and_values(self, redis_url):
        status, out = cli("--redis-url", redis_url, "stats", "--json")
        assert status == Exit.OK
        snapshot = json.loads(out)
        assert set(snapshot) == {
            "queue", "pending", "scheduled", "in_flight", "dead_letters", "workers", "dead_workers",
        }  # fmt: skip
        assert snapshot["queue"] == QUEUE
        assert snapshot["pending"] == 3
        assert snapshot["scheduled"] == 1
        assert snapshot["in_flight"] == 3
        assert snapshot["dead_letters"] == 2
        assert snapshot["dead_workers"] == 1
        workers = {w["worker_id"]: w for w in snapshot["workers"]}
        for worker in workers.values():
            assert set(worker) == {"worker_id", "in_flight", "heartbeat_age_s", "state"}
        assert set(workers) == {"live-worker", "dead-worker"}
        assert workers["live-worker"]["state"] == "alive"
        assert workers["live-worker"]["in_flight"] == 1
        assert 0 <= workers["live-worker"]["heartbeat_age_s"] < 10
        assert workers["dead-worker"]["state"] == "dead"
        assert workers["dead-worker"]["in_flight"] == 2
        assert 119 <= workers["dead-worker"]["heartbeat_age_s"] < 130

    @pytest.mark.usefixtures("busy_queue")
    def test_table_output_is_aligned(self, redis_url):
        status, out = cli("--redis-url", redis_url, "stats")
        assert status == Exit.OK
        summary_head, summary, blank, worker_head, *rows = out.splitlines()
        assert summary_head.split() == [
            "queue", "pending", "scheduled", "in_flight", "dead_letters", "workers", "dead_workers",
        ]  # fmt: skip
        assert summary.split() == [QUEUE, "3", "1", "3", "2", "2", "1"]
        assert column_starts(summary) == column_starts(summary_head)
        assert blank == ""
        assert worker_head.split() == ["worker", "state", "in_flight", "heartbeat_age_s"]
        by_worker = {row.split()[0]: row.split() for row in rows}
        assert by_worker["dead-worker"][1:3] == ["dead", "2"]
        assert by_worker["live-worker"][1:3] == ["alive", "1"]
        for row in rows:
            assert column_starts(row) == column_starts(worker_head)

    def test_an_empty_queue_has_no_worker_table(self, redis_url):
        status, out = cli("--redis-url", redis_url, "--queue", "empty", "stats")
        assert status == Exit.OK
        assert out.splitlines()[1].split() == ["empty", "0", "0", "0", "0", "0", "0"]
        assert len(out.splitlines()) == 2

    def test_a_running_worker_is_listed_alive(self, redis_url):
        consumer = TaskConsumer(redis_url, None, echo, 3, FAST, registry=CollectorRegistry())
        with running(consumer):

            def listed():
                snapshot = json.loads(cli("--redis-url", redis_url, "stats", "--json")[1])
                return snapshot["workers"]

            [worker] = wait_until(listed, what="the worker in stats")
        assert worker["worker_id"] == consumer.worker_id
        assert worker["state"] == "alive"
        assert worker["in_flight"] == 0

    def test_a_stopped_worker_is_no_longer_listed(self, redis_url, redis_client):
        consumer = TaskConsumer(redis_url, None, echo, 1, FAST, registry=CollectorRegistry())
        shutdown = consumer._shutdown

        def shutdown_then_finish_slowly(runner, watcher) -> None:
            shutdown(runner, watcher)  # gives the tasks back and deregisters the worker
            # What follows (acker, pool) may take a moment; a watcher that still runs
            # would heartbeat within it (FAST beats every 0.1 s). Give it a second.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if redis_client.zscore(KEYS.workers, consumer.worker_id) is not None:
                    break
                time.sleep(0.01)

        consumer._shutdown = shutdown_then_finish_slowly
        with running(consumer):
            wait_until(lambda: redis_client.zscore(KEYS.workers, consumer.worker_id))
        status, out = cli("--redis-url", redis_url, "stats", "--json")
        assert status == Exit.OK
        snapshot = json.loads(out)
        assert snapshot["workers"] == []
        assert snapshot["dead_workers"] == 0

    def test_watch_outlives_a_redis_restart(self, tmp_path, monkeypatch):
        # Found by a black-box review: the first read after a restart ended the watch.
        server = RedisServer(tmp_path)
        server.start()
        naps: list[float] = []
        restarted = threading.Event()

        class EnoughError(Exception):
            pass

        def sleep(seconds: float) -> None:
            naps.append(seconds)
            if len(naps) == 1:
                server.kill()  # the next read finds Redis gone...
                threading.Timer(0.3, lambda: (server.restart(), restarted.set())).start()
            else:
                raise EnoughError

        monkeypatch.setattr("semibot_queue.cli.time", type("Clock", (), {"sleep": sleep}))
        out = io.StringIO()
        try:
            with pytest.raises(EnoughError):
                main(["--redis-url", server.url, "stats", "--json", "--watch", "1"], out=out)
        finally:
            restarted.wait(10)
            server.stop()
        assert restarted.is_set()
        snapshots = [json.loads(line) for line in out.getvalue().splitlines()]
        assert len(snapshots) == 2, "...and the watch went on once it was back"

    def test_watch_prints_a_snapshot_every_interval(self, redis_url, monkeypatch):
        naps: list[float] = []

        class EnoughError(Exception):
            pass

        def sleep(seconds: float) -> None:
            naps.append(seconds)
            if len(naps) == 2:
                raise EnoughError

        monkeypatch.setattr("semibot_queue.cli.time", type("Clock", (), {"sleep": sleep}))
        out = io.StringIO()
        with pytest.raises(EnoughError):
            main(["--redis-url", redis_url, "stats", "--json", "--watch", "0.25"], out=out)
        assert naps == [0.25, 0.25]
        snapshots = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [s["pending"] for s in snapshots] == [0, 0]

    @pytest.mark.usefixtures("busy_queue")
    def test_subprocess_json_from_the_environment(self, redis_url):
        done = run(MODULE, "stats", "--json", env=cli_env(redis_url))
        assert done.returncode == 0, done.stderr
        snapshot = json.loads(done.stdout)
        assert (snapshot["pending"], snapshot["dead_workers"]) == (3, 1)

    def test_subprocess_watch_until_interrupted(self, redis_url, redis_client):
        process = subprocess.Popen(
            [*MODULE, "stats", "--json", "--watch", "0.1"],
            env=cli_env(redis_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(
            target=lambda: [lines.put(line) for line in process.stdout], daemon=True
        )
        reader.start()
        try:
            first = json.loads(lines.get(timeout=30))
            redis_client.lpush(KEYS.pending, b"{}")
            second = json.loads(lines.get(timeout=30))
            while second["pending"] == 0:  # a snapshot may have been taken before the push
                second = json.loads(lines.get(timeout=30))
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert first["pending"] == 0
        assert second["pending"] == 1
        assert "Traceback" not in err, err
        assert process.returncode in (0, 130, -signal.SIGINT)


# --- dlq ----------------------------------------------------------------------------


class TestDeadLetterCommands:
    """``dlq`` lists, shows, retries and deletes dead letters by task id."""

    def test_list_is_a_table_newest_first(self, redis_url, two_dead_letters):
        old, new = two_dead_letters
        status, out = cli("--redis-url", redis_url, "dlq", "list")
        assert status == Exit.OK
        head, first, second, total = out.splitlines()
        assert head.split() == ["task_id", "reason", "error", "attempts", "failed_at", "(UTC)"]
        assert first.startswith(new)
        assert second.startswith(old)
        assert "permanent  PermanentTaskError: cannot handle task" in first
        assert re.search(r"  1 +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", first)
        assert head.index("reason") == first.index("permanent")
        assert total == "(2 shown of 2)"

    def test_list_pages_with_limit_and_offset(self, redis_url, two_dead_letters):
        old, _ = two_dead_letters
        status, out = cli("--redis-url", redis_url, "dlq", "list", "--limit", "1", "--offset", "1")
        assert status == Exit.OK
        assert out.splitlines()[1].startswith(old)
        assert out.splitlines()[-1] == "(1 shown of 2)"

    def test_list_json_keeps_every_field(self, redis_url, two_dead_letters):
        status, out = cli("--redis-url", redis_url, "dlq", "list", "--json")
        assert status == Exit.OK
        records = json.loads(out)
        assert [r["task_id"] for r in records] == list(reversed(two_dead_letters))
        record = records[0]
        assert set(record) == {
            "task_id", "reason", "error_type", "error", "traceback", "attempts",
            "delivery_count", "enqueued_at", "failed_at", "worker_id", "message", "raw", "id",
            "raw_encoding",
        }  # fmt: skip
        assert record["reason"] == "permanent"
        assert record["error_type"] == "PermanentTaskError"
        assert "raise PermanentTaskError" in record["traceback"]
        assert record["message"]["messages"] == [{"role": "user", "content": "question 1"}]
        assert record["attempts"] == 1

    def test_show_prints_each_field_and_the_traceback(self, redis_url, two_dead_letters):
        task_id = two_dead_letters[0]
        status, out = cli("--redis-url", redis_url, "dlq", "show", task_id)
        assert status == Exit.OK
        fields = {line.split()[0]: line for line in out.splitlines() if line[:1].strip()}
        assert fields["task_id"].split() == ["task_id", task_id]
        assert fields["reason"].split() == ["reason", "permanent"]
        assert fields["error"].endswith(f"cannot handle task {task_id}")
        assert fields["traceback"].split() == ["traceback", "|"]
        traceback_lines = [line for line in out.splitlines() if line.lstrip().startswith("| ")]
        assert traceback_lines[0].endswith("| Traceback (most recent call last):")
        assert traceback_lines[-1].endswith(f"PermanentTaskError: cannot handle task {task_id}")
        assert json.loads(fields["message"].split(None, 1)[1])["task_id"] == task_id

    def test_a_task_kept_as_raw_bytes_is_shown_and_retried_as_such(self, redis_url, redis_client):
        redis_client.lpush(KEYS.pending, b"not json at all")
        consumer = TaskConsumer(redis_url, None, echo, 1, FAST, registry=CollectorRegistry())
        with running(consumer):
            wait_until(lambda: redis_client.hlen(KEYS.dead) == 1, what="the invalid task kept")
        [record] = json.loads(cli("--redis-url", redis_url, "dlq", "list", "--json")[1])
        assert record["reason"] == "invalid"
        assert record["message"] is None
        assert (record["raw"], record["raw_encoding"]) == ("not json at all", "utf-8")
        status, out = cli("--redis-url", redis_url, "dlq", "show", record["task_id"])
        assert status == Exit.OK
        fields = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
        assert fields["raw"] == "not json at all"
        assert fields["reason"] == "invalid"
        assert cli("--redis-url", redis_url, "dlq", "retry", record["task_id"])[0] == Exit.OK
        assert redis_client.lrange(KEYS.pending, 0, -1) == [b"not json at all"]

    def test_a_record_without_a_failure_time_shows_a_dash(self):
        record = DeadLetterRecord(task_id="t-1", reason="invalid", error_type="E", error="x")
        out = io.StringIO()
        print_dead_letters([record], 1, out)
        assert out.getvalue().splitlines()[1].split()[-1] == "-"

    def test_show_unknown_exits_4(self, redis_url, capsys):
        status, out = cli("--redis-url", redis_url, "dlq", "show", "no-such-task")
        assert status == Exit.NOT_FOUND == 4
        assert out == ""
        assert "no dead letter with task id 'no-such-task'" in error_line(capsys.readouterr().err)

    def test_retry_puts_the_task_back_on_pending(self, redis_url, redis_client, two_dead_letters):
        old, new = two_dead_letters
        status, out = cli("--redis-url", redis_url, "dlq", "retry", old)
        assert status == Exit.OK
        assert out == f"{old} put back on pending\n"
        [task] = pending(redis_client)
        assert task["task_id"] == old
        assert task["retry_count"] == 0
        [left] = redis_client.hkeys(KEYS.dead)
        assert left.decode().startswith(new + "#")

    def test_retry_unknown_exits_4(self, redis_url, capsys):
        status, _ = cli("--redis-url", redis_url, "dlq", "retry", "no-such-task")
        assert status == Exit.NOT_FOUND
        error_line(capsys.readouterr().err)

    def test_retry_into_a_full_queue_exits_6_and_keeps_the_record(
        self, redis_url, redis_client, two_dead_letters, monkeypatch, capsys
    ):
        monkeypatch.setenv("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "1")
        monkeypatch.setenv("SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD", "1")
        redis_client.lpush(KEYS.pending, b"occupying the only place")
        status, _ = cli("--redis-url", redis_url, "dlq", "retry", two_dead_letters[0])
        assert status == Exit.FULL
        assert "is full" in error_line(capsys.readouterr().err)
        assert redis_client.hlen(KEYS.dead) == 2

    def test_retry_all_puts_every_one_back(self, redis_url, redis_client, two_dead_letters):
        status, out = cli("--redis-url", redis_url, "dlq", "retry-all")
        assert status == Exit.OK
        assert out == "2 dead letter(s) put back on pending\n"
        assert [t["task_id"] for t in pending(redis_client)] == two_dead_letters
        assert redis_client.hlen(KEYS.dead) == 0

    def test_delete_with_yes(self, redis_url, redis_client, two_dead_letters, capsys):
        old, new = two_dead_letters
        status, out = cli("--redis-url", redis_url, "dlq", "delete", old, "--yes")
        assert status == Exit.OK
        assert out == f"{old} deleted\n"
        [left] = redis_client.hkeys(KEYS.dead)
        assert left.decode().startswith(new + "#")
        status, _ = cli("--redis-url", redis_url, "dlq", "delete", old, "--yes")
        assert status == Exit.NOT_FOUND
        error_line(capsys.readouterr().err)

    def test_purge_with_yes_counts_what_it_deleted(self, redis_url, redis_client, two_dead_letters):
        status, out = cli("--redis-url", redis_url, "dlq", "purge", "--yes")
        assert status == Exit.OK
        assert out == f"{len(two_dead_letters)} dead letter(s) deleted\n"
        assert redis_client.hlen(KEYS.dead) == 0
        again = cli("--redis-url", redis_url, "dlq", "purge", "--yes")
        assert again == (Exit.OK, "0 dead letter(s) deleted\n")

    def test_declined_on_a_terminal_exits_8_and_deletes_nothing(
        self, redis_url, redis_client, two_dead_letters, monkeypatch, capsys
    ):
        asked = answer(monkeypatch, "n")
        assert cli("--redis-url", redis_url, "dlq", "purge")[0] == Exit.DECLINED == 8
        assert error_line(capsys.readouterr().err) == "semibot-queue: error: cancelled"
        assert cli("--redis-url", redis_url, "dlq", "delete", two_dead_letters[0])[0] == 8
        assert error_line(capsys.readouterr().err) == "semibot-queue: error: cancelled"
        assert asked == [
            f"delete every dead letter of {QUEUE}? [y/N] ",
            f"delete dead letter {two_dead_letters[0]}? [y/N] ",
        ]
        assert redis_client.hlen(KEYS.dead) == 2

    def test_confirmed_on_a_terminal_deletes(
        self, redis_url, redis_client, two_dead_letters, monkeypatch
    ):
        asked = answer(monkeypatch, " Yes ")
        status, out = cli("--redis-url", redis_url, "dlq", "delete", two_dead_letters[1])
        assert status == Exit.OK
        assert len(asked) == 1
        assert out == f"{two_dead_letters[1]} deleted\n"
        assert redis_client.hlen(KEYS.dead) == 1

    @pytest.mark.usefixtures("two_dead_letters")
    def test_yes_on_a_terminal_asks_nothing(self, redis_url, monkeypatch):
        asked = answer(monkeypatch, "n")
        assert cli("--redis-url", redis_url, "dlq", "purge", "--yes") == (
            Exit.OK,
            "2 dead letter(s) deleted\n",
        )
        assert asked == []

    def test_queue_option_selects_the_queue(self, redis_url):
        [task_id] = dead_letter(redis_url, 1, "ops:q")
        status, out = cli("--redis-url", redis_url, "--queue", "ops:q", "dlq", "list", "--json")
        assert status == Exit.OK
        assert [r["task_id"] for r in json.loads(out)] == [task_id]
        assert json.loads(cli("--redis-url", redis_url, "dlq", "list", "--json")[1]) == []

    def test_subprocess_list_show_retry_delete_purge(self, launcher, redis_url, redis_client):
        first, second, third = dead_letter(redis_url, 3)
        env = cli_env(redis_url)
        listed = run(launcher, "dlq", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [r["task_id"] for r in json.loads(listed.stdout)] == [third, second, first]
        shown = run(launcher, "dlq", "show", first, env=env)
        assert shown.returncode == 0
        assert "| Traceback (most recent call last):" in shown.stdout
        assert run(launcher, "dlq", "show", "nope", env=env).returncode == 4
        assert (
            run(launcher, "dlq", "retry", first, env=env).stdout == f"{first} put back on pending\n"
        )
        assert run(launcher, "dlq", "retry", "nope", env=env).returncode == 4
        assert run(launcher, "dlq", "delete", second, "--yes", env=env).returncode == 0
        purged = run(launcher, "dlq", "purge", "--yes", env=env)
        assert purged.stdout == "1 dead letter(s) deleted\n"
        assert [t["task_id"] for t in pending(redis_client)] == [first]

    def test_subprocess_retry_all(self, redis_url, redis_client, two_dead_letters):
        done = run(MODULE, "--redis-url", redis_url, "dlq", "retry-all", env=cli_env())
        assert done.stdout == "2 dead letter(s) put back on pending\n"
        assert [t["task_id"] for t in pending(redis_client)] == two_dead_letters


# --- unreachable Redis ----------------------------------------------------------------


class TestUnreachableRedis:
    """An unreachable Redis is exit 3 with one clear line; ``--debug`` adds the traceback."""

    def test_stats_exits_3_with_one_line(self, capsys):
        status, out = cli("--redis-url", UNREACHABLE, "stats")
        assert status == Exit.UNREACHABLE == 3
        assert out == ""
        line = error_line(capsys.readouterr().err)
        assert UNREACHABLE in line
        assert "Connection refused" in line

    def test_debug_adds_the_traceback(self, capsys):
        status, _ = cli("--debug", "--redis-url", UNREACHABLE, "stats")
        assert status == Exit.UNREACHABLE
        err = capsys.readouterr().err
        # after the reconnect attempts' warnings (CLI_RECONNECT_ATTEMPTS, as every command)
        assert err.count(" WARNING ") == 2, err
        assert "\nTraceback (most recent call last):" in err
        assert "QueueConnectionError" in err
        assert err.splitlines()[-1].startswith("semibot-queue: error: cannot read stats from")

    @pytest.mark.parametrize(
        "argv",
        [
            ["enqueue", "--session-id", "s", "--agent-id", "a", "--org-id", "o"],
            ["dlq", "list"],
            ["dlq", "show", "t-1"],
            ["dlq", "retry-all"],
            ["dlq", "purge", "--yes"],
        ],
        ids=["enqueue", "dlq list", "dlq show", "dlq retry-all", "dlq purge"],
    )
    def test_every_command_exits_3(self, argv, monkeypatch, capsys):
        for name, value in FAST_RECONNECT.items():
            monkeypatch.setenv(name, value)
        status, out = cli("--redis-url", UNREACHABLE, *argv)
        assert status == Exit.UNREACHABLE
        assert out == ""
        assert "unreachable after 2 attempts" in error_line(capsys.readouterr().err)

    def test_a_worker_gives_up_with_exit_3(self, monkeypatch, capsys):
        for name, value in FAST_RECONNECT.items():
            monkeypatch.setenv(name, value)
        status, _ = cli("--redis-url", UNREACHABLE, "worker", "cli_handlers:echo")
        assert status == Exit.UNREACHABLE
        err = capsys.readouterr().err
        assert "worker giving up" in err
        assert "Traceback" not in err

    @pytest.mark.parametrize(
        "argv",
        [
            ["stats"],
            ["dlq", "list"],
            ["enqueue", "--session-id", "s", "--agent-id", "a", "--org-id", "o"],
        ],
        ids=["stats", "dlq list", "enqueue"],
    )
    def test_subprocess_prints_exactly_one_line(self, argv):
        done = run(MODULE, "--redis-url", UNREACHABLE, *argv, env=cli_env(**FAST_RECONNECT))
        assert done.returncode == 3
        assert done.stdout == ""
        assert "127.0.0.1:1" in error_line(done.stderr)

    @pytest.mark.parametrize("argv", [["stats"], ["dlq", "list"]], ids=["stats", "dlq list"])
    def test_the_password_in_the_url_is_never_printed(self, argv, monkeypatch, capsys):
        for name, value in FAST_RECONNECT.items():
            monkeypatch.setenv(name, value)
        status, _ = cli("--redis-url", "redis://ops:s3cret@127.0.0.1:1/0", *argv)
        assert status == Exit.UNREACHABLE
        line = error_line(capsys.readouterr().err)
        assert "s3cret" not in line
        assert "ops:***@127.0.0.1:1" in line


# --- worker ---------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a ``/metrics`` endpoint by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def serving(port: int):
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None


class TestWorker:
    """``worker MODULE:FUNCTION`` refuses a bad handler with exit 5 and serves metrics."""

    @pytest.mark.parametrize(
        ("spec", "says"),
        [
            ("no_colon", "is not of the form MODULE:FUNCTION"),
            ("cli_handlers:", "is not of the form MODULE:FUNCTION"),
            (":echo", "is not of the form MODULE:FUNCTION"),
            ("nonexistent_module_xyz:f", "cannot import 'nonexistent_module_xyz'"),
            ("cli_handlers:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
            ("cli_handlers:missing", "has no callable 'missing'"),
        ],
    )
    def test_a_bad_handler_exits_5(self, spec, says, redis_url, capsys):
        status, _ = cli("--redis-url", redis_url, "worker", spec)
        assert status == Exit.INVALID
        assert says in error_line(capsys.readouterr().err)

    def test_a_relative_module_path_exits_5(self, redis_url, capsys):
        status, _ = cli("--redis-url", redis_url, "worker", ".handlers:run")
        assert status == Exit.INVALID
        assert "'.handlers'" in error_line(capsys.readouterr().err)

    def test_a_handler_module_that_does_not_compile_exits_5(
        self, redis_url, tmp_path, monkeypatch, capsys
    ):
        (tmp_path / "broken_handlers.py").write_text("def run(message:\n")
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))
        status, _ = cli("--redis-url", redis_url, "worker", "broken_handlers:run")
        assert status == Exit.INVALID
        assert "broken_handlers" in error_line(capsys.readouterr().err)

    def test_handler_modules_are_found_in_the_current_directory(
        self, redis_url, tmp_path, monkeypatch, capsys
    ):
        (tmp_path / "beside_caller.py").write_text("NOT_A_HANDLER = 1\n")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
        importlib.invalidate_caches()
        try:
            status, _ = cli("--redis-url", redis_url, "worker", "beside_caller:NOT_A_HANDLER")
        finally:
            sys.modules.pop("beside_caller", None)
        assert status == Exit.INVALID
        # imported from the current directory, then refused: not "cannot import"
        assert "'beside_caller' has no callable 'NOT_A_HANDLER'" in error_line(
            capsys.readouterr().err
        )

    def test_an_unknown_log_level_is_a_usage_error(self, redis_url, capsys):
        status, _ = cli(
            "--redis-url", redis_url, "worker", "cli_handlers:echo", "--log-level", "LOUD"
        )  # fmt: skip
        assert status == Exit.USAGE
        assert "argument --log-level: invalid choice: 'LOUD'" in error_line(capsys.readouterr().err)

    def test_subprocess_bad_handler_exits_5(self, redis_url):
        done = run(MODULE, "worker", "nonexistent_module_xyz:f", env=cli_env(redis_url))
        assert done.returncode == 5
        assert "cannot import 'nonexistent_module_xyz'" in error_line(done.stderr)

    def test_subprocess_unreachable_redis_exits_3(self):
        done = run(
            MODULE, "--redis-url", UNREACHABLE, "worker", "cli_handlers:echo",
            env=cli_env(**FAST_RECONNECT),
        )  # fmt: skip
        assert done.returncode == 3
        assert "worker giving up" in done.stderr

    def test_subprocess_gives_back_a_running_task_and_exits_on_sigterm(
        self, redis_url, redis_client, tmp_path
    ):
        log_path = tmp_path / "worker.log"
        env = cli_env(redis_url, SEMIBOT_QUEUE_SHUTDOWN_TIMEOUT="0.2")
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [*MODULE, "worker", "cli_handlers:hang"], env=env, stdout=log, stderr=log
            )
        try:
            with TaskProducer(redis_url, None, FAST, registry=CollectorRegistry()) as producer:
                task_id = producer.enqueue(payload(0))
            wait_until(lambda: redis_client.llen(KEYS.pending) == 0, 30, "the task taken")
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log_text = log_path.read_text()
        assert status == 0, log_text
        assert f"task {task_id} still running at shutdown; given back to pending" in log_text
        [back] = redis_client.lrange(KEYS.pending, 0, -1)
        assert task_id_of(back) == task_id

    def test_subprocess_serves_metrics_and_exits_0_on_sigterm(self, launcher, redis_url, tmp_path):
        port = free_port()
        log_path = tmp_path / "worker.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [*launcher, "worker", "cli_handlers:echo", "--metrics-port", str(port),
                 "--concurrency", "2"],
                env=cli_env(redis_url),
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_until(lambda: process.poll() is None and serving(port), 30, "/metrics")
            with TaskProducer(redis_url, None, FAST, registry=CollectorRegistry()) as producer:
                ids = producer.enqueue_many([payload(n) for n in range(3)])
                results = [producer.wait_for_result(task_id, timeout=10) for task_id in ids]
            assert [r.status for r in results if r is not None] == ["succeeded"] * 3
            labels = (("queue", QUEUE),)
            samples = wait_until(
                lambda: (
                    (s := scrape(port)) and s[("semibot_queue_concurrent_tasks", labels)] == 0 and s
                ),
                what="the handlers to return",
            )
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log_text = log_path.read_text()
        assert status == 0, log_text
        succeeded = (("queue", QUEUE), ("status", "succeeded"))
        assert samples[("semibot_queue_tasks_processed_total", succeeded)] == 3
        assert samples[("semibot_queue_task_duration_seconds_count", labels)] == 3
        assert samples[("semibot_queue_retries_total", labels)] == 0
        # Producer-side counters live in the producer's process, not the worker's.
        assert samples[("semibot_queue_enqueued_total", labels)] == 0
        assert f"metrics on http://127.0.0.1:{port}/metrics" in log_text
        assert "Traceback" not in log_text


# --- demo -----------------------------------------------------------------------------


class TestDemo:
    """``demo`` runs producer and worker end to end; every task succeeds."""

    def test_on_embedded_fakeredis(self):
        status, out = cli("demo", "--tasks", "8")
        assert status == Exit.OK, out
        lines = out.splitlines()
        assert (
            lines[0]
            == "semibot-queue demo: 8 agent tasks on embedded fakeredis, queue 'agent:tasks'"
        )
        assert len(lines) == 10
        assert sum(" succeeded " in line for line in lines[1:-1]) == 8
        assert re.fullmatch(
            r"summary: 8/8 succeeded, 2 needed a retry, \d+\.\d\ds end to end", lines[-1]
        )
        retried = [line for line in lines[1:-1] if "attempts=2" in line]
        assert len(retried) == 2

    def test_against_a_real_redis(self, redis_url, redis_client):
        status, out = cli("--redis-url", redis_url, "--queue", "demo:q", "demo", "--tasks", "5")
        assert status == Exit.OK, out
        assert f"5 agent tasks on {redis_url}, queue 'demo:q'" in out.splitlines()[0]
        assert out.splitlines()[-1].startswith("summary: 5/5 succeeded")
        demo_keys = KeySpace("demo:q")
        assert redis_client.llen(demo_keys.pending) == 0
        assert redis_client.hlen(demo_keys.dead) == 0
        assert redis_client.zcard(demo_keys.workers) == 0

    def test_subprocess(self, launcher):
        done = run(launcher, "demo", "--tasks", "6", env=cli_env())
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].startswith("summary: 6/6 succeeded, 2 needed a retry")

    def test_subprocess_against_a_real_redis(self, redis_url):
        done = run(MODULE, "--redis-url", redis_url, "demo", "--tasks", "4", env=cli_env())
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1].startswith("summary: 4/4 succeeded")


# --- usage errors (issue 9) -----------------------------------------------------------

#: ``--redis-url`` of an unreachable Redis, given after the command: a value that slipped
#: through unchecked would end in exit 3 (or 0), never in the usage error these expect.
U = ("--redis-url", UNREACHABLE)
#: A payload made of flags, for ``enqueue``.
TASK = ("--session-id", "s", "--agent-id", "a", "--org-id", "o")
#: A task id longer than any key may hold.
LONG_ID = "t" * 201

#: Every option (and positional) of every command with values that make no sense:
#: ``(argv, the option the error line must name)``.
BAD_VALUES = [
    # worker
    (["worker", "cli_handlers:echo", "--concurrency", "0", *U], "--concurrency"),
    (["worker", "cli_handlers:echo", "--concurrency", "-3", *U], "--concurrency"),
    (["worker", "cli_handlers:echo", "--concurrency", "2.5", *U], "--concurrency"),
    (["worker", "cli_handlers:echo", "--concurrency", "many", *U], "--concurrency"),
    (["worker", "cli_handlers:echo", "--processes", "0", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--processes", "100000", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--processes", "-2", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--processes", "1.5", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--processes", "two", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--processes", "", *U], "--processes"),
    (["worker", "cli_handlers:echo", "--metrics-port", "0", *U], "--metrics-port"),
    (["worker", "cli_handlers:echo", "--metrics-port", "-1", *U], "--metrics-port"),
    (["worker", "cli_handlers:echo", "--metrics-port", "65536", *U], "--metrics-port"),
    (["worker", "cli_handlers:echo", "--metrics-port", "http", *U], "--metrics-port"),
    (["worker", "cli_handlers:echo", "--metrics-host", "", *U], "--metrics-host"),
    (["worker", "cli_handlers:echo", "--metrics-host", "a host", *U], "--metrics-host"),
    # enqueue
    (["enqueue", *TASK, "--delay", "-1", *U], "--delay"),
    (["enqueue", *TASK, "--delay", "nan", *U], "--delay"),
    (["enqueue", *TASK, "--delay", "inf", *U], "--delay"),
    (["enqueue", *TASK, "--delay", "1e999", *U], "--delay"),
    (["enqueue", *TASK, "--delay", "soon", *U], "--delay"),
    (["enqueue", *TASK, "--wait", "-5", *U], "--wait"),
    (["enqueue", *TASK, "--wait=-inf", *U], "--wait"),
    (["enqueue", *TASK, "--wait", "nan", *U], "--wait"),
    (["enqueue", *TASK, "--wait", "inf", *U], "--wait"),
    (["enqueue", *TASK, "--wait", "later", *U], "--wait"),
    # status and cancel
    (["status", "a b", *U], "ID"),
    (["status", "", *U], "ID"),
    (["status", LONG_ID, *U], "ID"),
    (["cancel", "{agent:tasks}", *U], "ID"),
    (["cancel", "", *U], "ID"),
    # stats
    (["stats", "--watch", "-1", *U], "--watch"),
    (["stats", "--watch", "0", *U], "--watch"),
    (["stats", "--watch", "nan", *U], "--watch"),
    (["stats", "--watch", "inf", *U], "--watch"),
    (["stats", "--watch", "1e10", *U], "--watch"),  # time.sleep overflowed (a review)
    (["enqueue", *TASK, "--wait", "1e10", *U], "--wait"),
    (["enqueue", *TASK, "--delay", "1e300", *U], "--delay"),
    (["stats", "--watch", "often", *U], "--watch"),
    # dlq
    (["dlq", "list", "--limit", "-1", *U], "--limit"),
    (["dlq", "list", "--limit", "inf", *U], "--limit"),
    (["dlq", "list", "--limit", "nan", *U], "--limit"),
    (["dlq", "list", "--limit", "1.5", *U], "--limit"),
    (["dlq", "list", "--offset", "-1", *U], "--offset"),
    (["dlq", "list", "--offset", "first", *U], "--offset"),
    # a number Redis would refuse as out of range (found by a black-box review: exit 1)
    (["dlq", "list", "--limit", "99999999999999999999", *U], "--limit"),
    (["dlq", "list", "--offset", "99999999999999999999", *U], "--offset"),
    (["dlq", "show", "", *U], "ID"),
    (["dlq", "retry", " ", *U], "ID"),
    (["dlq", "delete", "", "--yes", *U], "ID"),
    # demo (an unchecked count would run on the unreachable Redis: exit 3)
    (["demo", "--tasks", "-1", *U], "--tasks"),
    (["demo", "--tasks", "0", *U], "--tasks"),
    (["demo", "--tasks", "10001", *U], "--tasks"),
    (["demo", "--tasks", "lots", *U], "--tasks"),
    # global options, before and after the command
    (["--queue", "bad name", "stats", *U], "--queue"),
    (["stats", "--queue", "bad name", *U], "--queue"),
    (["dlq", "list", "--queue", "", *U], "--queue"),
    (["--queue", "{other}", "enqueue", *TASK, *U], "--queue"),
    (["--redis-url", "", "stats"], "--redis-url"),
    (["stats", "--redis-url", "localhost:6379"], "--redis-url"),
    (["stats", "--redis-url", "http://127.0.0.1:1/0"], "--redis-url"),
    (["dlq", "list", "--redis-url", "redis://127.0.0.1:port/0"], "--redis-url"),
    (["stats", "--redis-url", "redis://127.0.0.1:1/0?socket_timeout=soon"], "--redis-url"),
    (["status", "x", "--redis-url", "redis://127.0.0.1:1/0?bogus=1"], "--redis-url"),
    (["stats", "--redis-url", "redis://127.0.0.1:1/0?socket_timeout=-1"], "--redis-url"),
    (["stats", "--redis-url", "redis://127.0.0.1:1/notadb"], "--redis-url"),  # was db 0
    (["stats", "--redis-url", "redis+cluster://127.0.0.1"], "--redis-url"),
    (["stats", "--redis-url", "redis+sentinel://127.0.0.1:1"], "--redis-url"),
    (["--log-level", "LOUD", "stats", *U], "--log-level"),
    (["stats", "--log-level", "LOUD", *U], "--log-level"),
    (["worker", "cli_handlers:echo", "--log-format", "xml", *U], "--log-format"),
    (["status", "t-1", "--log-format", "yaml", *U], "--log-format"),
]


def usage_id(case: tuple[list[str], str]) -> str:
    argv, _ = case
    shown = [a if a else "''" for a in argv if a not in U]
    return " ".join(shown)[:60]


@pytest.fixture
def fast_reconnect(monkeypatch) -> None:
    """Give up on an unreachable Redis in milliseconds."""
    for name, value in FAST_RECONNECT.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("fast_reconnect")
class TestUsageErrors:
    """A nonsense value of any option is exit 2 with one line that names the option."""

    # Was a bug (issue 9): `--concurrency 0` ran 10 slots; `--limit -1`, `--watch -1`,
    # `--wait -5` and `demo --tasks -1` were not usage errors.
    @pytest.mark.parametrize(("argv", "option"), BAD_VALUES, ids=map(usage_id, BAD_VALUES))
    def test_a_nonsense_value_exits_2_naming_the_option(self, argv, option, capsys):
        status, out = cli(*argv)
        assert (status, out) == (Exit.USAGE, "")
        line = error_line(capsys.readouterr().err)
        assert f"error: argument {option}: " in line

    @pytest.mark.parametrize(
        ("argv", "says"),
        [
            ([], "the following arguments are required: COMMAND"),
            (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
            (["dlq", *U], "the following arguments are required: ACTION"),
            (["status", *U], "the following arguments are required: ID"),
            (["worker", *U], "the following arguments are required: MODULE:FUNCTION"),
            (["stats", "--frobnicate", *U], "unrecognized arguments: --frobnicate"),
            ([*U, "stats", "--watch"], "argument --watch: expected one argument"),
            (["enqueue", "--json", "-", "--session-id", "s", *U], "not allowed with argument"),
        ],
        ids=["nothing", "unknown command", "dlq", "status", "worker", "unknown option",
             "watch without value", "json and flags"],
    )  # fmt: skip
    def test_a_missing_or_unknown_argument_exits_2_naming_it(self, argv, says, capsys):
        status, out = cli(*argv)
        assert (status, out) == (Exit.USAGE, "")
        assert says in error_line(capsys.readouterr().err)

    def test_the_line_points_to_the_commands_help(self, capsys):
        assert cli("dlq", "list", "--limit", "-1")[0] == Exit.USAGE
        assert error_line(capsys.readouterr().err) == (
            "semibot-queue: error: argument --limit: must be a whole number from 0 to"
            " 4611686018427387904, got '-1' (see 'semibot-queue dlq list --help')"
        )

    def test_a_password_in_a_refused_url_is_masked(self, capsys):
        assert cli("stats", "--redis-url", "redis://ops:s3cret@host:port/0")[0] == Exit.USAGE
        line = error_line(capsys.readouterr().err)
        assert "s3cret" not in line
        assert "ops:***@host:port" in line

    def test_a_url_without_a_scheme_is_not_echoed(self, capsys):
        assert cli("stats", "--redis-url", "ops:s3cret@localhost:6379")[0] == Exit.USAGE
        line = error_line(capsys.readouterr().err)
        assert "argument --redis-url: must be a URL such as redis://" in line
        assert "s3cret" not in line

    def test_a_bad_redis_url_in_the_environment_exits_2_naming_it(self, monkeypatch, capsys):
        monkeypatch.setenv("REDIS_URL", "localhost:6379")
        assert cli("stats") == (Exit.USAGE, "")
        assert "environment variable REDIS_URL: must be a URL" in error_line(
            capsys.readouterr().err
        )

    def test_a_metrics_port_in_use_exits_2_naming_it(self, capsys):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            status, _ = cli("worker", "cli_handlers:echo", "--metrics-port", str(port), *U)
        assert status == Exit.USAGE
        line = error_line(capsys.readouterr().err)
        assert f"argument --metrics-port: cannot serve metrics on 127.0.0.1:{port}" in line

    def test_a_metrics_host_not_on_this_machine_exits_2_naming_it(self, capsys):
        # 192.0.2.0/24 is TEST-NET-1: never a local address, refused without a DNS lookup.
        argv = ["--metrics-host", "192.0.2.1", "--metrics-port", str(free_port())]
        status, _ = cli("worker", "cli_handlers:echo", *argv, *U)
        assert status == Exit.USAGE
        assert "argument --metrics-host: cannot serve metrics on 192.0.2.1" in error_line(
            capsys.readouterr().err
        )

    def test_a_metrics_host_that_cannot_be_resolved_exits_2_naming_it(self, capsys):
        host = "a" * 64 + ".example"  # a label too long: refused before any DNS lookup
        argv = ["--metrics-host", host, "--metrics-port", str(free_port())]
        status, _ = cli("worker", "cli_handlers:echo", *argv, *U)
        assert status == Exit.USAGE
        assert f"argument --metrics-host: cannot resolve '{host}'" in error_line(
            capsys.readouterr().err
        )

    def test_nothing_is_written_by_a_refused_command(self, redis_url, redis_client):
        for argv in (
            ["enqueue", *TASK, "--delay", "-1"],
            ["enqueue", *TASK, "--wait", "-5"],
            ["dlq", "purge", "--yes", "--queue", "bad name"],
        ):
            assert cli(*argv, "--redis-url", redis_url)[0] == Exit.USAGE
        assert redis_client.dbsize() == 0

    @pytest.mark.parametrize(
        ("argv", "option"),
        [
            (["worker", "cli_handlers:echo", "--concurrency", "0"], "--concurrency"),
            (["worker", "cli_handlers:echo", "--processes", "0"], "--processes"),
            (["stats", "--watch", "-1"], "--watch"),
            (["dlq", "list", "--limit", "-1"], "--limit"),
            (["enqueue", *TASK, "--wait", "-5"], "--wait"),
            (["demo", "--tasks", "-1"], "--tasks"),
        ],
        ids=["concurrency", "processes", "watch", "limit", "wait", "tasks"],
    )
    def test_subprocess_exits_2_with_one_line(self, launcher, argv, option):
        done = run(launcher, *argv, *U, env=cli_env(**FAST_RECONNECT))
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert f"argument {option}: " in error_line(done.stderr)


# --- global options anywhere (issue 9) -------------------------------------------------


class TestGlobalOptionsAnywhere:
    """``--redis-url``, ``--queue``, ``--debug``, ``--log-*`` before or after the command."""

    def test_stats_with_the_redis_url_after_the_command(self, redis_url, monkeypatch):
        monkeypatch.delenv("REDIS_URL", raising=False)
        status, out = cli("stats", "--json", "--redis-url", redis_url, "--queue", "ops:q")
        assert status == Exit.OK
        assert json.loads(out)["queue"] == "ops:q"

    # Was a bug (issue 9): `semibot-queue stats --redis-url U` exited 2.
    def test_subprocess_stats_redis_url_after_the_command(self, launcher, redis_url):
        done = run(launcher, "stats", "--redis-url", redis_url, "--json", env=cli_env())
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["pending"] == 0

    def test_enqueue_with_queue_and_url_after_the_command(self, redis_url, redis_client):
        status, out = cli("enqueue", *TASK, "--queue", "ops:q", "--redis-url", redis_url)
        assert status == Exit.OK
        assert [t["task_id"] for t in pending(redis_client, KeySpace("ops:q"))] == [out.strip()]
        assert pending(redis_client) == []

    def test_dlq_takes_them_between_dlq_and_its_action_and_after_it(self, redis_url):
        [task_id] = dead_letter(redis_url, 1, "ops:q")
        for argv in (
            ["dlq", "--queue", "ops:q", "--redis-url", redis_url, "list", "--json"],
            ["dlq", "list", "--json", "--queue", "ops:q", "--redis-url", redis_url],
        ):
            status, out = cli(*argv)
            assert status == Exit.OK
            assert [r["task_id"] for r in json.loads(out)] == [task_id]

    def test_given_before_and_after_the_later_one_wins(self, redis_url):
        status, out = cli(
            "--queue", "first:q", "--redis-url", UNREACHABLE,
            "stats", "--json", "--queue", "second:q", "--redis-url", redis_url,
        )  # fmt: skip
        assert status == Exit.OK
        assert json.loads(out)["queue"] == "second:q"

    def test_given_only_before_it_is_kept(self, redis_url):
        status, out = cli("--queue", "first:q", "--redis-url", redis_url, "stats", "--json")
        assert status == Exit.OK
        assert json.loads(out)["queue"] == "first:q"

    def test_debug_after_the_command_adds_the_traceback(self, capsys):
        status, _ = cli("stats", "--redis-url", UNREACHABLE, "--debug")
        assert status == Exit.UNREACHABLE
        err = capsys.readouterr().err
        assert "\nTraceback (most recent call last):" in err  # after the retries' warnings
        assert err.splitlines()[-1].startswith("semibot-queue: error: cannot read stats from")

    def test_log_options_after_a_one_shot_command_show_the_librarys_logs(self, redis_url, capsys):
        task_id = cli("enqueue", *TASK, "--redis-url", redis_url)[1].strip()
        status, out = cli(
            "cancel", task_id, "--redis-url", redis_url, "--log-level", "info",
            "--log-format", "json",
        )  # fmt: skip
        assert status == Exit.OK
        assert out == f"{task_id} cancelled\n"
        [entry] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        assert entry["level"] == "INFO"
        assert entry["task_id"] == task_id
        assert "cancelled before it ran" in entry["message"]

    def test_without_log_options_a_one_shot_command_logs_nothing(self, redis_url, capsys):
        task_id = cli("enqueue", *TASK, "--redis-url", redis_url)[1].strip()
        assert cli("cancel", task_id, "--redis-url", redis_url)[0] == Exit.OK
        assert capsys.readouterr().err == ""

    def test_subprocess_worker_takes_log_options_before_the_command(self):
        done = run(
            MODULE, "--log-format", "json", "--log-level", "debug", "--redis-url", UNREACHABLE,
            "worker", "cli_handlers:echo", env=cli_env(**FAST_RECONNECT),
        )  # fmt: skip
        assert done.returncode == 3
        entries = [json.loads(line) for line in done.stderr.splitlines()]
        assert any("worker giving up" in e["message"] for e in entries)

    @pytest.mark.parametrize("argv", [["stats"], ["dlq", "list"], ["cancel"]])
    def test_help_of_a_command_lists_the_global_options(self, argv, capsys):
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "global options (before or after the command):" in text
        for option in ("--redis-url URL", "--queue NAME", "--debug", "--log-level LEVEL"):
            assert option in text


# --- status and cancel (issue 9) -----------------------------------------------------


class Gate:
    """A handler that holds its task until released or cancelled; what it saw."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.saw_cancel = threading.Event()

    def __call__(self, message) -> str:
        self.started.set()
        deadline = time.monotonic() + 30
        while not self.release.is_set() and time.monotonic() < deadline:
            if message.cancel_requested():
                self.saw_cancel.set()
                return "stopped"
            time.sleep(0.01)
        return "done"


def status_of(url: str, task_id: str) -> str:
    """What ``semibot-queue status`` prints for ``task_id``."""
    return cli("--redis-url", url, "status", task_id)[1].strip()


class TestStatus:
    """``status ID`` prints the status word; ``unknown`` with exit 4."""

    def test_enqueue_with_delay_is_scheduled(self, redis_url, redis_client):
        status, out = cli("--redis-url", redis_url, "enqueue", *TASK, "--delay", "3600")
        assert status == Exit.OK
        task_id = out.strip()
        assert cli("--redis-url", redis_url, "status", task_id) == (Exit.OK, "scheduled\n")
        assert pending(redis_client) == []
        assert redis_client.zcard(KEYS.scheduled) == 1

    def test_a_delayed_task_runs_once_due_and_wait_counts_from_the_enqueue(self, redis_url):
        consumer = TaskConsumer(redis_url, None, echo, 1, FAST, registry=CollectorRegistry())
        with running(consumer):
            started = time.monotonic()
            status, out = cli(
                "--redis-url", redis_url, "enqueue", *TASK, "--message", "user:later",
                "--delay", "0.5", "--wait", "10",
            )  # fmt: skip
            elapsed = time.monotonic() - started
        assert status == Exit.OK
        task_id, line = out.splitlines()
        assert json.loads(line)["result"] == {"agent": "a", "echo": "later"}
        assert elapsed >= 0.5
        assert status_of(redis_url, task_id) == "succeeded"

    def test_delay_0_is_pending_at_once(self, redis_url, redis_client):
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK, "--delay", "0")[1].strip()
        assert [t["task_id"] for t in pending(redis_client)] == [task_id]
        assert status_of(redis_url, task_id) == "pending"

    def test_through_pending_running_and_succeeded(self, redis_url):
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK)[1].strip()
        assert cli("--redis-url", redis_url, "status", task_id) == (Exit.OK, "pending\n")
        gate = Gate()
        consumer = TaskConsumer(redis_url, None, gate, 1, FAST, registry=CollectorRegistry())
        with running(consumer):
            assert gate.started.wait(10)
            assert cli("--redis-url", redis_url, "status", task_id) == (Exit.OK, "running\n")
            gate.release.set()
            wait_until(lambda: status_of(redis_url, task_id) == "succeeded", what="succeeded")
        assert cli("status", task_id, "--redis-url", redis_url) == (Exit.OK, "succeeded\n")

    def test_a_dead_lettered_task_is_dead(self, redis_url):
        [task_id] = dead_letter(redis_url, 1)
        assert cli("--redis-url", redis_url, "status", task_id) == (Exit.OK, "dead\n")

    def test_an_unknown_task_prints_unknown_and_exits_4(self, redis_url, capsys):
        status, out = cli("--redis-url", redis_url, "status", "no-such-task")
        assert (status, out) == (Exit.NOT_FOUND, "unknown\n")
        assert capsys.readouterr().err == ""

    def test_subprocess_status_and_its_exit_statuses(self, launcher, redis_url):
        env = cli_env(redis_url)
        enqueued = run(launcher, "enqueue", *TASK, "--delay", "3600", env=env)
        task_id = enqueued.stdout.strip()
        done = run(launcher, "status", task_id, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (0, "scheduled\n", "")
        done = run(launcher, "status", "no-such-task", env=env)
        assert (done.returncode, done.stdout, done.stderr) == (4, "unknown\n", "")

    @pytest.mark.usefixtures("fast_reconnect")
    def test_unreachable_redis_exits_3(self, capsys):
        assert cli("--redis-url", UNREACHABLE, "status", "t-1") == (Exit.UNREACHABLE, "")
        assert "unreachable after 2 attempts" in error_line(capsys.readouterr().err)


class TestCancel:
    """``cancel ID`` says what became of the task; exit 4 when it was not live."""

    def test_a_pending_task_is_cancelled_and_never_runs(self, redis_url):
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK)[1].strip()
        assert cli("--redis-url", redis_url, "cancel", task_id) == (
            Exit.OK,
            f"{task_id} cancelled\n",
        )
        assert status_of(redis_url, task_id) == "cancelled"
        ran: list[str] = []
        consumer = TaskConsumer(
            redis_url, None, lambda m: ran.append(m.task_id), 1, FAST, registry=CollectorRegistry()
        )
        producer = TaskProducer(redis_url, None, FAST, registry=CollectorRegistry())
        # The worker takes the cancelled body and drops it; the next task does run.
        with running(consumer), producer:
            after = producer.enqueue(payload(1))
            assert producer.wait_for_result(after, timeout=10) is not None
        assert ran == [after]
        assert status_of(redis_url, task_id) == "cancelled"

    def test_a_scheduled_task_is_cancelled(self, redis_url):
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK, "--delay", "3600")[1].strip()
        assert cli("cancel", task_id, "--redis-url", redis_url) == (
            Exit.OK,
            f"{task_id} cancelled\n",
        )
        assert status_of(redis_url, task_id) == "cancelled"

    def test_the_waiter_of_a_cancelled_task_gets_the_cancelled_result(self, redis_url):
        with TaskProducer(redis_url, None, FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            assert cli("--redis-url", redis_url, "cancel", task_id)[0] == Exit.OK
            result = producer.wait_for_result(task_id, timeout=5)
        assert result is not None
        assert result.status == "cancelled"

    def test_a_running_task_is_asked_to_stop_and_ends_cancelled(self, redis_url):
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK)[1].strip()
        gate = Gate()
        consumer = TaskConsumer(redis_url, None, gate, 1, FAST, registry=CollectorRegistry())
        with running(consumer):
            assert gate.started.wait(10)
            status, out = cli("--redis-url", redis_url, "cancel", task_id)
            assert status == Exit.OK
            assert out in (
                f"{task_id} asked to stop: it ends cancelled when its handler returns\n",
                f"{task_id} cancelled\n",  # the handler saw it before status was read
            )
            assert gate.saw_cancel.wait(10)
            wait_until(lambda: status_of(redis_url, task_id) == "cancelled", what="cancelled")

    def test_an_unknown_task_is_not_cancelled_and_exits_4(self, redis_url, capsys):
        assert cli("--redis-url", redis_url, "cancel", "no-such-task") == (
            Exit.NOT_FOUND,
            "no-such-task not cancelled: unknown\n",
        )
        assert capsys.readouterr().err == ""

    def test_a_finished_or_cancelled_task_is_not_cancelled_again(self, redis_url):
        [dead] = dead_letter(redis_url, 1)
        assert cli("--redis-url", redis_url, "cancel", dead) == (
            Exit.NOT_FOUND,
            f"{dead} not cancelled: dead\n",
        )
        task_id = cli("--redis-url", redis_url, "enqueue", *TASK)[1].strip()
        assert cli("--redis-url", redis_url, "cancel", task_id)[0] == Exit.OK
        assert cli("--redis-url", redis_url, "cancel", task_id) == (
            Exit.NOT_FOUND,
            f"{task_id} not cancelled: cancelled\n",
        )

    def test_subprocess_cancel(self, launcher, redis_url):
        env = cli_env(redis_url)
        task_id = run(launcher, "enqueue", *TASK, env=env).stdout.strip()
        done = run(launcher, "cancel", task_id, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{task_id} cancelled\n", "")
        done = run(launcher, "cancel", task_id, env=env)
        assert done.returncode == 4
        assert done.stdout == f"{task_id} not cancelled: cancelled\n"


# --- dlq retry-all into a full queue (issue 9) -------------------------------------------


@pytest.fixture
def queue_of_one(monkeypatch) -> None:
    """The command line's queue holds one pending task at most."""
    monkeypatch.setenv("SEMIBOT_QUEUE_MAX_QUEUE_LENGTH", "1")
    monkeypatch.setenv("SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD", "1")


@pytest.mark.usefixtures("queue_of_one")
class TestRetryAllIntoAFullQueue:
    """``dlq retry-all`` moves what fits, prints the count and exits 6 when it stopped."""

    def test_it_moves_what_fits_prints_the_count_and_exits_6(
        self, redis_url, redis_client, two_dead_letters, capsys
    ):
        old, new = two_dead_letters
        status, out = cli("--redis-url", redis_url, "dlq", "retry-all")
        assert status == Exit.FULL == 6
        assert out == "1 dead letter(s) put back on pending\n"
        line = error_line(capsys.readouterr().err)
        assert "queue agent:tasks is full (MAX_QUEUE_LENGTH=1)" in line
        assert line.endswith("stopped with 1 dead letter(s) left")
        assert [t["task_id"] for t in pending(redis_client)] == [old]
        [left] = redis_client.hkeys(KEYS.dead)
        assert left.decode().startswith(new + "#")

    def test_a_queue_already_full_moves_none_and_exits_6(
        self, redis_url, redis_client, two_dead_letters, capsys
    ):
        redis_client.lpush(KEYS.pending, b"occupying the only place")
        status, out = cli("--redis-url", redis_url, "dlq", "retry-all")
        assert (status, out) == (Exit.FULL, "0 dead letter(s) put back on pending\n")
        assert error_line(capsys.readouterr().err).endswith("stopped with 2 dead letter(s) left")
        assert redis_client.hlen(KEYS.dead) == len(two_dead_letters)

    def test_subprocess_exits_6_printing_the_count(self, redis_url, two_dead_letters):
        env = cli_env(
            redis_url,
            SEMIBOT_QUEUE_MAX_QUEUE_LENGTH="1",
            SEMIBOT_QUEUE_QUEUE_LENGTH_WARNING_THRESHOLD="1",
        )
        done = run(MODULE, "dlq", "retry-all", env=env)
        assert done.returncode == 6
        assert done.stdout == "1 dead letter(s) put back on pending\n"
        assert "stopped with 1 dead letter(s) left" in error_line(done.stderr)
        again = run(MODULE, "dlq", "retry-all", env=env)
        assert (again.returncode, again.stdout) == (6, "0 dead letter(s) put back on pending\n")
        assert len(two_dead_letters) == 2
