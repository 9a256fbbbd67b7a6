"""The queue on the distributed engines: a real 3-master Redis Cluster and a Sentinel group.

Every test here is marked ``engines``: they start several redis-server processes each and
take seconds, so tox runs them once, in their own environment (``tox -e engines``), and the
fast suite leaves them out. The engines come from the fixtures of ``engines.py``
(``cluster3``, ``sentinels``); measured facts about them are in ENGINES.md.

What is checked is what the cluster and Sentinel URLs promise:

- a cluster URL naming any node reaches the master that owns the queue's hash slot, and
  the queue's keys live on that master only (three queues on three masters stay apart);
- a slot migrated while tasks flow (MOVED, ASK, TRYAGAIN) loses no task and runs none twice;
- a given ``RedisCluster`` or Sentinel-managed client is adopted;
- across a Sentinel failover, ``min_replicas_to_ack=1`` loses no acknowledged task; without
  it the loss is measured and printed, not asserted.

A task is *acknowledged* once ``enqueue`` returned its id. Each test ends with the ledger of
``fault_ledger``, read straight from the node that holds the queue: every acknowledged task
has exactly one outcome and nothing is left pending, scheduled or in flight. Handlers count
their runs per task id, so a task run twice is seen. Every wait is a deadline. Lines that
start with ``FIGURE`` (shown with ``pytest -s``) are the measured numbers the docs quote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.sentinel import Sentinel

from engines import RedisCluster, SentinelGroup
from fault_ledger import DEAD, MISSING, SUCCEEDED, Ledger, ResultListener, wait_until
from redis_server import HOST
from semibot_queue import (
    QueueConnectionError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue.keys import KeySpace
from support import payload

pytestmark = pytest.mark.engines

QUEUE = "agent:tasks"
KEYS = KeySpace(QUEUE)

#: Seconds a run of tasks may take to settle once the fault is over.
SETTLE_TIMEOUT_S = 60.0
#: Seconds a consumer or producer thread may take to end once told to stop.
STOP_TIMEOUT_S = 30.0

#: Settings for a queue whose node moves: heartbeats and retries are quick, and a caller
#: keeps retrying "not here, not now" (TRYAGAIN, READONLY, a failed WAIT) for 200 attempts
#: of at most 0.5 s, longer than any split slot or failover here.
RIDE_OUT: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "worker_dead_after": 2.0,
    "error_retry_delay": 0.05,
    "max_reconnect_delay": 0.5,
    "max_reconnect_attempts": 200,
}

Client = redis.Redis  # redis.Redis[bytes] at type-checking time

# --- helpers ---------------------------------------------------------------------------------


class Runs:
    """A handler that counts its runs per task id; the consumer's threads share it."""

    def __init__(self, work: float = 0.0) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def __call__(self, message: TaskMessage) -> str:
        with self._lock:
            self._counts[message.task_id] += 1
        if self._work:
            time.sleep(self._work)  # the task's own work, not a wait for anything
        return "done"

    def counts(self) -> Counter[str]:
        """How many times each task id ran."""
        with self._lock:
            return Counter(self._counts)

    def repeated(self) -> dict[str, int]:
        """Task ids that ran more than once, with their number of runs."""
        return {task_id: n for task_id, n in self.counts().items() if n > 1}


class LoadProducer:
    """Enqueues tasks one at a time from a named thread and keeps every acknowledged id.

    An id is acknowledged once ``enqueue`` returned it: the queue promised to keep that
    task. An enqueue that fails with QueueConnectionError (attempts exhausted) is a
    refusal: the caller was told, so its id is promised nothing. With ``total=None`` it
    runs until :meth:`stop_at` or :meth:`join`.
    """

    def __init__(self, producer: TaskProducer, *, total: int | None, pause: float) -> None:
        self._producer = producer
        self._total = total
        self._pause = pause
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._progress = threading.Condition()
        self._acknowledged: list[str] = []
        self.refused: list[str] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, name=f"engine-producer-{producer.keys.queue}"
        )

    @property
    def acknowledged(self) -> list[str]:
        """The ids ``enqueue`` returned so far, in order."""
        with self._progress:
            return list(self._acknowledged)

    def start(self) -> None:
        self._thread.start()

    def wait_acknowledged(self, count: int, timeout: float) -> None:
        """Wait until ``count`` tasks are acknowledged; AssertionError after ``timeout``."""
        with self._progress:
            done = self._progress.wait_for(
                lambda: len(self._acknowledged) >= count or not self._thread.is_alive(),
                timeout,
            )
            seen = len(self._acknowledged)
        assert seen >= count, (
            f"{seen} of {count} tasks acknowledged within {timeout} s (waited: {done},"
            f" refused {len(self.refused)}, errors {self.errors!r})"
        )

    def wait_for_more(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for one more acknowledged task; whether it came."""
        with self._progress:
            seen = len(self._acknowledged)
            return self._progress.wait_for(lambda: len(self._acknowledged) > seen, timeout)

    def stop_at(self, deadline: float) -> None:
        """Enqueue nothing new after ``deadline`` (``time.monotonic()`` seconds)."""
        self._deadline = deadline

    def join(self, timeout: float) -> None:
        """Stop (when ``total`` is None), wait for the thread; assert it ended well."""
        if self._total is None and self._deadline == float("inf"):
            self._stop.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self._stop.set()
        assert not alive, f"producer still enqueuing after {timeout} s"
        assert not self.errors, f"producer failed: {self.errors!r}"

    def _run(self) -> None:
        try:
            self._enqueue_until_told()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(exc)
        finally:
            with self._progress:  # waiters see the thread end
                self._progress.notify_all()

    def _enqueue_until_told(self) -> None:
        sent = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            if self._total is not None and sent >= self._total:
                return
            task = payload(sent)
            sent += 1
            try:
                task_id = self._producer.enqueue(task)
            except QueueConnectionError:
                self.refused.append(task.task_id)
                continue
            with self._progress:
                self._acknowledged.append(task_id)
                self._progress.notify_all()
            if self._pause:
                self._stop.wait(self._pause)  # pacing the load, not waiting for anything


@contextmanager
def running_consumer(
    url: str | None,
    queue: str,
    handler: Callable[[TaskMessage], Any],
    admin: Client,
    *,
    concurrency: int = 1,
    client: Any = None,
    settings: QueueSettings | None = None,
) -> Iterator[TaskConsumer]:
    """A TaskConsumer of ``queue`` in a thread of this process, registered (seen by
    ``admin``, a plain client of the node holding the queue) before the block runs."""
    consumer = TaskConsumer(
        url,
        queue,
        handler,
        concurrency,
        settings or QueueSettings(**RIDE_OUT),
        client=client,
        registry=CollectorRegistry(),
        handle_signals=False,
        rand=lambda: 0.5,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"engine-consumer-{queue}")
    thread.start()
    try:
        workers = KeySpace(queue).workers
        wait_until(
            lambda: errors or admin.zscore(workers, consumer.worker_id) is not None,
            10.0,
            f"the consumer of {queue} to register",
        )
        yield consumer
    finally:
        consumer.stop()
        thread.join(STOP_TIMEOUT_S)
        consumer.disconnect()
    assert not thread.is_alive(), f"the consumer of {queue} did not stop"
    if errors:
        raise errors[0]


def other_port(cluster: RedisCluster, slot: int) -> int:
    """A master of ``cluster`` that does not own ``slot``."""
    owner = cluster.owner_port(slot)
    return next(port for port in cluster.ports if port != owner)


def keys_on(cluster: RedisCluster, port: int) -> set[str]:
    """Every key stored on the node at ``port``."""
    with cluster.node_client(port) as client:
        return {key.decode() for key in client.scan_iter(count=1000)}


def of_queue(key: str, queue: str) -> bool:
    """Whether ``key`` is one of the keys of ``queue`` (its pending list or ``{queue}:...``)."""
    return key == queue or key.startswith("{" + queue + "}:")


def assert_ran_once_and_succeeded(outcomes: dict[str, str], runs: Runs, ids: list[str]) -> None:
    assert Counter(outcomes.values()) == Counter({SUCCEEDED: len(ids)}), Counter(outcomes.values())
    counts = runs.counts()
    assert counts == Counter(dict.fromkeys(ids, 1)), (
        f"runs per task: {len(counts)} ids ran, {len(ids)} expected;"
        f" ran more than once: {runs.repeated()};"
        f" never ran: {len(set(ids) - set(counts))}; ran but not enqueued:"
        f" {len(set(counts) - set(ids))}"
    )


def stats_of(url: str, queue: str) -> dict[str, Any]:
    """What ``python -m semibot_queue stats --json`` prints for ``queue``; it must exit 0."""
    argv = [sys.executable, "-m", "semibot_queue", "stats", "--redis-url", url]
    done = subprocess.run(
        [*argv, "--queue", queue, "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"stats exited {done.returncode}:\n{done.stdout}{done.stderr}"
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


# --- 1. a cluster, reached through a node that does not hold the queue -----------------------


def test_a_cluster_url_naming_only_a_node_without_the_queue_runs_tasks_end_to_end(
    cluster3: RedisCluster,
) -> None:
    slot = cluster3.slot_of(QUEUE)
    owner = cluster3.owner_port(slot)
    seed = other_port(cluster3, slot)
    assert cluster3.moved_to(seed, QUEUE) == owner, "the seed must not serve the queue's slot"
    url = f"redis+cluster://{HOST}:{seed}"
    listener = ResultListener(f"redis://{HOST}:{seed}", KEYS)  # PUBLISH reaches every node
    listener.start()
    runs = Runs(work=0.002)
    try:
        with TaskProducer(url, QUEUE) as producer, cluster3.node_client(owner) as admin:
            ids = [producer.enqueue(payload(n)) for n in range(200)]
            with running_consumer(url, QUEUE, runs, admin):
                # asked while the consumer works through the 200: the result comes by pub/sub
                result = producer.wait_for_result(ids[-1], timeout=20.0)
                assert result is not None, f"no result for {ids[-1]} within 20 s"
                assert (result.task_id, result.status) == (ids[-1], "succeeded")
                outcomes = Ledger(admin, KEYS).wait_settled(ids, SETTLE_TIMEOUT_S)
                stats = stats_of(url, QUEUE)
            first = producer.wait_for_result(ids[0], timeout=5.0)
            assert first is not None
            assert first.status == "succeeded"
        wait_until(
            lambda: sum(listener.counts().values()) >= len(ids), 10.0, "every result published"
        )
    finally:
        listener.stop()
    assert_ran_once_and_succeeded(outcomes, runs, ids)
    assert listener.counts() == Counter(dict.fromkeys(ids, 1))
    assert (stats["queue"], stats["pending"], stats["in_flight"]) == (QUEUE, 0, 0), stats
    assert [worker["state"] for worker in stats["workers"]] == ["alive"], stats
    on_owner = keys_on(cluster3, owner)
    assert KEYS.result(ids[0]) in on_owner
    assert all(of_queue(key, QUEUE) for key in on_owner), sorted(on_owner)[:10]
    for port in cluster3.ports:
        if port != owner:
            assert keys_on(cluster3, port) == set(), f"keys on node {port}, not the owner"


# --- 2. three queues on three masters -----------------------------------------------------


def queues_on_every_master(cluster: RedisCluster) -> dict[int, str]:
    """One queue name per master of ``cluster``, by the port of the master owning it."""
    found: dict[int, str] = {}
    for n in range(1000):
        name = f"agent:tasks:{n}"
        found.setdefault(cluster.owner_port(cluster.slot_of(name)), name)
        if len(found) == len(cluster.ports):
            return found
    raise AssertionError(f"no queue name found for every master: {found}")


def test_three_queues_on_three_masters_each_run_their_own_tasks_once(
    cluster3: RedisCluster,
) -> None:
    queues = queues_on_every_master(cluster3)
    assert len({cluster3.slot_of(name) for name in queues.values()}) == 3
    per_queue = 150
    runs = {name: Runs() for name in queues.values()}
    loads: dict[str, LoadProducer] = {}
    outcomes: dict[str, dict[str, str]] = {}
    with ExitStack() as stack:
        for port, name in queues.items():
            admin = stack.enter_context(cluster3.node_client(port))
            stack.enter_context(
                running_consumer(cluster3.url, name, runs[name], admin, concurrency=2)
            )
            producer = stack.enter_context(TaskProducer(cluster3.url, name))
            loads[name] = LoadProducer(producer, total=per_queue, pause=0.0)
        for load in loads.values():  # all three at once
            load.start()
        for port, name in queues.items():
            loads[name].join(STOP_TIMEOUT_S)
            ids = loads[name].acknowledged
            assert len(ids) == per_queue, f"{name}: {len(ids)} acknowledged"
            assert not loads[name].refused, f"{name}: refused {loads[name].refused}"
            with cluster3.node_client(port) as admin:
                outcomes[name] = Ledger(admin, KeySpace(name)).wait_settled(ids, SETTLE_TIMEOUT_S)
    for port, name in queues.items():
        ids = loads[name].acknowledged
        assert_ran_once_and_succeeded(outcomes[name], runs[name], ids)
        held = keys_on(cluster3, port)
        assert KeySpace(name).result(ids[0]) in held, f"{name}'s results are not on {port}"
        strangers = sorted(key for key in held if not of_queue(key, name))
        assert not strangers, f"master {port} holds keys not of {name}: {strangers[:10]}"


# --- 3. the queue's slot migrated under load ----------------------------------------------


def test_a_slot_migrated_under_load_loses_no_task_and_runs_none_twice(
    cluster3: RedisCluster,
) -> None:
    slot = cluster3.slot_of(QUEUE)
    source = cluster3.owner_port(slot)
    target = other_port(cluster3, slot)
    bystander = next(port for port in cluster3.ports if port not in (source, target))
    settings = QueueSettings(**RIDE_OUT)
    # 4 workers of 20 ms tasks run 200 a second, the producer enqueues about 400: a backlog
    # builds, so the pending list and tasks in flight are on the move with the slot
    runs = Runs(work=0.02)
    total = 1500
    listener = ResultListener(f"redis://{HOST}:{bystander}", KEYS)
    listener.start()
    try:
        with (
            cluster3.node_client(source) as admin,
            running_consumer(cluster3.url, QUEUE, runs, admin, concurrency=4, settings=settings),
            TaskProducer(cluster3.url, QUEUE, settings) as producer,
        ):
            load = LoadProducer(producer, total=total, pause=0.002)
            load.start()
            load.wait_acknowledged(300, timeout=30.0)
            at_start = len(load.acknowledged)
            keys_before = int(admin.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
            backlog = Ledger(admin, KEYS).leftovers()
            started = time.monotonic()
            # between two batches the slot's keys are split: let more load arrive meanwhile
            cluster3.migrate_slot(
                slot, target, batch=5, between_batches=lambda: load.wait_for_more(0.02)
            )
            migration_s = time.monotonic() - started
            during = len(load.acknowledged) - at_start
            load.join(STOP_TIMEOUT_S + SETTLE_TIMEOUT_S)
            ids = load.acknowledged
            with cluster3.node_client(target) as new_owner:
                outcomes = Ledger(new_owner, KEYS).wait_settled(ids, SETTLE_TIMEOUT_S)
        wait_until(lambda: sum(listener.counts().values()) >= len(ids), 10.0, "every result")
    finally:
        listener.stop()
    figure = (
        f"FIGURE slot_migration_under_load tasks={len(ids)} keys_moved={keys_before}"
        f" migration_s={migration_s:.2f} acknowledged_during_migration={during}"
        f" pending_at_start={backlog.get('pending', 0)}"
    )
    print(figure)
    assert backlog.get("pending"), f"{figure}: no backlog when the migration started: {backlog}"
    assert len(backlog) > 1, f"{figure}: no task in flight when the migration started: {backlog}"
    assert (len(ids), load.refused) == (total, []), figure
    assert_ran_once_and_succeeded(outcomes, runs, ids)
    assert listener.doubles() == {}, f"results published twice: {listener.doubles()}"
    assert cluster3.owner_port(slot) == target
    with cluster3.node_client(source) as old, cluster3.node_client(target) as new:
        assert int(old.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) == 0
        assert int(new.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)) > 0
        assert new.exists(KEYS.result(ids[0]), KEYS.result(ids[-1])) == 2


# --- 4. adopted clients ---------------------------------------------------------------------


def run_through_a_given_client(given: Any, admin: redis.Redis) -> None:
    """100 tasks through a producer and a consumer both given ``given``, checked on the
    queue's node through ``admin``; they leave ``given`` open, and it is closed here."""
    runs = Runs()
    try:
        with (
            TaskProducer(queue_name=QUEUE, client=given) as producer,
            admin,
            running_consumer(None, QUEUE, runs, admin, concurrency=2, client=given),
        ):
            ids = [producer.enqueue(payload(n)) for n in range(100)]
            result = producer.wait_for_result(ids[-1], timeout=20.0)
            assert result is not None
            assert result.status == "succeeded"
            outcomes = Ledger(admin, KEYS).wait_settled(ids, SETTLE_TIMEOUT_S)
        assert given.ping(), "the given client belongs to its owner: it stays open"
    finally:
        given.close()
    assert_ran_once_and_succeeded(outcomes, runs, ids)


def test_a_given_redis_cluster_client_is_adopted_and_reaches_the_queues_master(
    cluster3: RedisCluster,
) -> None:
    slot = cluster3.slot_of(QUEUE)
    owner = cluster3.owner_port(slot)
    given = redis.RedisCluster(host=HOST, port=other_port(cluster3, slot))
    run_through_a_given_client(given, cluster3.node_client(owner))
    assert all(of_queue(key, QUEUE) for key in keys_on(cluster3, owner))
    for port in cluster3.ports:
        if port != owner:
            assert keys_on(cluster3, port) == set(), f"keys on node {port}, not the owner"


def test_a_given_sentinel_managed_client_is_adopted_and_reaches_the_master(
    sentinels: SentinelGroup,
) -> None:
    given = Sentinel([(HOST, port) for port in sentinels.sentinel_ports]).master_for("semibot")
    run_through_a_given_client(given, sentinels.data_client(sentinels.master_port()))


# --- 5 and 6. a Sentinel failover under load ---------------------------------------------


@dataclass
class FailoverRun:
    """What one failover under load did: the ids acknowledged, the ports, the time taken."""

    old_port: int
    new_port: int = 0
    failover_s: float = 0.0
    acknowledged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def demoted(old_master: Client, new_port: int) -> bool:
    """Whether ``old_master`` is now a replica of the master on ``new_port``, in sync."""
    role = old_master.execute_command("ROLE")
    return bool(role[0] == b"slave" and int(role[2]) == new_port and role[3] == b"connected")


def duplicated(runs: Runs) -> str:
    """``duplicated_runs=N tasks_run_twice_or_more=M`` for a FIGURE line."""
    repeated = runs.repeated()
    extra = sum(repeated.values()) - len(repeated)
    return f"duplicated_runs={extra} tasks_run_twice_or_more={len(repeated)}"


@contextmanager
def failover_under_load(
    sentinels: SentinelGroup, runs: Runs, settings: QueueSettings
) -> Iterator[FailoverRun]:
    """A producer enqueuing from a thread and a consumer running throughout; ~1 s into the
    load ``SENTINEL FAILOVER``, then 3 s more of enqueueing. The block runs while the
    consumer still runs, after the producer stopped."""
    run = FailoverRun(old_port=sentinels.master_port())
    url = sentinels.url
    with (
        sentinels.data_client(run.old_port) as admin,
        running_consumer(url, QUEUE, runs, admin, concurrency=4, settings=settings),
        TaskProducer(url, QUEUE, settings) as producer,
    ):
        load = LoadProducer(producer, total=None, pause=0.002)
        load.start()
        try:
            load.wait_acknowledged(200, timeout=20.0)  # about a second of load
            run.failover_s = sentinels.failover()
            load.stop_at(time.monotonic() + 3.0)
        finally:
            # with WAIT, an enqueue on the new master waits until it has a replica again:
            # the old master, once Sentinel demotes it (11-16 s after the failover)
            load.join(STOP_TIMEOUT_S + 30.0)
        run.acknowledged, run.refused = load.acknowledged, load.refused
        run.new_port = sentinels.master_port()
        yield run


def test_with_min_replicas_to_ack_a_sentinel_failover_loses_no_acknowledged_task(
    sentinels: SentinelGroup,
) -> None:
    settings = QueueSettings(**RIDE_OUT, min_replicas_to_ack=1, replica_ack_timeout=0.5)
    runs = Runs()
    # on the replica, which becomes the master: it hears the results published before the
    # failover (PUBLISH is replicated) and after it, when a repeated ack must not publish again
    listener = ResultListener(f"redis://{HOST}:{sentinels.data_ports[1]}", KEYS)
    listener.start()
    try:
        with failover_under_load(sentinels, runs, settings) as run:
            assert run.new_port != run.old_port, "the failover did not change the master"
            assert run.new_port == sentinels.data_ports[1]
            with sentinels.data_client(run.new_port) as new_master:
                ledger = Ledger(new_master, KEYS)
                wait_until(
                    lambda: ledger.settled(run.acknowledged),
                    SETTLE_TIMEOUT_S,
                    "every acknowledged task to settle on the new master",
                    lambda: ledger.summary(run.acknowledged),
                )
                outcomes = ledger.outcomes(run.acknowledged)
                leftovers = ledger.leftovers()
    finally:
        listener.stop()
    ids = run.acknowledged
    lost = [task_id for task_id in ids if outcomes[task_id] != SUCCEEDED]
    figure = (
        f"FIGURE sentinel_loss_with_wait acknowledged={len(ids)} lost={len(lost)}"
        f" failover_s={run.failover_s:.2f} refused={len(run.refused)} {duplicated(runs)}"
    )
    print(figure)
    assert not lost, f"{figure}: acknowledged tasks without a result: {lost[:10]}"
    assert not leftovers, f"{figure}: left over on the new master: {leftovers}"
    assert not run.refused, figure
    ran = runs.counts()
    never_ran = [task_id for task_id in ids if not ran[task_id]]
    assert not never_ran, f"{figure}: succeeded without running: {never_ran[:10]}"
    # a result may be published again only by a run again (at-least-once), never by an ack
    # repeated after its WAIT failed
    doubled = {task_id: n for task_id, n in listener.doubles().items() if ran[task_id] < n}
    assert not doubled, f"{figure}: results published more often than run: {doubled}"


def test_without_min_replicas_to_ack_the_loss_across_a_sentinel_failover_is_measured(
    sentinels: SentinelGroup,
) -> None:
    settings = QueueSettings(**RIDE_OUT, min_replicas_to_ack=0)
    runs = Runs()
    with failover_under_load(sentinels, runs, settings) as run:
        assert run.new_port != run.old_port, "the failover did not change the master"
        with (
            sentinels.data_client(run.old_port) as old_master,
            sentinels.data_client(run.new_port) as new_master,
        ):
            # the old master takes writes until Sentinel demotes it; then it copies the new one
            wait_until(
                lambda: demoted(old_master, run.new_port),
                60.0,
                f"the old master {run.old_port} to replicate the new one {run.new_port}",
                lambda: repr(old_master.execute_command("ROLE")),
            )
            ledger = Ledger(new_master, KEYS)
            wait_until(
                lambda: not ledger.leftovers(),
                SETTLE_TIMEOUT_S,
                "the consumer to drain the new master",
                lambda: ledger.summary(run.acknowledged),
            )
            outcomes = ledger.outcomes(run.acknowledged)
    ids = run.acknowledged
    counts = Counter(outcomes.values())
    found = counts[SUCCEEDED] + counts[DEAD]
    lost = counts[MISSING]
    figure = (
        f"FIGURE sentinel_loss_without_wait acknowledged={len(ids)} lost={lost}"
        f" failover_s={run.failover_s:.2f} {duplicated(runs)}"
    )
    print(figure)
    assert found + lost == len(ids), f"{figure}: outcomes {dict(counts)}"
    assert ids, figure
    assert not run.refused, figure
    ran = runs.counts()
    unrun = [task_id for task_id, o in outcomes.items() if o == SUCCEEDED and not ran[task_id]]
    assert not unrun, f"{figure}: succeeded without running: {unrun[:10]}"
