"""The boundary logs of DESIGN §5, and the text and JSON formats of the command line.

WARNING when a worker's slots are all busy (rate-limited), when the pending length crosses
QUEUE_LENGTH_WARNING_THRESHOLD, on each retry and on each reconnect attempt; ERROR when a
push is refused, when a task is dead-lettered and when a dead worker's tasks are recovered.
Each names the queue and the task id as ``extra`` fields.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import semibot_queue
from cli_handlers import echo, reject
from redis_server import RedisServer, free_port
from semibot_queue import (
    PermanentTaskError,
    QueueConnectionError,
    QueueFullError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue.codec import Codec
from semibot_queue.keys import KeySpace
from semibot_queue.logs import JsonFormatter, configure
from semibot_queue.metrics import Metrics
from semibot_queue.scripts import Scripts
from semibot_queue.watcher import Watcher
from support import FAST, payload, running, wait_until

QUEUE = "logs:q"
KEYS = KeySpace(QUEUE)


@pytest.fixture(autouse=True)
def _package_logs(caplog):
    """Capture the package's WARNING and ERROR records; leave its logger as it was."""
    logger = logging.getLogger("semibot_queue")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    caplog.set_level(logging.WARNING, logger="semibot_queue")
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def logged(caplog, level: int, pattern: str) -> list[logging.LogRecord]:
    """The records of ``level`` under ``semibot_queue`` whose message matches ``pattern``."""
    return [
        r
        for r in caplog.records
        if r.levelno == level
        and r.name.startswith("semibot_queue")
        and re.search(pattern, r.getMessage())
    ]


def assert_names(record: logging.LogRecord, task_id: str, queue: str = QUEUE) -> None:
    """The record carries the queue and the task id as extras, and says them in its text."""
    assert record.queue == queue
    assert record.task_id == task_id
    assert queue in record.getMessage()
    assert task_id in record.getMessage()


def refused_connection_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# --- WARNING ----------------------------------------------------------------------------


class TestWarnings:
    """Busy slots (rate-limited), a long queue, each retry, each reconnect attempt."""

    def busy_worker(self, redis_url, interval: float, calls_wanted: int):
        """A one-slot worker held busy while its loop checks for a free slot ``calls_wanted``
        times; the number of busy warnings it logged meanwhile comes from caplog."""
        release = threading.Event()

        def hold(message: TaskMessage) -> str:
            release.wait(10)
            return message.task_id

        settings = QueueSettings(
            busy_warning_interval=interval,
            stop_poll_slice=0.02,
            heartbeat_interval=0.1,
            worker_dead_after=0.5,
        )
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(n) for n in range(2)])
        consumer = TaskConsumer(redis_url, QUEUE, hold, 1, settings, registry=CollectorRegistry())
        checks = itertools.count(1)
        enough = threading.Event()
        wait_for_slot = consumer._wait_for_slot  # the loop's wait while every slot is held

        def counting_wait_for_slot() -> None:
            wait_for_slot()
            if next(checks) >= calls_wanted:
                enough.set()

        consumer._wait_for_slot = counting_wait_for_slot
        with running(consumer):
            assert enough.wait(10), "the worker never found its slots all busy"
            release.set()
        return consumer

    def test_all_slots_busy_warns_once_per_interval(self, redis_url, caplog):
        consumer = self.busy_worker(redis_url, interval=60.0, calls_wanted=10)
        [record] = logged(caplog, logging.WARNING, "slots busy")
        assert record.getMessage() == (
            f"queue {QUEUE}: worker {consumer.worker_id} has all 1 slots busy;"
            " not taking more tasks"
        )
        assert record.queue == QUEUE
        assert record.worker_id == consumer.worker_id

    def test_without_an_interval_every_busy_check_warns(self, redis_url, caplog):
        self.busy_worker(redis_url, interval=0.0, calls_wanted=5)
        assert len(logged(caplog, logging.WARNING, "slots busy")) >= 5

    # Was a package bug (issue 9): every push above the threshold warned again.
    def test_a_queue_crossing_the_threshold_warns_once_not_on_each_push(self, redis_url, caplog):
        settings = QueueSettings(max_queue_length=10, queue_length_warning_threshold=3)
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(0), payload(1)])
            assert logged(caplog, logging.WARNING, "pending tasks") == []
            third = producer.enqueue(payload(2))
            producer.enqueue_many([payload(3), payload(4)])
            producer.enqueue(payload(5))
        [warning] = logged(caplog, logging.WARNING, "pending tasks")
        assert warning.getMessage() == (
            f"queue {QUEUE} has 3 pending tasks: crossed the warning threshold 3; last task {third}"
        )
        assert_names(warning, third)

    def test_each_retry_says_attempt_n_of_max_and_the_delay(self, redis_url, caplog):
        def fail_twice(message: TaskMessage) -> str:
            if message.retry_count < 2:
                raise RuntimeError(f"attempt {message.retry_count + 1} failed")
            return "third time lucky"

        settings = QueueSettings(
            retry_base_delay=0.02,
            retry_max_delay=1.0,
            retry_jitter=0.0,
            heartbeat_interval=0.1,
            worker_dead_after=0.5,
            stop_poll_slice=0.05,
        )
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            consumer = TaskConsumer(
                redis_url, QUEUE, fail_twice, 1, settings, registry=CollectorRegistry()
            )
            with running(consumer):
                result = producer.wait_for_result(task_id, timeout=10)
        assert result is not None
        assert result.status == "succeeded"
        first, second = logged(caplog, logging.WARNING, "retry")
        assert first.getMessage() == (
            f"queue {QUEUE}: task {task_id} failed (RuntimeError: attempt 1 failed);"
            " retry 1/3 in 0.02s"
        )
        assert second.getMessage().endswith("(RuntimeError: attempt 2 failed); retry 2/3 in 0.04s")
        for record in (first, second):
            assert_names(record, task_id)
            assert record.worker_id == consumer.worker_id

    def test_each_reconnect_attempt_warns(self, caplog):
        settings = QueueSettings(
            max_reconnect_attempts=3, error_retry_delay=0.01, max_reconnect_delay=0.02
        )
        url = refused_connection_url()
        producer = TaskProducer(url, QUEUE, settings, registry=CollectorRegistry())
        with pytest.raises(QueueConnectionError):
            producer.connect()
        attempts = logged(caplog, logging.WARNING, "reconnect attempt")
        assert [re.search(r"attempt (\d/\d)", r.getMessage())[1] for r in attempts] == [
            "1/3",
            "2/3",
        ]
        for record in attempts:
            assert record.queue == QUEUE
            assert url in record.getMessage()

    def test_a_reconnect_attempt_while_enqueueing_names_the_task(self, tmp_path, caplog):
        settings = QueueSettings(
            max_reconnect_attempts=2, error_retry_delay=0.01, max_reconnect_delay=0.02
        )
        server = RedisServer(tmp_path / "redis")
        server.start()
        try:
            producer = TaskProducer(server.url, QUEUE, settings, registry=CollectorRegistry())
            producer.connect()
        finally:
            server.stop()
        task = payload(0)
        with pytest.raises(QueueConnectionError):
            producer.enqueue(task)
        producer.disconnect()
        [record] = logged(caplog, logging.WARNING, "reconnect attempt")
        assert_names(record, task.task_id)


# --- ERROR --------------------------------------------------------------------------------


def dead_worker_holding(redis_url, redis_client, count: int, worker: str = "dead-1") -> list[str]:
    """Register ``worker`` as silent for a minute, holding ``count`` tasks in flight."""
    with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
        ids = producer.enqueue_many([payload(n) for n in range(count)])
    for _ in ids:
        redis_client.lmove(KEYS.pending, KEYS.inflight(worker), "RIGHT", "LEFT")
    seconds, _ = redis_client.time()
    redis_client.zadd(KEYS.workers, {worker: (seconds - 60) * 1000})
    return ids


class TestErrors:
    """A refused push, a dead-lettered task, a recovered task."""

    def test_a_refused_push_is_an_error(self, redis_url, caplog):
        settings = QueueSettings(max_queue_length=2, queue_length_warning_threshold=2)
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(0), payload(1)])
            refused = payload(2)
            with pytest.raises(QueueFullError):
                producer.enqueue(refused)
        [record] = logged(caplog, logging.ERROR, "full")
        assert record.getMessage() == (
            f"queue {QUEUE} full (limit 2): refused 1 task(s), first {refused.task_id}"
        )
        assert_names(record, refused.task_id)

    def test_a_permanent_failure_is_dead_lettered_with_an_error(self, redis_url, caplog):
        with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            consumer = TaskConsumer(redis_url, QUEUE, reject, 1, FAST, registry=CollectorRegistry())
            with running(consumer):
                assert producer.wait_for_result(task_id, timeout=10) is not None
                [record] = wait_until(lambda: logged(caplog, logging.ERROR, "dead-lettered"))
        assert record.getMessage() == (
            f"queue {QUEUE}: task {task_id} dead-lettered (permanent after 1 attempt(s)):"
            f" PermanentTaskError: cannot handle task {task_id}; record {task_id}#1"
        )
        assert_names(record, task_id)
        assert record.worker_id == consumer.worker_id

    def test_retries_exhausted_are_dead_lettered_with_an_error(self, redis_url, caplog):
        def always_fail(message: TaskMessage) -> None:
            raise ValueError(f"bad answer for {message.task_id}")

        settings = QueueSettings(
            max_retry_attempts=1,
            retry_base_delay=0.01,
            retry_max_delay=0.02,
            heartbeat_interval=0.1,
            worker_dead_after=0.5,
            stop_poll_slice=0.05,
        )
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            task_id = producer.enqueue(payload(0))
            consumer = TaskConsumer(
                redis_url, QUEUE, always_fail, 1, settings, registry=CollectorRegistry()
            )
            with running(consumer):
                result = producer.wait_for_result(task_id, timeout=10)
                [record] = wait_until(lambda: logged(caplog, logging.ERROR, "dead-lettered"))
        assert result is not None
        assert result.status == "failed"
        assert "(exhausted after 2 attempt(s)): ValueError: bad answer for" in record.getMessage()
        assert_names(record, task_id)
        [retry] = logged(caplog, logging.WARNING, "retry")
        assert retry.getMessage().endswith("retry 1/1 in 0.01s")

    def test_recovering_a_dead_workers_tasks_is_an_error_per_task(
        self, redis_url, redis_client, caplog
    ):
        ids = dead_worker_holding(redis_url, redis_client, 2)
        watcher = Watcher(
            worker_id="live-1",
            client=redis_client,
            keys=KEYS,
            settings=FAST,
            scripts=Scripts(redis_client, KEYS),
            codec=Codec(FAST.max_payload_bytes),
            metrics=Metrics(QUEUE, CollectorRegistry()),
        )
        assert watcher.recover_dead_workers() == 2
        records = logged(caplog, logging.ERROR, "recovered from dead worker")
        assert sorted(r.task_id for r in records) == sorted(ids)
        for record in records:
            assert_names(record, record.task_id)
            assert record.worker_id == "dead-1"
            assert record.getMessage().endswith(
                "recovered from dead worker dead-1 and put back on pending"
            )

    def test_a_poison_task_is_dead_lettered_with_an_error(self, redis_url, redis_client, caplog):
        [task_id] = dead_worker_holding(redis_url, redis_client, 1)
        redis_client.hset(KEYS.crashes, task_id, 2)  # lost twice before
        watcher = Watcher(
            worker_id="live-1",
            client=redis_client,
            keys=KEYS,
            settings=FAST,
            scripts=Scripts(redis_client, KEYS),
            codec=Codec(FAST.max_payload_bytes),
            metrics=Metrics(QUEUE, CollectorRegistry()),
        )
        assert watcher.recover_dead_workers() == 0
        [record] = logged(caplog, logging.ERROR, "poison")
        assert_names(record, task_id)
        assert "workers died holding it 3 times (last dead-1)" in record.getMessage()

    def test_a_running_workers_watcher_recovers_and_logs(self, redis_url, redis_client, caplog):
        ids = dead_worker_holding(redis_url, redis_client, 1)
        consumer = TaskConsumer(redis_url, QUEUE, echo, 2, FAST, registry=CollectorRegistry())
        with running(consumer):
            [record] = wait_until(
                lambda: logged(caplog, logging.ERROR, "recovered from dead worker"),
                what="the recovery log",
            )
        assert_names(record, ids[0])


# --- formats --------------------------------------------------------------------------------


def make_record(**extra) -> logging.LogRecord:
    record = logging.LogRecord(
        "semibot_queue.consumer",
        logging.WARNING,
        __file__,
        42,
        "queue %s: task %s failed",
        (QUEUE, "t-1"),
        None,
    )
    for key, value in extra.items():
        setattr(record, key, value)
    return record


class TestJsonFormatter:
    """One JSON object per line: ts, level, logger, message and every extra field."""

    def test_a_record_is_one_line_of_json_with_its_extras(self):
        record = make_record(queue=QUEUE, task_id="t-1", worker_id="w-1")
        line = JsonFormatter().format(record)
        assert "\n" not in line
        assert json.loads(line) == {
            "ts": record.created,
            "level": "WARNING",
            "logger": "semibot_queue.consumer",
            "message": f"queue {QUEUE}: task t-1 failed",
            "queue": QUEUE,
            "task_id": "t-1",
            "worker_id": "w-1",
        }

    def test_an_exception_and_odd_values_stay_on_one_line(self):
        try:
            raise PermanentTaskError("no\nway")
        except PermanentTaskError:
            record = make_record(queue=QUEUE, task_id="t-1", path=Path("relative/x"))
            record.exc_info = sys.exc_info()
        line = JsonFormatter().format(record)
        assert "\n" not in line
        entry = json.loads(line)
        assert entry["exception"].startswith("Traceback (most recent call last):")
        assert entry["exception"].endswith("PermanentTaskError: no\nway")
        assert entry["path"] == "relative/x"

    def test_configure_json_writes_one_object_per_line_to_stderr(self, capsys):
        configure("debug", "json")
        log = logging.getLogger("semibot_queue.tests")
        log.debug("first %d", 1, extra={"queue": QUEUE, "task_id": "t-1"})
        log.error("second\nline", extra={"queue": QUEUE, "task_id": "t-2"})
        lines = capsys.readouterr().err.splitlines()
        entries = [json.loads(line) for line in lines]
        assert [(e["level"], e["message"], e["task_id"]) for e in entries] == [
            ("DEBUG", "first 1", "t-1"),
            ("ERROR", "second\nline", "t-2"),
        ]
        assert {e["logger"] for e in entries} == {"semibot_queue.tests"}
        assert all(e["queue"] == QUEUE for e in entries)

    def test_configure_sets_one_handler_the_level_and_stops_propagation(self, capsys):
        logger = logging.getLogger("semibot_queue")
        configure("warning", "json")
        configure("info")
        assert logger.level == logging.INFO
        assert logger.propagate is False
        [handler] = logger.handlers
        assert isinstance(handler, logging.StreamHandler)
        assert not isinstance(handler.formatter, JsonFormatter)
        logging.getLogger("semibot_queue.tests").info("hello %s", "text")
        logging.getLogger("semibot_queue.tests").debug("not shown")
        [line] = capsys.readouterr().err.splitlines()
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO semibot_queue.tests: hello text", line
        )

    def test_a_worker_logs_json_lines_with_log_format_json(self, redis_url, tmp_path):
        env = dict(os.environ)
        paths = [
            str(Path(semibot_queue.__file__).resolve().parent.parent),
            str(Path(__file__).resolve().parent),
            env.get("PYTHONPATH", ""),
        ]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        stderr_path = tmp_path / "worker.err"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "semibot_queue", "--redis-url", redis_url,
                 "--queue", QUEUE, "worker", "cli_handlers:reject", "--log-format", "json"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        try:
            with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
                task_id = producer.enqueue(payload(0))
                result = producer.wait_for_result(task_id, timeout=30)
            wait_until(lambda: "dead-lettered" in stderr_path.read_text(), what="the log line")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert result is not None
        entries = [json.loads(line) for line in stderr_path.read_text().splitlines()]
        started = [e for e in entries if "started" in e["message"]]
        assert started
        assert started[0]["level"] == "INFO"
        assert started[0]["queue"] == QUEUE
        [dead] = [e for e in entries if "dead-lettered" in e["message"]]
        assert dead["level"] == "ERROR"
        assert dead["logger"] == "semibot_queue.consumer"
        assert (dead["queue"], dead["task_id"]) == (QUEUE, task_id)
        assert isinstance(dead["ts"], float)
