"""Regression tests for the worker bullets of issue 8's "Why", one test per bullet.

Each test is named after the fault it pins down, against a real redis-server: handlers
that raise or return what nobody expects, a worker whose own threads died, Redis refusing
an outcome for a reason other than a lost link, a worker declared dead that still took a
task, a Redis outage longer than WORKER_DEAD_AFTER, ``stop()`` from a signal handler,
recovery of big tasks, and the Semibot runtime's wire format. On 9915baa each one fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

import semibot_queue
from chaos_handlers import (
    BASE_EXCEPTIONS,
    LONG_ERROR_CHARS,
    TOO_DEEP,
    SurrogateError,
    UnprintableError,
)
from fault_handlers import read_runs
from fault_ledger import ResultListener, dead_record_ids, dead_records, wait_until
from fault_workers import WorkerProcess, Workers
from redis_server import RedisServer, free_port
from semibot_queue import (
    QueueError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskPayload,
    TaskProducer,
)
from semibot_queue.keys import KeySpace
from support import Running, payload

QUEUE = "wf"
KEYS = KeySpace(QUEUE)
GATED = "chaos_handlers:gated"

Client = redis.Redis  # redis.Redis[bytes] at type-checking time

#: MAX_PAYLOAD_BYTES of the tests that need a task near it.
SMALL_LIMIT = 8_192


def settings(**overrides: Any) -> QueueSettings:
    """Quick heartbeats, retries and reconnects (as support.FAST), with ``overrides``."""
    values: dict[str, Any] = {
        "heartbeat_interval": 0.1,
        "worker_dead_after": 0.5,
        "retry_base_delay": 0.02,
        "retry_max_delay": 0.1,
        "error_retry_delay": 0.01,
        "max_reconnect_delay": 0.05,
        "stop_poll_slice": 0.2,
        "shutdown_timeout": 2.0,
        "busy_warning_interval": 60.0,
    }
    values.update(overrides)
    return QueueSettings(**values)


def consumer(
    url: str, handler: Callable[[TaskMessage], Any], slots: int, s: QueueSettings
) -> TaskConsumer:
    return TaskConsumer(
        url,
        QUEUE,
        handler,
        slots,
        s,
        registry=CollectorRegistry(),
        handle_signals=False,
        rand=lambda: 0.5,
    )


def enqueue(url: str, payloads: list[TaskPayload], s: QueueSettings | None = None) -> list[str]:
    with TaskProducer(url, QUEUE, s or settings(), registry=CollectorRegistry()) as producer:
        return producer.enqueue_many(payloads)


def ids_in(client: Client, key: str) -> list[str]:
    """The task ids in a list (pending or in flight), oldest first."""
    return [str(json.loads(raw)["task_id"]) for raw in reversed(client.lrange(key, 0, -1))]


def stored_result(client: Client, task_id: str, keys: KeySpace = KEYS) -> dict[str, Any] | None:
    raw = client.get(keys.result(task_id))
    return None if raw is None else dict(json.loads(raw))


def succeeded(client: Client, task_ids: list[str]) -> bool:
    for task_id in task_ids:
        result = stored_result(client, task_id)
        if result is None or result["status"] != "succeeded":
            return False
    return True


def registered(client: Client, worker_id: str, keys: KeySpace = KEYS) -> bool:
    return client.zscore(keys.workers, worker_id) is not None


def start(worker: TaskConsumer, client: Client) -> Running:
    """Run ``worker`` in a thread; returns once it has registered."""
    handle = Running(worker)
    handle.thread.start()
    wait_until(
        lambda: handle.error is not None or registered(client, worker.worker_id, worker.keys),
        10.0,
        "the worker to register",
    )
    assert handle.error is None, handle.error
    return handle


@pytest.fixture
def handles() -> Iterator[list[Running]]:
    """Consumers a test started in threads; each is stopped at the end."""
    started: list[Running] = []
    try:
        yield started
    finally:
        for handle in started:
            handle.consumer.stop()
        for handle in started:
            handle.thread.join(10)


@pytest.fixture
def listen() -> Iterator[Callable[[str], ResultListener]]:
    """Start a ResultListener (results published, per task) on a server; stopped at the end."""
    started: list[ResultListener] = []

    def start_listening(url: str) -> ResultListener:
        listener = ResultListener(url, KEYS)
        listener.start()
        started.append(listener)
        return listener

    try:
        yield start_listening
    finally:
        for listener in started:
            listener.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses of this test; all SIGKILLed and their logs printed at the end."""
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


def gated_task(gate: Path | None = None) -> TaskPayload:
    """A task for chaos_handlers.gated: runs until ``gate`` exists (None: returns at once)."""
    return payload(0, config={} if gate is None else {"gate": str(gate)})


def starts(runs_path: Path, task_id: str) -> list[dict[str, Any]]:
    return [r for r in read_runs(runs_path) if r["event"] == "start" and r["task_id"] == task_id]


# --- a handler that raises or returns the unexpected ---------------------------------------


def _too_deep() -> list[Any]:
    """Nested past any recursion limit: encoding it raises RecursionError."""
    value: list[Any] = []
    for _ in range(TOO_DEEP):
        value = [value]
    return value


def _raise(error: BaseException) -> Any:
    raise error


#: What the bad tasks of each case do (``n`` numbers them), and the dead-letter reason each
#: ends with: "exhausted" after its retry (MAX_RETRY_ATTEMPTS is 1 here), or "permanent" at
#: its first attempt.
MISBEHAVIOURS: dict[str, tuple[Callable[[int], Any], str]] = {
    "raises a BaseException": (lambda n: _raise(BASE_EXCEPTIONS[n % 4]("bad")), "exhausted"),
    "raises an error whose message cannot be encoded": (
        lambda n: _raise(SurrogateError()),
        "exhausted",
    ),
    "raises an error whose __str__ fails": (lambda n: _raise(UnprintableError()), "exhausted"),
    # nested past the recursion limit, in lists and in mappings: encoding raises neither
    # TypeError nor ValueError (the chaos test returns the other odd values)
    "returns something that cannot be encoded": (
        lambda n: [
            _too_deep(),
            {"deep": _too_deep()},
            [{"deeper": _too_deep()}],
            {"a": [1, {"b": _too_deep()}]},
        ][n],
        "permanent",
    ),
    # the retry copy keeps a shortened error, so the task is retried as any other
    "fails on a task whose retry copy is over MAX_PAYLOAD_BYTES": (
        lambda n: _raise(RuntimeError("L" * LONG_ERROR_CHARS)),
        "exhausted",
    ),
}


@pytest.mark.parametrize("case", list(MISBEHAVIOURS))
def test_a_handler_that_raises_or_returns_the_unexpected_leaves_each_task_an_outcome_and_the_worker_serving(  # noqa: E501 - the bullet's words
    case: str, redis_url: str, redis_client: Client, handles: list[Running]
) -> None:
    slots = 3
    misbehave, reason = MISBEHAVIOURS[case]
    s = settings(max_retry_attempts=1, max_payload_bytes=SMALL_LIMIT)
    big = "q" * (SMALL_LIMIT - 700) if "retry copy" in case else "q"
    bad = [
        payload(n, messages=[{"role": "user", "content": big}], config={"bad": n})
        for n in range(slots + 1)
    ]
    bad_ids = enqueue(redis_url, bad, s)
    [normal] = enqueue(redis_url, [payload(9, config={})], s)
    if "retry copy" in case:
        for stored in redis_client.lrange(KEYS.pending, 0, -1):
            if json.loads(stored)["task_id"] in bad_ids:
                assert SMALL_LIMIT - LONG_ERROR_CHARS < len(stored) <= SMALL_LIMIT

    def handler(message: TaskMessage) -> Any:
        if "bad" in message.config:
            return misbehave(int(message.config["bad"]))
        return "normal task done"

    handle = start(consumer(redis_url, handler, slots, s), redis_client)
    handles.append(handle)

    wait_until(
        lambda: succeeded(redis_client, [normal]),
        15.0,
        f"the normal task after {slots + 1} bad ones (dead pool threads never run it)",
    )

    def outcomes() -> list[tuple[str | None, list[tuple[str, int]]]]:
        found = []
        for task_id in bad_ids:
            result = stored_result(redis_client, task_id)
            records = dead_records(redis_client, KEYS, task_id)
            reasons = [(r["reason"], r["attempts"]) for r in records]
            found.append((None if result is None else result["status"], reasons))
        return found

    wait_until(
        lambda: all(status == "failed" and len(r) == 1 for status, r in outcomes()),
        15.0,
        "every bad task to have its outcome: a failed result and one dead letter",
        lambda: str(outcomes()),
    )
    attempts = 2 if reason == "exhausted" else 1
    assert [r for _, r in outcomes()] == [[(reason, attempts)]] * len(bad_ids)
    assert handle.thread.is_alive(), f"the worker stopped: {handle.error!r}"
    assert redis_client.llen(KEYS.inflight(handle.consumer.worker_id)) == 0
    assert redis_client.llen(KEYS.pending) == 0


# --- a worker whose own threads died -------------------------------------------------------


class _Bomb:
    """Stands in for a recorder's queue: hands outcomes on, but the recorder's loop dies
    (SystemExit) as soon as it looks for a second outcome to batch with its first. Once
    only: the worker's shutdown empties the queue the same way."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._exploded = False

    def put(self, item: Any) -> None:
        self._real.put(item)

    def get(self) -> Any:
        return self._real.get()

    def get_nowait(self) -> Any:
        if not self._exploded:
            self._exploded = True
            raise SystemExit("a bug in the recorder's loop")
        return self._real.get_nowait()

    def empty(self) -> bool:
        return bool(self._real.empty())


def break_thread(part: str, worker: TaskConsumer) -> None:
    """Make the worker's pool loops, or its recorder's loop, end (SystemExit, uncaught) on
    the next task: a bug in the worker's own code, seen from outside. (Not an async
    exception raised into the thread: PyThreadState_SetAsyncExc deadlocked under coverage
    on Python 3.11 in CI.)"""

    def broken(delivery: Any) -> Any:
        raise SystemExit("a bug in the pool loop")

    if part == "pool loop":
        worker._process_task = broken  # type: ignore[method-assign]
        return
    recorder = worker._recorder
    assert recorder is not None, "the worker has no recorder"
    recorder._queue = _Bomb(recorder._queue)  # type: ignore[assignment]


@pytest.mark.parametrize("part", ["pool loop", "recorder"])
# the test ends a worker thread with SystemExit on purpose; pytest would report it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_whose_pool_loop_or_recorder_died_stops_heartbeating_and_exits_non_zero(
    part: str, redis_url: str, redis_client: Client, handles: list[Running]
) -> None:
    s = settings()
    first = consumer(redis_url, lambda m: "done", 2, s)
    handle = start(first, redis_client)
    handles.append(handle)
    warm = enqueue(redis_url, [payload(0)])
    wait_until(lambda: succeeded(redis_client, warm), 10.0, "a first task")
    break_thread(part, first)

    ids = enqueue(redis_url, [payload(1), payload(2)])  # the next task it runs ends that thread
    handle.thread.join(10.0)
    assert not handle.thread.is_alive(), (
        f"the worker went on (heartbeating, taking tasks) with its {part} dead"
    )
    assert isinstance(handle.error, QueueError), f"start() ended with {handle.error!r}"
    # what it held stays in flight, and another worker recovers and runs it
    rescuer = start(consumer(redis_url, lambda m: "done", 2, s), redis_client)
    handles.append(rescuer)
    wait_until(lambda: succeeded(redis_client, ids), 15.0, "the tasks to be recovered and run")
    assert not registered(redis_client, first.worker_id), "the dead worker is still registered"


# --- Redis refusing an outcome for a reason other than a lost link --------------------------

#: How to make Redis refuse the worker's outcome writes, and to stop refusing: its ACL user
#: loses LREM or PUBLISH (inside a script Redis 7 answers ``ERR ... can't run this
#: command``), the server becomes a replica (READONLY), or it reaches maxmemory (OOM; a
#: script without flags is refused only if its first write comes before any other).
#: A script's writes before a refused command are kept (Redis does not roll back). Each
#: refusal comes with the INFO errorstats line that counts it.
REFUSALS: dict[str, tuple[Callable[[Client], Any], Callable[[Client], Any], str]] = {
    "ACL user without LREM": (
        lambda admin: admin.execute_command("ACL", "SETUSER", "qworker", "-lrem"),
        lambda admin: admin.execute_command("ACL", "SETUSER", "qworker", "+lrem"),
        "errorstat_ERR",
    ),
    "READONLY replica": (
        lambda admin: admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port())),
        lambda admin: admin.execute_command("REPLICAOF", "NO", "ONE"),
        "errorstat_READONLY",
    ),
    "out of memory": (
        lambda admin: admin.config_set("maxmemory", 1),
        lambda admin: admin.config_set("maxmemory", 0),
        "errorstat_OOM",
    ),
    "ACL user without PUBLISH": (
        lambda admin: admin.execute_command("ACL", "SETUSER", "qworker", "-publish"),
        lambda admin: admin.execute_command("ACL", "SETUSER", "qworker", "+publish"),
        "errorstat_ERR",
    ),
}


def acl_user_url(admin: Client, port: int) -> str:
    """Create the ACL user ``qworker`` (every command for now); a URL logging in as it."""
    admin.acl_setuser(
        "qworker",
        enabled=True,
        passwords=["+secret"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    return f"redis://qworker:secret@127.0.0.1:{port}/0"


def assert_kept_in_its_slot(admin: Client, inflight: str, held: str, waiting: str) -> None:
    """``held`` is not lost (in flight, or recorded by a write Redis let through), and while
    it is in flight its slot takes nothing else (``waiting`` stays pending)."""
    holding, result = ids_in(admin, inflight), stored_result(admin, held)
    recorded = result is not None and result["status"] == "succeeded"
    assert held in holding or recorded, f"task {held} lost: not in flight, not recorded"
    if held in holding:
        assert holding == [held], f"in flight {holding}: a slot still held took another task"
        assert ids_in(admin, KEYS.pending) == [waiting]


def error_count(admin: Client, stat: str) -> int:
    return int(admin.info("errorstats").get(stat, {}).get("count", 0))


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_a_redis_error_that_is_not_a_connection_error_while_recording_frees_no_slot_and_loses_no_task(  # noqa: E501 - the bullet's words
    refusal: str, tmp_path: Path, handles: list[Running], listen: Callable[[str], ResultListener]
) -> None:
    refuse, allow, stat = REFUSALS[refusal]
    with RedisServer(tmp_path / "redis") as server:
        admin = server.client()
        worker_url = acl_user_url(admin, server.port)
        published = listen(server.url)
        started, release, returned = threading.Event(), threading.Event(), threading.Event()
        runs: list[tuple[str, str, int]] = []

        def handler(message: TaskMessage) -> str:
            runs.append((threading.current_thread().name, message.task_id, message.delivery_count))
            if message.config.get("hold"):
                started.set()
                release.wait(30)
                returned.set()
            return f"done {message.task_id}"

        # many reconnect attempts: a worker that gives up does so for the refusal itself
        s = settings(max_reconnect_attempts=500)
        first = consumer(worker_url, handler, 1, s)
        handle = start(first, admin)
        handles.append(handle)
        [held] = enqueue(server.url, [payload(0, config={"hold": True})])
        assert started.wait(10), "the first task did not start"
        [waiting] = enqueue(server.url, [payload(1)])
        inflight = KEYS.inflight(first.worker_id)

        refuse(admin)
        release.set()
        assert returned.wait(10)
        refused = error_count(admin, stat)
        wait_until(
            lambda: (
                not handle.thread.is_alive()
                or error_count(admin, stat) >= refused + 3
                or ids_in(admin, inflight) != [held]
            ),
            15.0,
            f"the worker to exit, or to repeat the refused write ({stat})",
        )
        assert_kept_in_its_slot(admin, inflight, held, waiting)
        allow(admin)

        rescued: list[Running] = []

        def done() -> bool:
            if not handle.thread.is_alive() and not rescued:  # exited: recovery takes over
                rescued.append(start(consumer(server.url, handler, 1, s), admin))
                handles.append(rescued[0])
            workers = [first, *(r.consumer for r in rescued)]
            idle = not any(admin.llen(KEYS.inflight(w.worker_id)) for w in workers)
            told = all(published.counts()[task_id] for task_id in (held, waiting))
            return idle and told and succeeded(admin, [held, waiting])

        wait_until(
            done,
            20.0,
            "both tasks to succeed and be published, nothing left in flight, once Redis"
            " accepts writes again",
            lambda: f"published {dict(published.counts())}",
        )
        mine = [(task_id, count) for name, task_id, count in runs if task_id == held]
        print(
            f"{refusal}: the worker "
            + ("exited, leaving its task in flight" if rescued else "recorded it once allowed")
        )
        if rescued:
            assert isinstance(handle.error, QueueError), f"start() ended with {handle.error!r}"
            assert mine == [(held, 1), (held, 2)], runs
        else:
            assert handle.error is None
            assert mine == [(held, 1)], runs
        assert not dead_record_ids(admin, KEYS, held), "a successful task was dead-lettered"
        admin.close()


# --- a worker declared dead that still takes a task -----------------------------------------


def blocked_pops(client: Client) -> int:
    """Clients blocked in BLMOVE right now."""
    return sum(
        1
        for entry in client.client_list(_type="normal")
        if entry.get("cmd") == "blmove" and "b" in entry.get("flags", "")
    )


def test_a_worker_declared_dead_that_takes_a_task_before_its_next_heartbeat_does_not_strand_it(
    persistent_redis: RedisServer, workers: Workers, tmp_path: Path
) -> None:
    # a server of its own: no other test's client is blocked in a pop on it
    redis_url, redis_client = persistent_redis.url, persistent_redis.client()
    gate = tmp_path / "gate"
    keeper, _ = workers.start_registered(
        redis_client, KEYS, redis_url, concurrency=1, handler=GATED
    )
    [busy] = enqueue(redis_url, [gated_task(gate)])  # keeps the keeper's one slot busy
    wait_until(lambda: starts(workers.runs_path, busy), 10.0, "the keeper's task to start")
    # a long blocking pop, still waiting in Redis while its worker is frozen
    sleeper, sleeper_id = workers.start_registered(
        redis_client,
        KEYS,
        redis_url,
        concurrency=1,
        handler=GATED,
        queue_poll_timeout=20,
        stop_poll_slice=20,
        socket_timeout=30,
    )
    wait_until(lambda: blocked_pops(redis_client) == 1, 10.0, "the sleeper blocked in BLMOVE")

    sleeper.signal(signal.SIGSTOP)  # frozen: no heartbeat, its pop still pending in Redis
    wait_until(
        lambda: not registered(redis_client, sleeper_id),
        10.0,
        "the frozen worker to be declared dead and forgotten (its list was empty)",
    )
    [late] = enqueue(redis_url, [gated_task()])
    wait_until(
        lambda: ids_in(redis_client, KEYS.inflight(sleeper_id)) == [late],
        10.0,
        "the forgotten worker's pending pop to take the task",
    )
    sleeper.kill()  # it dies before it heartbeats again: nothing registered points at its list
    gate.touch()

    wait_until(
        lambda: succeeded(redis_client, [busy, late]),
        20.0,
        "the task taken by the forgotten worker to be found, recovered and run",
        lambda: f"in flight {ids_in(redis_client, KEYS.inflight(sleeper_id))}",
    )
    assert [(r["pid"], r["delivery_count"]) for r in starts(workers.runs_path, late)] == [
        (keeper.pid, 2)
    ]
    redis_client.close()


# --- a Redis outage longer than WORKER_DEAD_AFTER ------------------------------------------


def outage_warnings(worker: WorkerProcess) -> int:
    return worker.log().count("cannot reach Redis")


def redis_ms(client: Client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_redis_outage_longer_than_worker_dead_after_recovers_no_live_workers_tasks_as_crashes(
    persistent_redis: RedisServer, workers: Workers, tmp_path: Path
) -> None:
    server = persistent_redis
    client = server.client()
    gate = tmp_path / "gate"
    pairs = [
        workers.start_registered(client, KEYS, server.url, concurrency=1, handler=GATED)
        for _ in range(2)
    ]
    ids = enqueue(server.url, [gated_task(gate), gated_task(gate)])
    wait_until(
        lambda: all(client.llen(KEYS.inflight(wid)) == 1 for _, wid in pairs),
        10.0,
        "each worker to hold one long task",
    )
    holding = {wid: ids_in(client, KEYS.inflight(wid)) for _, wid in pairs}

    for outage in (1, 2, 3):
        before = {worker: outage_warnings(worker) for worker, _ in pairs}
        server.kill()
        for worker, count in before.items():  # 6 watcher ticks of 0.25 s: 1.5 s > 1 s
            wait_until(
                lambda w=worker, c=count: outage_warnings(w) >= c + 6,
                10.0,
                f"worker {worker.number} to see outage {outage} for 1.5 s",
            )
        server.restart()
        back = wait_until(lambda: redis_ms(client), 10.0, "Redis to answer")
        wait_until(
            lambda b=back: all((client.zscore(KEYS.workers, w) or 0) >= b for _, w in pairs),
            10.0,
            f"both workers to heartbeat after outage {outage}",
        )
        now = {wid: ids_in(client, KEYS.inflight(wid)) for _, wid in pairs}
        assert now == holding, f"after outage {outage}, tasks moved from live workers: {now}"
        assert client.llen(KEYS.pending) == 0
        crashes = client.hgetall(KEYS.crashes)
        assert not crashes, f"after outage {outage}, live workers' tasks counted as crashes"

    gate.touch()
    wait_until(lambda: succeeded(client, ids), 15.0, "both long tasks to finish")
    for task_id in ids:
        assert [r["delivery_count"] for r in starts(workers.runs_path, task_id)] == [1]
        assert not dead_record_ids(client, KEYS, task_id)
    assert [worker.returncode for worker, _ in pairs] == [None, None]
    client.close()


# --- stop() from a signal handler -----------------------------------------------------------

#: A program that runs a consumer on its main thread and stops it from a SIGTERM handler.
STOP_FROM_SIGNAL = """
import signal, sys
from prometheus_client import CollectorRegistry
from semibot_queue import QueueSettings, TaskConsumer

consumer = TaskConsumer(
    sys.argv[1], sys.argv[2], lambda message: None, 1,
    QueueSettings(heartbeat_interval=0.1, worker_dead_after=0.5),
    registry=CollectorRegistry(), handle_signals=False,
)
signal.signal(signal.SIGTERM, lambda signum, frame: consumer.stop())
consumer.start()
print("start() returned", flush=True)
"""


def test_stop_called_from_a_signal_handler_while_start_runs_on_the_main_thread_returns(
    persistent_redis: RedisServer, tmp_path: Path
) -> None:
    # a server of its own: no other test's client is blocked in a pop on it
    redis_url, redis_client = persistent_redis.url, persistent_redis.client()
    package_root = Path(semibot_queue.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    process = subprocess.Popen(
        [sys.executable, "-c", STOP_FROM_SIGNAL, redis_url, QUEUE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        wait_until(
            lambda: process.poll() is not None or redis_client.zcard(KEYS.workers) == 1,
            15.0,
            "the consumer to register",
        )
        assert process.poll() is None, process.communicate()[0].decode(errors="replace")
        wait_until(lambda: blocked_pops(redis_client) == 1, 10.0, "the consumer's blocking pop")
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=10.0)
        except subprocess.TimeoutExpired:
            pytest.fail("start() never returned: stop() from the signal handler deadlocked")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        redis_client.close()
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"start() returned" in output


# --- recovering big tasks -----------------------------------------------------------------

#: Characters of the content of each big task: about 1 MB once encoded.
MEGABYTE_CONTENT = 1_000_000
#: Tasks of a dead worker recovered at once.
BIG_TASKS = 20
#: Milliseconds one recover call may take, generously (a 1 MB task once took ~1 s).
RECOVER_BOUND_MS = 500


def slowlog(client: Client) -> list[tuple[int, list[bytes]]]:
    """Every SLOWLOG entry as (microseconds, command arguments)."""
    entries = client.execute_command("SLOWLOG", "GET", "-1")
    return [(int(entry[2]), list(entry[3])) for entry in entries]


def test_recovering_twenty_tasks_of_one_megabyte_each_takes_milliseconds(
    tmp_path: Path, workers: Workers
) -> None:
    extra = ["--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000"]
    with RedisServer(tmp_path / "redis", extra_args=extra) as server:
        client = server.client()
        big = [
            payload(n, messages=[{"role": "user", "content": "x" * MEGABYTE_CONTENT}])
            for n in range(2 * BIG_TASKS)
        ]
        ids = []
        for start_at in range(0, len(big), 10):
            ids += enqueue(server.url, big[start_at : start_at + 10], QueueSettings())
        ghosts = {"requeue": "ghost-requeue-1", "poison": "ghost-poison-1"}
        bodies: dict[str, bytes] = {}
        now_ms = redis_ms(client)
        for ghost in ghosts.values():
            for _ in range(BIG_TASKS):
                body = client.lmove(KEYS.pending, KEYS.inflight(ghost), "RIGHT", "LEFT")
                bodies[json.loads(body)["task_id"]] = body
            client.zadd(KEYS.workers, {ghost: now_ms - 60_000})  # silent for a minute
        poisoned = ids_in(client, KEYS.inflight(ghosts["poison"]))
        requeued = ids_in(client, KEYS.inflight(ghosts["requeue"]))
        assert len(next(iter(bodies.values()))) > 1_000_000
        # one crash short of MAX_DELIVERY_ATTEMPTS (3): the next recovery poisons them
        client.hset(KEYS.crashes, mapping=dict.fromkeys(poisoned, 2))
        client.slowlog_reset()

        workers.start(server.url, QUEUE, concurrency=4, handler=GATED)

        def recovered() -> bool:
            gone = not any(client.exists(KEYS.inflight(g)) for g in ghosts.values())
            return (
                gone
                and succeeded(client, requeued)
                and all(dead_record_ids(client, KEYS, task_id) for task_id in poisoned)
            )

        wait_until(recovered, 30.0, "both dead workers' tasks recovered, run or poisoned")
        timings = {
            name: [
                micros
                for micros, args in slowlog(client)
                if args[0].upper() == b"EVALSHA"
                and KEYS.inflight(ghost).encode() in args
                and KEYS.pending.encode() in args
            ]
            for name, ghost in ghosts.items()
        }
        for task_id in poisoned:
            [record_id] = dead_record_ids(client, KEYS, task_id)
            assert dead_records(client, KEYS, task_id)[0]["reason"] == "poison"
            assert client.hget(KEYS.dead_raw, record_id) == bodies[task_id], "not kept verbatim"
        client.close()
    assert all(timings.values()), f"no recover call found in the SLOWLOG: {timings}"
    worst = {name: max(micros) / 1000 for name, micros in timings.items()}
    print(
        f"recover of {BIG_TASKS} tasks of 1 MB: requeued in {worst['requeue']:.2f} ms,"
        f" poisoned in {worst['poison']:.2f} ms (longest script call, Redis SLOWLOG)"
    )
    assert max(worst.values()) < RECOVER_BOUND_MS, worst


# --- the Semibot runtime's wire format ------------------------------------------------------


def next_message(pubsub: Any) -> dict[str, Any] | None:
    message = pubsub.get_message(timeout=0.1)
    return message if message is not None and message["type"] == "message" else None


def test_a_task_lpushed_in_the_semibot_runtime_format_onto_agent_tasks_runs_and_its_result_is_published(  # noqa: E501 - the bullet's words
    redis_url: str, redis_client: Client, handles: list[Running]
) -> None:
    seen: list[TaskMessage] = []

    def handler(message: TaskMessage) -> dict[str, str]:
        seen.append(message)
        return {"answer": message.messages[-1]["content"].upper()}

    runtime_tasks = [
        {
            "task_id": "runtime-task-1",
            "session_id": "runtime-session-1",
            "agent_id": "agent-7",
            "org_id": "org-3",
            "messages": [{"role": "user", "content": "hello"}],
            "config": None,
            "metadata": {"enqueued_at": "2025-01-15T10:30:00.123456"},
        },
        {
            "task_id": "runtime-task-2",
            "session_id": "runtime-session-2",
            "agent_id": "agent-7",
            "org_id": "org-3",
            "messages": [{"role": "user", "content": "again"}],
            "config": None,
            "metadata": None,
        },
    ]
    pubsub = redis_client.pubsub()
    pubsub.subscribe(*(f"agent:results:{t['session_id']}" for t in runtime_tasks))
    confirmed: list[Any] = []

    def subscribed() -> bool:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] == "subscribe":
            confirmed.append(message)
        return len(confirmed) == len(runtime_tasks)

    wait_until(subscribed, 5.0, "both subscriptions confirmed")
    # the runtime's own defaults: queue "agent:tasks", channels "agent:results:<session>"
    runtime = TaskConsumer(
        redis_url, None, handler, 2, settings(), registry=CollectorRegistry(), handle_signals=False
    )
    handles.append(start(runtime, redis_client))
    for task in runtime_tasks:
        redis_client.lpush("agent:tasks", json.dumps(task))

    published = [wait_until(lambda: next_message(pubsub), 10.0, "a published result")]
    published.append(wait_until(lambda: next_message(pubsub), 10.0, "the second result"))
    pubsub.close()
    by_task = {json.loads(m["data"])["task_id"]: json.loads(m["data"]) for m in published}
    assert by_task["runtime-task-1"]["result"] == {"answer": "HELLO"}
    assert by_task["runtime-task-2"]["result"] == {"answer": "AGAIN"}
    assert {r["status"] for r in by_task.values()} == {"succeeded"}
    assert {m["channel"] for m in published} == {
        b"agent:results:runtime-session-1",
        b"agent:results:runtime-session-2",
    }
    assert sorted((m.task_id, m.config, m.delivery_count) for m in seen) == [
        ("runtime-task-1", {}, 1),
        ("runtime-task-2", {}, 1),
    ]
    assert redis_client.llen("agent:tasks") == 0
    stored = stored_result(redis_client, "runtime-task-1", KeySpace("agent:tasks"))
    assert stored is not None
    assert stored["result"] == {"answer": "HELLO"}
