"""Fault tests: real redis-server processes, workers as subprocesses, faults injected for real.

Each test ends with the ledger (``fault_ledger.Ledger``): every task id that ``enqueue``
returned is found exactly once, as a ``succeeded`` result or a dead letter, and nothing is
left pending, scheduled or in flight. Handlers log every run (``fault_handlers``), so a
task that ran twice is seen, and a listener counts every published result, so a result
recorded twice is seen too. Timings are short (heartbeat 0.2 s, dead after 1 s); every
wait is a deadline, and every process a test starts is killed when it ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from fault_handlers import DIE_STATUS, read_runs
from fault_ledger import (
    DEAD,
    SUCCEEDED,
    Ledger,
    ResultListener,
    dead_record_ids,
    duplicate_runs,
    wait_until,
)
from fault_load import (
    GARBAGE,
    SMALL_PAYLOAD_LIMIT,
    ConnectionCutter,
    PacedProducer,
    dumps,
    good_fields,
    stored_task_id,
    task,
)
from fault_proxy import LossyProxy
from fault_workers import Workers
from redis_server import RedisServer
from semibot_queue import (
    DeadLetterQueue,
    DeadLetterRecord,
    PermanentTaskError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskPayload,
    TaskProducer,
)
from semibot_queue.keys import KeySpace
from semibot_queue.scripts import TASK_ID_PRELUDE, load_source

QUEUE = "faults"
KEYS = KeySpace(QUEUE)

#: Seconds any whole run of tasks may take to settle after the fault.
SETTLE_TIMEOUT_S = 30.0

Client = redis.Redis  # redis.Redis[bytes] at type-checking time

# --- helpers ---------------------------------------------------------------------------------


def kept_task_id(record: DeadLetterRecord) -> str | None:
    """The task id of the payload a dead letter keeps (as ``message``, or as raw bytes)."""
    if record.message is not None:
        return str(record.message["task_id"])
    if record.raw is None:
        return None
    raw = base64.b64decode(record.raw) if record.raw_encoding == "base64" else record.raw.encode()
    return stored_task_id(raw)


def starts(runs: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [run for run in runs if run["event"] == "start" and run["task_id"] == task_id]


def enqueue(url: str, payloads: list[TaskPayload]) -> list[str]:
    with TaskProducer(url, QUEUE) as producer:
        return producer.enqueue_many(payloads)


def assert_no_duplicates(workers: Workers, listener: ResultListener) -> None:
    """No result published twice; no run repeated with the same delivery count."""
    doubles = listener.doubles()
    assert not doubles, f"results published more than once: {doubles}"
    repeats = duplicate_runs(read_runs(workers.runs_path))
    assert not repeats, (
        "tasks ran more than once with the same delivery_count (a duplicate that"
        f" delivery_count does not show), (task id, delivery_count): runs = {repeats}"
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses of this test; all SIGKILLed and their logs printed at the end."""
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def listen() -> Iterator[Callable[[str], ResultListener]]:
    """Start a ResultListener on a server's URL; stopped at the end of the test."""
    started: list[ResultListener] = []

    def start(url: str) -> ResultListener:
        listener = ResultListener(url, KEYS)
        listener.start()
        started.append(listener)
        return listener

    try:
        yield start
    finally:
        for listener in started:
            listener.stop()


@pytest.fixture
def crash_redis(persistent_redis: RedisServer) -> Iterator[tuple[RedisServer, Client]]:
    """A persistent server of this test's own (AOF, fsync always) and a client of it."""
    client = persistent_redis.client()
    try:
        yield persistent_redis, client
    finally:
        client.close()


@pytest.fixture
def queue_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the package's logs even if the command line set ``propagate = False``."""
    logger = logging.getLogger("semibot_queue")
    attach = not logger.propagate  # else caplog's root handler already sees every record
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="semibot_queue")
    try:
        yield caplog
    finally:
        if attach:
            logger.removeHandler(caplog.handler)


@contextmanager
def running_consumer(
    url: str,
    handler: Callable[[TaskMessage], Any],
    *,
    registry: CollectorRegistry | None = None,
    client: Client | None = None,
    concurrency: int = 1,
    **settings: Any,
) -> Iterator[TaskConsumer]:
    """A TaskConsumer in a thread of this process, with ``rand() == 0.5`` (no jitter)."""
    values = {"heartbeat_interval": 0.2, "worker_dead_after": 1.0, "error_retry_delay": 0.05}
    consumer = TaskConsumer(
        url,
        QUEUE,
        handler,
        concurrency,
        QueueSettings(**{**values, **settings}),
        client=client,
        registry=registry or CollectorRegistry(),
        handle_signals=False,
        rand=lambda: 0.5,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="fault-consumer")
    thread.start()
    try:
        with redis.Redis.from_url(url) as admin:
            wait_until(
                lambda: errors or admin.zscore(KEYS.workers, consumer.worker_id) is not None,
                10.0,
                "the consumer to register",
            )
        yield consumer
    finally:
        consumer.stop()
        thread.join()
        consumer.disconnect()
    if errors:
        raise errors[0]


@contextmanager
def dead_letters(url: str) -> Iterator[DeadLetterQueue]:
    dlq = DeadLetterQueue(url, QUEUE)
    try:
        yield dlq
    finally:
        dlq.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"queue": QUEUE, **labels}) or 0.0


# --- 1. a worker is SIGKILLed ----------------------------------------------------------------


def test_tasks_of_a_sigkilled_worker_are_recovered_and_finished_by_another(
    redis_url: str,
    redis_client: Client,
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    listener = listen(redis_url)
    doomed, doomed_id = workers.start_registered(redis_client, KEYS, redis_url, concurrency=4)
    ids = enqueue(redis_url, [task(sleep=0.3) for _ in range(20)])
    inflight = KEYS.inflight(doomed_id)
    wait_until(lambda: redis_client.llen(inflight) == 4, 10.0, "the worker to fill its 4 slots")

    doomed.kill()
    killed_at = time.time()
    held = [stored_task_id(raw) for raw in redis_client.lrange(inflight, 0, -1)]
    assert held, "the worker held no task when it was killed"
    rescuer, _ = workers.start_registered(redis_client, KEYS, redis_url, concurrency=4)

    outcomes = Ledger(redis_client, KEYS).wait_settled(ids, SETTLE_TIMEOUT_S)
    runs = read_runs(workers.runs_path)
    for task_id in held:
        again = [run for run in starts(runs, task_id) if run["pid"] == rescuer.pid]
        assert [run["delivery_count"] for run in again] == [2], (task_id, starts(runs, task_id))
    first_rerun = min(run["time"] for task_id in held for run in starts(runs, task_id)[-1:])
    print(f"SIGKILL -> first recovered task running again: {first_rerun - killed_at:.2f} s")
    assert set(outcomes.values()) == {SUCCEEDED}
    assert listener.counts() == Counter(dict.fromkeys(ids, 1))
    assert_no_duplicates(workers, listener)


# --- 2. redis-server is SIGKILLed and restarted ---------------------------------------------


def test_workers_and_producers_ride_out_a_redis_crash_and_restart(
    crash_redis: tuple[RedisServer, Client],
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    server, client = crash_redis
    listener = listen(server.url)
    started = [
        workers.start_registered(client, KEYS, server.url, concurrency=4)[0] for _ in range(2)
    ]
    producer = PacedProducer(server.url, QUEUE, batches=None, pause=0.05, attempts=3)
    producer.start()
    try:
        ledger = Ledger(client, KEYS)
        wait_until(
            lambda: Counter(ledger.outcomes(producer.accepted).values())[SUCCEEDED] >= 40,
            SETTLE_TIMEOUT_S,
            "40 tasks done before the crash",
        )

        server.kill()
        # Down for longer than WORKER_DEAD_AFTER (1 s): every watcher fails a tick each 0.25 s,
        # so 6 failures each is 1.5 s or more; back up, every heartbeat is stale at once.
        for worker in started:
            wait_until(
                lambda w=worker: w.log().count("cannot reach Redis") >= 6,
                SETTLE_TIMEOUT_S,
                f"worker {worker.number} to see the outage for 1.5 s",
            )
        server.restart()
        before = len(producer.accepted)
        wait_until(
            lambda: len(producer.accepted) >= before + 50, SETTLE_TIMEOUT_S, "enqueues to resume"
        )

        producer.join(SETTLE_TIMEOUT_S)
    finally:
        producer.close()
    assert producer.refused, "no enqueue was refused during the outage"
    ledger.wait_settled(producer.accepted, SETTLE_TIMEOUT_S)
    assert [worker.returncode for worker in started] == [None, None], "a worker gave up"
    print(f"accepted {len(producer.accepted)}, refused {len(producer.refused)}")
    assert_no_duplicates(workers, listener)


# --- 3. every client connection is cut, again and again -------------------------------------


def test_cutting_every_client_connection_again_and_again_loses_nothing(
    redis_url: str,
    redis_client: Client,
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    listener = listen(redis_url)
    started = [
        workers.start_registered(redis_client, KEYS, redis_url, concurrency=4)[0] for _ in range(2)
    ]
    ledger = Ledger(redis_client, KEYS)
    cutter = ConnectionCutter(redis_url, interval=0.05)
    cutter.start()
    try:
        producer = PacedProducer(redis_url, QUEUE, batches=30, pause=0.02, attempts=50)
        producer.start()
        producer.join(SETTLE_TIMEOUT_S)
        # wait_until reads through the cuts (a cut read is "not yet")
        wait_until(lambda: ledger.settled(producer.accepted), SETTLE_TIMEOUT_S, "every task")
    finally:
        cutter.stop()
    outcomes = ledger.check(producer.accepted)
    print(f"{cutter.rounds} rounds of CLIENT KILL cut {cutter.killed} connections")
    assert cutter.rounds >= 10
    assert cutter.killed >= 10
    assert len(producer.accepted) == 300
    assert set(outcomes.values()) == {SUCCEEDED}
    assert [worker.returncode for worker in started] == [None, None]
    assert_no_duplicates(workers, listener)
    assert listener.counts() == Counter(dict.fromkeys(producer.accepted, 1))


# --- 4. SIGTERM under load ------------------------------------------------------------------


def test_sigterm_gives_unfinished_tasks_back_and_a_fresh_worker_finishes_them(
    redis_url: str,
    redis_client: Client,
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    listener = listen(redis_url)
    stopping, stopping_id = workers.start_registered(
        redis_client, KEYS, redis_url, concurrency=4, shutdown_timeout=0.5
    )
    slow = [task(slow=5.0) for _ in range(2)]  # 5 s on their first delivery only
    payloads = [task(sleep=0.05) for _ in range(8)] + slow
    payloads += [task(sleep=0.05) for _ in range(30)]
    ids = enqueue(redis_url, payloads)
    slow_ids = {payload.task_id for payload in slow}
    wait_until(
        lambda: all(starts(read_runs(workers.runs_path), i) for i in slow_ids),
        10.0,
        "both slow tasks to start",
    )

    stopping.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert stopping.wait(timeout=5.0) == 0
    took = time.monotonic() - signalled
    assert took < 4.0, f"exit took {took:.2f} s: it waited for the 5 s tasks"

    given_back = redis_client.lrange(KEYS.pending, 0, -1)
    released = {key.decode() for key in redis_client.hkeys(KEYS.releases)}
    assert released == slow_ids
    assert slow_ids <= {stored_task_id(raw) for raw in given_back}
    assert redis_client.llen(KEYS.inflight(stopping_id)) == 0
    assert redis_client.zscore(KEYS.workers, stopping_id) is None, "not deregistered"
    log = stopping.log()
    for task_id in slow_ids:
        assert f"task {task_id} still running at shutdown; given back to pending" in log

    fresh, _ = workers.start_registered(redis_client, KEYS, redis_url, concurrency=4)
    outcomes = Ledger(redis_client, KEYS).wait_settled(ids, SETTLE_TIMEOUT_S)
    assert set(outcomes.values()) == {SUCCEEDED}
    runs = read_runs(workers.runs_path)
    for task_id in slow_ids:
        assert [run["delivery_count"] for run in starts(runs, task_id)] == [1, 2]
        assert starts(runs, task_id)[-1]["pid"] == fresh.pid
    for task_id in set(ids) - slow_ids:
        assert len(starts(runs, task_id)) == 1, starts(runs, task_id)
    assert listener.counts() == Counter(dict.fromkeys(ids, 1))
    assert_no_duplicates(workers, listener)


def test_a_second_signal_skips_the_shutdown_wait(
    redis_url: str, redis_client: Client, workers: Workers
) -> None:
    stopping, stopping_id = workers.start_registered(
        redis_client, KEYS, redis_url, concurrency=2, shutdown_timeout=30.0
    )
    [task_id] = enqueue(redis_url, [task(slow=30.0)])
    wait_until(lambda: starts(read_runs(workers.runs_path), task_id), 10.0, "the task to start")

    # Two different signals: a repeat of the same one may be merged by the kernel.
    stopping.signal(signal.SIGTERM)
    stopping.signal(signal.SIGINT)
    signalled = time.monotonic()
    assert stopping.wait(timeout=10.0) == 0
    took = time.monotonic() - signalled
    assert took < 5.0, f"exit took {took:.2f} s despite the second signal"
    assert [stored_task_id(raw) for raw in redis_client.lrange(KEYS.pending, 0, -1)] == [task_id]
    assert redis_client.zscore(KEYS.workers, stopping_id) is None


# --- 5. a task that kills its worker: poison ------------------------------------------------


def test_a_task_that_kills_its_worker_is_dead_lettered_as_poison_and_the_rest_finish(
    redis_url: str,
    redis_client: Client,
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    listener = listen(redis_url)
    # One slot per worker, so that the poison task is alone in flight when it kills one.
    slots = [workers.start(redis_url, QUEUE, concurrency=1) for _ in range(2)]
    poison = task(die=True)
    payloads = [task(sleep=0.02) for _ in range(10)] + [poison]
    payloads += [task(sleep=0.02) for _ in range(10)]
    ids = enqueue(redis_url, payloads)
    ledger = Ledger(redis_client, KEYS)
    deaths: list[int] = []

    def supervise() -> bool:
        """Restart dead workers, as systemd or Kubernetes would; done when all settled."""
        for index, worker in enumerate(slots):
            if worker.returncode is not None:
                deaths.append(worker.returncode)
                slots[index] = workers.start(redis_url, QUEUE, concurrency=1)
        return ledger.settled(ids)

    wait_until(supervise, SETTLE_TIMEOUT_S, "every task to settle", lambda: ledger.summary(ids))
    outcomes = ledger.check(ids)

    assert outcomes.pop(poison.task_id) == DEAD
    assert set(outcomes.values()) == {SUCCEEDED}
    assert deaths == [DIE_STATUS] * 3, "MAX_DELIVERY_ATTEMPTS is 3: it kills 3 workers"
    runs = read_runs(workers.runs_path)
    assert [run["delivery_count"] for run in starts(runs, poison.task_id)] == [1, 2, 3]
    for task_id in ids:
        if task_id != poison.task_id:
            assert len(starts(runs, task_id)) == 1, starts(runs, task_id)
    with dead_letters(redis_url) as dlq:
        record = dlq.get(poison.task_id)
    assert record is not None
    assert (record.reason, record.delivery_count) == ("poison", 3)
    assert kept_task_id(record) == poison.task_id, "the poison task's payload is not kept"
    assert listener.statuses(poison.task_id) == ["failed"]
    assert_no_duplicates(workers, listener)


# --- 6. garbage pushed straight onto the pending list ---------------------------------------


def test_a_thousand_unusable_payloads_are_dead_lettered_raw_while_good_tasks_run(
    redis_url: str, redis_client: Client, workers: Workers
) -> None:
    for _ in range(2):
        workers.start_registered(
            redis_client, KEYS, redis_url, concurrency=4, max_payload_bytes=SMALL_PAYLOAD_LIMIT
        )
    kinds = list(GARBAGE)
    garbage = {GARBAGE[kinds[i % len(kinds)]](i): kinds[i % len(kinds)] for i in range(1000)}
    assert len(garbage) == 1000, "payloads must be unique"
    good: list[str] = []
    pushed = list(garbage)
    with TaskProducer(redis_url, QUEUE) as producer:
        for start in range(0, len(pushed), 100):
            redis_client.lpush(KEYS.pending, *pushed[start : start + 100])
            good += producer.enqueue_many([task() for _ in range(5)])

    ledger = Ledger(redis_client, KEYS)
    wait_until(
        lambda: redis_client.hlen(KEYS.dead) >= len(garbage) and ledger.settled(good),
        SETTLE_TIMEOUT_S,
        "every payload to be dead-lettered and every good task to finish",
        lambda: f"{redis_client.hlen(KEYS.dead)} dead letters, {ledger.summary(good)}",
    )
    assert set(ledger.check(good).values()) == {SUCCEEDED}
    with dead_letters(redis_url) as dlq:
        records = dlq.list(0, 2 * len(garbage))
    kept: dict[bytes, str | None] = {}
    for record in records:
        assert (record.reason, record.error_type) == ("invalid", "InvalidTaskError"), record
        assert record.raw is not None, record
        if record.raw_encoding == "base64":
            kept[base64.b64decode(record.raw)] = record.raw_encoding
        else:
            kept[record.raw.encode()] = record.raw_encoding
    lost = Counter(kind for payload, kind in garbage.items() if payload not in kept)
    assert not lost, f"payloads not kept byte for byte, by kind: {dict(lost)}"
    assert len(records) == len(garbage)
    for payload, encoding in kept.items():
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            assert encoding == "base64", payload
        else:
            assert encoding == "utf-8", payload


# --- 7. retries back off exactly; the dead-letter store is bounded ---------------------------


def test_retries_back_off_exponentially_then_the_task_is_dead_lettered_as_exhausted(
    redis_url: str, redis_client: Client, queue_logs: pytest.LogCaptureFixture
) -> None:
    base, cap = 10.0, 30.0  # long delays, asserted exactly, then fast-forwarded by the test
    calls: list[tuple[int, str | None, int, int]] = []

    def always_fails(message: TaskMessage) -> None:
        seconds, micros = redis_client.time()
        now_ms = seconds * 1000 + micros // 1000
        calls.append((message.retry_count, message.last_error, message.delivery_count, now_ms))
        raise RuntimeError(f"boom {message.retry_count}")

    registry = CollectorRegistry()
    with running_consumer(
        redis_url,
        always_fails,
        registry=registry,
        retry_base_delay=base,
        retry_max_delay=cap,
        max_retry_attempts=3,
    ):
        listener = ResultListener(redis_url, KEYS)
        listener.start()
        try:
            [task_id] = enqueue(redis_url, [task()])
            for attempt in (1, 2, 3):
                member, due_ms = wait_until(
                    lambda n=attempt: scheduled_retry(redis_client, n),
                    10.0,
                    f"retry {attempt} to be scheduled",
                )
                scheduled = json.loads(member)
                assert scheduled["last_error"] == f"RuntimeError: boom {attempt - 1}"
                expected_ms = min(cap, base * 2 ** (attempt - 1)) * 1000
                failed_at_ms = calls[-1][3]
                assert expected_ms <= due_ms - failed_at_ms <= expected_ms + 250, (
                    attempt,
                    due_ms - failed_at_ms,
                )
                redis_client.zadd(KEYS.scheduled, {member: 0}, xx=True)  # due now
            wait_until(
                lambda: dead_record_ids(redis_client, KEYS, task_id), 10.0, "the dead letter"
            )
            wait_until(lambda: listener.counts()[task_id], 5.0, "the failed result")
        finally:
            listener.stop()

    # each retry is one more take: delivery_count == retry_count + 1 (no worker died)
    assert [call[:3] for call in calls] == [
        (0, None, 1),
        (1, "RuntimeError: boom 0", 2),
        (2, "RuntimeError: boom 1", 3),
        (3, "RuntimeError: boom 2", 4),
    ]
    with dead_letters(redis_url) as dlq:
        record = dlq.get(task_id)
    assert record is not None
    assert (record.reason, record.attempts) == ("exhausted", 4)
    assert (record.error_type, record.error) == ("RuntimeError", "boom 3")
    assert record.traceback is not None
    assert "boom 3" in record.traceback
    assert record.message is not None
    assert record.message["retry_count"] == 3
    assert listener.statuses(task_id) == ["failed"]
    assert sample(registry, "semibot_queue_retries_total") == 3
    assert sample(registry, "semibot_queue_tasks_processed_total", status="failed") == 4
    warnings = [r.getMessage() for r in queue_logs.records if "retry" in r.getMessage()]
    for attempt, delay in ((1, "10.00"), (2, "20.00"), (3, "30.00")):
        assert any(f"retry {attempt}/3 in {delay}s" in line for line in warnings), warnings
    Ledger(redis_client, KEYS).check([task_id])


def scheduled_retry(client: Client, retry_count: int) -> tuple[bytes, float] | None:
    """The scheduled task with ``retry_count`` and its due time in ms, if there is one."""
    for member, due_ms in client.zrange(KEYS.scheduled, 0, -1, withscores=True):
        if json.loads(member)["retry_count"] == retry_count:
            return member, due_ms
    return None


def permanently_failing(message: TaskMessage) -> None:
    time.sleep(0.005)  # failures a few ms apart: the dead-letter index orders them
    raise PermanentTaskError(f"task {message.task_id} cannot succeed")


def test_dead_letters_beyond_the_bound_are_evicted_oldest_first_counted_and_logged(
    redis_url: str, redis_client: Client, queue_logs: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    with running_consumer(
        redis_url, permanently_failing, registry=registry, dead_letter_max_length=3
    ):
        ids = enqueue(redis_url, [task() for _ in range(5)])
        wait_until(
            lambda: (
                sample(registry, "semibot_queue_dead_letter_evictions_total") >= 2
                and redis_client.exists(*[KEYS.result(task_id) for task_id in ids]) == 5
            ),
            10.0,
            "five dead letters, two of them evicted",
        )
    assert sample(registry, "semibot_queue_dead_letter_evictions_total") == 2
    with dead_letters(redis_url) as dlq:
        assert dlq.count() == 3
        assert [record.task_id for record in dlq.list()] == ids[:1:-1]  # newest first
    evicted = [r.getMessage() for r in queue_logs.records if "evicted" in r.getMessage()]
    assert len(evicted) == 2, evicted
    for task_id, line in zip(ids[:2], evicted, strict=True):
        assert f"dead letter {task_id}#" in line
        assert " evicted " in line


def test_dead_letters_older_than_the_ttl_are_evicted_counted_and_logged(
    redis_url: str, redis_client: Client, queue_logs: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    with running_consumer(redis_url, permanently_failing, registry=registry, dead_letter_ttl=1):
        [task_id] = enqueue(redis_url, [task()])
        failed_ms = wait_until(
            lambda: dead_record_ids(redis_client, KEYS, task_id), 10.0, "the dead letter"
        )
        [record_id] = failed_ms
        failed_ms = redis_client.zscore(KEYS.dead_index, record_id)
        wait_until(lambda: not redis_client.hexists(KEYS.dead, record_id), 10.0, "the TTL eviction")
        seconds, micros = redis_client.time()
    assert seconds * 1000 + micros // 1000 - failed_ms >= 1000, "evicted before its TTL"
    assert redis_client.zscore(KEYS.dead_index, record_id) is None
    assert sample(registry, "semibot_queue_dead_letter_evictions_total") == 1
    evicted = [r.getMessage() for r in queue_logs.records if "evicted" in r.getMessage()]
    assert evicted == [
        f"queue {QUEUE}: dead letter {record_id} evicted"
        " (DEAD_LETTER_MAX_LENGTH=10000, DEAD_LETTER_TTL=1s)"
    ]


# --- 8. a long task on a healthy worker is never re-delivered -------------------------------


def heartbeat_age(client: Client, worker_id: str) -> float:
    """Seconds since ``worker_id`` last heartbeated, on the Redis clock."""
    seconds, micros = client.time()
    beat = client.zscore(KEYS.workers, worker_id)
    assert beat is not None, f"worker {worker_id} is no longer registered"
    return (seconds * 1000 + micros // 1000 - beat) / 1000


def test_a_long_task_on_a_healthy_worker_runs_once_however_long_it_takes(
    redis_url: str,
    redis_client: Client,
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    listener = listen(redis_url)
    holder, holder_id = workers.start_registered(redis_client, KEYS, redis_url, concurrency=2)
    # 3 s of CPU-bound work: three times WORKER_DEAD_AFTER (1 s), holding the GIL
    [task_id] = enqueue(redis_url, [task(spin=3.0)])
    wait_until(lambda: starts(read_runs(workers.runs_path), task_id), 10.0, "the task to start")
    peer, _ = workers.start_registered(redis_client, KEYS, redis_url, concurrency=2)

    ages: list[float] = []

    def finished() -> bool:
        ages.append(heartbeat_age(redis_client, holder_id))
        return redis_client.exists(KEYS.result(task_id)) == 1

    wait_until(finished, 15.0, "the long task to finish")
    assert Ledger(redis_client, KEYS).check([task_id]) == {task_id: SUCCEEDED}
    runs = starts(read_runs(workers.runs_path), task_id)
    assert [(run["pid"], run["delivery_count"]) for run in runs] == [(holder.pid, 1)]
    assert max(ages) < 1.0, f"heartbeat went {max(ages):.2f} s stale (dead after 1 s)"
    assert "recovered" not in peer.log()
    assert listener.counts() == Counter({task_id: 1})


# --- 9. Redis goes down while a handler finishes -------------------------------------------


def test_a_result_finished_while_redis_is_down_is_recorded_once_redis_is_back(
    crash_redis: tuple[RedisServer, Client],
    workers: Workers,
    listen: Callable[[str], ResultListener],
) -> None:
    server, client = crash_redis
    listener = listen(server.url)
    worker, _ = workers.start_registered(client, KEYS, server.url, concurrency=2)
    [task_id] = enqueue(server.url, [task(sleep=1.0)])
    runs_of = lambda: read_runs(workers.runs_path)  # noqa: E731 - a one-line probe
    wait_until(lambda: starts(runs_of(), task_id), 10.0, "the task to start")

    server.kill()
    wait_until(
        lambda: any(run["event"] == "done" for run in runs_of()), 10.0, "the handler to finish"
    )
    wait_until(
        lambda: f"recording ack of task {task_id} failed" in worker.log(),
        10.0,
        "the worker to retry the ack",
    )
    server.restart()
    restarted = time.monotonic()

    stored = wait_until(lambda: client.get(KEYS.result(task_id)), 10.0, "the result")
    print(f"Redis back -> result recorded: {time.monotonic() - restarted:.2f} s")
    assert json.loads(stored)["status"] == "succeeded"
    assert Ledger(client, KEYS).check([task_id]) == {task_id: SUCCEEDED}
    assert len(starts(runs_of(), task_id)) == 1
    assert worker.returncode is None, "the worker gave up"
    assert_no_duplicates(workers, listener)


def test_a_worker_that_cannot_reach_redis_for_good_exits_with_status_3(
    crash_redis: tuple[RedisServer, Client], workers: Workers
) -> None:
    server, client = crash_redis
    worker, _ = workers.start_registered(
        client, KEYS, server.url, concurrency=2, max_reconnect_attempts=3
    )
    server.kill()
    assert worker.wait(timeout=10.0) == 3
    assert "unreachable after 3 attempts" in worker.log()


def test_a_worker_that_cannot_reach_redis_for_good_exits_3_naming_unrecorded_tasks(
    crash_redis: tuple[RedisServer, Client], workers: Workers
) -> None:
    server, client = crash_redis
    # 8 attempts, 0.05 s doubling to 0.5 s: the worker gives up about 2.3 s into the outage
    worker, _ = workers.start_registered(
        client, KEYS, server.url, concurrency=2, max_reconnect_attempts=8
    )
    [task_id] = enqueue(server.url, [task(sleep=0.5)])
    wait_until(lambda: starts(read_runs(workers.runs_path), task_id), 10.0, "the task to start")
    server.kill()  # the task finishes in the outage; its ack cannot be recorded

    status = worker.wait(10.0, "it should give up after 8 failed reconnects, ack or no ack")
    assert status == 3
    log = worker.log()
    assert "unreachable after 8 attempts" in log
    assert re.search(rf"task {task_id} outcome \(ack\) unrecorded at shutdown", log), log[-3000:]
    server.restart()  # what it could not record stays in flight, for recovery
    inflight = list(client.scan_iter(match=KEYS.inflight_prefix + "*"))
    held = [stored_task_id(raw) for key in inflight for raw in client.lrange(key, 0, -1)]
    assert held == [task_id]


# --- replies lost after Redis acted (a network cut between request and reply) ---------------


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[LossyProxy]:
    """A proxy in front of the shared server that can lose one reply; closed at the end."""
    lossy = LossyProxy(redis_server.port)
    lossy.start()
    try:
        yield lossy
    finally:
        lossy.close()


def script_sha(*names: str) -> bytes:
    """The EVALSHA digest of one of the package's Lua scripts (after its preludes), as it
    appears on the wire."""
    source = load_source(*names).encode()
    return hashlib.sha1(source, usedforsecurity=False).hexdigest().encode()


def behaving(runs: Counter[str], sleep: float = 0.0) -> Callable[[TaskMessage], str]:
    """An in-process handler: counts its runs per task id, sleeps ``config["sleep"]``."""

    def handler(message: TaskMessage) -> str:
        runs[message.task_id] += 1
        time.sleep(float(message.config.get("sleep", sleep)))
        return "done"

    return handler


def test_an_enqueue_whose_reply_is_lost_puts_the_task_on_the_queue_once(
    redis_url: str, redis_client: Client, proxy: LossyProxy
) -> None:
    settings = QueueSettings(error_retry_delay=0.05)
    with TaskProducer(proxy.url, QUEUE, settings) as producer:
        producer.enqueue(task())  # Redis now knows the script: the next call is one EVALSHA
        proxy.lose_reply_to(b"EVALSHA")
        payload = task()
        producer.enqueue(payload)
    assert proxy.reply_lost.is_set()
    pending = redis_client.lrange(KEYS.pending, 0, -1)
    copies = [raw for raw in pending if stored_task_id(raw) == payload.task_id]
    assert len(copies) == 1, (
        f"task {payload.task_id} is on the pending list {len(copies)} times: the enqueue"
        " that ran but lost its reply was run again"
    )


def test_a_fetch_whose_reply_is_lost_still_runs_each_task_once(
    redis_url: str, redis_client: Client, proxy: LossyProxy
) -> None:
    runs: Counter[str] = Counter()
    # a long blocking pop, so that it is still waiting when the tasks arrive
    with running_consumer(proxy.url, behaving(runs), concurrency=4, queue_poll_timeout=2.0):
        proxy.lose_reply_to(b"BLMOVE")
        wait_until(proxy.request_seen.is_set, 10.0, "the worker's next blocking pop")
        ids = enqueue(redis_url, [task(), task()])  # the pop takes the first, then its reply
        Ledger(redis_client, KEYS).wait_settled(ids, 10.0)
    assert proxy.reply_lost.is_set()
    assert runs == Counter(dict.fromkeys(ids, 1))


def test_an_ack_whose_reply_is_lost_records_each_result_once_and_runs_what_it_took(
    redis_url: str, redis_client: Client, proxy: LossyProxy
) -> None:
    runs: Counter[str] = Counter()
    listener = ResultListener(redis_url, KEYS)
    listener.start()
    try:
        with running_consumer(proxy.url, behaving(runs, 0.02), concurrency=2):
            warm = enqueue(redis_url, [task()])  # Redis now knows the ack script
            Ledger(redis_client, KEYS).wait_settled(warm, 10.0)
            proxy.lose_reply_to(script_sha(TASK_ID_PRELUDE, "ack"))
            ids = enqueue(redis_url, [task() for _ in range(20)])
            wait_until(proxy.reply_lost.is_set, 10.0, "an ack reply to be lost")
            Ledger(redis_client, KEYS).wait_settled(ids, 10.0)
    finally:
        listener.stop()
    assert runs == Counter(dict.fromkeys(warm + ids, 1))
    assert listener.counts() == Counter(dict.fromkeys(warm + ids, 1))


# --- deliveries given back at shutdown are not crashes --------------------------------------


def test_a_task_given_back_at_shutdown_twice_then_crashed_once_is_not_poison(
    redis_url: str, redis_client: Client, workers: Workers
) -> None:
    # slow on its first 3 deliveries, quick after; MAX_DELIVERY_ATTEMPTS is 3
    [task_id] = enqueue(redis_url, [task(slow=30.0, slow_deliveries=3)])

    def started(delivery: int) -> bool:
        runs = starts(read_runs(workers.runs_path), task_id)
        return delivery in [run["delivery_count"] for run in runs]

    for delivery in (1, 2):  # two deploys: SIGTERM gives the task back each time
        worker, _ = workers.start_registered(
            redis_client, KEYS, redis_url, concurrency=1, shutdown_timeout=0.1
        )
        wait_until(lambda d=delivery: started(d), 10.0, f"delivery {delivery}")
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=10.0) == 0
    crashing, _ = workers.start_registered(redis_client, KEYS, redis_url, concurrency=1)
    wait_until(lambda: started(3), 10.0, "delivery 3")
    crashing.kill()  # the only worker that ever died holding it
    workers.start_registered(redis_client, KEYS, redis_url, concurrency=1)

    outcomes = Ledger(redis_client, KEYS).wait_settled([task_id], SETTLE_TIMEOUT_S)
    with dead_letters(redis_url) as dlq:
        record = dlq.get(task_id)
    assert outcomes == {task_id: SUCCEEDED}, (
        "one worker died holding the task, yet it was dead-lettered as"
        f" {record.reason if record else None!r}: {record.error if record else ''}"
    )


# --- raw input the codec lets through ---------------------------------------------------


def test_raw_tasks_whose_id_cannot_name_a_key_are_dead_lettered_as_invalid(
    redis_url: str, redis_client: Client, workers: Workers
) -> None:
    workers.start_registered(redis_client, KEYS, redis_url, concurrency=4)
    bad = {
        "an empty task id": dumps({**good_fields(0), "task_id": ""}),
        "a space in the task id": dumps({**good_fields(1), "task_id": "not a key name"}),
        "a hash tag in the task id": dumps({**good_fields(2), "task_id": "{other}:x"}),
        "a 300-character task id": dumps({**good_fields(3), "task_id": "x" * 300}),
        "an invalid task with such an id": dumps({"task_id": "bad id", "agent_id": 5}),
    }
    good = enqueue(redis_url, [task(sleep=0.01) for _ in range(20)])
    redis_client.lpush(KEYS.pending, *bad.values())
    good += enqueue(redis_url, [task(sleep=0.01) for _ in range(20)])
    ledger = Ledger(redis_client, KEYS)

    def kept() -> set[bytes]:
        return set(redis_client.hvals(KEYS.dead_raw))

    def missing() -> list[str]:
        return [kind for kind, payload in bad.items() if payload not in kept()]

    wait_until(
        lambda: not missing() and ledger.settled(good),
        10.0,
        "every bad task dead-lettered and every good one done",
        lambda: f"not dead-lettered: {missing()}; good tasks: {ledger.summary(good)}",
    )
    assert set(ledger.check(good).values()) == {SUCCEEDED}


def test_a_raw_task_with_a_negative_delivery_count_is_dead_lettered_as_invalid(
    redis_url: str, redis_client: Client
) -> None:
    seen: list[int] = []

    def handler(message: TaskMessage) -> None:
        seen.append(message.delivery_count)

    ledger = Ledger(redis_client, KEYS)
    with running_consumer(redis_url, handler):
        redis_client.lpush(KEYS.pending, dumps({**good_fields(0), "delivery_count": -1}))
        wait_until(lambda: ledger.settled(["garbage-0"]), 10.0, "an outcome")
    outcome = ledger.check(["garbage-0"])
    assert outcome == {"garbage-0": DEAD}, f"ran as a valid task, delivery_count {seen}"
    assert seen == []


def cut_blocking_pop(client: Client) -> bool:
    """CLIENT KILL the connection blocked in BLMOVE, if one is blocked now.

    ``cmd`` is only the last command: the ``b`` flag says the client waits in it now (an
    idle connection, cut, would reconnect quietly on its next use).
    """
    for entry in client.client_list(_type="normal"):
        if entry.get("cmd") == "blmove" and "b" in entry.get("flags", ""):
            return bool(client.client_kill_filter(_id=entry["id"]))
    return False


def test_tasks_an_ack_took_are_not_run_again_by_the_orphan_search_after_a_fetch_failure(
    redis_url: str, redis_client: Client, proxy: LossyProxy
) -> None:
    runs: Counter[str] = Counter()
    ledger = Ledger(redis_client, KEYS)
    with running_consumer(
        proxy.url, behaving(runs), concurrency=3, error_retry_delay=1.0, max_reconnect_delay=2.0
    ):
        warm = enqueue(redis_url, [task()])  # Redis now knows every script
        ledger.wait_settled(warm, 10.0)
        [first] = enqueue(redis_url, [task(sleep=0.6)])
        wait_until(lambda: runs[first], 10.0, "the first task to start")
        # Its ack (in 0.6 s) takes the next tasks; the reply comes back 2 s later...
        proxy.delay_reply_to(script_sha(TASK_ID_PRELUDE, "ack"), 2.0)
        # ...and meanwhile the fetch loop, cut off, searches its in-flight list (after 1 s).
        wait_until(lambda: cut_blocking_pop(redis_client), 5.0, "a blocking pop to cut")
        rest = enqueue(redis_url, [task(), task()])
        ledger.wait_settled([first, *rest], 10.0)
        assert proxy.request_seen.is_set()
    assert runs == Counter(dict.fromkeys([*warm, first, *rest], 1)), (
        "tasks ran twice in one healthy worker, with the same delivery_count"
    )


def test_a_task_whose_retry_is_recorded_during_the_orphan_search_is_not_run_again(
    redis_url: str, redis_client: Client, proxy: LossyProxy
) -> None:
    # The chaos run's duplicate: the orphan search listed the in-flight list with the task
    # in it, the task's retry was recorded and its slot freed before the search compared
    # that list with the slots, so the task looked taken-but-unheld and ran again.
    runs: Counter[tuple[str, int]] = Counter()

    def fails_once(message: TaskMessage) -> str:
        runs[message.task_id, message.retry_count] += 1
        time.sleep(float(message.config.get("sleep", 0.0)))
        if message.retry_count == 0 and message.config.get("fail"):
            raise RuntimeError("first attempt fails")
        return "done"

    ledger = Ledger(redis_client, KEYS)
    with running_consumer(
        proxy.url, fails_once, concurrency=2, retry_base_delay=0.05, retry_max_delay=0.05
    ):
        warm = enqueue(redis_url, [task()])  # Redis now knows every script
        ledger.wait_settled(warm, 10.0)
        [failing] = enqueue(redis_url, [task(sleep=0.5, fail=True)])
        wait_until(lambda: runs[failing, 0], 10.0, "the failing task to start")
        # The search's list is read while the task runs; its reply comes after the retry.
        proxy.delay_reply_to(b"LRANGE", 1.5)
        wait_until(lambda: cut_blocking_pop(redis_client), 5.0, "a blocking pop to cut")
        wait_until(proxy.request_seen.is_set, 5.0, "the orphan search's LRANGE")
        ledger.wait_settled([failing], 10.0)
    assert runs == Counter({(warm[0], 0): 1, (failing, 0): 1, (failing, 1): 1}), (
        "the failing task's first attempt ran twice in one healthy worker"
    )
