"""Chaos: several hundred misbehaving tasks, a worker SIGKILLed, Redis restarted; then the ledger.

Each task's handler behaviour is drawn at random from a seed (``chaos_handlers.plan``): it
returns odd values (None, deep or recursive structures, sets, NaN, lone surrogates, values
near and over MAX_PAYLOAD_BYTES), raises (BaseException subclasses, errors whose message
cannot be encoded, whose ``__str__`` raises or is 10 MB long, PermanentTaskError, errors that
go away on a later attempt), or sleeps. The behaviour is a pure function of (seed, task id,
attempt), so the test knows each task's final outcome in advance.

Two worker processes run the tasks; one is SIGKILLed mid-run (a replacement starts) and
Redis (AOF, fsync always) is down for longer than WORKER_DEAD_AFTER, then restarted. The
ledger, read straight from Redis: every task has exactly one final outcome (a succeeded
result, or one dead-letter record with its failed result), the one its plan predicts;
nothing is left pending, scheduled, in flight or counted as a crash; every registered
worker is alive and holds nothing.

The seed is ``$CHAOS_SEED`` if set, else random; it is printed and named in every assertion
message: ``CHAOS_SEED=<seed> pytest tests/test_chaos.py`` replays a failure.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chaos_handlers import (
    BIG_PAYLOAD_KINDS,
    DEAD,
    LONG_ERROR_CHARS,
    SUCCEEDED,
    Expected,
    expect,
    plan,
)
from fault_handlers import read_runs
from fault_ledger import duplicate_runs, wait_until
from fault_workers import FAST_SETTINGS, START_TIMEOUT_S, WorkerProcess, Workers
from redis_server import RedisServer
from semibot_queue import QueueSettings, TaskPayload, TaskProducer
from semibot_queue.keys import KeySpace

QUEUE = "chaos"
KEYS = KeySpace(QUEUE)
HANDLER = "chaos_handlers:handle"
SEED_ENV = "CHAOS_SEED"

#: Tasks enqueued.
TASKS = 400
#: MAX_PAYLOAD_BYTES of producer and workers (small, so "near the limit" costs little).
LIMIT = 65_536
#: MAX_RETRY_ATTEMPTS of the workers.
MAX_RETRIES = 3
#: Characters of the message content of a task made near the limit.
BIG_CONTENT = LIMIT - 1_000
#: Slots per worker.
CONCURRENCY = 4
#: Settings of every chaos worker, on top of fault_workers.FAST_SETTINGS.
SETTINGS: dict[str, str | float] = {
    "max_payload_bytes": LIMIT,
    "max_retry_attempts": MAX_RETRIES,
    "retry_max_delay": 0.4,
}
#: Fractions of the tasks finished before the SIGKILL, and before the Redis restart.
KILL_AT = 0.2
RESTART_AT = 0.5
#: Watcher warnings ("cannot reach Redis", one per 0.25 s tick) each worker must log
#: before Redis comes back: an outage of 1.5 s or more, longer than WORKER_DEAD_AFTER (1 s).
OUTAGE_WARNINGS = 6
#: Seconds for each stage, and for everything to settle after the last fault.
STAGE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 45.0

Client = redis.Redis  # redis.Redis[bytes] at type-checking time


def chaos_seed() -> int:
    configured = os.environ.get(SEED_ENV)
    return int(configured) if configured else random.SystemRandom().randrange(2**32)


@pytest.fixture
def seed() -> int:
    value = chaos_seed()
    print(f"chaos seed {value} (replay: {SEED_ENV}={value} pytest tests/test_chaos.py)")
    return value


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


# --- the tasks ---------------------------------------------------------------------------------


def payloads(seed: int) -> list[TaskPayload]:
    """The tasks of one run: ids derived from the seed, so the plans can be replayed."""
    made = []
    for n in range(TASKS):
        task_id = f"chaos-{seed}-{n}"
        big = plan(seed, task_id).kind in BIG_PAYLOAD_KINDS
        made.append(
            TaskPayload(
                task_id=task_id,
                session_id=f"chaos-session-{n % 17}",
                agent_id="agent-chaos",
                org_id="org-chaos",
                messages=[{"role": "user", "content": "q" * BIG_CONTENT if big else f"q{n}"}],
                config={"chaos_seed": seed, "limit": LIMIT},
            )
        )
    return made


def task_id_of(stored: bytes) -> str:
    return str(json.loads(stored)["task_id"])


# --- reading the ledger ------------------------------------------------------------------------


def read_outcomes(
    client: Client, ids: list[str]
) -> dict[str, tuple[dict[str, Any] | None, list[dict[str, Any]]]]:
    """Per task: its stored result (or None) and its dead-letter records."""
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.get(KEYS.result(task_id))
        # record ids are "<task id>#<n>"; '$' sorts right after '#'
        pipe.zrangebylex(KEYS.dead_ids, f"[{task_id}#", f"({task_id}$")
    replies = pipe.execute()
    record_ids = [rid for index in range(len(ids)) for rid in replies[2 * index + 1]]
    records = (
        dict(zip(record_ids, client.hmget(KEYS.dead, record_ids), strict=True))
        if (record_ids)
        else {}
    )
    found = {}
    for index, task_id in enumerate(ids):
        raw = replies[2 * index]
        kept = [records[rid] for rid in replies[2 * index + 1]]
        found[task_id] = (
            None if raw is None else json.loads(raw),
            [json.loads(record) for record in kept if record is not None],
        )
    return found


def classify(result: dict[str, Any] | None, records: list[dict[str, Any]]) -> str:
    """SUCCEEDED, DEAD, or what is wrong with a task's final state."""
    status = None if result is None else result.get("status")
    if status == "succeeded" and not records:
        return SUCCEEDED
    if status == "failed" and len(records) == 1:
        return DEAD
    return f"result status {status}, {len(records)} dead-letter record(s)"


def finished_count(client: Client, ids: list[str]) -> int:
    """How many tasks have a stored result (every final outcome stores one)."""
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.exists(KEYS.result(task_id))
    return sum(pipe.execute())


def leftovers(client: Client) -> dict[str, int]:
    """Tasks still waiting anywhere, and delivery counts still kept."""
    left = {
        "pending": int(client.llen(KEYS.pending)),
        "scheduled": int(client.zcard(KEYS.scheduled)),
        "crash counts": int(client.hlen(KEYS.crashes)),
        "release counts": int(client.hlen(KEYS.releases)),
    }
    for key in client.scan_iter(match=KEYS.inflight_prefix + "*", count=1000):
        left[key.decode()] = int(client.llen(key))
    return {where: count for where, count in left.items() if count}


def settled(client: Client, ids: list[str]) -> bool:
    found = read_outcomes(client, ids)
    done = all(classify(*found[task_id]) in (SUCCEEDED, DEAD) for task_id in ids)
    return done and not leftovers(client)


def summary(client: Client, ids: list[str]) -> str:
    found = read_outcomes(client, ids)
    counts = Counter(classify(*found[task_id]) for task_id in ids)
    return f"outcomes {dict(counts)}, leftovers {leftovers(client)}"


# --- the faults ----------------------------------------------------------------------------


class ChaosRun:
    """One run: the tasks, the workers, the faults injected, what the ledger finds."""

    def __init__(self, seed: int, server: RedisServer, client: Client, workers: Workers) -> None:
        self.seed = seed
        self.tag = f"[chaos seed {seed}; replay: {SEED_ENV}={seed} pytest tests/test_chaos.py]"
        self.server = server
        self.client = client
        self.workers = workers
        self.tasks = payloads(seed)
        self.ids = [task.task_id for task in self.tasks]
        self.alive: dict[WorkerProcess, str] = {}
        self.doomed: WorkerProcess | None = None
        #: Task ids in the SIGKILLed worker's in-flight list when it died.
        self.held: set[str] = set()
        self.outage_s = 0.0
        #: Workers that exited by themselves: (number, exit status).
        self.deaths: list[tuple[int, int]] = []

    def wait(self, condition: Any, what: str, timeout: float = STAGE_TIMEOUT_S) -> Any:
        return wait_until(
            condition,
            timeout,
            f"{what} {self.tag}",
            lambda: summary(self.client, self.ids),
        )

    def enqueue(self) -> None:
        settings = QueueSettings(max_payload_bytes=LIMIT)
        with TaskProducer(self.server.url, QUEUE, settings) as producer:
            assert producer.enqueue_many(self.tasks) == self.ids, self.tag
        for stored in self.client.lrange(KEYS.pending, 0, -1):
            if plan(self.seed, task_id_of(stored)).kind in BIG_PAYLOAD_KINDS:
                # its retry copy, keeping a LONG_ERROR_CHARS error, cannot fit the limit
                assert LIMIT - LONG_ERROR_CHARS < len(stored) <= LIMIT, (self.tag, len(stored))

    def start_workers(self, count: int) -> None:
        """Start ``count`` chaos workers at once and wait until each has registered."""
        started = [
            self.workers.start(
                self.server.url, QUEUE, concurrency=CONCURRENCY, handler=HANDLER, **SETTINGS
            )
            for _ in range(count)
        ]
        for worker in started:
            self.alive[worker] = wait_until(
                lambda w=worker: w.returncode is None and w.worker_id(self.client, KEYS),
                START_TIMEOUT_S,
                f"worker {worker.number} to register {self.tag}",
                lambda w=worker: f"exit status {w.returncode}, log:\n{w.log()[-2000:]}",
            )

    def wait_finished(self, fraction: float) -> None:
        self.wait(
            lambda: finished_count(self.client, self.ids) >= fraction * TASKS,
            f"{fraction:.0%} of the tasks to finish",
        )

    def kill_a_worker(self) -> None:
        """SIGKILL a worker while it holds tasks; start a replacement."""
        doomed, doomed_id = next(iter(self.alive.items()))
        inflight = KEYS.inflight(doomed_id)
        self.wait(lambda: self.client.llen(inflight) > 0, f"worker {doomed.number} to hold a task")
        doomed.kill()
        del self.alive[doomed]
        self.doomed = doomed
        self.held = {task_id_of(raw) for raw in self.client.lrange(inflight, 0, -1)}
        self.start_workers(1)

    def restart_redis(self) -> None:
        """Kill Redis; restart it once every worker has seen it gone for 1.5 s or more."""
        seen_before = {worker: outage_warnings(worker) for worker in self.alive}
        self.server.kill()
        killed_at = time.monotonic()
        for worker, before in seen_before.items():
            self.wait(
                lambda w=worker, b=before: outage_warnings(w) >= b + OUTAGE_WARNINGS,
                f"worker {worker.number} to see the outage for 1.5 s",
            )
        self.server.restart()
        self.outage_s = time.monotonic() - killed_at

    def settle(self) -> None:
        """Wait until every task settled; a worker that exits meanwhile is replaced (and
        reported by the ledger)."""

        def supervise() -> bool:
            for worker in list(self.alive):
                if worker.returncode is not None:
                    self.deaths.append((worker.number, worker.returncode))
                    del self.alive[worker]
                    self.start_workers(1)
            return settled(self.client, self.ids)

        self.wait(supervise, "every task to settle", SETTLE_TIMEOUT_S)


def outage_warnings(worker: WorkerProcess) -> int:
    return worker.log().count("cannot reach Redis")


def test_chaos_every_task_ends_in_the_outcome_its_plan_predicts(
    seed: int, persistent_redis: RedisServer, workers: Workers
) -> None:
    began = time.monotonic()
    client = persistent_redis.client()
    run = ChaosRun(seed, persistent_redis, client, workers)
    try:
        run.enqueue()
        run.start_workers(2)
        run.wait_finished(KILL_AT)
        run.kill_a_worker()
        run.wait_finished(RESTART_AT)
        run.restart_redis()
        run.settle()
        took = time.monotonic() - began
        check_ledger(run, took)
    finally:
        client.close()


def check_ledger(run: ChaosRun, took: float) -> None:
    """Print the ledger's figures, then assert it."""
    tag, seed, ids, client = run.tag, run.seed, run.ids, run.client
    found = read_outcomes(client, ids)
    outcomes = {task_id: classify(*found[task_id]) for task_id in ids}
    reasons = Counter(
        records[0]["reason"] for task_id, (_, records) in found.items() if outcomes[task_id] == DEAD
    )
    counts = Counter(outcomes.values())
    runs = read_runs(run.workers.runs_path)
    doomed_pid = run.doomed.pid if run.doomed else -1
    again = {r["task_id"] for r in runs if r["task_id"] in run.held and r["pid"] != doomed_pid}
    print(
        f"chaos ledger, seed {seed}: {TASKS} tasks, {counts[SUCCEEDED]} succeeded,"
        f" {counts[DEAD]} dead-lettered {dict(sorted(reasons.items()))};"
        f" a SIGKILLed worker held {len(run.held)} task(s), {len(again)} of them run again;"
        f" Redis down {run.outage_s:.1f} s then restarted; {len(runs)} handler runs;"
        f" settled in {took:.1f} s"
    )
    by_kind: dict[str, Counter[str]] = {}
    for task_id, (_, records) in found.items():
        end = f"dead:{records[0]['reason']}" if outcomes[task_id] == DEAD else outcomes[task_id]
        by_kind.setdefault(plan(seed, task_id).kind, Counter())[end] += 1
    print("by kind:", {kind: dict(ends) for kind, ends in sorted(by_kind.items())})

    dead_after = float(FAST_SETTINGS["worker_dead_after"])
    assert run.outage_s > dead_after, f"{tag} Redis was down {run.outage_s:.2f} s only"
    assert not run.deaths, f"{tag} workers exited by themselves (number, status): {run.deaths}"
    wrong = {task_id: o for task_id, o in outcomes.items() if o not in (SUCCEEDED, DEAD)}
    assert not wrong, f"{tag} tasks without exactly one final outcome: {wrong}"
    assert not leftovers(client), f"{tag} left over: {leftovers(client)}"
    registered = {member.decode() for member in client.zrange(KEYS.workers, 0, -1)}
    assert registered == set(run.alive.values()), (
        f"{tag} registered workers {registered}, alive {set(run.alive.values())}"
    )
    for worker_id in registered:
        assert client.llen(KEYS.inflight(worker_id)) == 0, f"{tag} {worker_id} holds tasks"
    expected = {task_id: expect(seed, task_id, LIMIT, MAX_RETRIES) for task_id in ids}
    problems = [
        f"{task_id} {plan(seed, task_id)}: {problem}"
        for task_id in ids
        if (problem := mismatch(task_id, found[task_id], expected[task_id], run.held))
    ]
    assert not problems, f"{tag} {len(problems)} outcome(s) not as planned:\n" + "\n".join(
        problems[:40]
    )
    repeats = duplicate_runs(runs)
    assert not repeats, f"{tag} runs repeated with the same delivery_count: {repeats}"
    starts: dict[str, list[tuple[int, int]]] = {task_id: [] for task_id in ids}
    for line in runs:
        if line["event"] == "start":
            starts[line["task_id"]].append((line["retry_count"], line["delivery_count"]))
    unplanned = [
        (task_id, plan(seed, task_id), sorted(starts[task_id]))
        for task_id in ids
        if not runs_as_planned(starts[task_id], expected[task_id].attempts, task_id in run.held)
    ]
    assert not unplanned, f"{tag} tasks run other than planned (task, plan, runs): {unplanned[:20]}"


def mismatch(
    task_id: str,
    found: tuple[dict[str, Any] | None, list[dict[str, Any]]],
    expected: Expected,
    held: set[str],
) -> str | None:
    """What differs between a task's final state and its plan's prediction, or None."""
    result, records = found
    assert result is not None  # settled: every task has a result
    outcome = classify(result, records)
    if outcome not in expected.outcomes:
        detail = records[0].get("error") if records else result.get("error")
        return f"{outcome}, expected {sorted(expected.outcomes)} ({str(detail)[:300]})"
    if outcome == DEAD:
        return dead_mismatch(task_id, records[0], expected, held)
    if expected.attempts is not None and result["attempts"] != expected.attempts:
        return f"succeeded after {result['attempts']} attempts, expected {expected.attempts}"
    if expected.check_value and result["result"] != expected.value:
        got, wanted = str(result["result"])[:200], str(expected.value)[:200]
        return f"result {got!r}, expected {wanted!r}"
    return None


def dead_mismatch(
    task_id: str, record: dict[str, Any], expected: Expected, held: set[str]
) -> str | None:
    """What differs between a task's dead-letter record and its plan's prediction."""
    problems = []
    if expected.reason is not None and record["reason"] != expected.reason:
        problems.append(f"dead-lettered as {record['reason']}, expected {expected.reason}")
    if record.get("task_id") != task_id:
        problems.append(f"its dead-letter record names task {record.get('task_id')}")
    if expected.attempts is not None and record["attempts"] != expected.attempts:
        problems.append(f"{record['attempts']} attempts recorded, expected {expected.attempts}")
    never_crashed = task_id not in held
    if (
        expected.attempts is not None
        and never_crashed
        and record["delivery_count"] != (expected.attempts)
    ):
        problems.append(
            f"delivery_count {record['delivery_count']}, expected {expected.attempts}"
            " (its worker never died)"
        )
    return "; ".join(problems) or None


def runs_as_planned(starts: list[tuple[int, int]], attempts: int | None, held: bool) -> bool:
    """Whether a task ran once per attempt (retry counts 0..n-1, delivery counts 1..n); a
    task its SIGKILLed worker held may have run once more (its interrupted attempt)."""
    if attempts is None:
        return bool(starts)
    retry_counts = sorted(retry for retry, _ in starts)
    if held:
        return set(retry_counts) == set(range(attempts)) and len(starts) <= attempts + 1
    deliveries = sorted(delivery for _, delivery in starts)
    return retry_counts == list(range(attempts)) and deliveries == list(range(1, attempts + 1))
